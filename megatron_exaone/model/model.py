"""`ExaoneMoeForCausalLM`: the single-device EXAONE-MoE model with HF weight names and an MTP head."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .attention import attention_mask
from .config import FULL, SLIDING, ModelConfig
from .layers import DecoderLayer
from .loss import IGNORE_INDEX, OutputHead, cross_entropy
from .moe import MoEBlock
from .mtp import MultiTokenPredictor, shift_left
from .norms import RMSNorm
from .rope import rope_cos_sin
from .sequence_shard import SequenceShard

@dataclass
class CausalLMOutput:
    logits: torch.Tensor | None
    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    mtp_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


def default_position_ids(input_ids: torch.Tensor) -> torch.Tensor:
    return torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)


class AttentionInputs:
    """Per-forward attention inputs shared by every layer: RoPE cos/sin and one mask per attention type, for the
    tokens this rank computes (all of them, or its `shard` under context parallelism: then the masks let those
    queries see the keys the attention modules gather, in gathered order: every rank's tokens
    (`SequenceShard.gathered_keys`), or for sliding layers every chunk's last W - 1 tokens and this rank's own
    (`SequenceShard.halo_keys`))."""

    def __init__(self, config: ModelConfig, position_ids: torch.Tensor, dtype: torch.dtype,
                 shard: SequenceShard | None = None) -> None:
        self.shard = shard
        seq, device = position_ids.shape[1], position_ids.device
        queries = shard.index(seq, device) if shard is not None else None
        window = config.sliding_window
        all_keys = sliding_keys = None
        if shard is not None:
            all_keys = shard.gathered_keys(seq, device)
            halo = shard.halo(seq, window)
            sliding_keys = shard.halo_keys(seq, halo, device) if halo is not None else all_keys
        self.rope = rope_cos_sin(self.take(position_ids), config.head_dim, config.rope_theta, dtype)
        self.masks = {FULL: attention_mask(position_ids, None, queries, all_keys),
                      SLIDING: attention_mask(position_ids, window, queries, sliding_keys) if window else None}

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's tokens of a whole-sequence tensor [B, S, ...]."""
        return x if self.shard is None else self.shard.take(x)


class ExaoneMoeModel(nn.Module):
    """`model.*`: embedding, decoder layers, final norm."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, config.layer_types[i], config.mlp_layer_types[i])
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, attn: AttentionInputs, aux_loss_scale: float = 1.0) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        for layer in self.layers:
            hidden = layer(hidden, attn.rope, attn.masks, aux_loss_scale)
        return self.norm(hidden)


class ExaoneMoeForCausalLM(nn.Module):
    """forward(input_ids, labels=None, position_ids=None) -> CausalLMOutput.

    `position_ids` that restart at 0 mark packed documents: no token attends across a document boundary and RoPE
    positions restart. `loss` = lm_loss + mtp_loss_weight * mtp_loss + aux_loss. With `sequence_shard` (set by the
    context-parallel pass) the inputs are still whole sequences and the outputs cover this rank's tokens only.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.sequence_shard: SequenceShard | None = None
        self.model = ExaoneMoeModel(config)
        self.lm_head = OutputHead(config.hidden_size, config.vocab_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.mtp = MultiTokenPredictor(config) if config.num_nextn_predict_layers > 0 else None

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, return_logits: bool = True,
                loss_normalizer: torch.Tensor | float | None = None, aux_loss_scale: float = 1.0) -> CausalLMOutput:
        """With labels and `return_logits=False` (the training path) the output projection is fused with the loss
        and no [B, S, vocab] logits are materialised.

        Gradient accumulation and data parallelism sum the losses of micro-batches: `loss_normalizer` replaces the
        local count of valid labels as the CE denominator (pass the global count), and `aux_loss_scale` weights
        this micro-batch's mean sequence aux loss (pass local sequences / global sequences)."""
        if position_ids is None:
            position_ids = default_position_ids(input_ids)
        attn = AttentionInputs(self.config, position_ids, self.model.embed_tokens.weight.dtype, self.sequence_shard)
        hidden = self.model(attn.take(input_ids), attn, aux_loss_scale)
        logits = self.lm_head(hidden) if return_logits or labels is None else None
        if labels is None:
            return CausalLMOutput(logits=logits)

        fused = not return_logits or loss_normalizer is not None

        def loss_of(h: torch.Tensor, targets: torch.Tensor, h_logits: torch.Tensor | None = None) -> torch.Tensor:
            if fused:
                return self.lm_head.loss(h, targets, loss_normalizer)
            return cross_entropy(h_logits if h_logits is not None else self.lm_head(h), targets)

        lm_loss = loss_of(hidden, attn.take(labels), logits)
        zero = lm_loss.new_zeros(())
        # The aux loss already sends its gradient through the MoE outputs; here it only adds its value.
        aux_values = [m.last_aux_loss for m in self.modules() if isinstance(m, MoEBlock) and
                      m.last_aux_loss is not None]
        aux_loss = torch.stack(aux_values).sum() if aux_values else zero
        mtp_loss = zero
        if self.mtp is not None and self.config.mtp_loss_weight > 0:
            mtp_hidden = self.mtp(hidden, input_ids, self.model.embed_tokens, attn.rope, attn.masks, attn.take)
            mtp_loss = torch.stack([loss_of(h, attn.take(shift_left(labels, depth + 1, fill=IGNORE_INDEX)))
                                    for depth, h in enumerate(mtp_hidden)]).mean()
        loss = lm_loss + self.config.mtp_loss_weight * mtp_loss + aux_loss
        return CausalLMOutput(logits=logits, loss=loss, lm_loss=lm_loss, mtp_loss=mtp_loss, aux_loss=aux_loss)
