"""The one ordered list of what turns the single-device model into this rank's part of a layout.

Each feature is one object: `validate(build, shapes)` checks the layout, the options and a
curriculum stage's shapes it depends on (one-line errors, before any process group exists) and
`apply(chunk, mesh, build)` changes a model or pipeline chunk. `parallel.build` splits the model
into pipeline chunks (on the meta device) and applies `FEATURES` to each, in this order, which no
other code repeats:

    tensor (+ sequence) -> expert -> context -> precision -> materialize + init -> compile
    -> recompute -> FSDP2
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from megatron_exaone.config.schema import ParallelConfig, PrecisionConfig
from megatron_exaone.model import ModelConfig
from megatron_exaone.precision.registry import apply_precision, is_te, validate_precision

from .compile import apply_compile
from .context_parallel import apply_context_parallel
from .data_parallel import apply_data_parallel
from .expert_parallel import apply_expert_parallel
from .mesh import LayoutError, ParallelDims, ParallelMesh
from .pipeline import SCHEDULES, check_schedule, pipeline_layout, splits_weight_backward
from .recompute import apply_recompute, check_recompute
from .sharding import materialize
from .tensor_parallel import apply_tensor_parallel


@dataclass(frozen=True)
class Build:
    """What a rank builds: the model, the layout (`parallel`, its dp resolved in `dims`), the
    precision, and where (`device_type` "cpu"/"cuda"; None when validating without a machine: the
    checks that depend on one are skipped). `seed`: the initialization seed (layout-invariant).
    `param_dtype`: what the device parameters are stored in under FSDP2; FP32 (they are the master
    weights) unless the optimizer keeps FP32 masters on the host (`training.offload`)."""

    model: ModelConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    dims: ParallelDims = field(default_factory=ParallelDims)
    device_type: str | None = None
    seed: int = 0
    param_dtype: torch.dtype = torch.float32

    @property
    def bf16(self) -> bool:
        """Whether FSDP2 computes in bf16 over fp32 parameters (on CUDA unless fp32; CPU runs
        compute in fp32, unless the parameters are stored in bf16)."""
        stored_bf16 = self.param_dtype == torch.bfloat16
        return stored_bf16 or (self.precision.name != "fp32" and self.device_type == "cuda")

    @property
    def activation_dtype(self) -> torch.dtype:
        """The dtype of the hidden states between pipeline stages."""
        return torch.bfloat16 if self.bf16 else torch.float32


@dataclass(frozen=True)
class Shapes:
    """A curriculum stage's shapes: sequence length, micro-batch and its batch sizes by name
    (global_batch_size, and for a ramp batch_ramp_start and batch_ramp_increment)."""

    seq_len: int
    micro_batch: int
    batches: tuple[tuple[str, int], ...]

    @property
    def global_batches(self) -> list[int]:
        """The global batch sizes a step runs (the ramp's increment is not one)."""
        return [value for name, value in self.batches if name != "batch_ramp_increment"]


class Feature:
    """One step of the build. Subclasses override what they need."""

    def validate(self, build: Build, shapes: Shapes | None) -> None:
        """Raise a one-line `LayoutError` (or `PrecisionUnavailable`) if this feature cannot run
        `build`."""

    def apply(self, chunk: nn.Module, mesh: ParallelMesh, build: Build) -> None:
        """Change `chunk` (a model or a pipeline chunk) in place."""


class TensorParallel(Feature):
    def validate(self, build: Build, shapes: Shapes | None) -> None:
        dims = build.dims
        if (
            shapes
            and build.parallel.sequence_parallel
            and dims.tp > 1
            and (shapes.seq_len // dims.cp) % dims.tp
        ):
            raise LayoutError(
                f"seq_len/cp = {shapes.seq_len // dims.cp} is not divisible by tp={dims.tp}: "
                "sequence parallel splits each rank's tokens over tp. Change seq_len or tp, or "
                "set parallel.sequence_parallel=false."
            )

    def apply(self, chunk: nn.Module, mesh: ParallelMesh, build: Build) -> None:
        apply_tensor_parallel(chunk, mesh.tp_group, build.parallel.sequence_parallel)


class ExpertParallel(Feature):
    def validate(self, build: Build, shapes: Shapes | None) -> None:
        if build.dims.etp > 1:  # the mesh describes it; no pass implements it yet
            raise LayoutError(
                f"etp={build.dims.etp}: expert tensor parallelism is not implemented yet; use "
                "etp=1 (experts whole, spread by ep; the K-EXAONE layouts use ETP1)."
            )

    def apply(self, chunk: nn.Module, mesh: ParallelMesh, build: Build) -> None:
        apply_expert_parallel(chunk, mesh.ep_group)


class ContextParallel(Feature):
    def validate(self, build: Build, shapes: Shapes | None) -> None:
        cp = build.dims.cp
        if cp > 1 and build.precision.te_attention:
            raise LayoutError(
                f"cp={cp} with precision.te_attention=true: context parallel attention runs on "
                "SDPA / FlexAttention; set precision.te_attention=false."
            )
        if shapes and cp > 1 and shapes.seq_len % (2 * cp):
            raise LayoutError(
                f"seq_len={shapes.seq_len} is not divisible by 2*cp = {2 * cp}: context parallel "
                "splits each sequence into 2*cp load-balanced chunks. Change seq_len or cp."
            )

    def apply(self, chunk: nn.Module, mesh: ParallelMesh, build: Build) -> None:
        apply_context_parallel(chunk, mesh)


class Precision(Feature):
    def validate(self, build: Build, shapes: Shapes | None) -> None:
        validate_precision(build.precision, build.device_type, build.model.num_hidden_layers)
        if not is_te(build.precision):
            return
        if build.parallel.compile:
            raise LayoutError(
                f"parallel.compile=true with precision={build.precision.name}: Transformer Engine "
                "modules fuse their own kernels and do not run under torch.compile; set "
                "parallel.compile=false."
            )
        rows = shapes.micro_batch * shapes.seq_len // build.dims.cp if shapes else 0
        if rows % 8:
            raise LayoutError(
                f"micro_batch_size x seq_len / cp = {rows} tokens reach each linear, and "
                "Transformer Engine's FP8 linears need a multiple of 8 (TE's "
                "assert_dim_for_fp8_exec). Change seq_len or trainer.micro_batch_size."
            )

    def apply(self, chunk: nn.Module, mesh: ParallelMesh, build: Build) -> None:
        layers = build.model.num_hidden_layers
        apply_precision(chunk, build.precision, layers, build.device_type or "cpu", mesh)


class Materialize(Feature):
    """Allocate the (sharded) meta-device chunk and fill it with its slice of the single-process
    initialization."""

    def apply(self, chunk: nn.Module, mesh: ParallelMesh, build: Build) -> None:
        materialize(chunk, build.model, build.seed, _device(mesh, build))


class Compile(Feature):
    def validate(self, build: Build, shapes: Shapes | None) -> None:
        if build.parallel.compile and build.parallel.recompute == "selective":
            raise LayoutError(
                "parallel.compile=true with recompute=selective: compiled layers recompute as a "
                "whole (parallel/compile.py); use parallel.recompute=full or none, or "
                "parallel.compile=false."
            )

    def apply(self, chunk: nn.Module, mesh: ParallelMesh, build: Build) -> None:
        if build.parallel.compile:  # compiled layers recompute inside their own graphs
            apply_compile(chunk, recompute=build.parallel.recompute == "full")


class Recompute(Feature):
    def validate(self, build: Build, shapes: Shapes | None) -> None:
        check_recompute(build.parallel.recompute, build.parallel.recompute_modules)

    def apply(self, chunk: nn.Module, mesh: ParallelMesh, build: Build) -> None:
        if not build.parallel.compile:
            apply_recompute(
                chunk, build.parallel.recompute, tuple(build.parallel.recompute_modules)
            )


class DataParallel(Feature):
    """Sharded data parallel (FSDP2) when `parallel.fsdp`; the batches split over dp in any case."""

    def validate(self, build: Build, shapes: Shapes | None) -> None:
        p, dims = build.parallel, build.dims
        if p.reduce_grads_each_micro_batch and splits_weight_backward(p.pipeline_schedule):
            raise LayoutError(
                f"parallel.reduce_grads_each_micro_batch=true with pipeline_schedule="
                f"{p.pipeline_schedule}: that schedule splits each backward and keeps parameters "
                "gathered; use 1f1b or interleaved_1f1b, or set it to false."
            )
        per_step = shapes.micro_batch * dims.dp if shapes else 1
        for name, batch in shapes.batches if shapes else ():
            if batch % per_step:
                raise LayoutError(
                    f"{name}={batch} is not a multiple of micro_batch_size x dp = "
                    f"{shapes.micro_batch} x {dims.dp} = {per_step}; change it (or "
                    "trainer.micro_batch_size / the layout)."
                )

    def apply(self, chunk: nn.Module, mesh: ParallelMesh, build: Build) -> None:
        p = build.parallel
        if p.fsdp:
            apply_data_parallel(
                chunk,
                mesh,
                bf16=build.bf16,
                param_dtype=build.param_dtype,
                reshard_after_forward=p.reshard_after_forward
                and not splits_weight_backward(p.pipeline_schedule),
            )


class Pipeline(Feature):
    """The split into pipeline chunks comes before the other features (`parallel.build`); here its
    checks."""

    def validate(self, build: Build, shapes: Shapes | None) -> None:
        p, dims = build.parallel, build.dims
        if p.pipeline_schedule not in SCHEDULES:
            raise LayoutError(
                f"parallel.pipeline_schedule={p.pipeline_schedule!r}: use one of "
                f"{', '.join(SCHEDULES)}."
            )
        try:
            if p.pipeline_layout is not None:
                pipeline_layout(build.model, dims.pp, dims.vpp, p.pipeline_layout)
            if dims.pp > 1 and shapes:
                for batch in shapes.global_batches:
                    check_schedule(
                        p.pipeline_schedule,
                        dims.pp,
                        dims.vpp,
                        batch // (shapes.micro_batch * dims.dp),
                    )
        except LayoutError as exc:
            raise LayoutError(
                f"pipeline ({p.pipeline_schedule}, pp={dims.pp}, vpp={dims.vpp}): {exc}"
            ) from None


FEATURES: tuple[Feature, ...] = (
    TensorParallel(),
    ExpertParallel(),
    ContextParallel(),
    Precision(),
    Materialize(),
    Compile(),
    Recompute(),
    DataParallel(),
)


def validate_build(build: Build, shapes: Shapes | None = None) -> None:
    """Every feature's checks of `build` (and a stage's `shapes`), then the pipeline schedule's
    (which assume the batches split)."""
    for feature in (*FEATURES, Pipeline()):
        feature.validate(build, shapes)


def _device(mesh: ParallelMesh, build: Build) -> torch.device:
    if build.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(build.device_type or mesh.dense.device_type)
