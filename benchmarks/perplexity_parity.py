"""Perplexity of a checkpoint by lmforge and by Hugging Face transformers on the same weights,
tokens and windows (the strided loop of the transformers perplexity guide).

    python benchmarks/perplexity_parity.py runs/smollm2 --max-length 1024 --stride 512

The checkpoint is exported with ``lmforge export --format hf`` into a temporary directory and
loaded with ``AutoModelForCausalLM`` in fp32; both sides score the token ids of lmforge's
tokenizer (the checkpoint's tokenizer.json), so only the models differ. The text defaults to the
held-out tail of Tiny Shakespeare (its last 10% of characters, the quickstart's validation split).
transformers' figure is token-weighted: each window's mean loss times the number of tokens it
scored (the guide's newer ``num_valid_tokens - batch_size`` count undercounts windows after the
first by one token; that variant is reported too).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
from record import write_results  # noqa: E402  (benchmarks/record.py: the machine with every result)

ROOT = Path(__file__).resolve().parents[1]


def transformers_perplexity(model, ids: torch.Tensor, max_length: int, stride: int) -> dict:
    seq_len = ids.size(1)
    nll_sum, n_tokens, guide_sum, guide_tokens, prev_end = 0.0, 0, 0.0, 0, 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        trg_len = end - prev_end
        input_ids = ids[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss.double().item()
        scored = int((target_ids[:, 1:] != -100).sum())  # the labels left after the shift
        nll_sum += loss * scored
        n_tokens += scored
        guide = int((target_ids != -100).sum()) - target_ids.size(0)
        guide_sum += loss * guide
        guide_tokens += guide
        prev_end = end
        if end == seq_len:
            break
    return {
        "perplexity": math.exp(nll_sum / n_tokens),
        "tokens": n_tokens,
        "guide_formula_perplexity": math.exp(guide_sum / guide_tokens),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--text", default=str(ROOT / "data" / "tinyshakespeare.txt"))
    ap.add_argument("--span", type=float, nargs=2, default=(0.9, 1.0), help="fractions of the text's characters")
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--stride", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "perplexity_parity.json"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from transformers import AutoModelForCausalLM

    from lmforge.eval.perplexity import text_perplexity
    from lmforge.io.hf import export_hf
    from lmforge.tokenizer import Tokenizer
    from lmforge.checkpoint import load_model

    text = Path(a.text).read_text(encoding="utf-8")
    text = text[int(len(text) * a.span[0]) : int(len(text) * a.span[1])]
    model, ckpt = load_model(a.checkpoint)
    tok = Tokenizer.from_file(ckpt / "tokenizer.json")
    t0 = time.perf_counter()
    ours = text_perplexity(model, tok, text, max_length=a.max_length, stride=a.stride, progress=True)
    ours_s = time.perf_counter() - t0
    del model
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(ckpt, Path(tmp) / "hf")
        hf = AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf", torch_dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode(text)])
    t0 = time.perf_counter()
    theirs = transformers_perplexity(hf, ids, a.max_length, a.stride)
    theirs_s = time.perf_counter() - t0
    rel = abs(ours["perplexity"] - theirs["perplexity"]) / theirs["perplexity"]
    result = {
        "checkpoint": str(ckpt),
        "text": f"{a.text} [{a.span[0]}, {a.span[1]}) of its characters",
        "max_length": a.max_length,
        "stride": a.stride,
        "lmforge": {**ours, "seconds": round(ours_s, 1)},
        "transformers": {**theirs, "seconds": round(theirs_s, 1)},
        "relative_difference": rel,
        "equal_to_3_significant_digits": f"{ours['perplexity']:.3g}" == f"{theirs['perplexity']:.3g}",
    }
    print(json.dumps(result, indent=2))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    write_results(a.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
