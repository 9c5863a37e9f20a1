"""The README's main command, timed from start to a served chatbot that answers.

Runs ``lmforge quickstart`` (the whole pipeline: Reddit dump -> data stages -> base -> eval ->
SFT -> eval -> report -> server) in its own process, polls ``/health`` until the server answers,
then talks to it as the web page does with its defaults (max_tokens 256, temperature 0.7,
streamed) and greedily on the issue's three messages; stops the server with Ctrl-C (SIGINT).

    flock -x /work/cpu.lock python benchmarks/quickstart_time.py --out runs/qs-time
    flock -x /work/cpu.lock python benchmarks/quickstart_time.py --out runs/qs-avx2 --avx2 --tag avx2

``--avx2`` runs it under the AVX2 emulation of an AMX host (``ATEN_CPU_CAPABILITY=avx2
ONEDNN_MAX_CPU_ISA=AVX2``: bf16 emulated, fp32 fast, as on AMD Zen 3 and most laptops).
The record (wall time to serving, each stage's seconds, the held-out figures of the report card,
the replies, the machine) goes to ``benchmarks/results/quickstart_time[_TAG].json``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from record import write_results  # noqa: E402  (benchmarks/record.py: the machine with every result)

ROOT = Path(__file__).resolve().parents[1]
ISSUE_MESSAGES = ["Hello! I want to find a good Italian restaurant in San Francisco.", "For 2 people at 7 pm, please.",
                  "Thanks! What is the address?"]


def stream_reply(url: str, messages: list[dict], **settings) -> tuple[str, int, str | None]:
    """(text, streamed pieces, finish reason) of a streamed chat completion."""
    import httpx

    text, pieces, finish = [], 0, None
    body = {"model": "quickstart-chat", "messages": messages, "stream": True, **settings}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:]).get("choices", []):
                if choice.get("delta", {}).get("content"):
                    text.append(choice["delta"]["content"])
                    pieces += 1
                finish = choice.get("finish_reason") or finish
    return "".join(text), pieces, finish


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/qs-time")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--avx2", action="store_true", help="emulate an AVX2-only CPU on this host")
    ap.add_argument("--tag", default="native")
    ap.add_argument("quickstart_args", nargs="*", help="more quickstart arguments (after --), e.g. --base scratch")
    args = ap.parse_args()
    import httpx

    env = dict(os.environ)
    if args.avx2:
        env.update(ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2")
    cmd = [sys.executable, "-m", "lmforge.cli", "quickstart", "--out", args.out, "--port", str(args.port),
           *args.quickstart_args]
    url = f"http://127.0.0.1:{args.port}"
    log = Path(args.out + ".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    serving = None
    try:
        while proc.poll() is None:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    serving = time.perf_counter() - t0
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        if serving is None:
            raise SystemExit(f"the quickstart ended (exit {proc.returncode}) without serving: see {log}")
        models = httpx.get(url + "/v1/models").json()["data"]
        page_text, page_pieces, page_finish = stream_reply(url, [{"role": "user", "content": ISSUE_MESSAGES[0]}],
                                                           max_tokens=256, temperature=0.7)
        conversation, replies = [], []
        for message in ISSUE_MESSAGES:
            conversation.append({"role": "user", "content": message})
            text, _, finish = stream_reply(url, conversation, max_tokens=128, temperature=0.0)
            conversation.append({"role": "assistant", "content": text})
            replies.append({"user": message, "assistant": text, "finish_reason": finish})
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    summary = json.loads((Path(args.out) / "summary.json").read_text())
    record = {
        "tag": args.tag, "command": " ".join(cmd[2:]), "date": time.strftime("%Y-%m-%d %H:%M"),
        "env": {k: env[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if k in env},
        "wall_to_serving_s": round(serving, 1), "machine": summary["machine"], "precision": summary["precision"],
        "stage_seconds": summary["seconds"], "before": summary["before"], "after": summary["after"],
        "acceptance": summary["acceptance"], "sft": summary["sft"], "max_model_len": models[0].get("max_model_len"),
        "page_default_reply": {"text": page_text, "streamed_pieces": page_pieces, "finish_reason": page_finish},
        "issue_conversation": replies, "server_exit": proc.returncode,
    }
    out = ROOT / "benchmarks" / "results" / f"quickstart_time{'' if args.tag == 'native' else '_' + args.tag}.json"
    print(json.dumps(record, indent=2))
    write_results(out, record)


if __name__ == "__main__":
    main()
