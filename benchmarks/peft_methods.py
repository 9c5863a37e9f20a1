"""Every fine-tuning method on the same chat SFT task: trainable share, held-out assistant-token
loss before and after, tokens/s and peak memory, one fresh process per method.

    python benchmarks/peft_methods.py --base runs/smollm2-135m --steps 20

Each method runs `lmforge finetune` (recipe smol-lora-sgd with the method swapped in and a
shorter budget); the table goes to stdout and benchmarks/results/peft_methods.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from record import write_results  # noqa: E402  (benchmarks/record.py: the machine with every result)

ROOT = Path(__file__).resolve().parents[1]
METHODS = {
    "full": ["peft.method=none", "train.lr=5e-5"],
    "lora": ["peft.method=lora"],
    "dora": ["peft.method=dora"],
    "qlora-int8": ["peft.method=lora", "peft.quantize_base=int8"],
    "qlora-int4": ["peft.method=lora", "peft.quantize_base=int4"],
    "adalora": ["peft.method=adalora", "peft.r=8", "peft.init_r=16", "train.lr=1e-2"],
    "ia3": ["peft.method=ia3", "train.lr=5e-3"],
    "adapter": ["peft.method=adapter", "peft.bottleneck=64"],
    "prefix": ["peft.method=prefix", "peft.num_virtual_tokens=16", "train.lr=5e-3"],
    "prompt": ["peft.method=prompt", "peft.num_virtual_tokens=16", "train.lr=5e-3"],
}


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--val", type=int, default=16, help="held-out conversations")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/peft_methods.json"))
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.methods.split(","):
            out = Path(tmp) / name
            cmd = [sys.executable, "-m", "lmforge.cli", "finetune", "--recipe", "smol-lora-sgd", f"base={a.base}",
                   f"out_dir={out}", f"train.max_steps={a.steps}", f"sft.max_length={a.max_length}",
                   f"data.max_val_records={a.val}", "log.console=false", "log.tensorboard=false",
                   "train.warmup_steps=3", *METHODS[name]]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if proc.returncode:
                print(f"{name}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            s = json.loads((out / "summary.json").read_text())
            row = {
                "method": name,
                "trainable_percent": s["trainable_percent"],
                "val_loss_before": s["before"]["val_loss"],
                "val_loss_after": s["after"]["val_loss"],
                "tokens_per_s": s["tokens_per_s"],
                "peak_rss_mib": s["peak_rss_mib"],
                "wall_s": s["wall_s"],
            }
            row["change_percent"] = 100 * (row["val_loss_after"] / row["val_loss_before"] - 1)
            rows.append(row)
            print(f"{name:11s} trainable {row['trainable_percent']:7.3f}%  val loss {row['val_loss_before']:.4f} -> "
                  f"{row['val_loss_after']:.4f} ({row['change_percent']:+.1f}%)  {row['tokens_per_s']:7.1f} tok/s  "
                  f"peak RSS {row['peak_rss_mib']:6.0f} MiB  {row['wall_s']:.0f} s", flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    write_results(a.out, {"settings": vars(a), "rows": rows})


if __name__ == "__main__":
    main()
