"""The quickstart's report card: ``<out>/report.md`` and ``<out>/summary.json``.

It answers "is it any good?": the base (for ``--base scratch``, the pretrained-only model) and
the fine-tuned chat model side by side on the same held-out human conversations (assistant-token
loss, reply length, distinct-n, the share of identical replies to different conversations, the
share of replies that end with the end-of-turn token), their replies to the same conversations,
and the checks of issue 18's acceptance computed from those figures. Beside it: what every data
stage kept and rejected (by reason), where the time went against the budget, the training runs'
curves, and each stage's actual config (read from the runs themselves).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from .config import QuickstartConfig

#: The figures compared, their labels, and whether lower is better.
COMPARED = (
    ("loss", "held-out assistant loss (nats/token)", True),
    ("perplexity", "held-out assistant perplexity", True),
    ("reply_tokens_mean", "reply length (tokens, mean)", None),
    ("reference_tokens_mean", "human reply length (tokens, mean)", None),
    ("distinct_1", "distinct-1", False),
    ("distinct_2", "distinct-2", False),
    ("identical_replies", "identical replies to different conversations", True),
    ("ended_with_eot", "replies ending with the end-of-turn token", False),
)
#: Issue 18's acceptance, checked on the measured figures.
MIN_LOSS_REDUCTION = 0.15
MAX_IDENTICAL = 0.10
MIN_EOT = 0.95
SAMPLES = 6


def _metrics(result: dict[str, Any]) -> dict[str, Any]:
    return result["rows"][0]["metrics"]


def _predictions(result: dict[str, Any]) -> list[dict[str, Any]]:
    path = result["rows"][0].get("predictions")
    if not path or not Path(path).is_file():
        return []
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def _stage_config(run: Path) -> dict[str, Any] | None:
    """A run's config as the run wrote it (model settings resolved: vocabulary, shape)."""
    path = run / "config.yaml"
    return yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None


def acceptance(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    reduction = 1.0 - after["loss"] / before["loss"]
    return {
        "loss_reduction": reduction,
        "loss_reduction_ok": reduction >= MIN_LOSS_REDUCTION,
        "identical_replies": after["identical_replies"],
        "identical_replies_ok": after["identical_replies"] <= MAX_IDENTICAL,
        "ended_with_eot": after["ended_with_eot"],
        "ended_with_eot_ok": after["ended_with_eot"] >= MIN_EOT,
    }


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def comparison_table(before: dict[str, Any], after: dict[str, Any], names: tuple[str, str]) -> str:
    lines = [f"| | {names[0]} | {names[1]} | change |", "|---|---:|---:|---:|"]
    for key, label, lower in COMPARED:
        if key not in before or key not in after:
            continue
        b, a = before[key], after[key]
        change = f"{(a - b) / b:+.1%}" if isinstance(b, (int, float)) and b else "-"
        lines.append(f"| {label} | {_fmt(b)} | {_fmt(a)} | {change} |")
    return "\n".join(lines)


def samples_markdown(before: list[dict[str, Any]], after: list[dict[str, Any]], names: tuple[str, str],
                     n: int = SAMPLES) -> str:
    def quote(text: str) -> str:
        return " ".join(text.split()) or "(empty)"

    parts = []
    for b, a in list(zip(before, after))[:n]:
        last_user = next((m["content"] for m in reversed(b["messages"]) if m["role"] == "user"), "")
        parts.append("\n".join([
            f"> **user** ({len(b['messages'])} turns before): {quote(last_user)}",
            ">",
            f"> **human reply:** {quote(b['reference'])}",
            ">",
            f"> **{names[0]}:** {quote(b['reply'])}",
            ">",
            f"> **{names[1]}:** {quote(a['reply'])}",
        ]))
    return "\n\n".join(parts)


def write_card(out: Path, *, cfg: QuickstartConfig, clock: Any, plan: Any, dump: dict[str, Any], data: Any,
               pretrain: dict[str, Any] | None, cpt: dict[str, Any] | None, sft: dict[str, Any],
               before: dict[str, Any], after: dict[str, Any], precision: str) -> dict[str, Any]:
    from .. import hardware
    from ..data.chat_pipeline import accounting, accounting_markdown, masked_pii
    from ..eval.run import plot_comparison
    from ..runs.report import write_report

    scratch = pretrain is not None
    names = ("pretrained only", "chat SFT") if scratch else ("base", "fine-tuned")
    m_before, m_after = _metrics(before), _metrics(after)
    checks = acceptance(m_before, m_after)
    rows = accounting(data.reports)
    caps = hardware.probe()
    machine = f"{caps.cpu_model}, torch capability {caps.torch_capability}, {caps.cores} cores"
    times = dict(clock.times)
    summary = {
        "base": cfg.base,
        "machine": machine,
        "precision": precision,
        "budget_s": clock.budget_s,
        "seconds": {**{k: round(v, 1) for k, v in times.items()}, "total_to_report": round(clock.elapsed(), 1)},
        "heldout_conversations": m_after.get("replies"),
        "before": {k: m_before[k] for k, _, _ in COMPARED if k in m_before},
        "after": {k: m_after[k] for k, _, _ in COMPARED if k in m_after},
        "acceptance": checks,
        "data": {"planted": dump["planted"], "stages": rows, "pii_masked": masked_pii(data.reports),
                 "train_conversations": data.reports["dedup"]["train"]["stats"]["kept"],
                 "val_conversations": data.reports["dedup"]["val"]["stats"]["kept"]},
        "sft": {k: sft.get(k) for k in ("method", "trainable_params", "total_params", "steps", "wall_s",
                                        "tokens_per_s", "peak_rss_mib", "checkpoint")},
    }
    if sft.get("budget"):
        summary["sft"]["budget"] = sft["budget"]
    if cpt is not None:
        summary["cpt"] = {k: cpt.get(k) for k in ("steps", "wall_s", "tokens_per_s", "checkpoint")}
    if scratch:
        summary["pretrain"] = {"sizing": pretrain["sizing"], "steps": pretrain["fit"]["steps"],
                               "tokens_per_s": pretrain["fit"]["tokens_per_s"], "final": pretrain["fit"]["final"]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")

    verdict = (f"held-out assistant loss {m_before['loss']:.3f} -> {m_after['loss']:.3f} "
               f"({checks['loss_reduction']:.1%} lower; wanted >= {MIN_LOSS_REDUCTION:.0%}: "
               f"{'met' if checks['loss_reduction_ok'] else 'NOT met'}), identical replies "
               f"{checks['identical_replies']:.0%} (<= {MAX_IDENTICAL:.0%}: {'met' if checks['identical_replies_ok'] else 'NOT met'}), "
               f"replies ending with the end-of-turn token {checks['ended_with_eot']:.0%} "
               f"(>= {MIN_EOT:.0%}: {'met' if checks['ended_with_eot_ok'] else 'NOT met'})")
    stage_rows = "\n".join(f"| {k} | {v:.0f} |" for k, v in times.items())
    tables = [
        ("Is it any good?", f"On {m_after.get('replies')} held-out human conversations (threads the model never saw, "
         f"each cut before a reply of its own, not a stock phrase), greedy replies of at most {cfg.reply_tokens} "
         f"tokens: {verdict}.\n\n" + comparison_table(m_before, m_after, names)),
        ("Replies side by side", samples_markdown(_predictions(before), _predictions(after), names)),
        ("Data: every record kept or rejected", "Planted in the dump: " + ", ".join(
            f"{k.replace('_', ' ')} {v:,}" for k, v in dump["planted"].items()) + ".\n\n"
         + accounting_markdown(rows, masked_pii(data.reports))),
        ("Time", f"Budget {clock.budget_s / 60:g} min (--minutes), report written after "
         f"{clock.elapsed() / 60:.1f} min on {machine}, {precision}.\n\n"
         f"| stage | seconds |\n|---|---:|\n{stage_rows}\n\n```\n{plan.describe()}\n```"),
    ]
    both = [dict(before["rows"][0], model=names[0]), dict(after["rows"][0], model=names[1])]
    compare = plot_comparison(both, "chat", out / "plots" / "heldout-compare.png", "held-out conversations: side by side")
    figures = [(f"held-out conversations: {names[0]} against {names[1]}", compare)] if compare else []
    for caption, path in [("pretraining loss", out / "pretrain" / "plots" / "loss.png"),
                          ("continued pretraining loss", out / "cpt" / "plots" / "loss.png"),
                          ("chat SFT loss", out / "chat" / "plots" / "loss.png")]:
        if path.is_file():
            figures.append((caption, path))
    links = [f"[{name}]({name}/report.md)" for name in ("pretrain", "cpt", "chat") if (out / name / "report.md").is_file()]
    links += [f"[eval {w}](eval/{w}/report.md)" for w in ("before", "after")]
    notes = (f"Base: `{cfg.base}`. Stage reports: {', '.join(links)}. Talk to it: `lmforge chat {out / 'chat'}`; "
             f"serve it: `lmforge serve {out / 'chat'}`. Figures in `summary.json`.")
    config = {name: c for name in ("pretrain", "cpt", "chat") if (c := _stage_config(out / name)) is not None}
    title = ("lmforge quickstart: a chatbot from scratch" if scratch
             else f"lmforge quickstart: {cfg.base} adapted to human conversations")
    report = write_report(out, title=title, summary={"before": summary["before"], "after": summary["after"],
                                                     "acceptance": checks},
                          figures=figures, tables=tables, notes=notes, config=config)
    return {"report": str(report), "summary": summary}
