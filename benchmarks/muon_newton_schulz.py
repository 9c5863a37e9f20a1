"""Muon's optimizer step on this CPU: torch.optim.Muon (Newton-Schulz in bf16, always) against
lmforge's Muon with the iterations in fp32 and in bf16 (train/optim.py), on the hidden matrices
of the 4 x 128 Tiny Shakespeare model (16 matrices), 2 threads, the fastest of repeated steps.

    python benchmarks/muon_newton_schulz.py                 # a few seconds
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/muon_newton_schulz.py

Results: benchmarks/results/muon_newton_schulz[_SUFFIX].json (with the machine) and stdout.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from record import write_results  # noqa: E402  (benchmarks/record.py: the machine with every result)

from lmforge.hardware import _time_min, newton_schulz_dtype
from lmforge.train.optim import Muon

SHAPES = [(384, 128), (128, 128), (512, 128), (128, 512)] * 4  # qkv, o, up, down of 4 layers


def optimizer(kind: str) -> torch.optim.Optimizer:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*s) * 0.02) for s in SHAPES]
    for p in params:
        p.grad = torch.randn_like(p)
    kw = dict(lr=5e-3, adjust_lr_fn="match_rms_adamw")
    if kind == "torch":
        return torch.optim.Muon(params, **kw)
    return Muon(params, ns_dtype=torch.float32 if kind == "fp32" else torch.bfloat16, **kw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/muon_newton_schulz.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows = {}
    for kind, name in (("torch", "torch.optim.Muon (bf16 Newton-Schulz)"), ("fp32", "lmforge Muon, fp32 Newton-Schulz"),
                       ("bf16", "lmforge Muon, bf16 Newton-Schulz")):
        opt = optimizer(kind)
        rows[name] = 1e3 * _time_min(opt.step, 1.0)
        print(f"{name}: {rows[name]:.1f} ms a step", flush=True)
    chosen = newton_schulz_dtype("cpu")
    write_results(Path(__file__).resolve().parents[1] / a.out,
                  {"ms_per_step": rows, "lmforge_picks": str(chosen).replace("torch.", ""), "threads": a.threads})


if __name__ == "__main__":
    main()
