"""Language-model losses: the training loss (`total_loss`), how micro-batches are normalised against
the global batch (`LossScaling`) and summed for the logs (`LossMetrics`). CE = sum of token losses
over valid labels (not -100) / number of valid labels.

`linear_cross_entropy` fuses the output projection with the loss and never materialises the [tokens,
vocab] logits (their gradient is computed chunk by chunk during the forward pass): the training path
for large vocabularies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .fused import fused

IGNORE_INDEX = -100


def total_loss(lm_loss, mtp_loss, aux_loss, mtp_loss_weight: float):
    """The training loss, written once: lm + mtp_loss_weight * mtp + aux (tensors or floats)."""
    return lm_loss + mtp_loss_weight * mtp_loss + aux_loss


@dataclass(frozen=True)
class LossScaling:
    """Per-step global counts, so that summing micro-batches and ranks gives the global batch's
    losses: CE is divided by `valid_tokens` (labels != -100 in the whole global batch), a
    micro-batch's aux loss is weighted by its share of the global batch's `sequences`."""

    valid_tokens: torch.Tensor
    sequences: int


class LossMetrics:
    """Detached loss terms summed over the micro-batches of a step (each already weighted by its
    share of the global batch, so the sums over micro-batches, pipeline stages and data-parallel
    ranks are the step's losses)."""

    NAMES = ("lm_loss", "mtp_loss", "aux_loss")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor | float] = dict.fromkeys(self.NAMES, 0.0)

    def add(self, name: str, value: torch.Tensor | None) -> None:
        if value is not None:
            self.sums[name] = self.sums[name] + value.detach().float()


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token loss over valid labels, computed in fp32 from full logits [..., V]."""
    losses = F.cross_entropy(
        logits.float().flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return losses / (labels != IGNORE_INDEX).sum().clamp(min=1)


# Rows of hidden states per loss chunk: about 2^29 logits (1 GiB in BF16) at a time, in multiples of
# 128 rows.
CHUNK_LOGITS = 1 << 29


def chunk_rows(vocab: int) -> int:
    """Rows per chunk for a (local) vocabulary of `vocab` columns. Larger chunks mean fewer passes
    over the fp32 weight-gradient accumulator; smaller ones less transient memory."""
    return max(128, CHUNK_LOGITS // vocab // 128 * 128)


def _chunk_statistics(
    logits: torch.Tensor, targets: torch.Tensor, is_target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of `logits` [c, V], in fp32: the max, sum(exp(logit - max)) and the target logit (0
    where `is_target` is False: the target column lies in another rank's vocabulary shard). Fused
    into one kernel on GPU (`fused`): the fp32 logits never reach memory."""
    logits = logits.float()
    row_max = logits.amax(dim=-1)
    sum_exp = torch.exp(logits - row_max[:, None]).sum(dim=-1)
    target = logits.gather(1, targets[:, None]).squeeze(1) * is_target
    return row_max, sum_exp, target


def logit_grads(
    logits: torch.Tensor,
    lse: torch.Tensor,
    targets: torch.Tensor,
    is_target: torch.Tensor,
    valid: torch.Tensor,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """d(CE)/d(logits) = softmax - onehot(target), zero on ignored rows, in `dtype` (default the
    logits'; one kernel on GPU under `fused`). Every value lies in [-1, 1]."""
    columns = torch.arange(logits.shape[1], device=logits.device)
    onehot = (columns[None, :] == targets[:, None]) & is_target[:, None]
    probs = torch.exp(logits.float() - lse[:, None])
    return ((probs - onehot.float()) * valid[:, None]).to(dtype or logits.dtype)


def _add_matmul_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b, accumulated in fp32 (on GPU one GEMM with an fp32 output: no rounded
    intermediate)."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif a.is_cuda:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc += (a @ b).float()


class HeadGemms:
    """How the output head's loss computes with its weight [V, H]: the logits, the logit gradients
    of a chunk (in whatever form its GEMMs take them), the hidden-state gradient and the fp32
    weight gradient. High precision here; `precision.fp8_ops.Fp8HeadGemms` runs the logits and the
    hidden-state gradient in FP8 (precision.fp8_lm_head). The weight gradient always accumulates in
    fp32 from the high-precision operands."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., H] @ W^T -> [..., V]."""
        return hidden @ self.weight.T

    def logit_grads(
        self,
        logits: torch.Tensor,
        lse: torch.Tensor,
        targets: torch.Tensor,
        is_target: torch.Tensor,
        valid: torch.Tensor,
    ) -> Any:
        """d(CE)/d(logits) of a chunk (`logit_grads`), for `grad_hidden` and `add_grad_weight`."""
        return fused(logit_grads, logits)(logits, lse, targets, is_target, valid)

    def grad_hidden(self, grad_logits: Any, out: torch.Tensor) -> None:
        """out [c, H] = grad_logits [c, V] @ W."""
        torch.mm(grad_logits, self.weight, out=out)

    def add_grad_weight(self, acc: torch.Tensor, grad_logits: Any, hidden: torch.Tensor) -> None:
        """acc [V, H] (fp32) += grad_logits^T @ hidden."""
        _add_matmul_fp32_(acc, grad_logits.T, hidden)


class ComputesHeadGemms:
    """Mixin of the output heads (a `weight` [V, H]): `head_gemms` gives the GEMMs the logits and
    the fused loss run on. The precision pass swaps it for the FP8 ones
    (`precision.fp8_ops.Fp8Head`)."""

    weight: torch.Tensor

    def head_gemms(self) -> HeadGemms:
        return HeadGemms(self.weight)


class GradientsInForward(torch.autograd.Function):
    """Base of the fused losses: forward computes the loss sum and, chunk by chunk, the gradients of
    `hidden` and `weight` (saved with `save_grads`); backward only scales them by grad_out /
    normalizer."""

    @staticmethod
    def save_grads(
        ctx, grad_hidden, grad_weight, normalizer, weight_dtype, other_inputs: int
    ) -> None:
        ctx.save_for_backward(grad_hidden, grad_weight, normalizer)
        ctx.weight_dtype = weight_dtype
        ctx.other_inputs = other_inputs

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_hidden, grad_weight, normalizer = ctx.saved_tensors
        scale = grad_out / normalizer
        return (
            grad_hidden * scale.to(grad_hidden.dtype),
            (grad_weight * scale).to(ctx.weight_dtype),
            *([None] * ctx.other_inputs),
        )


# (row max, sum of exp(logit - max), target logit) of a chunk on this rank -> the same over the
# whole vocabulary.
ChunkStatsReducer = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]
]


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int,
    vocab_start: int = 0,
    reduce_stats: ChunkStatsReducer | None = None,
    gemms: HeadGemms | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Sum over valid rows of CE(hidden @ weight.T, labels), and its gradients for `hidden` and
    (fp32) `weight` (None when neither requires grad), computed `chunk_size` rows at a time without
    keeping the logits.

    For a vocabulary-parallel head, `weight` holds rows [vocab_start, vocab_start + rows) and
    `reduce_stats` combines the chunk statistics over the ranks holding the other rows; the
    hidden-state gradient is then this rank's partial sum. `gemms`: how the logits and the
    hidden-state gradient are computed (default: `HeadGemms` of `weight`)."""
    gemms = gemms or HeadGemms(weight)
    needs_grad = hidden.requires_grad or weight.requires_grad
    grad_hidden = torch.empty_like(hidden) if needs_grad else None
    grad_weight = torch.zeros_like(weight, dtype=torch.float32) if needs_grad else None
    total = hidden.new_zeros((), dtype=torch.float32)
    for first in range(0, hidden.shape[0], chunk_size):
        rows = slice(first, first + chunk_size)
        h, y = hidden[rows], labels[rows]
        valid = y != IGNORE_INDEX
        is_target = valid  # the target column is in this weight
        if reduce_stats is not None:
            is_target = valid & (y >= vocab_start) & (y < vocab_start + weight.shape[0])
        local_y = torch.where(is_target, y - vocab_start, 0)
        logits = gemms.logits(h)
        row_max, sum_exp, target = fused(_chunk_statistics, logits)(logits, local_y, is_target)
        if reduce_stats is not None:
            row_max, sum_exp, target = reduce_stats(row_max, sum_exp, target)
        lse = torch.log(sum_exp) + row_max
        total += ((lse - target) * valid).sum()
        if needs_grad:
            grad_logits = gemms.logit_grads(logits, lse, local_y, is_target, valid)
            gemms.grad_hidden(grad_logits, grad_hidden[rows])
            gemms.add_grad_weight(grad_weight, grad_logits, h)
    return total, grad_hidden, grad_weight


class _LinearCrossEntropy(GradientsInForward):
    """sum over valid rows of CE(hidden @ weight.T, labels) / normalizer."""

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        normalizer: torch.Tensor,
        chunk_size: int,
        gemms: HeadGemms | None,
    ) -> torch.Tensor:
        total, grad_hidden, grad_weight = chunked_linear_cross_entropy(
            hidden, weight, labels, chunk_size, gemms=gemms
        )
        GradientsInForward.save_grads(
            ctx, grad_hidden, grad_weight, normalizer, weight.dtype, other_inputs=4
        )
        return total / normalizer


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    normalizer: torch.Tensor | None = None,
    chunk_size: int | None = None,
    gemms: HeadGemms | None = None,
) -> torch.Tensor:
    """CE of `hidden @ weight.T` against `labels` without keeping the logits; hidden [..., H],
    labels [...].

    `normalizer` defaults to the number of valid labels (pass a global token count for data-parallel
    training). `gemms`: the head's logit and hidden-gradient GEMMs (default: high precision on
    `weight`).
    """
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1)
    if normalizer is None:
        normalizer = (flat_labels != IGNORE_INDEX).sum().clamp(min=1)
    normalizer = torch.as_tensor(normalizer, dtype=torch.float32, device=hidden.device)
    return _LinearCrossEntropy.apply(
        flat_hidden,
        weight,
        flat_labels,
        normalizer,
        chunk_size or chunk_rows(weight.shape[0]),
        gemms,
    )


class OutputHead(nn.Linear, ComputesHeadGemms):
    """`lm_head`: the output projection, and the loss computed from hidden states through it.

    Parallel passes replace this module (vocab-parallel head) without touching the model code.
    """

    def __init__(self, hidden_size: int, vocab_size: int) -> None:
        super().__init__(hidden_size, vocab_size, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head_gemms().logits(hidden)

    def loss(
        self,
        hidden: torch.Tensor,
        labels: torch.Tensor,
        normalizer: torch.Tensor | float | None = None,
    ) -> torch.Tensor:
        """Sum of token CE over valid labels / `normalizer` (default: the number of valid
        labels)."""
        return linear_cross_entropy(
            hidden, self.weight, labels, normalizer, gemms=self.head_gemms()
        )
