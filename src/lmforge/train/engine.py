"""The one training loop, shared by every objective.

The engine owns everything that is not the objective: device and precision, the
optimizer and learning-rate schedule, gradient accumulation and clipping, periodic
evaluation, checkpoints and exact resume, logging, and DDP or FSDP. An objective
(:mod:`lmforge.train.objectives`) only supplies batches and a loss.
"""

from __future__ import annotations

import json
import math
import resource
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from torch.nn.parallel import DistributedDataParallel as DDP

from .. import hardware
from ..checkpoint import list_checkpoints, recover_checkpoints, unwrap
from ..config import to_dict
from ..hardware import autocast_dtype
from ..errors import ConfigError, LmforgeError
from ..runs.tracking import RUN_LOGS, LogConfig, RunLogger, set_aside_previous_run, trim_metrics
from .budget import TimeBudget, estimate_save_s
from .distributed import (
    DistInfo,
    all_reduce_sum,
    gathered,
    init_distributed,
    launched,
    shard_model,
)
from .hooks import EngineHook
from .objectives.base import Objective, RunContext
from .optim import build_optimizer
from .saving import SaveSpec
from .schedule import lr_multiplier
from .state import load_training_state, save_sharded_optimizer, save_training_checkpoint


#: Seconds the report card takes after the last checkpoint (matplotlib and the plots of
#: metrics.jsonl), which a time budget keeps in reserve: measured 0.91-1.01 s for 1,667 metric
#: rows on the 2-core Xeon VM, natively and under the AVX2 emulation.
REPORT_S = 1.0
#: How long the engine looks at the machine's load before its first step, and how often (in
#: seconds of training) it looks again to set its threads (hardware.LoadWatcher).
LOAD_SAMPLE_S = 0.25
LOAD_CHECK_S = 10.0


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
    # auto: bf16 where it is fast (a GPU with bf16, a CPU with native bf16), fp16 on older GPUs,
    # else fp32 (lmforge.hardware.resolve_precision); bf16/fp16 autocast keeps fp32 master weights
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # > 0: a time budget in minutes. The run measures its speed over its first steps and sets its
    # step count (and so its learning-rate schedule) to end, with its evaluations and final
    # checkpoint, on time; max_steps stays the cap (train/budget.py)
    max_minutes: float = 0.0
    compile: bool = False
    # With several processes (torchrun): ddp replicates the model on every process; fsdp
    # shards parameters, gradients and optimizer state over them (FSDP2, one unit per block).
    parallel: Literal["ddp", "fsdp"] = "ddp"
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
        if not (self.max_minutes >= 0 and math.isfinite(self.max_minutes)):
            raise ValueError(f"train.max_minutes must be a number of minutes >= 0 (0: no budget), got {self.max_minutes}")


def check_parallel(cfg: TrainConfig, whole_parameter_readers: Sequence[str] = ()) -> None:
    """Refuse what train.parallel=fsdp cannot run, before the process group starts or anything is
    written (the engine calls it first; the stages call it before they touch out_dir).
    ``whole_parameter_readers``: the run's features that read whole parameters outside the
    forward (AdaLoRA's allocator, the continual penalties), where FSDP holds shards."""
    if cfg.parallel != "fsdp" or not launched().enabled:
        return
    if cfg.precision == "fp16":
        raise ConfigError("train.parallel=fsdp does not support train.precision=fp16 (the loss scaler's "
                          "overflow check would see one shard per process); use bf16")
    if cfg.compile:
        raise ConfigError("train.compile=true is not supported with train.parallel=fsdp; use ddp to compile")
    if whole_parameter_readers:
        raise ConfigError(f"train.parallel=fsdp does not support {' or '.join(whole_parameter_readers)}: they read "
                          "whole parameters outside the forward, where FSDP holds shards; use train.parallel=ddp")


def resolve_train_precision(cfg: TrainConfig) -> str:
    """``cfg.precision`` resolved for the device the run will use (``auto`` -> fp32|bf16|fp16)."""
    return hardware.resolve_precision(cfg.precision, cfg.device)


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
    precision: str = ""  # the precision the run used (train.precision resolved)
    budget: dict[str, Any] | None = None  # the time budget's plan (train.max_minutes)


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
        saving: SaveSpec | None = None,
        run_config: dict[str, Any] | None = None,
        hooks: Sequence[EngineHook] = (),
        clock: Callable[[], float] | None = None,
    ):
        """``saving``: what every checkpoint carries besides the weights and training state
        (:class:`~lmforge.train.saving.SaveSpec`). ``hooks``: :class:`~lmforge.train.hooks.EngineHook`
        objects (extra loss terms, calls after each optimizer step, metrics, and checkpoint
        save/resume of the state they own). ``clock`` (seconds, monotonic; default
        ``time.perf_counter``) times the run for ``train.max_minutes`` (tests inject their own)."""
        check_parallel(cfg)
        self.clock = clock or time.perf_counter
        self._now = self.clock()  # the clock at the end of the last timed segment (step, evaluation, checkpoint)
        self.cfg = cfg
        self.hooks: list[EngineHook] = list(hooks)
        self.saving = saving or SaveSpec()
        self.out_dir = Path(out_dir)
        self.log_cfg = log or LogConfig()
        self.run_config = run_config or {}
        self.objective = objective

        # the device and precision are resolved (and an unusable one refused) before the process group starts
        self.device = resolve_device(cfg.device, launched())
        self.precision = hardware.resolve_precision(cfg.precision, self.device)
        self.amp_dtype = autocast_dtype(self.precision)
        self.dist = init_distributed(self.device.type)
        self.threads: hardware.LoadWatcher | None = None
        if self.device.type == "cpu":  # usable cores (affinity, cgroup quota) split over torchrun's processes,
            # fewer while other processes keep cores busy (hardware.LoadWatcher)
            self.threads = hardware.LoadWatcher(cfg.threads)
            if not self.threads.fixed and self.threads.limit > 1:
                time.sleep(LOAD_SAMPLE_S)  # a first look at the machine's load before the first step
            torch.set_num_threads(self.threads.threads())
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True)

        self.model = model.to(self.device)
        self.sharded = self.dist.enabled and cfg.parallel == "fsdp"
        if self.sharded:
            if self.precision == "fp16":  # auto on a GPU without bf16 (check_parallel refused an explicit fp16): fp32
                self.precision, self.amp_dtype = "fp32", None
            shard_model(self.model, self.amp_dtype)  # in place; the optimizer then holds the shards
        self.optimizer = build_optimizer(self.model, cfg, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        # Evaluation runs the (compiled) module without the DDP wrapper: ranks may get uneven
        # numbers of eval batches, and DDP's forward may issue collectives (buffer broadcasts).
        if cfg.compile:
            hardware.isolate_compile_cache()
        self.eval_model: torch.nn.Module = torch.compile(self.model) if cfg.compile else self.model
        self.forward_model = self.eval_model
        if self.dist.enabled and not self.sharded:
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
        self.max_steps = cfg.max_steps  # the time budget may plan fewer
        self.budget: TimeBudget | None = None
        if cfg.max_minutes > 0:
            net = unwrap(self.model)
            state_bytes = sum(p.numel() * p.element_size() * (3 if p.requires_grad else 1) for p in net.parameters())
            self.budget = TimeBudget(
                cfg.max_minutes, cfg.max_steps, eval_interval=cfg.eval_interval, ckpt_interval=cfg.ckpt_interval,
                save_estimate_s=estimate_save_s(state_bytes), report_s=REPORT_S if self.log_cfg.report else 0.0,
                start=self._now,  # the budget counts from the engine's creation
            )

    # ---- helpers ------------------------------------------------------------------------
    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _lr_mult(self, step: int) -> float:
        c = self.cfg
        return lr_multiplier(step, self.max_steps, c.schedule, c.warmup_steps, c.min_lr_ratio, c.decay_fraction)

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
            from ..checkpoint import read_adapter_weights

            weights = read_adapter_weights(ckpt, net, net.peft.cfg, device=str(self.device))
            missing, unexpected = self._load_weights(weights, strict=False)
            if unexpected or any(n in missing for n, p in net.named_parameters() if p.requires_grad):
                raise ConfigError(f"cannot resume {ckpt}: its adapter does not match this run's peft settings")
        else:
            self._load_weights(load_file(str(ckpt / "model.safetensors"), device=str(self.device)), strict=True)
        state = json.loads((ckpt / "trainer_state.json").read_text()) if (ckpt / "trainer_state.json").is_file() else {}
        self._check_batch(state, ckpt)
        state = load_training_state(ckpt, self.optimizer)
        self.step = int(state["step"])
        self._resume_budget(state.get("budget"))
        for hook in self.hooks:
            hook.on_resume(ckpt)
        return ckpt

    def _resume_budget(self, saved: dict[str, Any] | None) -> None:
        """Continue the time budget's plan of a resumed checkpoint: its step count (so the
        learning-rate schedule goes on unchanged) and its time spent (which counts against this
        run's budget). Without train.max_minutes now, the plan's step count still holds."""
        self._saved_budget = saved
        if not saved:
            return
        if self.budget is not None:
            self.budget.restore(saved, self.clock())
            if self.budget.plan_ is not None:
                self._set_max_steps(self.budget.plan_.max_steps)
        elif saved.get("plan"):
            self._set_max_steps(int(saved["plan"]["max_steps"]))
            if self.dist.is_main:
                print(f"continuing the time-budgeted plan of the checkpoint: {self.max_steps} steps")

    def _set_max_steps(self, n: int) -> None:
        self.max_steps = n
        for hook in self.hooks:  # e.g. AdaLoRA's rank schedule follows the run's length
            hook.on_plan(n)

    def _lap(self) -> float:
        """Seconds since the last timed segment ended (one clock reading per segment, so an
        injected clock sees each step, evaluation and checkpoint exactly once)."""
        now = self.clock()
        seconds, self._now = now - self._now, now
        return seconds

    def _timed(self, observe: Callable[[float], None] | None, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` as a timed segment; the time since the last segment ended (the step's
        logging) counts in it, so every second of the run is counted once."""
        if observe is None:
            return fn()
        out = fn()
        observe(self._lap())
        return out

    def _agree(self, value: int) -> int:
        """Rank 0's ``value`` on every rank (plans depend on each process's own timing)."""
        if not self.dist.enabled:
            return value
        t = torch.tensor([float(value) if self.dist.is_main else 0.0], dtype=torch.float64)
        return int(all_reduce_sum(t, self.dist).item())

    def _budget_after_step(self, step_s: float, logger: RunLogger) -> dict[str, float] | None:
        """Feed the time budget one step; plan (after an evaluation, timed, when none was yet) or
        correct the step count. Returns the planning evaluation's metrics, if one ran."""
        budget = self.budget
        assert budget is not None
        budget.observe_step(step_s)
        evaluated = None
        if not budget.planned:
            if not self._agree(int(budget.ready())):
                return None
            if budget.eval_s is None:  # the plan needs an evaluation's cost: measure one (logged as any other)
                evaluated = self._timed(budget.observe_eval, self.evaluate)
                if evaluated:
                    logger.log(self.step, "eval", evaluated)
            plan = budget.plan(self.step, self._now)
            new = self._agree(plan.max_steps)
            plan.max_steps = new
            self._set_max_steps(new)
            logger.set_total(new)
            logger.print(plan.describe())
            return evaluated
        if not budget.check_due(self._now):
            return None
        plan = budget.check(self.step, self._now)
        new = self._agree(plan.max_steps if plan is not None else self.max_steps)
        if new != self.max_steps:
            if budget.plan_ is not None:
                budget.plan_.max_steps = new
            self._set_max_steps(new)
            logger.set_total(new)
            logger.print(f"step {self.step}: {budget.plan_.describe() if budget.plan_ else ''} (re-planned)")
        return None

    def _load_weights(self, weights: dict[str, torch.Tensor], strict: bool):
        """Load whole tensors into the model (cut to this process's shards under FSDP)."""
        if not self.sharded:
            return unwrap(self.model).load_state_dict(weights, strict=strict)
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
        )

        return set_model_state_dict(self.model, weights, options=StateDictOptions(full_state_dict=True, strict=strict))

    def _check_batch(self, state: dict[str, Any], ckpt: Path) -> None:
        """Refuse a resume whose global batch differs from the checkpoint's: batches are a function
        of the step and the global batch, so another global batch would silently continue on
        other data than the interrupted run. The process count may change; the global batch may not."""
        saved_world = int(state.get("world_size", 1))
        saved = state.get("global_batch_size")
        mine = self.ctx.global_batch_size
        if saved is None or int(saved) == mine:
            return
        what = (f"world size changed from {saved_world} to {self.dist.world_size}" if saved_world != self.dist.world_size
                else f"the global batch changed from {saved} to {mine}")
        per = int(saved) / self.dist.world_size
        hint = (f"set train.micro_batch_size x train.grad_accum = {int(per)} per process" if per.is_integer()
                else f"{saved} examples do not divide over {self.dist.world_size} processes; use a world size that divides them")
        raise ConfigError(
            f"cannot resume {ckpt}: {what}: it was saved with a global batch of {saved} examples "
            f"({saved_world} process(es) x micro batch x grad_accum), this run has {mine} "
            f"({self.dist.world_size} x {self.cfg.micro_batch_size} x {self.cfg.grad_accum}); {hint}"
        )

    def start(self, resume: bool, overwrite: bool) -> None:
        """Prepare ``out_dir`` for a run: resume from its newest checkpoint, or (with
        ``overwrite``) clear the old run's checkpoints and metrics, which would otherwise pass
        for this run's (and be resumed or sampled from, or mix with its curves and report); then write
        the run's config.yaml."""
        if self.dist.is_main:  # a kill during a save leaves staging folders: clear or restore them
            for line in recover_checkpoints(self.out_dir):
                print(f"{self.out_dir}/checkpoints: {line}")
        if self.dist.enabled:
            torch.distributed.barrier()
        if resume:
            ckpt = self.resume_from()
            if self.dist.is_main:
                print(f"resuming from {ckpt} (step {self.step})")
                if self.log_cfg.jsonl:
                    trim_metrics(self.out_dir / "metrics.jsonl", self.step)
        if self.dist.is_main:
            if not resume and overwrite:
                shutil.rmtree(self.out_dir / "checkpoints", ignore_errors=True)
                for name in RUN_LOGS:
                    path = self.out_dir / name
                    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            elif not resume and (moved := set_aside_previous_run(self.out_dir)) is not None:
                print(f"{self.out_dir} held the logs of an earlier run: moved to {moved}")
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.yaml").write_text(yaml.safe_dump(self.run_config, sort_keys=False))

    def save(self) -> Path:
        path = self.out_dir / "checkpoints" / f"step_{self.step:07d}"
        weights = shards = None
        if self.sharded:  # collectives: whole weights to rank 0, each rank's optimizer shards to shared storage
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
            )

            weights = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            shards = path.with_name(f".{path.name}.optimizer-shards")
            if self.dist.is_main:
                shutil.rmtree(shards, ignore_errors=True)
                shards.mkdir(parents=True)
            torch.distributed.barrier()
            save_sharded_optimizer(shards, self.optimizer)
            torch.distributed.barrier()
        if self.dist.is_main:
            state = {"step": self.step, "data": self.objective.state_dict(), "world_size": self.dist.world_size,
                     "global_batch_size": self.ctx.global_batch_size, "parallel": "fsdp" if self.sharded else "ddp"}
            budget = self.budget.state(self._now) if self.budget is not None else getattr(self, "_saved_budget", None)
            if budget:
                state["budget"] = budget
            save_training_checkpoint(
                path,
                self.model,
                self.saving.tokenizer_file,
                optimizer=self.optimizer,
                trainer_state=state,
                extra={**self.saving.extra, "step": self.step, "run": self.run_config},
                sidecars_from=self.saving.sidecars_from,
                base_checkpoint=self.saving.base_checkpoint,
                weights=weights,
                sharded_optimizer=shards,
            )
            for hook in self.hooks:
                hook.on_save(path)
            for old in list_checkpoints(self.out_dir)[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        if self.dist.enabled:
            torch.distributed.barrier()
        return path

    def evaluate_before_training(self) -> dict[str, float]:
        """The held-out metrics before the first step (fine-tuning's "before"), timed as the run's
        evaluation cost when a time budget is set, so the budget does not run one more to plan."""
        return self._timed(self.budget.observe_eval if self.budget is not None else None, self.evaluate)

    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        try:
            with self.gathered():
                return self.objective.evaluate(self.eval_model)
        finally:
            self.model.train()

    def gathered(self):
        """A context (entered by every rank) in which each rank may run the model on its own
        inputs: under FSDP each holds the whole model meanwhile; otherwise a no-op."""
        return gathered(self.model)

    def write_report(
        self,
        *,
        title: str | None = None,
        summary: dict[str, Any] | None = None,
        figures: Sequence[tuple[str, str | Path]] = (),
        tables: Sequence[tuple[str, str]] = (),
        notes: str = "",
    ) -> Path | None:
        """The run's report card, ``out_dir/report.md`` (:func:`lmforge.runs.report.write_report`:
        summary, curves from metrics.jsonl, the given figures and tables, the config), on the
        main rank when ``log.report`` is set. A failure is a warning: it never fails the run."""
        if not (self.dist.is_main and self.log_cfg.report):
            return None
        from ..runs.report import write_report

        try:
            return write_report(
                self.out_dir,
                title=title or f"Training run {self.out_dir.name} ({self.objective.name} objective)",
                config=self.run_config,
                summary=summary,
                metrics_file=self.out_dir / "metrics.jsonl" if self.log_cfg.jsonl else None,
                figures=figures,
                tables=tables,
                notes=notes,
            )
        except Exception as e:  # noqa: BLE001 - the report is a by-product; the run succeeded
            warnings.warn(f"the report card of {self.out_dir} was not written: {type(e).__name__}: {e}", RuntimeWarning, stacklevel=2)
            return None

    # ---- the loop -------------------------------------------------------------------------
    def fit(self, report: bool = True, report_title: str | None = None) -> FitResult:
        """Train to ``max_steps``; then write summary.json and (``report``) the report card
        with the FitResult as its summary. A caller with more to report (fine-tuning) passes
        ``report=False`` and calls :meth:`write_report` itself."""
        cfg, dist = self.cfg, self.dist
        net = unwrap(self.model)
        logger = RunLogger(self.out_dir, self.log_cfg, dist.is_main, self.max_steps, self.step, self.run_config)
        budget = self.budget
        observe_eval = budget.observe_eval if budget is not None else None
        observe_save = budget.observe_save if budget is not None else None
        if hasattr(net, "num_params"):
            chosen = f"{self.precision} ({cfg.precision})" if cfg.precision != self.precision else self.precision
            threads = f", {torch.get_num_threads()} threads" if self.device.type == "cpu" else ""
            logger.print(
                f"model: {net.num_params() / 1e6:.2f}M parameters, {net.flops_per_token() / 1e6:.1f} MFLOP/token | "
                f"device {self.device} x{dist.world_size}{threads}, {chosen}, global batch {self.ctx.global_batch_size}"
            )
        final: dict[str, float] = {}
        if cfg.eval_at_start and self.step == 0:
            final = self._timed(observe_eval, self.evaluate)
            logger.log(0, "eval", final)
        start = time.perf_counter()
        train_time = 0.0
        tokens_total = 0
        loss_sum = torch.zeros((), device=self.device)  # weighted train loss since the last log (on device: no sync)
        weight_sum = 0.0
        window_t0, window_tokens = time.perf_counter(), 0
        self.model.train()
        if budget is not None:
            self._lap()  # setup since the engine's creation counts in the budget, not as a step
        load_checked = time.perf_counter()
        while self.step < self.max_steps:
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
                with nullcontext() if sync or self.sharded else self.forward_model.no_sync():
                    with self.autocast():
                        loss, metrics = self.objective.loss(self.forward_model, batch)
                        extra = [t for h in self.hooks if (t := h.extra_loss()) is not None]
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
                hook.after_step(self.step + 1)
            self.optimizer.zero_grad()
            self.step += 1
            step_tokens *= dist.world_size
            tokens_total += step_tokens
            window_tokens += step_tokens
            train_time += time.perf_counter() - t0
            logger.advance(self.step)
            watcher = self.threads
            if watcher is not None and not watcher.fixed and time.perf_counter() - load_checked >= LOAD_CHECK_S:
                load_checked = time.perf_counter()
                n = watcher.threads()  # each process for itself: no collective at a time-based point
                if n != torch.get_num_threads():
                    logger.print(f"step {self.step}: {n} CPU thread(s): other processes keep "
                                 f"{watcher.caps.cores - n} of {watcher.caps.cores} cores busy" if n < watcher.limit
                                 else f"step {self.step}: {n} CPU threads: the other processes' load is gone")
                    torch.set_num_threads(n)
            if budget is not None:
                planning_eval = self._budget_after_step(self._lap(), logger)
                if planning_eval:
                    final = planning_eval
                    window_t0 = time.perf_counter()

            last = self.step >= self.max_steps
            if self.step % cfg.log_interval == 0 or last:
                train_loss = all_reduce_sum(loss_sum.double().cpu().reshape(1), dist).item() / weight_sum
                if not math.isfinite(train_loss):
                    raise LmforgeError(f"training diverged at step {self.step} (loss {train_loss}); lower train.lr")
                loss_sum.zero_()
                weight_sum = 0.0
                elapsed = time.perf_counter() - window_t0
                tps = window_tokens / max(elapsed, 1e-9)
                row = {"loss": train_loss, "lr": cfg.lr * lr_mult, "tokens_per_s": tps}
                if grad_norm is not None:  # under FSDP a replicated DTensor
                    row["grad_norm"] = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
                for hook in self.hooks:
                    row.update(hook.metrics())
                if hasattr(net, "flops_per_token"):
                    row["tflops"] = tps * net.flops_per_token() / 1e12
                logger.log(self.step, "train", row)
                logger.progress(self.step, {"loss": f"{train_loss:.4f}", "tok/s": f"{tps:,.0f}"})
                window_t0, window_tokens = time.perf_counter(), 0
            if (cfg.eval_interval and self.step % cfg.eval_interval == 0) or last:
                final = self._timed(observe_eval, self.evaluate)
                if final:
                    logger.log(self.step, "eval", final)
                    logger.print(f"step {self.step}: " + "  ".join(f"{k} {v:.4f}" for k, v in final.items()))
                window_t0 = time.perf_counter()
            if (cfg.ckpt_interval and self.step % cfg.ckpt_interval == 0) or last:
                self._timed(observe_save, self.save)
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
            precision=self.precision,
            budget=budget.state(self._now) if budget is not None else None,
        )
        saved = list_checkpoints(self.out_dir)
        result.checkpoint = str(saved[-1]) if saved else None
        if dist.is_main:
            (self.out_dir / "summary.json").write_text(json.dumps(to_dict(result), indent=2) + "\n")
        if report:
            self.write_report(title=report_title, summary=to_dict(result))
        return result
