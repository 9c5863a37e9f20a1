"""Issue 9, acceptance 1: adversarial (SeqGAN-style) training of a small chat model.

Builds two small chat models on the embedded Schema-Guided Dialogue conversations (one
byte-level BPE tokenizer; pretraining on the ChatML-rendered training conversations, then a
short assistant-only SFT, all through the ordinary stages): ``strong`` (800 + 200 steps), from
which the discriminator starts, and ``weak`` (250 + 20 steps), the generator. Then it runs
``lmforge adversarial`` with ``recipes/adversarial/sgd-small.yaml`` on them and writes
``benchmarks/results/adversarial.json`` (discriminator accuracy, reward, KL and held-out
NLL at the start and end, plus the run's curves and samples).

    python benchmarks/adversarial.py [--work runs/adv-bench] [--skip-base] [key=value ...]

Overrides after the flags refine the adversarial recipe (``train.max_steps=40``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from record import write_results  # noqa: E402  (benchmarks/record.py: the machine with every result)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

TRAIN = ROOT / "data/finetune/sgd_chat_train.jsonl"
VAL = ROOT / "data/finetune/sgd_chat_val.jsonl"


def build_base(work: Path, pretrain_steps: int, sft_steps: int, n_layer: int = 4, n_embd: int = 128) -> Path:
    """tokenizer -> shards -> pretrain -> SFT; returns the SFT run directory. The BPE training
    is deterministic, so every build has the same tokenizer (the run checks it)."""
    from lmforge.config import load_config
    from lmforge.data import DataPrepareConfig, run_prepare
    from lmforge.commands.tokenizer import TokenizerTrainConfig, run_train
    from lmforge.tokenizer.chat import ChatTemplate
    from lmforge.train.finetune import FinetuneConfig, run_finetune
    from lmforge.train.pretrain import PretrainConfig, run_pretrain

    work.mkdir(parents=True, exist_ok=True)
    template = ChatTemplate()  # ChatML: the template of a checkpoint without one
    corpus = work / "sgd_chatml.jsonl"
    with corpus.open("w", encoding="utf-8") as f:
        for line in TRAIN.read_text(encoding="utf-8").splitlines():
            f.write(json.dumps({"text": template.render(json.loads(line)["messages"])}) + "\n")
    run_train(TokenizerTrainConfig(inputs=[str(corpus)], kind="bpe", vocab_size=2048, out=str(work / "tok")))
    run_prepare(DataPrepareConfig(inputs=[str(corpus)], tokenizer=str(work / "tok"), out=str(work / "data"),
                                  val_fraction=0.05, num_proc=1))
    pre = load_config(PretrainConfig, "pretrain", None, [
        f"data={work / 'data'}", f"out_dir={work / 'pretrain'}", "overwrite=true",
        f"model.n_layer={n_layer}", "model.n_head=4", f"model.n_embd={n_embd}", "model.context_length=128",
        f"train.max_steps={pretrain_steps}", "train.micro_batch_size=16", "train.lr=3e-3", "train.warmup_steps=50",
        "train.beta2=0.99", "train.eval_interval=0", "train.eval_tokens=8192", "train.precision=fp32", "train.threads=1",
        "train.log_interval=25", "log.tensorboard=false",
    ])
    run_pretrain(pre)
    sft = load_config(FinetuneConfig, "finetune", None, [
        f"base={work / 'pretrain'}", f"out_dir={work / 'sft'}", "overwrite=true", "objective=sft",
        f"data.train=[{TRAIN}]", f"data.val=[{VAL}]", "data.max_val_records=50", "sft.max_length=128",
        f"train.max_steps={sft_steps}", "train.micro_batch_size=8", "train.lr=1e-3", "train.warmup_steps=10",
        "train.eval_interval=0", "train.precision=fp32", "train.threads=1", "log.tensorboard=false",
    ])
    run_finetune(sft)
    return work / "sft"


def run_adversarial_benchmark(work: Path, base_s: float, overrides: list[str], out_json: Path,
                              recipe: str = "sgd-small", strong: str = "strong", weak: str = "weak") -> dict:
    from lmforge.config import load_config
    from lmforge.train.adversarial import AdversarialRunConfig, run_adversarial

    cfg = load_config(AdversarialRunConfig, "adversarial", recipe, [
        f"base={work / weak / 'sft'}", f"discriminator={work / strong / 'sft'}", f"out_dir={work / 'adversarial'}",
        "overwrite=true",
        f"data.train=[{TRAIN}]", f"data.val=[{VAL}]", *overrides,
    ])
    summary = run_adversarial(cfg)
    run = Path(cfg.out_dir)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    before, after = evals[0], evals[-1]
    keys = ("disc_acc", "reward_mean", "kl", "val_nll", "distinct_1", "distinct_2", "reply_tokens")
    nll_rise = after["val_nll"] / before["val_nll"] - 1
    result = {
        "what": "adversarial (SeqGAN-style, GRPO group advantage) training of a small chat model on the SGD conversations",
        "command": "python benchmarks/adversarial.py " + " ".join(sys.argv[1:]),
        "recipe": f"recipes/adversarial/{recipe}.yaml",
        "overrides": overrides,
        "base_build_s": round(base_s, 1),
        "adversarial_wall_s": round(summary["wall_s"], 1),
        "steps": summary["steps"],
        "before": {k: before[k] for k in keys if k in before},
        "after": {k: after[k] for k in keys if k in after},
        "held_out_nll_change": nll_rise,
        "evals": [{"step": r["step"], **{k: r[k] for k in keys if k in r}} for r in evals],
        "target": {"disc_acc_start_ge_0.90": before["disc_acc"] >= 0.90, "disc_acc_end_le_0.65": after["disc_acc"] <= 0.65,
                   "nll_rise_le_5pct": nll_rise <= 0.05},
        "curves": str(run / "adversarial_curves.png"),
        "samples": str(run / "samples.md"),
        "settings": summary.get("trainable_params") and {"generator_trainable_params": summary["trainable_params"]},
        "note": "2 shared CPU cores, other jobs running: wall times are indicative only",
    }
    out_json.parent.mkdir(parents=True, exist_ok=True)
    write_results(out_json, result)
    print(json.dumps({k: result[k] for k in ("before", "after", "held_out_nll_change", "target")}, indent=2))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/adv-bench")
    ap.add_argument("--skip-base", action="store_true", help="reuse WORK/strong/sft and WORK/weak/sft from an earlier run")
    ap.add_argument("--base-only", action="store_true", help="build the two chat models and stop")
    ap.add_argument("--pretrain-steps", type=int, default=800)
    ap.add_argument("--sft-steps", type=int, default=200)
    ap.add_argument("--weak-pretrain-steps", type=int, default=250, help="the generator's pretraining")
    ap.add_argument("--weak-sft-steps", type=int, default=20)
    ap.add_argument("--disc-layers", type=int, default=4, help="the discriminator model's depth")
    ap.add_argument("--disc-embd", type=int, default=128, help="the discriminator model's width")
    ap.add_argument("--strong-dir", default="strong", help="WORK/<this> holds the discriminator's model")
    ap.add_argument("--weak-dir", default="weak", help="WORK/<this> holds the generator's model")
    ap.add_argument("--recipe", default="sgd-small")
    ap.add_argument("--skip-weak", action="store_true", help="reuse WORK/weak/sft, build only the discriminator's model")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/adversarial.json"))
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    work = Path(args.work)
    t0 = time.perf_counter()
    if not args.skip_base:
        # the discriminator starts from the longer-trained model, the generator is the weaker one
        build_base(work / args.strong_dir, args.pretrain_steps, args.sft_steps, args.disc_layers, args.disc_embd)
        if not args.skip_weak:
            build_base(work / args.weak_dir, args.weak_pretrain_steps, args.weak_sft_steps)
    base_s = time.perf_counter() - t0
    if args.base_only:
        print(f"chat models: {work / 'strong/sft'}, {work / 'weak/sft'} ({base_s:.0f} s)")
        return
    run_adversarial_benchmark(work, base_s, args.overrides, Path(args.out), args.recipe, args.strong_dir, args.weak_dir)


if __name__ == "__main__":
    main()
