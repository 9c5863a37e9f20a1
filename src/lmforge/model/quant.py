"""Weight-only quantization of the Linear layers: int8 per channel, int4 per group, or bf16.

Methods (``quantize_model(model, method)``):

* ``int8``: symmetric, one scale per output channel: ``w = q * scale``, ``q`` in -127..127,
  ``scale = absmax / 127`` (rounded *up* to bf16, so no weight is clipped). Error per
  element at most ``scale / 2``.
* ``int4``: asymmetric min/max per group of ``group_size`` (32, 64 or 128) input features:
  ``w = (q - 8) * scale + zero``, ``q`` in 0..15 (the "tinygemm" convention of torchao and of
  PyTorch's int4 kernels: ``zero = min + 8 * scale``). Scale and zero are bf16; the scale is
  widened where needed so the grid ``[zero - 8 scale, zero + 7 scale]`` covers the group's
  min and max after bf16 rounding, so the error per element is at most ``scale / 2``.
* ``bf16``: every parameter cast to bf16 (``model.to(torch.bfloat16)``); the forward then
  runs in bf16.

Targets: every ``nn.Linear`` under ``layers`` (``attn.qkv_proj``, ``attn.o_proj``,
``mlp.up_proj`` / ``mlp.gate_up_proj``, ``mlp.down_proj``) and the output head. A tied model
gets its own quantized ``lm_head`` made from ``embed_tokens.weight`` (``GPT.logits`` uses a
module ``lm_head`` when there is one); the embedding itself, norms and biases keep full
precision. ``skip`` takes module-name patterns (fnmatch, e.g. ``"lm_head"``) to leave alone.

Forward on CPU runs PyTorch's fused weight-only kernels (``aten._weight_int8pack_mm``,
``aten._weight_int4pack_mm_for_cpu``) on activations of the dtype measured fastest on this
CPU (:func:`lmforge.hardware.quant_activation_dtype`: bf16 on AVX512-BF16 and on AVX2 alike,
8-25x faster than fp32), casting the result back to the input's dtype (fp32 activations
between layers stay fp32). The kernels are matrix-vector loops, fast for decoding; from
``gemm_rows`` rows on (a prompt's prefill, training through a frozen quantized base) a
module dequantizes its weight for the call and runs one GEMM instead, in bf16 where bf16
GEMMs are fast and in fp32 where they are emulated (:func:`lmforge.hardware.gemm_dtype`).
On other devices, and on CPU for int8 layers whose in_features is not a multiple of 16 (the
kernel's requirement), the weight is dequantized and ``F.linear`` runs instead.

State dict (also the on-disk layout of a quantized checkpoint; portable, kernel-independent):

* ``Int8Linear``: ``weight_int8`` int8 (out, in); ``scales`` bf16 (out,); ``bias`` (out,).
* ``Int4Linear``: ``weight_int4`` uint8 (out, in/2), two values per byte: input column
  ``2j`` in the low nibble of byte ``j``, column ``2j+1`` in the high nibble; ``scales`` and
  ``zeros`` bf16 (out, in/group_size); ``bias`` (out,).

The CPU kernel's packed int4 layout is built from these when weights are loaded (and
rebuilt lazily after ``.to()``); it is never saved. ``model.quantization`` records the
method (``{"method": "int4", "group_size": 32, "head": "int8"}``, plus ``"skip"`` when given); a checkpoint's
config.json carries it as ``"quantization"`` and :func:`lmforge.checkpoint.load_model` rebuilds the modules from it.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import hardware
from ..errors import ConfigError, LmforgeError

METHODS = ("int8", "int4", "bf16")
GROUP_SIZES = (32, 64, 128)
_TINY = 2.0**-100  # the smallest scale: an all-zero row/group dequantizes to exact zeros


_DTYPES: dict[tuple[int, str], tuple[torch.dtype, torch.dtype]] = {}


def kernel_dtypes(method: str) -> tuple[torch.dtype, torch.dtype]:
    """(activation dtype of the weight-only kernel, dtype of the many-rows GEMM) on this
    machine, decided once per probed machine (a forward runs this for every layer)."""
    caps = hardware.probe()
    key = (id(caps), method)
    if key not in _DTYPES:
        _DTYPES[key] = (hardware.quant_activation_dtype(method, caps), hardware.gemm_dtype(caps))
    return _DTYPES[key]


def _round_up_bf16(x: torch.Tensor) -> torch.Tensor:
    """The smallest bf16 value >= x (x >= 0, fp32)."""
    b = x.to(torch.bfloat16)
    return torch.where(b.float() < x, torch.nextafter(b, torch.full_like(b, float("inf"))), b)


class _QuantLinear(nn.Module):
    """Shared parts: bias, shapes, and the bf16-in / input-dtype-out kernel call."""

    in_features: int
    out_features: int

    def _init_bias(self, bias: bool, device, dtype) -> None:
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_features, device=device, dtype=dtype or torch.float32))
        else:
            self.register_parameter("bias", None)

    def _set_bias(self, bias: torch.Tensor | None) -> None:
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _fused(self, x: torch.Tensor) -> bool:
        """Whether the fused CPU kernel serves this input."""
        return x.device.type == "cpu"

    def _kernel(self, x2: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    #: From this many rows (tokens) on, dequantizing and one GEMM beats the fused kernels,
    #: whose time grows linearly with the rows (they are GEMV kernels). Measured at one thread
    #: over SmolLM2-135M's shapes on an AVX512-BF16 CPU, ms per layer at 128 rows: int8 kernel
    #: 14.1, dequantize + bf16 GEMM 7.5; int4 12.3 vs 11.5; at 512 rows 56 vs 24 and 50 vs 28.
    gemm_rows = 64
    method = "int8"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fused(x):  # dequantize and run a plain linear
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, self.dequantize(x.dtype), bias)
        act, gemm = kernel_dtypes(self.method)
        x2 = x.reshape(-1, self.in_features)
        # prefill, or training through a frozen quantized base (QLoRA: the fused kernels have
        # no backward for the input): one GEMM over the dequantized weight
        if x2.shape[0] >= self.gemm_rows or x2.requires_grad:
            y = F.linear(x2.to(gemm), self.dequantize(gemm))
        else:  # decode: the fused weight-only kernel
            y = self._kernel(x2.to(act).contiguous())
        y = y.view(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Linear(_QuantLinear):
    """A Linear with int8 weights, one bf16 scale per output channel (``w = q * scale``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=torch.bfloat16, device=device))
        self._init_bias(bias, device, dtype)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Int8Linear:
        out_f, in_f = weight.shape
        m = cls(in_f, out_f, bias=False, device=weight.device)
        w = weight.detach().float()
        scales = _round_up_bf16((w.abs().amax(dim=1) / 127).clamp(min=_TINY))
        m.weight_int8.copy_(torch.round(w / scales.float()[:, None]).clamp_(-127, 127))
        m.scales.copy_(scales)
        m._set_bias(bias)
        return m

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        return cls.from_weight(linear.weight, linear.bias)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if dtype == torch.bfloat16:  # q (8 bits) * scale (8-bit mantissa) is exact before rounding: as fp32
            return self.weight_int8.to(dtype).mul_(self.scales.to(dtype)[:, None])
        return (self.weight_int8.float() * self.scales.float()[:, None]).to(dtype)

    def _fused(self, x: torch.Tensor) -> bool:
        # the kernel gives wrong results (or crashes) unless in_features is a multiple of 16
        return x.device.type == "cpu" and self.in_features % 16 == 0

    def _kernel(self, x2: torch.Tensor) -> torch.Tensor:
        # the kernel wants its scales in the activations' dtype
        return torch.ops.aten._weight_int8pack_mm(x2, self.weight_int8, self.scales.to(x2.dtype))


class Int4Linear(_QuantLinear):
    """A Linear with 4-bit weights, a bf16 scale and zero per group of ``group_size`` inputs
    (``w = (q - 8) * scale + zero``)."""

    gemm_rows = 128
    method = "int4"

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, group_size: int = 32, device=None, dtype=None
    ) -> None:
        super().__init__()
        check_group_size(group_size, in_features, "Int4Linear")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer("weight_int4", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.empty(out_features, groups, dtype=torch.bfloat16, device=device))
        self.register_buffer("zeros", torch.empty(out_features, groups, dtype=torch.bfloat16, device=device))
        self._init_bias(bias, device, dtype)
        self._packed: tuple[torch.Tensor, torch.Tensor] | None = None  # the CPU kernel's layout

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, group_size: int = 32) -> Int4Linear:
        out_f, in_f = weight.shape
        m = cls(in_f, out_f, bias=False, group_size=group_size, device=weight.device)
        w = weight.detach().float().view(out_f, in_f // group_size, group_size)
        lo, hi = w.amin(dim=-1), w.amax(dim=-1)
        scale = _round_up_bf16(((hi - lo) / 15).clamp(min=_TINY))
        zero = (lo + 8 * scale.float()).to(torch.bfloat16)
        # bf16 rounding of the zero may shift the grid: widen the scale so it still covers [lo, hi]
        z = zero.float()
        scale = _round_up_bf16(torch.maximum(scale.float(), torch.maximum((z - lo) / 8, (hi - z) / 7)))
        q = torch.round((w - z[..., None]) / scale.float()[..., None]).add_(8).clamp_(0, 15).to(torch.uint8)
        q = q.view(out_f, in_f)
        m.weight_int4.copy_(q[:, 0::2] | (q[:, 1::2] << 4))
        m.scales.copy_(scale)
        m.zeros.copy_(zero)
        m._set_bias(bias)
        m._packed = m._pack() if weight.device.type == "cpu" else None
        return m

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 32) -> Int4Linear:
        return cls.from_weight(linear.weight, linear.bias, group_size)

    def int_values(self) -> torch.Tensor:
        """The quantized values q (out, in) in 0..15, unpacked from the nibbles."""
        packed = self.weight_int4
        return torch.stack([packed & 15, packed >> 4], dim=-1).view(self.out_features, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w = self.int_values().float().view(self.out_features, -1, self.group_size).sub_(8)
        w.mul_(self.scales.float()[..., None]).add_(self.zeros.float()[..., None])
        return w.view(self.out_features, self.in_features).to(dtype)

    def _pack(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The CPU kernel's layout: int4 weights packed by ``_convert_weight_to_int4pack_for_cpu``
        (out_features padded to a multiple of 16, its requirement) and (groups, out, 2)
        bf16 [scale, zero] pairs."""
        pad = -self.out_features % 16
        q = F.pad(self.int_values().to(torch.int32), (0, 0, 0, pad))
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        sz = torch.stack([self.scales, self.zeros], dim=-1).to(torch.bfloat16)  # (n, groups, 2)
        return packed, F.pad(sz, (0, 0, 0, 0, 0, pad)).transpose(0, 1).contiguous()

    def _kernel(self, x2: torch.Tensor) -> torch.Tensor:
        if self._packed is None:
            self._packed = self._pack()
        packed, sz = self._packed
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, self.group_size, sz.to(x2.dtype))
        return y[:, : self.out_features] if y.shape[1] != self.out_features else y

    def _apply(self, fn, recurse: bool = True):
        self._packed = None  # device or dtype moves: rebuilt at the next CPU forward
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._packed = self._pack() if self.weight_int4.device.type == "cpu" else None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"


# ------------------------------------------------------------------------------ a model
def check_group_size(group_size: int, in_features: int | None = None, where: str = "int4") -> None:
    if group_size not in GROUP_SIZES:
        raise ConfigError(f"int4 group size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size}")
    if in_features is not None and in_features % group_size:
        raise ConfigError(
            f"{where}: int4 group size {group_size} does not divide in_features {in_features}; "
            "choose a group size that divides it"
        )


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ConfigError(f"unknown quantization method {method!r} (choose int8, int4 or bf16)")


def _targets(model: nn.Module, skip: Iterable[str]) -> list[tuple[str, torch.Tensor]]:
    """(module name, its weight) of every Linear to quantize; a tied model's head is
    ``("lm_head", embed_tokens.weight)``."""
    found = [(f"layers.{name}", m.weight) for name, m in model.layers.named_modules() if isinstance(m, nn.Linear)]
    head = model._modules.get("lm_head")
    if head is None:
        found.append(("lm_head", model.embed_tokens.weight))
    elif isinstance(head, nn.Linear):
        found.append(("lm_head", head.weight))
    skip = list(skip)
    for pattern in skip:
        if not any(fnmatch.fnmatchcase(name, pattern) for name, _ in found):
            raise ConfigError(f"skip pattern {pattern!r} matches no quantizable layer (e.g. 'lm_head', 'layers.0.*')")
    return [(n, w) for n, w in found if not any(fnmatch.fnmatchcase(n, p) for p in skip)]


def _replace(model: nn.Module, spec: dict[str, Any], make) -> None:
    """Put ``make(name, old_linear_or_None, weight)`` in place of every target of ``spec``."""
    targets = _targets(model, spec.get("skip", ()))
    if spec["method"] == "int4":
        for name, w in targets:
            if _method_of(spec, name) == "int4":
                check_group_size(spec["group_size"], w.shape[1], name)
    for name, w in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = parent._modules.get(attr)
        parent._modules[attr] = make(_method_of(spec, name), old, w)
    model.quantization = dict(spec)


def _method_of(spec: dict[str, Any], name: str) -> str:
    """The method of one target: int4's output head follows ``spec["head"]`` (int8 by default)."""
    return spec.get("head", "int8") if spec["method"] == "int4" and name == "lm_head" else spec["method"]


def quant_spec(method: str, group_size: int, skip: Iterable[str], head: str = "int8") -> dict[str, Any]:
    _check_method(method)
    spec: dict[str, Any] = {"method": method}
    if method == "int4":
        check_group_size(group_size)
        spec["group_size"] = group_size
        if head not in ("int8", "int4"):
            raise ConfigError(f"the int4 output head must be int8 or int4, got {head!r}")
        spec["head"] = head
    skip = list(skip)
    if skip:
        if method == "bf16":
            raise ConfigError("skip applies to int8/int4 quantization; bf16 casts the whole model")
        spec["skip"] = skip
    return spec


def quantize_model(
    model: nn.Module, method: str, group_size: int = 32, skip: Iterable[str] = (), head: str = "int8"
) -> nn.Module:
    """Quantize ``model`` (a GPT) in place and return it; see the module docstring.

    With int4, the output head is int8 unless ``head="int4"``: as in llama.cpp's 4-bit
    files (whose token embedding / output stay 8-bit), since the vocabulary projection is
    the layer most sensitive to 4 bits. Measured on SmolLM2-135M (Tiny Shakespeare
    perplexity 41.27 in fp32): int4 everywhere 43.61 (+5.6%), int4 with the head in bf16
    41.40 (+0.3%)."""
    if getattr(model, "quantization", None):
        raise LmforgeError(f"the model is already quantized ({model.quantization['method']})")
    spec = quant_spec(method, group_size, skip, head)
    if method == "bf16":
        model.to(torch.bfloat16)
        model.quantization = spec
        return model

    def make(kind: str, old: nn.Module | None, w: torch.Tensor) -> nn.Module:
        bias = old.bias if old is not None else None
        if kind == "int8":
            return Int8Linear.from_weight(w, bias)
        return Int4Linear.from_weight(w, bias, spec["group_size"])

    _replace(model, spec, make)
    return model


def dequantize_model(model: nn.Module) -> nn.Module:
    """Undo ``quantize_model`` in place (for exporters that need plain fp32 Linear weights):
    quantized modules become ``nn.Linear`` with the dequantized weights, a tied model's
    quantized head is dropped (the embedding serves again), bf16 parameters become fp32."""
    spec = getattr(model, "quantization", None)
    if not spec:
        return model
    if spec["method"] == "bf16":
        model.float()
    for name, m in list(model.named_modules()):
        if not isinstance(m, _QuantLinear):
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if name == "lm_head" and model.config.tie_embeddings:
            del parent._modules[attr]
            continue
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=m.scales.device)
        with torch.no_grad():
            lin.weight.copy_(m.dequantize())
            if m.bias is not None:
                lin.bias.copy_(m.bias)
        parent._modules[attr] = lin
    del model.quantization
    return model


# ------------------------------------------------------------------------------ checkpoints
def read_spec(config: dict[str, Any], where: str) -> dict[str, Any] | None:
    """The validated ``quantization`` section of a checkpoint's config.json, or None."""
    spec = config.get("quantization")
    if spec is None:
        return None
    if not isinstance(spec, dict) or "method" not in spec:
        raise LmforgeError(f"{where}: 'quantization' in config.json must be an object with a 'method'")
    try:
        return quant_spec(spec["method"], spec.get("group_size", 32), spec.get("skip", ()), spec.get("head", "int8"))
    except ConfigError as e:
        raise LmforgeError(f"{where}: config.json quantization: {e}") from None


def resolve_request(stored: dict[str, Any] | None, quantize: str | None, where: str) -> str | None:
    """What ``load_model(quantize=...)`` must still do: a method to apply after loading, or None."""
    if quantize in (None, "none"):
        return None
    _check_method(quantize)
    if stored is None:
        return quantize
    if stored["method"] != quantize:
        raise LmforgeError(
            f"{where} is quantized as {stored['method']}; it cannot be loaded as {quantize} "
            "(quantize its full-precision checkpoint instead)"
        )
    return None


def apply_structure(model: nn.Module, spec: dict[str, Any]) -> None:
    """Give a freshly built (e.g. meta) GPT the quantized modules of ``spec``, uninitialised,
    so that a quantized state dict loads into it."""
    if spec["method"] == "bf16":
        model.to(torch.bfloat16)
        model.quantization = dict(spec)
        return

    def make(kind: str, old: nn.Module | None, w: torch.Tensor) -> nn.Module:
        out_f, in_f = w.shape
        has_bias = old is not None and old.bias is not None
        if kind == "int8":
            return Int8Linear(in_f, out_f, bias=has_bias, device=w.device)
        return Int4Linear(in_f, out_f, bias=has_bias, group_size=spec["group_size"], device=w.device)

    _replace(model, spec, make)


def check_weights(model: nn.Module, weights: dict[str, torch.Tensor], where: str) -> None:
    """Raise LmforgeError unless ``weights`` has the keys, shapes and (for the quantized
    tensors) dtypes of the quantized ``model``."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise LmforgeError(
            f"{where}: quantized weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    for k, t in expected.items():
        if tuple(weights[k].shape) != tuple(t.shape):
            raise LmforgeError(f"{where}: {k} has shape {tuple(weights[k].shape)}, the quantized model needs {tuple(t.shape)}")
        if k.endswith((".weight_int8", ".weight_int4")) and weights[k].dtype != t.dtype:
            raise LmforgeError(f"{where}: {k} is {weights[k].dtype}, expected {t.dtype}")
