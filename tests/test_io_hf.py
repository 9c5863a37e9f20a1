"""Hugging Face import/export: logits and greedy parity with transformers, bitwise round trips, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge.errors import LmforgeError
from lmforge.infer import greedy
from lmforge.io import export_hf, import_hf
from lmforge.model.gpt import GPT, GPTConfig
from lmforge.tokenizer import EOT, Tokenizer, train_bpe
from lmforge.checkpoint import load_model, read_config, save_checkpoint

transformers = pytest.importorskip("transformers")

TEXT = "the quick brown fox jumps over the lazy dog. " * 20 + "hello world, lmforge speaks to transformers!"
CHAT = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
CTX = 64


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny byte-level BPE tokenizer.json (about 300 ids)."""
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe([TEXT], 300, show_progress=False).save(path)
    return path


def vocab_of(tok: Path) -> int:
    return Tokenizer.from_file(tok).vocab_size


def hf_model(kind: str, vocab: int):
    common = dict(vocab_size=vocab, bos_token_id=0, eos_token_id=0, initializer_range=0.2)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=CTX, **common)
        cls = transformers.GPT2LMHeadModel
    else:
        llama = dict(
            hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=CTX, rms_norm_eps=1e-5, rope_theta=5000.0, **common,
        )  # fmt: skip
        if kind == "qwen2":
            cfg, cls = transformers.Qwen2Config(tie_word_embeddings=True, **llama), transformers.Qwen2ForCausalLM
        else:
            cfg = transformers.LlamaConfig(tie_word_embeddings=kind == "llama_tied", **llama)
            cls = transformers.LlamaForCausalLM
    torch.manual_seed(0)
    model = cls(cfg).eval()
    if kind == "qwen2":  # random biases, so that the q/k/v biases are really checked
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.2)
    return model


def hf_dir(tmp: Path, model, tok: Path, tokenizer_config: dict | None = None) -> Path:
    d = tmp / "hf"
    model.save_pretrained(d, safe_serialization=True)
    (d / "tokenizer.json").write_bytes(tok.read_bytes())
    tc = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOT, "bos_token": EOT, "chat_template": CHAT}
    (d / "tokenizer_config.json").write_text(json.dumps(tokenizer_config or tc))
    return d


def hf_greedy(model, prompt: list[int], n: int = 32) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n, min_new_tokens=n)
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("kind", ["gpt2", "llama_gqa_untied", "llama_tied", "qwen2"])
def test_import_parity(tmp_path: Path, tok: Path, kind: str) -> None:
    hf = hf_model(kind, vocab_of(tok))
    ckpt = import_hf(hf_dir(tmp_path, hf, tok), tmp_path / "ckpt")
    model, _ = load_model(ckpt)
    model.eval()
    cfg = read_config(ckpt)
    assert cfg["tokenizer"]["eos_token"] == EOT and cfg["source"]["architecture"] == type(hf).__name__
    assert (ckpt / "tokenizer_config.json").is_file() and Tokenizer.from_file(ckpt).eot_id == 0
    assert model.config.tie_embeddings == (kind != "llama_gqa_untied")
    if kind != "gpt2":
        assert model.config.n_kv_head == 2 and model.config.rope_theta == 5000.0
    assert model.config.qkv_bias == (kind in ("gpt2", "qwen2")) and model.config.bias == (kind == "gpt2")

    torch.manual_seed(1)
    idx = torch.randint(0, model.config.vocab_size, (3, 20))
    with torch.no_grad():
        diff = (model(idx) - hf(idx).logits).abs().max().item()
    assert diff <= 1e-4, diff
    prompt = idx[0, :8].tolist()
    ours = greedy(model, prompt, 32)
    assert ours == hf_greedy(hf, prompt)


@pytest.mark.parametrize(
    "settings",
    [
        dict(mlp="gelu_tanh"),  # GPT-2
        dict(pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=2, tie_embeddings=False),
        dict(pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False, qkv_bias=True, rope_theta=1e4),  # Qwen2
    ],
    ids=["gpt2", "llama", "qwen2"],
)
def test_export_round_trip(tmp_path: Path, tok: Path, settings: dict) -> None:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=vocab_of(tok), context_length=CTX, n_layer=2, n_head=4, n_embd=32, init_std=0.2, **settings)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("bias", "norm.weight")):
                p.normal_(0.5, 0.2)  # non-trivial biases and norm gains
    ckpt = save_checkpoint(tmp_path / "ckpt", model, tok, extra={"chat_template": CHAT})
    out = export_hf(ckpt, tmp_path / "hf")

    arch = {"gelu_tanh": "GPT2LMHeadModel"}.get(cfg.mlp, "Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM")
    assert json.loads((out / "config.json").read_text())["architectures"] == [arch]
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == arch
    idx = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        assert (model(idx) - hf(idx).logits).abs().max().item() <= 1e-4
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    ours = Tokenizer.from_file(tok)
    assert hf_tok(TEXT[:80], add_special_tokens=False)["input_ids"] == ours.encode(TEXT[:80])
    assert hf_tok.eos_token == EOT and hf_tok.chat_template == CHAT
    if cfg.tie_embeddings:  # tied weights are stored once, as transformers expects
        assert "lm_head.weight" not in load_file(str(out / "model.safetensors"))

    back = import_hf(out, tmp_path / "back")
    assert read_config(back)["model"] == read_config(ckpt)["model"]
    a, b = load_file(str(ckpt / "model.safetensors")), load_file(str(back / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def test_tokenizer_with_other_eos_loads(tmp_path: Path) -> None:
    """An imported tokenizer whose EOS is `</s>` (no <|endoftext|>) loads via tokenizer_config.json."""
    spec = json.loads(train_bpe([TEXT], 300, ["</s>"], show_progress=False).hf.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] != EOT]
    del spec["model"]["vocab"][EOT]
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "</s>"}}))
    t = Tokenizer.from_file(tmp_path)
    assert t.eot_id == t.token_to_id("</s>")


def test_errors(tmp_path: Path, tok: Path) -> None:
    with pytest.raises(LmforgeError, match="not found"):
        import_hf(tmp_path / "missing", tmp_path / "o")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LmforgeError, match="no config.json"):
        import_hf(empty, tmp_path / "o")

    d = hf_dir(tmp_path, hf_model("llama_tied", vocab_of(tok)), tok)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(cfg | {"architectures": ["BertForMaskedLM"]}))
    with pytest.raises(LmforgeError, match="unsupported architecture 'BertForMaskedLM'"):
        import_hf(d, tmp_path / "o")
    (d / "config.json").write_text(json.dumps(cfg | {"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}))
    with pytest.raises(LmforgeError, match="rope scaling 'yarn'"):
        import_hf(d, tmp_path / "o")
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(LmforgeError, match="safetensors"):
        import_hf(d, tmp_path / "o")
    assert not (tmp_path / "o").exists()

    for bad in (dict(mlp="relu2"), dict(pos_embedding="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True)):
        model = GPT(GPTConfig(vocab_size=vocab_of(tok), context_length=16, n_layer=1, n_head=2, n_embd=16, **bad))
        ckpt = save_checkpoint(tmp_path / "bad", model, tok)
        with pytest.raises(LmforgeError, match="qk_norm|no Hugging Face equivalent"):
            export_hf(ckpt, tmp_path / "bad-hf")


def test_import_sharded_mistral(tmp_path: Path, tok: Path) -> None:
    """Sharded safetensors (index.json) and Mistral, whose sliding window is ignored with a warning."""
    cfg = transformers.MistralConfig(
        vocab_size=vocab_of(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=CTX, sliding_window=48, initializer_range=0.2,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.MistralForCausalLM(cfg).eval()
    d = tmp_path / "hf"
    hf.save_pretrained(d, safe_serialization=True, max_shard_size="40KB")
    assert (d / "model.safetensors.index.json").is_file()
    (d / "tokenizer.json").write_bytes(tok.read_bytes())
    with pytest.warns(UserWarning, match="sliding-window"):
        ckpt = import_hf(str(d), tmp_path / "ckpt")
    model, _ = load_model(ckpt)
    assert model.config.n_kv_head == 1
    idx = torch.randint(0, cfg.vocab_size, (2, 40))  # within the window: exact
    with torch.no_grad():
        assert (model.eval()(idx) - hf(idx).logits).abs().max().item() <= 1e-4


def test_cli_import_sample_export(tmp_path: Path, tok: Path, capsys) -> None:
    """`lmforge import` gives an ordinary checkpoint: `sample` runs on it and `export --format hf` loads."""
    from lmforge.cli import main

    src = hf_dir(tmp_path, hf_model("llama_gqa_untied", vocab_of(tok)), tok)
    ckpt = tmp_path / "ckpt"
    assert main(["import", str(src), str(ckpt)]) == 0
    assert main(["import", str(src), str(ckpt)]) == 2  # refuses to overwrite without --overwrite
    assert "error:" in capsys.readouterr().err
    assert main(["import", str(src), str(ckpt), "--overwrite"]) == 0
    assert main(["sample", str(ckpt), "--prompt", "the quick", "--max-new-tokens", "8", "--greedy"]) == 0
    out = tmp_path / "exported"
    assert main(["export", str(ckpt), "--format", "hf", str(out)]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([Tokenizer.from_file(tok).encode("the quick brown fox")])
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, hf_model("llama_gqa_untied", vocab_of(tok))(ids).logits, atol=1e-4, rtol=0)


def test_imported_and_saved_files_get_the_usual_mode(tmp_path: Path, tok: Path) -> None:
    """safetensors writes its files 0600 (a private temporary file renamed): an imported
    model.safetensors was unreadable to others while config.json beside it was 0644."""
    import os
    import stat

    from lmforge.cli import main

    probe = tmp_path / "probe"
    probe.write_text("x")
    usual = stat.S_IMODE(probe.stat().st_mode)
    src = hf_dir(tmp_path, hf_model("llama_tied", vocab_of(tok)), tok)
    ckpt = tmp_path / "ckpt"
    assert main(["import", str(src), str(ckpt)]) == 0
    exported = tmp_path / "exported"
    assert main(["export", str(ckpt), "--format", "hf", str(exported)]) == 0
    files = [f for d in (ckpt, exported) for f in d.iterdir() if f.is_file()]
    assert any(f.name == "model.safetensors" for f in files)
    modes = {f.name: stat.S_IMODE(os.stat(f).st_mode) for f in files}
    assert set(modes.values()) == {usual}, modes

