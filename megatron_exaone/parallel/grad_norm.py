"""Gradient clipping by the global norm over every mesh (tp, pp, ep, dp, FSDP shards).

Each rank adds the squared norms of its local gradient tensors, each divided by how many ranks hold
an identical copy of that tensor, and one all-reduce over the whole world gives the global squared
norm.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from megatron_exaone.parallel.comm import all_reduce_

from .mesh import ParallelMesh
from .sharding import local_tensor, plan_of


def _replicas(
    name: str, grad: torch.Tensor, tp_copies: int, mesh: ParallelMesh, embedding_copies: int
) -> int:
    """How many ranks hold exactly this local gradient tensor (`tp_copies`: how many TP ranks hold
    it)."""
    fsdp_sharded = isinstance(grad, DTensor)
    dims = mesh.dims
    if ".experts." in name:
        return 1 if fsdp_sharded else dims.edp
    copies = tp_copies
    if not fsdp_sharded:
        copies *= dims.dp * dims.cp
    if name.endswith("embed_tokens.weight"):
        copies *= embedding_copies
    return copies


def clip_grad_norm_(
    chunks: Iterable[nn.Module], max_norm: float, mesh: ParallelMesh, embedding_copies: int = 1
) -> torch.Tensor:
    """Scale all gradients so that their global L2 norm is at most `max_norm`; return the norm
    before clipping.

    `chunks` are this rank's model chunks (pipeline stages); `embedding_copies` is 2 when the first
    and last pipeline stages both hold the (synchronised) embedding.
    """
    chunks = list(chunks)
    grads: list[torch.Tensor] = []
    total = None
    for chunk in chunks:
        plan = plan_of(chunk)
        for name, param in chunk.named_parameters():
            if param.grad is None:
                continue
            local = local_tensor(param.grad)
            if name in plan.tp_replicated_kv:
                tp_copies = mesh.dims.tp // plan.layouts[name].shards[0].count
            else:
                tp_copies = 1 if name in plan.layouts else mesh.dims.tp
            weight = 1.0 / _replicas(name, param.grad, tp_copies, mesh, embedding_copies)
            sq = local.detach().float().pow(2).sum() * weight
            total = sq if total is None else total + sq
            grads.append(local)
    if total is None:
        total = torch.zeros((), device=mesh.dense.device_type)
    all_reduce_(total)
    norm = total.sqrt()
    if max_norm > 0 and math.isfinite(norm.item()):
        scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for g in grads:
            g.mul_(scale.to(g.dtype))
    return norm
