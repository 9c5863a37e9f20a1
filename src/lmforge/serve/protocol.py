"""Request bodies of the OpenAI-compatible API, as pydantic models.

Static bounds (temperature in [0, 2], penalties in [-2, 2], ...) are declared here, so
they appear in the OpenAPI schema; the server's own caps (n, max_tokens, messages,
context) are checked by the handlers against the configuration. Unknown fields are
ignored, as clients send vendor extensions; fields this server cannot honour
(tools, logit_bias, suffix, images) are refused with a clear message rather than
silently ignored.

Types are strict, as OpenAI's API is: ``n: "2"``, ``stream: "yes"`` or ``max_tokens: 2.0``
are 400s, not coerced (an integer is accepted where a number is expected). A lone UTF-16
surrogate (``"\ud800"`` in the JSON, which no UTF-8 text can hold and which the tokenizer
and the JSON encoder both fail on) becomes U+FFFD, the replacement character, in every
string of a request, as a browser does when it decodes such text: a client that cut an
emoji in half gets a reply, not an error.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_LOGPROBS = 20

Temperature = Annotated[float, Field(ge=0.0, le=2.0, description="0 is greedy")]
# top_p below 1e-6 rounds to 0 in float32 and would drop every token: the bound is explicit
TopP = Annotated[float, Field(ge=1e-6, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


_SURROGATE = re.compile("[\ud800-\udfff]")


def replace_surrogates(value: Any) -> Any:
    """``value`` with every lone surrogate in its strings (nested in lists and dicts) replaced by U+FFFD."""
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value) if _SURROGATE.search(value) else value
    if isinstance(value, list):
        return [replace_surrogates(v) for v in value]
    if isinstance(value, dict):
        return {replace_surrogates(k): replace_surrogates(v) for k, v in value.items()}
    return value


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data: Any) -> Any:
        return replace_surrogates(data)


class StreamOptions(_Request):
    include_usage: bool = False


class _Sampling(_Request):
    model: str | None = Field(None, max_length=256, description="a name from GET /v1/models (default: the base model)")
    n: int = Field(1, ge=1, description="choices to generate")
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: int | None = Field(None, ge=-1, description="vLLM extension; 0 or -1 is off")
    min_p: float | None = Field(None, ge=0.0, le=1.0, description="vLLM extension")
    repetition_penalty: float | None = Field(None, ge=0.01, le=100.0, description="vLLM extension; 1 is off")
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(None, description="vLLM extension")
    ignore_eos: bool = Field(False, description="vLLM extension: do not stop at the end-of-text token")
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=0)
    user: str | None = Field(None, max_length=256)
    logit_bias: dict[str, float] | None = None


class TextPart(_Request):
    type: Literal["text"]
    text: str


class OtherPart(_Request):
    type: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart | OtherPart] | None = None
    name: str | None = Field(None, max_length=256)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        ..., description="text, texts, token ids, or lists of token ids"
    )
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)


class TokenizeRequest(_Request):
    model: str | None = Field(None, max_length=256)
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True


class DetokenizeRequest(_Request):
    model: str | None = Field(None, max_length=256)
    tokens: list[Annotated[int, Field(ge=0)]]
