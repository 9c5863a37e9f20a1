"""Run logging: console progress bar, metrics.jsonl, TensorBoard, and W&B when configured."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..errors import ConfigError


@dataclass
class LogConfig:
    console: bool = True  # progress bar and eval lines
    jsonl: bool = True  # out_dir/metrics.jsonl
    tensorboard: bool = True  # out_dir/tb
    wandb: bool = False  # needs `pip install wandb` and a login or WANDB_API_KEY
    wandb_project: str = "lmforge"
    wandb_run_name: str | None = None


def plot_curves(metrics_file: Path, out_png: Path) -> Path | None:
    """Train/val loss and learning rate against step, from a run's metrics.jsonl, as a PNG."""
    rows = []
    if metrics_file.is_file():
        for line in metrics_file.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    train = [(r["step"], r["loss"], r.get("lr")) for r in rows if r.get("kind") == "train" and "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("kind") == "eval" and "val_loss" in r]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=[3, 1])
    if train:
        ax.plot([t[0] for t in train], [t[1] for t in train], label="train loss", lw=1)
    if val:
        ax.plot([v[0] for v in val], [v[1] for v in val], "o-", label="val loss", lw=1.5)
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    lrs = [(t[0], t[2]) for t in train if t[2] is not None]
    if lrs:
        ax_lr.plot([x[0] for x in lrs], [x[1] for x in lrs], color="tab:green", lw=1)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


class RunLogger:
    """Writes every metric to each configured sink; only the main rank logs."""

    def __init__(self, out_dir: Path, cfg: LogConfig, enabled: bool, total_steps: int, start_step: int, config: dict):
        self.enabled = enabled
        self.cfg = cfg
        self._jsonl = None
        self._tb = None
        self._wandb = None
        self.bar = tqdm(
            total=total_steps,
            initial=start_step,
            disable=not (enabled and cfg.console),
            dynamic_ncols=True,
            desc="train",
            unit="step",
        )
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        if cfg.jsonl:
            self._jsonl = open(out_dir / "metrics.jsonl", "a", encoding="utf-8")
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(out_dir / "tb"))
        if cfg.wandb:
            try:
                import wandb
            except ImportError:
                raise ConfigError("log.wandb=true needs the wandb package: pip install wandb") from None
            self._wandb = wandb.init(
                project=os.environ.get("WANDB_PROJECT", cfg.wandb_project),
                name=cfg.wandb_run_name,
                config=config,
                dir=str(out_dir),
                resume="allow",
            )

    def log(self, step: int, kind: str, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"step": step, "kind": kind, "time": time.time(), **clean}) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            for k, v in clean.items():
                self._tb.add_scalar(f"{kind}/{k}", v, step)
        if self._wandb is not None:
            self._wandb.log({f"{kind}/{k}": v for k, v in clean.items()}, step=step)

    def progress(self, step: int, postfix: dict[str, str]) -> None:
        self.bar.n = step
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.refresh()

    def print(self, line: str) -> None:
        if self.enabled and self.cfg.console:
            tqdm.write(line)

    def close(self) -> None:
        self.bar.close()
        if self._jsonl is not None:
            self._jsonl.close()
            plot_curves(Path(self._jsonl.name), Path(self._jsonl.name).with_name("curves.png"))
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
