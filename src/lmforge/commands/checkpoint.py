"""Whole-checkpoint commands: ``lmforge quantize``, ``lmforge prune`` (with optional recovery
fine-tuning) and ``lmforge merge``. Each reads a checkpoint, runs a tensor operation of
:mod:`lmforge.model` (quantize_model, prune_model, merge_peft) and writes a new checkpoint with
the source's config sections, tokenizer and side files. The operations themselves stay in
model/, which knows nothing of files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ..config import CHECKPOINT_HELP, option
from ..errors import ConfigError, LmforgeError
from ..fileio import atomic_write_json, refuse_existing, staged_dir
from ..model.peft import merge_peft
from ..model.prune import check_settings, prune_model
from ..model.quant import quant_spec, quantize_model, read_spec
from ..checkpoint.adapters import is_adapter_dir, load_adapter, read_adapter_meta
from ..checkpoint.files import copy_sidecars, read_config, resolve_checkpoint
from ..checkpoint.weights import load_model, save_checkpoint


# ------------------------------------------------------------------------------ quantize
def quantize_checkpoint(
    src: str | Path, out: str | Path, method: str, group_size: int = 32, *, overwrite: bool = False
) -> Path:
    """Write a quantized copy of checkpoint ``src`` (or a run's newest) to ``out``: weights,
    config.json (with its ``quantization`` section and the source's other sections),
    tokenizer.json and the tokenizer/chat-template side files. Atomic; an existing ``out``
    is replaced only with ``overwrite``."""
    quant_spec(method, group_size, ())  # a bad method or group size fails before loading
    ckpt = resolve_checkpoint(src)
    config = read_config(ckpt)
    stored = read_spec(config, str(ckpt))
    if stored is not None:
        raise LmforgeError(f"{ckpt} is already quantized ({stored['method']}); quantize its full-precision checkpoint")
    out = Path(out)
    if out.resolve() == ckpt.resolve():
        raise LmforgeError("the output must differ from the checkpoint being quantized")
    with staged_dir(out, overwrite) as tmp:
        model, _ = load_model(ckpt)
        quantize_model(model, method, group_size)
        extra = {k: v for k, v in config.items() if k not in ("format", "lmforge_version", "model", "quantization")}
        tok = ckpt / "tokenizer.json"
        save_checkpoint(tmp, model, tok if tok.is_file() else None, extra=extra)
        copy_sidecars(ckpt, tmp)
    return out


# ------------------------------------------------------------------------------ prune
def prune_checkpoint(
    src: str | Path,
    out: str | Path,
    method: str,
    ratio: float,
    *,
    calib_data: str | Path | None = None,
    calib_batches: int = 16,
    importance: str = "auto",
    multiple_of: int = 1,
    scope: str = "layer",
    include_embeddings: bool = False,
    include_head: bool = False,
    overwrite: bool = False,
) -> tuple[Path, dict[str, Any]]:
    """Write a pruned copy of checkpoint ``src`` (or a run's newest) to ``out`` (atomic).
    Returns ``out`` and the report (also appended to config.json's ``"pruning"`` list)."""
    check_settings(method, ratio, importance, scope)
    ckpt = resolve_checkpoint(src)
    config = read_config(ckpt)
    if config.get("quantization"):
        raise ConfigError(f"{ckpt} is quantized; prune its full-precision checkpoint, then quantize")
    if config.get("adapter") or not (ckpt / "model.safetensors").is_file():
        raise ConfigError(f"{ckpt} is an adapter checkpoint; merge it first (lmforge merge), then prune")
    out = Path(out)
    if out.resolve() == ckpt.resolve():
        raise ConfigError("the output must differ from the checkpoint being pruned")
    model, _ = load_model(ckpt)
    calibration = None
    if method != "magnitude" and importance != "weight" and calib_data is not None:
        _check_vocab(calib_data, model.config.vocab_size)
        calibration = calibration_batches(calib_data, model.config.context_length, calib_batches)
    report = prune_model(
        model,
        method,
        ratio,
        calibration=calibration,
        importance=importance,
        multiple_of=multiple_of,
        scope=scope,
        include_embeddings=include_embeddings,
        include_head=include_head,
    )
    report["source"] = str(ckpt)
    extra = {k: v for k, v in config.items() if k not in ("format", "lmforge_version", "model")}
    extra["pruning"] = [*config.get("pruning", []), report]
    with staged_dir(out, overwrite) as tmp:
        tok = ckpt / "tokenizer.json"
        save_checkpoint(tmp, model, tok if tok.is_file() else None, extra=extra)
        copy_sidecars(ckpt, tmp)
    return out, report


def _check_vocab(data_dir: str | Path, vocab_size: int) -> None:
    from ..data.shards import load_meta

    vocab = int(load_meta(data_dir)["vocab_size"])
    if vocab > vocab_size:
        raise ConfigError(
            f"{data_dir} was tokenized with {vocab} tokens, more than the model's {vocab_size}: "
            "use data prepared with the checkpoint's tokenizer"
        )


def prune_and_recover(
    src: str | Path,
    out: str | Path,
    method: str,
    ratio: float,
    *,
    recover_data: str | Path | None = None,
    recover_steps: int = 200,
    recover_overrides: list[str] | None = None,
    calib_data: str | Path | None = None,
    overwrite: bool = False,
    **prune_kwargs: Any,
) -> dict[str, Any]:
    """``lmforge prune``: prune ``src``; with ``recover_data``, fine-tune the pruned model with
    the LM objective on those prepared shards (the pretraining engine, started from the
    pruned weights). Without recovery ``out`` is the pruned checkpoint; with it ``out`` is a
    run directory: ``out/pruned`` (before recovery), ``out/checkpoints/step_N`` (after),
    metrics, curves and ``out/prune_report.json``. Returns the report."""
    out = Path(out)
    if recover_data is None:
        if recover_overrides:
            raise ConfigError(f"settings {recover_overrides} apply to recovery fine-tuning; add --recover-data DIR")
        path, report = prune_checkpoint(src, out, method, ratio, calib_data=calib_data, overwrite=overwrite,
                                        **prune_kwargs)
        return {"checkpoint": str(path), "prune": report}
    if recover_steps <= 0:
        raise ConfigError(f"--recover-steps must be positive, got {recover_steps}")
    refuse_existing(out, overwrite)
    from ..config import load_config
    from ..runs.report import read_metrics
    from ..train.pretrain import PretrainConfig, run_pretrain

    defaults = [
        f"data={recover_data}",
        f"out_dir={out}",
        f"init_from={out / 'pruned'}",
        f"train.max_steps={recover_steps}",
        "train.lr=1e-3",
        f"train.warmup_steps={max(1, recover_steps // 10)}",
        "train.eval_at_start=true",
        "train.eval_interval=0",
        "overwrite=true",
    ]
    cfg = load_config(PretrainConfig, "pretrain", None, defaults + list(recover_overrides or []))
    path, report = prune_checkpoint(
        src, out / "pruned", method, ratio, calib_data=calib_data or recover_data, overwrite=overwrite, **prune_kwargs
    )
    result = run_pretrain(cfg)
    evals = [r for r in read_metrics(out / "metrics.jsonl") if r.get("kind") == "eval"]
    summary = {
        "checkpoint": result.checkpoint,
        "pruned_checkpoint": str(path),
        "prune": report,
        "recovery": {
            "steps": result.steps,
            "wall_s": result.wall_s,
            "val_loss_after_prune": evals[0].get("val_loss") if evals else None,
            "val_loss_after_recovery": result.final.get("val_loss"),
        },
    }
    atomic_write_json(out / "prune_report.json", summary)
    return summary


def calibration_batches(
    data_dir: str | Path, context_length: int, n_batches: int = 16, batch_size: int = 8, seed: int = 0
) -> list[torch.Tensor]:
    """``n_batches`` batches of random windows (of up to 256 tokens) from the train split of
    prepared shards: the same sampler as pretraining."""
    from ..train.objectives.base import RunContext
    from ..train.objectives.lm import LMObjective

    if n_batches <= 0:
        raise ConfigError(f"calibration batches must be positive, got {n_batches}")
    objective = LMObjective(data_dir, min(context_length, 256), eval_tokens=0)
    objective.setup(RunContext(device=torch.device("cpu"), seed=seed, micro_batch_size=batch_size, grad_accum=1))
    return [objective.train_batch(step, 0)["input_ids"] for step in range(n_batches)]


# ------------------------------------------------------------------------------ merge
def merge_adapter(adapter: str | Path, out: str | Path, *, base: str | Path | None = None, overwrite: bool = False) -> Path:
    """Load ``base`` (default: the base the adapter names), apply the adapter in full
    precision (a QLoRA adapter merges into the unquantized base), fold it in and save."""
    path = Path(adapter)
    if not path.exists():
        raise LmforgeError(f"adapter not found: {adapter}")
    if not is_adapter_dir(path):
        path = resolve_checkpoint(path)
        if not is_adapter_dir(path):
            raise LmforgeError(f"{adapter} is a full checkpoint, not an adapter: there is nothing to merge")
    refuse_existing(out, overwrite)
    meta = read_adapter_meta(path)
    base_path = base or meta.get("base_checkpoint")
    if not base_path:
        raise LmforgeError(f"{path} does not name its base model; pass --base CHECKPOINT")
    if not Path(base_path).exists():
        raise LmforgeError(f"the base checkpoint {base_path} is missing; pass --base CHECKPOINT")
    base_ckpt = resolve_checkpoint(base_path)
    model, _ = load_model(base_ckpt)
    load_adapter(model, path, quantized_base=False)
    merge_peft(model)
    base_config = read_config(base_ckpt)
    extra = {"merged": {"adapter": str(path.resolve()), "base": str(base_ckpt.resolve()), "method": meta.get("method")}}
    for key in ("tokenizer", "labels"):
        cfg_here = read_config(path) if (path / "config.json").is_file() else {}
        if key in cfg_here or key in base_config:
            extra[key] = cfg_here.get(key, base_config.get(key))
    return save_checkpoint(Path(out), model, base_ckpt / "tokenizer.json", extra=extra, sidecars_from=base_ckpt)


# ------------------------------------------------------------------------------ the commands' configs
@dataclass(kw_only=True)
class QuantizeConfig:
    checkpoint: str = option(help=CHECKPOINT_HELP, positional=True)
    out: str = option(help="checkpoint directory to write", positional=True)
    method: Literal["int8", "int4", "bf16"] = option()
    group_size: int = option(32, "int4 group size: 32, 64 or 128 (default 32)")
    overwrite: bool = option(False, "replace an existing output directory")


def run_quantize(cfg: QuantizeConfig) -> None:
    path = quantize_checkpoint(cfg.checkpoint, cfg.out, cfg.method, cfg.group_size, overwrite=cfg.overwrite)
    size = (path / "model.safetensors").stat().st_size
    print(f"quantized {cfg.checkpoint} -> {path} ({cfg.method}, model.safetensors {size / 2**20:.1f} MiB)")


@dataclass(kw_only=True)
class PruneConfig:
    checkpoint: str = option(help=CHECKPOINT_HELP, positional=True)
    out: str = option(help="checkpoint (or, with recovery, run) directory to write", positional=True)
    method: Literal["magnitude", "mlp", "heads"] = option()
    ratio: float = option(help="share of weights / channels / heads removed, in (0, 1)")
    scope: Literal["layer", "global"] = option(
        "layer", "magnitude: one threshold per matrix or over all of them (default layer)")
    importance: Literal["auto", "activation", "weight"] = option(
        "auto", "mlp/heads: activation statistics on calibration data, or weight norms (default auto: activation "
        "when calibration data is given)")
    calib_data: str | None = option(None, "prepared shards for activation importance (default: --recover-data)")
    calib_batches: int = option(16, "calibration batches of 8 windows (default 16)")
    multiple_of: int = option(1, "mlp: round the kept channels to a multiple (default 1)")
    include_embeddings: bool = option(False, "magnitude: prune the token embedding too")
    recover_data: str | None = option(None, "prepared shards: fine-tune the pruned model on them (LM objective)")
    recover_steps: int = option(200, "recovery optimizer steps (default 200)")
    overwrite: bool = option(False, "replace an existing output directory")
    overrides: list[str] = option([], "recovery run settings", positional=True, nargs="*", metavar="key=value")


def run_prune(cfg: PruneConfig) -> None:
    summary = prune_and_recover(
        cfg.checkpoint, cfg.out, cfg.method, cfg.ratio,
        recover_data=cfg.recover_data, recover_steps=cfg.recover_steps, recover_overrides=cfg.overrides,
        calib_data=cfg.calib_data, calib_batches=cfg.calib_batches, importance=cfg.importance,
        multiple_of=cfg.multiple_of, scope=cfg.scope, include_embeddings=cfg.include_embeddings,
        overwrite=cfg.overwrite,
    )
    rep = summary["prune"]
    if rep["method"] == "magnitude":
        what = f"sparsity {rep['sparsity']:.1%} of {rep['targets']} matrices ({rep['sparsity_all']:.1%} of all weights)"
    else:
        shape = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in rep["shape"].items())
        what = f"{shape}; params {rep['params'][0]:,} -> {rep['params'][1]:,} ({rep['importance']} importance)"
    print(f"pruned {cfg.checkpoint} ({rep['method']} {rep['ratio']}): {what}")
    rec = summary.get("recovery")
    if rec:
        before, after = (f"{v:.4f}" if v is not None else "n/a" for v in
                         (rec["val_loss_after_prune"], rec["val_loss_after_recovery"]))
        print(f"recovery: {rec['steps']} steps in {rec['wall_s']:.1f} s, val loss {before} after pruning -> {after}")
    print(f"  checkpoint: {summary['checkpoint']}")


@dataclass(kw_only=True)
class MergeConfig:
    adapter: str = option(help="adapter checkpoint, run directory, or PEFT adapter directory", positional=True)
    out: str = option(help="checkpoint directory to write", positional=True)
    base: str | None = option(None, "the base checkpoint (default: the one the adapter names)")
    overwrite: bool = option(False, "replace an existing output directory")


def run_merge(cfg: MergeConfig) -> None:
    out = merge_adapter(cfg.adapter, cfg.out, base=cfg.base, overwrite=cfg.overwrite)
    print(f"merged {cfg.adapter} -> {out}")
