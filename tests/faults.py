"""Faults planted in real checkpoints, for the tests: content changed in place, and payloads whose
loading would run code (a real pickle that creates a directory)."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from megatron_exaone.checkpoint import integrity
from megatron_exaone.checkpoint.store import read_meta

CORRUPTION = 200_000  # bytes overwritten in place, as in the report


def corrupt(path: Path, offset: int = 1000) -> None:
    """Overwrite bytes inside the file; its size stays the same."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(min(offset, size - CORRUPTION))
        f.write(os.urandom(CORRUPTION))
    assert path.stat().st_size == size


def data_file(checkpoint: Path) -> Path:
    return max(checkpoint.glob("*.distcp"), key=lambda f: f.stat().st_size)


class Payload:
    """Unpickling it creates the directory `marker`: proof that loading ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def reseal(checkpoint: Path) -> None:
    """What an attacker who can write the files can do too: rewrite meta.json's manifest to match
    them."""
    meta = read_meta(checkpoint)
    meta["files"] = {
        p.name: dict(zip(("bytes", integrity.CHECKSUM), integrity.file_digest(p)))
        for p in checkpoint.iterdir()
        if p.name != "meta.json"
    }
    (checkpoint / "meta.json").write_text(json.dumps(meta))


def planted_metadata(checkpoint: Path, marker: Path) -> None:
    (checkpoint / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    reseal(checkpoint)


def planted_entry(checkpoint: Path, marker: Path) -> None:
    """The format an earlier version wrote (`extra` pickled), with a payload: DCP itself would
    unpickle it with torch.load(weights_only=False)."""
    for f in checkpoint.glob("*.distcp"):
        f.unlink()
    (checkpoint / ".metadata").unlink()
    dcp.save(
        {"model.embed_tokens.weight": torch.zeros(2), "extra": Payload(marker)},
        checkpoint_id=str(checkpoint),
    )
    reseal(checkpoint)
