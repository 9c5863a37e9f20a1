"""build_sampling_params: the one builder of sampling parameters (server and CLI) and seeded()."""

from __future__ import annotations

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.infer.sampling import SamplingParams, build_sampling_params, seeded


def test_none_is_the_default_and_tiny_temperatures_are_greedy() -> None:
    p = build_sampling_params(max_tokens=4)
    assert p == SamplingParams(max_tokens=4)
    assert build_sampling_params(max_tokens=4, temperature=5e-6).temperature == 0.0
    assert build_sampling_params(max_tokens=4, temperature=0.7).temperature == 0.7
    q = build_sampling_params(max_tokens=2, top_k=5, top_p=0.5, min_p=0.1, repetition_penalty=1.2,
                              presence_penalty=-1, frequency_penalty=0.5, stop=("a", "b"),
                              stop_token_ids=[7, 3, 7], seed=9, logprobs=2, vocab_size=10)
    assert (q.top_k, q.top_p, q.min_p, q.repetition_penalty, q.presence_penalty, q.frequency_penalty) == (
        5, 0.5, 0.1, 1.2, -1, 0.5)
    assert q.stop == ["a", "b"] and q.stop_token_ids == [3, 7] and q.seed == 9 and q.logprobs == 2


@pytest.mark.parametrize("kw, match", [
    ({"temperature": -0.5}, "temperature must be >= 0"),  # not mistaken for greedy
    ({"top_p": 0.0}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"stop_token_ids": [10]}, "stop token id 10"),
    ({"max_tokens": 0}, "max_tokens"),
])
def test_impossible_values_are_one_line_errors(kw, match) -> None:
    with pytest.raises(ConfigError, match=match):
        build_sampling_params(**{"max_tokens": 4, "vocab_size": 10, **kw})


def test_seeded_copies_wrap_like_torch() -> None:
    p = build_sampling_params(max_tokens=1, seed=2**64 - 1)
    assert [q.seed for q in seeded(p, 3)] == [2**64 - 1, 0, 1]
    assert seeded(build_sampling_params(max_tokens=1), 2)[1].seed is None
    # the wrap draws what torch draws for the unwrapped (negative) seed
    a, b = torch.Generator(), torch.Generator()
    a.manual_seed(-5)
    b.manual_seed(seeded(build_sampling_params(max_tokens=1, seed=-5), 1)[0].seed)
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))
