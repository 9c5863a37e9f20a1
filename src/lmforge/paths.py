"""Where lmforge finds its embedded recipes and corpora.

They live at the top of the source tree (``recipes/`` and ``data/``). ``LMFORGE_HOME``
points elsewhere when the package is installed away from its checkout.
"""

from __future__ import annotations

import os
from pathlib import Path


def project_root() -> Path:
    env = os.environ.get("LMFORGE_HOME")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2]


def recipes_dir() -> Path:
    return project_root() / "recipes"


def embedded_data_dir() -> Path:
    return project_root() / "data"
