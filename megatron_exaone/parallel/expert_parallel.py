"""Expert parallelism: routed experts sharded over the `ep` group, tokens moved by an uneven
all-to-all.

The MoE block routes and permutes its tokens to expert-major order for all E experts, then calls
`mlp.experts`. This pass swaps that module for `ExpertParallelExperts`, which holds E/ep experts
and, inside one forward call (so all dispatch metadata lives on the autograd graph, never on a
module):
  1. exchanges per-expert token counts with the other ep ranks,
  2. all-to-all sends each rank's tokens for expert e to the rank owning e (dropless, uneven
     splits),
  3. reorders the received tokens from (source rank, expert) to (expert, source rank) and runs the
     grouped matmul,
  4. undoes the reordering and sends results back with the reverse all-to-all, in the caller's
     order.
Deterministic: every order is a stable function of the routing.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from megatron_exaone.model.moe import GroupedExperts, MoEBlock, dispatch

from . import comm
from .sharding import Shard, shard_parameter


class ExpertParallelExperts(GroupedExperts):
    """`mlp.experts` holding this rank's E/ep experts (same parameter names as the single-device
    module)."""

    def __init__(self, local: GroupedExperts, group: dist.ProcessGroup) -> None:
        nn.Module.__init__(self)
        self.gate_proj, self.up_proj, self.down_proj = (
            local.gate_proj,
            local.up_proj,
            local.down_proj,
        )
        self.group = group

    def forward(self, tokens: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        ep = dist.get_world_size(self.group)
        local_experts = self.gate_proj.shape[0]
        # counts_recv[r, e]: how many tokens rank r sends to my local expert e.
        counts_recv = comm.all_to_all_single_(torch.empty_like(counts), counts, self.group)
        counts_recv = counts_recv.view(ep, local_experts)
        send_splits = counts.view(ep, local_experts).sum(dim=1).tolist()
        recv_splits = counts_recv.sum(dim=1).tolist()
        received = comm.all_to_all(tokens, self.group, recv_splits, send_splits)
        # Received rows are grouped by (source rank, expert); the grouped matmul wants (expert,
        # source rank).
        segment = torch.repeat_interleave(
            torch.arange(ep * local_experts, device=counts.device), counts_recv.reshape(-1)
        )
        expert_major_key = (segment % local_experts) * ep + segment // local_experts
        row_order = torch.argsort(expert_major_key, stable=True)
        expert_out = super().forward(dispatch(received, row_order, 1), counts_recv.sum(dim=0))
        restored = torch.empty_like(expert_out)
        restored[row_order] = expert_out
        return comm.all_to_all(restored, self.group, send_splits, recv_splits)


def apply_expert_parallel(root: nn.Module, group: dist.ProcessGroup) -> None:
    """Keep this rank's E/ep experts of every MoE block of `root` (on the meta device) and route
    through ep."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    if size == 1:
        return
    for name, module in list(root.named_modules()):
        if isinstance(module, MoEBlock):
            experts = module.experts.gate_proj.shape[0]
            if experts % size:
                raise ValueError(f"{name}: {experts} experts do not split over ep={size}.")
            for proj in ("gate_proj", "up_proj", "down_proj"):
                shard_parameter(root, f"{name}.experts.{proj}", Shard(0, rank, size))
            module.experts = ExpertParallelExperts(module.experts, group)
