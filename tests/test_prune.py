"""Pruning: magnitude sparsity, structured MLP-channel and attention-head removal (GQA),
checkpoints of the smaller shape, recovery fine-tuning, and bad settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_PRETRAIN, save_tiny_llama

from lmforge.cli import main
from lmforge.errors import ConfigError, LmforgeError
from lmforge.checkpoint import load_model
from lmforge.commands.checkpoint import calibration_batches, prune_and_recover, prune_checkpoint
from lmforge.model.gpt import GPT, GPTConfig
from lmforge.model.prune import magnitude_prune, prune_model, structured_prune


def tiny_model(**kw) -> GPT:
    torch.manual_seed(0)
    base = {"vocab_size": 40, "context_length": 16, "n_layer": 2, "n_head": 4, "n_kv_head": 2, "n_embd": 32, "init_std": 0.2}
    return GPT(GPTConfig(**{**base, **kw})).eval()


LLAMA = {"pos_embedding": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False, "tie_embeddings": False}
GPT2 = {"pos_embedding": "learned", "norm": "layernorm", "mlp": "gelu", "bias": True, "n_kv_head": 4}


def ids(seed: int = 1, batch: int = 3) -> torch.Tensor:
    return torch.randint(0, 40, (batch, 16), generator=torch.Generator().manual_seed(seed))


# ---- structured: MLP channels -------------------------------------------------------------------
@pytest.mark.parametrize("family", [LLAMA, GPT2], ids=["llama", "gpt2-bias"])
@pytest.mark.parametrize("importance", ["weight", "activation"])
def test_mlp_channels_that_contribute_nothing_are_removed_exactly(family, importance):
    model = tiny_model(**family)
    hidden = model.config.intermediate_size
    dead = {}
    with torch.no_grad():
        for i, layer in enumerate(model.layers):  # channels whose down_proj columns are zero add nothing
            dead[i] = torch.randperm(hidden, generator=torch.Generator().manual_seed(i))[: hidden // 4]
            layer.mlp.down_proj.weight[:, dead[i]] = 0
    x = ids()
    before = model(x)
    calib = [ids(7), ids(8)] if importance == "activation" else None
    report = structured_prune(model, "mlp", 0.25, calibration=calib, importance=importance)
    assert report["shape"] == {"intermediate_size": [hidden, hidden - hidden // 4]}
    assert model.config.intermediate_size == hidden - hidden // 4
    for layer in model.layers:
        assert layer.mlp.down_proj.weight.shape == (32, hidden - hidden // 4)
        assert (layer.mlp.down_proj.weight != 0).all(dim=0).all()  # exactly the dead channels went
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)
    assert report["params"][1] < report["params"][0]


def test_activation_importance_removes_the_channels_that_never_fire():
    """ReLU^2 channels with a strongly negative bias never fire on real inputs: only activation
    statistics see it (their weights are as large as any), and removing them is exact."""
    model = tiny_model(pos_embedding="learned", norm="layernorm", mlp="relu2", bias=True, n_kv_head=4)
    hidden = model.config.intermediate_size
    with torch.no_grad():
        for layer in model.layers:
            layer.mlp.up_proj.bias[: hidden // 2] = -1e4
    x = ids()
    before = model(x)
    structured_prune(model, "mlp", 0.5, calibration=[ids(5)], importance="activation")
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)


# ---- structured: attention heads under GQA ------------------------------------------------------
def test_head_pruning_removes_kv_groups_with_their_query_heads():
    model = tiny_model(**LLAMA)  # 4 query heads over 2 KV groups, head_dim 8
    with torch.no_grad():  # group 1 (query heads 2 and 3) writes nothing to the residual stream
        for layer in model.layers:
            layer.attn.o_proj.weight[:, 16:32] = 0
    kept_qkv = [layer.attn.qkv_proj.weight[torch.cat([torch.arange(16), torch.arange(32, 40), torch.arange(48, 56)])].clone() for layer in model.layers]
    x = ids()
    before = model(x)
    report = structured_prune(model, "heads", 0.5, importance="weight")
    assert report["shape"] == {"n_head": [4, 2], "n_kv_head": [2, 1]}
    cfg = model.config
    assert (cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.n_embd) == (2, 1, 8, 32)
    for layer, qkv in zip(model.layers, kept_qkv):
        torch.testing.assert_close(layer.attn.qkv_proj.weight, qkv)  # group 0's q, k and v rows, in order
        assert layer.attn.o_proj.weight.shape == (32, 16)
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)


def test_head_pruning_with_activation_importance_and_bias_compensation():
    """Multi-head GPT-2 shape with biases: a head whose values are constant contributes only
    its mean, which is folded into o_proj's bias, so removing it is exact."""
    model = tiny_model(**GPT2)
    with torch.no_grad():
        for layer in model.layers:  # head 3: zero value weights, a constant value bias
            layer.attn.qkv_proj.weight[64 + 24 : 64 + 32] = 0
            layer.attn.qkv_proj.bias[64 + 24 : 64 + 32] = 0.5
    x = ids()
    before = model(x)
    structured_prune(model, "heads", 0.25, calibration=[ids(9)], importance="activation")
    assert (model.config.n_head, model.config.n_kv_head, model.config.head_dim) == (3, 3, 8)
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)


# ---- checkpoints -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_ckpt(tiny_data, tmp_path_factory) -> Path:
    return save_tiny_llama(tiny_data, tmp_path_factory.mktemp("llama") / "ckpt", context_length=16, init_std=0.2)


@pytest.mark.parametrize("method,ratio", [("mlp", 0.3), ("heads", 0.5)])
def test_pruned_checkpoint_reloads_samples_and_exports(llama_ckpt, tiny_data, tmp_path, method, ratio):
    out, report = prune_checkpoint(llama_ckpt, tmp_path / "pruned", method, ratio, calib_data=tiny_data,
                                   calib_batches=2)
    assert report["importance"] == "activation" and report["calibration_batches"] == 2
    model, _ = load_model(llama_ckpt)
    calib = calibration_batches(tiny_data, 16, 2)
    structured_prune(model, method, ratio, calibration=calib)
    loaded, _ = load_model(out)
    assert loaded.config == model.config
    base_cfg = load_model(llama_ckpt)[0].config
    if method == "mlp":
        assert loaded.config.intermediate_size == base_cfg.intermediate_size - round(0.3 * base_cfg.intermediate_size)
    else:
        assert (loaded.config.n_head, loaded.config.n_kv_head) == (2, 1)
    x = ids()
    torch.testing.assert_close(loaded.eval()(x), model.eval()(x))
    config = json.loads((out / "config.json").read_text())
    assert config["pruning"][0]["method"] == method
    assert (out / "tokenizer.json").is_file()

    from lmforge.infer.engine import load_engine
    from lmforge.infer.sampling import SamplingParams

    engine = load_engine(str(out), max_batch_size=1)
    [result] = engine.generate(["ROMEO:"], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
    assert len(result.token_ids) == 5

    transformers = pytest.importorskip("transformers")
    from lmforge.io.hf import export_hf

    hf_dir = export_hf(out, tmp_path / "hf")
    hf_cfg = json.loads((hf_dir / "config.json").read_text())
    assert hf_cfg["intermediate_size"] == loaded.config.intermediate_size
    assert (hf_cfg["num_attention_heads"], hf_cfg["head_dim"]) == (loaded.config.n_head, 8)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, loaded(x), atol=1e-4, rtol=1e-4)


def test_pruned_then_quantized(llama_ckpt, tmp_path):
    from lmforge.commands.checkpoint import quantize_checkpoint

    out, _ = prune_checkpoint(llama_ckpt, tmp_path / "pruned", "mlp", 0.3, importance="weight")
    q = quantize_checkpoint(out, tmp_path / "int8", "int8")
    model, _ = load_model(q)
    assert model.quantization["method"] == "int8" and model.config.intermediate_size == 128 - 38
    assert torch.isfinite(model(ids())).all()
    with pytest.raises(ConfigError, match="quantized"):
        prune_checkpoint(q, tmp_path / "again", "mlp", 0.3)


# ---- magnitude --------------------------------------------------------------------------------
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_magnitude_sparsity_equals_the_ratio(scope):
    model = tiny_model(**LLAMA)
    embed = model.embed_tokens.weight.clone()
    head = model.lm_head.weight.clone()
    report = magnitude_prune(model, 0.4, scope=scope)
    mats = [m.weight for m in model.layers.modules() if isinstance(m, torch.nn.Linear)]
    zeros = sum(int((w == 0).sum()) for w in mats)
    total = sum(w.numel() for w in mats)
    assert zeros == pytest.approx(0.4 * total, abs=len(mats))
    assert report["sparsity"] == pytest.approx(zeros / total)
    if scope == "layer":
        for w in mats:
            assert int((w == 0).sum()) == round(0.4 * w.numel())
    torch.testing.assert_close(model.embed_tokens.weight, embed)  # excluded by default
    torch.testing.assert_close(model.lm_head.weight, head)
    assert 0 < report["sparsity_all"] < report["sparsity"]


def test_magnitude_keeps_the_largest_weights():
    model = tiny_model(**LLAMA)
    w0 = model.layers[0].mlp.down_proj.weight.detach().clone()
    magnitude_prune(model, 0.5)
    w = model.layers[0].mlp.down_proj.weight
    kept = w != 0
    assert w0.abs()[kept].min() >= w0.abs()[~kept].max()
    torch.testing.assert_close(w[kept], w0[kept])


def test_magnitude_checkpoint_stores_the_zeros(llama_ckpt, tmp_path):
    assert main(["prune", str(llama_ckpt), str(tmp_path / "sparse"), "--method", "magnitude", "--ratio", "0.5"]) == 0
    model, _ = load_model(tmp_path / "sparse")
    w = model.layers[1].attn.o_proj.weight
    assert int((w == 0).sum()) == w.numel() // 2
    assert json.loads((tmp_path / "sparse" / "config.json").read_text())["pruning"][0]["sparsity"] == 0.5


# ---- recovery ---------------------------------------------------------------------------------
def test_recovery_fine_tuning_lowers_the_loss(tiny_checkpoint, tiny_data, tmp_path):
    overrides = [o for o in TINY_PRETRAIN if o.startswith(("train.", "log."))]
    overrides = [o for o in overrides if not o.startswith("train.warmup_steps")]
    summary = prune_and_recover(
        tiny_checkpoint, tmp_path / "run", "mlp", 0.5, recover_data=tiny_data, recover_steps=25,
        recover_overrides=overrides + ["train.lr=1e-2"], calib_batches=2,
    )
    rec = summary["recovery"]
    assert rec["steps"] == 25
    assert rec["val_loss_after_recovery"] < rec["val_loss_after_prune"] - 0.1
    pruned, _ = load_model(tmp_path / "run" / "pruned")
    recovered, _ = load_model(tmp_path / "run")  # the run's newest checkpoint
    assert recovered.config.intermediate_size == pruned.config.intermediate_size == 64
    assert json.loads((tmp_path / "run" / "prune_report.json").read_text())["recovery"]["steps"] == 25


# ---- bad settings -----------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0.0, 1.0, 1.5, -0.2])
def test_ratio_outside_the_open_interval_is_refused(ratio):
    with pytest.raises(ConfigError, match=r"ratio must be in \(0, 1\)"):
        prune_model(tiny_model(**LLAMA), "mlp", ratio)


def test_unknown_method_and_importance():
    with pytest.raises(ConfigError, match="unknown pruning method 'rows'"):
        prune_model(tiny_model(), "rows", 0.3)
    with pytest.raises(ConfigError, match="activation importance needs calibration data"):
        prune_model(tiny_model(), "mlp", 0.3, importance="activation")


def test_head_ratios_that_do_not_remove_whole_groups_are_refused():
    with pytest.raises(ConfigError, match="must be one of 0.5 \\(got 0.3\\)"):
        prune_model(tiny_model(**LLAMA), "heads", 0.3)
    with pytest.raises(ConfigError, match="must be one of 0.25, 0.5, 0.75"):
        prune_model(tiny_model(**GPT2), "heads", 0.99)  # would remove every head
    with pytest.raises(ConfigError, match="one KV group"):
        prune_model(tiny_model(**{**LLAMA, "n_kv_head": 1}), "heads", 0.5)


def test_cli_errors_are_one_line(llama_ckpt, tmp_path, capsys):
    assert main(["prune", str(llama_ckpt), str(tmp_path / "o"), "--method", "mlp", "--ratio", "1"]) == 2
    assert "error: the pruning ratio must be in (0, 1), got 1.0" in capsys.readouterr().err
    assert main(["prune", str(llama_ckpt), str(tmp_path / "o"), "--method", "heads", "--ratio", "0.3"]) == 2
    assert "error: head pruning removes whole KV groups of 2 query heads" in capsys.readouterr().err
    assert main(["prune", str(llama_ckpt), str(tmp_path / "o"), "--method", "mlp", "--ratio", "0.3",
                 "train.lr=1e-3"]) == 2
    assert "add --recover-data" in capsys.readouterr().err
    assert main(["prune", str(tmp_path / "missing"), str(tmp_path / "o"), "--method", "mlp", "--ratio", "0.3"]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_structured_pruning_of_a_model_with_an_adapter_is_refused():
    model = tiny_model(**LLAMA)
    model.peft = object()
    with pytest.raises(LmforgeError, match="merge it first"):
        prune_model(model, "mlp", 0.3)
