"""Reshardable DCP checkpoints with atomic visibility.

`state.save` / `state.load` write and read a run's whole training state (model, optimizer, extra values, RNG)
under any parallel layout; `store` holds the directory mechanics (atomic `latest`, retention, async saves).
"""

from .state import (CheckpointLayoutError, load, load_model_state, load_optimizer_state, model_state,
                    optimizer_state, save, wait_pending_save)
from .store import PendingCheckpoint, find_checkpoint, read_meta

__all__ = ["CheckpointLayoutError", "PendingCheckpoint", "find_checkpoint", "load", "load_model_state",
           "load_optimizer_state", "model_state", "optimizer_state", "read_meta", "save", "wait_pending_save"]
