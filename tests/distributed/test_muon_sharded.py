"""Muon on sharded parameters (TP, replicated KV heads, FSDP, expert parallel) equals Muon on the
full model."""

import torch
from torch.distributed.tensor import DTensor

from megatron_exaone.model import build_model, tiny
from megatron_exaone.model.mtp import shift_left
from megatron_exaone.parallel.build import build_parallel_model, reduce_grads
from megatron_exaone.parallel.data_parallel import apply_data_parallel
from megatron_exaone.parallel.mesh import ParallelDims, build_mesh
from megatron_exaone.parallel.sharding import layout_of
from megatron_exaone.parallel.testing import run_distributed
from megatron_exaone.training.optim import build_optimizer

LAYOUTS = {
    2: {"tp2": (dict(tp=2), 4, False), "dp2_fsdp_ep2": (dict(dp=2, ep=2), 4, True)},
    4: {"tp4_replicated_kv": (dict(tp=4), 2, False), "tp2_dp2_fsdp": (dict(tp=2, dp=2), 4, True)},
}


def one_step(model, x, labels, rows, per, opt):
    model(
        x[rows],
        labels=labels[rows],
        loss_normalizer=(labels != -100).sum(),
        aux_loss_scale=per / x.shape[0],
    ).loss.backward()


def run_layout(rank, world, dims_kw, kv_heads, fsdp):
    config = tiny(vocab_size=128, num_attention_heads=4, num_key_value_heads=kv_heads)
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(1, 128, (4, 16), generator=gen)
    labels = shift_left(x, 1, -100)
    ref = build_model(config, seed=5)
    ref_opt = build_optimizer([ref], "muon", lr=0.01)
    one_step(ref, x, labels, slice(None), 4, ref_opt)
    ref_opt.step()

    mesh = build_mesh(ParallelDims(**dims_kw), "cpu")
    model = build_parallel_model(config, mesh, seed=5, device="cpu")
    layouts = {n: layout_of(model, n, p) for n, p in model.named_parameters()}
    if fsdp:
        apply_data_parallel(model, mesh, bf16=False)
    opt = build_optimizer([model], "muon", lr=0.01, tp_group=mesh.tp_group, tp_size=mesh.dims.tp)
    per = 4 // mesh.dims.dp
    one_step(model, x, labels, slice(mesh.dp_rank * per, (mesh.dp_rank + 1) * per), per, opt)
    reduce_grads(model, mesh, fsdp)
    opt.step()
    ref_params = dict(ref.named_parameters())
    errors = {}
    for n, p in model.named_parameters():
        got = p.full_tensor() if isinstance(p, DTensor) else p
        errors[n] = (got.detach() - layouts[n].slice_of(ref_params[n].detach())).abs().max().item()
    return errors


def run_all(rank, world):
    return {name: run_layout(rank, world, *spec) for name, spec in LAYOUTS[world].items()}


def test_sharded_muon_step_equals_single_process():
    failures = []
    for world in LAYOUTS:
        for rank, per_layout in enumerate(run_distributed(run_all, world, timeout_s=120)):
            for layout, errors in per_layout.items():
                worst = max(errors, key=errors.get)
                if errors[worst] > 1e-5:
                    failures.append(f"{layout} rank {rank}: {worst} differs by {errors[worst]:.2e}")
    assert not failures, "\n".join(failures)
