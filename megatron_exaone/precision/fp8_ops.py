"""FP8 linear and grouped-expert compute: autograd functions over a backend's scaled GEMMs, and the
module classes the precision pass swaps in.

Every GEMM of forward and backward runs in FP8 (as torchao's float8 training): for Y = X W^T,
  forward  Y  = X  @ W^T   X, W in E4M3
  dgrad    dX = dY @ W     dY in the recipe's gradient format (E5M2 "hybrid" or E4M3)
  wgrad    dW = dY^T @ X
Each operand is quantized along the axis its GEMM contracts: with rowwise scaling X and dY are
re-quantized from the saved high-precision tensors in backward (the scales run along the other axis
there); tensorwise scales do not depend on the axis, so X, W and dY are each cast once into both
the row-major and the column-major layout their GEMMs take (`fp8_common.to_fp8_both_layouts`, one
cast-transpose kernel on CUDA), and forward's are saved for backward (no second amax, cast,
all-reduce or transpose).

Routed experts run in E4M3 on `torch._scaled_grouped_mm`, whose scales are per row of X (per token:
they do not depend on how tokens are spread over ranks) and per output column of W, given here as
one scale per expert, so the input gradient reuses forward's scale on W^T. Forward and input
gradient run in FP8; the weight gradient contracts over each expert's tokens, so in FP8
(`fp8_expert_wgrad`) it needs per-(expert, column) scales and each expert's tokens padded to 16
rows; by default it runs as BF16 grouped GEMMs instead.

With `fp8_cache_weights` (precision.fp8_weight_cache) a module quantizes its weights once per
optimizer step, on its first forward after `mark_fp8_weights_stale`, and reuses those FP8 operands
(the backward's too) for the step's other micro-batches, as Transformer Engine does with
`is_first_microbatch`; the values are the same as quantizing them again, for 2 bytes per weight
element held through the step.

A block whose input projections all run in FP8 with one recipe (attention's q, k and v; a SwiGLU
MLP's gate and up) runs them as one GEMM over their weights concatenated along N
(`Fp8FusedInputs`, precision.fp8_fuse_inputs): x is quantized once, and the GEMM is wider (k and v
alone are 256 columns per rank in K-EXAONE at TP4). The parameters stay separate; under tensorwise
scaling the concatenated weight takes one scale, as a fused QKV weight does in Megatron-LM.

With precision.fp8_lm_head the output head (`Fp8Head`) computes its logits and, in the fused loss,
the hidden-state gradient in FP8 too (`Fp8HeadGemms`); its weight gradient stays in high precision.
The loss's logit gradient softmax - onehot lies in [-1, 1], so tensorwise it is quantized with the
static scale fp8_max (no amax pass, no reduction over the vocabulary shards), and rowwise with each
row's amax, in the same fused kernel that computes the gradient (`_logit_grads_fp8`).

A backend (`Fp8Gemms`) only supplies the GEMMs: `fp8_torch.TorchGemms` (scaled matmul kernels) or
`fp8_emulated.EmulatedGemms` (dequantize, then fp64 matmul); quantization is the same code for both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import nn

from megatron_exaone.model.attention import Attention
from megatron_exaone.model.fused import fused
from megatron_exaone.model.loss import ComputesHeadGemms, HeadGemms, logit_grads
from megatron_exaone.model.mlp import SwiGLUMLP
from megatron_exaone.model.moe import GroupedExperts, grouped_wgrad

from .fp8_common import (
    E4M3,
    FP8_MAX,
    Fp8Recipe,
    Quantized,
    current_scale,
    per_group_scale,
    quantize,
    quantize_with_scale,
    to_fp8,
    to_fp8_both_layouts,
    to_fp8_per_group_columns,
)


class Fp8Gemms(Protocol):
    """The scaled GEMMs of one backend. Operands are `Quantized`; results come back in
    `out_dtype`."""

    name: str

    def mm(
        self, a: Quantized, b: Quantized, out_dtype: torch.dtype, fast_accum: bool
    ) -> torch.Tensor:
        """a [M, K] @ b [K, N]; scale_inv [] (tensorwise) or a: [M, 1], b: [1, N] (rowwise)."""

    def grouped_mm(
        self,
        a: Quantized,
        b: Quantized,
        counts: torch.Tensor,
        out_dtype: torch.dtype,
        fast_accum: bool,
    ) -> torch.Tensor:
        """Rows of a [T, K] (sorted by group, scale_inv [T, 1]) times b[g] [K, N] (scale_inv [G, 1,
        N] per column, or [G, 1, 1] per group) for the rows of group g; `counts` [G] rows per
        group."""

    def grouped_wgrad(
        self, a: Quantized, b: Quantized, counts: torch.Tensor, out_dtype: torch.dtype
    ) -> torch.Tensor:
        """[G, N, K]: for each group g, a_g^T @ b_g over its rows; a [T, N], b [T, K], scale_inv [G,
        N], [G, K]."""

    def require_grouped(self) -> None:
        """Raise `Fp8Unavailable` unless `grouped_mm` / `grouped_wgrad` run here."""


def linear_weight_operands(weight: torch.Tensor, recipe: Fp8Recipe) -> tuple[torch.Tensor, ...]:
    """A linear weight's [N, K] FP8 operands, made once and used for several GEMMs: (data,
    scale_inv) quantized along K for forward, then along N for the input gradient (the same values
    under tensorwise scaling), stored column-major: the layout that GEMM's right operand needs, so
    the kernels do not transpose it at each use."""
    with torch.no_grad():
        if recipe.scaling == "tensorwise":
            rows, cols = to_fp8_both_layouts(weight, E4M3, recipe.amax_group)
        else:
            rows, cols = to_fp8(weight, E4M3, "rowwise", 1), to_fp8(weight, E4M3, "rowwise", 0)
            cols = Quantized(cols.data.t().contiguous().t(), cols.scale_inv)
    return rows.data, rows.scale_inv, cols.data, cols.scale_inv


class _Fp8Linear(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        weight: torch.Tensor,
        gemms: Fp8Gemms,
        recipe: Fp8Recipe,
        cached: tuple[torch.Tensor, ...] | None,
    ) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        tensorwise = recipe.scaling == "tensorwise"
        if tensorwise:
            # A tensorwise scale does not depend on the GEMM's axis, so the backward GEMMs reuse
            # forward's FP8 operands, each cast once in both layouts (`to_fp8_both_layouts`): no
            # second amax, cast or transpose, and X is saved at half its BF16 size, in the
            # column-major layout the weight gradient's GEMM takes.
            qx, x_cols = to_fp8_both_layouts(x2, E4M3, recipe.amax_group)
        else:
            qx = to_fp8(x2, E4M3, "rowwise", 1)
        if cached is not None:  # linear_weight_operands, made on the step's first micro-batch
            qw, w_cols = Quantized(cached[0], cached[1]), Quantized(cached[2], cached[3])
        elif tensorwise:
            qw, w_cols = to_fp8_both_layouts(weight, E4M3, recipe.amax_group)
        else:
            qw, w_cols = to_fp8(weight, E4M3, "rowwise", 1), None
        y = gemms.mm(qx, qw.t(), x.dtype, fast_accum=True)
        if tensorwise:
            ctx.save_for_backward(x_cols.data, x_cols.scale_inv, w_cols.data, w_cols.scale_inv)
        elif w_cols is None:
            ctx.save_for_backward(x2, weight)
        else:
            ctx.save_for_backward(x2, w_cols.data, w_cols.scale_inv)
        ctx.gemms, ctx.recipe = gemms, recipe
        ctx.x_shape, ctx.x_dtype, ctx.weight_dtype = x.shape, x.dtype, weight.dtype
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        gemms, recipe = ctx.gemms, ctx.recipe
        dy = grad_y.reshape(-1, grad_y.shape[-1])
        if recipe.scaling == "tensorwise":  # one dY scale serves both GEMMs
            x_data, x_scale_inv, w_data, w_scale_inv = ctx.saved_tensors
            x_cols, w_cols = Quantized(x_data, x_scale_inv), Quantized(w_data, w_scale_inv)
            dy_rows, dy_cols = to_fp8_both_layouts(dy, recipe.grad_dtype, recipe.amax_group)
        # rowwise scales run along the other axis in backward: re-quantize from high precision
        else:
            x2, *w_saved = ctx.saved_tensors
            dy_rows = (
                to_fp8(dy, recipe.grad_dtype, "rowwise", 1) if ctx.needs_input_grad[0] else None
            )
            w_cols = None
            if ctx.needs_input_grad[0]:
                w_cols = (
                    to_fp8(w_saved[0], E4M3, "rowwise", 0)
                    if len(w_saved) == 1
                    else Quantized(*w_saved)
                )
            dy_cols = (
                to_fp8(dy, recipe.grad_dtype, "rowwise", 0) if ctx.needs_input_grad[1] else None
            )
            x_cols = to_fp8(x2, E4M3, "rowwise", 0) if ctx.needs_input_grad[1] else None
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = gemms.mm(dy_rows, w_cols, ctx.x_dtype, fast_accum=False).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            grad_w = gemms.mm(dy_cols.t(), x_cols, ctx.weight_dtype, fast_accum=False)
        return grad_x, grad_w, None, None, None


def grouped_weight_operands(weights: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Stacked expert weights' FP8 operands for one optimizer step: the forward operand (the weights
    concatenated along N, quantized), their per-expert scale [G, 1, 1], then each weight's transpose
    [G, K, N_i] quantized with that scale for the input gradient."""
    with torch.no_grad():
        qw_data, scale_w = _forward_operand(weights)
        return qw_data, scale_w, *(_transposed(w, scale_w) for w in weights)


def _forward_operand(weights: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights concatenated along N and quantized with one scale per expert: (FP8 data, scale
    [G, 1, 1])."""
    weight = torch.cat(tuple(weights), dim=1) if len(weights) > 1 else weights[0]
    scale_w = per_group_scale(weight, E4M3)
    return quantize(weight, scale_w, E4M3), scale_w


def _transposed(weight: torch.Tensor, scale_w: torch.Tensor) -> torch.Tensor:
    """W^T [G, K, N] in FP8 with forward's per-expert scale, contiguous: the K-major layout of the
    input-gradient GEMM. Cast per weight: cast from the concatenated gate and up weights,
    torch.compile made that one badly tiled kernel (26 ms at K-EXAONE size on an H100, against 1.6
    ms for down_proj alone)."""
    return quantize(weight.transpose(1, 2), scale_w, E4M3).contiguous()


class _Fp8GroupedLinear(torch.autograd.Function):
    """Y[rows of g] = X[rows of g] @ W[g]^T, W [G, N, K] the given weights stacked along N (gate and
    up projections share one GEMM, so X is quantized once). X and dY are scaled per row (token), W
    per expert: forward keeps only the [G] scales, and backward casts each W^T straight into the
    K-major layout its GEMM needs with them (the same FP8 values as forward's, without a second amax
    or a copy of FP8 weights). Backward runs one GEMM per weight: input-gradient terms are summed,
    and each weight gradient (FP8 with `fp8_wgrad`, else BF16) is contiguous, as its parameter. The
    weights are inputs of this node themselves (not a concatenation made outside), which the
    zero-bubble schedules' weight-gradient split relies on."""

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        counts: torch.Tensor,
        gemms: Fp8Gemms,
        fp8_wgrad: bool,
        cached: tuple[torch.Tensor, ...] | None,
        *weights: torch.Tensor,
    ) -> torch.Tensor:
        if cached is None:
            (qw_data, scale_w), transposed = _forward_operand(weights), ()
        else:  # grouped_weight_operands, made on the step's first micro-batch
            qw_data, scale_w, *transposed = cached
        ctx.save_for_backward(x, counts, scale_w, *transposed, *weights)
        ctx.gemms, ctx.fp8_wgrad, ctx.cached, ctx.n_weights = (
            gemms,
            fp8_wgrad,
            cached is not None,
            len(weights),
        )
        return gemms.grouped_mm(
            to_fp8(x, E4M3, "rowwise", 1),
            Quantized(qw_data.transpose(1, 2), scale_w.reciprocal()),
            counts,
            x.dtype,
            fast_accum=True,
        )

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, counts, scale_w, *saved = ctx.saved_tensors
        # no transposed ones unless cached
        transposed, weights = saved[: -ctx.n_weights], saved[-ctx.n_weights :]
        gemms = ctx.gemms
        grad_parts = grad_y.split([w.shape[1] for w in weights], dim=1)
        grad_x = None
        grad_ws = [None] * len(weights)
        if ctx.needs_input_grad[0]:
            # One GEMM per weight (see `_transposed`), summed.
            for i, (part, weight) in enumerate(zip(grad_parts, weights)):
                w_t = transposed[i] if ctx.cached else _transposed(weight, scale_w)  # [G, K, N_i]
                term = gemms.grouped_mm(
                    to_fp8(part, E4M3, "rowwise", 1),
                    Quantized(w_t.transpose(1, 2), scale_w.reciprocal()),
                    counts,
                    x.dtype,
                    fast_accum=False,
                )
                grad_x = term if grad_x is None else grad_x + term
        if any(ctx.needs_input_grad[5:]):
            if ctx.fp8_wgrad:
                qx = to_fp8_per_group_columns(x, counts, E4M3)
                grad_ws = [
                    gemms.grouped_wgrad(
                        to_fp8_per_group_columns(part, counts, E4M3), qx, counts, w.dtype
                    )
                    for part, w in zip(grad_parts, weights)
                ]
            else:
                grad_ws = [
                    grouped_wgrad(part, x, counts).to(w.dtype)
                    for part, w in zip(grad_parts, weights)
                ]
        return grad_x, None, None, None, None, *grad_ws


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    gemms: Fp8Gemms,
    recipe: Fp8Recipe,
    cached: tuple[torch.Tensor, ...] | None = None,
) -> torch.Tensor:
    """x [..., K] @ weight [N, K]^T in FP8 (forward and backward); the result has x's dtype.
    `cached`: the weight's `linear_weight_operands` for this optimizer step (else it is quantized
    now)."""
    return _Fp8Linear.apply(x, weight, gemms, recipe, cached)


def fp8_grouped_linear(
    x: torch.Tensor,
    weight: torch.Tensor | Sequence[torch.Tensor],
    counts: torch.Tensor,
    gemms: Fp8Gemms,
    fp8_wgrad: bool = True,
    cached: tuple[torch.Tensor, ...] | None = None,
) -> torch.Tensor:
    """x [T, K] sorted by group, weight [G, N, K] (or several, stacked along N), counts [G]: each
    group's rows times its weight^T, in FP8 (the weight gradient too with `fp8_wgrad`, else in
    BF16). `cached`: the weights' `grouped_weight_operands` for this optimizer step (else they are
    quantized now)."""
    weights = (weight,) if isinstance(weight, torch.Tensor) else tuple(weight)
    return _Fp8GroupedLinear.apply(x, counts, gemms, fp8_wgrad, cached, *weights)


class CachesFp8Weights:
    """Mixin of the FP8 modules: with `fp8_cache_weights`, the weights' FP8 operands are made on the
    first forward after `mark_fp8_weights_stale` and kept (`fp8_weight_cache`) for the forwards that
    follow, until the next mark. The trainer marks every module at the start of each optimizer step.
    Compiled code specializes on `fp8_weights_stale`: one graph for the first micro-batch, one for
    the others."""

    fp8_cache_weights: bool = False
    fp8_weights_stale: bool = True
    fp8_weight_cache: tuple | None = None

    def _fp8_operands(self, make: Callable[[], tuple]) -> tuple | None:
        if not self.fp8_cache_weights:
            return None
        if self.fp8_weights_stale:
            self.fp8_weight_cache = make()
            self.fp8_weights_stale = False
        return self.fp8_weight_cache


def mark_fp8_weights_stale(root: nn.Module) -> None:
    """Make every FP8 module under `root` that caches its FP8 weights quantize them again on its
    next forward: call it whenever the weights may have changed (each optimizer step, a checkpoint
    load)."""
    for module in root.modules():
        if isinstance(module, CachesFp8Weights) and module.fp8_cache_weights:
            module.fp8_weights_stale = True


class Fp8Linear(nn.Linear, CachesFp8Weights):
    """An `nn.Linear` (same parameters and names) whose matmul runs in FP8. The precision pass sets
    the class of an existing `nn.Linear` to this one and adds `fp8_gemms` / `fp8_recipe`, so it
    works on meta modules and under the tensor-parallel hooks of the parent modules."""

    fp8_gemms: Fp8Gemms
    fp8_recipe: Fp8Recipe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cached = self._fp8_operands(lambda: linear_weight_operands(self.weight, self.fp8_recipe))
        y = fp8_linear(x, self.weight, self.fp8_gemms, self.fp8_recipe, cached)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8={self.fp8_gemms.name}/{self.fp8_recipe.scaling}"


# The input projections of a block, in its `input_projections` order.
INPUT_PROJECTIONS: dict[type, tuple[str, ...]] = {
    Attention: ("q_proj", "k_proj", "v_proj"),
    SwiGLUMLP: ("gate_proj", "up_proj"),
}


class Fp8FusedInputs(CachesFp8Weights):
    """Mixin that `fuse_inputs` puts in front of an attention or MLP block's class: its input
    projections (`fp8_inputs`, all `Fp8Linear`s of one recipe) run as one FP8 GEMM over their
    weights concatenated along N; the outputs are views of its result."""

    fp8_inputs: tuple[str, ...]

    def input_projections(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        linears = [getattr(self, name) for name in self.fp8_inputs]
        first: Fp8Linear = linears[0]
        weight = torch.cat([linear.weight for linear in linears])
        cached = self._fp8_operands(lambda: linear_weight_operands(weight, first.fp8_recipe))
        y = fp8_linear(x, weight, first.fp8_gemms, first.fp8_recipe, cached)
        return y.split([linear.weight.shape[0] for linear in linears], dim=-1)


def fuse_inputs(block: nn.Module) -> bool:
    """Switch `block` (an attention or SwiGLU MLP block) to `Fp8FusedInputs` in place when all its
    input projections are bias-free `Fp8Linear`s of one backend and recipe; returns whether it
    did."""
    base = next((b for b in INPUT_PROJECTIONS if isinstance(block, b)), None)
    if base is None or isinstance(block, Fp8FusedInputs):
        return False
    linears = [getattr(block, name) for name in INPUT_PROJECTIONS[base]]
    if not all(type(m) is Fp8Linear and m.bias is None for m in linears):
        return False
    if len({(m.fp8_gemms.name, m.fp8_recipe, m.fp8_cache_weights) for m in linears}) != 1:
        return False
    cls = type(block)
    block.__class__ = _fp8_class(cls, (Fp8FusedInputs, cls))
    block.fp8_inputs = INPUT_PROJECTIONS[base]
    block.fp8_cache_weights = linears[0].fp8_cache_weights
    return True


class Fp8GroupedExperts(GroupedExperts, CachesFp8Weights):
    """`GroupedExperts` with its grouped matmuls in FP8 (E4M3; tokens scaled per row, weights per
    expert): forward and input gradient always, the weight gradient when `fp8_wgrad` (it contracts
    over each expert's tokens, so it needs per-(expert, column) scales and token groups padded to 16
    rows; otherwise it runs in BF16)."""

    fp8_gemms: Fp8Gemms
    fp8_wgrad: bool

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        gemms, fp8_wgrad = self.fp8_gemms, self.fp8_wgrad
        cached = self._fp8_operands(
            lambda: (
                grouped_weight_operands((self.gate_proj, self.up_proj)),
                grouped_weight_operands((self.down_proj,)),
            )
        )
        gate_up_cached, down_cached = cached or (None, None)
        gate_up = fp8_grouped_linear(
            x, (self.gate_proj, self.up_proj), counts, gemms, fp8_wgrad, gate_up_cached
        )
        gate, up = gate_up.chunk(2, dim=-1)
        return fp8_grouped_linear(
            torch.nn.functional.silu(gate) * up,
            self.down_proj,
            counts,
            gemms,
            fp8_wgrad,
            down_cached,
        )

    def extra_repr(self) -> str:
        wgrad = "FP8" if self.fp8_wgrad else "BF16"
        return f"fp8={self.fp8_gemms.name}/rowwise, weight gradient in {wgrad}"


class Fp8HeadGemms(HeadGemms):
    """The output head's logits and the fused loss's hidden-state gradient in FP8
    (precision.fp8_lm_head), scaled as the dense linears (`_Fp8Linear`): hidden states and the
    weight in E4M3, logit gradients in the recipe's gradient format (`_logit_grads_fp8`). The
    weight's operands (`linear_weight_operands`) are made once per loss call, or per optimizer step
    with the cache. The weight gradient stays in high precision (`model.loss`): it accumulates over
    the loss's chunks into fp32, which a BF16 GEMM does in place, while a scaled FP8 GEMM cannot add
    into its output; the fp32 [V, H] temporary and the add it would need per chunk move about as
    many bytes as the FP8 GEMM saves time (K-EXAONE at TP4: 0.9 GB written, 2.8 GB added, per 3456
    tokens)."""

    def __init__(
        self,
        weight: torch.Tensor,
        gemms: Fp8Gemms,
        recipe: Fp8Recipe,
        operands: tuple[torch.Tensor, ...],
    ) -> None:
        super().__init__(weight)
        self.gemms, self.recipe, self.operands = gemms, recipe, operands

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # The autograd function, so that logits taken outside the fused loss (evaluation, unfused
        # CE) train too.
        return fp8_linear(hidden, self.weight, self.gemms, self.recipe, self.operands)

    def logit_grads(
        self,
        logits: torch.Tensor,
        lse: torch.Tensor,
        targets: torch.Tensor,
        is_target: torch.Tensor,
        valid: torch.Tensor,
    ) -> tuple[torch.Tensor, Quantized]:
        """(the logit gradients in the logits' dtype, for the weight gradient; the same quantized
        for the hidden-state gradient's GEMM), from one fused kernel."""
        dtype, rowwise = self.recipe.grad_dtype, self.recipe.scaling == "rowwise"
        high, data, scale_inv = fused(_logit_grads_fp8, logits)(
            logits, lse, targets, is_target, valid, dtype, rowwise
        )
        return high, Quantized(data, scale_inv)

    def grad_hidden(self, grad_logits: tuple[torch.Tensor, Quantized], out: torch.Tensor) -> None:
        weight = Quantized(self.operands[2], self.operands[3])
        out.copy_(self.gemms.mm(grad_logits[1], weight, out.dtype, fast_accum=False))

    def add_grad_weight(
        self, acc: torch.Tensor, grad_logits: tuple[torch.Tensor, Quantized], hidden: torch.Tensor
    ) -> None:
        super().add_grad_weight(acc, grad_logits[0], hidden)


def _logit_grads_fp8(
    logits: torch.Tensor,
    lse: torch.Tensor,
    targets: torch.Tensor,
    is_target: torch.Tensor,
    valid: torch.Tensor,
    dtype: torch.dtype,
    rowwise: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss's logit gradients (`model.loss.logit_grads`) in the logits' dtype and quantized to
    `dtype` from fp32: rowwise with each row's amax; tensorwise with the static scale fp8_max, since
    softmax - onehot lies in [-1, 1] (the amax a current scaling would find is at most 1, and close
    to it while any target is uncertain). Returns (gradients, FP8 data, inverse scale)."""
    grads = logit_grads(logits, lse, targets, is_target, valid, torch.float32)
    if rowwise:
        scale = current_scale(grads, dtype, "rowwise", 1)
    else:
        scale = torch.full((), FP8_MAX[dtype], device=grads.device)
    q = quantize_with_scale(grads, scale, dtype)
    return grads.to(logits.dtype), q.data, q.scale_inv


class Fp8Head(CachesFp8Weights):
    """Mixin that `convert_head` puts in front of an output head's class (`model.loss.OutputHead`,
    the vocabulary-parallel head): its logits and loss run on `Fp8HeadGemms`."""

    fp8_gemms: Fp8Gemms
    fp8_recipe: Fp8Recipe
    weight: torch.Tensor

    def head_gemms(self) -> Fp8HeadGemms:
        def make() -> tuple[torch.Tensor, ...]:
            return linear_weight_operands(self.weight, self.fp8_recipe)

        return Fp8HeadGemms(
            self.weight, self.fp8_gemms, self.fp8_recipe, self._fp8_operands(make) or make()
        )


def convert_linear(
    module: nn.Linear, gemms: Fp8Gemms, recipe: Fp8Recipe, cache_weights: bool = False
) -> None:
    """Switch `module` (exactly `nn.Linear`) to FP8 compute in place; parameters are untouched.
    `cache_weights`: see `CachesFp8Weights`."""
    if type(module) is not nn.Linear:
        raise TypeError(f"convert_linear expects a plain nn.Linear, got {type(module).__name__}.")
    module.__class__ = Fp8Linear
    module.fp8_gemms, module.fp8_recipe, module.fp8_cache_weights = gemms, recipe, cache_weights


_FP8_SUBCLASSES: dict[type, type] = {}


def _fp8_class(base: type, bases: tuple[type, ...]) -> type:
    """The FP8 class of modules of class `base`: `bases` (`base` and an FP8 class, in
    method-resolution order), made once per base."""
    if base not in _FP8_SUBCLASSES:
        _FP8_SUBCLASSES[base] = type(f"Fp8{base.__name__}", bases, {})
    return _FP8_SUBCLASSES[base]


def convert_head(
    module: nn.Module, gemms: Fp8Gemms, recipe: Fp8Recipe, cache_weights: bool = False
) -> None:
    """Switch an output head (`model.loss.ComputesHeadGemms`) to FP8 logits and hidden-state
    gradient in place; parameters are untouched. `cache_weights`: see `CachesFp8Weights`."""
    if not isinstance(module, ComputesHeadGemms):
        raise TypeError(f"convert_head expects an output head, got {type(module).__name__}.")
    module.__class__ = _fp8_class(type(module), (Fp8Head, type(module)))
    module.fp8_gemms, module.fp8_recipe, module.fp8_cache_weights = gemms, recipe, cache_weights


def convert_experts(
    module: GroupedExperts, gemms: Fp8Gemms, fp8_wgrad: bool = False, cache_weights: bool = False
) -> None:
    """Switch `module` (a `GroupedExperts`, or a subclass such as the expert-parallel dispatcher,
    whose forward ends in `GroupedExperts.forward`) to FP8 grouped matmuls in place; parameters are
    untouched. `cache_weights`: see `CachesFp8Weights`."""
    if not isinstance(module, GroupedExperts):
        raise TypeError(f"convert_experts expects GroupedExperts, got {type(module).__name__}.")
    base = type(module)
    # MRO of a subclass: its forward (e.g. all-to-all dispatch) runs first, then
    # Fp8GroupedExperts.forward.
    module.__class__ = (
        Fp8GroupedExperts if base is GroupedExperts else _fp8_class(base, (base, Fp8GroupedExperts))
    )
    module.fp8_gemms, module.fp8_wgrad, module.fp8_cache_weights = gemms, fp8_wgrad, cache_weights
