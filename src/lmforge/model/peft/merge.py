"""`lmforge merge`: fold an adapter into its base and write an ordinary checkpoint."""

from __future__ import annotations

from pathlib import Path

from ...errors import LmforgeError
from ...fileio import refuse_existing


def merge_adapter(adapter: str | Path, out: str | Path, *, base: str | Path | None = None, overwrite: bool = False) -> Path:
    """Load ``base`` (default: the base the adapter names), apply the adapter in full
    precision (a QLoRA adapter merges into the unquantized base), fold it in and save."""
    from ...train.checkpoint import (
        load_model,
        read_config,
        resolve_checkpoint,
        save_checkpoint,
    )
    from . import merge_peft
    from .io import is_adapter_dir, load_adapter, read_adapter_meta

    path = Path(adapter)
    if not path.exists():
        raise LmforgeError(f"adapter not found: {adapter}")
    if not is_adapter_dir(path):
        path = resolve_checkpoint(path)
        if not is_adapter_dir(path):
            raise LmforgeError(f"{adapter} is a full checkpoint, not an adapter: there is nothing to merge")
    refuse_existing(out, overwrite)
    meta = read_adapter_meta(path)
    base_path = base or meta.get("base_checkpoint")
    if not base_path:
        raise LmforgeError(f"{path} does not name its base model; pass --base CHECKPOINT")
    if not Path(base_path).exists():
        raise LmforgeError(f"the base checkpoint {base_path} is missing; pass --base CHECKPOINT")
    base_ckpt = resolve_checkpoint(base_path)
    model, _ = load_model(base_ckpt)
    load_adapter(model, path, quantized_base=False)
    merge_peft(model)
    base_config = read_config(base_ckpt)
    extra = {"merged": {"adapter": str(path.resolve()), "base": str(base_ckpt.resolve()), "method": meta.get("method")}}
    for key in ("tokenizer", "labels"):
        cfg_here = read_config(path) if (path / "config.json").is_file() else {}
        if key in cfg_here or key in base_config:
            extra[key] = cfg_here.get(key, base_config.get(key))
    return save_checkpoint(Path(out), model, base_ckpt / "tokenizer.json", extra=extra, sidecars_from=base_ckpt)
