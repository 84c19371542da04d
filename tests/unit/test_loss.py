import pytest
import torch

from megatron_exaone.model import build_model, cross_entropy, linear_cross_entropy, tiny
from megatron_exaone.model.mtp import shift_left


@pytest.mark.parametrize("chunk", [7, 1024])
def test_linear_cross_entropy_matches_full_logits(chunk):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 11, 16, generator=gen, requires_grad=True)
    weight = torch.randn(50, 16, generator=gen, requires_grad=True)
    labels = torch.randint(0, 50, (3, 11), generator=gen)
    labels[0, :4] = -100
    want = cross_entropy(hidden @ weight.T, labels)
    got = linear_cross_entropy(hidden, weight, labels, chunk_size=chunk)
    torch.testing.assert_close(got, want)
    gw = torch.autograd.grad(want * 3, (hidden, weight))
    gg = torch.autograd.grad(got * 3, (hidden, weight))
    for a, b in zip(gg, gw):
        torch.testing.assert_close(a, b)


def test_training_path_equals_logits_path():
    model = build_model(tiny(vocab_size=120), seed=2)
    x = torch.randint(1, 120, (2, 30))
    labels = shift_left(x, 1, -100)
    full = model(x, labels=labels)
    fused = model(x, labels=labels, return_logits=False)
    assert fused.logits is None
    for name in ("loss", "lm_loss", "mtp_loss", "aux_loss"):
        torch.testing.assert_close(getattr(fused, name), getattr(full, name))
    grads_full = torch.autograd.grad(full.loss, list(model.parameters()))
    grads_fused = torch.autograd.grad(fused.loss, list(model.parameters()))
    for a, b in zip(grads_fused, grads_full):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
