"""`lmforge pretrain`: a GPT from scratch on prepared token shards (next-token objective), or
continued pretraining from a checkpoint's weights (``init_from``), optionally with the
continual-learning plug-ins of :mod:`lmforge.train.continual` (``continual.*``)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..checkpoint import load_model, read_config
from ..config import to_dict
from ..data.shards import load_meta
from ..errors import ConfigError
from ..model.gpt import GPT, GPTConfig
from ..runs.tracking import LogConfig
from .continual import (
    ContinualConfig,
    describe,
    make_penalties,
    replay_lm_objective,
    same_vocabulary,
    whole_parameter_readers,
)
from .engine import Engine, FitResult, TrainConfig, check_parallel
from .objectives.lm import LMObjective
from .saving import SaveSpec
from .state import check_fresh_run


@dataclass
class PretrainConfig:
    data: str = "runs/shakespeare-char/data"  # output of `lmforge data prepare`
    out_dir: str = "runs/pretrain"
    model: GPTConfig = field(default_factory=GPTConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    pad_vocab_to: int = 1  # round the tokenizer's vocabulary up to a multiple (64 speeds up GPUs)
    overwrite: bool = False  # start afresh in an out_dir that holds checkpoints (deletes them and its logs)
    init_from: str = ""  # start from this checkpoint's weights (continued pretraining); its model settings replace model.*
    continual: ContinualConfig = field(default_factory=ContinualConfig)  # replay / L2 / EWC against old data


def model_config_for_data(cfg: PretrainConfig) -> GPTConfig:
    """The model config with ``vocab_size`` set by the data's tokenizer (padded)."""
    vocab = int(load_meta(cfg.data)["vocab_size"])
    if cfg.pad_vocab_to < 1:
        raise ConfigError(f"pad_vocab_to must be >= 1, got {cfg.pad_vocab_to}")
    padded = -(-vocab // cfg.pad_vocab_to) * cfg.pad_vocab_to
    return replace(cfg.model, vocab_size=padded)


def run_pretrain(cfg: PretrainConfig, resume: bool = False) -> FitResult:
    out = Path(cfg.out_dir)
    check_parallel(cfg.train, whole_parameter_readers(cfg.continual))
    check_fresh_run(out, resume, cfg.overwrite)
    torch.manual_seed(cfg.train.seed)
    if cfg.init_from:
        model = initial_model(cfg)
        model_cfg = model.config
    else:
        model_cfg = model_config_for_data(cfg)
        model = GPT(model_cfg)
    lm = LMObjective(cfg.data, model_cfg.context_length, cfg.train.eval_tokens)
    objective = replay_lm_objective(cfg.continual, lm, model_cfg.context_length, cfg.train.eval_tokens)
    run_config = to_dict(replace(cfg, model=model_cfg))
    engine = Engine(
        model,
        objective,
        cfg.train,
        out,
        log=cfg.log,
        saving=SaveSpec(tokenizer_file=lm.tokenizer_file),
        run_config=run_config,
    )
    if cfg.continual.enabled:
        # theta0 and the EWC Fisher are the weights the run starts from (before a resume loads later ones)
        engine.hooks.extend(make_penalties(cfg.continual, engine.model, engine.objective, engine.autocast,
                                           verbose=engine.dist.is_main))
        if engine.dist.is_main:
            print(describe(cfg.continual, engine.objective))
    engine.start(resume, cfg.overwrite)
    shape = f"{model_cfg.n_layer} layers x {model_cfg.n_embd}, {model_cfg.pos_embedding}, {model_cfg.mlp}"
    return engine.fit(report_title=f"Pretraining run {out.name} ({shape})")


def initial_model(cfg: PretrainConfig) -> GPT:
    """The model of checkpoint ``cfg.init_from`` (its weights and settings), checked against the
    data: the same tokenizer vocabulary, a plain (not adapter, not quantized) checkpoint."""
    from ..data.shards import load_meta

    model, ckpt = load_model(cfg.init_from)
    if getattr(model, "peft", None) is not None:
        raise ConfigError(f"init_from={cfg.init_from} is an adapter checkpoint; merge it first (`lmforge merge`)")
    if read_config(ckpt).get("quantization"):
        raise ConfigError(f"init_from={cfg.init_from} is a quantized checkpoint; continue from a full-precision one")
    data_tok = Path(cfg.data) / load_meta(cfg.data).get("tokenizer", "tokenizer.json")
    if not (ckpt / "tokenizer.json").is_file() or not same_vocabulary(ckpt / "tokenizer.json", data_tok):
        raise ConfigError(
            f"init_from={cfg.init_from}: the data in {cfg.data} was prepared with another tokenizer than the "
            "checkpoint's; prepare it with the checkpoint's tokenizer.json"
        )
    return model
