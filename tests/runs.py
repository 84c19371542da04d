"""Training runs for the tests, through the `exaone-train` code: `cli.train.main` in a forked
process (no interpreter start-up, the same kernels bit for bit as run_distributed's ranks), and
reading what a run wrote."""

from __future__ import annotations

import gc
import json
import logging
import multiprocessing
import os
import socket
import sys
import time
from pathlib import Path

import torch

from megatron_exaone.cli.train import main


def overrides(run_dir: Path, data: list[str], *extra: str) -> list[str]:
    """The cpu_tiny experiment on one process, reading the prepared sample data (`data`: conftest's
    `sample_data`)."""
    return [
        "experiment=cpu_tiny",
        "parallel=single",
        f"run_dir={run_dir}",
        "trainer.device=cpu",
        "wandb.enabled=false",
        *data,
        *extra,
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(argv: list[str], stderr: str | None) -> None:
    """The body of `exaone-train ARGV` as one process."""
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT"):
        os.environ.pop(key, None)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    torch.set_num_threads(1)  # as on run_distributed's ranks: the same kernels, bit for bit
    logging.getLogger().handlers.clear()
    if stderr is not None:
        sys.stderr = open(stderr, "w", buffering=1)  # noqa: SIM115 - lives as long as the process
    sys.exit(main(argv))


def start(argv: list[str], stderr: Path | None = None) -> multiprocessing.Process:
    """exaone-train ARGV in a forked process; its standard error goes to `stderr` when given."""
    gc.collect()  # as run_distributed does before it forks
    process = multiprocessing.get_context("fork").Process(
        target=_cli, args=(argv, str(stderr) if stderr else None)
    )
    process.start()
    return process


def finish(process: multiprocessing.Process, timeout: float = 120) -> int:
    """Wait for a run (killing it after `timeout`, a hang guard); its exit code."""
    process.join(timeout)
    if process.is_alive():
        process.kill()
        process.join()
    return process.exitcode


def train(
    argv: list[str], timeout: float = 120, expect: int = 0, stderr: Path | None = None
) -> None:
    code = finish(start(argv, stderr), timeout)
    assert code == expect, f"exaone-train {' '.join(argv)} exited with {code}, not {expect}"


def records(run_dir: Path) -> list[dict]:
    """metrics.jsonl's records in file order (a line cut short by a kill is skipped)."""
    path = run_dir / "metrics.jsonl"
    out = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def by_step(run_dir: Path) -> dict[int, dict]:
    """The last training record of each step (a resumed run appends the steps it repeats;
    evaluation records have no loss)."""
    return {r["step"]: r for r in records(run_dir) if "loss" in r}


def wait_for_step(process, run_dir: Path, step: int, timeout: float = 90) -> int:
    """Wait until the run logged `step` (or more); returns the last step logged. `process` is
    anything with `is_alive()` (a forked run) or `poll()` (a subprocess)."""
    alive = process.is_alive if hasattr(process, "is_alive") else (lambda: process.poll() is None)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        steps = [r["step"] for r in records(run_dir)]
        if steps and max(steps) >= step:
            return max(steps)
        time.sleep(0.01)
    process.kill()
    raise AssertionError(f"the run in {run_dir} did not reach step {step}")


def checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*"))


def assert_same_losses(
    metrics: dict[int, dict], expected: dict[int, dict], steps, rtol: float = 0.0
) -> None:
    for step in steps:
        for key in ("loss", "lm_loss", "mtp_loss", "aux_loss", "tokens", "stage", "lr"):
            got, want = metrics[step][key], expected[step][key]
            assert abs(got - want) <= rtol * abs(want), (step, key, got, want)
