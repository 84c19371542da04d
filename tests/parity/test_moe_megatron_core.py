"""The MoE block's training-time semantics against Megatron-Core (the `megatron-core` package, in
the [dev] extra), the reference for what transformers does not do: routing with the sigmoid score,
the expert bias and the scaling factor (`topk_routing_with_score_function`), the sequence-level aux
loss (`compute_routing_scores_for_aux_loss` and `switch_load_balancing_loss_func`, combined as its
router's `_apply_seq_aux_loss` combines them on one rank) and the aux-loss-free bias update
(`get_updated_expert_bias`)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_exaone.model import build_model, tiny, update_expert_bias
from megatron_exaone.model.moe import MoEBlock, RouterSettings, route, sequence_aux_loss
from tests.runs import free_port

moe_utils = pytest.importorskip("megatron.core.transformer.moe.moe_utils")

EXPERTS, TOP_K, SCALING = 16, 4, 2.5


def _logits_and_bias(tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, EXPERTS, generator=gen), 0.3 * torch.randn(EXPERTS, generator=gen)


@pytest.mark.parametrize("groups,group_topk", [(1, 1), (4, 2)])
def test_routing_matches_megatron_core(groups, group_topk):
    """Top-k of the biased scores, gate weights from the unbiased ones, normalized and scaled by
    2.5. With groups, both score a group by its top 2 experts here (Megatron by its top
    top_k / group_topk, transformers by its top 2: the same for top_k 4 over 2 groups)."""
    logits, bias = _logits_and_bias(64, seed=0)
    settings = RouterSettings(TOP_K, groups, group_topk, True, SCALING)
    _, weights, indices = route(logits, bias, settings)
    probs, routing_map = moe_utils.topk_routing_with_score_function(
        logits,
        TOP_K,
        num_groups=groups if groups > 1 else None,
        group_topk=group_topk if groups > 1 else None,
        scaling_factor=SCALING,
        score_function="sigmoid",
        expert_bias=bias,
    )
    ours = torch.zeros_like(logits).scatter(1, indices, weights)
    assert torch.equal(ours != 0, routing_map)
    torch.testing.assert_close(ours, probs, rtol=0, atol=2e-7)
    # the bias changed the choice of some tokens, so the comparison covers it
    unbiased = route(logits, torch.zeros(EXPERTS), settings)[2]
    assert not torch.equal(indices.sort(-1).values, unbiased.sort(-1).values)


def test_sequence_aux_loss_and_its_gradient_match_megatron_core():
    """Per sequence: the tokens whose top-k unbiased scores include each expert, times the mean
    normalized score, averaged over the batch. Megatron lays tokens out sequence-major ([S, B])."""
    batch, seq = 3, 20
    logits, _ = _logits_and_bias(batch * seq, seed=1)
    ours_logits = logits.clone().requires_grad_()
    ours = sequence_aux_loss(ours_logits.sigmoid(), batch, TOP_K)
    ours.backward()
    theirs_logits = logits.view(batch, seq, EXPERTS).transpose(0, 1).reshape(-1, EXPERTS)
    theirs_logits = theirs_logits.clone().requires_grad_()
    routing_map, scores = moe_utils.compute_routing_scores_for_aux_loss(
        theirs_logits, TOP_K, "sigmoid"
    )
    # _apply_seq_aux_loss: each sequence's experts become columns of their own, and the loss of
    # the [S, B * E] batch is divided by B
    per_sequence_map = routing_map.reshape(seq, -1)
    theirs = (
        moe_utils.switch_load_balancing_loss_func(
            scores.reshape(seq, -1), per_sequence_map.sum(dim=0), seq, TOP_K, EXPERTS, 1.0
        )
        / batch
    )
    theirs.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    theirs_grad = theirs_logits.grad.view(seq, batch, EXPERTS).transpose(0, 1).reshape(-1, EXPERTS)
    torch.testing.assert_close(ours_logits.grad, theirs_grad, rtol=1e-5, atol=1e-9)


@pytest.fixture
def megatron_parallel_state(monkeypatch):
    """Megatron-Core's global process groups on one gloo rank (get_updated_expert_bias all-reduces
    the counts over its TP x CP x DP group); torn down afterwards."""
    from megatron.core import parallel_state

    assert not dist.is_initialized()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    yield
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def test_bias_update_matches_megatron_core(megatron_parallel_state):
    model = build_model(tiny(vocab_size=64), seed=0)
    blocks = [m for m in model.modules() if isinstance(m, MoEBlock)]
    gen = torch.Generator().manual_seed(2)
    want = []
    for block in blocks:
        counts = torch.randint(0, 9, (block.tokens_per_expert.numel(),), generator=gen).float()
        block.tokens_per_expert.copy_(counts)
        block.e_score_correction_bias.copy_(0.01 * torch.randn(counts.numel(), generator=gen))
        want.append(
            moe_utils.get_updated_expert_bias(counts.clone(), block.e_score_correction_bias, 1e-3)
        )
    update_expert_bias(model, rate=1e-3)
    for block, expected in zip(blocks, want):
        torch.testing.assert_close(block.e_score_correction_bias, expected, rtol=0, atol=0)
