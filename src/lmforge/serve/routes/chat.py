"""``POST /v1/chat/completions``: decode the conversation, submit ``n`` choices, encode them
as one ``chat.completion`` or a stream of ``chat.completion.chunk`` events."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request

from ...infer.chat import end_of_turn_ids
from ...infer.sampling import SamplingParams
from .. import decode
from ..errors import ApiError
from ..logs import log_completion
from ..protocol import ChatCompletionRequest
from ..scheduler import Event
from ..state import ServedModel, ServerState
from ..submit import collect, stream_response, submit
from ..wire import Envelope, TokenText, chat_logprobs, usage

router = APIRouter()


async def decode_request(st: ServerState, m: ServedModel,
                         req: ChatCompletionRequest) -> tuple[list[int], list[SamplingParams]]:
    """The prompt's token ids (the conversation through the chat template) and one parameter set a choice."""
    config = st.config
    decode.check_common(req, m, config)
    if len(req.messages) > config.max_messages:
        raise ApiError(400, f"messages: at most {config.max_messages} messages a request, got {len(req.messages)}",
                       param="messages")
    if req.tools:
        raise ApiError(400, "tools are not supported by this server", param="tools")
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise ApiError(400, "response_format: only {'type': 'text'} is supported", param="response_format")
    if req.top_logprobs and not req.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    text = await st.render(m, decode.template_messages(req.messages), True)
    ids = m.engine.encode_prompt(text)
    requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if requested is not None and requested < 1:
        raise ApiError(400, f"max_tokens must be at least 1, got {requested}", param="max_tokens")
    max_tokens = decode.room(m, len(ids), requested, config.max_tokens_cap, config)
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    params = decode.sampling(req, m, max_tokens, decode.stops(req.stop, config.max_stop),
                             end_of_turn_ids(m.tokenizer), logprobs, None)
    return ids, params


def encode_response(env: Envelope, tt: TokenText, req: ChatCompletionRequest, comps: list,
                    prompt_tokens: int) -> dict[str, Any]:
    choices = [{
        "index": i,
        "message": {"role": "assistant", "content": c.text},
        "logprobs": {"content": chat_logprobs(tt, c.logprobs, bool(req.top_logprobs))} if req.logprobs else None,
        "finish_reason": c.finish_reason,
    } for i, c in enumerate(comps)]
    return env(choices, usage=usage(prompt_tokens, sum(len(c.token_ids) for c in comps)), system_fingerprint=None)


def encode_event(chunk: Envelope, tt: TokenText, req: ChatCompletionRequest, ev: Event, produced: list[int]):
    """The stream chunks of one engine event (counting the tokens produced a choice)."""
    if ev.kind == "delta":
        d = ev.delta
        produced[ev.index] += len(d.token_ids)
        if d.text or req.logprobs:
            yield chunk([{"index": ev.index, "delta": {"content": d.text}, "logprobs":
                          {"content": chat_logprobs(tt, d.logprobs, bool(req.top_logprobs))} if req.logprobs else None,
                          "finish_reason": None}])
    else:
        yield chunk([{"index": ev.index, "delta": {}, "logprobs": None,
                      "finish_reason": ev.completion.finish_reason}])


@router.post("/v1/chat/completions", summary="chat completion (OpenAI API)")
async def chat_completions(req: ChatCompletionRequest, request: Request):
    st, m, rid = decode.begin(request, req, "chat")
    ids, params = await decode_request(st, m, req)
    q, rids = submit(st, m, [ids] * req.n, params)
    cid, created, tt = f"chatcmpl-{rid}", int(time.time()), st.token_text[m.name]

    if not req.stream:
        comps = await collect(st, request, q, rids, req.n)
        log_completion(rid, m.name, len(ids), comps)
        return encode_response(Envelope(cid, "chat.completion", created, m.name), tt, req, comps, len(ids))

    chunk = Envelope(cid, "chat.completion.chunk", created, m.name)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    produced = [0] * req.n
    head = [chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                    "finish_reason": None}]) for i in range(req.n)]

    def finish():
        if include_usage:
            yield chunk([], usage=usage(len(ids), sum(produced)))

    return stream_response(st, q, rids, req.n, head, lambda ev: encode_event(chunk, tt, req, ev, produced), finish,
                           lambda: log_completion(rid, m.name, len(ids), None, sum(produced)))
