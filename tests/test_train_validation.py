"""Settings a run cannot use are refused before any side effect: no process group started, no
out_dir created. The runs pretend to be rank 0 of two torchrun processes (WORLD_SIZE=2), with
``init_process_group`` replaced by a recorder, so a check that ran after the group started fails."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_PRETRAIN, save_tiny_llama

from lmforge.cli import main

QUIET = ["log.console=false", "log.tensorboard=false", "train.threads=1", "train.device=cpu"]


@pytest.fixture
def two_processes(monkeypatch) -> list:
    """Rank 0 of two (gloo); returns the list of init_process_group calls (must stay empty)."""
    started: list = []

    def record(*args, **kwargs):
        started.append((args, kwargs))
        raise RuntimeError("the process group was started")

    monkeypatch.setattr(torch.distributed, "init_process_group", record)
    for k, v in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    return started


@pytest.fixture(scope="module")
def base(tiny_data: Path, tmp_path_factory) -> Path:
    return save_tiny_llama(tiny_data, tmp_path_factory.mktemp("val") / "base", context_length=128, init_std=0.05)


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "hello."}]}
            for i in range(12)]
    path = tmp_path_factory.mktemp("val_chats") / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _refused(argv: list[str], out: Path, started: list, capsys, message: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert started == [], "the process group started before the settings were checked"
    assert not out.exists(), f"{out} was created before the settings were checked"


@pytest.mark.parametrize(
    "setting, message",
    [
        ("train.compile=true", "train.compile=true is not supported with train.parallel=fsdp"),
        ("train.precision=fp16", "does not support train.precision=fp16"),
        ("continual.l2=0.1", "does not support continual.l2"),
    ],
)
def test_pretrain_refuses_fsdp_settings_before_any_side_effect(setting, message, tiny_data, tmp_path, two_processes, capsys):
    out = tmp_path / "run"
    argv = ["pretrain", f"data={tiny_data}", f"out_dir={out}", *TINY_PRETRAIN, *QUIET, "train.parallel=fsdp", setting]
    _refused(argv, out, two_processes, capsys, message)


@pytest.mark.parametrize(
    "settings, message",
    [
        (["peft.method=adalora", "train.parallel=fsdp"], "does not support peft.method=adalora"),
        (["train.parallel=fsdp", "continual.l2=0.1"], "does not support continual.l2"),
        (["objective=classify", "continual.replay_data=old.jsonl"], "works with objective=sft"),
    ],
)
def test_finetune_refuses_settings_before_any_side_effect(settings, message, base, chats, tmp_path, two_processes, capsys):
    out = tmp_path / "run"
    argv = ["finetune", f"base={base}", f"out_dir={out}", f"data.train=[{chats}]", *QUIET, *settings]
    _refused(argv, out, two_processes, capsys, message)


def test_adversarial_refuses_fsdp_settings_before_any_side_effect(base, chats, tmp_path, two_processes, capsys):
    out = tmp_path / "run"
    argv = ["adversarial", f"base={base}", f"out_dir={out}", f"data.train=[{chats}]", f"data.val=[{chats}]",
            "adversarial.max_context_tokens=64", "adversarial.max_reply_tokens=24", *QUIET,
            "train.parallel=fsdp", "train.compile=true"]
    _refused(argv, out, two_processes, capsys, "train.compile=true is not supported with train.parallel=fsdp")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
@pytest.mark.parametrize(
    "setting, message",
    [("train.device=cuda", "asks for CUDA but no GPU"), ("train.precision=fp16", "fp16 needs a CUDA GPU")],
)
def test_an_unusable_device_or_precision_is_refused_before_the_process_group(setting, message, tiny_data, tmp_path,
                                                                           two_processes, capsys):
    out = tmp_path / "run"
    argv = ["pretrain", f"data={tiny_data}", f"out_dir={out}", *TINY_PRETRAIN, *QUIET, "train.parallel=ddp", setting]
    _refused(argv, out, two_processes, capsys, message)
