"""Which checkpoints a launch starts from."""

from __future__ import annotations

import os
from pathlib import Path

from .store import NoUsableCheckpointError, checkpoint_dirs, find_checkpoint


def resume_source(run_dir: str | os.PathLike, load: str | os.PathLike | None) -> Path | None:
    """Where a launch loads from: the run's own checkpoints/ folder when it holds a usable
    checkpoint (a restart; `state.load` takes its newest and falls back past a corrupt one), else
    `load` (an initial checkpoint, such as an imported HF model), else None (fresh weights).

    Raises `NoUsableCheckpointError` when run_dir/checkpoints holds checkpoints of which none can be
    used (starting over would overwrite them) or when `load` holds no usable checkpoint."""
    own = Path(run_dir) / "checkpoints"
    if find_checkpoint(own) is not None:
        return own
    if checkpoint_dirs(own):
        raise NoUsableCheckpointError(
            f"{own} holds {len(checkpoint_dirs(own))} checkpoint(s) and none can be used (see the "
            "warnings above): move them away to start the run over, or set checkpoint.load to a "
            "checkpoint to start from."
        )
    if not load:
        return None
    if find_checkpoint(load) is None:
        raise NoUsableCheckpointError(
            f"checkpoint.load={load}: no usable checkpoint there (a checkpoint directory "
            "holds .metadata and meta.json, a run's checkpoints/ folder step_* folders)."
        )
    return Path(load)


def starting_checkpoint(run_dir: str | os.PathLike, load: str | os.PathLike | None) -> Path | None:
    """The checkpoint a launch will most likely start from (the newest usable one of
    `resume_source`; a corrupt one is only found out as it loads), for decisions made before
    loading: the starting stage, the model."""
    source = resume_source(run_dir, load)
    return find_checkpoint(source) if source is not None else None
