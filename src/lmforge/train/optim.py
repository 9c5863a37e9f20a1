"""Optimizers: AdamW, or Muon for hidden weight matrices with AdamW for the rest."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import ConfigError


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
        muon = torch.optim.Muon(
            hidden,
            lr=tc.muon_lr,
            weight_decay=tc.weight_decay,
            momentum=tc.muon_momentum,
            adjust_lr_fn="match_rms_adamw",
        )
        groups = [{"params": other_mat, "weight_decay": tc.weight_decay}, {"params": vectors, "weight_decay": 0.0}]
        return OptimizerSet([muon, _adamw([g for g in groups if g["params"]], tc.lr, betas, tc.eps, device)])
    raise ConfigError(f"unknown optimizer '{tc.optimizer}'")
