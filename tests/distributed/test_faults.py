"""exaone-train under the faults of a real cluster, each through the public command: stop signals on
every launch path (one process, the torchrun launcher, a single rank), the launcher dying,
checkpoints that are broken, corrupt or planted, non-finite training, a full disk, a resumed run
with another model, and W&B faults. Each fault ends in one of two ways: a checkpoint and exit 0, or
one line on stderr saying what to do (no traceback) and exit 2, with nothing already written lost.

Runs use the cpu_tiny experiment on the prepared sample data (`tests/runs.py`); the uninterrupted
reference is the same command run to the same step."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_exaone.checkpoint.store import checkpoint_dirs, find_checkpoint, read_meta
from megatron_exaone.lifetime import child_pids
from tests.faults import CORRUPTION, corrupt, data_file, planted_metadata
from tests.runs import (
    assert_same_losses,
    by_step,
    checkpoint_steps,
    finish,
    overrides,
    records,
    start,
    train,
    wait_for_step,
)

ROOT = Path(__file__).resolve().parents[2]
USER_ERROR = 2


def one_line_error(stderr: Path, *fragments: str) -> str:
    """The `exaone-train: ...` line of a failed run; no traceback was printed."""
    text = stderr.read_text()
    assert "Traceback" not in text, text[-3000:]
    lines = [line for line in text.splitlines() if line.startswith("exaone-train")]
    assert len(lines) == 1, text[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, sample_data) -> tuple[Path, dict[int, dict]]:
    """Eight uninterrupted steps, a checkpoint every 2."""
    run_dir = tmp_path_factory.mktemp("reference")
    train(
        overrides(
            run_dir,
            sample_data,
            "trainer.max_steps=8",
            "checkpoint.interval=2",
            "checkpoint.keep_last=0",
        )
    )
    return run_dir, by_step(run_dir)


def launch_status(run_dir: Path) -> dict:
    return json.loads((run_dir / "launch_status.json").read_text())


# ------------------------------------------------------------------------------------- stop signals
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGINT], ids=lambda sig: sig.name)
def test_a_stop_signal_saves_one_checkpoint_and_exits_0(tmp_path, sample_data, reference, sig):
    run_dir = tmp_path / "run"
    argv = overrides(run_dir, sample_data, "checkpoint.interval=0", "trainer.max_steps=8")
    process = start(argv, stderr=tmp_path / "stderr")
    wait_for_step(process, run_dir, 2)
    os.kill(process.pid, sig)
    assert finish(process) == 0
    stopped = max(r["step"] for r in records(run_dir))
    assert checkpoint_steps(run_dir) == [stopped] and stopped < 8
    assert launch_status(run_dir) == {
        "reason": f"stop signal ({sig.name})",
        "resume": True,
        "step": stopped,
        "tokens": stopped * 512,
    }
    train(argv)  # relaunched: continues exactly
    assert_same_losses(by_step(run_dir), reference[1], range(1, 9))
    assert launch_status(run_dir)["resume"] is False


def launcher(run_dir: Path, sample_data: list[str], log: Path, *extra: str) -> subprocess.Popen:
    """launch/local.sh on 2 ranks (dp=2)."""
    argv = overrides(run_dir, sample_data, "checkpoint.interval=0", *extra)
    return subprocess.Popen(
        [str(ROOT / "launch" / "local.sh"), "2", *argv],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHON": sys.executable},
        start_new_session=True,
    )


def ranks_of(process: subprocess.Popen) -> list[int]:
    deadline = time.monotonic() + 60
    while len(ranks := child_pids(process.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    return ranks


@pytest.mark.parametrize("target", ["launcher", "one rank"])
def test_launcher_paths_stop_every_rank_with_a_checkpoint_and_exit_0(tmp_path, sample_data, target):
    """SIGTERM to the torchrun launcher (plain torchrun: a traceback and exit 1) and SIGUSR1 to a
    single rank (Slurm's warning reaching one process): every rank finishes the step, one
    checkpoint, exit 0."""
    run_dir, log = tmp_path / "run", tmp_path / "log"
    process = launcher(run_dir, sample_data, log, "trainer.max_steps=200")
    ranks = ranks_of(process)
    wait_for_step(process, run_dir, 2)
    if target == "launcher":
        os.kill(process.pid, signal.SIGTERM)
    else:
        os.kill(ranks[-1], signal.SIGUSR1)
    assert process.wait(120) == 0, log.read_text()[-3000:]
    stopped = max(r["step"] for r in records(run_dir))
    assert (
        checkpoint_steps(run_dir) == [stopped]
        and read_meta(find_checkpoint(run_dir / "checkpoints"))["world_size"] == 2
    )
    assert "Traceback" not in log.read_text() and launch_status(run_dir)["resume"] is True


def alive(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except OSError:
        return False


def test_ranks_die_with_their_launcher(tmp_path, sample_data):
    run_dir, log = tmp_path / "run", tmp_path / "log"
    process = launcher(run_dir, sample_data, log, "trainer.max_steps=2000", "checkpoint.interval=1")
    ranks = ranks_of(process)
    assert len(ranks) == 2
    wait_for_step(process, run_dir, 2)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + 30  # a hang guard: the kernel kills them at once
    while any(alive(pid) for pid in ranks) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in ranks)


# -------------------------------------------------------------------------------------- checkpoints
def test_a_run_whose_checkpoints_are_all_broken_is_refused_not_pruned(
    tmp_path, sample_data, reference
):
    """The issue's repro: steps 2..8 saved, every .metadata deleted, relaunched with max_steps=4
    keep_last=2; it pruned the checkpoint it had just written and named a deleted one in
    `latest`."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference[0] / "checkpoints", run_dir / "checkpoints")
    for _, path in checkpoint_dirs(run_dir / "checkpoints"):
        (path / ".metadata").unlink()
    train(
        overrides(
            run_dir,
            sample_data,
            "trainer.max_steps=4",
            "checkpoint.interval=2",
            "checkpoint.keep_last=2",
        ),
        expect=USER_ERROR,
        stderr=tmp_path / "stderr",
    )
    one_line_error(
        tmp_path / "stderr", "holds 4 checkpoint(s) and none can be used", "move them away"
    )
    assert checkpoint_steps(run_dir) == [2, 4, 6, 8]


@pytest.mark.parametrize("which", ["data", "metadata"])
def test_a_corrupt_newest_checkpoint_is_detected_and_the_run_resumes_from_the_previous(
    tmp_path, sample_data, reference, which
):
    run_dir = tmp_path / "run"
    shutil.copytree(reference[0] / "checkpoints", run_dir / "checkpoints")
    shutil.rmtree(run_dir / "checkpoints" / "step_00000008")
    newest = run_dir / "checkpoints" / "step_00000006"
    damaged = data_file(newest) if which == "data" else newest / ".metadata"
    if which == "data":
        corrupt(damaged)
    else:  # DCP's pickle made unreadable: a damaged file (its checksum says so), not a refusal
        damaged.write_bytes(os.urandom(damaged.stat().st_size))
    train(
        overrides(
            run_dir,
            sample_data,
            "trainer.max_steps=8",
            "checkpoint.interval=2",
            "checkpoint.keep_last=2",
        ),
        stderr=tmp_path / "stderr",
    )
    log = (tmp_path / "stderr").read_text()
    assert f"file {damaged.name} does not match the checksum" in log and "falling back" in log
    assert sorted(by_step(run_dir)) == [5, 6, 7, 8]  # resumed from step 4
    assert_same_losses(by_step(run_dir), reference[1], range(5, 9))
    # the corrupt step 6 was replaced when the run passed it again
    assert checkpoint_steps(run_dir) == [6, 8]
    assert CORRUPTION  # the damage is the issue's: 200 KB overwritten in place


def test_a_planted_checkpoint_load_runs_no_code_and_writes_nothing(
    tmp_path, sample_data, reference
):
    source = tmp_path / "planted"
    shutil.copytree(reference[0] / "checkpoints" / "step_00000002", source)
    marker = tmp_path / "payload-ran"
    planted_metadata(source, marker)
    run_dir = tmp_path / "run"
    train(
        overrides(run_dir, sample_data, f"checkpoint.load={source}", "trainer.max_steps=4"),
        expect=USER_ERROR,
        stderr=tmp_path / "stderr",
    )
    one_line_error(tmp_path / "stderr", str(source / ".metadata"), "could run code")
    assert not marker.exists() and not (run_dir / "config.yaml").exists()


# ---------------------------------------------------------------------------------- training faults
def test_non_finite_steps_keep_the_last_good_checkpoint_and_stop_the_run(
    tmp_path, sample_data, reference
):
    """A learning rate of 1e30 after step 4: step 5's update makes the weights overflow, steps 6 and
    7 are non-finite; nothing after step 5 is checkpointed, and the run stops naming the checkpoint
    and the step."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference[0] / "checkpoints", run_dir / "checkpoints")
    for step in (6, 8):
        shutil.rmtree(run_dir / "checkpoints" / f"step_{step:08d}")
    train(
        overrides(
            run_dir,
            sample_data,
            "trainer.max_steps=20",
            "checkpoint.interval=1",
            "checkpoint.keep_last=2",
            "trainer.max_skipped_steps=1",
            "curriculum.stages.0.lr.peak_lr=1e30",
        ),
        expect=USER_ERROR,
        stderr=tmp_path / "stderr",
    )
    one_line_error(
        tmp_path / "stderr",
        "2 steps in a row were non-finite",
        "trainer.max_skipped_steps=1",
        "the first, step 6, had a non-finite",
        "step_00000005",
    )
    assert [step for step, r in sorted(by_step(run_dir).items()) if r["skipped"]] == [6, 7]
    # step 5 was finite (its update is what overflowed), 6 and 7 not
    assert checkpoint_steps(run_dir) == [4, 5]


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path, sample_data, reference):
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    size = sum(f.stat().st_size for f in (reference[0] / "checkpoints" / "step_00000002").iterdir())
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size * 3 // 2}", "tmpfs", str(checkpoints)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {mounted.stderr.strip()}")
    try:
        train(
            overrides(
                checkpoints.parent,
                sample_data,
                "trainer.max_steps=6",
                "checkpoint.interval=2",
                "checkpoint.keep_last=0",
            ),
            expect=USER_ERROR,
            stderr=tmp_path / "stderr",
        )
        one_line_error(
            tmp_path / "stderr",
            "could not write the checkpoint of step 4",
            "no space left on the device",
            "Earlier checkpoints are intact",
        )
        assert checkpoint_steps(checkpoints.parent) == [2]
        # no partial files
        assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_00000002"]
        assert find_checkpoint(checkpoints).name == "step_00000002"
    finally:
        subprocess.run(["umount", str(checkpoints)], check=True)


def test_resuming_with_another_model_is_refused_before_anything_is_written(
    tmp_path, sample_data, reference
):
    run_dir = tmp_path / "run"
    shutil.copytree(reference[0] / "checkpoints", run_dir / "checkpoints")
    (run_dir / "config.yaml").write_text("the record of the run\n")
    train(
        overrides(run_dir, sample_data, "model.hidden_size=128"),
        expect=USER_ERROR,
        stderr=tmp_path / "stderr",
    )
    one_line_error(
        tmp_path / "stderr",
        "holds another model",
        "hidden_size 64 there, 128 here",
        "model=from_checkpoint",
    )
    assert (run_dir / "config.yaml").read_text() == "the record of the run\n"
    assert not (run_dir / "metrics.jsonl").exists()


# --------------------------------------------------------------------------------------------- data
def damaged_shard(tmp_path: Path, sample_data: list[str], damage: str) -> list[str]:
    """The sample data with one fault: a missing prefix, a truncated .bin, or a model vocabulary
    below its ids."""
    prefix = Path(sample_data[1].split("=[", 1)[1].rstrip("]"))
    if damage == "missing prefix":
        return [
            sample_data[0],
            f"data.datasets.sample=[{tmp_path / 'nowhere' / 'web'}]",
            sample_data[2],
        ]
    if damage == "model vocabulary below the data's ids":
        return [*sample_data, "model.vocab_size=1024"]
    copy = tmp_path / "copy" / prefix.name
    copy.parent.mkdir()
    for suffix in (".bin", ".idx"):
        shutil.copyfile(f"{prefix}{suffix}", f"{copy}{suffix}")
    os.truncate(f"{copy}.bin", os.path.getsize(f"{copy}.bin") // 2)
    return [sample_data[0], f"data.datasets.sample=[{copy}]", sample_data[2]]


@pytest.mark.parametrize(
    "damage, says",
    [
        ("missing prefix", "nowhere/web"),
        ("truncated .bin", "truncated"),
        ("model vocabulary below the data's ids", "model.vocab_size"),
    ],
)
def test_data_faults_are_one_line_naming_the_dataset(tmp_path, sample_data, damage, says):
    run_dir = tmp_path / "run"
    train(
        overrides(run_dir, damaged_shard(tmp_path, sample_data, damage), "trainer.max_steps=2"),
        expect=USER_ERROR,
        stderr=tmp_path / "stderr",
    )
    one_line_error(tmp_path / "stderr", "dataset 'sample'", says)
    assert not (run_dir / "config.yaml").exists()


# ---------------------------------------------------------------------------------------------- W&B
def test_wandb_without_the_package_fails_before_the_data_is_prepared(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: importlib finds no spec
    run_dir = tmp_path / "run"
    train(
        ["experiment=cpu_tiny", "parallel=single", f"run_dir={run_dir}", "wandb.enabled=true"],
        expect=USER_ERROR,
        stderr=tmp_path / "stderr",
    )
    one_line_error(
        tmp_path / "stderr",
        "wandb.enabled=true but the wandb package is not installed",
        "megatron-exaone[wandb]",
    )
    assert not run_dir.exists()


def test_an_unreachable_wandb_server_logs_offline_at_once(tmp_path, sample_data, monkeypatch):
    pytest.importorskip("wandb", reason="the [wandb] extra (installed by .ci/run with [dev])")
    closed = subprocess.run(
        [sys.executable, "-c", "from tests.runs import free_port; print(free_port())"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    ).stdout.strip()
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed}")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    train(
        overrides(run_dir, sample_data, "trainer.max_steps=1", "wandb.enabled=true"),
        timeout=60,
        stderr=tmp_path / "stderr",
    )  # wandb alone retries for about 100 s
    log = (tmp_path / "stderr").read_text()
    assert f"cannot reach http://127.0.0.1:{closed}" in log and "logging offline" in log
    assert list((run_dir / "wandb").glob("offline-run-*"))
