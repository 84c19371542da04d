"""The one table of precisions and the one entry point of the precision pass.

A precision name maps to its backend (none for fp32/bf16; `fp8_torch`, `fp8_emulated`, or
Transformer Engine), the FP8 scaling recipes it accepts and the GPUs it runs on.
`validate_precision` checks a `PrecisionConfig` against this build and this device before any
process group starts (Rule 6: no silent fallback); `apply_precision` runs the pass of the backend.
Adding a precision is one row of `PRECISIONS` (and its recipe file under recipes/precision/).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from megatron_exaone.errors import UserError

if TYPE_CHECKING:
    from megatron_exaone.config.schema import PrecisionConfig
    from megatron_exaone.parallel.mesh import ParallelMesh

# TE's torch extension is compiled against the installed torch, so pip must not build it in an
# isolated environment (TE's installation guide). 2.10 is the first release with FSDP2 support.
TE_INSTALL_HINT = "pip install --no-build-isolation 'transformer_engine[pytorch]>=2.10'"
# A compute capability requirement: (what to tell the user, the test).
Capability = tuple[str, Callable[[tuple[int, int]], bool]]
_SM89: Capability = ("8.9 or newer", lambda cc: cc >= (8, 9))


@dataclass(frozen=True)
class Precision:
    """A row of the table. `backend`: the module of `megatron_exaone.precision` that implements it
    (None: no FP8 pass). `recipes`: the FP8 scaling recipes it accepts, the first by default.
    `capability`: the CUDA compute capabilities it runs on (None: any device). `min_cuda`: the CUDA
    version torch must be built with."""

    name: str
    backend: str | None = None
    recipes: tuple[str, ...] = ()
    capability: Capability | None = _SM89
    min_cuda: tuple[int, int] | None = None

    @property
    def is_te(self) -> bool:
        return self.backend == "fp8_te"


PRECISIONS: dict[str, Precision] = {
    p.name: p
    for p in (
        Precision("fp32", capability=None),
        Precision("bf16", capability=None),
        # Transformer Engine 2.20's gates: per-tensor FP8 from sm_89, block scaling from sm_90 (and
        # CUDA 12.9), MXFP8 on data-center Blackwell.
        Precision("fp8_te_delayed", "fp8_te", ("delayed",)),
        Precision("fp8_te_tensorwise", "fp8_te", ("tensorwise",)),
        Precision(
            "fp8_te_blockwise",
            "fp8_te",
            ("blockwise",),
            ("9.0 or newer", lambda cc: cc >= (9, 0)),
            (12, 9),
        ),
        Precision(
            "fp8_te_mxfp8",
            "fp8_te",
            ("mxfp8",),
            ("10.x or 11.x (data-center Blackwell)", lambda cc: (10, 0) <= cc < (12, 0)),
        ),
        Precision("fp8_torch", "fp8_torch", ("tensorwise", "rowwise")),
        Precision("fp8_emulated", "fp8_emulated", ("tensorwise", "rowwise"), capability=None),
    )
}


class PrecisionUnavailable(UserError, ValueError):
    """The requested precision is unknown, mis-configured, or cannot run in this build or on this
    device."""


def precision_of(name: str) -> Precision:
    if name not in PRECISIONS:
        raise PrecisionUnavailable(f"precision.name={name!r}: use one of {', '.join(PRECISIONS)}.")
    return PRECISIONS[name]


def is_fp8(cfg: PrecisionConfig | str) -> bool:
    return precision_of(_name(cfg)).backend is not None


def is_te(cfg: PrecisionConfig | str) -> bool:
    return precision_of(_name(cfg)).is_te


def recipe_of(cfg: PrecisionConfig) -> str | None:
    """The FP8 recipe in effect (None for fp32/bf16)."""
    recipes = precision_of(cfg.name).recipes
    return cfg.recipe or (recipes[0] if recipes else None)


def _name(cfg: PrecisionConfig | str) -> str:
    return cfg if isinstance(cfg, str) else cfg.name


# --------------------------------------------------------------------------------------- validation
def validate_precision(
    cfg: PrecisionConfig, device_type: str | None, num_layers: int | None = None
) -> None:
    """Raise `PrecisionUnavailable` (one line, what to change) unless `cfg` can run on `device_type`
    ("cpu" or "cuda") in this build. `device_type=None` checks the options and this build only, not
    this machine, so a GPU recipe can be checked on a laptop. `num_layers`: the model's decoder
    layers (for the first/last BF16 rule)."""
    precision = precision_of(cfg.name)
    _check_options(cfg, precision, num_layers)
    if precision.backend is None:
        return
    module = f"megatron_exaone.precision.{precision.backend}"
    if not _importable(module):
        raise PrecisionUnavailable(
            f"FP8 backend not available in this build: precision={cfg.name} needs {module}, which "
            "this installation does not contain. Use precision=bf16, or install a megatron-exaone "
            "version with that FP8 backend."
        )
    if precision.capability is None or device_type is None:
        return
    if precision.is_te and not _importable("transformer_engine"):
        raise PrecisionUnavailable(
            f"precision={cfg.name} needs Transformer Engine, which is not installed: "
            f"`{TE_INSTALL_HINT}` on a CUDA machine, or use precision=fp8_torch or bf16."
        )
    if device_type != "cuda":
        raise PrecisionUnavailable(
            f"precision={cfg.name} runs FP8 GEMMs on a CUDA GPU, but this run is on "
            f"{device_type}; use precision=fp8_emulated (tests) or bf16, or run on a GPU."
        )
    need, runs_on = precision.capability
    have = torch.cuda.get_device_capability()
    if not runs_on(have):
        raise PrecisionUnavailable(
            f"precision={cfg.name} needs CUDA compute capability {need}, but this GPU "
            f"({torch.cuda.get_device_name()}) is {have[0]}.{have[1]}; use precision=bf16, or "
            "fp8_te_tensorwise / fp8_te_delayed on sm_89+."
        )
    cuda = torch.version.cuda
    if (
        precision.min_cuda
        and cuda
        and tuple(int(p) for p in cuda.split(".")[:2]) < precision.min_cuda
    ):
        version = ".".join(map(str, precision.min_cuda))
        raise PrecisionUnavailable(
            f"precision={cfg.name} needs torch built with CUDA {version} or newer, but this torch "
            f"uses CUDA {cuda}; install a CUDA {version}+ build of torch, or use fp8_te_tensorwise."
        )


def _check_options(cfg: PrecisionConfig, precision: Precision, num_layers: int | None) -> None:
    def fail(problem: str) -> PrecisionUnavailable:
        return PrecisionUnavailable(f"precision {cfg.name}: {problem}")

    if cfg.recipe is not None and cfg.recipe not in precision.recipes:
        if not precision.recipes:
            raise fail(
                f"precision.recipe={cfg.recipe!r} but this precision uses no FP8 recipe; remove it "
                "or pick an fp8_* precision."
            )
        raise fail(f"precision.recipe={cfg.recipe!r}: use one of {', '.join(precision.recipes)}.")
    if cfg.te_attention and not precision.is_te:
        raise fail(
            "precision.te_attention=true needs a Transformer Engine precision (fp8_te_*); remove "
            "it."
        )
    if cfg.fp8_mtp and precision.backend is None:
        raise fail(
            "precision.fp8_mtp=true needs an FP8 precision; remove it or pick an fp8_* precision."
        )
    for option in ("fp8_weight_cache", "fp8_lm_head"):
        if getattr(cfg, option) and precision.backend not in ("fp8_torch", "fp8_emulated"):
            raise fail(
                f"precision.{option}=true applies to fp8_torch and fp8_emulated; remove it or pick "
                "one of those."
            )
    for option, allowed in (
        ("fp8_format", ("hybrid", "e4m3")),
        ("amax_compute_algo", ("max", "most_recent")),
    ):
        if getattr(cfg, option) not in allowed:
            raise fail(
                f"precision.{option}={getattr(cfg, option)!r}: use one of {', '.join(allowed)}."
            )
    for option in ("amax_history_len", "keep_bf16_first_layers", "keep_bf16_last_layers"):
        low = 1 if option == "amax_history_len" else 0
        if getattr(cfg, option) < low:
            raise fail(f"precision.{option}={getattr(cfg, option)}: must be >= {low}.")
    kept = cfg.keep_bf16_first_layers + cfg.keep_bf16_last_layers
    if precision.backend is not None and num_layers is not None and kept > num_layers:
        raise fail(
            f"keep_bf16_first_layers + keep_bf16_last_layers = {kept} exceeds the model's "
            f"{num_layers} layers; lower them."
        )


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


# ----------------------------------------------------------------------------------------- the pass
def apply_precision(
    root: nn.Module,
    cfg: PrecisionConfig | str,
    num_layers: int,
    device_type: str,
    mesh: ParallelMesh | None = None,
) -> Any:
    """Switch `root` (a model or pipeline chunk, after the tensor and expert parallel passes) to the
    backend of `cfg` (a `PrecisionConfig` or a precision name); fp32/bf16 leave it as it is.
    `num_layers`: the model's decoder layers (the first/last BF16 rule counts global indices).
    `mesh`: the layout's groups (amaxes are reduced over them; None in one process). Returns the
    backend's report (an empty `PrecisionReport` for fp32/bf16)."""
    if isinstance(cfg, str):
        from megatron_exaone.config.schema import PrecisionConfig

        cfg = PrecisionConfig(name=cfg)
    backend = precision_of(cfg.name).backend
    if backend is None:
        from .apply import PrecisionReport

        return PrecisionReport()
    if backend == "fp8_te":
        from .fp8_te import apply_te

        return apply_te(
            root,
            cfg,
            mesh.tp_group if mesh else None,
            amax_group=mesh.tp_cp_dp_group if mesh else None,
            num_layers=num_layers,
        )
    from .apply import convert_gemms

    return convert_gemms(
        root, cfg, backend, num_layers, device_type, mesh.tp_group if mesh else None
    )
