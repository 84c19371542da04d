"""Multi-token prediction: the HF/vLLM `mtp.*` module predicting token t+1+d at depth d.

Depth d combines the previous representation at t (the main model's final-normed hidden state for d
= 0) with the embedding of token t+d: h = fc(cat([pre_fc_norm_embedding(emb),
pre_fc_norm_hidden(prev)])), then a dense decoder layer and `mtp.norm`; the shared `lm_head` turns
it into logits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .config import DENSE, ModelConfig
from .layers import DecoderLayer
from .norms import RMSNorm


def shift_left(x: torch.Tensor, by: int, fill: int) -> torch.Tensor:
    """x[:, t] <- x[:, t + by]; the last `by` positions get `fill`."""
    out = torch.full_like(x, fill)
    out[:, :-by] = x[:, by:]
    return out


class MultiTokenPredictor(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.fc = nn.Linear(2 * hidden, hidden, bias=False)
        self.pre_fc_norm_embedding = RMSNorm(hidden, config.rms_norm_eps)
        self.pre_fc_norm_hidden = RMSNorm(hidden, config.rms_norm_eps)
        self.layers = nn.ModuleList(
            DecoderLayer(config, kind, DENSE) for kind in config.mtp_layer_types
        )
        self.norm = RMSNorm(hidden, config.rms_norm_eps)

    def forward(
        self,
        hidden: torch.Tensor,
        input_ids: torch.Tensor,
        embed: nn.Module,
        rope: tuple[torch.Tensor, torch.Tensor],
        masks: dict[str, torch.Tensor | None],
        take: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
    ) -> list[torch.Tensor]:
        """Final-normed hidden states of each depth, [B, S, H] each; position t of depth d predicts
        t + 2 + d. `take` selects this rank's tokens of the whole-sequence `input_ids` (context
        parallel), after the shift."""
        outputs = []
        for depth, layer in enumerate(self.layers):
            next_tokens = take(shift_left(input_ids, depth + 1, fill=0))
            fused = torch.cat(
                [self.pre_fc_norm_embedding(embed(next_tokens)), self.pre_fc_norm_hidden(hidden)],
                -1,
            )
            hidden = self.norm(layer(self.fc(fused), rope, masks))
            outputs.append(hidden)
        return outputs
