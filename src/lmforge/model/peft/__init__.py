"""Parameter-efficient fine-tuning on lmforge's own model.

:func:`apply_peft` freezes a loaded :class:`~lmforge.model.gpt.GPT` and adds the trainable
parts of one method; the model then trains with the ordinary engine, and
:func:`lmforge.checkpoint.adapters.save_adapter` writes only those parts (adapter files are a
checkpoint matter: :mod:`lmforge.checkpoint.adapters`).

=========  ==================================================================  =========
method     what trains                                                          merges
=========  ==================================================================  =========
lora       low-rank updates ``B A`` on the target projections                   yes
dora       LoRA + a learned magnitude per output row (weight-decomposed)        yes
adalora    LoRA in SVD form, least important singular values pruned to budget  yes
ia3        per-feature scales of keys, values and the MLP's inner activations  yes
adapter    Houlsby bottleneck adapters after attention and MLP outputs         no
prefix     per-layer key/value prefixes (prefix-tuning), via the KV cache      no
prompt     soft prompt embeddings before the input (prompt-tuning)             no
=========  ==================================================================  =========

``quantize_base=int8|int4`` freezes the base in weight-only int8/int4 first (QLoRA-style:
the adapters train in full precision over the quantized base).

Targets use Hugging Face's names (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``,
``gate_proj``, ``up_proj``, ``down_proj``, or ``all-linear``) although lmforge fuses q/k/v
and gate/up: a target is an output slice of a fused projection (see :mod:`.lora`). Why this
is written here rather than wrapped from the ``peft`` library: ``peft`` adapts whole
``nn.Linear`` modules, so on the fused projections it could neither target q and v alone nor
write adapters that load onto the Hugging Face model; our layers do both, and saved LoRA/DoRA
adapters are PEFT files (tests load them with ``peft`` onto the exported model).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Literal

import torch
import torch.nn as nn

from ...errors import ConfigError, LmforgeError
from .adalora import RankAllocator
from .lora import BottleneckAdapter, IA3Linear, LoRALinear
from .prompts import attach_prefix, attach_soft_prompt, init_token_ids, prefix_init

Method = Literal["none", "lora", "dora", "adalora", "ia3", "adapter", "prefix", "prompt"]
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_METHODS = ("lora", "dora", "adalora")


@dataclass
class PeftConfig:
    method: Method = "none"  # none = full fine-tuning
    r: int = 8  # LoRA rank (AdaLoRA: the average rank left after pruning)
    alpha: float = 16.0  # LoRA scale = alpha / r
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    quantize_base: Literal["none", "int8", "int4"] = "none"  # QLoRA-style frozen quantized base
    group_size: int = 32  # int4 quantization group
    # AdaLoRA
    init_r: int = 12  # rank of every slice before pruning
    tinit_fraction: float = 0.1  # steps at full budget before pruning starts
    tfinal_fraction: float = 0.2  # steps at the final budget at the end
    delta_t: int = 10  # steps between budget reallocations
    orth_reg: float = 0.5  # weight of the orthogonality penalty on P and Q
    # IA3 (targets: scaled outputs; ia3_feedforward: scaled inputs)
    ia3_targets: list[str] = field(default_factory=lambda: ["k_proj", "v_proj", "down_proj"])
    ia3_feedforward: list[str] = field(default_factory=lambda: ["down_proj"])
    # bottleneck adapters
    bottleneck: int = 64
    # prefix / prompt tuning
    num_virtual_tokens: int = 16
    init_text: str = ""  # initialise virtual tokens from this text's tokens (else random vocabulary tokens)
    modules_to_save: list[str] = field(default_factory=list)  # also train these modules fully (e.g. score)

    def __post_init__(self) -> None:
        if self.method in LORA_METHODS:
            if self.r <= 0:
                raise ValueError(f"peft.r (the LoRA rank) must be positive, got {self.r}")
            if self.alpha <= 0:
                raise ValueError(f"peft.alpha must be positive, got {self.alpha}")
            if not self.target_modules:
                raise ValueError("peft.target_modules is empty: name the projections to adapt (or all-linear)")
        if self.method == "adalora" and self.init_r < self.r:
            raise ValueError(f"peft.init_r ({self.init_r}) must be at least peft.r ({self.r}), the target rank")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"peft.dropout must be in [0, 1), got {self.dropout}")
        if self.method == "adapter" and self.bottleneck <= 0:
            raise ValueError(f"peft.bottleneck must be positive, got {self.bottleneck}")
        if self.method in ("prefix", "prompt") and self.num_virtual_tokens <= 0:
            raise ValueError(f"peft.num_virtual_tokens must be positive, got {self.num_virtual_tokens}")
        if not (0 <= self.tinit_fraction and 0 <= self.tfinal_fraction and self.tinit_fraction + self.tfinal_fraction < 1):
            raise ValueError("peft.tinit_fraction + peft.tfinal_fraction must be below 1")
        if self.delta_t <= 0:
            raise ValueError(f"peft.delta_t must be positive, got {self.delta_t}")


# ----------------------------------------------------------------------------- targets
def projection_slices(model) -> dict[str, dict[str, tuple[str, tuple[int, int]]]]:
    """Per target name: ``{layer index: (module path in the layer, output rows)}`` for this model."""
    cfg = model.config
    q, kv, inter = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.intermediate_size
    one = {
        "q_proj": ("attn.qkv_proj", (0, q)),
        "k_proj": ("attn.qkv_proj", (q, q + kv)),
        "v_proj": ("attn.qkv_proj", (q + kv, q + 2 * kv)),
        "qkv_proj": ("attn.qkv_proj", (0, q + 2 * kv)),
        "o_proj": ("attn.o_proj", (0, cfg.n_embd)),
        "down_proj": ("mlp.down_proj", (0, cfg.n_embd)),
    }
    if cfg.mlp == "swiglu":
        one |= {
            "gate_proj": ("mlp.gate_up_proj", (0, inter)),
            "up_proj": ("mlp.gate_up_proj", (inter, 2 * inter)),
            "gate_up_proj": ("mlp.gate_up_proj", (0, 2 * inter)),
        }
    else:
        one["up_proj"] = ("mlp.up_proj", (0, inter))
    return {name: {i: spec for i in range(cfg.n_layer)} for name, spec in one.items()}


def resolve_targets(model, targets: list[str]) -> dict[tuple[int, str], dict[str, tuple[int, int]]]:
    """``{(layer, module path): {target: rows}}`` for target names; clear errors for unknown ones."""
    table = projection_slices(model)
    names = list(targets)
    if names == ["all-linear"]:
        names = [n for n in PROJECTIONS if n in table]
    unknown = [n for n in names if n not in table]
    if unknown:
        valid = ", ".join([*(n for n in PROJECTIONS if n in table), "qkv_proj", "all-linear"])
        raise ConfigError(f"unknown peft target(s) {', '.join(unknown)} for this model; valid: {valid}")
    out: dict[tuple[int, str], dict[str, tuple[int, int]]] = {}
    for name in names:
        for i, (path, rows) in table[name].items():
            slot = out.setdefault((i, path), {})
            if any(s < rows[1] and rows[0] < e for s, e in slot.values()):
                raise ConfigError(f"peft targets overlap on {path} (e.g. qkv_proj with q_proj); pick one")
            slot[name] = rows
    return out


def _get(model, i: int, path: str) -> nn.Module:
    mod = model.layers[i]
    for part in path.split("."):
        mod = getattr(mod, part)
    return mod


def _set(model, i: int, path: str, new: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = _get(model, i, parent_path) if parent_path else model.layers[i]
    setattr(parent, leaf, new)


# ----------------------------------------------------------------------------- the handle
class PeftHandle:
    """What :func:`apply_peft` attached to a model (``model.peft``): the method's layers,
    the AdaLoRA allocator, and the training hooks the engine calls."""

    def __init__(self, cfg: PeftConfig, layers: list[nn.Module], allocator: RankAllocator | None = None) -> None:
        self.cfg = cfg
        self.layers = layers
        self.allocator = allocator

    # engine hooks
    def extra_loss(self) -> torch.Tensor | None:
        if self.allocator is not None and self.allocator.orth_reg > 0:
            return self.allocator.regularization()
        return None

    def after_step(self, step: int) -> None:
        if self.allocator is not None:
            self.allocator.after_step(step)

    def on_plan(self, total_steps: int) -> None:
        """The run's length was set by a time budget: AdaLoRA's rank schedule follows it."""
        if self.allocator is not None:
            self.allocator.set_total_steps(total_steps, self.cfg.tinit_fraction, self.cfg.tfinal_fraction)

    def metrics(self) -> dict[str, float]:
        if self.allocator is None:
            return {}
        ranks = self.allocator.active_ranks()
        return {"active_rank_mean": sum(ranks.values()) / max(1, len(ranks)), "rank_budget": self.allocator.budget}


def apply_peft(model, cfg: PeftConfig, *, tokenizer=None, total_steps: int = 1000, seed: int = 0):
    """Freeze ``model`` and add ``cfg.method``'s trainable parts in place; returns the model.

    ``method="none"`` leaves every parameter trainable (full fine-tuning)."""
    if getattr(model, "peft", None) is not None:
        raise LmforgeError("the model already carries an adapter; merge or unload it first")
    if cfg.method == "none":
        if cfg.quantize_base != "none":
            raise ConfigError("peft.quantize_base needs a parameter-efficient method (e.g. peft.method=lora)")
        return model
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.quantize_base != "none":
        from .. import quant

        quant.quantize_model(model, cfg.quantize_base, cfg.group_size)
    layers: list[nn.Module] = []
    allocator = None
    if cfg.method in LORA_METHODS:
        r = cfg.init_r if cfg.method == "adalora" else cfg.r
        for (i, path), slices in resolve_targets(model, cfg.target_modules).items():
            layer = LoRALinear(_get(model, i, path), slices, r, cfg.alpha, cfg.dropout, kind=cfg.method)
            _set(model, i, path, layer)
            layers.append(layer)
        if cfg.method == "adalora":
            allocator = RankAllocator(
                layers,
                target_r=cfg.r,
                total_steps=total_steps,
                tinit=int(cfg.tinit_fraction * total_steps),
                tfinal=int(cfg.tfinal_fraction * total_steps),
                delta_t=cfg.delta_t,
                orth_reg=cfg.orth_reg,
            )
    elif cfg.method == "ia3":
        ff = set(cfg.ia3_feedforward)
        if not ff <= set(cfg.ia3_targets):
            raise ConfigError("peft.ia3_feedforward must be a subset of peft.ia3_targets")
        for (i, path), slices in resolve_targets(model, cfg.ia3_targets).items():
            is_ff = bool(ff & set(slices))
            if is_ff and len(slices) > 1:
                raise ConfigError(f"IA3 input scaling applies to a whole projection, not to slices of {path}")
            layer = IA3Linear(_get(model, i, path), slices, feedforward=is_ff)
            _set(model, i, path, layer)
            layers.append(layer)
    elif cfg.method == "adapter":
        for i in range(model.config.n_layer):
            for path in ("attn.o_proj", "mlp.down_proj"):
                layer = BottleneckAdapter(_get(model, i, path), cfg.bottleneck, cfg.dropout)
                _set(model, i, path, layer)
                layers.append(layer)
    elif cfg.method in ("prefix", "prompt"):
        P = cfg.num_virtual_tokens
        if P >= model.config.context_length:
            raise ConfigError(f"peft.num_virtual_tokens ({P}) must be below the context length {model.config.context_length}")
        ids = init_token_ids(model, tokenizer, P, cfg.init_text or None, seed)
        if cfg.method == "prompt":
            layers.append(attach_soft_prompt(model, ids))
        else:
            layers.append(attach_prefix(model, *prefix_init(model, ids)))
    for layer in layers:
        for name, p in layer.named_parameters():
            if not name.startswith("base_layer."):
                p.requires_grad_(True)
    _train_modules_to_save(model, cfg.modules_to_save)
    model.peft = PeftHandle(cfg, layers, allocator)
    return model


def store_frozen_in(model, dtype: torch.dtype) -> int:
    """Keep the frozen matmul weights of ``model`` in ``dtype`` (the autocast compute dtype).

    Autocast casts an fp32 weight to bf16 at every use, and caches the cast only for weights
    that require grad, so a frozen base paid one cast of every projection per forward, and the
    (tied, frozen) output projection one per loss chunk and again in the backward. Cast once,
    the results are identical (autocast rounds to the same bf16 values) and the base takes half
    the memory. Norm weights and the embedding lookup stay fp32; a frozen tied output
    projection gets its own ``lm_head`` copy in ``dtype``. Returns the tensors cast."""
    n = 0
    for module in model.modules():
        if isinstance(module, nn.Linear) and not module.weight.requires_grad:
            module.weight.data = module.weight.data.to(dtype)
            if module.bias is not None and not module.bias.requires_grad:
                module.bias.data = module.bias.data.to(dtype)
            n += 1
    emb = model.embed_tokens.weight
    if model.config.tie_embeddings and not emb.requires_grad and "lm_head" not in model._modules:
        head = nn.Linear(emb.shape[1], emb.shape[0], bias=False, device=emb.device, dtype=dtype)
        head.weight.data = emb.detach().to(dtype)
        head.weight.requires_grad_(False)
        model.lm_head = head
        n += 1
    return n


def _train_modules_to_save(model, names: list[str]) -> None:
    for name in names:
        params = [p for n, p in model.named_parameters() if n == name or n.startswith(name + ".")]
        if not params:
            raise ConfigError(f"peft.modules_to_save: the model has no module {name!r}")
        for p in params:
            p.requires_grad_(True)


def adapter_state_dict(model) -> dict[str, torch.Tensor]:
    """The trainable tensors of the adapter (and of modules_to_save), by lmforge name."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def trainable_summary(model) -> dict[str, float]:
    # num_params: a tied model's bf16 lm_head copy (store_frozen_in) is not counted twice
    total = model.num_params() if hasattr(model, "num_params") else sum(p.numel() for p in model.parameters())
    quant_total = sum(b.numel() * (2 if b.dtype == torch.uint8 else 1) for n, b in model.named_buffers() if "weight_int" in n)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total += quant_total
    return {"trainable_params": trainable, "total_params": total, "trainable_percent": 100.0 * trainable / max(total, 1)}


@contextlib.contextmanager
def adapters_disabled(model) -> Iterator[None]:
    """Run the base model: every adapter layer passes through (prefix/prompt tokens removed)."""
    handle = getattr(model, "peft", None)
    if handle is None:
        yield
        return
    saved_virtual = model.virtual_tokens
    prefixes = {i: layer.attn.prefix for i, layer in enumerate(model.layers) if layer.attn.prefix is not None}
    soft = model._modules.pop("soft_prompt", None)
    flags = [(layer, layer.disabled) for layer in handle.layers if hasattr(layer, "disabled")]
    try:
        model.virtual_tokens = 0
        for i in prefixes:
            model.layers[i].attn.prefix = None
        for layer, _ in flags:
            layer.disabled = True
        yield
    finally:
        model.virtual_tokens = saved_virtual
        for i, fn in prefixes.items():
            model.layers[i].attn.prefix = fn
        if soft is not None:
            model._modules["soft_prompt"] = soft
        for layer, was in flags:
            layer.disabled = was


def merge_peft(model):
    """Fold LoRA / DoRA / AdaLoRA / IA3 into plain linears (in place); returns the model.

    The result is an ordinary model (a quantized base is dequantized: the merged weights are
    full precision). Adapters, prefixes and soft prompts cannot be folded: a clear error."""
    handle = getattr(model, "peft", None)
    if handle is None:
        raise LmforgeError("the model carries no adapter to merge")
    if handle.cfg.method not in (*LORA_METHODS, "ia3"):
        raise LmforgeError(
            f"{handle.cfg.method} adapters add computation that cannot be folded into the weights; "
            "serve them with the adapter (lmforge serve --adapter, or load the adapter checkpoint)"
        )
    for i, block in enumerate(model.layers):
        for path in ("attn.qkv_proj", "attn.o_proj", "mlp.gate_up_proj", "mlp.up_proj", "mlp.down_proj"):
            try:
                mod = _get(model, i, path)
            except AttributeError:
                continue
            if isinstance(mod, (LoRALinear, IA3Linear)):
                _set(model, i, path, mod.merged_linear())
    if getattr(model, "quantization", None):
        from ..quant import dequantize_model

        dequantize_model(model)
    for p in model.parameters():
        p.requires_grad_(True)
    model.peft = None
    return model


__all__ = [
    "PeftConfig",
    "PeftHandle",
    "apply_peft",
    "merge_peft",
    "adapters_disabled",
    "adapter_state_dict",
    "trainable_summary",
    "store_frozen_in",
    "projection_slices",
    "resolve_targets",
]
