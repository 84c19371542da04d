"""Which checkpoint a launch starts from."""

from __future__ import annotations

import os
from pathlib import Path

from .store import find_checkpoint


def resume_checkpoint(run_dir: str | os.PathLike, load: str | os.PathLike | None) -> Path | None:
    """The run's own newest complete checkpoint (a restart), else `load` (an initial checkpoint, such as an
    imported HF model), else None (fresh weights). A `load` path without a complete checkpoint is an error."""
    own = find_checkpoint(Path(run_dir) / "checkpoints")
    if own is not None or not load:
        return own
    found = find_checkpoint(load)
    if found is None:
        raise FileNotFoundError(f"checkpoint.load={load}: no complete checkpoint there (a checkpoint directory "
                                "holds .metadata and meta.json, a run's checkpoints/ folder step_* folders).")
    return found
