"""Model configuration: field names follow Hugging Face `ExaoneMoeConfig`, plus training-only
fields."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from megatron_exaone.errors import UserError

SLIDING = "sliding_attention"
FULL = "full_attention"
DENSE = "dense"
SPARSE = "sparse"

# Keys transformers writes into config.json that carry no model semantics for us.
_HF_BOOKKEEPING_KEYS = {
    "architectures",
    "model_type",
    "dtype",
    "torch_dtype",
    "transformers_version",
    "use_cache",
    "output_router_logits",
    "auto_map",
    "_name_or_path",
    "keys_to_ignore_at_inference",
}
# config.json fields of the MTP layers that are read by vLLM / Megatron-Bridge but not by our model.
_HF_MTP_PASSTHROUGH_KEYS = {"mtp_sliding_windows", "mtp_num_speculative_steps", "mtp_share_layers"}
# Fields of the training objective, not of the model: not in config.json, free to change between
# launches.
TRAINING_ONLY_FIELDS = frozenset(
    {"mtp_loss_weight", "aux_loss_coeff", "bias_update_rate", "init_depth_scaled"}
)
# Fields a resumed run may change without changing what its weights mean (initialization,
# special-token ids).
_RESUMABLE_FIELDS = TRAINING_ONLY_FIELDS | {
    "initializer_range",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
}


class ConfigError(UserError, ValueError):
    """A model configuration that cannot describe a valid EXAONE-MoE model."""


def _layer_types_from_pattern(
    num_layers: int, pattern: str | int | None, sliding_window: int | None
) -> list[str]:
    """HF semantics: an int n means every n-th layer is global; a string like "LLLG" repeats per
    layer."""
    if sliding_window is None or pattern in (None, 0):
        return [FULL] * num_layers
    if isinstance(pattern, str):
        if not pattern or set(pattern) - {"L", "G"}:
            raise ConfigError(
                f"sliding_window_pattern={pattern!r}: use a string of 'L' (sliding) and 'G' "
                "(global)."
            )
        return [SLIDING if pattern[i % len(pattern)] == "L" else FULL for i in range(num_layers)]
    return [SLIDING if (i + 1) % int(pattern) != 0 else FULL for i in range(num_layers)]


@dataclass
class ModelConfig:
    """Everything needed to build `ExaoneMoeForCausalLM`.

    Init: matrices ~ N(0, initializer_range); output projections (o_proj, down_proj of dense, shared
    and routed experts, in the decoder and the MTP layers) use initializer_range / sqrt(2 *
    num_hidden_layers) when `init_depth_scaled` (Megatron's scaled init); norm gains are 1, the
    expert-score correction bias is 0.
    """

    vocab_size: int = 153600
    hidden_size: int = 6144
    intermediate_size: int = 18432
    num_hidden_layers: int = 48
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 262144
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 53
    pad_token_id: int | None = 0
    tie_word_embeddings: bool = False
    rope_parameters: dict[str, Any] = field(
        default_factory=lambda: {"rope_type": "default", "rope_theta": 1_000_000.0}
    )
    sliding_window: int | None = 128
    sliding_window_pattern: str | int | None = "LLLG"
    layer_types: list[str] | None = None
    mlp_layer_types: list[str] | None = None
    first_k_dense_replace: int = 1
    moe_intermediate_size: int = 2048
    num_experts: int = 128
    num_experts_per_tok: int = 8
    num_shared_experts: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    n_group: int = 1
    topk_group: int = 1
    # Multi-token prediction (read by vLLM / Megatron-Bridge from config.json).
    num_nextn_predict_layers: int = 1
    mtp_layer_types: list[str] | None = None
    # Training-only fields (not in HF's config).
    mtp_loss_weight: float = 0.05
    aux_loss_coeff: float = 1e-4
    bias_update_rate: float = 1e-4
    init_depth_scaled: bool = True

    def __post_init__(self) -> None:
        if self.layer_types is None:
            self.layer_types = _layer_types_from_pattern(
                self.num_hidden_layers, self.sliding_window_pattern, self.sliding_window
            )
        if self.mlp_layer_types is None:
            self.mlp_layer_types = [
                DENSE if i < self.first_k_dense_replace else SPARSE
                for i in range(self.num_hidden_layers)
            ]
        if self.mtp_layer_types is None:
            # The MTP layer continues the decoder's attention pattern after the last layer.
            pattern = _layer_types_from_pattern(
                self.num_hidden_layers + self.num_nextn_predict_layers,
                self.sliding_window_pattern,
                self.sliding_window,
            )
            self.mtp_layer_types = pattern[self.num_hidden_layers :]
        self.validate()

    # ----------------------------------------------------------------------------------- validation
    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        need(
            self.hidden_act == "silu",
            f"hidden_act={self.hidden_act!r}: only 'silu' (SwiGLU) is supported.",
        )
        need(
            self.num_attention_heads % self.num_key_value_heads == 0,
            f"num_attention_heads={self.num_attention_heads} is not divisible by "
            f"num_key_value_heads={self.num_key_value_heads}: grouped-query attention needs a "
            "whole number of query heads per KV head.",
        )
        need(
            self.head_dim % 2 == 0, f"head_dim={self.head_dim} must be even for rotary embeddings."
        )
        for name, count in (
            ("layer_types", "num_hidden_layers"),
            ("mlp_layer_types", "num_hidden_layers"),
            ("mtp_layer_types", "num_nextn_predict_layers"),
        ):
            entries, want = len(getattr(self, name)), getattr(self, count)
            need(entries == want, f"{name} has {entries} entries but {count}={want}.")
        for name, values, allowed in (
            ("layer_types", self.layer_types + self.mtp_layer_types, (SLIDING, FULL)),
            ("mlp_layer_types", self.mlp_layer_types, (DENSE, SPARSE)),
        ):
            bad = sorted(set(values) - set(allowed))
            need(not bad, f"{name} has unknown entries {bad}; allowed: {list(allowed)}.")
        if SLIDING in self.layer_types + self.mtp_layer_types:
            need(
                self.sliding_window is not None and self.sliding_window > 0,
                "sliding_attention layers need a positive sliding_window.",
            )
        rope_type = self.rope_parameters.get("rope_type", "default")
        need(
            rope_type == "default",
            f"rope_parameters.rope_type={rope_type!r}: only 'default' RoPE is supported "
            "(K-EXAONE needs no RoPE scaling: its global layers use no positional encoding).",
        )
        need("rope_theta" in self.rope_parameters, "rope_parameters needs a 'rope_theta'.")
        if SPARSE in self.mlp_layer_types:
            need(self.num_experts > 0, "sparse layers need num_experts > 0.")
            need(
                0 < self.num_experts_per_tok <= self.num_experts,
                f"num_experts_per_tok={self.num_experts_per_tok} must be in "
                f"1..num_experts={self.num_experts}.",
            )
            need(
                self.num_experts % self.n_group == 0,
                f"num_experts={self.num_experts} is not divisible by n_group={self.n_group}.",
            )
            need(
                0 < self.topk_group <= self.n_group,
                f"topk_group={self.topk_group} must be in 1..n_group={self.n_group}.",
            )
            per_group = self.num_experts // self.n_group
            need(
                per_group >= 2 or self.n_group == 1,
                "group-limited routing scores each group by its top-2 experts; "
                f"n_group={self.n_group} leaves {per_group} expert(s) per group.",
            )
            need(
                self.num_experts_per_tok <= self.topk_group * per_group,
                f"num_experts_per_tok={self.num_experts_per_tok} exceeds the experts in "
                f"topk_group={self.topk_group} groups of {per_group}.",
            )
        need(self.num_nextn_predict_layers >= 0, "num_nextn_predict_layers must be >= 0.")
        need(
            self.vocab_size > 0 and self.hidden_size > 0,
            "vocab_size and hidden_size must be positive.",
        )

    # -------------------------------------------------------------------------------------- derived
    @property
    def rope_theta(self) -> float:
        return float(self.rope_parameters["rope_theta"])

    def uses_rope(self, layer_type: str) -> bool:
        """transformers' semantics: RoPE on sliding layers only (global layers are NoPE); on every
        layer only when `sliding_window` is None."""
        return layer_type == SLIDING or self.sliding_window is None

    # ------------------------------------------------------------------------------- HF config.json
    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], **overrides: Any) -> ModelConfig:
        """Build from a config.json dict. Training-only fields keep defaults unless given in
        `overrides`."""
        if hf.get("model_type", "exaone_moe") != "exaone_moe":
            raise ConfigError(
                f"model_type={hf.get('model_type')!r}: expected 'exaone_moe' (an EXAONE-MoE "
                "config)."
            )
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in hf.items():
            if key in names:
                kwargs[key] = value
            elif key == "rope_theta":  # older configs keep it at top level
                kwargs.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": value})
            elif key == "attention_dropout":
                if value:
                    raise ConfigError(
                        f"attention_dropout={value}: dropout is not supported; set it to 0."
                    )
            elif key not in _HF_BOOKKEEPING_KEYS and key not in _HF_MTP_PASSTHROUGH_KEYS:
                raise ConfigError(
                    f"config.json key {key!r} is not understood by megatron-exaone's ExaoneMoe "
                    "model; remove it or file an issue if it changes the model."
                )
        # transformers' config has no MTP field: a config.json without one describes a model without
        # MTP.
        kwargs.setdefault("num_nextn_predict_layers", 0)
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf_config(self) -> dict[str, Any]:
        """A config.json dict that transformers' `ExaoneMoeConfig` and vLLM read (explicit
        layer_types always)."""
        out: dict[str, Any] = {
            "architectures": ["ExaoneMoeForCausalLM"],
            "model_type": "exaone_moe",
        }
        for f in dataclasses.fields(self):
            if f.name not in TRAINING_ONLY_FIELDS:
                out[f.name] = _plain(getattr(self, f.name))
        out["attention_dropout"] = 0.0
        return out

    def weight_differences(self, other: ModelConfig) -> dict[str, tuple[Any, Any]]:
        """field -> (this value, `other`'s) for every field whose difference changes the weights'
        shapes or meaning (what a resumed run may not change)."""
        return {
            f.name: (getattr(self, f.name), getattr(other, f.name))
            for f in dataclasses.fields(self)
            if f.name not in _RESUMABLE_FIELDS
            and _plain(getattr(self, f.name)) != _plain(getattr(other, f.name))
        }

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed; derived per-layer lists are recomputed unless given."""
        data = dataclasses.asdict(self)
        if {"num_hidden_layers", "sliding_window_pattern", "sliding_window"} & changes.keys():
            data["layer_types"] = None
            data["mtp_layer_types"] = None
        if {"num_hidden_layers", "first_k_dense_replace"} & changes.keys():
            data["mlp_layer_types"] = None
        if "num_nextn_predict_layers" in changes:
            data["mtp_layer_types"] = None
        data.update(changes)
        return ModelConfig(**data)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def k_exaone_236b(**overrides: Any) -> ModelConfig:
    """K-EXAONE-236B-A23B exactly as published (48 layers + 1 MTP, LLLG hybrid, 128 experts
    top-8)."""
    return ModelConfig().replace(**overrides) if overrides else ModelConfig()


def tiny(**overrides: Any) -> ModelConfig:
    """A few-hundred-thousand-parameter model with the full structure, for CPU tests and the quick
    start."""
    base = ModelConfig(
        vocab_size=4096,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
        sliding_window=16,
        sliding_window_pattern="LLLG",
        first_k_dense_replace=1,
        moe_intermediate_size=32,
        num_experts=8,
        num_experts_per_tok=2,
        num_shared_experts=1,
        routed_scaling_factor=2.5,
    )
    return base.replace(**overrides) if overrides else base


PRESETS = {"k_exaone_236b": k_exaone_236b, "tiny": tiny}
