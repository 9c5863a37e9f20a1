"""PII masking: precision and recall on a generated labelled set, placeholders, counts, the stage."""

from __future__ import annotations

import json
import random

import pytest

from lmforge.cli import main
from lmforge.data.pii import PiiConfig, PiiMasker, luhn_ok, run_pii
from lmforge.errors import ConfigError

FIRST = ["john", "maria", "li", "ahmed", "olga", "sam", "priya", "kenji", "ana", "tom"]
LAST = ["smith", "garcia", "wang", "khan", "ivanova", "lee", "patel", "sato", "silva", "brown"]
DOMAINS = ["example.com", "mail.co.uk", "uni-bonn.de", "corp.example.org", "gmail.com", "post.io"]


def _luhn_complete(prefix: str, length: int, rng: random.Random) -> str:
    body = prefix + "".join(str(rng.randrange(10)) for _ in range(length - len(prefix) - 1))
    for d in "0123456789":
        if luhn_ok(body + d):
            return body + d
    raise AssertionError


def _group(digits: str, sizes: list[int], sep: str) -> str:
    out, i = [], 0
    for s in sizes:
        out.append(digits[i : i + s])
        i += s
    return sep.join(out)


def make_pii(kind: str, rng: random.Random) -> str:
    d = lambda n: "".join(str(rng.randrange(10)) for _ in range(n))
    if kind == "email":
        sep = rng.choice([".", "_", "", "+tag."])
        return f"{rng.choice(FIRST)}{sep}{rng.choice(LAST)}{rng.randrange(100)}@{rng.choice(DOMAINS)}"
    if kind == "phone":
        area = str(rng.randint(201, 989))
        return rng.choice([
            f"({area}) {d(3)}-{d(4)}", f"{area}-{d(3)}-{d(4)}", f"{area}.{d(3)}.{d(4)}", f"+1 {area}-{d(3)}-{d(4)}",
            f"+44 20 {d(4)} {d(4)}", f"+49 30 {d(7)}", f"1-800-{d(3)}-{d(4)}", f"+33 1 {d(2)} {d(2)} {d(2)} {d(2)}",
            f"+61 2 {d(4)} {d(4)}",
        ])
    if kind == "url":
        path = rng.choice(["", "/", "/path/to/page", "/a?q=1&b=two", "/wiki/Foo_(bar)", "/x.html#frag"])
        return rng.choice(["https://", "http://", "https://www.", "www."]) + rng.choice(DOMAINS) + path
    if kind == "ip":
        if rng.random() < 0.8:
            return ".".join(str(rng.randrange(256)) for _ in range(4))
        return rng.choice(["2001:db8::1", "fe80::1ff:fe23:4567:890a", "2001:0db8:85a3:0000:0000:8a2e:0370:7334", "::1"])
    if kind == "card":
        prefix, length, sizes = rng.choice([("4", 16, [4, 4, 4, 4]), ("51", 16, [4, 4, 4, 4]), ("37", 15, [4, 6, 5])])
        return _group(_luhn_complete(prefix, length, rng), sizes, rng.choice([" ", "-", ""]))
    if kind == "user":
        name = rng.choice(FIRST) + rng.choice(["_", "-", ""]) + rng.choice(LAST) + str(rng.randrange(1000))
        return rng.choice(["u/", "/u/"]) + name
    raise AssertionError(kind)


TEMPLATES = [
    "Contact me at {x} if you need anything.", "My details: {x}.", "see {x}", "({x})", "{x}, thanks!",
    "Hey, reach out to {x} tomorrow", "I wrote it down as {x}; let me know.", "\"{x}\" is what they said",
    "lol {x}", "Send it to {x} or call me.", "Old one was {x}\nNew one soon.",
]
# Look-alikes that must stay untouched: dates, times, prices, versions, ids, timestamps,
# a 16-digit number failing Luhn, subreddits, ratios, scores.
DISTRACTORS = [
    "It happened on 2023-01-15 at 10:30:45.", "Price is $1,234.56 now.", "Update to v1.2.3 please.",
    "Pi is 3.14159 roughly.", "Order #12345678 shipped.", "created_utc 1577836800 in the dump",
    "Card 4111 1111 1111 1112 was declined (bad checksum).", "Posted in r/AskReddit yesterday.",
    "Aspect ratio 16:9 and 4:3.", "Score went from 10 to 2000 overnight.", "Call me at noon, e.g. 12.30.",
    "The build 1.2.3.4.5 is old.", "Room 101, floor 3, building 7.", "I am 25 years old and 180 cm tall.",
    "email me @ home", "Meet at 5-6 pm.", "ISBN 978-3-16-148410-0 is a book.",
]


def labelled_set(n: int, seed: int = 0) -> list[tuple[str, list[tuple[int, int, str]]]]:
    """``n`` texts, each a template around one PII string (its span labelled), with distractors."""
    rng = random.Random(seed)
    kinds = ["email", "phone", "url", "ip", "card", "user"]
    out = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        pii = make_pii(kind, rng)
        template = rng.choice(TEMPLATES)
        head, tail = template.split("{x}")
        before = rng.choice(DISTRACTORS) + " " if rng.random() < 0.5 else ""
        after = " " + rng.choice(DISTRACTORS) if rng.random() < 0.5 else ""
        text = before + head + pii + tail + after
        start = len(before) + len(head)
        out.append((text, [(start, start + len(pii), kind)]))
    return out


def test_precision_and_recall_on_a_labelled_set():
    data = labelled_set(600)
    masker = PiiMasker()
    tp = fp = fn = 0
    misses = []
    for text, gold in data:
        found = set(masker.find(text))
        tp += len(found & set(gold))
        fp += len(found - set(gold))
        fn += len(set(gold) - found)
        if found != set(gold):
            misses.append((text, gold, found))
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    print(f"PII precision {precision:.4f} recall {recall:.4f} on {len(data)} labelled strings")
    assert precision >= 0.98 and recall >= 0.95, misses[:5]


def test_distractors_alone_are_not_pii():
    masker = PiiMasker()
    for text in DISTRACTORS:
        assert masker.find(text) == [], text


def test_mask_placeholders_and_counts():
    masker = PiiMasker()
    text = ("Mail bob.smith@example.com or call (415) 555-0134, card 4111-1111-1111-1111, from 192.168.0.12 "
            "per /u/some_user; see https://example.org/page.")
    assert masker.mask(text) == "Mail <EMAIL> or call <PHONE>, card <CARD>, from <IP> per <USER>; see <URL>."
    assert masker.counts == {"url": 1, "email": 1, "user": 1, "ip": 1, "card": 1, "phone": 1}
    only = PiiMasker(["email"], "[{type}]")
    assert only.mask("a@b.io and 10.0.0.1") == "[EMAIL] and 10.0.0.1"
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")


def test_stage_masks_text_and_conversations(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    rows = [
        {"text": "write to a@example.com", "id": 1},
        {"messages": [{"role": "user", "content": "my ip is 8.8.8.8"}, {"role": "assistant", "content": "ok u/bot_x"}]},
        {"nothing": 1},
    ]
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    report = run_pii(PiiConfig(inputs=[str(src)], out=str(out), write_rejects=True), verbose=False)
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert kept[0] == {"text": "write to <EMAIL>", "id": 1}
    assert [m["content"] for m in kept[1]["messages"]] == ["my ip is <IP>", "ok <USER>"]
    assert report["stats"] == {"seen": 4, "kept": 2, "rejected": {"malformed_json": 1, "missing_text_field": 1}}
    assert report["masked"]["email"] == 1 and report["masked"]["ip"] == 1 and report["masked"]["user"] == 1
    assert len((tmp_path / "out.rejects.jsonl").read_text().splitlines()) == 2
    assert json.loads((tmp_path / "out.stats.json").read_text())["masked"] == report["masked"]
    with pytest.raises(ConfigError, match="unknown PII"):
        run_pii(PiiConfig(inputs=[str(src)], out=str(out), types=["ssn"]), verbose=False)
    code = main(["data", "pii", f"inputs=[{src}]", f"out={out}", "placeholder=X"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "{type}" in err
