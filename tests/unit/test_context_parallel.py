"""Context parallel pieces that need no process group: the zigzag split of a sequence and the masks
of a rank's queries against the whole sequence (the FlexAttention BlockMask the GPU runs, checked
here in forward on CPU). The layouts themselves are compared with the single-process model in
tests/distributed."""

import pytest
import torch
from torch.nn.attention.flex_attention import flex_attention

from megatron_exaone.model.attention import Attention, _block_mask, attention_mask, document_ids
from megatron_exaone.model.sequence_shard import SequenceShard, zigzag_index, zigzag_order


def test_zigzag_pairs_early_and_late_chunks_and_covers_the_sequence():
    assert zigzag_index(16, 2, 0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert zigzag_index(16, 2, 1).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    assert sorted(zigzag_order(48, 4).tolist()) == list(range(48))
    # causal work (keys before each query) is the same on every rank
    work = [int((zigzag_index(48, 4, r) + 1).sum()) for r in range(4)]
    assert len(set(work)) == 1
    x = torch.arange(32).view(2, 16)
    assert torch.equal(SequenceShard(2, 1).take(x), x[:, 4:12])
    with pytest.raises(ValueError, match="multiple of 8"):
        zigzag_index(20, 4, 0)


@pytest.mark.parametrize("window", [16, None])
def test_a_ranks_queries_see_what_they_see_in_the_whole_sequence(window):
    torch.manual_seed(0)
    attn = Attention(256, 8, 2, 32, 1e-5, use_rope=False)
    positions = torch.arange(512).expand(2, 512).clone()
    positions[:, 200:] -= 200  # two packed documents
    with torch.no_grad():  # FlexAttention has no CPU backward
        q, k, v = attn.project(torch.randn(2, 512, 256), None)
        whole = attn.attend(q, k, v, attention_mask(positions, window))
        for rank in range(4):
            shard = SequenceShard(4, rank)
            index, keys = shard.index(512), shard.gathered_keys(512)
            rows = whole[:, :, index]
            # every rank's tokens in rank order
            gathered_k, gathered_v = k[:, :, keys[0]], v[:, :, keys[0]]
            for key_layout, (kk, vv) in ((None, (k, v)), (keys, (gathered_k, gathered_v))):
                # what SDPA gets on CPU
                dense = attention_mask(positions, window, index, key_layout)
                assert dense.shape == (2, 1, 128, 512)
                torch.testing.assert_close(attn.attend(q[:, :, index], kk, vv, dense), rows)
                # GPU's
                block = _block_mask(
                    document_ids(positions), window, 2, 512, "cpu", index, key_layout
                )
                flex = flex_attention(
                    q[:, :, index], kk, vv, block_mask=block, scale=32**-0.5, enable_gqa=True
                )
                torch.testing.assert_close(flex, rows, rtol=1e-5, atol=1e-5)


def test_sliding_layers_need_only_every_chunks_last_window_tokens():
    """A sliding layer's keys under cp: the last W - 1 tokens of every rank's chunks (what the halo
    all-gather yields; this rank's own tails masked out) and this rank's tokens give the
    whole-sequence rows."""
    torch.manual_seed(0)
    attn = Attention(256, 8, 2, 32, 1e-5, use_rope=False)
    positions = torch.arange(512).expand(2, 512).clone()
    positions[:, 200:] -= 200
    window, cp = 16, 4
    with torch.no_grad():
        q, k, v = attn.project(torch.randn(2, 512, 256), None)
        whole = attn.attend(q, k, v, attention_mask(positions, window))
        for rank in range(cp):
            shard = SequenceShard(cp, rank)
            halo = shard.halo(512, window)
            keys = shard.halo_keys(512, halo)
            assert halo == window - 1 and keys[0].numel() == 2 * cp * halo + 128
            index = shard.index(512)
            rows = whole[:, :, index]
            # the gather, done on the whole tensors
            gathered_k, gathered_v = k[:, :, keys[0]], v[:, :, keys[0]]
            dense = attention_mask(positions, window, index, keys)
            torch.testing.assert_close(
                attn.attend(q[:, :, index], gathered_k, gathered_v, dense), rows
            )
            block = _block_mask(document_ids(positions), window, 2, 512, "cpu", index, keys)
            flex = flex_attention(
                q[:, :, index],
                gathered_k,
                gathered_v,
                block_mask=block,
                scale=32**-0.5,
                enable_gqa=True,
            )
            torch.testing.assert_close(flex, rows, rtol=1e-5, atol=1e-5)
    # chunks of 8 tokens are shorter than the window
    assert SequenceShard(4, 0).halo(64, 16) is None
    assert SequenceShard(4, 0).halo(512, None) is None
