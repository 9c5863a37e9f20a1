"""kill -9 during training (a few of benchmarks/kill_resume.py's 16 points, for CI): the restarted
run ends bit-identical to an uninterrupted one, logs each step once, and clears what the kill
left; plus the metrics trimming, the setting aside of an earlier run's logs and the checkpoint
recovery rules on their own."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from lmforge.checkpoint import recover_checkpoints
from lmforge.runs.tracking import set_aside_previous_run, trim_metrics

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "kill_resume.py"


@pytest.fixture(scope="module")
def harness():
    spec = importlib.util.spec_from_file_location("kill_resume", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("points", [["save-optimizer@1", "save-rename@2", "log-torn@7"]])
def test_kill_points_resume_bit_identical(harness, tiny_data: Path, tmp_path: Path, points: list[str]) -> None:
    report = harness.run(points, tiny_data, tmp_path, log=lambda _line: None)
    for r in report["results"]:
        assert r["killed"] and r["ok"], r
    assert report["results"][0]["leftovers_before_restart"]  # the kill did leave a staging folder behind


def test_trim_metrics_keeps_rows_up_to_the_step_and_drops_a_torn_line(tmp_path: Path) -> None:
    f = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "kind": "train"} for s in range(1, 9)] + [{"step": 5, "kind": "eval"}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 9, "ki')
    assert trim_metrics(f, 5) == 4  # steps 6, 7, 8 and the torn line
    assert [json.loads(x)["step"] for x in f.read_text().splitlines()] == [1, 2, 3, 4, 5, 5]
    assert trim_metrics(f, 5) == 0 and trim_metrics(tmp_path / "none.jsonl", 3) == 0


def test_a_fresh_run_sets_an_earlier_runs_logs_aside(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    (tmp_path / "tb").mkdir()
    moved = set_aside_previous_run(tmp_path)
    assert moved is not None and (moved / "metrics.jsonl").is_file() and (moved / "tb").is_dir()
    assert not (tmp_path / "metrics.jsonl").exists() and set_aside_previous_run(tmp_path) is None


def test_recover_checkpoints(tmp_path: Path) -> None:
    ck = tmp_path / "checkpoints"
    dead = 2**22 + 12345  # above Linux's default pid_max: no such process
    for name in ("step_0000005", f".tmp-step_0000010-{dead}", f".old-step_0000005-{dead}",
                 f".old-step_0000003-{dead}", f".tmp-step_0000015-{os.getppid()}", ".step_0000020.optimizer-shards"):
        (ck / name).mkdir(parents=True)
    done = recover_checkpoints(tmp_path)
    names = sorted(p.name for p in ck.iterdir())
    # unfinished saves removed, a replaced checkpoint whose replacement never arrived restored,
    # a live process's staging folder left alone
    assert names == [f".tmp-step_0000015-{os.getppid()}", "step_0000003", "step_0000005"], names
    assert len(done) == 4
