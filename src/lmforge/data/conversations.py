"""Comment trees -> chat conversations (the ``{"messages": [...]}`` format chat SFT reads).

One thread (a submission and its comments) at a time:

1. **Tree.** Comments are ordered by ``(created_utc, id)``; a comment hangs under its parent
   comment (``t1_``), or is a top-level root (``t3_``). A comment whose parent comment is not
   in the thread (filtered out, deleted, or never in the dump) is an *orphan*: with
   ``orphans="root"`` it starts a conversation of its own (without the submission turn), with
   ``orphans="drop"`` it and its replies are rejected (``orphaned``). A repeated comment id is
   rejected (``duplicate_id``); comments in a parent cycle are never reached and are rejected
   (``unreachable``), so every comment is accounted for.
2. **Turns.** A path is the chain of turns from the root down to a comment, optionally opened by
   the submission (title, and selftext when there is one) as the first turn. Consecutive turns
   by the same author are **merged** into one turn (joined by a blank line): Reddit users often
   continue themselves, and a merged turn keeps the roles alternating without losing text.
   ``[deleted]`` authors are never merged (they are different people).
3. **Candidates.** ``mode="paths"``: one conversation per leaf (root-to-leaf path);
   ``mode="pairs"``: one per comment, its reply to up to ``max_context`` ancestor turns.
   Only the last ``max_turns`` turns are kept.
4. **Roles** are assigned backwards from the last turn, which is ``assistant``; the turns then
   alternate. A conversation must open with ``user``, so an odd leading turn is dropped.
   Fewer than ``min_turns`` turns left: rejected (``too_few_turns``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Literal, NamedTuple


class Comment(NamedTuple):
    id: str
    parent: str  # "t1_<comment id>" or "t3_<submission id>"
    author: str
    score: int
    created: int
    body: str


class Submission(NamedTuple):
    id: str
    author: str
    text: str  # title, and selftext when there is one


@dataclass(frozen=True)
class ExtractOptions:
    mode: Literal["paths", "pairs"] = "paths"
    min_turns: int = 2
    max_turns: int = 8  # keep the last N turns of a path
    max_context: int = 4  # pairs mode: ancestor turns before the response
    submission_turn: bool = True  # the submission opens a thread's conversations
    orphans: Literal["root", "drop"] = "root"


DELETED_AUTHOR = "[deleted]"


# A turn in a persistent chain shared by every path through it: (previous cell, author, text,
# turns up to here). Plain tuples: a month holds millions of them.
_Cell = tuple  # tuple[_Cell | None, str, str, int]
_ORDER = itemgetter(4, 0)  # Comment (created, id)


def _messages(chain: _Cell, keep: int) -> list[dict[str, str]]:
    """The last ``keep`` turns (an even number, starting with user), roles from the end."""
    texts: list[str] = []
    cell: _Cell | None = chain
    while cell is not None and len(texts) < keep:
        texts.append(cell[2])
        cell = cell[0]
    if len(texts) % 2:
        texts.pop()  # the conversation must open with a user turn
    texts.reverse()
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(texts)]


class ThreadResult(NamedTuple):
    conversations: list[tuple[str, list[dict[str, str]]]]  # (id of the last comment, messages)
    comment_rejects: dict[str, int]
    candidate_rejects: dict[str, int]
    candidates: int
    rejected: list[tuple[str, Comment]]  # (reason, comment): the comment, or a candidate's last comment


def extract_thread(
    comments: Sequence[Comment], submission: Submission | None, opts: ExtractOptions
) -> ThreadResult:
    """Conversations of one thread; every comment and candidate counted (see the module doc)."""
    comment_rejects: dict[str, int] = {}
    candidate_rejects: dict[str, int] = {}
    rejected: list[tuple[str, Comment]] = []

    def count(d: dict[str, int], reason: str, c: Comment) -> None:
        d[reason] = d.get(reason, 0) + 1
        rejected.append((reason, c))

    by_id: dict[str, Comment] = {}
    for c in sorted(comments, key=_ORDER):
        if c[0] in by_id:
            count(comment_rejects, "duplicate_id", c)
        else:
            by_id[c[0]] = c
    children: dict[str, list[Comment]] = {}
    roots: list[tuple[Comment, bool]] = []  # (comment, is top-level)
    for c in by_id.values():
        parent = c[1]
        if parent.startswith("t1_"):
            pid = parent[3:]
            if pid in by_id:
                kids = children.get(pid)
                if kids is None:
                    children[pid] = [c]
                else:
                    kids.append(c)
            else:
                roots.append((c, False))
        else:
            roots.append((c, True))

    opening: _Cell | None = None
    if opts.submission_turn and submission is not None and submission.text:
        opening = (None, submission.author, submission.text, 1)
    pairs = opts.mode == "pairs"
    keep = min(opts.max_turns, opts.max_context + 1) if pairs else opts.max_turns
    min_turns = opts.min_turns
    out: list[tuple[str, list[dict[str, str]]]] = []
    candidates = visited = 0
    for root, top_level in roots:
        dropped = not top_level and opts.orphans == "drop"
        stack: list[tuple[Comment, _Cell | None]] = [(root, opening if top_level else None)]
        while stack:
            node, chain = stack.pop()
            visited += 1
            author = node[2]
            if chain is None:
                cell = (None, author, node[5], 1)
            elif author == chain[1] and author != DELETED_AUTHOR:  # the same author goes on: one turn
                cell = (chain[0], author, chain[2] + "\n\n" + node[5], chain[3])
            else:
                cell = (chain, author, node[5], chain[3] + 1)
            kids = children.get(node[0])
            if dropped:
                count(comment_rejects, "orphaned", node)
            elif pairs or not kids:
                candidates += 1
                if min(cell[3], keep) // 2 * 2 < min_turns:
                    count(candidate_rejects, "too_few_turns", node)
                else:
                    out.append((node[0], _messages(cell, keep)))
            if kids:
                stack.extend((k, cell) for k in reversed(kids))
    if visited < len(by_id):  # comments in a parent cycle: no root leads to them
        reachable = {c[0] for c, _ in roots}
        todo = [c[0] for c, _ in roots]
        while todo:
            for k in children.get(todo.pop(), ()):
                reachable.add(k[0])
                todo.append(k[0])
        for c in by_id.values():
            if c[0] not in reachable:
                count(comment_rejects, "unreachable", c)
    return ThreadResult(out, comment_rejects, candidate_rejects, candidates, rejected)
