"""Build the embedded fine-tuning and evaluation sets of data/finetune/ from the shared corpora.

    python data/finetune/build.py SGD_DEV_MESSAGES SGD_TEST_MESSAGES TOPICALCHAT_VALID_FREQ [OUT_DIR]

e.g. ``python data/finetune/build.py ../shared/data/sgd_dev_messages.jsonl
../shared/data/sgd_test_messages.jsonl ../shared/data/topicalchat_valid_freq.json``.
Deterministic: the same inputs give byte-identical files (fixed seeds, sorted iteration,
stable JSON). Prints the counts, bytes and sha256 of every file written (the table of
README.md). Only the standard library is used.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from collections import Counter
from pathlib import Path

SEED = 20240605
N_CHAT_TRAIN, N_CHAT_VAL = 800, 100
N_PREF_TRAIN, N_PREF_TEST = 600, 150
MAX_DIALOGUE_TOKENS = 1500  # SmolLM2's context is 2048; estimated at 4 characters a token
DOMAIN_MIN_EXAMPLES = 20  # a domain needs this many single-service dialogues in dev and in test
DOMAIN_TEST_PER_LABEL = 28
SENTIMENT_TRAIN_PER_LABEL, SENTIMENT_TEST_PER_LABEL = 400, 100
SENTIMENT_TEST_FRACTION = 0.2  # of the conversations
MAX_PREF_PROMPT_CHARS = 2000
GENERIC_TURN_COUNT = 5  # an assistant turn seen this often in SGD dev is generic ("Have a great day.")
N_NEXT_CHOICES = 4  # next-utterance multiple choice: the true reply and 3 from other domains' dialogues
N_NEXT_TRAIN = 200  # solved examples for few-shot prompts, from the chat training dialogues


def rng(name: str) -> random.Random:
    return random.Random(f"{SEED}:{name}")


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def est_tokens(messages: list[dict]) -> int:
    return sum(len(m["content"]) for m in messages) // 4 + 5 * len(messages)  # + template tokens per turn


def domains(dialogue: dict) -> set[str]:
    return {s.split("_")[0] for s in dialogue["services"]}


def only_messages(d: dict) -> dict:
    return {"messages": [{"role": m["role"], "content": m["content"]} for m in d["messages"]]}


def build(dev_path: Path, test_path: Path, topical_path: Path, out: Path) -> dict[str, int]:
    dev, test = read_jsonl(dev_path), read_jsonl(test_path)
    counts: dict[str, int] = {}

    # ---- chat SFT: SGD dev -> train, SGD test -> val; the rest of dev feeds the preferences
    fits = [d for d in dev if est_tokens(d["messages"]) <= MAX_DIALOGUE_TOKENS]
    order = sorted(fits, key=lambda d: d["id"])
    rng("chat").shuffle(order)
    chat_train = order[:N_CHAT_TRAIN]
    pref_pool = order[N_CHAT_TRAIN:]
    test_fits = sorted((d for d in test if est_tokens(d["messages"]) <= MAX_DIALOGUE_TOKENS), key=lambda d: d["id"])
    rng("chat-val").shuffle(test_fits)
    chat_val = test_fits[:N_CHAT_VAL]
    write_jsonl(out / "sgd_chat_train.jsonl", [only_messages(d) for d in chat_train])
    write_jsonl(out / "sgd_chat_val.jsonl", [only_messages(d) for d in chat_val])
    counts["sgd_chat_train.jsonl"], counts["sgd_chat_val.jsonl"] = len(chat_train), len(chat_val)
    counts["dropped_long_dev"], counts["dropped_long_test"] = len(dev) - len(fits), len(test) - len(test_fits)

    # ---- domain classification: the first user turn of single-service dialogues
    def single(rows: list[dict]) -> list[tuple[str, str]]:
        return [(d["messages"][0]["content"].strip(), d["services"][0].split("_")[0]) for d in rows if len(d["services"]) == 1]

    dev_single, test_single = single(dev), single(test)
    dev_count, test_count = Counter(lb for _, lb in dev_single), Counter(lb for _, lb in test_single)
    labels = sorted(lb for lb in dev_count if dev_count[lb] >= DOMAIN_MIN_EXAMPLES and test_count[lb] >= DOMAIN_MIN_EXAMPLES)
    train_rows, seen = [], set()
    for text, lb in dev_single:
        if lb in labels and text not in seen:
            seen.add(text)
            train_rows.append({"text": text, "label": lb})
    by_label: dict[str, list[str]] = {lb: [] for lb in labels}
    test_seen: set[str] = set()
    dup_across = 0
    for text, lb in test_single:
        if lb not in by_label or text in test_seen:
            continue
        if text in seen:
            dup_across += 1
            continue
        test_seen.add(text)
        by_label[lb].append(text)
    test_rows = []
    r = rng("domain-test")
    for lb in labels:
        texts = sorted(by_label[lb])
        r.shuffle(texts)
        test_rows += [{"text": t, "label": lb} for t in texts[:DOMAIN_TEST_PER_LABEL]]
    rng("domain-test-order").shuffle(test_rows)
    write_jsonl(out / "sgd_domain_train.jsonl", train_rows)
    write_jsonl(out / "sgd_domain_test.jsonl", test_rows)
    counts["sgd_domain_train.jsonl"], counts["sgd_domain_test.jsonl"] = len(train_rows), len(test_rows)
    counts["domain_test_dropped_as_train_duplicates"] = dup_across
    counts["domain_labels"] = len(labels)

    # ---- Topical-Chat sentiment: split by conversation, at most N messages per label
    topical = json.loads(Path(topical_path).read_text(encoding="utf-8"))
    conv_ids = sorted(topical)
    rng("topical-split").shuffle(conv_ids)
    n_test = round(len(conv_ids) * SENTIMENT_TEST_FRACTION)
    split_ids = {"test": sorted(conv_ids[:n_test]), "train": sorted(conv_ids[n_test:])}
    sentiment: dict[str, list[dict]] = {}
    train_texts: set[str] = set()
    for split, cap in (("train", SENTIMENT_TRAIN_PER_LABEL), ("test", SENTIMENT_TEST_PER_LABEL)):
        groups: dict[str, list[str]] = {}
        seen_texts: set[str] = set()
        for cid in split_ids[split]:
            for m in topical[cid]["content"]:
                text = m["message"].strip()
                if not text or text in seen_texts or (split == "test" and text in train_texts):
                    continue
                seen_texts.add(text)
                groups.setdefault(m["sentiment"], []).append(text)
        rows = []
        r = rng(f"topical-{split}")
        for lb in sorted(groups):
            texts = groups[lb]
            r.shuffle(texts)
            rows += [{"text": t, "label": lb} for t in texts[:cap]]
        rng(f"topical-{split}-order").shuffle(rows)
        sentiment[split] = rows
        if split == "train":
            train_texts = seen_texts
        write_jsonl(out / f"topicalchat_sentiment_{split}.jsonl", rows)
        counts[f"topicalchat_sentiment_{split}.jsonl"] = len(rows)
        counts[f"topical_{split}_conversations"] = len(split_ids[split])
        # the same conversations as chat (the split by conversation above, so no conversation is
        # in both): agent_1 -> user, agent_2 -> assistant, a trailing user turn dropped
        chats = [c for c in (topical_messages(topical[cid]["content"]) for cid in split_ids[split]) if c]
        name = f"topicalchat_chat_{'val' if split == 'test' else 'train'}.jsonl"
        write_jsonl(out / name, chats)
        counts[name] = len(chats)

    # ---- preferences: the true next assistant turn over one from another domain's dialogue
    turn_count = Counter(m["content"].strip() for d in dev for m in d["messages"] if m["role"] == "assistant")

    def specific(text: str) -> bool:
        return bool(text.strip()) and turn_count[text.strip()] < GENERIC_TURN_COUNT

    all_dev = sorted(dev, key=lambda d: d["id"])
    prefs: list[dict] = []
    r = rng("preferences")
    for d in pref_pool:
        if len(prefs) == N_PREF_TRAIN + N_PREF_TEST:
            break
        msgs = d["messages"]
        users = [
            i for i in range(0, len(msgs) - 1, 2)
            if msgs[i]["role"] == "user" and specific(msgs[i + 1]["content"])
            and sum(len(m["content"]) for m in msgs[: i + 1]) <= MAX_PREF_PROMPT_CHARS
        ]
        if not users:
            continue
        u = r.choice(users)
        chosen = msgs[u + 1]["content"]
        others = [o for o in all_dev if o["id"] != d["id"] and not (domains(o) & domains(d))]
        for _ in range(50):
            o = r.choice(others)
            answers = [m["content"] for m in o["messages"] if m["role"] == "assistant" and specific(m["content"])]
            if not answers:
                continue
            k = (u + 1) // 2  # the same assistant turn number when the other dialogue has it
            rejected = answers[k] if k < len(answers) else r.choice(answers)
            if rejected.strip() != chosen.strip():
                break
        else:
            continue
        prompt = [{"role": m["role"], "content": m["content"]} for m in msgs[: u + 1]]
        prefs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    write_jsonl(out / "sgd_preferences_train.jsonl", prefs[:N_PREF_TRAIN])
    # ---- next-utterance multiple choice: held-out conversations (the chat val dialogues) cut
    # before a specific assistant turn (one that occurs once in SGD dev + test, so no choice is a
    # generic reply that would fit any context); the choices are that turn and replies from
    # dialogues of other domains (the train split, from the chat training dialogues, holds
    # few-shot examples)
    once = Counter(m["content"].strip() for d in dev + test for m in d["messages"] if m["role"] == "assistant")

    def unique(text: str) -> bool:
        return bool(text.strip()) and once[text.strip()] == 1

    for split, rows, limit in (("test", chat_val, len(chat_val)), ("train", chat_train, N_NEXT_TRAIN)):
        items = next_utterance_items(rows, unique, rng(f"next-utterance-{split}"), limit)
        write_jsonl(out / f"sgd_next_utterance_{split}.jsonl", items)
        counts[f"sgd_next_utterance_{split}.jsonl"] = len(items)
        if split == "test":  # the same cuts as a generation task: reply, scored against the human one
            replies = [{"messages": i["messages"], "references": [i["choices"][i["answer"]]]} for i in items]
            write_jsonl(out / "sgd_reply_test.jsonl", replies)
            counts["sgd_reply_test.jsonl"] = len(replies)
    write_jsonl(out / "sgd_preferences_test.jsonl", prefs[N_PREF_TRAIN:])
    counts["sgd_preferences_train.jsonl"] = len(prefs[:N_PREF_TRAIN])
    counts["sgd_preferences_test.jsonl"] = len(prefs[N_PREF_TRAIN:])
    return counts


def topical_messages(content: list[dict]) -> dict | None:
    """A Topical-Chat conversation as ``{"messages"}``: turns stripped, empty ones dropped, a
    speaker's consecutive turns joined by a newline; roles alternate from user (agent_1) and
    end with the assistant (a trailing agent_1 turn is dropped). None below two turns."""
    turns: list[tuple[str, str]] = []
    for m in content:
        text = m["message"].strip()
        if not text:
            continue
        if turns and turns[-1][0] == m["agent"]:
            turns[-1] = (m["agent"], turns[-1][1] + "\n" + text)
        else:
            turns.append((m["agent"], text))
    while turns and turns[0][0] != "agent_1":
        turns.pop(0)
    if len(turns) % 2:
        turns.pop()
    if len(turns) < 2:
        return None
    return {"messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, (_, t) in enumerate(turns)]}


def next_utterance_items(rows: list[dict], specific, r: random.Random, limit: int) -> list[dict]:
    """``{"messages": context, "choices": [...], "answer": index}`` per dialogue (at most ``limit``)."""
    replies = [
        (d["id"], domains(d), m["content"]) for d in rows for m in d["messages"]
        if m["role"] == "assistant" and specific(m["content"])
    ]
    items = []
    for d in rows:
        if len(items) == limit:
            break
        msgs = d["messages"]
        cuts = [i for i in range(1, len(msgs)) if msgs[i]["role"] == "assistant" and specific(msgs[i]["content"])]
        if not cuts:
            continue
        i = r.choice(cuts)
        true = msgs[i]["content"]
        pool = sorted({text for did, doms, text in replies if did != d["id"] and not (doms & domains(d)) and text != true})
        choices = [true, *r.sample(pool, N_NEXT_CHOICES - 1)]
        r.shuffle(choices)
        context = [{"role": m["role"], "content": m["content"]} for m in msgs[:i]]
        items.append({"messages": context, "choices": choices, "answer": choices.index(true)})
    return items


def main(argv: list[str]) -> int:
    if len(argv) not in (3, 4):
        print(__doc__, file=sys.stderr)
        return 2
    dev, test, topical = (Path(a) for a in argv[:3])
    out = Path(argv[3]) if len(argv) == 4 else Path(__file__).resolve().parent
    out.mkdir(parents=True, exist_ok=True)
    counts = build(dev, test, topical, out)
    print("| file | records | bytes | sha256 |\n|---|---:|---:|---|")
    total = 0
    for name, n in counts.items():
        if name.endswith(".jsonl"):
            data = (out / name).read_bytes()
            total += len(data)
            print(f"| `{name}` | {n:,} | {len(data):,} | {hashlib.sha256(data).hexdigest()} |")
    print(f"\ntotal bytes: {total:,}")
    print({k: v for k, v in counts.items() if not k.endswith(".jsonl")})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
