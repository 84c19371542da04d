"""The one base class of errors a user can fix: bad input, a missing file, a layout that cannot run.

The command-line entry points print such an error as one line naming the file, key or value and what
to do, and exit with status 2; set MEGATRON_EXAONE_DEBUG=1 to see the traceback as well. Any other
exception is a bug or an environment failure and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

DEBUG_ENV = "MEGATRON_EXAONE_DEBUG"
USER_ERROR_EXIT = 2


class UserError(Exception):
    """A problem with the user's input or environment; its message says what to change."""


def one_line(message: str) -> str:
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


@contextlib.contextmanager
def reported(program: str, show: bool = True) -> Iterator[None]:
    """Turn a `UserError` raised inside into `program: message` on stderr (when `show`; other ranks
    stay quiet) and `SystemExit(2)`; the traceback too when $MEGATRON_EXAONE_DEBUG is set."""
    try:
        yield
    except UserError as exc:
        if os.environ.get(DEBUG_ENV):
            raise
        if show:
            print(f"{program}: {one_line(str(exc))}", file=sys.stderr, flush=True)
        raise SystemExit(USER_ERROR_EXIT) from None
