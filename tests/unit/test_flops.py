import pytest
import torch

from megatron_exaone.config.schema import PrecisionConfig
from megatron_exaone.model import ExaoneMoeForCausalLM, k_exaone_236b, tiny
from megatron_exaone.model.config import SLIDING
from megatron_exaone.training.flops import (
    active_matmul_weights,
    attended_keys,
    flops_per_token,
    fp8_matmul_flops,
    megatron_flops_per_token,
)


def test_attended_keys_for_causal_and_sliding_layers():
    assert attended_keys("full_attention", 4, None) == 2.5
    # window 2 over 4 tokens: queries see 1, 2, 2, 2 keys
    assert attended_keys(SLIDING, 4, 2) == 7 / 4
    assert attended_keys(SLIDING, 4, 8) == 2.5


def test_active_weights_match_the_modules_a_token_uses():
    config = tiny(vocab_size=100, num_nextn_predict_layers=0)
    with torch.device("meta"):
        model = ExaoneMoeForCausalLM(config)
    params = dict(model.named_parameters())
    expert = sum(
        params[f"model.layers.1.mlp.experts.{p}"][0].numel()
        for p in ("gate_proj", "up_proj", "down_proj")
    )
    total = sum(
        p.numel()
        for n, p in params.items()
        if "norm" not in n and "embed" not in n and ".experts." not in n
    )
    moe_layers = sum(t == "sparse" for t in config.mlp_layer_types)
    assert active_matmul_weights(config) == total + moe_layers * config.num_experts_per_tok * expert


def test_k_exaone_active_parameters_are_about_23b():
    config = k_exaone_236b()
    active = (
        active_matmul_weights(config.replace(num_nextn_predict_layers=0))
        + config.vocab_size * config.hidden_size
    )
    assert 21e9 < active < 25e9, active  # published: 23B active (embedding included)
    assert flops_per_token(config, 8192) > 6 * active_matmul_weights(config)


def test_fp8_matmul_flops_count_what_the_precision_pass_converts():
    """6 FLOPs per weight of every linear the pass makes FP8, 4 (forward and input gradient) per
    active routed expert weight (their weight gradient stays BF16) and per head weight for each loss
    (main and MTP): the same total as the formula, with and without MTP and the head."""
    from megatron_exaone.precision import apply_precision
    from megatron_exaone.precision.fp8_ops import Fp8GroupedExperts, Fp8Head, Fp8Linear

    config = tiny(vocab_size=256)
    for fp8_mtp, fp8_lm_head in ((False, False), (True, False), (True, True)):
        with torch.device("meta"):
            model = ExaoneMoeForCausalLM(config)
        plan = PrecisionConfig("fp8_emulated", fp8_mtp=fp8_mtp, fp8_lm_head=fp8_lm_head)
        apply_precision(model, plan, config.num_hidden_layers, "cpu")
        counted = 0
        for module in model.modules():
            if isinstance(module, Fp8Linear):
                counted += 6 * module.weight.numel()
            elif isinstance(module, Fp8GroupedExperts):
                per_expert = sum(
                    w[0].numel() for w in (module.gate_proj, module.up_proj, module.down_proj)
                )
                counted += 4 * per_expert * config.num_experts_per_tok
            elif isinstance(module, Fp8Head):
                counted += 4 * module.weight.numel() * (1 + config.num_nextn_predict_layers)
        assert counted > 0
        assert fp8_matmul_flops(config, fp8_mtp=fp8_mtp, fp8_lm_head=fp8_lm_head) == counted
    share = fp8_matmul_flops(k_exaone_236b()) / flops_per_token(k_exaone_236b(), 8192)
    # 46 of 48 decoder layers' projections; head, router, attention scores stay BF16
    assert 0.6 < share < 0.7


def test_megatron_counting_by_hand_for_the_tiny_model():
    """Megatron-LM's count for tiny (h 64, 4 x 16 query and 2 x 16 KV dims, 1 dense + 3 MoE layers,
    MTP after a MoE layer so counted as a fifth MoE layer, vocab 4096) at 256 tokens."""
    s = 256
    mlp = 3 * 64 * (128 * 1 + (32 * 2 + 32) * 4)
    projections = (64 * (64 + 2 * 32) + 64 * 64) * 5
    mtp = 3 * 64 + 2 * 64 * 64
    logits = 64 * 4096 * 2
    core = 64 * s * 5  # every layer causal over the whole sequence, sliding ones too
    assert megatron_flops_per_token(tiny(), s) == 6 * (mlp + projections + mtp + logits + core)


def test_megatron_counts_sliding_layers_as_global_and_no_router():
    """Against ours: at a sequence no longer than the window the only differences are the router
    (ours) and the MTP layer's norms (Megatron's); beyond it Megatron counts more."""
    config = tiny()
    short = config.sliding_window
    router = 6 * config.num_experts * config.hidden_size * 3  # three MoE layers
    # ours counts (S + 1) / 2 keys per query, Megatron S / 2; its MTP layer is MoE, ours dense
    ours = flops_per_token(config, short)
    keys = 6 * config.num_attention_heads * config.head_dim * 5  # (S + 1) / 2 - S / 2, five layers
    h, e = config.hidden_size, config.moe_intermediate_size
    mtp_mlp = 6 * 3 * h * (e * (config.num_experts_per_tok + 1) - config.intermediate_size)
    expected = ours - router - keys + mtp_mlp + 6 * 3 * h
    assert megatron_flops_per_token(config, short) == pytest.approx(expected, rel=1e-12)
    longer = 8 * short
    assert megatron_flops_per_token(config, longer) > flops_per_token(config, longer)
    big = k_exaone_236b()
    assert megatron_flops_per_token(big, 8192) / flops_per_token(big, 8192) == pytest.approx(
        1.0945, abs=1e-4
    )
