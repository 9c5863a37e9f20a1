"""`lmforge attention`: captured probabilities reproduce the attention output, match
transformers' eager attentions, and the command writes readable PNGs, HTML and JSON."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_llama

from lmforge.cli import main
from lmforge.eval.attention import attention_share, capture_attention
from lmforge.model.gpt import GPT, GPTConfig
from lmforge.checkpoint import load_model

TEXT = "First Citizen: speak"  # 20 characters; the tiny GPT-2-style checkpoint's context is 16

FAMILIES = {
    "gpt2": {"mlp": "gelu_tanh"},  # GPT-2: learned positions, LayerNorm, tanh GELU, MHA
    "llama": {"pos_embedding": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False, "n_head": 4, "n_kv_head": 2},
}


def tiny_model(family: str, vocab_size: int = 40) -> GPT:
    torch.manual_seed(0)
    cfg = {"vocab_size": vocab_size, "context_length": 24, "n_layer": 2, "n_head": 2, "n_embd": 32, "init_std": 0.2}
    return GPT(GPTConfig(**{**cfg, **FAMILIES[family]})).eval()


@pytest.mark.parametrize("impl", ["auto", "math"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_probabilities_reproduce_the_attention_output(family, impl):
    model = tiny_model(family)
    for layer in model.layers:
        layer.attn.impl = impl  # sdpa and the matmul path both hand their output to the observer
    ids = torch.randint(0, 40, (13,), generator=torch.Generator().manual_seed(1))
    maps = capture_attention(model, ids, keep_outputs=True)
    H = model.config.n_head
    assert maps.probs.shape == (2, H, 13, 13)
    assert torch.allclose(maps.probs.sum(-1), torch.ones(2, H, 13), atol=1e-6)
    upper = torch.ones(13, 13, dtype=torch.bool).triu(1)
    assert (maps.probs[..., upper] == 0).all()  # causal: nothing from the future
    assert (maps.probs[..., ~upper] > 0).all()
    for li, (q, k, v, y) in maps.outputs.items():
        assert v.shape[1] == H  # GQA: each key/value head repeated for its query group
        assert torch.allclose(torch.matmul(maps.probs[li][None], v), y, atol=1e-5)
    assert maps.reconstruction_error < 1e-5
    assert all(layer.attn.capture is None for layer in model.layers)  # the observer is removed
    # a different selection of layers gives the same maps for those layers
    assert torch.equal(capture_attention(model, ids, [1]).probs[0], maps.probs[1])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_probabilities_match_transformers_eager_attention(family, tiny_data, tmp_path):
    """An independent reference for learned positions, RoPE and GQA: the exported model in transformers."""
    transformers = pytest.importorskip("transformers")
    from lmforge.io import export_hf
    from lmforge.checkpoint import save_checkpoint

    vocab = json.loads((tiny_data / "meta.json").read_text())["vocab_size"]
    model = tiny_model(family, vocab_size=vocab)
    ckpt = save_checkpoint(tmp_path / "ckpt", model, tiny_data / "tokenizer.json")
    hf = transformers.AutoModelForCausalLM.from_pretrained(export_hf(ckpt, tmp_path / "hf"), attn_implementation="eager")
    ids = torch.randint(0, vocab, (1, 17), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs = torch.stack(hf.eval()(ids, output_attentions=True).attentions)[:, 0]  # (L, H, T, T)
    ours = capture_attention(model, ids).probs
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max() < 1e-5


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_virtual_tokens_are_columns_every_token_sees(method):
    from lmforge.model.peft import PeftConfig, apply_peft

    model = tiny_model("llama")
    apply_peft(model, PeftConfig(method=method, num_virtual_tokens=3))
    ids = torch.arange(5, 15)
    maps = capture_attention(model, ids)
    assert maps.virtual == 3
    assert maps.probs.shape == (2, 4, 10, 13)
    assert torch.allclose(maps.probs.sum(-1), torch.ones(2, 4, 10), atol=1e-6)
    assert (maps.probs[..., :3] > 0).all()  # every token sees the virtual tokens
    upper = torch.ones(10, 10, dtype=torch.bool).triu(1)
    assert (maps.probs[..., 3:][..., upper] == 0).all()
    assert maps.reconstruction_error < 1e-5


# ---- the command ---------------------------------------------------------------------------------
def check_png(path: Path) -> None:
    import matplotlib.image as mpimg

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(path)
    assert img.shape[0] > 200 and img.shape[1] > 200
    assert float(img[..., :3].std()) > 0.05  # drawn, not blank


def test_cli_writes_maps_html_and_json(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "maps"
    text = TEXT[:14]
    assert main(["attention", str(tiny_checkpoint), text, "--out", str(out), "--top-k", "3"]) == 0
    printed = capsys.readouterr().out
    for name in ("layer0.png", "layer1.png", "overview.png"):
        check_png(out / name)
    record = json.loads((out / "attention.json").read_text())
    tokens = [t["text"] for t in record["tokens"]]
    assert "".join(tokens) == text and record["layers"] == [0, 1] and record["heads"] == [0, 1]
    assert record["max_reconstruction_error"] < 1e-5

    # the top tokens are those of the probabilities, recomputed here
    model, _ = load_model(tiny_checkpoint)
    maps = capture_attention(model, [t["id"] for t in record["tokens"]])
    share = attention_share(maps.probs)  # (L, H, S)
    for layer in record["per_layer"]:
        for entry in layer["heads"]:
            expect = share[layer["layer"], entry["head"]]
            got = [t["position"] for t in entry["top"]]
            assert got == torch.argsort(expect, descending=True, stable=True)[:3].tolist()
            assert [t["share"] for t in entry["top"]] == pytest.approx(expect[got].tolist(), abs=1e-6)
            assert entry["first_token_share"] == pytest.approx(float(expect[0]), abs=1e-6)
    overall = share.mean(dim=(0, 1))
    top = record["overall"]["top"]
    assert [t["position"] for t in top] == (torch.argsort(overall[1:], descending=True)[:3] + 1).tolist()
    assert all(not t["sink"] for t in top) and record["overall"]["first_token_share"] == pytest.approx(float(overall[0]), abs=1e-6)
    # the table on stdout lists the overall top tokens
    rows = re.findall(r"^\s+\d+\s+(\d+)\s+[\d.]+%", printed, flags=re.MULTILINE)
    assert [int(r) for r in rows] == [t["position"] for t in top]
    assert "attention sink" in printed

    html = (out / "attention.html").read_text()
    assert "http://" not in html and "https://" not in html and "<script src" not in html  # self-contained
    data = json.loads(re.search(r'<script id="data" type="application/json">(.*?)</script>', html, re.DOTALL)[1])
    assert data["tokens"] == tokens
    assert len(data["attn"]) == 2 and len(data["attn"][0]) == 2 and len(data["attn"][0][0]) == len(tokens)
    row = data["attn"][1][0][5]  # layer 1, head 0, query 5: its 6 visible positions
    assert row == pytest.approx(maps.probs[1, 0, 5, :6].tolist(), abs=1e-4)


def test_cli_selection_run_dir_and_truncation(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(tiny_checkpoint, run / "checkpoints" / "step_3")
    monkeypatch.chdir(tmp_path)
    assert main(["attention", str(run), TEXT, "--max-tokens", "10", "--layers", "1", "--heads", "0"]) == 0
    out = tmp_path / "runs" / "attention" / "first-citizen-speak"  # the default: a slug of the text
    assert "keeping the first 10" in capsys.readouterr().err
    assert sorted(p.name for p in out.glob("*.png")) == ["layer1.png", "overview.png"]
    record = json.loads((out / "attention.json").read_text())
    assert len(record["tokens"]) == 10 and record["layers"] == [1] and record["heads"] == [0]
    assert [h["head"] for h in record["per_layer"][0]["heads"]] == [0]


def test_cli_prefix_adapter_checkpoint_with_chat_template(tiny_data, tmp_path):
    """A Llama-family adapter checkpoint (prefix-tuning: 3 virtual tokens) loads as `chat` loads it."""
    from lmforge.model.peft import PeftConfig, apply_peft
    from lmforge.checkpoint import save_checkpoint

    base = save_tiny_llama(tiny_data, tmp_path / "llama", context_length=96, init_std=0.2)
    model, _ = load_model(base)
    apply_peft(model, PeftConfig(method="prefix", num_virtual_tokens=3))
    adapter = save_checkpoint(tmp_path / "adapter", model, base / "tokenizer.json", base_checkpoint=base)
    out = tmp_path / "chat"
    assert main(["attention", str(adapter), "hi", "--chat", "--out", str(out), "--layers", "0"]) == 0
    record = json.loads((out / "attention.json").read_text())
    assert record["text"].startswith("<|im_start|>user\nhi") and record["n_kv_head"] == 2
    assert record["virtual_tokens"] == 3 and record["virtual_kind"] == "prefix"
    assert record["tokens"][0]["position"] == 3 and record["overall"]["first_token"] == "[v0]"
    assert record["max_reconstruction_error"] < 1e-5
    check_png(out / "layer0.png")
    html = (out / "attention.html").read_text()
    data = json.loads(re.search(r'<script id="data" type="application/json">(.*?)</script>', html, re.DOTALL)[1])
    assert data["virtual"] == 3 and len(data["attn"][0][0][0]) == 4  # the first token sees 3 virtual + itself


@pytest.mark.parametrize(
    "args, message",
    [
        (["{ckpt}", "   "], "the text is empty"),
        (["{tmp}/nowhere", "hello"], "checkpoint not found"),
        (["{ckpt}", "hello", "--layers", "2"], "out of range"),
        (["{ckpt}", "hello", "--heads", "0,7"], "out of range"),
        (["{ckpt}", "hello", "--layers", "one"], "expected indices"),
        (["{ckpt}", TEXT], "longer than the model's context (16 tokens)"),
        (["{ckpt}", "hello", "--max-tokens", "99"], "exceeds the model's context"),
        (["{ckpt}", "hello", "--top-k", "0"], "--top-k must be at least 1"),
    ],
)
def test_cli_bad_input(tiny_checkpoint, tmp_path, capsys, args, message):
    argv = [a.format(ckpt=tiny_checkpoint, tmp=tmp_path) for a in args]
    assert main(["attention", *argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
