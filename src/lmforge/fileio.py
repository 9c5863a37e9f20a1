"""Crash-safe file writes: write a temporary sibling, then ``os.replace`` it into place.

A reader therefore sees either the old file or the complete new one, never half a file.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import LmforgeError


def refuse_existing(path: str | os.PathLike[str], overwrite: bool) -> None:
    """Refuse to replace an existing file or non-empty directory unless ``overwrite`` is set."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise LmforgeError(f"{path} already exists and is not empty (choose another output or allow overwriting)")


def _temp_sibling(path: Path) -> Path:
    """An unused temporary name next to ``path`` (same filesystem, so the rename is atomic).
    Files are then created normally, so they get the usual permissions (umask), unlike mkstemp's 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; parent directories are created."""
    path = Path(path)
    tmp = _temp_sibling(path)
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented JSON (UTF-8, trailing newline) atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def atomic_copy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Copy ``src`` to ``dst`` atomically (safe even when both name the same file)."""
    dst = Path(dst)
    tmp = _temp_sibling(dst)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dst


@contextmanager
def staged_dir(out: str | os.PathLike[str], overwrite: bool = True) -> Iterator[Path]:
    """A temporary sibling directory of ``out`` to write into; renamed into place when the
    block succeeds, removed when it fails. Readers see the old output or the complete new
    one, never half of it. An existing ``out`` is replaced only with ``overwrite``."""
    out = Path(out)
    refuse_existing(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.parent / f".old-{out.name}-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        os.replace(tmp, out)


def _default_mode() -> int:
    """The mode a newly created file gets here (0o666 less the process umask)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def save_safetensors(tensors: dict[str, Any], path: str | os.PathLike[str], metadata: dict[str, str] | None = None) -> Path:
    """``safetensors.torch.save_file`` with the file's mode set as for any other file written.

    safetensors (0.8) writes through a private temporary file and renames it, so the weights came
    out 0600 while the config and tokenizer beside them were 0644: a checkpoint another user (or
    a server running under another account) could not read."""
    from safetensors.torch import save_file

    path = Path(path)
    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, _default_mode())
    return path


def read_json_object(path: str | os.PathLike[str], what: str) -> dict[str, Any]:
    """The JSON object in ``path`` (``what`` it holds, for the messages): a missing, undecodable,
    invalid, absurdly nested or non-object file is one LmforgeError naming the file. Model
    directories and checkpoints come from anywhere, so each of these is a user error."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LmforgeError(f"{path.parent} has no {path.name} ({what})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LmforgeError(f"{path} is not valid JSON: {e}") from None
    except RecursionError:
        raise LmforgeError(f"{path} is nested too deeply to be {what}") from None
    if not isinstance(data, dict):
        raise LmforgeError(f"{path} is not a JSON object ({what})")
    return data
