"""Checkpoints: safetensors weights + JSON config + tokenizer.json (+ training state).

A checkpoint is a directory::

    model.safetensors      weights (no pickle anywhere: safe to load from strangers)
    config.json            {"format": "lmforge", "model": {GPTConfig fields}, ...}
    tokenizer.json         the Hugging Face tokenizers file
    optimizer.safetensors  optimizer tensors and RNG states         (training checkpoints only)
    trainer_state.json     step, data position, optimizer scalars    (training checkpoints only)

A run sharded with FSDP writes its optimizer tensors as ``optimizer/`` instead: one
safetensors file per rank holding that rank's shards, with their offsets in the file
headers (``torch.distributed.checkpoint``'s Hugging Face storage; no pickle either). The
weights are gathered into the one ``model.safetensors`` as for any run. Either form resumes
at any world size, sharded or not: the sharded form is read back resliced to the shards of
the resuming run, the whole form is sliced to them.

It is written to a temporary sibling directory and renamed into place, so a crash
mid-write never leaves a half checkpoint under the final name. A run directory keeps
them as ``checkpoints/step_NNNNNNN``; anything that takes a checkpoint also accepts
the run directory and picks its newest one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .. import __version__
from ..config import from_dict, to_dict
from ..errors import ConfigError, LmforgeError
from ..fileio import atomic_write_json, save_safetensors, staged_dir
from ..model import quant
from ..model.gpt import GPT, GPTConfig, check_finite, check_state_dict

STEP_DIR = re.compile(r"^step_(\d+)$")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP and torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def _flatten_optimizer(states: list[dict], sharded: bool = False) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Optimizer tensors by name (``optim.{optimizer}.{param index}.{key}``) and the rest as
    JSON-able metadata. ``sharded``: keep the tensors as they are (FSDP's DTensor shards)."""
    tensors: dict[str, torch.Tensor] = {}
    meta: list[dict] = []
    for i, sd in enumerate(states):
        scalars: dict[str, dict[str, Any]] = {}
        keys: dict[str, list[str]] = {}
        for pid, st in sd["state"].items():
            keys[str(pid)] = list(st)
            for k, v in st.items():
                if torch.is_tensor(v):
                    tensors[f"optim.{i}.{pid}.{k}"] = v.detach() if sharded else v.detach().contiguous().cpu()
                else:
                    scalars.setdefault(str(pid), {})[k] = v
        meta.append({"param_groups": sd["param_groups"], "keys": keys, "scalars": scalars})
    return tensors, meta


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: list[dict]) -> list[dict]:
    states = []
    for i, m in enumerate(meta):
        state: dict[int, dict[str, Any]] = {}
        for pid, keys in m["keys"].items():
            st = {}
            for k in keys:
                name = f"optim.{i}.{pid}.{k}"
                st[k] = tensors[name] if name in tensors else m["scalars"][pid][k]
            state[int(pid)] = st
        groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in m["param_groups"]]
        states.append({"state": state, "param_groups": groups})
    return states


def save_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    tokenizer_file: str | Path | None,
    *,
    optimizer=None,
    trainer_state: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    sidecars_from: str | Path | None = None,
    base_checkpoint: str | Path | None = None,
    weights: dict[str, torch.Tensor] | None = None,
    sharded_optimizer: Path | None = None,
) -> Path:
    """Write a checkpoint atomically to ``path`` (replacing one already there).

    ``weights``: the model's whole state dict when ``model`` itself holds shards (FSDP,
    gathered by the caller). ``sharded_optimizer``: a directory of optimizer shards written by
    :func:`save_sharded_optimizer`, moved into the checkpoint as ``optimizer/`` (the optimizer's
    scalars still go to trainer_state.json).

    A model carrying a parameter-efficient adapter (``model.peft``) is saved as an *adapter
    checkpoint*: only the adapter's tensors (see :mod:`lmforge.model.peft.io`) and the path of
    ``base_checkpoint``, which :func:`load_model` loads first. ``sidecars_from`` copies an
    imported model's tokenizer and chat-template files."""
    path = Path(path)
    with staged_dir(path) as tmp:
        net = unwrap(model)
        config = {"format": "lmforge", "lmforge_version": __version__, "model": to_dict(net.config), **(extra or {})}
        if getattr(net, "peft", None) is not None:
            from ..model.peft.io import save_adapter

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
            from ..io.hf import copy_sidecars

            copy_sidecars(Path(sidecars_from), tmp)
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, tmp / "tokenizer.json")
        if optimizer is not None:
            tensors, meta = _flatten_optimizer(optimizer.state_dicts(), sharded=sharded_optimizer is not None)
            if sharded_optimizer is not None:
                shutil.move(str(sharded_optimizer), str(tmp / "optimizer"))
            else:
                save_safetensors({**tensors, **_rng_tensors()}, tmp / "optimizer.safetensors")
            atomic_write_json(tmp / "trainer_state.json", {**(trainer_state or {}), "optimizer": meta})
    return path


def _rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    return tensors


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


def save_sharded_optimizer(out: Path, optimizer) -> None:
    """Every rank writes its shards of the optimizer tensors (FSDP's DTensors) and the RNG
    state into directory ``out`` (a collective): one safetensors file per rank, offsets in
    the headers. The directory must be on storage all ranks share."""
    import torch.distributed.checkpoint as dcp

    tensors, _ = _flatten_optimizer(optimizer.state_dicts(), sharded=True)
    dcp.save({**tensors, **_rng_tensors()}, storage_writer=dcp.HuggingFaceStorageWriter(str(out), save_distributed=True))


def _read_sharded_optimizer(folder: Path, optimizer) -> dict[str, torch.Tensor]:
    """The tensors of an ``optimizer/`` directory, each read as the resuming run holds it: a
    state tensor shaped like its (sharded) parameter comes back as that parameter's shard,
    anything else whole. Saved and resuming world sizes may differ."""
    import torch.distributed.checkpoint as dcp

    saved = dcp.HuggingFaceStorageReader(str(folder)).read_metadata().state_dict_metadata
    params = _params_by_index(optimizer)
    target: dict[str, torch.Tensor] = {}
    for name, md in saved.items():
        dtype = md.properties.dtype
        p = None
        if name.startswith("optim."):
            _, i, pid, _key = name.split(".", 3)
            p = params[int(i)][int(pid)] if int(i) < len(params) and int(pid) < len(params[int(i)]) else None
        if p is not None and tuple(md.size) == tuple(p.shape):
            target[name] = torch.zeros_like(p, dtype=dtype)
        else:
            target[name] = torch.zeros(tuple(md.size), dtype=dtype)
    dcp.load(target, storage_reader=dcp.HuggingFaceStorageReader(str(folder)))
    return target


def _params_by_index(optimizer) -> list[list[torch.Tensor]]:
    """Each optimizer's parameters in state-dict index order."""
    return [[p for g in opt.param_groups for p in g["params"]] for opt in optimizer.optimizers]


def _shard_like_parameters(tensors: dict[str, torch.Tensor], optimizer) -> dict[str, torch.Tensor]:
    """Whole optimizer tensors (optimizer.safetensors) cut to the shards of a sharded run's parameters."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = _params_by_index(optimizer)
    out = dict(tensors)
    for name, t in tensors.items():
        if not name.startswith("optim."):
            continue
        _, i, pid, _key = name.split(".", 3)
        if int(i) >= len(params) or int(pid) >= len(params[int(i)]):
            continue  # another optimizer layout: loading the state dicts says what differs
        p = params[int(i)][int(pid)]
        if isinstance(p, DTensor) and tuple(t.shape) == tuple(p.shape):
            out[name] = distribute_tensor(t.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
    return out


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    ckdir = Path(run_dir) / "checkpoints"
    if not ckdir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckdir.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


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


def check_fresh_run(out_dir: str | Path, resume: bool, overwrite: bool) -> None:
    """Refuse to start a new run over a run directory that holds checkpoints (they would pass
    for the new run's, or be resumed by mistake) unless resuming or overwriting."""
    if not resume and not overwrite and list_checkpoints(out_dir):
        raise ConfigError(
            f"{out_dir} already holds checkpoints: pass --resume to continue, overwrite=true to start afresh, "
            "or choose another out_dir"
        )


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (its newest checkpoint)."""
    p = Path(path)
    if not p.exists():
        raise LmforgeError(f"checkpoint not found: {path}")
    if (p / "model.safetensors").is_file() or (p / "adapter_model.safetensors").is_file():
        return p
    found = list_checkpoints(p)
    if found:
        return found[-1]
    raise LmforgeError(
        f"{path} holds no checkpoint (expected model.safetensors, adapter_model.safetensors or checkpoints/step_*)"
    )


def read_config(ckpt: Path) -> dict[str, Any]:
    try:
        cfg = json.loads((ckpt / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LmforgeError(f"{ckpt} has no config.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LmforgeError(f"{ckpt}/config.json is not valid JSON: {e}") from None
    except RecursionError:
        raise LmforgeError(f"{ckpt}/config.json is nested too deeply to be a config") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        raise LmforgeError(f"{ckpt}/config.json is not an lmforge config (no 'model' section)")
    return cfg


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
        from ..model.peft.io import load_adapter

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
        from ..model.gpt import rope_tables

        cos, sin = rope_tables(cfg.head_dim, cfg.context_length, cfg.rope_theta)
        model.rope_cos, model.rope_sin = cos.to(device), sin.to(device)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise LmforgeError(f"{ckpt}: no weights for {left[:3]}")
    if quantize is not None:
        quant.quantize_model(model, quantize, group_size)
    return model, ckpt


def load_training_state(ckpt: Path, optimizer) -> dict[str, Any]:
    """Restore optimizer and RNG state in place; return the trainer state (step, data position)."""
    try:
        state = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
        if (ckpt / "optimizer").is_dir():  # shards of an FSDP run
            tensors = _read_sharded_optimizer(ckpt / "optimizer", optimizer)
        else:
            tensors = _shard_like_parameters(load_file(str(ckpt / "optimizer.safetensors")), optimizer)
    except FileNotFoundError:
        raise LmforgeError(f"{ckpt} is a weights-only checkpoint; it cannot resume training") from None
    except (json.JSONDecodeError, SafetensorError, OSError) as e:
        raise LmforgeError(f"{ckpt}: training state cannot be read: {e}") from None
    optimizer.load_state_dicts(_unflatten_optimizer(tensors, state.pop("optimizer")))
    torch.set_rng_state(tensors["rng.cpu"])
    cuda_states = [tensors[k] for k in sorted(t for t in tensors if t.startswith("rng.cuda."))]
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    return state
