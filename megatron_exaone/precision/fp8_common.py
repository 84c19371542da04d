"""FP8 scaling math shared by the torch-native and emulated backends: formats, amax, current
scaling, saturating quantization.

Current (just-in-time) scaling: every GEMM operand is scaled from its own amax at the moment it is
used, scale = fp8_max / amax, so the largest magnitude lands on the format's largest finite value.
`tensorwise` takes one amax for the whole operand; `rowwise` one per slice along the GEMM's
non-contracted axis (per row of the left operand, per column of the right one, i.e. per output
channel of a weight), reduced over the contraction axis. Values are clamped to +-fp8_max before the
cast: a CUDA cast to E4M3 turns overflow into NaN and one to E5M2 into inf, whatever the amax said.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_exaone.errors import UserError
from megatron_exaone.model.fused import fused
from megatron_exaone.model.moe import group_ids
from megatron_exaone.parallel.comm import all_reduce_

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
# Largest finite values: E4M3 (no infinities) 448, E5M2 57344.
FP8_MAX = {E4M3: torch.finfo(E4M3).max, E5M2: torch.finfo(E5M2).max}
SCALINGS = ("tensorwise", "rowwise")
# amax is clamped away from zero so an all-zero operand gets a finite scale (and quantizes to
# zeros).
AMAX_EPS = 1e-12


class Fp8Unavailable(UserError, ValueError):
    """FP8 was requested where it cannot run (no silent fallback to BF16)."""


@dataclass(frozen=True)
class Fp8Recipe:
    """How a dense linear's operands are quantized. `grad_dtype`: E5M2 (the "hybrid" format) or E4M3
    for dY. `amax_group`: a process group over which tensorwise amaxes are max-reduced (tensor
    parallel), so every rank uses the scale of the full, unsharded operand."""

    scaling: str = "tensorwise"
    grad_dtype: torch.dtype = E5M2
    amax_group: dist.ProcessGroup | None = None

    def __post_init__(self) -> None:
        if self.scaling not in SCALINGS:
            raise ValueError(f"FP8 scaling {self.scaling!r}: use one of {', '.join(SCALINGS)}.")
        if self.grad_dtype not in FP8_MAX:
            raise ValueError(f"FP8 gradient dtype {self.grad_dtype}: use {E5M2} or {E4M3}.")


@dataclass(frozen=True)
class Quantized:
    """An FP8 tensor and its inverse scale (broadcastable to `data`): data * scale_inv ~ the
    original values. The inverse scale is what a scaled GEMM multiplies its accumulator by."""

    data: torch.Tensor
    scale_inv: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        return self.data.float() * self.scale_inv

    def t(self) -> Quantized:
        """The transpose (a view of the data; a rowwise scale [M, 1] becomes [1, M])."""
        return Quantized(self.data.t(), self.scale_inv.t())


def amax(
    x: torch.Tensor, dim: int | None = None, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """max |x| in fp32: over the whole tensor (dim=None, shape []) or reduced along `dim` (kept,
    size 1); with a `group`, the maximum over its ranks (each holding a shard or a replica of the
    same operand)."""
    with torch.no_grad():
        result = (x.abs().amax() if dim is None else x.abs().amax(dim=dim, keepdim=True)).float()
        if group is not None:
            all_reduce_(result, group, dist.ReduceOp.MAX)
    return result


def scale_from_amax(amax_value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp8_max / amax (fp32), amax clamped to AMAX_EPS."""
    return FP8_MAX[dtype] / amax_value.float().clamp(min=AMAX_EPS)


def quantize(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Saturating cast of x * scale to `dtype` (NaN stays NaN)."""
    limit = FP8_MAX[dtype]
    with torch.no_grad():
        scaled = x.float() * scale
        if torch.compiler.is_compiling():
            # Saturate through `where`, not clamp: inductor lowers clamp to the min.NaN/max.NaN PTX
            # instructions, next to which Triton miscompiles a transposed FP8 store (garbage that
            # decodes as NaN/Inf; triton-lang/triton#11111, worked around in torchao#4652), and a
            # compiled cast-transpose stores exactly that. Eager keeps clamp's single kernel.
            low = torch.where(scaled < -limit, -limit, scaled)
            scaled = torch.where(scaled > limit, limit, low)
        else:
            scaled = scaled.clamp(-limit, limit)
        return scaled.to(dtype)


def quantize_with_scale(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> Quantized:
    return Quantized(quantize(x, scale, dtype), scale.reciprocal())


def quantize_both_layouts(
    x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize(x, scale, dtype)` for a 2-D x, stored row-major and column-major (the same
    values): the layouts a GEMM takes as its left operand and as its right one. Compiled (`fused`,
    on CUDA) it is one cast-transpose kernel that reads x once, as Transformer Engine's."""
    rows = quantize(x, scale, dtype)
    return rows, rows.t().contiguous().t()


def current_scale(
    x: torch.Tensor,
    dtype: torch.dtype,
    scaling: str,
    contraction_dim: int,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """The scale of `x` now, for a GEMM contracting `x` along `contraction_dim`: tensorwise
    (max-reduced over `group` when given), or rowwise (one per slice along the other axis; never
    reduced over ranks, since different shards hold different slices)."""
    if scaling == "tensorwise":
        return scale_from_amax(amax(x, None, group), dtype)
    return scale_from_amax(amax(x, contraction_dim), dtype)


def to_fp8(
    x: torch.Tensor,
    dtype: torch.dtype,
    scaling: str,
    contraction_dim: int,
    group: dist.ProcessGroup | None = None,
) -> Quantized:
    """`x` quantized with its current scale (see `current_scale`)."""
    return quantize_with_scale(x, current_scale(x, dtype, scaling, contraction_dim, group), dtype)


def to_fp8_both_layouts(
    x: torch.Tensor, dtype: torch.dtype, group: dist.ProcessGroup | None = None
) -> tuple[Quantized, Quantized]:
    """`x` [M, K] quantized with its current tensorwise scale (max-reduced over `group`), row-major
    and column-major (`quantize_both_layouts`): a tensorwise scale does not depend on the GEMM's
    axis, so one amax and one read of x give every layout its GEMMs need."""
    scale = current_scale(x, dtype, "tensorwise", 1, group)
    # dynamic: one kernel for every operand shape (a step has dozens; the curriculum changes them)
    rows, cols = fused(quantize_both_layouts, x, dynamic=True)(x, scale, dtype)
    scale_inv = scale.reciprocal()
    return Quantized(rows, scale_inv), Quantized(cols, scale_inv)


def per_group_scale(weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One scale per group of stacked weights [G, N, K] (per expert), shape [G, 1, 1]: it does not
    depend on the GEMM's axis, so the same scale serves the forward GEMM and the input-gradient GEMM
    of the transposed weight."""
    with torch.no_grad():
        return scale_from_amax(weights.abs().amax(dim=(1, 2), keepdim=True), dtype)


def to_fp8_per_group_columns(
    x: torch.Tensor, counts: torch.Tensor, dtype: torch.dtype
) -> Quantized:
    """x [T, C] with rows sorted into groups of `counts`: one scale per (group, column), for a
    grouped GEMM that contracts over each group's rows (the routed experts' weight gradient).
    scale_inv is [G, C]; row t uses scale_inv[group of t]."""
    with torch.no_grad():
        # A segmented reduction over each group's rows (one pass, no atomics: a scatter_reduce here
        # made every row of a group contend for the same [C] addresses). The max of bf16 values is
        # exact in bf16.
        group_amax = torch.segment_reduce(
            x.abs(), "max", lengths=counts, axis=0, unsafe=True, initial=0.0
        )
    scale = scale_from_amax(group_amax, dtype)
    return Quantized(quantize(x, scale[group_ids(counts, x.shape[0])], dtype), scale.reciprocal())
