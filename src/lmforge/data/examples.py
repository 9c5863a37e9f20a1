"""Fine-tuning examples: JSONL / JSON / CSV / Parquet files (or Hugging Face datasets) in,
validated and normalized examples of one kind out.

Three kinds, each with one normalized form the fine-tuning objectives read:

- ``chat``: ``{"messages": [{"role", "content"}, ...]}`` (an optional system turn, then user and
  assistant strictly alternating from user, ending with assistant, no empty turn), or a raw-text
  pair ``{"prompt": str, "completion": str}`` (no chat template; the completion non-empty).
  Accepted inputs: ``messages``; ShareGPT ``{"conversations": [{"from", "value"}]}`` (``from``
  human/user, gpt/assistant/model, system); Alpaca ``{"instruction", "input"?, "output",
  "system"?}`` (user = instruction, plus a blank line and the input when it is non-empty);
  ``prompt``/``completion`` as strings, or both as message lists (TRL's conversational
  prompt-completion, which becomes ``messages``).
- ``classify``: ``{"text": str, "label": str}`` read from ``text_field`` / ``label_field``
  (integer labels become strings). With a label set given, any other label is rejected.
- ``preference``: ``{"prompt": str | messages, "chosen": str, "rejected": str}``. ``chosen`` and
  ``rejected`` may be message lists ending with the assistant answer (TRL's conversational
  format): the answer is their last turn's content, and without a ``prompt`` the turns before
  it (the same in both) are the prompt.

Two evaluation kinds (``lmforge eval`` tasks):

- ``choice`` (multiple choice): ``{"query": str | messages, "choices": [str, ...], "answer": int}``.
  Accepted keys: the query from ``query``, ``question``, ``context`` or ``messages`` (a
  conversation ending with a user turn); the choices from ``choices``, ``options`` or
  ``endings`` (two or more non-empty texts); the answer from ``answer``, ``label`` or ``gold``
  (an index into the choices, or the text of one of them).
- ``generate``: ``{"prompt": str | messages, "references": [str, ...]}``. The prompt from
  ``prompt``, ``question``, ``input`` or ``messages`` (ending with a user turn); the references
  from ``references``, ``answers``, ``answer``, ``reference``, ``target`` or ``output`` (a text
  or a list of texts).

Every record read is kept or rejected with a reason, counted in :class:`~lmforge.data.sources.Stats`
(``seen == kept + sum(rejected)``); the first problems are kept as ``file:record: reason`` lines.
Reasons: ``bad_json`` (a line that does not parse), ``invalid_utf8``, ``not_an_object``,
``missing_field`` (no recognised fields, or a field of the wrong type), ``bad_messages`` (not a
list of ``{role, content}`` text objects), ``bad_roles`` (unknown role, wrong order, not ending
with the assistant), ``empty_turn`` (an empty turn, completion, text or answer), ``unknown_label``,
``identical_pair`` (chosen == rejected), ``prompt_mismatch`` (chosen and rejected conversations
whose turns before the answer differ), ``bad_choices`` (fewer than two choices, or an answer that
names none of them).

Records are numbered from 1 per file: JSONL lines (blank lines are skipped, not counted, but keep
their numbers), elements of a ``.json`` file holding one JSON array, CSV data rows (after the
header) and Parquet rows. ``hf:NAME[:CONFIG][@SPLIT]`` reads a Hugging Face dataset split
(``train`` by default) through ``datasets.load_dataset`` when ``datasets`` is installed.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson

from ..errors import ConfigError, DataError
from .records import ROLES
from .sources import RejectsWriter, Stats, complete_lines, expand_spec, open_compressed, reading_errors

Kind = Literal["chat", "classify", "preference", "choice", "generate"]
KINDS: tuple[str, ...] = ("chat", "classify", "preference", "choice", "generate")
ExampleFormat = Literal["auto", "jsonl", "json", "csv", "parquet"]
FORMATS: tuple[str, ...] = ("auto", "jsonl", "json", "csv", "parquet")
MAX_PROBLEMS = 20

_SUFFIX_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}
_COMPRESSIONS = (".gz", ".zst")
_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "system": "system",
}
_HF_SPEC = re.compile(r"^hf:(?P<name>[^:@\s]+)(?::(?P<config>[^@\s]+))?(?:@(?P<split>[^\s]+))?$")


@dataclass
class ExampleSet:
    """Normalized examples of one kind, where each came from, and the accounting."""

    kind: str
    examples: list[dict[str, Any]]
    origins: list[tuple[str, int]]  # (file, record number from 1) of each kept example
    stats: Stats = field(default_factory=Stats)
    labels: list[str] | None = None  # classify: the label set in order (given, else sorted seen labels)
    problems: list[str] = field(default_factory=list)  # the first "file:record: reason" lines

    def __len__(self) -> int:
        return len(self.examples)

    def label_ids(self) -> list[int]:
        """classify: each example's label as an index into :attr:`labels`."""
        if self.labels is None:
            raise ConfigError(f"label ids exist only for classify examples, not {self.kind}")
        index = {label: i for i, label in enumerate(self.labels)}
        return [index[e["label"]] for e in self.examples]

    def describe(self) -> str:
        """``"812 of 820 records kept (rejected: bad_roles: 8)"``."""
        return f"{self.stats.kept:,} of {self.stats.seen:,} records kept (rejected: {self.stats.describe_rejects()})"


class _Reject(Exception):
    """A record is not a usable example: ``reason`` is counted, ``message`` shown."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason, self.message = reason, message


# ------------------------------------------------------------------------------ inputs
def parse_hf_spec(spec: str) -> tuple[str, str | None, str]:
    """``hf:NAME[:CONFIG][@SPLIT]`` -> ``(name, config or None, split)``; the split defaults to train."""
    m = _HF_SPEC.match(spec)
    if not m:
        raise ConfigError(
            f"bad Hugging Face dataset spec {spec!r}: write hf:NAME[:CONFIG][@SPLIT], e.g. hf:tatsu-lab/alpaca@train"
        )
    return m["name"], m["config"], m["split"] or "train"


def _file_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return "jsonl" if fmt == "json" else fmt
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSIONS:
        suffixes.pop()
    found = _SUFFIX_FORMATS.get(suffixes[-1]) if suffixes else None
    if found is None:
        raise DataError(f"cannot tell the format of {path} from its extension; set format=jsonl, csv or parquet")
    return found


def _files_in_dir(root: Path) -> list[Path]:
    out = []
    for p in sorted(root.rglob("*")):
        if not p.is_file() or any(part.startswith(".") for part in p.relative_to(root).parts):
            continue
        suffixes = [s.lower() for s in p.suffixes]
        if suffixes and suffixes[-1] in _COMPRESSIONS:
            suffixes.pop()
        if suffixes and suffixes[-1] in _SUFFIX_FORMATS:
            out.append(p)
    return out


def _resolve(spec: str) -> list[Path]:
    """Files of one input: a file, a directory (recursively, sorted) or a glob; relative paths
    fall back to the lmforge checkout (so ``data/finetune/...`` works from anywhere)."""
    files: list[Path] = []
    for p in expand_spec(spec):
        if p.is_dir():
            found = _files_in_dir(p)
            if not found:
                raise DataError(f"no example files found under {p} (looked for .jsonl, .json, .csv, .parquet)")
            files.extend(found)
        else:
            files.append(p)
    return files


def _shown_path(path: Path) -> str:
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return str(path)
    return rel if not rel.startswith("..") else str(path)


# ------------------------------------------------------------------------------ readers
# Each reader yields (record number, record, raw text for the rejects file); a record that could
# not be read at all is a _Reject instance in place of the record.
Item = tuple[int, Any, str]


def _read_jsonl(path: Path, json_file: bool = False) -> Iterator[Item]:
    """JSON lines; a ``.json`` file (or ``format=json``) holding one JSON array: its elements."""
    json_file = json_file or path.name.lower().removesuffix(".gz").removesuffix(".zst").endswith(".json")
    with reading_errors(path), open_compressed(path) as f:
        head = f.peek(64)[:64] if hasattr(f, "peek") else b""
        if json_file and head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
            yield from _read_json_array(path, f.read())
            return
        cut: list[bool] = []
        line_no = 0
        for line_no, raw in enumerate(complete_lines(f, path, lambda: cut.append(True)), 1):
            if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                shown = raw.decode("utf-8", errors="backslashreplace")
                yield line_no, _Reject("invalid_utf8", "the line is not valid UTF-8"), shown
                continue
            if not line.strip():
                continue
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError as e:
                yield line_no, _Reject("bad_json", f"not valid JSON ({str(e).split(':')[0]})"), line.rstrip("\n")
                continue
            yield line_no, obj, line.rstrip("\n")
        if cut:
            yield line_no + 1, _Reject("truncated", "the file is truncated inside this record"), ""


def _read_json_array(path: Path, data: bytes) -> Iterator[Item]:
    try:
        items = json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{path} starts like a JSON array but does not parse: {e}") from None
    except RecursionError:
        raise DataError(f"{path} is nested too deeply to be a JSON array of records") from None
    for i, obj in enumerate(items, 1):
        yield i, obj, json.dumps(obj, ensure_ascii=False)


def _read_csv(path: Path) -> Iterator[Item]:
    with reading_errors(path), open_compressed(path) as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")
        try:
            reader = csv.DictReader(text)
            if not reader.fieldnames:
                raise DataError(f"{path} has no header row; a CSV file of examples names its columns first")
            for i, row in enumerate(reader, 1):
                row.pop(None, None)  # cells beyond the header
                yield i, row, json.dumps(row, ensure_ascii=False)
        except UnicodeDecodeError:
            raise DataError(f"{path} is not valid UTF-8 text") from None
        except csv.Error as e:
            raise DataError(f"{path} is not readable CSV: {e}") from None


def _read_parquet(path: Path) -> Iterator[Item]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        batches = pf.iter_batches(batch_size=1024)
        i = 0
        for batch in batches:
            for row in batch.to_pylist():
                i += 1
                yield i, row, json.dumps(row, ensure_ascii=False, default=str)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path} is not a readable Parquet file: {e}") from None


def _read_hf(spec: str) -> Iterator[Item]:
    name, config, split = parse_hf_spec(spec)
    try:
        import datasets  # noqa: F401  (optional dependency)
        from datasets import load_dataset
    except ImportError:
        raise ConfigError(
            f"reading {spec} needs the Hugging Face `datasets` package, which is not installed: "
            "pip install datasets (or download the data and pass JSONL/CSV/Parquet files)"
        ) from None
    try:
        ds = load_dataset(name, config, split=split)
    except Exception as e:  # datasets raises many types: missing dataset, config, split, network
        raise DataError(f"cannot load {spec}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    for i, row in enumerate(ds, 1):
        yield i, dict(row), json.dumps(row, ensure_ascii=False, default=str)


# ---------------------------------------------------------------------------- normalizing
def _require_dict(record: Any) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise _Reject("not_an_object", f"a {type(record).__name__}, not an object")
    return record


def _messages(value: Any, what: str = "messages") -> list[dict[str, str]]:
    """``value`` as a list of ``{role, content}`` (extra keys dropped); roles not yet ordered."""
    if not isinstance(value, list) or not value:
        raise _Reject("bad_messages", f"'{what}' is not a non-empty list of {{role, content}} objects")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise _Reject("bad_messages", f"{what}[{i}] is not an object with text 'role' and 'content'")
        if m["role"] not in ROLES:
            raise _Reject("bad_roles", f"{what}[{i}] has role {m['role']!r}; roles are system, user, assistant")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _check_conversation(messages: list[dict[str, str]], *, ends_with: str = "assistant") -> None:
    """Optional system first, then user/assistant alternating from user, ending with ``ends_with``,
    no empty turn (the same rules as :func:`lmforge.data.records.conversation_problem`)."""
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    if not turns:
        raise _Reject("bad_roles", "no user or assistant turn")
    for i, m in enumerate(turns):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            raise _Reject("bad_roles", f"turn {i} is {m['role']!r}, expected {want!r} (roles alternate from user)")
    if turns[-1]["role"] != ends_with:
        raise _Reject("bad_roles", f"the last turn is {turns[-1]['role']!r}, expected {ends_with!r}")
    for i, m in enumerate(messages):
        if not m["content"].strip():
            raise _Reject("empty_turn", f"message {i} ({m['role']}) is empty")


def _text(record: dict[str, Any], key: str, *, allow_empty: bool = False) -> str:
    value = record.get(key)
    if value is None:
        raise _Reject("missing_field", f"no {key!r} field")
    if not isinstance(value, str):
        raise _Reject("missing_field", f"{key!r} is a {type(value).__name__}, not text")
    if not allow_empty and not value.strip():
        raise _Reject("empty_turn", f"{key!r} is empty")
    return value


def _chat(record: Any) -> dict[str, Any]:
    record = _require_dict(record)
    if "messages" in record:
        messages = _messages(record["messages"])
    elif "conversations" in record:
        conv = record["conversations"]
        if not isinstance(conv, list) or not conv:
            raise _Reject("bad_messages", "'conversations' is not a non-empty list of {from, value} objects")
        messages = []
        for i, m in enumerate(conv):
            if not isinstance(m, dict) or not isinstance(m.get("from"), str) or not isinstance(m.get("value"), str):
                raise _Reject("bad_messages", f"conversations[{i}] is not an object with text 'from' and 'value'")
            role = _SHAREGPT_ROLES.get(m["from"].lower())
            if role is None:
                raise _Reject("bad_roles", f"conversations[{i}] is from {m['from']!r}; expected human, gpt or system")
            messages.append({"role": role, "content": m["value"]})
    elif "instruction" in record or "output" in record:
        instruction = _text(record, "instruction")
        output = _text(record, "output")
        extra = record.get("input")
        if extra is not None and not isinstance(extra, str):
            raise _Reject("missing_field", f"'input' is a {type(extra).__name__}, not text")
        user = instruction + ("\n\n" + extra if extra and extra.strip() else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        system = record.get("system")
        if isinstance(system, str) and system.strip():
            messages.insert(0, {"role": "system", "content": system})
    elif "prompt" in record or "completion" in record:
        prompt, completion = record.get("prompt"), record.get("completion")
        if isinstance(prompt, list) and isinstance(completion, list):  # TRL conversational prompt-completion
            messages = _messages(prompt, "prompt") + _messages(completion, "completion")
        else:
            prompt = _text(record, "prompt", allow_empty=True)
            completion = _text(record, "completion")
            return {"prompt": prompt, "completion": completion}
    else:
        raise _Reject(
            "missing_field",
            "no 'messages', 'conversations', 'instruction'/'output' or 'prompt'/'completion' field",
        )
    _check_conversation(messages)
    return {"messages": messages}


def _classify(record: Any, text_field: str, label_field: str, labels: set[str] | None) -> dict[str, Any]:
    record = _require_dict(record)
    text = _text(record, text_field)
    label = record.get(label_field)
    if label is None:
        raise _Reject("missing_field", f"no {label_field!r} field")
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise _Reject("missing_field", f"label {label!r} is a {type(label).__name__}, not text or an integer")
    label = str(label).strip()
    if not label:
        raise _Reject("empty_turn", f"{label_field!r} is empty")
    if labels is not None and label not in labels:
        raise _Reject("unknown_label", f"label {label!r} is not one of the task's labels")
    return {"text": text, "label": label}


def _answer(value: Any, key: str) -> tuple[str, list[dict[str, str]] | None]:
    """A chosen/rejected answer: text, or a conversation whose last (assistant) turn is the answer."""
    if value is None:
        raise _Reject("missing_field", f"no {key!r} field")
    if isinstance(value, str):
        if not value.strip():
            raise _Reject("empty_turn", f"{key!r} is empty")
        return value, None
    messages = _messages(value, key)
    if messages[-1]["role"] != "assistant":
        raise _Reject("bad_roles", f"the last turn of {key!r} is {messages[-1]['role']!r}, not 'assistant'")
    if not messages[-1]["content"].strip():
        raise _Reject("empty_turn", f"the answer in {key!r} is empty")
    return messages[-1]["content"], messages[:-1]


def _preference(record: Any) -> dict[str, Any]:
    record = _require_dict(record)
    chosen, chosen_before = _answer(record.get("chosen"), "chosen")
    rejected, rejected_before = _answer(record.get("rejected"), "rejected")
    prompt: Any = record.get("prompt")
    if prompt is None:
        if chosen_before is None or rejected_before is None:
            raise _Reject("missing_field", "no 'prompt' field (and chosen/rejected are not conversations)")
        if chosen_before != rejected_before:
            raise _Reject("prompt_mismatch", "the turns before the answer differ between chosen and rejected")
        if not chosen_before:
            raise _Reject("missing_field", "no 'prompt' field and no turns before the chosen answer")
        prompt = chosen_before
    elif (chosen_before or rejected_before) and not isinstance(prompt, list):
        raise _Reject("bad_messages", "with a text 'prompt', chosen and rejected must be answers, not conversations")
    elif chosen_before or rejected_before:
        raise _Reject("bad_messages", "with a 'prompt', chosen and rejected must hold only the assistant answer")
    if isinstance(prompt, str):
        if not prompt.strip():
            raise _Reject("empty_turn", "'prompt' is empty")
    else:
        prompt = _messages(prompt, "prompt")
        _check_conversation(prompt, ends_with="user")
    if chosen == rejected:
        raise _Reject("identical_pair", "chosen and rejected are the same text")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _first_key(record: dict[str, Any], keys: Sequence[str], what: str) -> tuple[str, Any]:
    for key in keys:
        if key in record:
            return key, record[key]
    raise _Reject("missing_field", f"no {what} field ({', '.join(map(repr, keys))})")


def _query(record: dict[str, Any], keys: Sequence[str], what: str) -> str | list[dict[str, str]]:
    """A prompt: a non-empty text, or a conversation ending with a user turn."""
    key, value = _first_key(record, keys, what)
    if isinstance(value, str):
        if not value.strip():
            raise _Reject("empty_turn", f"{key!r} is empty")
        return value
    messages = _messages(value, key)
    _check_conversation(messages, ends_with="user")
    return messages


def _choice(record: Any) -> dict[str, Any]:
    record = _require_dict(record)
    query = _query(record, ("query", "question", "context", "messages"), "query")
    key, choices = _first_key(record, ("choices", "options", "endings"), "choices")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise _Reject("bad_choices", f"{key!r} is not a list of two or more texts")
    if any(not c.strip() for c in choices):
        raise _Reject("empty_turn", f"a choice in {key!r} is empty")
    key, answer = _first_key(record, ("answer", "label", "gold"), "answer")
    if isinstance(answer, str) and not answer.strip().lstrip("-").isdigit():
        if answer not in choices:
            raise _Reject("bad_choices", f"the answer {answer!r} is not one of the choices")
        answer = choices.index(answer)
    elif isinstance(answer, (str, int)) and not isinstance(answer, bool):
        answer = int(answer)
        if not 0 <= answer < len(choices):
            raise _Reject("bad_choices", f"answer index {answer} is outside the {len(choices)} choices")
    else:
        raise _Reject("missing_field", f"{key!r} is a {type(answer).__name__}, not a choice index or text")
    return {"query": query, "choices": choices, "answer": answer}


def _generate(record: Any) -> dict[str, Any]:
    record = _require_dict(record)
    prompt = _query(record, ("prompt", "question", "input", "messages"), "prompt")
    key, refs = _first_key(record, ("references", "answers", "answer", "reference", "target", "output"), "reference")
    refs = [refs] if isinstance(refs, str) else refs
    if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
        raise _Reject("missing_field", f"{key!r} is not a text or a non-empty list of texts")
    if any(not r.strip() for r in refs):
        raise _Reject("empty_turn", f"a reference in {key!r} is empty")
    return {"prompt": prompt, "references": refs}


_PARSERS = {"chat": _chat, "preference": _preference, "choice": _choice, "generate": _generate}


# ------------------------------------------------------------------------------ loading
def _check_labels(labels: Sequence[Any] | None) -> list[str] | None:
    if labels is None:
        return None
    if isinstance(labels, str) or not isinstance(labels, Sequence) or not labels:
        raise ConfigError(f"labels must be a non-empty list of label names, got {labels!r}")
    out = [str(x).strip() for x in labels]
    if any(not x for x in out):
        raise ConfigError("labels must not contain empty names")
    dupes = sorted({x for x in out if out.count(x) > 1})
    if dupes:
        raise ConfigError(f"labels lists {', '.join(map(repr, dupes))} more than once")
    return out


def load_examples(
    inputs: str | list[str],
    kind: Kind,
    *,
    format: ExampleFormat = "auto",
    labels: list[str] | None = None,
    text_field: str = "text",
    label_field: str = "label",
    max_records: int | None = None,
    rejects_path: str | os.PathLike[str] | None = None,
    min_kept: int = 1,
) -> ExampleSet:
    """Read, validate and normalize the fine-tuning examples of ``inputs`` (files, directories,
    globs, ``hf:NAME[:CONFIG][@SPLIT]``); see the module docstring for the forms. Rejected records
    are counted by reason (and written to ``rejects_path`` as JSONL); fewer than ``min_kept``
    kept examples is a :class:`DataError` that shows the counts and the first problems."""
    if kind not in KINDS:
        raise ConfigError(f"unknown example kind {kind!r}; choose one of {', '.join(KINDS)}")
    if format not in FORMATS:
        raise ConfigError(f"unknown example format {format!r}; choose one of {', '.join(FORMATS)}")
    if max_records is not None and max_records < 1:
        raise ConfigError(f"max_records must be at least 1 (or none), got {max_records}")
    if min_kept < 0:
        raise ConfigError(f"min_kept must be 0 or more, got {min_kept}")
    label_list = _check_labels(labels)
    if label_list is not None and kind != "classify":
        raise ConfigError(f"labels apply to classify examples, not {kind}")
    specs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if not specs:
        raise ConfigError("no inputs given: name example files (JSONL, JSON, CSV, Parquet) or hf:NAME datasets")

    sources: list[tuple[str, Iterator[Item]]] = []
    for spec in specs:
        spec = os.fspath(spec)
        if spec.startswith("hf:"):
            parse_hf_spec(spec)  # a bad spec fails before anything is read
            sources.append((spec, _read_hf(spec)))
            continue
        for path in _resolve(spec):
            fmt = _file_format(path, format)
            if fmt == "jsonl":
                items = _read_jsonl(path, json_file=format == "json")
            else:
                items = _read_csv(path) if fmt == "csv" else _read_parquet(path)
            sources.append((_shown_path(path), items))

    label_set = set(label_list) if label_list is not None else None
    stats, problems = Stats(), []
    examples: list[dict[str, Any]] = []
    origins: list[tuple[str, int]] = []
    rejects = RejectsWriter(rejects_path) if rejects_path is not None else None
    try:
        for source, items in sources:
            for number, record, raw in items:
                if max_records is not None and stats.seen >= max_records:
                    break
                stats.seen += 1
                try:
                    if isinstance(record, _Reject):
                        raise record
                    if kind == "classify":
                        example = _classify(record, text_field, label_field, label_set)
                    else:
                        example = _PARSERS[kind](record)
                except _Reject as r:
                    stats.rejected[r.reason] = stats.rejected.get(r.reason, 0) + 1
                    if len(problems) < MAX_PROBLEMS:
                        problems.append(f"{source}:{number}: {r.message}")
                    if rejects is not None:
                        rejects.write(source, number, r.reason, raw)
                    continue
                examples.append(example)
                origins.append((source, number))
            if max_records is not None and stats.seen >= max_records:
                break
    finally:
        if rejects is not None:
            rejects.close()
    stats.kept = len(examples)

    if kind == "classify":
        seen_labels = sorted({e["label"] for e in examples})
        label_list = label_list if label_list is not None else seen_labels
    else:
        label_list = None
    if len(examples) < min_kept:
        where = ", ".join(s for s, _ in sources) or ", ".join(map(str, specs))
        shown = "; ".join(problems[:5]) or "none"
        raise DataError(
            f"{where}: only {len(examples):,} of {stats.seen:,} records are usable {kind} examples "
            f"(need at least {min_kept:,}); rejected: {stats.describe_rejects()}; first problems: {shown}"
        )
    return ExampleSet(kind, examples, origins, stats, label_list, problems)


def split_examples(es: ExampleSet, val_fraction: float, seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(train, val)`` examples: a seeded random ``val_fraction`` goes to validation (at least one
    example when the fraction is positive), stratified by label for classify examples. Both keep
    the input order. The same ``(examples, val_fraction, seed)`` always gives the same split."""
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = len(es.examples)
    if val_fraction == 0.0 or n == 0:
        return list(es.examples), []
    if n < 2:
        raise DataError(f"cannot split {n} example into train and validation; give more examples or val_fraction=0")
    rng = random.Random(seed)
    if es.kind == "classify":
        groups: dict[str, list[int]] = {}
        for i, e in enumerate(es.examples):
            groups.setdefault(e["label"], []).append(i)
        order: list[int] = []
        for label in sorted(groups):  # interleave labels so every prefix of `order` is stratified
            rng.shuffle(groups[label])
        pos = {label: 0 for label in groups}
        # proportional interleaving: repeatedly take the label furthest behind its share
        while len(order) < n:
            label = min(
                (lb for lb in sorted(groups) if pos[lb] < len(groups[lb])),
                key=lambda lb: (pos[lb] + 1) / len(groups[lb]),
            )
            order.append(groups[label][pos[label]])
            pos[label] += 1
    else:
        order = list(range(n))
        rng.shuffle(order)
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    val_idx = set(order[:n_val])
    train = [e for i, e in enumerate(es.examples) if i not in val_idx]
    val = [e for i, e in enumerate(es.examples) if i in val_idx]
    return train, val
