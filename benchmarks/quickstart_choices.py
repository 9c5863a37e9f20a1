"""The quickstart's training choices at equal time: full fine-tuning or LoRA, with or without
continued pretraining first, each given the same seconds of training on the same machine.

The data (the Reddit dump through reddit/clean/pii/dedup), the held-out set and the SmolLM2 base
are prepared once in ``--work``; each variant then trains for ``--seconds`` (``train.max_minutes``,
steps sized from the measured speed) and is evaluated as the quickstart does (held-out assistant
loss, greedy replies). One variant a call, so each runs alone under the CPU lock:

    flock -x /work/cpu.lock python benchmarks/quickstart_choices.py --variant full --seconds 300
    flock -x /work/cpu.lock python benchmarks/quickstart_choices.py --variant lora --seconds 300
    flock -x /work/cpu.lock python benchmarks/quickstart_choices.py --variant cpt30 --seconds 300

Results accumulate in ``benchmarks/results/quickstart_choices.json`` (with the machine's
capability line; ``--tag`` names a run, e.g. ``avx2`` under the emulation).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from record import machine  # noqa: E402  (benchmarks/record.py: the machine with every result)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "quickstart_choices.json"
VARIANTS = {
    "full": {"sft": ["peft.method=none"], "cpt_share": 0.0},
    "lora": {"sft": ["peft.method=lora", "peft.r=16", "peft.alpha=32", "peft.target_modules=[all-linear]",
                     "train.lr=1e-3"], "cpt_share": 0.0},
    "cpt30": {"sft": ["peft.method=none"], "cpt_share": 0.3},
}


def prepare(work: Path) -> dict:
    """Data, held-out task, base and the base's evaluation, once."""
    from lmforge.eval.run import EvalOptions, run_eval
    from lmforge.io.base_model import resolve_base
    from lmforge.quickstart import QuickstartConfig, build_data, heldout_task

    done = work / "prepared.json"
    if done.is_file():
        return json.loads(done.read_text())
    data, heldout, sft_val, _ = build_data(work, QuickstartConfig(heldout=20), verbose=False)
    task = heldout_task(heldout)
    base, _ = resolve_base("smollm2", work / "base")
    before = run_eval([str(base)], [str(task)], EvalOptions(batch_size=20), work / "eval-before")
    info = {"train": str(data.train), "val": str(sft_val), "task": str(task), "base": str(base),
            "before": before["rows"][0]["metrics"]}
    done.write_text(json.dumps(info, indent=2))
    return info


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", choices=list(VARIANTS), required=True)
    ap.add_argument("--seconds", type=float, default=300.0, help="training seconds of every variant (default 300)")
    ap.add_argument("--work", default="runs/bench-quickstart-choices")
    ap.add_argument("--tag", default="native", help="names the machine setting in the results (native, avx2)")
    args = ap.parse_args()

    from lmforge import hardware
    from lmforge.eval.run import EvalOptions, run_eval
    from lmforge.quickstart import PRETRAINED_SFT_RECIPE, finetune_stage

    work = Path(args.work)
    info = prepare(work)
    variant = VARIANTS[args.variant]
    run = work / f"{args.tag}-{args.variant}"
    t0 = time.perf_counter()
    base = Path(info["base"])
    cpt = None
    if variant["cpt_share"]:
        cpt = finetune_stage(run / "cpt", base, Path(info["train"]), Path(info["val"]),
                             variant["cpt_share"] * args.seconds, recipe=PRETRAINED_SFT_RECIPE,
                             overrides=variant["sft"], cpt=True)
        base = Path(cpt["checkpoint"])
    sft = finetune_stage(run / "chat", base, Path(info["train"]), Path(info["val"]),
                         (1 - variant["cpt_share"]) * args.seconds, recipe=PRETRAINED_SFT_RECIPE,
                         overrides=variant["sft"])
    train_s = time.perf_counter() - t0
    after = run_eval([str(run / "chat")], [info["task"]], EvalOptions(batch_size=20), run / "eval-after")
    m = after["rows"][0]["metrics"]
    caps = hardware.probe()
    record = {
        "variant": args.variant, "tag": args.tag, "seconds_budget": args.seconds, "train_wall_s": round(train_s, 1),
        "machine": f"{caps.cpu_model}, torch capability {caps.torch_capability}, {caps.cores} cores",
        "precision": hardware.resolve_precision("auto", "cpu"), "date": time.strftime("%Y-%m-%d %H:%M"),
        "sft_steps": sft["steps"], "sft_tokens_per_s": sft["tokens_per_s"], "cpt_steps": cpt["steps"] if cpt else 0,
        "before": {k: info["before"][k] for k in ("loss", "identical_replies", "ended_with_eot", "reply_tokens_mean")},
        "after": {k: m[k] for k in ("loss", "identical_replies", "ended_with_eot", "reply_tokens_mean", "distinct_2")},
        "loss_reduction": 1 - m["loss"] / info["before"]["loss"],
    }
    record["machine_record"] = machine()  # each row its own machine: the variants run at different times
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else []
    results = [r for r in results if not (r["variant"] == args.variant and r["tag"] == args.tag)] + [record]
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
