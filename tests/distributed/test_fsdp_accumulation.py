"""What FSDP2 holds over a step of micro-batches, measured on 2 gloo ranks against the planner's
model of it (tools/planner.py): without gradient sync it accumulates unsharded gradients (4 B per
local parameter in fp32); reducing every micro-batch (parallel.reduce_grads_each_micro_batch) holds
only the sharded ones.

The held gradients are read from FSDP2's parameter groups (torch internals): this pins the behaviour
the planner's memory figures assume.
"""

import pytest
import torch
from torch.distributed.fsdp import FSDPModule

from megatron_exaone.model import tiny
from megatron_exaone.model.mtp import shift_left
from megatron_exaone.parallel.build import build_parallel_model
from megatron_exaone.parallel.data_parallel import apply_data_parallel
from megatron_exaone.parallel.mesh import ParallelDims, build_mesh
from megatron_exaone.parallel.testing import run_distributed
from tools import planner


def held_gradient_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes of unsharded gradients FSDP2 holds, bytes of this rank's sharded gradients)."""
    unsharded = sharded = 0
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        group = module._get_fsdp_state()._fsdp_param_group
        for fsdp_param in group.fsdp_params if group is not None else ():
            grads = [fsdp_param.unsharded_accumulated_grad]
            if hasattr(fsdp_param, "_unsharded_param"):
                grads.append(fsdp_param.unsharded_param.grad)
            unsharded += sum(g.numel() * g.element_size() for g in grads if g is not None)
            grad = fsdp_param.sharded_param.grad
            if grad is not None:
                sharded += grad.to_local().numel() * grad.element_size()
    return unsharded, sharded


def two_micro_batches(rank: int, world: int) -> dict[str, tuple[int, int]]:
    config = tiny(vocab_size=128)
    mesh = build_mesh(ParallelDims(dp=2), "cpu")
    held = {}
    for mode in ("accumulate", "reduce_each"):
        model = build_parallel_model(config, mesh, seed=0, device="cpu")
        apply_data_parallel(model, mesh, bf16=False)
        gen = torch.Generator().manual_seed(rank)
        for micro in range(2):
            model.set_requires_gradient_sync(mode == "reduce_each" or micro == 1)
            x = torch.randint(0, config.vocab_size, (2, 16), generator=gen)
            model(x, labels=shift_left(x, 1, -100)).loss.backward()
            if micro == 0:
                held[mode] = held_gradient_bytes(model)
    return held


@pytest.fixture(scope="module")
def measured():
    return run_distributed(two_micro_batches, 2, timeout_s=60)


def test_accumulation_holds_what_the_planner_counts(measured):
    config = tiny(vocab_size=128)
    (counted,) = planner.plan(
        planner.PlanInput(model=config, dims=ParallelDims(dp=2), seq_len=16)
    ).ranks
    (each,) = planner.plan(
        planner.PlanInput(
            model=config, dims=ParallelDims(dp=2), seq_len=16, reduce_each_micro_batch=True
        )
    ).ranks
    local = counted.dense_params + counted.expert_params
    for held in measured:
        assert held["accumulate"] == (4 * local, 0) and counted.bytes["gradients"] == 4 * local
        unsharded, sharded = held["reduce_each"]
        assert unsharded == 0 and sharded == pytest.approx(each.bytes["gradients"], rel=0.01)
