"""Generation metrics (hand-computed cases, sacrebleu as the BLEU reference) and
evaluate_generation through the inference engine on a tiny model."""

from __future__ import annotations

import pytest
import torch

from lmforge.errors import ConfigError, DataError
from lmforge.eval import generation as G

sacrebleu = pytest.importorskip("sacrebleu")
pytest.importorskip("rouge_score")


# ---------------------------------------------------------------------------- SQuAD-style
def test_normalize_answer_squad_rules():
    assert G.normalize_answer("  The Cat's  hat, an apple!  ") == "cats hat apple"
    assert G.normalize_answer("Theory") == "theory"  # "the" only as a word


def test_exact_match_max_over_references():
    assert G.exact_match("The Eiffel Tower.", ["eiffel tower"]) == 1.0
    assert G.exact_match("Eiffel", ["eiffel tower", "Paris"]) == 0.0
    assert G.exact_match("paris", ["eiffel tower", "Paris!"]) == 1.0


def test_token_f1_hand_computed():
    # pred tokens {cat, sat, mat}, ref {cat, sat, on, mat, today}: common 3, P=3/3, R=3/5 -> F1 = 0.75
    assert G.token_f1("The cat sat, the mat", "a cat sat on mat today") == pytest.approx(0.75)
    # repeated tokens count by multiplicity: pred [x b] vs ref [b b c]: common 1 (one b), P=1/2, R=1/3 -> 0.4
    assert G.token_f1("x b", "b b c") == pytest.approx(0.4)
    assert G.token_f1("x b", ["b b c", "x b"]) == 1.0  # best reference
    assert G.token_f1("dog", "cat") == 0.0
    assert G.token_f1("the", "a") == 1.0  # both normalize to nothing: SQuAD counts a match


def test_rouge_l_hand_computed():
    # LCS("the cat sat on the mat", "the cat on mat") = 4 tokens: P = 4/6, R = 4/4 -> F = 0.8
    assert G.rouge_l("the cat sat on the mat", "the cat on mat") == pytest.approx(0.8)
    # LCS("a b c d", "d c b a") = 1: P = R = 1/4 -> 0.25; the second reference matches fully
    assert G.rouge_l("a b c d", ["d c b a"]) == pytest.approx(0.25)
    assert G.rouge_l("a b c d", ["d c b a", "a b c d"]) == pytest.approx(1.0)


def test_distinct_n_hand_computed():
    preds = ["a b a b", "a b c"]
    # unigrams: a b a b a b c -> 7, distinct {a, b, c} = 3
    assert G.distinct_n(preds, 1) == pytest.approx(3 / 7)
    # bigrams: ab ba ab | ab bc -> 5, distinct {ab, ba, bc} = 3
    assert G.distinct_n(preds, 2) == pytest.approx(3 / 5)
    assert G.distinct_n(["one"], 2) == 0.0
    with pytest.raises(ConfigError):
        G.distinct_n(preds, 0)


def test_bleu_equals_sacrebleu_and_perfect_is_100():
    hyps = ["the cat is on the mat", "there is a cat here"]
    refs = [["the cat sat on the mat", "a cat is on the mat"], ["a cat is here"]]
    expected = sacrebleu.corpus_bleu(hyps, [["the cat sat on the mat", "a cat is here"],
                                            ["a cat is on the mat", None]]).score
    got = G.corpus_bleu(hyps, refs)
    assert got == pytest.approx(expected)
    assert 0 < got < 100
    one = sacrebleu.corpus_bleu(["the cat is on the mat"], [["the cat sat on the mat"]]).score
    assert G.corpus_bleu(["the cat is on the mat"], [["the cat sat on the mat"]]) == pytest.approx(one)
    assert G.corpus_bleu(["a b c d e f"], [["a b c d e f"]]) == pytest.approx(100.0)


def test_generation_metrics_corpus_means_and_errors():
    corpus, per = G.generation_metrics(["Paris", "the dog"], [["paris"], ["a cat"]])
    assert [p["exact_match"] for p in per] == [1.0, 0.0]
    assert corpus["exact_match"] == pytest.approx(50.0)
    assert corpus["f1"] == pytest.approx(50.0)
    assert corpus["distinct_1"] == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="unknown generation metric"):
        G.generation_metrics(["a"], [["a"]], metrics=["bleurt"])
    with pytest.raises(ConfigError, match="2 predictions but 1"):
        G.generation_metrics(["a", "b"], [["a"]])


def test_references_of_accepts_the_usual_fields():
    assert G.references_of({"references": ["a", "b"]}) == ["a", "b"]
    assert G.references_of({"answer": "x"}) == ["x"]
    assert G.references_of({"answers": {"text": ["y", "z"], "answer_start": [0, 3]}}) == ["y", "z"]
    with pytest.raises(DataError, match="no references"):
        G.references_of({"prompt": "q"})
    with pytest.raises(DataError, match="non-empty list"):
        G.references_of({"references": []})


def test_missing_library_is_a_config_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "sacrebleu", None)
    with pytest.raises(ConfigError, match=r"lmforge\[eval\]"):
        G.corpus_bleu(["a"], [["a"]])


# ---------------------------------------------------------------------------- with the engine
def _greedy_by_hand(model, tokenizer, prompt: str, n: int) -> str:
    """Greedy continuation with full forwards (no KV cache, no engine)."""
    ids = tokenizer.encode(prompt)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids + out]))
            tok = int(logits[0, -1].argmax())
            if tok == tokenizer.eot_id:
                break
            out.append(tok)
    return tokenizer.decode(out, skip_special_tokens=True)  # as the engine shows text


def test_evaluate_generation_own_greedy_output_is_exact(tiny_checkpoint):
    from lmforge.infer.engine import load_engine
    from lmforge.tokenizer.chat import ChatTemplate

    engine = load_engine(str(tiny_checkpoint), max_batch_size=3)
    prompts = ["First Cit", "ROMEO:", "the king", "And so"]
    expected = [_greedy_by_hand(engine.model, engine.tokenizer, p, 6) for p in prompts]
    examples = [{"prompt": p, "references": [e, "zzz unrelated"]} for p, e in zip(prompts, expected)]
    res = G.evaluate_generation(engine, examples, max_tokens=6, progress=False)
    assert [r["prediction"] for r in res["predictions"]] == expected
    assert res["metrics"]["exact_match"] == 100.0
    assert res["metrics"]["f1"] == 100.0
    assert res["n"] == 4 and res["chat"] is False and res["temperature"] == 0.0
    assert res["generated_tokens"] == sum(r["completion_tokens"] for r in res["predictions"])
    assert all(r["exact_match"] == 1.0 for r in res["predictions"])

    # conversations go through the chat template: a template that renders the bare user text
    # must give the same predictions
    bare = ChatTemplate("{% for m in messages %}{{ m.content }}{% endfor %}")
    chat_examples = [{"messages": [{"role": "user", "content": p}], "answer": e} for p, e in zip(prompts, expected)]
    res_chat = G.evaluate_generation(engine, chat_examples, max_tokens=6, chat_template=bare, progress=False)
    assert res_chat["chat"] is True
    assert [r["prediction"] for r in res_chat["predictions"]] == expected

    # wrong references lower the score: a prediction that is not a reference is not a match
    wrong = [{"prompt": p, "references": [e + "Q"]} for p, e in zip(prompts, expected)]
    res_wrong = G.evaluate_generation(engine, wrong, max_tokens=6, progress=False)
    assert res_wrong["metrics"]["exact_match"] < 100.0


def test_evaluate_generation_bad_examples(tiny_checkpoint):
    from lmforge.infer.engine import load_engine

    engine = load_engine(str(tiny_checkpoint), max_batch_size=2)
    with pytest.raises(DataError, match="empty"):
        G.evaluate_generation(engine, [], progress=False)
    with pytest.raises(DataError, match="example 1 needs"):
        G.evaluate_generation(engine, [{"prompt": "a", "answer": "b"}, {"answer": "b"}], progress=False)
    with pytest.raises(DataError, match="end with a user turn"):
        G.evaluate_generation(engine, [{"messages": [{"role": "assistant", "content": "x"}], "answer": "b"}],
                              progress=False)
    with pytest.raises(ConfigError, match="max_tokens"):
        G.evaluate_generation(engine, [{"prompt": "a", "answer": "b"}], max_tokens=0, progress=False)
