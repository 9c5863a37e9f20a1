"""Multi-turn chat on the inference engine: `lmforge chat CKPT`.

A :class:`ChatSession` keeps the conversation, renders it with the model's own chat
template (sandboxed Jinja, see ``tokenizer/chat.py``; ChatML when the model has none) and
streams the reply. When the conversation outgrows the context, the oldest exchanges are
dropped (the system prompt stays); a single message too long for the context is an error.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Iterator
from typing import TextIO

from ..errors import LmforgeError
from ..tokenizer.chat import ChatTemplate
from .engine import InferenceEngine
from .sampling import SamplingParams

#: Special tokens that end an assistant turn in common chat formats.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>", "<|end_of_text|>")


def end_of_turn_ids(tokenizer) -> list[int]:
    specials = set(tokenizer.special_tokens)
    return [i for t in END_OF_TURN if t in specials and (i := tokenizer.token_to_id(t)) is not None]


class ChatSession:
    def __init__(
        self,
        engine: InferenceEngine,
        template: ChatTemplate,
        params: SamplingParams | None = None,
        system: str | None = None,
    ) -> None:
        self.engine = engine
        self.template = template
        base = params or SamplingParams(temperature=0.7, top_p=0.9, max_tokens=512)
        stops = sorted(set(base.stop_token_ids) | set(end_of_turn_ids(engine.tokenizer)))
        self.params = dataclasses.replace(base, stop_token_ids=stops).validate(engine.vocab_size)
        self.system = system
        self.history: list[dict[str, str]] = []
        self.last_stats: dict[str, float] = {}

    def reset(self) -> None:
        self.history.clear()

    def messages(self, user: str | None = None) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        tail = [{"role": "user", "content": user}] if user is not None else []
        return head + self.history + tail

    def _prompt_ids(self, user: str) -> list[int]:
        """The rendered conversation, dropping the oldest exchanges until it fits."""
        limit = self.engine.max_seq_len - min(self.params.max_tokens, self.engine.max_seq_len // 4)
        while True:
            ids = self.engine.encode_prompt(self.template.render(self.messages(user), add_generation_prompt=True))
            if len(ids) <= limit:
                return ids
            if not self.history:
                raise LmforgeError(
                    f"the message needs {len(ids)} tokens; with room for the reply the context holds {limit}"
                )
            del self.history[:2]  # the oldest user message and its reply

    def send(self, user: str) -> Iterator[str]:
        """Stream the assistant's reply to ``user``; the exchange joins the history at the end."""
        ids = self._prompt_ids(user)
        t0 = time.perf_counter()
        first = None
        parts: list[str] = []
        n = 0
        for delta in self.engine.stream(ids, self.params):
            first = first or time.perf_counter()
            n += len(delta.token_ids)
            if delta.text:
                parts.append(delta.text)
                yield delta.text
        end = time.perf_counter()
        self.history += [{"role": "user", "content": user}, {"role": "assistant", "content": "".join(parts).strip()}]
        decode_s = end - (first or end)
        self.last_stats = {
            "prompt_tokens": len(ids),
            "tokens": n,
            "time_to_first_token_s": (first or end) - t0,
            "tokens_per_s": (n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
        }


HELP = """commands: /reset (forget the conversation)  /system TEXT (set the system prompt; empty clears)
          /history (show the conversation)  /help  /quit (or Ctrl-D)"""


def describe_model(engine: InferenceEngine) -> str:
    """What is being talked to: the checkpoint, its shape, and for an adapter checkpoint the
    adapter method over its base (the banner said "30-layer model" for a LoRA run)."""
    import json
    from pathlib import Path

    cfg = engine.config
    shape = f"{cfg.n_layer} layers x {cfg.n_embd}"
    path = getattr(engine, "checkpoint", None)
    if path is None:
        return f"a {shape} model"
    try:
        adapter = json.loads((Path(path) / "config.json").read_text(encoding="utf-8")).get("adapter") or {}
    except (OSError, ValueError):
        adapter = {}
    if adapter:
        return (f"{path}: a {adapter.get('method', 'PEFT')} adapter over the base {adapter.get('base_checkpoint')} "
                f"({shape})")
    return f"{path} ({shape})"


def repl(session: ChatSession, inp: TextIO | None = None, out: TextIO | None = None, show_stats: bool = True) -> None:
    """Read user lines, stream replies. Works interactively and on piped input. The streams
    default to sys.stdin / sys.stdout as they are at call time (not at import)."""
    inp = inp if inp is not None else sys.stdin
    out = out if out is not None else sys.stdout
    interactive = inp.isatty()
    if interactive:
        out.write(f"chatting with {describe_model(session.engine)}; {HELP}\n")
    while True:
        if interactive:
            out.write("\n> ")
            out.flush()
        line = inp.readline()
        if not line:
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        cmd, _, arg = line.strip().partition(" ")
        if cmd in ("/quit", "/exit"):
            break
        if cmd == "/reset":
            session.reset()
            out.write("(conversation cleared)\n")
            continue
        if cmd == "/system":
            session.system = arg.strip() or None
            out.write(f"(system prompt {'set' if session.system else 'cleared'})\n")
            continue
        if cmd == "/history":
            for m in session.messages():
                out.write(f"[{m['role']}] {m['content']}\n")
            continue
        if cmd == "/help":
            out.write(HELP + "\n")
            continue
        if cmd.startswith("/"):
            out.write(f"unknown command {cmd}; {HELP}\n")
            continue
        try:
            for piece in session.send(line):
                out.write(piece)
                out.flush()
        except LmforgeError as e:
            out.write(f"error: {e}\n")
            continue
        out.write("\n")
        if show_stats and interactive:
            st = session.last_stats
            out.write(f"({st['tokens']} tokens, {st['tokens_per_s']:.1f} tok/s)\n")
