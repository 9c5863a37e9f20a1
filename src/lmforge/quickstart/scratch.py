"""``lmforge quickstart --base scratch``: a small model pretrained here, sized to the budget.

The educational path of the quickstart (a model's whole life on one machine):

1. **corpus**: Tiny Shakespeare and the training conversations as plain text (one turn a line,
   one document a conversation): the pretrained model learns the language, not the chat format,
   which chat SFT then teaches (so the report compares a pretrained-only model with a chat model);
2. **tokenizer**: a byte-level BPE on that corpus (ChatML's tokens special), and token shards;
3. **size**: one training step of the recipe's shape is timed on this machine; the shape is then
   the largest of :data:`SHAPES` whose steps (scaled by training FLOPs per token) reach
   :data:`MIN_STEPS` in the pretraining budget, so a slow machine gets a smaller model rather than
   an undertrained one;
4. **pretrain**: recipe ``pretrain/quickstart`` with ``train.max_minutes`` (the engine sizes its
   steps from its measured speed).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

from .config import PRETRAIN_RECIPE, QuickstartConfig

#: Candidate shapes, largest first: (layers, width, heads, KV heads).
SHAPES = ((6, 256, 8, 2), (4, 192, 6, 2), (4, 128, 4, 2), (2, 128, 4, 2), (2, 64, 4, 2))
#: Optimizer steps a shape must reach in the budget: the recipe's Muon runs were still improving
#: at 600 steps of 16 x 256 tokens and flat by 900 (BENCHMARKS.md, "How the recipes were chosen").
MIN_STEPS = 600
SCRATCH_MAX_STEPS = 5000  # the cap train.max_minutes plans under


def build_corpus(out: Path, conversations: Path) -> tuple[Path, int]:
    """Tiny Shakespeare (one document) and every conversation as plain text (one document each)."""
    from ..paths import embedded_data_dir

    out.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(out, "w", encoding="utf-8") as f:
        f.write(json.dumps({"text": (embedded_data_dir() / "tinyshakespeare.txt").read_text(encoding="utf-8")}) + "\n")
        for line in conversations.read_text(encoding="utf-8").splitlines():
            if line.strip():
                msgs = json.loads(line)["messages"]
                f.write(json.dumps({"text": "\n".join(m["content"] for m in msgs)}) + "\n")
                n += 1
    print(f"  {out}: Tiny Shakespeare + {n:,} conversations as plain text ({out.stat().st_size / 2**20:.1f} MiB)")
    return out, n


def step_seconds(cfg: Any, train: Any, steps: int = 3) -> float:
    """Median seconds of one training step (forward, backward, optimizer) of ``cfg`` at the
    run's batch, timed after one untimed step."""
    import torch

    from .. import hardware
    from ..model.gpt import GPT
    from ..train.engine import autocast_dtype
    from ..train.optim import build_optimizer

    torch.manual_seed(0)
    model = GPT(cfg)
    opt = build_optimizer(model, train, torch.device("cpu"))
    dtype = autocast_dtype(hardware.resolve_precision(train.precision, "cpu"))
    x = torch.randint(0, cfg.vocab_size, (train.micro_batch_size, cfg.context_length))
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def choose_shape(pcfg: Any, seconds: float) -> tuple[tuple[int, int, int, int], dict[str, Any]]:
    """The largest shape of :data:`SHAPES` that reaches :data:`MIN_STEPS` in ``seconds``, from one
    timed step of the recipe's shape; returns it and the measurements behind the choice."""
    from dataclasses import replace

    from ..model.gpt import GPT
    from ..train.pretrain import model_config_for_data

    base = model_config_for_data(pcfg)
    measured = step_seconds(base, pcfg.train) * max(1, pcfg.train.grad_accum)
    ref = GPT(base).flops_per_token()
    rows = []
    chosen = SHAPES[-1]
    for shape in SHAPES:
        n_layer, n_embd, n_head, n_kv = shape
        flops = GPT(replace(base, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_kv_head=n_kv,
                            head_dim=n_embd // n_head)).flops_per_token()
        steps = int(seconds / (measured * flops / ref))
        rows.append({"shape": f"{n_layer} x {n_embd}", "predicted_steps": steps})
        if steps >= MIN_STEPS:
            chosen = shape
            break
    return chosen, {"measured_step_s": measured, "shape_measured": f"{base.n_layer} x {base.n_embd}",
                    "candidates": rows, "budget_s": seconds}


def pretrain_scratch(out: Path, conversations: Path, cfg: QuickstartConfig, clock: Any) -> dict[str, Any]:
    from ..config import load_config, to_dict
    from ..data.prepare import DataPrepareConfig, run_prepare
    from .plan import scratch_pretrain_seconds
    from ..commands.tokenizer import TokenizerTrainConfig, run_train
    from ..train.pretrain import PretrainConfig, run_pretrain

    corpus, n = build_corpus(out / "corpus" / "corpus.jsonl", conversations)
    run_train(TokenizerTrainConfig(inputs=[str(corpus)], kind="bpe", vocab_size=cfg.vocab_size, out=str(out / "tokenizer")))
    run_prepare(DataPrepareConfig(inputs=[str(corpus)], tokenizer=str(out / "tokenizer"), out=str(out / "shards"),
                                  val_fraction=0.05, val_split="document"))
    seconds = scratch_pretrain_seconds(clock)
    settings = [f"data={out / 'shards'}", f"out_dir={out / 'pretrain'}", "overwrite=true"]
    probe = load_config(PretrainConfig, "pretrain", PRETRAIN_RECIPE, settings + list(cfg.overrides))
    user_shape = any(o.split("=")[0] in ("model.n_layer", "model.n_embd", "model.preset") for o in cfg.overrides)
    sizing: dict[str, Any] = {"chosen": "set by the overrides"}
    if not user_shape:
        (n_layer, n_embd, n_head, n_kv), sizing = choose_shape(probe, seconds)
        settings += [f"model.n_layer={n_layer}", f"model.n_embd={n_embd}", f"model.n_head={n_head}",
                     f"model.n_kv_head={n_kv}"]
        sizing["chosen"] = f"{n_layer} x {n_embd}"
        print(f"  model: {sizing['chosen']} (one step of {sizing['shape_measured']} measured "
              f"{sizing['measured_step_s'] * 1e3:.0f} ms; {MIN_STEPS}+ steps wanted in {seconds / 60:.1f} min; "
              + ", ".join(f"{r['shape']}: {r['predicted_steps']:,} steps" for r in sizing["candidates"]) + ")", flush=True)
    settings += [f"train.max_minutes={seconds / 60:.4f}", f"train.max_steps={SCRATCH_MAX_STEPS}"]
    pcfg = load_config(PretrainConfig, "pretrain", PRETRAIN_RECIPE, settings + list(cfg.overrides))
    fit = run_pretrain(pcfg)
    return {"run": str(out / "pretrain"), "fit": to_dict(fit), "sizing": sizing, "conversations": n,
            "budget_s": seconds}

