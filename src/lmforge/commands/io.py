"""``lmforge import`` and ``lmforge export``: Hugging Face directories and GGUF files to and from
lmforge checkpoints. Configs and run functions only; the conversions are :mod:`.hf` and
:mod:`.gguf` (imported when a command runs)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..config import CHECKPOINT_HELP, option


@dataclass(kw_only=True)
class ImportConfig:
    source: str = option(help="HF model directory, hub id (org/name), or a .gguf file", positional=True)
    out: str = option(help="checkpoint directory to write", positional=True)
    overwrite: bool = option(False, "replace an existing output directory")


def run_import(cfg: ImportConfig) -> None:
    if cfg.source.lower().endswith(".gguf"):
        from ..io.gguf import import_gguf

        path = import_gguf(cfg.source, cfg.out, overwrite=cfg.overwrite)
    else:
        from ..io.hf import import_hf

        path = import_hf(cfg.source, cfg.out, overwrite=cfg.overwrite)
    print(f"imported {cfg.source} -> {path}")


@dataclass(kw_only=True)
class ExportConfig:
    checkpoint: str = option(help=CHECKPOINT_HELP, positional=True)
    format: Literal["hf", "gguf"] = option()
    dtype: Literal["f32", "f16", "q8_0"] = option("f16", "GGUF tensor type (default f16)")
    out: str = option(help="output directory (hf) or .gguf file (gguf)", positional=True)
    overwrite: bool = option(False, "replace an existing output")


def run_export(cfg: ExportConfig) -> None:
    from ..checkpoint import resolve_checkpoint

    ckpt = resolve_checkpoint(cfg.checkpoint)
    if cfg.format == "hf":
        from ..io.hf import export_hf

        path = export_hf(ckpt, cfg.out, overwrite=cfg.overwrite)
    else:
        from ..io.gguf import export_gguf

        path = export_gguf(ckpt, cfg.out, dtype=cfg.dtype, overwrite=cfg.overwrite)
    print(f"exported {ckpt} -> {path}")
