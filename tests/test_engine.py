"""The training engine through `lmforge pretrain`: exact resume, gradient accumulation,
checkpoints, evaluation and logging, learning-rate schedules, optimizers.

Every run is a 2-layer, 32-wide model on a 20,000-character slice of Tiny Shakespeare,
a handful of steps in fp32 on one CPU thread, run in-process through ``lmforge.cli.main``.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_PRETRAIN, read_metrics
from safetensors.torch import load_file

from lmforge.cli import main
from lmforge.config import from_dict, to_dict
from lmforge.model.gpt import GPT, GPTConfig
from lmforge.checkpoint import list_checkpoints, load_model, save_checkpoint
from lmforge.train.engine import TrainConfig
from lmforge.train.objectives.base import RunContext
from lmforge.train.objectives.lm import LMObjective
from lmforge.train.optim import build_optimizer
from lmforge.train.schedule import lr_multiplier

CHECKPOINT_FILES = {"model.safetensors", "config.json", "tokenizer.json", "optimizer.safetensors", "trainer_state.json"}


@pytest.fixture(autouse=True)
def _restore_torch_globals():
    """train.deterministic=true flips a process-wide torch flag; put it back after each test."""
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


def pretrain(data: Path, out: Path, *overrides: str, resume: bool = False) -> None:
    argv = ["pretrain", "--resume"] if resume else ["pretrain"]
    argv += [f"data={data}", f"out_dir={out}", *TINY_PRETRAIN, *overrides]
    assert main(argv) == 0


def losses(run: Path) -> dict[int, float]:
    rows = read_metrics(run)
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), f"steps logged twice or out of order: {steps}"
    return {r["step"]: r["loss"] for r in rows}


def checkpoint_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """Weights, optimizer state and saved RNG state of a checkpoint."""
    return {**load_file(str(ckpt / "model.safetensors")), **load_file(str(ckpt / "optimizer.safetensors"))}


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different[:5]}"


# ------------------------------------------------------------------------------- resume
RESUME_VARIANTS = {
    "adamw": [],
    "muon": ["train.optimizer=muon"],
    "dropout": ["model.dropout=0.2"],  # needs the RNG state restored
}


@pytest.mark.parametrize("variant", list(RESUME_VARIANTS))
def test_resume_continues_exactly(tiny_data: Path, tmp_path: Path, variant: str) -> None:
    """N steps then `--resume` for N more == 2N steps straight: same per-step losses, same final state."""
    n = 4
    common = [*RESUME_VARIANTS[variant], "train.schedule=constant", "train.deterministic=true"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    pretrain(tiny_data, straight, *common, f"train.max_steps={2 * n}")
    pretrain(tiny_data, split, *common, f"train.max_steps={n}")
    assert [p.name for p in list_checkpoints(split)] == [f"step_{n:07d}"]
    pretrain(tiny_data, split, *common, f"train.max_steps={2 * n}", resume=True)

    expected = losses(straight)
    assert list(expected) == list(range(1, 2 * n + 1))
    assert losses(split) == expected  # bit-identical, every step
    final = f"checkpoints/step_{2 * n:07d}"
    assert_same_tensors(checkpoint_tensors(straight / final), checkpoint_tensors(split / final))
    assert read_metrics(split, "eval")[-1]["val_loss"] == read_metrics(straight, "eval")[-1]["val_loss"]
    state = json.loads((split / final / "trainer_state.json").read_text())
    assert state["step"] == 2 * n


def test_resume_mid_schedule_from_a_periodic_checkpoint(tiny_data: Path, tmp_path: Path) -> None:
    """A cosine run with Muon and dropout, resumed from its step-3 checkpoint, retraces steps 4-6."""
    common = ["train.optimizer=muon", "model.dropout=0.1", "train.schedule=cosine", "train.max_steps=6"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    pretrain(tiny_data, straight, *common, "train.ckpt_interval=3")
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints/step_0000003", resumed / "checkpoints/step_0000003")
    pretrain(tiny_data, resumed, *common, resume=True)
    expected = losses(straight)
    assert losses(resumed) == {s: expected[s] for s in (4, 5, 6)}
    final = "checkpoints/step_0000006"
    assert_same_tensors(checkpoint_tensors(straight / final), checkpoint_tensors(resumed / final))


def test_resume_refuses_a_different_model(tiny_data: Path, tmp_path: Path, capsys) -> None:
    pretrain(tiny_data, tmp_path, "train.max_steps=2")
    capsys.readouterr()
    argv = ["pretrain", "--resume", f"data={tiny_data}", f"out_dir={tmp_path}", *TINY_PRETRAIN, "model.n_embd=48"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot resume")
    assert "model settings differ (head_dim, intermediate_size, n_embd)" in err
    argv = ["pretrain", "--resume", f"data={tiny_data}", f"out_dir={tmp_path}", *TINY_PRETRAIN, "train.optimizer=muon"]
    assert main(argv) == 2
    assert "resume with the same setting" in capsys.readouterr().err


# ---------------------------------------------------------------- gradient accumulation
@pytest.mark.parametrize(("micro", "accum"), [(4, 2), (2, 4)])
def test_gradient_accumulation_matches_one_big_batch(tiny_data: Path, tmp_path: Path, micro: int, accum: int) -> None:
    steps = ["train.max_steps=8"]
    pretrain(tiny_data, tmp_path / "big", *steps, "train.micro_batch_size=8", "train.grad_accum=1")
    pretrain(tiny_data, tmp_path / "acc", *steps, f"train.micro_batch_size={micro}", f"train.grad_accum={accum}")
    big, acc = read_metrics(tmp_path / "big"), read_metrics(tmp_path / "acc")
    assert [r["step"] for r in big] == [r["step"] for r in acc] == list(range(1, 9))
    for a, b in zip(big, acc):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)  # the mean gradient, not a sum
    assert read_metrics(tmp_path / "big", "eval")[-1]["val_loss"] == pytest.approx(
        read_metrics(tmp_path / "acc", "eval")[-1]["val_loss"], abs=1e-5
    )


def test_a_global_batch_is_the_same_examples_whatever_the_split(tiny_data: Path) -> None:
    """(micro 8 x accum 1 x 1 rank) == (4 x 2 x 1) == (4 x 1 x 2 ranks) == (2 x 2 x 2): the same 8 windows."""

    def global_batch(micro: int, accum: int, world: int) -> torch.Tensor:
        parts = {}
        for rank in range(world):
            obj = LMObjective(tiny_data, context_length=16, eval_tokens=0)
            obj.setup(RunContext(torch.device("cpu"), 7, micro, accum, rank=rank, world_size=world))
            for m in range(accum):
                sl = obj.ctx.example_slice(m)
                batch = obj.train_batch(step=3, micro=m)
                assert torch.equal(batch["labels"][:, :-1], batch["input_ids"][:, 1:])  # next-token targets
                parts[sl.start] = batch["input_ids"]
        return torch.cat([parts[k] for k in sorted(parts)])

    reference = global_batch(8, 1, 1)
    assert reference.shape == (8, 16)
    for shape in ((4, 2, 1), (4, 1, 2), (2, 2, 2), (1, 4, 2)):
        assert torch.equal(global_batch(*shape), reference), shape
    obj = LMObjective(tiny_data, context_length=16, eval_tokens=0)
    obj.setup(RunContext(torch.device("cpu"), seed=7, micro_batch_size=8, grad_accum=1))
    assert not torch.equal(obj.train_batch(4, 0)["input_ids"], reference)  # another step, other windows
    obj.setup(RunContext(torch.device("cpu"), seed=8, micro_batch_size=8, grad_accum=1))
    assert not torch.equal(obj.train_batch(3, 0)["input_ids"], reference)  # another seed, other windows


# ------------------------------------------------------------------------- checkpoints
def test_checkpoint_files_pruning_and_load_model(tiny_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    pretrain(
        tiny_data,
        run,
        "train.max_steps=6",
        "train.ckpt_interval=2",
        "train.keep_checkpoints=2",
        "model.pos_embedding=rope",
        "model.tie_embeddings=false",
    )
    assert [p.name for p in list_checkpoints(run)] == ["step_0000004", "step_0000006"]  # step 2 pruned
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # no temporaries left
    ckpt = run / "checkpoints/step_0000006"
    assert {p.name for p in ckpt.iterdir()} == CHECKPOINT_FILES
    # no pickle anywhere: every file of the run is safetensors, JSON, YAML or the PNG plot, and each one parses
    for path in run.rglob("*"):
        if path.is_file():
            assert path.suffix in (".safetensors", ".json", ".jsonl", ".yaml", ".png", ".md"), path
            if path.suffix == ".safetensors":
                assert load_file(str(path))
            elif path.suffix == ".json":
                json.loads(path.read_text())
    config = json.loads((ckpt / "config.json").read_text())
    meta = json.loads((tiny_data / "meta.json").read_text())
    assert config["format"] == "lmforge" and config["step"] == 6
    assert config["model"]["vocab_size"] == meta["vocab_size"] and config["model"]["pos_embedding"] == "rope"
    assert config["run"]["train"]["max_steps"] == 6
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["world_size"] == 1 and state["data"]["sampler"] == "random-windows-v1"
    assert (ckpt / "tokenizer.json").read_bytes() == (tiny_data / "tokenizer.json").read_bytes()

    model, path = load_model(run)  # a run directory resolves to its newest checkpoint
    assert path == ckpt
    # the loaded weights reproduce the final evaluation the run logged
    obj = LMObjective(tiny_data, context_length=16, eval_tokens=512)
    obj.setup(RunContext(torch.device("cpu"), seed=0, micro_batch_size=8, grad_accum=1))
    model.eval()
    assert obj.evaluate(model)["val_loss"] == pytest.approx(read_metrics(run, "eval")[-1]["val_loss"], abs=1e-6)


@pytest.mark.parametrize("variant", ["gpt2", "llama"])
def test_save_and_load_model_round_trip_is_exact(tmp_path: Path, variant: str) -> None:
    kw = dict(vocab_size=40, context_length=12, n_layer=2, n_head=4, n_embd=32)
    if variant == "llama":
        kw |= dict(pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False)
        kw |= dict(n_kv_head=2, qk_norm=True)
    torch.manual_seed(1)
    model = GPT(GPTConfig(**kw)).eval()
    for p in model.parameters():  # no parameter left at its (ones / zeros) init
        p.data.add_(0.01 * torch.randn_like(p))
    save_checkpoint(tmp_path / "ck", model, None)
    assert {p.name for p in (tmp_path / "ck").iterdir()} == {"model.safetensors", "config.json"}  # weights only
    loaded, path = load_model(tmp_path / "ck")
    assert path == tmp_path / "ck" and to_dict(loaded.config) == to_dict(model.config)
    idx = torch.randint(0, 40, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(idx), model(idx))
    assert from_dict(GPTConfig, json.loads((path / "config.json").read_text())["model"]) == model.config


def test_existing_checkpoints_need_resume_or_overwrite(tiny_data: Path, tmp_path: Path, capsys) -> None:
    pretrain(tiny_data, tmp_path, "train.max_steps=4")
    capsys.readouterr()
    assert main(["pretrain", f"data={tiny_data}", f"out_dir={tmp_path}", *TINY_PRETRAIN, "train.max_steps=2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path} already holds checkpoints: pass --resume to continue, overwrite=true")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000004"]  # untouched

    # overwrite=true starts afresh: the old run's checkpoints and metrics must not pass for the new run's
    pretrain(tiny_data, tmp_path, "train.max_steps=2", "overwrite=true")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000002"]
    assert list(losses(tmp_path)) == [1, 2]
    assert json.loads((tmp_path / "summary.json").read_text())["checkpoint"].endswith("step_0000002")


def test_resume_with_nothing_to_resume(tiny_data: Path, tmp_path: Path, capsys) -> None:
    assert main(["pretrain", "--resume", f"data={tiny_data}", f"out_dir={tmp_path / 'new'}", *TINY_PRETRAIN]) == 2
    assert capsys.readouterr().err == f"error: nothing to resume: {tmp_path / 'new'} has no checkpoints/\n"


# ------------------------------------------------------------------ evaluation and logs
def test_eval_metrics_and_logs(tiny_data: Path, tmp_path: Path) -> None:
    pretrain(
        tiny_data,
        tmp_path,
        "train.max_steps=6",
        "train.eval_interval=3",
        "train.eval_at_start=true",
        "train.log_interval=2",
        "log.tensorboard=true",
    )
    train = read_metrics(tmp_path)
    assert [r["step"] for r in train] == [2, 4, 6]
    for r in train:
        assert {"loss", "lr", "grad_norm", "tokens_per_s", "tflops"} <= r.keys()
        assert math.isfinite(r["loss"]) and r["tokens_per_s"] > 0
    evals = read_metrics(tmp_path, "eval")
    assert [r["step"] for r in evals] == [0, 3, 6]
    for r in evals:
        assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]), rel=1e-9)
        # char tokens of ASCII text without separators are one byte each: bits/byte = nats/token / ln 2
        assert r["val_bpb"] == pytest.approx(r["val_loss"] / math.log(2), rel=1e-9)
    vocab = json.loads((tiny_data / "meta.json").read_text())["vocab_size"]
    assert evals[0]["val_loss"] == pytest.approx(math.log(vocab), abs=0.1)  # untrained: near uniform
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]  # it learns

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["tokens"] == 6 * 8 * 16
    assert summary["final"]["val_loss"] == evals[-1]["val_loss"]
    assert (tmp_path / "config.yaml").is_file()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "eval/val_loss", "eval/val_bpb", "eval/val_ppl"} <= tags
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 4, 6]
    assert acc.Scalars("eval/val_loss")[-1].value == pytest.approx(evals[-1]["val_loss"], rel=1e-6)

    # the loss curves as a picture in the run's report card: a real 800x450 PNG with something drawn on it
    from matplotlib.image import imread

    assert "](plots/loss.png)" in (tmp_path / "report.md").read_text()
    png = tmp_path / "plots" / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = imread(png)
    assert img.shape[:2] == (450, 800)
    assert img[..., :3].std() > 0.05  # not a blank canvas


# --------------------------------------------------------------- learning-rate schedules
def test_lr_schedule_values_at_key_steps() -> None:
    def lr(step: int, kind: str, warmup: int = 10, max_steps: int = 100) -> float:
        return lr_multiplier(step, max_steps, kind, warmup, min_ratio=0.1, decay_fraction=0.2)

    for kind in ("cosine", "wsd", "constant"):
        assert [lr(s, kind) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])  # linear warmup to the peak
        assert lr(10, kind) == pytest.approx(1.0)
        assert lr(0, kind, warmup=0) == pytest.approx(1.0)
    # cosine: half way through the decay is the midpoint between peak and floor; floor at max_steps
    assert lr(55, "cosine") == pytest.approx(0.55)
    assert lr(100, "cosine") == pytest.approx(0.1) and lr(150, "cosine") == pytest.approx(0.1)
    assert lr(35, "cosine", max_steps=110) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
    # wsd: stable until the last 20% of steps, then linear to the floor
    assert lr(50, "wsd") == lr(79, "wsd") == lr(80, "wsd") == 1.0
    assert lr(90, "wsd") == pytest.approx(0.55) and lr(100, "wsd") == pytest.approx(0.1)
    assert lr(99, "wsd") == pytest.approx(0.145)
    assert lr(99, "constant") == 1.0
    for kind in ("cosine", "wsd"):
        values = [lr(s, kind) for s in range(10, 101)]
        assert all(a >= b for a, b in zip(values, values[1:]))
    with pytest.raises(ValueError, match="unknown schedule"):
        lr(50, "linear")


def test_logged_lr_follows_the_schedule(tiny_data: Path, tmp_path: Path) -> None:
    schedule = ["train.schedule=wsd", "train.decay_fraction=0.5", "train.lr=2e-3", "train.min_lr_ratio=0.25"]
    pretrain(tiny_data, tmp_path, "train.max_steps=10", *schedule)
    for r in read_metrics(tmp_path):
        # the row of step s is logged after the update that used the multiplier of step index s - 1
        assert r["lr"] == pytest.approx(2e-3 * lr_multiplier(r["step"] - 1, 10, "wsd", 2, 0.25, 0.5))
    assert [round(r["lr"] / 2e-3, 6) for r in read_metrics(tmp_path)] == [0.5, 1, 1, 1, 1, 1, 0.85, 0.7, 0.55, 0.4]


# --------------------------------------------------------------------------- optimizers
@pytest.mark.parametrize("kind", ["adamw", "muon"])
def test_optimizer_groups_cover_every_parameter_once(kind: str) -> None:
    model = GPT(GPTConfig(vocab_size=40, context_length=8, n_layer=2, n_head=2, n_embd=16, tie_embeddings=False))
    tc = TrainConfig(optimizer=kind, lr=1e-3, muon_lr=0.02, weight_decay=0.1)
    opt = build_optimizer(model, tc, torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    seen = [names[id(p)] for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(names.values())  # each exactly once
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert all(model.get_parameter(n).dim() == 2 for n in decayed)
    assert "layers.0.attn_norm.weight" not in decayed and "layers.0.attn.qkv_proj.bias" not in decayed
    if kind == "muon":
        muon, adamw = opt.optimizers
        assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
        hidden = {names[id(p)] for g in muon.param_groups for p in g["params"]}
        assert hidden == {n for n, p in model.named_parameters() if p.dim() == 2 and n.startswith("layers.")}
        assert muon.param_groups[0]["lr"] == 0.02 and adamw.param_groups[0]["lr"] == 1e-3
    opt.set_lr_multiplier(0.5)
    assert sorted({g["lr"] for g in opt.param_groups}) == ([5e-4, 0.01] if kind == "muon" else [5e-4])
    opt.set_lr_multiplier(1.0)
    assert max(g["lr"] for g in opt.param_groups) == (0.02 if kind == "muon" else 1e-3)


def test_training_reduces_loss_with_bf16_autocast(tiny_data: Path, tmp_path: Path) -> None:
    pretrain(tiny_data, tmp_path, "train.max_steps=12", "train.precision=bf16", "train.lr=3e-3")
    rows = read_metrics(tmp_path)
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert np.mean([r["loss"] for r in rows[-3:]]) < rows[0]["loss"] - 0.2


# ------------------------------------------------------------------ optional back-ends
def test_torch_compile_trains_like_eager(tiny_data: Path, tmp_path: Path) -> None:
    """train.compile=true runs the inductor-compiled model and follows the eager loss curve."""
    pretrain(tiny_data, tmp_path / "eager", "train.max_steps=4")
    pretrain(tiny_data, tmp_path / "compiled", "train.max_steps=4", "train.compile=true")
    eager = [r["loss"] for r in read_metrics(tmp_path / "eager")]
    compiled = [r["loss"] for r in read_metrics(tmp_path / "compiled")]
    assert compiled == pytest.approx(eager, abs=1e-4)
    # the checkpoint of a compiled run holds the plain module's keys (no `_orig_mod.` prefix)
    ckpt = list_checkpoints(tmp_path / "compiled")[-1]
    assert all(not k.startswith("_orig_mod") for k in load_file(str(ckpt / "model.safetensors")))


class _FakeWandb:
    """Records what the engine hands to Weights & Biases (the real package needs a network)."""

    def __init__(self) -> None:
        self.init_kwargs: dict = {}
        self.logged: list[tuple[dict, int]] = []
        self.finished = False

    def init(self, **kwargs):
        self.init_kwargs = kwargs
        return self

    def log(self, row: dict, step: int) -> None:
        self.logged.append((row, step))

    def finish(self) -> None:
        self.finished = True


def test_wandb_logging_when_configured(tiny_data: Path, tmp_path: Path, monkeypatch) -> None:
    fake = _FakeWandb()
    monkeypatch.setitem(__import__("sys").modules, "wandb", fake)
    monkeypatch.setenv("WANDB_PROJECT", "lmforge-test")
    pretrain(tiny_data, tmp_path, "train.max_steps=4", "train.log_interval=2", "log.wandb=true")
    assert fake.init_kwargs["project"] == "lmforge-test"
    assert fake.init_kwargs["config"]["train"]["max_steps"] == 4
    train_steps = [step for row, step in fake.logged if "train/loss" in row]
    assert train_steps == [2, 4]
    assert any("eval/val_loss" in row for row, _ in fake.logged)
    assert fake.finished


def test_wandb_requested_but_not_installed(tiny_data: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(__import__("sys").modules, "wandb", None)  # makes `import wandb` fail
    argv = ["pretrain", f"data={tiny_data}", f"out_dir={tmp_path}", *TINY_PRETRAIN, "train.max_steps=2", "log.wandb=true"]
    assert main(argv) == 2
    assert "pip install wandb" in capsys.readouterr().err


def test_progress_bar_moves_every_step_not_only_at_log_interval(tiny_data: Path, tmp_path: Path, monkeypatch) -> None:
    """A 135M-parameter fine-tuning showed 0/600 for 6.5 minutes: the bar moved only at log_interval."""
    from lmforge.runs import tracking

    bars: list = []

    class Bar:  # records what the bar showed; tqdm's own redraws are throttled by time
        write = staticmethod(print)

        def __init__(self, total=None, initial=0, **_):
            self.n, self.total, self.shown = initial, total, []
            bars.append(self)

        def update(self, k=1):
            self.n += k
            self.shown.append(self.n)

        def refresh(self):
            self.shown.append(self.n)

        def set_postfix(self, *_, **__):
            pass

        def close(self):
            pass

    monkeypatch.setattr(tracking, "tqdm", Bar)
    pretrain(tiny_data, tmp_path, "train.max_steps=5", "train.log_interval=100", "log.console=true")
    assert bars and bars[0].shown[:5] == [1, 2, 3, 4, 5]
