"""Progress for a terminal or for a log file.

A terminal gets a progress bar. Elsewhere (a pipe, a Slurm log) a bar's carriage returns pile up
into one huge line, so the commands write an ordinary log line now and then instead.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

from tqdm import tqdm

LOG_EVERY_S = 60.0  # seconds between progress lines in a log


def on_terminal(*streams: TextIO) -> bool:
    """Whether every one of `streams` (default: stderr) is an interactive terminal."""
    return all(s.isatty() for s in streams or (sys.stderr,))


def human_bytes(n: float) -> str:
    """1536 -> "1.5 KiB"; binary units, as --max-bytes 1G means 2**30."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class LogProgress:
    """The part of tqdm's interface the commands use, as a log line at most every LOG_EVERY_S
    seconds."""

    def __init__(self, log: logging.Logger, desc: str, total: int) -> None:
        self.log, self.desc, self.total = log, desc, total
        self.done = 0
        self.fields: dict[str, object] = {}
        self.started = self.last = time.monotonic()

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= LOG_EVERY_S:
            self.last = now
            extra = "".join(f", {k} {v}" for k, v in self.fields.items())
            self.log.info(
                "%s: %s of %s (%.0f%%)%s, %.0f s",
                self.desc,
                human_bytes(self.done),
                human_bytes(self.total),
                100 * self.done / max(self.total, 1),
                extra,
                now - self.started,
            )

    def set_postfix(self, refresh: bool = False, **fields: object) -> None:
        self.fields = fields

    def close(self) -> None:
        """Nothing to tidy: the command logs its own summary line."""


ByteProgress = tqdm | LogProgress


def byte_progress(log: logging.Logger, desc: str, total: int, wanted: bool) -> ByteProgress:
    """A byte-counting tqdm bar on a terminal, log lines elsewhere, nothing when not `wanted`."""
    if wanted and not on_terminal():
        return LogProgress(log, desc, total)
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not wanted)
