"""Adversarial (SeqGAN-style) training of a chat generator against a discriminator.

The generator is the engine's model. Each optimizer step, for every context of the step's
batch it samples ``group_size`` replies through the one inference engine
(:class:`~lmforge.infer.engine.InferenceEngine`: KV cache, batched decoding, sharing the
generator's weights), scores each (context, reply) with the discriminator (an lmforge GPT
with a 2-class head: 0 = generated, 1 = human) and takes a policy-gradient step:

``loss = -sum_i A_i * sum_t log pi(y_it) / N  +  kl_coef * KL(pi || ref)  +  mle_coef * NLL(human)``

- ``A_i`` is the reward minus a baseline: the mean reward of its group (``algorithm=grpo``,
  GRPO's group advantage, optionally divided by the group's standard deviation) or an
  exponential moving average of past rewards (``algorithm=reinforce``). The reward is
  ``log D(human | context, reply)`` (``reward=log_d``) or ``D(human | ...)`` (``reward=prob``).
  ``N`` is the number of sampled tokens in the micro-batch (a constant per batch, as in
  Dr. GRPO, so long replies are not favoured by the normalization).
- The log-probabilities are recomputed with gradient through the training model (the
  sampler runs without autograd), from the logits divided by ``temperature`` (the
  distribution sampled; top-k / top-p truncation is not accounted for); the KL term is the per-token ``k3`` estimator
  ``exp(ref - logp) - (ref - logp) - 1`` (unbiased, never negative, exactly 0 while the
  policy equals the reference); the reference is the starting model: the generator with its
  adapters disabled (PEFT) or a frozen copy (full fine-tuning), as for DPO.
- The MLE term is the mean next-token loss of the human replies of the same contexts, which
  keeps the generator fluent.

The discriminator is trained by :class:`DiscriminatorTrainer`, an engine hook: after each
generator step it takes ``disc_steps`` optimizer steps on human replies against replies
drawn from a buffer of recent samples, with the engine's precision, clipping and schedule;
its checkpoint is written beside each generator checkpoint (``<ckpt>/discriminator``) and
loaded on resume. :meth:`DiscriminatorTrainer.pretrain` trains it before the first
generator step.

Evaluation (held-out contexts, one seeded sample each): discriminator accuracy on held-out
human vs generated replies (``disc_acc``), mean reward, KL to the reference (``kl``: the mean
over samples of ``sum_t log pi - log ref``), held-out NLL of the human replies (``val_nll``)
and distinct-1/2 of the generated replies.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from ...data.encoding import pad_batch
from ...errors import ConfigError, DataError
from ..hooks import EngineHook
from .base import Batch, Objective
from .dpo import end_of_turn_id

HUMAN, GENERATED = 1, 0


def stable_seed(*parts: Any) -> int:
    """A seed from ``parts`` that is the same in every process (``hash`` of a str is not)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


@dataclass
class AdversarialConfig:
    algorithm: Literal["grpo", "reinforce"] = "grpo"
    group_size: int = 4  # replies sampled per context (grpo: at least 2)
    scale_advantage: bool = False  # grpo: divide the advantage by the group's standard deviation
    baseline_decay: float = 0.9  # reinforce: the baseline's moving-average decay
    reward: Literal["log_d", "prob"] = "log_d"  # log D(human | context, reply) or D(human | ...)
    kl_coef: float = 0.05  # weight of KL(policy || reference)
    mle_coef: float = 0.1  # weight of the next-token loss on the human replies
    temperature: float = 1.0  # sampling
    top_k: int = 0
    top_p: float = 1.0
    max_context_tokens: int = 192  # contexts are cut from the left to this many tokens
    max_reply_tokens: int = 48  # generation limit; longer human replies are left out
    disc_steps: int = 1  # discriminator optimizer steps per generator step (k)
    disc_pretrain_steps: int = 50  # discriminator steps before the first generator step
    disc_pretrain_samples: int = 256  # generated replies sampled for the pre-training
    disc_batch_size: int = 16  # human and generated replies each per discriminator step
    disc_lr: float = 1e-4
    disc_pretrain_lr: float = 0.0  # the pre-training's rate (0: disc_lr)
    disc_buffer: int = 512  # recent generated replies kept for the discriminator's steps
    eval_contexts: int = 64  # held-out contexts per evaluation
    eval_batch_size: int = 32
    samples_shown: int = 8  # replies written to samples.md before and after

    def __post_init__(self) -> None:
        if self.group_size < 1:
            raise ValueError(f"adversarial.group_size must be at least 1, got {self.group_size}")
        if self.algorithm == "grpo" and self.group_size < 2:
            raise ValueError(
                "adversarial.algorithm=grpo needs group_size >= 2 (the advantage is the reward minus its "
                f"group's mean: with {self.group_size} sample it is always 0); use algorithm=reinforce"
            )
        for name in ("kl_coef", "mle_coef", "disc_steps", "disc_pretrain_steps", "disc_pretrain_samples"):
            if getattr(self, name) < 0:
                raise ValueError(f"adversarial.{name} must not be negative, got {getattr(self, name)}")
        for name in ("max_context_tokens", "max_reply_tokens", "disc_batch_size", "disc_buffer", "eval_contexts",
                     "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"adversarial.{name} must be at least 1, got {getattr(self, name)}")
        if self.disc_lr <= 0 or self.disc_pretrain_lr < 0:
            raise ValueError("adversarial.disc_lr must be positive and disc_pretrain_lr not negative")
        if not 0 <= self.baseline_decay < 1:
            raise ValueError(f"adversarial.baseline_decay must be in [0, 1), got {self.baseline_decay}")
        if self.temperature <= 0:
            raise ValueError("adversarial.temperature must be positive: policy gradients need sampled replies")


# ---- data ------------------------------------------------------------------------------------
def reply_items(conversations: list[dict], tokenizer, template, cfg: AdversarialConfig) -> tuple[list[tuple[list[int], list[int]]], int]:
    """(context ids, human reply ids) for every assistant turn that follows a user turn; the
    reply ends with the end-of-turn token. Replies longer than ``max_reply_tokens`` are left
    out (the generator could not produce them); returns the items and how many were left out."""
    eot = end_of_turn_id(tokenizer)
    items, skipped = [], 0
    for conv in conversations:
        msgs = conv["messages"]
        for i, m in enumerate(msgs):
            if m["role"] != "assistant" or i == 0 or msgs[i - 1]["role"] != "user":
                continue
            reply = tokenizer.encode(m["content"]) + [eot]
            if len(reply) > cfg.max_reply_tokens:
                skipped += 1
                continue
            ctx = tokenizer.encode(template.render(msgs[:i], add_generation_prompt=True))
            items.append((ctx[-cfg.max_context_tokens :], reply))
    return items, skipped


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct n-grams over all n-grams of the whitespace-split, lower-cased texts (Li et al. 2016)."""
    total, seen = 0, set()
    for t in texts:
        words = t.lower().split()
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


def token_logps(
    model, rows: list[tuple[list[int], list[int]]], pad: int, device, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities (N, L) of each (context, reply) row's reply tokens under
    ``model`` (its logits divided by ``temperature``: the distribution the replies were sampled
    from) and the mask (N, L) of real tokens; only reply positions reach the output layer."""
    T = max(len(c) + len(r) for c, r in rows) - 1
    L = max(len(r) for _, r in rows)
    x = torch.full((len(rows), T), pad, dtype=torch.long)
    y = torch.full((len(rows), T), -100, dtype=torch.long)
    slot = torch.full((len(rows), T), -1, dtype=torch.long)  # position of each target within its reply
    for i, (c, r) in enumerate(rows):
        seq = c + r
        x[i, : len(seq) - 1] = torch.tensor(seq[:-1])
        y[i, len(c) - 1 : len(seq) - 1] = torch.tensor(r)
        slot[i, len(c) - 1 : len(seq) - 1] = torch.arange(len(r))
    x, y, slot = x.to(device), y.to(device), slot.to(device)
    h = model.hidden_states(x)
    keep = y != -100
    lp = torch.log_softmax(model.logits(h[keep]).float() / temperature, dim=-1).gather(1, y[keep][:, None])[:, 0]
    row = torch.arange(len(rows), device=device)[:, None].expand_as(y)[keep]
    out = torch.zeros(len(rows), L, device=device, dtype=lp.dtype).index_put((row, slot[keep]), lp)
    mask = torch.zeros(len(rows), L, device=device, dtype=torch.bool)
    mask[row, slot[keep]] = True
    return out, mask


def policy_gradient_loss(logp: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """REINFORCE: ``-sum_i A_i * sum_t log pi(y_it)`` over the batch's sampled tokens."""
    m = mask.to(logp.dtype)
    return -(advantages[:, None] * logp * m).sum() / m.sum().clamp(min=1)


def kl_penalty(logp: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean per-token k3 estimate of KL(policy || reference) over the sampled tokens."""
    m = mask.to(logp.dtype)
    d = ref - logp
    return ((torch.exp(d) - d - 1) * m).sum() / m.sum().clamp(min=1)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool) -> torch.Tensor:
    """GRPO's advantage: each reward minus the mean of its group (consecutive ``group_size`` rows)."""
    r = rewards.view(-1, group_size)
    a = r - r.mean(dim=1, keepdim=True)
    if scale:
        a = a / (r.std(dim=1, keepdim=True) + 1e-4)
    return a.reshape(-1)


# ---- the discriminator -------------------------------------------------------------------------
class DiscriminatorTrainer(EngineHook):
    """Trains the discriminator; an engine hook (``after_step``, ``metrics``, ``on_save``,
    ``on_resume``). The generator's engine is given by :meth:`attach`: its precision,
    gradient clipping and learning-rate schedule apply to the discriminator's steps too."""

    def __init__(self, model: torch.nn.Module, cfg: AdversarialConfig, pad: int, tokenizer_file: str | Path | None):
        if model.config.num_labels != 2:
            raise ConfigError(f"the discriminator needs a 2-class head, it has {model.config.num_labels} classes")
        self.model, self.cfg, self.pad, self.tokenizer_file = model, cfg, pad, tokenizer_file
        self.objective: AdversarialObjective | None = None
        self.engine = None
        self._window: list[dict[str, float]] = []

    def attach(self, engine, objective: AdversarialObjective) -> None:
        from ..optim import build_optimizer

        self.engine, self.objective = engine, objective
        self.model.to(engine.device)
        tc = replace(engine.cfg, optimizer="adamw", lr=self.cfg.disc_lr)
        self.optimizer = build_optimizer(self.model, tc, engine.device)

    def _inputs(self, rows: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
        return pad_batch([c + r for c, r in rows], self.pad, self.engine.device)

    @torch.no_grad()
    def scores(self, rows: list[tuple[list[int], list[int]]], batch_size: int = 64) -> torch.Tensor:
        """log D(human | context, reply) for each row (on CPU)."""
        was = self.model.training
        self.model.eval()
        out = []
        try:
            for s in range(0, len(rows), batch_size):
                x, lengths = self._inputs(rows[s : s + batch_size])
                with self.engine.autocast():
                    logits = self.model(x, lengths=lengths)
                out.append(torch.log_softmax(logits.float(), dim=-1)[:, HUMAN].cpu())
        finally:
            self.model.train(was)
        return torch.cat(out)

    def update(self, human: list, generated: list, lr_mult: float) -> dict[str, float]:
        """One optimizer step on human (label 1) against generated (label 0) rows; the accuracy
        is measured before the step (on rows the discriminator has not yet trained on)."""
        rows = human + generated
        labels = torch.tensor([HUMAN] * len(human) + [GENERATED] * len(generated), device=self.engine.device)
        x, lengths = self._inputs(rows)
        self.model.train()
        self.optimizer.set_lr_multiplier(lr_mult)
        with self.engine.autocast():
            logits = self.model(x, lengths=lengths)
        loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
        clip = self.engine.cfg.grad_clip
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.optimizer.step()
        self.optimizer.zero_grad()
        acc = float((logits.argmax(-1) == labels).float().mean())
        return {"disc_loss": float(loss.detach()), "disc_train_acc": acc}

    def _step(self, step: int, k: int, lr_mult: float) -> None:
        obj = self.objective
        rng = random.Random(stable_seed(self.engine.cfg.seed, "disc", step, k))
        n = self.cfg.disc_batch_size
        human = [obj.train_items[i] for i in rng.sample(range(len(obj.train_items)), min(n, len(obj.train_items)))]
        pool = list(obj.buffer)
        generated = rng.sample(pool, min(n, len(pool)))
        self._window.append(self.update(human, generated, lr_mult))

    def pretrain(self) -> dict[str, float]:
        """Discriminator steps before the first generator step, on replies sampled from the
        starting generator (they also fill the buffer). Returns the last steps' mean metrics."""
        obj, cfg = self.objective, self.cfg
        if not cfg.disc_pretrain_steps:
            return {}
        rng = random.Random(stable_seed(self.engine.cfg.seed, "disc-pretrain"))
        idx = [rng.randrange(len(obj.train_items)) for _ in range(cfg.disc_pretrain_samples)]
        replies = obj.sample([obj.train_items[i][0] for i in idx], [stable_seed("pre", self.engine.cfg.seed, j) for j in range(len(idx))],
                             progress=True)
        obj.buffer.extend((obj.train_items[i][0], r) for i, r in zip(idx, replies))
        from tqdm.auto import tqdm

        last = []
        for s in tqdm(range(cfg.disc_pretrain_steps), desc="discriminator pre-training", unit="step",
                      disable=not self.engine.log_cfg.console):
            self._step(-1 - s, 0, (cfg.disc_pretrain_lr or cfg.disc_lr) / cfg.disc_lr)
            last = self._window[-10:]
        self._window = []
        return {k: sum(m[k] for m in last) / len(last) for k in last[0]} if last else {}

    # engine hooks
    def after_step(self, step: int) -> None:
        mult = self.engine._lr_mult(step - 1)
        for k in range(self.cfg.disc_steps):
            self._step(step, k, mult)

    def metrics(self) -> dict[str, float]:
        rows, self._window = self._window, []
        if not rows:
            return {}
        return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}

    def on_save(self, path: Path) -> None:
        from ..state import save_training_checkpoint

        save_training_checkpoint(Path(path) / "discriminator", self.model, self.tokenizer_file, optimizer=self.optimizer,
                        trainer_state={"role": "discriminator"}, extra={"adversarial": {"role": "discriminator"}})

    def on_resume(self, path: Path) -> None:
        from safetensors.torch import load_file

        from ..state import load_training_state

        d = Path(path) / "discriminator"
        if not (d / "model.safetensors").is_file():
            raise DataError(f"cannot resume {path}: it has no discriminator/ checkpoint")
        self.model.load_state_dict(load_file(str(d / "model.safetensors"), device=str(self.engine.device)))
        rng = torch.get_rng_state()
        load_training_state(d, self.optimizer)
        torch.set_rng_state(rng)  # the generator's RNG state wins


# ---- the generator's objective ----------------------------------------------------------------
class AdversarialObjective(Objective, EngineHook):
    name = "adversarial"

    def __init__(
        self,
        generator: torch.nn.Module,
        train: list[dict],
        val: list[dict],
        tokenizer,
        template,
        cfg: AdversarialConfig,
        reference: Callable[[], Any],
        discriminator: DiscriminatorTrainer,
    ):
        """``generator`` is the engine's model (unwrapped); ``reference()`` returns the
        reference model and the context it runs in (:func:`~.dpo.reference_for`)."""
        context = generator.config.context_length - int(getattr(generator, "virtual_tokens", 0))
        if cfg.max_context_tokens + cfg.max_reply_tokens > context:
            raise ConfigError(
                f"adversarial.max_context_tokens + max_reply_tokens = {cfg.max_context_tokens + cfg.max_reply_tokens} "
                f"exceeds the generator's context ({context} tokens)"
            )
        self.generator, self.cfg, self.tokenizer, self.reference = generator, cfg, tokenizer, reference
        self.disc = discriminator
        self.train_items, self.skipped = reply_items(train, tokenizer, template, cfg)
        self.val_items, _ = reply_items(val, tokenizer, template, cfg)
        if not self.train_items:
            raise DataError(f"no training reply fits adversarial.max_reply_tokens={cfg.max_reply_tokens}")
        if not self.val_items:
            raise DataError("no held-out reply: adversarial training needs held-out conversations (data.val)")
        self.pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eot_id
        self.eot = end_of_turn_id(tokenizer)
        rng = random.Random(0)
        self.eval_items = rng.sample(self.val_items, min(cfg.eval_contexts, len(self.val_items)))
        self.buffer: deque = deque(maxlen=cfg.disc_buffer)
        self.baseline: float | None = None
        self._window: list[dict[str, float]] = []
        self.eval_samples: list[dict[str, Any]] = []  # every evaluation's samples, in order
        self._sampler = None
        self.steps_done = 0

    def setup(self, ctx) -> None:
        super().setup(ctx)
        if ctx.world_size > 1:
            raise ConfigError("adversarial training runs on one process (the discriminator is not distributed)")

    # sampling through the one inference engine
    def sample(self, contexts: list[list[int]], seeds: list[int], progress: bool = False) -> list[list[int]]:
        from ...infer.engine import InferenceEngine
        from ...infer.sampling import SamplingParams

        if self._sampler is None:
            self._sampler = InferenceEngine(self.generator, self.tokenizer, max_batch_size=self.cfg.eval_batch_size)
        c = self.cfg
        was = self.generator.training
        self.generator.eval()  # no dropout while sampling; the engine shares the training weights
        try:
            params = [SamplingParams(max_tokens=c.max_reply_tokens, temperature=c.temperature, top_k=c.top_k,
                                     top_p=c.top_p, stop_token_ids=[self.eot], seed=s) for s in seeds]
            done = self._sampler.generate(contexts, params, progress=progress)
        finally:
            self.generator.train(was)
        return [list(d.token_ids) for d in done]

    def _reference_logps(self, rows) -> torch.Tensor:
        module, ctx = self.reference()
        was = module.training
        module.eval()
        try:
            with torch.no_grad(), ctx, self.ctx.autocast():
                lp, _ = token_logps(module, rows, self.pad, self.ctx.device, self.cfg.temperature)
        finally:
            module.train(was)
        return lp

    def train_batch(self, step: int, micro: int) -> Batch:
        c = self.cfg
        n = self.ctx.micro_batch_size
        rng = random.Random(stable_seed(self.ctx.seed, "ctx", step, micro))
        idx = [rng.randrange(len(self.train_items)) for _ in range(n)]
        contexts = [self.train_items[i][0] for i in idx for _ in range(c.group_size)]
        seeds = [stable_seed(self.ctx.seed, step, micro, j) for j in range(len(contexts))]
        replies = self.sample(contexts, seeds)
        rows = list(zip(contexts, replies))
        rewards = self.disc.scores(rows)
        if c.reward == "prob":
            rewards = rewards.exp()
        if c.algorithm == "grpo":
            adv = group_advantages(rewards, c.group_size, c.scale_advantage)
        else:
            mean = float(rewards.mean())
            base = mean if self.baseline is None else self.baseline
            adv = rewards - base
            self.baseline = mean if self.baseline is None else c.baseline_decay * self.baseline + (1 - c.baseline_decay) * mean
        self.buffer.extend(rows)
        ref = self._reference_logps(rows)
        texts = [self.tokenizer.decode([t for t in r if t != self.eot]) for r in replies]
        stats = {
            "reward_mean": float(rewards.mean()),
            "reply_tokens": sum(map(len, replies)) / len(replies),
            "distinct_1": distinct_n(texts, 1),
            "distinct_2": distinct_n(texts, 2),
        }
        if micro == self.ctx.grad_accum - 1:
            self.steps_done = step + 1
        return {"index": torch.tensor(idx), "rows": rows, "advantages": adv.to(self.ctx.device), "ref": ref,
                "stats": stats}

    def batch_weight(self, batch: Batch) -> float:
        return float(len(batch["rows"]))

    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, Any]]:
        c = self.cfg
        rows = batch["rows"]
        logp, mask = token_logps(model, rows, self.pad, self.ctx.device, c.temperature)
        pg = policy_gradient_loss(logp, mask, batch["advantages"])
        kl = kl_penalty(logp, batch["ref"], mask)
        loss = pg + c.kl_coef * kl
        human = [self.train_items[i] for i in batch["index"].tolist()]
        tokens = sum(len(a) + len(b) for a, b in rows)
        mle = None
        if c.mle_coef > 0:
            hlp, hmask = token_logps(model, human, self.pad, self.ctx.device)
            mle = -(hlp * hmask).sum() / hmask.sum()
            loss = loss + c.mle_coef * mle
            tokens += sum(len(a) + len(b) for a, b in human)
        m = mask.float()
        seq_kl = ((logp.detach() - batch["ref"]) * m).sum(1).mean()
        stats = {**batch["stats"], "pg_loss": float(pg.detach()), "kl": float(seq_kl), "kl_k3": float(kl.detach())}
        if mle is not None:
            stats["mle_nll"] = float(mle.detach())
        self._window.append(stats)
        return loss, {"tokens": tokens}

    def metrics(self) -> dict[str, float]:
        """The generator's train metrics since the last log (an engine hook)."""
        rows, self._window = self._window, []
        if not rows:
            return {}
        return {k: sum(r.get(k, 0.0) for r in rows) / len(rows) for k in rows[0]}

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        c = self.cfg
        items = self.eval_items
        contexts = [ctx for ctx, _ in items]
        replies = self.sample(contexts, [stable_seed("eval", self.ctx.seed, j) for j in range(len(items))])
        gen_rows = list(zip(contexts, replies))
        human_rows = list(items)
        d_gen = self.disc.scores(gen_rows)
        d_human = self.disc.scores(human_rows)
        correct = int((d_human.exp() > 0.5).sum()) + int((d_gen.exp() <= 0.5).sum())
        nll_sum, nll_n, kl_sum = 0.0, 0, 0.0
        for s in range(0, len(items), c.eval_batch_size):
            with self.ctx.autocast():
                lp, mask = token_logps(model, human_rows[s : s + c.eval_batch_size], self.pad, self.ctx.device)
                glp, gmask = token_logps(model, gen_rows[s : s + c.eval_batch_size], self.pad, self.ctx.device,
                                         c.temperature)
            nll_sum -= float((lp * mask).sum())
            nll_n += int(mask.sum())
            ref = self._reference_logps(gen_rows[s : s + c.eval_batch_size])
            kl_sum += float(((glp - ref) * gmask).sum())
        texts = [self.tokenizer.decode([t for t in r if t != self.eot]) for r in replies]
        rewards = d_gen.exp() if c.reward == "prob" else d_gen
        self.eval_samples.append({
            "step": self.steps_done,
            "samples": [
                {"context": self.tokenizer.decode(ctx[-160:]), "human": self.tokenizer.decode(h[:-1]),
                 "generated": t, "p_human_generated": float(dg.exp()), "p_human_human": float(dh.exp())}
                for (ctx, h), t, dg, dh in list(zip(items, texts, d_gen, d_human))[: c.samples_shown]
            ],
        })
        return {
            "disc_acc": correct / (2 * len(items)),
            "reward_mean": float(rewards.mean()),
            "kl": kl_sum / len(items),
            "val_nll": nll_sum / max(1, nll_n),
            "distinct_1": distinct_n(texts, 1),
            "distinct_2": distinct_n(texts, 2),
            "reply_tokens": sum(map(len, replies)) / len(replies),
        }


def load_samples(out_dir: Path, objective: AdversarialObjective) -> None:
    """On resume: the earlier evaluations' samples from ``samples.jsonl``, so that samples.md
    still shows the replies before the first step."""
    path = Path(out_dir) / "samples.jsonl"
    if not path.is_file():
        return
    by_step: dict[int, list[dict]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        by_step.setdefault(row.pop("step"), []).append(row)
    objective.eval_samples[:0] = [{"step": k, "samples": v} for k, v in sorted(by_step.items())]


def write_samples(out_dir: Path, objective: AdversarialObjective) -> Path:
    """samples.jsonl (every evaluation) and samples.md (the first and the last, side by side)."""
    out_dir = Path(out_dir)
    with (out_dir / "samples.jsonl").open("w", encoding="utf-8") as f:
        for ev in objective.eval_samples:
            for s in ev["samples"]:
                f.write(json.dumps({"step": ev["step"], **s}) + "\n")
    if not objective.eval_samples:
        return out_dir / "samples.jsonl"
    first, last = objective.eval_samples[0], objective.eval_samples[-1]
    lines = [f"# Sample replies: before (step {first['step']}) and after (step {last['step']}) adversarial training", ""]
    first, last = first["samples"], last["samples"]
    def one_line(text: str) -> str:
        return text.replace("\n", " ⏎ ")

    for k, (a, b) in enumerate(zip(first, last), 1):
        ctx = one_line(a["context"])
        lines += [
            f"## {k}", "", f"**context (end):** `{ctx[-300:]}`", "",
            f"- **human** (P(human) {a['p_human_human']:.2f} -> {b['p_human_human']:.2f}): {one_line(a['human'])}",
            f"- **before** (P(human) {a['p_human_generated']:.2f}): {one_line(a['generated'])}",
            f"- **after** (P(human) {b['p_human_generated']:.2f}): {one_line(b['generated'])}", "",
        ]
    path = out_dir / "samples.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
