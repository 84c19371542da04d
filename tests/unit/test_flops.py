import torch

from megatron_exaone.model import ExaoneMoeForCausalLM, k_exaone_236b, tiny
from megatron_exaone.model.config import SLIDING
from megatron_exaone.training.flops import active_matmul_weights, attended_keys, flops_per_token


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
    expert = sum(params[f"model.layers.1.mlp.experts.{p}"][0].numel() for p in ("gate_proj", "up_proj", "down_proj"))
    total = sum(p.numel() for n, p in params.items() if "norm" not in n and "embed" not in n and ".experts." not in n)
    moe_layers = sum(t == "sparse" for t in config.mlp_layer_types)
    assert active_matmul_weights(config) == total + moe_layers * config.num_experts_per_tok * expert


def test_k_exaone_active_parameters_are_about_23b():
    config = k_exaone_236b()
    active = active_matmul_weights(config.replace(num_nextn_predict_layers=0)) + config.vocab_size * config.hidden_size
    assert 21e9 < active < 25e9, active  # published: 23B active (embedding included)
    assert flops_per_token(config, 8192) > 6 * active_matmul_weights(config)
