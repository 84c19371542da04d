"""`exaone-train [HYDRA OVERRIDES...]`: compose a recipe, validate it, and train (directly, or under
torchrun).

Examples (each layout needs its number of processes):
  exaone-train experiment=cpu_tiny run_dir=runs/demo
  torchrun --nproc-per-node 4 -m megatron_exaone.cli.train experiment=cpu_tiny
  launch/local.sh 4 experiment=cpu_tiny trainer.max_steps=10     # CPU/gloo, one machine
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from megatron_exaone import lifetime
from megatron_exaone.checkpoint.resume import starting_checkpoint
from megatron_exaone.checkpoint.store import read_meta
from megatron_exaone.cli.args import parse_command_line
from megatron_exaone.config.load import load_config, save_resolved
from megatron_exaone.config.schema import TrainConfig
from megatron_exaone.errors import reported
from megatron_exaone.parallel.mesh import ParallelDims
from megatron_exaone.training.device import rank_device, resolve_device
from megatron_exaone.training.plan import ValidatedConfig, validate

log = logging.getLogger("megatron_exaone.train")


def _starting_stage(cfg, validated) -> int:
    """The curriculum stage this launch starts in (from the checkpoint it resumes), which decides
    its layout."""
    checkpoint = starting_checkpoint(cfg.run_dir, cfg.checkpoint.load)
    if checkpoint is None:
        return 0
    tokens = int(read_meta(checkpoint).get("tokens") or 0)
    if validated.curriculum.is_finished(tokens):
        return len(validated.curriculum.stages) - 1
    return validated.curriculum.stage_index_at(tokens)


def prepare(
    overrides: list[str], config_dir: str | None = None, world_size: int = 1
) -> tuple[TrainConfig, ValidatedConfig, ParallelDims]:
    """Compose and validate the recipe for `world_size` ranks, with the layout of the curriculum
    stage this launch starts in (from the newest checkpoint). Needs no process group; raises
    RecipeError / LayoutError."""
    cfg = load_config(overrides, config_dir)
    device_type = resolve_device(cfg.trainer.device)
    validated = validate(cfg, world_size, device_type)
    stage = _starting_stage(cfg, validated)
    layout = validated.stage_parallel[stage] if validated.stage_parallel else cfg.parallel
    cfg = dataclasses.replace(cfg, parallel=layout)
    dims = ParallelDims.of(layout).validate(world_size, validated.model)
    return cfg, validated, dims


def train(cfg: TrainConfig, validated: ValidatedConfig, dims: ParallelDims) -> str:
    """Train on every rank of the initialized process group (`prepare`'s results); returns why
    training stopped. The run's config.yaml is (re)written only once the data, the model and the
    checkpoint have loaded, so a launch that fails to start leaves the record of the run as it
    was."""
    from megatron_exaone.training.trainer import Trainer

    trainer = Trainer(
        cfg, validated.model, dims, validated.curriculum, rank_device(cfg.trainer.device)
    )
    if dist.get_rank() == 0:
        path = save_resolved(cfg)
        log.info("resolved config written to %s", path)
    return trainer.run()


def run_training(overrides: list[str], config_dir: str | None = None) -> str:
    """`prepare` + `train` inside an already initialized process group (tests, notebooks); returns
    the reason."""
    return train(*prepare(overrides, config_dir, dist.get_world_size()))


def launch(
    program: str,
    doc: str,
    argv: list[str],
    body: Callable[[TrainConfig, ValidatedConfig, ParallelDims], Any],
    report: Callable[[Any], None] | None = None,
) -> int:
    """A command's life on each rank (exaone-train, exaone-eval): the flags, the validated recipe,
    the process group, `body(cfg, validated, dims)`, and `report(result)` on rank 0; the exit code.
    A user's mistake is one line on standard error (exit 2)."""
    # First: a rank dies with its launcher, and stop signals (Slurm's, torchrun's forwarding,
    # Ctrl-C) only ask for a checkpoint, even while the libraries below are still importing.
    lifetime.bind_rank_to_launcher()
    lifetime.install_stop_handlers()
    try:
        overrides, config_dir = parse_command_line(argv, program, doc)
    except SystemExit as exc:  # --help, --cfg, --info, or a bad flag
        return int(exc.code)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    # Rank 0 tells the story; the other ranks only speak up with warnings and errors.
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        # every rank finds the same configuration errors
        with reported(program, show=rank == 0):
            cfg, validated, dims = prepare(overrides, config_dir, world)
    except SystemExit as exc:
        return int(exc.code)

    # Imported here so that `--help` and config errors stay fast.
    import torch

    device = rank_device(cfg.trainer.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if world == 1:  # a plain single-process launch: a local one-rank group keeps one code path
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            rank=rank,
            world_size=world,
            timeout=timedelta(minutes=30),
        )
    try:
        # a rank's own error, said by it
        with reported(program if rank == 0 else f"{program} (rank {rank})"):
            result = body(cfg, validated, dims)
            if report is not None and rank == 0:
                report(result)
    except SystemExit as exc:
        return int(exc.code)
    finally:
        dist.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    return launch("exaone-train", __doc__, sys.argv[1:] if argv is None else argv, train)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    raise SystemExit(main())
