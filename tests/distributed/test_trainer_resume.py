"""exaone-train is resumable: a run killed (SIGKILL) or stopped (SIGTERM) and relaunched continues
with exactly the losses of an uninterrupted run, across a curriculum stage boundary too; a
checkpoint resumed under another layout continues within fp32 tolerance (context parallel included);
a truncated newest checkpoint is skipped for the previous complete one.

Every run goes through the `exaone-train` code (`cli.train.main` in a forked process,
`cli.train.run_training` on forked gloo ranks) with the cpu_tiny experiment: 30 steps, stage `short`
for steps 1-20, `long` for 21-30.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
from pathlib import Path

import pytest

from megatron_exaone.checkpoint.store import find_checkpoint, read_meta, unusable_reason
from megatron_exaone.cli.train import run_training
from megatron_exaone.parallel.testing import run_distributed
from tests.runs import (
    assert_same_losses,
    by_step,
    checkpoint_steps,
    overrides,
    records,
    start,
    train,
    wait_for_step,
)

STEPS, SWITCH = 30, 20  # cpu_tiny: 30 steps, the second stage starts at step 21
# Loss of a resumed run under another layout: fp32 sums in another order.
RESHARD_RTOL = 1e-4


# ------------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def data_overrides(sample_data) -> list[str]:
    return sample_data


def _train_rank(rank: int, world: int, argv: list[str]) -> str:
    return run_training(argv)


def train_ranks(world: int, argv: list[str]) -> str:
    return run_distributed(_train_rank, world, argv, timeout_s=120)[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_overrides) -> tuple[Path, dict[int, dict]]:
    """The uninterrupted single-process run, every 5th step's checkpoint kept."""
    run_dir = tmp_path_factory.mktemp("reference")
    train(overrides(run_dir, data_overrides, "checkpoint.interval=5", "checkpoint.keep_last=0"))
    metrics = by_step(run_dir)
    assert sorted(metrics) == list(range(1, STEPS + 1))
    assert [metrics[s]["stage"] for s in (SWITCH, SWITCH + 1)] == [0, 1]
    assert checkpoint_steps(run_dir) == list(range(5, STEPS + 1, 5))
    return run_dir, metrics


# ------------------------------------------------------------------------------------------ SIGKILL
@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory, data_overrides, reference) -> tuple[Path, int, int]:
    """A run with checkpoints every 5 steps, SIGKILLed once step 17 is logged (steps 16-17 lost),
    then relaunched in the same run_dir to the end. Returns (run_dir, last step logged before the
    kill, resumed checkpoint step)."""
    run_dir = tmp_path_factory.mktemp("killed")
    argv = overrides(run_dir, data_overrides, "checkpoint.interval=5")
    process = start(argv)
    killed_at = wait_for_step(process, run_dir, 17)
    process.kill()
    process.join()
    assert process.exitcode == -signal.SIGKILL
    resumed_from = int(read_meta(find_checkpoint(run_dir / "checkpoints"))["step"])
    # the kill came before step 20
    assert resumed_from == 15 and killed_at < SWITCH, (resumed_from, killed_at)
    train(argv)
    return run_dir, killed_at, resumed_from


def test_sigkill_and_resume_gives_the_uninterrupted_losses(reference, killed_and_resumed):
    _, expected = reference
    run_dir, killed_at, resumed_from = killed_and_resumed
    logged = [r["step"] for r in records(run_dir)]
    # The relaunch appended steps resumed_from+1..30 after the killed run's 1..killed_at.
    assert logged == list(range(1, killed_at + 1)) + list(range(resumed_from + 1, STEPS + 1))
    metrics = by_step(run_dir)
    # exactly (==), the repeated steps included
    assert_same_losses(metrics, expected, range(1, STEPS + 1))
    relaunched = {r["step"]: r for r in records(run_dir)[killed_at:]}
    # switched after step 20
    assert [relaunched[s]["stage_name"] for s in (SWITCH, SWITCH + 1)] == ["short", "long"]
    assert read_meta(find_checkpoint(run_dir / "checkpoints"))["step"] == STEPS


def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(
    tmp_path, data_overrides, reference, killed_and_resumed, caplog
):
    _, expected = reference
    source, _, _ = killed_and_resumed
    run_dir = tmp_path / "run"
    shutil.copytree(source / "checkpoints", run_dir / "checkpoints")
    assert checkpoint_steps(run_dir) == [25, 30]  # keep_last=2
    newest = run_dir / "checkpoints" / "step_00000030"
    data_file = max(
        (f for f in newest.iterdir() if f.suffix == ".distcp"), key=lambda f: f.stat().st_size
    )
    os.truncate(data_file, data_file.stat().st_size // 3)
    with caplog.at_level(logging.WARNING):
        assert find_checkpoint(run_dir / "checkpoints").name == "step_00000025"
    assert f"file {data_file.name} is truncated" in caplog.text
    train(overrides(run_dir, data_overrides, "checkpoint.interval=5"))
    # resumed from step 25
    assert [r["step"] for r in records(run_dir)] == list(range(26, STEPS + 1))
    assert_same_losses(by_step(run_dir), expected, range(26, STEPS + 1))
    newest = find_checkpoint(run_dir / "checkpoints")
    assert newest.name == "step_00000030" and unusable_reason(newest) is None  # rewritten, complete


# ------------------------------------------------------------------------------------------ SIGTERM
def test_sigterm_saves_a_loadable_checkpoint_and_exits_cleanly(tmp_path, data_overrides, reference):
    _, expected = reference
    run_dir = tmp_path / "run"
    argv = overrides(run_dir, data_overrides, "checkpoint.interval=0")  # no interval checkpoints
    process = start(argv)
    wait_for_step(process, run_dir, 3)
    os.kill(process.pid, signal.SIGTERM)
    process.join(60)
    assert process.exitcode == 0
    # the step it was in when SIGTERM came, finished
    stopped = max(r["step"] for r in records(run_dir))
    assert checkpoint_steps(run_dir) == [stopped] and stopped < SWITCH
    checkpoint = find_checkpoint(run_dir / "checkpoints")
    assert unusable_reason(checkpoint) is None and read_meta(checkpoint)["step"] == stopped
    train(argv + [f"trainer.max_steps={stopped + 1}"])
    assert [r["step"] for r in records(run_dir)][-1:] == [stopped + 1]
    assert_same_losses(by_step(run_dir), expected, range(1, stopped + 2))


# --------------------------------------------------------------------------------------- resharding
def test_resume_tp2_pp2_checkpoint_under_ep2_dp2(tmp_path, data_overrides):
    """Layout A = tp2 x pp2 (ep2 folded into each stage's tp x dp ranks), 4 ranks; layout B = ep2 x
    dp2, 2 ranks, with FSDP2 keeping gathered parameters from forward to backward
    (parallel.reshard_after_forward=false) and reducing every micro-batch's gradients
    (parallel.reduce_grads_each_micro_batch=true)."""
    first, more = 2, 2
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    # The model recipe's MTP weight is 0 and the curriculum's stages set 0.05: the pipeline's last
    # stage must still run MTP (it is built for the largest weight), or layout A's losses would lack
    # it and B's not.
    layout_a = ["parallel=cpu_4proc", "+model.mtp_loss_weight=0"]
    train_ranks(
        4,
        overrides(
            a_dir,
            data_overrides,
            *layout_a,
            f"trainer.max_steps={first + more}",
            f"checkpoint.interval={first}",
        ),
    )
    expected = by_step(a_dir)
    assert sorted(expected) == list(range(1, first + more + 1))
    assert all(record["mtp_loss"] > 0 for record in expected.values())
    layout_b = [
        "parallel.tp=1",
        "parallel.pp=1",
        "parallel.ep=2",
        "parallel.dp=2",
        "parallel.sequence_parallel=false",
    ]
    layout_b += [
        "+model.mtp_loss_weight=0",
        "parallel.reshard_after_forward=false",
        "parallel.reduce_grads_each_micro_batch=true",
    ]
    train_ranks(
        2,
        overrides(
            b_dir,
            data_overrides,
            *layout_b,
            f"trainer.max_steps={first + more}",
            f"checkpoint.load={a_dir}/checkpoints/step_{first:08d}",
        ),
    )
    metrics = by_step(b_dir)
    assert sorted(metrics) == list(range(first + 1, first + more + 1))
    assert_same_losses(metrics, expected, range(first + 1, first + more + 1), RESHARD_RTOL)
    assert read_meta(find_checkpoint(b_dir / "checkpoints"))["layout"]["ep"] == 2


def test_resume_single_process_checkpoint_under_tp2_across_the_stage_switch(
    tmp_path, data_overrides, reference
):
    """The reference run's step-20 checkpoint (one process) continues on 2 ranks with tensor +
    sequence parallel into the second stage (longer sequences)."""
    ref_dir, expected = reference
    run_dir = tmp_path / "tp2"
    argv = overrides(
        run_dir,
        data_overrides,
        "parallel=cpu_tp2",
        f"checkpoint.load={ref_dir}/checkpoints/step_{SWITCH:08d}",
    )
    train_ranks(2, argv + [f"trainer.max_steps={SWITCH + 2}"])
    metrics = by_step(run_dir)
    assert sorted(metrics) == [SWITCH + 1, SWITCH + 2] and metrics[SWITCH + 1]["stage"] == 1
    assert_same_losses(metrics, expected, [SWITCH + 1, SWITCH + 2], RESHARD_RTOL)
    # Relaunched with the same command, the run continues from its own step-22 checkpoint, not
    # checkpoint.load.
    train_ranks(2, argv + [f"trainer.max_steps={SWITCH + 3}"])
    assert [r["step"] for r in records(run_dir)] == [SWITCH + 1, SWITCH + 2, SWITCH + 3]
    assert_same_losses(by_step(run_dir), expected, [SWITCH + 3], RESHARD_RTOL)


def test_resume_single_process_checkpoint_under_cp2_tp2_across_the_stage_switch(
    tmp_path, data_overrides, reference
):
    """The reference run's step-20 checkpoint continues on 4 ranks with context parallel (each rank
    computes half of every sequence) x tensor + sequence parallel into the second stage, with the
    single-process losses."""
    ref_dir, expected = reference
    run_dir = tmp_path / "cp2_tp2"
    train_ranks(
        4,
        overrides(
            run_dir,
            data_overrides,
            "parallel=cpu_tp2",
            "parallel.cp=2",
            f"checkpoint.load={ref_dir}/checkpoints/step_{SWITCH:08d}",
            f"trainer.max_steps={SWITCH + 2}",
        ),
    )
    metrics = by_step(run_dir)
    assert sorted(metrics) == [SWITCH + 1, SWITCH + 2] and metrics[SWITCH + 1]["stage"] == 1
    assert_same_losses(metrics, expected, [SWITCH + 1, SWITCH + 2], RESHARD_RTOL)
    assert read_meta(find_checkpoint(run_dir / "checkpoints"))["layout"]["cp"] == 2


# --------------------------------------------------------------------------------- FP8 weight cache
def test_fp8_weight_cache_trains_as_quantizing_every_micro_batch(tmp_path, data_overrides):
    """exaone-train with precision.fp8_weight_cache (weights quantized once per optimizer step, on
    the first of its eight micro-batches; the output head and MTP in FP8 too) follows the run that
    quantizes them for every micro-batch exactly."""
    runs = {}
    for cache in ("false", "true"):
        run_dir = tmp_path / f"cache_{cache}"
        train(
            overrides(
                run_dir,
                data_overrides,
                "precision=fp8_emulated",
                f"precision.fp8_weight_cache={cache}",
                "precision.fp8_lm_head=true",
                "precision.fp8_mtp=true",
                "trainer.max_steps=3",
                "checkpoint.interval=0",
            )
        )
        runs[cache] = [(r["lm_loss"], r["grad_norm"]) for r in records(run_dir)]
    assert len(runs["true"]) == 3 and runs["true"] == runs["false"]
