"""`precision=fp8_torch`: torch-native FP8 GEMMs on CUDA (compute capability >= 8.9).

Dense linears: `torch._scaled_mm(a, b, scale_a, scale_b, out_dtype=..., use_fast_accum=...)`, a
row-major [M, K], b column-major [K, N], K and N multiples of 16 (the pass keeps other linears in
BF16; a contraction over tokens is zero-padded here), scales fp32: one element each (tensorwise) or
[M, 1] and [1, N] (rowwise). Routed experts: `torch._scaled_grouped_mm(a, b, scale_a, scale_b,
offs=..., out_dtype=torch.bfloat16, use_fast_accum=...)`, E4M3 operands only, scales per row of a
and per column of b (a per-expert scale is expanded to its columns), sm_90 in torch 2.11. Its
weight-gradient form (2-D x 2-D, contracting over each group's rows) needs every group's row count
to be a positive multiple of 16 (a device-side assert otherwise), so each expert's tokens are
zero-padded there. Scales passed to the kernels are inverse scales (the accumulator is multiplied by
them). Forward GEMMs use fast accumulation, gradient GEMMs do not (torchao's default).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from megatron_exaone.model.moe import group_ids

from .fp8_common import E4M3, Fp8Unavailable, Quantized

# Elements (FP8: bytes) the kernels need along K and N, and the rows per group of the FP8
# weight-gradient form (a row-major left operand there: the kernel asserts that each group's rows
# are a multiple of 16 bytes).
ALIGN = 16


def _column_major(t: torch.Tensor) -> torch.Tensor:
    """The same values with the last two dimensions stored column-major."""
    return t if t.stride(-2) == 1 else t.transpose(-2, -1).contiguous().transpose(-2, -1)


def _dense_scale(scale: torch.Tensor) -> torch.Tensor:
    """`scale` with row-major strides: the kernel checks the strides of [M, 1] / [1, N] scales, and
    a transposed [1, M] scale counts as contiguous without having them."""
    return scale.reshape(-1).reshape(scale.shape)


def pad_groups(
    tensors: list[torch.Tensor], counts: torch.Tensor, align: int = ALIGN
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each group of rows (sorted by group, `counts` [G]) zero-padded to a positive multiple of
    `align` rows (the kernel takes no empty group in this form), for every tensor [T, C_i]; returns
    the padded tensors and the padded counts. The padded row count is a static bound (no host sync):
    rows past the last group are zeros too, and zero rows add nothing to a product over rows."""
    rows = tensors[0].shape[0]
    padded = ((counts + align - 1) // align).clamp(min=1) * align
    capacity = -(-(rows + align * counts.numel()) // align) * align
    # padded start - packed start, per group
    shift = (padded.cumsum(0) - padded) - (counts.cumsum(0) - counts)
    dest = torch.arange(rows, device=counts.device) + shift[group_ids(counts, rows)]

    def spread(data: torch.Tensor) -> torch.Tensor:
        # FP8: index_copy_ works on bytes
        raw = data.view(torch.uint8) if data.element_size() == 1 else data
        out = raw.new_zeros((capacity, data.shape[1])).index_copy_(0, dest, raw)
        return out.view(data.dtype)

    return [spread(t) for t in tensors], padded


def _pad_last(t: torch.Tensor, extra: int) -> torch.Tensor:
    """Zero-pad the last dimension of an FP8 tensor (through a byte view: FP8 zero is byte 0)."""
    return F.pad(t.view(torch.uint8), (0, extra)).view(t.dtype)


class TorchGemms:
    """FP8 GEMMs on torch's scaled-matmul kernels."""

    name = "fp8_torch"

    def mm(
        self, a: Quantized, b: Quantized, out_dtype: torch.dtype, fast_accum: bool
    ) -> torch.Tensor:
        a_data, b_data = a.data, b.data
        extra = -a_data.shape[1] % ALIGN
        if extra:  # zero rows/columns along the contraction add nothing
            a_data, b_data = _pad_last(a_data, extra), _pad_last(b_data.t(), extra).t()
        return torch._scaled_mm(
            a_data.contiguous(),
            _column_major(b_data),
            _dense_scale(a.scale_inv),
            _dense_scale(b.scale_inv),
            out_dtype=out_dtype,
            use_fast_accum=fast_accum,
        )

    def grouped_mm(
        self,
        a: Quantized,
        b: Quantized,
        counts: torch.Tensor,
        out_dtype: torch.dtype,
        fast_accum: bool,
    ) -> torch.Tensor:
        rows, (groups, _, cols) = a.data.shape[0], b.data.shape
        if rows == 0:  # an expert-parallel rank that received no tokens
            return a.data.new_zeros((0, cols), dtype=out_dtype)
        # one per column
        scale_b = b.scale_inv.expand(groups, 1, cols).reshape(groups, cols).contiguous()
        out = torch._scaled_grouped_mm(
            a.data.contiguous(),
            _column_major(b.data),
            a.scale_inv.reshape(rows),
            scale_b,
            offs=counts.cumsum(0).to(torch.int32),
            out_dtype=torch.bfloat16,
            use_fast_accum=fast_accum,
        )
        return out.to(out_dtype)

    def grouped_wgrad(
        self, a: Quantized, b: Quantized, counts: torch.Tensor, out_dtype: torch.dtype
    ) -> torch.Tensor:
        rows, groups = a.data.shape[0], counts.numel()
        if rows == 0:
            return a.data.new_zeros((groups, a.data.shape[1], b.data.shape[1]), dtype=out_dtype)
        (a_rows, b_rows), padded = pad_groups([a.data, b.data], counts)
        out = torch._scaled_grouped_mm(
            a_rows.t().contiguous(),
            _column_major(b_rows),
            a.scale_inv.reshape(-1).contiguous(),
            b.scale_inv.reshape(-1).contiguous(),
            offs=padded.cumsum(0).to(torch.int32),
            out_dtype=torch.bfloat16,
            use_fast_accum=False,
        )
        return out.to(out_dtype)

    def require_grouped(self) -> None:
        if not grouped_supported():
            raise Fp8Unavailable(
                "precision=fp8_torch: the routed experts need torch._scaled_grouped_mm, which "
                f"this torch build or GPU ({torch.cuda.get_device_name()}, "
                f"sm_{''.join(map(str, torch.cuda.get_device_capability()))}) cannot run (torch "
                "2.11 runs it on sm_90). Keep the experts in BF16 explicitly "
                "(precision.fp8_experts=false), or use precision=bf16."
            )


@functools.cache
def grouped_supported() -> bool:
    """Whether `torch._scaled_grouped_mm` runs on the current CUDA device (one tiny aligned call,
    cached)."""
    if not hasattr(torch, "_scaled_grouped_mm"):
        return False
    try:
        x = torch.ones(32, 16, device="cuda").to(E4M3)
        w = torch.ones(2, 16, 16, device="cuda").to(E4M3)
        offs = torch.tensor([16, 32], device="cuda", dtype=torch.int32)
        out = torch._scaled_grouped_mm(
            x,
            w.transpose(1, 2),
            torch.ones(32, device="cuda"),
            torch.ones(2, 16, device="cuda"),
            offs=offs,
            out_dtype=torch.bfloat16,
        )
        return bool((out == 16).all())
    except (RuntimeError, NotImplementedError):
        return False


def gemms_for(device_type: str) -> TorchGemms:
    """The backend, after checking that this process can run it (mirrors
    `registry.validate_precision`, which rejects the same cases before any process group starts)."""
    if device_type != "cuda":
        raise Fp8Unavailable(
            f"precision=fp8_torch runs torch._scaled_mm on a CUDA GPU, but this model is built for "
            f"{device_type}; use precision=fp8_emulated (tests) or bf16."
        )
    if not torch.cuda.is_available():
        raise Fp8Unavailable("precision=fp8_torch needs a CUDA GPU, but torch sees none.")
    capability = torch.cuda.get_device_capability()
    if capability < (8, 9):
        raise Fp8Unavailable(
            f"precision=fp8_torch needs CUDA compute capability 8.9 or newer, but "
            f"{torch.cuda.get_device_name()} is {capability[0]}.{capability[1]}; use bf16."
        )
    return TorchGemms()
