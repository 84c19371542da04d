"""What each local parameter is a slice of, and layout-invariant materialization from that record.

Parallel passes work on a model built on the meta device. Each pass that shrinks a parameter records
how (`Shard`s, outermost first: tensor parallel, then expert parallel); `materialize` then allocates
the local tensors and fills each with its slice of the single-process initial value, so every layout
starts from the same full weights. The record also gives checkpoints the global shape and offsets of
every local tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from megatron_exaone.model.config import ModelConfig
from megatron_exaone.model.init import full_init, is_stacked_experts

PLAN_ATTR = "_exaone_parallel_plan"


@dataclass(frozen=True)
class Shard:
    """This rank holds chunk `index` of `count` equal chunks along `dim`."""

    dim: int
    index: int
    count: int


@dataclass
class ParamLayout:
    full_shape: tuple[int, ...]
    shards: tuple[Shard, ...] = ()

    def local_shape(self) -> tuple[int, ...]:
        shape = list(self.full_shape)
        for s in self.shards:
            shape[s.dim] //= s.count
        return tuple(shape)

    def offsets(self) -> tuple[int, ...]:
        """Offset of the local slice in the full tensor, per dimension."""
        offsets = [0] * len(self.full_shape)
        sizes = list(self.full_shape)
        for s in self.shards:
            sizes[s.dim] //= s.count
            offsets[s.dim] += s.index * sizes[s.dim]
        return tuple(offsets)

    def slice_of(self, full: torch.Tensor) -> torch.Tensor:
        for s in self.shards:
            full = full.chunk(s.count, dim=s.dim)[s.index]
        return full


@dataclass
class ParallelPlan:
    """Per-model record written by the passes: parameter layouts and which gradients need a TP
    all-reduce.

    `tp_replicated_kv`: k/v projections when tp exceeds the KV head count; tp / kv_heads ranks hold
    the same head, each with part of its gradient."""

    layouts: dict[str, ParamLayout] = field(default_factory=dict)
    tp_partial_grads: set[str] = field(default_factory=set)
    tp_replicated_kv: set[str] = field(default_factory=set)


def plan_of(model: nn.Module) -> ParallelPlan:
    plan = getattr(model, PLAN_ATTR, None)
    if plan is None:
        plan = ParallelPlan()
        object.__setattr__(model, PLAN_ATTR, plan)
    return plan


def shard_parameter(root: nn.Module, name: str, shard: Shard) -> None:
    """Replace parameter `name` of `root` by its local chunk (meta tensors: no data is moved) and
    record it."""
    module_name, _, attr = name.rpartition(".")
    module = root.get_submodule(module_name)
    param = getattr(module, attr)
    if param.shape[shard.dim] % shard.count:
        raise ValueError(
            f"{name}: dimension {shard.dim} of size {param.shape[shard.dim]} does not split into "
            f"{shard.count} equal parts."
        )
    layout = plan_of(root).layouts.setdefault(name, ParamLayout(tuple(param.shape)))
    layout.shards = layout.shards + (shard,)
    local = param.detach().chunk(shard.count, dim=shard.dim)[shard.index]
    setattr(
        module,
        attr,
        nn.Parameter(
            local.clone() if local.device.type != "meta" else torch.empty_like(local),
            requires_grad=param.requires_grad,
        ),
    )


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The local shard of an FSDP2 DTensor, or the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def layout_of(root: nn.Module, name: str, param: torch.Tensor) -> ParamLayout:
    return plan_of(root).layouts.get(name) or ParamLayout(tuple(param.shape))


@torch.no_grad()
def materialize(
    root: nn.Module,
    config: ModelConfig,
    seed: int,
    device: torch.device | str,
    name_prefix: str = "",
) -> None:
    """Allocate `root` (built on meta, possibly sharded) on `device` and fill every parameter with
    its slice of the single-process initialization. `name_prefix` maps local names to full-model
    names (pipeline stages)."""
    root.to_empty(device=device)
    for name, param in root.named_parameters():
        layout = layout_of(root, name, param)
        full_name = name_prefix + name
        experts = None
        if is_stacked_experts(full_name) and layout.shards and layout.shards[0].dim == 0:
            first = layout.shards[0]  # expert parallel: draw only this rank's experts
            per_rank = layout.full_shape[0] // first.count
            experts = range(first.index * per_rank, (first.index + 1) * per_rank)
            value = full_init(
                config, full_name, torch.Size(layout.full_shape), seed, device, experts=experts
            )
            value = ParamLayout((per_rank, *layout.full_shape[1:]), layout.shards[1:]).slice_of(
                value
            )
        else:
            value = layout.slice_of(
                full_init(config, full_name, torch.Size(layout.full_shape), seed, device)
            )
        param.copy_(value)
    for name, buf in root.named_buffers():
        if name.endswith(("e_score_correction_bias", "tokens_per_expert")):
            buf.zero_()
