"""Decoding a request into what the engine takes: the checks every generation route shares.

The server's own caps (``n``, stop strings, ``max_tokens``, the model's context) are checked
here against the configuration (the static bounds are in the pydantic models of
``protocol.py``); sampling parameters are then built by the one builder the CLI uses too,
:func:`lmforge.infer.sampling.build_sampling_params`. Wire-only conventions stay here:
``top_k`` -1 is vLLM's "off", a ``stop`` string is a list of one.
"""

from __future__ import annotations

from ..infer.sampling import SamplingParams, build_sampling_params, seeded
from .errors import ApiError
from .logs import log_body
from .protocol import ChatMessage
from .state import ServeConfig, ServedModel, ServerState, state_of


def begin(request, req, route: str) -> tuple[ServerState, ServedModel, str]:
    """A generation request's server state, the model it names (404 if none) and its request id;
    its body logged (PII-masked) when the server logs bodies."""
    st = state_of(request)
    m = st.model(req.model)
    rid = request.state.request_id
    log_body(st.masker, rid, route, req)
    return st, m, rid


def stops(value: str | list[str] | None, cap: int) -> list[str]:
    """The request's ``stop`` as a list: at most ``cap`` non-empty strings of at most 256 characters."""
    out = [value] if isinstance(value, str) else list(value or [])
    if len(out) > cap:
        raise ApiError(400, f"stop: at most {cap} stop strings, got {len(out)}", param="stop")
    if any(not s for s in out):
        raise ApiError(400, "stop: stop strings must not be empty", param="stop")
    if any(len(s) > 256 for s in out):
        raise ApiError(400, "stop: a stop string is longer than 256 characters", param="stop")
    return out


def _flatten_content(m: ChatMessage, i: int) -> str:
    if m.content is None:
        return ""
    if isinstance(m.content, str):
        return m.content
    parts = []
    for p in m.content:
        if p.type != "text":
            raise ApiError(400, f"messages.{i}.content: content of type {p.type!r} is not supported (text only)",
                           param=f"messages.{i}.content")
        parts.append(p.text)
    return "".join(parts)


def template_messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """Messages as a chat template takes them: text content, ``developer`` as ``system``."""
    out = []
    for i, m in enumerate(messages):
        role = "system" if m.role == "developer" else m.role
        out.append({"role": role, "content": _flatten_content(m, i)})
    return out


def check_common(req, m: ServedModel, config: ServeConfig) -> None:
    """The checks of both generation routes: ``n``, ``logit_bias``, ``stop_token_ids``."""
    if req.n > config.max_n:
        raise ApiError(400, f"n: at most {config.max_n} choices a request, got {req.n}", param="n")
    if req.logit_bias:
        raise ApiError(400, "logit_bias is not supported by this server", param="logit_bias")
    if req.stop_token_ids:
        bad = [t for t in req.stop_token_ids if t >= m.engine.vocab_size]
        if bad:
            raise ApiError(400, f"stop_token_ids: {bad[0]} is outside the vocabulary (0..{m.engine.vocab_size - 1})",
                           param="stop_token_ids")


def room(m: ServedModel, prompt_len: int, requested: int | None, default: int, config: ServeConfig) -> int:
    """Tokens to generate after a prompt of ``prompt_len``: ``requested`` if it fits the cap and the
    context (else 400), or ``default`` cut to what fits."""
    ctx = m.engine.max_seq_len
    if prompt_len >= ctx:
        raise ApiError(400, f"this model's maximum context length is {ctx} tokens; the prompt has {prompt_len} "
                       "(at least one more is needed to generate)", code="context_length_exceeded")
    if requested is not None:
        if requested > config.max_tokens_cap:
            raise ApiError(400, f"max_tokens: at most {config.max_tokens_cap}, got {requested}", param="max_tokens")
        if prompt_len + requested > ctx:
            raise ApiError(400, f"this model's maximum context length is {ctx} tokens; you requested "
                           f"{prompt_len + requested} ({prompt_len} in the prompt, {requested} to generate)",
                           param="max_tokens", code="context_length_exceeded")
        return requested
    return max(1, min(default, config.max_tokens_cap, ctx - prompt_len))


def sampling(req, m: ServedModel, max_tokens: int, stop: list[str], stop_ids: list[int], logprobs: int | None,
             prompt_logprobs: int | None) -> list[SamplingParams]:
    """The request's sampling parameters, one per choice (``n``; seeds seed, seed+1, ...)."""
    params = build_sampling_params(
        max_tokens=max_tokens,
        temperature=req.temperature,
        top_k=max(0, req.top_k or 0),  # -1: off, as vLLM
        top_p=req.top_p,
        min_p=req.min_p,
        repetition_penalty=req.repetition_penalty,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        stop=stop,
        stop_token_ids=[*stop_ids, *(req.stop_token_ids or [])],
        ignore_eos=req.ignore_eos,
        seed=req.seed,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        vocab_size=m.engine.vocab_size,
    )
    return seeded(params, req.n)
