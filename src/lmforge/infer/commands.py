"""Command-line front ends of the inference engine: `lmforge generate`, `chat` and `sample`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, DataError, LmforgeError

if TYPE_CHECKING:
    from .sampling import SamplingParams


def add_engine_args(p: argparse.ArgumentParser, batch: bool = True) -> None:
    p.add_argument("checkpoint", help="a checkpoint directory, or a run directory (its newest checkpoint)")
    g = p.add_argument_group("engine")
    g.add_argument("--device", default="cpu")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="compute dtype (auto: float32 on a CPU, bfloat16 for int8/int4 models where bf16 is fast; "
                   "bfloat16 on GPUs with it, else float16; `lmforge env` shows the choice)")
    g.add_argument("--threads", type=int, default=0, help="CPU threads (default 0: the usable cores, cgroup quota included)")
    g.add_argument("--quantize", choices=["none", "bf16", "int8", "int4"], default="none",
                   help="quantize the weights at load (a quantized checkpoint loads as saved)")
    if batch:
        g.add_argument("--batch-size", type=int, default=8, help="sequences decoded together (default 8)")


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int = 256, temperature: float = 1.0) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", "--max-new-tokens", dest="max_tokens", type=int, default=max_tokens, help=f"new tokens at most (default {max_tokens})")
    g.add_argument("--temperature", type=float, default=temperature, help="0 is greedy")
    g.add_argument("--greedy", action="store_true", help="same as --temperature 0")
    g.add_argument("--top-k", type=int, default=0, help="0 is off")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    g.add_argument("--stop-token", action="append", default=[], metavar="TOKEN",
                   help="stop at this token, given by its text (e.g. '<|im_end|>') or id (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-text token")
    g.add_argument("--seed", type=int, default=None)


def sampling_from_args(args: argparse.Namespace, tokenizer) -> SamplingParams:
    from .sampling import SamplingParams

    stop_ids = []
    for t in args.stop_token:
        tid = int(t) if t.isdigit() else tokenizer.token_to_id(t)
        if tid is None or not 0 <= tid < tokenizer.vocab_size:
            raise ConfigError(f"unknown stop token {t!r}: it is not a token of this model's vocabulary")
        stop_ids.append(tid)
    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=0.0 if args.greedy else args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        stop=list(args.stop),
        stop_token_ids=stop_ids,
        ignore_eos=args.ignore_eos,
        seed=args.seed,
        logprobs=getattr(args, "logprobs", None),
    ).validate(tokenizer.vocab_size)


def seeded(params: SamplingParams, n: int) -> list[SamplingParams]:
    """``n`` copies of ``params`` with seeds seed, seed+1, ... (unseeded stays unseeded), so
    a prompt's output does not depend on the batch it ran in."""
    if params.seed is None:
        return [params] * n
    return [dataclasses.replace(params, seed=params.seed + i) for i in range(n)]


def engine_from_args(args: argparse.Namespace, overflow: str = "error"):
    from .engine import load_engine

    batch = getattr(args, "batch_size", 1)
    if batch < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch}")
    quantize = None if args.quantize == "none" else args.quantize
    from ..hardware import use_threads

    use_threads(getattr(args, "threads", 0))
    return load_engine(
        args.checkpoint, device=args.device, dtype=args.dtype, quantize=quantize, max_batch_size=batch,
        overflow=overflow,
    )


# ---- lmforge generate ----------------------------------------------------------------
def read_prompts(args: argparse.Namespace) -> list[Any]:
    """Prompts from arguments, else ``--file`` (text: one per line; .jsonl: objects with
    "prompt" or "messages"), else standard input (one per line)."""
    if args.prompts:
        return list(args.prompts)
    if args.file:
        path = Path(args.file)
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


def run_generate(args: argparse.Namespace) -> None:
    from ..tokenizer.chat import ChatTemplate

    prompts = read_prompts(args)
    if not prompts:
        raise DataError("no prompts to complete (the input is empty)")
    if args.logprobs is not None and not 0 <= args.logprobs <= 20:
        raise ConfigError(f"--logprobs must be in [0, 20], got {args.logprobs}")
    engine = engine_from_args(args, overflow=args.overflow)
    params = sampling_from_args(args, engine.tokenizer)
    template = None
    if args.chat or any(isinstance(p, list) for p in prompts):
        template = ChatTemplate.from_checkpoint(engine.checkpoint)
        from .chat import end_of_turn_ids

        params.stop_token_ids = sorted(set(params.stop_token_ids) | set(end_of_turn_ids(engine.tokenizer)))
    texts = []
    for p in prompts:
        if isinstance(p, list):
            texts.append(template.render(p, add_generation_prompt=True))
        elif template is not None:
            texts.append(template.render([{"role": "user", "content": p}], add_generation_prompt=True))
        else:
            texts.append(p)
    plist = seeded(params, len(texts))
    out = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout
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
def run_chat(args: argparse.Namespace) -> None:
    from ..tokenizer.chat import ChatTemplate
    from .chat import ChatSession, repl

    args.batch_size = 1
    engine = engine_from_args(args)
    params = sampling_from_args(args, engine.tokenizer)
    session = ChatSession(engine, ChatTemplate.from_checkpoint(engine.checkpoint), params, system=args.system)
    repl(session)


# ---- lmforge sample -----------------------------------------------------------------
def print_samples(engine, prompt: str, n: int, params: SamplingParams) -> list[str]:
    """``n`` continuations of ``prompt`` (seeds seed, seed+1, ...), printed and returned."""
    tok = engine.tokenizer
    if tok.unk_id is not None and tok.unk_id in tok.encode(prompt):
        raise LmforgeError("the prompt holds characters the tokenizer does not know")
    plist = seeded(params, n)
    texts = []
    for i, c in enumerate(engine.generate([prompt] * n, plist)):
        text = prompt + c.text
        texts.append(text)
        print(f"--- sample {i + 1} ---\n{text}")
    return texts


def run_sample(args: argparse.Namespace) -> None:
    if args.num_samples < 1:
        raise ConfigError(f"--num-samples must be at least 1, got {args.num_samples}")
    args.batch_size = args.num_samples
    engine = engine_from_args(args, overflow="slide")
    print_samples(engine, args.prompt, args.num_samples, sampling_from_args(args, engine.tokenizer))
