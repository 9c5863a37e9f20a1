"""`lmforge adversarial` on tiny models: policy-gradient direction, KL at the start, the
discriminator on an easy separation, an end-to-end run (metrics, samples, resume), bad settings."""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import read_metrics, save_tiny_llama

from lmforge.cli import main
from lmforge.model.gpt import GPT, GPTConfig
from lmforge.runs.tracking import LogConfig
from lmforge.tokenizer import Tokenizer
from lmforge.checkpoint import load_model, save_checkpoint
from lmforge.train.engine import TrainConfig
from lmforge.train.objectives.adversarial import (
    AdversarialConfig,
    DiscriminatorTrainer,
    distinct_n,
    group_advantages,
    kl_penalty,
    policy_gradient_loss,
    token_logps,
)

QUIET = ["log.console=false", "log.tensorboard=false", "train.threads=1", "train.device=cpu", "train.precision=fp32"]
if "report" in {f.name for f in fields(LogConfig)}:  # the engine's report card: plots this test does not check
    QUIET.append("log.report=false")
WORDS = ["hello", "what time", "book it", "thanks", "where to", "how many", "a table", "the bus"]


@pytest.fixture(scope="module")
def base(tiny_data: Path, tmp_path_factory) -> Path:
    return save_tiny_llama(tiny_data, tmp_path_factory.mktemp("adv") / "base", context_length=128, init_std=0.05)


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> tuple[Path, Path]:
    g = torch.Generator().manual_seed(0)
    root = tmp_path_factory.mktemp("chats")

    def conv():
        q, a = (WORDS[int(i)] for i in torch.randint(0, len(WORDS), (2,), generator=g))
        return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f"sure, {a}."},
                             {"role": "user", "content": "ok"}, {"role": "assistant", "content": "done."}]}

    for name, n in (("train", 40), ("val", 10)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(conv()) + "\n" for _ in range(n)))
    return root / "train.jsonl", root / "val.jsonl"


def _args(base: Path, chats, out: Path, *extra: str) -> list[str]:
    return [
        "adversarial", f"base={base}", f"out_dir={out}", f"data.train=[{chats[0]}]", f"data.val=[{chats[1]}]",
        "adversarial.group_size=2", "adversarial.max_context_tokens=64", "adversarial.max_reply_tokens=24",
        "adversarial.disc_pretrain_steps=2", "adversarial.disc_pretrain_samples=4", "adversarial.disc_batch_size=4",
        "adversarial.eval_contexts=4", "adversarial.eval_batch_size=4", "adversarial.samples_shown=2",
        "train.micro_batch_size=2", "train.max_steps=3", "train.eval_interval=0", "train.log_interval=1",
        "train.lr=1e-3", "train.warmup_steps=0", "train.schedule=constant", *QUIET, *extra,
    ]


def _tiny(vocab: int, seed: int = 0, labels: int = 0) -> GPT:
    torch.manual_seed(seed)
    m = GPT(GPTConfig(vocab_size=vocab, context_length=32, n_layer=2, n_head=2, n_embd=32, init_std=0.1))
    if labels:
        m.add_classification_head(labels)
    return m


def test_policy_gradient_raises_the_log_prob_of_the_rewarded_sample():
    model = _tiny(20)
    ctx = [1, 2, 3]
    good, bad = [4, 5, 6, 7], [8, 9, 10]
    rows = [(ctx, good), (ctx, bad)]
    with torch.no_grad():
        before, mask = token_logps(model, rows, 0, "cpu")
    ref = before.clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    logp, mask = token_logps(model, rows, 0, "cpu")
    # the KL penalty is exactly zero while the policy is the reference, and so is its gradient
    kl = kl_penalty(logp, ref, mask)
    assert float(kl.detach()) == 0.0
    assert torch.autograd.grad(kl, logp, retain_graph=True)[0].abs().max() == 0
    adv = group_advantages(torch.tensor([1.0, -1.0]), 2, scale=False)  # the first sample got the higher reward
    assert adv.tolist() == [1.0, -1.0]
    policy_gradient_loss(logp, mask, adv).backward()
    opt.step()
    with torch.no_grad():
        after, _ = token_logps(model, rows, 0, "cpu")
    seq_before, seq_after = (before * mask).sum(1), (after * mask).sum(1)
    assert seq_after[0] > seq_before[0] + 1e-3  # rewarded above its group: more likely
    assert seq_after[1] < seq_before[1] - 1e-3  # below: less likely
    # per-token log-probs match a plain forward pass
    full = torch.log_softmax(model(torch.tensor([ctx + good[:-1]])), -1)[0]
    direct = full[len(ctx) - 1 :].gather(1, torch.tensor(good)[:, None])[:, 0]
    assert torch.allclose(after[0, : len(good)], direct, atol=1e-5)
    assert not mask[1, 3] and mask[0, 3]


def test_discriminator_learns_an_easy_separation():
    torch.manual_seed(0)
    cfg = AdversarialConfig(disc_lr=3e-3, disc_batch_size=8)
    trainer = DiscriminatorTrainer(_tiny(20, labels=2), cfg, 0, None)
    engine = SimpleNamespace(device=torch.device("cpu"), autocast=nullcontext, cfg=TrainConfig(grad_clip=1.0))
    trainer.engine = engine
    from lmforge.train.optim import build_optimizer

    trainer.optimizer = build_optimizer(trainer.model, TrainConfig(lr=cfg.disc_lr, weight_decay=0.0), engine.device)
    g = torch.Generator().manual_seed(1)

    def rows(lo: int, n: int):  # "human" replies use tokens 4..9, "generated" ones 10..15
        return [([1, 2, 3], torch.randint(lo, lo + 6, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist())
                for _ in range(n)]

    def accuracy() -> float:
        human, gen = rows(4, 32), rows(10, 32)
        d_h, d_g = trainer.scores(human).exp(), trainer.scores(gen).exp()
        return (float((d_h > 0.5).float().sum()) + float((d_g <= 0.5).float().sum())) / 64

    start = accuracy()
    for _ in range(40):
        trainer.update(rows(4, 8), rows(10, 8), 1.0)
    end = accuracy()
    assert end >= 0.95 and end > start + 0.2, (start, end)


def test_distinct_n():
    assert distinct_n(["a b a b"], 1) == 0.5
    assert distinct_n(["a b a b"], 2) == 2 / 3
    assert distinct_n([""], 2) == 0.0


def test_end_to_end_run_writes_metrics_samples_and_resumes(base, chats, tmp_path):
    out = tmp_path / "run"
    assert main(_args(base, chats, out, "train.ckpt_interval=3")) == 0
    train, ev = read_metrics(out, "train"), read_metrics(out, "eval")
    assert [r["step"] for r in train] == [1, 2, 3]
    for key in ("loss", "reward_mean", "kl", "distinct_1", "distinct_2", "disc_train_acc", "disc_loss", "mle_nll"):
        assert all(key in r for r in train), key
    assert train[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # the first step's samples: policy == reference
    assert [r["step"] for r in ev] == [0, 3]
    for key in ("disc_acc", "reward_mean", "kl", "val_nll", "distinct_1", "distinct_2"):
        assert all(key in r for r in ev), key
    assert ev[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # held-out KL before the first step
    assert 0.0 <= ev[-1]["disc_acc"] <= 1.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["before"]["disc_acc"] == ev[0]["disc_acc"] and summary["after"]["val_nll"] == ev[-1]["val_nll"]
    md = (out / "samples.md").read_text()
    assert "before (step 0)" in md and "after (step 3)" in md and "**human**" in md
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert {r["step"] for r in rows} == {0, 3} and len(rows) == 4
    assert (out / "adversarial_curves.png").stat().st_size > 0
    ckpt = out / "checkpoints" / "step_0000003"
    assert (ckpt / "discriminator" / "model.safetensors").is_file()
    disc, _ = load_model(ckpt / "discriminator")
    assert disc.config.num_labels == 2
    gen, _ = load_model(out)  # the generator's checkpoint is an ordinary one
    assert gen.config.num_labels == 0
    # resume: the discriminator comes back from its checkpoint, training goes on
    assert main([*_args(base, chats, out, "train.max_steps=4"), "--resume"]) == 0
    assert [r["step"] for r in read_metrics(out, "train")][-1] == 4
    assert "before (step 0)" in (out / "samples.md").read_text()  # still the replies before the first step
    assert "after (step 4)" in (out / "samples.md").read_text()


def test_lora_generator_starts_at_zero_kl(base, chats, tmp_path):
    out = tmp_path / "lora"
    assert main(_args(base, chats, out, "peft.method=lora", "peft.r=4", "train.max_steps=1",
                      "adversarial.algorithm=reinforce", "adversarial.group_size=1")) == 0
    assert read_metrics(out, "eval")[0]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert read_metrics(out, "train")[0]["kl"] == pytest.approx(0.0, abs=1e-5)


def test_discriminator_with_another_vocabulary_is_a_clear_error(base, chats, tmp_path, tiny_data, capsys):
    cfg = json.loads((base / "config.json").read_text())["model"]
    other = _tiny(cfg["vocab_size"] + 1)
    save_checkpoint(tmp_path / "bigger", other, tiny_data / "tokenizer.json")
    assert main(_args(base, chats, tmp_path / "r1", f"discriminator={tmp_path / 'bigger'}")) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "vocabulary" in err and "same tokenizer" in err and "Traceback" not in err
    # same size, different tokens: two ids swapped in the tokenizer
    tok = json.loads((tiny_data / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = "a", "b"
    vocab[a], vocab[b] = vocab[b], vocab[a]
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    (swapped / "tokenizer.json").write_text(json.dumps(tok))
    Tokenizer.from_file(swapped / "tokenizer.json")  # a valid tokenizer
    model, _ = load_model(base)
    save_checkpoint(swapped / "ckpt", model, swapped / "tokenizer.json")
    assert main(_args(base, chats, tmp_path / "r2", f"discriminator={swapped / 'ckpt'}")) == 2
    err = capsys.readouterr().err
    assert "different tokenizers" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (["adversarial.group_size=1"], "group_size >= 2"),
        (["adversarial.max_context_tokens=120", "adversarial.max_reply_tokens=20"], "max_context_tokens + max_reply_tokens = 140"),
        (["adversarial.kl_coef=-1"], "kl_coef must not be negative"),
        (["adversarial.temperature=0"], "temperature must be positive"),
        (["data.val=[]"], "held-out conversations"),
    ],
)
def test_impossible_settings_are_clear_errors(base, chats, tmp_path, capsys, setting, message):
    assert main(_args(base, chats, tmp_path / "r", *setting)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
