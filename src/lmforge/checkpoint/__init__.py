"""Checkpoints: the layer above the model that knows about files.

- :mod:`.files`: resolve a checkpoint or run directory, list a run's checkpoints, read
  config.json, the tokenizer / chat-template side files, recovery after a killed save;
- :mod:`.weights`: save a model (or its adapter) atomically, load a checkpoint's model;
- :mod:`.adapters`: adapter directories (PEFT's file format where one exists);
- :mod:`.bundle`: :class:`Checkpoint`, one opened checkpoint (config, model, tokenizer, chat
  template, base of an adapter), and :func:`load_shared` (a base + adapters, weights read once).

Training state (optimizer, RNG, FSDP shards) is :mod:`lmforge.train.state`.
"""

from .adapters import is_adapter_dir, load_adapter, read_adapter_meta, read_adapter_weights, save_adapter
from .bundle import Checkpoint, load_shared, share_weights
from .files import (
    SIDECAR_FILES,
    copy_sidecars,
    list_checkpoints,
    read_config,
    recover_checkpoints,
    resolve_checkpoint,
)
from .weights import check_weights_file, load_model, save_checkpoint, unwrap

__all__ = [
    "SIDECAR_FILES",
    "Checkpoint",
    "check_weights_file",
    "copy_sidecars",
    "is_adapter_dir",
    "list_checkpoints",
    "load_adapter",
    "load_model",
    "load_shared",
    "read_adapter_meta",
    "read_adapter_weights",
    "read_config",
    "recover_checkpoints",
    "resolve_checkpoint",
    "save_adapter",
    "save_checkpoint",
    "share_weights",
    "unwrap",
]
