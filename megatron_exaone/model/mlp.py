"""Dense SwiGLU MLP (dense decoder layers, the shared experts and the MTP layer)."""

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLUMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.input_projections(x)
        return self.down_proj(F.silu(gate) * up)

    def input_projections(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """gate_proj and up_proj of `x` (in FP8 one GEMM: `precision.fp8_ops.Fp8FusedInputs`)."""
        return self.gate_proj(x), self.up_proj(x)
