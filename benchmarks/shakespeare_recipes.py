"""The Tiny Shakespeare pretrain recipes against a plain-PyTorch nanoGPT-style loop, in one script.

Runs the CLI exactly as a user would (one subprocess per run, so wall time includes start-up,
evaluation and checkpointing) on the embedded corpus, and the peer, ``benchmarks/nanogpt_loop.py``
(fp32, 2000 iterations x batch 12 x context 64, nanoGPT's laptop settings), also as its own
process, on the same prepared shards. Rounds interleave the runs (the order flips every round),
so a change of load on the machine hits all of them:

    python benchmarks/shakespeare_recipes.py                       # both recipes + the loop, 1 round
    python benchmarks/shakespeare_recipes.py --rounds 2 --recipes shakespeare-char

Issue 15, acceptance 2: the default recipe reaches val loss <= 1.70 in no more wall time than
the loop's 2000 iterations, and the same-shape recipe (``shakespeare-char-cpu``) trains at
>= 1.3x the loop's tokens/s (both: training steps only, evaluation excluded).

Results go to benchmarks/results/shakespeare_recipes.json (with the machine: capability line
and measured GEMM rates) and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from record import write_results  # noqa: E402  (benchmarks/record.py: the machine with every result)

ROOT = Path(__file__).resolve().parents[1]
LOOP = "nanogpt-loop (fp32)"


def run(cmd: list[str]) -> str:
    return subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.PIPE, text=True).stdout


def run_recipe(recipe: str, work: Path, extra: list[str]) -> dict:
    out_dir = work / recipe
    t0 = time.perf_counter()
    run([sys.executable, "-m", "lmforge.cli", "pretrain", "--recipe", recipe, f"data={work}/data",
         f"out_dir={out_dir}", "overwrite=true", "log.console=false", *extra])
    wall = time.perf_counter() - t0
    s = json.loads((ROOT / out_dir / "summary.json").read_text())
    return {"run": recipe, "precision": s.get("precision"), "steps": s["steps"], "wall_s": round(wall, 1),
            "train_s": round(s["train_s"], 1), "tokens_per_s": round(s["tokens_per_s"]),
            "val_loss": round(s["final"]["val_loss"], 4), "peak_rss_mib": round(s["peak_rss_mib"])}


def run_loop(work: Path, iters: int) -> dict:
    t0 = time.perf_counter()
    out = json.loads(run([sys.executable, str(ROOT / "benchmarks" / "nanogpt_loop.py"), "--data", str(work / "data"),
                          "--iters", str(iters)]).strip().splitlines()[-1])
    wall = time.perf_counter() - t0
    return {"run": LOOP, "precision": "fp32", "steps": out["iters"], "wall_s": round(wall, 1),
            "train_s": round(out["train_s"], 1), "tokens_per_s": round(out["tokens_per_s"]),
            "val_loss": round(out["val_loss"], 4), "threads": out["threads"]}


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="+", default=["shakespeare-char-cpu", "shakespeare-char"])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--loop-iters", type=int, default=2000)
    ap.add_argument("--no-loop", action="store_true", help="the recipes alone")
    ap.add_argument("--work", default="runs/bench-shakespeare")
    ap.add_argument("--out", default="benchmarks/results/shakespeare_recipes.json")
    ap.add_argument("overrides", nargs="*", help="key=value settings for every recipe run (e.g. train.precision=fp32)")
    args = ap.parse_args()

    lm = [sys.executable, "-m", "lmforge.cli"]
    work = Path(args.work)
    run(lm + ["tokenizer", "train", "--recipe", "char", f"out={work}/tok"])
    run(lm + ["data", "prepare", "--recipe", "shakespeare-char", f"tokenizer={work}/tok", f"out={work}/data"])
    names = ([] if args.no_loop else [LOOP]) + list(args.recipes)
    rows = []
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            load_before = os.getloadavg()[0]
            row = run_loop(work, args.loop_iters) if name == LOOP else run_recipe(name, work, args.overrides)
            row["round"] = r
            # the 1-minute load average before and after: a run that others' jobs slowed shows here
            row["load_avg_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
            rows.append(row)
            print(json.dumps(row), flush=True)

    ratios: dict[str, dict] = {}
    if not args.no_loop:
        for name in args.recipes:
            per_round = []
            for r in range(args.rounds):
                mine = next(x for x in rows if x["run"] == name and x["round"] == r)
                peer = next(x for x in rows if x["run"] == LOOP and x["round"] == r)
                per_round.append({"tokens_per_s": mine["tokens_per_s"] / peer["tokens_per_s"],
                                  "wall": mine["wall_s"] / peer["wall_s"]})
            ratios[name] = {k: {"median": statistics.median(p[k] for p in per_round),
                                "rounds": [round(p[k], 3) for p in per_round]} for k in ("tokens_per_s", "wall")}
    print("\n| run | precision | steps | wall s | train s | train tokens/s | val loss |")
    print("|---|---|---|---|---|---|---|")
    for x in rows:
        print(f"| {x['run']} (round {x['round']}) | {x['precision']} | {x['steps']} | {x['wall_s']} | {x['train_s']} "
              f"| {x['tokens_per_s']:,} | {x['val_loss']} |")
    for name, rr in ratios.items():
        print(f"{name} vs the loop: tokens/s x{rr['tokens_per_s']['median']:.2f} {rr['tokens_per_s']['rounds']}, "
              f"wall x{rr['wall']['median']:.2f} {rr['wall']['rounds']}")
    write_results(ROOT / args.out, {"rows": rows, "ratios_vs_loop": ratios, "overrides": args.overrides})


if __name__ == "__main__":
    main()
