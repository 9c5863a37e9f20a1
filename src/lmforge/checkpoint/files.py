"""Where a checkpoint's files are, and what they say: resolve a path, list a run's
checkpoints, read config.json, copy the tokenizer / chat-template side files, and undo what a
kill during a save left behind. No torch here: these run before any model is built.

A checkpoint is a directory::

    model.safetensors      weights (no pickle anywhere: safe to load from strangers)
    config.json            {"format": "lmforge", "model": {GPTConfig fields}, ...}
    tokenizer.json         the Hugging Face tokenizers file
    (sidecars)             tokenizer_config.json, chat_template.jinja, ... of an imported model

or an adapter directory (``adapter_model.safetensors``, see :mod:`.adapters`). A run
directory keeps them as ``checkpoints/step_NNNNNNN``; anything that takes a checkpoint also
accepts the run directory and picks its newest one. Training checkpoints add optimizer
files, which :mod:`lmforge.train.state` writes and reads.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

from ..errors import LmforgeError
from ..fileio import read_json_object

STEP_DIR = re.compile(r"^step_(\d+)$")
WEIGHTS = "model.safetensors"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

#: Files besides the weights that travel with a model (tokenizer settings, chat template).
SIDECAR_FILES = (
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
)


def copy_sidecars(src: Path, dst: Path) -> None:
    """Copy the :data:`SIDECAR_FILES` that ``src`` has into ``dst``."""
    for name in SIDECAR_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    ckdir = Path(run_dir) / "checkpoints"
    if not ckdir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckdir.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (its newest checkpoint)."""
    p = Path(path)
    if not p.exists():
        raise LmforgeError(f"checkpoint not found: {path}")
    if (p / WEIGHTS).is_file() or (p / ADAPTER_WEIGHTS).is_file():
        return p
    found = list_checkpoints(p)
    if found:
        return found[-1]
    raise LmforgeError(
        f"{path} holds no checkpoint (expected model.safetensors, adapter_model.safetensors or checkpoints/step_*)"
    )


def read_config(ckpt: Path) -> dict[str, Any]:
    cfg = read_json_object(ckpt / "config.json", "an lmforge checkpoint's config")
    if not isinstance(cfg.get("model"), dict):
        raise LmforgeError(f"{ckpt}/config.json is not an lmforge config (no 'model' section)")
    return cfg


def recover_checkpoints(run_dir: str | Path) -> list[str]:
    """Undo what a kill during a save left in ``run_dir/checkpoints`` (see fileio.staged_dir):
    a ``.tmp-step_N-PID`` folder is an unfinished save (removed); a ``.old-step_N-PID`` folder
    is a replaced checkpoint, put back if its replacement never arrived, else removed; a
    ``.step_N.optimizer-shards`` folder is an unfinished FSDP save (removed). Folders of a
    process that is still alive are left alone. Returns what was done, one line each."""
    ckdir = Path(run_dir) / "checkpoints"
    if not ckdir.is_dir():
        return []
    done = []
    for p in sorted(ckdir.iterdir()):
        m = re.match(r"^\.(tmp|old)-(.+)-(\d+)$", p.name)
        shards = re.match(r"^\.(step_\d+)\.optimizer-shards$", p.name)
        if m and _alive(int(m.group(3))):
            continue
        if m and m.group(1) == "old" and not (ckdir / m.group(2)).exists():
            os.replace(p, ckdir / m.group(2))
            done.append(f"restored {m.group(2)} (its replacement was never completed)")
        elif m or shards:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            done.append(f"removed {p.name} (left by an interrupted save)")
    return done


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftovers from an earlier save that failed
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
