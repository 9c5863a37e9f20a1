"""LoRA, DoRA and AdaLoRA layers on lmforge's (possibly fused, possibly quantized) linears.

lmforge fuses q/k/v into ``attn.qkv_proj`` and gate/up into ``mlp.gate_up_proj``, but a user
(and the PEFT file format) targets ``q_proj``, ``v_proj``, ... A :class:`LoRALinear` therefore
wraps one base linear and holds one low-rank update per *output slice*: targeting q and v on
``qkv_proj`` gives the q rows and the v rows their own ``lora_A``/``lora_B``, exactly the
separate adapters PEFT puts on Hugging Face's separate ``q_proj`` and ``v_proj`` (so saved
adapters load into ``peft`` unchanged, see :mod:`lmforge.checkpoint.adapters`). The down-projections
of all slices run as one matmul (their ``A`` stacked), the up-projections per slice.

The base may be an ``nn.Linear`` or a frozen :class:`~lmforge.model.quant.Int8Linear` /
``Int4Linear`` (QLoRA-style training over a weight-quantized base).

- **LoRA** (Hu et al. 2021): ``y = W x + (alpha / r) B A dropout(x)``, ``B = 0`` at init.
- **DoRA** (Liu et al. 2024): the updated weight's rows are renormalised to a learned
  magnitude, ``W' = m * (W + s B A) / ||W + s B A||`` (norm per output row, detached as in
  the paper and PEFT), computed without forming ``W'``.
- **AdaLoRA** (Zhang et al. 2023): the update is ``P diag(E) Q`` in SVD form with a learned
  diagonal; :class:`RankAllocator` zeroes the least important singular values over training
  to meet a rank budget (see :mod:`lmforge.model.peft.adalora`).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def base_weight(base: nn.Module) -> torch.Tensor:
    """The base linear's weight in full precision (dequantized for int8/int4 layers)."""
    if isinstance(base, nn.Linear):
        return base.weight
    return base.dequantize(torch.float32)


@torch.no_grad()
def _plain_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An fp32 ``nn.Linear`` holding a merged ``weight`` (out, in) and the base's ``bias``."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device)
    lin.weight.copy_(weight)
    if bias is not None:
        lin.bias.copy_(bias.float())
    return lin


class LoRALinear(nn.Module):
    """A base linear plus low-rank updates on named slices of its output rows.

    ``slices`` maps a target name to its ``(start, stop)`` output rows (the whole output for
    an unfused target). ``kind`` is ``lora``, ``dora`` or ``adalora``.
    """

    def __init__(
        self,
        base: nn.Module,
        slices: dict[str, tuple[int, int]],
        r: int,
        alpha: float,
        dropout: float = 0.0,
        kind: str = "lora",
    ) -> None:
        super().__init__()
        self.base_layer = base
        self.slices = dict(slices)
        self.r, self.alpha, self.kind = r, alpha, kind
        # AdaLoRA scales by alpha / r like LoRA; its pruned singular values are zeros in E.
        self.scaling = alpha / r
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_E = nn.ParameterDict()  # AdaLoRA's singular values (r, 1)
        self.lora_magnitude = nn.ParameterDict()  # DoRA's row magnitudes
        dev = next((t.device for t in base.buffers()), None) or base_weight(base).device
        w = base_weight(base).detach().float()
        for name, (s, e) in self.slices.items():
            a = torch.empty(r, self.in_features, device=dev)
            if kind == "adalora":  # PEFT's AdaLoRA init: A, B ~ N(0, 0.02), E = 0
                nn.init.normal_(a, std=0.02)
                b = torch.empty(e - s, r, device=dev)
                nn.init.normal_(b, std=0.02)
                self.lora_E[name] = nn.Parameter(torch.zeros(r, 1, device=dev))
            else:  # LoRA init (PEFT default): A Kaiming-uniform, B = 0 -> the update starts at zero
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                b = torch.zeros(e - s, r, device=dev)
            self.lora_A[name] = nn.Parameter(a)
            self.lora_B[name] = nn.Parameter(b)
            if kind == "dora":
                self.lora_magnitude[name] = nn.Parameter(w[s:e].norm(dim=1))
        self.disabled = False

    # ---- the update -----------------------------------------------------------------
    def delta_weight(self, name: str) -> torch.Tensor:
        """The dense update of slice ``name`` (out_t, in): ``scaling * B A`` (``B diag(E) A`` for AdaLoRA)."""
        a = self.lora_A[name]
        if self.kind == "adalora":
            a = a * self.lora_E[name]
        return self.lora_B[name] @ a * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.disabled:
            return y
        names = list(self.slices)
        h = self.drop(x)
        As = [self.lora_A[n] * self.lora_E[n] if self.kind == "adalora" else self.lora_A[n] for n in names]
        low = F.linear(h, torch.cat(As) if len(As) > 1 else As[0])
        if self.kind != "dora":
            # every slice's up-projection as one GEMM: B laid out block-diagonally over the
            # output rows (zero rows for untargeted slices), added into the base output by addmm
            B = self._stacked_B(names, low.dtype)
            out = torch.addmm(y.reshape(-1, self.out_features), low.reshape(-1, low.shape[-1]), B.t(), alpha=self.scaling)
            return out.view(y.shape)
        low = low.split(self.r, dim=-1)
        deltas = {}
        for n, part in zip(names, low):
            d = F.linear(part, self.lora_B[n]) * self.scaling
            if self.kind == "dora":
                d = self._dora(n, x, h, y, d)
            deltas[n] = d
        return self._add(y, deltas)

    def _stacked_B(self, names: list[str], dtype: torch.dtype) -> torch.Tensor:
        """(out_features, slices * r): slice ``j``'s B in its output rows and columns j*r..(j+1)*r."""
        if len(names) == 1 and self.slices[names[0]] == (0, self.out_features):
            return self.lora_B[names[0]].to(dtype)
        blocks = []
        pos = 0
        for j, n in sorted(enumerate(names), key=lambda jn: self.slices[jn[1]][0]):
            s, e = self.slices[n]
            if s > pos:
                blocks.append(self.lora_B[n].new_zeros(s - pos, self.r * len(names)))
            b = self.lora_B[n]
            row = [b.new_zeros(e - s, self.r * j), b, b.new_zeros(e - s, self.r * (len(names) - j - 1))]
            blocks.append(torch.cat(row, dim=1))
            pos = e
        if pos < self.out_features:
            blocks.append(self.lora_B[names[0]].new_zeros(self.out_features - pos, self.r * len(names)))
        return torch.cat(blocks).to(dtype)

    def _dora(self, name: str, x: torch.Tensor, h: torch.Tensor, y: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """DoRA's correction for slice ``name``: ``(m/||W'|| - 1) W h + (m/||W'||) delta``."""
        s, e = self.slices[name]
        w = base_weight(self.base_layer)[s:e]
        with torch.no_grad():  # the norm is a constant in the backward (DoRA sec. 4.3)
            norm = (w.float() + self.delta_weight(name).float()).norm(dim=1)
        scale = (self.lora_magnitude[name] / norm).to(y.dtype)
        if isinstance(self.drop, nn.Identity) or not self.training:
            base_out = y[..., s:e]
            bias = getattr(self.base_layer, "bias", None)
            if bias is not None:
                base_out = base_out - bias[s:e].to(y.dtype)
        else:  # with dropout the base term sees the dropped-out input (as PEFT does)
            base_out = F.linear(h, w.to(h.dtype))
        return (scale - 1) * base_out + scale * d

    def _add(self, y: torch.Tensor, deltas: dict[str, torch.Tensor]) -> torch.Tensor:
        spans = sorted(self.slices.items(), key=lambda kv: kv[1][0])
        pieces, pos = [], 0
        for name, (s, e) in spans:
            if s > pos:
                pieces.append(y.new_zeros(*y.shape[:-1], s - pos))
            pieces.append(deltas[name].to(y.dtype))
            pos = e
        if pos < self.out_features:
            pieces.append(y.new_zeros(*y.shape[:-1], self.out_features - pos))
        return y + (torch.cat(pieces, dim=-1) if len(pieces) > 1 else pieces[0])

    # ---- merging --------------------------------------------------------------------
    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The base weight with every slice's update folded in (fp32)."""
        w = base_weight(self.base_layer).detach().float().clone()
        for name, (s, e) in self.slices.items():
            updated = w[s:e] + self.delta_weight(name).float()
            if self.kind == "dora":
                updated = updated * (self.lora_magnitude[name].float() / updated.norm(dim=1))[:, None]
            w[s:e] = updated
        return w

    def merged_linear(self) -> nn.Linear:
        return _plain_linear(self.merged_weight(), getattr(self.base_layer, "bias", None))

    def extra_repr(self) -> str:
        return f"kind={self.kind}, r={self.r}, alpha={self.alpha}, slices={self.slices}"


class IA3Linear(nn.Module):
    """IA3 (Liu et al. 2022): learned per-feature scales, initialised to one.

    On an output-side target (keys, values) the slice's outputs are scaled; on an input-side
    target (the MLP's down-projection) the inputs are. Both fold into the weight exactly."""

    def __init__(self, base: nn.Module, slices: dict[str, tuple[int, int]], feedforward: bool) -> None:
        super().__init__()
        self.base_layer = base
        self.slices = dict(slices)
        self.feedforward = feedforward
        self.in_features, self.out_features = base.in_features, base.out_features
        dev = base_weight(base).device
        self.ia3_l = nn.ParameterDict()
        if feedforward:
            self.ia3_l["input"] = nn.Parameter(torch.ones(self.in_features, device=dev))
        else:
            for name, (s, e) in self.slices.items():
                self.ia3_l[name] = nn.Parameter(torch.ones(e - s, device=dev))
        self.disabled = False

    def _out_scale(self, dtype: torch.dtype) -> torch.Tensor:
        scale = torch.ones(self.out_features, device=next(iter(self.ia3_l.values())).device, dtype=dtype)
        pieces, pos = [], 0
        for name, (s, e) in sorted(self.slices.items(), key=lambda kv: kv[1][0]):
            pieces += [scale[pos:s], self.ia3_l[name].to(dtype)]
            pos = e
        pieces.append(scale[pos:])
        return torch.cat(pieces)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return self.base_layer(x)
        if self.feedforward:
            return self.base_layer(x * self.ia3_l["input"].to(x.dtype))
        y = self.base_layer(x)
        bias = getattr(self.base_layer, "bias", None)
        scale = self._out_scale(y.dtype)
        if bias is None:
            return y * scale
        return (y - bias.to(y.dtype)) * scale + bias.to(y.dtype)  # IA3 scales W x, not the bias

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        w = base_weight(self.base_layer).detach().float().clone()
        if self.feedforward:
            return w * self.ia3_l["input"].float()[None, :]
        return w * self._out_scale(torch.float32)[:, None]

    def merged_linear(self) -> nn.Linear:
        return _plain_linear(self.merged_weight(), getattr(self.base_layer, "bias", None))


class BottleneckAdapter(nn.Module):
    """A Houlsby adapter after a sub-layer's output projection: ``y + up(act(down(y)))``.

    ``up`` starts at zero, so the adapted model starts equal to the base."""

    def __init__(self, base: nn.Module, bottleneck: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.base_layer = base
        dim = base.out_features
        dev = base_weight(base).device
        self.adapter_down = nn.Linear(dim, bottleneck, device=dev)
        self.adapter_up = nn.Linear(bottleneck, dim, device=dev)
        nn.init.normal_(self.adapter_down.weight, std=0.02)
        nn.init.zeros_(self.adapter_down.bias)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.disabled = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.disabled:
            return y
        return y + self.adapter_up(self.drop(F.gelu(self.adapter_down(y))))
