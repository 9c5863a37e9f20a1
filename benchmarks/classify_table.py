"""One table: a base model on an embedded classification task zero-shot, k-shot (prompting,
log-likelihood of each label) and fine-tuned (LoRA + a classification head), all scored on
the task's held-out test split.

    python benchmarks/classify_table.py --base runs/smollm2-135m --task sgd-domain

Writes benchmarks/results/classify_<task>.json and prints a markdown table (kept in BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from record import write_results  # noqa: E402  (benchmarks/record.py: the machine with every result)

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True)
    ap.add_argument("--task", default="sgd-domain")
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--recipe", default="smol-sgd-domain", help="finetune recipe of the fine-tuned row")
    ap.add_argument("--steps", type=int, default=None, help="override the recipe's train.max_steps")
    ap.add_argument("--chat", action="store_true", help="wrap prompts in the model's chat template")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    import torch

    from lmforge.config import load_config
    from lmforge.data.tasks import load_task
    from lmforge.eval.prompting import evaluate_task_by_prompting
    from lmforge.tokenizer import Tokenizer
    from lmforge.tokenizer.chat import ChatTemplate
    from lmforge.checkpoint import load_model, resolve_checkpoint
    from lmforge.train.finetune import FinetuneConfig, run_finetune

    base = resolve_checkpoint(a.base)
    task = load_task(a.task)
    tok = Tokenizer.from_file(base / "tokenizer.json")
    template = ChatTemplate.from_checkpoint(base) if a.chat else None
    model, _ = load_model(base)
    model.eval()
    rows = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for k in (0, a.shots):
            rep = evaluate_task_by_prompting(model, tok, task, k=k, seed=a.seed, chat_template=template)
            rows.append({"setting": "zero-shot" if k == 0 else f"{k}-shot", "accuracy": rep["accuracy"],
                         "macro_f1": rep["macro_f1"], "seconds": rep["seconds"]})
            print(rows[-1], flush=True)
    del model
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"base={base}", f"out_dir={tmp}/ft", f"data.task={a.task}", "log.console=false", "log.tensorboard=false"]
        if a.steps:
            overrides.append(f"train.max_steps={a.steps}")
        cfg = load_config(FinetuneConfig, "finetune", a.recipe, overrides)
        s = run_finetune(cfg)
        c = s["classification"]
        rows.append({"setting": f"fine-tuned ({s['method']}, {s['steps']} steps)", "accuracy": c["accuracy"],
                     "macro_f1": c["macro_f1"], "seconds": s["wall_s"]})
    few = next(r for r in rows if r["setting"].endswith("-shot") and r["setting"] != "zero-shot")
    gain = 100 * (rows[-1]["macro_f1"] - few["macro_f1"])
    print(f"\n| {task.name} ({len(task.labels)} classes, test split) | accuracy | macro-F1 | seconds |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {100 * r['accuracy']:.1f} | {100 * r['macro_f1']:.1f} | {r['seconds']:.0f} |")
    print(f"\nfine-tuned - {few['setting']}: {gain:+.1f} macro-F1 points")
    out = Path(a.out or ROOT / f"benchmarks/results/classify_{task.name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_results(out, {"task": task.name, "base": str(base), "rows": rows, "finetuned_minus_fewshot_f1_points": gain})


if __name__ == "__main__":
    main()
