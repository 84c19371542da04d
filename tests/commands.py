"""The project's commands run as a user runs them: a subprocess from the repository root with its
output piped (so not on a terminal)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from megatron_exaone.config.load import RECIPES_ENV

REPO = Path(__file__).resolve().parents[1]
HANG_GUARD = 120  # seconds; only against a hang, never a timing


def _run(module: str, args: tuple[str, ...], env: dict[str, str] | None = None):
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD,
    )


def exaone_data(*args: str) -> subprocess.CompletedProcess:
    """`exaone-data ARGS` with stdout and stderr captured as text."""
    return _run("data_tools", args)


def exaone_train(*args: str) -> subprocess.CompletedProcess:
    """`exaone-train ARGS` with the default recipes (not a $MEGATRON_EXAONE_RECIPES of the
    caller's), stdout and stderr captured as text."""
    return _run(
        "megatron_exaone.cli.train", args, {k: v for k, v in os.environ.items() if k != RECIPES_ENV}
    )
