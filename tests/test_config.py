"""Configs: defaults <- YAML recipe <- key=value overrides, coercion, presets and errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from lmforge.config import from_dict, load_config, parse_overrides, to_dict
from lmforge.data import DataPrepareConfig
from lmforge.errors import ConfigError, LmforgeError
from lmforge.model.gpt import GPTConfig
from lmforge.model.presets import PRESETS
from lmforge.paths import recipes_dir
from lmforge.commands.tokenizer import TokenizerTrainConfig
from lmforge.train.pretrain import PretrainConfig


@dataclass
class Inner:
    n: int = 1
    rate: float = 0.5
    flag: bool = False
    names: list[str] = field(default_factory=lambda: ["a"])
    sizes: list[int] = field(default_factory=list)
    maybe: int | None = None
    label: str | None = "x"
    mode: Literal["fast", "slow"] = "fast"
    text: str = "hello"


@dataclass
class Outer:
    name: str = "outer"
    inner: Inner = field(default_factory=Inner)


def _recipe(tmp_path: Path, text: str) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    return str(path)


# ------------------------------------------------------------------------------- layering
def test_defaults_then_recipe_then_overrides(tmp_path: Path) -> None:
    recipe = _recipe(
        tmp_path,
        "data: some/data\nmodel:\n  n_layer: 3\n  n_head: 2\n  n_embd: 64\ntrain:\n  lr: 2.0e-3\n  max_steps: 50\n",
    )
    cfg = load_config(PretrainConfig, "pretrain", recipe, ["train.lr=3e-4", "model.n_embd=96", "out_dir=elsewhere"])
    assert cfg.data == "some/data"  # recipe
    assert cfg.out_dir == "elsewhere"  # override of a default
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd) == (3, 2, 96)  # recipe refined by override
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)  # override beats recipe
    assert cfg.train.max_steps == 50  # recipe, untouched by overrides
    assert cfg.train.optimizer == "adamw" and cfg.train.beta2 == 0.95  # defaults survive
    assert cfg.model.head_dim == 48  # derived after the layers are merged


def test_named_recipe_and_no_recipe() -> None:
    for path in sorted((recipes_dir() / "pretrain").glob("*.yaml")):  # by name, from recipes/pretrain/
        recipe = yaml.safe_load(path.read_text(encoding="utf-8"))
        cfg = load_config(PretrainConfig, "pretrain", path.stem, ["train.max_steps=7"])
        assert cfg.train.max_steps == 7
        for key, value in recipe["train"].items():
            if key != "max_steps":
                assert getattr(cfg.train, key) == value, (path.name, key)
        model = dict(PRESETS[recipe["model"]["preset"]]) if "preset" in recipe["model"] else {}
        model |= {k: v for k, v in recipe["model"].items() if k != "preset"}
        for key, value in model.items():
            assert getattr(cfg.model, key) == value, (path.name, key)
        assert load_config(PretrainConfig, "pretrain", str(path), ["train.max_steps=7"]) == cfg  # or by path
    assert load_config(PretrainConfig, "pretrain", None, []) == PretrainConfig()


def test_parse_overrides_nests_and_parses_yaml_scalars() -> None:
    out = parse_overrides(["a.b=1", "a.c=x", "d=[1, 2]", "e=", "f=null", "g=k=v", "h=1.5", "i=true"])
    assert out == {"a": {"b": 1, "c": "x"}, "d": [1, 2], "e": "", "f": None, "g": "k=v", "h": 1.5, "i": True}


# ------------------------------------------------------------------------------ coercion
@pytest.mark.parametrize(
    ("override", "attr", "expected"),
    [
        ("inner.n=7", "n", 7),
        ("inner.n=1e3", "n", 1000),  # YAML reads 1e3 as text; an integral number is accepted
        ("inner.n=1_000", "n", 1000),
        ("inner.n=4.0", "n", 4),
        ("inner.rate=3e-4", "rate", 3e-4),
        ("inner.rate=2", "rate", 2.0),
        ("inner.flag=true", "flag", True),
        ("inner.flag=yes", "flag", True),
        ("inner.flag=off", "flag", False),
        ("inner.flag=0", "flag", False),
        ("inner.names=x.txt,y.txt", "names", ["x.txt", "y.txt"]),
        ("inner.names=[p, q]", "names", ["p", "q"]),
        ("inner.names=", "names", []),
        ("inner.sizes=1,2,3", "sizes", [1, 2, 3]),
        ("inner.maybe=5", "maybe", 5),
        ("inner.maybe=none", "maybe", None),
        ("inner.maybe=null", "maybe", None),
        ("inner.label=null", "label", None),
        ("inner.mode=slow", "mode", "slow"),
        ("inner.text=123", "text", "123"),
    ],
)
def test_values_are_coerced_to_the_field_type(override: str, attr: str, expected) -> None:
    cfg = from_dict(Outer, parse_overrides([override]))
    value = getattr(cfg.inner, attr)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("inner.n=2.5", r"inner\.n: expected an integer, got 2\.5"),
        ("inner.n=abc", r"inner\.n: expected an integer"),
        ("inner.n=true", r"inner\.n: expected an integer, got True"),
        ("inner.rate=fast", r"inner\.rate: expected a number, got 'fast'"),
        ("inner.flag=maybe", r"inner\.flag: expected true or false, got 'maybe'"),
        ("inner.flag=2", r"inner\.flag: expected true or false, got 2"),
        ("inner.sizes=1,x", r"inner\.sizes\[1\]: expected an integer, got 'x'"),
        ("inner.maybe=many", r"inner\.maybe: expected an integer"),
        ("inner.mode=medium", r"inner\.mode: 'medium' is not one of fast, slow"),
        ("inner.text=[1, 2]", r"inner\.text: expected text"),
        ("inner.text=null", r"inner\.text: expected text, got None"),  # not the string 'None'
        ("inner.text=~", r"inner\.text: expected text, got None"),
        ("inner=3", r"inner: expected a mapping of settings, got 3"),
    ],
)
def test_bad_values_are_config_errors(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        from_dict(Outer, parse_overrides([override]))


def test_real_configs_coerce_and_validate() -> None:
    cfg = load_config(
        PretrainConfig,
        "pretrain",
        None,
        ["model.n_kv_head=none", "model.qk_norm=yes", "train.max_steps=1e3", "model.pos_embedding=rope"],
    )
    assert cfg.model.n_kv_head == cfg.model.n_head and cfg.model.qk_norm is True
    assert cfg.train.max_steps == 1000 and cfg.model.pos_embedding == "rope"
    tok = load_config(TokenizerTrainConfig, "tokenizer", None, ["inputs=a.txt,b.txt", "max_documents=10"])
    assert tok.inputs == ["a.txt", "b.txt"] and tok.max_documents == 10
    data = load_config(DataPrepareConfig, "data", None, ["max_documents=null", "val_fraction=0"])
    assert data.max_documents is None and data.val_fraction == 0.0
    # __post_init__ validation surfaces as a ConfigError naming the section
    with pytest.raises(ConfigError, match=r"model: n_embd \(32\) must be divisible by n_head \(5\)"):
        load_config(PretrainConfig, "pretrain", None, ["model.n_embd=32", "model.n_head=5"])
    with pytest.raises(ConfigError, match="n_head .* must be a multiple of n_kv_head"):
        load_config(PretrainConfig, "pretrain", None, ["model.n_head=4", "model.n_kv_head=3", "model.n_embd=64"])
    with pytest.raises(ConfigError, match="train.max_steps must be positive"):
        load_config(PretrainConfig, "pretrain", None, ["train.max_steps=0"])
    with pytest.raises(ConfigError, match=r"dropout must be in \[0, 1\)"):
        load_config(PretrainConfig, "pretrain", None, ["model.dropout=1"])
    with pytest.raises(ConfigError, match="train.optimizer: 'sgd' is not one of adamw, muon"):
        load_config(PretrainConfig, "pretrain", None, ["train.optimizer=sgd"])


def test_to_dict_round_trips() -> None:
    cfg = load_config(PretrainConfig, "pretrain", None, ["model.preset=llama-tiny", "train.lr=5e-4"])
    assert from_dict(PretrainConfig, to_dict(cfg)) == cfg


# ------------------------------------------------------------------------------- presets
def test_preset_then_refined_by_other_keys(tmp_path: Path) -> None:
    cfg = load_config(PretrainConfig, "pretrain", None, ["model.preset=gpt2", "model.n_layer=2"])
    gpt2 = PRESETS["gpt2"]
    assert cfg.model.n_layer == 2  # refined
    assert (cfg.model.n_embd, cfg.model.vocab_size, cfg.model.mlp) == (768, 50257, "gelu_tanh")  # from the preset
    # key order does not matter: the preset is the base, every other key refines it
    again = load_config(PretrainConfig, "pretrain", None, ["model.n_layer=2", "model.preset=gpt2"])
    assert again == cfg
    # a recipe's preset refined by the recipe and by the command line; the CLI may switch the preset
    recipe = _recipe(tmp_path, "model:\n  preset: llama-tiny\n  n_layer: 1\n")
    cfg = load_config(PretrainConfig, "pretrain", recipe, ["model.n_embd=128"])
    llama = PRESETS["llama-tiny"]
    assert (cfg.model.n_layer, cfg.model.n_embd) == (1, 128)
    assert (cfg.model.n_kv_head, cfg.model.norm, cfg.model.pos_embedding) == (llama["n_kv_head"], "rmsnorm", "rope")
    switched = load_config(PretrainConfig, "pretrain", recipe, ["model.preset=gpt2"])
    assert (switched.model.n_layer, switched.model.n_embd) == (1, gpt2["n_embd"])
    # the preset name is not stored: the resulting config is plain fields
    assert "preset" not in to_dict(cfg.model)


def test_every_preset_builds_a_valid_config() -> None:
    for name, values in PRESETS.items():
        cfg = from_dict(GPTConfig, {"preset": name})
        for key, value in values.items():
            assert getattr(cfg, key) == value, (name, key)


def test_unknown_preset() -> None:
    message = r"unknown model preset 'gpt3' \(did you mean 'gpt2'\?\); available: .*smollm2"
    with pytest.raises(ConfigError, match=message):
        load_config(PretrainConfig, "pretrain", None, ["model.preset=gpt3"])


# ----------------------------------------------------------------------- unknown keys etc.
def test_unknown_keys_get_a_did_you_mean_hint(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown setting 'model\.n_layr' \(did you mean 'n_layer'\?\)"):
        load_config(PretrainConfig, "pretrain", None, ["model.n_layr=2"])
    with pytest.raises(ConfigError, match=r"unknown setting 'trian' \(did you mean 'train'\?\)"):
        load_config(PretrainConfig, "pretrain", None, ["trian.lr=1"])
    with pytest.raises(ConfigError, match=r"unknown setting 'train\.learning_rate'.*valid keys: max_steps"):
        load_config(PretrainConfig, "pretrain", None, ["train.learning_rate=1"])
    recipe = _recipe(tmp_path, "train:\n  max_step: 10\n")  # a typo in a recipe is caught too
    with pytest.raises(ConfigError, match=r"unknown setting 'train\.max_step' \(did you mean 'max_steps'\?\)"):
        load_config(PretrainConfig, "pretrain", recipe, [])
    with pytest.raises(ConfigError, match=r"unknown setting 'train\.preset'"):  # only sections with presets
        load_config(PretrainConfig, "pretrain", None, ["train.preset=gpt2"])


def test_malformed_overrides_and_recipes(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"override 'train\.lr' is not of the form key=value"):
        parse_overrides(["train.lr"])
    with pytest.raises(ConfigError, match="has an empty key"):
        parse_overrides(["=3"])
    with pytest.raises(ConfigError, match="has an empty key"):
        parse_overrides(["train..lr=3"])
    with pytest.raises(ConfigError, match="conflicts with an earlier override of 'model'"):
        parse_overrides(["model=x", "model.n_layer=2"])
    name = sorted((recipes_dir() / "pretrain").glob("*.yaml"))[0].stem
    with pytest.raises(ConfigError, match=rf"unknown pretrain recipe '{name}x' \(did you mean '{name}'\?\); available"):
        load_config(PretrainConfig, "pretrain", name + "x", [])
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_config(PretrainConfig, "pretrain", str(tmp_path / "missing.yaml"), [])
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(PretrainConfig, "pretrain", _recipe(tmp_path, "train: [unclosed\n"), [])
    with pytest.raises(ConfigError, match="a recipe must be a mapping"):
        load_config(PretrainConfig, "pretrain", _recipe(tmp_path, "- a\n- b\n"), [])
    assert load_config(PretrainConfig, "pretrain", _recipe(tmp_path, ""), []) == PretrainConfig()
    assert issubclass(ConfigError, LmforgeError)


def test_a_partial_section_keeps_the_parents_defaults() -> None:
    """FinetuneConfig.train starts from fine-tuning defaults: overriding one train setting keeps the rest."""
    from lmforge.train.engine import TrainConfig
    from lmforge.train.finetune import FinetuneConfig

    plain = load_config(FinetuneConfig, "finetune", None, ["base=x"])
    assert plain.train.max_steps != TrainConfig().max_steps  # the fine-tuning defaults differ
    tuned = load_config(FinetuneConfig, "finetune", None, ["base=x", "train.lr=5e-3"])
    assert tuned.train.lr == 5e-3
    assert (tuned.train.max_steps, tuned.train.warmup_steps, tuned.train.min_lr_ratio) == (
        plain.train.max_steps, plain.train.warmup_steps, plain.train.min_lr_ratio)
