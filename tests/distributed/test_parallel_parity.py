"""Tensor/sequence, context, expert and (FSDP2) data parallel layouts, with and without compiled
layers, against the single-process model.

For a tiny model, a fixed seed and a fixed global batch of packed documents, every layout must
reproduce the single-process loss and every gradient (each rank compares its local slice), start
from the same full weights, and compute the same global gradient norm. One process group per world
size runs every layout of that size.
"""

import pytest
import torch
from torch.distributed.tensor import DTensor

from megatron_exaone.model import build_model, tiny
from megatron_exaone.model.mtp import shift_left
from megatron_exaone.parallel.build import all_reduce_grads, build_parallel_model, reduce_grads
from megatron_exaone.parallel.compile import apply_compile
from megatron_exaone.parallel.data_parallel import apply_data_parallel
from megatron_exaone.parallel.grad_norm import clip_grad_norm_
from megatron_exaone.parallel.mesh import ParallelDims, build_mesh
from megatron_exaone.parallel.recompute import apply_recompute
from megatron_exaone.parallel.sharding import layout_of
from megatron_exaone.parallel.testing import run_distributed

SEED = 3
# name -> (ParallelDims kwargs, sequence parallel, FSDP2, activation checkpointing, compiled layers)
LAYOUTS = {
    2: {
        "tp2": (dict(tp=2), False, False, "none", False),
        "tp2_sp": (dict(tp=2), True, False, "none", False),
        "ep2": (dict(ep=2), True, True, "none", False),
        "dp2_fsdp": (dict(dp=2), True, True, "none", False),
        "tp2_ep2_sp": (dict(tp=2, ep=2), True, False, "full", False),
        "dp2_selective_ac": (dict(dp=2), True, True, "selective", False),
        "tp2_ep2_sp_compiled": (dict(tp=2, ep=2), True, False, "full", True),
        "ep2_fsdp_recompute_compiled": (dict(ep=2), True, True, "full", True),
        "cp2": (dict(cp=2), True, False, "none", False),
    },
    4: {
        "ep4": (dict(ep=4), True, True, "none", False),
        "tp2_dp2_ep2_fsdp": (dict(tp=2, dp=2, ep=2), True, True, "full", False),
        "tp4_sp": (dict(tp=4), True, False, "none", False),
        "tp4_replicated_kv": (dict(tp=4), True, False, "none", False),
        "tp2_dp2_ep2_fsdp_compiled": (dict(tp=2, dp=2, ep=2), True, True, "none", True),
        "cp2_tp2_ep2_sp_fsdp_recompute": (dict(cp=2, tp=2, ep=2), True, True, "full", False),
        "cp2_dp2_fsdp": (dict(cp=2, dp=2), True, True, "none", False),
        # chunks of 16 / 8 = 2 tokens, shorter than the window's 3-token halo: sliding layers gather
        # everything
        "cp4": (dict(cp=4), True, False, "none", False),
    },
}


def config(name: str = ""):
    # tp4 over 2 KV heads: each KV head on 2 ranks
    kv_heads = 2 if name.endswith("replicated_kv") else 4
    return tiny(
        vocab_size=128,
        aux_loss_coeff=0.01,
        sliding_window=4,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
    )


def batch():
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(1, 128, (4, 16), generator=gen)
    positions = torch.cat([torch.arange(10), torch.arange(6)]).expand(4, 16)
    return x, positions, shift_left(x, 1, -100)


def reference(name: str):
    model = build_model(config(name), seed=SEED)
    x, positions, labels = batch()
    out = model(x, labels=labels, position_ids=positions, loss_normalizer=(labels != -100).sum())
    out.loss.backward()
    norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters()))
    return model, out, norm


def run_layout(rank, world, name, dims_kw, sequence_parallel, fsdp, recompute, compiled):
    mesh = build_mesh(ParallelDims(**dims_kw), "cpu")
    ref, ref_out, ref_norm = reference(name)
    model = build_parallel_model(
        config(name), mesh, seed=SEED, device="cpu", sequence_parallel=sequence_parallel
    )
    layouts = {n: layout_of(model, n, p) for n, p in model.named_parameters()}
    ref_params = dict(ref.named_parameters())
    init_err = max(
        (p - layouts[n].slice_of(ref_params[n])).abs().max().item()
        for n, p in model.named_parameters()
    )
    if compiled:  # as the trainer: compiled layers recompute inside their graphs
        # compiled code is shared per function: start from the recompute setting asked for
        torch._dynamo.reset()
        apply_compile(model, recompute=recompute == "full")
    else:
        apply_recompute(model, recompute)
    if fsdp:
        apply_data_parallel(model, mesh, bf16=False)
    x, positions, labels = batch()
    per = x.shape[0] // mesh.dims.dp
    rows = slice(mesh.dp_rank * per, (mesh.dp_rank + 1) * per)
    out = model(
        x[rows],
        labels=labels[rows],
        position_ids=positions[rows],
        loss_normalizer=(labels != -100).sum(),
        aux_loss_scale=per / x.shape[0],
    )
    out.loss.backward()
    reduce_grads(model, mesh, fsdp)
    grad_errors = {}
    for n, p in model.named_parameters():
        got = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        want = layouts[n].slice_of(ref_params[n].grad)
        grad_errors[n] = ((got - want).abs().max() / want.abs().max().clamp(min=1e-12)).item()
    norm = clip_grad_norm_([model], max_norm=0.0, mesh=mesh)
    lm_loss = out.lm_loss.detach().clone()
    if mesh.dims.cp > 1:  # each rank of a cp group holds part of the tokens' losses
        torch.distributed.all_reduce(lm_loss, group=mesh.cp_group)
    counts = sum(
        m.tokens_per_expert.sum().item() for m in model.modules() if hasattr(m, "tokens_per_expert")
    )
    return {
        "init": init_err,
        "grads": grad_errors,
        "norm": (norm.item(), ref_norm.item()),
        "lm_loss": (lm_loss.item(), ref_out.lm_loss.item()),
        "tokens_counted": counts,
    }


def run_all(rank, world):
    return {name: run_layout(rank, world, name, *spec) for name, spec in LAYOUTS[world].items()}


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def results(request):
    world = request.param
    return world, run_distributed(run_all, world, timeout_s=180)


def test_layouts_match_single_process(results):
    world, per_rank = results
    moe_layers = sum(t == "sparse" for t in config().mlp_layer_types)
    failures = []
    for rank, layouts in enumerate(per_rank):
        for name, r in layouts.items():
            if r["init"] != 0.0:
                failures.append(f"{name} rank {rank}: initial weights differ by {r['init']}")
            worst = max(r["grads"], key=r["grads"].get)
            if r["grads"][worst] > 1e-5:
                failures.append(
                    f"{name} rank {rank}: gradient of {worst} differs by {r['grads'][worst]:.2e}"
                )
            got, want = r["norm"]
            if abs(got - want) > 1e-5 * want:
                failures.append(f"{name} rank {rank}: global grad norm {got} != {want}")
            dp = ParallelDims(**LAYOUTS[world][name][0]).resolve(world).dp
            if dp == 1 and abs(r["lm_loss"][0] - r["lm_loss"][1]) > 1e-6:
                failures.append(f"{name} rank {rank}: lm loss {r['lm_loss']}")
    assert not failures, "\n".join(failures)
    # Every routed token is counted exactly once per MoE layer over all ranks, recompute included.
    for name in LAYOUTS[world]:
        total = sum(per_rank[r][name]["tokens_counted"] for r in range(world))
        assert total == 4 * 16 * config().num_experts_per_tok * moe_layers, (name, total)


def unknown_parameter_is_refused(rank, world):
    from torch import nn

    from megatron_exaone.model import ExaoneMoeForCausalLM
    from megatron_exaone.parallel.tensor_parallel import TensorParallelError, apply_tensor_parallel

    mesh = build_mesh(ParallelDims(tp=2), "cpu")
    with torch.device("meta"):
        model = ExaoneMoeForCausalLM(config())
        model.model.layers[0].self_attn.temperature = nn.Parameter(torch.ones(1))
    try:
        apply_tensor_parallel(model, mesh.tp_group, sequence_parallel=False)
    except TensorParallelError as exc:
        return str(exc)
    return None


def test_tensor_parallel_refuses_a_parameter_it_cannot_classify():
    """The pytorch/torchtitan#2387 class: a replicated parameter whose gradient reduction is
    unknown."""
    messages = run_distributed(unknown_parameter_is_refused, 2, timeout_s=60)
    assert all(m and "self_attn.temperature" in m for m in messages), messages


FP8 = dict(
    name="fp8_emulated",
    keep_bf16_first_layers=0,
    keep_bf16_last_layers=0,
    fp8_lm_head=True,
    fp8_mtp=True,
)


def fp8_tp_parity(rank, world, recipe):
    """Every layer, the MTP layer and the output head in FP8 (q, k, v and gate, up fused), under
    tensor + sequence parallel: tensorwise amaxes are max-reduced over TP, so each rank quantizes
    with the whole operand's scale, as the single process does."""
    from megatron_exaone.config.schema import PrecisionConfig
    from megatron_exaone.precision import apply_precision

    plan = PrecisionConfig(recipe=recipe, **FP8)
    ref = build_model(config(), seed=SEED)
    report = apply_precision(ref, plan, config().num_hidden_layers, "cpu")
    x, positions, labels = batch()
    normalizer = (labels != -100).sum()
    ref_out = ref(x, labels=labels, position_ids=positions, loss_normalizer=normalizer)
    ref_out.loss.backward()
    mesh = build_mesh(ParallelDims(tp=world), "cpu")
    model = build_parallel_model(config(), mesh, seed=SEED, device="cpu", precision=plan)
    out = model(x, labels=labels, position_ids=positions, loss_normalizer=normalizer)
    out.loss.backward()
    all_reduce_grads(model, mesh)
    ref_params = dict(ref.named_parameters())
    errors = {}
    for n, p in model.named_parameters():
        want = layout_of(model, n, p).slice_of(ref_params[n].grad)
        errors[n] = ((p.grad - want).abs().max() / want.abs().max().clamp(min=1e-12)).item()
    return report.fused, (out.loss.item(), ref_out.loss.item()), errors


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_under_tensor_parallel_matches_single_process_fp8(recipe):
    """Tensorwise, every operand is quantized with the single process's scale: the same loss and
    gradients up to the order of fp32 sums (a value at an FP8 rounding boundary can go the other
    way: 4e-4 at worst). Rowwise, a row-parallel linear's input is scaled per token over its local
    columns, so forward rounds differently and router near-ties can go the other way: the loss
    agrees, the routed experts' gradients need not."""
    for fused, (loss, want), errors in run_distributed(fp8_tp_parity, 2, recipe, timeout_s=120):
        assert "model.layers.1.self_attn" in fused and "model.layers.1.mlp.shared_experts" in fused
        assert abs(loss - want) < 1e-5 * want, (loss, want)
        if recipe == "tensorwise":
            worst = max(errors, key=errors.get)
            assert errors[worst] < 1e-3, (worst, errors[worst])
