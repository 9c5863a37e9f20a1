"""AdaLoRA's rank allocation (Zhang et al. 2023, "Adaptive Budget Allocation for PEFT").

Every AdaLoRA slice holds ``r`` singular triplets (a row of ``A``, a value of ``E``, a column
of ``B``). The allocator keeps an importance estimate per parameter, the sensitivity
``|w * grad|`` smoothed by an exponential average (``beta1``) times its uncertainty
(``beta2``), sums it per triplet, and zeroes the singular values of the least important
triplets across the whole model so that the number of active triplets follows a cubic
schedule from ``init_r`` to ``target_r`` per slice on average: full budget for the first
``tinit`` steps, pruning every ``delta_t`` steps, the final budget fixed for the last
``tfinal`` steps. The same schedule and scores as PEFT's ``RankAllocator``.
"""

from __future__ import annotations

import torch

from .lora import LoRALinear


class RankAllocator:
    def __init__(
        self,
        layers: list[LoRALinear],
        *,
        target_r: int,
        total_steps: int,
        tinit: int,
        tfinal: int,
        delta_t: int,
        beta1: float = 0.85,
        beta2: float = 0.85,
        orth_reg: float = 0.5,
    ) -> None:
        self.layers = layers
        self.triplets = [(layer, name) for layer in layers for name in layer.slices]
        self.init_budget = sum(layer.r for layer, _ in self.triplets)
        self.target_budget = target_r * len(self.triplets)
        self.total_steps, self.tinit, self.tfinal, self.delta_t = total_steps, tinit, tfinal, delta_t
        self.beta1, self.beta2, self.orth_reg = beta1, beta2, orth_reg
        self.ipt: dict[int, torch.Tensor] = {}
        self.unc: dict[int, torch.Tensor] = {}
        self.mask: dict[tuple[int, str], torch.Tensor] | None = None
        self.budget = self.init_budget

    def set_total_steps(self, total_steps: int, tinit_fraction: float, tfinal_fraction: float) -> None:
        """Stretch the schedule to a run of ``total_steps`` (its phases keep their shares)."""
        self.total_steps = total_steps
        self.tinit, self.tfinal = int(tinit_fraction * total_steps), int(tfinal_fraction * total_steps)

    def budget_at(self, step: int) -> tuple[int, bool]:
        """(budget, whether to prune now) after optimizer step ``step`` (1-based)."""
        if step <= self.tinit:
            return self.init_budget, False
        end = self.total_steps - self.tfinal
        if step > end:
            return self.target_budget, True
        frac = 1 - (step - self.tinit) / max(1, end - self.tinit)
        budget = int((self.init_budget - self.target_budget) * frac**3 + self.target_budget)
        return budget, step % self.delta_t == 0

    def _update_importance(self) -> None:
        for layer, name in self.triplets:
            for p in (layer.lora_A[name], layer.lora_B[name], layer.lora_E[name]):
                if p.grad is None:
                    continue
                key = id(p)
                ipt = (p.detach() * p.grad.detach()).abs()
                if key not in self.ipt:
                    self.ipt[key] = torch.zeros_like(ipt)
                    self.unc[key] = torch.zeros_like(ipt)
                self.ipt[key].mul_(self.beta1).add_(ipt, alpha=1 - self.beta1)
                self.unc[key].mul_(self.beta2).add_((ipt - self.ipt[key]).abs(), alpha=1 - self.beta2)

    def _score(self, p: torch.Tensor) -> torch.Tensor:
        key = id(p)
        if key not in self.ipt:
            return torch.zeros_like(p)
        return self.ipt[key] * self.unc[key]

    def triplet_scores(self) -> list[torch.Tensor]:
        out = []
        for layer, name in self.triplets:
            e = self._score(layer.lora_E[name]).view(-1)
            a = self._score(layer.lora_A[name]).mean(dim=1)
            b = self._score(layer.lora_B[name]).mean(dim=0)
            out.append(e + a + b)
        return out

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Call after the optimizer step, with the gradients still present."""
        self._update_importance()
        budget, prune = self.budget_at(step)
        self.budget = budget
        if prune and step <= self.total_steps - self.tfinal:
            scores = self.triplet_scores()
            flat = torch.cat(scores)
            drop = flat.numel() - budget
            if drop > 0:
                threshold = torch.kthvalue(flat, drop).values
                self.mask = {(id(layer), name): s > threshold for (layer, name), s in zip(self.triplets, scores)}
            else:
                self.mask = None
        if self.mask is not None:
            for layer, name in self.triplets:
                layer.lora_E[name].masked_fill_(~self.mask[(id(layer), name)].view(-1, 1), 0.0)

    def active_ranks(self) -> dict[str, int]:
        return {
            f"{id(layer):x}.{name}": int((layer.lora_E[name] != 0).sum()) for layer, name in self.triplets
        }

    def regularization(self) -> torch.Tensor:
        """Orthogonality penalty ``||A A^T - I||_F + ||B^T B - I||_F`` averaged, times ``orth_reg``."""
        total, n = None, 0
        for layer, name in self.triplets:
            for m in (layer.lora_A[name], layer.lora_B[name].t()):
                cov = m @ m.t()
                eye = torch.eye(cov.shape[0], device=cov.device, dtype=cov.dtype)
                term = torch.linalg.matrix_norm(cov - eye)
                total = term if total is None else total + term
                n += 1
        return total / max(n, 1) * self.orth_reg
