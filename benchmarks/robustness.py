"""Noise-augmented training against clean training: accuracy on perturbed inputs.

Task: the embedded SGD domain classification (15 classes; data/finetune/sgd_domain_*.jsonl).
Base: the character model of benchmarks/continual.py continued on SGD chat text without
replay (runs/bench-continual/new-none; run that benchmark first). Two fine-tunings with a
classification head, same steps, batch and seed:

- clean: the 756 training texts;
- noisy: the output of `lmforge data augment` on them (each original plus one copy with word
  deletion at --train-rate), i.e. noise-augmented training through the existing data stage.

Both are evaluated on the test split (413 texts) perturbed by word deletion and by character
typos at several rates (lmforge.eval.robustness.evaluate_robustness).

    python benchmarks/robustness.py

Writes benchmarks/results/robustness.json and benchmarks/results/robustness_{delete,typo}.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from record import write_results  # noqa: E402  (benchmarks/record.py: the machine with every result)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
LABELS = ["Alarm", "Buses", "Events", "Flights", "Homes", "Hotels", "Media", "Movies", "Music", "RentalCars",
          "Restaurants", "RideSharing", "Services", "Travel", "Weather"]


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="runs/bench-continual/new-none")
    ap.add_argument("--work", default="runs/bench-robustness")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--train-rate", type=float, default=0.2)
    ap.add_argument("--rates", default="0,0.1,0.2,0.3,0.5")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    from lmforge.config import load_config
    from lmforge.data.augment import AugmentConfig, run_augment
    from lmforge.eval.robustness import evaluate_robustness, plot_robustness
    from lmforge.paths import embedded_data_dir
    from lmforge.train.finetune import FinetuneConfig, run_finetune

    if not Path(args.base).exists():
        raise SystemExit(f"{args.base} not found: run `python benchmarks/continual.py` first (or pass --base)")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    train = embedded_data_dir() / "finetune" / "sgd_domain_train.jsonl"
    noisy_train = work / "sgd_domain_train.noisy.jsonl"
    aug = run_augment(AugmentConfig(inputs=[str(train)], out=str(noisy_train), copies=1, keep_original=True,
                                    delete_prob=args.train_rate, seed=0), verbose=False)
    rates = [float(x) for x in args.rates.split(",")]
    results: dict[str, dict] = {}
    runs = {}
    for name, data in (("clean", train), ("noise-augmented", noisy_train)):
        out = work / name
        s = run_finetune(load_config(FinetuneConfig, "finetune", None, [
            f"base={args.base}", f"out_dir={out}", "objective=classify", f"data.train=[{data}]",
            f"data.val=[{embedded_data_dir() / 'finetune' / 'sgd_domain_test.jsonl'}]",
            "data.labels=[" + ",".join(LABELS) + "]",
            f"train.max_steps={args.steps}", "train.micro_batch_size=16", "train.lr=1e-3", "train.warmup_steps=20",
            "train.eval_interval=0", f"train.threads={args.threads}", "train.precision=fp32", "log.tensorboard=false",
            "log.console=false", "overwrite=true",
        ]))
        runs[name] = {"train_examples": s["data"]["train"]["kept"], "held_out_accuracy": s["classification"]["accuracy"]}
        for kind in ("delete", "typo"):
            r = evaluate_robustness(out, task="sgd-domain", method="head", kind=kind, rates=rates, seed=1)
            results.setdefault(kind, {})[name] = r
    RESULTS.mkdir(parents=True, exist_ok=True)
    for kind, by_model in results.items():
        plot_robustness(by_model, RESULTS / f"robustness_{kind}.png")
    summary = {
        "command": f"python benchmarks/robustness.py --steps {args.steps} --train-rate {args.train_rate} --rates {args.rates}",
        "task": "sgd-domain (756 train / 413 test, 15 classes), classification head, full fine-tuning",
        "base": args.base,
        "augment": {"delete_prob": args.train_rate, "copies": 1, "keep_original": True, "counts": aug.get("counts")},
        "runs": runs,
        "eval_seed": 1,
        "results": {kind: {name: [{k: row[k] for k in ("rate", "accuracy", "macro_f1")} for row in r["rows"]]
                           for name, r in by_model.items()} for kind, by_model in results.items()},
    }
    write_results(RESULTS / "robustness.json", summary)
    print(json.dumps(summary["results"], indent=2))


if __name__ == "__main__":
    main()
