"""Muon for sharded models: each update is orthogonalised on the FULL weight matrix (every routed
expert on its own), whatever TP / FSDP layout the parameter has.

For each matrix the local momentum update is gathered to the full matrix (FSDP shards, then the
tensor-parallel shards recorded in the parallel plan), run through the Newton-Schulz iteration, and
this rank's slice is applied. Every rank holding a piece computes the same orthogonalisation
("duplicated" mode, as Megatron's default for TP): simple and exact; a distributed mode with one
owner per matrix would save compute at scale. Embeddings, the output head, the router, norms and
biases belong in an AdamW group (see `build_optimizer`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from megatron_exaone.parallel.comm import all_gather_stack
from megatron_exaone.parallel.sharding import ParamLayout, local_tensor

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic, as torch.optim.Muon


def newton_schulz(update: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately orthogonalise the last two dims of `update` (batched over leading dims)."""
    a, b, c = NS_COEFFICIENTS
    x = update.to(torch.bfloat16 if update.is_cuda else torch.float32)
    transposed = x.shape[-2] > x.shape[-1]
    if transposed:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.mT if transposed else x).to(update.dtype)


def lr_scale(rows: int, cols: int, adjust: str) -> float:
    """'match_rms_adamw' (Moonlight): 0.2 * sqrt(max(A, B)); 'original': sqrt(max(1, A / B))."""
    if adjust == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    if adjust == "original":
        return math.sqrt(max(1.0, rows / cols))
    raise ValueError(f"muon adjust_lr={adjust!r}: use 'match_rms_adamw' or 'original'.")


class ShardedMatrix:
    """How to go between a parameter's local tensor and its full matrix (stack of matrices for
    experts)."""

    def __init__(
        self,
        param: torch.Tensor,
        layout: ParamLayout,
        tp_group: dist.ProcessGroup | None = None,
        tp_size: int = 1,
    ) -> None:
        self.param = param
        # Dense weights record their tensor-parallel shard first; stacked experts are only split
        # into whole experts (expert parallel), which needs no gather.
        stacked_experts = param.ndim == 3
        self.tp_shard = (
            layout.shards[0] if layout.shards and not stacked_experts and tp_size > 1 else None
        )
        self.tp_group = tp_group
        self.tp_size = tp_size

    def full(self, local: torch.Tensor) -> torch.Tensor:
        value = local
        if isinstance(self.param, DTensor):
            value = DTensor.from_local(
                local,
                self.param.device_mesh,
                self.param.placements,
                shape=self.param.shape,
                stride=self.param.stride(),
            ).full_tensor()
        if self.tp_shard is not None:
            pieces = all_gather_stack(value.contiguous(), self.tp_group)
            # replicated KV heads appear `replicas` times in a row
            replicas = self.tp_size // self.tp_shard.count
            value = torch.cat(list(pieces[::replicas]), dim=self.tp_shard.dim)
        return value

    def local(self, full: torch.Tensor) -> torch.Tensor:
        if self.tp_shard is not None:
            full = full.chunk(self.tp_shard.count, dim=self.tp_shard.dim)[self.tp_shard.index]
        if isinstance(self.param, DTensor):
            shape, offset = compute_local_shape_and_global_offset(
                self.param.shape, self.param.device_mesh, self.param.placements
            )
            full = full[tuple(slice(o, o + n) for o, n in zip(offset, shape))]
        return full


class Muon(torch.optim.Optimizer):
    """SGD-momentum (Nesterov) whose update is orthogonalised per full matrix; decoupled weight
    decay.

    `matrices` maps each parameter to a `ShardedMatrix` (identity for an unsharded single-process
    model).
    """

    def __init__(
        self,
        params,
        matrices: dict[torch.Tensor, ShardedMatrix],
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        adjust_lr: str = "match_rms_adamw",
    ) -> None:
        super().__init__(
            params,
            dict(
                lr=lr,
                weight_decay=weight_decay,
                momentum=momentum,
                nesterov=nesterov,
                ns_steps=ns_steps,
                adjust_lr=adjust_lr,
            ),
        )
        self.matrices = matrices

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                matrix = self.matrices[p]
                grad = local_tensor(p.grad)
                state = self.state[p]
                # same type and layout as the parameter (checkpointable)
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = local_tensor(state["momentum_buffer"])
                buf.mul_(group["momentum"]).add_(grad)
                update = grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
                full = newton_schulz(matrix.full(update), group["ns_steps"])
                scale = lr_scale(full.shape[-2], full.shape[-1], group["adjust_lr"])
                weight = local_tensor(p)
                weight.mul_(1 - group["lr"] * group["weight_decay"])
                weight.add_(matrix.local(full).to(weight.dtype), alpha=-group["lr"] * scale)
        return loss
