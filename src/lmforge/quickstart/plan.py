"""The quickstart's time budget: stage clocks and the training plan.

``lmforge quickstart --minutes N`` must serve its chatbot N minutes after it starts, on
whatever machine it runs. The stages before training (dump, data stages, base import or
pretraining, the evaluation of the base) are measured as they run; what comes after training
is reserved from those measurements (the evaluation of the fine-tuned model takes about as long
as the base's, measured below), and the training stages get the rest, which each run spends
through ``train.max_minutes`` (the engine sizes its steps from its own measured speed and ends,
evaluation and checkpoint included, on time: :mod:`lmforge.train.budget`).

Figures below were measured on the 2-core Intel Xeon (AMX-BF16, torch capability AVX512) VM of
this project, natively and under the AVX2 emulation (``ATEN_CPU_CAPABILITY=avx2
ONEDNN_MAX_CPU_ISA=AVX2``), BENCHMARKS.md "The quickstart pipeline".
"""

from __future__ import annotations

import time
from dataclasses import dataclass

#: The fine-tuned model's evaluation against the base's: the same conversations and the same
#: 128-token reply budget, so at most the same decoding steps (a batch decodes until its longest
#: reply ends, and the base's replies run to the budget: 5 of 20 do). Measured in the timed
#: 10-minute runs (2-core Xeon): base 22.7 s, fine-tuned 18.2 s natively (bf16); 27.9 s and 16.4 s
#: under the AVX2 emulation (fp32).
EVAL_AFTER_FACTOR = 1.0
#: The report card (the comparison plot, report.md, summary.json) and the server's start (loading
#: the chat model, uvicorn listening), seconds: measured under 1 s and 1.5-2.3 s for SmolLM2 on the
#: 2-core Xeon, natively and emulated; kept at 6 and 8 s (the margin of the measured 10-minute runs).
REPORT_S = 6.0
SERVE_S = 8.0
#: What run_finetune does outside the engine's own budget (loading the base, tokenizing 1,373
#: conversations, the summary): measured 6-9 s for SmolLM2; 15 s leaves room for a slower disk.
FINETUNE_OVERHEAD_S = 15.0
#: Kept free at the end: timing noise of a shared machine.
MARGIN_SHARE = 0.03
#: scratch: the pretraining's share of the training time (the rest is chat SFT), and the
#: seconds reserved for evaluating a ~2M-parameter model twice before it is measured.
SCRATCH_PRETRAIN_SHARE = 0.8
SCRATCH_EVAL_S = 15.0


class Clock:
    """Wall time since the quickstart started, against its budget; each stage's seconds."""

    def __init__(self, budget_s: float, now=time.perf_counter) -> None:
        self.budget_s = budget_s
        self.now = now
        self.start = now()
        self.times: dict[str, float] = {}
        self._stage_start = self.start
        self.total_stages = 0
        self._stage = 0

    def elapsed(self) -> float:
        return self.now() - self.start

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def stage(self, title: str) -> None:
        self._stage_start = self.now()
        self._stage += 1
        print(f"\n[{self._stage}/{self.total_stages or '?'}] {title}  ({self.elapsed() / 60:.1f} of "
              f"{self.budget_s / 60:g} min)", flush=True)

    def done(self, name: str) -> float:
        self.times[name] = self.now() - self._stage_start
        return self.times[name]

    def left_for_training(self, plan: TrainingPlan) -> float:
        """What the next training stage may spend: the budget left, less what comes after it."""
        return max(1.0, self.left() - plan.reserve_s - FINETUNE_OVERHEAD_S)


@dataclass
class TrainingPlan:
    budget_s: float
    spent_s: float  # before training: measured
    eval_after_s: float  # reserved
    reserve_s: float  # eval after + report + server start + margin
    cpt_s: float  # continued pretraining
    sft_s: float

    def describe(self) -> str:
        lines = [
            f"plan: {self.budget_s / 60:g} min budget; {self.spent_s:.0f} s spent on the stages so far (measured)",
            *([f"  continued pretraining  {self.cpt_s / 60:5.1f} min"] if self.cpt_s else []),
            f"  chat SFT               {self.sft_s / 60:5.1f} min (train.max_minutes: steps sized from measured speed)",
            f"  eval after             {self.eval_after_s:5.0f} s (the base's eval took {self.eval_after_s / EVAL_AFTER_FACTOR:.0f} s)",
            f"  report + server start  {REPORT_S + SERVE_S:5.0f} s; margin {MARGIN_SHARE * self.budget_s:.0f} s",
        ]
        return "\n".join(lines)


def plan_training(clock: Clock, *, eval_s: float, scratch: bool, cpt_share: float = 0.0) -> TrainingPlan:
    """Split what is left of the budget after the evaluation before training."""
    eval_after = EVAL_AFTER_FACTOR * eval_s
    reserve = eval_after + REPORT_S + SERVE_S + MARGIN_SHARE * clock.budget_s
    train = max(0.0, clock.left() - reserve - FINETUNE_OVERHEAD_S * (2 if cpt_share else 1))
    cpt = cpt_share * train if not scratch else 0.0
    return TrainingPlan(clock.budget_s, clock.elapsed(), eval_after, reserve, cpt, train - cpt)


def scratch_pretrain_seconds(clock: Clock) -> float:
    """scratch: the pretraining's share of what is left after every other stage's reserve."""
    after = 2 * SCRATCH_EVAL_S + REPORT_S + SERVE_S + MARGIN_SHARE * clock.budget_s + 2 * FINETUNE_OVERHEAD_S
    return max(1.0, SCRATCH_PRETRAIN_SHARE * (clock.left() - after))
