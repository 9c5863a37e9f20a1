"""The lm-evaluation-harness bridge (lmforge.eval.harness) on a tiny model: its log-likelihoods
against a hand computation, its generations against the engine, and a local lm-eval task run
through ``lm_eval.simple_evaluate`` against lmforge's own scoring."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval")

from conftest import save_tiny_llama
from lm_eval.api.instance import Instance

from lmforge.eval.harness import LmforgeLM

CONTEXT = 24


@pytest.fixture(scope="module")
def tiny_ckpt(tiny_data, tmp_path_factory):
    return save_tiny_llama(tiny_data, tmp_path_factory.mktemp("harness") / "ckpt", context_length=CONTEXT,
                           init_std=0.2)


@pytest.fixture(scope="module")
def lm(tiny_ckpt):
    return LmforgeLM(pretrained=str(tiny_ckpt), batch_size=3, progress=False)


def _req(kind: str, args: tuple, i: int = 0) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=i)


def _by_hand(model, inputs: list[int], targets: list[int]) -> tuple[float, bool]:
    """Sum of log_softmax over the last len(targets) positions of one full forward, and
    whether every target is the argmax."""
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([inputs]))[0].double(), dim=-1)
    rows = logp[len(inputs) - len(targets) :]
    total = sum(float(rows[j, t]) for j, t in enumerate(targets))
    greedy = all(int(rows[j].argmax()) == t for j, t in enumerate(targets))
    return total, greedy


def test_loglikelihood_equals_hand_computation(lm):
    tok, model = lm.tokenizer, lm.model
    cases = [
        ("To be, or not", " to be"),  # plain
        ("First Citizen: ", "Speak."),  # the trailing space moves to the continuation
        ("", "Hello"),  # empty context: the end-of-text token conditions
        ("A" * 40 + "bc", " de"),  # too long: the context loses tokens from the left
    ]
    got = lm.loglikelihood([_req("loglikelihood", c, i) for i, c in enumerate(cases)])
    # the char tokenizer encodes text character by character, so the boundary is the string's
    expected_ids = [
        (tok.encode("To be, or not"), tok.encode(" to be")),
        (tok.encode("First Citizen:"), tok.encode(" Speak.")),
        ([tok.eot_id], tok.encode("Hello")),
        (tok.encode("A" * 40 + "bc")[-(CONTEXT + 1 - 3) :], tok.encode(" de")),
    ]
    for (score, greedy), (ctx, cont) in zip(got, expected_ids):
        seq = ctx + cont
        assert len(seq) - 1 <= CONTEXT
        hand, hand_greedy = _by_hand(model, seq[:-1], cont)
        assert score == pytest.approx(hand, abs=1e-4)
        assert greedy == hand_greedy
    assert all(s < 0 for s, _ in got)


def test_is_greedy_true_for_the_models_own_argmax(lm):
    tok, model = lm.tokenizer, lm.model
    ids = tok.encode("ROMEO:")
    cont: list[int] = []
    with torch.no_grad():
        for _ in range(3):
            cont.append(int(model(torch.tensor([ids + cont]))[0, -1].argmax()))
    text = tok.decode(cont)
    if tok.encode(text) != cont:
        pytest.skip("the greedy tokens do not round-trip through text")
    [(score, greedy)] = lm.loglikelihood([_req("loglikelihood", ("ROMEO:", text))])
    assert greedy is True
    assert score == pytest.approx(_by_hand(model, (ids + cont)[:-1], cont)[0], abs=1e-4)


def test_loglikelihood_rolling_equals_hand_windows(lm):
    tok, model = lm.tokenizer, lm.model
    text = "Before we proceed any further, hear me speak."  # 45 tokens: windows of 24
    t = tok.encode(text)
    n, L = len(t), CONTEXT
    ext = [tok.eot_id] + t  # ext[j] is the input that predicts t[j]
    hand = 0.0
    start = 0
    while start < n:  # lm-eval's windows: L predictions each, the last one with a full context
        end = min(start + L, n)
        lo = max(0, end - L)  # inputs ext[lo:end] predict t[lo:end]; score only t[start:end]
        hand += _by_hand(model, ext[lo:end], t[start:end])[0]
        start = end
    [got] = lm.loglikelihood_rolling([_req("loglikelihood_rolling", (text,))])
    assert got == pytest.approx(hand, abs=1e-3)
    # one window (short text): the whole text given the end-of-text token
    short = tok.encode("Speak, speak.")
    [one] = lm.loglikelihood_rolling([_req("loglikelihood_rolling", ("Speak, speak.",))])
    assert one == pytest.approx(_by_hand(model, ([tok.eot_id] + short)[:-1], short)[0], abs=1e-4)


def test_generate_until_is_the_engines_greedy_output(lm):
    from lmforge.infer.chat import end_of_turn_ids
    from lmforge.infer.sampling import SamplingParams

    contexts = ["First Citizen:", "ROMEO:", "Speak"]
    # greedy, stopping at the until strings and, like lm-eval's HF model at its EOS, at end-of-turn tokens
    free = lm.engine.generate(contexts, SamplingParams(max_tokens=8, temperature=0.0, stop=["\n\n"],
                                                       stop_token_ids=end_of_turn_ids(lm.tokenizer)))
    got = lm.generate_until([_req("generate_until", (c, {"until": ["\n\n"], "max_gen_toks": 8}), i)
                             for i, c in enumerate(contexts)])
    assert got == [c.text for c in free]
    # a stop string cuts the text before it
    text = free[0].text
    if len(text) >= 3:
        stop = text[2]
        [cut] = lm.generate_until([_req("generate_until", (contexts[0], {"until": [stop], "max_gen_toks": 8}))])
        assert cut == text[: text.index(stop)]


def _write_task(tmp_path, docs) -> str:
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    (tmp_path / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{query}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n",
        encoding="utf-8",
    )
    return "tiny_mc"


def test_simple_evaluate_matches_lmforge_scoring(lm, tmp_path, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from lmforge.eval.prompting import encode_pair, score_token_pairs

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    docs = [
        {"query": "Who speaks?", "choices": ["ROMEO", "JULIET", "NURSE"], "answer": 0},
        {"query": "The king is", "choices": ["dead", "here", "gone"], "answer": 1},
        {"query": "First Citizen:", "choices": ["Speak", "Peace"], "answer": 0},
        {"query": "To be, or", "choices": ["not", "so", "yes"], "answer": 2},
        {"query": "Good morrow", "choices": ["sir", "madam"], "answer": 1},
    ]
    task = _write_task(tmp_path, docs)
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)  # only the local task
    out = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=manager, log_samples=True, num_fewshot=0)
    acc = out["results"][task]["acc,none"]

    # the same contexts and choices scored directly by lmforge (target delimiter " ")
    correct = 0
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    assert len(samples) == len(docs)
    for doc, sample in zip(docs, samples):
        pairs = [encode_pair(lm.tokenizer, doc["query"], " " + c) for c in doc["choices"]]
        direct = score_token_pairs(lm.model, pairs)
        harness = [r[0] for r in sample["filtered_resps"]]
        assert harness == pytest.approx(direct, abs=1e-4)  # batch composition moves the last digits
        correct += int(max(range(len(direct)), key=direct.__getitem__) == doc["answer"])
    assert acc == pytest.approx(correct / len(docs))
