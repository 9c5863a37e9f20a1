"""One opened checkpoint: its config, model, tokenizer, chat template and (for an adapter)
its base, so that callers stop rebuilding that bundle from paths.

``Checkpoint.open(path)`` resolves a checkpoint or run directory and reads config.json
(nothing else: opening is cheap); the model, tokenizer and template load on request.
:func:`load_shared` loads a base and several adapters over it reading the base's weights
once (``lmforge serve CKPT --adapter a=DIR --adapter b=DIR``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import from_dict
from ..errors import LmforgeError
from ..model import quant
from ..model.gpt import GPT, GPTConfig
from ..tokenizer import Tokenizer
from ..tokenizer.chat import ChatTemplate
from .adapters import load_adapter, read_adapter_meta, resolve_adapter
from .files import WEIGHTS, read_config, resolve_checkpoint
from .weights import load_model


@dataclass(frozen=True)
class Checkpoint:
    path: Path  # the resolved checkpoint directory
    config: dict[str, Any]  # its config.json

    @classmethod
    def open(cls, path: str | Path) -> Checkpoint:
        """A checkpoint directory, or a run directory's newest checkpoint."""
        ckpt = resolve_checkpoint(path)
        return cls(ckpt, read_config(ckpt))

    @property
    def model_config(self) -> GPTConfig:
        return from_dict(GPTConfig, self.config["model"], "model")

    @property
    def is_adapter(self) -> bool:
        return not (self.path / WEIGHTS).is_file()

    @property
    def base(self) -> Checkpoint | None:
        """The checkpoint an adapter checkpoint applies to (None for a full checkpoint)."""
        if not self.is_adapter:
            return None
        base = (self.config.get("adapter") or {}).get("base_checkpoint")
        if not base:
            raise LmforgeError(f"{self.path} is an adapter without a base_checkpoint in its config.json")
        return Checkpoint.open(base)

    @property
    def quantization(self) -> dict[str, Any] | None:
        return quant.read_spec(self.config, str(self.path))

    @property
    def tokenizer_file(self) -> Path:
        """Its tokenizer.json; an adapter checkpoint saved without one uses its base's."""
        own = self.path / "tokenizer.json"
        base = (self.config.get("adapter") or {}).get("base_checkpoint")
        if not own.is_file() and base:
            return Path(base) / "tokenizer.json"
        return own

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_file(self.tokenizer_file)

    def chat_template(self) -> ChatTemplate:
        """The template the checkpoint carries, or ChatML (see ChatTemplate.from_checkpoint)."""
        return ChatTemplate.from_checkpoint(self.path)

    def load_model(self, device: str | torch.device = "cpu", quantize: str | None = None, group_size: int = 32) -> GPT:
        """The model (an adapter checkpoint: its base with the adapter); see :func:`.weights.load_model`."""
        model, _ = load_model(self.path, device, quantize, group_size)
        return model


def share_weights(model: GPT, private: Sequence[str] = ()) -> GPT:
    """A second module tree over ``model``'s parameter and buffer tensors (no copy of them),
    except those of the modules named in ``private`` (e.g. ``lm_head``), which it gets its own
    copies of. Replacing a module of either tree (wrapping it in a LoRA, merging, quantizing)
    leaves the other alone; writing into a shared tensor in place would not."""
    keep_private = {id(t) for n, t in [*model.named_parameters(remove_duplicate=False),
                                       *model.named_buffers(remove_duplicate=False)]
                    if any(n == p or n.startswith(p + ".") for p in private)}
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()] if id(t) not in keep_private}
    return copy.deepcopy(model, memo)


def load_shared(
    path: str | Path,
    adapter_dirs: Sequence[Path],
    *,
    device: str | torch.device = "cpu",
    quantize: str | None = None,
    group_size: int = 32,
    adapt: Callable[[GPT, Path], GPT] = load_adapter,
) -> tuple[GPT, list[GPT], Checkpoint]:
    """The model of checkpoint ``path`` and one model per adapter directory, the base's
    weights read from disk once: each adapter model is ``adapt(copy, dir)`` over a
    :func:`share_weights` copy of the base (``adapt`` may merge the adapter: merging writes new
    tensors, never into the base's). ``quantize`` applies to the base as in ``load_model``,
    after the adapters were built from its full-precision weights. Returns the base, the
    adapter models and the opened checkpoint."""
    ckpt = Checkpoint.open(path)
    later = quant.resolve_request(ckpt.quantization, quantize, str(ckpt.path))  # refused before loading
    base = ckpt.load_model(device)
    models = []
    for d in adapter_dirs:
        # trained copies of base modules (modules_to_save) are written into the model in place
        private = (read_adapter_meta(resolve_adapter(d)).get("peft") or {}).get("modules_to_save") or []
        models.append(adapt(share_weights(base, private), Path(d)))
    if later is not None:
        quant.quantize_model(base, later, group_size)
    return base, models, ckpt

