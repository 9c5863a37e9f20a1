"""The one model: a decoder-only Transformer covering the GPT-2 and Llama families.

Every architectural choice is a field of :class:`GPTConfig`: learned or rotary positions,
LayerNorm or RMSNorm, GELU / SwiGLU / ReLU² MLPs, multi-head, grouped-query or multi-query
attention, tied or untied embeddings, optional biases and QK-norm, dropout.

Module names follow the Llama convention of Hugging Face (``embed_tokens``, ``layers.N``,
``attn.o_proj``, ``mlp.down_proj``, ``norm``, ``lm_head``) so that importing a Hugging Face
state dict is a key map. Two projections are fused for speed on small shapes, where kernel
launches dominate: ``attn.qkv_proj`` (= q_proj|k_proj|v_proj, GPT-2's ``c_attn``) and, for
SwiGLU, ``mlp.gate_up_proj`` (= gate_proj|up_proj); an importer concatenates those rows.

Rotary embeddings use the Hugging Face "rotate half" layout (first half of each head
pairs with the second half), so Llama-family HF weights load without permutation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import hardware
from ..errors import LmforgeError
from .cache import CacheView, LayerKV
from .presets import get_preset


#: Largest value of each size of a config: well above every published model (Llama 3.1
#: 405B: 126 layers, 16384 wide, 128k context; vocabularies up to ~260k).
CONFIG_LIMITS = {"vocab_size": 1 << 24, "context_length": 1 << 21, "n_layer": 1024, "n_head": 1024,
                 "n_kv_head": 1024, "n_embd": 1 << 16, "head_dim": 1024, "intermediate_size": 1 << 20,
                 "num_labels": 1 << 16}
#: Rotary tables (cos and sin, fp32) are built for the whole context: at most 2 x 512 MiB.
MAX_ROPE_TABLE = 1 << 27


@dataclass
class GPTConfig:
    vocab_size: int = 50304
    context_length: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # None: = n_head (MHA); 1: MQA; in between: GQA
    n_embd: int = 768
    head_dim: int | None = None  # None: n_embd // n_head
    intermediate_size: int | None = None  # None: 4*n_embd (gelu/relu2), ~8/3*n_embd rounded (swiglu)
    pos_embedding: Literal["learned", "rope", "none"] = "learned"
    rope_theta: float = 10000.0
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    mlp: Literal["gelu", "gelu_tanh", "swiglu", "relu2"] = "gelu"
    bias: bool = True  # biases in linear layers and LayerNorm
    qkv_bias: bool | None = None  # None: follows `bias` (Qwen2: true with bias false)
    qk_norm: bool = False
    tie_embeddings: bool = True
    dropout: float = 0.0
    init_std: float = 0.02
    num_labels: int = 0  # > 0: a sequence-classification head ``score`` on the last real token


    __presets__ = staticmethod(get_preset)

    def __post_init__(self) -> None:
        self._check_types_and_bounds()
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
            self.head_dim = self.n_embd // self.n_head
        if self.intermediate_size is None:
            if self.mlp == "swiglu":
                hidden = int(8 * self.n_embd / 3)
                self.intermediate_size = 64 * ((hidden + 63) // 64)
            else:
                self.intermediate_size = 4 * self.n_embd
        if self.qkv_bias is None:
            self.qkv_bias = self.bias
        for name in ("vocab_size", "context_length", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_labels < 0:
            raise ValueError(f"num_labels must not be negative, got {self.num_labels}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.pos_embedding == "rope" and self.head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {self.head_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        self._check_types_and_bounds()
        if self.pos_embedding == "rope" and self.context_length * self.head_dim > MAX_ROPE_TABLE:
            raise ValueError(f"context_length x head_dim ({self.context_length} x {self.head_dim}) exceeds "
                             f"{MAX_ROPE_TABLE} (the rotary tables would take over 1 GiB)")

    def _check_types_and_bounds(self) -> None:
        """Whole numbers where sizes are expected, within :data:`CONFIG_LIMITS`; finite positive
        scalars. A config is input (model files from anywhere): without these checks a
        1e5-layer config built modules for 300 s and a 1e12 context crashed the allocator."""
        for name, limit in CONFIG_LIMITS.items():
            v = getattr(self, name)
            if v is None and name in ("n_kv_head", "head_dim", "intermediate_size"):
                continue
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{name} must be a whole number, got {v!r}"[:200])
            if v > limit:
                raise ValueError(f"{name} is {v}; lmforge accepts at most {limit}")
            if v < (0 if name == "num_labels" else 1):
                raise ValueError(f"{name} must be positive, got {v}")
        for name in ("rope_theta", "norm_eps", "init_std"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite non-negative number, got {v!r}"[:200])


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def make_norm(cfg: GPTConfig, dim: int | None = None) -> nn.Module:
    dim = dim or cfg.n_embd
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim, cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.bias)


def rope_tables(head_dim: int, length: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    freqs = torch.outer(torch.arange(length, dtype=torch.float64), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, head_dim), HF rotate-half layout
    return emb.cos().float(), emb.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos/sin: (T, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


AttentionImpl = Literal["auto", "sdpa", "math"]


def use_math_attention(impl: AttentionImpl, q: torch.Tensor) -> bool:
    """``auto`` picks plain matmul attention under CPU bf16 autocast for contexts up to 1024, on
    CPUs where bf16 GEMMs are fast (:func:`lmforge.hardware.math_attention_wins`).

    Measured with torch 2.13, forward+backward on one thread: on an AMX/AVX512-BF16 CPU
    PyTorch's bf16 flash-attention is 7x slower than matmul attention at T=64 and 2.2x at
    T=256, since matmul attention runs on the fast bf16 GEMMs; where bf16 is emulated (AVX2)
    those GEMMs are the slow part and sdpa's bf16 kernel is 2.2-2.6x faster than matmul
    attention. Elsewhere (fp32, GPUs) sdpa (flash / memory-efficient) wins.
    """
    if impl != "auto":
        return impl == "math"
    return (q.device.type == "cpu" and torch.is_autocast_enabled("cpu") and q.shape[-2] <= 1024
            and hardware.math_attention_wins())


@lru_cache(maxsize=16)
def causal_bias(T: int, S: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive causal mask (T, S): 0 where query t may see key s, -inf above the diagonal."""
    return torch.full((T, S), float("-inf"), dtype=dtype, device=device).triu_(S - T + 1)


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float) -> torch.Tensor:
    """Causal attention as two batched matmuls; the first also applies the scale and the mask
    (``baddbmm``: one op instead of three). Under bf16 the scores are already bf16 (the
    matmul's output) and the CPU softmax kernel accumulates in fp32, so nothing is gained
    by upcasting."""
    B, H, T, D = q.shape
    S = k.shape[-2]
    make = causal_bias.__wrapped__ if torch.compiler.is_compiling() else causal_bias  # traced, not cached, in a graph
    bias = make(T, S, q.dtype, q.device).expand(B * H, T, S)
    att = torch.baddbmm(bias, q.reshape(B * H, T, D), k.reshape(B * H, S, D).transpose(1, 2), alpha=D**-0.5)
    att = att.softmax(dim=-1)
    if dropout:
        att = F.dropout(att, p=dropout)
    return torch.bmm(att, v.reshape(B * H, S, D)).view(B, H, T, D)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        q_dim, kv_dim = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
        self.split = (q_dim, kv_dim, kv_dim)
        self.qkv_proj = nn.Linear(cfg.n_embd, q_dim + 2 * kv_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(q_dim, cfg.n_embd, bias=cfg.bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.dropout = cfg.dropout
        self.impl: AttentionImpl = "auto"
        self.resid_dropout = nn.Dropout(cfg.dropout)

    # ---- extension points: set on an instance by the code named, None (the class default) on a
    # plain model, where each costs one attribute read. Nothing else reaches into this module.

    #: Opt-in observer of the uncached forward (:mod:`lmforge.eval.attention`): when set on an
    #: instance, called with the post-rotary queries (B, H, T, D), the keys and values as
    #: attended (B, H, S, D: prefix-tuning keys first, GQA heads repeated) and the attention
    #: output (B, H, T, D).
    capture: Callable[..., None] | None = None

    #: Prefix-tuning (:func:`lmforge.model.peft.prompts.attach_prefix`): returns this layer's
    #: learned keys and values, (n_kv_head, P, head_dim) each, which every query attends to
    #: before the tokens. The one source of the prefix: the uncached forward concatenates it
    #: here, and :meth:`GPT.virtual_prefix_kv` hands the same tensors to the KV cache. A plain
    #: attribute, not a submodule: ``GPT.prefix_encoder`` owns the parameters.
    prefix: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, kv: LayerKV | None = None
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x).split(self.split, dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim)
        k = k.view(B, T, self.n_kv_head, self.head_dim)
        v = v.view(B, T, self.n_kv_head, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is not None:
            return self.o_proj(self._cached_attention(q, k, v, kv).transpose(1, 2).reshape(B, T, -1))
        prefix = self.prefix  # prefix-tuning: learned keys/values before the tokens
        if prefix is not None:
            pk, pv = prefix()  # (n_kv_head, P, head_dim)
            k = torch.cat([pk.to(k.dtype).expand(B, -1, -1, -1), k], dim=2)
            v = torch.cat([pv.to(v.dtype).expand(B, -1, -1, -1), v], dim=2)
        if self.n_kv_head != self.n_head:
            rep = self.n_head // self.n_kv_head
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        dropout = self.dropout if self.training else 0.0
        if prefix is not None:  # every query sees the whole prefix, then the tokens causally
            S = k.shape[2]
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril_(S - T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        elif use_math_attention(self.impl, q):
            y = math_attention(q, k, v, dropout)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        if self.capture is not None:
            self.capture(q, k, v, y)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.resid_dropout(self.o_proj(y))

    @staticmethod
    def _cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: LayerKV) -> torch.Tensor:
        """Attention of new queries over the cache (after writing this step's keys/values).
        sdpa's ``enable_gqa`` shares each key/value head across its query group without
        copying (measured on CPU: 18 us against 30 us for a reshaped-query sdpa at S=64).
        The cache may hold a wider dtype than the model (fp32 for a bf16 model on CPU, where
        sdpa of one query runs 4x faster in fp32); queries follow the cache's dtype."""
        keys, values = kv.update(k, v)
        view = kv.view
        y = F.scaled_dot_product_attention(
            q.to(keys.dtype), keys, values, attn_mask=view.mask, is_causal=view.is_causal,
            enable_gqa=keys.shape[1] != q.shape[1],
        )
        return y.to(q.dtype)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.kind = cfg.mlp
        hidden = cfg.intermediate_size
        if cfg.mlp == "swiglu":
            self.gate_up_proj = nn.Linear(cfg.n_embd, 2 * hidden, bias=cfg.bias)
        else:
            self.up_proj = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
        self.down_proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.kind == "relu2":
            # r * r, not r.square(): square's backward goes through pow's generic kernel; measured
            # forward+backward on (1536, 512) fp32, 2 threads, AVX2: 2.62 ms against 1.09 ms
            r = F.relu(self.up_proj(x))
            h = r * r
        else:
            h = F.gelu(self.up_proj(x), approximate="tanh" if self.kind == "gelu_tanh" else "none")
        return self.dropout(self.down_proj(h))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, kv: LayerKV | None = None
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope, kv)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        if cfg.pos_embedding == "learned":
            self.embed_positions = nn.Embedding(cfg.context_length, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = make_norm(cfg)
        if not cfg.tie_embeddings:
            self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.num_labels:  # GPT2ForSequenceClassification's head (no bias)
            self.score = nn.Linear(cfg.n_embd, cfg.num_labels, bias=False)
        if cfg.pos_embedding == "rope":
            cos, sin = rope_tables(cfg.head_dim, cfg.context_length, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    # ---- initialisation -------------------------------------------------------------
    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, 0.02) weights, zero biases, residual projections scaled by 1/sqrt(2L)."""
        std = self.config.init_std
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                s = std / math.sqrt(2 * self.config.n_layer) if name.endswith(("o_proj", "down_proj")) else std
                nn.init.normal_(module.weight, mean=0.0, std=s)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, (nn.LayerNorm, RMSNorm)):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    # ---- forward ----------------------------------------------------------------------
    def output_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.config.tie_embeddings else self.lm_head.weight

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The output projection. A module ``lm_head`` is used when present, also for a tied
        model: weight quantization gives a tied model its own quantized head, while the
        embedding keeps full precision for the (cheap) row lookups."""
        head = self._modules.get("lm_head")
        return head(h) if head is not None else F.linear(h, self.embed_tokens.weight)

    # ---- extension points (class defaults for a plain model; set on an instance by the code named)

    #: Leading virtual positions that precede every sequence: a soft prompt (prompt-tuning,
    #: a ``soft_prompt`` submodule with ``embeddings`` (P, n_embd)) or learned per-layer
    #: keys/values (prefix-tuning, each ``Attention.prefix``). Set by :mod:`lmforge.model.peft`.
    virtual_tokens: int = 0

    #: The adapter a parameter-efficient method added (:class:`lmforge.model.peft.PeftHandle`),
    #: set by ``apply_peft`` and cleared by ``merge_peft``.
    peft: Any = None

    # ``quantization`` (``{"method": "int8", ...}``) is set by lmforge.model.quant (quantize_model,
    # apply_structure) along with its quantized linears, and absent on a plain model (what
    # ``hasattr`` tells exporters and tests); config.json stores it.

    def _trunk(
        self, x: torch.Tensor, cache: CacheView | None = None, start: int = 0, input_lengths: list[int] | None = None
    ) -> torch.Tensor:
        """The one path through the model: input embeddings (B, T, n_embd) -> hidden states
        before the final norm. Without a cache the tokens take positions ``start``,
        ``start + 1``, ... (training, scoring); with one, each row continues its cache row
        (its keys/values are written there, see :meth:`forward_cached`)."""
        learned, rope = self.config.pos_embedding == "learned", None
        if cache is None:
            n = x.shape[1]
            if learned:
                x = x + self.embed_positions(torch.arange(start, start + n, device=x.device))
            x = self.drop(x)
            if self.config.pos_embedding == "rope":
                rope = (self.rope_cos[start : start + n], self.rope_sin[start : start + n])
        else:
            cache.begin(x.shape[1], input_lengths)
            pos = cache.positions  # (B, T): each row's own positions
            if learned:
                x = x + self.embed_positions(pos)
            if self.config.pos_embedding == "rope":
                rope = (self.rope_cos[pos].unsqueeze(1), self.rope_sin[pos].unsqueeze(1))  # (B, 1, T, D)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, None if cache is None else cache.layer(i))
        if cache is not None:
            cache.commit()
        return x

    def hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        """Final normalised hidden states (B, T, n_embd) for token ids (B, T)."""
        B, T = idx.shape
        P = self.virtual_tokens
        if T + P > self.config.context_length:
            raise ValueError(f"sequence length {T + P} exceeds context_length {self.config.context_length}")
        x = self.embed_tokens(idx)
        soft = self._modules.get("soft_prompt")
        start = 0 if soft is not None else P  # after a prefix, tokens take positions P, P+1, ...
        if soft is not None:
            x = torch.cat([soft.embeddings.to(x.dtype).expand(B, -1, -1), x], dim=1)
        x = self.norm(self._trunk(x, start=start))
        return x[:, P:] if soft is not None else x

    @torch.no_grad()
    def virtual_prefix_kv(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The cache entries of the virtual tokens, (n_layer, n_kv_head, P, head_dim) keys and
        values, for :meth:`KVCache.prefill_prefix` (None without virtual tokens). Causal
        attention makes them independent of what follows, so they are computed once."""
        P = self.virtual_tokens
        if not P:
            return None
        soft = self._modules.get("soft_prompt")
        if soft is None:
            pairs = [layer.attn.prefix() for layer in self.layers]
            return torch.stack([k for k, _ in pairs]), torch.stack([v for _, v in pairs])
        from .cache import KVCache

        w = self.embed_tokens.weight
        cache = KVCache(self.config, 1, capacity=P, dtype=w.dtype, device=w.device)
        self.forward_cached(None, cache.rows(0, 1), embeds=soft.embeddings.to(w.dtype)[None])
        return cache.k[:, 0, :, :P].clone(), cache.v[:, 0, :, :P].clone()

    def forward_cached(
        self,
        idx: torch.Tensor | None,
        cache: CacheView,
        input_lengths: list[int] | None = None,
        logits: Literal["last", "all", "none"] = "last",
        embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Inference forward through a KV cache: ``idx`` (B, T) continues each cache row.

        Rows may hold different lengths (each token gets its own row's position), and
        ``input_lengths`` marks how many of a row's T tokens are real when prompts of
        different lengths are right-padded into one batch. Returns the logits of each row's
        last real token (B, vocab), or of every position (B, T, vocab) with ``logits="all"``,
        or None with ``logits="none"`` (a prompt chunk that only fills the cache).
        ``embeds`` (B, T, n_embd) replaces the token embeddings (soft prompts).
        """
        x = self.embed_tokens(idx) if embeds is None else embeds
        B = x.shape[0]
        x = self._trunk(x, cache, input_lengths=input_lengths)
        if logits == "none":
            return None
        if logits == "last":
            if input_lengths is None:
                x = x[:, -1]
            else:
                x = x[torch.arange(B, device=x.device), torch.tensor(input_lengths, device=x.device) - 1]
        return self.logits(self.norm(x))

    def add_classification_head(self, num_labels: int) -> None:
        """Give a language model a fresh ``score`` head (N(0, init_std)) for ``num_labels`` classes."""
        if num_labels < 2:
            raise LmforgeError(f"a classifier needs at least 2 labels, got {num_labels}")
        w = self.embed_tokens.weight
        self.score = nn.Linear(self.config.n_embd, num_labels, bias=False, device=w.device)
        nn.init.normal_(self.score.weight, std=self.config.init_std)
        self.config.num_labels = num_labels

    def classify(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Class logits (B, num_labels) from the hidden state of each row's last real token;
        ``idx`` (B, T) is right-padded and ``lengths`` (B,) counts each row's real tokens."""
        if not self.config.num_labels:
            raise LmforgeError("this model has no classification head (model.num_labels is 0)")
        h = self.hidden_states(idx)
        last = h[torch.arange(idx.shape[0], device=idx.device), lengths - 1]
        return self.score(last)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, lengths: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits (B, T, vocab) without targets; the mean next-token loss with them.

        ``targets`` uses -100 for positions that carry no loss (prompt tokens, padding).
        With ``lengths``, the class logits of :meth:`classify` (through ``forward`` so that
        DDP's gradient hooks see the call).
        """
        if lengths is not None:
            return self.classify(idx, lengths)
        h = self.hidden_states(idx)
        if targets is None:
            return self.logits(h)
        return self.loss_from_hidden(h, targets)

    #: Rows of the output projection + cross-entropy computed at a time in training: with a large
    #: vocabulary (SmolLM2: 49k) the fp32 logits of a whole batch dominate memory; chunks are
    #: recomputed in the backward instead of kept (SmolLM2 LoRA SFT, batch 4 x 384: peak RSS
    #: see BENCHMARKS.md).
    loss_chunk: int = 1024
    chunk_above: int = 1 << 26  # logits elements (256 MiB in fp32) from which the loss is chunked

    def loss_from_hidden(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy over positions whose target is not -100. Only those
        positions go through the output projection (SFT prompts and padding cost nothing), in
        chunks whose logits are recomputed in the backward rather than stored."""
        h = h.reshape(-1, h.shape[-1])
        y = targets.reshape(-1)
        keep = y != -100
        if torch.compiler.is_compiling() and y.numel() * self.config.vocab_size < self.chunk_above:
            # no data-dependent count or gather: torch.compile keeps the loss in the model's graph
            # (reading the count is a graph break that splits the forward and the backward)
            logits = self.logits(h).float()
            return F.cross_entropy(logits, y, ignore_index=-100, reduction="sum") / keep.sum().clamp(min=1)
        n = int(keep.sum())
        if n == 0:  # nothing carries loss: a zero that still has a graph
            return h.sum() * 0.0
        if n < y.numel():
            h, y = h[keep], y[keep]
        if not torch.is_grad_enabled() or n <= self.loss_chunk or n * self.config.vocab_size < self.chunk_above:
            return F.cross_entropy(self.logits(h).float(), y, reduction="sum") / n
        from torch.utils.checkpoint import checkpoint

        def chunk_loss(hc: torch.Tensor, yc: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(self.logits(hc).float(), yc, reduction="sum")

        total = sum(
            checkpoint(chunk_loss, h[i : i + self.loss_chunk], y[i : i + self.loss_chunk], use_reentrant=False)
            for i in range(0, n, self.loss_chunk)
        )
        return total / n

    # ---- accounting -------------------------------------------------------------------
    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        head = self._modules.get("lm_head")
        if self.config.tie_embeddings and head is not None:
            # a tied model's lm_head is a low-precision copy of the embedding (peft.store_frozen_in),
            # not parameters of its own: bf16 runs counted the embedding twice (167.71M for 139.40M)
            n -= head.weight.numel()
        if non_embedding:
            n -= self.embed_tokens.weight.numel()
            if self.config.pos_embedding == "learned":
                n -= self.embed_positions.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6N + 12·L·H·D·T (PaLM appendix B)."""
        c = self.config
        T = seq_len or c.context_length
        n = self.num_params(non_embedding=True)
        if c.tie_embeddings:
            n += self.embed_tokens.weight.numel()  # the output projection is a matmul
        return 6.0 * n + 12.0 * c.n_layer * c.n_head * c.head_dim * T


def build_model(cfg: GPTConfig) -> GPT:
    return GPT(cfg)


def check_finite(weights: dict[str, torch.Tensor], where: str) -> None:
    """Raise LmforgeError if a floating-point tensor holds NaN or infinite values: such a model
    can only produce NaN logits (every sampled request failed)."""
    for k, t in weights.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise LmforgeError(f"{where}: {k} holds NaN or infinite values; the weights are corrupt")


def check_state_dict(weights: dict[str, torch.Tensor], cfg: GPTConfig, where: str) -> None:
    """Raise LmforgeError unless ``weights`` has exactly the keys and shapes ``cfg`` implies."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in GPT(cfg).state_dict().items()}
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise LmforgeError(f"{where}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for k, shape in expected.items():
        if tuple(weights[k].shape) != shape:
            raise LmforgeError(f"{where}: {k} has shape {tuple(weights[k].shape)}, the config needs {shape}")
        if not weights[k].is_floating_point():
            raise LmforgeError(f"{where}: {k} is stored as {weights[k].dtype}; model weights must be floating point")
