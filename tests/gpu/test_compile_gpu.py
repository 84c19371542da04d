"""The GPU paths that the CPU suite cannot run: the loss's fused (inductor) softmax kernels with the
fp32-output weight-gradient GEMM, and BF16 decoder layers compiled with `parallel.compile`
(grouped_mm traced)."""

import pytest
import torch

from megatron_exaone.model import build_model, cross_entropy, linear_cross_entropy, tiny
from megatron_exaone.model.mtp import shift_left
from megatron_exaone.parallel.compile import apply_compile

pytestmark = pytest.mark.gpu


def assert_near(got: torch.Tensor, want: torch.Tensor, rel: float, what: str) -> None:
    err = (got.float() - want.float()).abs().max().item()
    scale = want.float().abs().max().item()
    assert err <= rel * scale, f"{what}: max error {err:.3g} vs max magnitude {scale:.3g}"


def test_bf16_linear_cross_entropy_matches_fp32_reference():
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(2, 300, 256, device="cuda", generator=gen).bfloat16().requires_grad_()
    weight = (
        (0.1 * torch.randn(5000, 256, device="cuda", generator=gen)).bfloat16().requires_grad_()
    )
    labels = torch.randint(0, 5000, (2, 300), device="cuda", generator=gen)
    labels[0, :50] = -100
    # five chunks, the last one partial
    got = linear_cross_entropy(hidden, weight, labels, chunk_size=128)
    grads = torch.autograd.grad(got, (hidden, weight))
    ref_hidden, ref_weight = (
        hidden.float().detach().requires_grad_(),
        weight.float().detach().requires_grad_(),
    )
    want = cross_entropy(ref_hidden @ ref_weight.T, labels)
    want_grads = torch.autograd.grad(want, (ref_hidden, ref_weight))
    assert abs(got.item() - want.item()) < 2e-3 * want.item()
    for g, w, name in zip(grads, want_grads, ("hidden", "weight")):
        assert g.dtype == torch.bfloat16
        assert_near(g, w, 1e-2, name)


def rel_norm(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def test_compiled_bf16_layers_as_accurate_as_eager_bf16():
    """Against the fp32 model, compiled BF16 layers are as accurate as eager BF16 ones. (BF16
    rounding flips near-tied routing choices, so BF16 MoE gradients of this tiny model differ from
    fp32 by several percent either way: the two BF16 runs are compared by their distance to fp32,
    not to each other.)"""
    config = tiny(vocab_size=512, aux_loss_coeff=0.01)
    reference = build_model(config, seed=0, device="cuda")
    eager, compiled = (build_model(config, seed=0, device="cuda").bfloat16() for _ in range(2))
    apply_compile(compiled)
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randint(0, config.vocab_size, (4, 128), device="cuda", generator=gen)
    labels = shift_left(x, 1, -100)
    losses = []
    for model in (reference, eager, compiled):
        out = model(x, labels=labels, return_logits=False)
        out.loss.backward()
        losses.append(out.loss.item())
    assert abs(losses[2] - losses[0]) <= 2 * abs(losses[1] - losses[0]) + 1e-3 * losses[0], losses
    worse = []
    for (name, ref), a, b in zip(
        reference.named_parameters(), eager.parameters(), compiled.parameters()
    ):
        eager_error, compiled_error = rel_norm(a.grad, ref.grad), rel_norm(b.grad, ref.grad)
        if compiled_error > 2 * eager_error + 0.03:
            worse.append(f"{name}: compiled {compiled_error:.3g} vs eager {eager_error:.3g}")
    assert not worse, worse
