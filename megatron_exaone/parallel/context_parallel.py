"""Context parallelism (cp): each rank of a cp group computes 1/cp of the tokens of every sequence.

A pass over the meta-device model or pipeline chunk, after tensor and expert parallel:
- The model gets a `SequenceShard`: it still receives whole sequences (every rank of a cp group loads the same
  ones) and computes only its zigzag share, 2 chunks of S / (2 cp) tokens, so causal-attention work is balanced.
  MTP inputs and labels are shifted on the whole sequences before sharding.
- Attention gathers keys and values over cp (backward: their gradients reduce-scattered back), restores sequence
  order and attends with the local queries to the whole sequence under the causal, window and document mask of
  their positions. Exact for every window and packed document, and it composes with TP/SP (heads and the local
  sequence split over tp). It moves the whole K/V each layer, like TE's `all_gather` scheme; sliding layers need
  only the previous W - 1 tokens (a halo exchange), which is the next step for long sequences.
- MoE blocks sum their per-sequence statistics (sequence aux loss) over cp x tp.
Loss normalisation, gradient reduction (dp x cp) and expert-load counts (all ranks of a stage) already span cp.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from megatron_exaone.model.attention import Attention
from megatron_exaone.model.moe import MoEBlock
from megatron_exaone.model.sequence_shard import SequenceShard, zigzag_order

from . import comm
from .mesh import ParallelMesh
from .tensor_parallel import sequence_stats_reducer


class ContextParallelAttention(Attention):
    """Attention of this rank's queries over the whole sequence; `cp_group` is set by `apply_context_parallel`."""

    cp_group: dist.ProcessGroup

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask) -> torch.Tensor:
        batch, seq, _ = x.shape
        q, k, v = self.project(x, rope)
        k, v = self.gather_sequence(k), self.gather_sequence(v)
        return self.o_proj(self.attend(q, k, v, mask).transpose(1, 2).reshape(batch, seq, -1))

    def gather_sequence(self, t: torch.Tensor) -> torch.Tensor:
        """[B, heads, S / cp, D] of this rank -> [B, heads, S, D] of the whole sequence, in sequence order."""
        gathered = comm.gather_from_sp(t, self.cp_group, dim=2)
        order = zigzag_order(gathered.shape[2], dist.get_world_size(self.cp_group), t.device)
        return gathered.index_select(2, torch.argsort(order))


def apply_context_parallel(root: nn.Module, mesh: ParallelMesh) -> None:
    """Make `root` (an ExaoneMoeForCausalLM or a PipelineChunk) compute this rank's share of every sequence."""
    if mesh.dims.cp == 1:
        return
    for module in root.modules():
        if type(module) is Attention:
            module.__class__ = ContextParallelAttention
            module.cp_group = mesh.cp_group
        elif isinstance(module, MoEBlock):
            module.reduce_aux_stats = sequence_stats_reducer(mesh.cp_tp_group)
    root.sequence_shard = SequenceShard(mesh.dims.cp, mesh.cp_rank)
