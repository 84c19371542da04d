"""Single-process model behaviour: routing, packing, losses, init, the expert-bias update."""

import pytest
import torch
from transformers import ExaoneMoeConfig
from transformers.models.exaone_moe.modeling_exaone_moe import ExaoneMoeTopkRouter

from megatron_exaone.model import ExaoneMoeForCausalLM, build_model, tiny, update_expert_bias
from megatron_exaone.model.init import full_init
from megatron_exaone.model.moe import (
    MoEBlock,
    RouterSettings,
    dispatch,
    grouped_mm,
    grouped_mm_usable,
    grouped_wgrad,
    permute_by_expert,
    route,
    sequence_aux_loss,
)
from megatron_exaone.model.mtp import shift_left


@pytest.mark.parametrize(
    "n_group,topk_group,norm,ties",
    [(1, 1, True, False), (4, 2, True, False), (4, 2, False, True), (1, 1, True, True)],
)
def test_router_matches_transformers(n_group, topk_group, norm, ties):
    experts, hidden, top_k = 16, 24, 4
    hf_cfg = ExaoneMoeConfig(
        num_experts=experts,
        hidden_size=hidden,
        num_experts_per_tok=top_k,
        n_group=n_group,
        topk_group=topk_group,
        norm_topk_prob=norm,
        routed_scaling_factor=2.5,
    )
    hf_router = ExaoneMoeTopkRouter(hf_cfg)
    gen = torch.Generator().manual_seed(n_group + 7 * ties)
    with torch.no_grad():
        hf_router.weight.copy_(torch.randn(experts, hidden, generator=gen))
        hf_router.e_score_correction_bias.copy_(torch.randn(experts, generator=gen) * 0.1)
        if ties:  # duplicated experts and a zero token produce exactly tied scores
            hf_router.weight[1] = hf_router.weight[0]
            hf_router.e_score_correction_bias[1] = hf_router.e_score_correction_bias[0]
    x = torch.randn(64, hidden, generator=gen)
    if ties:
        x[:8] = 0
    logits, want_w, want_i = hf_router(x)
    settings = RouterSettings(top_k, n_group, topk_group, norm, 2.5)
    _, got_w, got_i = route(logits, hf_router.e_score_correction_bias, settings)
    assert torch.equal(got_i.sort(-1).values, want_i.sort(-1).values)
    order_got, order_want = got_i.argsort(-1), want_i.argsort(-1)
    torch.testing.assert_close(
        got_w.gather(1, order_got), want_w.gather(1, order_want), rtol=0, atol=1e-7
    )


def test_packed_documents_equal_documents_run_alone():
    model = build_model(tiny(vocab_size=97, sliding_window=4), seed=5).eval()
    gen = torch.Generator().manual_seed(0)
    docs = [torch.randint(1, 97, (1, n), generator=gen) for n in (11, 3, 9)]
    packed = torch.cat(docs, dim=1)
    positions = torch.cat([torch.arange(d.shape[1]) for d in docs])[None]
    with torch.no_grad():
        packed_logits = model(packed, position_ids=positions).logits
        alone = torch.cat([model(d).logits for d in docs], dim=1)
        unpacked = model(packed).logits
    torch.testing.assert_close(packed_logits, alone, rtol=0, atol=1e-5)
    # without position_ids the documents do see each other
    assert (unpacked - alone).abs().max() > 1e-3


def test_sequence_aux_loss_matches_direct_formula():
    """DeepSeek-V3's eqs. 17-20, written out term by term: count_i counts the tokens whose top-k
    scores include expert i."""
    gen = torch.Generator().manual_seed(1)
    batch, seq, experts, top_k = 3, 10, 6, 2
    scores = torch.rand(batch * seq, experts, generator=gen)
    want = 0.0
    for b in range(batch):
        rows = range(b * seq, (b + 1) * seq)
        per_seq = 0.0
        # each token's k-th highest score
        kth = {t: scores[t].sort(descending=True).values[top_k - 1] for t in rows}
        for i in range(experts):
            count = sum(int(scores[t, i] >= kth[t]) for t in rows)
            f_i = experts / (top_k * seq) * count
            p_i = sum(scores[t, i] / scores[t].sum() for t in rows) / seq
            per_seq += f_i * p_i
        want += per_seq / batch
    torch.testing.assert_close(sequence_aux_loss(scores, batch, top_k), torch.tensor(float(want)))


def test_aux_loss_is_coefficient_weighted_sum_over_moe_layers():
    config = tiny(vocab_size=64, aux_loss_coeff=0.5)
    model = build_model(config, seed=0)
    x = torch.randint(1, 64, (2, 12))
    out = model(x, labels=shift_left(x, 1, -100))
    assert out.aux_loss > 0
    no_aux = ExaoneMoeForCausalLM(tiny(vocab_size=64, aux_loss_coeff=0.0))
    no_aux.load_state_dict(model.state_dict())
    out0 = no_aux(x, labels=shift_left(x, 1, -100))
    torch.testing.assert_close(out.loss - out0.loss, out.aux_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        out.loss, out.lm_loss + config.mtp_loss_weight * out.mtp_loss + out.aux_loss
    )


def test_bias_update_moves_toward_balance_and_resets_counts():
    model = build_model(tiny(vocab_size=64), seed=0)
    block = next(m for m in model.modules() if isinstance(m, MoEBlock))
    block.tokens_per_expert.copy_(torch.tensor([10.0, 0, 2, 4, 4, 4, 4, 4]))  # mean 4
    update_expert_bias(model, rate=0.01)
    torch.testing.assert_close(
        block.e_score_correction_bias, torch.tensor([-0.01, 0.01, 0.01, 0, 0, 0, 0, 0])
    )
    assert block.tokens_per_expert.sum() == 0
    assert block.e_score_correction_bias.dtype == torch.float32


def test_forward_counts_routed_tokens():
    config = tiny(vocab_size=64)
    model = build_model(config, seed=0)
    x = torch.randint(1, 64, (2, 9))
    model(x)
    for m in model.modules():
        if isinstance(m, MoEBlock):
            assert m.tokens_per_expert.sum() == 2 * 9 * config.num_experts_per_tok


# aligned shapes take torch._grouped_mm, others the loop
@pytest.mark.parametrize("k,m", [(8, 12), (6, 3)])
def test_grouped_mm_matches_per_expert_loop_forward_and_backward(k, m):
    gen = torch.Generator().manual_seed(0)
    counts = torch.tensor([5, 0, 7, 1])
    x = torch.randn(13, k, generator=gen, requires_grad=True)
    w = torch.randn(4, k, m, generator=gen, requires_grad=True)
    out = grouped_mm(x, w, counts)
    ref = torch.cat([x[:5] @ w[0], x[5:12] @ w[2], x[12:] @ w[3]])
    torch.testing.assert_close(out, ref)
    upstream = torch.randn(out.shape, generator=gen)
    gx, gw = torch.autograd.grad(out, (x, w), upstream)
    rx, rw = torch.autograd.grad(ref, (x, w), upstream)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gw, rw)
    torch.testing.assert_close(grouped_wgrad(x.detach(), upstream, counts), rw)
    # a column slice, as gate of gate_up
    wide = torch.cat([x.detach(), torch.randn(13, 5, generator=gen)], dim=1)
    torch.testing.assert_close(grouped_wgrad(wide[:, :k], upstream, counts), rw)


@pytest.mark.parametrize("compiled", [False, True])
def test_dispatch_gradient_sums_each_tokens_slots(compiled):
    """dispatch's backward (gather back to slot order, sum over k) equals autograd's scatter-add of
    x[order // k], eagerly and inside a compiled graph."""
    gen = torch.Generator().manual_seed(0)
    tokens, top_k, experts = 11, 3, 5
    indices = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])
    order, _ = permute_by_expert(indices, experts)
    x = torch.randn(tokens, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(tokens * top_k, 6, generator=gen, dtype=torch.float64)
    run = torch.compile(dispatch, backend="inductor", fullgraph=True) if compiled else dispatch
    out = run(x, order, top_k)
    ref = x[order // top_k]
    torch.testing.assert_close(out, ref)
    (got,) = torch.autograd.grad(out, x, upstream)
    (want,) = torch.autograd.grad(ref, x, upstream)
    torch._dynamo.reset()
    torch.testing.assert_close(got, want)


def test_bf16_grouped_weight_gradient_under_compile_matches_loop():
    """The BF16 ragged-K weight gradient (an opaque op) inside a compiled graph, on a column slice
    of a tensor the graph computes (as the FP8 experts' backward calls it), with unaligned and empty
    groups."""
    if not grouped_mm_usable("cpu", torch.bfloat16):
        pytest.skip("torch._grouped_mm does not run BF16 on this CPU build")
    gen = torch.Generator().manual_seed(0)
    counts = torch.tensor([5, 0, 17, 3])
    grad, x = (
        torch.randn(25, 48, generator=gen).bfloat16(),
        torch.randn(25, 16, generator=gen).bfloat16(),
    )

    def gate_grad(grad, x, counts):
        return grouped_wgrad((grad * 2).split(24, dim=1)[0], x, counts)

    got = torch.compile(gate_grad, backend="inductor", fullgraph=True)(grad, x, counts)
    want = torch.stack(
        [
            pa.float().t() @ pb.float()
            for pa, pb in zip((grad * 2)[:, :24].split(counts.tolist()), x.split(counts.tolist()))
        ]
    )
    torch._dynamo.reset()
    assert got.shape == (4, 24, 16) and got.is_contiguous() and (got[1] == 0).all()
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=5e-2)


def test_init_is_deterministic_per_name_and_expert_slices_match():
    config = tiny(vocab_size=64)
    a = build_model(config, seed=11).state_dict()
    b = build_model(config, seed=11).state_dict()
    c = build_model(config, seed=12).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
    name = "model.layers.1.mlp.experts.down_proj"
    part = full_init(config, name, a[name].shape, seed=11, experts=range(2, 5))
    assert torch.equal(part, a[name][2:5])
    std_out = a["model.layers.1.self_attn.o_proj.weight"].std().item()
    std_in = a["model.layers.1.self_attn.q_proj.weight"].std().item()
    assert std_out < std_in / 2  # depth-scaled output projections


def test_bf16_forward_runs_and_is_close_to_fp32():
    model = build_model(tiny(vocab_size=64), seed=0)
    x = torch.randint(1, 64, (2, 16))
    with torch.no_grad():
        ref = model(x).logits
        low = model.to(torch.bfloat16)(x).logits.float()
    assert (low - ref).abs().max() < 0.05


def test_aux_loss_gradient_is_attached_to_the_moe_output():
    """The block's backward adds d(coeff * aux)/d(inputs) to whatever flows through its output."""
    from megatron_exaone.model.layers import router_settings

    config = tiny(vocab_size=64, aux_loss_coeff=0.3)
    block = MoEBlock(
        config.hidden_size,
        config.num_experts,
        config.moe_intermediate_size,
        1,
        router_settings(config),
        config.aux_loss_coeff,
    )
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    x = torch.randn(2, 5, config.hidden_size, generator=gen, requires_grad=True)
    upstream = torch.randn(2, 5, config.hidden_size, generator=gen)
    (block(x, aux_loss_scale=0.5) * upstream).sum().backward()
    got = x.grad.clone(), block.gate.weight.grad.clone()
    x.grad, block.gate.weight.grad = None, None
    block.aux_loss_coeff = 0.0
    y = block(x)
    scores, _, _ = route(
        block.gate(x.reshape(-1, config.hidden_size)), block.e_score_correction_bias, block.router
    )
    manual = 0.5 * 0.3 * sequence_aux_loss(scores, 2, config.num_experts_per_tok)
    ((y * upstream).sum() + manual).backward()
    torch.testing.assert_close(got[0], x.grad)
    torch.testing.assert_close(got[1], block.gate.weight.grad)
