"""Parameter-efficient methods on lmforge's own model: equivalences, training, files, interop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_llama

from lmforge.config import from_dict
from lmforge.errors import ConfigError, LmforgeError
from lmforge.model.peft import (
    PeftConfig,
    adapters_disabled,
    apply_peft,
    merge_peft,
    trainable_summary,
)
from lmforge.checkpoint.adapters import load_adapter, save_adapter
from lmforge.checkpoint import load_model

METHODS = ["lora", "dora", "adalora", "ia3", "adapter", "prefix", "prompt"]
IDENTITY_AT_INIT = ["lora", "dora", "ia3", "adapter", "adalora"]


@pytest.fixture(scope="module")
def llama_ckpt(tiny_data: Path, tmp_path_factory) -> Path:
    return save_tiny_llama(tiny_data, tmp_path_factory.mktemp("llama") / "base", context_length=64, init_std=0.1)


def _perturb(model, scale=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def _ids(vocab, shape=(2, 20), seed=0):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", IDENTITY_AT_INIT)
def test_identity_at_init_and_base_frozen(llama_ckpt, method):
    base, _ = load_model(llama_ckpt)
    model, _ = load_model(llama_ckpt)
    apply_peft(model, PeftConfig(method=method, r=4, init_r=6, target_modules=["all-linear"], dropout=0.0))
    x = _ids(base.config.vocab_size)
    base.eval(), model.eval()
    assert torch.allclose(model(x), base(x), atol=1e-6)  # B = 0 (AdaLoRA: E = 0): no update yet
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all("lora" in n or "ia3" in n or "adapter_" in n for n in names), sorted(names)[:5]
    s = trainable_summary(model)
    assert 0 < s["trainable_percent"] < 100


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains(llama_ckpt, method):
    """A few optimizer steps on one batch lower its loss; the frozen base does not move."""
    model, _ = load_model(llama_ckpt)
    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.from_file(llama_ckpt / "tokenizer.json")
    apply_peft(model, PeftConfig(method=method, r=4, init_r=6, dropout=0.0, num_virtual_tokens=4,
                                 target_modules=["all-linear"], bottleneck=8), tokenizer=tok, total_steps=30)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    x = _ids(model.config.vocab_size, (4, 24))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2 if method != "ia3" else 1e-1)
    model.train()
    first = None
    for step in range(30):
        loss = model(x[:, :-1], x[:, 1:])
        extra = model.peft.extra_loss()
        (loss + (extra if extra is not None else 0)).backward()
        opt.step()
        model.peft.after_step(step + 1)
        opt.zero_grad()
        first = first if first is not None else loss.item()
    assert loss.item() < first - 0.05, (method, first, loss.item())
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_adalora_prunes_to_budget(llama_ckpt):
    model, _ = load_model(llama_ckpt)
    apply_peft(model, PeftConfig(method="adalora", r=2, init_r=6, target_modules=["q_proj", "v_proj"],
                                 tinit_fraction=0.1, tfinal_fraction=0.2, delta_t=2), total_steps=20)
    alloc = model.peft.allocator
    assert alloc.init_budget == 6 * 4 and alloc.target_budget == 2 * 4
    x = _ids(model.config.vocab_size, (4, 24))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    budgets = []
    for step in range(1, 21):
        model(x[:, :-1], x[:, 1:]).backward()
        opt.step()
        model.peft.after_step(step)
        opt.zero_grad()
        budgets.append(alloc.budget)
    assert budgets[0] == 24 and budgets[-1] == 8 and budgets == sorted(budgets, reverse=True)
    active = sum(alloc.active_ranks().values())
    assert active <= 8  # the least important singular values are zeroed


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_virtual_tokens_through_the_kv_cache(llama_ckpt, method):
    """Training's full forward and inference's cached decode agree for prefix/prompt tuning."""
    from lmforge.infer import InferenceEngine, SamplingParams
    from lmforge.model.cache import KVCache

    model, _ = load_model(llama_ckpt)
    apply_peft(model, PeftConfig(method=method, num_virtual_tokens=5))
    _perturb(model, 0.2)
    model.eval()
    x = _ids(model.config.vocab_size, (1, 12))
    full = model(x)
    cache = KVCache(model.config, 1, max_len=64)
    cache.prefix = model.virtual_prefix_kv()
    cache.reset_row(0)
    assert cache.lengths[0] == 5
    cached = model.forward_cached(x, cache.rows(0, 1), logits="all")
    assert torch.allclose(full, cached, atol=1e-5)
    with adapters_disabled(model):  # the base model without virtual tokens differs
        assert not torch.allclose(model(x), full, atol=1e-3)
    # greedy generation through the engine equals greedy recomputation with the full forward
    engine = InferenceEngine(model, None, max_batch_size=2)
    out = engine.generate([x[0].tolist()], SamplingParams(max_tokens=6, temperature=0))[0]
    seq = x[0].tolist()
    for _ in range(6):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert out.token_ids == seq[12:]
    assert engine.max_seq_len == 64 - 5


def test_qlora_over_int8_and_int4_base(llama_ckpt):
    for q in ("int8", "int4"):
        model, _ = load_model(llama_ckpt)
        apply_peft(model, PeftConfig(method="lora", r=4, quantize_base=q, group_size=32, target_modules=["q_proj", "v_proj"]))
        assert model.quantization["method"] == q
        x = _ids(model.config.vocab_size, (2, 24))
        loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("method", ["lora", "dora", "adalora", "ia3"])
def test_save_load_merge_roundtrip(llama_ckpt, tmp_path, method):
    model, _ = load_model(llama_ckpt)
    apply_peft(model, PeftConfig(method=method, r=4, init_r=4, dropout=0.0, target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]))
    _perturb(model)
    model.eval()
    x = _ids(model.config.vocab_size)
    ours = model(x)
    save_adapter(tmp_path, model, base_checkpoint=str(llama_ckpt))
    assert (tmp_path / "adapter_model.safetensors").is_file()
    fresh, _ = load_model(llama_ckpt)
    load_adapter(fresh, tmp_path)
    fresh.eval()
    assert torch.equal(fresh(x), ours)
    merge_peft(fresh)
    assert all(type(m).__name__ in ("Linear",) for m in fresh.modules() if hasattr(m, "in_features"))
    assert torch.allclose(fresh(x), ours, atol=1e-5)


def test_peft_interop_with_transformers(llama_ckpt, tmp_path):
    """A LoRA (and DoRA) adapter trained in lmforge loads with `peft` onto the exported HF model."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from lmforge.io.hf import export_hf

    hf_dir = export_hf(llama_ckpt, tmp_path / "hf")
    for method in ("lora", "dora"):
        model, _ = load_model(llama_ckpt)
        apply_peft(model, PeftConfig(method=method, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]))
        _perturb(model)
        model.eval()
        out = tmp_path / method
        out.mkdir()
        save_adapter(out, model, base_checkpoint=str(llama_ckpt))
        cfg = json.loads((out / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA" and cfg["use_dora"] == (method == "dora")
        hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
        pm = peft.PeftModel.from_pretrained(hf, out).eval()
        x = _ids(model.config.vocab_size)
        with torch.no_grad():
            theirs = pm(x).logits
            ours = model(x)
        assert (theirs - ours).abs().max().item() < 1e-4
        # and an adapter written by peft loads into lmforge
        pm.save_pretrained(tmp_path / f"{method}-peft", save_embedding_layers=False)
        back, _ = load_model(llama_ckpt)
        load_adapter(back, tmp_path / f"{method}-peft")
        back.eval()
        assert (back(x) - ours).abs().max().item() < 1e-5


def test_bad_settings_and_mismatched_adapters(llama_ckpt, tiny_checkpoint, tmp_path):
    with pytest.raises(ConfigError, match="rank"):
        from_dict(PeftConfig, {"method": "lora", "r": 0}, "peft")
    with pytest.raises(ConfigError, match="rank"):
        from_dict(PeftConfig, {"method": "lora", "r": -2}, "peft")
    model, _ = load_model(llama_ckpt)
    with pytest.raises(ConfigError, match="unknown peft target"):
        apply_peft(model, PeftConfig(method="lora", target_modules=["q_proj", "wq"]))
    with pytest.raises(ConfigError, match="overlap"):
        apply_peft(model, PeftConfig(method="lora", target_modules=["qkv_proj", "q_proj"]))
    apply_peft(model, PeftConfig(method="lora", r=2))
    save_adapter(tmp_path, model, base_checkpoint=str(llama_ckpt))
    other, _ = load_model(tiny_checkpoint)  # a GPT-2-style base of another shape
    with pytest.raises(LmforgeError, match="different base model"):
        load_adapter(other, tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"not safetensors")
    fresh, _ = load_model(llama_ckpt)
    with pytest.raises(LmforgeError, match="cannot be read"):
        load_adapter(fresh, tmp_path)
    prefix_model, _ = load_model(llama_ckpt)
    apply_peft(prefix_model, PeftConfig(method="prefix", num_virtual_tokens=3))
    with pytest.raises(LmforgeError, match="cannot be folded"):
        merge_peft(prefix_model)


def test_gpt2_family_adapter_in_peft_format(tiny_checkpoint, tmp_path):
    """GPT-2 fuses q/k/v in c_attn: q and v slice adapters become one stacked LoRA that peft
    loads onto the exported GPT2LMHeadModel (logits agree), and that loads back into lmforge."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from lmforge.io.hf import export_hf

    hf_dir = export_hf(tiny_checkpoint, tmp_path / "hf")
    for method in ("lora", "dora"):
        model, _ = load_model(tiny_checkpoint)
        apply_peft(model, PeftConfig(method=method, r=2, alpha=4, dropout=0.0, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]))
        _perturb(model, 0.1)
        model.eval()
        out = tmp_path / method
        out.mkdir()
        save_adapter(out, model, base_checkpoint=str(tiny_checkpoint))
        cfg = json.loads((out / "adapter_config.json").read_text())
        assert cfg["fan_in_fan_out"] and cfg["rank_pattern"] == {"attn.c_attn": 4}
        hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
        pm = peft.PeftModel.from_pretrained(hf, out).eval()
        x = _ids(model.config.vocab_size, (2, 12))
        with torch.no_grad():
            assert (pm(x).logits - model(x)).abs().max().item() < 1e-4
        back, _ = load_model(tiny_checkpoint)
        load_adapter(back, out)
        back.eval()
        assert torch.allclose(back(x), model(x), atol=1e-6)


def test_frozen_base_stored_in_bf16_trains_identically_under_autocast(llama_ckpt):
    """Autocast rounds fp32 weights to the same bf16 values at every use: storing the frozen
    base in bf16 once gives the same loss and adapter gradients (and half the base memory)."""
    from lmforge.model.peft import store_frozen_in

    x = _ids(66, (2, 24))
    results = []
    for cast in (False, True):
        torch.manual_seed(0)
        model, _ = load_model(llama_ckpt)
        apply_peft(model, PeftConfig(method="lora", r=4, dropout=0.0, target_modules=["all-linear"]))
        _perturb(model)
        if cast:
            assert store_frozen_in(model, torch.bfloat16) > 0
            assert model.layers[0].attn.qkv_proj.base_layer.weight.dtype == torch.bfloat16
            assert model.embed_tokens.weight.dtype == torch.float32 and model.lm_head.weight.dtype == torch.bfloat16
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x[:, :-1] % model.config.vocab_size, x[:, 1:] % model.config.vocab_size)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.item(), grads))
    assert results[0][0] == results[1][0]
    assert all(torch.equal(results[0][1][n], results[1][1][n]) for n in results[0][1])


def test_parameter_count_is_the_same_with_the_frozen_base_in_bf16(llama_ckpt):
    """A tied model's bf16 lm_head copy is no new parameters: `finetune` printed 167.71M in bf16 and
    139.40M in fp32 for the same SmolLM2 + LoRA (the embedding counted twice)."""
    from lmforge.model.peft import store_frozen_in, trainable_summary

    model, _ = load_model(llama_ckpt)
    assert model.config.tie_embeddings
    apply_peft(model, PeftConfig(method="lora", r=4, target_modules=["all-linear"]))
    n, summary = model.num_params(), trainable_summary(model)
    assert n == sum(p.numel() for p in model.parameters())
    store_frozen_in(model, torch.bfloat16)
    assert "lm_head" in model._modules
    assert model.num_params() == n and trainable_summary(model) == summary
