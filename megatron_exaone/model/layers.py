"""The pre-norm decoder layer shared by the decoder stack and the MTP module."""

from __future__ import annotations

import torch
from torch import nn

from .attention import Attention
from .config import DENSE, SLIDING, ModelConfig
from .mlp import SwiGLUMLP
from .moe import MoEBlock, RouterSettings
from .norms import RMSNorm


def router_settings(config: ModelConfig) -> RouterSettings:
    return RouterSettings(
        top_k=config.num_experts_per_tok,
        n_group=config.n_group,
        topk_group=config.topk_group,
        norm_topk_prob=config.norm_topk_prob,
        routed_scaling_factor=config.routed_scaling_factor,
    )


class DecoderLayer(nn.Module):
    """h = x + attn(input_layernorm(x)); out = h + mlp(post_attention_layernorm(h))."""

    def __init__(self, config: ModelConfig, attention_type: str, mlp_type: str) -> None:
        super().__init__()
        self.attention_type = attention_type
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
            config.rms_norm_eps,
            use_rope=config.uses_rope(attention_type),
        )
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if mlp_type == DENSE:
            self.mlp: nn.Module = SwiGLUMLP(config.hidden_size, config.intermediate_size)
        else:
            self.mlp = MoEBlock(
                config.hidden_size,
                config.num_experts,
                config.moe_intermediate_size,
                config.num_shared_experts,
                router_settings(config),
                config.aux_loss_coeff,
            )

    @property
    def is_sliding(self) -> bool:
        return self.attention_type == SLIDING

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        masks: dict[str, torch.Tensor | None],
        aux_loss_scale: float = 1.0,
    ) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), rope, masks[self.attention_type])
        normed = self.post_attention_layernorm(h)
        if isinstance(self.mlp, MoEBlock):
            return h + self.mlp(normed, aux_loss_scale)
        return h + self.mlp(normed)
