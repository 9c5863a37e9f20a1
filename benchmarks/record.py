"""What every benchmark stores with its results: the machine it ran on.

The same code runs 55-230x slower in bf16 on an AVX2 CPU than on an AVX512-BF16 one
(issue 15), so a figure without its machine says little. ``write_results`` adds
``lmforge.hardware.benchmark_record()`` (the capability line: CPU model, ISA, torch's kernel
level and the environment variables that cap it, usable cores, memory, bf16 native or
emulated; the probe's measured GEMM rates; the whole probe) and the date, writes the JSON and
prints the capability line. Every script in ``benchmarks/`` writes through it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    from lmforge.hardware import benchmark_record

    record = benchmark_record()
    record["measured_at"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    record["load_average"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return record


def write_results(path: str | Path, results: Any) -> Path:
    """Write ``results`` (a mapping, or rows under ``"rows"``) with ``"machine"`` to ``path``."""
    body = dict(results) if isinstance(results, dict) else {"rows": results}
    body["machine"] = machine()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body, indent=2) + "\n")
    print(f"machine: {body['machine']['capability']}\nwrote {path}")
    return path
