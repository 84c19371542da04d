"""Which device a launch computes on: `trainer.device` (auto, cpu, cuda) resolved once, never
silently."""

from __future__ import annotations

import os

import torch

from megatron_exaone.config.schema import DEVICES
from megatron_exaone.errors import UserError


class DeviceUnavailable(UserError, ValueError):
    """The requested device is unknown or absent."""


def resolve_device(device: str) -> str:
    """`trainer.device` -> "cpu" or "cuda"; asking for CUDA without one is an error, not a CPU
    run."""
    if device not in DEVICES:
        raise DeviceUnavailable(f"trainer.device={device!r}: use one of {', '.join(DEVICES)}.")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable(
            "trainer.device=cuda but torch sees no CUDA device; run on a GPU machine or set "
            "trainer.device=cpu (or auto)."
        )
    return device


def rank_device(device: str) -> torch.device:
    """This rank's device for `trainer.device`: its LOCAL_RANK's GPU, or the CPU."""
    if resolve_device(device) == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")
