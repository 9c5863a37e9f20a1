"""The `lmforge` command line: one subcommand per stage.

Every stage takes ``--recipe NAME|PATH`` (a YAML file, or a name under ``recipes/<stage>/``)
and ``key=value`` overrides that refine it (``train.lr=3e-4 model.n_layer=6``).
User errors print one ``error: ...`` line and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from pathlib import Path
from typing import Any, Callable

from .errors import LmforgeError

STAGES = """stages, in the order of a model's life:
  quickstart        the whole job on embedded data (Tiny Shakespeare): tokenizer, data, pretrain, samples
  tokenizer train   train a byte-level BPE or build a character tokenizer -> tokenizer.json
  data prepare      text / JSONL / Parquet -> tokenized train/val shards
  data reddit       Pushshift Reddit dumps -> train/val chat conversations (also: data synth-reddit)
  data clean|dedup|pii|augment   clean, deduplicate, mask PII in, augment corpora and conversations
  pretrain          train a GPT from scratch on prepared shards (next-token objective)
  finetune          adapt a model: chat SFT, classification, DPO; full or LoRA/QLoRA/DoRA/AdaLoRA/IA3/
                    adapters/prefix/prompt tuning (saves only the adapter)
  merge             fold a LoRA/DoRA/AdaLoRA/IA3 adapter into its base -> a plain checkpoint
  sample            print continuations of a prompt from a checkpoint
  generate          complete prompts (arguments, a file or stdin) -> JSONL, batched
  chat              talk to a model: multi-turn REPL with streaming, /reset, /system
  import            a Hugging Face model (directory or hub id) or a GGUF file -> lmforge checkpoint
  export            an lmforge checkpoint -> Hugging Face directory or GGUF file
  quantize          a checkpoint -> weight-only int8 / int4 / bf16 checkpoint (smaller, faster decode)
  serve             OpenAI-compatible HTTP server (chat, completions, metrics) with a web chat page
  presets           list the named model shapes
"""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "|".join(map(str, typing.get_args(tp)))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None)) + " or none"
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def describe_settings(cls: type, prefix: str = "") -> list[str]:
    """One line per setting of a config dataclass (nested sections flattened)."""
    lines: list[str] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            lines += describe_settings(tp, key + ".")
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        lines.append(f"  {key} ({_type_name(tp)}, default {default!r})")
    return lines


def _recipes(stage: str) -> str:
    from .paths import recipes_dir

    names = sorted(p.stem for p in (recipes_dir() / stage).glob("*.yaml"))
    return ", ".join(names) or "none"


def _stage_parser(sub, name: str, stage: str, cls: type, help_: str, extra: Callable | None = None):
    epilog = f"recipes: {_recipes(stage)}\n\nsettings (key=value):\n" + "\n".join(describe_settings(cls))
    p = sub.add_parser(name, help=help_, description=help_, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", help=f"YAML recipe: a path or a name under recipes/{stage}/")
    if extra:
        extra(p)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="settings that refine the recipe")
    return p


def build_parser() -> argparse.ArgumentParser:
    from .data.prepare import DataPrepareConfig
    from .tokenizer.train import TokenizerTrainConfig
    from .train.pretrain import PretrainConfig

    parser = argparse.ArgumentParser(
        prog="lmforge",
        description="lmforge: from raw text to your own language model and chatbot.",
        epilog=STAGES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"lmforge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="STAGE")

    q = sub.add_parser(
        "quickstart",
        help="the whole job on embedded Tiny Shakespeare, then samples",
        description="Build a char tokenizer, prepare Tiny Shakespeare, pretrain the default recipe and print samples.",
        epilog="overrides refine the pretrain recipe, e.g. train.max_steps=200",
    )
    q.add_argument("--out", default="runs/quickstart", help="run directory (default runs/quickstart)")
    q.add_argument("--recipe", default="shakespeare-char", help="pretrain recipe (default shakespeare-char)")
    q.add_argument("overrides", nargs="*", metavar="key=value")

    tok = sub.add_parser("tokenizer", help="tokenizer stage").add_subparsers(dest="action", metavar="ACTION")
    _stage_parser(tok, "train", "tokenizer", TokenizerTrainConfig, "train a BPE or build a char tokenizer")

    data = sub.add_parser("data", help="data stage").add_subparsers(dest="action", metavar="ACTION")
    _stage_parser(data, "prepare", "data", DataPrepareConfig, "tokenize a corpus into train/val token shards")
    from .data.commands import add_parsers as add_data_parsers

    add_data_parsers(data, _stage_parser)

    _stage_parser(
        sub,
        "pretrain",
        "pretrain",
        PretrainConfig,
        "train a GPT from scratch on prepared shards",
        lambda p: p.add_argument("--resume", action="store_true", help="continue from out_dir's newest checkpoint"),
    )

    from .train.finetune import FinetuneConfig

    _stage_parser(
        sub,
        "finetune",
        "finetune",
        FinetuneConfig,
        "adapt a checkpoint: chat SFT, classification or DPO, full or parameter-efficient",
        lambda p: p.add_argument("--resume", action="store_true", help="continue from out_dir's newest checkpoint"),
    )
    mg = sub.add_parser(
        "merge",
        help="fold an adapter into its base -> a plain checkpoint",
        description="Merge a LoRA / DoRA / AdaLoRA / IA3 adapter (an adapter checkpoint or a PEFT adapter "
        "directory) into its base model and write an ordinary checkpoint.",
    )
    mg.add_argument("adapter", help="adapter checkpoint, run directory, or PEFT adapter directory")
    mg.add_argument("out", help="checkpoint directory to write")
    mg.add_argument("--base", help="the base checkpoint (default: the one the adapter names)")
    mg.add_argument("--overwrite", action="store_true", help="replace an existing output directory")

    from .infer.commands import add_engine_args, add_sampling_args

    s = sub.add_parser("sample", help="print continuations of a prompt", description="Print continuations of a prompt.")
    add_engine_args(s, batch=False)
    s.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    s.add_argument("--num-samples", type=int, default=1, help="continuations, decoded as one batch")
    add_sampling_args(s, max_tokens=200, temperature=0.8)

    g = sub.add_parser(
        "generate",
        help="complete prompts -> JSONL",
        description="Complete prompts with a checkpoint, batched, one JSON line per prompt "
        '({"index", "prompt", "completion", "finish_reason", "prompt_tokens", "completion_tokens"}).',
    )
    add_engine_args(g)
    g.add_argument("prompts", nargs="*", help="prompts (else --file, else one per line on stdin)")
    g.add_argument("--file", help='prompts: text (one per line) or .jsonl ({"prompt": ...} or {"messages": [...]})')
    g.add_argument("--out", help="write JSONL here instead of stdout")
    g.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    g.add_argument("--logprobs", type=int, default=None, metavar="K", help="chosen and top-K logprobs per token")
    g.add_argument("--overflow", choices=["error", "truncate"], default="error",
                   help="a prompt longer than the context: error, or keep its end (default error)")
    add_sampling_args(g)

    c = sub.add_parser(
        "chat",
        help="multi-turn chat REPL with streaming",
        description="Chat with a model using its own chat template (ChatML when it has none). "
        "Commands: /reset, /system TEXT, /history, /help, /quit.",
    )
    add_engine_args(c, batch=False)
    c.add_argument("--system", default=None, help="system prompt")
    add_sampling_args(c, max_tokens=512, temperature=0.7)

    imp = sub.add_parser(
        "import",
        help="a Hugging Face model or GGUF file -> lmforge checkpoint",
        description="Import a Hugging Face model (a local directory, or a hub id when online) or a GGUF file "
        "as an ordinary lmforge checkpoint: fine-tuning, sampling and serving work on it.",
    )
    imp.add_argument("source", help="HF model directory, hub id (org/name), or a .gguf file")
    imp.add_argument("out", help="checkpoint directory to write")
    imp.add_argument("--overwrite", action="store_true", help="replace an existing output directory")

    exp = sub.add_parser(
        "export",
        help="an lmforge checkpoint -> Hugging Face directory or GGUF file",
        description="Export a checkpoint for other tools: Hugging Face format (transformers, vLLM) or GGUF (llama.cpp).",
    )
    exp.add_argument("checkpoint", help="a checkpoint directory, or a run directory (its newest checkpoint)")
    exp.add_argument("--format", choices=["hf", "gguf"], required=True)
    exp.add_argument("--dtype", choices=["f32", "f16", "q8_0"], default="f16", help="GGUF tensor type (default f16)")
    exp.add_argument("out", help="output directory (hf) or .gguf file (gguf)")
    exp.add_argument("--overwrite", action="store_true", help="replace an existing output")

    qz = sub.add_parser(
        "quantize",
        help="a checkpoint -> weight-only int8 / int4 / bf16 checkpoint",
        description="Quantize the Linear weights of a checkpoint (int8 per channel, int4 per group, or bf16) "
        "into a new checkpoint that loads, samples and serves like any other.",
    )
    qz.add_argument("checkpoint", help="a checkpoint directory, or a run directory (its newest checkpoint)")
    qz.add_argument("out", help="checkpoint directory to write")
    qz.add_argument("--method", choices=["int8", "int4", "bf16"], required=True)
    qz.add_argument("--group-size", type=int, default=32, help="int4 group size: 32, 64 or 128 (default 32)")
    qz.add_argument("--overwrite", action="store_true", help="replace an existing output directory")

    from .serve.commands import add_parser as add_serve_parser

    add_serve_parser(sub)

    sub.add_parser("presets", help="list the named model shapes")
    return parser


# ---- stage handlers ---------------------------------------------------------------------
def cmd_tokenizer_train(args) -> None:
    from .config import load_config
    from .tokenizer.train import TokenizerTrainConfig, run_train

    run_train(load_config(TokenizerTrainConfig, "tokenizer", args.recipe, args.overrides))


def cmd_data_prepare(args) -> None:
    from .config import load_config
    from .data.prepare import DataPrepareConfig, run_prepare

    run_prepare(load_config(DataPrepareConfig, "data", args.recipe, args.overrides))


def cmd_data_pipeline(args) -> None:
    from .data.commands import run_action

    run_action(args.action, args)


def _report_fit(result, out_dir: str) -> None:
    if os.environ.get("RANK", "0") != "0":
        return
    final = "  ".join(f"{k} {v:.4f}" for k, v in result.final.items())
    print(
        f"done: {result.steps} steps in {result.wall_s:.1f} s ({result.tokens_per_s:,.0f} tokens/s), "
        f"peak RSS {result.peak_rss_mib:,.0f} MiB\n  {final}\n  checkpoint: {result.checkpoint}"
    )


def cmd_pretrain(args) -> None:
    from .config import load_config
    from .train.pretrain import PretrainConfig, run_pretrain

    cfg = load_config(PretrainConfig, "pretrain", args.recipe, args.overrides)
    _report_fit(run_pretrain(cfg, resume=args.resume), cfg.out_dir)


def cmd_finetune(args) -> None:
    from .config import load_config
    from .train.finetune import FinetuneConfig, run_finetune

    cfg = load_config(FinetuneConfig, "finetune", args.recipe, args.overrides)
    summary = run_finetune(cfg, resume=args.resume)
    if os.environ.get("RANK", "0") == "0":
        print(f"  checkpoint: {summary['checkpoint']}\n  summary: {Path(cfg.out_dir) / 'summary.json'}")


def cmd_merge(args) -> None:
    from .model.peft.merge import merge_adapter

    out = merge_adapter(args.adapter, args.out, base=args.base, overwrite=args.overwrite)
    print(f"merged {args.adapter} -> {out}")


def cmd_sample(args) -> None:
    from .infer.commands import run_sample

    run_sample(args)


def cmd_generate(args) -> None:
    from .infer.commands import run_generate

    run_generate(args)


def cmd_chat(args) -> None:
    from .infer.commands import run_chat

    run_chat(args)


def cmd_quantize(args) -> None:
    from .model.quant import quantize_checkpoint

    path = quantize_checkpoint(args.checkpoint, args.out, args.method, args.group_size, overwrite=args.overwrite)
    size = (path / "model.safetensors").stat().st_size
    print(f"quantized {args.checkpoint} -> {path} ({args.method}, model.safetensors {size / 2**20:.1f} MiB)")


def cmd_presets(args) -> None:
    import torch

    from .config import from_dict
    from .model.gpt import GPT, GPTConfig
    from .model.presets import PRESETS

    print(f"{'preset':<18}{'params':>10}  {'layers':>6} {'width':>6} {'heads':>6} {'kv':>4}  shape")
    for name in PRESETS:
        cfg = from_dict(GPTConfig, {"preset": name, **({} if "vocab_size" in PRESETS[name] else {"vocab_size": 65})})
        with torch.device("meta"):
            n = GPT(cfg).num_params()
        shape = f"{cfg.pos_embedding}/{cfg.norm}/{cfg.mlp}{'/tied' if cfg.tie_embeddings else ''}"
        print(f"{name:<18}{n / 1e6:>9.1f}M  {cfg.n_layer:>6} {cfg.n_embd:>6} {cfg.n_head:>6} {cfg.n_kv_head:>4}  {shape}")


def cmd_quickstart(args) -> None:
    from .config import load_config
    from .data.prepare import DataPrepareConfig, run_prepare
    from .infer.commands import print_samples
    from .infer.engine import load_engine
    from .infer.sampling import SamplingParams
    from .paths import embedded_data_dir
    from .tokenizer.train import TokenizerTrainConfig, run_train
    from .train.pretrain import PretrainConfig, run_pretrain

    out = Path(args.out)
    corpus = str(embedded_data_dir() / "tinyshakespeare.txt")
    print(f"[1/4] tokenizer: characters of {corpus}")
    run_train(TokenizerTrainConfig(inputs=[corpus], kind="char", out=str(out / "tokenizer")))
    print("[2/4] data: tokenize, last 10% held out")
    run_prepare(
        DataPrepareConfig(
            inputs=[corpus], tokenizer=str(out / "tokenizer"), out=str(out / "data"), val_split="tail", add_eot=False
        )
    )
    print(f"[3/4] pretrain: recipe {args.recipe}")
    base = [f"data={out / 'data'}", f"out_dir={out / 'model'}", "overwrite=true"]
    cfg = load_config(PretrainConfig, "pretrain", args.recipe, base + list(args.overrides))
    result = run_pretrain(cfg)
    _report_fit(result, cfg.out_dir)
    print("[4/4] samples")
    engine = load_engine(str(out / "model"), max_batch_size=2, overflow="slide")
    print_samples(engine, "ROMEO:", 2, SamplingParams(max_tokens=300, temperature=0.8, top_k=200, seed=0))


def cmd_serve(args) -> None:
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise LmforgeError(f"serving needs the 'serve' extra (pip install 'lmforge[serve]'): {e}") from None
    from .serve.commands import run_serve

    run_serve(args)


def cmd_import(args) -> None:
    if args.source.lower().endswith(".gguf"):
        from .io.gguf import import_gguf

        path = import_gguf(args.source, args.out, overwrite=args.overwrite)
    else:
        from .io.hf import import_hf

        path = import_hf(args.source, args.out, overwrite=args.overwrite)
    print(f"imported {args.source} -> {path}")


def cmd_export(args) -> None:
    from .train.checkpoint import resolve_checkpoint

    ckpt = resolve_checkpoint(args.checkpoint)
    if args.format == "hf":
        from .io.hf import export_hf

        path = export_hf(ckpt, args.out, overwrite=args.overwrite)
    else:
        from .io.gguf import export_gguf

        path = export_gguf(ckpt, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(f"exported {ckpt} -> {path}")


HANDLERS: dict[tuple[str, str | None], Callable] = {
    ("quickstart", None): cmd_quickstart,
    ("tokenizer", "train"): cmd_tokenizer_train,
    ("data", "prepare"): cmd_data_prepare,
    **{("data", a): cmd_data_pipeline for a in ("reddit", "clean", "dedup", "pii", "augment", "synth-reddit")},
    ("pretrain", None): cmd_pretrain,
    ("finetune", None): cmd_finetune,
    ("merge", None): cmd_merge,
    ("sample", None): cmd_sample,
    ("generate", None): cmd_generate,
    ("chat", None): cmd_chat,
    ("import", None): cmd_import,
    ("export", None): cmd_export,
    ("quantize", None): cmd_quantize,
    ("serve", None): cmd_serve,
    ("presets", None): cmd_presets,
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may sit on either side of flags (`a=1 --resume b=2`): argparse
    # leaves the ones after a flag unrecognised, so collect them here.
    args, extra = parser.parse_known_args(argv)
    if hasattr(args, "prompts"):  # `generate CKPT --greedy "a prompt"`: positionals after flags
        args.prompts += [e for e in extra if not e.startswith("-")]
        extra = [e for e in extra if e.startswith("-")]
    stray = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    if args.command is None:
        parser.print_help()
        return 2
    action = getattr(args, "action", None)
    handler = HANDLERS.get((args.command, action))
    if handler is None:
        parser.parse_args([args.command, "--help"])
        return 2
    try:
        handler(args)
    except LmforgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
