"""The project's commands run as a user runs them: a subprocess from the repository root with its
output piped (so not on a terminal)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HANG_GUARD = 120  # seconds; only against a hang, never a timing


def exaone_data(*args: str) -> subprocess.CompletedProcess:
    """`exaone-data ARGS` with stdout and stderr captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "data_tools", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD,
    )
