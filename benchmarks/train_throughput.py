#!/usr/bin/env python
"""Training throughput of lmforge against Hugging Face transformers GPT-2, in one process.

Both sides train the same shapes on the same fixed random-token batches with the same
optimizer (torch AdamW, fused, identical lr / betas / eps / weight-decay groups), grad-norm
clipping at 1.0 and batch size. lmforge runs through its real training loop
(``Engine.fit`` with an ``Objective`` defined here); Hugging Face runs a plain loop
(forward with labels, backward, clip, step, zero_grad).

The configurations of a case are interleaved in rounds (the order rotates every round),
each round preceded by a few untimed warm-up steps per configuration, and the report is
the median over rounds; ratios are taken within a round (neighbours in time) and then
the median of those per-round ratios is reported. That cancels most of the noise of a
shared machine.

Token accounting is identical on both sides: every step processes batch x context input
tokens and predicts batch x (context - 1) of them. Hugging Face shifts ``labels``
internally (pads with -100 and drops the first label); the lmforge objective gets the
same targets pre-shifted, ``targets = [x[:, 1:], -100]``, so both compute the loss on
exactly the same positions.

    python benchmarks/train_throughput.py                 # both cases, defaults (~4-5 min on an idle 2-core CPU)
    python benchmarks/train_throughput.py --case a --rounds 7
    python benchmarks/train_throughput.py --quick         # smoke test (~1 min)
    python benchmarks/train_throughput.py --rss           # also per-config peak RSS (subprocesses)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from record import write_results  # noqa: E402  (benchmarks/record.py: the machine with every result)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "train_throughput.json"

# Optimizer settings shared by both sides (lmforge's TrainConfig defaults, constant LR).
LR, BETAS, EPS, WEIGHT_DECAY, GRAD_CLIP = 1e-3, (0.9, 0.95), 1e-8, 0.1, 1.0
SEED = 1337
N_BATCHES = 8  # size of the pool of fixed random batches, cycled by step


@dataclass
class Case:
    key: str
    title: str
    preset: str  # lmforge preset
    vocab_size: int
    context: int  # tokens per sequence fed to both models
    batch: int
    hf_config: dict[str, Any]  # GPT2Config kwargs
    configs: list[str]
    # per-round schedule: (initial warm-up steps, warm-up steps per round, measured steps per round, rounds)
    full: tuple[int, int, int, int]
    quick: tuple[int, int, int, int]
    notes: list[str] = field(default_factory=list)


CASES: dict[str, Case] = {
    "a": Case(
        key="a",
        title="shakespeare-char (4L 4H 128d, T=64, B=12, vocab 65)",
        preset="shakespeare-char",
        vocab_size=65,
        context=64,
        batch=12,
        hf_config=dict(
            vocab_size=65,
            n_positions=64,
            n_layer=4,
            n_head=4,
            n_embd=128,
            activation_function="gelu",  # the preset's exact GELU (GPT-2's default is gelu_new)
            bos_token_id=None,
            eos_token_id=None,
        ),
        configs=["lmforge-fp32", "lmforge-bf16", "hf-fp32", "hf-bf16", "loop-fp32"],
        full=(10, 5, 40, 5),
        quick=(2, 1, 4, 2),
        notes=[
            "lmforge preset shakespeare-char has bias=False; HF GPT-2 always has biases (Linear/Conv1D and LayerNorm),"
            " so HF does slightly more (elementwise) work here.",
            "Both use exact (erf) GELU: the preset's mlp=gelu; HF activation_function='gelu'.",
        ],
    ),
    "b": Case(
        key="b",
        title="GPT-2 124M (12L 12H 768d, vocab 50257), T=256, B=4",
        preset="gpt2",
        vocab_size=50257,
        context=256,
        batch=4,
        hf_config=dict(),  # GPT2Config() defaults: 12L/12H/768d, n_positions 1024, vocab 50257, gelu_new
        configs=["lmforge-bf16", "lmforge-fp32", "hf-fp32", "hf-bf16", "loop-fp32"],
        full=(1, 0, 2, 3),
        quick=(0, 0, 1, 1),
        notes=[
            "Same architecture on both sides: biases, tied embeddings, tanh GELU, LayerNorm eps 1e-5, 1024 positions.",
            "HF GPT2Config() defaults except dropout: its 0.1 resid/embd/attn dropout is set to 0.0 to match lmforge's preset.",
        ],
    ),
}
for _c in CASES.values():
    _c.notes.append("HF: dropout 0.0, use_cache=False, attn_implementation='sdpa'.")


# ----------------------------------------------------------------------------------------
# Data: a fixed pool of random-token batches from a seeded generator, shared by both sides.
# ----------------------------------------------------------------------------------------
def make_pool(case: Case) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(SEED)
    pool = []
    for _ in range(N_BATCHES):
        x = torch.randint(case.vocab_size, (case.batch, case.context), generator=g)
        # What Hugging Face derives from labels=x: next token, -100 on the last position.
        y = torch.cat([x[:, 1:], torch.full((case.batch, 1), -100, dtype=x.dtype)], dim=1)
        pool.append((x, y))
    return pool


def weight_decay_groups(model: torch.nn.Module) -> list[dict[str, Any]]:
    """Decay on matrices only, as lmforge's build_optimizer does."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return [g for g in ({"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]


# ----------------------------------------------------------------------------------------
# Runners: run(n) trains n steps and returns (seconds spent in the steps, tokens processed).
# ----------------------------------------------------------------------------------------
class Runner:
    name: str
    model: torch.nn.Module

    def run(self, n: int) -> tuple[float, int]:
        raise NotImplementedError


class PlainLoop(Runner):
    """A plain training loop timed around its steps: loss, backward, clip, step, zero_grad."""

    pool: list
    optimizer: torch.optim.Optimizer
    tokens_per_step: int
    step = 0

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def run(self, n: int) -> tuple[float, int]:
        model, opt = self.model, self.optimizer
        t0 = time.perf_counter()
        for _ in range(n):
            x, y = self.pool[self.step % len(self.pool)]
            self.loss(x, y).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            opt.step()
            opt.zero_grad(set_to_none=True)
            self.step += 1
        return time.perf_counter() - t0, n * self.tokens_per_step


class LmforgeRunner(Runner):
    """lmforge through its real training loop: Engine.fit() with a fixed-batch Objective.

    Each run(n) call raises TrainConfig.max_steps by n and calls fit() again (fit resumes
    from engine.step); the time is the engine's own FitResult.train_s (the sum of its
    per-step times: batch, forward, backward, clip, optimizer step, zero_grad). The
    engine's metrics.jsonl window of the same steps is kept as a cross-check.
    """

    def __init__(self, case: Case, precision: str, pool, threads: int):
        from lmforge.model.gpt import GPTConfig, build_model
        from lmforge.model.presets import get_preset
        from lmforge.runs.tracking import LogConfig
        from lmforge.train.engine import Engine, TrainConfig
        from lmforge.train.objectives.base import Objective

        class FixedBatches(Objective):
            """Serves the shared pool of random-token batches, cycled by step; no eval."""

            name = "fixed-random-tokens"

            def train_batch(self, step: int, micro: int):
                x, y = pool[step % len(pool)]
                return {"input_ids": x, "labels": y}

            def loss(self, model, batch):
                return model(batch["input_ids"], batch["labels"]), {"tokens": batch["input_ids"].numel()}

            def evaluate(self, model):
                return {}

        class BenchEngine(Engine):
            # fit() checkpoints after its last step; every run(n) here is a fit() call, so
            # skip the (untimed, but slow and disk-heavy: ~1.5 GB for 124M) checkpoint.
            def save(self):
                return self.out_dir / "checkpoints"

        self.name = f"lmforge-{precision}"
        cfg = GPTConfig(**{**get_preset(case.preset), "vocab_size": case.vocab_size})
        assert cfg.dropout == 0.0
        torch.manual_seed(SEED)
        self.model = build_model(cfg)
        self._tmp = tempfile.TemporaryDirectory(prefix="lmforge-bench-")
        tc = TrainConfig(
            max_steps=1,  # raised by run()
            micro_batch_size=case.batch,
            grad_accum=1,
            optimizer="adamw",
            lr=LR,
            weight_decay=WEIGHT_DECAY,
            beta1=BETAS[0],
            beta2=BETAS[1],
            eps=EPS,
            schedule="constant",
            warmup_steps=0,
            grad_clip=GRAD_CLIP,
            precision=precision,
            device="cpu",
            seed=SEED,
            threads=threads,
            eval_interval=0,
            log_interval=10**9,  # one metrics window per fit() call (fit always logs its last step)
            ckpt_interval=0,
        )
        self.engine = BenchEngine(
            self.model,
            FixedBatches(),
            tc,
            self._tmp.name,
            log=LogConfig(console=False, jsonl=True, tensorboard=False, wandb=False),
        )
        self.flops_per_token = self.model.flops_per_token(case.context)
        self.last_window_tokens_per_s: float | None = None

    def run(self, n: int) -> tuple[float, int]:
        self.engine.cfg.max_steps = self.engine.max_steps = self.engine.step + n
        res = self.engine.fit()
        lines = (Path(self._tmp.name) / "metrics.jsonl").read_text().splitlines()
        last = json.loads(lines[-1]) if lines else {}
        self.last_window_tokens_per_s = float(last["tokens_per_s"]) if last.get("kind") == "train" else None
        return res.train_s, res.tokens


class HFRunner(PlainLoop):
    """Hugging Face GPT2LMHeadModel (sdpa) in a plain training loop, timed around the steps."""

    def __init__(self, case: Case, precision: str, pool, threads: int):
        import transformers
        from transformers import GPT2Config, GPT2LMHeadModel

        transformers.logging.set_verbosity_error()
        self.name = f"hf-{precision}"
        self.pool = pool
        self.tokens_per_step = case.batch * case.context
        hc = GPT2Config(**case.hf_config)
        hc.resid_pdrop = hc.embd_pdrop = hc.attn_pdrop = 0.0
        hc.use_cache = False
        torch.manual_seed(SEED)
        self.model = GPT2LMHeadModel._from_config(hc, attn_implementation="sdpa")
        assert self.model.config._attn_implementation == "sdpa"
        self.model.train()
        self.optimizer = torch.optim.AdamW(weight_decay_groups(self.model), lr=LR, betas=BETAS, eps=EPS, fused=True)
        self.autocast: Callable = (
            (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else (lambda: torch.autocast("cpu", enabled=False))
        )
    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.model(input_ids=x, labels=x, use_cache=False).loss


class LoopRunner(PlainLoop):
    """The plain-PyTorch nanoGPT-style model and step of ``benchmarks/nanogpt_loop.py`` (no
    biases, exact GELU, learned positions, sdpa, tied embeddings; AdamW with torch's default
    foreach kernel, as nanoGPT uses on a CPU; clip 1.0), fp32, at this case's shape."""

    def __init__(self, case: Case, precision: str, pool, threads: int):
        from nanogpt_loop import NanoGPT

        assert precision == "fp32", "the nanoGPT-style loop is the fp32 peer"
        cfg = CASES[case.key].hf_config
        layers, heads, width = cfg.get("n_layer", 12), cfg.get("n_head", 12), cfg.get("n_embd", 768)
        self.name = "loop-fp32"
        self.pool = pool
        self.tokens_per_step = case.batch * case.context
        torch.manual_seed(SEED)
        self.model = NanoGPT(case.vocab_size, max(case.context, cfg.get("n_positions", 1024)), layers, heads, width)
        self.optimizer = torch.optim.AdamW(weight_decay_groups(self.model), lr=LR, betas=BETAS, eps=EPS)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.model(x, y)


def build_runner(case: Case, name: str, pool, threads: int) -> Runner:
    lib, precision = name.split("-")
    runner = {"lmforge": LmforgeRunner, "hf": HFRunner, "loop": LoopRunner}[lib](case, precision, pool, threads)
    torch.set_num_threads(threads)  # the Engine sets it too; keep both sides identical
    return runner


# ----------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------
def rss_mib() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def peak_rss_mib() -> float:
    """VmHWM of this process (getrusage's ru_maxrss would include the parent's peak at fork)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def measure_case(case: Case, configs: list[str], schedule: tuple[int, int, int, int], threads: int) -> dict[str, Any]:
    init_warm, round_warm, steps, rounds = schedule
    pool = make_pool(case)
    tokens_per_step = case.batch * case.context
    print(f"\n## case {case.key}: {case.title}", flush=True)
    print(
        f"schedule: {init_warm} initial warm-up steps, then {rounds} rounds x ({round_warm} warm-up + {steps} timed steps)"
        f" per config; {tokens_per_step} tokens/step; configs {', '.join(configs)}",
        flush=True,
    )
    t_case = time.perf_counter()
    runners: dict[str, Runner] = {}
    for name in configs:
        t = time.perf_counter()
        runners[name] = build_runner(case, name, pool, threads)
        if init_warm:
            runners[name].run(init_warm)
        print(f"  built + warmed {name} in {time.perf_counter() - t:.1f}s", flush=True)

    per_round: dict[str, list[float]] = {n: [] for n in configs}
    windows: dict[str, list[float]] = {n: [] for n in configs}  # engine metrics.jsonl cross-check
    for r in range(rounds):
        order = configs[r % len(configs) :] + configs[: r % len(configs)]
        parts = []
        for name in order:
            runner = runners[name]
            if round_warm:
                runner.run(round_warm)
            secs, toks = runner.run(steps)
            tps = toks / secs
            per_round[name].append(tps)
            if isinstance(runner, LmforgeRunner) and runner.last_window_tokens_per_s is not None:
                windows[name].append(runner.last_window_tokens_per_s)
            parts.append(f"{name} {tps:,.0f}")
        print(f"  round {r + 1}/{rounds} (load {loadavg()}): " + " | ".join(parts), flush=True)

    flops = next((r.flops_per_token for r in runners.values() if isinstance(r, LmforgeRunner)), None)
    if flops is None:  # no lmforge config selected: compute the shape's FLOPs anyway
        from lmforge.model.gpt import GPTConfig, build_model
        from lmforge.model.presets import get_preset

        flops = build_model(GPTConfig(**{**get_preset(case.preset), "vocab_size": case.vocab_size})).flops_per_token(case.context)

    results: dict[str, Any] = {}
    for name in configs:
        vals = per_round[name]
        med = statistics.median(vals)
        row: dict[str, Any] = {
            "tokens_per_s": med,
            "tokens_per_s_rounds": vals,
            "ms_per_step": 1000.0 * tokens_per_step / med,
            "model_gflops_per_s": med * flops / 1e9,
            "params": sum(p.numel() for p in runners[name].model.parameters()),
        }
        for ref in ("hf-fp32", "hf-bf16", "loop-fp32"):
            if ref in per_round:
                ratios = [a / b for a, b in zip(vals, per_round[ref])]
                row[f"ratio_vs_{ref}"] = statistics.median(ratios)
                row[f"ratio_vs_{ref}_rounds"] = ratios
        if windows[name]:
            # cross-check: the engine's own metrics.jsonl window of each timed fit() call
            row["engine_window_tokens_per_s_median"] = statistics.median(windows[name])
        results[name] = row
    # release the models before the next case
    for r in runners.values():
        if isinstance(r, LmforgeRunner):
            r._tmp.cleanup()
    runners.clear()
    return {
        "title": case.title,
        "shape": {
            "preset": case.preset,
            "vocab_size": case.vocab_size,
            "context": case.context,
            "batch": case.batch,
            "tokens_per_step": tokens_per_step,
            "model_flops_per_token": flops,
            "hf_config_overrides": case.hf_config,
        },
        "schedule": {"initial_warmup_steps": init_warm, "warmup_steps_per_round": round_warm, "steps_per_round": steps, "rounds": rounds},
        "notes": case.notes,
        "results": results,
        "wall_s": time.perf_counter() - t_case,
    }


def probe_rss(case_key: str, name: str, threads: int) -> None:
    """Subprocess entry: build one config, train a few steps, print its memory as JSON."""
    torch.set_num_threads(threads)
    case = CASES[case_key]
    base = rss_mib()
    runner = build_runner(case, name, make_pool(case), threads)
    runner.run(3)
    print(json.dumps({"rss_base_mib": base, "peak_rss_mib": peak_rss_mib()}))


def run_rss_probes(case: Case, configs: list[str], threads: int) -> dict[str, dict[str, float]]:
    out = {}
    for name in configs:
        cmd = [sys.executable, __file__, "--_probe", f"{case.key}:{name}", "--threads", str(threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        try:
            out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            print(f"  rss probe {case.key}:{name} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        else:
            print(f"  peak RSS {case.key}:{name}: {out[name]['peak_rss_mib']:,.0f} MiB", flush=True)
    return out


def fmt_ratio(row: dict[str, Any], ref: str) -> str:
    key = f"ratio_vs_{ref}"
    if key not in row:
        return "-"
    rs = row[f"{key}_rounds"]
    spread = f" ({min(rs):.2f}-{max(rs):.2f})" if len(rs) > 1 else ""
    return f"{row[key]:.2f}x{spread}"


def markdown_table(report: dict[str, Any]) -> str:
    rss = any("peak_rss_mib" in row for c in report["cases"].values() for row in c["results"].values())
    head = ("| case | config | tokens/s (median) | ms/step | model GFLOP/s | vs HF fp32 (min-max) | vs HF bf16 (min-max) "
            "| vs nanoGPT-style loop fp32 (min-max) |")
    sep = "|---|---|---:|---:|---:|---:|---:|---:|"
    if rss:
        head += " peak RSS MiB |"
        sep += "---:|"
    lines = [head, sep]
    for key, c in report["cases"].items():
        for name, row in c["results"].items():
            line = (
                f"| {key} | {name} | {row['tokens_per_s']:,.0f} | {row['ms_per_step']:,.1f} | {row['model_gflops_per_s']:,.1f} | "
                f"{fmt_ratio(row, 'hf-fp32')} | {fmt_ratio(row, 'hf-bf16')} | {fmt_ratio(row, 'loop-fp32')} |"
            )
            if rss:
                line += f" {row['peak_rss_mib']:,.0f} |" if "peak_rss_mib" in row else " - |"
            lines.append(line)
    return "\n".join(lines)


def summary_lines(report: dict[str, Any]) -> list[str]:
    out = []
    for key, c in report["cases"].items():
        res = c["results"]
        lm = {n: r for n, r in res.items() if n.startswith("lmforge")}
        if not lm or "hf-fp32" not in res:
            continue
        best = max(lm, key=lambda n: lm[n]["ratio_vs_hf-fp32"])
        target = {"a": 1.8, "b": 3.0}.get(key)
        r = lm[best]["ratio_vs_hf-fp32"]
        verdict = f" (target >= {target}x: {'met' if r >= target else 'NOT met'})" if target else ""
        extra = f", {lm[best]['ratio_vs_hf-bf16']:.2f}x HF bf16" if "ratio_vs_hf-bf16" in lm[best] else ""
        out.append(f"case {key}: best lmforge config {best} = {r:.2f}x HF fp32{verdict}{extra}")
        if key == "b" and "lmforge-fp32" in lm:
            out.append(f"case b: lmforge-fp32 = {lm['lmforge-fp32']['ratio_vs_hf-fp32']:.2f}x HF fp32")
    return out


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def cpu_model() -> str | None:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", choices=["a", "b", "all"], default="all")
    p.add_argument("--steps", type=int, help="timed steps per config per round (default: a 40, b 2)")
    p.add_argument("--warmup", type=int, help="untimed warm-up steps per config per round (default: a 5, b 0)")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default: a 5, b 3)")
    p.add_argument("--quick", action="store_true", help="tiny step counts: a smoke test, not a measurement")
    p.add_argument("--configs", help="comma-separated subset, e.g. lmforge-bf16,hf-fp32 (hf-fp32 is the ratio base)")
    p.add_argument("--threads", type=int, default=2, help="torch threads for both sides (default 2)")
    p.add_argument("--rss", action="store_true", help="also measure per-config peak RSS, one subprocess per config")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT.relative_to(ROOT)})")
    p.add_argument("--_probe", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    if args._probe:
        case_key, name = args._probe.split(":")
        probe_rss(case_key, name, args.threads)
        return 0

    keys = ["a", "b"] if args.case == "all" else [args.case]
    wanted = args.configs.split(",") if args.configs else None
    report: dict[str, Any] = {
        "benchmark": "train_throughput",
        "quick": args.quick,
        "meta": {
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "git_commit": git_commit(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "cpu": cpu_model(),
            "cpu_count": os.cpu_count(),
            "threads": args.threads,
            "loadavg_start": loadavg(),
            "optimizer": {"name": "torch.optim.AdamW(fused=True)", "lr": LR, "betas": BETAS, "eps": EPS, "weight_decay": WEIGHT_DECAY, "decay_on": "params with dim >= 2", "grad_clip": GRAD_CLIP, "lr_schedule": "constant"},
            "method": (
                "configs interleaved in rounds (rotating order); untimed warm-up steps before each timed block; "
                "lmforge timed by Engine.fit()'s FitResult.train_s, HF by perf_counter around its loop; "
                "tokens/s = median over rounds; ratios = median of per-round ratios"
            ),
        },
        "cases": {},
    }
    load = loadavg()
    if load and load[0] > 0.5 * (os.cpu_count() or 1):
        print(
            f"warning: load average {load} on {os.cpu_count()} CPUs: other jobs are running; with {args.threads} torch"
            " threads per side the timings (small shapes especially) will be noisy and slow. Prefer an idle machine.",
            file=sys.stderr,
        )
    t0 = time.perf_counter()
    for key in keys:
        case = CASES[key]
        configs = [c for c in case.configs if wanted is None or c in wanted]
        if not configs:
            continue
        init_warm, round_warm, steps, rounds = case.quick if args.quick else case.full
        schedule = (
            init_warm,
            round_warm if args.warmup is None else args.warmup,
            steps if args.steps is None else args.steps,
            rounds if args.rounds is None else args.rounds,
        )
        report["cases"][key] = measure_case(case, configs, schedule, args.threads)
        print(f"  case {key} took {report['cases'][key]['wall_s']:.0f}s", flush=True)
        if args.rss:
            for name, mem in run_rss_probes(case, configs, args.threads).items():
                report["cases"][key]["results"][name].update(mem)
    report["meta"]["loadavg_end"] = loadavg()
    report["meta"]["wall_s"] = time.perf_counter() - t0

    print()
    print(markdown_table(report))
    print()
    for line in summary_lines(report):
        print(line)
    for key, c in report["cases"].items():
        for note in c["notes"]:
            print(f"note ({key}): {note}")
    if args.quick:
        print("\n(--quick: a smoke test with tiny step counts; the numbers are not a measurement)")
    print(f"\nwall time {report['meta']['wall_s']:.0f}s; load average {report['meta']['loadavg_start']} -> {report['meta']['loadavg_end']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_results(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
