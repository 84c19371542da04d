"""Grouped-query attention with per-head QK RMSNorm, RoPE on sliding layers only, and document-aware
masks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# FlexAttention: sparse sliding-window / document masks on GPU (its backward does not run on CPU)
try:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # pragma: no cover - older torch
    BlockMask = None

from .fused import fused
from .norms import RMSNorm
from .rope import apply_rope


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """A position id of 0 starts a new document; tokens before the first 0 form a document of their
    own."""
    return torch.cumsum((position_ids == 0).to(torch.int32), dim=-1)


def attention_mask(
    position_ids: torch.Tensor | None,
    window: int | None,
    query_index: torch.Tensor | None = None,
    keys: tuple[torch.Tensor, torch.Tensor] | None = None,
):
    """The mask for causal attention within documents and within `window` if given (transformers'
    semantics: query i sees key j when i - window < j <= i).

    Context parallel: `query_index`, the sequence positions of this rank's queries; `keys`,
    (sequence positions, usable) of the keys when they are not the whole sequence in order (a
    sliding layer's gathered chunk tails). None for a plain causal mask (all queries and keys, one
    document per row, no window): SDPA's causal (flash) kernel. On GPU a FlexAttention `BlockMask`,
    which skips the blocks outside the window or the document, so sliding layers cost O(S * W).
    Otherwise a boolean [B, 1, queries, keys] mask (True = attend) for SDPA.
    """
    if position_ids is None:
        return None
    packed = bool((position_ids[:, 1:] == 0).any())
    if not packed and window is None and query_index is None:
        return None
    docs = document_ids(position_ids) if packed else None
    if position_ids.is_cuda and BlockMask is not None:
        return _block_mask(
            docs, window, *position_ids.shape, position_ids.device, query_index, keys
        )
    seq = position_ids.shape[-1]
    key_index, usable = (
        keys if keys is not None else (torch.arange(seq, device=position_ids.device), None)
    )
    queries = torch.arange(seq, device=position_ids.device) if query_index is None else query_index
    allowed = key_index[None, :] <= queries[:, None]
    if window is not None:
        allowed = allowed & (queries[:, None] - key_index[None, :] < window)
    if usable is not None:
        allowed = allowed & usable[None, :]
    allowed = allowed.unsqueeze(0)
    if docs is not None:
        allowed = allowed & (docs[:, queries, None] == docs[:, None, key_index])
    return allowed.unsqueeze(1)


def _block_mask(
    docs: torch.Tensor | None,
    window: int | None,
    batch: int,
    seq: int,
    device: torch.device,
    query_index: torch.Tensor | None = None,
    keys: tuple[torch.Tensor, torch.Tensor] | None = None,
):
    key_index, usable = keys if keys is not None else (None, None)

    def mask_mod(b, h, q, kv):
        if query_index is not None:
            q = query_index[q]
        usable_key = None
        if key_index is not None:
            usable_key, kv = usable[kv], key_index[kv]
        allowed = kv <= q
        if usable_key is not None:
            allowed = allowed & usable_key
        if window is not None:
            allowed = allowed & (q - kv < window)
        if docs is not None:
            allowed = allowed & (docs[b, q] == docs[b, kv])
        return allowed

    queries = seq if query_index is None else query_index.numel()
    kv_len = seq if key_index is None else key_index.numel()
    return create_block_mask(
        mask_mod, batch if docs is not None else None, None, queries, kv_len, device=device
    )


class Attention(nn.Module):
    """Head counts are read from the projection shapes, so tensor-parallel passes can shard them
    freely."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        eps: float,
        use_rope: bool,
    ) -> None:
        super().__init__()
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)
        self.q_norm = RMSNorm(head_dim, eps)
        self.k_norm = RMSNorm(head_dim, eps)
        self.head_dim = head_dim
        self.use_rope = use_rope

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None
    ) -> torch.Tensor:
        batch, seq, _ = x.shape
        q, k, v = self.project(x, rope)
        return self.o_proj(self.attend(q, k, v, mask).transpose(1, 2).reshape(batch, seq, -1))

    def project(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values [B, heads, S, D] of `x` [B, S, H], normed and rotated."""
        batch, seq, _ = x.shape
        q, k, v = (
            t.view(batch, seq, -1, self.head_dim).transpose(1, 2) for t in self.input_projections(x)
        )
        q, k = self.q_norm(q), self.k_norm(k)
        if self.use_rope:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q, k, v

    def input_projections(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q_proj, k_proj and v_proj of `x` (one FP8 GEMM: `precision.fp8_ops.Fp8FusedInputs`)."""
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
        """softmax(q k^T / sqrt(D) + mask) v, [B, heads, queries, D]."""
        gqa = q.shape[1] != k.shape[1]
        if BlockMask is not None and isinstance(mask, BlockMask):
            attend = fused(flex_attention, q, dynamic=False)
            return attend(q, k, v, block_mask=mask, scale=self.head_dim**-0.5, enable_gqa=gqa)
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None,
            scale=self.head_dim**-0.5,
            enable_gqa=gqa,
        )
