"""`precision=fp8_emulated`: FP8 *emulation* for tests, on any device (CPU included).

Operands are quantized exactly as the real backend quantizes them (`fp8_common`: current scaling,
saturation, E4M3/E5M2 casts), then dequantized and multiplied in fp64 and rounded to the output
dtype: a product of FP8 values is then the same however many rows a GEMM has (an fp32 matmul's
blocking, and so its rounding, depends on it), so a layout that splits tokens over ranks reproduces
the single-process FP8 model. It reproduces FP8's rounding and clipping but none of its speed, and
it does not model the GPU kernels' accumulation (fast accumulation, tile order). Its purpose is to
run every FP8 code path (scaling, autograd, the precision pass, composition with TP/SP and FSDP2) in
CPU CI.
"""

from __future__ import annotations

import torch

from megatron_exaone.model.moe import group_ids
from megatron_exaone.model.moe import grouped_mm as _grouped_mm

from .fp8_common import Quantized


class EmulatedGemms:
    """Scaled GEMMs as dequantize -> fp64 matmul. `fast_accum` has no emulated counterpart and is
    ignored."""

    name = "fp8_emulated"

    def mm(
        self, a: Quantized, b: Quantized, out_dtype: torch.dtype, fast_accum: bool
    ) -> torch.Tensor:
        return (a.dequantize().double() @ b.dequantize().double()).to(out_dtype)

    def grouped_mm(
        self,
        a: Quantized,
        b: Quantized,
        counts: torch.Tensor,
        out_dtype: torch.dtype,
        fast_accum: bool,
    ) -> torch.Tensor:
        return _grouped_mm(a.dequantize().double(), b.dequantize().double(), counts).to(out_dtype)

    def grouped_wgrad(
        self, a: Quantized, b: Quantized, counts: torch.Tensor, out_dtype: torch.dtype
    ) -> torch.Tensor:
        ids = group_ids(counts, a.data.shape[0])
        a_rows = (a.data.float() * a.scale_inv[ids]).double()
        b_rows = (b.data.float() * b.scale_inv[ids]).double()
        sizes = counts.tolist()
        return torch.stack(
            [pa.t() @ pb for pa, pb in zip(a_rows.split(sizes), b_rows.split(sizes))]
        ).to(out_dtype)

    def require_grouped(self) -> None:
        """Emulation runs the grouped GEMMs everywhere."""


def gemms_for(device_type: str) -> EmulatedGemms:
    """Emulation needs no FP8 hardware: available on every device."""
    return EmulatedGemms()
