import pytest
import torch

from megatron_exaone.model import build_model, tiny
from megatron_exaone.parallel.sharding import ParamLayout
from megatron_exaone.training.muon import Muon, ShardedMatrix, newton_schulz
from megatron_exaone.training.optim import build_optimizer


def test_newton_schulz_makes_singular_values_near_one():
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(3, 32, 48, generator=gen)
    s = torch.linalg.svdvals(newton_schulz(g))
    assert s.min() > 0.5 and s.max() < 1.5  # the quintic's design range


def test_matches_torch_muon_on_a_plain_matrix():
    gen = torch.Generator().manual_seed(1)
    w0 = torch.randn(24, 40, generator=gen)
    grads = [torch.randn(24, 40, generator=gen) for _ in range(3)]
    ours, ref = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    opt = Muon(
        [ours], {ours: ShardedMatrix(ours, ParamLayout((24, 40)))}, lr=0.02, weight_decay=0.1
    )
    ref_opt = torch.optim.Muon([ref], lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    for g in grads:
        ours.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    # torch runs Newton-Schulz in bf16; ours in fp32 on CPU.
    torch.testing.assert_close(ours, ref, rtol=0, atol=2e-3)


def test_muon_groups_keep_embeddings_head_router_and_norms_in_adamw():
    model = build_model(tiny(vocab_size=64), seed=0)
    opts = build_optimizer([model], "muon", lr=1e-3)
    adamw, muon = opts.optimizers
    muon_params = {id(p) for g in muon.param_groups for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in muon_params}
    assert (
        "model.layers.1.mlp.experts.gate_proj" in names
        and "model.layers.0.self_attn.q_proj.weight" in names
    )
    assert not any(
        n.endswith(("embed_tokens.weight", "lm_head.weight", "mlp.gate.weight", "norm.weight"))
        for n in names
    )
    x = torch.randint(1, 64, (2, 8))
    model(x, labels=x).loss.backward()
    before = model.model.layers[1].mlp.experts.gate_proj.detach().clone()
    opts.step()
    assert not torch.equal(before, model.model.layers[1].mlp.experts.gate_proj)


def test_unknown_optimizer_name():
    with pytest.raises(ValueError, match="'sgd'"):
        build_optimizer([torch.nn.Linear(2, 2)], "sgd")
