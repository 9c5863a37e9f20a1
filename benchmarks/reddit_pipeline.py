"""Reddit pipeline throughput and memory: comments/s and peak RSS on generated Pushshift dumps.

For each size (100k and 1M comments by default) a synthetic month is generated into a
temporary directory (``lmforge.data.reddit_synth``, not timed), then ``run_reddit`` runs in a
fresh Python process (not the CLI, whose parser imports torch for the inference commands),
whose whole process tree is sampled for memory every 20 ms (psutil):

- ``peak_rss_tree_mib``: peak of the summed RSS of the process and its workers. Forked workers
  share pages with their parent, which this counts once per process: an upper bound;
- ``peak_pss_tree_mib``: the same in PSS (shared pages divided among their sharers), sampled
  less often (it reads smaps): the memory the tree really holds;
- ``max_rss_single_mib``: the largest sampled RSS of one process (``ru_maxrss`` is no use here:
  Linux carries it across exec from the forked parent, which generated the dump).

Each size runs on two copies of the same records: the ``.zst`` dump as Pushshift ships it (one
frame with a 2 GiB window: the zstd decoder keeps up to 2 GiB of history, so its memory grows
with the decompressed size up to 2 GiB and stays there), and the same lines as plain NDJSON,
which shows the pipeline's own memory without the decoder's window.

    nice -n 10 python benchmarks/reddit_pipeline.py                 # 100k and 1M, 2 processes
    python benchmarks/reddit_pipeline.py --sizes 20000 --formats zst   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from record import write_results  # noqa: E402  (benchmarks/record.py: the machine with every result)

RESULTS = Path(__file__).resolve().parent / "results"

CHILD = """
import json, resource, sys
from lmforge.data.reddit import RedditConfig, run_reddit
cfg = RedditConfig(**json.loads(sys.argv[1]))
report = run_reddit(cfg, verbose=False)
report["cpu_s"] = sum(resource.getrusage(w)[0] + resource.getrusage(w)[1]
                      for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
print(json.dumps(report))
"""


def measure(settings: dict) -> dict:
    """Run the pipeline in a child process; sample its tree's memory until it exits."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(settings)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    root = psutil.Process(proc.pid)
    peak_rss = peak_pss = peak_single = 0
    tick = 0
    while proc.poll() is None:
        try:
            procs = [root, *root.children(recursive=True)]
            rss = pss = 0
            for p in procs:
                try:
                    if tick % 10 == 0:
                        info = p.memory_full_info()
                        pss += info.pss
                        one = info.rss
                    else:
                        one = p.memory_info().rss
                    rss += one
                    peak_single = max(peak_single, one)
                except psutil.Error:
                    pass
            peak_rss = max(peak_rss, rss)
            if tick % 10 == 0:
                peak_pss = max(peak_pss, pss)
        except psutil.Error:
            pass
        tick += 1
        time.sleep(0.02)
    wall = time.perf_counter() - start
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"pipeline failed:\n{err[-3000:]}")
    report = json.loads(out.strip().splitlines()[-1])
    comments = report["records"]["comments"] + sum(report["records"]["rejected"].values())  # approx. comment lines
    return {
        "seconds_pipeline": report["seconds"],
        "seconds_process": round(wall, 2),
        "cpu_s": round(report["cpu_s"], 2),
        "records": report["records"]["seen"],
        "records_per_s": round(report["records"]["seen"] / report["seconds"]),
        "comment_lines_approx": comments,
        "conversations": report["conversations"]["kept"],
        "timings": report["timings"],
        "partitions": report["partitions"],
        "processes": report["processes"],
        "peak_rss_tree_mib": round(peak_rss / 2**20, 1),
        "peak_pss_tree_mib": round(peak_pss / 2**20, 1),
        "max_rss_single_mib": round(peak_single / 2**20, 1),
        "stats": {k: report[k] for k in ("records", "comments", "conversations", "splits")},
    }


def main() -> None:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--formats", nargs="+", default=["zst", "ndjson"], choices=["zst", "ndjson"])
    ap.add_argument("--num-proc", type=int, default=2)
    ap.add_argument("--mode", default="paths", choices=["paths", "pairs"])
    ap.add_argument("--out", default=str(RESULTS / "reddit_pipeline.json"))
    ap.add_argument("--tmp", default=None, help="where to generate the dumps (default: a temporary directory)")
    args = ap.parse_args()

    from lmforge.data.reddit_synth import SynthRedditConfig, synth_reddit

    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for size in args.sizes:
            for fmt in args.formats:
                dump = Path(tmp) / f"dump-{size}-{fmt}"
                synth_reddit(SynthRedditConfig(out=str(dump), comments=size, plain=fmt == "ndjson", seed=0), verbose=False)
                in_bytes = sum(f.stat().st_size for f in dump.iterdir() if f.name.startswith(("RC_", "RS_")))
                settings = {"inputs": [str(dump)], "out": str(Path(tmp) / f"out-{size}-{fmt}"),
                            "num_proc": args.num_proc, "mode": args.mode}
                res = {"comments": size, "format": fmt, "input_mb": round(in_bytes / 1e6, 1), **measure(settings)}
                res["comments_per_s"] = round(size / res["seconds_pipeline"])
                rows.append(res)
                print(f"{size:>9,} comments {fmt:6s} {res['input_mb']:7.1f} MB in: {res['seconds_pipeline']:6.1f} s "
                      f"({res['comments_per_s']:,}/s comments, {res['records_per_s']:,}/s records), cpu {res['cpu_s']} s, "
                      f"peak RSS tree {res['peak_rss_tree_mib']:,.0f} MiB, PSS tree {res['peak_pss_tree_mib']:,.0f} MiB, "
                      f"max single {res['max_rss_single_mib']:,.0f} MiB, {res['partitions']} partitions", flush=True)
                for p in (dump, Path(settings["out"])):
                    for f in sorted(p.rglob("*"), reverse=True):
                        f.unlink() if f.is_file() else f.rmdir()
    ratios = {}
    for fmt in args.formats:
        by = {r["comments"]: r for r in rows if r["format"] == fmt}
        if len(by) >= 2:
            lo, hi = by[min(by)], by[max(by)]
            ratios[fmt] = {k: round(hi[k] / lo[k], 2) for k in ("peak_rss_tree_mib", "peak_pss_tree_mib", "max_rss_single_mib")}
    result = {
        "benchmark": "reddit_pipeline",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "python": platform.python_version(),
        "load_average_at_end": os.getloadavg(),
        "mode": args.mode,
        "runs": rows,
        "memory_ratio_largest_over_smallest": ratios,
    }
    write_results(args.out, result)
    print(f"ratios (largest / smallest size): {json.dumps(ratios)}")


if __name__ == "__main__":
    main()
