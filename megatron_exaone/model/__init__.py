"""The single-device EXAONE-MoE model (no torch.distributed here; parallel passes live in
`parallel/`)."""

from .config import PRESETS, ConfigError, ModelConfig, k_exaone_236b, tiny
from .init import init_weights
from .loss import cross_entropy, linear_cross_entropy
from .model import CausalLMOutput, ExaoneMoeForCausalLM
from .moe import update_expert_bias

__all__ = [
    "ConfigError",
    "ModelConfig",
    "PRESETS",
    "k_exaone_236b",
    "tiny",
    "init_weights",
    "CausalLMOutput",
    "ExaoneMoeForCausalLM",
    "cross_entropy",
    "linear_cross_entropy",
    "update_expert_bias",
    "build_model",
]


def build_model(config: ModelConfig, seed: int = 0, device: str = "cpu") -> ExaoneMoeForCausalLM:
    """Construct and deterministically initialize a model."""
    import torch

    with torch.device(device):
        model = ExaoneMoeForCausalLM(config)
    init_weights(model, config, seed)
    return model
