"""optim.offload=cpu: AdamW stepped by DeepSpeed's CPU Adam on host masters (`training.offload`)
against torch's AdamW, the state checkpoints see, parameters stored in BF16 over FP32 masters, and
the one-line errors when DeepSpeed or its compiler is missing."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from megatron_exaone.config.load import load_config
from megatron_exaone.config.schema import RecipeError
from megatron_exaone.training.offload import (
    CpuOffloadAdamW,
    device_param_dtype,
    offload_unavailable,
)
from megatron_exaone.training.optim import build_optimizer
from megatron_exaone.training.plan import validate

# DeepSpeed's vectorised step and torch's foreach step round differently in fp32
ATOL = 1e-6


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(24, 48), nn.LayerNorm(48), nn.GELU(), nn.Linear(48, 8))


def _train(model: nn.Module, optimizer, steps: int, skip: nn.Parameter | None = None) -> None:
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        optimizer.set_lr(1e-2 * (1 + step % 3))  # the curriculum sets the LR each step
        x = torch.randn(32, 24, generator=gen)
        model(x).pow(2).mean().backward()
        if skip is not None and step % 4 == 1:
            skip.grad = None  # a parameter without a gradient this step is not stepped
        optimizer.step()
        optimizer.zero_grad()


def test_offloaded_adamw_follows_torch_adamw_weights_and_state():
    reference, offloaded = _model(), _model()
    ref_opt = build_optimizer([reference], lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95))
    off_opt = build_optimizer(
        [offloaded], lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), offload="cpu"
    )
    assert isinstance(off_opt.optimizers[0], CpuOffloadAdamW)
    # the same groups: matrices decay, biases and norm gains do not
    assert [len(g["params"]) for g in off_opt.param_groups] == [2, 4]
    assert [g["weight_decay"] for g in off_opt.param_groups] == [0.1, 0.0]
    _train(reference, ref_opt, 25, skip=reference[0].bias)
    _train(offloaded, off_opt, 25, skip=offloaded[0].bias)
    for (name, a), b in zip(reference.named_parameters(), offloaded.parameters()):
        torch.testing.assert_close(b, a, atol=ATOL, rtol=0, msg=name)
        ref_state, off_state = ref_opt.state[a], off_opt.state[b]
        assert set(off_state) == set(ref_state) == {"step", "exp_avg", "exp_avg_sq"}
        assert off_state["step"] == int(ref_state["step"].item())
        for key in ("exp_avg", "exp_avg_sq"):
            assert off_state[key].dtype == torch.float32 and off_state[key].device.type == "cpu"
            torch.testing.assert_close(off_state[key], ref_state[key], atol=ATOL, rtol=0)
    # the skipped bias has fewer steps than the others
    assert off_opt.state[offloaded[0].bias]["step"] < off_opt.state[offloaded[0].weight]["step"]


def test_masters_are_checkpointed_weights_and_params_follow_them():
    model = _model()
    opt = build_optimizer([model], lr=1e-2, offload="cpu")
    _train(model, opt, 3)
    masters = opt.master_weights()
    assert set(masters) == {id(p) for p in model.parameters()}
    for p in model.parameters():
        torch.testing.assert_close(p.detach(), masters[id(p)], atol=0, rtol=0)
    # a checkpoint load writes the masters; the parameters then take their values
    for master in masters.values():
        master.fill_(0.5)
    opt.load_masters_into_params()
    assert all(bool((p == 0.5).all()) for p in model.parameters())


def test_bf16_parameters_keep_fp32_masters_on_the_host():
    """Parameters stored in BF16 (FSDP2 computing in BF16) step in FP32 on the host: updates far
    below BF16's resolution accumulate in the masters and reach the parameters once they add up."""
    weight = nn.Parameter(torch.ones(4, 4, dtype=torch.bfloat16))
    opt = build_optimizer([nn.ParameterList([weight])], lr=1e-4, weight_decay=0.0, offload="cpu")
    (master,) = opt.master_weights().values()
    assert master.dtype == torch.float32
    for _ in range(30):  # each step moves the weight by ~lr = 1e-4, below bf16's 2^-7 at 1.0
        weight.grad = torch.ones(4, 4, dtype=torch.bfloat16)
        opt.step()
        opt.zero_grad()
    assert master.max().item() == pytest.approx(1 - 30e-4, abs=1e-6)
    torch.testing.assert_close(weight.detach(), master.to(torch.bfloat16), atol=0, rtol=0)
    assert weight.dtype == torch.bfloat16 and weight.max().item() < 1


def test_only_a_whole_adamw_model_under_bf16_fsdp_stores_bf16_parameters():
    assert device_param_dtype("cpu", "adamw", fsdp=True, bf16=True) == torch.bfloat16
    for args in (
        ("none", "adamw", True, True),
        ("cpu", "muon", True, True),  # Muon's matrices keep FP32 on the device
        ("cpu", "adamw", False, True),  # no FSDP2: nothing accumulates gradients in FP32
        ("cpu", "adamw", True, False),  # FP32 compute (CPU runs)
    ):
        assert device_param_dtype(*args) == torch.float32


def _offload_config():
    return load_config(["experiment=cpu_tiny", "parallel=single", "optim.offload=cpu"])


def test_offload_validates_when_deepspeed_can_build_its_op():
    assert offload_unavailable() is None
    validate(_offload_config(), 1, "cpu")


def test_without_deepspeed_validation_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # Python's way to make a package absent
    with pytest.raises(RecipeError) as error:
        validate(_offload_config(), 1, "cpu")
    message = str(error.value)
    assert "\n" not in message and "megatron-exaone[deepspeed]" in message
    assert "optim.offload=none" in message


def test_without_a_compiler_validation_says_the_op_cannot_be_built(monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with pytest.raises(RecipeError) as error:
        validate(_offload_config(), 1, "cpu")
    message = str(error.value)
    assert "\n" not in message and "cannot be built" in message and "/nonexistent/c++" in message
    assert "DS_BUILD_CPU_ADAM=1" in message


def test_a_recipe_checked_without_a_machine_skips_the_library_check(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)
    validate(_offload_config(), 1, None)


def test_muon_keeps_its_matrices_on_the_device_and_offloads_the_adamw_groups():
    """optim=muon with offload: Muon steps the hidden matrices where they are; the AdamW groups
    (biases and norm gains here) step on the host; together they train as without offload for 20
    steps."""
    reference, offloaded = _model(), _model()
    ref_opt = build_optimizer([reference], name="muon", lr=1e-2)
    off_opt = build_optimizer([offloaded], name="muon", lr=1e-2, offload="cpu")
    host, muon = off_opt.optimizers
    matrices = {id(p) for p in offloaded.parameters() if p.ndim == 2}
    assert isinstance(host, CpuOffloadAdamW) and type(muon).__name__ == "Muon"
    assert {id(p) for p in host.masters} == {id(p) for p in offloaded.parameters()} - matrices
    assert {id(p) for g in muon.param_groups for p in g["params"]} == matrices
    _train(reference, ref_opt, 20)
    _train(offloaded, off_opt, 20)
    for (name, a), b in zip(reference.named_parameters(), offloaded.parameters()):
        torch.testing.assert_close(b, a, atol=ATOL, rtol=0, msg=name)
