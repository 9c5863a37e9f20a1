"""Model weights in a checkpoint: write a model (or its adapter) with its config and
tokenizer atomically, and load a checkpoint's model (plain, quantized, or an adapter over its
base). The files and paths themselves are :mod:`.files`; training state is
:mod:`lmforge.train.state`, which adds its files through ``save_checkpoint(also=...)``.

A checkpoint is written to a temporary sibling directory and renamed into place, so a crash
mid-write never leaves a half checkpoint under the final name.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .. import __version__
from ..config import from_dict, to_dict
from ..errors import LmforgeError
from ..fileio import atomic_write_json, save_safetensors, staged_dir
from ..model import quant
from ..model.gpt import GPT, GPTConfig, check_finite, check_state_dict, rope_tables
from .adapters import load_adapter, save_adapter
from .files import copy_sidecars, read_config, resolve_checkpoint


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP and torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def save_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    tokenizer_file: str | Path | None,
    *,
    extra: dict[str, Any] | None = None,
    sidecars_from: str | Path | None = None,
    base_checkpoint: str | Path | None = None,
    weights: dict[str, torch.Tensor] | None = None,
    also: Callable[[Path], None] | None = None,
) -> Path:
    """Write a checkpoint atomically to ``path`` (replacing one already there).

    ``weights``: the model's whole state dict when ``model`` itself holds shards (FSDP,
    gathered by the caller). ``also``: called with the staging directory to add more files
    within the same atomic write (training state: :func:`lmforge.train.state.save_training_checkpoint`).

    A model carrying a parameter-efficient adapter (``model.peft``) is saved as an *adapter
    checkpoint*: only the adapter's tensors (see :mod:`.adapters`) and the path of
    ``base_checkpoint``, which :func:`load_model` loads first. ``sidecars_from`` copies an
    imported model's tokenizer and chat-template files."""
    path = Path(path)
    with staged_dir(path) as tmp:
        net = unwrap(model)
        config = {"format": "lmforge", "lmforge_version": __version__, "model": to_dict(net.config), **(extra or {})}
        if getattr(net, "peft", None) is not None:
            if base_checkpoint is None:
                raise LmforgeError("an adapter checkpoint needs the path of its base checkpoint")
            base = str(Path(base_checkpoint).resolve())
            with _whole_parameters(net, weights):
                save_adapter(tmp, net, base_checkpoint=base)
            config["adapter"] = {"method": net.peft.cfg.method, "base_checkpoint": base}
        else:
            sd = net.state_dict() if weights is None else weights
            save_safetensors({k: v.detach().contiguous().cpu() for k, v in sd.items()}, tmp / "model.safetensors",
                             metadata={"format": "pt"})
            if getattr(net, "quantization", None):  # set by model.quant.quantize_model
                config["quantization"] = net.quantization
        atomic_write_json(tmp / "config.json", config)
        if sidecars_from is not None:
            copy_sidecars(Path(sidecars_from), tmp)
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, tmp / "tokenizer.json")
        if also is not None:
            also(tmp)
    return path


@contextmanager
def _whole_parameters(net: torch.nn.Module, weights: dict[str, torch.Tensor] | None) -> Iterator[None]:
    """Within the block, ``net``'s parameters named in ``weights`` are those whole tensors
    (FSDP shards swapped out on the saving rank, so code that reads parameters sees them whole)."""
    swapped = []
    try:
        for name, t in (weights or {}).items():
            owner, _, leaf = name.rpartition(".")
            module = net.get_submodule(owner)
            old = module._parameters.get(leaf)
            if old is not None:
                swapped.append((module, leaf, old))
                module._parameters[leaf] = torch.nn.Parameter(t, requires_grad=old.requires_grad)
        yield
    finally:
        for module, leaf, old in swapped:
            module._parameters[leaf] = old


_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
_LAYER_KEY = re.compile(r"^layers\.(\d+)\.")


def check_weights_file(path: Path, cfg: GPTConfig, quantized: bool) -> None:
    """Check a checkpoint's safetensors header against its config before anything is allocated:
    the layers present, the embedding's shape, the dtypes (floating point, or the integer
    tensors of a quantized checkpoint). A config that claims 1e5 layers or a 1e9-wide model
    over a small file is refused here, in milliseconds, instead of building modules for minutes."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            shapes = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise LmforgeError(f"{path} cannot be read: {e}") from None
    layers = {int(m.group(1)) for k in shapes if (m := _LAYER_KEY.match(k))}
    if layers != set(range(cfg.n_layer)):
        have = f"layers 0..{max(layers)}" if layers else "no layers"
        raise LmforgeError(f"{path}: the config has {cfg.n_layer} layers, the weights hold {have}")
    emb = shapes.get("embed_tokens.weight")
    if emb is None or emb[0] != (cfg.vocab_size, cfg.n_embd):
        raise LmforgeError(f"{path}: embed_tokens.weight is {emb[0] if emb else 'missing'}; the config needs "
                           f"{(cfg.vocab_size, cfg.n_embd)}")
    bad = [k for k, (_, dtype) in shapes.items() if dtype not in _FLOAT_DTYPES and not (quantized and "_int" in k)]
    if bad:
        raise LmforgeError(f"{path}: {bad[0]} is stored as {shapes[bad[0]][1]}; model weights must be floating point "
                           "(a quantized checkpoint says so in its config.json)")


def load_model(
    path: str | Path, device: str | torch.device = "cpu", quantize: str | None = None, group_size: int = 32
) -> tuple[GPT, Path]:
    """The model of a checkpoint (or of a run's newest checkpoint) and the resolved path.

    A quantized checkpoint (config.json ``quantization``) loads as saved. ``quantize``
    (none|bf16|int8|int4, int4 with ``group_size``) quantizes a full-precision checkpoint
    after loading; asking a quantized checkpoint for another method is an error."""
    ckpt = resolve_checkpoint(path)
    full_config = read_config(ckpt)
    if not (ckpt / "model.safetensors").is_file():  # an adapter checkpoint: its base, then the adapter
        base = (full_config.get("adapter") or {}).get("base_checkpoint")
        if not base:
            raise LmforgeError(f"{ckpt} is an adapter without a base_checkpoint in its config.json")
        if not Path(base).exists():
            raise LmforgeError(f"the base checkpoint of adapter {ckpt} is missing: {base}")
        model, _ = load_model(base, device, quantize, group_size)
        return load_adapter(model, ckpt), ckpt
    cfg = from_dict(GPTConfig, full_config["model"], "model")
    stored = quant.read_spec(full_config, str(ckpt))
    quantize = quant.resolve_request(stored, quantize, str(ckpt))
    check_weights_file(ckpt / "model.safetensors", cfg, stored is not None)
    try:
        weights = load_file(str(ckpt / "model.safetensors"), device=str(device))
    except (SafetensorError, OSError) as e:
        raise LmforgeError(f"{ckpt}/model.safetensors cannot be read: {e}") from None
    check_finite(weights, f"{ckpt}/model.safetensors")
    if stored is None:  # names and shapes, before they become parameters
        check_state_dict(weights, cfg, str(ckpt))
    with torch.device("meta"):
        model = GPT(cfg)
        if stored is not None:
            quant.apply_structure(model, stored)
            quant.check_weights(model, weights, str(ckpt))
    # The loaded tensors become the parameters (assign=True, no second copy; SmolLM2's
    # load peak fell from 1.3 to 0.8 GiB). The int8 kernel crashed on int8 tensors taken
    # directly from the safetensors buffer, so quantized integer weights are copied into
    # fresh storage (measured: this peaks lower than copying every tensor).
    missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    del weights
    if stored is not None:
        for module in model.modules():
            for name in ("weight_int8", "weight_int4"):
                if isinstance(getattr(module, name, None), torch.Tensor):
                    setattr(module, name, getattr(module, name).clone())
    if missing or unexpected:
        raise LmforgeError(
            f"{ckpt}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    if stored is None:
        model.float()  # plain checkpoints load as fp32 whatever their stored dtype
    if cfg.pos_embedding == "rope":  # non-persistent buffers are rebuilt, not stored
        cos, sin = rope_tables(cfg.head_dim, cfg.context_length, cfg.rope_theta)
        model.rope_cos, model.rope_sin = cos.to(device), sin.to(device)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise LmforgeError(f"{ckpt}: no weights for {left[:3]}")
    if quantize is not None:
        quant.quantize_model(model, quantize, group_size)
    return model, ckpt
