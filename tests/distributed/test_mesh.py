"""Parallel layout: Megatron rank order (pure), validation messages (pure), and the groups built on
8 gloo ranks."""

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from megatron_exaone.model import k_exaone_236b, tiny
from megatron_exaone.parallel.mesh import LayoutError, ParallelDims, build_mesh, rank_coordinates
from megatron_exaone.parallel.testing import run_distributed

LAYOUTS = {  # name: (dims, world size)
    "tp2_pp2_dp2_ep2": (ParallelDims(tp=2, pp=2, ep=2), 8),
    "tp2_cp2_dp2_ep4": (ParallelDims(tp=2, cp=2, ep=4), 8),
    "tp2_dp4_ep2_etp2": (ParallelDims(tp=2, ep=2, etp=2), 8),
    "k_exaone_tp4_pp8_ep8": (ParallelDims(tp=4, pp=8, ep=8), 64),
    "dp8_ep8": (ParallelDims(ep=8), 8),
}
# Which coordinates a group of each kind shares: members agree on every coordinate named here.
SHARED = {
    "tp": ("pp", "dp", "cp"),
    "cp": ("pp", "dp", "tp"),
    "dp": ("pp", "cp", "tp"),
    "pp": ("dp", "cp", "tp"),
    "ep": ("pp", "edp", "etp"),
    "edp": ("pp", "ep", "etp"),
    "etp": ("pp", "edp", "ep"),
    "dp_cp": ("pp", "tp"),
    "tp_cp_dp": ("pp",),
}


def expected_members(rank: int, kind: str, dims: ParallelDims) -> list[int]:
    mine = rank_coordinates(rank, dims)
    return [
        r
        for r in range(dims.world_size)
        if all(rank_coordinates(r, dims)[k] == mine[k] for k in SHARED[kind])
    ]


@pytest.mark.parametrize("name", LAYOUTS)
def test_rank_coordinates_follow_megatron_order(name):
    dims, world = LAYOUTS[name]
    d = dims.resolve(world)
    seen_dense, seen_expert = set(), set()
    for rank in range(world):
        c = rank_coordinates(rank, d)
        assert (
            rank == c["tp"] + d.tp * c["cp"] + d.tp * d.cp * c["dp"] + d.tp * d.cp * d.dp * c["pp"]
        )
        assert (
            rank
            == c["etp"] + d.etp * c["ep"] + d.etp * d.ep * c["edp"] + d.tp * d.cp * d.dp * c["pp"]
        )
        assert all(0 <= c[k] < getattr(d, k) for k in c)
        seen_dense.add((c["pp"], c["dp"], c["cp"], c["tp"]))
        seen_expert.add((c["pp"], c["edp"], c["ep"], c["etp"]))
    assert len(seen_dense) == len(seen_expert) == world


def test_rank_coordinates_known_values():
    # K-EXAONE public layout: 64 GPUs, TP4 PP8 EP8 -> dp=2, edp=1; rank 13 is stage 1, 6th rank of
    # the stage.
    d = ParallelDims(tp=4, pp=8, ep=8).resolve(64)
    assert (d.dp, d.edp) == (2, 1)
    assert rank_coordinates(13, d) == {
        "pp": 1,
        "dp": 1,
        "cp": 0,
        "tp": 1,
        "edp": 0,
        "ep": 5,
        "etp": 0,
    }
    d = ParallelDims(tp=2, pp=2, ep=2).resolve(8)
    assert rank_coordinates(5, d) == {
        "pp": 1,
        "dp": 0,
        "cp": 0,
        "tp": 1,
        "edp": 0,
        "ep": 1,
        "etp": 0,
    }
    with pytest.raises(ValueError, match="outside the world"):
        rank_coordinates(8, d)


def test_resolve_and_validate_derive_dp():
    assert ParallelDims(tp=2, pp=2).resolve(8).dp == 2
    assert ParallelDims(tp=2, pp=2, dp=2).resolve(8).dp == 2
    d = ParallelDims(tp=4, pp=8, ep=8).validate(64, k_exaone_236b())
    assert (d.dp, d.edp, d.world_size) == (2, 1, 64)
    # 8 KV heads, each replicated twice
    assert ParallelDims(tp=16).validate(16, k_exaone_236b()).tp == 16
    assert ParallelDims(pp=2, vpp=2).validate(4, tiny()).vpp == 2


@pytest.mark.parametrize(
    "dims,world,model,needles",
    [
        (
            ParallelDims(tp=3),
            6,
            k_exaone_236b(),
            ["tp=3 does not divide num_attention_heads=64", "valid tp values", "1, 2"],
        ),
        (
            ParallelDims(tp=3),
            8,
            None,
            ["does not divide the world size 8", "valid tp values: 1, 2, 4, 8"],
        ),
        (ParallelDims(tp=2, pp=3), 8, None, ["tp*cp*pp = 6", "valid pp values: 1, 2, 4"]),
        (
            ParallelDims(tp=2, dp=3),
            8,
            None,
            ["but the world size is 8", "Leave dp unset to derive dp=4"],
        ),
        (ParallelDims(vpp=2), 4, None, ["vpp=2 needs pp > 1", "valid pp values: 2, 4"]),
        (
            ParallelDims(ep=3),
            8,
            None,
            ["ep*etp = 3", "does not divide tp*cp*dp = 8", "valid ep values: 1, 2, 4, 8"],
        ),
        (
            ParallelDims(tp=4, ep=2, etp=2),
            8,
            None,
            ["etp=2 with tp=4", "must be 1", "valid etp values: 1, 4"],
        ),
        (
            ParallelDims(ep=16),
            16,
            tiny(),
            ["ep=16 exceeds num_experts=8", "valid ep values: 1, 2, 4, 8"],
        ),
        (
            ParallelDims(ep=3),
            6,
            tiny(),
            ["ep=3 does not divide num_experts=8", "valid ep values: 1, 2"],
        ),
        (
            ParallelDims(tp=8),
            8,
            tiny(),
            ["tp=8 does not divide num_attention_heads=4", "valid tp values: 1, 2, 4"],
        ),
        (
            ParallelDims(tp=4),
            4,
            tiny(num_attention_heads=12, num_key_value_heads=3),
            ["num_key_value_heads=3: one must divide the other", "valid tp values: 1"],
        ),
        (
            ParallelDims(pp=4, vpp=2),
            4,
            tiny(),
            ["pp*vpp = 8", "4 decoder layers", "valid pp values: 2;"],
        ),
        (ParallelDims(ep=2), 4, tiny(first_k_dense_replace=4), ["no MoE layers", "use ep=1"]),
        (ParallelDims(tp=0), 8, None, ["tp=0", "integer >= 1"]),
    ],
)
def test_validation_names_the_rule_and_a_fix(dims, world, model, needles):
    with pytest.raises(LayoutError) as info:
        dims.validate(world, model)
    for needle in needles:
        assert needle in str(info.value), f"{needle!r} not in: {info.value}"


def test_resolve_rejects_an_indivisible_world():
    with pytest.raises(LayoutError, match="does not divide the world size 6"):
        ParallelDims(tp=4).resolve(6)


# ------------------------------------------------------------------------------------- 8 gloo ranks
GROUP_LAYOUTS = ("tp2_pp2_dp2_ep2", "tp2_cp2_dp2_ep4", "tp2_dp4_ep2_etp2")


def _build_all(rank: int, world: int) -> dict:
    """Per layout: each group's members, this rank's index in it, and an all-reduce over it."""
    out = {}
    for name in GROUP_LAYOUTS:
        mesh = build_mesh(LAYOUTS[name][0], "cpu", timeout=timedelta(seconds=60))
        groups = {kind: getattr(mesh, f"{kind}_group") for kind in SHARED}
        out[name] = {
            "groups": {
                kind: (dist.get_process_group_ranks(g), dist.get_rank(g))
                for kind, g in groups.items()
            },
            "sums": {kind: int(_all_reduce_ones(g)) for kind, g in groups.items()},
            "dense_fsdp": mesh.dense_fsdp_mesh.mesh.flatten().tolist(),
            "expert_fsdp": mesh.expert_fsdp_mesh.mesh.flatten().tolist(),
            "coords": mesh.coords,
            "stages": (mesh.is_first_pp_stage, mesh.is_last_pp_stage),
            "embedding": (
                dist.get_process_group_ranks(mesh.embedding_group),
                int(_all_reduce_ones(mesh.embedding_group)),
            )
            if mesh.embedding_group is not None
            else None,
            "describe": mesh.describe(),
        }
    return out


def _all_reduce_ones(group) -> float:
    t = torch.ones(())
    dist.all_reduce(t, group=group)
    return t.item()


@pytest.fixture(scope="module")
def built():
    return run_distributed(_build_all, 8, timeout_s=60)


@pytest.mark.parametrize("name", GROUP_LAYOUTS)
def test_groups_match_rank_coordinates(built, name):
    d = LAYOUTS[name][0].resolve(8)
    for rank, result in enumerate(built):
        r = result[name]
        assert r["coords"] == rank_coordinates(rank, d)
        for kind, (members, index) in r["groups"].items():
            assert members == expected_members(rank, kind, d), f"rank {rank} {kind}"
            assert r["sums"][kind] == len(members), f"rank {rank} {kind}: all-reduce over the group"
            if kind in r["coords"]:  # a 1-D group's index is the rank's coordinate along it
                assert index == r["coords"][kind], f"rank {rank} {kind}"
        assert r["dense_fsdp"] == expected_members(rank, "dp_cp", d)
        assert r["expert_fsdp"] == expected_members(rank, "edp", d)
        assert r["stages"] == (r["coords"]["pp"] == 0, r["coords"]["pp"] == d.pp - 1)
        ends = (0, d.pp - 1)
        want_embedding = [
            m for m in expected_members(rank, "pp", d) if rank_coordinates(m, d)["pp"] in ends
        ]
        expected = (want_embedding, 2) if d.pp > 1 and r["coords"]["pp"] in ends else None
        assert r["embedding"] == expected, f"rank {rank} embedding group"
        assert (
            "\n" not in r["describe"]
            and f"rank {rank}/8" in r["describe"]
            and f"tp={r['coords']['tp']}/2" in r["describe"]
        )
