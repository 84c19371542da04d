"""The routed experts' BF16 grouped GEMMs on a CUDA GPU against the per-expert loop: the
weight-gradient form (ragged K) takes groups of any size, an empty one included, without padding,
and a column slice of a wider gradient (gate or up of the stacked gate_up output)."""

import pytest
import torch

from megatron_exaone.model.moe import _loop_wgrad, grouped_mm_usable, grouped_wgrad

pytestmark = pytest.mark.gpu
DEVICE = "cuda"


def test_grouped_weight_gradient_takes_unaligned_and_empty_groups():
    if not grouped_mm_usable(DEVICE, torch.bfloat16):
        pytest.skip("torch._grouped_mm does not run on this GPU / torch build")
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    counts = torch.tensor([37, 0, 5, 130, 1, 64], device=DEVICE)
    rows = int(counts.sum())
    grad = torch.randn(rows, 2 * 96, device=DEVICE, generator=gen).bfloat16()
    x = torch.randn(rows, 128, device=DEVICE, generator=gen).bfloat16()
    for part in grad.split(96, dim=1):
        got = grouped_wgrad(part, x, counts)
        want = _loop_wgrad(part.float(), x.float(), counts)
        assert got.shape == (6, 96, 128) and got.is_contiguous()
        torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)
        assert (got[1] == 0).all()
