"""Zero- and few-shot classification by prompting, in the manner of lm-evaluation-harness.

Each text becomes a prompt from a task template (``{text}`` is replaced by the text, ``{labels}``
by the verbalizers joined with ", "), preceded by ``k`` solved examples, and each label is scored
by the log-likelihood of its verbalizer as the continuation of the prompt; the prediction is the
best-scoring label (optionally with the score divided by the continuation's token count).

**Token boundary** (lm-eval's ``_encode_pair``): trailing spaces and tabs of the context move to
the front of the continuation (``"Answer: " + "yes"`` is scored as ``"Answer:" + " yes"``, the
way a BPE tokenizer splits the whole string); the context is encoded alone, the whole string
is encoded, and the continuation's tokens are the whole string's tokens after the context's
token count. The model is then fed ``context tokens + continuation tokens``. Newlines are not
moved (they end a chat template's assistant header, which belongs to the context). An empty
context is replaced by the end-of-text token. A pair longer than the model's context loses
context tokens from the left.

**Prompts.** Plain prompts: the solved examples (the template filled in, then ``" " +
verbalizer``) and the query joined by blank lines; the continuation is ``" " + verbalizer``.
With a chat template, each solved example is a user turn (the filled template) and an assistant
turn (the verbalizer), the query is the last user turn, the prompt is rendered with the
assistant header, and the continuation is the bare verbalizer. The same ``k`` examples precede
every text (HELM's convention; lm-eval draws them per text): they are chosen once by
:func:`few_shot_examples`, seeded and label-balanced, never one of the texts being classified.

**Speed.** :func:`prompt_scores` runs each prompt once, not once per label: the token prefix
shared by all prompts (instructions, chat header, the solved examples) is run once and copied
into a KV cache row per text, each batch of texts is prefilled after it, and the labels'
continuations are then run one label at a time over the batch's cached rows (the first
continuation token is scored from the prompt's last logits, so a one-token label costs no
forward at all). :func:`score_continuations` is the plain reference: one full forward per
(context, continuation) pair, right-padded batches.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError, DataError

_MOVABLE_SPACE = " \t"


# ----------------------------------------------------------------------------- prompts
def render_template(template: str, text: str, verbalizers: Sequence[str] = ()) -> str:
    """``template`` with ``{text}`` replaced by ``text`` and ``{labels}`` by the verbalizers."""
    if "{text}" not in template:
        raise ConfigError(f"the prompt template must contain {{text}}, got {template!r}")
    return template.replace("{labels}", ", ".join(verbalizers)).replace("{text}", text)


def few_shot_examples(
    pool: Any, k: int, seed: int, exclude: Iterable[str] = ()
) -> list[dict[str, Any]]:
    """``k`` solved examples (``{"text", "label"}`` dicts) from ``pool`` (a list of them or an
    ExampleSet), seeded and label-balanced: labels take turns in a seeded order, so no label
    has more than one example more than another while every label has some left. Examples
    whose text is in ``exclude`` are never chosen. The same pool, ``k`` and ``seed`` give the
    same examples in the same order."""
    if k < 0:
        raise ConfigError(f"the number of few-shot examples must be 0 or more, got {k}")
    if k == 0:
        return []
    examples = getattr(pool, "examples", pool)
    if not examples:
        raise ConfigError(f"{k}-shot prompting needs a pool of solved examples; none was given")
    excluded = set(exclude)
    by_label: dict[str, list[dict[str, Any]]] = {}
    for e in examples:
        if e["text"] not in excluded:
            by_label.setdefault(str(e["label"]), []).append(e)
    available = sum(len(v) for v in by_label.values())
    if k > available:
        raise ConfigError(
            f"{k} few-shot examples asked for, but the pool holds only {available} "
            f"(of {len(examples)}, after leaving out the texts being classified)"
        )
    rng = random.Random(seed)
    order = sorted(by_label)
    rng.shuffle(order)
    for label in order:
        rng.shuffle(by_label[label])
    chosen: list[dict[str, Any]] = []
    depth = 0
    while len(chosen) < k:
        for label in order:
            if depth < len(by_label[label]) and len(chosen) < k:
                chosen.append(by_label[label][depth])
        depth += 1
    rng.shuffle(chosen)
    return chosen


def build_prompts(
    texts: Sequence[str],
    verbalizers: Sequence[str],
    *,
    template: str,
    shots: Sequence[tuple[str, str]] = (),
    chat_template: Any = None,
) -> tuple[list[str], list[str]]:
    """``(prompts, continuations)``: one prompt per text and one continuation per label.
    ``shots``: solved examples as ``(text, verbalizer)``."""
    if chat_template is None:
        prefix = "".join(render_template(template, t, verbalizers) + " " + v + "\n\n" for t, v in shots)
        prompts = [prefix + render_template(template, t, verbalizers) for t in texts]
        return prompts, [" " + v for v in verbalizers]
    history: list[dict[str, str]] = []
    for t, v in shots:
        history += [
            {"role": "user", "content": render_template(template, t, verbalizers)},
            {"role": "assistant", "content": v},
        ]
    prompts = [
        chat_template.render(history + [{"role": "user", "content": render_template(template, t, verbalizers)}])
        for t in texts
    ]
    return prompts, list(verbalizers)


# ----------------------------------------------------------------------------- scoring
def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation token ids at lm-eval's boundary (see the module docstring)."""
    if not continuation:
        raise ConfigError("an empty continuation has no tokens to score")
    n = len(context) - len(context.rstrip(_MOVABLE_SPACE))
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    ctx = tokenizer.encode(context) if context else []
    whole = tokenizer.encode(context + continuation)
    cont = whole[len(ctx) :]
    if not cont:  # the continuation merged into the context's last token: score it on its own
        cont = tokenizer.encode(continuation)
    if not ctx:
        ctx = [tokenizer.eot_id]
    return ctx, cont


def _fit(ctx: list[int], cont_len: int, max_len: int) -> list[int]:
    """The context cut from the left so that context + continuation fit ``max_len`` positions."""
    if cont_len >= max_len:
        raise DataError(f"a continuation of {cont_len} tokens leaves no room for context in {max_len} positions")
    return ctx[-(max_len - cont_len) :] if len(ctx) + cont_len > max_len else ctx


def _context_length(model: Any) -> int:
    cfg = getattr(model, "config", None)
    return int(getattr(cfg, "context_length", 1 << 30))


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _logits_at(model: Any, idx: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Log-probabilities (N, vocab) at positions ``(rows, cols)`` of a forward over ``idx``;
    only those positions go through the output head when the model allows it."""
    if hasattr(model, "hidden_states") and hasattr(model, "logits"):
        h = model.hidden_states(idx)
        logits = model.logits(h[rows, cols])
    else:
        logits = model(idx)[rows, cols]
    return F.log_softmax(logits.float(), dim=-1)


class _Mode:
    """Eval mode and no autograd for the duration; the model's training flag is restored."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.was_training = self.model.training
        self.model.eval()
        self.inference = torch.inference_mode()
        self.inference.__enter__()

    def __exit__(self, *exc: object) -> None:
        self.inference.__exit__(*exc)
        self.model.train(self.was_training)


def score_continuations(
    model: Any, tokenizer: Any, contexts: Sequence[str], continuations: Sequence[str], *, batch_size: int = 16
) -> list[float]:
    """The summed log-probability (natural log) of each continuation's tokens given its context,
    one full forward per pair (right-padded batches, longest first)."""
    if len(contexts) != len(continuations):
        raise ConfigError(f"{len(contexts)} contexts but {len(continuations)} continuations")
    max_len = _context_length(model) + 1  # the last continuation token is a target, never an input
    pairs = []
    for c, x in zip(contexts, continuations):
        ctx, cont = encode_pair(tokenizer, c, x)
        pairs.append((_fit(ctx, len(cont), max_len), cont))
    return score_token_pairs(model, pairs, batch_size=batch_size)


def score_token_pairs(
    model: Any, pairs: Sequence[tuple[list[int], list[int]]], *, batch_size: int = 16, with_greedy: bool = False
) -> list[Any]:
    """:func:`score_continuations` on token ids: ``(context ids, continuation ids)`` pairs that
    fit the model (context + continuation - 1 positions). ``with_greedy``: ``(score, is_greedy)``
    pairs instead, ``is_greedy`` telling whether every continuation token is the argmax of its
    position (lm-eval's ``loglikelihood`` answer)."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    scores = [0.0] * len(pairs)
    device = _device(model)
    with _Mode(model):
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            seqs = [list(pairs[i][0]) + list(pairs[i][1]) for i in batch]
            T = max(len(s) for s in seqs) - 1
            idx = torch.zeros(len(batch), T, dtype=torch.long)
            rows, cols, targets = [], [], []
            for r, (i, s) in enumerate(zip(batch, seqs)):
                idx[r, : len(s) - 1] = torch.tensor(s[:-1])
                n_ctx, n_cont = len(pairs[i][0]), len(pairs[i][1])
                for t in range(n_cont):  # position n_ctx - 1 + t predicts continuation token t
                    rows.append(r)
                    cols.append(n_ctx - 1 + t)
                    targets.append(pairs[i][1][t])
            logp = _logits_at(model, idx.to(device), torch.tensor(rows), torch.tensor(cols))
            tgt = torch.tensor(targets, device=logp.device)
            picked = logp[torch.arange(len(targets)), tgt].double().cpu()
            hits = (logp.argmax(dim=-1) == tgt).cpu() if with_greedy else None
            at = 0
            for i in batch:
                n_cont = len(pairs[i][1])
                scores[i] = float(picked[at : at + n_cont].sum())
                if hits is not None:
                    scores[i] = (scores[i], bool(hits[at : at + n_cont].all()))
                at += n_cont
    return scores


def _common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for s in seqs[1:]:
        i = 0
        while i < n and s[i] == first[i]:
            i += 1
        n = i
    return n


def prompt_scores(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    continuations: Sequence[str] | Sequence[Sequence[str]],
    *,
    batch_size: int = 16,
    length_normalize: bool = False,
    use_cache: bool = True,
    progress: bool = False,
) -> np.ndarray:
    """``(len(prompts), L)`` log-likelihoods of every continuation after every prompt (divided
    by its token count with ``length_normalize``). ``continuations``: the same ``L`` texts for
    every prompt (labels), or one list per prompt (multiple-choice options; ``L`` is the longest
    list, and the missing places of shorter ones score ``-inf``). With ``use_cache`` (and a
    model with ``forward_cached``) each prompt runs once and the shared prompt prefix once in
    all (module docstring); otherwise every pair runs through :func:`score_token_pairs`. A
    prompt too long for the model loses tokens from its left, as many for every continuation
    (enough for the longest), so both ways give the same scores."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    per_prompt = bool(continuations) and not isinstance(continuations[0], str)
    if per_prompt and len(continuations) != len(prompts):
        raise ConfigError(f"{len(continuations)} continuation lists for {len(prompts)} prompts")
    options = [list(c) for c in continuations] if per_prompt else [list(continuations)] * len(prompts)
    if per_prompt and not all(options):
        raise ConfigError("every prompt needs at least one continuation")
    if not prompts or not continuations:
        return np.zeros((len(prompts), len(continuations)))
    P, L = len(prompts), max(len(o) for o in options)
    counts = [len(o) for o in options]
    max_len = _context_length(model)
    ctxs: list[list[int]] = []
    conts: list[list[list[int]]] = []
    for p, opts in zip(prompts, options):
        pairs = [encode_pair(tokenizer, p, c) for c in opts]
        pairs += [pairs[0]] * (L - len(pairs))  # shorter option lists: filler, scored -inf below
        longest = max(len(c) for _, c in pairs)
        # one context for all labels (the context's encoding does not depend on the continuation),
        # cut for the longest; the last continuation token is never fed, hence max_len + 1
        ctxs.append(_fit(pairs[0][0], longest, max_len + 1))
        conts.append([c for _, c in pairs])
    if not use_cache or not hasattr(model, "forward_cached"):
        flat = score_token_pairs(
            model, [(ctxs[i], conts[i][j]) for i in range(P) for j in range(L)], batch_size=batch_size
        )
        scores = np.asarray(flat, dtype=np.float64).reshape(P, L)
        if length_normalize:
            scores = scores / np.array([[len(c) for c in row] for row in conts])
        return _mask_missing(scores, counts)

    from ..model.cache import KVCache

    shared = min(_common_prefix(ctxs), min(len(c) for c in ctxs) - 1)

    cfg = model.config
    device = _device(model)
    cache_dtype = torch.float32 if device.type == "cpu" else next(model.parameters()).dtype
    scores = np.zeros((P, L), dtype=np.float64)
    from tqdm import tqdm

    with _Mode(model):
        prefix_k = prefix_v = None
        if shared > 0:
            pc = KVCache(cfg, 1, capacity=shared, dtype=cache_dtype, device=device)
            model.forward_cached(torch.tensor([ctxs[0][:shared]], device=device), pc.rows(0, 1))
            prefix_k, prefix_v = pc.k[:, :, :, :shared], pc.v[:, :, :, :shared]
        order = sorted(range(P), key=lambda i: -len(ctxs[i]))  # similar lengths batch together
        starts = range(0, P, batch_size)
        for start in tqdm(starts, desc="scoring", unit=" batches", disable=not progress, dynamic_ncols=True):
            batch = order[start : start + batch_size]
            b = len(batch)
            cache = KVCache(cfg, b, capacity=max(len(ctxs[i]) for i in batch) + 8, dtype=cache_dtype, device=device)
            if shared:
                cache.reserve(shared)
                cache.k[:, :, :, :shared] = prefix_k
                cache.v[:, :, :, :shared] = prefix_v
                cache.lengths = [shared] * b
            suffixes = [ctxs[i][shared:] for i in batch]
            T = max(len(s) for s in suffixes)
            idx = torch.zeros(b, T, dtype=torch.long)
            for r, s in enumerate(suffixes):
                idx[r, : len(s)] = torch.tensor(s)
            last = model.forward_cached(idx.to(device), cache.rows(0, b), [len(s) for s in suffixes], logits="last")
            last = F.log_softmax(last.float(), dim=-1)
            saved = list(cache.lengths)
            for j in range(L):
                cj = [conts[i][j] for i in batch]
                first = last[torch.arange(b), torch.tensor([c[0] for c in cj], device=last.device)].double().cpu()
                total = first.numpy().copy()
                if any(len(c) > 1 for c in cj):
                    feed = [c[:-1] if len(c) > 1 else c[:1] for c in cj]  # one-token rows feed a dummy
                    # every row of a batch gets the longest feed's positions: when that runs past
                    # the context for some row (per-prompt options of very different lengths),
                    # the rows go one at a time
                    fits = max(saved) + max(len(f) for f in feed) <= cache.max_len
                    for group in [range(b)] if fits else [range(r, r + 1) for r in range(b)]:
                        Tj = max(len(feed[r]) for r in group)
                        idx = torch.zeros(len(group), Tj, dtype=torch.long)
                        for g, r in enumerate(group):
                            idx[g, : len(feed[r])] = torch.tensor(feed[r])
                        out = model.forward_cached(idx.to(device), cache.rows(group[0], group[-1] + 1),
                                                   [len(feed[r]) for r in group], logits="all")
                        cache.lengths = list(saved)  # the next label overwrites these positions
                        logp = F.log_softmax(out.float(), dim=-1)
                        for g, r in enumerate(group):
                            if len(cj[r]) > 1:
                                tgt = torch.tensor(cj[r][1:], device=logp.device)
                                total[r] += float(logp[g, torch.arange(len(cj[r]) - 1), tgt].double().sum())
                for r, i in enumerate(batch):
                    scores[i, j] = total[r] / (len(cj[r]) if length_normalize else 1)
    return _mask_missing(scores, counts)


def _mask_missing(scores: np.ndarray, counts: list[int]) -> np.ndarray:
    for i, n in enumerate(counts):
        scores[i, n:] = -np.inf
    return scores


def classify_by_prompting(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    labels: Sequence[str],
    *,
    template: str,
    pool: Any = None,
    k: int = 0,
    seed: int = 0,
    chat_template: Any = None,
    batch_size: int = 16,
    length_normalize: bool = False,
    progress: bool = True,
    verbalizers: Sequence[str] | None = None,
    use_cache: bool = True,
) -> list[int]:
    """The predicted label index of every text: the label whose verbalizer (``verbalizers[i]``,
    else the label name) is the likeliest continuation of the text's prompt, after ``k`` solved
    examples from ``pool`` (``{"text", "label"}`` dicts whose labels are names in ``labels``),
    optionally inside ``chat_template`` (a :class:`~lmforge.tokenizer.chat.ChatTemplate`)."""
    scores, _ = classify_scores(
        model, tokenizer, texts, labels, template=template, pool=pool, k=k, seed=seed,
        chat_template=chat_template, batch_size=batch_size, length_normalize=length_normalize,
        progress=progress, verbalizers=verbalizers, use_cache=use_cache,
    )
    return [int(i) for i in scores.argmax(axis=1)] if len(texts) else []


def classify_scores(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    labels: Sequence[str],
    *,
    template: str,
    pool: Any = None,
    k: int = 0,
    seed: int = 0,
    chat_template: Any = None,
    batch_size: int = 16,
    length_normalize: bool = False,
    progress: bool = True,
    verbalizers: Sequence[str] | None = None,
    use_cache: bool = True,
) -> tuple[np.ndarray, list[str]]:
    """:func:`classify_by_prompting`'s ``(scores (texts, labels), prompts)``."""
    labels = [str(x) for x in labels]
    if not labels:
        raise ConfigError("prompted classification needs at least one label")
    verbalizers = list(verbalizers) if verbalizers is not None else labels
    if len(verbalizers) != len(labels):
        raise ConfigError(f"{len(verbalizers)} verbalizers for {len(labels)} labels")
    if any(not v.strip() for v in verbalizers):
        raise ConfigError("a label's verbalizer is empty")
    index = {label: i for i, label in enumerate(labels)}
    shots_ex = few_shot_examples(pool, k, seed, exclude=texts) if k else []
    shots = []
    for e in shots_ex:
        if str(e["label"]) not in index:
            raise ConfigError(f"few-shot example label {e['label']!r} is not one of the labels {labels}")
        shots.append((e["text"], verbalizers[index[str(e["label"])]]))
    prompts, continuations = build_prompts(texts, verbalizers, template=template, shots=shots, chat_template=chat_template)
    scores = prompt_scores(
        model, tokenizer, prompts, continuations, batch_size=batch_size, length_normalize=length_normalize,
        use_cache=use_cache, progress=progress,
    )
    return scores, prompts


def evaluate_task_by_prompting(
    model: Any,
    tokenizer: Any,
    task: Any,
    *,
    k: int = 0,
    seed: int = 0,
    chat_template: Any = None,
    batch_size: int = 16,
    length_normalize: bool = False,
    max_examples: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """A :class:`~lmforge.data.tasks.TaskSpec`'s test split classified by prompting (shots from
    its train split): :func:`lmforge.runs.metrics.classification_report` plus ``k``, ``seed``,
    ``seconds`` and ``chat`` (whether a chat template wrapped the prompts)."""
    import time

    from ..runs.metrics import classification_report

    test = task.test()
    examples = test.examples[:max_examples] if max_examples else test.examples
    pool = task.train() if k else None
    start = time.perf_counter()
    pred = classify_by_prompting(
        model, tokenizer, [e["text"] for e in examples], task.labels, pool=pool, k=k, seed=seed,
        chat_template=chat_template, batch_size=batch_size, length_normalize=length_normalize,
        progress=progress, **task.prompt_kwargs(),
    )
    seconds = time.perf_counter() - start
    index = {label: i for i, label in enumerate(task.labels)}
    report = classification_report([index[e["label"]] for e in examples], pred, task.labels)
    report.update({"task": task.name, "k": k, "seed": seed, "chat": chat_template is not None,
                   "seconds": round(seconds, 2)})
    return report
