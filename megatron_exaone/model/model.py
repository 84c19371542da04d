"""`ExaoneMoeForCausalLM`: the single-device EXAONE-MoE model with HF weight names and an MTP
head."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .attention import attention_mask
from .config import FULL, SLIDING, ModelConfig
from .layers import DecoderLayer
from .loss import IGNORE_INDEX, OutputHead, cross_entropy, total_loss
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
    """Per-forward attention inputs shared by every layer: RoPE cos/sin and one mask per attention
    type, for the tokens this rank computes (all of them, or its `shard` under context parallelism:
    then the masks let those queries see the keys the attention modules gather, in gathered order:
    every rank's tokens (`SequenceShard.gathered_keys`), or for sliding layers every chunk's last W
    - 1 tokens and this rank's own (`SequenceShard.halo_keys`))."""

    def __init__(
        self,
        config: ModelConfig,
        position_ids: torch.Tensor,
        dtype: torch.dtype,
        shard: SequenceShard | None = None,
    ) -> None:
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
        self.masks = {
            FULL: attention_mask(position_ids, None, queries, all_keys),
            SLIDING: attention_mask(position_ids, window, queries, sliding_keys)
            if window
            else None,
        }

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's tokens of a whole-sequence tensor [B, S, ...]."""
        return x if self.shard is None else self.shard.take(x)


@dataclass(frozen=True)
class ModelPart:
    """What a model holds: the embedding, some decoder layers (global indices), the head (final
    norm, lm_head and MTP). `None` layers: all of them. A pipeline stage holds one part; the whole
    model all of them."""

    embedding: bool = True
    layers: tuple[int, ...] | None = None
    head: bool = True

    def layer_indices(self, config: ModelConfig) -> tuple[int, ...]:
        return tuple(range(config.num_hidden_layers)) if self.layers is None else self.layers


WHOLE = ModelPart()


class DecoderLayers(nn.Module):
    """The decoder layers a model holds, under their global indices (`model.layers.<i>`), in
    order."""

    def __init__(self, layers: dict[int, DecoderLayer]) -> None:
        super().__init__()
        for index, layer in layers.items():
            self.add_module(str(index), layer)

    def __getitem__(self, index: int) -> DecoderLayer:
        return self._modules[str(index)]

    def __iter__(self) -> Iterator[DecoderLayer]:
        return iter(self._modules.values())

    def __len__(self) -> int:
        return len(self._modules)


class ExaoneMoeModel(nn.Module):
    """`model.*`: embedding, decoder layers, final norm (those of `part`)."""

    def __init__(
        self, config: ModelConfig, part: ModelPart = WHOLE, embedding: bool | None = None
    ) -> None:
        super().__init__()
        if embedding if embedding is not None else part.embedding:
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = DecoderLayers(
            {
                i: DecoderLayer(config, config.layer_types[i], config.mlp_layer_types[i])
                for i in part.layer_indices(config)
            }
        )
        if part.head:
            self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def decode(
        self, hidden: torch.Tensor, attn: AttentionInputs, aux_loss_scale: float = 1.0
    ) -> torch.Tensor:
        """Run this part's decoder layers."""
        for layer in self.layers:
            hidden = layer(hidden, attn.rope, attn.masks, aux_loss_scale)
        return hidden

    def forward(
        self, input_ids: torch.Tensor, attn: AttentionInputs, aux_loss_scale: float = 1.0
    ) -> torch.Tensor:
        return self.norm(self.decode(self.embed_tokens(input_ids), attn, aux_loss_scale))


def mtp_enabled(config: ModelConfig) -> bool:
    """Whether the model trains its MTP layers (and so a pipeline's last stage holds a copy of the
    embedding)."""
    return config.num_nextn_predict_layers > 0 and config.mtp_loss_weight > 0


class ExaoneMoeForCausalLM(nn.Module):
    """forward(input_ids, labels=None, position_ids=None) -> CausalLMOutput.

    `position_ids` that restart at 0 mark packed documents: no token attends across a document
    boundary and RoPE positions restart. `loss` = lm_loss + mtp_loss_weight * mtp_loss + aux_loss
    (`loss.total_loss`). With `sequence_shard` (set by the context-parallel pass) the inputs are
    still whole sequences and the outputs cover this rank's tokens only. `part`: a pipeline stage
    builds only what it runs (`parallel.pipeline.PipelineChunk`, whose forward is made of this
    model's pieces: `model.decode`, `mtp_loss`).
    """

    def __init__(self, config: ModelConfig, part: ModelPart = WHOLE) -> None:
        super().__init__()
        self.config = config
        self.sequence_shard: SequenceShard | None = None
        # The head's MTP reads the embedding: a pipeline's last stage keeps a copy (its gradients
        # are summed).
        self.model = ExaoneMoeModel(
            config, part, embedding=part.embedding or (part.head and mtp_enabled(config))
        )
        if part.head:
            self.lm_head = OutputHead(config.hidden_size, config.vocab_size)
            if config.tie_word_embeddings:
                self.lm_head.weight = self.model.embed_tokens.weight
            # Built with mtp_loss_weight = 0 too, so checkpoints hold every weight.
            self.mtp = MultiTokenPredictor(config) if config.num_nextn_predict_layers > 0 else None

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        return_logits: bool = True,
        loss_normalizer: torch.Tensor | float | None = None,
        aux_loss_scale: float = 1.0,
    ) -> CausalLMOutput:
        """With labels and `return_logits=False` (the training path) the output projection is fused
        with the loss and no [B, S, vocab] logits are materialised.

        Gradient accumulation and data parallelism sum the losses of micro-batches:
        `loss_normalizer` replaces the local count of valid labels as the CE denominator (pass the
        global count), and `aux_loss_scale` weights this micro-batch's mean sequence aux loss (pass
        local sequences / global sequences)."""
        if position_ids is None:
            position_ids = default_position_ids(input_ids)
        attn = AttentionInputs(
            self.config, position_ids, self.model.embed_tokens.weight.dtype, self.sequence_shard
        )
        hidden = self.model(attn.take(input_ids), attn, aux_loss_scale)
        logits = self.lm_head(hidden) if return_logits or labels is None else None
        if labels is None:
            return CausalLMOutput(logits=logits)

        fused = not return_logits or loss_normalizer is not None

        def loss_of(
            h: torch.Tensor, targets: torch.Tensor, h_logits: torch.Tensor | None = None
        ) -> torch.Tensor:
            if fused:
                return self.lm_head.loss(h, targets, loss_normalizer)
            return cross_entropy(h_logits if h_logits is not None else self.lm_head(h), targets)

        lm_loss = loss_of(hidden, attn.take(labels), logits)
        zero = lm_loss.new_zeros(())
        # The aux loss already sends its gradient through the MoE outputs; here it only adds its
        # value.
        aux_loss = moe_aux_loss(self.modules())
        aux_loss = zero if aux_loss is None else aux_loss
        mtp_loss = self.mtp_loss(hidden, input_ids, labels, attn, loss_of)
        mtp_loss = zero if mtp_loss is None else mtp_loss
        loss = total_loss(lm_loss, mtp_loss, aux_loss, self.config.mtp_loss_weight)
        return CausalLMOutput(
            logits=logits, loss=loss, lm_loss=lm_loss, mtp_loss=mtp_loss, aux_loss=aux_loss
        )

    def mtp_loss(
        self,
        hidden: torch.Tensor,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        attn: AttentionInputs,
        loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor | None:
        """The MTP loss (mean over depths) from the final-normed hidden states, or None when MTP is
        off."""
        if self.mtp is None or not mtp_enabled(self.config):
            return None
        mtp_hidden = self.mtp(
            hidden, input_ids, self.model.embed_tokens, attn.rope, attn.masks, attn.take
        )
        return torch.stack(
            [
                loss_of(h, attn.take(shift_left(labels, depth + 1, fill=IGNORE_INDEX)))
                for depth, h in enumerate(mtp_hidden)
            ]
        ).mean()


def moe_aux_loss(modules: Iterable[nn.Module]) -> torch.Tensor | None:
    """The sum of the aux losses the MoE blocks among `modules` computed in the last forward (None
    if none did)."""
    values = [
        m.last_aux_loss for m in modules if isinstance(m, MoEBlock) and m.last_aux_loss is not None
    ]
    return torch.stack(values).sum() if values else None
