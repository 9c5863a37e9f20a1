"""``lmforge data reddit-dump``: human conversations -> a Pushshift-format month (RC_/RS_ .zst).

The quickstart's raw data. Where ``synth-reddit`` writes random words, this writes real human
conversations (by default the embedded Topical-Chat and Schema-Guided Dialogue conversations,
licences in ``data/finetune/README.md``) as Reddit threads, with what a real month of Reddit
holds planted at the configured rates, so that ``data reddit -> clean -> pii -> dedup`` each
have visible work:

- **threads**: 1 to ``per_thread`` conversations of one source (its subreddit, named after the
  input file) as sibling top-level comment chains under one submission; each turn is a comment
  replying to the turn before it, by one of the conversation's two authors; comments a few
  minutes apart, threads spread over the month and interleaved in the file (ids increase with
  time, as Reddit's do);
- **deleted / removed** comments: the body ``[deleted]`` (author ``[deleted]``) or
  ``[removed]``; the rest of that chain has lost its parent;
- **bots**: an ``AutoModerator`` comment opening some threads, and replies by bots (names
  ending in ``bot``) under some comments;
- **spam**: replies that are mostly links, under a conversation's first comment;
- **duplicates**: comment records emitted twice (a re-ingested dump), and conversations reposted
  in another thread by other authors, whole (exact duplicates) or with one word dropped (near);
- **PII**: an email address, phone number, URL, ``/u/`` name or IP address added to a comment
  (every planted value is listed in ``planted.json``, so a test can check that none survives);
- **Reddit's escaping**: ``&``, ``<`` and ``>`` written as HTML entities, as the API returns
  bodies; and a few **malformed lines** (cut JSON).

Output: ``RC_<month>.zst``, ``RS_<month>.zst`` (zstandard with a 2 GiB window, like the real
dumps) and ``planted.json`` (the counts of everything planted, and the planted PII values).
"""

from __future__ import annotations

import html
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from ..config import to_dict
from ..errors import ConfigError, DataError
from ..fileio import atomic_write_json
from .reddit_synth import LineSink, base36, check_dump_settings

#: The embedded human conversations (data/finetune/), the quickstart's default input.
EMBEDDED_CONVERSATIONS = ("sgd_chat_train.jsonl", "sgd_chat_val.jsonl",
                          "topicalchat_chat_train.jsonl", "topicalchat_chat_val.jsonl")

_FIRST = ["alex", "sam", "jo", "max", "kim", "lee", "pat", "ray", "sky", "dana", "robin", "casey"]
_SECOND = ["otter", "maple", "pixel", "comet", "falcon", "river", "cactus", "ember", "nova", "walrus"]
_BOTS = ["RemindMeBot", "WikiSummarizerBot", "converter-bot", "haikusbot"]
_BOT_TEXT = {
    "AutoModerator": "Welcome to r/{sub}! Please keep the discussion civil and on topic. *I am a bot, and this "
                     "action was performed automatically.*",
    "RemindMeBot": "I will be messaging you in 2 days on 2019-06-{day} UTC to remind you of this link. CLICK THIS "
                   "LINK to send a PM to also be reminded.",
    "WikiSummarizerBot": "**Summary** ^(Hi, I'm a bot that summarizes Wikipedia articles. Opt out: reply !delete)",
    "converter-bot": "{n} miles is {km} km. ^(I am a bot.)",
    "haikusbot": "*Did you know that there / is no written rule at all / about this, he said* - I detect haikus.",
}
_SPAM_SITES = ["cheap-followers.example", "crypto-gains.example", "free-giftcards.example"]
_PII_TEMPLATES = {
    "email": ["You can email me at {v} if you want to talk more.", "Drop me a line: {v}"],
    "phone": ["Text me at {v} sometime.", "My number is {v}, call after 6."],
    "url": ["I wrote about it here: {v}", "Found it at {v} by the way."],
    "user": ["Ask {v}, they know more about it.", "{v} posted the same thing yesterday."],
    "ip": ["My game server is at {v} if you want to join.", "It was logged from {v} apparently."],
}


@dataclass
class RedditDumpConfig:
    """Settings of ``lmforge data reddit-dump``."""

    inputs: list[str] = field(default_factory=list)  # conversation files ({"messages"} JSONL...); empty = embedded
    out: str = "runs/reddit-dump"  # directory for RC_<month>.zst, RS_<month>.zst and planted.json
    month: str = "2019-06"
    max_conversations: int = 0  # 0 = all; else a seeded sample of each input's share
    per_thread: int = 3  # conversations under one submission: 1 to this many (seeded)
    deleted_fraction: float = 0.003  # of conversation comments: [deleted] by their author
    removed_fraction: float = 0.002  # of conversation comments: [removed] by a moderator
    automod_fraction: float = 0.3  # of threads: an AutoModerator comment first
    bot_reply_fraction: float = 0.02  # of conversation comments: a bot replies under it
    spam_fraction: float = 0.03  # of conversations: a link-spam reply under the first comment
    duplicate_record_fraction: float = 0.01  # of comments: the record appears twice in the dump
    repost_fraction: float = 0.03  # of conversations: reposted whole in another thread
    near_repost_fraction: float = 0.02  # of conversations: reposted with one word dropped
    pii_fraction: float = 0.005  # of conversation comments: an email/phone/URL/user name/IP added
    malformed_lines: int = 3  # cut JSON lines (copies of real records, cut)
    level: int = 3  # zstd level
    window_log: int = 31  # 2 GiB window, as the Pushshift dumps
    seed: int = 0

    def validate(self) -> None:
        check_dump_settings(self, ("deleted_fraction", "removed_fraction", "automod_fraction", "bot_reply_fraction",
                                   "spam_fraction", "duplicate_record_fraction", "repost_fraction",
                                   "near_repost_fraction", "pii_fraction"))
        if self.deleted_fraction + self.removed_fraction > 1.0:
            raise ConfigError("deleted_fraction + removed_fraction must not exceed 1")
        if self.per_thread < 1:
            raise ConfigError(f"per_thread must be at least 1, got {self.per_thread}")
        if self.max_conversations < 0 or self.malformed_lines < 0:
            raise ConfigError("max_conversations and malformed_lines must not be negative")


def embedded_conversation_files() -> list[str]:
    from ..paths import embedded_data_dir

    return [str(embedded_data_dir() / "finetune" / name) for name in EMBEDDED_CONVERSATIONS]


def _read_conversations(inputs: list[str]) -> tuple[list[tuple[str, list[str]]], dict[str, Any]]:
    """``[(subreddit, turns)]`` from every input (a system turn dropped) and what was read."""
    from .examples import load_examples

    out: list[tuple[str, list[str]]] = []
    read: dict[str, Any] = {}
    for spec in inputs:
        es = load_examples(spec, "chat")
        sub = Path(spec).name.split(".")[0].split("_")[0] or "chat"
        n = 0
        for ex in es.examples:
            turns = [m["content"] for m in ex.get("messages", []) if m["role"] != "system"]
            if len(turns) >= 2:
                out.append((sub, turns))
                n += 1
        read[spec] = {"seen": es.stats.seen, "conversations": n, "rejected": dict(es.stats.rejected)}
    if not out:
        raise DataError(f"no conversations of two or more turns in {', '.join(inputs)}")
    return out, read


class _Planter:
    """Random choices of the planted noise, and its counts."""

    def __init__(self, cfg: RedditDumpConfig) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.counts: dict[str, int] = {}
        self.pii: list[dict[str, str]] = []

    def count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    def author(self) -> str:
        r = self.rng
        return f"{r.choice(_FIRST)}_{r.choice(_SECOND)}{r.randrange(10, 9999)}"

    def pii_value(self, kind: str) -> str:
        r = self.rng
        n = r.randrange(1000, 9999)
        if kind == "email":
            return f"{r.choice(_FIRST)}.{r.choice(_SECOND)}{n}@{r.choice(['gmail.com', 'yahoo.com', 'outlook.com', 'proton.me'])}"
        if kind == "phone":
            return r.choice([f"({r.randrange(201, 989)}) 555-{n}", f"{r.randrange(201, 989)}-555-{n}",
                             f"+44 20 7946 {n}", f"+1 212 555 {n}", f"{r.randrange(201, 989)}.555.{n}"])
        if kind == "url":
            return r.choice([f"https://www.{r.choice(_SECOND)}blog.com/posts/{n}", f"http://bit.ly/{base36(n * 7919)}",
                             f"www.{r.choice(_SECOND)}-{r.choice(_FIRST)}.org/p/{n}"])
        if kind == "user":
            return r.choice(["/u/", "u/"]) + f"{r.choice(_FIRST)}_{r.choice(_SECOND)}{n}"
        return f"{r.randrange(11, 223)}.{r.randrange(0, 255)}.{r.randrange(0, 255)}.{r.randrange(1, 254)}"

    def with_pii(self, text: str) -> str:
        kind = self.rng.choice(list(_PII_TEMPLATES))
        value = self.pii_value(kind)
        self.pii.append({"type": kind, "value": value})
        self.count(f"pii_{kind}")
        return f"{text} {self.rng.choice(_PII_TEMPLATES[kind]).format(v=value)}"

    def near_copy(self, turns: list[str]) -> list[str]:
        """The turns with one word dropped from the longest one."""
        i = max(range(len(turns)), key=lambda k: len(turns[k]))
        words = turns[i].split(" ")
        if len(words) < 3:
            return list(turns)
        j = self.rng.randrange(1, len(words) - 1)
        return [*turns[:i], " ".join(words[:j] + words[j + 1:]), *turns[i + 1:]]


def _threads(convs: list[tuple[str, list[str]]], p: _Planter) -> list[tuple[str, list[list[str]]]]:
    """Conversations grouped into threads of one subreddit, reposts added as threads of their own."""
    cfg, rng = p.cfg, p.rng
    by_sub: dict[str, list[list[str]]] = {}
    for sub, turns in convs:
        by_sub.setdefault(sub, []).append(turns)
    threads: list[tuple[str, list[list[str]]]] = []
    for sub in sorted(by_sub):
        todo = by_sub[sub]
        rng.shuffle(todo)
        while todo:
            k = rng.randint(1, cfg.per_thread)
            threads.append((sub, todo[:k]))
            todo = todo[k:]
    reposts: list[tuple[str, list[list[str]]]] = []
    for sub, group in threads:
        for turns in group:
            r = rng.random()
            if r < cfg.repost_fraction:
                reposts.append((sub, [list(turns)]))
                p.count("reposted_conversations")
            elif r < cfg.repost_fraction + cfg.near_repost_fraction:
                reposts.append((sub, [p.near_copy(turns)]))
                p.count("near_reposted_conversations")
    threads += reposts
    rng.shuffle(threads)  # reposts land anywhere in the month, before or after their original
    return threads


def build_reddit_dump(cfg: RedditDumpConfig, verbose: bool = True) -> dict[str, Any]:
    """Write the dump (see the module doc); returns what was written and planted."""
    cfg.validate()
    inputs = list(cfg.inputs) or embedded_conversation_files()
    convs, read = _read_conversations(inputs)
    p = _Planter(cfg)
    rng = p.rng
    if cfg.max_conversations and cfg.max_conversations < len(convs):
        convs = [convs[i] for i in sorted(rng.sample(range(len(convs)), cfg.max_conversations))]
    threads = _threads(convs, p)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    start = int(time.mktime(time.strptime(cfg.month + "-01", "%Y-%m-%d")))
    span = 28 * 86400

    submissions: list[dict[str, Any]] = []
    comments: list[dict[str, Any]] = []  # "key", "parent" (key or None), "thread", "created", "author", "body"

    def comment(thread: int, parent: int | None, created: int, author: str, body: str) -> int:
        comments.append({"key": len(comments), "parent": parent, "thread": thread, "created": created,
                         "author": author, "body": body})
        return len(comments) - 1

    for t, (sub, group) in enumerate(threads):
        sid = base36(36**5 + t)
        created = start + int(span * t / len(threads)) + rng.randrange(0, 3600)
        op = p.author()
        submissions.append({
            "id": sid, "title": f"{sub} conversations #{t + 1}", "selftext": "", "author": op, "subreddit": sub,
            "score": rng.randint(1, 300), "num_comments": 0, "created_utc": created, "is_self": True,
            "over_18": False, "url": f"https://www.reddit.com/r/{sub}/comments/{sid}/",
            "permalink": f"/r/{sub}/comments/{sid}/", "retrieved_on": created + 86400, "stickied": False,
        })
        clock = created + 30
        if rng.random() < cfg.automod_fraction:
            comment(t, None, clock, "AutoModerator", _BOT_TEXT["AutoModerator"].format(sub=sub))
            p.count("automoderator_comments")
        for turns in group:
            speakers = (p.author(), p.author())
            clock_c = clock + rng.randrange(60, 3 * 3600)
            parent = None
            first = None
            for i, text in enumerate(turns):
                clock_c += rng.randrange(40, 1800)
                author = speakers[i % 2]
                r = rng.random()
                if r < cfg.deleted_fraction:
                    body, author = "[deleted]", "[deleted]"
                    p.count("deleted_comments")
                elif r < cfg.deleted_fraction + cfg.removed_fraction:
                    body = "[removed]"
                    p.count("removed_comments")
                else:
                    body = p.with_pii(text) if rng.random() < cfg.pii_fraction else text
                parent = comment(t, parent, clock_c, author, body)
                if first is None:
                    first = parent
                if rng.random() < cfg.bot_reply_fraction:
                    bot = rng.choice(_BOTS)
                    n = rng.randrange(2, 400)
                    comment(t, parent, clock_c + rng.randrange(5, 600), bot,
                            _BOT_TEXT[bot].format(day=rng.randrange(10, 28), n=n, km=round(n * 1.609, 1)))
                    p.count("bot_replies")
            if rng.random() < cfg.spam_fraction:
                site = rng.choice(_SPAM_SITES)
                links = " ".join(f"https://{site}/{base36(rng.getrandbits(24))}" for _ in range(5))
                comment(t, first, clock + rng.randrange(60, 7200) + 3600, f"deals_{base36(rng.getrandbits(20))}",
                        f"FREE {links}")
                p.count("spam_replies")

    # ids in time order, as Reddit's increase; the file in time order, threads interleaved
    comments.sort(key=lambda c: (c["created"], c["key"]))
    ids = {c["key"]: base36(36**6 + i) for i, c in enumerate(comments)}
    sids = [s["id"] for s in submissions]
    rc_path, rs_path = out / f"RC_{cfg.month}.zst", out / f"RS_{cfg.month}.zst"
    sink = LineSink(rs_path, level=cfg.level, window_log=cfg.window_log)
    try:
        for s in sorted(submissions, key=lambda s: s["created_utc"]):
            sink.line(orjson.dumps(s))
    finally:
        sink.close()
    sink = LineSink(rc_path, level=cfg.level, window_log=cfg.window_log)
    late: list[bytes] = []  # duplicate records, re-emitted later in the file
    malformed = rng.sample(range(len(comments)), min(cfg.malformed_lines, len(comments)))
    try:
        for i, c in enumerate(comments):
            sid, sub = sids[c["thread"]], submissions[c["thread"]]["subreddit"]
            cid = ids[c["key"]]
            obj = {
                "id": cid, "parent_id": f"t1_{ids[c['parent']]}" if c["parent"] is not None else f"t3_{sid}",
                "link_id": f"t3_{sid}", "body": html.escape(c["body"], quote=False), "author": c["author"],
                "score": rng.randint(-3, 120), "subreddit": sub, "created_utc": c["created"],
                "retrieved_on": c["created"] + 86400, "controversiality": 0, "gilded": 0, "edited": False,
                "distinguished": "moderator" if c["author"] == "AutoModerator" else None, "stickied": False,
                "is_submitter": False, "permalink": f"/r/{sub}/comments/{sid}/_/{cid}/",
            }
            line = orjson.dumps(obj)
            sink.line(line)
            if rng.random() < cfg.duplicate_record_fraction:
                late.append(line)
                p.count("duplicate_records")
            if i in malformed:
                late.append(line[: len(line) // 2])
                p.count("malformed_lines")
            if len(late) > 8 or (late and i == len(comments) - 1):
                for extra in late:
                    sink.line(extra)
                late = []
    finally:
        sink.close()
    report = {
        "comments_file": str(rc_path), "submissions_file": str(rs_path), "inputs": read,
        "conversations": len(convs), "threads": len(threads), "comments": len(comments),
        "submissions": len(submissions), "planted": dict(sorted(p.counts.items())), "pii": p.pii,
        "config": to_dict(cfg),
    }
    atomic_write_json(out / "planted.json", report)
    if verbose:
        planted = ", ".join(f"{k} {v:,}" for k, v in report["planted"].items())
        print(f"reddit-dump: {len(convs):,} conversations -> {len(threads):,} threads, {len(comments):,} comments "
              f"-> {rc_path} ({rc_path.stat().st_size / 1e6:.1f} MB), {rs_path}\n  planted: {planted}")
    return report

