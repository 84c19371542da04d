"""Reshardable checkpoints: train one AdamW step under layout A, save, load under layout B.

Every parameter, buffer and optimizer state B loads must equal (exactly) its slice of what A held.
The reference is assembled in the test process from every A rank's local tensors placed by their
`ParamLayout` offsets (FSDP shards gathered with `full_tensor()`), independently of the checkpoint
code. Two more training steps after the load give the same losses as A continuing without a
checkpoint (bit-exact when B is A's layout).

Order of the process groups: world 4 saves tp4 with replicated KV heads; world 2 saves tp2 / dp2
(async) / ep2 and loads dp2 -> tp2, dp2 -> dp2, tp4_kv2 -> tp2_kv2; world 8 saves pipeline chunks
(pp2 x vpp2 x tp2, model only); world 4 loads tp2 -> ep2 x edp2 (FSDP) and ep2 -> tp2 x dp2 x ep2
(FSDP); world 1 loads tp2 (through `load_model_state` / `load_optimizer_state`) and the pipeline
checkpoint.
"""

import json

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from megatron_exaone.checkpoint import state as ckpt
from megatron_exaone.checkpoint.store import find_checkpoint, read_meta
from megatron_exaone.model import tiny
from megatron_exaone.model.moe import update_expert_bias
from megatron_exaone.model.mtp import shift_left
from megatron_exaone.parallel.build import build_parallel_model, reduce_grads
from megatron_exaone.parallel.data_parallel import apply_data_parallel
from megatron_exaone.parallel.mesh import ParallelDims, build_mesh
from megatron_exaone.parallel.sharding import layout_of
from megatron_exaone.parallel.testing import run_distributed

SEED = 3
# name -> (ParallelDims kwargs, FSDP2, KV heads)
LAYOUTS = {
    "single": (dict(), False, 4),
    "tp2": (dict(tp=2), False, 4),
    "dp2": (dict(dp=2), True, 4),
    "ep2": (dict(ep=2), True, 4),
    "tp2_kv2": (dict(tp=2), False, 2),
    "tp4_kv2": (dict(tp=4), False, 2),
    "ep2_edp2": (dict(ep=2), True, 4),  # on 4 ranks: dense FSDP over dp=4, experts ep=2 x edp=2
    "tp2_dp2_ep2": (dict(tp=2, dp=2, ep=2), True, 4),
}
# (saved by, loaded by)
PAIRS = [
    ("dp2", "tp2"),
    ("dp2", "dp2"),
    ("tp4_kv2", "tp2_kv2"),
    ("tp2", "ep2_edp2"),
    ("ep2", "tp2_dp2_ep2"),
    ("tp2", "single"),
]
ASYNC = {"dp2"}


def config(layout: str):
    return tiny(
        vocab_size=128,
        aux_loss_coeff=0.01,
        sliding_window=4,
        num_attention_heads=4,
        num_key_value_heads=LAYOUTS[layout][2],
    )


def batch(index: int):
    gen = torch.Generator().manual_seed(index)
    x = torch.randint(1, 128, (4, 16), generator=gen)
    positions = torch.cat([torch.arange(10), torch.arange(6)]).expand(4, 16)
    return x, positions, shift_left(x, 1, -100)


def setup(layout: str):
    dims_kw, fsdp, _ = LAYOUTS[layout]
    mesh = build_mesh(ParallelDims(**dims_kw), "cpu")
    model = build_parallel_model(
        config(layout), mesh, seed=SEED, device="cpu", sequence_parallel=True
    )
    if fsdp:
        apply_data_parallel(model, mesh, bf16=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    return mesh, model, optimizer


def train_step(layout: str, mesh, model, optimizer, index: int) -> float:
    """One optimizer step on global batch `index`; returns the global LM loss."""
    fsdp = LAYOUTS[layout][1]
    x, positions, labels = batch(index)
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
    update_expert_bias(
        model, 1e-3, reduce_counts=lambda t: dist.all_reduce(t, group=mesh.tp_cp_dp_group)
    )
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    lm_loss = out.lm_loss.detach().clone()
    # each dp rank's share, normalised by the global count
    dist.all_reduce(lm_loss, group=mesh.dp_cp_group)
    return lm_loss.item()


def pieces(model, optimizer) -> dict[str, tuple]:
    """name -> (full shape, offsets, local value) of every parameter, buffer and optimizer state of
    this rank, read through FSDP's own all-gather and the passes' ParamLayout (not through the
    checkpoint code)."""

    def whole(t):
        return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()

    out = {}
    params = dict(model.named_parameters())
    for name, p in params.items():
        layout = layout_of(model, name, p)
        out[name] = (layout.full_shape, layout.offsets(), whole(p))
        for key, value in optimizer.state.get(p, {}).items():
            if value.ndim:
                out[f"optim.{name}.{key}"] = (layout.full_shape, layout.offsets(), whole(value))
            else:
                out[f"optim.{name}.{key}"] = ((), (), value.clone())
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            out[name] = (tuple(buf.shape), (0,) * buf.ndim, buf.clone())
    return out


def save_layout(rank, world, layout, root):
    mesh, model, optimizer = setup(layout)
    torch.manual_seed(100 + rank)
    loss1 = train_step(layout, mesh, model, optimizer, 1)
    reference = pieces(model, optimizer)
    extra = {
        "tokens": 64,
        "loader": {"seed": 7, "stage": 0, "tokens_consumed": 64, "stage_start_tokens": 0},
    }
    handle = ckpt.save(
        f"{root}/{layout}", 1, [model], optimizer, mesh, extra=extra, async_save=layout in ASYNC
    )
    # Training goes on while an async save writes: the checkpoint must hold the weights of the save
    # call.
    after_save_draw = torch.rand(3)
    losses = [loss1] + [train_step(layout, mesh, model, optimizer, i) for i in (2, 3)]
    if layout in ASYNC:
        assert ckpt.wait_pending_save() == handle.wait() == find_checkpoint(f"{root}/{layout}")
    return {"reference": reference, "losses": losses, "draw": after_save_draw}


def load_layout(rank, world, saved, layout, root):
    mesh, model, optimizer = setup(layout)
    if world == 1:  # the separate model / optimizer entry points
        path = find_checkpoint(f"{root}/{saved}")
        ckpt.load_model_state([model], mesh, path)
        ckpt.load_optimizer_state([model], optimizer, mesh, path)
        extra = None
    else:
        extra = ckpt.load(f"{root}/{saved}", [model], optimizer, mesh).extra
    draw = torch.rand(3)
    got = pieces(model, optimizer)
    losses = [train_step(layout, mesh, model, optimizer, i) for i in (2, 3)]
    return {"pieces": got, "losses": losses, "draw": draw, "extra": extra}


PIPELINE_CONFIG = dict(
    vocab_size=128, num_attention_heads=4, num_key_value_heads=4, num_nextn_predict_layers=1
)


def save_pipeline(root):
    """pp=2 x vpp=2 x tp=2 chunks (the last stage holds a copy of the embedding for MTP), weights
    scaled by 1.5."""
    from megatron_exaone.parallel.build import build_pipeline_chunks

    mesh = build_mesh(ParallelDims(pp=2, vpp=2, tp=2), "cpu")
    chunks = build_pipeline_chunks(
        tiny(**PIPELINE_CONFIG), mesh, SEED, "cpu", schedule="interleaved_1f1b"
    )
    with torch.no_grad():
        for chunk in chunks:
            for p in chunk.parameters():
                p.mul_(1.5)
    ckpt.save(f"{root}/pp2_vpp2_tp2", 1, chunks, None, mesh)


def load_pipeline(root):
    from megatron_exaone.model import build_model

    mesh = build_mesh(ParallelDims(), "cpu")
    model = build_parallel_model(tiny(**PIPELINE_CONFIG), mesh, seed=SEED + 1, device="cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    extra = ckpt.load(f"{root}/pp2_vpp2_tp2", [model], optimizer, mesh).extra
    # a model-only checkpoint: the optimizer starts fresh
    assert extra == {} and not optimizer.state
    reference = dict(build_model(tiny(**PIPELINE_CONFIG), seed=SEED).named_parameters())
    return [n for n, p in model.named_parameters() if not torch.equal(p, 1.5 * reference[n])]


def run(rank, world, saves, loads, root, pipeline=None):
    results = {"save": {}, "load": {}}
    for layout in saves:
        results["save"][layout] = save_layout(rank, world, layout, root)
    for saved, layout in loads:
        results["load"][(saved, layout)] = load_layout(rank, world, saved, layout, root)
    if pipeline == "save":
        save_pipeline(root)
    elif pipeline == "load":
        results["pipeline"] = load_pipeline(root)
    return results


def assemble(per_rank: list[dict]) -> dict[str, torch.Tensor]:
    full = {}
    for rank_pieces in per_rank:
        for name, (shape, offsets, local) in rank_pieces.items():
            target = full.setdefault(name, torch.full(shape, float("nan"), dtype=local.dtype))
            target[tuple(slice(o, o + n) for o, n in zip(offsets, local.shape))] = local
    return full


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("reshard"))
    saved, loaded = {}, {"pipeline": None}
    plan = [
        (4, ["tp4_kv2"], [], None),
        (2, ["tp2", "dp2", "ep2"], [("dp2", "tp2"), ("dp2", "dp2"), ("tp4_kv2", "tp2_kv2")], None),
        (8, [], [], "save"),
        (4, [], [("tp2", "ep2_edp2"), ("ep2", "tp2_dp2_ep2")], None),
        (1, [], [("tp2", "single")], "load"),
    ]
    for world, saves, loads, pipeline in plan:
        per_rank = run_distributed(run, world, saves, loads, root, pipeline, timeout_s=120)
        for layout in saves:
            saved[layout] = [r["save"][layout] for r in per_rank]
        for pair in loads:
            loaded[pair] = [r["load"][pair] for r in per_rank]
        if pipeline == "load":
            loaded["pipeline"] = per_rank[0]["pipeline"]
    return root, saved, loaded


@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: f"{p[0]}->{p[1]}")
def test_loaded_state_is_the_saved_state(results, pair):
    _, saved, loaded = results
    reference = assemble([r["reference"] for r in saved[pair[0]]])
    assert not any(t.isnan().any() for t in reference.values())
    names = set()
    for rank, result in enumerate(loaded[pair]):
        for name, (_shape, offsets, local) in result["pieces"].items():
            names.add(name)
            want = reference[name][tuple(slice(o, o + n) for o, n in zip(offsets, local.shape))]
            assert torch.equal(local, want), (
                f"{pair} rank {rank}: {name} differs from the saved value"
            )
    assert names == set(reference), set(reference) ^ names
    assert any(".experts." in n and n.endswith("exp_avg_sq") for n in names)


@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: f"{p[0]}->{p[1]}")
def test_training_continues_as_without_a_checkpoint(results, pair):
    _, saved, loaded = results
    want = saved[pair[0]][0]["losses"][1:]
    for result in loaded[pair]:
        if pair[0] == pair[1]:
            assert result["losses"] == want  # same layout: bit-exact resume
        else:
            assert result["losses"] == pytest.approx(want, abs=1e-5)


def test_pipeline_chunks_save_and_load_into_one_process(results):
    _, _, loaded = results
    assert loaded["pipeline"] == []  # names of parameters that differ


def test_extra_rng_and_meta(results):
    root, saved, loaded = results
    for pair, per_rank in loaded.items():
        if pair == "pipeline" or per_rank[0]["extra"] is None:
            continue
        for rank, result in enumerate(per_rank):
            assert (
                result["extra"]["tokens"] == 64
                and result["extra"]["loader"]["tokens_consumed"] == 64
            )
            # Same layout: the RNG continues exactly where the saving rank's did; otherwise it is
            # left alone.
            saver = saved[pair[0]][rank % len(saved[pair[0]])]
            same_draw = torch.equal(result["draw"], saver["draw"])
            assert same_draw == (pair[0] == pair[1]), pair
    meta = read_meta(find_checkpoint(f"{root}/ep2"))
    assert (
        meta["step"] == 1
        and meta["layout"]["ep"] == 2
        and meta["world_size"] == 2
        and meta["tokens"] == 64
    )
    assert meta["model_config"]["num_experts"] == config("ep2").num_experts
    json.dumps(meta)
