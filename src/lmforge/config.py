"""Typed configs: dataclasses filled from YAML recipes and ``key=value`` overrides.

Every stage has a dataclass config. A run's settings are built in three layers:
the dataclass defaults, a YAML recipe (a path, or a name under ``recipes/<stage>/``)
and command-line overrides such as ``train.lr=3e-4 model.n_layer=6``. Keys are checked
against the dataclass fields (with a "did you mean" hint) and values are coerced to
the field's type, so a typo is one clear error instead of a silently ignored setting.

A dataclass may define ``__presets__`` (a callable ``name -> dict``): a ``preset`` key
in its section then starts from that preset's values, and the other keys refine it.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from .errors import ConfigError
from .paths import recipes_dir

T = TypeVar("T")


def _suggest(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert ``value`` (from YAML or an override) to the annotated type ``tp``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Union or origin is types.UnionType:
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin in (list, tuple):
        (inner, *_) = get_args(tp) or (Any,)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v != ""] if value else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of settings, got {value!r}")
        return from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "off", "0"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value.replace("_", ""))
            except ValueError:
                f = None
            if f is not None and f.is_integer():
                return int(f)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if value is None or isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected text, got {value!r}")
        return str(value)
    return value


def _factory_defaults(f: dataclasses.Field) -> dict[str, Any]:
    """The settings where a section's ``default_factory`` departs from the section class's own
    defaults (``FinetuneConfig.train`` starts from fine-tuning defaults, not TrainConfig's)."""
    if f.default_factory is dataclasses.MISSING:
        return {}
    made = f.default_factory()
    if not dataclasses.is_dataclass(made):
        return {}
    try:
        plain = to_dict(type(made)())
    except TypeError:  # a section class without defaults for every field
        return {}
    return {k: v for k, v in to_dict(made).items() if v != plain.get(k)}


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) mapping, validating every key."""
    data = dict(data)
    base: dict[str, Any] = {}
    presets = getattr(cls, "__presets__", None)
    if "preset" in data and presets is not None:
        name = data.pop("preset")
        base = dict(presets(name))
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in {**base, **data}.items():
        full = f"{where}.{key}" if where else key
        if key not in fields:
            opts = list(fields) + (["preset"] if presets else [])
            raise ConfigError(f"unknown setting '{full}'{_suggest(key, opts)}; valid keys: {', '.join(opts)}")
        if isinstance(value, dict):  # a section given in part keeps the rest of the parent's defaults
            value = _deep_merge(_factory_defaults(fields[key]), value)
        kwargs[key] = _coerce(value, hints[key], full)
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from None
    return obj


def to_dict(obj: Any) -> Any:
    """A dataclass (nested) as plain YAML/JSON-friendly data."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> ``{"a": {"b": 1}, "c": "x"}`` (values parsed as YAML scalars)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override '{item}' has an empty key")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override '{item}' conflicts with an earlier override of '{part}'")
            node = nxt
        node[parts[-1]] = value
    return out


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def resolve_recipe(stage: str, recipe: str) -> Path:
    """A recipe is a YAML path or a name under ``recipes/<stage>/``."""
    p = Path(recipe)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise ConfigError(f"recipe file not found: {recipe}")
        return p
    cand = recipes_dir() / stage / f"{recipe}.yaml"
    if cand.is_file():
        return cand
    names = sorted(q.stem for q in (recipes_dir() / stage).glob("*.yaml"))
    raise ConfigError(f"unknown {stage} recipe '{recipe}'{_suggest(recipe, names)}; available: {', '.join(names) or 'none'}")


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read recipe {path}: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of settings")
    return data


def load_config(cls: type[T], stage: str, recipe: str | None, overrides: list[str] | None = None) -> T:
    """Defaults <- recipe <- overrides, as a validated ``cls``."""
    data: dict[str, Any] = {}
    if recipe:
        data = read_yaml(resolve_recipe(stage, recipe))
    data = deep_merge(data, parse_overrides(overrides or []))
    return from_dict(cls, data)


# ---- command options ----------------------------------------------------------------------
#: The help of every command's checkpoint argument.
CHECKPOINT_HELP = "a checkpoint directory, or a run directory (its newest checkpoint)"


def option(default: Any = dataclasses.MISSING, help: str | None = None, *, flag: str | None = None,
           aliases: tuple[str, ...] = (), positional: bool = False, nargs: str | None = None,
           metavar: str | None = None, group: str | None = None, choices: tuple[Any, ...] | None = None) -> Any:
    """A field of a command's config dataclass, with what the command line needs to offer it.

    Each command (``lmforge serve``, ``generate``, ...) is a dataclass of these plus a
    ``run(cfg)`` function; ``lmforge.cli`` builds the argparse parser from the fields (the flag
    is ``--`` + the field name with ``-`` for ``_`` unless ``flag`` names it; a ``bool`` is a
    switch, a ``list`` a repeatable flag; ``Literal`` types are the choices), so a command's
    settings are declared once and the library never sees an argparse ``Namespace``.
    Validation lives in the dataclass's ``__post_init__`` (raising ``ConfigError``).
    ``help`` may use argparse's ``%(default)s``."""
    meta = {"help": help, "flag": flag, "aliases": aliases, "positional": positional, "nargs": nargs,
            "metavar": metavar, "group": group, "choices": choices}
    if isinstance(default, list):
        items = list(default)
        return dataclasses.field(default_factory=lambda: list(items), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)
