"""Can this build and this device run the requested precision? (Rule 6: no silent fallback to bf16.)

The FP8 backends live in `megatron_exaone.precision`; a build that does not ship one rejects its names here,
before any process group starts, instead of failing later inside the model conversion.
"""

from __future__ import annotations

import importlib.util

import torch

from megatron_exaone.errors import UserError
from megatron_exaone.precision.fp8_te import INSTALL_HINT

from .schema import DEVICES, PrecisionConfig

# Precision name -> the module that implements it. A name whose module is absent is not available in this build.
FP8_BACKEND_MODULES = {
    "fp8_te_delayed": "megatron_exaone.precision.fp8_te",
    "fp8_te_tensorwise": "megatron_exaone.precision.fp8_te",
    "fp8_te_blockwise": "megatron_exaone.precision.fp8_te",
    "fp8_te_mxfp8": "megatron_exaone.precision.fp8_te",
    "fp8_torch": "megatron_exaone.precision.fp8_torch",
    "fp8_emulated": "megatron_exaone.precision.fp8_emulated",
}
# Compute capabilities that run each mode (TE 2.20's gates: per-tensor FP8 from sm_89, block scaling from sm_90,
# MXFP8 on 10.0 <= sm < 12.0; torch's scaled matmuls from sm_89).
_CAPABILITY = {
    "fp8_te_blockwise": ("9.0 or newer", lambda cc: cc >= (9, 0)),
    "fp8_te_mxfp8": ("10.x or 11.x (data-center Blackwell)", lambda cc: (10, 0) <= cc < (12, 0)),
}
_FP8_CAPABILITY = ("8.9 or newer", lambda cc: cc >= (8, 9))
# TE's block-scaling GEMMs also need a torch built with CUDA 12.9 or newer.
_BLOCKWISE_MIN_CUDA = (12, 9)


class PrecisionUnavailable(UserError, ValueError):
    """The requested precision cannot run in this build or on this device."""


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def resolve_device(device: str) -> str:
    """`trainer.device` -> "cpu" or "cuda"; asking for CUDA without one is an error, not a CPU run."""
    if device not in DEVICES:
        raise PrecisionUnavailable(f"trainer.device={device!r}: use one of {', '.join(DEVICES)}.")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise PrecisionUnavailable("trainer.device=cuda but torch sees no CUDA device; run on a GPU machine or set "
                                   "trainer.device=cpu (or auto).")
    return device


def validate_precision(cfg: PrecisionConfig, device_type: str | None) -> None:
    """Raise `PrecisionUnavailable` unless `cfg.name` can run on `device_type` ("cpu" or "cuda") here.

    `device_type=None` checks only this build (does it contain the backend?), not this machine, so a GPU recipe can
    be checked on a laptop. fp32 and bf16 run anywhere (bf16 computes in fp32 on CPU). fp8_te_* need the backend,
    Transformer Engine and a CUDA device of a capability their recipe runs on (`_CAPABILITY`); fp8_torch the
    backend and an sm_89+ GPU; fp8_emulated only the backend.
    """
    name = cfg.name
    if name not in FP8_BACKEND_MODULES:
        return
    module = FP8_BACKEND_MODULES[name]
    if not _importable(module):
        raise PrecisionUnavailable(
            f"FP8 backend not available in this build: precision={name} needs {module}, which this installation "
            "does not contain. Use precision=bf16, or install a megatron-exaone version with that FP8 backend.")
    if name == "fp8_emulated" or device_type is None:
        return
    if name.startswith("fp8_te_") and not _importable("transformer_engine"):
        raise PrecisionUnavailable(f"precision={name} needs Transformer Engine, which is not installed: "
                                   f"`{INSTALL_HINT}` on a CUDA machine, or use precision=fp8_torch or bf16.")
    if device_type != "cuda":
        raise PrecisionUnavailable(f"precision={name} runs FP8 GEMMs on a CUDA GPU, but this run is on "
                                   f"{device_type}; use precision=fp8_emulated (tests) or bf16, or run on a GPU.")
    need, runs_on = _CAPABILITY.get(name, _FP8_CAPABILITY)
    have = torch.cuda.get_device_capability()
    if not runs_on(have):
        raise PrecisionUnavailable(
            f"precision={name} needs CUDA compute capability {need}, but this GPU ({torch.cuda.get_device_name()}) "
            f"is {have[0]}.{have[1]}; use precision=bf16, or fp8_te_tensorwise / fp8_te_delayed on sm_89+.")
    cuda = torch.version.cuda
    if name == "fp8_te_blockwise" and cuda and tuple(int(p) for p in cuda.split(".")[:2]) < _BLOCKWISE_MIN_CUDA:
        raise PrecisionUnavailable(
            f"precision=fp8_te_blockwise needs torch built with CUDA 12.9 or newer for TE's block-scaling GEMMs, but "
            f"this torch uses CUDA {cuda}; install a CUDA 12.9+ build of torch, or use fp8_te_tensorwise.")
