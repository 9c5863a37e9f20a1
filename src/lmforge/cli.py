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
  quickstart        the whole pipeline on embedded data: corpus, BPE tokenizer, pretrain, chat SFT, eval,
                    report card, then the chat server
  tokenizer train   train a byte-level BPE or build a character tokenizer -> tokenizer.json
  data prepare      text / JSONL / Parquet -> tokenized train/val shards
  data reddit       Pushshift Reddit dumps -> train/val chat conversations (also: data synth-reddit)
  data clean|dedup|pii|augment   clean, deduplicate, mask PII in, augment corpora and conversations
  pretrain          train a GPT from scratch on prepared shards (next-token objective)
  finetune          adapt a model: chat SFT, classification, DPO; full or LoRA/QLoRA/DoRA/AdaLoRA/IA3/
                    adapters/prefix/prompt tuning (saves only the adapter)
  adversarial       SeqGAN-style: a chat generator trained by policy gradient against a discriminator
  merge             fold a LoRA/DoRA/AdaLoRA/IA3 adapter into its base -> a plain checkpoint
  sample            print continuations of a prompt from a checkpoint
  generate          complete prompts (arguments, a file or stdin) -> JSONL, batched
  chat              talk to a model: multi-turn REPL with streaming, /reset, /system
  eval              checkpoints x tasks: perplexity / bits per byte, classification, multiple choice, generation,
                    chat; zero- and few-shot side by side; results, predictions, plots, report card
  attention         per-layer/per-head attention maps of a text (PNG, HTML viewer) + most attended tokens
  import            a Hugging Face model (directory or hub id) or a GGUF file -> lmforge checkpoint
  export            an lmforge checkpoint -> Hugging Face directory or GGUF file
  quantize          a checkpoint -> weight-only int8 / int4 / bf16 checkpoint (smaller, faster decode)
  prune             a checkpoint -> magnitude-sparse, or smaller (MLP channels / attention heads removed),
                    optionally with recovery fine-tuning
  serve             OpenAI-compatible HTTP server (chat, completions, metrics) with a web chat page
  presets           list the named model shapes
  env               this machine (CPU, ISA, cores, memory, GPUs, measured GEMM rates) and the precision,
                    kernels and threads lmforge picks on it, and why
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


class Parser(argparse.ArgumentParser):
    """argparse without prefix matching: ``--api-key sk-...`` was silently taken as
    ``--api-key-file sk-...``. Every subcommand's parser is of this class (argparse builds
    subparsers with the class of their parent)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def _finetune_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", action="store_true", help="continue from out_dir's newest checkpoint")
    p.add_argument("--preview", type=int, default=None, metavar="N",
                   help="print N training examples as the model sees them (chat template, tokens, loss-carrying "
                   "tokens marked, end-of-turn check) and stop without training")


def build_parser() -> argparse.ArgumentParser:
    from .data.prepare import DataPrepareConfig
    from .tokenizer.train import TokenizerTrainConfig
    from .train.pretrain import PretrainConfig

    parser = Parser(
        prog="lmforge",
        description="lmforge: from raw text to your own language model and chatbot.",
        epilog=STAGES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"lmforge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="STAGE")

    from .quickstart import add_parser as add_quickstart_parser

    add_quickstart_parser(sub)

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
        _finetune_flags,
    )
    from .train.adversarial import AdversarialRunConfig

    _stage_parser(
        sub,
        "adversarial",
        "adversarial",
        AdversarialRunConfig,
        "train a chat generator against a discriminator (policy gradient, KL to the start, MLE)",
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

    from .eval.run import add_parser as add_eval_parser

    add_eval_parser(sub)

    at = sub.add_parser(
        "attention",
        help="attention maps of a text: per-layer/per-head PNGs, HTML viewer, most attended tokens",
        description="Run a checkpoint on a text and write the attention probabilities of every layer and head: "
        "layer{L}.png (one heatmap per head), overview.png (mean over heads), attention.html (self-contained "
        "viewer) and attention.json (tokens, top-k attended tokens per layer/head and overall).",
    )
    add_engine_args(at, batch=False)
    at.add_argument("text", help="the text to run the model on")
    at.add_argument("--out", help="output directory (default runs/attention/<slug of the text>)")
    at.add_argument("--layers", help="layer indices, e.g. 0,3 or 2-5 (default all)")
    at.add_argument("--heads", help="head indices, e.g. 0,1 (default all)")
    at.add_argument("--max-tokens", type=int, default=None,
                    help="keep the first N tokens (default: refuse a text longer than the context)")
    at.add_argument("--top-k", type=int, default=5, help="most attended tokens listed per head and overall (default 5)")
    at.add_argument("--chat", action="store_true", help="wrap the text as a user message in the chat template")

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

    pr = sub.add_parser(
        "prune",
        help="a checkpoint -> magnitude-sparse or structurally smaller checkpoint (+ recovery fine-tuning)",
        description="Prune a checkpoint: magnitude (zero the smallest weights of every Linear), mlp (remove MLP "
        "channels) or heads (remove attention heads / KV groups), the same count in every layer. With "
        "--recover-data, fine-tune the pruned model with the LM objective; OUT is then a run directory "
        "(OUT/pruned before recovery, OUT/checkpoints/step_N after).",
        epilog="key=value overrides refine the recovery run's pretrain settings, e.g. train.lr=5e-4 "
        "train.micro_batch_size=24 train.precision=bf16",
    )
    pr.add_argument("checkpoint", help="a checkpoint directory, or a run directory (its newest checkpoint)")
    pr.add_argument("out", help="checkpoint (or, with recovery, run) directory to write")
    pr.add_argument("--method", choices=["magnitude", "mlp", "heads"], required=True)
    pr.add_argument("--ratio", type=float, required=True, help="share of weights / channels / heads removed, in (0, 1)")
    pr.add_argument("--scope", choices=["layer", "global"], default="layer",
                    help="magnitude: one threshold per matrix or over all of them (default layer)")
    pr.add_argument("--importance", choices=["auto", "activation", "weight"], default="auto",
                    help="mlp/heads: activation statistics on calibration data, or weight norms "
                    "(default auto: activation when calibration data is given)")
    pr.add_argument("--calib-data", help="prepared shards for activation importance (default: --recover-data)")
    pr.add_argument("--calib-batches", type=int, default=16, help="calibration batches of 8 windows (default 16)")
    pr.add_argument("--multiple-of", type=int, default=1, help="mlp: round the kept channels to a multiple (default 1)")
    pr.add_argument("--include-embeddings", action="store_true", help="magnitude: prune the token embedding too")
    pr.add_argument("--recover-data", help="prepared shards: fine-tune the pruned model on them (LM objective)")
    pr.add_argument("--recover-steps", type=int, default=200, help="recovery optimizer steps (default 200)")
    pr.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    pr.add_argument("overrides", nargs="*", metavar="key=value", help="recovery run settings")

    from .serve.commands import add_parser as add_serve_parser

    add_serve_parser(sub)

    sub.add_parser("presets", help="list the named model shapes")
    env = sub.add_parser(
        "env",
        help="this machine and the precision / kernels / threads chosen for it",
        description="Probe this machine (CPU model and ISA, torch's kernel level, usable cores, memory, GPUs), "
        "measure GEMM rates (fp32, bf16, int8/int4 weight-only kernels; cached per machine under "
        "$LMFORGE_CACHE or ~/.cache/lmforge) and print the choices lmforge makes from them, with the reason.",
    )
    env.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    env.add_argument("--no-measure", action="store_true", help="skip the GEMM measurement (cached rates still show)")
    env.add_argument("--refresh", action="store_true", help="measure again instead of using the cached rates")
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
    report = Path(out_dir) / "report.md"
    if report.is_file():
        print(f"  report: {report}")


def cmd_pretrain(args) -> None:
    from .config import load_config
    from .train.pretrain import PretrainConfig, run_pretrain

    cfg = load_config(PretrainConfig, "pretrain", args.recipe, args.overrides)
    _report_fit(run_pretrain(cfg, resume=args.resume), cfg.out_dir)


def cmd_finetune(args) -> None:
    from .config import load_config
    from .train.finetune import FinetuneConfig, run_finetune

    cfg = load_config(FinetuneConfig, "finetune", args.recipe, args.overrides)
    if args.preview is not None:
        from .train.finetune import preview_finetune

        print(preview_finetune(cfg, args.preview, color=sys.stdout.isatty()))
        return
    summary = run_finetune(cfg, resume=args.resume)
    if os.environ.get("RANK", "0") == "0":
        print(f"  checkpoint: {summary['checkpoint']}\n  summary: {Path(cfg.out_dir) / 'summary.json'}")
        if summary.get("report"):
            print(f"  report: {summary['report']}")


def cmd_adversarial(args) -> None:
    from .config import load_config
    from .train.adversarial import AdversarialRunConfig, run_adversarial

    cfg = load_config(AdversarialRunConfig, "adversarial", args.recipe, args.overrides)
    summary = run_adversarial(cfg, resume=args.resume)
    print(f"  checkpoint: {summary['checkpoint']}\n  samples: {summary.get('samples')}\n  curves: {summary.get('curves')}")


def cmd_merge(args) -> None:
    from .checkpoint.commands import merge_adapter

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


def cmd_attention(args) -> None:
    from .eval.attention import run_attention
    from .hardware import use_threads

    use_threads(args.threads)

    run_attention(
        args.checkpoint, args.text, out=args.out, layers=args.layers, heads=args.heads, max_tokens=args.max_tokens,
        top_k=args.top_k, chat=args.chat, device=args.device, dtype=args.dtype,
        quantize=None if args.quantize == "none" else args.quantize,
    )


def cmd_eval(args) -> None:
    from .eval.run import run_command

    run_command(args)


def cmd_quantize(args) -> None:
    from .checkpoint.commands import quantize_checkpoint

    path = quantize_checkpoint(args.checkpoint, args.out, args.method, args.group_size, overwrite=args.overwrite)
    size = (path / "model.safetensors").stat().st_size
    print(f"quantized {args.checkpoint} -> {path} ({args.method}, model.safetensors {size / 2**20:.1f} MiB)")


def cmd_prune(args) -> None:
    from .checkpoint.commands import prune_and_recover

    summary = prune_and_recover(
        args.checkpoint, args.out, args.method, args.ratio,
        recover_data=args.recover_data, recover_steps=args.recover_steps, recover_overrides=args.overrides,
        calib_data=args.calib_data, calib_batches=args.calib_batches, importance=args.importance,
        multiple_of=args.multiple_of, scope=args.scope, include_embeddings=args.include_embeddings,
        overwrite=args.overwrite,
    )
    rep = summary["prune"]
    if rep["method"] == "magnitude":
        what = f"sparsity {rep['sparsity']:.1%} of {rep['targets']} matrices ({rep['sparsity_all']:.1%} of all weights)"
    else:
        shape = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in rep["shape"].items())
        what = f"{shape}; params {rep['params'][0]:,} -> {rep['params'][1]:,} ({rep['importance']} importance)"
    print(f"pruned {args.checkpoint} ({rep['method']} {rep['ratio']}): {what}")
    rec = summary.get("recovery")
    if rec:
        before, after = (f"{v:.4f}" if v is not None else "n/a" for v in
                         (rec["val_loss_after_prune"], rec["val_loss_after_recovery"]))
        print(f"recovery: {rec['steps']} steps in {rec['wall_s']:.1f} s, val loss {before} after pruning -> {after}")
    print(f"  checkpoint: {summary['checkpoint']}")


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


def cmd_env(args) -> None:
    import json

    from . import hardware

    caps = hardware.probe()
    if args.refresh or not args.no_measure:
        hardware.measured_rates(caps, refresh=args.refresh)
    choices = hardware.describe_choices(caps)
    if args.json:
        print(json.dumps({"capabilities": caps.to_dict(), "choices": choices}, indent=2))
        return
    gib = lambda b: f"{b / 2**30:.1f} GiB" if b else "unknown"  # noqa: E731
    quota = f"cgroup quota {caps.cgroup_cpus:g} CPUs" if caps.cgroup_cpus is not None else "no cgroup CPU quota"
    limit = f"cgroup limit {gib(caps.memory_limit_bytes)}" if caps.memory_limit_bytes else "no cgroup memory limit"
    gpus = "; ".join(f"{g.index}: {g.name}, compute capability {g.capability[0]}.{g.capability[1]}, "
                     f"{gib(g.memory_bytes)}, bf16 {'yes' if g.bf16 else 'no'}" for g in caps.gpus)
    lines = [
        f"CPU      {caps.cpu_model} ({caps.arch})",
        f"ISA      {' '.join(caps.isa) or 'none of AVX2/AVX512/AMX/NEON/SVE reported'}",
        f"bf16     {'native' if caps.native_bf16 else 'not native (emulated by torch)'}",
        f"torch    {caps.torch_version}, CPU kernels {caps.torch_capability}, CUDA {caps.torch_cuda or 'none'}",
        f"env      {' '.join(f'{k}={v}' for k, v in sorted(caps.env.items())) or 'no kernel-limiting variables set'}",
        f"cores    {caps.cores} usable ({caps.affinity_cores} in the affinity mask, {quota})",
        f"memory   {gib(caps.memory_bytes)} ({limit})",
        f"GPUs     {gpus or ('none' + (' (Apple MPS available)' if caps.mps else ''))}",
        f"rates    {hardware.rates_line(caps)} on one thread"
        + (" (measured once per machine, cached)" if caps.rates else " (--no-measure: none cached)"),
        "",
        "choices:",
    ]
    for row in choices:
        lines.append(f"  {row['setting']}: {row['choice']}\n      {row['why']}")
    print("\n".join(lines))


def cmd_quickstart(args) -> None:
    from .quickstart import run_quickstart

    run_quickstart(args)


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
    from .checkpoint import resolve_checkpoint

    ckpt = resolve_checkpoint(args.checkpoint)
    if args.format == "hf":
        from .io.hf import export_hf

        path = export_hf(ckpt, args.out, overwrite=args.overwrite)
    else:
        from .io.gguf import export_gguf

        path = export_gguf(ckpt, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(f"exported {ckpt} -> {path}")


from .data.commands import ACTIONS  # noqa: E402 (the handler table below lists them)

HANDLERS: dict[tuple[str, str | None], Callable] = {
    ("quickstart", None): cmd_quickstart,
    ("tokenizer", "train"): cmd_tokenizer_train,
    ("data", "prepare"): cmd_data_prepare,
    **{("data", a): cmd_data_pipeline for a in ACTIONS},
    ("pretrain", None): cmd_pretrain,
    ("finetune", None): cmd_finetune,
    ("adversarial", None): cmd_adversarial,
    ("merge", None): cmd_merge,
    ("sample", None): cmd_sample,
    ("generate", None): cmd_generate,
    ("chat", None): cmd_chat,
    ("eval", None): cmd_eval,
    ("attention", None): cmd_attention,
    ("import", None): cmd_import,
    ("export", None): cmd_export,
    ("quantize", None): cmd_quantize,
    ("prune", None): cmd_prune,
    ("serve", None): cmd_serve,
    ("presets", None): cmd_presets,
    ("env", None): cmd_env,
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
