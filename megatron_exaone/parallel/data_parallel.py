"""Sharded data parallelism with FSDP2 (`fully_shard`): dense parameters over dp x cp, routed
experts over the expert-data-parallel group (edp). Gradients are summed, not averaged: losses are
already normalised by the global token count. On GPU, parameters are gathered in BF16 while master
weights and gradient reduction stay in FP32."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from megatron_exaone.model.layers import DecoderLayer
from megatron_exaone.model.moe import MoEBlock

from .mesh import ParallelMesh


def mixed_precision(
    device_type: str, bf16: bool, param_dtype: torch.dtype | None = None
) -> MixedPrecisionPolicy:
    """BF16 compute with FP32 gradient accumulation and reduction, or FP32 throughout. Parameters
    stored in BF16 (their FP32 masters on the host) compute in BF16 on any device."""
    if (bf16 and device_type == "cuda") or param_dtype == torch.bfloat16:
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def _shard(
    module: nn.Module,
    mesh,
    policy: MixedPrecisionPolicy,
    reshard_after_forward: bool,
    ignored: set[nn.Parameter],
) -> None:
    fully_shard(
        module,
        mesh=mesh,
        mp_policy=policy,
        reshard_after_forward=reshard_after_forward,
        ignored_params=ignored or None,
    )
    module.set_gradient_divide_factor(1.0)
    module.set_force_sum_reduction_for_comms(True)  # a plain SUM: gloo has no PREMUL_SUM


def apply_data_parallel(
    root: nn.Module,
    mesh: ParallelMesh,
    bf16: bool = True,
    reshard_after_forward: bool = True,
    param_dtype: torch.dtype | None = None,
) -> None:
    """Wrap `root` (materialized, after the TP/EP passes) with FSDP2: each decoder layer and the
    root over dp x cp, the routed experts over edp. Under tp, ep or etp > 1 the experts are units of
    their own (edp is another group: different ep ranks hold different experts); otherwise edp is
    the dp x cp group and they stay in their layer's unit. A group of one rank is still wrapped
    under BF16 mixed precision on GPU (FSDP2 does the casting); otherwise it is skipped.
    `param_dtype`: the dtype to store the (sharded) parameters in (None: as they are); buffers keep
    theirs."""
    for param in root.parameters() if param_dtype is not None else ():
        param.data = param.data.to(param_dtype)
    policy = mixed_precision(mesh.dense.device_type, bf16, param_dtype)
    casting = policy.param_dtype is not None
    # With tp = ep = etp = 1 the edp group is the dense dp x cp group itself (same ranks, same
    # order), so the experts stay in their layer's unit. A unit of their own puts FSDP hooks inside
    # the layer's forward, which break a compiled layer's graph at the experts' call
    # (parallel.compile).
    experts_in_layer_unit = mesh.dims.tp == mesh.dims.ep == mesh.dims.etp == 1
    wrap_experts = (mesh.dims.edp > 1 or casting) and not experts_in_layer_unit
    # Experts wrapped as FSDP units of their own are skipped by the dense units; otherwise, unless
    # they belong to the layer's unit, they must be ignored.
    unwrapped_experts: set[nn.Parameter] = set()
    for module in root.modules():
        if isinstance(module, MoEBlock):
            if wrap_experts:
                _shard(module.experts, mesh.expert_fsdp_mesh, policy, reshard_after_forward, set())
            elif not experts_in_layer_unit:
                unwrapped_experts |= set(module.experts.parameters())
    if mesh.dense_fsdp_mesh.size() > 1 or casting:
        for module in root.modules():
            if isinstance(module, DecoderLayer):
                _shard(
                    module, mesh.dense_fsdp_mesh, policy, reshard_after_forward, unwrapped_experts
                )
        _shard(root, mesh.dense_fsdp_mesh, policy, False, unwrapped_experts)
