"""optim.offload=cpu through exaone-train: AdamW stepped by DeepSpeed's CPU Adam on host masters
trains as torch's AdamW for 20 steps on one process, under FSDP2 with expert parallel (dp2 x ep2)
and through a pipeline (pp2) (Muon with offload: tests/unit/test_offload.py); checkpoints are the
same with and without offload, so a run switches it on or off across a resume and continues, under
another layout too. Parameters stored in BF16 under FSDP2 step in FP32 on the host and checkpoint
their FP32 masters.

Runs go through the `exaone-train` code (`cli.train.main` in a forked process, `run_training` on
forked gloo ranks) with the cpu_tiny experiment."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megatron_exaone import checkpoint as ckpt
from megatron_exaone.checkpoint.store import load_checkpoint, saved_tensors
from megatron_exaone.cli.train import run_training
from megatron_exaone.config.schema import ParallelConfig
from megatron_exaone.model import tiny
from megatron_exaone.model.mtp import shift_left
from megatron_exaone.parallel.build import build_chunks
from megatron_exaone.parallel.features import Build
from megatron_exaone.parallel.mesh import ParallelDims, build_mesh
from megatron_exaone.parallel.testing import run_distributed
from megatron_exaone.training.optim import build_optimizer
from tests.runs import by_step, overrides, train
from tools import planner

STEPS = 20
OFFLOAD = "optim.offload=cpu"
# DeepSpeed's vectorised step and torch's foreach step round differently in fp32; the gradient
# norm, a sum of squares over every weight, drifts the most (2e-6 in 20 steps, losses 1.2e-7)
RTOL = 1e-5
GRAD_NORM_RTOL = 1e-4
# the same weights under another layout: fp32 sums in another order
RESHARD_RTOL = 1e-4
# cpu_tiny's LR, 3e-3, made 1e-3: the sequence aux loss counts each token's top-k experts by router
# score alone, and the tiny model's scores lie close together (the bias, not they, steers its
# routing), so at 3e-3 the two optimizers' fp32 rounding moves tokens between top-k sets and Adam
# turns the router's changed gradient into weights 100x further apart every 10 steps (the runs
# then differ by 1.7e-3 in aux loss and 1e-5 in LM loss at step 20). At 1e-3 they agree to 2e-7.
CALM_LR = ("curriculum.stages.0.lr.peak_lr=1e-3", "curriculum.stages.1.lr.peak_lr=1e-3")


def _train_rank(rank: int, world: int, argv: list[str]) -> str:
    return run_training(argv)


def run(world: int, run_dir: Path, data: list[str], *extra: str) -> dict[int, dict]:
    argv = overrides(
        run_dir, data, f"trainer.max_steps={STEPS}", "checkpoint.interval=10",
        "checkpoint.keep_last=0", *CALM_LR, *extra,
    )  # fmt: skip
    if world == 1:
        train(argv)
    else:
        run_distributed(_train_rank, world, argv, timeout_s=180)
    return by_step(run_dir)


def assert_close_runs(got: dict[int, dict], want: dict[int, dict], steps, rtol: float) -> None:
    assert sorted(got) == list(steps)
    for step in steps:
        for key in ("loss", "lm_loss", "mtp_loss", "aux_loss"):
            assert got[step][key] == pytest.approx(want[step][key], rel=rtol), (step, key)
        grad_norm = pytest.approx(want[step]["grad_norm"], rel=max(rtol, GRAD_NORM_RTOL))
        assert got[step]["grad_norm"] == grad_norm, step
        for key in ("tokens", "stage", "lr"):
            assert got[step][key] == want[step][key]


def saved_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The model weights a checkpoint holds, as full tensors."""
    state = {
        name: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        for name, meta in saved_tensors(checkpoint).items()
        if not name.startswith(("optim.", "extra", "rng."))
    }
    load_checkpoint(checkpoint, state)
    return state


@pytest.fixture(scope="module")
def reference(tmp_path_factory, sample_data) -> tuple[Path, dict[int, dict]]:
    """torch's AdamW on one process."""
    run_dir = tmp_path_factory.mktemp("adamw")
    return run_dir, run(1, run_dir, sample_data)


@pytest.fixture(scope="module")
def offloaded(tmp_path_factory, sample_data) -> tuple[Path, dict[int, dict]]:
    run_dir = tmp_path_factory.mktemp("offloaded")
    return run_dir, run(1, run_dir, sample_data, OFFLOAD)


def test_offloaded_adamw_trains_as_torch_adamw_for_20_steps(reference, offloaded):
    (ref_dir, expected), (off_dir, got) = reference, offloaded
    assert_close_runs(got, expected, range(1, STEPS + 1), RTOL)
    last = f"checkpoints/step_{STEPS:08d}"
    ref_weights, off_weights = saved_weights(ref_dir / last), saved_weights(off_dir / last)
    assert set(ref_weights) == set(off_weights)
    for name, weight in ref_weights.items():
        if name == "model.embed_tokens.weight":
            # A near-tie in a router's top-k can go the other way after a 1e-7 difference, and the
            # token behind it gets another gradient: a few rows of rare tokens (seen once or twice
            # in 20 steps) differ by up to a tenth of an LR step. The rest agree to fp32 rounding.
            far = (off_weights[name] - weight).abs().amax(dim=1) > 1e-5
            assert far.float().mean() < 0.01, int(far.sum())
            weight, off_weights[name] = weight[~far], off_weights[name][~far]
        torch.testing.assert_close(off_weights[name], weight, atol=1e-5, rtol=0, msg=name)
    # the same optimizer state entries, with the same shapes
    ref_entries, off_entries = saved_tensors(ref_dir / last), saved_tensors(off_dir / last)
    optim = sorted(k for k in ref_entries if k.startswith("optim."))
    assert optim and optim == sorted(k for k in off_entries if k.startswith("optim."))
    assert all(ref_entries[k].size == off_entries[k].size for k in optim)


@pytest.mark.parametrize(
    ("world", "layout"),
    [
        (2, ["parallel=single", "parallel.ep=2"]),  # FSDP2 over dp2, experts over ep2
        (2, ["parallel=single", "parallel.pp=2"]),  # a 1F1B pipeline of two stages
    ],
    ids=["fsdp_dp2_ep2", "pp2"],
)
def test_offload_trains_as_the_same_layout_without_it(tmp_path, sample_data, world, layout):
    expected = run(world, tmp_path / "device", sample_data, *layout)
    got = run(world, tmp_path / "host", sample_data, *layout, OFFLOAD)
    assert_close_runs(got, expected, range(1, STEPS + 1), RTOL)


def test_a_run_switches_offload_on_across_a_resume(tmp_path, sample_data, reference):
    ref_dir, expected = reference
    load = f"checkpoint.load={ref_dir}/checkpoints/step_00000010"
    got = run(1, tmp_path, sample_data, OFFLOAD, load)
    assert_close_runs(got, expected, range(11, STEPS + 1), RTOL)


def test_a_run_switches_offload_off_across_a_resume(tmp_path, sample_data, offloaded):
    off_dir, expected = offloaded
    got = run(1, tmp_path, sample_data, f"checkpoint.load={off_dir}/checkpoints/step_00000010")
    assert_close_runs(got, expected, range(11, STEPS + 1), RTOL)


def test_an_offloaded_checkpoint_resumes_under_tensor_parallel(tmp_path, sample_data, offloaded):
    off_dir, expected = offloaded
    got = run(
        2, tmp_path, sample_data, "parallel=cpu_tp2", OFFLOAD,
        f"checkpoint.load={off_dir}/checkpoints/step_00000010",
    )  # fmt: skip
    assert_close_runs(got, expected, range(11, STEPS + 1), RESHARD_RTOL)


# ---------------------------------------------------------------- BF16 parameters over FP32 masters
def _bf16_storage(rank: int, world: int, root: str) -> dict:
    """FSDP2 over dp2 with BF16 parameters (as on a GPU with optim.offload=cpu), three steps of two
    micro-batches, saved; then an FP32 model without offload loads the checkpoint."""
    config = tiny(vocab_size=128)
    mesh = build_mesh(ParallelDims(dp=2), "cpu")
    build = Build(
        config, ParallelConfig(dp=2), dims=mesh.dims, device_type="cpu", param_dtype=torch.bfloat16
    )
    (model,) = build_chunks(build, mesh)
    optimizer = build_optimizer([model], lr=1e-3, offload="cpu")
    gen = torch.Generator().manual_seed(rank)
    losses = []
    for _ in range(3):
        for micro in range(2):
            model.set_requires_gradient_sync(micro == 1)
            x = torch.randint(0, config.vocab_size, (2, 16), generator=gen)
            loss = model(x, labels=shift_left(x, 1, -100)).loss
            loss.backward()
        losses.append(loss.item())
        grad_dtypes = {p.grad.dtype for p in model.parameters()}
        optimizer.step()
        optimizer.zero_grad()
    masters = optimizer.master_weights()
    (offloaded,) = optimizer.optimizers
    host_bytes = sum(
        4 * t.numel()
        for p, master in offloaded.masters.items()
        for t in (master, offloaded.host_grads[p], *optimizer.state[p].values())
        if isinstance(t, torch.Tensor)
    )
    device_bytes = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    stored = {p.dtype for p in model.parameters()}
    follow = all(
        torch.equal(p.to_local(), masters[id(p)].to(torch.bfloat16)) for p in model.parameters()
    )
    sub_bf16 = any(
        not torch.equal(masters[id(p)], masters[id(p)].to(torch.bfloat16).float())
        for p in model.parameters()
    )
    ckpt.save(root, 3, [model], optimizer, mesh)
    fp32 = Build(config, ParallelConfig(dp=2), dims=mesh.dims, device_type="cpu")
    (plain,) = build_chunks(fp32, mesh)
    ckpt.load(root, [plain], None, mesh)
    loaded = all(
        torch.equal(q.to_local(), masters[id(p)])
        for p, q in zip(model.parameters(), plain.parameters())
    )
    dist.barrier()
    return dict(
        stored=stored, grads=grad_dtypes, follow=follow, sub_bf16=sub_bf16, loaded=loaded,
        losses=losses, host_bytes=host_bytes, device_bytes=device_bytes,
    )  # fmt: skip


def test_bf16_parameters_step_in_fp32_and_checkpoint_their_masters(tmp_path):
    (counted,) = planner.plan(
        planner.PlanInput(model=tiny(vocab_size=128), dims=ParallelDims(dp=2), offload="cpu")
    ).ranks
    for result in run_distributed(_bf16_storage, 2, str(tmp_path), timeout_s=120):
        # what the planner counts: 16 B per local element on the host, 2 B on the device
        assert result["host_bytes"] == counted.host_bytes
        assert result["device_bytes"] == counted.bytes["parameters"]
        # the device holds BF16 weights and (reduced in FP32) BF16 gradients
        assert result["stored"] == {torch.bfloat16} and result["grads"] == {torch.bfloat16}
        # each weight is its FP32 master rounded, and the masters hold more than BF16 can
        assert result["follow"] and result["sub_bf16"]
        assert result["loaded"]  # the checkpoint's weights are the FP32 masters
    saved = saved_tensors(tmp_path / "step_00000003")
    weights = [meta for name, meta in saved.items() if name.endswith(".weight")]
    assert len(weights) > 10 and {meta.properties.dtype for meta in weights} == {torch.float32}
