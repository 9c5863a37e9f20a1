"""GGUF (llama.cpp) import and export for Llama-family models.

``import_gguf(path, out)`` turns a ``llama``-architecture GGUF file into an lmforge checkpoint:
every tensor is dequantized to fp32 (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_*, K-quants...:
whatever ``gguf.quants.dequantize`` handles), the names are mapped onto :class:`GPT`'s
(``attn_q|attn_k|attn_v`` -> ``attn.qkv_proj``, ``ffn_gate|ffn_up`` -> ``mlp.gate_up_proj``),
and llama.cpp's Q/K row permutation is undone. The embedded byte-level BPE vocabulary
(``tokenizer.ggml.model == "gpt2"``) becomes a ``tokenizer.json``; the chat template and the
BOS/EOS tokens go to the ``tokenizer`` section of the checkpoint's ``config.json``.

``export_gguf(ckpt, out_path, dtype)`` writes an lmforge Llama-family checkpoint (rotary
positions, RMSNorm, SwiGLU, no biases) as a GGUF file that llama.cpp can load: ``f32``,
``f16`` or ``q8_0`` for matrices (1-D tensors always F32), with the tokenizer metadata.

Rotary layout: lmforge (like Hugging Face) rotates "halves" of each head; llama.cpp's
``convert_hf_to_gguf.py`` permutes the rows of ``attn_q``/``attn_k`` so that its
interleaved-pair RoPE computes the same thing. :func:`permute_qk` and :func:`unpermute_qk`
are that permutation and its inverse.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import Checkpoint, save_checkpoint
from ..errors import LmforgeError
from ..fileio import refuse_existing
from ..model.gpt import GPT, GPTConfig, check_finite, check_state_dict

# gguf is a dependency, imported lazily so that only the GGUF paths pay its import time.


def _gguf():
    try:
        import gguf
    except ImportError:  # pragma: no cover - exercised only without the package
        raise LmforgeError(
            "GGUF support needs the `gguf` package: pip install gguf"
        ) from None
    return gguf


# ------------------------------------------------------------------------ Q/K permutation
def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate-half rows -> llama.cpp interleaved rows (``convert_hf_to_gguf`` ``permute``)."""
    rows = w.shape[0]
    return (
        w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:])
        .transpose(1, 2)
        .reshape(w.shape)
    )


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of :func:`permute_qk`: llama.cpp interleaved rows -> HF rotate-half rows."""
    rows = w.shape[0]
    return (
        w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:])
        .transpose(1, 2)
        .reshape(w.shape)
    )


# ---------------------------------------------------------------------- pre-tokenizers
_GPT2_PATTERN = (
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
)
_LLAMA3_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
#: llama.cpp's pre-tokenizer names (``tokenizer.ggml.pre``) whose regexes are "each digit
#: alone, then the GPT-2 regex" (``llama-vocab.cpp``): the HF ``Digits(individual_digits)``
#: + ``ByteLevel`` pipeline.
_DIGITS_THEN_GPT2 = {
    "smollm",
    "starcoder",
    "refact",
    "command-r",
    "codeshell",
    "exaone",
    "minerva",
}


def _pre_tokenizer(pre: str):
    from tokenizers import Regex
    from tokenizers import pre_tokenizers as pt

    if pre in _DIGITS_THEN_GPT2:
        return pt.Sequence(
            [
                pt.Digits(individual_digits=True),
                pt.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if pre in ("llama-bpe", "llama3", "dbrx", "smaug-bpe"):
        pattern = _LLAMA3_PATTERN
    elif pre in ("qwen2", "stablelm2", "deepseek-r1-qwen"):
        pattern = _QWEN2_PATTERN
    else:
        if pre not in ("gpt2", "gpt-2", "mpt", "olmo", "jais", "default", ""):
            warnings.warn(
                f"unknown GGUF pre-tokenizer {pre!r}: using the GPT-2 regex",
                stacklevel=3,
            )
        return pt.ByteLevel(add_prefix_space=False, use_regex=True)
    return pt.Sequence(
        [
            pt.Split(Regex(pattern), behavior="isolated", invert=False),
            pt.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _pre_name(spec: dict[str, Any]) -> str:
    """The llama.cpp ``tokenizer.ggml.pre`` matching a tokenizer.json pre-tokenizer."""
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt2"
    if pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers") or []
        types = [p.get("type") for p in parts]
        if (
            types == ["Digits", "ByteLevel"]
            and parts[0].get("individual_digits")
            and parts[1].get("use_regex", True)
        ):
            return "smollm"
        if types == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
            regex = (parts[0].get("pattern") or {}).get("Regex")
            if regex == _LLAMA3_PATTERN:
                return "llama-bpe"
            if regex == _QWEN2_PATTERN:
                return "qwen2"
    warnings.warn(
        "tokenizer.json pre-tokenizer has no llama.cpp equivalent: writing 'default'",
        stacklevel=3,
    )
    return "default"


# ----------------------------------------------------------------------------- reading
def _field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _f32(v: Any) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-05, not 9.9999997e-06)."""
    return float(str(np.float32(v)))


def _tensor_fp32(t, gguf) -> torch.Tensor:
    """A reader tensor as an fp32 torch tensor in torch (row-major, reversed GGUF dims) shape."""
    qtype = t.tensor_type
    data = np.asarray(t.data)
    if qtype == gguf.GGMLQuantizationType.F32:
        arr = data.astype(np.float32, copy=True)
    elif qtype == gguf.GGMLQuantizationType.F16:
        arr = data.astype(np.float32)
    else:
        try:
            arr = gguf.quants.dequantize(data, qtype)
        except NotImplementedError:
            raise LmforgeError(
                f"tensor {t.name}: GGUF type {qtype.name} cannot be dequantized"
            ) from None
        arr = np.asarray(arr, dtype=np.float32)
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    if arr.size != int(np.prod(shape)):
        raise LmforgeError(f"tensor {t.name}: {arr.size} values for shape {shape}")
    return torch.from_numpy(np.ascontiguousarray(arr.reshape(shape)))


def _build_tokenizer(reader, where: str):
    """(tokenizers.Tokenizer, token strings) from the embedded gpt2-style vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise LmforgeError(
            f"{where}: tokenizer.ggml.model is {kind!r}; only byte-level BPE ('gpt2') vocabularies can be imported"
        )
    tokens: list[str] = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [
        tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", [])
    ]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise LmforgeError(f"{where}: the token list has duplicate entries")
    hf = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    hf.pre_tokenizer = _pre_tokenizer(
        _field(reader, "tokenizer.ggml.pre", "default") or "default"
    )
    hf.decoder = decoders.ByteLevel()
    hf.post_processor = processors.ByteLevel(trim_offsets=False)
    # 3 = CONTROL (special), 4 = USER_DEFINED (added, not special); tokens keep their ids.
    added = [
        AddedToken(tokens[i], special=(ty == 3), normalized=False)
        for i, ty in enumerate(types)
        if ty in (3, 4)
    ]
    special = [a for a in added if a.special]
    plain = [a for a in added if not a.special]
    if special:
        hf.add_special_tokens(special)
    if plain:
        hf.add_tokens(plain)
    return hf, tokens


def import_gguf(path: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """Convert a ``llama``-architecture GGUF file into an lmforge checkpoint at ``out``
    (written atomically; an existing non-empty ``out`` is replaced only with ``overwrite``)."""
    gguf = _gguf()
    refuse_existing(Path(out), overwrite)
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"GGUF file not found: {path}")
    try:
        reader = gguf.GGUFReader(str(path))
    except (
        OSError,
        ValueError,
        IndexError,
        KeyError,
    ) as e:  # bad magic, truncated file, unknown types
        raise LmforgeError(f"{path} is not a readable GGUF file ({e})") from None
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise LmforgeError(
            f"{path}: architecture {arch!r} is not supported (only 'llama')"
        )

    def meta(key: str, default: Any = None, required: bool = True) -> Any:
        v = _field(reader, f"{arch}.{key}", default)
        if v is None and required:
            raise LmforgeError(f"{path}: metadata {arch}.{key} is missing")
        return v

    def size(key: str, default: Any = None) -> int:
        """A size from the metadata: a positive whole number (bounds: GPTConfig's)."""
        v = meta(key, default)
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or int(v) < 1:
            raise LmforgeError(f"{path}: metadata {arch}.{key} must be a positive whole number, got {str(v)[:60]}")
        return int(v)

    tensors = {t.name: t for t in reader.tensors}
    tokens = _field(reader, "tokenizer.ggml.tokens")
    n_embd, n_head = size("embedding_length"), size("attention.head_count")
    n_kv_head = size("attention.head_count_kv", n_head)
    head_dim = size("attention.key_length", max(1, n_embd // n_head))
    blocks = {int(n.split(".")[1]) for n in tensors if n.startswith("blk.") and n.split(".")[1].isdigit()}
    if blocks != set(range(size("block_count"))):
        raise LmforgeError(f"{path}: metadata says {size('block_count')} blocks, the file holds tensors of "
                           f"{len(blocks)}")
    if int(meta("attention.value_length", head_dim)) != head_dim:
        raise LmforgeError(
            f"{path}: key and value head sizes differ, which lmforge does not support"
        )
    if int(meta("rope.dimension_count", head_dim)) != head_dim:
        raise LmforgeError(f"{path}: partial rotary embeddings are not supported")
    if _field(reader, f"{arch}.rope.scaling.type") not in (None, "none"):
        raise LmforgeError(f"{path}: rope scaling is not supported")
    if f"{arch}.expert_count" in reader.fields and int(meta("expert_count")) > 0:
        raise LmforgeError(f"{path}: mixture-of-experts models are not supported")
    embd = tensors.get("token_embd.weight")
    if embd is None:
        raise LmforgeError(f"{path}: no token_embd.weight tensor")
    vocab_size = int(embd.shape[1])
    if tokens is not None and len(tokens) != vocab_size:
        raise LmforgeError(
            f"{path}: {len(tokens)} tokens but token_embd has {vocab_size} rows"
        )
    try:
        cfg = GPTConfig(
            vocab_size=vocab_size,
            context_length=size("context_length"),
            n_layer=size("block_count"),
            n_head=n_head,
            n_kv_head=n_kv_head,
            n_embd=n_embd,
            head_dim=head_dim,
            intermediate_size=size("feed_forward_length"),
            pos_embedding="rope",
            rope_theta=_f32(meta("rope.freq_base", 10000.0)),
            norm="rmsnorm",
            norm_eps=_f32(meta("attention.layer_norm_rms_epsilon", 1e-5)),
            mlp="swiglu",
            bias=False,
            tie_embeddings="output.weight" not in tensors,
        )
    except (TypeError, ValueError) as e:
        raise LmforgeError(f"{path}: the metadata does not describe a usable model: {e}") from None

    used: set[str] = set()

    def get(name: str) -> torch.Tensor:
        t = tensors.get(name)
        if t is None:
            raise LmforgeError(f"{path}: tensor {name} is missing")
        used.add(name)
        return _tensor_fp32(t, gguf)

    sd: dict[str, torch.Tensor] = {
        "embed_tokens.weight": get("token_embd.weight"),
        "norm.weight": get("output_norm.weight"),
    }
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = get("output.weight")
    for i in range(cfg.n_layer):
        b, p = f"blk.{i}.", f"layers.{i}."
        q = unpermute_qk(get(b + "attn_q.weight"), n_head)
        k = unpermute_qk(get(b + "attn_k.weight"), n_kv_head)
        sd[p + "attn.qkv_proj.weight"] = torch.cat(
            [q, k, get(b + "attn_v.weight")], dim=0
        )
        sd[p + "attn.o_proj.weight"] = get(b + "attn_output.weight")
        sd[p + "attn_norm.weight"] = get(b + "attn_norm.weight")
        sd[p + "mlp_norm.weight"] = get(b + "ffn_norm.weight")
        sd[p + "mlp.gate_up_proj.weight"] = torch.cat(
            [get(b + "ffn_gate.weight"), get(b + "ffn_up.weight")], dim=0
        )
        sd[p + "mlp.down_proj.weight"] = get(b + "ffn_down.weight")
    leftover = sorted(set(tensors) - used - {"rope_freqs.weight"})
    if leftover:
        raise LmforgeError(
            f"{path}: unsupported tensors {leftover[:4]} (biases, QK-norm or another variant)"
        )

    check_state_dict(sd, cfg, str(path))
    check_finite(sd, str(path))
    with torch.device("meta"):
        model = GPT(cfg)
    model = model.to_empty(device="cpu")
    model.load_state_dict(sd, strict=True, assign=True)

    hf, tokens = _build_tokenizer(reader, str(path))

    def tok_name(key: str) -> str | None:
        i = _field(reader, key)
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    tok_meta = {
        "chat_template": _field(reader, "tokenizer.chat_template"),
        "bos_token": tok_name("tokenizer.ggml.bos_token_id"),
        "eos_token": tok_name("tokenizer.ggml.eos_token_id"),
        "pad_token": tok_name("tokenizer.ggml.padding_token_id"),
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "gguf_pre": _field(reader, "tokenizer.ggml.pre"),
    }
    source = {
        "gguf": path.name,
        "name": _field(reader, "general.name"),
        "file_type": _field(reader, "general.file_type"),
    }
    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        tok_file = Path(tmp) / "tokenizer.json"
        tok_file.write_text(hf.to_str(pretty=True), encoding="utf-8")
        return save_checkpoint(
            out, model, tok_file, extra={"tokenizer": tok_meta, "source": source}
        )


# ----------------------------------------------------------------------------- writing
def _tokenizer_metadata(
    tok_file: Path, vocab_size: int, tok_meta: dict[str, Any]
) -> dict[str, Any]:
    spec = json.loads(tok_file.read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise LmforgeError(
            f"{tok_file}: only byte-level BPE tokenizers can be written to GGUF"
        )
    id_to_tok: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    types: dict[int, int] = {}
    for a in spec.get("added_tokens") or []:
        id_to_tok[int(a["id"])] = a["content"]
        types[int(a["id"])] = 3 if a.get("special") else 4
    n = max(id_to_tok) + 1 if id_to_tok else 0
    if n > vocab_size:
        raise LmforgeError(
            f"{tok_file}: {n} token ids but the model has only {vocab_size} embeddings"
        )
    tokens, token_types = [], []
    for i in range(vocab_size):  # llama.cpp needs one entry per embedding row
        if i in id_to_tok:
            tokens.append(id_to_tok[i])
            token_types.append(types.get(i, 1))
        else:
            tokens.append(f"[PAD{i}]")
            token_types.append(5)  # UNUSED
    merges = [
        m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []
    ]

    def tid(name: str | None) -> int | None:
        if not name:
            return None
        return tokens.index(name) if name in tokens else None

    eos = (
        tid(tok_meta.get("eos_token"))
        if tok_meta.get("eos_token")
        else tid("<|endoftext|>")
    )
    bos = tid(tok_meta.get("bos_token")) if tok_meta.get("bos_token") else eos
    return {
        "pre": _pre_name(spec),
        "tokens": tokens,
        "types": token_types,
        "merges": merges,
        "bos": bos,
        "eos": eos,
        "pad": tid(tok_meta.get("pad_token")),
        "add_bos": bool(tok_meta.get("add_bos_token", False)),
        "chat_template": tok_meta.get("chat_template"),
    }


def export_gguf(ckpt: str | Path, out_path: str | Path, dtype: str = "f32", *, overwrite: bool = False) -> Path:
    """Write an lmforge Llama-family checkpoint (or a run's newest) as a GGUF file
    (to a temporary name, renamed into place; an existing file is replaced only with ``overwrite``)."""
    gguf = _gguf()
    from ..model.quant import dequantize_model

    Q = gguf.GGMLQuantizationType
    if dtype not in ("f32", "f16", "q8_0"):
        raise LmforgeError(f"GGUF dtype must be f32, f16 or q8_0, got {dtype!r}")
    opened = Checkpoint.open(ckpt)
    model, ckpt, full_cfg = opened.load_model(), opened.path, opened.config
    dequantize_model(model)  # a weight-quantized checkpoint exports its dequantized weights
    cfg: GPTConfig = model.config
    problems = []
    if cfg.pos_embedding != "rope":
        problems.append(f"pos_embedding={cfg.pos_embedding} (needs rope)")
    if cfg.norm != "rmsnorm":
        problems.append(f"norm={cfg.norm} (needs rmsnorm)")
    if cfg.mlp != "swiglu":
        problems.append(f"mlp={cfg.mlp} (needs swiglu)")
    if cfg.bias or cfg.qkv_bias:
        problems.append("linear biases")
    if cfg.qk_norm:
        problems.append("qk_norm")
    if problems:
        raise LmforgeError(
            f"{ckpt} is not a Llama-family model, GGUF export needs: "
            + "; ".join(problems)
        )
    tok_file = ckpt / "tokenizer.json"
    if not tok_file.is_file():
        raise LmforgeError(f"{ckpt} has no tokenizer.json, which GGUF files embed")
    tm = _tokenizer_metadata(tok_file, cfg.vocab_size, full_cfg.get("tokenizer") or {})

    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    named: list[tuple[str, torch.Tensor]] = [
        ("token_embd.weight", sd["embed_tokens.weight"])
    ]
    q_dim, kv_dim = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    for i in range(cfg.n_layer):
        p, b = f"layers.{i}.", f"blk.{i}."
        q, k, v = sd[p + "attn.qkv_proj.weight"].split([q_dim, kv_dim, kv_dim], dim=0)
        gate, up = sd[p + "mlp.gate_up_proj.weight"].chunk(2, dim=0)
        named += [
            (b + "attn_norm.weight", sd[p + "attn_norm.weight"]),
            (b + "attn_q.weight", permute_qk(q, cfg.n_head)),
            (b + "attn_k.weight", permute_qk(k, cfg.n_kv_head)),
            (b + "attn_v.weight", v),
            (b + "attn_output.weight", sd[p + "attn.o_proj.weight"]),
            (b + "ffn_norm.weight", sd[p + "mlp_norm.weight"]),
            (b + "ffn_gate.weight", gate),
            (b + "ffn_up.weight", up),
            (b + "ffn_down.weight", sd[p + "mlp.down_proj.weight"]),
        ]
    named.append(("output_norm.weight", sd["norm.weight"]))
    if not cfg.tie_embeddings:
        named.append(("output.weight", sd["lm_head.weight"]))

    out_path = Path(out_path)
    refuse_existing(out_path, overwrite)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    w = gguf.GGUFWriter(str(tmp_path), "llama")
    w.add_name(full_cfg.get("source", {}).get("name") or ckpt.name)
    w.add_context_length(cfg.context_length)
    w.add_embedding_length(cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_rope_dimension_count(cfg.head_dim)
    if cfg.head_dim != cfg.n_embd // cfg.n_head:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(
        {
            "f32": gguf.LlamaFileType.ALL_F32,
            "f16": gguf.LlamaFileType.MOSTLY_F16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        }[dtype]
    )
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tm["pre"])
    w.add_token_list(tm["tokens"])
    w.add_token_types(tm["types"])
    w.add_token_merges(tm["merges"])
    if tm["bos"] is not None:
        w.add_bos_token_id(tm["bos"])
    if tm["eos"] is not None:
        w.add_eos_token_id(tm["eos"])
    if tm["pad"] is not None:
        w.add_pad_token_id(tm["pad"])
    w.add_add_bos_token(tm["add_bos"])
    if tm["chat_template"]:
        w.add_chat_template(tm["chat_template"])

    for name, t in named:
        arr = t.contiguous().numpy()
        if arr.ndim == 1 or dtype == "f32":
            w.add_tensor(name, arr.astype(np.float32))
        elif dtype == "f16":
            w.add_tensor(name, arr.astype(np.float16))
        elif arr.shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] == 0:
            qdata = gguf.quants.quantize(arr.astype(np.float32), Q.Q8_0)
            w.add_tensor(name, qdata, raw_shape=qdata.shape, raw_dtype=Q.Q8_0)
        else:  # rows not a multiple of the block size: F16 like llama.cpp's fallback
            w.add_tensor(name, arr.astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp_path, out_path)
    return out_path
