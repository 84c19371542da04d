"""FlexAttention (GPU path for sliding-window and packed-document masks) against SDPA with the
boolean mask."""

import pytest
import torch

from megatron_exaone.model.attention import Attention, attention_mask
from megatron_exaone.model.rope import rope_cos_sin

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("window,packed", [(16, False), (16, True), (None, True)])
def test_flex_attention_matches_masked_sdpa(window, packed):
    torch.manual_seed(0)
    attn = Attention(256, 8, 2, 32, 1e-5, use_rope=True).cuda()
    x = torch.randn(2, 256, 256, device="cuda", requires_grad=True)
    positions = torch.arange(256, device="cuda").expand(2, 256).clone()
    if packed:
        positions[:, 100:] -= 100  # a second document starts at token 100
    rope = rope_cos_sin(positions, 32, 10000.0, torch.float32)
    block = attention_mask(positions, window)
    dense = attention_mask(positions.cpu(), window).cuda()
    assert type(block).__name__ == "BlockMask"
    out_flex = attn(x, rope, block)
    grad_flex = torch.autograd.grad(out_flex.square().sum(), (x, attn.q_proj.weight))
    out_sdpa = attn(x, rope, dense)
    grad_sdpa = torch.autograd.grad(out_sdpa.square().sum(), (x, attn.q_proj.weight))
    torch.testing.assert_close(out_flex, out_sdpa, rtol=2e-3, atol=2e-4)
    for a, b in zip(grad_flex, grad_sdpa):
        torch.testing.assert_close(a, b, rtol=5e-3, atol=5e-4)


@pytest.mark.parametrize("window,packed", [(16, True), (None, False)])
def test_context_parallel_queries_match_masked_sdpa(window, packed):
    """Context parallel: a rank's zigzag queries against the whole sequence's keys, as a
    FlexAttention BlockMask with Q_LEN < KV_LEN, equal the same rows of the single-device
    attention."""
    from megatron_exaone.model.sequence_shard import SequenceShard

    torch.manual_seed(0)
    attn = Attention(256, 8, 2, 32, 1e-5, use_rope=False).cuda()
    positions = torch.arange(512, device="cuda").expand(2, 512).clone()
    if packed:
        positions[:, 200:] -= 200
    x = torch.randn(2, 512, 256, device="cuda", requires_grad=True)
    q, k, v = attn.project(x, None)
    dense = attention_mask(positions.cpu(), window)  # None: plain causal (SDPA's is_causal)
    whole = attn.attend(q, k, v, None if dense is None else dense.cuda())
    for rank in range(4):
        shard = SequenceShard(4, rank)
        # keys in all-gather order
        index, keys = shard.index(512, "cuda"), shard.gathered_keys(512, "cuda")
        block = attention_mask(positions, window, index, keys)
        assert type(block).__name__ == "BlockMask"
        part = attn.attend(q[:, :, index], k[:, :, keys[0]], v[:, :, keys[0]], block)
        torch.testing.assert_close(part, whole[:, :, index], rtol=2e-3, atol=2e-4)
        want = torch.autograd.grad(whole[:, :, index].square().sum(), x, retain_graph=True)[0]
        got = torch.autograd.grad(part.square().sum(), x, retain_graph=True)[0]
        torch.testing.assert_close(got, want, rtol=5e-3, atol=5e-4)
