"""Build a model for one rank of a layout: meta-device model -> parallel passes (fixed order) -> materialize."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from megatron_exaone.model import ExaoneMoeForCausalLM, ModelConfig
from megatron_exaone.precision import PrecisionPlan, apply_precision
from megatron_exaone.precision.fp8_te import apply_te, is_te_precision

from .context_parallel import apply_context_parallel
from .expert_parallel import apply_expert_parallel
from .mesh import LayoutError, ParallelDims, ParallelMesh
from .pipeline import PipelineChunk, local_stage_indices, pipeline_layout, sync_embedding_grads
from .sharding import materialize
from .tensor_parallel import apply_tensor_parallel, reduce_tp_partial_grads
from .comm import all_reduce_


def check_supported(dims: ParallelDims) -> None:
    """Layouts the mesh can describe but the passes do not implement yet fail here, before any group exists."""
    if dims.etp > 1:
        raise LayoutError(f"etp={dims.etp}: expert tensor parallelism is not implemented yet; use etp=1 (experts "
                          "whole, spread by ep; the K-EXAONE layouts use ETP1).")


def _apply_passes(root: nn.Module, config: ModelConfig, mesh: ParallelMesh, seed: int, device: torch.device | str,
                  sequence_parallel: bool, precision: PrecisionPlan | str = "bf16") -> None:
    """The passes after the pipeline split, in the design's order, on a meta-device model or pipeline chunk."""
    check_supported(mesh.dims)
    plan = precision if isinstance(precision, PrecisionPlan) else PrecisionPlan(name=precision)
    if plan.te_attention and mesh.dims.cp > 1:
        raise LayoutError(f"precision.te_attention with cp={mesh.dims.cp}: context parallel attention runs on "
                          "SDPA / FlexAttention; set precision.te_attention=false.")
    apply_tensor_parallel(root, mesh.tp_group, sequence_parallel)
    apply_expert_parallel(root, mesh.ep_group)
    apply_context_parallel(root, mesh)
    if is_te_precision(plan):
        apply_te(root, plan, mesh.tp_group, sequence_parallel, amax_group=mesh.tp_cp_dp_group,
                 num_layers=config.num_hidden_layers, fp8_mtp=plan.fp8_mtp, te_attention=plan.te_attention)
    else:
        apply_precision(root, plan, config.num_hidden_layers, torch.device(device).type, amax_group=mesh.tp_group)
    # Activation checkpointing (parallel/recompute.py) and data parallel (FSDP2, parallel/data_parallel.py)
    # wrap the materialized model or each chunk; under a pipeline, FSDP2 must keep parameters unsharded between
    # forward and backward (reshard_after_forward=False) for ZBV/DualPipeV.
    materialize(root, config, seed, device)


def build_parallel_model(config: ModelConfig, mesh: ParallelMesh, seed: int, device: torch.device | str,
                         sequence_parallel: bool = True, precision: PrecisionPlan | str = "bf16"
                         ) -> ExaoneMoeForCausalLM:
    """This rank's shard of the model (pp == 1), initialized to the same full weights as `build_model(config, seed)`.
    `precision`: an FP8 plan (or precision name) for the precision pass; fp32/bf16 leave the modules as they are."""
    if mesh.dims.pp > 1:
        raise LayoutError(f"pp={mesh.dims.pp}: build the pipeline chunks with build_pipeline_chunks.")
    with torch.device("meta"):
        model = ExaoneMoeForCausalLM(config)
    _apply_passes(model, config, mesh, seed, device, sequence_parallel, precision)
    return model


def build_pipeline_chunks(config: ModelConfig, mesh: ParallelMesh, seed: int, device: torch.device | str,
                          schedule: str, layout: str | None = None, sequence_parallel: bool = True,
                          precision: PrecisionPlan | str = "bf16") -> list[PipelineChunk]:
    """This rank's model chunks (one per virtual stage, in the order `schedule` runs them), each sharded and
    initialized to its part of `build_model(config, seed)`. `layout`: see `pipeline_layout`. Run them with
    `pipeline.PipelineRunner` (which builds the torch `PipelineStage`s and the schedule per micro-batch shape).
    `precision` as for `build_parallel_model` (its first/last-layer rule counts global layer indices)."""
    dims = mesh.dims
    specs = pipeline_layout(config, dims.pp, dims.vpp, layout)
    indices = local_stage_indices(schedule, mesh.pp_rank, dims.pp, dims.vpp)
    with torch.device("meta"):
        full = ExaoneMoeForCausalLM(config)
    sequence_shards = dims.cp * (dims.tp if sequence_parallel else 1)
    chunks = []
    for index in indices:
        chunk = PipelineChunk(full, specs[index], index, len(specs), sequence_shards)
        _apply_passes(chunk, config, mesh, seed, device, sequence_parallel, precision)
        chunks.append(chunk)
    return chunks


@torch.no_grad()
def all_reduce_grads(model: nn.Module | Sequence[nn.Module], mesh: ParallelMesh) -> None:
    """Gradient reduction without sharded data parallel, for a model or this rank's pipeline chunks: TP-partial
    gradients over tp, routed experts over edp, everything else over dp x cp, then the pipeline's two embedding
    copies summed. Losses are normalised by the global token count, so gradients are summed."""
    chunks = [model] if isinstance(model, nn.Module) else list(model)
    for chunk in chunks:
        reduce_tp_partial_grads(chunk, mesh.tp_group)
        for name, param in chunk.named_parameters():
            if param.grad is None:
                continue
            all_reduce_(param.grad, mesh.edp_group if ".experts." in name else mesh.dp_cp_group)
    sync_embedding_grads(chunks, mesh)
