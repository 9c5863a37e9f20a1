"""The OpenAI wire format of answers: response objects, stream chunks, logprobs, usage.

Pure functions of what the engine produced (no request, no app): the routes decode a
request, submit it, then encode the completions through these. Two logprobs formats:
the chat API's (``{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}``) and
the legacy completions API's (``tokens`` / ``token_logprobs`` / ``top_logprobs`` /
``text_offset`` lists, the one lm-evaluation-harness reads).
"""

from __future__ import annotations

import json
from typing import Any

DONE = "data: [DONE]\n\n"
#: Headers of a server-sent-event stream: no caching, no buffering by a reverse proxy.
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(obj: Any) -> str:
    """One server-sent event carrying ``obj`` as compact JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class TokenText:
    """Text of single tokens for logprobs (cached: the same ids recur)."""

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, i: int) -> str:
        s = self.cache.get(i)
        if s is None:
            s = self.tok.decode([i]) if self.tok is not None else str(i)
            if len(self.cache) < 200_000:
                self.cache[i] = s
        return s


class Envelope:
    """The fields every object of one response shares: id, object type, creation time, model."""

    def __init__(self, id_: str, obj: str, created: int, model: str) -> None:
        self.head = {"id": id_, "object": obj, "created": created, "model": model}

    def __call__(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {**self.head, "choices": choices, **extra}


def chat_logprobs(tt: TokenText, lps, top: bool) -> list[dict[str, Any]]:
    """The chat API's ``logprobs.content`` list for ``lps`` (TokenLogprob entries)."""
    out = []
    for lp in lps or []:
        s = tt(lp.token_id)
        out.append({
            "token": s, "logprob": lp.logprob, "bytes": list(s.encode("utf-8")),
            "top_logprobs": [{"token": tt(i), "logprob": v, "bytes": list(tt(i).encode("utf-8"))}
                             for i, v in lp.top] if top else [],
        })
    return out


def legacy_logprobs(tt: TokenText, token_ids: list[int], lps: list, start: int, k: int | None,
                    prompt_lps=None) -> dict[str, Any]:
    """The completions API's logprobs object: ``token_ids`` with their entries ``lps`` (after
    ``prompt_lps``, the prompt's, when the prompt is echoed), text offsets from ``start``;
    ``k`` is the request's ``logprobs`` (0: no alternatives listed)."""
    tokens, values, tops, offsets = [], [], [], []
    pos = start
    entries = []
    if prompt_lps is not None:
        entries += [(t, lp) for t, lp in zip(token_ids[: len(prompt_lps)], prompt_lps)]
        token_ids = token_ids[len(prompt_lps):]
    entries += list(zip(token_ids, lps))
    for t, lp in entries:
        s = tt(t)
        tokens.append(s)
        offsets.append(pos)
        pos += len(s)
        if lp is None:
            values.append(None)
            tops.append(None)
        else:
            values.append(lp.logprob)
            tops.append({tt(i): v for i, v in lp.top} if lp.top else ({s: lp.logprob} if k else {}))
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}
