"""``lmforge data augment``: more training examples from the ones there are, reproducibly.

For each input record the output holds the original (``keep_original``) and ``copies``
augmented copies, each tagged ``"augmented": [operations]``. Operations, each applied to a copy
with its probability:

- **token noise** on the texts of ``noise_roles`` (user turns by default: noise on the answers
  would teach the model noisy answers): each word deleted (``delete_prob``), swapped with its
  neighbour (``swap_prob``) or replaced by ``mask_token`` (``mask_prob``); lines are kept;
- **paraphrase** of the texts of ``paraphrase_roles`` by a language model: a callable
  ``complete(prompts) -> completions``; on the command line ``paraphrase_model=CKPT`` (or
  ``--paraphrase-model``) builds it from an lmforge checkpoint (:func:`lmforge.commands.data.engine_paraphraser`);
- **context truncation** (``truncate_prob``): a conversation loses a random number of leading
  user/assistant exchanges (at least one exchange stays);
- **system prompt** (``system_prob``): one of ``system_prompts`` opens the conversation (when
  it has no system turn yet).

Randomness comes from ``random.Random("seed:record:copy")``: the same seed gives the same
output, whatever the batch size. A copy identical to its original is not written
(``counts.unchanged``); a paraphrase that comes back empty drops its copy
(``counts.paraphrase_failed``). Records themselves are only rejected by the reader.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError, LmforgeError
from .records import ROLES, RecordsConfig, run_record_stage

Complete = Callable[[list[str]], list[str]]

DEFAULT_PROMPT = (
    "Rewrite the following text in other words, keeping its meaning, tone and language. "
    "Answer with the rewritten text only.\n\nText: {text}\n\nRewritten:"
)


@dataclass
class AugmentConfig(RecordsConfig):
    """Settings of ``lmforge data augment`` (inputs and outputs, then these)."""

    out: str = "runs/augment.jsonl"
    copies: int = 1  # augmented copies per record
    keep_original: bool = True
    seed: int = 0
    delete_prob: float = 0.0  # token noise: per word
    swap_prob: float = 0.0
    mask_prob: float = 0.0
    mask_token: str = "<mask>"
    noise_roles: list[str] = field(default_factory=lambda: ["user"])
    paraphrase_model: str = ""  # an lmforge checkpoint that paraphrases (empty = no paraphrasing)
    paraphrase_roles: list[str] = field(default_factory=lambda: ["user"])
    paraphrase_prompt: str = DEFAULT_PROMPT  # {text} is replaced by the text
    paraphrase_batch: int = 16  # texts per call of the model
    truncate_prob: float = 0.0  # conversations: drop leading exchanges
    system_prompts: list[str] = field(default_factory=list)
    system_prob: float = 0.0

    def validate(self) -> None:
        super().validate()
        if self.copies < 0:
            raise ConfigError(f"copies must be 0 or more, got {self.copies}")
        if not self.keep_original and self.copies == 0:
            raise ConfigError("keep_original=false with copies=0 would write nothing")
        for name in ("delete_prob", "swap_prob", "mask_prob", "truncate_prob", "system_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("noise_roles", "paraphrase_roles"):
            bad = [r for r in getattr(self, name) if r not in ROLES]
            if bad:
                raise ConfigError(f"{name}: unknown role(s) {', '.join(bad)}; roles are {', '.join(ROLES)}")
        if self.system_prob > 0 and not self.system_prompts:
            raise ConfigError("system_prob > 0 needs system_prompts")
        if "{text}" not in self.paraphrase_prompt:
            raise ConfigError("paraphrase_prompt must contain {text}")
        if self.paraphrase_batch < 1:
            raise ConfigError(f"paraphrase_batch must be at least 1, got {self.paraphrase_batch}")


# ---------------------------------------------------------------------------- operations
def token_noise(text: str, rng: random.Random, delete: float, swap: float, mask: float, mask_token: str) -> str:
    """Word-level noise, line by line; a line never loses all its words."""
    lines = []
    for line in text.split("\n"):
        words = line.split()
        if delete and len(words) > 1:
            kept = [w for w in words if rng.random() >= delete]
            words = kept or [words[rng.randrange(len(words))]]
        if swap:
            i = 0
            while i < len(words) - 1:
                if rng.random() < swap:
                    words[i], words[i + 1] = words[i + 1], words[i]
                    i += 1
                i += 1
        if mask:
            words = [mask_token if rng.random() < mask else w for w in words]
        lines.append(" ".join(words))
    return "\n".join(lines)


def truncate_context(messages: list[dict[str, str]], rng: random.Random) -> list[dict[str, str]]:
    """Drop 1..k leading user/assistant exchanges (a system turn stays); at least one exchange is left."""
    head = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(head):]
    exchanges = len(turns) // 2
    if exchanges < 2 or turns[0]["role"] != "user":
        return messages
    drop = rng.randint(1, exchanges - 1)
    return head + turns[2 * drop:]


# ------------------------------------------------------------------------------- the stage
class Augmenter:
    """Makes the augmented copies of records; :attr:`counts` counts each operation."""

    def __init__(self, cfg: AugmentConfig, complete: Complete | None = None) -> None:
        self.cfg = cfg
        self.complete = complete
        self.noise = cfg.delete_prob > 0 or cfg.swap_prob > 0 or cfg.mask_prob > 0
        self.counts: dict[str, int] = {"originals": 0, "copies": 0, "unchanged": 0, "paraphrase_failed": 0,
                                       "noise": 0, "paraphrase": 0, "truncate": 0, "system": 0}

    def _roles(self, record: dict[str, Any], roles: list[str]) -> list[tuple[int | None, str]]:
        """``(turn index or None for a text record, text)`` the operation applies to."""
        if "messages" in record:
            return [(i, m["content"]) for i, m in enumerate(record["messages"]) if m["role"] in roles]
        return [(None, record[self.cfg.text_field])]

    @staticmethod
    def _set(record: dict[str, Any], where: int | None, text: str, text_field: str) -> None:
        if where is None:
            record[text_field] = text
        else:
            record["messages"][where] = {**record["messages"][where], "content": text}

    def batch(self, records: list[tuple[int, dict[str, Any]]]) -> Iterator[dict[str, Any]]:
        """Outputs of a batch of ``(record index, record)``, in input order."""
        cfg = self.cfg
        plans: list[tuple[dict[str, Any] | None, list[dict[str, Any]]]] = []
        to_paraphrase: list[tuple[dict[str, Any], int | None, str]] = []
        for index, record in records:
            copies = []
            for c in range(cfg.copies):
                rng = random.Random(f"{cfg.seed}:{index}:{c}")
                copy = {**record}
                if "messages" in copy:
                    copy["messages"] = list(copy["messages"])
                ops: list[str] = []
                if "messages" in copy and cfg.truncate_prob and rng.random() < cfg.truncate_prob:
                    shorter = truncate_context(copy["messages"], rng)
                    if len(shorter) < len(copy["messages"]):
                        copy["messages"] = shorter
                        ops.append("truncate")
                if "messages" in copy and cfg.system_prob and copy["messages"][0]["role"] != "system" \
                        and rng.random() < cfg.system_prob:
                    prompt = cfg.system_prompts[rng.randrange(len(cfg.system_prompts))]
                    copy["messages"] = [{"role": "system", "content": prompt}, *copy["messages"]]
                    ops.append("system")
                if self.complete is not None:
                    for where, text in self._roles(copy, cfg.paraphrase_roles):
                        to_paraphrase.append((copy, where, text))
                    ops.append("paraphrase")
                if self.noise:
                    changed = False
                    for where, text in self._roles(copy, cfg.noise_roles):
                        noisy = token_noise(text, rng, cfg.delete_prob, cfg.swap_prob, cfg.mask_prob, cfg.mask_token)
                        changed |= noisy != text
                        self._set(copy, where, noisy, cfg.text_field)
                    if changed:
                        ops.append("noise")
                copy["augmented"] = ops
                copies.append(copy)
            plans.append((record if cfg.keep_original else None, copies))
        failed = self._paraphrase(to_paraphrase)
        for original, copies in plans:
            if original is not None:
                self.counts["originals"] += 1
                yield original
            for copy in copies:
                if id(copy) in failed:
                    self.counts["paraphrase_failed"] += 1
                elif not copy["augmented"]:
                    self.counts["unchanged"] += 1
                else:
                    self.counts["copies"] += 1
                    for op in copy["augmented"]:
                        self.counts[op] += 1
                    yield copy

    def _paraphrase(self, items: list[tuple[dict[str, Any], int | None, str]]) -> set[int]:
        """Paraphrase in batches (noise, if any, then applies on top); ids of the copies that failed."""
        failed: set[int] = set()
        if not items or self.complete is None:
            return failed
        cfg = self.cfg
        for start in range(0, len(items), cfg.paraphrase_batch):
            chunk = items[start : start + cfg.paraphrase_batch]
            prompts = [cfg.paraphrase_prompt.replace("{text}", text) for _, _, text in chunk]
            outs = self.complete(prompts)
            if not isinstance(outs, list) or len(outs) != len(prompts):
                raise LmforgeError(f"the paraphrase model returned {len(outs) if isinstance(outs, list) else outs!r} "
                                   f"completions for {len(prompts)} prompts")
            for (copy, where, _), out in zip(chunk, outs):
                text = out.strip() if isinstance(out, str) else ""
                if text:
                    self._set(copy, where, text, cfg.text_field)
                else:
                    failed.add(id(copy))
        return failed


def run_augment(cfg: AugmentConfig, verbose: bool = True, complete: Complete | None = None) -> dict[str, Any]:
    """Augment ``cfg.inputs`` into ``cfg.out``. ``complete`` paraphrases (``lmforge data augment``
    builds it from ``cfg.paraphrase_model`` through the inference engine: :mod:`lmforge.commands.data`)."""
    cfg.validate()
    if complete is None and cfg.paraphrase_model:
        raise ConfigError(f"paraphrase_model={cfg.paraphrase_model}: the data library takes a `complete` callable; "
                          "run the stage as `lmforge data augment` (lmforge.commands.data.run_augment_command)")
    aug = Augmenter(cfg, complete)
    batch_records = max(1, cfg.paraphrase_batch // max(1, cfg.copies)) if complete is not None else 256

    def process(rows: Iterator[tuple[str, int, dict[str, Any]]], reject: Callable[..., None]) -> Iterator[dict[str, Any]]:
        batch: list[tuple[int, dict[str, Any]]] = []
        for index, (_, _, record) in enumerate(rows):
            batch.append((index, record))
            if len(batch) >= batch_records:
                yield from aug.batch(batch)
                batch = []
        if batch:
            yield from aug.batch(batch)

    return run_record_stage("augment", cfg, process, extra=lambda: {"counts": dict(aug.counts)}, verbose=verbose)
