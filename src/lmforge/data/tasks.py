"""Evaluation tasks: a small YAML file naming the data, the kind of scoring and the prompt.

Embedded tasks live in ``data/finetune/tasks/<name>.yaml``; ``load_task`` takes such a name or
the path of a user's YAML file. Five kinds (``data/finetune/README.md`` documents the fields):

```yaml
name: sgd-domain                      # optional; defaults to the file stem
description: ...                      # optional
kind: classify                        # classify | multiple_choice | generate | chat | perplexity
train: ../sgd_domain_train.jsonl      # example files (JSONL/JSON/CSV/Parquet) or hf:NAME[:CONFIG][@SPLIT];
test: ../sgd_domain_test.jsonl        #   relative paths are relative to the YAML file
text_field: text                      # classify (default text)
label_field: label                    # classify (default label)
labels: [Alarm, Buses, ...]           # classify: the label set, in order (label ids index it)
verbalizers: {RentalCars: Car rental} # classify: the words scored per label when prompting
template: "...{text}...\nAnswer:"     # the prompt: {text} (classify), {query} (multiple_choice),
                                      #   {prompt} (generate); optional except for classify
max_tokens: 64                        # generate / chat: the reply budget
stop: ["\n"]                          # generate: stop strings (optional)
max_length: 1024                      # perplexity: window length (default: the model's context)
stride: 512                           # perplexity: new tokens scored per window (default max_length / 2)
span: [0.9, 1.0]                      # perplexity: the slice of the text (fractions of its characters)
licence: ...                          # optional, informational
```

- ``classify``: ``{text, label}`` examples; zero-/k-shot prompting, or the checkpoint's
  classification head. Metrics: accuracy, macro/micro F1, confusion matrix.
- ``multiple_choice``: ``{query, choices, answer}`` examples (``train`` optional: few-shot pool);
  log-likelihood of each choice, lm-evaluation-harness style. Metrics: acc, acc_norm.
- ``generate``: ``{prompt, references}`` examples; greedy generation. Metrics: exact match,
  token F1, ROUGE-L, BLEU.
- ``chat``: held-out conversations; assistant-token loss, reply length, distinct-n.
- ``perplexity``: text files (``test``); sliding-window perplexity and bits per byte.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from ..paths import embedded_data_dir
from .examples import ExampleSet, load_examples

TASK_KINDS = ("classify", "multiple_choice", "generate", "chat", "perplexity")
_COMMON = {"name", "description", "kind", "test", "licence", "license"}
#: The fields each kind accepts (besides the common ones) and requires.
_KIND_FIELDS: dict[str, set[str]] = {
    "classify": {"train", "text_field", "label_field", "labels", "verbalizers", "template"},
    "multiple_choice": {"train", "template"},
    "generate": {"train", "template", "max_tokens", "stop"},
    "chat": {"max_tokens"},
    "perplexity": {"max_length", "stride", "span"},
}
_KIND_REQUIRED: dict[str, tuple[str, ...]] = {
    "classify": ("train", "labels", "template"),
    "multiple_choice": (),
    "generate": (),
    "chat": (),
    "perplexity": (),
}
_PLACEHOLDER = {"classify": "{text}", "multiple_choice": "{query}", "generate": "{prompt}"}


def tasks_dir() -> Path:
    return embedded_data_dir() / "finetune" / "tasks"


_EXAMPLE_KIND = {"classify": "classify", "multiple_choice": "choice", "generate": "generate", "chat": "chat"}


@dataclass
class TaskSpec:
    """An evaluation task: its data, kind and prompt (:func:`load_task`)."""

    name: str
    kind: str
    train_path: str | None  # a resolved file path or an hf: spec (None: no train split)
    test_path: str
    labels: list[str] = field(default_factory=list)  # classify
    template: str | None = None
    verbalizers: list[str] = field(default_factory=list)  # classify: aligned with labels
    text_field: str = "text"
    label_field: str = "label"
    description: str = ""
    licence: str = ""
    path: Path | None = None  # the YAML file
    max_tokens: int = 64  # generate / chat
    stop: list[str] = field(default_factory=list)  # generate
    max_length: int | None = None  # perplexity
    stride: int | None = None  # perplexity
    span: tuple[float, float] = (0.0, 1.0)  # perplexity
    extra: dict[str, Any] = field(default_factory=dict)

    def _load(self, which: str, **kwargs: Any) -> ExampleSet:
        if self.kind == "perplexity":
            raise ConfigError(f"task {self.name} ({self.kind}) reads text, not examples")
        spec = self.train_path if which == "train" else self.test_path
        if spec is None:
            raise ConfigError(f"task {self.name} has no {which} split (few-shot prompting needs one)")
        if self.kind == "classify":
            kwargs = {"labels": self.labels, "text_field": self.text_field, "label_field": self.label_field, **kwargs}
        return load_examples(spec, _EXAMPLE_KIND[self.kind], **kwargs)

    def train(self, **kwargs: Any) -> ExampleSet:
        """The training examples (``load_examples`` keyword arguments pass through)."""
        return self._load("train", **kwargs)

    def test(self, **kwargs: Any) -> ExampleSet:
        """The test examples."""
        return self._load("test", **kwargs)

    def prompt_kwargs(self) -> dict[str, Any]:
        """The keyword arguments :func:`lmforge.eval.prompting.classify_by_prompting` takes from a task."""
        return {"template": self.template, "verbalizers": list(self.verbalizers)}


def list_tasks() -> list[str]:
    """Names of the embedded tasks."""
    d = tasks_dir()
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else []


def _is_path(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml")) or os.sep in spec or "/" in spec


def load_task(name_or_path: str | os.PathLike[str]) -> TaskSpec:
    """An embedded task by name (``sgd-domain``) or a task YAML file by path."""
    spec = os.fspath(name_or_path)
    if _is_path(spec):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ConfigError(f"task file not found: {spec}")
    else:
        path = tasks_dir() / f"{spec}.yaml"
        if not path.is_file():
            names = list_tasks()
            close = difflib.get_close_matches(spec, names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown task '{spec}'{hint}; embedded tasks: {', '.join(names) or 'none'}, or give a YAML path")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read task file {path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"task file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    return _parse(data, path)


def _str_field(data: dict[str, Any], key: str, path: Path, default: str | None = None) -> str:
    value = data.get(key, default)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{path}: '{key}' must be a non-empty string, got {value!r}")
    return value


def _data_path(value: str, path: Path) -> str:
    if value.startswith("hf:"):
        return value
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (path.parent / p).resolve())


def _int_field(data: dict[str, Any], key: str, path: Path, minimum: int) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{path}: '{key}' must be an integer >= {minimum}, got {value!r}")
    return value


def _parse(data: Any, path: Path) -> TaskSpec:
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a task file must be a YAML mapping of fields, got {type(data).__name__}")
    kind = data.get("kind")
    if kind not in TASK_KINDS:
        raise ConfigError(f"{path}: 'kind' must be one of {', '.join(TASK_KINDS)}, got {kind!r}")
    allowed = _COMMON | _KIND_FIELDS[kind]
    unknown = sorted(set(map(str, data)) - allowed)
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(allowed), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{path}: unknown field '{unknown[0]}' for a {kind} task{hint}; fields: {', '.join(sorted(allowed))}")
    missing = [k for k in ("test", *_KIND_REQUIRED[kind]) if k not in data]
    if missing:
        raise ConfigError(f"{path}: missing task field(s) {', '.join(missing)}")
    template = None
    if "template" in data:
        template = _str_field(data, "template", path)
        if _PLACEHOLDER[kind] not in template:
            raise ConfigError(f"{path}: 'template' must contain {_PLACEHOLDER[kind]}, got {template!r}")
    spec = TaskSpec(
        name=str(data.get("name") or path.stem),
        kind=kind,
        train_path=_data_path(_str_field(data, "train", path), path) if "train" in data else None,
        test_path=_data_path(_str_field(data, "test", path), path),
        template=template,
        description=str(data.get("description") or ""),
        licence=str(data.get("licence") or data.get("license") or ""),
        path=path,
    )
    if kind == "classify":
        _parse_labels(data, path, spec)
    max_tokens = _int_field(data, "max_tokens", path, 1)
    if max_tokens is not None:
        spec.max_tokens = max_tokens
    stop = data.get("stop", [])
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or any(not isinstance(x, str) or not x for x in stop):
        raise ConfigError(f"{path}: 'stop' must be a text or a list of non-empty texts, got {stop!r}")
    spec.stop = stop
    spec.max_length = _int_field(data, "max_length", path, 2)
    spec.stride = _int_field(data, "stride", path, 1)
    if spec.stride is not None and spec.max_length is not None and spec.stride > spec.max_length:
        raise ConfigError(f"{path}: 'stride' ({spec.stride}) must not exceed 'max_length' ({spec.max_length})")
    if "span" in data:
        span = data["span"]
        ok = isinstance(span, list) and len(span) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in span)
        if not ok or not 0 <= span[0] < span[1] <= 1:
            raise ConfigError(f"{path}: 'span' must be [start, end] fractions with 0 <= start < end <= 1, got {span!r}")
        spec.span = (float(span[0]), float(span[1]))
    return spec


def _parse_labels(data: dict[str, Any], path: Path, spec: TaskSpec) -> None:
    labels = data["labels"]
    if not isinstance(labels, list) or not labels or any(isinstance(x, (dict, list)) or x is None for x in labels):
        raise ConfigError(f"{path}: 'labels' must be a non-empty list of label names")
    labels = [str(x).strip() for x in labels]
    if len(set(labels)) != len(labels) or any(not x for x in labels):
        raise ConfigError(f"{path}: 'labels' has empty or repeated names")
    verbal = data.get("verbalizers") or {}
    if not isinstance(verbal, dict):
        raise ConfigError(f"{path}: 'verbalizers' must map label names to the words scored for them")
    stray = [str(k) for k in verbal if str(k) not in labels]
    if stray:
        raise ConfigError(f"{path}: verbalizer for '{stray[0]}', which is not one of the labels")
    verbalizers = []
    for label in labels:
        v = verbal.get(label, label)
        if not isinstance(v, str) or not v.strip():
            raise ConfigError(f"{path}: the verbalizer of '{label}' must be a non-empty string")
        verbalizers.append(v)
    spec.labels, spec.verbalizers = labels, verbalizers
    spec.text_field = _str_field(data, "text_field", path, "text")
    spec.label_field = _str_field(data, "label_field", path, "label")
