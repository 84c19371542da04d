"""Vocabulary-parallel embedding and output head; the loss never materialises full-vocabulary
logits."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatron_exaone.model.loss import (
    IGNORE_INDEX,
    ComputesHeadGemms,
    GradientsInForward,
    HeadGemms,
    chunk_rows,
    chunked_linear_cross_entropy,
)

from . import comm
from .comm import all_reduce_


def _vocab_range(local_rows: int, group: dist.ProcessGroup) -> tuple[int, int]:
    start = dist.get_rank(group) * local_rows
    return start, start + local_rows


class _VocabShard(nn.Module):
    """A module holding this TP rank's rows [start, end) of a [vocab, hidden] weight."""

    def __init__(
        self, local_weight: torch.Tensor, group: dist.ProcessGroup, sequence_parallel: bool
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(local_weight)
        self.group = group
        self.sequence_parallel = sequence_parallel

    @classmethod
    def shard_of(cls, module: nn.Module, group: dist.ProcessGroup, sequence_parallel: bool):
        """An (uninitialized) shard with the local rows of `module.weight` (an nn.Embedding or the
        head)."""
        rows = module.weight.shape[0] // dist.get_world_size(group)
        start, end = _vocab_range(rows, group)
        return cls(torch.empty_like(module.weight[start:end]), group, sequence_parallel)


class VocabParallelEmbedding(_VocabShard):
    """`embed_tokens` holding rows [start, end) of the vocabulary; other ids contribute zeros and
    the partial embeddings are summed over TP (reduce-scattered along the sequence under SP)."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        start, end = _vocab_range(self.weight.shape[0], self.group)
        outside = (input_ids < start) | (input_ids >= end)
        local = F.embedding(torch.where(outside, 0, input_ids - start), self.weight)
        local = local.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return comm.reduce_scatter_to_sp(local, self.group, dim=1)
        return comm.reduce_from_tp(local, self.group)


class _VocabParallelLinearCE(GradientsInForward):
    """Sum over valid rows of CE(hidden @ W.T) with W split by vocabulary rows over `group`, /
    normalizer.

    Logits exist only per chunk and per rank; the softmax statistics and the target logit are
    all-reduced. Gradients are computed in the forward pass (as in `linear_cross_entropy`); the
    hidden-state gradient is partial per rank and is summed by the collective that produced the
    replicated `hidden`.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, normalizer, group, chunk_size, gemms: HeadGemms):
        def reduce_stats(local_max, local_sum_exp, target):
            row_max = all_reduce_(local_max.clone(), group, dist.ReduceOp.MAX)
            stats = all_reduce_(
                torch.stack([local_sum_exp * torch.exp(local_max - row_max), target]), group
            )
            return row_max, *stats

        start, _ = _vocab_range(weight.shape[0], group)
        total, grad_hidden, grad_weight = chunked_linear_cross_entropy(
            hidden, weight, labels, chunk_size, start, reduce_stats, gemms
        )
        GradientsInForward.save_grads(
            ctx, grad_hidden, grad_weight, normalizer, weight.dtype, other_inputs=5
        )
        return total / normalizer


class VocabParallelOutputHead(_VocabShard, ComputesHeadGemms):
    """`lm_head` holding vocabulary rows [start, end): `forward` gathers full logits (evaluation
    only); `loss` computes the cross entropy from the local logits."""

    def _replicated_input(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            return comm.gather_from_sp(hidden, self.group, dim=1)
        return comm.copy_to_tp(hidden, self.group)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        local = self.head_gemms().logits(self._replicated_input(hidden))
        return comm.all_gather_along(local, self.group, dim=-1)

    def loss(
        self,
        hidden: torch.Tensor,
        labels: torch.Tensor,
        normalizer: torch.Tensor | float | None = None,
        chunk_size: int | None = None,
    ) -> torch.Tensor:
        hidden = self._replicated_input(hidden)
        # The same chunking on every rank (the chunks' statistics are all-reduced): sized by the
        # full vocabulary.
        chunk_size = chunk_size or chunk_rows(
            self.weight.shape[0] * dist.get_world_size(self.group)
        )
        flat_labels = labels.reshape(-1)
        if normalizer is None:
            normalizer = (flat_labels != IGNORE_INDEX).sum().clamp(min=1)
        normalizer = torch.as_tensor(normalizer, dtype=torch.float32, device=hidden.device)
        return _VocabParallelLinearCE.apply(
            hidden.reshape(-1, hidden.shape[-1]),
            self.weight,
            flat_labels,
            normalizer,
            self.group,
            chunk_size,
            self.head_gemms(),
        )
