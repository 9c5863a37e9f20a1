"""`lmforge generate`, `chat` and `sample`: each a config dataclass (the command's flags,
validated in ``__post_init__``) and a ``run_*(cfg)`` function over the inference engine.

Torch-free at module level: the command line builds its parsers from these dataclasses.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..config import option
from ..errors import ConfigError, DataError, LmforgeError
from .options import EngineOptions, SamplingOptions

if TYPE_CHECKING:
    from ..infer.sampling import SamplingParams


@dataclass(kw_only=True)
class SampleConfig(SamplingOptions, EngineOptions):
    """``lmforge sample CKPT``: print continuations of a prompt."""

    prompt: str = option("\n", "text to continue (default: a newline)")
    num_samples: int = option(1, "continuations, decoded as one batch")
    max_tokens: int = option(200, "new tokens at most (default %(default)s)", aliases=("--max-new-tokens",),
                             group="sampling")
    temperature: float = option(0.8, "0 is greedy", group="sampling")

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ConfigError(f"--num-samples must be at least 1, got {self.num_samples}")


@dataclass(kw_only=True)
class GenerateConfig(SamplingOptions, EngineOptions):
    """``lmforge generate CKPT [PROMPT ...]``: complete prompts -> JSONL, batched."""

    batch_size: int = option(8, "sequences decoded together (default 8)", group="engine")
    prompts: list[str] = option([], "prompts (else --file, else one per line on stdin)", positional=True, nargs="*")
    file: str | None = option(None, 'prompts: text (one per line) or .jsonl ({"prompt": ...} or {"messages": [...]})')
    out: str | None = option(None, "write JSONL here instead of stdout")
    chat: bool = option(False, "wrap each prompt as a user message in the chat template")
    logprobs: int | None = option(None, "chosen and top-K logprobs per token", metavar="K")
    overflow: Literal["error", "truncate"] = option(
        "error", "a prompt longer than the context: error, or keep its end (default error)")

    def __post_init__(self) -> None:
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ConfigError(f"--logprobs must be in [0, 20], got {self.logprobs}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {self.batch_size}")


@dataclass(kw_only=True)
class ChatConfig(SamplingOptions, EngineOptions):
    """``lmforge chat CKPT``: a multi-turn REPL with streaming."""

    system: str | None = option(None, "system prompt")
    max_tokens: int = option(512, "new tokens at most (default %(default)s)", aliases=("--max-new-tokens",),
                             group="sampling")
    temperature: float = option(0.7, "0 is greedy", group="sampling")


def sampling_from(cfg: SamplingOptions, tokenizer, logprobs: int | None = None) -> SamplingParams:
    """The CLI's flags -> SamplingParams through the builder the server uses too; only what is
    the CLI's own stays here (``--greedy``, ``--stop-token`` given as text or id)."""
    from ..infer.sampling import build_sampling_params

    stop_ids = []
    for t in cfg.stop_token:
        tid = int(t) if t.isdigit() else tokenizer.token_to_id(t)
        if tid is None or not 0 <= tid < tokenizer.vocab_size:
            raise ConfigError(f"unknown stop token {t!r}: it is not a token of this model's vocabulary")
        stop_ids.append(tid)
    return build_sampling_params(
        max_tokens=cfg.max_tokens,
        temperature=0.0 if cfg.greedy else cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        min_p=cfg.min_p,
        repetition_penalty=cfg.repetition_penalty,
        presence_penalty=cfg.presence_penalty,
        frequency_penalty=cfg.frequency_penalty,
        stop=cfg.stop,
        stop_token_ids=stop_ids,
        ignore_eos=cfg.ignore_eos,
        seed=cfg.seed,
        logprobs=logprobs,
        vocab_size=tokenizer.vocab_size,
    )


def engine_from(cfg: EngineOptions, batch: int = 1, overflow: str = "error"):
    from ..hardware import use_threads
    from ..infer.engine import load_engine

    use_threads(cfg.threads)
    return load_engine(
        cfg.checkpoint, device=cfg.device, dtype=cfg.dtype, quantize=None if cfg.quantize == "none" else cfg.quantize,
        max_batch_size=batch, overflow=overflow,
    )


# ---- lmforge generate ----------------------------------------------------------------
def read_prompts(cfg: GenerateConfig) -> list[Any]:
    """Prompts from arguments, else ``--file`` (text: one per line; .jsonl: objects with
    "prompt" or "messages"), else standard input (one per line)."""
    if cfg.prompts:
        return list(cfg.prompts)
    if cfg.file:
        path = Path(cfg.file)
        if not path.is_file():
            raise DataError(f"prompt file not found: {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{path} is not UTF-8 text") from None
        if path.suffix in (".jsonl", ".ndjson"):
            out = []
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
                if isinstance(rec, dict) and isinstance(rec.get("prompt"), str):
                    out.append(rec["prompt"])
                elif isinstance(rec, dict) and isinstance(rec.get("messages"), list):
                    out.append(rec["messages"])
                else:
                    raise DataError(f"{path}:{n}: expected an object with a text 'prompt' or a 'messages' list")
            return out
        return [line for line in text.splitlines() if line.strip()]
    if sys.stdin is None or sys.stdin.isatty():
        raise ConfigError("no prompts: give them as arguments, with --file, or on standard input")
    return [line.rstrip("\n") for line in sys.stdin if line.strip()]


def run_generate(cfg: GenerateConfig) -> None:
    from ..tokenizer.chat import ChatTemplate

    prompts = read_prompts(cfg)
    if not prompts:
        raise DataError("no prompts to complete (the input is empty)")
    engine = engine_from(cfg, batch=cfg.batch_size, overflow=cfg.overflow)
    params = sampling_from(cfg, engine.tokenizer, logprobs=cfg.logprobs)
    template = None
    if cfg.chat or any(isinstance(p, list) for p in prompts):
        template = ChatTemplate.from_checkpoint(engine.checkpoint)
        from ..infer.chat import end_of_turn_ids

        params.stop_token_ids = sorted(set(params.stop_token_ids) | set(end_of_turn_ids(engine.tokenizer)))
    texts = []
    for p in prompts:
        if isinstance(p, list):
            texts.append(template.render(p, add_generation_prompt=True))
        elif template is not None:
            texts.append(template.render([{"role": "user", "content": p}], add_generation_prompt=True))
        else:
            texts.append(p)
    from ..infer.sampling import seeded

    plist = seeded(params, len(texts))
    out = open(cfg.out, "w", encoding="utf-8") if cfg.out else sys.stdout
    try:
        results = engine.generate(texts, plist, progress=out is not sys.stdout)
        for i, (prompt, c) in enumerate(zip(prompts, results)):
            rec: dict[str, Any] = {
                "index": i,
                "prompt": prompt,
                "completion": c.text,
                "finish_reason": c.finish_reason,
                "prompt_tokens": len(c.prompt_ids),
                "completion_tokens": len(c.token_ids),
            }
            if c.logprobs is not None:
                rec["logprobs"] = [
                    {"token": engine.tokenizer.decode([lp.token_id]), "id": lp.token_id, "logprob": lp.logprob,
                     "top": [[t, v] for t, v in lp.top]}
                    for lp in c.logprobs
                ]
            out.write(json.dumps(rec, ensure_ascii=False) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()


# ---- lmforge chat -------------------------------------------------------------------
def run_chat(cfg: ChatConfig) -> None:
    from ..tokenizer.chat import ChatTemplate
    from ..infer.chat import ChatSession, repl

    engine = engine_from(cfg)
    params = sampling_from(cfg, engine.tokenizer)
    session = ChatSession(engine, ChatTemplate.from_checkpoint(engine.checkpoint), params, system=cfg.system)
    repl(session)


# ---- lmforge sample -----------------------------------------------------------------
def print_samples(engine, prompt: str, n: int, params: SamplingParams) -> list[str]:
    """``n`` continuations of ``prompt`` (seeds seed, seed+1, ...), printed and returned."""
    tok = engine.tokenizer
    if tok.unk_id is not None and tok.unk_id in tok.encode(prompt):
        raise LmforgeError("the prompt holds characters the tokenizer does not know")
    from ..infer.sampling import seeded

    plist = seeded(params, n)
    texts = []
    for i, c in enumerate(engine.generate([prompt] * n, plist)):
        text = prompt + c.text
        texts.append(text)
        print(f"--- sample {i + 1} ---\n{text}")
    return texts


def run_sample(cfg: SampleConfig) -> None:
    engine = engine_from(cfg, batch=cfg.num_samples, overflow="slide")
    print_samples(engine, cfg.prompt, cfg.num_samples, sampling_from(cfg, engine.tokenizer))
