"""How the project's processes end: one signal policy for every launch path, and no process
outliving its job.

- **Stop signals.** SIGTERM, SIGINT and SIGUSR1 (what Slurm sends before a time limit or on
  preemption, what a terminal's Ctrl-C and a scheduler's kill send) only *request* a stop:
  `install_stop_handlers` records the request, the trainer finishes its current step, every rank
  agrees, one checkpoint is saved and the process exits 0. SIGQUIT and SIGHUP keep their default
  meaning (end now, without saving).
- **Launchers forward.** `cli.torchrun` (torchrun with this policy) catches the stop signals itself
  and passes them to its ranks with `forward_to_children`, instead of torchrun's own handling (which
  kills the ranks after a timeout and exits 1).
- **Nothing outlives its launcher.** `die_with_parent` asks the kernel to SIGKILL a process when its
  parent exits (Linux `PR_SET_PDEATHSIG`): ranks die with their launcher, tokenizer workers with
  their command, so a relaunch never races with orphans that still train or write checkpoints.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
from pathlib import Path

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
# Set by cli.torchrun for its ranks: the process a rank must die with.
LAUNCHER_PID_ENV = "MEGATRON_EXAONE_LAUNCHER_PID"
_PR_SET_PDEATHSIG = 1

_stop_signal: str | None = None


def install_stop_handlers() -> None:
    """Make SIGTERM, SIGINT and SIGUSR1 request a stop (`stop_requested`) instead of ending the
    process."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _request_stop)


def _request_stop(signum: int, _frame) -> None:
    global _stop_signal
    if _stop_signal is None:
        _stop_signal = signal.Signals(signum).name
        log.warning(
            "received %s: finishing the current step, saving a checkpoint, then exiting",
            _stop_signal,
        )


def stop_requested() -> str | None:
    """The name of the first stop signal received (e.g. "SIGUSR1"), or None."""
    return _stop_signal


def die_with_parent(expected_parent: int | None = None) -> None:
    """Have the kernel SIGKILL this process as soon as its parent exits (Linux; elsewhere nothing
    happens). If `expected_parent` is given and is no longer the parent, the parent died before this
    call: die now."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if expected_parent is not None and os.getppid() != expected_parent:
        os.kill(os.getpid(), signal.SIGKILL)


def bind_rank_to_launcher() -> None:
    """A rank started by a launcher dies with it: `cli.torchrun` names itself in
    $MEGATRON_EXAONE_LAUNCHER_PID; under plain torchrun the parent at start-up is the launcher. A
    process started any other way (a shell, srun) is left alone, so `nohup exaone-train ... &`
    survives its terminal."""
    launcher = os.environ.get(LAUNCHER_PID_ENV)
    if launcher:
        die_with_parent(int(launcher))
    elif "TORCHELASTIC_RUN_ID" in os.environ:
        die_with_parent(os.getppid())


def child_pids(parent: int | None = None) -> list[int]:
    """The processes whose parent is `parent` (default: this process), from /proc."""
    parent = os.getpid() if parent is None else parent
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        # Fields after the parenthesised command name: state, ppid, ...
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
            children.append(int(entry.name))
    return children


def forward_to_children(signum: int) -> list[int]:
    """Send `signum` to every child process of this one; returns their pids."""
    children = child_pids()
    for pid in children:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass
    return children
