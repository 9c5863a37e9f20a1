"""Generation tasks: the model answers each prompt, and the answers are scored against references.

**Metrics** (every example may have several references; a per-example score is its best
reference's, as in SQuAD's script):

- ``exact_match``: the prediction equals a reference after SQuAD's normalization (lowercase,
  punctuation and the articles a/an/the removed, whitespace collapsed).
- ``f1``: SQuAD's token F1 between the normalized prediction and reference (bags of tokens).
- ``rougeL``: ROUGE-L F-measure from Google's ``rouge-score`` package (its tokenizer keeps
  lowercase ASCII letters and digits only, so text in other scripts scores 0).
- ``bleu``: corpus BLEU from ``sacrebleu`` (13a tokenization, every reference of every example
  used at once; examples with fewer references pad with empty ones, which sacrebleu ignores).
- ``distinct_1`` / ``distinct_2``: distinct n-grams over all n-grams of all predictions
  (whitespace tokens; Li et al., 2016), a measure of diversity that needs no reference.

``exact_match``, ``f1``, ``rougeL`` and ``bleu`` are on a 0-100 scale (as SQuAD's script and
sacrebleu report them); ``distinct_n`` is a ratio in [0, 1].

:func:`evaluate_generation` generates with the one inference engine
(:class:`~lmforge.infer.engine.InferenceEngine`, batched by its ``max_batch_size``), greedy by
default, and returns the metrics and one record per example.
"""

from __future__ import annotations

import dataclasses
import re
import string
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError

METRICS: tuple[str, ...] = ("exact_match", "f1", "rougeL", "bleu", "distinct")
INSTALL_HINT = "pip install 'lmforge[eval]'"

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


# ----------------------------------------------------------------------------- references
def references_of(example: dict[str, Any], where: str = "example") -> list[str]:
    """The reference texts of an example: ``references`` (a list or a text), else ``answers``
    or ``answer`` (a text, a list of texts, or SQuAD's ``{"text": [...]}``)."""
    for key in ("references", "answers", "answer", "reference", "target"):
        if key in example:
            refs = example[key]
            break
    else:
        raise DataError(f"{where} has no references (give 'references': [text, ...] or 'answer': text)")
    if isinstance(refs, dict) and "text" in refs:
        refs = refs["text"]
    if isinstance(refs, str):
        refs = [refs]
    if not isinstance(refs, (list, tuple)) or not refs or not all(isinstance(r, str) for r in refs):
        raise DataError(f"{where}: {key!r} must be a text or a non-empty list of texts")
    return list(refs)


def _check_refs(references: Sequence[Sequence[str]], n: int) -> list[list[str]]:
    if len(references) != n:
        raise ConfigError(f"{n} predictions but {len(references)} reference lists")
    out = []
    for i, refs in enumerate(references):
        refs = [refs] if isinstance(refs, str) else list(refs)
        if not refs:
            raise DataError(f"example {i} has no references")
        out.append(refs)
    return out


# ----------------------------------------------------------------------------- SQuAD metrics
def normalize_answer(text: str) -> str:
    """SQuAD's normalization: lowercase, punctuation removed, articles removed, whitespace collapsed."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, references: Sequence[str] | str) -> float:
    """1.0 if the normalized prediction equals a normalized reference, else 0.0."""
    refs = [references] if isinstance(references, str) else references
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(r) for r in refs))


def _f1(pred_tokens: list[str], ref_tokens: list[str]) -> float:
    if not pred_tokens or not ref_tokens:  # SQuAD: both empty count as a match
        return float(pred_tokens == ref_tokens)
    common = sum((Counter(pred_tokens) & Counter(ref_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_tokens), common / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, references: Sequence[str] | str) -> float:
    """SQuAD's token F1 in [0, 1], the best over the references."""
    refs = [references] if isinstance(references, str) else references
    pred = normalize_answer(prediction).split()
    return max(_f1(pred, normalize_answer(r).split()) for r in refs)


# ----------------------------------------------------------------------------- library metrics
def _rouge_scorer(use_stemmer: bool = False) -> Any:
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise ConfigError(f"ROUGE needs the rouge-score package: {INSTALL_HINT}") from None
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)


def rouge_l(prediction: str, references: Sequence[str] | str, *, use_stemmer: bool = False, scorer: Any = None) -> float:
    """ROUGE-L F-measure in [0, 1] (``rouge-score``), the best over the references."""
    refs = [references] if isinstance(references, str) else references
    scorer = scorer or _rouge_scorer(use_stemmer)
    return max(scorer.score(r, prediction)["rougeL"].fmeasure for r in refs)


def corpus_bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """sacrebleu's corpus BLEU (0-100, default 13a tokenization) with every reference of every
    example; an example with fewer references than the most is padded with ``None``."""
    try:
        import sacrebleu
    except ImportError:
        raise ConfigError(f"BLEU needs the sacrebleu package: {INSTALL_HINT}") from None
    refs = _check_refs(references, len(predictions))
    if not predictions:
        return 0.0
    width = max(len(r) for r in refs)
    streams = [[r[j] if j < len(r) else None for r in refs] for j in range(width)]
    return float(sacrebleu.corpus_bleu(list(predictions), streams).score)


def distinct_n(predictions: Iterable[str], n: int) -> float:
    """Distinct n-grams / all n-grams over every prediction (whitespace tokens); 0.0 when the
    predictions hold no n-gram."""
    if n < 1:
        raise ConfigError(f"distinct-n needs n >= 1, got {n}")
    grams: Counter[tuple[str, ...]] = Counter()
    for p in predictions:
        toks = p.split()
        grams.update(tuple(toks[i : i + n]) for i in range(len(toks) - n + 1))
    total = sum(grams.values())
    return len(grams) / total if total else 0.0


def generation_metrics(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    *,
    metrics: Sequence[str] = METRICS,
    use_stemmer: bool = False,
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """``(corpus metrics, per-example scores)`` of predictions against references.
    ``metrics``: any of ``exact_match``, ``f1``, ``rougeL``, ``bleu``, ``distinct``."""
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise ConfigError(f"unknown generation metric(s) {unknown}; choose from {list(METRICS)}")
    refs = _check_refs(references, len(predictions))
    preds = [p.strip() for p in predictions]
    per: list[dict[str, float]] = [{} for _ in preds]
    scorer = _rouge_scorer(use_stemmer) if "rougeL" in metrics else None
    for i, (p, r) in enumerate(zip(preds, refs)):
        if "exact_match" in metrics:
            per[i]["exact_match"] = exact_match(p, r)
        if "f1" in metrics:
            per[i]["f1"] = token_f1(p, r)
        if scorer is not None:
            per[i]["rougeL"] = rouge_l(p, r, scorer=scorer)
    out: dict[str, float] = {}
    n = len(preds)
    for key in ("exact_match", "f1", "rougeL"):
        if key in metrics:
            out[key] = 100.0 * sum(s[key] for s in per) / n if n else 0.0
    if "bleu" in metrics:
        out["bleu"] = corpus_bleu(preds, refs)
    if "distinct" in metrics:
        out["distinct_1"] = distinct_n(preds, 1)
        out["distinct_2"] = distinct_n(preds, 2)
    return out, per


# ----------------------------------------------------------------------------- generation
def _prompt_of(example: dict[str, Any], i: int) -> str | list[dict[str, Any]]:
    where = f"example {i}"
    if not isinstance(example, dict):
        raise DataError(f"{where} is a {type(example).__name__}, not an object")
    prompt = example.get("prompt", example.get("messages"))
    if isinstance(prompt, str) and prompt.strip():
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        if prompt[-1].get("role") != "user":
            raise DataError(f"{where}: the conversation must end with a user turn (the model answers it)")
        return prompt
    raise DataError(f"{where} needs a non-empty 'prompt' text or a 'messages' conversation ending with a user turn")


def evaluate_generation(
    engine: Any,
    examples: Sequence[dict[str, Any]],
    *,
    max_tokens: int = 128,
    chat: bool | None = None,
    chat_template: Any = None,
    params: Any = None,
    stop: Sequence[str] = (),
    metrics: Sequence[str] = METRICS,
    use_stemmer: bool = False,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate an answer to every example and score the answers.

    ``engine``: an :class:`~lmforge.infer.engine.InferenceEngine` (it batches up to its
    ``max_batch_size``), or a checkpoint path, loaded with ``max_batch_size=batch_size``.
    ``examples``: dicts with ``prompt`` (a text, or a conversation ending with a user turn) or
    ``messages``, and ``references`` (a text or a list) or ``answer``/``answers``.
    ``chat``: wrap the prompts in the model's chat template (``chat_template``, a
    :class:`~lmforge.tokenizer.chat.ChatTemplate`, else the checkpoint's) and stop at its
    end-of-turn tokens; ``None`` does so when some prompt is a conversation. Conversations always
    go through the template. ``params``: :class:`~lmforge.infer.sampling.SamplingParams`
    (default greedy with ``max_tokens`` and ``stop``); a seeded one gives example ``i`` seed
    ``seed + i``, so results do not depend on batching.

    Returns ``{"metrics": {...}, "predictions": [{"index", "prompt", "prediction",
    "references", "finish_reason", "completion_tokens", <per-example scores>}, ...], "n",
    "chat", "max_tokens", "temperature", "seconds", "generated_tokens"}``; ``predictions``
    are ready to write as JSONL.
    """
    from ..infer.sampling import seeded
    from ..infer.engine import InferenceEngine, load_engine
    from ..infer.sampling import SamplingParams

    if not isinstance(engine, InferenceEngine):
        if not isinstance(engine, (str, Path)):
            raise ConfigError(f"engine must be an InferenceEngine or a checkpoint path, got {type(engine).__name__}")
        engine = load_engine(str(engine), max_batch_size=batch_size)
    if not examples:
        raise DataError("no examples to evaluate (the list is empty)")
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise ConfigError(f"unknown generation metric(s) {unknown}; choose from {list(METRICS)}")
    prompts = [_prompt_of(e, i) for i, e in enumerate(examples)]
    references = [references_of(e, f"example {i}") for i, e in enumerate(examples)]
    if params is None:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=list(stop))
    elif stop:
        params = dataclasses.replace(params, stop=list(params.stop) + list(stop))
    params = params.validate(engine.vocab_size)

    use_chat = any(isinstance(p, list) for p in prompts) if chat is None else chat
    texts: list[str] = []
    if use_chat or any(isinstance(p, list) for p in prompts):
        from ..infer.chat import end_of_turn_ids
        from ..tokenizer.chat import ChatTemplate

        if chat_template is None:
            if getattr(engine, "checkpoint", None) is None:
                raise ConfigError("chat prompts need a chat_template (this engine was not loaded from a checkpoint)")
            chat_template = ChatTemplate.from_checkpoint(engine.checkpoint)
        params = dataclasses.replace(
            params, stop_token_ids=sorted(set(params.stop_token_ids) | set(end_of_turn_ids(engine.tokenizer)))
        )
    for p in prompts:
        if isinstance(p, list):
            texts.append(chat_template.render(p, add_generation_prompt=True))
        elif use_chat:
            texts.append(chat_template.render([{"role": "user", "content": p}], add_generation_prompt=True))
        else:
            texts.append(p)

    start = time.perf_counter()
    completions = engine.generate(texts, seeded(params, len(texts)), progress=progress)
    seconds = time.perf_counter() - start
    preds = [c.text for c in completions]
    corpus, per = generation_metrics(preds, references, metrics=metrics, use_stemmer=use_stemmer)
    records = []
    for i, (prompt, c, refs, scores) in enumerate(zip(prompts, completions, references, per)):
        records.append({
            "index": i, "prompt": prompt, "prediction": c.text, "references": refs,
            "finish_reason": c.finish_reason, "completion_tokens": len(c.token_ids), **scores,
        })
    return {
        "metrics": corpus,
        "predictions": records,
        "n": len(records),
        "chat": bool(use_chat or any(isinstance(p, list) for p in prompts)),
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "seconds": round(seconds, 3),
        "generated_tokens": sum(len(c.token_ids) for c in completions),
    }
