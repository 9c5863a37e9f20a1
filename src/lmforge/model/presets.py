"""Named model shapes. A preset is a dict of GPTConfig fields; a recipe refines it.

Add a preset by adding an entry to ``PRESETS``: ``model.preset=NAME`` then selects it
from any recipe or the command line.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError

_GPT2 = dict(
    pos_embedding="learned", norm="layernorm", mlp="gelu_tanh", bias=True, tie_embeddings=True, norm_eps=1e-5
)
_LLAMA = dict(pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False, norm_eps=1e-5)

PRESETS: dict[str, dict[str, Any]] = {
    # nanoGPT's Tiny Shakespeare character model, CPU shape (vocab comes from the tokenizer).
    "shakespeare-char": dict(_GPT2, mlp="gelu", n_layer=4, n_head=4, n_embd=128, context_length=64, bias=False),
    # GPT-2 family (Radford et al. 2019); vocab 50257.
    "gpt2": dict(_GPT2, n_layer=12, n_head=12, n_embd=768, context_length=1024, vocab_size=50257),
    "gpt2-medium": dict(_GPT2, n_layer=24, n_head=16, n_embd=1024, context_length=1024, vocab_size=50257),
    # Small Llama-style models: RoPE, RMSNorm, SwiGLU, grouped-query attention.
    "llama-tiny": dict(_LLAMA, n_layer=4, n_head=4, n_kv_head=2, n_embd=256, context_length=256, vocab_size=8192),
    "llama-small": dict(_LLAMA, n_layer=8, n_head=8, n_kv_head=4, n_embd=512, context_length=512, vocab_size=16384),
    "llama-base": dict(_LLAMA, n_layer=12, n_head=12, n_kv_head=4, n_embd=768, context_length=1024, vocab_size=32768),
    # HuggingFaceTB/SmolLM2-135M: 30 layers, 576 wide, 9 heads over 3 KV heads, tied embeddings.
    "smollm2-135m": dict(
        _LLAMA,
        n_layer=30,
        n_head=9,
        n_kv_head=3,
        n_embd=576,
        intermediate_size=1536,
        context_length=8192,
        vocab_size=49152,
        rope_theta=100000.0,
        tie_embeddings=True,
    ),
}


def get_preset(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        import difflib

        close = difflib.get_close_matches(name, list(PRESETS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown model preset '{name}'{hint}; available: {', '.join(PRESETS)}")
    return dict(PRESETS[name])
