"""`exaone-eval [HYDRA OVERRIDES...] checkpoint.load=DIR`: evaluate a checkpoint (validation loss,
perplexity and bits per byte of the evaluation datasets; the needle-in-a-haystack check) under any
layout, with the same recipes, overrides and flags as exaone-train.

Examples:
  exaone-eval experiment=cpu_tiny parallel=single checkpoint.load=runs/cpu_tiny/checkpoints \\
      +eval.holdout.sample=0.05 eval.niah.enabled=true
  MODULE=megatron_exaone.cli.eval launch/local.sh 4 experiment=cpu_tiny checkpoint.load=...

The results go to the log, one line per metric, and as one JSON object on standard output.
"""

from __future__ import annotations

import json
import logging
import sys

from megatron_exaone.checkpoint import state as ckpt
from megatron_exaone.checkpoint.resume import resume_source
from megatron_exaone.cli.train import launch
from megatron_exaone.config.schema import TrainConfig
from megatron_exaone.errors import UserError
from megatron_exaone.evaluation import Evaluator
from megatron_exaone.parallel.mesh import ParallelDims, build_mesh
from megatron_exaone.parallel.step import step_runner
from megatron_exaone.training.device import rank_device
from megatron_exaone.training.plan import ValidatedConfig
from megatron_exaone.training.trainer import build_model

log = logging.getLogger("megatron_exaone.eval")


class NothingToEvaluate(UserError, ValueError):
    """exaone-eval without a checkpoint or without an evaluation."""


def evaluate(
    cfg: TrainConfig, validated: ValidatedConfig, dims: ParallelDims
) -> dict[str, float | None]:
    """Evaluate the checkpoint `checkpoint.load` (or run_dir's newest) on every rank of the
    initialized process group; the metrics record. Validation runs in sequences of `eval.seq_len`
    (default: the sequence length of the curriculum stage the checkpoint was in), niah when
    `eval.niah.enabled` or that stage has gates."""
    source = resume_source(cfg.run_dir, cfg.checkpoint.load)
    if source is None:
        raise NothingToEvaluate(
            f"no checkpoint to evaluate: none in {cfg.run_dir}/checkpoints; pass "
            "checkpoint.load=DIR (a run's checkpoints/ folder, one checkpoint, or an import)."
        )
    device = rank_device(cfg.trainer.device)
    mesh = build_mesh(dims, device.type)
    curriculum = validated.curriculum
    build, chunks = build_model(cfg, validated.model, curriculum, mesh, device)
    runner = step_runner(
        chunks,
        mesh,
        cfg.parallel.pipeline_schedule,
        n_microbatches=dims.pp * dims.vpp,  # the schedules' minimum; evaluation runs its own loop
        activation_dtype=build.activation_dtype,
    )
    loaded = ckpt.load(source, chunks, None, mesh)
    tokens = int(loaded.meta.get("tokens") or 0)
    stage = curriculum.stages[curriculum.stage_index_at(min(tokens, curriculum.total_tokens - 1))]
    niah = cfg.eval.niah.enabled or bool(stage.gates)
    if not cfg.eval.dataset_names() and not niah:
        raise NothingToEvaluate(
            "nothing to evaluate: name evaluation datasets (eval.datasets.NAME=[PREFIX] or "
            "eval.holdout.NAME=FRACTION) or turn on eval.niah.enabled=true."
        )
    evaluator = Evaluator.for_run(cfg, runner, dims, validated.model)
    log.info(
        "evaluating %s (%s tokens trained; stage %s, sequence length %d)",
        loaded.path,
        f"{tokens:,}",
        stage.name,
        stage.seq_len,
    )
    record = evaluator.evaluate(cfg.eval.seq_len or stage.seq_len, stage.seq_len if niah else None)
    for key, value in record.items():
        log.info("%s = %s", key, "n/a" if value is None else f"{value:.6g}")
    return {"checkpoint": str(loaded.path), "tokens": tokens, **record}


def main(argv: list[str] | None = None) -> int:
    def report(record: dict) -> None:
        print(json.dumps(record), flush=True)

    return launch("exaone-eval", __doc__, sys.argv[1:] if argv is None else argv, evaluate, report)


if __name__ == "__main__":
    raise SystemExit(main())
