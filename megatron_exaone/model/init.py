"""Layout-invariant, deterministic initialization.

Every tensor's values depend only on (seed, its name) and, for stacked routed experts, the expert
index: each expert is drawn from its own generator keyed by its Hugging Face per-expert name. A
parallel layout that holds a slice of a tensor (or some of the experts) can therefore reproduce
exactly the values of the single-process model.

Std: `initializer_range` for every matrix (embedding, projections, router, experts, lm_head,
mtp.fc); output projections (o_proj, down_proj, experts' down_proj) use initializer_range / sqrt(2 *
num_hidden_layers) when `init_depth_scaled`. Norm gains start at 1 and the expert-score correction
bias at 0.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from .config import ModelConfig

_OUTPUT_PROJECTIONS = ("o_proj.weight", "down_proj.weight", "experts.down_proj")


def tensor_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def init_std(config: ModelConfig, name: str) -> float:
    if config.init_depth_scaled and name.endswith(_OUTPUT_PROJECTIONS):
        return config.initializer_range / math.sqrt(2 * config.num_hidden_layers)
    return config.initializer_range


def is_stacked_experts(name: str) -> bool:
    return ".experts." in name and name.rsplit(".", 1)[-1] in ("gate_proj", "up_proj", "down_proj")


def full_init(
    config: ModelConfig,
    name: str,
    shape: torch.Size,
    seed: int,
    device: torch.device | str = "cpu",
    experts: range | None = None,
) -> torch.Tensor:
    """The fp32 initial value of parameter `name` with full shape `shape` (or of `experts` of a
    stacked tensor)."""
    if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
        return torch.ones(shape, device=device)
    std = init_std(config, name)

    def normal(key: str, size: tuple[int, ...]) -> torch.Tensor:
        gen = torch.Generator(device=device).manual_seed(tensor_seed(seed, key))
        return torch.randn(size, generator=gen, device=device) * std

    if is_stacked_experts(name):
        prefix, proj = name.rsplit(".", 1)
        chosen = experts if experts is not None else range(shape[0])
        return torch.stack(
            [normal(f"{prefix}.{e}.{proj}.weight", tuple(shape[1:])) for e in chosen]
        )
    return normal(name, tuple(shape))


@torch.no_grad()
def init_weights(model: nn.Module, config: ModelConfig, seed: int) -> None:
    """Initialize a single-process model in place (parameters, the correction bias, and
    counters)."""
    for name, param in model.named_parameters():
        param.copy_(full_init(config, name, param.shape, seed, param.device))
    for name, buf in model.named_buffers():
        if name.endswith(("e_score_correction_bias", "tokens_per_expert")):
            buf.zero_()
