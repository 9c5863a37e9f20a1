"""``lmforge finetune ... --preview N``: chat SFT examples as the model will see them.

Each example is rendered by the model's chat template and tokenized exactly as training does
(:func:`~lmforge.data.encoding.tokenize_example`, cut to ``sft.max_length``); the tokens
that carry loss (the ones the model is trained to predict) are marked: green on a terminal,
between ``⟦`` and ``⟧`` otherwise. Under each example: how many tokens carry loss, and whether
every assistant turn's end-of-turn token does. A model whose end-of-turn tokens carry no loss
never learns to stop: the most common silent bug of fine-tuning setups, and the habit of
axolotl's ``preprocess --debug`` of looking before training.
"""

from __future__ import annotations

from typing import Any

OPEN, CLOSE = "\u27e6", "\u27e7"  # ⟦ ⟧
GREEN, RESET = "\x1b[42;30m", "\x1b[0m"


def end_of_turn_token_ids(tokenizer: Any) -> set[int]:
    """The ids that end an assistant turn: the chat formats' markers this vocabulary has, and
    its end-of-text token."""
    from ...infer.chat import end_of_turn_ids

    return set(end_of_turn_ids(tokenizer)) | {tokenizer.eot_id}


def marked_text(ids: list[int], labels: list[int], tokenizer: Any, color: bool = False) -> str:
    """The tokens' text with every run of loss-carrying tokens marked (token 0 is never
    predicted, so it never carries loss)."""
    out, run, run_loss = [], [], None
    for i, tok in enumerate(ids):
        loss = i > 0 and labels[i] != -100
        if run and loss != run_loss:
            out.append(_run(tokenizer.decode(run), run_loss, color))
            run = []
        run.append(tok)
        run_loss = loss
    if run:
        out.append(_run(tokenizer.decode(run), run_loss, color))
    return "".join(out)


def _run(text: str, loss: bool | None, color: bool) -> str:
    if not loss:
        return text
    if color:  # colour each line apart: a background across a newline paints the next line's margin
        return "\n".join(f"{GREEN}{line}{RESET}" if line else "" for line in text.split("\n"))
    return f"{OPEN}{text}{CLOSE}"


def assistant_turn_ends(messages: list[dict], tokenizer: Any, template: Any) -> list[tuple[int | None, bool]]:
    """For each assistant turn: ``(index of its end-of-turn token in the example's ids, whether
    that token is inside the turn's loss-carrying piece)``; the index is None when the turn's
    piece holds no end-of-turn token and the token after the piece is none either."""
    from ...data.encoding import chat_segments

    eot = end_of_turn_token_ids(tokenizer)
    ends: list[tuple[int | None, bool]] = []
    pos = 0
    pieces = chat_segments(messages, tokenizer, template)
    for k, (piece, assistant) in enumerate(pieces):
        if assistant:
            inside = [pos + j for j, t in enumerate(piece) if t in eot]
            if inside:
                ends.append((inside[-1], True))
            else:  # the marker fell outside the assistant piece: it is not trained
                nxt = pieces[k + 1][0] if k + 1 < len(pieces) else []
                after = next((pos + len(piece) + j for j, t in enumerate(nxt) if t in eot), None)
                ends.append((after, False))
        pos += len(piece)
    return ends


def preview(examples: list[dict], tokenizer: Any, template: Any, *, assistant_only: bool, max_length: int,
            n: int, color: bool = False, total: int | None = None) -> str:
    """The first ``n`` examples, marked, each with its loss summary."""
    from ...data.encoding import tokenize_example

    parts = []
    legend = "loss-carrying tokens in green" if color else f"loss-carrying tokens between {OPEN} and {CLOSE}"
    for k, ex in enumerate(examples[:n]):
        ids, labels = tokenize_example(ex, tokenizer, template, assistant_only)
        cut = len(ids) > max_length + 1
        if cut:
            ids, labels = ids[: max_length + 1], labels[: max_length + 1]
        carried = sum(1 for t in labels[1:] if t != -100)
        lines = [f"--- example {k + 1} of {total or len(examples):,}: {len(ids):,} tokens"
                 f"{f' (cut to sft.max_length {max_length} + 1)' if cut else ''}, {carried:,} carry loss "
                 f"({carried / max(1, len(ids) - 1):.0%}); {legend} ---",
                 marked_text(ids, labels, tokenizer, color)]
        if "messages" in ex:
            ends = assistant_turn_ends(ex["messages"], tokenizer, template)
            kept = [(i, ok) for i, ok in ends if i is None or i < len(ids)]
            trained = sum(1 for i, ok in kept if ok and i is not None and labels[i] != -100)
            names = sorted({tokenizer.id_to_token(ids[i]) for i, _ in kept if i is not None})
            line = (f"[end of turn: {trained} of {len(kept)} assistant turns end with a loss-carrying "
                    f"{'/'.join(n for n in names if n) or 'end-of-turn'} token")
            if len(kept) < len(ends):
                line += f"; {len(ends) - len(kept)} more cut off by sft.max_length"
            lines.append(line + ("]" if trained == len(kept) else
                                 "; the model would not learn to stop: check the chat template]"))
        parts.append("\n".join(lines))
    return "\n\n".join(parts)
