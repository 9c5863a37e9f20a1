"""Bounded work per request in the inference engine: chunked prefill interleaved with the
running decodes, deadlines that stop the computation, a KV cache allocated for the rows in
use and admitted against a memory budget, limits checked at start, non-finite logits
refused. Tiny random models; the SmolLM2 figures are in benchmarks/serve_limits.py."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.infer import InferenceEngine, SamplingParams
from lmforge.infer.engine import NonFiniteOutput
from lmforge.infer.memory import kv_cache_budget
from lmforge.model.cache import KVCache
from lmforge.model.gpt import GPT, GPTConfig
from lmforge.tokenizer import Tokenizer

GREEDY = SamplingParams(max_tokens=12, temperature=0)


def tiny(vocab: int, ctx: int = 512, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=vocab, context_length=ctx, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, init_std=0.1,
                    pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False)
    return GPT(cfg).eval()


@pytest.fixture(scope="module")
def tok(tiny_checkpoint: Path) -> Tokenizer:
    return Tokenizer.from_file(tiny_checkpoint / "tokenizer.json")


def long_ids(n: int, vocab: int, seed: int = 1) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


def test_chunked_prefill_equals_one_forward(tok: Tokenizer) -> None:
    """A 300-token prompt in chunks of 7 gives the completion and the prompt logprobs of a
    single 300-token forward (to 1e-4)."""
    ids = long_ids(300, tok.vocab_size)
    params = SamplingParams(max_tokens=10, temperature=0, logprobs=2, prompt_logprobs=1)
    whole = InferenceEngine(tiny(tok.vocab_size), tok, max_step_tokens=512).generate([ids], params)[0]
    small = InferenceEngine(tiny(tok.vocab_size), tok, max_step_tokens=7)
    chunked = small.generate([ids], params)[0]
    assert small.stats["prefill_chunks"] == -(-300 // 7)
    assert chunked.token_ids == whole.token_ids
    assert chunked.prompt_logprobs[0] is None and len(chunked.prompt_logprobs) == 300
    diffs = [abs(a.logprob - b.logprob) for a, b in zip(chunked.prompt_logprobs[1:], whole.prompt_logprobs[1:])]
    assert max(diffs) < 1e-4
    assert [t.token_id for t in chunked.prompt_logprobs[1:]] == ids[1:]


def test_a_long_prompt_does_not_stall_running_streams(tok: Tokenizer) -> None:
    """While a 400-token prompt prefills in chunks of 16 tokens, a running stream gains one
    token every step; the long request's chunks are spread over many steps."""
    engine = InferenceEngine(tiny(tok.vocab_size), tok, max_batch_size=2, max_step_tokens=16)
    stream = engine.add_request("First Citizen:", SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    engine.step()  # the stream prefills and gets its first token
    engine.add_request(long_ids(400, tok.vocab_size), GREEDY)
    steps = 0
    while engine.prefilling or engine.waiting:
        got = [d for d in engine.step() if d.request_id == stream]
        steps += 1
        assert len(got) == 1 and len(got[0].token_ids) == 1, steps
    assert steps >= 400 // 16  # the prompt took many steps; the stream moved on every one of them


def test_batched_equals_alone_with_chunked_prompts(tok: Tokenizer) -> None:
    """Chunk boundaries depend on a sequence's own position, never on its batch: long and short
    prompts batched together (rows freed and refilled mid-prefill) give the solo outputs."""
    prompts = [long_ids(90, tok.vocab_size, 2), "First Citizen:", long_ids(57, tok.vocab_size, 3), "Speak, speak.",
               long_ids(120, tok.vocab_size, 4)]
    params = [SamplingParams(max_tokens=n, temperature=0.8, seed=i) for i, n in enumerate((6, 3, 9, 2, 5))]
    batched = InferenceEngine(tiny(tok.vocab_size), tok, max_batch_size=3, max_step_tokens=8).generate(prompts, params)
    for p, sp, got in zip(prompts, params, batched):
        alone = InferenceEngine(tiny(tok.vocab_size), tok, max_batch_size=1, max_step_tokens=8).generate([p], sp)[0]
        assert got.token_ids == alone.token_ids


def test_deadline_stops_the_prefill_between_chunks(tok: Tokenizer) -> None:
    """A request past its deadline stops at the next chunk boundary: no more prompt tokens are
    computed for it, and it finishes with "timeout"; others are unaffected."""
    engine = InferenceEngine(tiny(tok.vocab_size), tok, max_batch_size=2, max_step_tokens=8)
    deadline = time.perf_counter() + 3600
    late = engine.add_request(long_ids(400, tok.vocab_size), GREEDY, deadline=deadline)
    ok = engine.add_request("First Citizen:", GREEDY)
    for _ in range(3):
        engine.step()
    before = engine.stats["prompt_tokens"]
    assert 0 < before < 400
    engine.prefilling[0].deadline = time.perf_counter() - 1  # the deadline passes mid-prefill
    deltas = engine.step()
    assert [d.finish_reason for d in deltas if d.request_id == late] == ["timeout"]
    while engine.has_unfinished():
        engine.step()
    assert engine.stats["prompt_tokens"] - before <= len(tok.encode("First Citizen:"))
    assert engine.pop_completion(late).finish_reason == "timeout"
    assert engine.pop_completion(ok).finish_reason in ("stop", "length")
    # a waiting request and a decoding one time out the same way
    w = engine.add_request("A", GREEDY, deadline=time.perf_counter() - 1)
    assert [d.finish_reason for d in engine.step()] == ["timeout"] and engine.pop_completion(w).token_ids == []


def test_kv_cache_is_allocated_for_the_rows_in_use(tok: Tokenizer) -> None:
    """One row is allocated at start; rows and capacity grow with use and are given back when
    the long request ends."""
    engine = InferenceEngine(tiny(tok.vocab_size), tok, max_batch_size=16)
    assert engine.cache.allocated_rows == 1 and engine.cache.capacity == 256
    engine.generate(["First Citizen:", long_ids(450, tok.vocab_size)], SamplingParams(max_tokens=4, temperature=0))
    assert engine.cache.allocated_rows == 1 and engine.cache.capacity == 256  # shrunk once idle
    rid = engine.add_request(long_ids(450, tok.vocab_size), SamplingParams(max_tokens=30, temperature=0))
    engine.add_request("Speak", SamplingParams(max_tokens=30, temperature=0))
    engine.step()
    while engine.prefilling:
        engine.step()
    assert engine.cache.allocated_rows == 2 and engine.cache.capacity >= 451
    assert engine.cache.nbytes() <= 2 * 512 * engine.bytes_per_position
    engine.abort(rid)
    engine.step()
    assert engine.cache.capacity == 256


def test_admission_waits_for_the_kv_budget(tok: Tokenizer) -> None:
    """With a budget of two full-length rows, a third request waits for a row to finish and
    then completes as it would alone."""
    model = tiny(tok.vocab_size, ctx=64)
    per = KVCache.bytes_per_position(model.config, torch.float32)
    engine = InferenceEngine(model, tok, max_batch_size=8, kv_cache_bytes=2 * 64 * per)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in ("First", "Second", "Third")]
    engine.step()
    assert engine.num_running == 2 and engine.num_waiting == 1
    while engine.has_unfinished():
        engine.step()
        assert engine.num_running <= 2
    alone = InferenceEngine(tiny(tok.vocab_size, ctx=64), tok).generate(["Third"], params)[0]
    assert engine.pop_completion(ids[2]).token_ids == alone.token_ids


def test_absurd_limits_are_refused_at_start(tok: Tokenizer) -> None:
    per = 46_080  # SmolLM2-135M: 30 layers x 3 KV heads x 64 x 2 x 4 bytes
    with pytest.raises(ConfigError, match="max-batch-size"):
        kv_cache_budget(per, 100_000, 8192, available=20 << 30)
    with pytest.raises(ConfigError, match="max-seq-len"):
        kv_cache_budget(per, 1, 10**9, available=20 << 30)
    with pytest.raises(ConfigError, match="does not hold one sequence"):
        kv_cache_budget(per, 1, 8192, requested=1 << 20)
    assert kv_cache_budget(per, 16, 8192, available=20 << 30) == 16 * 8192 * per
    assert kv_cache_budget(per, 64, 8192, available=20 << 30) == 10 << 30  # half of what is available
    with pytest.raises(ConfigError, match="max-batch-size"):
        InferenceEngine(tiny(tok.vocab_size), tok, max_batch_size=10**9)


def test_non_finite_logits_are_refused(tok: Tokenizer) -> None:
    model = tiny(tok.vocab_size)
    with torch.no_grad():
        model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    engine = InferenceEngine(model, tok)
    with pytest.raises(NonFiniteOutput, match="NaN"):
        engine.generate(["First Citizen:"], GREEDY)
