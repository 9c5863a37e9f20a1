"""Classification tasks: a small YAML file naming the data, the label set and the prompt.

Embedded tasks live in ``data/finetune/tasks/<name>.yaml``; ``load_task`` takes such a name or
the path of a user's YAML file. Fields (``data/finetune/README.md`` documents them):

```yaml
name: sgd-domain                      # optional; defaults to the file stem
description: ...                      # optional
kind: classify                        # the only kind so far
train: ../sgd_domain_train.jsonl      # example files (JSONL/JSON/CSV/Parquet) or hf:NAME[:CONFIG][@SPLIT];
test: ../sgd_domain_test.jsonl        #   relative paths are relative to the YAML file
text_field: text                      # optional (default text)
label_field: label                    # optional (default label)
labels: [Alarm, Buses, ...]           # the label set, in order (label ids index it)
verbalizers: {RentalCars: Car rental} # optional: the words scored per label when prompting
template: "...{text}...\\nAnswer:"     # prompt template: {text}, optionally {labels}
licence: ...                          # optional, informational
```
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

TASK_KINDS = ("classify",)
_FIELDS = {
    "name", "description", "kind", "train", "test", "text_field", "label_field",
    "labels", "verbalizers", "template", "licence", "license",
}
_REQUIRED = ("kind", "train", "test", "labels", "template")


def tasks_dir() -> Path:
    return embedded_data_dir() / "finetune" / "tasks"


@dataclass
class TaskSpec:
    """A classification task: its data, labels and prompt (:func:`load_task`)."""

    name: str
    kind: str
    train_path: str  # a resolved file path or an hf: spec
    test_path: str
    labels: list[str]
    template: str
    verbalizers: list[str]  # aligned with labels
    text_field: str = "text"
    label_field: str = "label"
    description: str = ""
    licence: str = ""
    path: Path | None = None  # the YAML file
    extra: dict[str, Any] = field(default_factory=dict)

    def _load(self, which: str, **kwargs: Any) -> ExampleSet:
        return load_examples(
            self.train_path if which == "train" else self.test_path, "classify", labels=self.labels,
            text_field=self.text_field, label_field=self.label_field, **kwargs,
        )

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


def _parse(data: Any, path: Path) -> TaskSpec:
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a task file must be a YAML mapping of fields, got {type(data).__name__}")
    unknown = sorted(set(map(str, data)) - _FIELDS)
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(_FIELDS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{path}: unknown task field '{unknown[0]}'{hint}; fields: {', '.join(sorted(_FIELDS))}")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise ConfigError(f"{path}: missing task field(s) {', '.join(missing)}")
    kind = data["kind"]
    if kind not in TASK_KINDS:
        raise ConfigError(f"{path}: kind must be one of {', '.join(TASK_KINDS)}, got {kind!r}")
    labels = data["labels"]
    if not isinstance(labels, list) or not labels or any(isinstance(x, (dict, list)) or x is None for x in labels):
        raise ConfigError(f"{path}: 'labels' must be a non-empty list of label names")
    labels = [str(x).strip() for x in labels]
    if len(set(labels)) != len(labels) or any(not x for x in labels):
        raise ConfigError(f"{path}: 'labels' has empty or repeated names")
    template = _str_field(data, "template", path)
    if "{text}" not in template:
        raise ConfigError(f"{path}: 'template' must contain {{text}}, got {template!r}")
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
    return TaskSpec(
        name=str(data.get("name") or path.stem),
        kind=kind,
        train_path=_data_path(_str_field(data, "train", path), path),
        test_path=_data_path(_str_field(data, "test", path), path),
        labels=labels,
        template=template,
        verbalizers=verbalizers,
        text_field=_str_field(data, "text_field", path, "text"),
        label_field=_str_field(data, "label_field", path, "label"),
        description=str(data.get("description") or ""),
        licence=str(data.get("licence") or data.get("license") or ""),
        path=path,
    )
