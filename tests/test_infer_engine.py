"""The inference engine: KV cache exactness, batching, sampling, stops, logprobs, context
policy and bad input, on tiny random models; SmolLM2 parity with transformers (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import CHAT_PROMPT, all_threads, needs_smol

from lmforge.cli import main
from lmforge.errors import ConfigError, LmforgeError
from lmforge.infer import InferenceEngine, SamplingParams, greedy
from lmforge.infer.detokenize import StopChecker
from lmforge.infer.sampling import apply_penalties, filter_logits
from lmforge.model.cache import KVCache
from lmforge.model.gpt import GPT, GPTConfig
from lmforge.tokenizer import Tokenizer

FAMILIES = {
    "llama-gqa": {"pos_embedding": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False, "n_kv_head": 2,
                  "qk_norm": True, "tie_embeddings": False},
    "gpt2": {"mlp": "gelu_tanh"},
}


def tiny(vocab: int, family: str = "llama-gqa", ctx: int = 96, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=vocab, context_length=ctx, n_layer=2, n_head=4, n_embd=32, init_std=0.1,
                    **FAMILIES[family])
    return GPT(cfg).eval()


@pytest.fixture(scope="module")
def tok(tiny_checkpoint: Path) -> Tokenizer:
    return Tokenizer.from_file(tiny_checkpoint / "tokenizer.json")


@pytest.fixture(scope="module")
def engine(tok: Tokenizer) -> InferenceEngine:
    return InferenceEngine(tiny(tok.vocab_size), tok, max_batch_size=4)


# ---- the KV cache ----------------------------------------------------------------------
@pytest.mark.parametrize("family", list(FAMILIES))
def test_kv_cache_decoding_equals_full_recomputation(family: str) -> None:
    """64 decode steps through the cache (which grows 4 -> 128 on the way) give the logits
    of recomputing the whole sequence, to 1e-5 in fp32."""
    model = tiny(50, family)
    ids = torch.randint(0, 50, (1, 72))
    cache = KVCache(model.config, 1, capacity=4)
    with torch.no_grad():
        full = model(ids)[0]
        got = [model.forward_cached(ids[:, :8], cache.rows(0, 1), logits="all")[0]]
        for t in range(8, 72):
            got.append(model.forward_cached(ids[:, t : t + 1], cache.rows(0, 1)))
    diff = (torch.cat(got) - full).abs().max().item()
    assert diff <= 1e-5, diff
    assert cache.lengths == [72] and cache.capacity == 96  # doubled up to the context, not past it


def test_ragged_rows_decode_like_single_rows() -> None:
    """Right-padded prompts of different lengths prefill together, then rows of different
    lengths decode in one batch: each row's logits equal its own full forward."""
    model = tiny(50)
    lens = [5, 11, 2]
    seqs = [torch.randint(0, 50, (30,)) for _ in lens]
    x = torch.zeros(3, max(lens), dtype=torch.long)
    for b, n in enumerate(lens):
        x[b, :n] = seqs[b][:n]
    cache = KVCache(model.config, 3)
    with torch.no_grad():
        out = model.forward_cached(x, cache.rows(0, 3), input_lengths=lens)
        diffs = [(out[b] - model(seqs[b][None, :n])[0, -1]).abs().max() for b, n in enumerate(lens)]
        pos = list(lens)
        for _ in range(6):
            step = torch.stack([seqs[b][pos[b]] for b in range(3)])[:, None]
            out = model.forward_cached(step, cache.rows(0, 3))
            pos = [p + 1 for p in pos]
            diffs += [(out[b] - model(seqs[b][None, : pos[b]])[0, -1]).abs().max() for b in range(3)]
    assert max(diffs) <= 1e-5
    assert cache.lengths == [p for p in pos]


# ---- batching ------------------------------------------------------------------------------
MIXED = [
    ("First Citizen:", SamplingParams(max_tokens=20, temperature=0)),
    ("Before we proceed any further, hear", SamplingParams(max_tokens=9, temperature=0.9, top_k=10, seed=1)),
    ("A", SamplingParams(max_tokens=25, temperature=1.2, top_p=0.8, seed=2, stop=["e "])),
    ("You are all resolved", SamplingParams(max_tokens=15, temperature=0.7, min_p=0.1, seed=3,
                                             repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.5)),
    ("Speak, speak.", SamplingParams(max_tokens=12, temperature=0, logprobs=3)),
]


def solo(tok: Tokenizer, prompt: str, params: SamplingParams):
    return InferenceEngine(tiny(tok.vocab_size), tok, max_batch_size=1).generate([prompt], params)[0]


def test_batched_generation_equals_one_at_a_time(engine: InferenceEngine, tok: Tokenizer) -> None:
    """Five requests with different prompts, lengths and settings through 4 rows (one waits
    for a free row): every completion is the one it gets alone."""
    batched = engine.generate([p for p, _ in MIXED], [s for _, s in MIXED])
    for (prompt, params), got in zip(MIXED, batched):
        alone = solo(tok, prompt, params)
        assert got.token_ids == alone.token_ids and got.text == alone.text, prompt
        assert got.finish_reason == alone.finish_reason
    assert batched[2].finish_reason == "stop" or len(batched[2].token_ids) == 25
    assert [len(c.token_ids) for c in batched][:2] == [20, 9]
    assert not engine.has_unfinished() and engine.cache.lengths == [0, 0, 0, 0]


def test_requests_joining_mid_flight_and_abort(engine: InferenceEngine, tok: Tokenizer) -> None:
    """Continuous batching: a request added while others decode, and one aborted, leave the
    others' outputs unchanged; the aborted one frees its row at once."""
    p = SamplingParams(max_tokens=16, temperature=0)
    a = engine.add_request("First Citizen:", p)
    b = engine.add_request("To be, or not", p)
    for _ in range(3):
        engine.step()
    c = engine.add_request("Speak, speak.", p)
    engine.step()
    assert engine.num_running == 3
    assert engine.abort(b) and engine.num_running == 2
    while engine.has_unfinished():
        engine.step()
    for rid, prompt in ((a, "First Citizen:"), (c, "Speak, speak.")):
        assert engine.pop_completion(rid).token_ids == solo(tok, prompt, p).token_ids
    assert engine.pop_completion(b).finish_reason == "abort"
    assert not engine.abort("no-such-request")
    waiting = engine.add_request("First", p)  # aborted before it ever ran
    assert engine.abort(waiting) and not engine.has_unfinished()
    gone = engine.pop_completion(waiting)
    assert gone.finish_reason == "abort" and gone.token_ids == []


# ---- sampling ------------------------------------------------------------------------------
def test_filters_on_known_logits() -> None:
    logits = torch.log(torch.tensor([0.5, 0.25, 0.15, 0.1]))
    keep = lambda **kw: torch.isfinite(filter_logits(logits, SamplingParams(**kw))).tolist()  # noqa: E731
    assert keep(top_k=2) == [True, True, False, False]
    assert keep(top_p=0.5) == [True, False, False, False]  # 0.5 alone reaches 0.5
    assert keep(top_p=0.7) == [True, True, False, False]
    assert keep(top_p=0.8) == [True, True, True, False]
    assert keep(min_p=0.3) == [True, True, True, False]  # 0.1 < 0.3 * 0.5
    assert keep(temperature=0.5) == [True] * 4
    # penalties: repetition divides positive / multiplies negative logits of seen tokens,
    # presence and frequency subtract per the output counts (OpenAI's formula)
    raw = torch.tensor([2.0, -2.0, 1.0, 1.0])
    seen = torch.tensor([True, True, False, False])
    counts = torch.tensor([0.0, 0.0, 3.0, 0.0])
    p = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    assert apply_penalties(raw, p, counts, seen).tolist() == [1.0, -4.0, 1.0 - 0.75 - 0.5, 1.0]


def test_greedy_is_the_argmax_and_seeds_reproduce(engine: InferenceEngine, tok: Tokenizer) -> None:
    prompt = tok.encode("First Citizen:")
    out = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0))[0].token_ids
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(engine.model(torch.tensor([ids]))[0, -1].argmax()))
    assert out == ids[len(prompt):]
    assert greedy(engine.model, prompt, 12) == out  # the tokenizer-free helper
    # top_k=1 is greedy whatever the temperature and seed
    assert engine.generate([prompt], SamplingParams(max_tokens=12, top_k=1, temperature=3.0, seed=7))[0].token_ids == out
    state = torch.get_rng_state()
    runs = [engine.generate([prompt], SamplingParams(max_tokens=20, seed=s))[0].token_ids for s in (3, 3, 4)]
    assert torch.equal(torch.get_rng_state(), state)  # private generators: global RNG untouched
    assert runs[0] == runs[1] != runs[2]


def test_top_k_restricts_the_choices(engine: InferenceEngine, tok: Tokenizer) -> None:
    prompt = tok.encode("To be")
    with torch.no_grad():
        top3 = set(engine.model(torch.tensor([prompt]))[0, -1].topk(3).indices.tolist())
    firsts = {engine.generate([prompt], SamplingParams(max_tokens=1, temperature=2.0, top_k=3, seed=s))[0].token_ids[0]
              for s in range(30)}
    assert firsts <= top3 and len(firsts) > 1


# ---- streaming, stops, logprobs -------------------------------------------------------------
def test_stop_strings_across_tokens_and_streaming(engine: InferenceEngine) -> None:
    base = engine.generate(["First"], SamplingParams(max_tokens=40, temperature=0))[0].text
    stop = base[10:13]  # three characters: three tokens of the char tokenizer
    cut = base.index(stop)
    deltas = list(engine.stream("First", SamplingParams(max_tokens=40, temperature=0, stop=[stop, "never!"])))
    text = "".join(d.text for d in deltas)
    assert text == base[:cut] and deltas[-1].finish_reason == "stop"
    assert all(d.finish_reason is None for d in deltas[:-1])
    ids = [t for d in deltas for t in d.token_ids]  # generation ended on the stop's last token
    assert stop in engine.tokenizer.decode(ids, skip_special_tokens=True)
    assert stop not in engine.tokenizer.decode(ids[:-1], skip_special_tokens=True)
    # the stream never shows text the final answer lacks: held back while a stop may be forming
    checker = StopChecker(["abc"])
    assert [checker.add(s) for s in ("xa", "b", "d", "ab", "c", "zz")] == ["x", "", "abd", "", "", ""]
    assert checker.text == "xabd" and checker.stopped


def test_stop_token_ids_and_eos(engine: InferenceEngine, tok: Tokenizer) -> None:
    free = engine.generate(["First"], SamplingParams(max_tokens=30, temperature=0))[0]
    stop_id = free.token_ids[6]
    k = free.token_ids.index(stop_id)
    got = engine.generate(["First"], SamplingParams(max_tokens=30, temperature=0, stop_token_ids=[stop_id]))[0]
    assert got.token_ids == free.token_ids[: k + 1] and got.finish_reason == "stop"
    assert got.text == tok.decode(free.token_ids[:k], skip_special_tokens=True)  # without the stop token
    # the tokenizer's end-of-text token stops every request unless ignore_eos
    assert engine.eos_ids == {tok.eot_id}
    engine.add_request("First", SamplingParams(stop_token_ids=[stop_id]), request_id="eos")
    engine.add_request("First", SamplingParams(ignore_eos=True), request_id="no-eos")
    assert [set(s.stop_ids) for s in engine.waiting] == [{stop_id, tok.eot_id}, set()]
    assert engine.abort("eos") and engine.abort("no-eos") and not engine.has_unfinished()


def test_logprobs_are_the_models_distribution(engine: InferenceEngine, tok: Tokenizer) -> None:
    prompt = tok.encode("Speak, speak.")
    c = engine.generate([prompt], SamplingParams(max_tokens=6, temperature=0.8, seed=0, logprobs=3,
                                                 prompt_logprobs=2))[0]
    seq = torch.tensor([prompt + c.token_ids])
    with torch.no_grad():
        ref = torch.log_softmax(engine.model(seq)[0].float(), -1)
    n = len(prompt)
    for i, lp in enumerate(c.logprobs):
        assert lp.token_id == c.token_ids[i]
        assert abs(lp.logprob - ref[n - 1 + i, lp.token_id].item()) < 1e-5
        top = ref[n - 1 + i].topk(3)
        assert [t for t, _ in lp.top] == top.indices.tolist()
    assert c.prompt_logprobs[0] is None and len(c.prompt_logprobs) == n
    for t in range(1, n):
        assert abs(c.prompt_logprobs[t].logprob - ref[t - 1, prompt[t]].item()) < 1e-5
        assert len(c.prompt_logprobs[t].top) == 2


# ---- the context ---------------------------------------------------------------------------
def test_context_policies(tok: Tokenizer) -> None:
    model = tiny(tok.vocab_size, ctx=24)
    long = tok.encode("Before we proceed any further, hear me speak.")
    assert len(long) > 24
    with pytest.raises(LmforgeError, match="the context holds 24"):
        InferenceEngine(model, tok).add_request(long)
    p = SamplingParams(max_tokens=8, temperature=0)
    cut = InferenceEngine(model, tok, overflow="truncate").generate([long], p)[0]
    assert cut.prompt_ids == long[-16:] and cut.token_ids == greedy(model, long[-16:], 8)
    # generation stops when prompt + completion fill the context
    c = InferenceEngine(model, tok).generate([long[:20]], SamplingParams(max_tokens=50, temperature=0))[0]
    assert len(c.token_ids) == 4 and c.finish_reason == "length"
    # slide: generation goes on; after the context is full it continues from the last
    # half-context window, exactly as greedy decoding of that window would
    s = InferenceEngine(model, tok, overflow="slide").generate([long[:20]], SamplingParams(max_tokens=30, temperature=0))[0]
    assert len(s.token_ids) == 30 and s.token_ids[:4] == c.token_ids
    every = long[:20] + s.token_ids
    window = every[24 - 12 : 25]  # the row was re-encoded from its last 12 tokens at length 25
    assert s.token_ids[5] == greedy(model, window, 1)[0]


# ---- bad input ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"temperature": -0.5}, "temperature must be >= 0"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_k": -1}, "top_k must be a non-negative integer"),
        ({"min_p": 2.0}, r"min_p must be in \[0, 1\]"),
        ({"max_tokens": 0}, "max_tokens must be a positive integer"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be in \\[0.01, 100\\]"),
        ({"presence_penalty": -3.0}, r"presence_penalty must be in \[-2, 2\]"),
        ({"logprobs": 21}, r"logprobs must be an integer in \[0, 20\]"),
        ({"stop_token_ids": [10**6]}, "stop token id 1000000 is not in the vocabulary"),
        ({"stop": [""]}, "stop must be a list of non-empty strings"),
        ({"temperature": float("nan")}, "temperature must be a finite number"),
    ],
)
def test_invalid_sampling_settings(engine: InferenceEngine, params: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        engine.add_request("First", SamplingParams(**params))


def test_invalid_prompts(engine: InferenceEngine) -> None:
    with pytest.raises(LmforgeError, match="the prompt is empty"):
        engine.add_request("")
    with pytest.raises(LmforgeError, match="the prompt is empty"):
        engine.add_request([])
    with pytest.raises(LmforgeError, match="outside the vocabulary"):
        engine.add_request([1, 10**6])
    with pytest.raises(ConfigError, match="max_batch_size must be at least 1"):
        InferenceEngine(engine.model, engine.tokenizer, max_batch_size=0)
    assert not engine.has_unfinished()


def test_cli_bad_input(tiny_checkpoint: Path, capsys) -> None:
    cases = [
        (["--temperature", "-1", "First"], "temperature must be >= 0"),
        (["--top-p", "1.5", "First"], "top_p must be in (0, 1]"),
        (["--stop-token", "<|nope|>", "First"], "unknown stop token '<|nope|>'"),
        ([""], "the prompt is empty"),
        (["--file", "/nonexistent/prompts.txt"], "prompt file not found"),
        (["First Citizen: " * 3], "the context holds 16"),
    ]
    for args, message in cases:
        capsys.readouterr()
        assert main(["generate", str(tiny_checkpoint), *args]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (args, err)


# ---- command line --------------------------------------------------------------------------
def test_cli_generate_jsonl(tiny_checkpoint: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    assert main(["generate", str(tiny_checkpoint), "First", "Second", "--greedy", "--max-tokens", "5",
                 "--logprobs", "2"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows] == ["First", "Second"] and [r["index"] for r in rows] == [0, 1]
    assert all(r["completion_tokens"] == 5 and r["finish_reason"] == "length" for r in rows)
    assert len(rows[0]["logprobs"]) == 5 and len(rows[0]["logprobs"][0]["top"]) == 2
    # the same prompts from a JSONL file and from stdin give the same completions
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "First"}\n\n{"prompt": "Second"}\n')
    out = tmp_path / "out.jsonl"
    assert main(["generate", str(tiny_checkpoint), "--file", str(f), "--out", str(out), "--greedy",
                 "--max-tokens", "5"]) == 0
    from_file = [json.loads(line)["completion"] for line in out.read_text().splitlines()]
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("First\nSecond\n"))
    assert main(["generate", str(tiny_checkpoint), "--greedy", "--max-tokens", "5"]) == 0
    from_stdin = [json.loads(line)["completion"] for line in capsys.readouterr().out.splitlines()]
    assert from_file == from_stdin == [r["completion"] for r in rows]
    f.write_text('{"prompt": "First"}\n{"text": 1}\n')
    assert main(["generate", str(tiny_checkpoint), "--file", str(f)]) == 2
    assert "p.jsonl:2: expected an object" in capsys.readouterr().err


def test_cli_sample(tiny_checkpoint: Path, capsys) -> None:
    def run(*args: str) -> str:
        capsys.readouterr()
        assert main(["sample", str(tiny_checkpoint), "--prompt", "First", "--max-new-tokens", "30", *args]) == 0
        return capsys.readouterr().out

    greedy_out = run("--greedy")
    assert greedy_out.startswith("--- sample 1 ---\nFirst") and greedy_out == run("--greedy")
    assert len(greedy_out.split("\n", 1)[1]) > 16 + 5  # past the 16-token context: the window slides
    seeded = run("--num-samples", "2", "--seed", "5", "--temperature", "1.0")
    assert seeded == run("--num-samples", "2", "--seed", "5", "--temperature", "1.0")
    samples = seeded.split("--- sample 2 ---\n")
    assert len(samples) == 2 and samples[0].removeprefix("--- sample 1 ---\n") != samples[1]  # seeds 5 and 6


# ---- SmolLM2 ---------------------------------------------------------------------------------
SMOL_PROMPTS = [
    "Counting: 1, 2, 3, 4, 5, 6,",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    CHAT_PROMPT,
    "<|im_start|>user\nWrite a haiku about the ocean.<|im_end|>\n<|im_start|>assistant\n",
]


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy decoding on its own KV cache, for exactly ``n`` tokens
    (``generate`` would stop at the end-of-turn token, which ``ignore_eos`` runs past)."""
    out = hf(torch.tensor([prompt]), use_cache=True)
    ids = [int(out.logits[0, -1].argmax())]
    while len(ids) < n:
        out = hf(torch.tensor([[ids[-1]]]), past_key_values=out.past_key_values, use_cache=True)
        ids.append(int(out.logits[0, -1].argmax()))
    return ids


@needs_smol
@pytest.mark.slow
def test_smollm2_greedy_equals_transformers_and_cache_is_exact(smol_ckpt: Path, smol_model, hf_smol) -> None:
    """Acceptance: 64 greedy tokens on 5 prompts equal transformers' on the same weights;
    the cached decode's logits equal full recomputation on the real model."""
    tok = Tokenizer.from_file(smol_ckpt)
    engine = InferenceEngine(smol_model, tok, max_batch_size=5)
    params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    with torch.no_grad(), all_threads():
        ours = engine.generate(SMOL_PROMPTS, params)  # one ragged batch
        for prompt, c in zip(SMOL_PROMPTS, ours):
            theirs = hf_greedy(hf_smol, tok.encode(prompt), 64)
            assert c.token_ids == theirs, (prompt, tok.decode(c.token_ids), tok.decode(theirs))
        # cache vs recomputation over the 64 generated steps of one prompt
        seq = torch.tensor([tok.encode(SMOL_PROMPTS[2]) + ours[2].token_ids])
        n = seq.shape[1] - 64
        full = smol_model(seq)[0, n - 1 : -1]
        cache = KVCache(smol_model.config, 1)
        steps = [smol_model.forward_cached(seq[:, :n], cache.rows(0, 1))]
        steps += [smol_model.forward_cached(seq[:, t : t + 1], cache.rows(0, 1)) for t in range(n, n + 63)]
    diff = (torch.cat(steps) - full).abs().max().item()
    assert diff <= 1e-4, diff  # 30 layers of fp32: the summation order differs between paths


@needs_smol
def test_smollm2_chat_repl(smol_ckpt: Path, capsys, monkeypatch) -> None:
    lines = "What is the capital of France?\n/system Answer in one word.\n/history\n/reset\n/history\n/quit\n"
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO(lines))
    with all_threads():
        assert main(["chat", str(smol_ckpt), "--greedy", "--max-tokens", "24"]) == 0
    out = capsys.readouterr().out
    assert "Paris" in out.split("(system prompt set)")[0]
    history = out.split("(system prompt set)")[1].split("(conversation cleared)")
    assert "[system] Answer in one word." in history[0] and "[user] What is the capital of France?" in history[0]
    assert "[assistant]" in history[0] and "[user]" not in history[1]


def test_extreme_but_valid_sampling_settings_do_not_break_a_batch(tiny_checkpoint):
    """Tiny temperatures are greedy (no inf logits), tiny top_p keeps the top token, and an
    extreme repetition penalty is refused up front, so no row can poison the shared step."""
    from lmforge.errors import ConfigError
    from lmforge.infer import SamplingParams, load_engine

    engine = load_engine(tiny_checkpoint, max_batch_size=4)
    greedy = engine.generate(["ab"], SamplingParams(max_tokens=5, temperature=0))[0].token_ids
    odd = [
        SamplingParams(max_tokens=5, temperature=1e-300, seed=1),
        SamplingParams(max_tokens=5, temperature=1e-45, top_k=1, seed=2),
        SamplingParams(max_tokens=5, top_p=1e-300, seed=3),
    ]
    outs = engine.generate(["ab"] * 3, odd)
    assert outs[0].token_ids == greedy and outs[1].token_ids == greedy
    assert outs[2].token_ids == greedy  # top_p that small keeps only the likeliest token
    with pytest.raises(ConfigError, match="repetition_penalty"):
        SamplingParams(repetition_penalty=1e-300).validate()


def test_chat_banner_names_the_checkpoint_and_an_adapter(tiny_data: Path, tmp_path: Path) -> None:
    """`lmforge chat` on an adapter run said "chatting with 30-layer model" without naming the adapter."""
    import io

    from conftest import save_tiny_llama

    from lmforge.infer.chat import ChatSession, repl
    from lmforge.tokenizer.chat import ChatTemplate
    from lmforge.infer.engine import load_engine
    from lmforge.model.peft import PeftConfig, apply_peft
    from lmforge.checkpoint import load_model, save_checkpoint

    base = save_tiny_llama(tiny_data, tmp_path / "base", context_length=64, init_std=0.05)
    model, _ = load_model(base)
    apply_peft(model, PeftConfig(method="lora", r=2))
    adapter = save_checkpoint(tmp_path / "adapter", model, base / "tokenizer.json", base_checkpoint=base)

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    for ckpt, want in ((adapter, f"{adapter}: a lora adapter over the base {base.resolve()} (2 layers x 32)"),
                       (base, f"{base} (2 layers x 32)")):
        engine = load_engine(str(ckpt))
        out = io.StringIO()
        repl(ChatSession(engine, ChatTemplate.from_checkpoint(engine.checkpoint)), inp=Tty("/quit\n"), out=out)
        assert out.getvalue().startswith(f"chatting with {want}; "), out.getvalue()
