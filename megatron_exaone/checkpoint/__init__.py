"""Reshardable DCP checkpoints with atomic visibility, checksums and safe loading.

`state.save` / `state.load` write and read a run's whole training state (model, optimizer, extra
values, RNG) under any parallel layout; `store` holds the directory mechanics (atomic `latest`,
retention, async saves, verified loads); `integrity` the checksums and the metadata reader that
cannot run code.
"""

from .state import (
    CheckpointLayoutError,
    LoadedCheckpoint,
    load,
    load_model_state,
    load_optimizer_state,
    model_state,
    optimizer_state,
    save,
    wait_pending_save,
)
from .store import (
    CheckpointSaveError,
    CorruptCheckpointError,
    NoUsableCheckpointError,
    PendingCheckpoint,
    find_checkpoint,
    read_meta,
)

__all__ = [
    "CheckpointLayoutError",
    "CheckpointSaveError",
    "CorruptCheckpointError",
    "LoadedCheckpoint",
    "NoUsableCheckpointError",
    "PendingCheckpoint",
    "find_checkpoint",
    "load",
    "load_model_state",
    "load_optimizer_state",
    "model_state",
    "optimizer_state",
    "read_meta",
    "save",
    "wait_pending_save",
]
