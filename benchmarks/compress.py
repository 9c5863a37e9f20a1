#!/usr/bin/env python
"""Compression table for a trained checkpoint: size, decode speed and held-out loss of
quantized and pruned variants, all built with lmforge's own commands' functions.

Variants (each a checkpoint under ``--work``):

- ``base fp32``: the checkpoint as trained;
- ``bf16``, ``int8``, ``int4`` (group 32): ``lmforge quantize``;
- ``magnitude 50%``: ``lmforge prune --method magnitude --ratio 0.5`` (zeros stored densely);
- ``MLP-30% (weight)`` and ``MLP-30% (activation)``: ``lmforge prune --method mlp --ratio 0.3``
  with weight-norm or activation importance (16 calibration batches from the train split);
- ``heads-50% (activation)``: half the KV groups (with their query heads) removed;
- ``MLP-30% + recovery``: the activation-pruned model fine-tuned ``--recover-steps`` steps
  with the LM objective on the train split (``--recover-data``);
- an importance sweep: MLP pruning at ``--sweep-ratios`` with weight and with activation
  importance, evaluated without recovery;
- ``base + N steps (control)``: the unpruned model trained the same extra steps with the
  same settings, so the recovered model is compared with what the extra training alone gives.

Measured for each: ``model.safetensors`` size, parameters, val loss / perplexity over the
whole val split (the engine's LM evaluation, windows of the model's context), and decode
tokens/s of the inference engine (batch 1, greedy, the same prompt and token count, dtype
``auto``: bf16 activations for quantized models). Every decode step is timed, in ``--rounds``
interleaved rounds in one process (each round starts with the next variant); the table
reports 1 / the 10th-percentile step time, which stays near the uncontended cost on a shared
CPU where the mean does not (the median-step and wall-clock rates are in the JSON). Ratios
within one run are what a shared machine can compare.

    lmforge tokenizer train --recipe char && lmforge data prepare --recipe shakespeare-char
    lmforge pretrain --recipe shakespeare-char out_dir=runs/compress/base model.mlp=swiglu model.n_kv_head=2
    python benchmarks/compress.py --checkpoint runs/compress/base --data runs/shakespeare-char/data
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from record import write_results  # noqa: E402  (benchmarks/record.py: the machine with every result)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "compress.json"


def evaluate(ckpt: Path, data: str, eval_tokens: int) -> dict[str, float]:
    from lmforge.checkpoint import load_model
    from lmforge.train.objectives.base import RunContext
    from lmforge.train.objectives.lm import LMObjective

    model, _ = load_model(ckpt)
    model.eval()
    objective = LMObjective(data, model.config.context_length, eval_tokens)
    objective.setup(RunContext(device=torch.device("cpu"), seed=0, micro_batch_size=32, grad_accum=1))
    return objective.evaluate(model)


def decode_step_times(engine, prompt: str, tokens: int) -> list[float]:
    """Seconds of each decode step (one new token, batch 1) of a greedy generation; the first
    step (the prompt's prefill) is left out."""
    from lmforge.infer.sampling import SamplingParams

    rid = engine.add_request(prompt, SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True))
    times = []
    while engine.has_unfinished():
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    engine.pop_completion(rid)
    return times[1:]


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="runs/compress/base", help="trained checkpoint or run directory")
    ap.add_argument("--data", default="runs/shakespeare-char/data", help="its prepared shards (train: calibration "
                    "and recovery; val: evaluation)")
    ap.add_argument("--work", default="runs/compress/variants", help="where the variants are written")
    ap.add_argument("--recover-steps", type=int, default=300)
    ap.add_argument("--recover-lr", type=float, default=1e-3)
    ap.add_argument("--eval-tokens", type=int, default=111488, help="held-out tokens (default: Tiny Shakespeare's val)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--prompt", default="ROMEO:")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for decoding and recovery (default 1)")
    ap.add_argument("--sweep-ratios", type=float, nargs="*", default=[0.3, 0.5, 0.7],
                    help="MLP ratios at which weight and activation importance are compared (no recovery)")
    ap.add_argument("--no-control", action="store_true", help="skip the unpruned extra-training control")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    args = ap.parse_args()

    from lmforge.config import from_dict, load_config
    from lmforge.infer.engine import load_engine
    from lmforge.model.gpt import GPT, GPTConfig
    from lmforge.commands.checkpoint import prune_and_recover, prune_checkpoint, quantize_checkpoint
    from lmforge.checkpoint import resolve_checkpoint
    from lmforge.train.pretrain import PretrainConfig, run_pretrain

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    base = resolve_checkpoint(args.checkpoint)
    recover = [
        "train.micro_batch_size=24", "train.precision=bf16", f"train.threads={args.threads}",
        f"train.lr={args.recover_lr}", f"train.eval_tokens={args.eval_tokens}", "train.seed=7",
        "log.console=false", "log.tensorboard=false",
    ]
    t0 = time.perf_counter()
    variants: dict[str, Path] = {"base fp32": base}
    for method in ("bf16", "int8", "int4"):
        variants[method] = quantize_checkpoint(base, work / method, method, overwrite=True)
    reports = {}
    for name, slug, method, ratio, kw in [
        ("magnitude 50%", "magnitude50", "magnitude", 0.5, {}),
        ("MLP-30% (weight)", "mlp30-weight", "mlp", 0.3, {"importance": "weight"}),
        ("MLP-30% (activation)", "mlp30-activation", "mlp", 0.3, {"calib_data": args.data}),
        ("heads-50% (activation)", "heads50-activation", "heads", 0.5, {"calib_data": args.data}),
    ]:
        variants[name], reports[name] = prune_checkpoint(base, work / slug, method, ratio, overwrite=True, **kw)
    print(f"variants built in {time.perf_counter() - t0:.0f} s; recovery ({args.recover_steps} steps) ...", flush=True)
    summary = prune_and_recover(base, work / "mlp30-recovered", "mlp", 0.3, recover_data=args.data,
                                recover_steps=args.recover_steps, recover_overrides=recover, overwrite=True)
    rec_name = f"MLP-30% + recovery ({args.recover_steps} steps)"
    variants[rec_name] = Path(summary["checkpoint"])
    reports[rec_name] = summary
    if not args.no_control:
        cfg = load_config(PretrainConfig, "pretrain", None, [
            f"data={args.data}", f"out_dir={work / 'control'}", f"init_from={base}", "overwrite=true",
            f"train.max_steps={args.recover_steps}", f"train.warmup_steps={max(1, args.recover_steps // 10)}",
            "train.eval_interval=0", *recover,
        ])
        variants[f"base + {args.recover_steps} steps (control)"] = Path(run_pretrain(cfg).checkpoint)

    rows = {}
    for name, ckpt in variants.items():
        t = time.perf_counter()
        ev = evaluate(ckpt, args.data, args.eval_tokens)
        size = (ckpt / "model.safetensors").stat().st_size / 2**20
        config = json.loads((ckpt / "config.json").read_text())
        with torch.device("meta"):  # parameters of the model's shape (quantization packs, not removes, them)
            params = GPT(from_dict(GPTConfig, config["model"], "model")).num_params()
        rows[name] = {"checkpoint": str(ckpt), "params": params, "size_mib": size, **ev, "model": config["model"]}
        print(f"  {name:<34} {size:6.2f} MiB  val_loss {ev['val_loss']:.4f}  ({time.perf_counter() - t:.0f} s)",
              flush=True)
    torch.set_num_threads(args.threads)  # the engine's training above may have changed it

    sweep = []  # which importance ranks MLP channels better, before any recovery
    for ratio in args.sweep_ratios:
        for importance in ("weight", "activation"):
            ckpt, _ = prune_checkpoint(base, work / "sweep", "mlp", ratio, importance=importance,
                                       calib_data=args.data, overwrite=True)
            ev = evaluate(ckpt, args.data, args.eval_tokens)
            sweep.append({"ratio": ratio, "importance": importance, "val_loss": ev["val_loss"],
                          "val_loss_vs_base": ev["val_loss"] / rows["base fp32"]["val_loss"] - 1})
            print(f"  MLP {ratio:.0%} {importance:<10} val_loss {ev['val_loss']:.4f}", flush=True)

    engines = {name: load_engine(str(ckpt), max_batch_size=1) for name, ckpt in variants.items()}
    n_prompt = len(engines["base fp32"].tokenizer.encode(args.prompt))
    tokens = rows["base fp32"]["model"]["context_length"] - n_prompt  # the whole context, no sliding
    steps: dict[str, list[float]] = {name: [] for name in engines}
    for engine in engines.values():  # warm-up
        decode_step_times(engine, args.prompt, 8)
    order = list(engines)
    for r in range(args.rounds):
        for name in order[r % len(order):] + order[: r % len(order)]:  # each round starts one variant later
            steps[name] += decode_step_times(engines[name], args.prompt, tokens)
        print(f"  decode round {r + 1}/{args.rounds}", flush=True)
    b = rows["base fp32"]
    for name, row in rows.items():
        row["decode_tok_s"] = 1.0 / quantile(steps[name], 0.1)  # robust to time slices lost to other jobs
        row["decode_tok_s_median_step"] = 1.0 / quantile(steps[name], 0.5)
        row["decode_tok_s_wall"] = len(steps[name]) / sum(steps[name])
        row["val_loss_vs_base"] = row["val_loss"] / b["val_loss"] - 1
        row["size_vs_base"] = row["size_mib"] / b["size_mib"]
    for name, row in rows.items():
        row["speed_vs_base"] = row["decode_tok_s"] / rows["base fp32"]["decode_tok_s"]

    result = {
        "command": "python benchmarks/compress.py " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items() if k not in ("out", "no_control")),
        "base_checkpoint": str(base),
        "decode": {"prompt": args.prompt, "new_tokens": tokens, "batch": 1, "greedy": True, "threads": args.threads,
                   "rounds": args.rounds, "reported": "1 / 10th-percentile decode step time over all rounds"},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "loadavg_end": os.getloadavg()},
        "rows": rows,
        "pruning_reports": reports,
        "importance_sweep": sweep,
        "wall_s": time.perf_counter() - t0,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_results(args.out, result)

    print("\n| variant | params | size (MiB) | val loss | ppl | loss vs base | decode tok/s | speed vs base |")
    print("|---|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['params'] / 1e6:.3f}M | {row['size_mib']:.2f} | {row['val_loss']:.4f} | "
              f"{row['val_ppl']:.3f} | {row['val_loss_vs_base']:+.1%} | {row['decode_tok_s']:.0f} | "
              f"{row['speed_vs_base']:.2f}x |")
    print("\n| MLP channels removed | weight importance: val loss | activation importance: val loss |")
    print("|---|---|---|")
    for ratio in args.sweep_ratios:
        w, a = (next(r for r in sweep if r["ratio"] == ratio and r["importance"] == i) for i in ("weight", "activation"))
        print(f"| {ratio:.0%} | {w['val_loss']:.4f} ({w['val_loss_vs_base']:+.1%}) | "
              f"{a['val_loss']:.4f} ({a['val_loss_vs_base']:+.1%}) |")
    print(f"\nwrote {args.out} ({result['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
