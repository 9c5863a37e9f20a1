"""Wall time, tokens/s, peak RSS and val loss of the Tiny Shakespeare pretrain recipes.

Runs the CLI exactly as a user would (one subprocess per recipe, so wall time includes
start-up, evaluation and checkpointing) on the embedded corpus:

    python benchmarks/shakespeare_recipes.py                       # both recipes
    python benchmarks/shakespeare_recipes.py --recipes shakespeare-char

Results go to benchmarks/results/shakespeare_recipes.json and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="+", default=["shakespeare-char-cpu", "shakespeare-char"])
    ap.add_argument("--work", default="runs/bench-shakespeare")
    ap.add_argument("--out", default="benchmarks/results/shakespeare_recipes.json")
    args = ap.parse_args()

    lm = [sys.executable, "-m", "lmforge.cli"]
    work = Path(args.work)
    run(lm + ["tokenizer", "train", "--recipe", "char", f"out={work}/tok"])
    run(lm + ["data", "prepare", "--recipe", "shakespeare-char", f"tokenizer={work}/tok", f"out={work}/data"])
    rows = []
    for recipe in args.recipes:
        out_dir = work / recipe
        t0 = time.perf_counter()
        run(
            lm
            + ["pretrain", "--recipe", recipe, f"data={work}/data", f"out_dir={out_dir}", "overwrite=true"]
            + ["log.console=false"]
        )
        wall = time.perf_counter() - t0
        summary = json.loads((ROOT / out_dir / "summary.json").read_text())
        rows.append(
            {
                "recipe": recipe,
                "wall_s": round(wall, 1),
                "train_s": round(summary["train_s"], 1),
                "tokens_per_s": round(summary["tokens_per_s"]),
                "val_loss": round(summary["final"]["val_loss"], 4),
                "val_bpb": round(summary["final"]["val_bpb"], 4),
                "peak_rss_mib": round(summary["peak_rss_mib"]),
            }
        )
    print("| recipe | wall s | train s | tokens/s | val loss | val bpb | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['recipe']} | {r['wall_s']} | {r['train_s']} | {r['tokens_per_s']:,} | {r['val_loss']} "
            f"| {r['val_bpb']} | {r['peak_rss_mib']} |"
        )
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
