"""Training state in a checkpoint: optimizer tensors, RNG states, the trainer's position.

A training checkpoint is an ordinary checkpoint (:mod:`lmforge.checkpoint`) plus::

    optimizer.safetensors  optimizer tensors and RNG states
    trainer_state.json     step, data position, optimizer scalars

A run sharded with FSDP writes its optimizer tensors as ``optimizer/`` instead: one
safetensors file per rank holding that rank's shards, with their offsets in the file
headers (``torch.distributed.checkpoint``'s Hugging Face storage; no pickle either). The
weights are gathered into the one ``model.safetensors`` as for any run. Either form resumes
at any world size, sharded or not: the sharded form is read back resliced to the shards of
the resuming run, the whole form is sliced to them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..checkpoint import list_checkpoints, save_checkpoint
from ..errors import ConfigError, LmforgeError
from ..fileio import atomic_write_json, save_safetensors


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


def save_training_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    tokenizer_file: str | Path | None,
    *,
    optimizer,
    trainer_state: dict[str, Any] | None = None,
    sharded_optimizer: Path | None = None,
    **kwargs: Any,
) -> Path:
    """:func:`lmforge.checkpoint.save_checkpoint` plus the optimizer and RNG state (in the same
    atomic write). ``sharded_optimizer``: a directory of optimizer shards written by
    :func:`save_sharded_optimizer`, moved into the checkpoint as ``optimizer/`` (the
    optimizer's scalars still go to trainer_state.json). ``kwargs`` go to ``save_checkpoint``."""

    def write_state(tmp: Path) -> None:
        tensors, meta = _flatten_optimizer(optimizer.state_dicts(), sharded=sharded_optimizer is not None)
        if sharded_optimizer is not None:
            shutil.move(str(sharded_optimizer), str(tmp / "optimizer"))
        else:
            save_safetensors({**tensors, **_rng_tensors()}, tmp / "optimizer.safetensors")
        atomic_write_json(tmp / "trainer_state.json", {**(trainer_state or {}), "optimizer": meta})

    return save_checkpoint(path, model, tokenizer_file, also=write_state, **kwargs)


def _rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    return tensors


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


def check_fresh_run(out_dir: str | Path, resume: bool, overwrite: bool) -> None:
    """Refuse to start a new run over a run directory that holds checkpoints (they would pass
    for the new run's, or be resumed by mistake) unless resuming or overwriting."""
    if not resume and not overwrite and list_checkpoints(out_dir):
        raise ConfigError(
            f"{out_dir} already holds checkpoints: pass --resume to continue, overwrite=true to start afresh, "
            "or choose another out_dir"
        )


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
