"""Training speed on a busy machine: 1 vs all threads while other processes compete for cores.

Issue 15: on a 2-core AMD Zen 3 "under load from other processes, 2 threads ran 3-4x slower
than 1". This script measures it: each configuration trains the Tiny Shakespeare shape
(lmforge's Engine, 4 layers x 128, batch 12 x 64, AdamW, fp32) for a fixed number of steps in
a fresh process, while 0..N busy processes (one core each, a Python busy loop) run beside it.
Configurations: threads (1, all usable cores, and lmforge's automatic choice), and libgomp's
wait policy (OMP_WAIT_POLICY=PASSIVE, which must be set before the process starts).

    python benchmarks/threads_under_load.py                 # ~2-3 min on 2 cores
    python benchmarks/threads_under_load.py --steps 60 --competitors 0 1 2

Results: benchmarks/results/threads_under_load.json (with the machine) and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from record import write_results  # noqa: E402  (benchmarks/record.py: the machine with every result)

ROOT = Path(__file__).resolve().parents[1]

WORKER = r"""
import json, sys, time, torch
from lmforge.model.gpt import GPT, GPTConfig
from lmforge.runs.tracking import LogConfig
from lmforge.train.engine import Engine, TrainConfig
from lmforge.train.hooks import EngineHook
from lmforge.train.objectives.base import Objective

steps, threads = int(sys.argv[1]), int(sys.argv[2])

class Random(Objective):
    name = "lm"
    def train_batch(self, step, micro):
        g = torch.Generator().manual_seed(step)
        x = torch.randint(0, 65, (12, 65), generator=g)
        return {"x": x[:, :-1], "y": x[:, 1:]}
    def loss(self, model, batch):
        return model(batch["x"], batch["y"]), {"tokens": batch["x"].numel()}
    def evaluate(self, model):
        return {}

torch.manual_seed(0)
model = GPT(GPTConfig(vocab_size=65, context_length=64, n_layer=4, n_head=4, n_embd=128, bias=False, mlp="gelu"))
cfg = TrainConfig(max_steps=steps, micro_batch_size=12, precision="fp32", threads=threads, eval_interval=0,
                  warmup_steps=0, log_interval=10 ** 9, device="cpu")
times = []
class Timer(EngineHook):
    t = None
    def after_step(self, step):
        now = time.perf_counter()
        if self.t is not None:
            times.append(now - self.t)
        self.t = now
import tempfile
with tempfile.TemporaryDirectory() as out:
    engine = Engine(model, Random(), cfg, out, log=LogConfig(console=False, jsonl=False, tensorboard=False, report=False),
                    hooks=[Timer()])
    engine.save = lambda: None
    engine.fit(report=False)
times = sorted(times[5:])
print(json.dumps({"threads": torch.get_num_threads(), "ms_median": 1e3 * times[len(times) // 2],
                  "ms_p10": 1e3 * times[len(times) // 10]}))
"""

BUSY = "import time\nend = time.time() + 3600\nwhile time.time() < end:\n    pass\n"


def run(steps: int, threads: int, passive: bool) -> dict:
    env = dict(os.environ)
    env.pop("LMFORGE_THREADS", None)
    if passive:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    else:
        env.pop("OMP_WAIT_POLICY", None)
    out = subprocess.run([sys.executable, "-c", WORKER, str(steps), str(threads)], env=env, cwd=ROOT, check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--competitors", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/threads_under_load.json")
    args = ap.parse_args()
    from lmforge.hardware import probe

    cores = probe().cores
    configs = [(1, False), (cores, False), (cores, True), (0, False)]  # 0: lmforge's automatic choice
    rows = []
    for n in args.competitors:
        busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(n)]
        try:
            time.sleep(1.0 if n else 0.0)
            for r in range(args.rounds):
                for threads, passive in configs if r % 2 == 0 else configs[::-1]:
                    res = run(args.steps, threads, passive)
                    row = {"competitors": n, "requested_threads": threads or "auto", "passive": passive, "round": r, **res}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        finally:
            for p in busy:
                p.kill()
                p.wait()
    table = {}
    for row in rows:
        key = (row["competitors"], str(row["requested_threads"]), row["passive"])
        table.setdefault(key, []).append(row)
    print("\n| competing busy processes | threads asked (used) | OMP_WAIT_POLICY | ms/step, median of rounds |")
    print("|---|---|---|---|")
    summary = []
    for (n, threads, passive), rs in table.items():
        ms = statistics.median(r["ms_median"] for r in rs)
        summary.append({"competitors": n, "threads": threads, "used": rs[0]["threads"], "passive": passive, "ms": ms})
        print(f"| {n} | {threads} ({rs[0]['threads']}) | {'PASSIVE' if passive else 'default'} | {ms:.1f} |")
    write_results(ROOT / args.out, {"steps": args.steps, "rows": rows, "summary": summary})


if __name__ == "__main__":
    main()
