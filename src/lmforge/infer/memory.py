"""How much memory the inference engine may give its KV cache, decided when it starts.

The cache is the one part of inference whose size a caller chooses (rows x positions), so
absurd settings are refused here with the numbers, before anything is allocated: a
``--max-batch-size 100000`` server used to allocate until the kernel's OOM killer stopped it
at 23 GB. The budget the engine then admits requests against is the smaller of what its
settings could ever use and a share of the memory available now.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ConfigError

#: Share of the available memory the KV cache may take by default (the model, activations,
#: the tokenizer and the server need the rest).
KV_SHARE = 0.5
#: Positions per row that every row of ``max_batch_size`` must at least be able to hold.
MIN_ROW_POSITIONS = 256


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _cgroup_room() -> int | None:
    """Bytes left under this process's cgroup (v2) memory limit, if it has one."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        return max(0, int(limit) - used)
    except (OSError, ValueError):
        return None


def available_bytes(device: torch.device | str = "cpu") -> int | None:
    """Memory available for new allocations on ``device`` now, or None when unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    found = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        found = None
    if found is None:
        try:
            import psutil

            found = int(psutil.virtual_memory().available)
        except ImportError:
            return None
    room = _cgroup_room()
    return found if room is None else min(found, room)


def kv_cache_budget(
    bytes_per_position: int,
    max_batch_size: int,
    positions_per_row: int,
    *,
    requested: int | None = None,
    available: int | None = None,
) -> int:
    """Bytes the KV cache may use: ``requested`` (checked), or what ``max_batch_size`` rows of
    ``positions_per_row`` could use, capped at :data:`KV_SHARE` of ``available``. Settings
    that cannot fit even so are a :class:`ConfigError` naming the numbers."""
    one_row = positions_per_row * bytes_per_position
    if requested is not None:
        if requested < one_row:
            raise ConfigError(
                f"the KV-cache budget of {_gib(requested)} does not hold one sequence of the full context "
                f"({positions_per_row} positions need {_gib(one_row)}): raise it or lower the maximum sequence length"
            )
        if available is not None and requested > available:
            raise ConfigError(f"the KV-cache budget of {_gib(requested)} exceeds the {_gib(available)} available")
        return requested
    whole = max_batch_size * one_row
    if available is None:
        return whole
    usable = int(available * KV_SHARE)
    if one_row > usable:
        raise ConfigError(
            f"one sequence of the full context ({positions_per_row} positions) needs {_gib(one_row)} of KV cache; "
            f"{_gib(available)} of memory is available ({int(KV_SHARE * 100)}% may go to the cache): "
            "lower the maximum sequence length (--max-seq-len)"
        )
    least = max_batch_size * min(MIN_ROW_POSITIONS, positions_per_row) * bytes_per_position
    if least > usable:
        raise ConfigError(
            f"a batch of {max_batch_size} sequences needs at least {_gib(least)} of KV cache "
            f"({min(MIN_ROW_POSITIONS, positions_per_row)} positions each); {_gib(available)} of memory is "
            f"available ({int(KV_SHARE * 100)}% may go to the cache): lower the maximum batch size (--max-batch-size)"
        )
    return min(whole, usable)
