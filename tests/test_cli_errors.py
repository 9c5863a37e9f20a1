"""User errors at the command line: one `error: ...` line on stderr, exit status 2, no traceback.

A few cases run `python -m lmforge.cli` as a real subprocess, so "no traceback" is checked
on the actual process output; the rest call :func:`lmforge.cli.main` in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SHAKESPEARE

import lmforge
from lmforge.cli import main

# a tiny model; max_steps keeps a case that wrongly succeeds from training for long
TINY = ["model.n_layer=1", "model.n_head=1", "model.n_embd=16", "model.context_length=16", "log.console=false"]
TINY += ["train.max_steps=2", "train.threads=1", "log.tensorboard=false"]


def assert_one_error(code: int, err: str, *fragments: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def run_subprocess(*args: str, cwd: Path) -> tuple[int, str, str]:
    env = dict(os.environ)
    src = str(Path(lmforge.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "lmforge.cli", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=120
    )
    return proc.returncode, proc.stdout, proc.stderr


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture()
def files(tmp_path: Path) -> Path:
    (tmp_path / "good.txt").write_text(SHAKESPEARE.read_text(encoding="utf-8")[:3000], encoding="utf-8")
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "all_bad.txt").write_bytes(b"\xff\xfe not utf-8\n\xc3\x28 neither\n")
    (tmp_path / "mixed.txt").write_bytes(b"First Citizen:\nBefore we proceed\n\xff broken line\nany further.\n")
    (tmp_path / "some_bad.jsonl").write_text('{"text": "All: Speak."}\n{"text": "Resolved\n{"text": "You know"}\n')
    (tmp_path / "all_bad.jsonl").write_text('{broken\n["no", "object"\n')
    (tmp_path / "tok").mkdir()
    assert main(["tokenizer", "train", f"inputs={tmp_path / 'good.txt'}", "kind=char", f"out={tmp_path / 'tok'}"]) == 0
    return tmp_path


# ---------------------------------------------------------------- real subprocesses
def test_subprocess_missing_input_file(files: Path) -> None:
    code, out, err = run_subprocess("data", "prepare", "inputs=nope.txt", "tokenizer=tok", "out=data", cwd=files)
    assert_one_error(code, err, "input not found: nope.txt")
    assert not (files / "data" / "meta.json").exists()


def test_subprocess_corpus_of_invalid_utf8(files: Path) -> None:
    code, out, err = run_subprocess("tokenizer", "train", "inputs=all_bad.txt", "kind=char", "out=t", cwd=files)
    assert_one_error(code, err, "no usable documents", "invalid_utf8: 2")


def test_subprocess_malformed_override(files: Path) -> None:
    code, out, err = run_subprocess("pretrain", "data=somewhere", "train.max_steps", cwd=files)
    assert_one_error(code, err, "override 'train.max_steps' is not of the form key=value")


def test_subprocess_context_longer_than_the_data(files: Path, tiny_data: Path) -> None:
    code, out, err = run_subprocess(
        "pretrain", f"data={tiny_data}", "out_dir=run", *TINY, "model.context_length=4096", cwd=files
    )
    assert_one_error(code, err, "val split", "fewer than context_length + 1 = 4097", "smaller model.context_length")
    assert not (files / "run" / "checkpoints").exists()


def test_subprocess_sample_missing_checkpoint(files: Path) -> None:
    code, out, err = run_subprocess("sample", "no-such-run", cwd=files)
    assert_one_error(code, err, "checkpoint not found: no-such-run")


# ------------------------------------------------------------------------ in-process
def prepare(capsys, files: Path, name: str, *extra: str, out: str = "d") -> tuple[int, str, str]:
    inputs = f"inputs={files / name}"
    return run_main(capsys, "data", "prepare", inputs, f"tokenizer={files / 'tok'}", f"out={files / out}", *extra)


def train_tokenizer(capsys, files: Path, name: str, *extra: str) -> tuple[int, str, str]:
    return run_main(capsys, "tokenizer", "train", f"inputs={files / name}", f"out={files / 't'}", *extra)


def rejects(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_missing_input_file(files: Path, capsys) -> None:
    assert_one_error(*train_tokenizer(capsys, files, "nope.txt")[::2], "input not found")
    assert_one_error(*prepare(capsys, files, "nope.txt")[::2], "input not found")
    code, _, err = run_main(capsys, "data", "prepare", f"inputs={files / 'good.txt'}", f"tokenizer={files / 'no-tok'}")
    assert_one_error(code, err, "no tokenizer found")
    code, _, err = run_main(capsys, "data", "prepare", f"tokenizer={files / 'tok'}", f"out={files / 'd'}")
    assert_one_error(code, err, "no inputs given")


def test_empty_corpus(files: Path, capsys) -> None:
    code, _, err = train_tokenizer(capsys, files, "empty.txt", "kind=char")
    assert_one_error(code, err, "the corpus has no usable documents", "(empty: 1)")
    code, _, err = prepare(capsys, files, "empty.txt")
    assert_one_error(code, err, "the corpus has no usable documents", "(empty: 1)")
    (files / "empty.jsonl").write_bytes(b"")
    assert_one_error(*prepare(capsys, files, "empty.jsonl")[::2], "the corpus is empty")


def test_invalid_utf8_all_lines_and_some_lines(files: Path, capsys) -> None:
    code, _, err = prepare(capsys, files, "all_bad.txt", "text_unit=line")
    assert_one_error(code, err, "all 2 records in 1 file were rejected (invalid_utf8: 2)")
    assert not (files / "d" / "meta.json").exists()

    # a corpus with one bad line: that line is a counted reject, the run succeeds
    code, out, err = prepare(capsys, files, "mixed.txt", "write_rejects=true")
    assert code == 0 and "error" not in err
    assert "rejected records: invalid_utf8: 1" in out
    meta = json.loads((files / "d" / "meta.json").read_text())
    assert meta["stats"] == {"seen": 2, "kept": 1, "rejected": {"invalid_utf8": 1}}
    (reject,) = rejects(files / "d" / "rejects.jsonl")
    assert (reject["line"], reject["reason"], reject["record"]) == (3, "invalid_utf8", "\\xff broken line\n")
    code, out, _ = train_tokenizer(capsys, files, "mixed.txt", "kind=char")
    assert code == 0 and "rejected records: invalid_utf8: 1" in out


def test_malformed_jsonl(files: Path, capsys) -> None:
    code, out, err = prepare(capsys, files, "some_bad.jsonl", "write_rejects=true")
    assert code == 0 and "rejected records: malformed_json: 1" in out
    assert json.loads((files / "d" / "meta.json").read_text())["stats"]["rejected"] == {"malformed_json": 1}
    (reject,) = rejects(files / "d" / "rejects.jsonl")
    assert (reject["line"], reject["reason"]) == (2, "malformed_json")
    code, _, err = prepare(capsys, files, "all_bad.jsonl", out="d2")
    assert_one_error(code, err, "all 2 records", "(malformed_json: 2)")
    code, _, err = train_tokenizer(capsys, files, "all_bad.jsonl", "vocab_size=300")
    assert_one_error(code, err, "(malformed_json: 2)")


def test_train_split_shorter_than_the_context(files: Path, capsys) -> None:
    (files / "short.txt").write_text("First Citizen: speak.\n", encoding="utf-8")
    assert prepare(capsys, files, "short.txt", "val_fraction=0")[0] == 0
    run = [f"data={files / 'd'}", f"out_dir={files / 'r'}", *TINY, "train.max_steps=1", "train.eval_tokens=0"]
    code, _, err = run_main(capsys, "pretrain", *run, "model.context_length=32")
    assert_one_error(code, err, "the train split", "has 23 tokens", "fewer than context_length + 1 = 33")
    code, _, err = run_main(capsys, "pretrain", *run, "model.context_length=22")  # 23 tokens: one window fits
    assert code == 0, err


def test_pretrain_setting_errors(files: Path, tiny_data: Path, capsys) -> None:
    base = ["pretrain", f"data={tiny_data}", f"out_dir={files / 'r'}", *TINY]
    code, _, err = run_main(capsys, *base, "model.preset=gpt3")
    assert_one_error(code, err, "unknown model preset 'gpt3' (did you mean 'gpt2'?)")
    code, _, err = run_main(capsys, *base, "model.n_layr=2")
    assert_one_error(code, err, "unknown setting 'model.n_layr' (did you mean 'n_layer'?)")
    code, _, err = run_main(capsys, *base, "train.lr=fast")
    assert_one_error(code, err, "train.lr: expected a number, got 'fast'")
    code, _, err = run_main(capsys, *base, "train.eval_tokens=8")
    assert_one_error(code, err, "train.eval_tokens=8 is less than one window of context_length=16")
    code, _, err = run_main(capsys, "pretrain", f"data={files / 'missing'}", *TINY)
    assert_one_error(code, err, "prepared data directory", "run `lmforge data prepare` first")
    code, _, err = run_main(capsys, *base, "--recipe", "nope")
    assert_one_error(code, err, "unknown pretrain recipe 'nope'")
    code, _, err = run_main(capsys, "pretrain", "--resume", *base[1:])
    assert_one_error(code, err, "nothing to resume")
    assert not (files / "r").exists()  # no error left a half-made run directory


def test_tokenizer_vocab_too_small(files: Path, capsys) -> None:
    code, _, err = train_tokenizer(capsys, files, "good.txt", "vocab_size=100")
    assert_one_error(code, err, "vocab_size=100 is too small", "need at least 263")
    code, _, err = train_tokenizer(capsys, files, "good.txt", "special_tokens=<|a|>,<|a|>")
    assert_one_error(code, err, "duplicate special token")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--temperature", "-1"], "temperature must be >= 0 (0 is greedy), got -1.0"),
        (["--top-k", "-1"], "top_k must be a non-negative integer (0 is off), got -1"),
        (["--top-p", "0"], "top_p must be in (0, 1], got 0.0"),
        (["--max-new-tokens", "0"], "max_tokens must be a positive integer, got 0"),
        (["--num-samples", "0"], "--num-samples must be at least 1, got 0"),
        (["--stop-token", "<|nope|>"], "unknown stop token '<|nope|>': it is not a token of this model's vocabulary"),
        (["--prompt", ""], "the prompt is empty"),
        (["--prompt", "☃"], "the prompt holds characters the tokenizer does not know"),
    ],
)
def test_bad_sampling_values(tiny_checkpoint: Path, capsys, args: list[str], message: str) -> None:
    code, out, err = run_main(capsys, "sample", str(tiny_checkpoint), *args)
    assert_one_error(code, err, message)
    assert out == ""


def test_sample_needs_a_checkpoint(tmp_path: Path, capsys) -> None:
    code, _, err = run_main(capsys, "sample", str(tmp_path))
    assert_one_error(code, err, "holds no checkpoint (expected model.safetensors, adapter_model.safetensors or checkpoints/step_*)")
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    (tmp_path / "config.json").write_text('{"model": {"n_layer": 1, "n_head": 1, "n_embd": 8, "vocab_size": 10}}')
    code, _, err = run_main(capsys, "sample", str(tmp_path))
    assert_one_error(code, err, "model.safetensors cannot be read")
    (tmp_path / "config.json").write_text("{not json")
    code, _, err = run_main(capsys, "sample", str(tmp_path))
    assert_one_error(code, err, "config.json is not valid JSON")
