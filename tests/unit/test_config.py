import pytest

from megatron_exaone.model import ConfigError, ModelConfig, k_exaone_236b, tiny


def test_k_exaone_preset_is_the_published_config():
    c = k_exaone_236b().to_hf_config()
    expected = dict(
        hidden_size=6144,
        num_hidden_layers=48,
        num_attention_heads=64,
        num_key_value_heads=8,
        head_dim=128,
        sliding_window=128,
        intermediate_size=18432,
        first_k_dense_replace=1,
        num_experts=128,
        num_experts_per_tok=8,
        num_shared_experts=1,
        moe_intermediate_size=2048,
        n_group=1,
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        vocab_size=153600,
        max_position_embeddings=262144,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=53,
        pad_token_id=0,
        num_nextn_predict_layers=1,
        model_type="exaone_moe",
    )
    assert {k: c[k] for k in expected} == expected
    assert (
        c["layer_types"]
        == ["sliding_attention"] * 3
        + ["full_attention"]
        + (["sliding_attention"] * 3 + ["full_attention"]) * 11
    )
    assert c["mlp_layer_types"] == ["dense"] + ["sparse"] * 47
    assert c["rope_parameters"] == {"rope_type": "default", "rope_theta": 1e6}


def test_hf_config_round_trip():
    config = tiny(n_group=2, topk_group=1)
    assert (
        ModelConfig.from_hf_config(config.to_hf_config(), mtp_loss_weight=config.mtp_loss_weight)
        == config
    )


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (dict(num_attention_heads=6, num_key_value_heads=4), "num_key_value_heads=4"),
        (dict(layer_types=["sliding_attention"] * 3), "layer_types has 3 entries"),
        (dict(num_experts=8, n_group=3), "n_group=3"),
        (dict(num_experts_per_tok=9), "num_experts_per_tok=9"),
        (dict(sliding_window_pattern="LXG"), "sliding_window_pattern"),
        (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1.0}), "rope_type"),
    ],
)
def test_invalid_configs_name_the_problem(overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        tiny(**overrides)


def test_unknown_model_type_and_key_are_rejected():
    with pytest.raises(ConfigError, match="model_type='llama'"):
        ModelConfig.from_hf_config({"model_type": "llama"})
    with pytest.raises(ConfigError, match="'mystery_knob'"):
        ModelConfig.from_hf_config({**tiny().to_hf_config(), "mystery_knob": 3})
