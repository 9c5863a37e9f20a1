"""Hostile model files (issue 17): absurd or malformed config values, weights that do not
match their config, integer or non-finite weights, and GGUF metadata that would allocate
without bound or divide by zero. Each is one clear error line before anything large is
allocated (the CLI exits 2, no traceback), within seconds."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmforge.cli import main
from lmforge.errors import LmforgeError
from lmforge.model.gpt import GPT, GPTConfig
from lmforge.tokenizer import train_bpe
from lmforge.checkpoint import load_model, save_checkpoint


@pytest.fixture(scope="module")
def base(tiny_checkpoint: Path) -> Path:
    return tiny_checkpoint


def variant(base: Path, tmp_path: Path, name: str, edit_config=None, edit_weights=None) -> Path:
    d = tmp_path / name
    shutil.copytree(base, d)
    if edit_config is not None:
        cfg = json.loads((d / "config.json").read_text())
        edit_config(cfg)
        (d / "config.json").write_text(json.dumps(cfg))
    if edit_weights is not None:
        w = load_file(str(d / "model.safetensors"))
        edit_weights(w)
        save_file(w, str(d / "model.safetensors"))
    return d


def set_model(key, value):
    return lambda cfg: cfg["model"].__setitem__(key, value)


CONFIG_CASES = {
    "n_layer 1e5": (set_model("n_layer", 100_000), "n_layer is 100000"),
    "n_layer 500 over 2 layers": (set_model("n_layer", 500), "the weights hold layers 0..1"),
    "context 1e8": (set_model("context_length", 10**8), "context_length"),
    "context 1e12": (set_model("context_length", 10**12), "context_length"),
    "context 100k learned": (set_model("context_length", 100_000), "embed_positions"),
    "n_embd 1e9": (set_model("n_embd", 10**9), "n_embd"),
    "vocab 1e12": (set_model("vocab_size", 10**12), "vocab_size"),
    "vocab 100k": (set_model("vocab_size", 100_000), "embed_tokens.weight"),
    "n_head 0": (set_model("n_head", 0), "n_head must be positive"),
    "nested value": (set_model("n_head", {"a": [1, {"b": [2]}]}), "n_head"),
    "float layers": (set_model("n_layer", 2.5), "n_layer"),
    "nested config": (lambda cfg: cfg.__setitem__("model", [[[[1]]]]), "no 'model' section"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_absurd_configs_are_one_line_errors(base: Path, tmp_path: Path, case: str, capsys) -> None:
    edit, message = CONFIG_CASES[case]
    ckpt = variant(base, tmp_path, "m", edit_config=edit)
    t0 = time.monotonic()
    assert main(["sample", str(ckpt), "--max-tokens", "2", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert time.monotonic() - t0 < 30


def test_deeply_nested_config_json(base: Path, tmp_path: Path, capsys) -> None:
    ckpt = variant(base, tmp_path, "m")
    (ckpt / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    assert main(["sample", str(ckpt), "--prompt", "hi"]) == 2
    assert "nested too deeply" in capsys.readouterr().err


def test_integer_and_non_finite_weights_are_refused(base: Path, tmp_path: Path) -> None:
    def to_int8(w):
        w["layers.0.mlp.down_proj.weight"] = w["layers.0.mlp.down_proj.weight"].to(torch.int8)

    with pytest.raises(LmforgeError, match="stored as I8"):
        load_model(variant(base, tmp_path, "int8", edit_weights=to_int8))
    for bad in (float("nan"), float("inf")):
        def poison(w, bad=bad):
            w["layers.1.attn.o_proj.weight"][3, 4] = bad

        with pytest.raises(LmforgeError, match="layers.1.attn.o_proj.weight holds NaN or infinite"):
            load_model(variant(base, tmp_path, f"poison-{bad}", edit_weights=poison))


# ---- GGUF metadata -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_ckpt(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gguf-src")
    tok = train_bpe(["the quick brown fox jumps over the lazy dog"] * 20, vocab_size=300, show_progress=False)
    tok_file = tok.save(root / "tok")
    cfg = GPTConfig(vocab_size=tok.vocab_size, context_length=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                    intermediate_size=96, pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False)
    torch.manual_seed(0)
    return save_checkpoint(root / "ckpt", GPT(cfg), tok_file)


GGUF_CASES = {
    "context_length 1e8": ("add_context_length", 10**8, "context_length"),
    "context_length 3e9": ("add_context_length", 3 * 10**9, "context_length"),
    "head_count 0": ("add_head_count", 0, "head_count must be a positive whole number"),
    "head_count_kv 0": ("add_head_count_kv", 0, "head_count_kv must be a positive whole number"),
    "block_count 1e5": ("add_block_count", 100_000, "metadata says 100000 blocks"),
    "embedding_length 0": ("add_embedding_length", 0, "embedding_length"),
}


@pytest.mark.parametrize("case", list(GGUF_CASES))
def test_hostile_gguf_metadata(llama_ckpt: Path, tmp_path: Path, case: str, monkeypatch, capsys) -> None:
    gguf = pytest.importorskip("gguf")
    from lmforge.io.gguf import export_gguf

    method, value, message = GGUF_CASES[case]
    monkeypatch.setattr(gguf.GGUFWriter, method, lambda self, _v, real=getattr(gguf.GGUFWriter, method): real(self, value))
    path = export_gguf(llama_ckpt, tmp_path / "m.gguf")
    monkeypatch.undo()
    t0 = time.monotonic()
    assert main(["import", str(path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert time.monotonic() - t0 < 30 and not (tmp_path / "out").exists()


def test_gguf_with_non_finite_weights(llama_ckpt: Path, tmp_path: Path, monkeypatch) -> None:
    gguf = pytest.importorskip("gguf")
    from lmforge.io.gguf import export_gguf, import_gguf

    real = gguf.GGUFWriter.add_tensor

    def poisoned(self, name, arr, *a, **k):
        if name == "blk.0.ffn_down.weight":
            arr = arr.copy()
            arr[0, 0] = float("nan")
        return real(self, name, arr, *a, **k)

    monkeypatch.setattr(gguf.GGUFWriter, "add_tensor", poisoned)
    path = export_gguf(llama_ckpt, tmp_path / "nan.gguf")
    monkeypatch.undo()
    with pytest.raises(LmforgeError, match="NaN or infinite"):
        import_gguf(path, tmp_path / "out")


def test_chat_cli_template_errors_are_one_line(base: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """`lmforge chat` over a model whose template fails (non-Jinja errors included) prints one
    error line per message and goes on; a template that does not compile is one error line."""
    import io

    for source, message in (("{{ 1 / 0 }}", "ZeroDivisionError"), ("{{ 10**10000000 }}", "larger than"),
                            ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recursed too deeply")):
        ckpt = variant(base, tmp_path, f"t{len(message)}",
                       edit_config=lambda cfg, s=source: cfg.setdefault("tokenizer", {}).__setitem__("chat_template", s))
        monkeypatch.setattr("sys.stdin", io.StringIO("hello\nagain\n"))
        assert main(["chat", str(ckpt), "--max-tokens", "2"]) == 0
        out = capsys.readouterr()
        assert out.out.count("error: the chat template") == 2 and message in out.out, out
        assert "Traceback" not in out.out + out.err
    ckpt = variant(base, tmp_path, "broken",
                   edit_config=lambda cfg: cfg.setdefault("tokenizer", {}).__setitem__("chat_template", "{% for %}"))
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    assert main(["chat", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the chat template does not compile") and err.count("\n") == 1
