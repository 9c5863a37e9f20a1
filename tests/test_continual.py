"""Continual learning on tiny models: replay mixing, L2-to-start and EWC penalties, continued
pretraining from a checkpoint with old/new evaluation, SFT replay, bad settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import SHAKESPEARE, TINY_PRETRAIN, read_metrics

from lmforge.config import from_dict, load_config
from lmforge.data import DataPrepareConfig, run_prepare
from lmforge.errors import ConfigError, DataError
from lmforge.model.gpt import GPT, GPTConfig
from lmforge.tokenizer import Tokenizer
from lmforge.commands.tokenizer import TokenizerTrainConfig, run_train
from lmforge.train.continual import (
    ContinualConfig,
    EWCPenalty,
    L2Anchor,
    ReplayObjective,
    fisher_diagonal,
    make_penalties,
    replay_lm_objective,
)
from lmforge.train.objectives.base import RunContext
from lmforge.train.objectives.lm import LMObjective
from lmforge.train.pretrain import PretrainConfig, run_pretrain


@pytest.fixture(scope="module")
def two_domains(tmp_path_factory) -> dict[str, Path]:
    """One char tokenizer over two corpora that share no letter: old = lower-case Shakespeare,
    new = upper-case Shakespeare; each prepared into its own shards with that tokenizer."""
    root = tmp_path_factory.mktemp("domains")
    text = SHAKESPEARE.read_text(encoding="utf-8")
    (root / "old.txt").write_text(text[:12_000].lower(), encoding="utf-8")
    (root / "new.txt").write_text(text[12_000:24_000].upper(), encoding="utf-8")
    run_train(TokenizerTrainConfig(inputs=[str(root / "old.txt"), str(root / "new.txt")], kind="char",
                                   out=str(root / "tok")), verbose=False)
    out = {"root": root}
    for name in ("old", "new"):
        run_prepare(DataPrepareConfig(inputs=[str(root / f"{name}.txt")], tokenizer=str(root / "tok"),
                                      out=str(root / name), val_split="tail", add_eot=False, num_proc=1), verbose=False)
        out[name] = root / name
    return out


def _letter_ids(data: Path, lower: bool) -> set[int]:
    vocab = Tokenizer.from_file(data / "tokenizer.json").hf.get_vocab()
    return {i for t, i in vocab.items() if len(t) == 1 and t.isalpha() and (t.islower() if lower else t.isupper())}


def _ctx(mbs: int, accum: int = 1, seed: int = 0) -> RunContext:
    return RunContext(device=torch.device("cpu"), seed=seed, micro_batch_size=mbs, grad_accum=accum)


@pytest.mark.parametrize(("ratio", "mbs", "n_old"), [(0.25, 8, 2), (0.5, 4, 2), (0.1, 10, 1), (0.0, 8, 0)])
def test_replay_mixes_the_asked_share_of_old_sequences(two_domains, ratio, mbs, n_old):
    new = LMObjective(two_domains["new"], 16, 256)
    obj = replay_lm_objective(ContinualConfig(replay_data=str(two_domains["old"]), replay_ratio=ratio), new, 16, 256)
    assert isinstance(obj, ReplayObjective)
    obj.setup(_ctx(mbs, accum=2))
    lower, upper = _letter_ids(two_domains["old"], True), _letter_ids(two_domains["old"], False)
    for step in range(6):
        for micro in range(2):
            b = obj.train_batch(step, micro)
            assert b["input_ids"].shape == (mbs, 16)
            from_old = [bool(set(row.tolist()) & lower) for row in b["input_ids"]]
            from_new = [bool(set(row.tolist()) & upper) for row in b["input_ids"]]
            # every row comes from exactly one corpus, and the flag says which
            assert all(o != n for o, n in zip(from_old, from_new))
            assert sum(from_old) == n_old == int(b["replay"].sum())
            assert from_old == b["replay"].tolist()
            # labels are the inputs shifted by one: a real next-token window of its corpus
            assert torch.equal(b["input_ids"][:, 1:], b["labels"][:, :-1])
    # a pure function of (seed, step, micro): the same batch again
    assert torch.equal(obj.train_batch(3, 1)["input_ids"], obj.train_batch(3, 1)["input_ids"])
    assert obj.effective_ratio == n_old / mbs


def test_replay_evaluates_old_and_new_data(two_domains):
    new = LMObjective(two_domains["new"], 16, 256)
    obj = replay_lm_objective(ContinualConfig(replay_data=str(two_domains["old"]), replay_ratio=0.25), new, 16, 256)
    obj.setup(_ctx(8))
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=new.meta["vocab_size"], context_length=16, n_layer=1, n_head=2, n_embd=16))
    model.eval()
    m = obj.evaluate(model)
    assert set(m) >= {"val_loss", "old_val_loss", "val_bpb", "old_val_bpb"}
    old_alone = LMObjective(two_domains["old"], 16, 256)
    old_alone.setup(_ctx(8))
    assert m["old_val_loss"] == pytest.approx(old_alone.evaluate(model)["val_loss"], rel=1e-6)
    assert m["val_loss"] != pytest.approx(m["old_val_loss"], rel=1e-3)


def _tiny_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=40, context_length=8, n_layer=1, n_head=2, n_embd=16))


def test_l2_penalty_is_zero_at_start_and_its_gradient_is_2_lambda_delta():
    model = _tiny_model()
    hook = L2Anchor(model, 0.3)
    assert float(hook.extra_loss().detach()) == 0.0
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    value = hook.extra_loss()
    assert value.requires_grad
    expected = 0.3 * sum(((p - start[n]) ** 2).sum() for n, p in model.named_parameters())
    assert float(value.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    value.backward()
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, 2 * 0.3 * (p.detach() - start[n]), atol=1e-6), n
    assert hook.metrics() == {"l2_penalty": pytest.approx(float(expected.detach()), rel=1e-5)}
    # frozen parameters are not anchored
    for p in model.layers.parameters():
        p.requires_grad_(False)
    assert all(not n.startswith("layers.") for n, _ in L2Anchor(model, 1.0).params)


def test_ewc_fisher_comes_from_the_old_data(two_domains):
    new = LMObjective(two_domains["new"], 16, 256)
    obj = replay_lm_objective(ContinualConfig(replay_data=str(two_domains["old"])), new, 16, 256)
    obj.setup(_ctx(4))
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=new.meta["vocab_size"], context_length=16, n_layer=1, n_head=2, n_embd=16))
    batches = obj.old_batches(3)
    fisher = fisher_diagonal(model, obj.old, batches, samples=3)
    params = [p for p in model.parameters()]
    assert [f.shape for f in fisher] == [p.shape for p in params]
    assert all(p.grad is None for p in params)  # .grad untouched
    assert all(bool((f >= 0).all()) for f in fisher) and sum(float(f.sum()) for f in fisher) > 0
    # by hand: the mean of the three old rows' squared gradients
    by_hand = [torch.zeros_like(p) for p in params]
    for r in range(3):
        row = batches[0]["input_ids"][r : r + 1], batches[0]["labels"][r : r + 1]
        assert set(row[0][0].tolist()) & _letter_ids(two_domains["old"], True)  # an old-data row
        model.zero_grad()
        model(*row).backward()
        for h, p in zip(by_hand, params):
            h += p.grad.pow(2) / 3
    for f, h in zip(fisher, by_hand):
        assert torch.allclose(f, h, rtol=1e-4, atol=1e-10)
    # the hook: zero at the start, F-weighted squared distance after a move
    hook = EWCPenalty(model, 2.0, fisher)
    assert float(hook.extra_loss().detach()) == 0.0
    with torch.no_grad():
        model.embed_tokens.weight.add_(0.5)
    assert float(hook.extra_loss().detach()) == pytest.approx(2.0 * 0.25 * float(fisher[0].sum()), rel=1e-4)
    # through the config: samples beyond one batch are drawn from several old batches
    hooks = make_penalties(ContinualConfig(replay_data=str(two_domains["old"]), ewc=1.0, l2=0.5, ewc_samples=6),
                           model, obj, verbose=False)
    assert [type(h) for h in hooks] == [L2Anchor, EWCPenalty]


def test_continued_pretraining_logs_old_and_new_loss(two_domains, tmp_path):
    old_run = tmp_path / "old"
    base = [*TINY_PRETRAIN, "train.eval_tokens=256", "train.lr=3e-3"]
    run_pretrain(load_config(PretrainConfig, "pretrain", None,
                             [*base, f"data={two_domains['old']}", f"out_dir={old_run}", "train.max_steps=30"]))
    old_final = read_metrics(old_run, "eval")[-1]["val_loss"]
    new_run = tmp_path / "new"
    cfg = load_config(PretrainConfig, "pretrain", None, [
        *base, f"data={two_domains['new']}", f"out_dir={new_run}", "train.max_steps=6", "train.eval_at_start=true",
        "train.eval_interval=3", f"init_from={old_run}", f"continual.replay_data={two_domains['old']}",
        "continual.replay_ratio=0.25", "continual.l2=0.01", "continual.ewc=10", "continual.ewc_samples=8",
        "model.n_layer=7",  # ignored: the checkpoint's settings win
    ])
    result = run_pretrain(cfg)
    evals = read_metrics(new_run, "eval")
    assert [e["step"] for e in evals] == [0, 3, 6]
    # the run starts from the old checkpoint's weights: its old-data loss at step 0 is the old run's final one
    assert evals[0]["old_val_loss"] == pytest.approx(old_final, rel=1e-5)
    assert all("val_loss" in e and "old_val_loss" in e for e in evals)
    train = read_metrics(new_run, "train")
    assert "l2_penalty" in train[-1] and "ewc_penalty" in train[-1] and train[-1]["l2_penalty"] > 0
    saved = json.loads((Path(result.checkpoint) / "config.json").read_text())
    assert saved["model"]["n_layer"] == 2
    assert saved["run"]["continual"]["replay_ratio"] == 0.25


def test_sft_replay_of_old_conversations(tiny_data, tmp_path):
    from conftest import save_tiny_llama

    from lmforge.train.finetune import FinetuneConfig, run_finetune

    base = save_tiny_llama(tiny_data, tmp_path / "base", context_length=64, init_std=0.05)

    def convs(word: str, n: int) -> Path:
        path = tmp_path / f"{word}.jsonl"
        rows = [{"messages": [{"role": "user", "content": f"{word} {i}"}, {"role": "assistant", "content": f"ok {word}"}]}
                for i in range(n)]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    new, old = convs("sail", 40), convs("ride", 40)
    cfg = load_config(FinetuneConfig, "finetune", None, [
        f"base={base}", f"out_dir={tmp_path / 'run'}", f"data.train=[{new}]", "data.val_fraction=0.1",
        f"continual.replay_data={old}", "continual.replay_ratio=0.25", "continual.l2=0.001", "train.max_steps=4",
        "train.micro_batch_size=4", "train.eval_interval=2", "log.console=false", "log.tensorboard=false",
        "train.threads=1", "train.device=cpu", "train.precision=fp32", "sft.max_length=48",
    ])
    s = run_finetune(cfg)
    assert {"val_loss", "old_val_loss"} <= set(s["before"]) and {"val_loss", "old_val_loss"} <= set(s["after"])
    assert s["sft"]["examples"] > 0
    assert "l2_penalty" in read_metrics(tmp_path / "run", "train")[-1]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"replay_ratio": 1.0, "replay_data": "x"}, "replay_ratio must be in [0, 1)"),
        ({"replay_ratio": -0.1, "replay_data": "x"}, "replay_ratio must be in [0, 1)"),
        ({"replay_ratio": 0.25}, "needs continual.replay_data"),
        ({"ewc": 1.0}, "needs continual.replay_data"),
        ({"l2": -1.0}, "must not be negative"),
        ({"ewc_samples": 0, "ewc": 1.0, "replay_data": "x"}, "ewc_samples must be at least 1"),
    ],
)
def test_bad_settings_are_clear_errors(settings, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        from_dict(ContinualConfig, settings, "continual")


def test_bad_replay_data_is_a_clear_error(two_domains, tiny_data, tmp_path):
    new = LMObjective(two_domains["new"], 16, 256)
    with pytest.raises(DataError, match="not a prepared data directory"):
        replay_lm_objective(ContinualConfig(replay_data=str(tmp_path / "missing"), replay_ratio=0.25), new, 16, 256)
    with pytest.raises(DataError, match="another tokenizer"):  # tiny_data: a char tokenizer of other text
        replay_lm_objective(ContinualConfig(replay_data=str(tiny_data), replay_ratio=0.25), new, 16, 256)
    obj = replay_lm_objective(ContinualConfig(replay_data=str(two_domains["old"]), replay_ratio=0.05), new, 16, 256)
    with pytest.raises(ConfigError, match="rounds to no replayed sequence"):
        obj.setup(_ctx(4))
    obj = replay_lm_objective(ContinualConfig(replay_data=str(two_domains["old"]), replay_ratio=0.9), new, 16, 256)
    with pytest.raises(ConfigError, match="leaves no new sequence"):
        obj.setup(_ctx(4))
    with pytest.raises(ConfigError, match="another tokenizer"):  # init_from a checkpoint of another vocabulary
        from conftest import save_tiny_llama

        ck = save_tiny_llama(tiny_data, tmp_path / "ck", context_length=16, init_std=0.02)
        run_pretrain(load_config(PretrainConfig, "pretrain", None,
                                 [*TINY_PRETRAIN, f"data={two_domains['new']}", f"out_dir={tmp_path / 'r'}",
                                  f"init_from={ck}", "train.max_steps=1"]))
