"""A plain-PyTorch nanoGPT-style training loop: the peer of lmforge's Tiny Shakespeare recipes.

Written here after Karpathy's nanoGPT (model.py / train.py, 2023), with its laptop settings
for Tiny Shakespeare characters (its README: ``--device=cpu --compile=False --eval_iters=20
--log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128
--max_iters=2000 --lr_decay_iters=2000 --dropout=0.0``): pre-LayerNorm blocks without biases,
learned positions, exact GELU MLP, fused q/k/v projection, ``scaled_dot_product_attention``
(causal), tied embeddings, N(0, 0.02) init with 1/sqrt(2L) residual projections; AdamW
(lr 1e-3, betas 0.9/0.99, weight decay 0.1 on matrices, torch's default foreach kernel as
nanoGPT uses on a CPU), 100 warmup steps then cosine to 1e-4, gradient clipping at 1.0, fp32;
an estimate of train and val loss on 20 batches every 250 iterations.

It reads the same prepared shards as lmforge (``lmforge data prepare --recipe
shakespeare-char``: ``train_*.bin`` / ``val_*.bin`` + ``meta.json``). At the end it scores the
whole val split in non-overlapping windows of 64 (lmforge's evaluation), so the losses compare.

    python benchmarks/nanogpt_loop.py --data runs/bench-shakespeare/data        # prints one JSON line
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d, bias=False)
        self.c_attn = nn.Linear(d, 3 * d, bias=False)
        self.c_proj = nn.Linear(d, d, bias=False)
        self.ln_2 = nn.LayerNorm(d, bias=False)
        self.c_fc = nn.Linear(d, 4 * d, bias=False)
        self.mlp_proj = nn.Linear(4 * d, d, bias=False)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class NanoGPT(nn.Module):
    def __init__(self, vocab: int, block: int, layers: int, heads: int, d: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(block, d)
        self.h = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d, bias=False)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.wte.weight = self.lm_head.weight  # weight tying
        for name, p in self.named_parameters():
            if name.endswith(("c_proj.weight", "mlp_proj.weight")):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * layers))
            elif p.dim() == 2:
                nn.init.normal_(p, 0.0, 0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def _split(data: Path, name: str) -> np.ndarray:
    meta = json.loads((data / "meta.json").read_text())
    dtype = np.dtype(meta.get("dtype", "uint16"))
    parts = [np.fromfile(p, dtype=dtype) for p in sorted(data.glob(f"{name}_*.bin"))]
    return np.concatenate(parts).astype(np.int64)


def run(data: Path, *, iters: int = 2000, batch: int = 12, block: int = 64, layers: int = 4, heads: int = 4,
        d: int = 128, lr: float = 1e-3, min_lr: float = 1e-4, warmup: int = 100, eval_interval: int = 250,
        eval_iters: int = 20, seed: int = 1337) -> dict:
    start = time.perf_counter()
    torch.manual_seed(seed)
    train, val = torch.from_numpy(_split(data, "train")), torch.from_numpy(_split(data, "val"))
    vocab = int(json.loads((data / "meta.json").read_text())["vocab_size"])
    model = NanoGPT(vocab, block, layers, heads, d)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.99))

    def get_batch(split: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ix = torch.randint(len(split) - block, (batch,))
        return torch.stack([split[i : i + block] for i in ix]), torch.stack([split[i + 1 : i + 1 + block] for i in ix])

    def lr_at(it: int) -> float:
        if it < warmup:
            return lr * (it + 1) / (warmup + 1)
        ratio = (it - warmup) / (iters - warmup)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)

    @torch.no_grad()
    def estimate() -> dict[str, float]:
        model.eval()
        out = {k: float(torch.stack([model(*get_batch(s)) for _ in range(eval_iters)]).mean())
               for k, s in (("train", train), ("val", val))}
        model.train()
        return out

    train_s, evals = 0.0, []
    for it in range(iters):
        if it % eval_interval == 0:
            evals.append({"iter": it, **estimate()})
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = lr_at(it)
        x, y = get_batch(train)
        loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        train_s += time.perf_counter() - t0
    model.eval()
    with torch.no_grad():  # lmforge's evaluation: the whole val split, non-overlapping windows
        n = (len(val) - 1) // block
        total, count = 0.0, 0
        for i in range(0, n, 64):
            rows = range(i, min(n, i + 64))
            x = torch.stack([val[r * block : (r + 1) * block] for r in rows])
            y = torch.stack([val[r * block + 1 : (r + 1) * block + 1] for r in rows])
            total += float(model(x, y)) * y.numel()
            count += y.numel()
    return {"iters": iters, "batch": batch, "block": block, "train_s": train_s,
            "tokens_per_s": iters * batch * block / train_s, "val_loss": total / count,
            "evals": evals, "wall_s_in_process": time.perf_counter() - start, "threads": torch.get_num_threads()}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--iters", type=int, default=2000)
    a = ap.parse_args()
    print(json.dumps(run(a.data, iters=a.iters)))
