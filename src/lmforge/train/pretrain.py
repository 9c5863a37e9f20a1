"""`lmforge pretrain`: a GPT from scratch on prepared token shards (next-token objective)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..config import to_dict
from ..data.shards import load_meta
from ..errors import ConfigError
from ..model.gpt import GPT, GPTConfig
from .checkpoint import list_checkpoints
from .engine import Engine, FitResult, TrainConfig
from .objectives.lm import LMObjective
from .tracking import LogConfig


@dataclass
class PretrainConfig:
    data: str = "runs/shakespeare-char/data"  # output of `lmforge data prepare`
    out_dir: str = "runs/pretrain"
    model: GPTConfig = field(default_factory=GPTConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    pad_vocab_to: int = 1  # round the tokenizer's vocabulary up to a multiple (64 speeds up GPUs)
    overwrite: bool = False  # start afresh in an out_dir that holds checkpoints (deletes them and its logs)


def model_config_for_data(cfg: PretrainConfig) -> GPTConfig:
    """The model config with ``vocab_size`` set by the data's tokenizer (padded)."""
    vocab = int(load_meta(cfg.data)["vocab_size"])
    if cfg.pad_vocab_to < 1:
        raise ConfigError(f"pad_vocab_to must be >= 1, got {cfg.pad_vocab_to}")
    padded = -(-vocab // cfg.pad_vocab_to) * cfg.pad_vocab_to
    return replace(cfg.model, vocab_size=padded)


def run_pretrain(cfg: PretrainConfig, resume: bool = False) -> FitResult:
    out = Path(cfg.out_dir)
    if not resume and list_checkpoints(out) and not cfg.overwrite:
        raise ConfigError(
            f"{out} already holds checkpoints: pass --resume to continue, overwrite=true to start afresh, "
            "or choose another out_dir"
        )
    model_cfg = model_config_for_data(cfg)
    torch.manual_seed(cfg.train.seed)
    model = GPT(model_cfg)
    objective = LMObjective(cfg.data, model_cfg.context_length, cfg.train.eval_tokens)
    run_config = to_dict(replace(cfg, model=model_cfg))
    engine = Engine(
        model,
        objective,
        cfg.train,
        out,
        log=cfg.log,
        tokenizer_file=objective.tokenizer_file,
        run_config=run_config,
    )
    engine.start(resume, cfg.overwrite)
    return engine.fit()
