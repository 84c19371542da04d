import torch

from megatron_exaone.config.schema import PrecisionConfig
from megatron_exaone.model import ExaoneMoeForCausalLM, k_exaone_236b, tiny
from megatron_exaone.model.config import SLIDING
from megatron_exaone.training.flops import (
    active_matmul_weights,
    attended_keys,
    flops_per_token,
    fp8_matmul_flops,
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
