"""train.max_minutes: the planning logic on simulated clocks, the engine on an injected clock
(exact resume of a planned run), and one real run against the wall clock (generous bounds:
the machine may be busy)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_PRETRAIN, read_metrics

from lmforge.cli import main
from lmforge.model.gpt import GPT, GPTConfig
from lmforge.runs.tracking import LogConfig
from lmforge.train.budget import TimeBudget
from lmforge.checkpoint import list_checkpoints
from lmforge.train.engine import Engine, TrainConfig
from lmforge.train.hooks import EngineHook
from lmforge.train.objectives.lm import LMObjective


# ------------------------------------------------------------------------------ the planner
def simulate(budget: TimeBudget, step_cost, *, eval_s: float, save_s: float, eval_interval: int) -> tuple[int, float]:
    """Run the engine's protocol against a simulated timeline: ``step_cost(step)`` seconds a
    step, ``eval_s`` per evaluation (one to plan, every ``eval_interval``, the last), ``save_s``
    for the final checkpoint. Returns (steps, seconds at the end, report included)."""
    now, step, max_steps = budget.start, 0, budget.cap
    while step < max_steps:
        cost = step_cost(step)
        now += cost
        step += 1
        budget.observe_step(cost)
        if not budget.planned:
            if budget.ready():
                if budget.eval_s is None:
                    now += eval_s
                    budget.observe_eval(eval_s)
                max_steps = budget.plan(step, now).max_steps
        elif budget.check_due(now):
            plan = budget.check(step, now)
            if plan is not None:
                max_steps = plan.max_steps
        last = step >= max_steps
        if (eval_interval and step % eval_interval == 0) or last:
            now += eval_s
            budget.observe_eval(eval_s)
        if last:
            now += save_s
            budget.observe_save(save_s)
    return step, now + budget.report_s - budget.start


def test_plan_ends_within_the_budget_with_evaluations_and_checkpoint() -> None:
    b = TimeBudget(1.0, 100_000, eval_interval=100, save_estimate_s=0.5, report_s=1.0)
    steps, total = simulate(b, lambda s: 0.05, eval_s=0.8, save_s=0.5, eval_interval=100)
    assert 0.95 * 60 <= total <= 60, total
    # what fits: (60 * 0.99 - tail) / (step + eval share)
    assert steps == pytest.approx((0.99 * 60 - 0.8 - 0.5 - 1.0 - 0.8) / (0.05 + 0.8 / 100), rel=0.02)
    assert b.plan_.max_steps == steps and "time budget 1.00 min" in b.plan_.describe()


def test_the_cap_and_a_budget_too_small() -> None:
    b = TimeBudget(1.0, 200)
    steps, total = simulate(b, lambda s: 0.05, eval_s=0.1, save_s=0.1, eval_interval=0)
    assert steps == 200 and total < 60  # max_steps stays the cap
    b = TimeBudget(0.01, 10_000)  # 0.6 s: the tail alone does not fit after the measured steps
    steps, total = simulate(b, lambda s: 0.05, eval_s=0.5, save_s=0.1, eval_interval=0)
    assert steps <= 20 and b.plan_.max_steps == steps  # stops at once with its evaluation and checkpoint


@pytest.mark.parametrize("change", [0.25, 3.0])
def test_a_change_of_speed_mid_run_is_followed(change: float) -> None:
    """The machine gets 3x slower (or 4x faster) at 30% of the planned run: the plan is corrected
    and the run still ends within 5% of its budget."""
    b = TimeBudget(2.0, 1_000_000, eval_interval=500)
    planned: list[int] = []

    def cost(step: int) -> float:
        if b.plan_ is not None and not planned:
            planned.append(b.plan_.max_steps)
        return 0.02 * (change if planned and step > 0.3 * planned[0] else 1.0)

    steps, total = simulate(b, cost, eval_s=0.3, save_s=0.2, eval_interval=500)
    assert 0.95 * 120 <= total <= 1.05 * 120, total
    assert b.plan_.replans >= 1 and (steps < planned[0] if change > 1 else steps > planned[0])


def test_noise_does_not_make_the_plan_swing() -> None:
    """+-30% step-to-step noise (a shared VM): few corrections, and the run ends on time."""
    gen = torch.Generator().manual_seed(0)
    noise = (0.7 + 0.6 * torch.rand(200_000, generator=gen)).tolist()
    b = TimeBudget(1.0, 1_000_000)
    steps, total = simulate(b, lambda s: 0.003 * noise[s], eval_s=0.01, save_s=0.02, eval_interval=0)
    assert 0.95 * 60 <= total <= 1.02 * 60 and b.plan_.replans <= 3


def test_state_round_trip_counts_the_time_spent() -> None:
    b = TimeBudget(1.0, 10_000, start=100.0)
    for _ in range(40):
        b.observe_step(0.1)
    plan = b.plan(40, 104.0)
    state = json.loads(json.dumps(b.state(110.0)))  # what trainer_state.json holds
    r = TimeBudget(1.0, 10_000)
    r.restore(state, 5000.0)
    assert r.elapsed(5000.0) == pytest.approx(10.0) and r.plan_.max_steps == plan.max_steps
    assert r.planned and r.eval_s is None


# ------------------------------------------------------------------------------ the engine, injected clock
class TickClock:
    """A clock that advances ``dt`` each time it is read: the engine reads it once per step,
    evaluation and checkpoint, so each costs ``dt`` whatever the machine's load."""

    def __init__(self, dt: float) -> None:
        self.t, self.dt = 0.0, dt

    def __call__(self) -> float:
        self.t += self.dt
        return self.t


class StopAfter(EngineHook):
    """An engine hook that interrupts the run after optimizer step ``n``."""

    def __init__(self, n: int) -> None:
        self.n = n

    def after_step(self, step: int) -> None:
        if step == self.n:
            raise KeyboardInterrupt


def budget_engine(data: Path, out: Path, *, resume: bool = False, stop_after: int | None = None) -> Engine:
    torch.manual_seed(0)
    meta = json.loads((data / "meta.json").read_text())
    model = GPT(GPTConfig(vocab_size=meta["vocab_size"], context_length=16, n_layer=2, n_head=2, n_embd=32))
    cfg = TrainConfig(max_steps=100_000, max_minutes=0.05, micro_batch_size=8, warmup_steps=2, eval_interval=0,
                      eval_tokens=256, ckpt_interval=40, keep_checkpoints=10, log_interval=1, threads=1,
                      device="cpu", precision="fp32", deterministic=True)
    engine = Engine(model, LMObjective(str(data), 16, cfg.eval_tokens), cfg, out,
                    log=LogConfig(console=False, tensorboard=False, report=False), clock=TickClock(0.01),
                    hooks=[StopAfter(stop_after)] if stop_after else [])
    engine.start(resume, overwrite=not resume)
    return engine


def test_engine_plans_from_its_clock_and_resumes_the_plan(tiny_data: Path, tmp_path: Path) -> None:
    """3 s of budget at 10 ms a step (injected clock): the plan is ~290 steps, the run ends there
    with an evaluation and a checkpoint; interrupted after a checkpoint and resumed, it continues
    the same plan and gives the same per-step losses as the run that was not interrupted."""
    straight = budget_engine(tiny_data, tmp_path / "straight")
    result = straight.fit(report=False)
    plan = result.budget["plan"]
    assert 250 <= result.steps == plan["max_steps"] <= 300 and plan["replans"] <= 1  # once the first checkpoint is timed
    assert read_metrics(tmp_path / "straight", "eval")[-1]["step"] == result.steps
    assert list_checkpoints(tmp_path / "straight")[-1].name == f"step_{result.steps:07d}"
    assert 0.95 * 3 <= result.budget["elapsed_s"] <= 3.0

    split = tmp_path / "split"
    with pytest.raises(KeyboardInterrupt):
        budget_engine(tiny_data, split, stop_after=130).fit(report=False)
    saved = json.loads((list_checkpoints(split)[-1] / "trainer_state.json").read_text())
    assert saved["step"] == 120 and saved["budget"]["plan"]["max_steps"] == result.steps
    resumed = budget_engine(tiny_data, split, resume=True)
    assert resumed.step == 120 and resumed.max_steps == result.steps  # the plan, not a new one
    again = resumed.fit(report=False)
    assert again.steps == result.steps and again.budget["plan"]["replans"] == plan["replans"]
    a = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "straight")}
    b = {r["step"]: r["loss"] for r in read_metrics(split)}  # steps 121..130 logged twice: the later wins
    assert b == a


def test_a_resume_without_the_budget_keeps_the_planned_length(tiny_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        budget_engine(tiny_data, run, stop_after=45).fit(report=False)
    planned = json.loads((list_checkpoints(run)[-1] / "trainer_state.json").read_text())["budget"]["plan"]["max_steps"]
    argv = ["pretrain", "--resume", f"data={tiny_data}", f"out_dir={run}", *TINY_PRETRAIN, "train.max_steps=100000",
            "train.ckpt_interval=40", "log.report=false"]
    assert main(argv) == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == planned


# ------------------------------------------------------------------------------ the wall clock
def test_a_real_run_stops_on_its_budget(tiny_data: Path, tmp_path: Path, capsys) -> None:
    """`lmforge pretrain train.max_minutes=0.1`: ends within its 6 s (generous bounds for a busy
    machine: the budget is counted from the engine's creation, the bounds from before the
    command), with a final evaluation and checkpoint, the plan printed and in summary.json."""
    out = tmp_path / "run"
    argv = ["pretrain", f"data={tiny_data}", f"out_dir={out}",
            *[a for a in TINY_PRETRAIN if a != "log.console=false"],
            "train.max_steps=1000000", "train.max_minutes=0.1", "train.eval_interval=500", "log.report=true"]
    t0 = time.perf_counter()
    assert main(argv) == 0
    wall = time.perf_counter() - t0
    assert 0.75 * 6 <= wall <= 1.25 * 6, wall
    summary = json.loads((out / "summary.json").read_text())
    steps = summary["steps"]
    assert summary["budget"]["plan"]["max_steps"] == steps < 1_000_000
    assert read_metrics(out, "eval")[-1]["step"] == steps
    assert list_checkpoints(out)[-1].name == f"step_{steps:07d}" and (out / "report.md").is_file()
    assert "time budget 0.10 min" in capsys.readouterr().out


def test_bad_budget_is_a_config_error(tiny_data: Path, tmp_path: Path, capsys) -> None:
    argv = ["pretrain", f"data={tiny_data}", f"out_dir={tmp_path / 'r'}", *TINY_PRETRAIN, "train.max_minutes=-1"]
    assert main(argv) == 2
    assert "train.max_minutes must be a number of minutes >= 0" in capsys.readouterr().err
