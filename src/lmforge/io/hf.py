"""Hugging Face interchange: ``import_hf`` (HF model directory -> lmforge checkpoint) and
``export_hf`` (lmforge checkpoint -> directory that ``transformers`` loads).

Supported Hugging Face architectures:

* ``GPT2LMHeadModel``: Conv1D weights are stored (in, out) and are transposed; ``c_attn``
  is already the fused q|k|v projection; learned positions, LayerNorm, tanh GELU.
* ``LlamaForCausalLM`` (SmolLM / SmolLM2 too): GQA, tied or untied embeddings, ``rope_theta``,
  ``rms_norm_eps``, ``attention_bias`` / ``mlp_bias`` (a bias one side lacks is written as
  zeros, which is exact).
* ``Qwen2ForCausalLM``: q/k/v biases, no other bias (``qkv_bias=True, bias=False``).
* ``MistralForCausalLM``: as Llama. Its sliding-window attention is *ignored*: the imported
  model attends to the whole context, which is exact only for sequences no longer than
  ``sliding_window`` (a warning says so when the window is shorter than the context).

RoPE scaling (``rope_scaling`` / ``rope_parameters`` of a type other than ``default``) and
other architectures raise :class:`LmforgeError`. Only safetensors weights are read: pickle
(``.bin``) checkpoints are refused, since loading them can run arbitrary code.

Weights keep their stored dtype (a bf16 model stays bf16 on disk; ``load_model`` casts to
the model's dtype when loading), so ``lmforge -> HF -> lmforge`` is bitwise identical.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .. import __version__
from ..checkpoint import SIDECAR_FILES, copy_sidecars, load_model, read_config, resolve_checkpoint
from ..config import from_dict, to_dict
from ..errors import LmforgeError
from ..fileio import atomic_write_json, read_json_object, save_safetensors, staged_dir
from ..model.gpt import GPTConfig, check_finite, check_state_dict
from ..model.hf_arch import hf_architecture
from ..tokenizer.base import token_name

ARCHITECTURES = ("GPT2LMHeadModel", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")

#: What a hub download fetches: never pickle weights.
HUB_PATTERNS = [
    "config.json",
    "model.safetensors",
    "model-*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    *SIDECAR_FILES,
]

# Defaults of the transformers config classes for keys a config.json may omit.
_TIE_DEFAULT = {"GPT2LMHeadModel": True}


# ------------------------------------------------------------------------------ import
def _resolve_source(src: str | Path) -> Path:
    p = Path(src).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise LmforgeError(f"{src} is not a directory: give a Hugging Face model directory or hub id")
    text = str(src)
    looks_like_path = text.startswith((".", "/", "~")) or text.count("/") > 1 or os.sep != "/" and os.sep in text
    if looks_like_path or not text:
        raise LmforgeError(f"model directory not found: {src}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise LmforgeError(f"{src} is not a local directory and huggingface_hub is not installed to download it") from None
    try:
        return Path(snapshot_download(repo_id=text, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # network, auth, unknown repo: one clear line
        raise LmforgeError(f"cannot download {text!r} from the Hugging Face hub: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _load_hf_weights(src: Path) -> dict[str, torch.Tensor]:
    index = src / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index, "shard index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise LmforgeError(f"{index} has no weight_map")
        files = sorted(set(weight_map.values()))
    elif (src / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        pickles = sorted(p.name for p in src.glob("*.bin")) + sorted(p.name for p in src.glob("*.pt*"))
        if pickles:
            raise LmforgeError(
                f"{src} has only pickle weights ({pickles[0]}); lmforge reads safetensors only, since loading "
                "pickle files can run arbitrary code. Convert them to model.safetensors first "
                "(e.g. transformers save_pretrained(..., safe_serialization=True) on a trusted machine)"
            )
        raise LmforgeError(f"{src} has no model.safetensors or model.safetensors.index.json (safetensors is required)")
    weights: dict[str, torch.Tensor] = {}
    for name in files:
        path = src / name
        try:
            weights.update(load_file(str(path)))
        except (SafetensorError, OSError) as e:
            raise LmforgeError(f"{path} cannot be read: {e}") from None
    return weights


def _rope_theta(hf: dict[str, Any], where: str) -> float:
    params = hf.get("rope_parameters")
    scaling = hf.get("rope_scaling")
    theta = hf.get("rope_theta")
    for spec in (params, scaling):
        if isinstance(spec, dict):
            kind = spec.get("rope_type", spec.get("type", "default"))
            if kind not in (None, "default"):
                raise LmforgeError(f"{where}: rope scaling {kind!r} is not supported (only plain RoPE)")
            theta = spec.get("rope_theta", theta)
        elif spec is not None:
            raise LmforgeError(f"{where}: unsupported rope settings {spec!r}")
    factor = hf.get("partial_rotary_factor", 1.0)
    if factor not in (None, 1, 1.0):
        raise LmforgeError(f"{where}: partial rotary embeddings (partial_rotary_factor={factor}) are not supported")
    return float(theta if theta is not None else 10000.0)


def _config_from_hf(hf: dict[str, Any], where: str) -> tuple[str, GPTConfig, dict[str, bool]]:
    """(architecture, GPTConfig, {"attention_bias": .., "mlp_bias": ..}) of an HF config.json."""
    archs = hf.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs else None
    if arch not in ARCHITECTURES:
        raise LmforgeError(
            f"{where}: unsupported architecture {arch or hf.get('model_type')!r}; "
            f"lmforge imports {', '.join(ARCHITECTURES)}"
        )
    tie = bool(hf.get("tie_word_embeddings", _TIE_DEFAULT.get(arch, False)))
    init_std = float(hf.get("initializer_range", 0.02))  # dropout is left at 0: an imported model is for inference

    def need(key: str, *alts: str) -> Any:
        for k in (key, *alts):
            if hf.get(k) is not None:
                return hf[k]
        raise LmforgeError(f"{where}: config.json lacks {key!r}")

    try:
        if arch == "GPT2LMHeadModel":
            act = hf.get("activation_function", "gelu_new")
            mlp = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}.get(act)
            if mlp is None:
                raise LmforgeError(f"{where}: GPT-2 activation {act!r} is not supported")
            if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx", False):
                raise LmforgeError(f"{where}: non-standard GPT-2 attention scaling is not supported")
            if hf.get("add_cross_attention", False):
                raise LmforgeError(f"{where}: GPT-2 with cross-attention is not supported")
            cfg = GPTConfig(
                vocab_size=need("vocab_size"),
                context_length=need("n_positions", "n_ctx", "max_position_embeddings"),
                n_layer=need("n_layer"),
                n_head=need("n_head"),
                n_embd=need("n_embd"),
                intermediate_size=hf.get("n_inner"),
                pos_embedding="learned",
                norm="layernorm",
                norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
                mlp=mlp,
                bias=True,
                tie_embeddings=tie,
                init_std=init_std,
            )
            return arch, cfg, {"attention_bias": True, "mlp_bias": True}

        act = hf.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise LmforgeError(f"{where}: MLP activation {act!r} is not supported (lmforge's SwiGLU uses silu)")
        if arch == "Qwen2ForCausalLM":
            attention_bias, mlp_bias, qkv_only = True, False, True
        elif arch == "LlamaForCausalLM":
            attention_bias, mlp_bias, qkv_only = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False)), False
        else:  # Mistral
            attention_bias, mlp_bias, qkv_only = False, False, False
        context = need("max_position_embeddings")
        window = hf.get("sliding_window")
        windowed = arch == "MistralForCausalLM" or hf.get("use_sliding_window", False)
        if windowed and isinstance(window, int) and window < context:
            warnings.warn(
                f"{where}: sliding-window attention (window {window}) is ignored: the imported model attends "
                f"to the whole context, identical to the original only for sequences up to {window} tokens",
                stacklevel=3,
            )
        n_head = need("num_attention_heads")
        bias = (attention_bias or mlp_bias) and not qkv_only
        cfg = GPTConfig(
            vocab_size=need("vocab_size"),
            context_length=context,
            n_layer=need("num_hidden_layers"),
            n_head=n_head,
            n_kv_head=hf.get("num_key_value_heads") or n_head,
            n_embd=need("hidden_size"),
            head_dim=hf.get("head_dim"),
            intermediate_size=need("intermediate_size"),
            pos_embedding="rope",
            rope_theta=_rope_theta(hf, where),
            norm="rmsnorm",
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            mlp="swiglu",
            bias=bias,
            qkv_bias=True if qkv_only else bias,
            tie_embeddings=tie,
            init_std=init_std,
        )
        return arch, cfg, {"attention_bias": attention_bias, "mlp_bias": mlp_bias}
    except (TypeError, ValueError) as e:
        raise LmforgeError(f"{where}: config.json cannot be mapped to an lmforge model: {e}") from None


def _taker(sd: dict[str, torch.Tensor], family: str):
    """``take(key)``: pop a weight from ``sd``, or a clear error naming what is missing."""

    def take(key: str) -> torch.Tensor:
        if key not in sd:
            raise LmforgeError(f"{family} weights lack {key!r}")
        return sd.pop(key)

    return take


def _finish(sd: dict[str, torch.Tensor], out: dict[str, torch.Tensor], cfg: GPTConfig, family: str):
    """Add the output head (untied models) and refuse weights no mapping used."""
    head = sd.pop("lm_head.weight", None)
    if not cfg.tie_embeddings:
        if head is None:
            raise LmforgeError(f"{family} weights lack 'lm_head.weight' although tie_word_embeddings is false")
        out["lm_head.weight"] = head
    if sd:
        raise LmforgeError(f"unexpected {family} weights: {sorted(sd)[:3]}")
    return out


def _map_gpt2(sd: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}  # old mask buffers
    out: dict[str, torch.Tensor] = {}
    take = _taker(sd, "GPT-2")

    out["embed_tokens.weight"] = take("wte.weight")
    out["embed_positions.weight"] = take("wpe.weight")
    names = {"ln_1": "attn_norm", "ln_2": "mlp_norm", "attn.c_attn": "attn.qkv_proj", "attn.c_proj": "attn.o_proj"}
    names |= {"mlp.c_fc": "mlp.up_proj", "mlp.c_proj": "mlp.down_proj"}
    for i in range(cfg.n_layer):
        for theirs, mine in names.items():
            w = take(f"h.{i}.{theirs}.weight")
            out[f"layers.{i}.{mine}.weight"] = w if theirs.startswith("ln") else w.t().contiguous()  # Conv1D: (in, out)
            out[f"layers.{i}.{mine}.bias"] = take(f"h.{i}.{theirs}.bias")
    out["norm.weight"], out["norm.bias"] = take("ln_f.weight"), take("ln_f.bias")
    return _finish(sd, out, cfg, "GPT-2")


def _map_llama(sd: dict[str, torch.Tensor], cfg: GPTConfig, biases: dict[str, bool]) -> dict[str, torch.Tensor]:
    sd = {k.removeprefix("model."): v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}
    out: dict[str, torch.Tensor] = {}
    take = _taker(sd, "Llama-family")

    def bias(key: str, present: bool, like: torch.Tensor) -> torch.Tensor:
        # lmforge has one `bias` switch: a bias the HF model lacks (Llama attention_bias without
        # mlp_bias, or the reverse) is an exact zero.
        return take(key) if present else torch.zeros(like.shape[0], dtype=like.dtype)

    out["embed_tokens.weight"] = take("embed_tokens.weight")
    for i in range(cfg.n_layer):
        p, a = f"layers.{i}.", f"layers.{i}.self_attn."
        qkv = [take(a + f"{x}_proj.weight") for x in "qkv"]
        out[p + "attn.qkv_proj.weight"] = torch.cat(qkv)
        if cfg.qkv_bias:
            out[p + "attn.qkv_proj.bias"] = torch.cat(
                [bias(a + f"{x}_proj.bias", biases["attention_bias"], w) for x, w in zip("qkv", qkv)]
            )
        out[p + "attn.o_proj.weight"] = o = take(a + "o_proj.weight")
        gate, up = take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")
        out[p + "mlp.gate_up_proj.weight"] = torch.cat([gate, up])
        out[p + "mlp.down_proj.weight"] = down = take(p + "mlp.down_proj.weight")
        if cfg.bias:
            out[p + "attn.o_proj.bias"] = bias(a + "o_proj.bias", biases["attention_bias"], o)
            out[p + "mlp.gate_up_proj.bias"] = torch.cat(
                [bias(p + "mlp.gate_proj.bias", biases["mlp_bias"], gate), bias(p + "mlp.up_proj.bias", biases["mlp_bias"], up)]
            )
            out[p + "mlp.down_proj.bias"] = bias(p + "mlp.down_proj.bias", biases["mlp_bias"], down)
        out[p + "attn_norm.weight"] = take(p + "input_layernorm.weight")
        out[p + "mlp_norm.weight"] = take(p + "post_attention_layernorm.weight")
    out["norm.weight"] = take("norm.weight")
    return _finish(sd, out, cfg, "Llama-family")


def _special_tokens(src: Path, hf_cfg: dict[str, Any]) -> dict[str, Any]:
    """bos/eos/pad names and ids from tokenizer_config.json, falling back to config.json ids."""
    tok_cfg = {}
    if (src / "tokenizer_config.json").is_file():
        tok_cfg = read_json_object(src / "tokenizer_config.json", "tokenizer settings")
    vocab: dict[str, int] = {}
    try:
        spec = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
        vocab = dict(spec.get("model", {}).get("vocab") or {}) if isinstance(spec.get("model", {}).get("vocab"), dict) else {}
        for t in spec.get("added_tokens") or []:
            vocab[t["content"]] = t["id"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    by_id = {i: t for t, i in vocab.items()}
    out: dict[str, Any] = {}
    for role in ("bos", "eos", "pad", "unk"):
        name = token_name(tok_cfg.get(f"{role}_token"))
        tid = vocab.get(name) if name else None
        if name is None:
            cid = hf_cfg.get(f"{role}_token_id")
            cid = cid[0] if isinstance(cid, list) and cid else cid
            if isinstance(cid, int) and cid in by_id:
                name, tid = by_id[cid], cid
        if name is not None:
            out[f"{role}_token"], out[f"{role}_token_id"] = name, tid
    return out


def import_hf(src: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """Convert a Hugging Face causal LM (local directory or hub id) to an lmforge checkpoint.

    ``src`` holds config.json, model.safetensors (or a shard index + shards), tokenizer.json
    and usually tokenizer_config.json. The checkpoint gets model.safetensors, config.json
    (with a ``tokenizer`` section naming bos/eos/pad and a ``source`` section) and
    tokenizer.json, plus tokenizer_config.json, generation_config.json, chat templates and
    special_tokens_map.json when the source has them. Returns ``out``.
    """
    src_dir = _resolve_source(src)
    hf_cfg = read_json_object(src_dir / "config.json", "the model configuration")
    try:
        arch, cfg, biases = _config_from_hf(hf_cfg, str(src_dir / "config.json"))
    except (TypeError, ValueError) as e:  # a value of the wrong kind (a list where a number belongs...)
        raise LmforgeError(f"{src_dir / 'config.json'} cannot be mapped to an lmforge model: {e}"[:400]) from None
    if not (src_dir / "tokenizer.json").is_file():
        raise LmforgeError(f"{src_dir} has no tokenizer.json (a fast tokenizer file is required)")
    sd = _load_hf_weights(src_dir)
    weights = _map_gpt2(sd, cfg) if arch == "GPT2LMHeadModel" else _map_llama(sd, cfg, biases)
    check_state_dict(weights, cfg, str(src_dir))
    check_finite(weights, str(src_dir))

    config = {
        "format": "lmforge",
        "lmforge_version": __version__,
        "model": to_dict(cfg),
        "tokenizer": _special_tokens(src_dir, hf_cfg),
        "source": {"format": "huggingface", "architecture": arch, "model_type": hf_cfg.get("model_type"), "path": str(src)},
    }
    with staged_dir(out, overwrite) as tmp:
        save_safetensors({k: v.contiguous() for k, v in weights.items()}, tmp / "model.safetensors", metadata={"format": "pt"})
        atomic_write_json(tmp / "config.json", config)
        shutil.copyfile(src_dir / "tokenizer.json", tmp / "tokenizer.json")
        copy_sidecars(src_dir, tmp)
    return Path(out)


# ------------------------------------------------------------------------------ export
def _to_gpt2(w: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    def b(key: str, n: int, like: torch.Tensor) -> torch.Tensor:
        return w[key] if key in w else torch.zeros(n, dtype=like.dtype)  # bias=False: exact zeros

    out = {"transformer.wte.weight": w["embed_tokens.weight"], "transformer.wpe.weight": w["embed_positions.weight"]}
    names = {"attn_norm": "ln_1", "mlp_norm": "ln_2", "attn.qkv_proj": "attn.c_attn", "attn.o_proj": "attn.c_proj"}
    names |= {"mlp.up_proj": "mlp.c_fc", "mlp.down_proj": "mlp.c_proj"}
    for i in range(cfg.n_layer):
        for mine, theirs in names.items():
            weight = w[f"layers.{i}.{mine}.weight"]
            t = f"transformer.h.{i}.{theirs}."
            is_norm = mine.endswith("norm")
            out[t + "weight"] = weight if is_norm else weight.t().contiguous()
            out[t + "bias"] = b(f"layers.{i}.{mine}.bias", weight.shape[0], weight)
    out["transformer.ln_f.weight"] = w["norm.weight"]
    out["transformer.ln_f.bias"] = b("norm.bias", w["norm.weight"].shape[0], w["norm.weight"])
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = w["lm_head.weight"]
    return out


def _to_llama(w: dict[str, torch.Tensor], cfg: GPTConfig, attention_bias: bool, mlp_bias: bool) -> dict[str, torch.Tensor]:
    q_dim, kv_dim = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    out = {"model.embed_tokens.weight": w["embed_tokens.weight"], "model.norm.weight": w["norm.weight"]}
    for i in range(cfg.n_layer):
        p, m = f"layers.{i}.", f"model.layers.{i}."
        for key, parts in (("weight", True), ("bias", attention_bias)):
            if not parts:
                continue
            name = p + f"attn.qkv_proj.{key}"
            if name in w:
                q, k, v = w[name].split([q_dim, kv_dim, kv_dim])
            else:  # Llama attention_bias without lmforge qkv_bias: zeros
                like = w[p + "attn.qkv_proj.weight"]
                q, k, v = (torch.zeros(n, dtype=like.dtype) for n in (q_dim, kv_dim, kv_dim))
            for x, t in zip("qkv", (q, k, v)):
                out[m + f"self_attn.{x}_proj.{key}"] = t.contiguous()
        out[m + "self_attn.o_proj.weight"] = w[p + "attn.o_proj.weight"]
        gate, up = w[p + "mlp.gate_up_proj.weight"].chunk(2)
        out[m + "mlp.gate_proj.weight"], out[m + "mlp.up_proj.weight"] = gate.contiguous(), up.contiguous()
        out[m + "mlp.down_proj.weight"] = w[p + "mlp.down_proj.weight"]
        if attention_bias and cfg.bias:  # Qwen2: q/k/v biases only
            out[m + "self_attn.o_proj.bias"] = w[p + "attn.o_proj.bias"]
        if mlp_bias:
            gb, ub = w[p + "mlp.gate_up_proj.bias"].chunk(2)
            out[m + "mlp.gate_proj.bias"], out[m + "mlp.up_proj.bias"] = gb.contiguous(), ub.contiguous()
            out[m + "mlp.down_proj.bias"] = w[p + "mlp.down_proj.bias"]
        out[m + "input_layernorm.weight"] = w[p + "attn_norm.weight"]
        out[m + "post_attention_layernorm.weight"] = w[p + "mlp_norm.weight"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = w["lm_head.weight"]
    return out


def _export_tokens(ckpt: Path, config: dict[str, Any]) -> dict[str, Any]:
    """bos/eos/pad of the checkpoint: its ``tokenizer`` section (imported models), else
    lmforge's conventions (``<|endoftext|>`` ends and starts documents, ``<|pad|>`` pads)."""
    tokens = dict(config.get("tokenizer") or {})
    if tokens.get("eos_token"):
        return tokens
    from ..tokenizer.base import EOT, PAD, Tokenizer

    tok = Tokenizer.from_file(ckpt / "tokenizer.json")
    eos = tok.id_to_token(tok.eot_id) or EOT
    tokens = {"bos_token": eos, "bos_token_id": tok.eot_id, "eos_token": eos, "eos_token_id": tok.eot_id}
    if tok.pad_id is not None:
        tokens |= {"pad_token": PAD, "pad_token_id": tok.pad_id}
    return tokens


def _chat_template(ckpt: Path, config: dict[str, Any]) -> str | None:
    for holder in (config, config.get("tokenizer") or {}):
        if isinstance(holder.get("chat_template"), str):
            return holder["chat_template"]
    return None


def export_hf(ckpt: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write an lmforge checkpoint (or a run's newest one) as a Hugging Face model directory.

    The result loads with ``AutoModelForCausalLM.from_pretrained`` and
    ``AutoTokenizer.from_pretrained``: config.json (``GPT2LMHeadModel`` for learned positions
    + LayerNorm + GELU, ``Qwen2ForCausalLM`` for q/k/v-only biases, ``LlamaForCausalLM``
    otherwise), model.safetensors (tied embeddings stored once), tokenizer.json,
    tokenizer_config.json (copied from an imported checkpoint, else generated with the chat
    template if the checkpoint has one) and generation_config.json. Returns ``out``.
    """
    path = resolve_checkpoint(ckpt)
    config = read_config(path)
    cfg = from_dict(GPTConfig, config["model"], "model")
    arch = hf_architecture(cfg)
    if config.get("quantization"):  # weight-quantized: export the dequantized weights
        from ..model.quant import dequantize_model

        model, _ = load_model(path)
        w = {k: v.detach() for k, v in dequantize_model(model).state_dict().items()}
    else:
        try:
            w = load_file(str(path / "model.safetensors"))
        except (SafetensorError, OSError) as e:
            raise LmforgeError(f"{path}/model.safetensors cannot be read: {e}") from None
    check_state_dict(w, cfg, str(path))
    if not (path / "tokenizer.json").is_file():
        raise LmforgeError(f"{path} has no tokenizer.json; a Hugging Face export needs the tokenizer")
    tokens = _export_tokens(path, config)
    dtype = str(w["embed_tokens.weight"].dtype).removeprefix("torch.")
    ids = {f"{r}_token_id": tokens.get(f"{r}_token_id") for r in ("bos", "eos", "pad")}

    common = {"architectures": [arch], "vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings}
    common |= {"initializer_range": cfg.init_std, "use_cache": True, "torch_dtype": dtype, **ids}
    if arch == "GPT2LMHeadModel":
        hf_cfg = common | {
            "model_type": "gpt2",
            "n_embd": cfg.n_embd,
            "n_layer": cfg.n_layer,
            "n_head": cfg.n_head,
            "n_positions": cfg.context_length,
            "n_ctx": cfg.context_length,
            "n_inner": cfg.intermediate_size,
            "activation_function": "gelu_new" if cfg.mlp == "gelu_tanh" else "gelu",
            "layer_norm_epsilon": cfg.norm_eps,
            "resid_pdrop": cfg.dropout,
            "embd_pdrop": cfg.dropout,
            "attn_pdrop": cfg.dropout,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
        }
        hf_w = _to_gpt2(w, cfg)
    else:
        attention_bias = bool(cfg.bias or cfg.qkv_bias) if arch == "LlamaForCausalLM" else True
        mlp_bias = bool(cfg.bias)
        hf_cfg = common | {
            "model_type": "qwen2" if arch == "Qwen2ForCausalLM" else "llama",
            "hidden_size": cfg.n_embd,
            "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.n_layer,
            "num_attention_heads": cfg.n_head,
            "num_key_value_heads": cfg.n_kv_head,
            "head_dim": cfg.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": cfg.context_length,
            "rms_norm_eps": cfg.norm_eps,
            "rope_theta": cfg.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
            "attention_dropout": cfg.dropout,
        }
        if arch == "LlamaForCausalLM":
            hf_cfg |= {"attention_bias": attention_bias, "mlp_bias": mlp_bias, "pretraining_tp": 1}
        else:
            hf_cfg |= {"use_sliding_window": False, "sliding_window": None, "max_window_layers": cfg.n_layer}
        hf_w = _to_llama(w, cfg, attention_bias, mlp_bias)

    with staged_dir(out, overwrite) as tmp:
        save_safetensors(hf_w, tmp / "model.safetensors", metadata={"format": "pt"})
        atomic_write_json(tmp / "config.json", hf_cfg)
        shutil.copyfile(path / "tokenizer.json", tmp / "tokenizer.json")
        copy_sidecars(path, tmp)
        if not (tmp / "tokenizer_config.json").is_file():
            tok_cfg: dict[str, Any] = {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "model_max_length": cfg.context_length,
                "clean_up_tokenization_spaces": False,
                "add_bos_token": False,
                "add_eos_token": False,
            }
            for role in ("bos", "eos", "pad", "unk"):
                if tokens.get(f"{role}_token"):
                    tok_cfg[f"{role}_token"] = tokens[f"{role}_token"]
            template = _chat_template(path, config)
            if template is not None and not (tmp / "chat_template.jinja").is_file():
                tok_cfg["chat_template"] = template
            atomic_write_json(tmp / "tokenizer_config.json", tok_cfg)
        if not (tmp / "generation_config.json").is_file():
            gen = {k: v for k, v in ids.items() if v is not None}
            atomic_write_json(tmp / "generation_config.json", gen)
    return Path(out)
