"""Optimizers: AdamW, or Muon for hidden weight matrices with AdamW for the rest."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .. import hardware
from ..errors import ConfigError


def newton_schulz(grad: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """Muon's orthogonalisation of a 2-D update (or a stack of same-shaped ones, (n, rows,
    cols)) by ``steps`` quintic Newton-Schulz iterations in ``dtype``: the operations of
    torch.optim.Muon (torch 2.13, ``_zeropower_via_newtonschulz``), which always runs them in
    bf16 (``grad.bfloat16()``). With ``dtype=torch.bfloat16`` a 2-D update gets exactly torch's
    result; fp32 is for CPUs where bf16 is emulated."""
    a, b, c = coefficients
    x = grad.to(dtype)
    tall = grad.size(-2) > grad.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm at most 1
    for _ in range(steps):
        gram = x @ x.mT
        update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c) if x.dim() == 3 else \
            torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, update, x, beta=a) if x.dim() == 3 else torch.addmm(x, update, x, beta=a)
    return x.mT if tall else x


class Muon(torch.optim.Muon):
    """torch.optim.Muon with its Newton-Schulz iterations in a chosen dtype (its state, groups
    and update are torch's, so checkpoints move between the two).

    torch runs them in bf16 whatever the training precision. On a CPU without native bf16 the
    bf16 GEMMs are emulated: the default Tiny Shakespeare recipe in fp32 then ran at 1,748
    tokens/s on an AMD Zen 3 (AVX2) against 15,794 for the AdamW recipe (issue 15); the fp32
    iterations remove that (BENCHMARKS.md, "Muon's Newton-Schulz dtype")."""

    def __init__(self, params, *, ns_dtype: torch.dtype = torch.bfloat16, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ConfigError("lmforge's Muon takes no closure")
        for group in self.param_groups:
            params: list[torch.Tensor] = []
            grads: list[torch.Tensor] = []
            bufs: list[torch.Tensor] = []
            self._init_group(group, params, grads, bufs)
            lr, wd, momentum = group["lr"], group["weight_decay"], group["momentum"]
            lr = float(lr) if torch.is_tensor(lr) else lr
            updates = []
            for g, buf in zip(grads, bufs):
                buf.lerp_(g, 1 - momentum)
                updates.append(g.lerp(buf, momentum) if group["nesterov"] else buf)
            # Same-shaped matrices (every layer's q/k/v, MLP...) are orthogonalised as one stack:
            # fewer, larger matmuls. Measured on the 4 x 128 Tiny Shakespeare model (16 matrices,
            # fp32, 2 threads, AVX2): 11.4 ms a step one by one, 7.4 ms stacked, identical results.
            by_shape: dict[tuple[int, ...], list[int]] = {}
            for i, u in enumerate(updates):
                by_shape.setdefault(tuple(u.shape), []).append(i)
            for idx in by_shape.values():
                stack = updates[idx[0]][None] if len(idx) == 1 else torch.stack([updates[i] for i in idx])
                ortho = newton_schulz(stack, group["ns_coefficients"], group["ns_steps"], group["eps"], self.ns_dtype)
                for j, i in enumerate(idx):
                    p = params[i]
                    p.mul_(1 - lr * wd)
                    p.add_(ortho[j], alpha=-lr * _lr_ratio(group["adjust_lr_fn"], p.shape))
        return None


def _lr_ratio(adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """torch.optim.Muon's per-matrix learning-rate adjustment."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return 1.0


class OptimizerSet:
    """Several optimizers stepped as one (Muon + AdamW); exposes all param groups."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers
        for opt in optimizers:
            for group in opt.param_groups:
                group.setdefault("initial_lr", group["lr"])

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def set_lr_multiplier(self, mult: float) -> None:
        for group in self.param_groups:
            group["lr"] = group["initial_lr"] * mult

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def state_dicts(self) -> list[dict]:
        return [opt.state_dict() for opt in self.optimizers]

    def load_state_dicts(self, states: list[dict]) -> None:
        if len(states) != len(self.optimizers):
            raise ConfigError("the checkpoint's optimizer does not match train.optimizer; resume with the same setting")
        for opt, st in zip(self.optimizers, states):
            opt.load_state_dict(st)


def _adamw(groups: list[dict], lr: float, betas: tuple[float, float], eps: float, device: torch.device):
    kwargs: dict = dict(lr=lr, betas=betas, eps=eps)
    # The fused kernel exists for CPU and CUDA since torch 2.4 and is the fastest path.
    kwargs["fused"] = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, **kwargs)


def build_optimizer(model: nn.Module, tc, device: torch.device) -> OptimizerSet:
    """AdamW with weight decay on matrices only; or Muon on the hidden matrices.

    ``tc`` is a TrainConfig (optimizer, lr, weight_decay, beta1, beta2, eps, muon_*).
    """
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters")
    betas = (tc.beta1, tc.beta2)
    if tc.optimizer == "adamw":
        decay = [p for _, p in params if p.dim() >= 2]
        no_decay = [p for _, p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return OptimizerSet([_adamw([g for g in groups if g["params"]], tc.lr, betas, tc.eps, device)])
    if tc.optimizer == "muon":
        # Muon orthogonalises updates of 2-D hidden weights; embeddings, the output head
        # and vectors stay on AdamW (Jordan et al. 2024, modded-nanogpt).
        is_hidden = lambda n, p: p.dim() == 2 and "embed" not in n and "lm_head" not in n  # noqa: E731
        hidden = [p for n, p in params if is_hidden(n, p)]
        other_mat = [p for n, p in params if not is_hidden(n, p) and p.dim() >= 2]
        vectors = [p for n, p in params if p.dim() < 2]
        muon = Muon(
            hidden,
            ns_dtype=hardware.newton_schulz_dtype(device),
            lr=tc.muon_lr,
            weight_decay=tc.weight_decay,
            momentum=tc.muon_momentum,
            adjust_lr_fn="match_rms_adamw",
        )
        groups = [{"params": other_mat, "weight_decay": tc.weight_decay}, {"params": vectors, "weight_decay": 0.0}]
        return OptimizerSet([muon, _adamw([g for g in groups if g["params"]], tc.lr, betas, tc.eps, device)])
    raise ConfigError(f"unknown optimizer '{tc.optimizer}'")
