"""Sampling: greedy is deterministic, seeded sampling reproducible, generation stops at EOT."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lmforge.cli import main
from lmforge.errors import ConfigError
from lmforge.infer.sample import SampleSettings, generate
from lmforge.tokenizer import Tokenizer
from lmforge.train.checkpoint import load_model


@pytest.fixture(scope="module")
def model_and_tok(tiny_checkpoint: Path):
    model, path = load_model(tiny_checkpoint)
    return model, Tokenizer.from_file(path / "tokenizer.json")


class Scripted(torch.nn.Module):
    """Predicts ``script[i]`` (almost surely) as the i-th new token after a prompt of ``n_prompt`` tokens."""

    def __init__(self, script: list[int], n_prompt: int, vocab: int = 10):
        super().__init__()
        self.config = SimpleNamespace(context_length=64)
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.script, self.n_prompt, self.vocab = script, n_prompt, vocab

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(idx.shape[0], idx.shape[1], self.vocab)
        logits[:, -1, self.script[idx.shape[1] - self.n_prompt]] = 1e4
        return logits


def test_greedy_is_deterministic_and_is_the_argmax(model_and_tok) -> None:
    model, tok = model_and_tok
    prompt = tok.encode("First Citizen:")
    settings = SampleSettings(max_new_tokens=20, greedy=True)
    first = generate(model, prompt, settings)
    assert len(first) == 20
    assert generate(model, prompt, settings) == first
    # temperature, top-k and seed do not matter to greedy decoding
    assert generate(model, prompt, SampleSettings(20, temperature=5.0, top_k=3, greedy=True, seed=9)) == first
    # it is the argmax of the model's next-token logits, step by step
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(20):
            ids.append(int(model(torch.tensor([ids[-16:]]))[0, -1].argmax()))
    assert ids[len(prompt) :] == first
    # top_k=1 sampling is greedy whatever the seed
    assert generate(model, prompt, SampleSettings(20, temperature=1.0, top_k=1, seed=123)) == first


def test_seeded_sampling_is_reproducible(model_and_tok) -> None:
    model, tok = model_and_tok
    prompt = tok.encode("A")
    state = torch.get_rng_state()
    a = generate(model, prompt, SampleSettings(max_new_tokens=30, temperature=1.0, top_k=None, seed=3))
    assert torch.equal(torch.get_rng_state(), state)  # a private generator: the global RNG is untouched
    b = generate(model, prompt, SampleSettings(max_new_tokens=30, temperature=1.0, top_k=None, seed=3))
    c = generate(model, prompt, SampleSettings(max_new_tokens=30, temperature=1.0, top_k=None, seed=4))
    assert a == b and a != c
    assert all(0 <= i < model.config.vocab_size for i in a)


def test_top_k_restricts_the_choices(model_and_tok) -> None:
    model, tok = model_and_tok
    prompt = tok.encode("To be")
    with torch.no_grad():
        top3 = set(model(torch.tensor([prompt]))[0, -1].topk(3).indices.tolist())
    firsts = {generate(model, prompt, SampleSettings(1, temperature=2.0, top_k=3, seed=s))[0] for s in range(40)}
    assert firsts <= top3 and len(firsts) > 1


def test_generation_stops_at_eot() -> None:
    eot = 7
    model = Scripted([3, 4, eot, 5, 6, 1, 2, 3], n_prompt=2)
    for settings in (SampleSettings(8, greedy=True), SampleSettings(8, temperature=1.0, seed=0)):
        assert generate(model, [1, 2], settings, stop_ids=(eot,)) == [3, 4, eot]  # the stop token is included
        assert generate(model, [1, 2], settings) == [3, 4, eot, 5, 6, 1, 2, 3]  # no stop ids: runs to the limit
    assert generate(model, [1, 2], SampleSettings(2, greedy=True), stop_ids=(eot,)) == [3, 4]


def test_long_prompts_are_cropped_to_the_context(model_and_tok) -> None:
    model, tok = model_and_tok
    prompt = tok.encode("Before we proceed any further, hear me speak.")
    assert len(prompt) > model.config.context_length
    settings = SampleSettings(5, greedy=True)
    assert generate(model, prompt, settings) == generate(model, prompt[-16:], settings)


def test_invalid_settings() -> None:
    model = Scripted([1], n_prompt=1)
    with pytest.raises(ConfigError, match="the prompt is empty"):
        generate(model, [], SampleSettings(1))
    with pytest.raises(ConfigError, match="temperature must be positive"):
        generate(model, [1], SampleSettings(1, temperature=0.0))
    assert generate(model, [1], SampleSettings(1, temperature=0.0, greedy=True)) == [1]


def test_cli_sample(tiny_checkpoint: Path, capsys) -> None:
    def run(*args: str) -> str:
        capsys.readouterr()
        assert main(["sample", str(tiny_checkpoint), "--prompt", "First", "--max-new-tokens", "12", *args]) == 0
        return capsys.readouterr().out

    greedy = run("--greedy")
    assert greedy.startswith("--- sample 1 ---\nFirst") and greedy == run("--greedy")
    seeded = run("--num-samples", "2", "--seed", "5", "--temperature", "1.0")
    assert seeded == run("--num-samples", "2", "--seed", "5", "--temperature", "1.0")
    samples = seeded.split("--- sample 2 ---\n")
    assert len(samples) == 2 and samples[0].removeprefix("--- sample 1 ---\n") != samples[1]  # seeds 5 and 6
