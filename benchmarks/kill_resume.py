#!/usr/bin/env python
"""kill -9 during training, then resume: bit-identical weights, each step logged once, nothing left over.

A tiny pretraining run (2 layers, 32 wide, char-level Tiny Shakespeare, 20 steps, a checkpoint
every 5 steps keeping 2, evaluation every 5, every step logged) is run once straight through
(the reference), then once per kill point: the run is killed with SIGKILL at that point, then
started again (``--resume`` when a checkpoint exists, else afresh) and run to the end. Each
restarted run must give:

- final weights (and optimizer state) bit-identical to the reference;
- ``metrics.jsonl`` with every train step 1..20 exactly once, and every evaluation once;
- no ``.tmp-*`` / ``.old-*`` folder under ``checkpoints/`` once it has started.

Kill points are exact, not timed: the killed run is this script in ``child`` mode, which
patches the function at the point (after ``model.safetensors`` of the Nth save is written,
before the staged folder is renamed, in the middle of a ``metrics.jsonl`` line, at the start
of step N...) to send itself SIGKILL there; two more points kill at a seeded random time within
the training loop (measured from when ``metrics.jsonl`` appears).

    python benchmarks/kill_resume.py                  # the 16 points, ~3 min on a 2-core CPU
    python benchmarks/kill_resume.py --points save-optimizer@1,log-torn@7   # a subset

Results: ``benchmarks/results/kill_resume.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "kill_resume.json"
STEPS, CKPT_EVERY = 20, 5
RUN = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.context_length=16", "train.micro_batch_size=8",
       "train.log_interval=1", "train.warmup_steps=2", f"train.eval_interval={CKPT_EVERY}", "train.eval_tokens=512",
       "train.threads=1", "train.precision=fp32", "train.device=cpu", f"train.max_steps={STEPS}",
       f"train.ckpt_interval={CKPT_EVERY}", "train.keep_checkpoints=2", "log.console=false", "log.tensorboard=false",
       "log.report=false"]
POINTS = ["save-model@1", "save-model@3", "save-optimizer@2", "save-state@1", "save-rename@2", "save-rename@4",
          "after-save@1", "after-save@3", "prune@3", "log-torn@7", "log-torn@13", "step@4", "step@11", "eval@10",
          "random@1", "random@2"]


# ---- the killed run: patches one function to SIGKILL the process there ------------------------
def _die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install_kill(point: str, at: int) -> None:
    import shutil

    from lmforge.checkpoint import weights
    from lmforge.runs import tracking
    from lmforge.train import engine, state

    saves = {"n": 0}
    real_save = engine.Engine.save

    def counting_save(self):
        saves["n"] += 1
        out = real_save(self)
        if point == "after-save" and saves["n"] == at:
            _die()
        return out

    engine.Engine.save = counting_save
    if point in ("save-model", "save-optimizer"):
        # model.safetensors is written by lmforge.checkpoint.weights, optimizer.safetensors by lmforge.train.state
        writer = weights if point == "save-model" else state
        real_file = writer.save_safetensors
        wanted = "model.safetensors" if point == "save-model" else "optimizer.safetensors"

        def save_file(tensors, filename, *a, **k):
            out = real_file(tensors, filename, *a, **k)
            if saves["n"] == at and str(filename).endswith(wanted):
                _die()
            return out

        writer.save_safetensors = save_file
    elif point == "save-state":
        real_json = state.atomic_write_json  # trainer_state.json is lmforge.train.state's

        def write_json(path, obj):
            if saves["n"] == at and str(path).endswith("trainer_state.json"):
                Path(path).write_text(json.dumps(obj)[:40])  # torn, then killed
                _die()
            return real_json(path, obj)

        state.atomic_write_json = write_json
    elif point == "save-rename":
        real_replace = os.replace

        def replace(src, dst):
            if saves["n"] == at and Path(src).name.startswith(".tmp-step_"):
                _die()
            return real_replace(src, dst)

        os.replace = replace
    elif point == "prune":
        real_rmtree = shutil.rmtree

        def rmtree(path, *a, **k):
            p = Path(path)
            if saves["n"] == at and p.name.startswith("step_") and p.is_dir():
                (p / "model.safetensors").unlink(missing_ok=True)  # half removed, then killed
                _die()
            return real_rmtree(path, *a, **k)

        shutil.rmtree = rmtree
    elif point == "log-torn":
        real_log = tracking.RunLogger.log

        def log(self, step, kind, metrics):
            if step == at and kind == "train" and self._jsonl is not None:
                self._jsonl.write(json.dumps({"step": step, "kind": kind, **metrics})[:25])
                self._jsonl.flush()
                _die()
            return real_log(self, step, kind, metrics)

        tracking.RunLogger.log = log
    elif point == "step":
        real_mult = engine.Engine._lr_mult

        def lr_mult(self, step):
            if step == at - 1:  # the start of step `at` (0-based step at-1)
                _die()
            return real_mult(self, step)

        engine.Engine._lr_mult = lr_mult
    elif point == "eval":
        real_eval = engine.Engine.evaluate

        def evaluate(self):
            if self.step == at:
                _die()
            return real_eval(self)

        engine.Engine.evaluate = evaluate


def child(argv: list[str]) -> int:
    point, at = argv[0], int(argv[1])
    install_kill(point, at)
    from lmforge.cli import main

    return main(argv[2:])


# ---- the harness ------------------------------------------------------------------------------
def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = "1"
    return env


def pretrain(data: Path, out: Path, *extra: str, kill: str | None = None, delay: float | None = None,
             resume: bool = False) -> subprocess.CompletedProcess:
    args = ["pretrain", *(["--resume"] if resume else []), f"data={data}", f"out_dir={out}", *RUN, *extra]
    if kill is not None:
        point, _, at = kill.partition("@")
        cmd = [sys.executable, __file__, "child", point, at, *args]
    else:
        cmd = [sys.executable, "-m", "lmforge.cli", *args]
    if delay is None:
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
        done.seconds = time.perf_counter() - t0
        return done
    # a timed kill: `delay` seconds after training began (metrics.jsonl appeared)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    while not (out / "metrics.jsonl").exists() and proc.poll() is None:
        time.sleep(0.001)
    time.sleep(delay)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = subprocess.CompletedProcess(cmd, proc.returncode, "", "")
    done.kill_delay = delay
    return done


def final_tensors(out: Path) -> dict:
    from safetensors.torch import load_file

    final = out / "checkpoints" / f"step_{STEPS:07d}"
    return {**load_file(str(final / "model.safetensors")), **load_file(str(final / "optimizer.safetensors"))}


def leftovers(out: Path) -> list[str]:
    ck = out / "checkpoints"
    return sorted(p.name for p in ck.iterdir() if p.name.startswith(".")) if ck.is_dir() else []


def check_run(out: Path, reference: dict) -> dict:
    import torch

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r["step"] for r in rows if r["kind"] == "train"]
    evals = [r["step"] for r in rows if r["kind"] == "eval"]
    got = final_tensors(out)
    reference = {k: v for k, v in reference.items() if k != "train_window_s"}
    identical = set(got) == set(reference) and all(torch.equal(got[k], reference[k]) for k in reference)
    return {
        "bit_identical": identical,
        "train_steps_once": train == list(range(1, STEPS + 1)),
        "evals_once": evals == list(range(CKPT_EVERY, STEPS + 1, CKPT_EVERY)),
        "leftovers": leftovers(out),
    }


def kill_and_resume(data: Path, root: Path, point: str, reference: dict, seed: int = 0) -> dict:
    """One kill point: the killed run, the restart, and the checks."""
    out = root / point.replace("@", "-")
    name, _, at = point.partition("@")
    t0 = time.perf_counter()
    if name == "random":
        rng = random.Random(seed * 1000 + int(at))
        first = pretrain(data, out, delay=rng.uniform(0.0, reference["train_window_s"]))
    else:
        first = pretrain(data, out, kill=point)
    killed = first.returncode == -signal.SIGKILL
    before = leftovers(out)
    resumable = (out / "checkpoints").is_dir() and any(p.name.startswith("step_") for p in (out / "checkpoints").iterdir())
    second = pretrain(data, out, resume=resumable)
    if second.returncode != 0:
        return {"point": point, "killed": killed, "ok": False, "error": second.stderr.strip().splitlines()[-1:]}
    kill_at = f"{first.kill_delay:.3f} s into training" if hasattr(first, "kill_delay") else "exact"
    result = {"point": point, "killed": killed, "kill_at": kill_at, "resumed": resumable, "leftovers_before_restart": before,
              **check_run(out, reference), "seconds": round(time.perf_counter() - t0, 1)}
    result["ok"] = result["bit_identical"] and result["train_steps_once"] and result["evals_once"] \
        and not result["leftovers"]
    return result


def prepare_data(root: Path) -> Path:
    sys.path.insert(0, str(ROOT / "src"))
    from lmforge.data import DataPrepareConfig, run_prepare
    from lmforge.paths import embedded_data_dir
    from lmforge.commands.tokenizer import TokenizerTrainConfig, run_train

    corpus = root / "corpus.txt"
    corpus.write_text((embedded_data_dir() / "tinyshakespeare.txt").read_text(encoding="utf-8")[:20_000])
    run_train(TokenizerTrainConfig(inputs=[str(corpus)], kind="char", out=str(root / "tok")), verbose=False)
    run_prepare(DataPrepareConfig(inputs=[str(corpus)], tokenizer=str(root / "tok"), out=str(root / "data"),
                                  val_split="tail", add_eot=False, num_proc=1), verbose=False)
    return root / "data"


def train_window(data: Path, out: Path) -> float:
    """Seconds from the first metrics.jsonl row to the end of a run (where timed kills land)."""
    proc = subprocess.Popen([sys.executable, "-m", "lmforge.cli", "pretrain", f"data={data}", f"out_dir={out}", *RUN],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    while not (out / "metrics.jsonl").exists() and proc.poll() is None:
        time.sleep(0.001)
    t0 = time.perf_counter()
    proc.wait()
    return time.perf_counter() - t0


def run(points: list[str], data: Path, root: Path, log=print) -> dict:
    ref = pretrain(data, root / "reference")
    if ref.returncode != 0:
        raise SystemExit(f"the reference run failed: {ref.stderr}")
    reference = final_tensors(root / "reference")
    window = train_window(data, root / "window") if any(p.startswith("random") for p in points) else 0.0
    results = []
    for p in points:
        r = kill_and_resume(data, root, p, {**reference, "train_window_s": window})
        log(json.dumps(r))
        results.append(r)
    return {"points": len(results), "held": sum(r["ok"] for r in results), "killed": sum(r["killed"] for r in results),
            "train_window_s": round(window, 3), "results": results}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", default=",".join(POINTS))
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = prepare_data(root)
        t0 = time.perf_counter()
        report = run(args.points.split(","), data, root)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"{report['held']}/{report['points']} kill points held ({report['killed']} runs killed) -> {args.out}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        sys.path.insert(0, str(ROOT / "src"))
        sys.exit(child(sys.argv[2:]))
    main()
