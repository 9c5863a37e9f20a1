"""`lmforge quickstart`: the whole life of a chatbot on embedded data, then a server.

data -> tokenizer -> pretrain -> chat SFT -> eval -> report -> serve, each stage through the
same function its own command runs:

1. **data**: Tiny Shakespeare and the Schema-Guided Dialogue training conversations (rendered
   with the ChatML template the chatbot will use, one document each) -> ``<out>/corpus/``;
2. **tokenizer**: a byte-level BPE trained on that corpus, ChatML's tokens special;
3. **pretrain**: a small Llama-style model from scratch (recipe ``pretrain/quickstart``) on the
   token shards of the corpus, 5% of documents held out;
4. **chat SFT**: full fine-tuning on the SGD training conversations, loss on assistant tokens only
   (recipe ``finetune/quickstart-chat``), validated on the held-out SGD conversations;
5. **eval**: ``lmforge eval`` of the pretrained and the chat model side by side on the held-out
   Tiny Shakespeare tail (perplexity, bits per byte), the held-out SGD conversations
   (assistant-token loss, replies, distinct-n) and next-utterance multiple choice;
6. **report**: ``<out>/report.md`` with every stage's figures and links to the stage reports;
7. **serve**: the OpenAI-compatible server with the web chat page on the chat model
   (``--no-serve`` stops after the report).

Overrides (``key=value``) refine the pretrain recipe; ``--sft KEY=VALUE`` the SFT recipe.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from .errors import ConfigError

PRETRAIN_RECIPE = "quickstart"
SFT_RECIPE = "quickstart-chat"
EVAL_TASKS = ("tinyshakespeare", "sgd-chat", "sgd-next-utterance")


def add_parser(sub: Any) -> None:
    q = sub.add_parser(
        "quickstart",
        help="the whole pipeline on embedded data: data, tokenizer, pretrain, chat SFT, eval, report, serve",
        description="Build a chatbot from scratch on embedded data (Tiny Shakespeare + Schema-Guided Dialogue "
        "conversations): corpus, BPE tokenizer, pretraining, chat SFT, evaluation, a report card, then the "
        "OpenAI-compatible server with its web chat page.",
        epilog="key=value overrides refine the pretrain recipe (recipes/pretrain/quickstart.yaml), e.g. "
        "train.max_steps=200; --sft train.max_steps=50 refines recipes/finetune/quickstart-chat.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    q.add_argument("--out", default="runs/quickstart", help="run directory (default runs/quickstart)")
    q.add_argument("--recipe", default=PRETRAIN_RECIPE, help=f"pretrain recipe (default {PRETRAIN_RECIPE})")
    q.add_argument("--sft", action="append", default=[], metavar="KEY=VALUE", help="an override of the chat SFT recipe")
    q.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary (default 2048)")
    q.add_argument("--eval-limit", type=int, default=50,
                   help="a seeded sample of N examples per eval task (default 50; the perplexity task is scored whole)")
    q.add_argument("--no-serve", action="store_true", help="stop after the report instead of serving the chatbot")
    q.add_argument("--host", default="127.0.0.1", help="serve on this address (default 127.0.0.1)")
    q.add_argument("--port", type=int, default=8000, help="serve on this port (default 8000)")
    q.add_argument("overrides", nargs="*", metavar="key=value")


def build_corpus(out: Path) -> Path:
    """Tiny Shakespeare (one document) and each SGD training conversation rendered with ChatML
    (one document each) as ``<out>/corpus.jsonl``; the conversations teach the turn format."""
    from .data.examples import load_examples
    from .paths import embedded_data_dir
    from .tokenizer.chat import CHATML, ChatTemplate

    data = embedded_data_dir()
    template = ChatTemplate(CHATML, {})
    chats = load_examples(str(data / "finetune" / "sgd_chat_train.jsonl"), "chat")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        f.write(json.dumps({"text": (data / "tinyshakespeare.txt").read_text(encoding="utf-8")}) + "\n")
        for ex in chats.examples:
            f.write(json.dumps({"text": template.render(ex["messages"], add_generation_prompt=False)}) + "\n")
    print(f"  {out}: Tiny Shakespeare + {len(chats):,} conversations ({out.stat().st_size / 2**20:.1f} MiB)")
    return out


def _stage(i: int, name: str) -> float:
    print(f"\n[{i}/7] {name}", flush=True)
    return time.perf_counter()


def run_quickstart(args: argparse.Namespace) -> dict[str, Any]:
    from .config import load_config
    from .data.prepare import DataPrepareConfig, run_prepare
    from .eval.run import EvalOptions, run_eval
    from .paths import embedded_data_dir
    from .tokenizer.train import TokenizerTrainConfig, run_train
    from .train.finetune import FinetuneConfig, run_finetune
    from .train.pretrain import PretrainConfig, run_pretrain

    if args.eval_limit is not None and args.eval_limit < 1:
        raise ConfigError(f"--eval-limit must be at least 1, got {args.eval_limit}")
    out = Path(args.out)
    times: dict[str, float] = {}
    start = t = _stage(1, "data: Tiny Shakespeare + Schema-Guided Dialogue conversations")
    corpus = build_corpus(out / "corpus.jsonl")
    times["data"] = time.perf_counter() - t

    t = _stage(2, f"tokenizer: byte-level BPE, {args.vocab_size:,} tokens")
    run_train(TokenizerTrainConfig(inputs=[str(corpus)], kind="bpe", vocab_size=args.vocab_size,
                                   out=str(out / "tokenizer")))
    run_prepare(DataPrepareConfig(inputs=[str(corpus)], tokenizer=str(out / "tokenizer"), out=str(out / "data"),
                                  val_fraction=0.05, val_split="document"))
    times["tokenizer"] = time.perf_counter() - t

    t = _stage(3, f"pretrain: recipe {args.recipe}")
    base = [f"data={out / 'data'}", f"out_dir={out / 'pretrain'}", "overwrite=true"]
    pcfg = load_config(PretrainConfig, "pretrain", args.recipe, base + list(args.overrides))
    fit = run_pretrain(pcfg)
    times["pretrain"] = time.perf_counter() - t

    t = _stage(4, f"chat SFT: recipe {SFT_RECIPE}")
    finetune_data = embedded_data_dir() / "finetune"
    sbase = [f"base={out / 'pretrain'}", f"out_dir={out / 'chat'}", "overwrite=true",
             f"data.train=[{finetune_data / 'sgd_chat_train.jsonl'}]", f"data.val=[{finetune_data / 'sgd_chat_val.jsonl'}]"]
    scfg = load_config(FinetuneConfig, "finetune", SFT_RECIPE, sbase + list(args.sft))
    sft = run_finetune(scfg)
    times["sft"] = time.perf_counter() - t

    t = _stage(5, f"eval: {', '.join(EVAL_TASKS)}")
    opts = EvalOptions(limit=args.eval_limit, batch_size=8, chat="on")
    ev = run_eval([str(out / "pretrain"), str(out / "chat")], list(EVAL_TASKS), opts, out / "eval")
    times["eval"] = time.perf_counter() - t

    t = _stage(6, "report")
    report = _write_card(out, fit, sft, ev, times, pcfg, scfg)
    times["report"] = time.perf_counter() - t
    total = time.perf_counter() - start
    print(f"  {report}\n\npipeline done in {total / 60:.1f} min "
          f"({', '.join(f'{k} {v:.0f} s' for k, v in times.items())})", flush=True)
    result = {"report": str(report), "chat": sft["checkpoint"], "seconds": times, "total_seconds": total}
    if not args.no_serve:
        _stage(7, f"serve: http://{args.host}:{args.port}/ (web chat page; OpenAI API at /v1; Ctrl-C stops)")
        from .cli import build_parser, cmd_serve

        cmd_serve(build_parser().parse_args(["serve", str(out / "chat"), "--host", args.host, "--port", str(args.port),
                                             "--model-name", "quickstart-chat"]))
    return result


def _write_card(out: Path, fit, sft: dict[str, Any], ev: dict[str, Any], times: dict[str, float], pcfg, scfg) -> Path:
    from .config import to_dict
    from .eval.report import write_report
    from .eval.run import HEADLINE, results_table
    from .infer.chat import ChatSession
    from .infer.engine import load_engine
    from .infer.sampling import SamplingParams
    from .tokenizer.chat import ChatTemplate

    rows = ev["rows"]
    tables = [("Stages", "| stage | seconds |\n|---|---:|\n" + "\n".join(f"| {k} | {v:.0f} |" for k, v in times.items()))]
    for task in dict.fromkeys(r["task"] for r in rows):
        trows = [r for r in rows if r["task"] == task]
        tables.append((f"Eval: {task}", results_table(trows, trows[0]["kind"])))
    engine = load_engine(str(out / "chat"), max_batch_size=1)
    session = ChatSession(engine, ChatTemplate.from_checkpoint(engine.checkpoint),
                          SamplingParams(max_tokens=48, temperature=0.0))
    exchanges = []
    for question in ("I want to find a restaurant in San Jose.", "Can you check the weather for tomorrow?"):
        session.reset()
        exchanges.append(f"> **user:** {question}\n>\n> **assistant:** {''.join(session.send(question)).strip()}")
    tables.append(("Chat samples (greedy)", "\n\n".join(exchanges)))
    figures = []
    for caption, path in [("pretraining loss", out / "pretrain" / "plots" / "loss.png"),
                          ("chat SFT loss", out / "chat" / "plots" / "loss.png"),
                          *[(f"eval: {r['task']} side by side", out / "eval" / r["task"] / "compare.png") for r in rows]]:
        if path.is_file() and all(path != f for _, f in figures):
            figures.append((caption, path))
    summary = {
        "pretrain": {"steps": fit.steps, **{k: v for k, v in fit.final.items()}},
        "chat SFT": {"before": sft.get("before") or {}, "after": sft.get("after") or {}},
        "eval": {f"{r['task']}/{r['model']}": {k: r["metrics"][k] for k in HEADLINE[r["kind"]][:2] if k in r["metrics"]}
                 for r in rows},
    }
    notes = ("Stage reports: [pretrain](pretrain/report.md), [chat SFT](chat/report.md), [eval](eval/report.md). "
             "Chat with the model: `lmforge chat " + str(out / "chat") + "`; serve it: `lmforge serve " + str(out / "chat") + "`.")
    return write_report(out, title="lmforge quickstart: a chatbot from scratch", summary=summary,
                        figures=figures, tables=tables, notes=notes,
                        config={"pretrain": to_dict(pcfg), "chat_sft": to_dict(scfg)})
