"""Continual learning: train on new data while limiting the forgetting of old data.

Three plug-ins of the one engine, set by a ``continual`` config section (``lmforge pretrain``
for continued pretraining from ``init_from``, ``lmforge finetune`` for chat SFT):

- **Replay** (:class:`ReplayObjective`): ``replay_ratio`` of every micro-batch's sequences
  come from the old data (``replay_data``: prepared shards for pretraining, chat example
  files for SFT), the rest from the new data. The split is exact per micro-batch:
  ``round(replay_ratio * micro_batch_size)`` old sequences (the effective ratio is printed).
  The old and new batches are each a pure function of ``(seed, step, micro, rank)``, so
  resume and DDP stay exact. Evaluation reports the new data's metrics and the old data's
  with an ``old_`` prefix (``old_val_loss``), both logged during training.
- **L2 to the start** (:class:`L2Anchor`): ``l2 * sum((theta - theta0)^2)`` over the trained
  parameters, ``theta0`` being the weights the run started from.
- **EWC** (:class:`EWCPenalty`, Kirkpatrick et al. 2017): ``ewc * sum(F * (theta - theta0)^2)``
  with ``F`` the diagonal empirical Fisher of the old data at the start: the mean over
  ``ewc_samples`` old sequences of each sequence's squared loss gradient.

The penalties are ``extra_loss`` hooks (a term added to every micro-batch's loss, which the
engine weights like the batch, so a step's gradient carries the penalty's gradient once) and
report their value through ``metrics`` (``l2_penalty``, ``ewc_penalty`` in the train rows).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, DataError
from .hooks import EngineHook
from .objectives.base import Batch, Objective, RunContext

#: Steps the Fisher estimate draws its old batches from: far beyond any training step, so the
#: Fisher sample is fixed by the seed and independent of the replayed batches.
FISHER_STEP0 = 1 << 40
#: Added to the run's seed for the old data's batches (otherwise they would be drawn with the
#: same random numbers as the new data's).
OLD_SEED_OFFSET = 7919


@dataclass
class ContinualConfig:
    replay_data: str = ""  # the old data: pretrain: a prepared shard dir; finetune: chat examples (file/dir/glob)
    replay_ratio: float = 0.0  # share of each micro-batch's sequences drawn from replay_data, in [0, 1)
    l2: float = 0.0  # L2-to-start penalty weight: l2 * sum((theta - theta0)^2)
    ewc: float = 0.0  # EWC penalty weight: ewc * sum(F * (theta - theta0)^2), F from replay_data
    ewc_samples: int = 64  # old sequences the diagonal Fisher is averaged over
    val_fraction: float = 0.05  # finetune: share of the old examples held out for old_val_loss

    def __post_init__(self) -> None:
        if not 0.0 <= self.replay_ratio < 1.0:
            raise ValueError(f"continual.replay_ratio must be in [0, 1), got {self.replay_ratio}")
        if self.l2 < 0 or self.ewc < 0:
            raise ValueError(f"continual.l2 and continual.ewc must not be negative, got {self.l2} and {self.ewc}")
        if self.ewc_samples < 1:
            raise ValueError(f"continual.ewc_samples must be at least 1, got {self.ewc_samples}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"continual.val_fraction must be in [0, 1), got {self.val_fraction}")
        if not self.replay_data and self.replay_ratio > 0:
            raise ValueError("continual.replay_ratio > 0 needs continual.replay_data (the old data to replay)")
        if not self.replay_data and self.ewc > 0:
            raise ValueError("continual.ewc > 0 needs continual.replay_data (the old data the Fisher is computed on)")

    @property
    def enabled(self) -> bool:
        return bool(self.replay_data) or self.l2 > 0 or self.ewc > 0


def whole_parameter_readers(cfg: ContinualConfig) -> list[str]:
    """The penalties ``cfg`` turns on, which read whole parameters outside the forward (FSDP
    cannot run them: :func:`lmforge.train.engine.check_parallel`)."""
    return [f"continual.{name}" for name in ("l2", "ewc") if getattr(cfg, name) > 0]


# ------------------------------------------------------------------------------------ replay
@contextmanager
def _context(objective: Objective, ctx: RunContext):
    saved = objective.ctx
    objective.ctx = ctx
    try:
        yield
    finally:
        objective.ctx = saved


def merge_batches(new: Batch, old: Batch, pad: int) -> Batch:
    """Rows of ``new`` then rows of ``old`` in one batch (right-padded to the longer length:
    ``labels`` with -100, other token tensors with ``pad``), plus ``replay``: True on old rows."""
    out: Batch = {}
    for key in new:
        a, b = new[key], old[key]
        if a.dim() == 2 and a.shape[1] != b.shape[1]:
            T = max(a.shape[1], b.shape[1])
            fill = -100 if key == "labels" else pad
            a = torch.nn.functional.pad(a, (0, T - a.shape[1]), value=fill)
            b = torch.nn.functional.pad(b, (0, T - b.shape[1]), value=fill)
        out[key] = torch.cat([a, b])
    rows = (new["input_ids"].shape[0], old["input_ids"].shape[0])
    out["replay"] = torch.cat([torch.zeros(rows[0], dtype=torch.bool), torch.ones(rows[1], dtype=torch.bool)])
    return out


class ReplayObjective(Objective):
    """``new``'s objective with ``ratio`` of every micro-batch's sequences replayed from ``old``
    (an objective of the same kind over the old data). Evaluates both: new metrics as they are,
    old ones prefixed ``old_``. With ``ratio == 0`` the old data only serves evaluation (and
    the EWC Fisher)."""

    def __init__(self, new: Objective, old: Objective, ratio: float):
        if not 0.0 <= ratio < 1.0:
            raise ConfigError(f"continual.replay_ratio must be in [0, 1), got {ratio}")
        self.new, self.old, self.ratio = new, old, ratio
        self.name = f"{new.name}+replay"

    def setup(self, ctx: RunContext) -> None:
        super().setup(ctx)
        mbs = ctx.micro_batch_size
        self.n_old = round(self.ratio * mbs)
        if self.ratio > 0 and self.n_old == 0:
            raise ConfigError(
                f"continual.replay_ratio={self.ratio} rounds to no replayed sequence in a micro-batch of {mbs}; "
                f"raise train.micro_batch_size or the ratio (at least {0.5 / mbs:.3g})"
            )
        if self.n_old >= mbs:
            raise ConfigError(
                f"continual.replay_ratio={self.ratio} leaves no new sequence in a micro-batch of {mbs}; lower it"
            )
        self.new_ctx = replace(ctx, micro_batch_size=mbs - self.n_old)
        self.old_ctx = replace(ctx, micro_batch_size=self.n_old or mbs, seed=ctx.seed + OLD_SEED_OFFSET)
        self.new.setup(self.new_ctx)
        self.old.setup(self.old_ctx)

    @property
    def effective_ratio(self) -> float:
        return self.n_old / self.ctx.micro_batch_size

    def train_batch(self, step: int, micro: int) -> Batch:
        new = self.new.train_batch(step, micro)
        if not self.n_old:
            rows = new["input_ids"].shape[0]
            return {**new, "replay": torch.zeros(rows, dtype=torch.bool)}
        old = self.old.train_batch(step, micro)
        return merge_batches(new, old, getattr(self.new, "pad", 0))

    def batch_weight(self, batch: Batch) -> float:
        return self.new.batch_weight(batch)

    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, Any]]:
        return self.new.loss(model, batch)

    def old_batches(self, count: int) -> list[Batch]:
        """``count`` batches of the old training data reserved for estimates (the EWC Fisher),
        drawn from steps no training run reaches."""
        return [self.old.train_batch(FISHER_STEP0 + i, 0) for i in range(count)]

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        # evaluation batches take the run's full micro-batch size
        with _context(self.new, replace(self.ctx)), _context(self.old, replace(self.ctx, seed=self.old_ctx.seed)):
            out = dict(self.new.evaluate(model))
            out.update({f"old_{k}": v for k, v in self.old.evaluate(model).items()})
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "new": self.new.state_dict(),
            "old": self.old.state_dict(),
            "replay_ratio": self.ratio,
            "replay_per_micro_batch": self.n_old,
        }


# --------------------------------------------------------------------------------- penalties
def _trained(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    from ..checkpoint import unwrap

    return [(n, p) for n, p in unwrap(model).named_parameters() if p.requires_grad]


class L2Anchor(EngineHook):
    """Engine hook: ``weight * sum((theta - theta0)^2)`` over the trained parameters, with
    ``theta0`` their values when the hook is made (the start of the run)."""

    metric = "l2_penalty"

    def __init__(self, model: torch.nn.Module, weight: float):
        if weight < 0:
            raise ConfigError(f"the L2 penalty weight must not be negative, got {weight}")
        self.weight = weight
        self.params = _trained(model)
        self.anchor = [p.detach().clone() for _, p in self.params]
        self.importance: list[torch.Tensor] | None = None
        self._last: torch.Tensor | None = None

    def penalty(self) -> torch.Tensor:
        terms = []
        for i, ((_, p), p0) in enumerate(zip(self.params, self.anchor)):
            d = (p.float() - p0.float()).pow(2)
            terms.append((d * self.importance[i]).sum() if self.importance is not None else d.sum())
        return self.weight * torch.stack(terms).sum()

    def extra_loss(self) -> torch.Tensor | None:
        if self.weight == 0:
            return None
        value = self.penalty()
        self._last = value.detach()
        return value

    def metrics(self) -> dict[str, float]:
        return {self.metric: float(self._last)} if self._last is not None else {}


def fisher_diagonal(
    model: torch.nn.Module,
    objective: Objective,
    batches: list[Batch],
    samples: int,
    autocast=None,
) -> list[torch.Tensor]:
    """The diagonal empirical Fisher of ``objective``'s loss over the sequences (rows) of
    ``batches``: the mean over up to ``samples`` rows of each row's squared gradient, one
    tensor per trained parameter (same shapes, fp32). Rows without a loss-carrying label are
    skipped. The parameters' ``.grad`` are not touched (``autograd.grad``)."""
    params = [p for _, p in _trained(model)]
    fisher = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    was_training = model.training
    model.eval()  # no dropout in the estimate
    seen = 0
    try:
        for batch in batches:
            rows = batch["input_ids"].shape[0]
            for r in range(rows):
                if seen >= samples:
                    break
                one = {k: v[r : r + 1] for k, v in batch.items() if isinstance(v, torch.Tensor) and v.dim() > 0}
                if "labels" in one and one["labels"].dim() == 2 and not bool((one["labels"] != -100).any()):
                    continue
                with autocast() if autocast is not None else torch.autocast("cpu", enabled=False):
                    loss, _ = objective.loss(model, one)
                grads = torch.autograd.grad(loss.float(), params, allow_unused=True)
                for f, g in zip(fisher, grads):
                    if g is not None:
                        f += g.detach().float().pow(2)
                seen += 1
            if seen >= samples:
                break
    finally:
        model.train(was_training)
    if seen == 0:
        raise DataError("the old data gave no sequence with a loss-carrying token for the EWC Fisher estimate")
    return [f / seen for f in fisher]


class EWCPenalty(L2Anchor):
    """Engine hook: ``weight * sum(F * (theta - theta0)^2)``, ``F`` the diagonal Fisher of the old
    data at ``theta0`` (:func:`fisher_diagonal`)."""

    metric = "ewc_penalty"

    def __init__(self, model: torch.nn.Module, weight: float, fisher: list[torch.Tensor]):
        super().__init__(model, weight)
        if len(fisher) != len(self.params) or any(f.shape != p.shape for f, (_, p) in zip(fisher, self.params)):
            raise ValueError("the Fisher tensors do not match the trained parameters")
        self.importance = [f.to(p.device) for f, (_, p) in zip(fisher, self.params)]


def make_penalties(
    cfg: ContinualConfig, model: torch.nn.Module, objective: Objective, autocast=None, verbose: bool = True
) -> list[L2Anchor]:
    """The L2 and EWC hooks of ``cfg`` for ``model`` as it is now (call it after the engine has
    moved the model to its device and before resuming, so ``theta0`` is the start of the run)."""
    hooks: list[L2Anchor] = []
    if cfg.l2 > 0:
        hooks.append(L2Anchor(model, cfg.l2))
    if cfg.ewc > 0:
        if not isinstance(objective, ReplayObjective):
            raise ConfigError("continual.ewc needs continual.replay_data (the old data the Fisher is computed on)")
        per_batch = objective.old_ctx.micro_batch_size
        batches = objective.old_batches(-(-cfg.ewc_samples // per_batch))
        fisher = fisher_diagonal(model, objective.old, batches, cfg.ewc_samples, autocast)
        hook = EWCPenalty(model, cfg.ewc, fisher)
        if verbose:
            total = sum(f.numel() for f in fisher)
            mean = sum(float(f.sum()) for f in fisher) / max(1, total)
            print(f"continual: EWC Fisher from {cfg.ewc_samples} old sequences (mean {mean:.3g} over {total:,} weights)")
        hooks.append(hook)
    return hooks


# ----------------------------------------------------------------------------- stage wiring
def same_vocabulary(a: Path, b: Path) -> bool:
    """Whether two tokenizer.json files map the same tokens to the same ids."""
    from ..tokenizer import Tokenizer

    return Tokenizer.from_file(a).hf.get_vocab(with_added_tokens=True) == Tokenizer.from_file(b).hf.get_vocab(
        with_added_tokens=True
    )


def replay_lm_objective(cfg: ContinualConfig, new: Any, context_length: int, eval_tokens: int) -> Objective:
    """Pretraining: ``new`` (an LMObjective) wrapped with replay of / evaluation on the prepared
    shards ``cfg.replay_data``, which must use the same tokenizer."""
    from .objectives.lm import LMObjective

    if not cfg.replay_data:
        return new
    old_dir = Path(cfg.replay_data)
    if not (old_dir / "meta.json").is_file():
        raise DataError(
            f"continual.replay_data={cfg.replay_data} is not a prepared data directory (no meta.json); "
            "prepare the old corpus with `lmforge data prepare` and the same tokenizer"
        )
    old = LMObjective(old_dir, context_length, eval_tokens)
    if not same_vocabulary(new.tokenizer_file, old.tokenizer_file):
        raise DataError(
            f"continual.replay_data={cfg.replay_data} was prepared with another tokenizer than {new.data_dir}; "
            "prepare both with one tokenizer"
        )
    return ReplayObjective(new, old, cfg.replay_ratio)


def replay_sft_objective(
    cfg: ContinualConfig, new: Any, tokenizer, template, sft_cfg, context_length: int, seed: int
) -> Objective:
    """Chat SFT: ``new`` (an SFTObjective) wrapped with replay of / evaluation on the old
    conversations ``cfg.replay_data`` (``val_fraction`` of them held out for ``old_val_loss``)."""
    from ..data.examples import load_examples, split_examples
    from .objectives.sft import SFTObjective

    if not cfg.replay_data:
        return new
    old_set = load_examples([cfg.replay_data], "chat")
    if not old_set.examples:
        raise DataError(f"continual.replay_data={cfg.replay_data} holds no usable conversation")
    train, val = split_examples(old_set, cfg.val_fraction, seed)
    old = SFTObjective(train, val, tokenizer, template, sft_cfg, context_length)
    return ReplayObjective(new, old, cfg.replay_ratio)


def describe(cfg: ContinualConfig, objective: Objective) -> str:
    parts = []
    if isinstance(objective, ReplayObjective):
        parts.append(
            f"replay {objective.n_old} of {objective.ctx.micro_batch_size} sequences a micro-batch "
            f"(ratio {objective.effective_ratio:.3f}) from {cfg.replay_data}"
        )
    if cfg.l2 > 0:
        parts.append(f"L2-to-start {cfg.l2:g}")
    if cfg.ewc > 0:
        parts.append(f"EWC {cfg.ewc:g}")
    return "continual: " + ", ".join(parts) if parts else ""
