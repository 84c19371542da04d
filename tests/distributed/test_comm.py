"""Autograd collectives: forward and backward against the single-process math, on 2 and 4 gloo
ranks.

One `run_distributed` call per world size runs every check on three groups of a tp=2 mesh (tp, dp
and the whole stage); each check is then reported as its own test. Every rank builds all ranks'
inputs and upstream gradients from seeds, so it can compute the expected results locally.
"""

import time
from dataclasses import dataclass, field
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch.testing import assert_close

from megatron_exaone.parallel import comm
from megatron_exaone.parallel.mesh import ParallelDims, build_mesh
from megatron_exaone.parallel.testing import run_distributed

WORLD_SIZES = (2, 4)


@dataclass
class Expect:
    """Records mismatches instead of raising: a rank that stopped a check early would skip the
    collectives its peers are waiting in, and every rank would hang until the timeout."""

    failures: list[str] = field(default_factory=list)

    def close(self, actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
        try:
            assert_close(actual, expected)
        except AssertionError as e:
            self.failures.append(f"{what}: {e}")

    def true(self, ok: bool, what: str) -> None:
        if not ok:
            self.failures.append(what)


def _randn(shape, seed: int) -> torch.Tensor:
    """A deterministic, non-contiguous leaf (collectives must handle strided inputs and
    gradients)."""
    base = torch.randn(
        tuple(reversed(shape)), generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    return base.permute(*reversed(range(len(shape))))


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.clone().requires_grad_()


def _shape(dim: int, size: int) -> tuple[int, ...]:
    shape = [3, 2, 5]
    shape[dim] = size
    return tuple(shape)


def check_copy_to_tp(expect: Expect, r: int, w: int, group) -> None:
    x, g = _leaf(_randn((4, 3), r)), _randn((4, 3), 100 + r)
    y = comm.copy_to_tp(x, group)
    expect.close(y, x.detach(), "forward")
    y.backward(g)
    total = sum(_randn((4, 3), 100 + j) for j in range(w))
    expect.close(x.grad, total, "grad")
    # The add hands the same (contiguous) gradient tensor to both branches: each must see it
    # unreduced.
    a, b = _leaf(_randn((4, 3), r)), _leaf(_randn((4, 3), 50 + r))
    (comm.copy_to_tp(a, group) + comm.copy_to_tp(b, group)).backward(g.contiguous())
    expect.close(a.grad, total, "grad of the first branch")
    expect.close(b.grad, total, "grad of the second branch")


def check_reduce_from_tp(expect: Expect, r: int, w: int, group) -> None:
    x, g = _leaf(_randn((4, 3), r)), _randn((4, 3), 100 + r)
    y = comm.reduce_from_tp(x, group)
    expect.close(y, sum(_randn((4, 3), j) for j in range(w)), "forward")
    expect.close(x.detach(), _randn((4, 3), r), "input unchanged (no in-place all-reduce)")
    y.backward(g)
    expect.close(x.grad, g, "grad")


def check_scatter_to_sp(expect: Expect, r: int, w: int, group) -> None:
    for dim in (0, 1, 2, -1):
        full = _randn(_shape(dim, 2 * w), dim)  # replicated input
        x = _leaf(full)
        y = comm.scatter_to_sp(x, group, dim)
        expect.close(y, full.chunk(w, dim)[r], f"dim {dim} forward")
        grads = [_randn(_shape(dim, 2), 100 + j) for j in range(w)]
        y.backward(grads[r])
        expect.close(x.grad, torch.cat(grads, dim), f"dim {dim} grad (all-gather)")


def check_gather_from_sp(expect: Expect, r: int, w: int, group) -> None:
    for dim in (0, 1, 2, -1):
        chunks = [_randn(_shape(dim, 2), j) for j in range(w)]
        x = _leaf(chunks[r])
        y = comm.gather_from_sp(x, group, dim)
        expect.close(y, torch.cat(chunks, dim), f"dim {dim} forward")
        grads = [_randn(_shape(dim, 2 * w), 100 + j) for j in range(w)]
        y.backward(grads[r])
        expect.close(
            x.grad, sum(grads).chunk(w, dim)[r], f"dim {dim} grad (reduce-scatter by hand)"
        )


def check_reduce_scatter_to_sp(expect: Expect, r: int, w: int, group) -> None:
    for dim in (0, 1, 2, -1):
        inputs = [_randn(_shape(dim, 2 * w), j) for j in range(w)]
        x = _leaf(inputs[r])
        y = comm.reduce_scatter_to_sp(x, group, dim)
        expect.close(y, sum(inputs).chunk(w, dim)[r], f"dim {dim} forward")
        grads = [_randn(_shape(dim, 2), 100 + j) for j in range(w)]
        y.backward(grads[r])
        expect.close(x.grad, torch.cat(grads, dim), f"dim {dim} grad (all-gather)")


def check_all_gather_along(expect: Expect, r: int, w: int, group) -> None:
    for dim in (0, 1, 2, -1):
        chunks = [_randn(_shape(dim, 2), j) for j in range(w)]
        x = _leaf(chunks[r])
        y = comm.all_gather_along(x, group, dim)
        expect.close(y, torch.cat(chunks, dim), f"dim {dim} forward")
        g = _randn(_shape(dim, 2 * w), 100 + r)
        y.backward(g)
        expect.close(x.grad, g.chunk(w, dim)[r], f"dim {dim} grad (own chunk, no reduction)")


def _splits(w: int) -> list[list[int]]:
    """sends[i][j]: rows rank i sends to rank j. Includes zeros; the last rank sends nothing at
    all."""
    return [[0 if i == w - 1 else (i * w + j) % 3 for j in range(w)] for i in range(w)]


def _segments(t: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    return list(torch.split(t, sizes, dim=0))


def check_all_to_all(expect: Expect, r: int, w: int, group) -> None:
    sends = _splits(w)
    inputs = [_randn((sum(sends[i]), 4), i) for i in range(w)]
    x = _leaf(inputs[r])
    received = [sends[j][r] for j in range(w)]
    y = comm.all_to_all(x, group, output_split_sizes=received, input_split_sizes=sends[r])
    expect.close(
        y, torch.cat([_segments(inputs[j], sends[j])[r] for j in range(w)]), "uneven forward"
    )
    # shaped like each output
    grads = [_randn((sum(sends[j][i] for j in range(w)), 4), 100 + i) for i in range(w)]
    y.backward(grads[r])
    # Row block j of my input went to rank j; its gradient is rank j's gradient block for source r.
    expected = [_segments(grads[j], [sends[i][j] for i in range(w)])[r] for j in range(w)]
    expect.close(x.grad, torch.cat(expected), "uneven grad (reverse all-to-all)")
    x = _leaf(_randn((2 * w, 3), r))
    y = comm.all_to_all(x, group)
    expect.close(
        y, torch.cat([_randn((2 * w, 3), j)[2 * r : 2 * r + 2] for j in range(w)]), "even forward"
    )
    y.backward(_randn((2 * w, 3), 100 + r))
    expect.close(
        x.grad,
        torch.cat([_randn((2 * w, 3), 100 + j)[2 * r : 2 * r + 2] for j in range(w)]),
        "even grad",
    )


def check_helpers(expect: Expect, r: int, w: int, group) -> None:
    t = torch.full((2,), float(r))
    expect.true(comm.all_reduce_(t, group) is t, "all_reduce_ returns its argument")
    expect.close(t, torch.full((2,), float(sum(range(w)))), "all_reduce_ sum")
    expect.close(
        comm.all_reduce_(torch.tensor([float(r)]), group, op=dist.ReduceOp.MAX),
        torch.tensor([w - 1.0]),
        "all_reduce_ max",
    )
    expect.true(
        comm.global_sum([r, 1.5, 2**40], group) == [sum(range(w)), 1.5 * w, 2**40 * w], "global_sum"
    )


def check_size_one_group_is_a_no_op(expect: Expect, r: int, w: int, group) -> None:
    x = torch.randn(2, 4, 3)
    for fn in (
        comm.copy_to_tp,
        comm.reduce_from_tp,
        comm.scatter_to_sp,
        comm.gather_from_sp,
        comm.reduce_scatter_to_sp,
    ):
        expect.true(fn(x, group) is x, fn.__name__)
    expect.true(comm.all_gather_along(x, group, 2) is x, "all_gather_along")
    expect.true(comm.all_to_all(x, group, [2], [2]) is x, "all_to_all")
    expect.true(comm.global_sum([r], group) == [r], "global_sum")


CHECKS = {
    f.__name__.removeprefix("check_"): f
    for f in (
        check_copy_to_tp,
        check_reduce_from_tp,
        check_scatter_to_sp,
        check_gather_from_sp,
        check_reduce_scatter_to_sp,
        check_all_gather_along,
        check_all_to_all,
        check_helpers,
    )
}


def _run_checks(rank: int, world: int) -> dict[str, list[str]]:
    """Every check on every group; returns each check's failures, labelled with the rank and
    group."""
    mesh = build_mesh(ParallelDims(tp=2), "cpu", timeout=timedelta(seconds=60))
    # dp is {r, r+2}, so group ranks differ from global ranks; on 2 ranks it has size 1, like cp
    # always.
    groups = {"tp": mesh.tp_group, "dp": mesh.dp_group, "stage": mesh.tp_cp_dp_group}
    runs = [
        (name, check, group_name, group)
        for name, check in CHECKS.items()
        for group_name, group in groups.items()
    ]
    runs.append(("size_one_group_is_a_no_op", check_size_one_group_is_a_no_op, "cp", mesh.cp_group))
    failures: dict[str, list[str]] = {name: [] for name, *_ in runs}
    for name, check, group_name, group in runs:
        expect = Expect()
        check(expect, dist.get_rank(group), dist.get_world_size(group), group)
        failures[name] += [f"rank {rank}, {group_name} group: {f}" for f in expect.failures]
    return failures


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda w: f"{w}ranks")
def failures(request) -> dict[str, list[str]]:
    merged: dict[str, list[str]] = {}
    for per_rank in run_distributed(_run_checks, request.param, timeout_s=60):
        for name, messages in per_rank.items():
            merged.setdefault(name, []).extend(messages)
    return merged


@pytest.mark.parametrize("check", [*CHECKS, "size_one_group_is_a_no_op"])
def test_collective(failures, check):
    assert not failures[check], "\n".join(failures[check])


# ------------------------------------------------------------------------------------- the launcher
def _fail_on_rank_one(rank: int, world: int) -> None:
    if rank == 1:
        raise RuntimeError("deliberate failure on rank 1")
    dist.barrier()


def _sleep(rank: int, world: int) -> None:
    time.sleep(60)


def test_run_distributed_returns_results_by_rank():
    assert run_distributed(lambda rank, world, k: (rank, world, k), 2, "x", timeout_s=30) == [
        (0, 2, "x"),
        (1, 2, "x"),
    ]


def test_run_distributed_reraises_a_rank_error():
    with pytest.raises(Exception, match="deliberate failure on rank 1") as info:
        run_distributed(_fail_on_rank_one, 2, timeout_s=30)
    assert "_fail_on_rank_one" in str(info.value)  # the failing rank's traceback


def test_run_distributed_times_out():
    with pytest.raises(TimeoutError, match="timeout_s=1"):
        run_distributed(_sleep, 2, timeout_s=1)
