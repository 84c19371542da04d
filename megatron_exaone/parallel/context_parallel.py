"""Context parallelism (cp): each rank of a cp group computes 1/cp of the tokens of every sequence.

A pass over the meta-device model or pipeline chunk, after tensor and expert parallel:
- The model gets a `SequenceShard`: it still receives whole sequences (every rank of a cp group
  loads the same ones) and computes only its zigzag share, 2 chunks of S / (2 cp) tokens, so
  causal-attention work is balanced. MTP inputs and labels are shifted on the whole sequences before
  sharding.
- Attention gathers keys and values over cp (backward: their gradients reduce-scattered back) and
  attends with the local queries under the causal, window and document mask of their positions, so
  it is exact for every window and packed document, and composes with TP/SP (heads and the local
  sequence split over tp). Global layers gather the whole sequence (TE's `all_gather` scheme).
  Sliding layers gather only the last W - 1 tokens of every chunk (a halo: 2 cp (W - 1) tokens
  instead of S; a chunk shorter than W - 1 falls back to the whole sequence); this rank's own tails
  among them are masked out as duplicates.
- MoE blocks sum their per-sequence statistics (sequence aux loss) over cp x tp.
Loss normalisation, gradient reduction (dp x cp) and expert-load counts (all ranks of a stage)
already span cp.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from megatron_exaone.model.attention import Attention
from megatron_exaone.model.layers import DecoderLayer
from megatron_exaone.model.moe import MoEBlock
from megatron_exaone.model.sequence_shard import SequenceShard

from . import comm
from .mesh import ParallelMesh
from .tensor_parallel import sequence_stats_reducer


class ContextParallelAttention(Attention):
    """Attention of this rank's queries over the keys before them; `cp_group`, `shard` and `window`
    (sliding layers; None for global ones) are set by `apply_context_parallel`."""

    cp_group: dist.ProcessGroup
    shard: SequenceShard
    window: int | None

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask
    ) -> torch.Tensor:
        batch, seq, _ = x.shape
        q, k, v = self.project(x, rope)
        halo = self.shard.halo(seq * self.shard.size, self.window)
        gather = self.gather_sequence if halo is None else lambda t: self.gather_halo(t, halo)
        return self.o_proj(
            self.attend(q, gather(k), gather(v), mask).transpose(1, 2).reshape(batch, seq, -1)
        )

    def gather_sequence(self, t: torch.Tensor) -> torch.Tensor:
        """[B, heads, S / cp, D] of this rank -> [B, heads, S, D]: every rank's tokens in rank order
        (the mask knows their positions, `SequenceShard.gathered_keys`, so no reordering copy is
        needed)."""
        return comm.gather_from_sp(t, self.cp_group, dim=2)

    def gather_halo(self, t: torch.Tensor, halo: int) -> torch.Tensor:
        """A sliding layer's keys: the last `halo` tokens of every chunk of every rank, then this
        rank's own ([B, heads, 2 cp halo + S / cp, D], the order of `SequenceShard.halo_keys`).
        Moves 2 cp (W - 1) tokens instead of the whole sequence."""
        chunk = t.shape[2] // 2
        tails = torch.cat([t[:, :, chunk - halo : chunk], t[:, :, 2 * chunk - halo :]], dim=2)
        return torch.cat([comm.gather_from_sp(tails, self.cp_group, dim=2), t], dim=2)


def apply_context_parallel(root: nn.Module, mesh: ParallelMesh) -> None:
    """Make `root` (an ExaoneMoeForCausalLM or a PipelineChunk) compute this rank's share of every
    sequence."""
    if mesh.dims.cp == 1:
        return
    shard = SequenceShard(mesh.dims.cp, mesh.cp_rank)
    window = root.config.sliding_window
    for module in root.modules():
        if isinstance(module, DecoderLayer) and type(module.self_attn) is Attention:
            attn = module.self_attn
            attn.__class__ = ContextParallelAttention
            attn.cp_group, attn.shard, attn.window = (
                mesh.cp_group,
                shard,
                window if module.is_sliding else None,
            )
        elif isinstance(module, MoEBlock):
            module.reduce_aux_stats = sequence_stats_reducer(mesh.cp_tp_group)
    root.sequence_shard = shard
