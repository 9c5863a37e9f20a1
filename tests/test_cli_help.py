"""`lmforge --help`, `lmforge data --help` and `lmforge data reddit --help` import no torch
(issue 16: the parser imported train.pretrain, ~1.5 s of torch before any help was printed).

The command table names each command's config and run function as strings; only the command
asked for is imported. Run in a fresh interpreter, so that what the test process imported
before does not count."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import lmforge

CODE = """
import sys
from lmforge.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print("torch imported" if "torch" in sys.modules else "no torch")
"""


@pytest.mark.parametrize("argv", [["--help"], ["data", "--help"], ["data", "reddit", "--help"]])
def test_help_imports_no_torch(argv: list[str]) -> None:
    env = dict(os.environ)
    src = str(Path(lmforge.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-c", CODE, *argv], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage: lmforge" in proc.stdout  # the help itself was printed
    assert proc.stdout.strip().splitlines()[-1] == "no torch", proc.stdout[-2000:]
    if argv[:2] == ["data", "reddit"]:
        assert "settings (key=value):" in proc.stdout and "val_fraction" in proc.stdout


def test_every_command_of_the_table_builds_its_parser() -> None:
    """The full parser (all configs imported) has every command of the table, each parser built
    from its dataclass; a command's config accepts what its parser gives it by default."""
    from lmforge.cli import COMMANDS, build_parser

    parser = build_parser()
    names = {(c, a) for c, a in COMMANDS}
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {c for c, _ in names} <= set(sub.choices)
    args = parser.parse_args(["env", "--json"])
    assert args.json is True and args.no_measure is False
    args = parser.parse_args(["data", "augment", "--paraphrase-model", "ckpt", "seed=3"])
    assert args.paraphrase_model == "ckpt" and args.overrides == ["seed=3"]
