"""Helpers shared by the test directories."""

from collections.abc import Callable

import pytest
import torch
from torch import nn

from megatron_exaone.model.mtp import shift_left


def _fixed_batch_losses(model: nn.Module, tokens: torch.Tensor, steps: int) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(steps):
        out = model(tokens, labels=shift_left(tokens, 1, -100))
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.lm_loss.item())
    return losses


@pytest.fixture
def fixed_batch_losses() -> Callable[[nn.Module, torch.Tensor, int], list[float]]:
    """`fixed_batch_losses(model, tokens, steps)`: that many AdamW steps (lr 1e-3) of next-token prediction on
    one fixed batch; the LM loss of each step (how the FP8 tests compare precisions)."""
    return _fixed_batch_losses
