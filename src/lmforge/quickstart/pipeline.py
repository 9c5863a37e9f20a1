"""The quickstart's pipeline, stage by stage (the package's docstring tells the whole story)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from .config import QuickstartConfig, data_overrides

SCRATCH_SFT_RECIPE = "quickstart-chat"
PRETRAINED_SFT_RECIPE = "quickstart-smol"
MIN_TRAINING_S = 30.0  # less, and the budget cannot hold even the speed measurement of a 135M model's steps


# ------------------------------------------------------------------------------ data
def build_data(out: Path, cfg: QuickstartConfig, verbose: bool = True):
    """Dump -> data stages -> (ChatData, held-out file, SFT validation file, dump report)."""
    from ..config import load_config
    from ..data.chat_pipeline import run_chat_pipeline
    from ..data.reddit_dump import RedditDumpConfig, build_reddit_dump

    more = data_overrides(cfg.data)
    dump_cfg = load_config(RedditDumpConfig, "data-reddit-dump", None, [f"out={out / 'dump'}", *more.pop("dump", [])])
    dump = build_reddit_dump(dump_cfg, verbose=verbose)
    data = run_chat_pipeline([str(out / "dump")], out / "data", overrides=more, verbose=verbose)
    heldout, sft_val = split_heldout(data.val, cfg.heldout, out / "data", train=data.train)
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
    train_convs = ([json.loads(line)["messages"] for line in train.read_text(encoding="utf-8").splitlines()
                    if line.strip()] if train else [])
    texts = Counter(_norm(m["content"]) for msgs in train_convs + convs for m in msgs if m["role"] == "assistant")
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
def run_quickstart(cfg: QuickstartConfig) -> dict[str, Any]:
    from .. import hardware
    from ..eval.run import EvalOptions, run_eval
    from .card import write_card
    from .plan import Clock

    if cfg.base != "scratch":
        from ..io.base_model import check_base

        check_base(cfg.base)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    clock = Clock(cfg.minutes * 60.0)
    scratch = cfg.base == "scratch"
    precision = hardware.resolve_precision("auto", "cpu")
    clock.total_stages = 6 + (cfg.cpt_share > 0) + (not cfg.no_serve)
    print(f"lmforge quickstart: {cfg.minutes:g} min budget, base {cfg.base}, {precision} on "
          f"{hardware.probe().cpu_model} ({hardware.probe().torch_capability})", flush=True)

    clock.stage("data: Reddit dump of the embedded conversations -> reddit -> clean -> pii -> dedup")
    data, heldout, sft_val, dump = build_data(out, cfg)
    task = heldout_task(heldout, cfg.reply_tokens)
    clock.done("data")
    opts = EvalOptions(batch_size=min(cfg.heldout, 20), precision="auto")

    pretrain = None
    if scratch:
        from .scratch import pretrain_scratch

        clock.stage("base: BPE tokenizer + pretraining from scratch (sized from measured speed)")
        pretrain = pretrain_scratch(out, data.train, cfg, clock)
        base = Path(pretrain["run"])
        clock.done("pretrain")
    else:
        from ..io.base_model import resolve_base

        clock.stage(f"base: {cfg.base}")
        base, described = resolve_base(cfg.base, out / "base")
        print(f"  {described}", flush=True)
        clock.done("base")

    clock.stage("eval before fine-tuning: the base on the held-out conversations")
    before = run_eval([str(base)], [str(task)], opts, out / "eval" / "before")
    clock.done("eval_before")

    from .plan import plan_training

    plan = plan_training(clock, eval_s=clock.times["eval_before"], scratch=scratch, cpt_share=cfg.cpt_share)
    print(plan.describe(), flush=True)
    if plan.sft_s < MIN_TRAINING_S:
        print(f"  warning: {cfg.minutes:g} min leave {plan.sft_s:.0f} s of training after the stages measured so far "
              f"({plan.spent_s:.0f} s) and the reserve; the run will overrun its budget (give --minutes more)",
              flush=True)

    sft_base = base
    cpt = None
    recipe = SCRATCH_SFT_RECIPE if scratch else PRETRAINED_SFT_RECIPE
    if plan.cpt_s > 0:
        clock.stage(f"continued pretraining: every token of the conversations, {plan.cpt_s / 60:.1f} min")
        cpt = finetune_stage(out / "cpt", base, data.train, sft_val, plan.cpt_s, recipe=recipe, overrides=cfg.sft, cpt=True)
        sft_base = Path(cpt["checkpoint"])
        clock.done("cpt")

    clock.stage(f"chat SFT: assistant tokens of the conversations, {clock.left_for_training(plan) / 60:.1f} min")
    sft = finetune_stage(out / "chat", sft_base, data.train, sft_val, clock.left_for_training(plan), recipe=recipe,
                         overrides=cfg.sft)
    clock.done("sft")

    clock.stage("eval after fine-tuning: the chat model on the same held-out conversations")
    after = run_eval([str(out / "chat")], [str(task)], opts, out / "eval" / "after")
    clock.done("eval_after")

    clock.stage("report card")
    card = write_card(out, cfg=cfg, clock=clock, plan=plan, dump=dump, data=data, pretrain=pretrain, cpt=cpt,
                      sft=sft, before=before, after=after, precision=precision)
    clock.done("report")
    print(f"  {card['report']}\n\npipeline done in {clock.elapsed() / 60:.1f} min "
          f"({', '.join(f'{k} {v:.0f} s' for k, v in clock.times.items())})", flush=True)
    result = {**card, "chat": sft["checkpoint"], "seconds": dict(clock.times), "total_seconds": clock.elapsed()}
    if not cfg.no_serve:
        clock.stage(f"serve: http://{cfg.host}:{cfg.port}/ (web chat page; OpenAI API at /v1; Ctrl-C stops)")
        from ..commands.serve import ServeCommandConfig, run_serve

        run_serve(ServeCommandConfig(checkpoint=str(out / "chat"), host=cfg.host, port=cfg.port,
                                     model_name="quickstart-chat"))
    return result


def finetune_stage(run: Path, base: Path, train: Path, val: Path, seconds: float, *, recipe: str,
                   overrides: list[str] | tuple[str, ...] = (), cpt: bool = False) -> dict[str, Any]:
    """Chat SFT (or, ``cpt``, continued pretraining: the same conversations with loss on every
    token, all weights) of ``base`` for ``seconds`` (``train.max_minutes``) with ``recipe``."""
    from ..config import load_config
    from ..train.finetune import FinetuneConfig, run_finetune

    settings = [f"base={base}", f"out_dir={run}", "overwrite=true", f"data.train=[{train}]", f"data.val=[{val}]",
                f"train.max_minutes={max(seconds, 1.0) / 60:.4f}"]
    if cpt:
        settings += ["sft.assistant_only=false", "peft.method=none"]
    cfg = load_config(FinetuneConfig, "finetune", recipe, settings + list(overrides))
    return run_finetune(cfg)
