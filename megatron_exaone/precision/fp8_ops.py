"""FP8 linear and grouped-expert compute: autograd functions over a backend's scaled GEMMs, and the module classes
the precision pass swaps in.

Every GEMM of forward and backward runs in FP8 (as torchao's float8 training): for Y = X W^T,
  forward  Y  = X  @ W^T   X, W in E4M3
  dgrad    dX = dY @ W     dY in the recipe's gradient format (E5M2 "hybrid" or E4M3)
  wgrad    dW = dY^T @ X
Each operand is quantized along the axis its GEMM contracts: with rowwise scaling X and dY are re-quantized from
the saved high-precision tensors in backward (the scales run along the other axis there); tensorwise scales do not
depend on the axis, so forward's scales of X and W are saved and reused (no second amax, no second all-reduce).

Routed experts always use rowwise E4M3 scaling in all three GEMMs: it is the only FP8 mode of
`torch._scaled_grouped_mm`, and per-token scales do not depend on how tokens are spread over ranks. Their weight
gradient contracts over each expert's tokens, so its scales are per (expert, column).

A backend (`Fp8Gemms`) only supplies the GEMMs: `fp8_torch.TorchGemms` (scaled matmul kernels) or
`fp8_emulated.EmulatedGemms` (dequantize, then fp32 matmul); quantization is the same code for both.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from megatron_exaone.model.moe import GroupedExperts

from .fp8_common import (E4M3, Fp8Recipe, Quantized, current_scale, quantize_with_scale, to_fp8,
                         to_fp8_per_group_columns)


class Fp8Gemms(Protocol):
    """The scaled GEMMs of one backend. Operands are `Quantized`; results come back in `out_dtype`."""

    name: str

    def mm(self, a: Quantized, b: Quantized, out_dtype: torch.dtype, fast_accum: bool) -> torch.Tensor:
        """a [M, K] @ b [K, N]; scale_inv [] (tensorwise) or a: [M, 1], b: [1, N] (rowwise)."""

    def grouped_mm(self, a: Quantized, b: Quantized, counts: torch.Tensor, out_dtype: torch.dtype,
                   fast_accum: bool) -> torch.Tensor:
        """Rows of a [T, K] (sorted by group, scale_inv [T, 1]) times b[g] [K, N] (scale_inv [G, 1, N]) for the
        rows of group g; `counts` [G] rows per group."""

    def grouped_wgrad(self, a: Quantized, b: Quantized, counts: torch.Tensor, out_dtype: torch.dtype
                      ) -> torch.Tensor:
        """[G, N, K]: for each group g, a_g^T @ b_g over its rows; a [T, N], b [T, K], scale_inv [G, N], [G, K]."""

    def require_grouped(self) -> None:
        """Raise `Fp8Unavailable` unless `grouped_mm` / `grouped_wgrad` run here."""


class _Fp8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, gemms: Fp8Gemms, recipe: Fp8Recipe) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        scale_x = current_scale(x2, E4M3, recipe.scaling, 1, recipe.amax_group)
        scale_w = current_scale(weight, E4M3, recipe.scaling, 1, recipe.amax_group)
        qx, qw = quantize_with_scale(x2, scale_x, E4M3), quantize_with_scale(weight, scale_w, E4M3)
        y = gemms.mm(qx, qw.t(), x.dtype, fast_accum=True)
        tensorwise = recipe.scaling == "tensorwise"
        ctx.save_for_backward(x, weight, scale_x if tensorwise else None, scale_w if tensorwise else None)
        ctx.gemms, ctx.recipe = gemms, recipe
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, weight, scale_x, scale_w = ctx.saved_tensors
        gemms, recipe = ctx.gemms, ctx.recipe
        dy = grad_y.reshape(-1, grad_y.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        tensorwise = recipe.scaling == "tensorwise"
        # Tensorwise: one dY scale serves both GEMMs.
        q_dy = to_fp8(dy, recipe.grad_dtype, recipe.scaling, 1, recipe.amax_group) if tensorwise else None
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            dy_rows = q_dy if tensorwise else to_fp8(dy, recipe.grad_dtype, "rowwise", 1)
            w_cols = quantize_with_scale(weight, scale_w, E4M3) if tensorwise else to_fp8(weight, E4M3, "rowwise", 0)
            grad_x = gemms.mm(dy_rows, w_cols, x.dtype, fast_accum=False).view_as(x)
        if ctx.needs_input_grad[1]:
            dy_cols = q_dy if tensorwise else to_fp8(dy, recipe.grad_dtype, "rowwise", 0)
            x_cols = quantize_with_scale(x2, scale_x, E4M3) if tensorwise else to_fp8(x2, E4M3, "rowwise", 0)
            grad_w = gemms.mm(dy_cols.t(), x_cols, weight.dtype, fast_accum=False)
        return grad_x, grad_w, None, None


class _Fp8GroupedLinear(torch.autograd.Function):
    """Y[rows of g] = X[rows of g] @ W[g]^T for stacked weights W [G, N, K]."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, gemms: Fp8Gemms) -> torch.Tensor:
        qx = to_fp8(x, E4M3, "rowwise", 1)
        qw = to_fp8(weight, E4M3, "rowwise", 2)
        ctx.save_for_backward(x, weight, counts)
        ctx.gemms = gemms
        return gemms.grouped_mm(qx, Quantized(qw.data.transpose(1, 2), qw.scale_inv.transpose(1, 2)), counts,
                                x.dtype, fast_accum=True)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, weight, counts = ctx.saved_tensors
        gemms = ctx.gemms
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = gemms.grouped_mm(to_fp8(grad_y, E4M3, "rowwise", 1), to_fp8(weight, E4M3, "rowwise", 1),
                                      counts, x.dtype, fast_accum=False)
        if ctx.needs_input_grad[1]:
            grad_w = gemms.grouped_wgrad(to_fp8_per_group_columns(grad_y, counts, E4M3),
                                         to_fp8_per_group_columns(x, counts, E4M3), counts, weight.dtype)
        return grad_x, grad_w, None, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, gemms: Fp8Gemms, recipe: Fp8Recipe) -> torch.Tensor:
    """x [..., K] @ weight [N, K]^T in FP8 (forward and backward); the result has x's dtype."""
    return _Fp8Linear.apply(x, weight, gemms, recipe)


def fp8_grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, gemms: Fp8Gemms
                       ) -> torch.Tensor:
    """x [T, K] sorted by group, weight [G, N, K], counts [G]: each group's rows times its weight^T, in FP8."""
    return _Fp8GroupedLinear.apply(x, weight, counts, gemms)


class Fp8Linear(nn.Linear):
    """An `nn.Linear` (same parameters and names) whose matmul runs in FP8. The precision pass sets the class of
    an existing `nn.Linear` to this one and adds `fp8_gemms` / `fp8_recipe`, so it works on meta modules and under
    the tensor-parallel hooks of the parent modules."""

    fp8_gemms: Fp8Gemms
    fp8_recipe: Fp8Recipe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fp8_linear(x, self.weight, self.fp8_gemms, self.fp8_recipe)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8={self.fp8_gemms.name}/{self.fp8_recipe.scaling}"


class Fp8GroupedExperts(GroupedExperts):
    """`GroupedExperts` with its three grouped matmuls in FP8 (rowwise E4M3)."""

    fp8_gemms: Fp8Gemms

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        gate = fp8_grouped_linear(x, self.gate_proj, counts, self.fp8_gemms)
        up = fp8_grouped_linear(x, self.up_proj, counts, self.fp8_gemms)
        return fp8_grouped_linear(torch.nn.functional.silu(gate) * up, self.down_proj, counts, self.fp8_gemms)

    def extra_repr(self) -> str:
        return f"fp8={self.fp8_gemms.name}/rowwise"


def convert_linear(module: nn.Linear, gemms: Fp8Gemms, recipe: Fp8Recipe) -> None:
    """Switch `module` (exactly `nn.Linear`) to FP8 compute in place; parameters are untouched."""
    if type(module) is not nn.Linear:
        raise TypeError(f"convert_linear expects a plain nn.Linear, got {type(module).__name__}.")
    module.__class__ = Fp8Linear
    module.fp8_gemms, module.fp8_recipe = gemms, recipe


_FP8_SUBCLASSES: dict[type, type] = {}


def convert_experts(module: GroupedExperts, gemms: Fp8Gemms) -> None:
    """Switch `module` (a `GroupedExperts`, or a subclass such as the expert-parallel dispatcher, whose forward
    ends in `GroupedExperts.forward`) to FP8 grouped matmuls in place; parameters are untouched."""
    if not isinstance(module, GroupedExperts):
        raise TypeError(f"convert_experts expects GroupedExperts, got {type(module).__name__}.")
    base = type(module)
    if base is not GroupedExperts and base not in _FP8_SUBCLASSES:
        # MRO: the subclass's forward (e.g. all-to-all dispatch) runs first, then Fp8GroupedExperts.forward.
        _FP8_SUBCLASSES[base] = type(f"Fp8{base.__name__}", (base, Fp8GroupedExperts), {})
    module.__class__ = Fp8GroupedExperts if base is GroupedExperts else _FP8_SUBCLASSES[base]
    module.fp8_gemms = gemms
