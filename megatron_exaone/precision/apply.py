"""The precision pass: switch the GEMMs of the decoder layers to FP8, in place, keeping parameters as they are.

Position in the build (DESIGN §2): after tensor and expert parallel, on the meta device, before materialization
(it also works on materialized modules). It swaps the class of each eligible module (`nn.Linear` -> `Fp8Linear`,
`GroupedExperts` -> `Fp8GroupedExperts`), so parameter names, shapes and state dicts do not change, the
tensor-parallel hooks on the parent modules still apply, and FSDP2 later wraps the layers as usual.

What runs in FP8: the attention projections, dense MLPs, shared experts and routed experts of decoder layers
`model.layers.<i>` with keep_bf16_first_layers <= i < num_layers - keep_bf16_last_layers (global indices, so a
pipeline chunk gets the same answer as the whole model). What stays in BF16: those first/last layers, the router
(`mlp.gate`, fp32 anyway), the embedding, norms, lm_head (its logits and hidden-state gradient run in FP8 with
`fp8_lm_head`) and the MTP module (its fc and decoder layer run in FP8 with `fp8_mtp`); and, listed in the report
and the log, any linear whose local shape is not a multiple of 16 (a limit of the FP8 kernels, applied by the
emulation too so that it converts the same modules). Routed experts stay BF16 only when `fp8_experts=False` is
asked for.

Tensor parallel: with `amax_group` (the TP group) tensorwise amaxes are max-reduced over it, so every rank scales
with the amax of the full, unsharded operand and the result matches the single-process model (as TE reduces amax
over the TP group for sequence-parallel inputs). Rowwise scales are per local shard where TP splits the
contraction axis (row-parallel inputs and weights, column-parallel output gradients).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch.distributed as dist
from torch import nn

from megatron_exaone.model.layers import DecoderLayer
from megatron_exaone.model.loss import ComputesHeadGemms
from megatron_exaone.model.moe import GroupedExperts

from . import fp8_emulated, fp8_torch
from .fp8_common import E4M3, E5M2, Fp8Recipe, Fp8Unavailable
from .fp8_ops import Fp8Gemms, convert_experts, convert_head, convert_linear

if TYPE_CHECKING:
    from megatron_exaone.config.schema import PrecisionConfig

log = logging.getLogger("megatron_exaone.precision")

# Precision name -> the backend's constructor (which checks that this process can run it).
BACKENDS: dict[str, Callable[[str], Fp8Gemms]] = {
    "fp8_torch": fp8_torch.gemms_for,
    "fp8_emulated": fp8_emulated.gemms_for,
}
HIGH_PRECISION = ("fp32", "bf16")
LAYER_PREFIX = "model.layers."
MTP_NAME = "mtp"
HEAD_NAME = "lm_head"
ALIGN = 16


@dataclass(frozen=True)
class PrecisionPlan:
    """What the pass needs from `config.schema.PrecisionConfig` (same field names), plus `fp8_experts`.

    `recipe`: "tensorwise" (default) or "rowwise" for the dense linears. `fp8_format`: "hybrid" (E5M2 gradients)
    or "e4m3". `fp8_expert_wgrad`: the routed experts' weight gradient in FP8 too (else BF16).
    `fp8_experts=False` keeps the routed experts in BF16 (where `torch._scaled_grouped_mm` cannot run).
    `fp8_weight_cache`: quantize the weights once per optimizer step (`fp8_ops.CachesFp8Weights`).
    `fp8_mtp`: the MTP module's linears in FP8 too. `fp8_lm_head`: the output head's logits and hidden-state
    gradient in FP8 (for the main and the MTP losses). Transformer Engine precisions also read `amax_history_len`,
    `amax_compute_algo` (DelayedScaling) and `te_attention` (see PrecisionConfig).
    """

    name: str = "bf16"
    recipe: str | None = None
    fp8_format: str = "hybrid"
    keep_bf16_first_layers: int = 1
    keep_bf16_last_layers: int = 1
    fp8_expert_wgrad: bool = False
    fp8_experts: bool = True
    amax_history_len: int = 1024
    amax_compute_algo: str = "max"
    te_attention: bool = False
    fp8_mtp: bool = False
    fp8_weight_cache: bool = False
    fp8_lm_head: bool = False

    @classmethod
    def from_config(cls, cfg: PrecisionConfig, fp8_experts: bool = True) -> PrecisionPlan:
        return cls(name=cfg.name, recipe=cfg.recipe, fp8_format=cfg.fp8_format,
                   keep_bf16_first_layers=cfg.keep_bf16_first_layers,
                   keep_bf16_last_layers=cfg.keep_bf16_last_layers, fp8_expert_wgrad=cfg.fp8_expert_wgrad,
                   fp8_experts=fp8_experts, amax_history_len=cfg.amax_history_len,
                   amax_compute_algo=cfg.amax_compute_algo, te_attention=cfg.te_attention, fp8_mtp=cfg.fp8_mtp,
                   fp8_weight_cache=cfg.fp8_weight_cache, fp8_lm_head=cfg.fp8_lm_head)

    def fp8_recipe(self, amax_group: dist.ProcessGroup | None) -> Fp8Recipe:
        scaling = self.recipe or "tensorwise"
        if amax_group is not None and (scaling != "tensorwise" or dist.get_world_size(amax_group) == 1):
            amax_group = None
        return Fp8Recipe(scaling, E5M2 if self.fp8_format == "hybrid" else E4M3, amax_group)


@dataclass
class PrecisionReport:
    """Module names switched to FP8, and those left in BF16 with the reason."""

    fp8: list[str] = field(default_factory=list)
    bf16: dict[str, str] = field(default_factory=dict)


def apply_precision(root: nn.Module, precision: PrecisionPlan | str, num_layers: int, device_type: str,
                    amax_group: dist.ProcessGroup | None = None) -> PrecisionReport:
    """Switch the eligible modules of `root` (a model or pipeline chunk) to the FP8 backend `precision` names.

    `num_layers`: decoder layers of the whole model (for the last-N rule). `device_type`: where the model will run
    ("cpu"/"cuda"); a backend that cannot run there raises `Fp8Unavailable`. fp32/bf16: nothing to do.
    """
    plan = precision if isinstance(precision, PrecisionPlan) else PrecisionPlan(name=precision)
    report = PrecisionReport()
    if plan.name in HIGH_PRECISION:
        return report
    if plan.name not in BACKENDS:
        raise Fp8Unavailable(f"precision={plan.name}: this pass implements {', '.join(BACKENDS)}; Transformer "
                             "Engine modes are applied by megatron_exaone.precision.fp8_te.")
    gemms = BACKENDS[plan.name](device_type)
    recipe = plan.fp8_recipe(amax_group)
    first, last = plan.keep_bf16_first_layers, num_layers - plan.keep_bf16_last_layers
    for name, block in root.named_modules():
        if name == HEAD_NAME and isinstance(block, ComputesHeadGemms):
            if plan.fp8_lm_head:
                _convert(report, name, tuple(block.weight.shape),
                         lambda m=block: convert_head(m, gemms, recipe, plan.fp8_weight_cache))
            else:
                report.bf16[name] = "output head stays in BF16 (fp8_lm_head=False)"
            continue
        if name == MTP_NAME:
            if not plan.fp8_mtp:
                report.bf16[name] = "MTP module stays in BF16 (fp8_mtp=False)"
                continue
        else:
            index = _layer_index(name, block)
            if index is None:
                continue
            if not first <= index < last:
                report.bf16[name] = "first/last decoder layers stay in BF16 (keep_bf16_first/last_layers)"
                continue
        for sub, module in block.named_modules():
            full = f"{name}.{sub}"
            if type(module) is nn.Linear:
                _convert(report, full, tuple(module.weight.shape),
                         lambda m=module: convert_linear(m, gemms, recipe, plan.fp8_weight_cache))
            elif isinstance(module, GroupedExperts):
                if not plan.fp8_experts:
                    report.bf16[full] = "routed experts kept in BF16 (fp8_experts=False)"
                    continue
                gemms.require_grouped()
                _convert(report, full, tuple(module.gate_proj.shape[1:]),
                         lambda m=module: convert_experts(m, gemms, plan.fp8_expert_wgrad,
                                                          plan.fp8_weight_cache))
    _log(plan, recipe, report)
    return report


def _layer_index(name: str, module: nn.Module) -> int | None:
    """The global index of a decoder layer `model.layers.<i>` (not MTP's layers), else None."""
    if not isinstance(module, DecoderLayer) or not name.startswith(LAYER_PREFIX):
        return None
    index = name[len(LAYER_PREFIX):]
    return int(index) if index.isdigit() else None


def _convert(report: PrecisionReport, name: str, shape: tuple[int, ...], convert: Callable[[], None]) -> None:
    if any(dim % ALIGN for dim in shape):
        report.bf16[name] = f"local shape {shape} is not a multiple of {ALIGN} (FP8 kernel limit)"
        return
    convert()
    report.fp8.append(name)


def _log(plan: PrecisionPlan, recipe: Fp8Recipe, report: PrecisionReport) -> None:
    log.info("precision %s (%s scaling, %s gradients%s): %d modules in FP8; in BF16: %s", plan.name, recipe.scaling,
             str(recipe.grad_dtype).removeprefix("torch."), ", amax reduced over TP" if recipe.amax_group else "",
             len(report.fp8), ", ".join(sorted(report.bf16)) or "none")
    misfits = [name for name, why in report.bf16.items() if "multiple of" in why]
    if misfits:
        log.warning("precision %s: %d linears kept in BF16 because their shapes do not fit the FP8 kernels: %s",
                    plan.name, len(misfits), ", ".join(misfits))
