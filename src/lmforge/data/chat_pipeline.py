"""Reddit dumps -> training conversations in one call: ``data reddit -> clean -> pii -> dedup``.

The chain the README shows one command at a time, as the quickstart runs it: each stage is its
own command's function with its own recipe (``recipes/data-<stage>/<recipe>.yaml``), on both
splits of the reddit stage (the validation split deduplicated against the training split, so
no conversation is on both sides). Every stage accounts for every record it reads
(``seen == kept + sum(rejected)``); :func:`accounting` gathers those counts into one table.

Layout under ``out``: ``reddit/`` (train.jsonl, val.jsonl, stats.json), then ``clean/``,
``pii/`` and ``dedup/``, each with ``train.jsonl`` and ``val.jsonl`` and their
``*.stats.json``; the last stage's files are the training and held-out conversations.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError

SPLITS = ("train", "val")


@dataclass
class ChatData:
    train: Path  # the conversations to train on
    val: Path  # held-out conversations (other threads, none repeating a training one)
    reports: dict[str, Any]  # stage -> its report ({"train": ..., "val": ...} for the record stages)


def run_chat_pipeline(inputs: list[str], out: str | Path, *, recipe: str = "quickstart",
                      overrides: dict[str, list[str]] | None = None, verbose: bool = True) -> ChatData:
    """Run the four stages on ``inputs`` (dumps) into ``out``; ``overrides``: stage -> key=value list."""
    from ..config import load_config
    from .clean import CleanConfig, run_clean
    from .dedup import DedupConfig, run_dedup
    from .pii import PiiConfig, run_pii
    from .reddit import RedditConfig, run_reddit

    out = Path(out)
    more = overrides or {}

    def config(cls: type, stage: str, settings: list[str]) -> Any:
        return load_config(cls, f"data-{stage}", recipe, [*settings, *more.get(stage, [])])

    reports: dict[str, Any] = {}
    reddit = config(RedditConfig, "reddit", [f"inputs=[{','.join(inputs)}]", f"out={out / 'reddit'}"])
    reports["reddit"] = run_reddit(reddit, verbose=verbose)
    previous = out / "reddit"
    for stage, cls, run in (("clean", CleanConfig, run_clean), ("pii", PiiConfig, run_pii),
                            ("dedup", DedupConfig, run_dedup)):
        reports[stage] = {}
        for split in SPLITS:
            settings = [f"inputs=[{previous / f'{split}.jsonl'}]", f"out={out / stage / f'{split}.jsonl'}"]
            if stage == "dedup" and split == "val":
                settings.append(f"against=[{out / stage / 'train.jsonl'}]")
            reports[stage][split] = run(config(cls, stage, settings), verbose=verbose)
        previous = out / stage
    data = ChatData(previous / "train.jsonl", previous / "val.jsonl", reports)
    for split in SPLITS:
        if reports["dedup"][split]["stats"]["kept"] == 0:
            raise DataError(f"no {split} conversations are left after the data stages: see {out}/*/{split}.stats.json")
    return data


def accounting(reports: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per stage and unit: ``{"stage", "unit", "seen", "kept", "rejected": {reason: n}}``,
    in pipeline order; each row holds ``seen == kept + sum(rejected)``."""
    rows = []
    r = reports["reddit"]
    for unit, key in (("input lines", "records"), ("comments in threads", "comments"),
                      ("candidate conversations", "conversations")):
        s = r[key]
        rows.append({"stage": "reddit", "unit": unit, "seen": s["seen"], "kept": s["kept"], "rejected": dict(s["rejected"])})
    for stage in ("clean", "pii", "dedup"):
        for split in SPLITS:
            s = reports[stage][split]["stats"]
            rows.append({"stage": stage, "unit": f"{split} conversations", "seen": s["seen"], "kept": s["kept"],
                         "rejected": dict(s["rejected"])})
    return rows


def accounting_markdown(rows: list[dict[str, Any]], masked: dict[str, int] | None = None) -> str:
    """The accounting as a markdown table (and the PII masked, by type)."""
    lines = ["| stage | unit | in | kept | rejected (by reason) |", "|---|---|---:|---:|---|"]
    for row in rows:
        rejected = ", ".join(f"{k} {v:,}" for k, v in sorted(row["rejected"].items(), key=lambda kv: -kv[1])) or "-"
        lines.append(f"| {row['stage']} | {row['unit']} | {row['seen']:,} | {row['kept']:,} | {rejected} |")
    if masked:
        lines.append("")
        lines.append("PII masked (spans, both splits): " + ", ".join(f"{k} {v:,}" for k, v in masked.items() if v) + ".")
    return "\n".join(lines)


def masked_pii(reports: dict[str, Any]) -> dict[str, int]:
    total: dict[str, int] = {}
    for split in SPLITS:
        for k, v in reports["pii"][split].get("masked", {}).items():
            total[k] = total.get(k, 0) + v
    return total
