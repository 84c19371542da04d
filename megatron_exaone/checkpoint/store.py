"""Checkpoint directories written with torch.distributed.checkpoint (DCP), visible only once complete.

Layout: ROOT/step_00000040/ (DCP files + meta.json), ROOT/latest (the name of the newest complete checkpoint,
written last and atomically).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch.distributed.checkpoint as dcp

log = logging.getLogger(__name__)
LATEST = "latest"
META = "meta.json"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def is_complete(path: Path) -> bool:
    return (path / ".metadata").is_file() and (path / META).is_file()


def save_checkpoint(root: str | os.PathLike, step: int, state: dict[str, Any], meta: dict[str, Any] | None = None,
                    keep_last: int | None = None) -> Path:
    """Save `state` (a DCP state dict) as ROOT/step_N; older checkpoints beyond `keep_last` are removed."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process.*")
        dcp.save(state, checkpoint_id=str(tmp))
    (tmp / META).write_text(json.dumps({"step": step, **(meta or {})}, indent=2) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    latest_tmp = root / f".{LATEST}.tmp"
    latest_tmp.write_text(final.name + "\n")
    os.replace(latest_tmp, root / LATEST)
    if keep_last:
        for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep_last]:
            shutil.rmtree(old)
    return final


def find_checkpoint(path: str | os.PathLike) -> Path | None:
    """A checkpoint directory itself, or the newest complete one under a root (following `latest`, and falling
    back past an incomplete or corrupt newest one with a warning)."""
    path = Path(path)
    if is_complete(path):
        return path
    if not path.is_dir():
        return None
    candidates = sorted((p for p in path.glob("step_*") if p.is_dir()), reverse=True)
    pointer = path / LATEST
    if pointer.is_file():
        named = path / pointer.read_text().strip()
        candidates = [named] + [p for p in candidates if p != named]
    for candidate in candidates:
        if is_complete(candidate):
            return candidate
        log.warning("skipping %s: it is incomplete (no .metadata or meta.json); using an older checkpoint", candidate)
    return None


def read_meta(checkpoint: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(checkpoint) / META).read_text())


def load_checkpoint(checkpoint: str | os.PathLike, state: dict[str, Any]) -> None:
    """Load into `state` in place (DCP reshards to whatever layout `state` has)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
        dcp.load(state, checkpoint_id=str(checkpoint))
