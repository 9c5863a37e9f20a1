"""Continual learning: how much of the old domain a model forgets when training continues on a
new one, without and with replay (and with L2-to-start / EWC).

Old domain: Tiny Shakespeare. New domain: the embedded Schema-Guided Dialogue chats
(data/finetune/sgd_chat_{train,val}.jsonl) rendered as plain text ("User: ...", "Assistant:
..."). One character tokenizer covers both. A 4x128 model (the shakespeare-char recipe's shape)
is pretrained on the old data, then training continues on the new data from that checkpoint
(`init_from`) for the same number of steps in each variant; every variant logs the old and
the new held-out loss during training.

    python benchmarks/continual.py            # ~15-30 min on 2 busy CPU cores

Writes benchmarks/results/continual.json and benchmarks/results/continual.png. The "rise
ratio" of a variant is (old loss after - old loss before) / the same rise without replay.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from record import write_results  # noqa: E402  (benchmarks/record.py: the machine with every result)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def render_chats(src: list[Path], out: Path) -> Path:
    docs = []
    for path in src:
        for line in path.read_text(encoding="utf-8").splitlines():
            messages = json.loads(line)["messages"]
            docs.append("\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages))
    out.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return out


def read_evals(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "eval"]


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="runs/bench-continual")
    ap.add_argument("--old-steps", type=int, default=600)
    ap.add_argument("--new-steps", type=int, default=300)
    ap.add_argument("--replay-ratio", type=float, default=0.25)
    ap.add_argument("--l2", type=float, default=0.01)
    ap.add_argument("--ewc", type=float, default=1000.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variants", default="none,replay,l2,ewc")
    args = ap.parse_args()

    from lmforge.config import load_config
    from lmforge.data import DataPrepareConfig, run_prepare
    from lmforge.paths import embedded_data_dir
    from lmforge.commands.tokenizer import TokenizerTrainConfig, run_train
    from lmforge.train.pretrain import PretrainConfig, run_pretrain

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = embedded_data_dir()
    old_txt = data / "tinyshakespeare.txt"
    new_txt = render_chats([data / "finetune" / "sgd_chat_train.jsonl", data / "finetune" / "sgd_chat_val.jsonl"],
                           work / "sgd_chat.txt")
    run_train(TokenizerTrainConfig(inputs=[str(old_txt), str(new_txt)], kind="char", out=str(work / "tok")), verbose=False)
    for name, src in (("old", old_txt), ("new", new_txt)):
        run_prepare(DataPrepareConfig(inputs=[str(src)], tokenizer=str(work / "tok"), out=str(work / name),
                                      val_split="tail", val_fraction=0.1, num_proc=1), verbose=False)

    common = [
        "model.preset=shakespeare-char", "model.pos_embedding=rope", "model.norm=rmsnorm", "model.mlp=relu2",
        "model.dropout=0.0", "train.micro_batch_size=24", "train.optimizer=muon", "train.lr=5e-3",
        "train.muon_lr=5e-3", "train.beta2=0.99", "train.precision=bf16", "train.eval_tokens=32768",
        f"train.threads={args.threads}", "train.log_interval=25", "log.tensorboard=false", "overwrite=true",
    ]
    t0 = time.perf_counter()
    old_run = work / "old-model"
    run_pretrain(load_config(PretrainConfig, "pretrain", None, [
        *common, f"data={work / 'old'}", f"out_dir={old_run}", f"train.max_steps={args.old_steps}",
        "train.warmup_steps=50", f"train.eval_interval={args.old_steps}",
    ]))
    old_s = time.perf_counter() - t0

    variants = {
        "none": [],
        "replay": [f"continual.replay_ratio={args.replay_ratio}"],
        "l2": [f"continual.l2={args.l2}"],
        "ewc": [f"continual.ewc={args.ewc}", "continual.ewc_samples=64"],
    }
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    results: dict[str, dict] = {}
    for name in chosen:
        run = work / f"new-{name}"
        t = time.perf_counter()
        run_pretrain(load_config(PretrainConfig, "pretrain", None, [
            *common, f"data={work / 'new'}", f"out_dir={run}", f"init_from={old_run}",
            f"continual.replay_data={work / 'old'}", *variants[name], f"train.max_steps={args.new_steps}",
            "train.warmup_steps=20", "train.eval_at_start=true", f"train.eval_interval={max(1, args.new_steps // 6)}",
        ]))
        evals = read_evals(run)
        first, last = evals[0], evals[-1]
        results[name] = {
            "settings": variants[name],
            "old_loss_before": first["old_val_loss"],
            "old_loss_after": last["old_val_loss"],
            "new_loss_before": first["val_loss"],
            "new_loss_after": last["val_loss"],
            "old_rise": last["old_val_loss"] - first["old_val_loss"],
            "curve": [{"step": e["step"], "old_val_loss": e["old_val_loss"], "val_loss": e["val_loss"]} for e in evals],
            "wall_s": round(time.perf_counter() - t, 1),
        }
        print(f"{name}: old {first['old_val_loss']:.4f} -> {last['old_val_loss']:.4f}, "
              f"new {first['val_loss']:.4f} -> {last['val_loss']:.4f}")
    base_rise = results.get("none", {}).get("old_rise")
    for r in results.values():
        r["rise_ratio"] = r["old_rise"] / base_rise if base_rise else None

    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {
        "command": "python benchmarks/continual.py " + " ".join(
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "work"),
        "old_data": "data/tinyshakespeare.txt (last 10% held out)",
        "new_data": "data/finetune/sgd_chat_{train,val}.jsonl rendered as 'Role: text' lines (last 10% held out)",
        "tokenizer": "one character tokenizer over both",
        "model": "shakespeare-char preset (4 layers x 128, rope, rmsnorm, relu2), context 64",
        "old_pretrain_steps": args.old_steps,
        "new_steps": args.new_steps,
        "batch": "24 x 64 tokens, Muon + AdamW, bf16 autocast",
        "eval_tokens": 32768,
        "old_pretrain_wall_s": round(old_s, 1),
        "variants": results,
    }
    write_results(RESULTS / "continual.json", out)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_old, ax_new) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in results.items():
        steps = [c["step"] for c in r["curve"]]
        ax_old.plot(steps, [c["old_val_loss"] for c in r["curve"]], "o-", label=name, lw=1.5)
        ax_new.plot(steps, [c["val_loss"] for c in r["curve"]], "o-", label=name, lw=1.5)
    ax_old.set_title("old domain (Tiny Shakespeare) held-out loss")
    ax_new.set_title("new domain (SGD chat) held-out loss")
    for ax in (ax_old, ax_new):
        ax.set_xlabel("step of continued training")
        ax.set_ylabel("loss (nats/char)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "continual.png", dpi=100)
    print(json.dumps({k: {kk: v[kk] for kk in ("old_loss_before", "old_loss_after", "new_loss_before",
                                                  "new_loss_after", "rise_ratio")} for k, v in results.items()}, indent=2))


if __name__ == "__main__":
    main()
