"""The one training loop, shared by every objective.

The engine owns everything that is not the objective: device and precision, the
optimizer and learning-rate schedule, gradient accumulation and clipping, periodic
evaluation, checkpoints and exact resume, logging, and DDP. An objective
(:mod:`lmforge.train.objectives`) only supplies batches and a loss.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from torch.nn.parallel import DistributedDataParallel as DDP

from ..config import to_dict
from ..errors import ConfigError, LmforgeError
from .checkpoint import list_checkpoints, load_training_state, save_checkpoint, unwrap
from .distributed import DistInfo, all_reduce_sum, init_distributed
from .objectives.base import Objective, RunContext
from .optim import build_optimizer
from .schedule import lr_multiplier
from .tracking import LogConfig, RunLogger


@dataclass
class TrainConfig:
    max_steps: int = 2000
    micro_batch_size: int = 12  # examples per forward pass on each process
    grad_accum: int = 1  # global batch = micro_batch_size * grad_accum * world size
    optimizer: Literal["adamw", "muon"] = "adamw"
    lr: float = 1e-3  # AdamW peak rate (embeddings, head and vectors under Muon)
    muon_lr: float = 0.02  # Muon peak rate, RMS-matched to AdamW (torch's match_rms_adamw)
    muon_momentum: float = 0.95
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # final rate as a fraction of the peak
    decay_fraction: float = 0.2  # wsd: share of steps spent decaying
    grad_clip: float = 1.0  # 0 disables
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # bf16/fp16 autocast with fp32 master weights
    compile: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    seed: int = 1337
    threads: int = 0  # CPU threads per process; 0 = cores / processes on this node
    deterministic: bool = False
    eval_interval: int = 250  # steps between evaluations (and always at the end); 0 = only at the end
    eval_at_start: bool = False
    eval_tokens: int = 131072  # held-out tokens per evaluation
    log_interval: int = 10
    ckpt_interval: int = 0  # steps between checkpoints; 0 = only at the end
    keep_checkpoints: int = 2

    def __post_init__(self) -> None:
        positive = ("max_steps", "micro_batch_size", "grad_accum", "log_interval", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"train.{name} must be positive, got {getattr(self, name)}")
        if self.lr <= 0 or self.muon_lr <= 0:
            raise ValueError("learning rates must be positive")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0 or self.eval_interval < 0 or self.ckpt_interval < 0 or self.grad_clip < 0:
            raise ValueError("warmup_steps, eval_interval, ckpt_interval and grad_clip must not be negative")


def resolve_device(name: str, dist: DistInfo) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name == "cuda" and dist.enabled:
        name = f"cuda:{dist.local_rank}"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("train.device asks for CUDA but no GPU is available")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.device: unknown device '{name}'") from None


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@dataclass
class FitResult:
    steps: int
    wall_s: float
    train_s: float
    tokens: int
    tokens_per_s: float
    final: dict[str, float] = field(default_factory=dict)
    peak_rss_mib: float = 0.0
    checkpoint: str | None = None


class Engine:
    """Train ``model`` on ``objective``; writes checkpoints and logs under ``out_dir``."""

    def __init__(
        self,
        model: torch.nn.Module,
        objective: Objective,
        cfg: TrainConfig,
        out_dir: str | Path,
        *,
        log: LogConfig | None = None,
        tokenizer_file: str | Path | None = None,
        run_config: dict[str, Any] | None = None,
        hooks: list[Any] | None = None,
        checkpoint_extra: dict[str, Any] | None = None,
        sidecars_from: str | Path | None = None,
        base_checkpoint: str | Path | None = None,
    ):
        """``hooks``: objects with optional ``extra_loss()`` (a term added to every micro-batch's
        loss, e.g. AdaLoRA's orthogonality penalty), ``after_step(step)`` (called after the
        optimizer step with the gradients still present, e.g. AdaLoRA's rank allocation) and
        ``metrics()`` (logged with the train metrics). ``checkpoint_extra`` goes into every
        checkpoint's config.json; ``sidecars_from`` and ``base_checkpoint`` as in
        :func:`~lmforge.train.checkpoint.save_checkpoint`."""
        self.cfg = cfg
        self.hooks = list(hooks or [])
        self.checkpoint_extra = dict(checkpoint_extra or {})
        self.sidecars_from = sidecars_from
        self.base_checkpoint = base_checkpoint
        self.out_dir = Path(out_dir)
        self.log_cfg = log or LogConfig()
        self.tokenizer_file = tokenizer_file
        self.run_config = run_config or {}
        self.objective = objective

        probe = "cuda" if cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu"
        self.dist = init_distributed(probe)
        self.device = resolve_device(cfg.device, self.dist)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = cfg.threads or max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        if self.device.type == "cpu":
            torch.set_num_threads(threads)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True)
        if cfg.precision == "fp16" and self.device.type != "cuda":
            raise ConfigError("train.precision=fp16 needs a CUDA GPU; use bf16 on CPU")
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)

        self.model = model.to(self.device)
        self.optimizer = build_optimizer(self.model, cfg, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
        # Evaluation runs the (compiled) module without the DDP wrapper: ranks may get uneven
        # numbers of eval batches, and DDP's forward may issue collectives (buffer broadcasts).
        self.eval_model: torch.nn.Module = torch.compile(self.model) if cfg.compile else self.model
        self.forward_model = self.eval_model
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward_model = DDP(self.eval_model, device_ids=ids)
        self.ctx = RunContext(
            device=self.device,
            seed=cfg.seed,
            micro_batch_size=cfg.micro_batch_size,
            grad_accum=cfg.grad_accum,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            autocast=self.autocast,
        )
        objective.setup(self.ctx)
        self.step = 0

    # ---- helpers ------------------------------------------------------------------------
    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _lr_mult(self, step: int) -> float:
        c = self.cfg
        return lr_multiplier(step, c.max_steps, c.schedule, c.warmup_steps, c.min_lr_ratio, c.decay_fraction)

    def resume_from(self, ckpt: Path | None = None) -> Path:
        """Load weights, optimizer, RNG and data position from ``ckpt`` (default: the newest)."""
        if ckpt is None:
            found = list_checkpoints(self.out_dir)
            if not found:
                raise LmforgeError(f"nothing to resume: {self.out_dir} has no checkpoints/")
            ckpt = found[-1]
        from safetensors.torch import load_file

        saved = json.loads((ckpt / "config.json").read_text())["model"]
        net = unwrap(self.model)
        mine = to_dict(net.config)
        if saved != mine:
            diff = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
            raise ConfigError(f"cannot resume {ckpt}: the model settings differ ({', '.join(diff)})")
        if getattr(net, "peft", None) is not None:  # an adapter checkpoint: only the trained tensors
            from ..model.peft.io import read_adapter_weights

            weights = read_adapter_weights(ckpt, net, net.peft.cfg, device=str(self.device))
            missing, unexpected = net.load_state_dict(weights, strict=False)
            if unexpected or any(n in missing for n, p in net.named_parameters() if p.requires_grad):
                raise ConfigError(f"cannot resume {ckpt}: its adapter does not match this run's peft settings")
        else:
            net.load_state_dict(load_file(str(ckpt / "model.safetensors"), device=str(self.device)))
        state = load_training_state(ckpt, self.optimizer)
        self.step = int(state["step"])
        return ckpt

    def start(self, resume: bool, overwrite: bool) -> None:
        """Prepare ``out_dir`` for a run: resume from its newest checkpoint, or (with
        ``overwrite``) clear the old run's checkpoints and metrics, which would otherwise pass
        for this run's (and be resumed or sampled from, or mix with its curves); then write
        the run's config.yaml."""
        if resume:
            ckpt = self.resume_from()
            if self.dist.is_main:
                print(f"resuming from {ckpt} (step {self.step})")
        if self.dist.is_main:
            if not resume and overwrite:
                shutil.rmtree(self.out_dir / "checkpoints", ignore_errors=True)
                (self.out_dir / "metrics.jsonl").unlink(missing_ok=True)
                shutil.rmtree(self.out_dir / "tb", ignore_errors=True)
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.yaml").write_text(yaml.safe_dump(self.run_config, sort_keys=False))

    def save(self) -> Path:
        path = self.out_dir / "checkpoints" / f"step_{self.step:07d}"
        if self.dist.is_main:
            state = {"step": self.step, "data": self.objective.state_dict(), "world_size": self.dist.world_size}
            save_checkpoint(
                path,
                self.model,
                self.tokenizer_file,
                optimizer=self.optimizer,
                trainer_state=state,
                extra={**self.checkpoint_extra, "step": self.step, "run": self.run_config},
                sidecars_from=self.sidecars_from,
                base_checkpoint=self.base_checkpoint,
            )
            for old in list_checkpoints(self.out_dir)[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        if self.dist.enabled:
            torch.distributed.barrier()
        return path

    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        try:
            return self.objective.evaluate(self.eval_model)
        finally:
            self.model.train()

    # ---- the loop -------------------------------------------------------------------------
    def fit(self) -> FitResult:
        cfg, dist = self.cfg, self.dist
        net = unwrap(self.model)
        logger = RunLogger(self.out_dir, self.log_cfg, dist.is_main, cfg.max_steps, self.step, self.run_config)
        if hasattr(net, "num_params"):
            logger.print(
                f"model: {net.num_params() / 1e6:.2f}M parameters, {net.flops_per_token() / 1e6:.1f} MFLOP/token | "
                f"device {self.device} x{dist.world_size}, {cfg.precision}, global batch {self.ctx.global_batch_size}"
            )
        final: dict[str, float] = {}
        if cfg.eval_at_start and self.step == 0:
            final = self.evaluate()
            logger.log(0, "eval", final)
        start = time.perf_counter()
        train_time = 0.0
        tokens_total = 0
        loss_sum = torch.zeros((), device=self.device)  # weighted train loss since the last log (on device: no sync)
        weight_sum = 0.0
        window_t0, window_tokens = time.perf_counter(), 0
        self.model.train()
        while self.step < cfg.max_steps:
            t0 = time.perf_counter()
            lr_mult = self._lr_mult(self.step)
            self.optimizer.set_lr_multiplier(lr_mult)
            batches = [self.objective.train_batch(self.step, m) for m in range(cfg.grad_accum)]
            weights = [float(self.objective.batch_weight(b)) for b in batches]
            total_w = all_reduce_sum(torch.tensor([sum(weights)], dtype=torch.float64), dist).item()
            if total_w <= 0:
                raise LmforgeError(f"step {self.step}: the batch has no examples carrying loss")
            step_tokens = 0
            for m, batch in enumerate(batches):
                sync = m == cfg.grad_accum - 1 or not dist.enabled
                with nullcontext() if sync else self.forward_model.no_sync():
                    with self.autocast():
                        loss, metrics = self.objective.loss(self.forward_model, batch)
                        extra = [t for h in self.hooks if (t := getattr(h, "extra_loss", lambda: None)()) is not None]
                    if extra:
                        loss = loss + sum(extra)
                    scaled = loss * (weights[m] / total_w * dist.world_size)
                    (self.scaler.scale(scaled) if self.scaler else scaled).backward()
                loss_sum += loss.detach().float() * weights[m]
                step_tokens += int(metrics.get("tokens", 0))
            weight_sum += total_w
            if self.scaler:
                for opt in self.optimizer.optimizers:
                    self.scaler.unscale_(opt)
            grad_norm = (
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else None
            )
            if self.scaler:
                for opt in self.optimizer.optimizers:
                    self.scaler.step(opt)
                self.scaler.update()
            else:
                self.optimizer.step()
            for hook in self.hooks:
                if hasattr(hook, "after_step"):
                    hook.after_step(self.step + 1)
            self.optimizer.zero_grad()
            self.step += 1
            step_tokens *= dist.world_size
            tokens_total += step_tokens
            window_tokens += step_tokens
            train_time += time.perf_counter() - t0

            last = self.step == cfg.max_steps
            if self.step % cfg.log_interval == 0 or last:
                train_loss = all_reduce_sum(loss_sum.double().cpu().reshape(1), dist).item() / weight_sum
                if not math.isfinite(train_loss):
                    raise LmforgeError(f"training diverged at step {self.step} (loss {train_loss}); lower train.lr")
                loss_sum.zero_()
                weight_sum = 0.0
                elapsed = time.perf_counter() - window_t0
                tps = window_tokens / max(elapsed, 1e-9)
                row = {"loss": train_loss, "lr": cfg.lr * lr_mult, "tokens_per_s": tps}
                if grad_norm is not None:
                    row["grad_norm"] = float(grad_norm)
                for hook in self.hooks:
                    row.update(getattr(hook, "metrics", dict)())
                if hasattr(net, "flops_per_token"):
                    row["tflops"] = tps * net.flops_per_token() / 1e12
                logger.log(self.step, "train", row)
                logger.progress(self.step, {"loss": f"{train_loss:.4f}", "tok/s": f"{tps:,.0f}"})
                window_t0, window_tokens = time.perf_counter(), 0
            if (cfg.eval_interval and self.step % cfg.eval_interval == 0) or last:
                final = self.evaluate()
                if final:
                    logger.log(self.step, "eval", final)
                    logger.print(f"step {self.step}: " + "  ".join(f"{k} {v:.4f}" for k, v in final.items()))
                window_t0 = time.perf_counter()
            if (cfg.ckpt_interval and self.step % cfg.ckpt_interval == 0) or last:
                self.save()
                window_t0 = time.perf_counter()
        logger.close()
        wall = time.perf_counter() - start
        result = FitResult(
            steps=self.step,
            wall_s=wall,
            train_s=train_time,
            tokens=tokens_total,
            tokens_per_s=tokens_total / max(train_time, 1e-9),
            final=final,
            peak_rss_mib=peak_rss_mib(),
        )
        saved = list_checkpoints(self.out_dir)
        result.checkpoint = str(saved[-1]) if saved else None
        if dist.is_main:
            (self.out_dir / "summary.json").write_text(json.dumps(to_dict(result), indent=2) + "\n")
        return result
