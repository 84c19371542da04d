"""Every collective of the project: the explicit autograd collectives over a given process group
(plain local tensors, no DTensor) of Megatron's tensor/sequence-parallel regions and the expert
all-to-all, and the plain ones that coordinate gradients, metrics and checkpoints. Every function
returns its input unchanged when the group has one rank. Only tensor (`*_single`) forms of
collectives are used: gloo rejects uneven list forms.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup, ReduceOp

# torch 2.13 renamed the tensor forms (the old names warn); 2.11 only has the old ones.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _size(group: ProcessGroup) -> int:
    return dist.get_world_size(group)


def _all_reduce(x: Tensor, group: ProcessGroup) -> Tensor:
    # A copy, never in place: autograd may hand the same gradient tensor to several branches, and a
    # forward input may be saved by another op for its backward.
    out = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, group=group)
    return out


def _all_gather(x: Tensor, group: ProcessGroup, dim: int) -> Tensor:
    x0 = x.movedim(dim, 0).contiguous()
    out = x0.new_empty((_size(group) * x0.shape[0], *x0.shape[1:]))
    _all_gather_single(out, x0, group=group)
    return out.movedim(0, dim).contiguous()


def _reduce_scatter(x: Tensor, group: ProcessGroup, dim: int) -> Tensor:
    world = _size(group)
    if x.shape[dim] % world:
        raise ValueError(
            f"reduce-scatter: size {x.shape[dim]} of dim {dim} is not divisible by the group size "
            f"{world}."
        )
    x0 = x.movedim(dim, 0).contiguous()
    out = x0.new_empty((x0.shape[0] // world, *x0.shape[1:]))
    _reduce_scatter_single(out, x0, group=group)
    return out.movedim(0, dim).contiguous()


def _split(x: Tensor, group: ProcessGroup, dim: int) -> Tensor:
    world = _size(group)
    if x.shape[dim] % world:
        raise ValueError(
            f"split: size {x.shape[dim]} of dim {dim} is not divisible by the group size {world}."
        )
    chunk = x.shape[dim] // world
    return x.narrow(dim, dist.get_rank(group) * chunk, chunk).contiguous()


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: ProcessGroup) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: ProcessGroup) -> Tensor:
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def _dim_collective(name: str, forward_op: Callable, backward_op: Callable) -> type:
    """An autograd Function running `forward_op(x, group, dim)` forward and `backward_op` on the
    gradient."""

    def forward(ctx, x: Tensor, group: ProcessGroup, dim: int) -> Tensor:
        ctx.group, ctx.dim = group, dim
        return forward_op(x, group, dim)

    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        return backward_op(grad, ctx.group, ctx.dim), None, None

    methods = {"forward": staticmethod(forward), "backward": staticmethod(backward)}
    return type(name, (torch.autograd.Function,), methods)


_ScatterToSP = _dim_collective("_ScatterToSP", _split, _all_gather)
_GatherFromSP = _dim_collective("_GatherFromSP", _all_gather, _reduce_scatter)
_ReduceScatterToSP = _dim_collective("_ReduceScatterToSP", _reduce_scatter, _all_gather)
_AllGatherAlong = _dim_collective("_AllGatherAlong", _all_gather, _split)


def _all_to_all(
    x: Tensor, group: ProcessGroup, out_splits: list[int] | None, in_splits: list[int] | None
) -> Tensor:
    x = x.contiguous()
    rows = sum(out_splits) if out_splits is not None else x.shape[0]
    out = x.new_empty((rows, *x.shape[1:]))
    dist.all_to_all_single(out, x, out_splits, in_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        group: ProcessGroup,
        out_splits: list[int] | None,
        in_splits: list[int] | None,
    ) -> Tensor:
        ctx.group, ctx.out_splits, ctx.in_splits = group, out_splits, in_splits
        return _all_to_all(x, group, out_splits, in_splits)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        return _all_to_all(grad, ctx.group, ctx.in_splits, ctx.out_splits), None, None, None


def copy_to_tp(x: Tensor, group: ProcessGroup) -> Tensor:
    """Forward: identity. Backward: all-reduce (sum) of the gradient over `group`."""
    return x if _size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp(x: Tensor, group: ProcessGroup) -> Tensor:
    """Forward: all-reduce (sum) over `group`. Backward: identity."""
    return x if _size(group) == 1 else _ReduceFromTP.apply(x, group)


def scatter_to_sp(x: Tensor, group: ProcessGroup, dim: int = 1) -> Tensor:
    """Forward: keep this rank's chunk of `dim` (replicated input). Backward: all-gather along
    `dim`."""
    return x if _size(group) == 1 else _ScatterToSP.apply(x, group, dim)


def gather_from_sp(x: Tensor, group: ProcessGroup, dim: int = 1) -> Tensor:
    """Forward: all-gather along `dim` (before a column-parallel linear). Backward: reduce-scatter
    along `dim`."""
    return x if _size(group) == 1 else _GatherFromSP.apply(x, group, dim)


def reduce_scatter_to_sp(x: Tensor, group: ProcessGroup, dim: int = 1) -> Tensor:
    """Forward: reduce-scatter (sum) along `dim` (after a row-parallel linear). Backward: all-gather
    along `dim`."""
    return x if _size(group) == 1 else _ReduceScatterToSP.apply(x, group, dim)


def all_gather_along(x: Tensor, group: ProcessGroup, dim: int) -> Tensor:
    """Forward: all-gather along `dim` (outputs). Backward: keep this rank's chunk of the gradient,
    no reduction."""
    return x if _size(group) == 1 else _AllGatherAlong.apply(x, group, dim)


def all_to_all(
    x: Tensor,
    group: ProcessGroup,
    output_split_sizes: Sequence[int] | None = None,
    input_split_sizes: Sequence[int] | None = None,
) -> Tensor:
    """Forward: all-to-all along dim 0 with (uneven) split sizes. Backward: the reverse all-to-all,
    splits swapped."""
    in_splits = list(input_split_sizes) if input_split_sizes is not None else None
    out_splits = list(output_split_sizes) if output_split_sizes is not None else None
    if in_splits is not None and sum(in_splits) != x.shape[0]:
        raise ValueError(
            f"all_to_all: input_split_sizes sum to {sum(in_splits)} but dim 0 has {x.shape[0]} "
            "rows."
        )
    if _size(group) == 1:
        return x
    return _AllToAll.apply(x, group, out_splits, in_splits)


# -------------------------------------------------------------------------------------- no autograd
# Coordination outside the compute graph (gradient sums, metrics, checkpoints).
# `group=None` is the whole job; with no process group running (one process) or a one-rank group
# each is a no-op.
def _alone(group: ProcessGroup | None) -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1


def all_reduce_(
    tensor: Tensor, group: ProcessGroup | None = None, op: ReduceOp.RedOpType = ReduceOp.SUM
) -> Tensor:
    """In-place all-reduce; returns `tensor`."""
    if not _alone(group):
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def all_to_all_single_(out: Tensor, tensor: Tensor, group: ProcessGroup) -> Tensor:
    """Even all-to-all of `tensor`'s rows into `out`; returns `out`."""
    if _alone(group):
        return out.copy_(tensor)
    dist.all_to_all_single(out, tensor, group=group)
    return out


def all_gather_stack(tensor: Tensor, group: ProcessGroup) -> Tensor:
    """Every rank's `tensor`, stacked in rank order: [group size, *tensor.shape]."""
    return _all_gather(tensor.unsqueeze(0), group, 0) if not _alone(group) else tensor.unsqueeze(0)


def barrier(group: ProcessGroup | None = None) -> None:
    if not _alone(group):
        dist.barrier(group=group)


def global_sum(values: Sequence[float], group: ProcessGroup) -> list[float]:
    """Sum of each number over `group`, in one float64 all-reduce (exact for integers below
    2**53)."""
    total = torch.tensor([float(v) for v in values], dtype=torch.float64)
    return all_reduce_(total, group).tolist()


def all_gather_objects(value: Any, group: ProcessGroup | None = None) -> list[Any]:
    """`value` (any picklable Python value) from every rank of `group`, in rank order. Only for
    values this job made itself, never data read from files."""
    if _alone(group):
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, value, group=group)
    return gathered


def send_(tensor: Tensor, peer: int, group: ProcessGroup) -> None:
    """Blocking send of `tensor` to the rank at index `peer` of `group`."""
    dist.send(tensor.contiguous(), group=group, group_dst=peer)


def recv_(tensor: Tensor, peer: int, group: ProcessGroup) -> Tensor:
    """Blocking receive into `tensor` from the rank at index `peer` of `group`; returns
    `tensor`."""
    dist.recv(tensor, group=group, group_src=peer)
    return tensor
