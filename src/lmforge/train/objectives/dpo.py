"""Direct Preference Optimization (Rafailov et al. 2023) on (prompt, chosen, rejected) pairs.

``loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))`` where ``pi_*`` / ``ref_*``
are the summed log-probabilities of the chosen / rejected response tokens under the policy
and the frozen reference. The reference is the model before training: with an adapter, the
same model with its adapters disabled (no second copy in memory); with full fine-tuning, a
frozen copy. Reference log-probabilities are computed once per example and cached (the
reference never changes), so each step costs one policy forward and backward.

Evaluation on held-out pairs: ``val_pref_acc`` (the policy gives the chosen response a
higher log-probability than the rejected one), ``ref_pref_acc`` (the same for the
reference), ``val_reward_acc`` (DPO's implicit reward prefers the chosen one), the mean
reward margin and ``val_loss``.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ...errors import DataError
from ..distributed import DistInfo, any_rank, is_sharded
from .base import Batch, Objective, eval_batches
from .batching import BatchPlan


@dataclass
class DPOConfig:
    beta: float = 0.1
    max_length: int = 512  # prompt + response tokens (the prompt is cut from the left)
    eval_batch_size: int = 8

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"dpo.beta must be positive, got {self.beta}")


def encode_pair(example: dict, tokenizer, template, max_length: int) -> tuple[list[int], list[int], list[int]] | None:
    """(prompt ids, chosen ids, rejected ids); responses end with the end-of-turn token."""
    prompt = example["prompt"]
    if isinstance(prompt, list):
        prompt_text = template.render(prompt, add_generation_prompt=True) if template is not None else "\n".join(m["content"] for m in prompt) + "\n"
    elif template is not None:
        prompt_text = template.render([{"role": "user", "content": prompt}], add_generation_prompt=True)
    else:
        prompt_text = prompt
    p = tokenizer.encode(prompt_text)
    eos = end_of_turn_id(tokenizer)
    c = tokenizer.encode(example["chosen"]) + [eos]
    r = tokenizer.encode(example["rejected"]) + [eos]
    room = max_length - max(len(c), len(r))
    if room < 1:
        return None
    return p[-room:], c, r


def end_of_turn_id(tokenizer) -> int:
    for tok in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
        if (i := tokenizer.token_to_id(tok)) is not None:
            return i
    return tokenizer.eot_id


def response_logps(model, rows: list[tuple[list[int], list[int]]], pad: int, device) -> torch.Tensor:
    """Summed log-probabilities of each (prompt, response) row's response tokens."""
    T = max(len(p) + len(r) for p, r in rows) - 1
    x = torch.full((len(rows), T), pad, dtype=torch.long)
    y = torch.full((len(rows), T), -100, dtype=torch.long)
    for i, (p, r) in enumerate(rows):
        seq = p + r
        x[i, : len(seq) - 1] = torch.tensor(seq[:-1])
        y[i, len(p) - 1 : len(seq) - 1] = torch.tensor(r)
    x, y = x.to(device), y.to(device)
    if hasattr(model, "module") or is_sharded(model):  # DDP / FSDP: through forward (their hooks), full logits
        logits = model(x).float()
        logp = -F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100, reduction="none").view(y.shape)
        return logp.sum(dim=1)
    # only the response positions go through the output projection
    h = model.hidden_states(x)
    keep = y != -100
    rows = torch.arange(y.shape[0], device=y.device)[:, None].expand_as(y)[keep]
    token_logp = -F.cross_entropy(model.logits(h[keep]).float(), y[keep], reduction="none")
    return torch.zeros(y.shape[0], device=y.device, dtype=token_logp.dtype).index_add(0, rows, token_logp)


class DPOObjective(Objective):
    name = "dpo"

    def __init__(self, train: list[dict], val: list[dict], tokenizer, template, cfg: DPOConfig, reference: Callable[[], Any]):
        """``reference()`` returns ``(module, context manager)``: the reference model and the
        context in which it runs (e.g. adapters disabled)."""
        self.cfg, self.tokenizer, self.reference, self.template = cfg, tokenizer, reference, template
        self.dropped = 0
        self.train = self._encode(train)
        self.val = self._encode(val)
        if not self.train:
            raise DataError(f"no preference pair fits dpo.max_length={cfg.max_length}")
        self.pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eot_id
        self._ref: dict[tuple[str, int], tuple[float, float]] = {}

    def _encode(self, examples: list[dict]):
        out = []
        for ex in examples:
            enc = encode_pair(ex, self.tokenizer, self.template, self.cfg.max_length)
            if enc is None:
                self.dropped += 1
                continue
            out.append(enc)
        return out

    def setup(self, ctx) -> None:
        super().setup(ctx)
        self.plan = BatchPlan([len(p) + len(c) + len(r) for p, c, r in self.train], ctx.global_batch_size, ctx.seed, bucket=True)

    def train_batch(self, step: int, micro: int) -> Batch:
        idx = self.plan.global_indices(step)[self.ctx.example_slice(micro)]
        return {"index": torch.as_tensor(idx)}

    def batch_weight(self, batch: Batch) -> float:
        return float(batch["index"].numel())

    @torch.no_grad()
    def _reference_logps(self, split: str, items: list, idx: list[int]) -> torch.Tensor:
        todo = [i for i in idx if (split, i) not in self._ref]
        module, ctx = self.reference()
        if split == "train" and is_sharded(module):
            # FSDP and the reference is the sharded policy (adapters disabled): its forward is a
            # collective, so every rank runs one when any rank has uncached examples (a rank
            # with none recomputes one cached example, whose cached value is kept).
            info = DistInfo(self.ctx.rank, 0, self.ctx.world_size)
            if any_rank(bool(todo), info) and not todo:
                todo = idx[:1]
        if todo:
            was = module.training
            module.eval()
            try:
                with ctx, self.ctx.autocast():
                    rows = [(items[i][0], items[i][1]) for i in todo] + [(items[i][0], items[i][2]) for i in todo]
                    lp = response_logps(module, rows, self.pad, self.ctx.device).cpu()
            finally:
                module.train(was)
            n = len(todo)
            for k, i in enumerate(todo):
                self._ref.setdefault((split, i), (lp[k].item(), lp[n + k].item()))
        return torch.tensor([self._ref[(split, i)] for i in idx], device=self.ctx.device)

    def _policy_logps(self, model, items: list, idx: list[int]) -> torch.Tensor:
        rows = [(items[i][0], items[i][1]) for i in idx] + [(items[i][0], items[i][2]) for i in idx]
        lp = response_logps(model, rows, self.pad, self.ctx.device)
        return torch.stack([lp[: len(idx)], lp[len(idx) :]], dim=1)

    def _loss_terms(self, policy: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        margin = self.cfg.beta * ((policy[:, 0] - ref[:, 0]) - (policy[:, 1] - ref[:, 1]))
        return -F.logsigmoid(margin), margin

    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, Any]]:
        idx = batch["index"].tolist()
        ref = self._reference_logps("train", self.train, idx)
        policy = self._policy_logps(model, self.train, idx)
        losses, margin = self._loss_terms(policy, ref)
        tokens = sum(2 * len(self.train[i][0]) + len(self.train[i][1]) + len(self.train[i][2]) for i in idx)
        return losses.mean(), {"tokens": tokens, "reward_acc": float((margin > 0).float().mean())}

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        if not self.val:
            return {}
        bs = self.cfg.eval_batch_size
        losses, margins, pol_pref, ref_pref = [], [], [], []
        for s in eval_batches(range(0, len(self.val), bs), self.ctx):
            idx = list(range(s, min(s + bs, len(self.val))))
            ref = self._reference_logps("val", self.val, idx)
            with self.ctx.autocast():
                policy = self._policy_logps(model, self.val, idx)
            loss, margin = self._loss_terms(policy, ref)
            losses += loss.tolist()
            margins += margin.tolist()
            pol_pref += (policy[:, 0] > policy[:, 1]).tolist()
            ref_pref += (ref[:, 0] > ref[:, 1]).tolist()
        n = len(losses)
        return {
            "val_loss": sum(losses) / n,
            "val_pref_acc": sum(pol_pref) / n,
            "ref_pref_acc": sum(ref_pref) / n,
            "val_reward_acc": sum(m > 0 for m in margins) / n,
            "val_reward_margin": sum(margins) / n,
        }


def reference_for(model, full_finetune: bool):
    """The reference of a DPO run: a frozen copy of ``model`` (full fine-tuning) or the same
    model with its adapters disabled."""
    if full_finetune:
        import copy

        frozen = copy.deepcopy(model).eval()
        for p in frozen.parameters():
            p.requires_grad_(False)

        def frozen_ref():
            device = next(model.parameters()).device  # the engine may have moved the policy (GPU)
            if next(frozen.parameters()).device != device:
                frozen.to(device)
            return frozen, nullcontext()

        return frozen_ref
    from ...model.peft import adapters_disabled

    def ref():
        return model, adapters_disabled(model)

    return ref
