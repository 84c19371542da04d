"""The precision pass: switch the GEMMs of the decoder layers to FP8, in place, keeping parameters
as they are.

Position in the build (`parallel.features.FEATURES`): after tensor and expert parallel, on the meta
device, before materialization (it also works on materialized modules). It swaps the class of each
eligible module (`nn.Linear` -> `Fp8Linear`, `GroupedExperts` -> `Fp8GroupedExperts`), so parameter
names, shapes and state dicts do not change, the tensor-parallel hooks on the parent modules still
apply, and FSDP2 later wraps the layers as usual.

What runs in FP8: the attention projections, dense MLPs, shared experts and routed experts of
decoder layers `model.layers.<i>` with keep_bf16_first_layers <= i < num_layers -
keep_bf16_last_layers (global indices, so a pipeline chunk gets the same answer as the whole model).
What stays in BF16: those first/last layers, the router (`mlp.gate`, fp32 anyway), the embedding,
norms, lm_head (its logits and hidden-state gradient run in FP8 with `fp8_lm_head`) and the MTP
module (its fc and decoder layer run in FP8 with `fp8_mtp`); and, listed in the report and the log,
any linear whose local shape is not a multiple of 16 (a limit of the FP8 kernels, applied by the
emulation too so that it converts the same modules). Routed experts stay BF16 only when
`fp8_experts=False` is asked for.

Tensor parallel: with `amax_group` (the TP group) tensorwise amaxes are max-reduced over it, so
every rank scales with the amax of the full, unsharded operand and the result matches the
single-process model (as TE reduces amax over the TP group for sequence-parallel inputs). Rowwise
scales are per local shard where TP splits the contraction axis (row-parallel inputs and weights,
column-parallel output gradients).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch.distributed as dist
from torch import nn

from megatron_exaone.model.layers import DecoderLayer
from megatron_exaone.model.loss import ComputesHeadGemms
from megatron_exaone.model.moe import GroupedExperts

from .fp8_common import E4M3, E5M2, Fp8Recipe
from .fp8_ops import Fp8Gemms, convert_experts, convert_head, convert_linear

if TYPE_CHECKING:
    from megatron_exaone.config.schema import PrecisionConfig

log = logging.getLogger("megatron_exaone.precision")

LAYER_PREFIX = "model.layers."
MTP_NAME = "mtp"
HEAD_NAME = "lm_head"
ALIGN = 16


@dataclass
class PrecisionReport:
    """Module names switched to FP8, and those left in BF16 with the reason."""

    fp8: list[str] = field(default_factory=list)
    bf16: dict[str, str] = field(default_factory=dict)


def fp8_recipe(cfg: PrecisionConfig, amax_group: dist.ProcessGroup | None) -> Fp8Recipe:
    """The scaling of `cfg` for the torch-native kernels; tensorwise amaxes are max-reduced over
    `amax_group`."""
    scaling = cfg.recipe or "tensorwise"
    if amax_group is not None and (scaling != "tensorwise" or dist.get_world_size(amax_group) == 1):
        amax_group = None
    return Fp8Recipe(scaling, E5M2 if cfg.fp8_format == "hybrid" else E4M3, amax_group)


def convert_gemms(
    root: nn.Module,
    cfg: PrecisionConfig,
    backend: str,
    num_layers: int,
    device_type: str,
    amax_group: dist.ProcessGroup | None = None,
) -> PrecisionReport:
    """The torch-native pass (`registry.apply_precision` calls it): switch the eligible modules of
    `root` (a model or pipeline chunk) to the GEMMs of `backend` ("fp8_torch" or "fp8_emulated", the
    module's `gemms_for`).

    `num_layers`: decoder layers of the whole model (for the last-N rule). `device_type`: where the
    model will run ("cpu"/"cuda"); a backend that cannot run there raises `Fp8Unavailable`.
    """
    gemms: Fp8Gemms = importlib.import_module(f"megatron_exaone.precision.{backend}").gemms_for(
        device_type
    )
    report = PrecisionReport()
    recipe = fp8_recipe(cfg, amax_group)
    first, last = cfg.keep_bf16_first_layers, num_layers - cfg.keep_bf16_last_layers
    for name, block in root.named_modules():
        if name == HEAD_NAME and isinstance(block, ComputesHeadGemms):
            if cfg.fp8_lm_head:
                _convert(
                    report,
                    name,
                    tuple(block.weight.shape),
                    lambda m=block: convert_head(m, gemms, recipe, cfg.fp8_weight_cache),
                )
            else:
                report.bf16[name] = "output head stays in BF16 (fp8_lm_head=False)"
            continue
        if name == MTP_NAME:
            if not cfg.fp8_mtp:
                report.bf16[name] = "MTP module stays in BF16 (fp8_mtp=False)"
                continue
        else:
            index = _layer_index(name, block)
            if index is None:
                continue
            if not first <= index < last:
                report.bf16[name] = (
                    "first/last decoder layers stay in BF16 (keep_bf16_first/last_layers)"
                )
                continue
        for sub, module in block.named_modules():
            full = f"{name}.{sub}"
            if type(module) is nn.Linear:
                _convert(
                    report,
                    full,
                    tuple(module.weight.shape),
                    lambda m=module: convert_linear(m, gemms, recipe, cfg.fp8_weight_cache),
                )
            elif isinstance(module, GroupedExperts):
                if not cfg.fp8_experts:
                    report.bf16[full] = "routed experts kept in BF16 (fp8_experts=False)"
                    continue
                gemms.require_grouped()
                _convert(
                    report,
                    full,
                    tuple(module.gate_proj.shape[1:]),
                    lambda m=module: convert_experts(
                        m, gemms, cfg.fp8_expert_wgrad, cfg.fp8_weight_cache
                    ),
                )
    _log(cfg, recipe, report)
    return report


def _layer_index(name: str, module: nn.Module) -> int | None:
    """The global index of a decoder layer `model.layers.<i>` (not MTP's layers), else None."""
    if not isinstance(module, DecoderLayer) or not name.startswith(LAYER_PREFIX):
        return None
    index = name[len(LAYER_PREFIX) :]
    return int(index) if index.isdigit() else None


def _convert(
    report: PrecisionReport, name: str, shape: tuple[int, ...], convert: Callable[[], None]
) -> None:
    if any(dim % ALIGN for dim in shape):
        report.bf16[name] = f"local shape {shape} is not a multiple of {ALIGN} (FP8 kernel limit)"
        return
    convert()
    report.fp8.append(name)


def _log(cfg: PrecisionConfig, recipe: Fp8Recipe, report: PrecisionReport) -> None:
    log.info(
        "precision %s (%s scaling, %s gradients%s): %d modules in FP8; in BF16: %s",
        cfg.name,
        recipe.scaling,
        str(recipe.grad_dtype).removeprefix("torch."),
        ", amax reduced over TP" if recipe.amax_group else "",
        len(report.fp8),
        ", ".join(sorted(report.bf16)) or "none",
    )
    misfits = [name for name, why in report.bf16.items() if "multiple of" in why]
    if misfits:
        log.warning(
            "precision %s: %d linears kept in BF16 because their shapes do not fit the FP8 "
            "kernels: %s",
            cfg.name,
            len(misfits),
            ", ".join(misfits),
        )
