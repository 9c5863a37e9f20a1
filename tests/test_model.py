"""The GPT model: every architectural variant, causality, attention paths, presets, accounting."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import MACHINES

from lmforge.config import from_dict
from lmforge.hardware import use_capabilities
from lmforge.model.gpt import GPT, Attention, GPTConfig, apply_rope, math_attention, rope_tables, use_math_attention

VOCAB, T, B = 50, 16, 3


def tiny(**kw) -> GPTConfig:
    base = dict(vocab_size=VOCAB, context_length=T, n_layer=2, n_head=4, n_embd=32)
    return GPTConfig(**{**base, **kw})


def build(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny(**kw)).eval()


def set_attention(model: GPT, impl: str) -> None:
    for m in model.modules():
        if isinstance(m, Attention):
            m.impl = impl


VARIANTS = {
    "gpt2": dict(),  # learned positions, LayerNorm, GELU, tied, biases
    "llama": dict(pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False),
    "gelu_tanh": dict(mlp="gelu_tanh"),
    "relu2": dict(mlp="relu2", norm="rmsnorm"),
    "gqa": dict(n_kv_head=2, pos_embedding="rope"),
    "mqa": dict(n_kv_head=1, pos_embedding="rope", norm="rmsnorm"),
    "untied": dict(tie_embeddings=False),
    "qk_norm": dict(qk_norm=True, pos_embedding="rope"),
    "qkv_bias_only": dict(bias=False, qkv_bias=True, pos_embedding="rope"),  # Qwen2
    "no_bias": dict(bias=False),
    "nopos": dict(pos_embedding="none"),
    "wide_heads": dict(head_dim=16, n_kv_head=2),  # n_head * head_dim != n_embd
}


# ----------------------------------------------------------------------- forward and loss
@pytest.mark.parametrize("name", list(VARIANTS))
def test_forward_shapes_loss_and_gradients(name: str) -> None:
    model = build(**VARIANTS[name]).train()
    idx = torch.randint(0, VOCAB, (B, T))
    targets = torch.randint(0, VOCAB, (B, T))
    logits = model(idx)
    assert logits.shape == (B, T, VOCAB) and logits.dtype == torch.float32
    loss = model(idx, targets)
    assert loss.shape == () and torch.isfinite(loss)
    assert loss.item() == pytest.approx(F.cross_entropy(logits.view(-1, VOCAB), targets.view(-1)).item(), abs=1e-5)
    assert abs(loss.item() - math.log(VOCAB)) < 0.1  # small init: nearly uniform predictions
    # -100 marks positions without loss
    masked = targets.clone()
    masked[:, : T // 2] = -100
    expected = F.cross_entropy(logits[:, T // 2 :].reshape(-1, VOCAB), targets[:, T // 2 :].reshape(-1))
    assert model(idx, masked).item() == pytest.approx(expected.item(), abs=1e-5)
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname
    # shorter sequences work; longer than the context do not
    assert model(idx[:, :5]).shape == (B, 5, VOCAB)
    with pytest.raises(ValueError, match="exceeds context_length"):
        model(torch.zeros(1, T + 1, dtype=torch.long))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_parameter_shapes_follow_the_config(name: str) -> None:
    cfg = tiny(**VARIANTS[name])
    model = GPT(cfg)
    params = dict(model.named_parameters())
    q, kv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    assert params["layers.0.attn.qkv_proj.weight"].shape == (q + 2 * kv, cfg.n_embd)
    assert params["layers.0.attn.o_proj.weight"].shape == (cfg.n_embd, q)
    assert ("layers.0.attn.qkv_proj.bias" in params) == cfg.qkv_bias
    assert ("layers.0.attn.o_proj.bias" in params) == cfg.bias
    assert ("layers.0.attn.q_norm.weight" in params) == cfg.qk_norm == ("layers.0.attn.k_norm.weight" in params)
    assert ("embed_positions.weight" in params) == (cfg.pos_embedding == "learned")
    assert ("lm_head.weight" in params) == (not cfg.tie_embeddings)
    assert ("norm.bias" in params) == (cfg.norm == "layernorm" and cfg.bias)
    if cfg.mlp == "swiglu":
        assert params["layers.0.mlp.gate_up_proj.weight"].shape == (2 * cfg.intermediate_size, cfg.n_embd)
        assert "layers.0.mlp.up_proj.weight" not in params
    else:
        assert params["layers.0.mlp.up_proj.weight"].shape == (cfg.intermediate_size, cfg.n_embd)
    assert params["layers.0.mlp.down_proj.weight"].shape == (cfg.n_embd, cfg.intermediate_size)
    assert model.output_weight() is (params["embed_tokens.weight"] if cfg.tie_embeddings else params["lm_head.weight"])


def test_derived_sizes() -> None:
    assert tiny().intermediate_size == 128  # 4 * n_embd
    assert tiny(mlp="swiglu").intermediate_size == 128  # 8/3 * 32 = 85 -> rounded up to a multiple of 64
    assert tiny(mlp="swiglu", n_embd=96).intermediate_size == 256  # 256 exactly
    assert tiny(n_kv_head=None).n_kv_head == 4 and tiny().head_dim == 8
    assert tiny(bias=False).qkv_bias is False and tiny(bias=False, qkv_bias=True).qkv_bias is True


def test_module_names_follow_the_llama_convention() -> None:
    gpt2 = GPT(tiny(n_layer=1))
    assert list(gpt2.state_dict()) == [
        "embed_tokens.weight",
        "embed_positions.weight",
        "layers.0.attn_norm.weight",
        "layers.0.attn_norm.bias",
        "layers.0.attn.qkv_proj.weight",
        "layers.0.attn.qkv_proj.bias",
        "layers.0.attn.o_proj.weight",
        "layers.0.attn.o_proj.bias",
        "layers.0.mlp_norm.weight",
        "layers.0.mlp_norm.bias",
        "layers.0.mlp.up_proj.weight",
        "layers.0.mlp.up_proj.bias",
        "layers.0.mlp.down_proj.weight",
        "layers.0.mlp.down_proj.bias",
        "norm.weight",
        "norm.bias",
    ]
    llama = GPT(tiny(n_layer=1, **VARIANTS["llama"], qk_norm=True))
    assert list(llama.state_dict()) == [  # rope tables are buffers but not saved
        "embed_tokens.weight",
        "layers.0.attn_norm.weight",
        "layers.0.attn.qkv_proj.weight",
        "layers.0.attn.o_proj.weight",
        "layers.0.attn.q_norm.weight",
        "layers.0.attn.k_norm.weight",
        "layers.0.mlp_norm.weight",
        "layers.0.mlp.gate_up_proj.weight",
        "layers.0.mlp.down_proj.weight",
        "norm.weight",
        "lm_head.weight",
    ]


def test_init_scales_residual_projections() -> None:
    model = build(n_layer=8, n_embd=256, context_length=8)
    std = lambda name: dict(model.named_parameters())[name].std().item()  # noqa: E731
    assert std("layers.0.attn.qkv_proj.weight") == pytest.approx(0.02, rel=0.05)
    assert std("layers.0.attn.o_proj.weight") == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert std("layers.0.mlp.down_proj.weight") == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert std("embed_tokens.weight") == pytest.approx(0.02, rel=0.1)
    assert torch.all(model.layers[0].attn.qkv_proj.bias == 0) and torch.all(model.norm.weight == 1)


# ------------------------------------------------------------------------------ causality
@pytest.mark.parametrize("impl", ["sdpa", "math"])
@pytest.mark.parametrize("name", ["gpt2", "llama", "mqa", "qk_norm", "nopos"])
def test_changing_a_future_token_never_changes_earlier_logits(name: str, impl: str) -> None:
    model = build(**VARIANTS[name])
    set_attention(model, impl)
    idx = torch.randint(0, VOCAB, (2, T))
    base = model(idx)
    for t in (0, 5, T - 1):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % VOCAB
        out = model(changed)
        assert torch.equal(out[:, :t], base[:, :t]), f"position < {t} saw the future"
        assert not torch.allclose(out[:, t], base[:, t])  # the changed position itself does change
        if t + 1 < T and name != "nopos":
            assert not torch.allclose(out[:, t + 1 :], base[:, t + 1 :])  # later positions attend to it


# ------------------------------------------------------------------------ attention paths
@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # qk_norm's rms_norm under autocast
@pytest.mark.parametrize("name", ["gpt2", "llama", "gqa", "mqa", "qk_norm", "wide_heads"])
def test_math_attention_matches_sdpa(name: str) -> None:
    model = build(init_std=0.1, **VARIANTS[name])  # larger weights: peaked attention, logits of order 2
    idx = torch.randint(0, VOCAB, (B, T))
    with torch.no_grad():
        set_attention(model, "sdpa")
        ref = model(idx)
        set_attention(model, "math")
        got = model(idx)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got_bf16 = model(idx)
            set_attention(model, "sdpa")
            ref_bf16 = model(idx)
    assert got_bf16.dtype == torch.bfloat16
    # bf16 rounding moves these logits by up to ~0.03 (measured); a wrong mask or scale moves them by O(1)
    torch.testing.assert_close(got_bf16.float(), ref_bf16.float(), atol=6e-2, rtol=0)
    torch.testing.assert_close(got_bf16.float(), ref, atol=6e-2, rtol=0)  # and near the fp32 logits


def test_math_and_sdpa_gradients_agree() -> None:
    grads = {}
    idx = torch.randint(0, VOCAB, (B, T))
    for impl in ("sdpa", "math"):
        model = build(**VARIANTS["gqa"]).train()
        set_attention(model, impl)
        model(idx, idx).backward()
        grads[impl] = [p.grad for p in model.parameters()]
    for a, b in zip(grads["sdpa"], grads["math"]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_math_attention_with_fewer_queries_than_keys_aligns_to_the_end() -> None:
    """With a KV cache the T new queries are the last T of S positions (bottom-right causal mask)."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 10, 8), torch.randn(2, 3, 10, 8)
    full_q = torch.cat([torch.randn(2, 3, 6, 8), q], dim=2)
    full = F.scaled_dot_product_attention(full_q, k, v, is_causal=True)
    torch.testing.assert_close(math_attention(q, k, v, 0.0), full[:, :, 6:], atol=1e-6, rtol=1e-5)


def test_auto_attention_choice() -> None:
    """Matmul attention under CPU bf16 only where bf16 GEMMs are native (the machines are faked:
    the suite runs on AVX2 CPUs too, where the answer differs)."""
    q = torch.zeros(1, 1, 64, 8)
    for name, native in (("amx", True), ("avx512-bf16", True), ("avx2", False), ("amx-as-avx2", False)):
        with use_capabilities(MACHINES[name]):
            assert not use_math_attention("auto", q), name  # fp32: sdpa
            with torch.autocast("cpu", dtype=torch.bfloat16):
                assert use_math_attention("auto", q) == native, name
                assert not use_math_attention("auto", torch.zeros(1, 1, 2048, 8)), name
                assert not use_math_attention("sdpa", q), name
            assert use_math_attention("math", q), name


def test_rope_is_a_relative_rotation() -> None:
    """Rotate-half RoPE: q.k depends only on the distance between positions."""
    cos, sin = rope_tables(8, 32, 10000.0)
    torch.manual_seed(0)
    q, k = torch.randn(8), torch.randn(8)

    def score(i: int, j: int) -> float:
        qi = apply_rope(q.view(1, 1, 1, 8), cos[i : i + 1], sin[i : i + 1])
        kj = apply_rope(k.view(1, 1, 1, 8), cos[j : j + 1], sin[j : j + 1])
        return float((qi * kj).sum())

    assert score(3, 1) == pytest.approx(score(20, 18), abs=1e-5)
    assert score(0, 0) == pytest.approx(float(q @ k), abs=1e-5)
    assert score(5, 1) != pytest.approx(score(5, 2), abs=1e-3)


# ----------------------------------------------------------------- presets and accounting
def _meta_params(preset: str, non_embedding: bool = False) -> int:
    with torch.device("meta"):
        return GPT(from_dict(GPTConfig, {"preset": preset})).num_params(non_embedding)


def test_preset_parameter_counts() -> None:
    assert _meta_params("gpt2") == 124_439_808  # with wpe, vocab 50257 (GPT-2 "124M")
    assert _meta_params("gpt2", non_embedding=True) == 85_056_000  # GPT-2 paper's non-embedding count
    assert _meta_params("smollm2-135m") == 134_515_008


def test_preset_parameter_counts_match_transformers() -> None:
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config())
        smol = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(
                hidden_size=576,
                intermediate_size=1536,
                num_hidden_layers=30,
                num_attention_heads=9,
                num_key_value_heads=3,
                vocab_size=49152,
                tie_word_embeddings=True,
            )
        )
    # parameters() yields a tied weight once, as GPT.num_params counts it
    assert sum(p.numel() for p in gpt2.parameters()) == _meta_params("gpt2")
    assert sum(p.numel() for p in smol.parameters()) == _meta_params("smollm2-135m")


def test_logits_match_transformers_gpt2_and_llama() -> None:
    """Hugging Face weights load by a key map (fused rows concatenated) and give the same logits."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    idx = torch.randint(0, VOCAB, (2, T))

    hf = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            n_embd=32, n_layer=2, n_head=4, n_positions=T, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0
        )
    ).eval()
    sd = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items()}
    ours = {"embed_tokens.weight": sd["wte.weight"], "embed_positions.weight": sd["wpe.weight"]}
    ours |= {"norm.weight": sd["ln_f.weight"], "norm.bias": sd["ln_f.bias"]}
    names = {"ln_1": "attn_norm", "ln_2": "mlp_norm", "attn.c_attn": "attn.qkv_proj", "attn.c_proj": "attn.o_proj"}
    names |= {"mlp.c_fc": "mlp.up_proj", "mlp.c_proj": "mlp.down_proj"}
    for i in range(2):
        for theirs, mine in names.items():
            w, b = sd[f"h.{i}.{theirs}.weight"], sd[f"h.{i}.{theirs}.bias"]
            ours[f"layers.{i}.{mine}.weight"] = w if theirs.startswith("ln") else w.t()  # Conv1D is (in, out)
            ours[f"layers.{i}.{mine}.bias"] = b
    model = GPT(tiny(mlp="gelu_tanh"))
    model.load_state_dict(ours, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(idx), hf(idx).logits, atol=1e-5, rtol=1e-5)

    hf = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=VOCAB,
            max_position_embeddings=T,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        )
    ).eval()
    sd = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
    ours = {k: sd[k] for k in ("embed_tokens.weight", "norm.weight", "lm_head.weight")}
    for i in range(2):
        p = f"layers.{i}."
        a = p + "self_attn."
        ours[p + "attn.qkv_proj.weight"] = torch.cat([sd[a + f"{x}_proj.weight"] for x in "qkv"])
        ours[p + "attn.o_proj.weight"] = sd[a + "o_proj.weight"]
        ours[p + "mlp.gate_up_proj.weight"] = torch.cat([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]])
        ours[p + "mlp.down_proj.weight"] = sd[p + "mlp.down_proj.weight"]
        ours[p + "attn_norm.weight"] = sd[p + "input_layernorm.weight"]
        ours[p + "mlp_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
    model = GPT(tiny(**VARIANTS["llama"], n_kv_head=2, intermediate_size=64))
    model.load_state_dict(ours, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(idx), hf(idx).logits, atol=1e-5, rtol=1e-5)


def test_flops_per_token() -> None:
    with torch.device("meta"):
        gpt2 = GPT(from_dict(GPTConfig, {"preset": "gpt2"}))
    # nanoGPT's estimate: 6 * (params without wpe; the tied wte counts as the output matmul) + 12 L H Q T
    attention = 12 * 12 * 12 * 64 * 1024
    assert gpt2.flops_per_token() == 6 * (124_439_808 - 1024 * 768) + attention == 855_166_464
    assert gpt2.flops_per_token(seq_len=256) == 6 * (124_439_808 - 1024 * 768) + attention / 4

    tied, untied = GPT(tiny()), GPT(tiny(tie_embeddings=False))
    pos = T * 32
    assert tied.flops_per_token() == 6 * (tied.num_params() - pos) + 12 * 2 * 4 * 8 * T
    # untied: the input embedding is a lookup (no FLOPs), lm_head a matmul, counted once
    assert untied.num_params() == tied.num_params() + VOCAB * 32
    assert untied.flops_per_token() == tied.flops_per_token()
    rope = GPT(tiny(pos_embedding="rope"))
    assert rope.flops_per_token() == tied.flops_per_token()  # positions never cost matmul FLOPs
    assert rope.num_params(non_embedding=True) == rope.num_params() - VOCAB * 32


def test_invalid_configs() -> None:
    with pytest.raises(ValueError, match="divisible"):
        tiny(n_head=5)
    with pytest.raises(ValueError, match="multiple of n_kv_head"):
        tiny(n_kv_head=3)
    with pytest.raises(ValueError, match="even head_dim"):
        tiny(pos_embedding="rope", head_dim=7)
    with pytest.raises(ValueError, match="must be positive"):
        tiny(n_layer=0)
    with pytest.raises(ValueError, match="dropout"):
        tiny(dropout=1.0)


def test_dropout_is_active_only_in_training() -> None:
    model = build(dropout=0.5)
    idx = torch.randint(0, VOCAB, (B, T))
    assert torch.equal(model(idx), model(idx))  # eval
    model.train()
    assert not torch.equal(model(idx), model(idx))
