"""An interrupted `exaone-data tokenize`, for the resume tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest

import data_tools.tokenize_corpus as tc


def interrupt_encoding(monkeypatch: pytest.MonkeyPatch, at_batch: int = 3) -> Callable[[], None]:
    """Make tokenizing raise KeyboardInterrupt at its `at_batch`-th batch, as a Ctrl-C would;
    returns the function that undoes it."""
    real, calls = tc.encode_records, []

    def interrupted(records):
        calls.append(len(records))
        if len(calls) == at_batch:
            raise KeyboardInterrupt
        return real(records)

    monkeypatch.setattr(tc, "encode_records", interrupted)
    return lambda: monkeypatch.setattr(tc, "encode_records", real)
