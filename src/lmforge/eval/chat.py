"""Chat evaluation on held-out conversations.

Two views of the same conversations:

- **assistant-token loss**: the conversation rendered with the model's chat template and scored
  with the loss only on the assistant turns' tokens (the SFT objective's tokenization,
  :func:`lmforge.data.encoding.tokenize_example`), summed over all conversations:
  ``loss`` (nats per assistant token) and ``perplexity``;
- **replies**: each conversation is cut before its last assistant turn and the model replies to
  it (the inference engine, greedy by default, stopping at the end-of-turn token); reported are
  the reply length in tokens (mean, median; the human replies' beside it), distinct-1/2 over all
  replies (the share of unique n-grams: low values mean repetitive, generic replies), the share
  of replies identical to the reply to another conversation (``identical_replies``: a model that
  answers everything with one question scores near 1), the share that ended with the
  end-of-turn token (``ended_with_eot``: the rest ran into the token budget, a model that does
  not know how to stop), and ROUGE-L / BLEU against the human reply when the metric libraries
  are installed.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import DataError
from .generation import distinct_n


@torch.inference_mode()
def assistant_loss(
    model: Any, tokenizer: Any, template: Any, conversations: Sequence[dict[str, Any]], *,
    batch_size: int = 4, progress: bool = True,
) -> dict[str, Any]:
    """Summed next-token loss over the assistant tokens of ``conversations`` (longer than the
    context: the end is cut, counted in ``truncated``)."""
    from ..data.encoding import tokenize_example

    context = int(model.config.context_length)
    items, truncated = [], 0
    for conv in conversations:
        ids, labels = tokenize_example(conv, tokenizer, template, assistant_only=True)
        if len(ids) > context + 1:
            ids, labels = ids[: context + 1], labels[: context + 1]
            truncated += 1
        if any(t != -100 for t in labels[1:]):
            items.append((ids, labels))
    if not items:
        raise DataError("no conversation has an assistant token to score")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    order = sorted(range(len(items)), key=lambda i: len(items[i][0]))
    try:
        for s in tqdm(range(0, len(order), batch_size), desc="assistant loss", disable=not progress, leave=False):
            batch = [items[i] for i in order[s : s + batch_size]]
            T = max(len(ids) for ids, _ in batch) - 1
            x = torch.zeros(len(batch), T, dtype=torch.long)
            y = torch.full((len(batch), T), -100, dtype=torch.long)  # as the SFT objective's batches
            for r, (ids, labels) in enumerate(batch):
                x[r, : len(ids) - 1] = torch.tensor(ids[:-1])
                y[r, : len(ids) - 1] = torch.tensor(labels[1:])
            n = int((y != -100).sum())
            nll += float(model.loss_from_hidden(model.hidden_states(x.to(device)), y.to(device))) * n
            count += n
    finally:
        model.train(was_training)
    loss = nll / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "assistant_tokens": count,
            "conversations": len(items), "truncated": truncated}


def chat_replies(
    engine: Any, template: Any, conversations: Sequence[dict[str, Any]], *, max_tokens: int = 64,
    temperature: float = 0.0, seed: int = 0, progress: bool = True,
) -> list[dict[str, Any]]:
    """The model's reply to each conversation cut before its last assistant turn (a conversation
    longer than the context keeps its end; the reply budget is at most half the context):
    ``{"messages", "reference", "reply", "reply_tokens", "reference_tokens", "finish_reason"}``."""
    from ..infer.chat import end_of_turn_ids
    from ..infer.sampling import SamplingParams

    max_tokens = max(1, min(max_tokens, engine.max_seq_len // 2))  # a small context keeps half for the prompt
    params = SamplingParams(
        max_tokens=max_tokens, temperature=temperature, seed=seed, stop_token_ids=end_of_turn_ids(engine.tokenizer)
    ).validate(engine.vocab_size)
    prompts, kept = [], []
    limit = engine.max_seq_len - max_tokens
    for conv in conversations:
        messages = conv["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        context = messages[:last]
        ids = engine.encode_prompt(template.render(context, add_generation_prompt=True))
        if len(ids) > limit:  # keep the end of a conversation longer than the context
            ids = ids[-limit:]
        prompts.append(ids)
        kept.append((context, messages[last]["content"]))
    done = engine.generate(prompts, params, progress=progress)
    out = []
    for (context, reference), c in zip(kept, done):
        out.append({
            "messages": context,
            "reference": reference,
            "reply": c.text.strip(),
            "reply_tokens": len(c.token_ids),
            "reference_tokens": len(engine.tokenizer.encode(reference)),
            "finish_reason": c.finish_reason,
        })
    return out


def identical_reply_share(replies: Sequence[str]) -> float:
    """The share of replies equal (whitespace and case aside) to the reply to another prompt."""
    keys = [" ".join(r.split()).casefold() for r in replies]
    counts = Counter(keys)
    return sum(counts[k] > 1 for k in keys) / len(keys) if keys else 0.0


def reply_metrics(replies: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Length, diversity and endings of generated replies, beside the human ones."""
    if not replies:
        raise DataError("no replies to measure")
    gen = [r["reply"] for r in replies]
    ref = [r["reference"] for r in replies]
    lengths = [r["reply_tokens"] for r in replies]
    ref_lengths = [r["reference_tokens"] for r in replies]
    return {
        "replies": len(replies),
        "reply_tokens_mean": statistics.fmean(lengths),
        "reply_tokens_median": statistics.median(lengths),
        "reference_tokens_mean": statistics.fmean(ref_lengths),
        "distinct_1": distinct_n(gen, 1),
        "distinct_2": distinct_n(gen, 2),
        "reference_distinct_1": distinct_n(ref, 1),
        "reference_distinct_2": distinct_n(ref, 2),
        "identical_replies": identical_reply_share(gen),
        "ended_with_eot": sum(r["finish_reason"] == "stop" for r in replies) / len(replies),
        "cut_at_max_tokens": sum(r["finish_reason"] == "length" for r in replies) / len(replies),
    }


def reference_metrics(replies: Sequence[dict[str, Any]]) -> dict[str, float]:
    """ROUGE-L and BLEU of the replies against the human ones (empty without the libraries)."""
    from ..errors import ConfigError
    from .generation import generation_metrics

    try:
        scores, _ = generation_metrics([r["reply"] for r in replies], [[r["reference"]] for r in replies],
                                       metrics=("rougeL", "bleu"))
    except ConfigError:  # rouge-score / sacrebleu not installed
        return {}
    return scores
