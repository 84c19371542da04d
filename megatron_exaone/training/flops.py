"""Model FLOPs per token (forward + backward) for MFU, counting what the model really computes.

Matrix multiplies cost 6 FLOPs per weight per token (2 forward, 4 backward), over the *active*
weights: attention projections, the dense MLP or the k routed experts plus the shared experts, the
router, the output head and the MTP layers. Attention scores and values cost 12 * heads * head_dim
FLOPs per token per attended key (QK^T and PV, forward and backward): on average (S + 1) / 2 keys
for causal global layers and min(W, ~S) for sliding layers of window W. Recompute is not counted
(model FLOPs, as in MFU).
"""

from __future__ import annotations

from megatron_exaone.model.config import DENSE, SLIDING, ModelConfig

H100_BF16_DENSE_PEAK = 989e12  # FLOP/s, H100 SXM dense BF16


def attended_keys(layer_type: str, seq_len: int, window: int | None) -> float:
    """Average number of keys a query attends to in a causal sequence of `seq_len` tokens."""
    full = (seq_len + 1) / 2
    if layer_type != SLIDING or window is None or window >= seq_len:
        return full
    # the first `window` queries see 1..window keys, the rest see exactly `window`
    return (window * (window + 1) / 2 + (seq_len - window) * window) / seq_len


def attention_weights(c: ModelConfig) -> int:
    """Weights of one attention block's q, k, v and o projections."""
    q = c.num_attention_heads * c.head_dim
    kv = c.num_key_value_heads * c.head_dim
    return c.hidden_size * (2 * q + 2 * kv)


def moe_active_weights(c: ModelConfig) -> int:
    """Weights one token touches in a sparse MLP: its k routed experts, the shared experts and the
    router."""
    per_expert = 3 * c.hidden_size * c.moe_intermediate_size
    router = c.num_experts * c.hidden_size
    return per_expert * (c.num_experts_per_tok + c.num_shared_experts) + router


def active_matmul_weights(c: ModelConfig) -> int:
    """Weights touched by one token (embedding lookup excluded, output head included)."""
    dense_mlp = 3 * c.hidden_size * c.intermediate_size
    total = c.hidden_size * c.vocab_size
    for mlp_type in c.mlp_layer_types:
        total += attention_weights(c) + (dense_mlp if mlp_type == DENSE else moe_active_weights(c))
    if c.num_nextn_predict_layers and c.mtp_loss_weight > 0:
        per_mtp = (
            2 * c.hidden_size * c.hidden_size
            + attention_weights(c)
            + dense_mlp
            + c.hidden_size * c.vocab_size
        )
        total += per_mtp * c.num_nextn_predict_layers
    return total


def flops_per_token(c: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) at sequence length `seq_len`."""
    attn_per_key = 12 * c.num_attention_heads * c.head_dim
    attention = sum(
        attn_per_key * attended_keys(t, seq_len, c.sliding_window) for t in c.layer_types
    )
    if c.num_nextn_predict_layers and c.mtp_loss_weight > 0:
        attention += sum(
            attn_per_key * attended_keys(t, seq_len, c.sliding_window) for t in c.mtp_layer_types
        )
    return 6 * active_matmul_weights(c) + attention


def megatron_flops_per_token(c: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token as Megatron-LM counts them (`num_floating_point_operations` in
    `megatron/training/training.py`, dense-attention path), to compare MFU with Megatron's published
    figures. Unlike `flops_per_token`: every attention layer is causal over the whole sequence
    (sliding windows are ignored), the router is not counted, and the MTP layer counts as one more
    decoder layer of the last layer's MLP type, plus its 2 h^2 projection and 3 h of norms."""
    h, q, kv = c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    mtp = c.num_nextn_predict_layers if c.num_nextn_predict_layers and c.mtp_loss_weight > 0 else 0
    moe_layers = sum(t != DENSE for t in c.mlp_layer_types)
    dense_layers = len(c.mlp_layer_types) - moe_layers
    if c.mlp_layer_types and c.mlp_layer_types[-1] != DENSE:
        moe_layers += mtp
    else:
        dense_layers += mtp
    layers = c.num_hidden_layers + mtp
    shared = c.moe_intermediate_size * c.num_shared_experts
    mlp = (
        3
        * h
        * (
            c.intermediate_size * dense_layers
            + (c.moe_intermediate_size * c.num_experts_per_tok + shared) * moe_layers
        )
    )
    projections = (h * (q + 2 * kv) + q * h) * layers
    mtp_extra = (3 * h + 2 * h * h) * mtp
    logits = h * c.vocab_size * (mtp + 1)
    # QK^T and PV over a causal half of an S x S score matrix
    core = q * seq_len * layers
    return 6 * (mlp + projections + mtp_extra + logits + core)


def fp8_matmul_flops(
    c: ModelConfig,
    keep_bf16_first_layers: int = 1,
    keep_bf16_last_layers: int = 1,
    fp8_expert_wgrad: bool = False,
    fp8_mtp: bool = False,
    fp8_lm_head: bool = False,
) -> float:
    """FLOPs per token of the GEMMs that an FP8 precision runs in FP8 (`precision.apply`'s rule).
    All three GEMMs (6 FLOPs per weight) of the attention projections, dense MLPs and shared experts
    of decoder layers first <= i < L - last. Of their routed experts, forward and input gradient
    (4); the weight gradient too with `fp8_expert_wgrad`. The MTP layer's fc, attention and MLP with
    `fp8_mtp`. The output head's logits and input gradient (4 per weight, for the main loss and each
    MTP loss) with `fp8_lm_head`. The router, attention scores and the rest stay BF16. Amdahl: FP8
    GEMMs x times faster make a step at most 1 / (1 - share + share / x) faster, share = this /
    `flops_per_token`."""
    dense_mlp = 3 * c.hidden_size * c.intermediate_size
    expert = 3 * c.hidden_size * c.moe_intermediate_size
    total = 0
    last = c.num_hidden_layers - keep_bf16_last_layers
    for index, mlp_type in enumerate(c.mlp_layer_types):
        if not keep_bf16_first_layers <= index < last:
            continue
        total += 6 * attention_weights(c)
        if mlp_type == DENSE:
            total += 6 * dense_mlp
        else:
            routed = (6 if fp8_expert_wgrad else 4) * expert * c.num_experts_per_tok
            total += 6 * expert * c.num_shared_experts + routed
    mtp_layers = c.num_nextn_predict_layers if c.mtp_loss_weight > 0 else 0
    if fp8_mtp:
        total += (
            6 * (2 * c.hidden_size * c.hidden_size + attention_weights(c) + dense_mlp) * mtp_layers
        )
    if fp8_lm_head:
        total += 4 * c.hidden_size * c.vocab_size * (1 + mtp_layers)
    return float(total)


def peak_flops(device_name: str) -> float | None:
    """Dense BF16 peak of one device, when known (H100/H200: 989 TFLOP/s); None on CPU or unknown
    devices."""
    name = device_name.lower()
    if "h100" in name or "h200" in name:
        return H100_BF16_DENSE_PEAK
    return None
