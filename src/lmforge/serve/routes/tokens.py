"""``POST /tokenize`` (text or messages -> token ids) and ``POST /detokenize`` (ids -> text)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from ..decode import template_messages
from ..errors import ApiError
from ..protocol import DetokenizeRequest, TokenizeRequest
from ..state import state_of

router = APIRouter()


@router.post("/tokenize", summary="text or messages -> token ids")
async def tokenize(req: TokenizeRequest, request: Request):
    st = state_of(request)
    m = st.model(req.model)
    if (req.prompt is None) == (req.messages is None):
        raise ApiError(400, "give exactly one of 'prompt' and 'messages'")
    if req.messages is not None:
        if len(req.messages) > st.config.max_messages:
            raise ApiError(400, f"messages: at most {st.config.max_messages}, got {len(req.messages)}",
                           param="messages")
        text = await st.render(m, template_messages(req.messages), req.add_generation_prompt)
    else:
        text = req.prompt
    ids = m.tokenizer.encode(text) if text else []
    return {"tokens": ids, "count": len(ids), "max_model_len": m.engine.max_seq_len}


@router.post("/detokenize", summary="token ids -> text")
async def detokenize(req: DetokenizeRequest, request: Request):
    m = state_of(request).model(req.model)
    bad = [t for t in req.tokens if t >= m.engine.vocab_size]
    if bad:
        raise ApiError(400, f"tokens: {bad[0]} is outside the vocabulary (0..{m.engine.vocab_size - 1})",
                       param="tokens")
    return {"prompt": m.tokenizer.decode(req.tokens)}
