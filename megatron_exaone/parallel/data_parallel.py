"""Sharded data parallelism with FSDP2 (`fully_shard`): dense parameters over dp x cp, routed experts over the
expert-data-parallel group (edp). Gradients are summed, not averaged: losses are already normalised by the global
token count. On GPU, parameters are gathered in BF16 while master weights and gradient reduction stay in FP32."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from megatron_exaone.model.layers import DecoderLayer
from megatron_exaone.model.moe import MoEBlock

from .mesh import ParallelMesh


def mixed_precision(device_type: str, bf16: bool) -> MixedPrecisionPolicy:
    if bf16 and device_type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def _shard(module: nn.Module, mesh, policy: MixedPrecisionPolicy, reshard_after_forward: bool,
           ignored: set[nn.Parameter]) -> None:
    fully_shard(module, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward,
                ignored_params=ignored or None)
    module.set_gradient_divide_factor(1.0)
    module.set_force_sum_reduction_for_comms(True)  # a plain SUM: gloo has no PREMUL_SUM


def apply_data_parallel(root: nn.Module, mesh: ParallelMesh, bf16: bool = True,
                        reshard_after_forward: bool = True) -> None:
    """Wrap `root` (materialized, after the TP/EP passes) with FSDP2: the experts of each MoE block over edp,
    then each decoder layer and the root over dp x cp. Routed experts are never part of the dense groups
    (different ep ranks hold different experts). A group of one rank is still wrapped under BF16 mixed precision
    on GPU (FSDP2 does the casting); otherwise it is skipped."""
    policy = mixed_precision(mesh.dense.device_type, bf16)
    casting = policy.param_dtype is not None
    wrap_experts = mesh.dims.edp > 1 or casting
    # Experts wrapped as FSDP units of their own are skipped by the dense units; otherwise they must be ignored.
    unwrapped_experts: set[nn.Parameter] = set()
    for module in root.modules():
        if isinstance(module, MoEBlock):
            if wrap_experts:
                _shard(module.experts, mesh.expert_fsdp_mesh, policy, reshard_after_forward, set())
            else:
                unwrapped_experts |= set(module.experts.parameters())
    if mesh.dense_fsdp_mesh.size() > 1 or casting:
        for module in root.modules():
            if isinstance(module, DecoderLayer):
                _shard(module, mesh.dense_fsdp_mesh, policy, reshard_after_forward, unwrapped_experts)
        _shard(root, mesh.dense_fsdp_mesh, policy, False, unwrapped_experts)
