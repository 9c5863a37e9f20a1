"""Adapter files: only the trained tensors, in the PEFT directory format where one exists.

An adapter directory holds::

    adapter_model.safetensors   the adapter's tensors
    adapter_config.json         PEFT's LoraConfig (LoRA / DoRA on Llama-family models only)
    lmforge_adapter.json        method, settings, the base model's config and checkpoint

LoRA and DoRA adapters of a Llama-family model (the targets q/k/v/o/gate/up/down_proj) use
PEFT's tensor names (``base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight``) and
config, so ``PeftModel.from_pretrained`` loads them onto the exported Hugging Face model and
``vllm serve --enable-lora`` serves them. Those of a GPT-2-family model become LoRAs on GPT-2's
fused ``c_attn`` / ``c_proj`` / ``c_fc`` (:func:`to_peft_gpt2`). Other methods (and classification heads) keep
lmforge's names. :func:`load_adapter` also reads a LoRA adapter written by ``peft`` itself.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..config import from_dict, to_dict
from ..errors import LmforgeError
from ..fileio import atomic_write_json, save_safetensors
from ..model.hf_arch import hf_architecture
from ..model.peft import PROJECTIONS, PeftConfig, adapter_state_dict, apply_peft, projection_slices, resolve_targets
from ..model.peft.lora import LoRALinear, base_weight
from .files import ADAPTER_WEIGHTS, resolve_checkpoint

META_FILE = "lmforge_adapter.json"
WEIGHTS_FILE = ADAPTER_WEIGHTS
PEFT_CONFIG_FILE = "adapter_config.json"

_MINE = re.compile(r"^layers\.(\d+)\.(attn|mlp)\.\w+\.(lora_A|lora_B|lora_magnitude)\.(\w+)$")
_THEIRS = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)$"
)
_SUFFIX = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lora_magnitude": "lora_magnitude_vector"}
_PART = {v: k for k, v in _SUFFIX.items()}


def is_adapter_dir(path: Path) -> bool:
    return (path / WEIGHTS_FILE).is_file()


def _family(model) -> str | None:
    """``llama`` or ``gpt2``: the Hugging Face family the model exports to (None: no export)."""
    try:
        arch = hf_architecture(model.config)
    except LmforgeError:
        return None
    return "gpt2" if arch == "GPT2LMHeadModel" else "llama"


def _peft_naming(model, cfg: PeftConfig) -> str:
    """``peft`` (Llama-family names), ``peft-gpt2`` (GPT-2 names, fused c_attn) or ``lmforge``."""
    if cfg.method not in ("lora", "dora") or cfg.modules_to_save:
        return "lmforge"
    family = _family(model)
    targets = cfg.target_modules if cfg.target_modules != ["all-linear"] else list(PROJECTIONS)
    if family == "llama" and all(t in PROJECTIONS for t in targets):
        return "peft"
    if family == "gpt2":
        return "peft-gpt2"
    return "lmforge"


# GPT-2: lmforge's module in a layer -> Hugging Face's (Conv1D) module
_GPT2 = {"attn.qkv_proj": "attn.c_attn", "attn.o_proj": "attn.c_proj", "mlp.up_proj": "mlp.c_fc", "mlp.down_proj": "mlp.c_proj"}


def _lora_layers(model):
    for name, mod in model.named_modules():
        if isinstance(mod, LoRALinear):
            _, i, block, leaf = name.split(".")
            yield int(i), f"{block}.{leaf}", mod


def to_peft_gpt2(model) -> tuple[dict[str, torch.Tensor], dict[str, int], dict[str, float]]:
    """GPT-2's ``c_attn`` fuses q/k/v as lmforge does, so slice adapters on q, k and v become
    one LoRA of rank ``slices * r`` on ``c_attn``: the ``A`` matrices stacked, ``B``
    block-diagonal (exact: each output row still sees only its slice's update). Returns the
    tensors and PEFT's ``rank_pattern`` / ``alpha_pattern`` (alpha scaled to keep alpha / r)."""
    out: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for i, path, layer in _lora_layers(model):
        names = sorted(layer.slices, key=lambda n: layer.slices[n][0])
        R = layer.r * len(names)
        key = f"base_model.model.transformer.h.{i}.{_GPT2[path]}"
        A = torch.cat([layer.lora_A[n].detach() for n in names])
        B = torch.zeros(layer.out_features, R)
        for j, n in enumerate(names):
            s, e = layer.slices[n]
            B[s:e, j * layer.r : (j + 1) * layer.r] = layer.lora_B[n].detach()
        out[key + ".lora_A.weight"], out[key + ".lora_B.weight"] = A.contiguous(), B
        if layer.kind == "dora":
            m = base_weight(layer.base_layer).detach().float().norm(dim=1)
            for n in names:
                s, e = layer.slices[n]
                m[s:e] = layer.lora_magnitude[n].detach()
            out[key + ".lora_magnitude_vector"] = m
        if R != layer.r:
            ranks[_GPT2[path]] = R
            alphas[_GPT2[path]] = layer.alpha * len(names)
    return out, ranks, alphas


def from_peft_gpt2(weights: dict[str, torch.Tensor], model, cfg: PeftConfig) -> dict[str, torch.Tensor]:
    """Undo :func:`to_peft_gpt2` for an adapter lmforge wrote (its slices are in ``cfg``)."""
    out = {}
    for (i, path), slices in resolve_targets(model, cfg.target_modules).items():
        key = f"base_model.model.transformer.h.{i}.{_GPT2[path]}"
        try:
            A, B = weights[key + ".lora_A.weight"], weights[key + ".lora_B.weight"]
        except KeyError as e:
            raise LmforgeError(f"the adapter lacks {e.args[0]}") from None
        names = sorted(slices, key=lambda n: slices[n][0])
        r = cfg.r
        for j, n in enumerate(names):
            s, e = slices[n]
            out[f"layers.{i}.{path}.lora_A.{n}"] = A[j * r : (j + 1) * r]
            out[f"layers.{i}.{path}.lora_B.{n}"] = B[s:e, j * r : (j + 1) * r]
            if key + ".lora_magnitude_vector" in weights:
                out[f"layers.{i}.{path}.lora_magnitude.{n}"] = weights[key + ".lora_magnitude_vector"][s:e]
    return out


def to_peft_names(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in weights.items():
        m = _MINE.match(name)
        if m is None:
            raise LmforgeError(f"adapter tensor {name} has no PEFT name")
        i, block, part, target = m.groups()
        sub = "self_attn" if block == "attn" else "mlp"
        out[f"base_model.model.model.layers.{i}.{sub}.{target}.{_SUFFIX[part]}"] = t
    return out


def from_peft_names(weights: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    table = projection_slices(model)
    out = {}
    for name, t in weights.items():
        m = _THEIRS.match(name)
        if m is None:
            raise LmforgeError(f"adapter tensor {name!r} is not a PEFT LoRA tensor of a Llama-family model")
        i, _, target, part = m.groups()
        if target not in table:
            raise LmforgeError(f"adapter tensor {name!r} targets {target}, which this model does not have")
        path = table[target][int(i)][0]
        out[f"layers.{i}.{path}.{_PART[part]}.{target}"] = t
    return out


def save_adapter(out: Path, model, *, base_checkpoint: str | None, extra: dict[str, Any] | None = None) -> None:
    """Write ``model``'s adapter into directory ``out`` (which exists)."""
    handle = model.peft
    cfg: PeftConfig = handle.cfg
    weights = {k: v.contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    naming = _peft_naming(model, cfg)
    if naming != "lmforge":
        ranks: dict[str, int] = {}
        alphas: dict[str, float] = {}
        if naming == "peft":
            weights = to_peft_names(weights)
            targets = cfg.target_modules if cfg.target_modules != ["all-linear"] else list(PROJECTIONS)
        else:
            weights, ranks, alphas = to_peft_gpt2(model)
            targets = sorted({_GPT2[path] for _, path, _ in _lora_layers(model)})
        atomic_write_json(
            out / PEFT_CONFIG_FILE,
            {
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "r": cfg.r,
                "lora_alpha": cfg.alpha,
                "lora_dropout": cfg.dropout,
                "target_modules": targets,
                "rank_pattern": ranks,
                "alpha_pattern": alphas,
                "use_dora": cfg.method == "dora",
                "bias": "none",
                "fan_in_fan_out": naming == "peft-gpt2",
                "init_lora_weights": True,
                "inference_mode": True,
                "modules_to_save": None,
                "base_model_name_or_path": base_checkpoint,
            },
        )
    save_safetensors(weights, out / WEIGHTS_FILE, metadata={"format": "pt"})
    meta = {
        "format": "lmforge-adapter",
        "method": cfg.method,
        "naming": naming,
        "peft": to_dict(cfg),
        "base_model": to_dict(model.config),
        "base_checkpoint": base_checkpoint,
        **(extra or {}),
    }
    atomic_write_json(out / META_FILE, meta)


def read_adapter_meta(adapter_dir: Path) -> dict[str, Any]:
    """The adapter's lmforge metadata, or one built from a PEFT LoRA config written by ``peft``."""
    meta_path, peft_path = adapter_dir / META_FILE, adapter_dir / PEFT_CONFIG_FILE
    try:
        if meta_path.is_file():
            return json.loads(meta_path.read_text(encoding="utf-8"))
        if peft_path.is_file():
            pc = json.loads(peft_path.read_text(encoding="utf-8"))
            if pc.get("peft_type") != "LORA":
                raise LmforgeError(f"{adapter_dir}: only PEFT LoRA adapters can be loaded, this is {pc.get('peft_type')}")
            if pc.get("fan_in_fan_out") or pc.get("rank_pattern") or pc.get("alpha_pattern"):
                raise LmforgeError(
                    f"{adapter_dir}: PEFT adapters of GPT-2-style (Conv1D) models or with per-module ranks "
                    "written by other tools cannot be loaded; Llama-family LoRA/DoRA adapters can"
                )
            targets = pc.get("target_modules") or []
            if isinstance(targets, str):
                raise LmforgeError(f"{adapter_dir}: target_modules given as a regex ({targets!r}) is not supported")
            return {
                "method": "dora" if pc.get("use_dora") else "lora",
                "naming": "peft",
                "peft": {
                    "method": "dora" if pc.get("use_dora") else "lora",
                    "r": pc["r"],
                    "alpha": pc.get("lora_alpha", pc["r"]),
                    "dropout": pc.get("lora_dropout", 0.0),
                    "target_modules": sorted(targets),
                },
                "base_model": None,
                "base_checkpoint": pc.get("base_model_name_or_path"),
            }
    except json.JSONDecodeError as e:
        raise LmforgeError(f"{adapter_dir}: adapter metadata is not valid JSON: {e}") from None
    except KeyError as e:
        raise LmforgeError(f"{adapter_dir}/{PEFT_CONFIG_FILE} lacks {e}") from None
    raise LmforgeError(f"{adapter_dir} is not an adapter directory (no {META_FILE} or {PEFT_CONFIG_FILE})")


def read_adapter_weights(
    adapter_dir: Path, model, cfg: PeftConfig, meta: dict[str, Any] | None = None, device: str = "cpu"
) -> dict[str, torch.Tensor]:
    """The adapter's tensors under lmforge's names (PEFT-named files are mapped back)."""
    meta = meta if meta is not None else read_adapter_meta(adapter_dir)
    try:
        weights = load_file(str(adapter_dir / WEIGHTS_FILE), device=device)
    except (SafetensorError, OSError) as e:
        raise LmforgeError(f"{adapter_dir}/{WEIGHTS_FILE} cannot be read: {e}") from None
    if meta.get("naming") == "peft":
        return from_peft_names(weights, model)
    if meta.get("naming") == "peft-gpt2":
        return from_peft_gpt2(weights, model, cfg)
    return weights


def resolve_adapter(path: str | Path) -> Path:
    """An adapter directory, or a fine-tuning run's newest checkpoint."""
    adapter_dir = Path(path)
    if not adapter_dir.is_dir():
        raise LmforgeError(f"adapter not found: {adapter_dir}")
    if not is_adapter_dir(adapter_dir) and (adapter_dir / "checkpoints").is_dir():  # a fine-tuning run
        adapter_dir = resolve_checkpoint(adapter_dir)
    return adapter_dir


def load_adapter(model, adapter_dir: str | Path, *, quantized_base: bool = True):
    """Apply the adapter saved in ``adapter_dir`` to a loaded base ``model`` (in place; returned).

    The adapter must have been trained on this base: its recorded base config must equal the
    model's (else a clear error naming the differing settings), and every tensor must match
    a slot of the right shape. ``quantized_base=False`` ignores a QLoRA adapter's base
    quantization (for merging into the full-precision base)."""
    adapter_dir = resolve_adapter(adapter_dir)
    meta = read_adapter_meta(adapter_dir)
    base = meta.get("base_model")
    if base is not None:
        labels = int(base.get("num_labels") or 0)
        if labels and not model.config.num_labels:  # a classifier adapter carries its head
            model.add_classification_head(labels)
        mine = to_dict(model.config)
        diff = sorted(k for k in set(base) | set(mine) if base.get(k) != mine.get(k))
        if diff:
            shown = ", ".join(f"{k}: adapter {base.get(k)!r} vs model {mine.get(k)!r}" for k in diff[:4])
            raise LmforgeError(f"{adapter_dir} was trained on a different base model ({shown})")
    cfg = from_dict(PeftConfig, meta["peft"], "peft")
    if not quantized_base and cfg.quantize_base != "none":
        cfg.quantize_base = "none"
    weights = read_adapter_weights(adapter_dir, model, cfg, meta)
    apply_peft(model, cfg)
    slots = dict(model.named_parameters())
    expected = {n for n, p in slots.items() if p.requires_grad}
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise LmforgeError(
            f"{adapter_dir} does not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    with torch.no_grad():
        for name, t in weights.items():
            if tuple(slots[name].shape) != tuple(t.shape):
                raise LmforgeError(
                    f"{adapter_dir}: {name} has shape {tuple(t.shape)}, the model needs {tuple(slots[name].shape)}"
                )
            slots[name].copy_(t)
    if model.peft.allocator is not None:  # AdaLoRA: pruned singular values stay pruned
        model.peft.allocator = None
    return model
