"""Build a model for one rank of a layout: meta-device model -> parallel passes (fixed order) -> materialize."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from megatron_exaone.model import ExaoneMoeForCausalLM, ModelConfig

from .expert_parallel import apply_expert_parallel
from .mesh import ParallelMesh
from .sharding import materialize
from .tensor_parallel import apply_tensor_parallel, reduce_tp_partial_grads


def build_parallel_model(config: ModelConfig, mesh: ParallelMesh, seed: int, device: torch.device | str,
                         sequence_parallel: bool = True) -> ExaoneMoeForCausalLM:
    """This rank's shard of the model, initialized to the same full weights as `build_model(config, seed)`."""
    with torch.device("meta"):
        model = ExaoneMoeForCausalLM(config)
    apply_tensor_parallel(model, mesh.tp_group, sequence_parallel)
    apply_expert_parallel(model, mesh.ep_group)
    materialize(model, config, seed, device)
    return model


@torch.no_grad()
def all_reduce_grads(model: nn.Module, mesh: ParallelMesh) -> None:
    """Gradient reduction without sharded data parallel: TP-partial gradients over tp, routed experts over edp,
    everything else over dp x cp. Losses are normalised by the global token count, so gradients are summed."""
    reduce_tp_partial_grads(model, mesh.tp_group)
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        group = mesh.edp_group if ".experts." in name else mesh.dp_cp_group
        if dist.get_world_size(group) > 1:
            dist.all_reduce(param.grad, group=group)
