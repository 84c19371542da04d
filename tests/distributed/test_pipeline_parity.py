"""Pipeline parallel layouts against the single-process model, and the stage split and schedule
rules (pure).

For a tiny model with MTP, a fixed seed and a fixed global batch of packed documents run as 4
micro-batches, every pipeline layout (schedules 1F1B, interleaved 1F1B, ZBV, DualPipeV; with TP/SP,
DP, EP, FSDP2 + recompute) must start from the same full weights and reproduce the single-process
losses, every gradient (each rank compares its local slice; both embedding copies), the global
gradient norm and the routed-token counts. One process group per world size runs every layout of
that size.
"""

import contextlib

import pytest
import torch
import torch.distributed.fsdp._fully_shard._fsdp_param_group as fsdp_param_group
from torch.distributed.pipelining._utils import generate_stage_to_rank_mapping
from torch.distributed.tensor import DTensor

from megatron_exaone.model import build_model, k_exaone_236b, tiny
from megatron_exaone.model.mtp import shift_left
from megatron_exaone.parallel.build import build_pipeline_chunks, reduce_grads
from megatron_exaone.parallel.compile import apply_compile
from megatron_exaone.parallel.data_parallel import apply_data_parallel
from megatron_exaone.parallel.grad_norm import clip_grad_norm_
from megatron_exaone.parallel.mesh import LayoutError, ParallelDims, build_mesh
from megatron_exaone.parallel.pipeline import (
    SCHEDULES,
    check_schedule,
    embedding_copies,
    format_layout,
    local_stage_indices,
    pipeline_layout,
    splits_weight_backward,
)
from megatron_exaone.parallel.recompute import apply_recompute
from megatron_exaone.parallel.sharding import layout_of
from megatron_exaone.parallel.step import PipelineRunner
from megatron_exaone.parallel.testing import run_distributed

SEED = 3
MICROBATCHES = 4
TOLERANCE = 1e-5  # relative to each tensor's largest magnitude (fp32)
# name -> (ParallelDims kwargs, schedule, layout string, FSDP2 with full recompute[, compiled
# layers[, FSDP2 reduce-scatters each micro-batch's gradients]]); sequence parallel throughout.
LAYOUTS = {
    2: {
        "pp2_1f1b": (dict(pp=2), "1f1b", None, False),
        "pp2_1f1b_compiled": (dict(pp=2), "1f1b", None, False, True),
        "pp2_vpp2_interleaved": (dict(pp=2, vpp=2), "interleaved_1f1b", None, False),
        "pp2_zbv": (dict(pp=2, vpp=2), "zbv", None, False),
        "pp2_dualpipev": (dict(pp=2, vpp=2), "dualpipev", None, False),
        "pp2_vpp2_layout_E|ttt|t|L": (dict(pp=2, vpp=2), "interleaved_1f1b", "E|ttt|t|L", False),
    },
    4: {
        "pp2_tp2_sp_1f1b": (dict(pp=2, tp=2), "1f1b", None, False),
        "pp2_tp2_sp_zbv": (dict(pp=2, vpp=2, tp=2), "zbv", None, False),
        "pp2_dp2_fsdp_recompute_interleaved": (
            dict(pp=2, vpp=2, dp=2),
            "interleaved_1f1b",
            None,
            True,
        ),
        "pp2_dp2_fsdp_recompute_zbv": (dict(pp=2, vpp=2, dp=2), "zbv", None, True),
        "pp2_dp2_fsdp_recompute_interleaved_reduce_each_micro_batch": (
            dict(pp=2, vpp=2, dp=2),
            "interleaved_1f1b",
            None,
            True,
            False,
            True,
        ),
        "pp2_cp2_1f1b": (dict(pp=2, cp=2), "1f1b", None, False),
        "pp2_cp2_fsdp_recompute_interleaved": (
            dict(pp=2, vpp=2, cp=2),
            "interleaved_1f1b",
            None,
            True,
        ),
    },
    8: {
        "pp2_tp2_dp2_ep2_interleaved": (
            dict(pp=2, vpp=2, tp=2, ep=2),
            "interleaved_1f1b",
            None,
            False,
        )
    },
}


def config():
    return tiny(vocab_size=128, aux_loss_coeff=0.01, sliding_window=4)  # 4 layers, MTP on


def batch():
    """8 sequences of two packed documents (positions restart at 10; no label across the
    boundary)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(1, 128, (8, 16), generator=gen)
    positions = torch.cat([torch.arange(10), torch.arange(6)]).expand(8, 16)
    labels = shift_left(x, 1, -100)
    labels[:, 9] = -100
    return x, positions, labels


def reference():
    model = build_model(config(), seed=SEED)
    x, positions, labels = batch()
    out = model(x, labels=labels, position_ids=positions, loss_normalizer=(labels != -100).sum())
    out.loss.backward()
    norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters())).item()
    losses = {k: getattr(out, k).item() for k in ("loss", "lm_loss", "mtp_loss", "aux_loss")}
    return dict(model.named_parameters()), losses, norm


def run_layout(
    ref_params, dims_kw, schedule, layout, fsdp, compiled=False, reduce_each_micro_batch=False
):
    mesh = build_mesh(ParallelDims(**dims_kw), "cpu")
    chunks = build_pipeline_chunks(config(), mesh, SEED, "cpu", schedule, layout)
    for chunk in chunks if compiled else ():
        apply_compile(chunk)
    layouts = [{n: layout_of(c, n, p) for n, p in c.named_parameters()} for c in chunks]
    init_err = max(
        (p - lay[n].slice_of(ref_params[n])).abs().max().item()
        for c, lay in zip(chunks, layouts)
        for n, p in c.named_parameters()
    )
    if fsdp:
        for chunk in chunks:
            apply_recompute(chunk, "full")
            apply_data_parallel(
                chunk, mesh, bf16=False, reshard_after_forward=not splits_weight_backward(schedule)
            )
    x, positions, labels = batch()
    per = x.shape[0] // mesh.dims.dp
    rows = slice(mesh.dp_rank * per, (mesh.dp_rank + 1) * per)
    runner = PipelineRunner(
        chunks, mesh, schedule, MICROBATCHES, reduce_each_micro_batch=reduce_each_micro_batch
    )
    with counting_fsdp_reductions() as reductions:
        losses = runner.step(x[rows], labels[rows], positions[rows])
    reduce_grads(chunks, mesh, fsdp)
    grad_errors = {}
    for chunk, lay in zip(chunks, layouts):
        for n, p in chunk.named_parameters():
            got = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
            want = lay[n].slice_of(ref_params[n].grad)
            err = (
                float("inf")
                if got is None
                else ((got - want).abs().max() / want.abs().max().clamp(min=1e-12))
            )
            grad_errors[f"{n} (stage {chunk.stage_index})"] = float(err)
    norm = clip_grad_norm_(chunks, 0.0, mesh, embedding_copies(config(), mesh.dims.pp)).item()
    counts = sum(
        m.tokens_per_expert.sum().item()
        for c in chunks
        for m in c.modules()
        if hasattr(m, "tokens_per_expert")
    )
    names = sorted({n for c in chunks for n, _ in c.named_parameters()})
    return {
        "init": init_err,
        "grads": grad_errors,
        "losses": losses,
        "norm": norm,
        "tokens_counted": counts,
        "names": names,
        "reductions": reductions[0],
    }


@contextlib.contextmanager
def counting_fsdp_reductions():
    """Counts FSDP2's gradient reductions (one per FSDP unit and reduce-scatter) while the block
    runs: [count]."""
    count = [0]
    original = fsdp_param_group.foreach_reduce

    def counted(*args, **kwargs):
        count[0] += 1
        return original(*args, **kwargs)

    fsdp_param_group.foreach_reduce = counted
    try:
        yield count
    finally:
        fsdp_param_group.foreach_reduce = original


def run_all(rank, world):
    ref_params, ref_losses, ref_norm = reference()
    results = {name: run_layout(ref_params, *spec) for name, spec in LAYOUTS[world].items()}
    return {
        "layouts": results,
        "ref_losses": ref_losses,
        "ref_norm": ref_norm,
        "all_names": sorted(ref_params),
    }


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def results(request):
    world = request.param
    return world, run_distributed(run_all, world, timeout_s=120)


def test_pipeline_layouts_match_single_process(results):
    world, per_rank = results
    failures = []
    for rank, r in enumerate(per_rank):
        for name, got in r["layouts"].items():
            if got["init"] != 0.0:
                failures.append(f"{name} rank {rank}: initial weights differ by {got['init']}")
            worst = max(got["grads"], key=got["grads"].get)
            if got["grads"][worst] > TOLERANCE:
                failures.append(
                    f"{name} rank {rank}: gradient of {worst} differs by {got['grads'][worst]:.2e} "
                    "(relative to its largest value)"
                )
            for key, want in r["ref_losses"].items():
                if abs(got["losses"][key] - want) > TOLERANCE * abs(want):
                    failures.append(f"{name} rank {rank}: {key} {got['losses'][key]} != {want}")
            if abs(got["norm"] - r["ref_norm"]) > TOLERANCE * r["ref_norm"]:
                failures.append(
                    f"{name} rank {rank}: global grad norm {got['norm']} != {r['ref_norm']}"
                )
    assert not failures, "\n".join(failures)


def test_reducing_each_micro_batch_reduces_every_micro_batchs_gradients(results):
    """ReducingEachMicroBatchStage reduce-scatters each FSDP unit once per micro-batch; the plain
    stage once per step, after the last (it accumulates unsharded gradients until then)."""
    world, per_rank = results
    if world != 4:
        pytest.skip("the layouts compared run on 4 ranks")
    for r in per_rank:
        once = r["layouts"]["pp2_dp2_fsdp_recompute_interleaved"]["reductions"]
        each = r["layouts"]["pp2_dp2_fsdp_recompute_interleaved_reduce_each_micro_batch"][
            "reductions"
        ]
        assert once > 0 and each == MICROBATCHES * once, (once, each)


def test_every_parameter_and_routed_token_is_covered(results):
    world, per_rank = results
    moe_layers = sum(t == "sparse" for t in config().mlp_layer_types)
    x, _, _ = batch()
    for name in LAYOUTS[world]:
        held = set().union(*(r["layouts"][name]["names"] for r in per_rank))
        assert held == set(per_rank[0]["all_names"]), (name, set(per_rank[0]["all_names"]) ^ held)
        # Each routed token is counted once per MoE layer over all ranks (no shape-inference
        # forward, no recount).
        total = sum(r["layouts"][name]["tokens_counted"] for r in per_rank)
        assert total == x.numel() * config().num_experts_per_tok * moe_layers, (name, total)


# --------------------------------------------------------------------------------------- pure rules
def test_balanced_default_for_k_exaone():
    k = k_exaone_236b()
    assert format_layout(pipeline_layout(k, pp=8)) == "|".join(
        ["E" + "t" * 6] + ["t" * 6] * 6 + ["t" * 6 + "L"]
    )
    assert format_layout(pipeline_layout(k, pp=8, vpp=2)) == "|".join(
        ["Ettt"] + ["ttt"] * 14 + ["tttL"]
    )
    assert format_layout(pipeline_layout(k, pp=8, vpp=3)) == "|".join(
        ["Ett"] + ["tt"] * 22 + ["ttL"]
    )
    # 48 layers over 5 stages: the 3 left-over layers go to the middle stages, latest first.
    assert [len(s.layers) for s in pipeline_layout(k, pp=5)] == [9, 10, 10, 10, 9]
    specs = pipeline_layout(k, pp=8, vpp=2)
    assert [i for s in specs for i in s.layers] == list(range(48))
    assert [s.embedding for s in specs].index(True) == 0 and [s.head for s in specs].index(
        True
    ) == 15


def test_balanced_default_minimises_the_heaviest_stage():
    """Counting the embedding and the head as one layer each, the heaviest stage is as light as
    possible."""
    for layers in range(2, 50):
        for stages in range(2, layers + 1):
            specs = pipeline_layout(tiny(num_hidden_layers=layers), pp=stages)
            costs = [len(s.layers) + s.embedding + s.head for s in specs]
            assert min(len(s.layers) for s in specs) >= 1
            assert max(costs) == max(-(-(layers + 2) // stages), 2), (layers, stages, costs)


@pytest.mark.parametrize(
    "layout,pp,vpp,expected",
    [
        ("Et|tt|tL", 3, 1, "Et|tt|tL"),
        ("E(t|)*3tL", 2, 2, "Et|t|t|tL"),
        (" E | t*4 | L ", 3, 1, "E|tttt|L"),
        ("E((t)*2|)*2L", 3, 1, "Ett|tt|L"),
    ],
)
def test_explicit_layout(layout, pp, vpp, expected):
    assert format_layout(pipeline_layout(tiny(), pp, vpp, layout)) == expected


@pytest.mark.parametrize(
    "layout,pp,vpp,needles",
    [
        ("Et|tt|tL", 2, 1, ["3 stages but pp*vpp = 2 (pp=2, vpp=1)"]),
        ("EEtt|ttL", 2, 1, ["exactly one 'E'", "found 2"]),
        ("Ett|tt", 2, 1, ["exactly one 'L'", "found 0"]),
        ("tEt|ttL", 2, 1, ["'E' (embedding) must open the first stage"]),
        (
            "Ett|Ltt",
            2,
            1,
            ["'L' (final norm, lm_head, MTP and the loss) must close the last stage"],
        ),
        ("Ett||ttL", 3, 1, ["stage 1 is empty"]),
        ("Ett|tL", 2, 1, ["3 decoder layers ('t') but the model has 4"]),
        ("Etx|ttL", 2, 1, ["unknown character 'x' at position 2"]),
        ("E(tt|ttL", 2, 1, ["'(' is never closed"]),
        ("Ett)|ttL", 2, 1, ["unmatched ')' at position 3"]),
        ("Et*0t|tttL", 2, 1, ["'*' at position 2", "count >= 1"]),
        ("*Et|tttL", 2, 1, ["'*' at position 0", "nothing to repeat"]),
    ],
)
def test_bad_layout_names_the_problem(layout, pp, vpp, needles):
    with pytest.raises(LayoutError) as info:
        pipeline_layout(tiny(), pp, vpp, layout)
    assert f"pipeline layout {layout!r}" in str(info.value)
    for needle in needles:
        assert needle in str(info.value), f"{needle!r} not in: {info.value}"


def test_default_layout_needs_a_layer_per_stage():
    with pytest.raises(LayoutError, match="8 pipeline stages .* 4 decoder layers"):
        pipeline_layout(tiny(), pp=4, vpp=2)


@pytest.mark.parametrize(
    "schedule,vpp",
    [("1f1b", 1), ("interleaved_1f1b", 2), ("interleaved_1f1b", 3), ("zbv", 2), ("dualpipev", 2)],
)
def test_stage_indices_follow_torch_conventions(schedule, vpp):
    pp = 4
    style = "v" if SCHEDULES[schedule].v_shape else "loop"
    torch_rank_of = generate_stage_to_rank_mapping(pp, pp * vpp, style=style)
    for rank in range(pp):
        assert sorted(local_stage_indices(schedule, rank, pp, vpp)) == [
            s for s, r in torch_rank_of.items() if r == rank
        ]


@pytest.mark.parametrize(
    "schedule,pp,vpp,microbatches,needle",
    [
        (
            "gpipe",
            2,
            1,
            4,
            "unknown; choose one of ['1f1b', 'dualpipev', 'interleaved_1f1b', 'zbv']",
        ),
        ("1f1b", 1, 1, 4, "needs pp >= 2"),
        ("1f1b", 2, 2, 4, "1f1b runs one stage per rank but vpp=2"),
        ("interleaved_1f1b", 2, 1, 4, "interleaved_1f1b needs vpp >= 2"),
        ("zbv", 2, 3, 4, "zbv runs exactly two stages per rank"),
        ("1f1b", 4, 1, 3, "1f1b needs at least pp=4 micro-batches, got 3"),
        ("interleaved_1f1b", 2, 2, 5, "multiple of its rounds"),
        (
            "dualpipev",
            2,
            2,
            3,
            "dualpipev needs at least as many micro-batches as stages (4), got 3",
        ),
    ],
)
def test_schedule_validation(schedule, pp, vpp, microbatches, needle):
    with pytest.raises(LayoutError) as info:
        check_schedule(schedule, pp, vpp, microbatches)
    assert needle in str(info.value), str(info.value)
