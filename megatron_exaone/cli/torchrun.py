"""`python -m megatron_exaone.cli.torchrun [TORCHRUN ARGS] -m megatron_exaone.cli.train
[OVERRIDES]`: torchrun with the project's signal policy (`megatron_exaone.lifetime`);
launch/local.sh and launch/torchrun.sh use it.

Plain torchrun meets SIGTERM or SIGINT by sending SIGTERM to its ranks, killing them 30 s later and
exiting 1 with a traceback, and SIGUSR1 (Slurm's warning signal) kills torchrun itself. Here
SIGTERM, SIGINT and SIGUSR1 are passed to the ranks unchanged: they finish their step, save a
checkpoint and exit 0, and so does the launcher. SIGHUP and SIGQUIT keep torchrun's meaning (stop
the ranks now). The ranks die with this process (`lifetime.bind_rank_to_launcher`), so killing it
never leaves ranks that go on training.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

from megatron_exaone import lifetime

log = logging.getLogger("megatron_exaone.launch")


def _forward(signum: int, _frame) -> None:
    ranks = lifetime.forward_to_children(signum)
    log.warning(
        "launcher: received %s, passed to %d rank(s): they save a checkpoint after this step and "
        "exit",
        signal.Signals(signum).name,
        len(ranks),
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    for sig in lifetime.STOP_SIGNALS:
        signal.signal(sig, _forward)
    os.environ[lifetime.LAUNCHER_PID_ENV] = str(os.getpid())
    # after the handlers: a signal during import is forwarded
    from torch.distributed.run import main as torchrun

    # torchrun's own handlers only for the signals that mean "now"; ours (above) stay for the
    # others.
    torchrun(["--signals-to-handle", "SIGHUP,SIGQUIT", *argv])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
