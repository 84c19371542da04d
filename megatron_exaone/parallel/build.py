"""Build this rank's part of a layout: the meta-device model, split into pipeline chunks when pp >
1, then the one ordered list of features (`features.FEATURES`) on each chunk. The trainer, the
benchmarks, the converter and the tests all build through `build_chunks`."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from megatron_exaone.config.schema import ParallelConfig, PrecisionConfig
from megatron_exaone.model import ExaoneMoeForCausalLM, ModelConfig

from .comm import all_reduce_
from .features import FEATURES, Build
from .mesh import ParallelMesh
from .pipeline import PipelineChunk, local_stage_indices, pipeline_layout, sync_embedding_grads
from .tensor_parallel import reduce_tp_partial_grads


def build_chunks(build: Build, mesh: ParallelMesh) -> list[nn.Module]:
    """This rank's model (pp == 1) or its pipeline chunks (one per virtual stage, in the order the
    schedule runs them), each sharded, initialized to its part of `build_model(config, seed)` and
    wrapped as `build` asks."""
    with torch.device("meta"):
        chunks = (
            [ExaoneMoeForCausalLM(build.model)]
            if mesh.dims.pp == 1
            else _pipeline_chunks(build, mesh)
        )
    for feature in FEATURES:
        for chunk in chunks:
            feature.apply(chunk, mesh, build)
    return chunks


def _pipeline_chunks(build: Build, mesh: ParallelMesh) -> list[PipelineChunk]:
    """This rank's stages, each the model with the parts it does not run removed."""
    dims, p = mesh.dims, build.parallel
    specs = pipeline_layout(build.model, dims.pp, dims.vpp, p.pipeline_layout)
    sequence_shards = dims.cp * (dims.tp if p.sequence_parallel else 1)
    return [
        PipelineChunk(build.model, specs[i], i, len(specs), sequence_shards)
        for i in local_stage_indices(p.pipeline_schedule, mesh.pp_rank, dims.pp, dims.vpp)
    ]


def _plain(
    config: ModelConfig,
    mesh: ParallelMesh,
    seed: int,
    device: torch.device | str,
    sequence_parallel: bool,
    precision: PrecisionConfig | str,
    **parallel,
) -> Build:
    """A build of the parallel passes and the precision only (no compile, recompute or FSDP2)."""
    precision = (
        precision if isinstance(precision, PrecisionConfig) else PrecisionConfig(name=precision)
    )
    sizes = {f.name: getattr(mesh.dims, f.name) for f in dataclasses.fields(mesh.dims)}
    layout = ParallelConfig(**sizes, sequence_parallel=sequence_parallel, fsdp=False, **parallel)
    return Build(config, layout, precision, mesh.dims, torch.device(device).type, seed)


def build_parallel_model(
    config: ModelConfig,
    mesh: ParallelMesh,
    seed: int,
    device: torch.device | str,
    sequence_parallel: bool = True,
    precision: PrecisionConfig | str = "bf16",
) -> ExaoneMoeForCausalLM:
    """This rank's shard of the model (pp == 1) through the parallel passes and the precision pass,
    initialized to the same full weights as `build_model(config, seed)`."""
    (model,) = build_chunks(_plain(config, mesh, seed, device, sequence_parallel, precision), mesh)
    return model


def build_pipeline_chunks(
    config: ModelConfig,
    mesh: ParallelMesh,
    seed: int,
    device: torch.device | str,
    schedule: str,
    layout: str | None = None,
    sequence_parallel: bool = True,
    precision: PrecisionConfig | str = "bf16",
) -> list[PipelineChunk]:
    """This rank's pipeline chunks for `schedule` (`layout`: see `pipeline_layout`), as
    `build_parallel_model` builds a model. Run them with `step.PipelineRunner`."""
    return build_chunks(
        _plain(
            config,
            mesh,
            seed,
            device,
            sequence_parallel,
            precision,
            pipeline_schedule=schedule,
            pipeline_layout=layout,
        ),
        mesh,
    )


@torch.no_grad()
def all_reduce_grads(model: nn.Module | Sequence[nn.Module], mesh: ParallelMesh) -> None:
    """Gradient reduction without sharded data parallel, for a model or this rank's pipeline chunks:
    TP-partial gradients over tp, routed experts over edp, everything else over dp x cp, then the
    pipeline's two embedding copies summed. Losses are normalised by the global token count, so
    gradients are summed."""
    chunks = [model] if isinstance(model, nn.Module) else list(model)
    for chunk in chunks:
        reduce_tp_partial_grads(chunk, mesh.tp_group)
        for name, param in chunk.named_parameters():
            if param.grad is None:
                continue
            all_reduce_(param.grad, mesh.edp_group if ".experts." in name else mesh.dp_cp_group)
    sync_embedding_grads(chunks, mesh)


def reduce_grads(model: nn.Module | Sequence[nn.Module], mesh: ParallelMesh, fsdp: bool) -> None:
    """Finish the gradients' reduction after backward, for a model or this rank's pipeline chunks.
    Under FSDP2 (`fsdp`), which reduced dense gradients over dp x cp and routed experts over edp in
    backward: the TP-partial gradients over tp and the pipeline's two embedding copies. Otherwise
    all of it (`all_reduce_grads`)."""
    chunks = [model] if isinstance(model, nn.Module) else list(model)
    if not fsdp:
        all_reduce_grads(chunks, mesh)
        return
    for chunk in chunks:
        reduce_tp_partial_grads(chunk, mesh.tp_group)
    sync_embedding_grads(chunks, mesh)
