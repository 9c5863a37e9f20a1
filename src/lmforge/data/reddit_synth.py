"""Synthetic Pushshift-format Reddit dumps, for tests, benchmarks and trying the pipeline.

``lmforge data synth-reddit`` writes ``RC_<month>.zst`` (comments) and ``RS_<month>.zst``
(submissions): zstandard NDJSON with a 2 GiB window (``window_log=31``, like the real dumps,
which a default decompressor refuses), one object per line with the real field names.
Nothing in them is real: authors are ``user_<n>``, bodies are random sentences.

What the pipeline must cope with is planted at the configured rates: nested threads whose
comments are spread over the whole file (threads run concurrently), ``[deleted]`` and
``[removed]`` comments and submissions, bots (``AutoModerator`` and ``*bot`` names), HTML
entities, markdown, URL-only and emoji-only bodies, unicode, ``created_utc`` and ``score`` as
strings (the BigQuery copy), and malformed lines (cut JSON, invalid UTF-8, non-objects).
"""

from __future__ import annotations

import io
import random
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson

from ..config import to_dict
from ..errors import ConfigError
from ..fileio import atomic_write_json

WORDS = ["the", "a", "an", "this", "that", "it", "they", "we", "you", "people", "time", "year", "way", "day", "thing", "man", "world", "life", "hand", "part", "child", "eye", "woman", "place", "work", "week", "case", "point", "number", "group", "problem", "fact", "game", "team", "city", "music", "food", "car", "phone", "book", "reddit", "post", "comment", "thread", "question", "answer", "idea", "reason", "story", "movie", "show", "song", "code", "python", "model", "data", "is", "are", "was", "were", "be", "have", "has", "had", "do", "does", "did", "say", "said", "get", "got", "make", "made", "go", "went", "know", "think", "take", "see", "come", "want", "look", "use", "find", "give", "tell", "ask", "seem", "feel", "try", "leave", "call", "good", "new", "first", "last", "long", "great", "little", "own", "other", "old", "right", "big", "high", "different", "small", "large", "next", "early", "young", "important", "few", "public", "bad", "same", "able", "really", "just", "very", "also", "still", "even", "actually", "probably", "definitely", "maybe", "never", "always", "often", "sometimes", "because", "but", "and", "or", "so", "if", "when", "while", "although", "though", "since", "until", "unless", "however", "honestly", "basically"]
UNICODE_BITS = ["café", "naïve", "Zürich", "😂", "👍", "日本語", "Ελληνικά", "über", "🎉🎉", "résumé", "ñandú"]
SUBREDDITS = ["AskReddit", "learnpython", "worldnews", "aww", "science", "gaming", "books", "cooking"]
BOTS = ["AutoModerator", "RemindMeBot", "WikiTextBot", "converter-bot"]
_B36 = "0123456789abcdefghijklmnopqrstuvwxyz"


def base36(n: int) -> str:
    out = []
    while True:
        n, r = divmod(n, 36)
        out.append(_B36[r])
        if n == 0:
            return "".join(reversed(out))


@dataclass
class SynthRedditConfig:
    """Settings of ``lmforge data synth-reddit``."""

    out: str = "runs/reddit-synth"  # directory for RC_<month>.zst and RS_<month>.zst
    month: str = "2020-01"
    comments: int = 10_000
    submissions: int = 0  # 0 = comments / 25
    subreddits: list[str] = field(default_factory=lambda: list(SUBREDDITS))
    top_level_fraction: float = 0.3  # comments replying to the submission itself
    deleted_fraction: float = 0.03
    removed_fraction: float = 0.02
    bot_fraction: float = 0.02
    noise_fraction: float = 0.05  # URL-only, emoji-only, markdown, entities, unicode (each)
    string_fields_fraction: float = 0.05  # created_utc/score as strings, as in the BigQuery copy
    malformed_fraction: float = 0.001  # cut JSON, invalid UTF-8, non-object lines
    level: int = 3  # zstd level
    window_log: int = 31  # 2 GiB window, as the Pushshift dumps
    plain: bool = False  # write .ndjson instead of .zst
    seed: int = 0

    def validate(self) -> None:
        if self.comments < 1:
            raise ConfigError(f"comments must be at least 1, got {self.comments}")
        if self.submissions < 0:
            raise ConfigError(f"submissions must be 0 (auto) or more, got {self.submissions}")
        if not self.subreddits:
            raise ConfigError("subreddits must name at least one subreddit")
        check_dump_settings(self, ("top_level_fraction", "deleted_fraction", "removed_fraction", "bot_fraction",
                                   "noise_fraction", "string_fields_fraction", "malformed_fraction"))


def check_dump_settings(cfg: object, fractions: tuple[str, ...]) -> None:
    """The settings every dump writer shares: rates in [0, 1], ``window_log``, ``month``."""
    for name in fractions:
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise ConfigError(f"{name} must be in [0, 1], got {getattr(cfg, name)}")
    window_log, month = getattr(cfg, "window_log"), getattr(cfg, "month")
    if not 10 <= window_log <= 31:
        raise ConfigError(f"window_log must be in [10, 31], got {window_log}")
    try:
        time.strptime(month, "%Y-%m")
    except ValueError:
        raise ConfigError(f"month must be YYYY-MM, got {month!r}") from None


def zst_writer(path: Path, level: int = 3, window_log: int = 31) -> IO[bytes]:
    """A binary writer compressing to ``path`` with a long window, as the Pushshift dumps are."""
    import zstandard

    params = zstandard.ZstdCompressionParameters.from_level(level, window_log=window_log)
    raw = open(path, "wb")  # noqa: SIM115 (closed with the returned writer)
    return zstandard.ZstdCompressor(compression_params=params).stream_writer(raw, closefd=True)


class LineSink:
    """Buffered lines into a .zst (long window, as the Pushshift dumps) or plain file."""

    def __init__(self, path: Path, plain: bool = False, level: int = 3, window_log: int = 31) -> None:
        self.f = open(path, "wb") if plain else zst_writer(path, level, window_log)  # noqa: SIM115
        self.buf = io.BytesIO()

    def line(self, data: bytes) -> None:
        self.buf.write(data)
        self.buf.write(b"\n")
        if self.buf.tell() > 1 << 20:
            self.flush()

    def flush(self) -> None:
        self.f.write(self.buf.getvalue())
        self.buf = io.BytesIO()

    def close(self) -> None:
        self.flush()
        self.f.close()


class _Text:
    def __init__(self, rng: random.Random, noise: float) -> None:
        self.rng = rng
        self.noise = noise

    def sentence(self) -> str:
        words = self.rng.choices(WORDS, k=self.rng.randint(4, 16))
        return " ".join(words).capitalize() + self.rng.choice(".!?.")

    def body(self) -> str:
        rng = self.rng
        text = " ".join(self.sentence() for _ in range(rng.choice((1, 1, 1, 2, 2, 3, 5))))
        r = rng.random()
        n = self.noise
        if r < n:
            return f"https://i.imgur.com/{base36(rng.getrandbits(30))}.jpg"
        if r < 2 * n:
            return rng.choice(["😂😂😂", "👍", "🎉🎉", "...", "^^^", "¯\\\\_(ツ)_/¯"])
        if r < 3 * n:
            return f"**{text}** see [this link](https://example.com/{rng.randint(1, 999)}) and *more*"
        if r < 4 * n:
            return f"&gt; {self.sentence()}\n\n{text} &amp; more &lt;3"
        if r < 5 * n:
            return f"{text} {rng.choice(UNICODE_BITS)} {rng.choice(UNICODE_BITS)}"
        return text


def _malformed(rng: random.Random, good: bytes) -> bytes:
    kind = rng.randrange(3)
    if kind == 0:
        return good[: max(1, len(good) // 2)]  # cut JSON
    if kind == 1:
        return b'{"body": "bad \xff\xfe bytes", "id": "zz"}'  # invalid UTF-8
    return b'["not", "an", "object"]'


def synth_reddit(cfg: SynthRedditConfig, verbose: bool = True) -> dict[str, Any]:
    """Write a synthetic comments dump and submissions dump; returns what was written."""
    cfg.validate()
    rng = random.Random(cfg.seed)
    text = _Text(rng, cfg.noise_fraction)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ext = "ndjson" if cfg.plain else "zst"
    rc_path, rs_path = out / f"RC_{cfg.month}.{ext}", out / f"RS_{cfg.month}.{ext}"
    n_sub = cfg.submissions or max(1, cfg.comments // 25)
    start = int(time.mktime(time.strptime(cfg.month + "-01", "%Y-%m-%d")))
    span = 28 * 86400
    subs = []
    counts = {"comments": 0, "submissions": 0, "malformed": 0, "deleted": 0, "removed": 0, "bots": 0}

    def stringly(obj: dict[str, Any]) -> dict[str, Any]:
        if rng.random() < cfg.string_fields_fraction:
            obj["created_utc"] = str(obj["created_utc"])
            obj["score"] = str(obj["score"])
        return obj

    def emit(sink: LineSink, obj: dict[str, Any]) -> None:
        data = orjson.dumps(obj)
        if rng.random() < cfg.malformed_fraction:
            data = _malformed(rng, data)
            counts["malformed"] += 1
        sink.line(data)

    rs = LineSink(rs_path, cfg.plain, cfg.level, cfg.window_log)
    try:
        for i in range(n_sub):
            sid = base36(36**5 + i)
            sub = cfg.subreddits[rng.randrange(len(cfg.subreddits))]
            created = start + int(span * i / n_sub)
            selftext = " ".join(text.sentence() for _ in range(rng.randint(0, 3)))
            author = f"user_{rng.randrange(max(50, cfg.comments // 5))}"
            r = rng.random()
            if r < cfg.deleted_fraction:
                selftext, author = "[deleted]", "[deleted]"
            elif r < cfg.deleted_fraction + cfg.removed_fraction:
                selftext = "[removed]"
            subs.append((sid, sub, created, author))
            obj = {
                "id": sid, "title": text.sentence(), "selftext": selftext, "author": author,
                "subreddit": sub, "subreddit_id": f"t5_{base36(zlib.crc32(sub.encode()))}", "score": rng.randint(-5, 5000),
                "num_comments": 0, "created_utc": created, "is_self": bool(selftext), "over_18": False,
                "url": f"https://www.reddit.com/r/{sub}/comments/{sid}/", "permalink": f"/r/{sub}/comments/{sid}/",
                "retrieved_on": created + 3600, "stickied": False, "gilded": 0,
            }
            emit(rs, stringly(obj))
            counts["submissions"] += 1
    finally:
        rs.close()

    # Comments in time order; each goes to a thread among the active ones, so a thread's comments
    # are spread over the file. Replies go to recent comments of the thread, making nested chains.
    thread_comments: dict[int, list[tuple[str, str]]] = {}  # thread -> [(comment id, author)], recent
    rc = LineSink(rc_path, cfg.plain, cfg.level, cfg.window_log)
    try:
        n_users = max(50, cfg.comments // 5)
        for i in range(cfg.comments):
            cur = min(n_sub - 1, i * n_sub // cfg.comments)  # the newest submission by now
            t = cur - rng.randrange(min(cur + 1, 20)) if rng.random() < 0.8 else rng.randrange(cur + 1)
            sid, sub, s_created, _ = subs[t]
            cid = base36(36**6 + i)
            recent = thread_comments.setdefault(t, [])
            if not recent or rng.random() < cfg.top_level_fraction:
                parent = f"t3_{sid}"
            else:
                parent = "t1_" + recent[-1 - min(len(recent) - 1, int(rng.expovariate(0.7)))][0]
            author = f"user_{rng.randrange(n_users)}"
            body = text.body()
            r = rng.random()
            if r < cfg.deleted_fraction:
                body, author = "[deleted]", "[deleted]"
                counts["deleted"] += 1
            elif r < cfg.deleted_fraction + cfg.removed_fraction:
                body, author = "[removed]", "[deleted]"
                counts["removed"] += 1
            elif r < cfg.deleted_fraction + cfg.removed_fraction + cfg.bot_fraction:
                author = BOTS[rng.randrange(len(BOTS))]
                counts["bots"] += 1
            recent.append((cid, author))
            if len(recent) > 16:
                del recent[:8]
            created = max(s_created, start + int(span * i / cfg.comments))
            obj = {
                "id": cid, "parent_id": parent, "link_id": f"t3_{sid}", "body": body, "author": author,
                "score": rng.randint(-10, 500), "subreddit": sub, "subreddit_id": f"t5_{base36(zlib.crc32(sub.encode()))}",
                "created_utc": created, "retrieved_on": created + 86400, "controversiality": 0, "gilded": 0,
                "edited": False, "distinguished": None, "stickied": False, "author_flair_text": None,
                "is_submitter": False, "permalink": f"/r/{sub}/comments/{sid}/_/{cid}/",
            }
            emit(rc, stringly(obj))
            counts["comments"] += 1
    finally:
        rc.close()
    report = {"comments_file": str(rc_path), "submissions_file": str(rs_path), **counts, "config": to_dict(cfg)}
    atomic_write_json(out / f"synth_{cfg.month}.json", report)
    if verbose:
        print(
            f"synth-reddit: {counts['comments']:,} comments -> {rc_path} ({rc_path.stat().st_size / 1e6:.1f} MB), "
            f"{counts['submissions']:,} submissions -> {rs_path}; planted {counts['deleted']:,} deleted, "
            f"{counts['removed']:,} removed, {counts['bots']:,} bot, {counts['malformed']:,} malformed lines"
        )
    return report
