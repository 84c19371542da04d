"""Our model against transformers' ExaoneMoeForCausalLM (the independent reference), through our HF
converter."""

import pytest
import torch
from transformers import ExaoneMoeConfig
from transformers import ExaoneMoeForCausalLM as HFModel

from megatron_exaone.convert.hf import from_hf, to_hf
from megatron_exaone.model import build_model, tiny
from megatron_exaone.model.mtp import shift_left

VOCAB = 211
CONFIGS = {
    "base": dict(),
    "int_pattern_no_dense_no_shared": dict(
        sliding_window_pattern=2, sliding_window=5, first_k_dense_replace=0, num_shared_experts=0
    ),
    "grouped_routing_two_dense_two_shared": dict(
        first_k_dense_replace=2,
        num_shared_experts=2,
        num_experts=8,
        n_group=4,
        topk_group=2,
        num_experts_per_tok=3,
    ),
    "no_norm_topk_scaling_gqa4_tied": dict(
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
        num_attention_heads=8,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    "all_global_nope_mha": dict(sliding_window_pattern="G", num_key_value_heads=4),
    "all_sliding_window_3": dict(
        sliding_window_pattern="L", sliding_window=3, first_k_dense_replace=1
    ),
}


def make_pair(tmp_path, overrides, seed=0):
    # transformers has no sequence aux loss; ours sends its gradient through the MoE outputs, so it
    # is off here.
    config = tiny(vocab_size=VOCAB, aux_loss_coeff=0.0, **overrides)
    ours = build_model(config, seed=seed).eval()
    with torch.no_grad():  # non-zero correction biases so that routing depends on them
        for module in ours.modules():
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.uniform_(-0.05, 0.05)
    hf = HFModel.from_pretrained(
        to_hf(config, ours.state_dict(), tmp_path / "hf"), attn_implementation="eager"
    )
    return config, ours, hf.eval()


def tokens(batch=2, seq=37, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, seq), generator=gen)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers(tmp_path, name):
    _, ours, hf = make_pair(tmp_path, CONFIGS[name])
    x = tokens()
    with torch.no_grad():
        diff = (ours(x).logits - hf(x).logits).abs().max().item()
    assert diff <= 1e-5, f"{name}: max |logit diff| = {diff}"


@pytest.mark.parametrize(
    "name", ["base", "grouped_routing_two_dense_two_shared", "no_norm_topk_scaling_gqa4_tied"]
)
def test_lm_loss_gradients_match_transformers(tmp_path, name):
    _, ours, hf = make_pair(tmp_path, CONFIGS[name])
    x = tokens(seed=1)
    ours_out = ours(x, labels=shift_left(x, 1, fill=-100))
    hf_out = hf(x, labels=x)
    assert abs(ours_out.lm_loss.item() - hf_out.loss.item()) <= 1e-5
    ours_out.lm_loss.backward()
    hf_out.loss.backward()
    ours_grads = {n: p.grad for n, p in ours.named_parameters()}
    checked = 0
    for hf_name, param in hf.named_parameters():
        if hf_name.endswith("experts.gate_up_proj"):
            prefix = hf_name.removesuffix("gate_up_proj")
            pairs = zip(
                (ours_grads[prefix + "gate_proj"], ours_grads[prefix + "up_proj"]),
                param.grad.chunk(2, dim=1),
            )
        else:
            pairs = [(ours_grads[hf_name], param.grad)]
        for got, want in pairs:
            scale = want.abs().max().item()
            err = (got - want).abs().max().item()
            assert err <= 1e-4 * scale + 1e-9, (
                f"{name}: {hf_name} grad differs by {err} (scale {scale})"
            )
            checked += 1
    assert checked >= 20


def test_hf_random_init_loads_into_ours(tmp_path):
    hf_config = ExaoneMoeConfig(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=6,
        num_experts_per_tok=2,
        moe_intermediate_size=24,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        sliding_window=4,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        first_k_dense_replace=1,
    )
    torch.manual_seed(3)
    hf = HFModel(hf_config).eval()
    with torch.no_grad():
        for layer in hf.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.uniform_(-0.1, 0.1)
    hf.save_pretrained(tmp_path / "hf")
    config, state = from_hf(tmp_path / "hf")
    assert config.num_nextn_predict_layers == 0
    from megatron_exaone.model import ExaoneMoeForCausalLM

    ours = ExaoneMoeForCausalLM(config).eval()
    ours.load_state_dict(state)
    x = tokens(seed=2)
    with torch.no_grad():
        assert (ours(x).logits - hf(x).logits).abs().max().item() <= 1e-5


def test_mtp_loss_matches_vllm_style_reference(tmp_path):
    """Re-implements vLLM's ExaoneMoe MTP forward on transformers' modules and compares the MTP
    loss."""
    from transformers.models.exaone_moe.modeling_exaone_moe import (
        ExaoneMoeDecoderLayer,
        ExaoneMoeRMSNorm,
    )

    config, ours, hf = make_pair(
        tmp_path, {"num_nextn_predict_layers": 1, "mtp_layer_types": ["sliding_attention"]}
    )
    x = tokens(batch=2, seq=29, seed=4)
    labels = shift_left(x, 1, fill=-100)
    with torch.no_grad():
        got = ours(x, labels=labels).mtp_loss

        layer_cfg = ExaoneMoeConfig(
            **{
                **hf.config.to_dict(),
                "num_hidden_layers": 1,
                "layer_types": ["sliding_attention"],
                "mlp_layer_types": ["dense"],
            }
        )
        layer_cfg._attn_implementation = "eager"
        layer = ExaoneMoeDecoderLayer(layer_cfg, 0).eval()
        mtp_state = {
            k.removeprefix("mtp.layers.0."): v
            for k, v in ours.state_dict().items()
            if k.startswith("mtp.layers.0.")
        }
        layer.load_state_dict(mtp_state)
        norms = {}
        for name in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
            norms[name] = ExaoneMoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            norms[name].weight.copy_(ours.state_dict()[f"mtp.{name}.weight"])
        fc_weight = ours.state_dict()["mtp.fc.weight"]

        # the target model's final-normed hidden state
        hidden = hf.model(x).last_hidden_state
        next_ids = torch.cat([x[:, 1:], torch.zeros_like(x[:, :1])], dim=1)
        fused = (
            torch.cat(
                [
                    norms["pre_fc_norm_embedding"](hf.model.embed_tokens(next_ids)),
                    norms["pre_fc_norm_hidden"](hidden),
                ],
                dim=-1,
            )
            @ fc_weight.T
        )
        seq = x.shape[1]
        positions = torch.arange(seq).expand_as(x)
        cos_sin = hf.model.rotary_emb(fused, positions)
        i, j = torch.arange(seq)[:, None], torch.arange(seq)[None, :]
        allowed = (j <= i) & (i - j < config.sliding_window)
        mask = torch.zeros(seq, seq).masked_fill(~allowed, float("-inf"))[None, None]
        out = norms["norm"](
            layer(fused, attention_mask=mask, position_embeddings=cos_sin, position_ids=positions)
        )
        logits = hf.lm_head(out)
        # position t predicts t + 2
        target = torch.cat([x[:, 2:], torch.full_like(x[:, :2], -100)], dim=1)
        want = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), target.flatten(), ignore_index=-100
        )
    assert abs(got.item() - want.item()) <= 1e-5
