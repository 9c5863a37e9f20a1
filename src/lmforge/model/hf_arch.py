"""Which Hugging Face architecture represents a model configuration exactly.

A fact about :class:`~lmforge.model.gpt.GPTConfig` (its positions, norm and MLP), needed both
by the Hugging Face export (:mod:`lmforge.io.hf`) and by adapter files, which use PEFT's
tensor names for the family the model exports to (:mod:`lmforge.checkpoint.adapters`);
here, below both, so that neither imports the other.
"""

from __future__ import annotations

from ..errors import LmforgeError
from .gpt import GPTConfig


def hf_architecture(cfg: GPTConfig) -> str:
    """The HF architecture that represents ``cfg`` exactly, or a clear error."""
    if cfg.qk_norm:
        raise LmforgeError("models with qk_norm cannot be exported to a supported Hugging Face architecture")
    if cfg.pos_embedding == "learned" and cfg.norm == "layernorm" and cfg.mlp in ("gelu_tanh", "gelu"):
        if cfg.n_kv_head != cfg.n_head or cfg.head_dim * cfg.n_head != cfg.n_embd:
            raise LmforgeError("GPT-2 export needs n_kv_head == n_head and head_dim == n_embd / n_head")
        return "GPT2LMHeadModel"
    if cfg.pos_embedding == "rope" and cfg.norm == "rmsnorm" and cfg.mlp == "swiglu":
        return "Qwen2ForCausalLM" if cfg.qkv_bias and not cfg.bias else "LlamaForCausalLM"
    raise LmforgeError(
        f"this model (pos_embedding={cfg.pos_embedding}, norm={cfg.norm}, mlp={cfg.mlp}) has no Hugging Face "
        "equivalent: export needs learned positions + layernorm + gelu/gelu_tanh (GPT-2) or "
        "rope + rmsnorm + swiglu (Llama / Qwen2)"
    )
