"""The precision pass: switch the GEMMs of the decoder layers to FP8, in place, keeping parameters
as they are.

Position in the build (`parallel.features.FEATURES`): after tensor and expert parallel, on the meta
device, before materialization (it also works on materialized modules). It swaps the class of each
eligible module (`nn.Linear` -> `Fp8Linear`, `GroupedExperts` -> `Fp8GroupedExperts`), so parameter
names, shapes and state dicts do not change, the tensor-parallel hooks on the parent modules still
apply, and FSDP2 later wraps the layers as usual.

What runs in FP8, for every backend (`fp8_candidates`; Transformer Engine checks its recipe's
alignment instead of 16): the attention projections, dense MLPs, shared experts and routed experts
of decoder layers `model.layers.<i>` with keep_bf16_first_layers <= i < num_layers -
keep_bf16_last_layers (global indices, so a pipeline chunk gets the same answer as the whole model).
What stays in BF16: those first/last layers, the router (`mlp.gate`, fp32 anyway), the embedding,
norms, lm_head (its logits and hidden-state gradient run in FP8 with `fp8_lm_head`) and the MTP
module (its fc and decoder layer run in FP8 with `fp8_mtp`); and, listed in the report and the log,
any module whose local weight shape is not a multiple of 16 (a limit of the FP8 kernels, applied by
the emulation too so that it converts the same modules). Routed experts stay BF16 only when
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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from megatron_exaone.model.layers import DecoderLayer
from megatron_exaone.model.loss import ComputesHeadGemms
from megatron_exaone.model.moe import GroupedExperts

from .fp8_common import E4M3, E5M2, Fp8Recipe
from .fp8_ops import Fp8Gemms, convert_experts, convert_head, convert_linear, fuse_inputs

if TYPE_CHECKING:
    from megatron_exaone.config.schema import PrecisionConfig

log = logging.getLogger("megatron_exaone.precision")

LAYER_PREFIX = "model.layers."
MTP_NAME = "mtp"
HEAD_NAME = "lm_head"
ALIGN = 16
NOT_ALIGNED = "is not a multiple of"


@dataclass
class PrecisionReport:
    """Module names switched to FP8, those left in BF16 with the reason, and the blocks whose input
    projections run as one FP8 GEMM."""

    fp8: list[str] = field(default_factory=list)
    bf16: dict[str, str] = field(default_factory=dict)
    fused: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Candidate:
    """A module the precision pass looked at: `kind` head | linear | experts | layer (a whole block
    kept in BF16); `reason`: why it stays BF16, empty when it converts."""

    name: str
    kind: str
    module: nn.Module
    reason: str = ""


def fp8_candidates(
    root: nn.Module, cfg: PrecisionConfig, num_layers: int, align: int = ALIGN
) -> list[Candidate]:
    """What every backend's pass converts in `root` (a model or pipeline chunk), and what it keeps
    in BF16 and why (module docstring). `num_layers`: the model's decoder layers (the last-N rule
    counts global indices). `align`: what every local weight dim must be a multiple of. Pure: reads
    names, types and shapes."""
    first, last = cfg.keep_bf16_first_layers, num_layers - cfg.keep_bf16_last_layers
    out = []
    for name, block in root.named_modules():
        if name == HEAD_NAME and isinstance(block, ComputesHeadGemms):
            why = "" if cfg.fp8_lm_head else "output head stays in BF16 (fp8_lm_head=False)"
            out.append(_candidate(name, "head", block, block.weight.shape, align, why))
            continue
        if name == MTP_NAME:
            if not cfg.fp8_mtp:
                why = "MTP module stays in BF16 (fp8_mtp=False)"
                out.append(Candidate(name, "layer", block, why))
                continue
        else:
            index = _layer_index(name, block)
            if index is None:
                continue
            if not first <= index < last:
                why = "first/last decoder layers stay in BF16 (keep_bf16_first/last_layers)"
                out.append(Candidate(name, "layer", block, why))
                continue
        for sub, module in block.named_modules():
            if type(module) is nn.Linear:
                kind, shape, why = "linear", module.weight.shape, ""
            elif isinstance(module, GroupedExperts):
                kind, shape = "experts", module.gate_proj.shape[1:]
                why = "" if cfg.fp8_experts else "routed experts kept in BF16 (fp8_experts=False)"
            else:
                continue
            out.append(_candidate(f"{name}.{sub}", kind, module, shape, align, why))
    return out


def _candidate(
    name: str, kind: str, module: nn.Module, shape: torch.Size, align: int, why: str
) -> Candidate:
    if not why and any(dim % align for dim in shape):
        why = f"local shape {tuple(shape)} {NOT_ALIGNED} {align} (FP8 GEMM alignment)"
    return Candidate(name, kind, module, why)


def _layer_index(name: str, module: nn.Module) -> int | None:
    """The global index of a decoder layer `model.layers.<i>` (not MTP's layers), else None."""
    if not isinstance(module, DecoderLayer) or not name.startswith(LAYER_PREFIX):
        return None
    index = name[len(LAYER_PREFIX) :]
    return int(index) if index.isdigit() else None


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
    """The torch-native pass (`registry.apply_precision` calls it): switch the `fp8_candidates` of
    `root` to the GEMMs of `backend` ("fp8_torch" or "fp8_emulated", the module's `gemms_for`).
    `device_type`: where the model will run ("cpu"/"cuda"); a backend that cannot run there raises
    `Fp8Unavailable`."""
    module = importlib.import_module(f"megatron_exaone.precision.{backend}")
    gemms: Fp8Gemms = module.gemms_for(device_type)
    recipe = fp8_recipe(cfg, amax_group)
    cache = cfg.fp8_weight_cache
    convert = {
        "head": lambda m: convert_head(m, gemms, recipe, cache),
        "linear": lambda m: convert_linear(m, gemms, recipe, cache),
        "experts": lambda m: convert_experts(m, gemms, cfg.fp8_expert_wgrad, cache),
    }
    report = PrecisionReport()
    for c in fp8_candidates(root, cfg, num_layers):
        if c.reason:
            report.bf16[c.name] = c.reason
            continue
        if c.kind == "experts":
            gemms.require_grouped()
        convert[c.kind](c.module)
        report.fp8.append(c.name)
    if cfg.fp8_fuse_inputs:
        report.fused = [name for name, block in root.named_modules() if fuse_inputs(block)]
    _log(cfg, recipe, report)
    return report


def _log(cfg: PrecisionConfig, recipe: Fp8Recipe, report: PrecisionReport) -> None:
    log.info(
        "precision %s (%s scaling, %s gradients%s): %d modules in FP8 (%d blocks with their input "
        "projections in one GEMM); in BF16: %s",
        cfg.name,
        recipe.scaling,
        str(recipe.grad_dtype).removeprefix("torch."),
        ", amax reduced over TP" if recipe.amax_group else "",
        len(report.fp8),
        len(report.fused),
        ", ".join(sorted(report.bf16)) or "none",
    )
    warn_misaligned(cfg.name, report)


def warn_misaligned(precision: str, report: PrecisionReport) -> None:
    misfits = [name for name, why in report.bf16.items() if NOT_ALIGNED in why]
    if misfits:
        log.warning(
            "precision %s: %d modules kept in BF16 because their shapes do not fit the FP8 "
            "GEMMs: %s",
            precision,
            len(misfits),
            ", ".join(misfits),
        )
