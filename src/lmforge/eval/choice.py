"""Multiple-choice scoring by log-likelihood, in the manner of lm-evaluation-harness.

Each example is a query (a text, or a conversation ending with a user turn) and its choices; the
prompt is the query (in the task's template, after ``k`` solved examples), and each choice is
scored by the summed log-probability of its tokens as the prompt's continuation
(:func:`lmforge.eval.prompting.prompt_scores`: the prompt runs once, the choices over its cached
keys and values; the token boundary follows lm-eval's ``_encode_pair``). Two accuracies, as lm-eval
reports them:

- ``acc``: the choice with the highest summed log-likelihood;
- ``acc_norm``: the highest log-likelihood divided by the choice's length in characters (lm-eval's
  length normalization; it removes the bias towards short choices).

**Prompts.** Without a chat template a conversation becomes a transcript (``User: ...`` /
``Assistant: ...`` lines ending with ``Assistant:``) and a choice is the continuation ``" " +
choice``. With one, the conversation is rendered with the assistant header and the continuation
is the bare choice. A solved example is its prompt followed by the right choice (plain: joined by
blank lines; chat: earlier user/assistant turns). Shots are drawn once per run, seeded, from the
task's train split, never one of the queries being scored.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import ConfigError, DataError
from .prompting import prompt_scores

_ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}


def render_transcript(messages: Sequence[dict[str, str]]) -> str:
    """A conversation as plain text for a model without a chat template: one ``Role: text``
    line per turn, then ``Assistant:`` (the reply is the continuation)."""
    lines = [f"{_ROLE_NAMES.get(m['role'], m['role'].title())}: {m['content'].strip()}" for m in messages]
    return "\n".join(lines + ["Assistant:"])


def _key(query: Any) -> str:
    return query if isinstance(query, str) else json.dumps(query, sort_keys=True)


def draw_shots(pool: Sequence[dict[str, Any]], k: int, seed: int, exclude: Sequence[Any] = ()) -> list[dict[str, Any]]:
    """``k`` solved examples from ``pool`` (seeded; none whose query is in ``exclude``)."""
    if k < 0:
        raise ConfigError(f"the number of few-shot examples must be 0 or more, got {k}")
    if k == 0:
        return []
    excluded = {_key(q) for q in exclude}
    usable = [e for e in pool if _key(e["query"]) not in excluded]
    if k > len(usable):
        raise ConfigError(
            f"{k} few-shot examples asked for, but the pool holds only {len(usable)} "
            f"(of {len(pool)}, after leaving out the queries being scored)"
        )
    return random.Random(seed).sample(usable, k)


def build_choice_prompts(
    examples: Sequence[dict[str, Any]],
    *,
    template: str | None = None,
    shots: Sequence[dict[str, Any]] = (),
    chat_template: Any = None,
) -> tuple[list[str], list[list[str]]]:
    """``(prompts, continuations)``: one prompt per example and its choices as continuations."""

    def text_of(query: Any) -> str:
        if isinstance(query, str):
            return template.replace("{query}", query) if template else query
        return render_transcript(query)

    def turns_of(query: Any) -> list[dict[str, str]]:
        if isinstance(query, str):
            return [{"role": "user", "content": text_of(query)}]
        return [dict(m) for m in query]

    if chat_template is None:
        prefix = "".join(text_of(s["query"]) + " " + s["choices"][s["answer"]] + "\n\n" for s in shots)
        prompts = [prefix + text_of(e["query"]) for e in examples]
        return prompts, [[" " + c for c in e["choices"]] for e in examples]
    history: list[dict[str, str]] = []
    for s in shots:
        turns = turns_of(s["query"])
        if history and turns[0]["role"] == "system":
            turns = turns[1:]  # one system prompt: the first shot's
        history += turns + [{"role": "assistant", "content": s["choices"][s["answer"]]}]
    prompts = []
    for e in examples:
        turns = turns_of(e["query"])
        system = [turns.pop(0)] if turns[0]["role"] == "system" and history else []
        prompts.append(chat_template.render(system + history + turns, add_generation_prompt=True))
    return prompts, [list(e["choices"]) for e in examples]


def multiple_choice_scores(
    model: Any,
    tokenizer: Any,
    examples: Sequence[dict[str, Any]],
    *,
    template: str | None = None,
    shots: Sequence[dict[str, Any]] = (),
    chat_template: Any = None,
    batch_size: int = 8,
    progress: bool = True,
) -> tuple[list[np.ndarray], list[str]]:
    """Per example, the summed log-likelihood of each of its choices; and the prompts."""
    prompts, conts = build_choice_prompts(examples, template=template, shots=shots, chat_template=chat_template)
    scores = prompt_scores(model, tokenizer, prompts, conts, batch_size=batch_size, progress=progress)
    return [scores[i, : len(e["choices"])] for i, e in enumerate(examples)], prompts


def choice_metrics(examples: Sequence[dict[str, Any]], scores: Sequence[np.ndarray]) -> dict[str, Any]:
    """``acc`` and ``acc_norm`` (character-length normalized) with the per-example predictions."""
    if not examples:
        raise DataError("no multiple-choice examples to score")
    pred = [int(np.argmax(s)) for s in scores]
    pred_norm = [int(np.argmax(s / np.array([len(c) for c in e["choices"]]))) for e, s in zip(examples, scores)]
    gold = [e["answer"] for e in examples]
    n = len(examples)
    chance = float(np.mean([1.0 / len(e["choices"]) for e in examples]))
    return {
        "n": n,
        "acc": sum(p == g for p, g in zip(pred, gold)) / n,
        "acc_norm": sum(p == g for p, g in zip(pred_norm, gold)) / n,
        "chance": chance,
        "pred": pred,
        "pred_norm": pred_norm,
    }
