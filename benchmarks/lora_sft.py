"""LoRA chat SFT speed and memory: lmforge against transformers + peft on the same model,
data, rank, targets, batch and precision, in one run.

Each side runs in its own fresh process (so peak RSS is its own), one after the other,
``--rounds`` times in alternating order; the best tokens/s of each side is reported.

    python benchmarks/lora_sft.py --base runs/smollm2-135m --steps 8 --rounds 2

Needs: transformers, peft (pip install transformers peft). The base is an lmforge checkpoint
of a Llama-family model (e.g. SmolLM2 imported from its GGUF); it is exported to the Hugging
Face format once so both sides start from the same weights.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from record import write_results  # noqa: E402  (benchmarks/record.py: the machine with every result)

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def batches(base: str, n: int, batch: int, max_length: int):
    """The same token batches for both sides: (ids rows, label rows), unshifted."""
    from lmforge.data.encoding import tokenize_example
    from lmforge.data.examples import load_examples
    from lmforge.tokenizer import Tokenizer
    from lmforge.tokenizer.chat import ChatTemplate

    tok = Tokenizer.from_file(Path(base) / "tokenizer.json")
    template = ChatTemplate.from_checkpoint(base)
    ex = load_examples(str(ROOT / "data/finetune/sgd_chat_train.jsonl"), "chat").examples
    rows = []
    for e in ex[: n * batch]:
        ids, labels = tokenize_example(e, tok, template, True)
        rows.append((ids[:max_length], labels[:max_length]))
    pad = tok.pad_id if tok.pad_id is not None else tok.eot_id
    return [rows[i * batch : (i + 1) * batch] for i in range(n)], pad


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(side: str, base: str, hf_dir: str, steps: int, warmup: int, batch: int, max_length: int, r: int, threads: int,
           precision: str = "auto") -> dict:
    import torch

    from lmforge.hardware import autocast_dtype, resolve_precision

    # both sides in the precision `lmforge finetune` picks here (auto: bf16 where it is fast)
    amp = autocast_dtype(resolve_precision(precision, "cpu"))
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    data, pad = batches(base, steps + warmup, batch, max_length)
    if side == "lmforge":
        from lmforge.model.peft import PeftConfig, apply_peft, store_frozen_in
        from lmforge.checkpoint import load_model

        model, _ = load_model(base)
        apply_peft(model, PeftConfig(method="lora", r=r, alpha=2 * r, dropout=0.05, target_modules=TARGETS))
        if amp is not None:
            store_frozen_in(model, amp)  # as `lmforge finetune` does under autocast

        def step_loss(rows):
            T = max(len(i) for i, _ in rows) - 1
            x = torch.full((len(rows), T), pad)
            y = torch.full((len(rows), T), -100)
            for k, (ids, labels) in enumerate(rows):
                x[k, : len(ids) - 1] = torch.tensor(ids[:-1])
                y[k, : len(ids) - 1] = torch.tensor(labels[1:])
            return model(x, y)
    else:
        import peft
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
        model = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.05, target_modules=TARGETS))

        def step_loss(rows):
            T = max(len(i) for i, _ in rows)
            x = torch.full((len(rows), T), pad)
            y = torch.full((len(rows), T), -100)
            mask = torch.zeros((len(rows), T), dtype=torch.long)
            for k, (ids, labels) in enumerate(rows):
                x[k, : len(ids)] = torch.tensor(ids)
                y[k, : len(ids)] = torch.tensor(labels)
                mask[k, : len(ids)] = 1
            return model(input_ids=x, attention_mask=mask, labels=y).loss

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    tokens, elapsed, losses = 0, 0.0, []
    for i, rows in enumerate(data):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
            loss = step_loss(rows)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        losses.append(loss.item())
        if i >= warmup:
            elapsed += dt
            tokens += sum(len(ids) - 1 for ids, _ in rows)
    return {
        "side": side,
        "tokens_per_s": tokens / elapsed,
        "peak_rss_mib": peak_rss_mib(),
        "trainable": sum(p.numel() for p in params),
        "first_loss": losses[0],
        "steps": steps,
        "precision": str(amp or torch.float32).replace("torch.", ""),
    }


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/lora_sft.json"))
    ap.add_argument("--worker", choices=["lmforge", "transformers"])
    ap.add_argument("--hf-dir")
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                    help="both sides (auto: what lmforge picks on this CPU, `lmforge env`)")
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.base, a.hf_dir, a.steps, a.warmup, a.batch, a.max_length, a.r, a.threads,
                                a.precision)))
        return
    from lmforge.io.hf import export_hf

    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = export_hf(a.base, Path(tmp) / "hf")
        results: dict[str, list[dict]] = {"lmforge": [], "transformers": []}
        for rnd in range(a.rounds):
            order = ["lmforge", "transformers"] if rnd % 2 == 0 else ["transformers", "lmforge"]
            for side in order:
                cmd = [sys.executable, __file__, "--worker", side, "--base", a.base, "--hf-dir", str(hf_dir),
                       "--steps", str(a.steps), "--warmup", str(a.warmup), "--batch", str(a.batch),
                       "--max-length", str(a.max_length), "--r", str(a.r), "--threads", str(a.threads),
                       "--precision", a.precision]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
                res = json.loads(out)
                results[side].append(res)
                print(f"round {rnd + 1} {side:12s} {res['tokens_per_s']:8.1f} tok/s  peak RSS {res['peak_rss_mib']:7.0f} MiB  "
                      f"first loss {res['first_loss']:.4f}  trainable {res['trainable']:,}", flush=True)
    best = {s: max(rs, key=lambda r: r["tokens_per_s"]) for s, rs in results.items()}
    summary = {
        "settings": {k: getattr(a, k) for k in ("steps", "warmup", "batch", "max_length", "r", "rounds", "threads",
                                                "precision")},
        "best": best,
        "speed_ratio": best["lmforge"]["tokens_per_s"] / best["transformers"]["tokens_per_s"],
        "memory_ratio": min(r["peak_rss_mib"] for r in results["lmforge"]) / min(r["peak_rss_mib"] for r in results["transformers"]),
        "rounds": results,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    write_results(a.out, summary)
    print(f"lmforge / transformers+peft: {summary['speed_ratio']:.2f}x tokens/s, {summary['memory_ratio']:.2f}x peak RSS")


if __name__ == "__main__":
    main()
