"""``POST /v1/completions`` (OpenAI's legacy API, the one lm-evaluation-harness scores with):
decode one or more prompts, submit ``n`` choices of each, encode them as one
``text_completion`` or a stream of them. ``echo`` with ``logprobs`` and ``max_tokens: 0``
scores the prompt alone."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from fastapi import APIRouter, Request

from ...errors import LmforgeError
from ...infer.sampling import SamplingParams
from .. import decode
from ..errors import ApiError
from ..logs import log_completion
from ..protocol import CompletionRequest
from ..scheduler import Event
from ..state import ServedModel, ServerState
from ..submit import collect, stream_response, submit
from ..wire import Envelope, TokenText, legacy_logprobs, usage

router = APIRouter()


@dataclasses.dataclass
class Decoded:
    prompts: list[Any]  # as given: text or token ids
    id_lists: list[list[int]]  # their token ids
    seqs: list[list[int]]  # one a choice: n per prompt
    params: list[SamplingParams]  # one a choice
    owners: list[int]  # the prompt of each choice
    drop_last: bool  # max_tokens 0 with echo: one token is generated to score the prompt, then dropped


def decode_request(st: ServerState, m: ServedModel, req: CompletionRequest) -> Decoded:
    config = st.config
    decode.check_common(req, m, config)
    if req.suffix:
        raise ApiError(400, "suffix is not supported by this server", param="suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise ApiError(400, "best_of other than n is not supported by this server", param="best_of")
    p = req.prompt
    if isinstance(p, str):
        prompts: list[Any] = [p]
    elif p and all(isinstance(x, int) for x in p):
        prompts = [p]
    else:
        prompts = list(p)
    if not prompts:
        raise ApiError(400, "prompt: no prompt given", param="prompt")
    if len(prompts) > config.max_prompts:
        raise ApiError(400, f"prompt: at most {config.max_prompts} prompts a request, got {len(prompts)}",
                       param="prompt")
    if len(prompts) * req.n > config.max_waiting:
        raise ApiError(400, f"prompts x n is {len(prompts) * req.n}; the limit is {config.max_waiting}", param="n")
    id_lists = []
    for j, pr in enumerate(prompts):
        try:
            id_lists.append(m.engine.encode_prompt(pr))
        except LmforgeError as e:
            raise ApiError(400, f"prompt {j}: {e}", param="prompt") from None
    if req.stream and req.echo and req.logprobs is not None:
        raise ApiError(400, "echo with logprobs (prompt scoring) is supported only with stream: false", param="echo")
    requested = req.max_tokens
    drop_last = False
    if requested == 0:
        if not req.echo:
            raise ApiError(400, "max_tokens must be at least 1 (0 only with echo)", param="max_tokens")
        requested, drop_last = 1, True  # echo with nothing new: score the prompt only
    counts = [decode.room(m, len(ids), requested, config.default_completion_tokens, config) for ids in id_lists]
    stops = decode.stops(req.stop, config.max_stop)
    want_prompt_lp = req.logprobs if (req.echo and req.logprobs is not None) else None
    out = Decoded(prompts, id_lists, [], [], [], drop_last)
    for j, ids in enumerate(id_lists):
        for params in decode.sampling(req, m, counts[j], stops, [], req.logprobs, want_prompt_lp):
            out.seqs.append(ids)
            out.params.append(params)
            out.owners.append(j)
    return out


def encode_response(env: Envelope, tt: TokenText, req: CompletionRequest, job: Decoded, prompt_texts: list[str],
                    comps: list) -> dict[str, Any]:
    choices = []
    generated = 0
    for k, c in enumerate(comps):
        j = job.owners[k]
        if job.drop_last:
            out_ids, out_text, out_lps, reason = [], "", [], "length"
        else:
            out_ids, out_text, out_lps, reason = c.token_ids, c.text, c.logprobs or [], c.finish_reason
        generated += len(out_ids)
        lp = None
        if req.logprobs is not None:
            if req.echo:
                lp = legacy_logprobs(tt, list(c.prompt_ids) + list(out_ids), out_lps, 0, req.logprobs,
                                     c.prompt_logprobs)
            else:
                lp = legacy_logprobs(tt, list(out_ids), out_lps, len(prompt_texts[j]), req.logprobs)
        text = (prompt_texts[j] + out_text) if req.echo else out_text
        choices.append({"index": k, "text": text, "logprobs": lp, "finish_reason": reason})
    prompt_total = sum(len(ids) for ids in job.id_lists)
    return env(choices, usage=usage(prompt_total, generated), system_fingerprint=None)


def encode_event(chunk: Envelope, tt: TokenText, req: CompletionRequest, job: Decoded, ev: Event,
                 produced: list[int], offsets: list[int]):
    """The stream chunks of one engine event (counting tokens produced and text offsets a choice)."""
    k = ev.index
    if ev.kind == "delta":
        if job.drop_last:
            return
        d = ev.delta
        produced[k] += len(d.token_ids)
        lp = legacy_logprobs(tt, d.token_ids, d.logprobs or [], offsets[k], req.logprobs) \
            if req.logprobs is not None else None
        if lp:
            offsets[k] += sum(len(s) for s in lp["tokens"])
        if d.text or lp:
            yield chunk([{"index": k, "text": d.text, "logprobs": lp, "finish_reason": None}])
    else:
        yield chunk([{"index": k, "text": "", "logprobs": None,
                      "finish_reason": "length" if job.drop_last else ev.completion.finish_reason}])


@router.post("/v1/completions", summary="text completion (OpenAI legacy API)")
async def completions(req: CompletionRequest, request: Request):
    st, m, rid = decode.begin(request, req, "completions")
    job = decode_request(st, m, req)
    q, rids = submit(st, m, job.seqs, job.params)
    env = Envelope(f"cmpl-{rid}", "text_completion", int(time.time()), m.name)
    tt = st.token_text[m.name]
    prompt_texts = [pr if isinstance(pr, str) else m.tokenizer.decode(ids)
                    for pr, ids in zip(job.prompts, job.id_lists)]
    prompt_total = sum(len(ids) for ids in job.id_lists)
    count = len(job.seqs)

    if not req.stream:
        comps = await collect(st, request, q, rids, count)
        log_completion(rid, m.name, prompt_total, comps)
        return encode_response(env, tt, req, job, prompt_texts, comps)

    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    produced = [0] * count
    offsets = [len(prompt_texts[job.owners[k]]) for k in range(count)]
    # with echo, the prompt first, then what is generated
    head = [env([{"index": k, "text": prompt_texts[job.owners[k]], "logprobs": None, "finish_reason": None}])
            for k in range(count)] if req.echo else []

    def finish():
        if include_usage:
            yield env([], usage=usage(prompt_total, sum(produced)))

    return stream_response(st, q, rids, count, head,
                           lambda ev: encode_event(env, tt, req, job, ev, produced, offsets), finish,
                           lambda: log_completion(rid, m.name, prompt_total, None, sum(produced)))
