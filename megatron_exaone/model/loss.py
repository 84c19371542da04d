"""Language-model losses. CE = sum of token losses over valid labels (not -100) / number of valid labels.

`linear_cross_entropy` fuses the output projection with the loss and never materialises the [tokens, vocab]
logits (their gradient is computed chunk by chunk during the forward pass): the training path for large vocabularies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token loss over valid labels, computed in fp32 from full logits [..., V]."""
    losses = F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX,
                             reduction="sum")
    return losses / (labels != IGNORE_INDEX).sum().clamp(min=1)


def accumulate_logit_grads(probs: torch.Tensor, targets: torch.Tensor, is_target: torch.Tensor, valid: torch.Tensor,
                           h: torch.Tensor, weight: torch.Tensor, grad_hidden_rows: torch.Tensor,
                           grad_weight: torch.Tensor) -> None:
    """Turn a chunk's softmax `probs` into d(CE)/d(logits) = softmax - onehot (zero on ignored rows; `is_target`
    marks rows whose target column is in this weight, for vocab-parallel heads) and add its contributions to the
    hidden-state rows and to the weight gradient."""
    probs.scatter_add_(1, targets[:, None], -is_target.to(probs.dtype)[:, None])
    probs.mul_(valid[:, None])
    grad = probs.to(h.dtype)
    grad_hidden_rows.copy_(grad @ weight)
    grad_weight += (grad.T @ h).float()


class GradientsInForward(torch.autograd.Function):
    """Base of the fused losses: forward computes the loss sum and, chunk by chunk, the gradients of `hidden` and
    `weight` (saved with `save_grads`); backward only scales them by grad_out / normalizer."""

    @staticmethod
    def save_grads(ctx, grad_hidden, grad_weight, normalizer, weight_dtype, other_inputs: int) -> None:
        ctx.save_for_backward(grad_hidden, grad_weight, normalizer)
        ctx.weight_dtype = weight_dtype
        ctx.other_inputs = other_inputs

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_hidden, grad_weight, normalizer = ctx.saved_tensors
        scale = grad_out / normalizer
        return (grad_hidden * scale.to(grad_hidden.dtype), (grad_weight * scale).to(ctx.weight_dtype),
                *([None] * ctx.other_inputs))


class _LinearCrossEntropy(GradientsInForward):
    """sum over valid rows of CE(hidden @ weight.T, labels) / normalizer."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, normalizer: torch.Tensor,
                chunk_size: int) -> torch.Tensor:
        needs_grad = hidden.requires_grad or weight.requires_grad
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if needs_grad else None
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start:start + chunk_size]
            y = labels[start:start + chunk_size]
            valid = y != IGNORE_INDEX
            safe_y = torch.where(valid, y, 0)
            logits = (h @ weight.T).float()
            lse = torch.logsumexp(logits, dim=-1)
            target = logits.gather(1, safe_y[:, None]).squeeze(1)
            total += ((lse - target) * valid).sum()
            if needs_grad:
                accumulate_logit_grads(torch.softmax(logits, dim=-1), safe_y, torch.ones_like(valid), valid, h,
                                       weight, grad_hidden[start:start + chunk_size], grad_weight)
        GradientsInForward.save_grads(ctx, grad_hidden, grad_weight, normalizer, weight.dtype, other_inputs=3)
        return total / normalizer


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         normalizer: torch.Tensor | None = None, chunk_size: int = 1024) -> torch.Tensor:
    """CE of `hidden @ weight.T` against `labels` without keeping the logits; hidden [..., H], labels [...].

    `normalizer` defaults to the number of valid labels (pass a global token count for data-parallel training).
    """
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1)
    if normalizer is None:
        normalizer = (flat_labels != IGNORE_INDEX).sum().clamp(min=1)
    normalizer = torch.as_tensor(normalizer, dtype=torch.float32, device=hidden.device)
    return _LinearCrossEntropy.apply(flat_hidden, weight, flat_labels, normalizer, chunk_size)


class OutputHead(nn.Linear):
    """`lm_head`: the output projection, and the loss computed from hidden states through it.

    Parallel passes replace this module (vocab-parallel head) without touching the model code.
    """

    def __init__(self, hidden_size: int, vocab_size: int) -> None:
        super().__init__(hidden_size, vocab_size, bias=False)

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor, normalizer: torch.Tensor | float | None = None
             ) -> torch.Tensor:
        """Sum of token CE over valid labels / `normalizer` (default: the number of valid labels)."""
        return linear_cross_entropy(hidden, self.weight, labels, normalizer)
