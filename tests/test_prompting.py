"""Classification by prompting on the tiny checkpoint: continuation log-likelihoods against a
hand computation from the model's logits, the KV-cached scorer against the plain one, seeded
label-balanced few-shot examples, prompts."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmforge.errors import ConfigError
from lmforge.eval.prompting import (
    build_prompts,
    classify_by_prompting,
    classify_scores,
    encode_pair,
    few_shot_examples,
    prompt_scores,
    score_continuations,
)
from lmforge.tokenizer.base import Tokenizer
from lmforge.tokenizer.chat import ChatTemplate
from lmforge.checkpoint import load_model

POOL = [{"text": f"{lb} text {i}", "label": lb} for lb, n in (("a", 6), ("b", 3), ("c", 2)) for i in range(n)]


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint: Path):
    model, path = load_model(tiny_checkpoint)
    return model.eval(), Tokenizer.from_file(path)


def _hand_score(model, tok, context: str, continuation: str) -> float:
    """log P(continuation | context) from one plain forward, the boundary done by hand."""
    stripped = context.rstrip(" ")
    ctx = tok.encode(stripped)
    cont = tok.encode(stripped + context[len(stripped):] + continuation)[len(ctx):]
    limit = model.config.context_length + 1
    ctx = ctx[-(limit - len(cont)):] if len(ctx) + len(cont) > limit else ctx
    seq = ctx + cont
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([seq[:-1]])).float(), dim=-1)[0]
    return sum(logp[len(ctx) - 1 + t, c].item() for t, c in enumerate(cont))


def test_score_continuations_matches_hand_computation(tiny) -> None:
    model, tok = tiny
    contexts = ["ROMEO: ", "abc", "Thou art", "a long context that will not fit in sixteen tokens: "]
    continuations = ["yes", " be", "\nno", "end"]
    got = score_continuations(model, tok, contexts, continuations, batch_size=3)
    want = [_hand_score(model, tok, c, x) for c, x in zip(contexts, continuations)]
    assert got == pytest.approx(want, abs=1e-4)
    assert all(s < 0 for s in got)
    # the trailing space moved: "ROMEO: " + "yes" scores " yes" after "ROMEO:"
    assert encode_pair(tok, "ROMEO: ", "yes") == (tok.encode("ROMEO:"), tok.encode(" yes"))
    # batching and order do not change scores
    alone = [score_continuations(model, tok, [c], [x])[0] for c, x in zip(contexts, continuations)]
    assert got == pytest.approx(alone, abs=1e-5)
    with pytest.raises(ConfigError, match="empty continuation"):
        score_continuations(model, tok, ["a"], [""])


def test_cached_scores_equal_plain_scores(tiny) -> None:
    model, tok = tiny
    prompts = ["Q: ab\nA:", "Q: abcd\nA:", "Q: z\nA:", "Q: a much longer question\nA:"]
    conts = [" yes", " no", " maybe"]
    cached = prompt_scores(model, tok, prompts, conts, batch_size=3)
    plain = prompt_scores(model, tok, prompts, conts, use_cache=False)
    assert cached.shape == (4, 3)
    np.testing.assert_allclose(cached, plain, atol=1e-4)
    # the first three prompts fit the 16-token context whole: the same as scoring pair by pair
    flat = score_continuations(model, tok, [p for p in prompts[:3] for _ in conts], conts * 3)
    np.testing.assert_allclose(plain[:3].ravel(), flat, atol=1e-6)
    norm = prompt_scores(model, tok, prompts, conts, length_normalize=True)
    lens = np.array([len(encode_pair(tok, prompts[0], c)[1]) for c in conts])
    np.testing.assert_allclose(norm, cached / lens, atol=1e-6)
    model.train()
    prompt_scores(model, tok, prompts[:1], conts)
    assert model.training  # the caller's mode is restored
    model.eval()


def test_few_shot_examples_seeded_balanced() -> None:
    shots = few_shot_examples(POOL, 6, seed=3)
    assert shots == few_shot_examples(POOL, 6, seed=3)
    assert Counter(e["label"] for e in shots) == {"a": 2, "b": 2, "c": 2}
    assert Counter(e["label"] for e in few_shot_examples(POOL, 4, seed=0)).most_common(1)[0][1] == 2
    assert Counter(e["label"] for e in few_shot_examples(POOL, 9, seed=0)) == {"a": 4, "b": 3, "c": 2}
    assert {tuple(e["text"] for e in few_shot_examples(POOL, 6, seed=s)) for s in range(5)} != {
        tuple(e["text"] for e in shots)
    }
    excluded = few_shot_examples(POOL, 10, seed=0, exclude=["a text 0"])
    assert "a text 0" not in [e["text"] for e in excluded]
    with pytest.raises(ConfigError, match="pool holds only 10"):
        few_shot_examples(POOL, 11, seed=0, exclude=["a text 0"])
    with pytest.raises(ConfigError, match="needs a pool"):
        few_shot_examples([], 1, seed=0)
    assert few_shot_examples(POOL, 0, seed=0) == []


def test_prompts_and_classification(tiny) -> None:
    model, tok = tiny
    texts = ["to be", "or not"]
    labels = ["a", "b", "c"]
    template = "Options: {labels}. Text: {text}\nAnswer:"
    s1, p1 = classify_scores(model, tok, texts, labels, template=template, pool=POOL, k=3, seed=7, progress=False)
    s2, p2 = classify_scores(model, tok, texts, labels, template=template, pool=POOL, k=3, seed=7, progress=False)
    assert p1 == p2 and np.array_equal(s1, s2)
    shots = few_shot_examples(POOL, 3, seed=7, exclude=texts)
    assert p1[0] == "".join(f"Options: a, b, c. Text: {e['text']}\nAnswer: {e['label']}\n\n" for e in shots) + (
        "Options: a, b, c. Text: to be\nAnswer:"
    )
    assert sorted(e["label"] for e in shots) == ["a", "b", "c"]
    pred = classify_by_prompting(model, tok, texts, labels, template=template, pool=POOL, k=3, seed=7, progress=False)
    assert pred == list(s1.argmax(axis=1))
    # verbalizers are what is scored; a chat template wraps shots as turns
    chat = ChatTemplate()
    prompts, conts = build_prompts(["hi"], ["Yes", "No"], template="{text}?", shots=[("x", "Yes")], chat_template=chat)
    assert prompts == ["<|im_start|>user\nx?<|im_end|>\n<|im_start|>assistant\nYes<|im_end|>\n"
                       "<|im_start|>user\nhi?<|im_end|>\n<|im_start|>assistant\n"]
    assert conts == ["Yes", "No"]
    cs = classify_scores(model, tok, texts, labels, template=template, chat_template=chat, verbalizers=["x", "y", "z"],
                         progress=False)[0]
    assert cs.shape == (2, 3)
    with pytest.raises(ConfigError, match="must contain"):
        classify_by_prompting(model, tok, texts, labels, template="no placeholder", progress=False)
    with pytest.raises(ConfigError, match="pool holds only"):
        classify_by_prompting(model, tok, texts, labels, template=template, pool=POOL[:2], k=5, progress=False)
    with pytest.raises(ConfigError, match="not one of the labels"):
        classify_by_prompting(model, tok, texts, ["a", "b"], template=template, pool=POOL, k=6, progress=False)


def test_evaluate_task_by_prompting(tiny, tmp_path: Path) -> None:
    import json

    from lmforge.data.tasks import load_task
    from lmforge.eval.prompting import evaluate_task_by_prompting

    model, tok = tiny
    (tmp_path / "tr.jsonl").write_text("".join(json.dumps(e) + "\n" for e in POOL))
    (tmp_path / "te.jsonl").write_text("".join(json.dumps({"text": f"t{i}", "label": "abc"[i % 3]}) + "\n"
                                               for i in range(5)))
    (tmp_path / "t.yaml").write_text("kind: classify\ntrain: tr.jsonl\ntest: te.jsonl\nlabels: [a, b, c]\n"
                                     "template: '{text} ->'\n")
    task = load_task(str(tmp_path / "t.yaml"))
    report = evaluate_task_by_prompting(model, tok, task, k=2, seed=1, progress=False, max_examples=4)
    assert report["n"] == 4 and report["k"] == 2 and report["task"] == "t" and not report["chat"]
    pred = classify_by_prompting(model, tok, ["t0", "t1", "t2", "t3"], ["a", "b", "c"], template="{text} ->",
                                 pool=POOL, k=2, seed=1, progress=False)
    assert [sum(row[j] for row in report["confusion"]) for j in range(3)] == [pred.count(j) for j in range(3)]
