"""Examples -> token ids: what training and evaluation both feed the model.

- :func:`tokenize_example`: one SFT example (a conversation through its chat template, or a
  prompt/completion pair) as token ids and labels (-100 where no loss). The fine-tuning objective
  trains on it and ``lmforge eval``'s chat loss scores the same tokens.
- :func:`chat_segments`: a conversation's tokens in pieces at the assistant turns' boundaries
  (also the SFT preview's view of them).
- :func:`encode_texts`: classification inputs put in their template, cut from the start to fit.
- :func:`pad_batch`: token rows right-padded into one ``(B, T)`` tensor with their lengths.

The conversation is rendered once and the assistant turns are located in the text by rendering
each prefix: ``render(messages[:i], add_generation_prompt=True)`` ends where turn ``i`` starts
and ``render(messages[:i+1])`` where it ends, its end-of-turn marker included (so the model learns
to stop). The text is tokenized piece by piece at those boundaries, which is how generation sees
it: the prompt is tokenized up to the assistant header and the reply's tokens follow.
"""

from __future__ import annotations

import torch

from ..errors import DataError


def _spans_chat(messages: list[dict], template) -> tuple[str, list[tuple[int, int]]]:
    text = template.render(messages, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = template.render(messages[:i], add_generation_prompt=True)
        through = template.render(messages[: i + 1], add_generation_prompt=False)
        if not (text.startswith(before) and text.startswith(through)):
            raise DataError(
                "the chat template does not render conversations prefix-consistently, so assistant "
                "tokens cannot be located; use sft.assistant_only=false"
            )
        spans.append((len(before), len(through)))
    return text, spans


def chat_segments(messages: list[dict], tokenizer, template) -> list[tuple[list[int], bool]]:
    """A conversation's tokens as ``(ids, is an assistant turn)`` pieces, in order: the text
    rendered by the template, tokenized piece by piece at the assistant turns' boundaries (each
    assistant piece runs from after its header through its end-of-turn marker)."""
    text, spans = _spans_chat(messages, template)
    pieces, pos = [], 0
    for s, e in [*spans, (len(text), len(text))]:
        for lo, hi, assistant in ((pos, s, False), (s, e, True)):
            if hi > lo:
                pieces.append((tokenizer.encode(text[lo:hi]), assistant))
        pos = e
    return pieces


def tokenize_example(example: dict, tokenizer, template, assistant_only: bool) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 where no loss) of one SFT example."""
    eot = tokenizer.eot_id
    if "messages" in example:
        ids, labels = [], []
        for piece, assistant in chat_segments(example["messages"], tokenizer, template):
            ids += piece
            labels += piece if (assistant or not assistant_only) else [-100] * len(piece)
        return ids, labels
    prompt, completion = example["prompt"], example["completion"]
    p_ids = tokenizer.encode(prompt)
    full = tokenizer.encode(prompt + completion)
    # tokenized together (as generation would see it); the completion starts where the prompt's
    # tokens stop matching
    k = 0
    while k < min(len(p_ids), len(full)) and p_ids[k] == full[k]:
        k += 1
    ids = full + [eot]
    labels = [-100] * k + ids[k:] if assistant_only else list(ids)
    return ids, labels


def encode_texts(tokenizer, texts: list[str], template: str, max_len: int) -> tuple[list[list[int]], int]:
    """Token rows of ``texts`` put in ``template`` as the classification head sees them: a row
    longer than ``max_len`` keeps its end (the last token is the one classified), an empty one
    is the end-of-text token. Returns the rows and how many were cut."""
    rows, truncated = [], 0
    for ids in tokenizer.encode_batch([template.replace("{text}", t) for t in texts]):
        if len(ids) > max_len:
            ids = ids[-max_len:]
            truncated += 1
        rows.append(ids or [tokenizer.eot_id])
    return rows, truncated


def pad_batch(rows: list[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token rows into (B, T) and their lengths (B,)."""
    T = max(len(r) for r in rows)
    out = torch.full((len(rows), T), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    return out.to(device), lengths.to(device)
