"""What a launch runs, checked before any process group exists (`validate`): the model (its recipe,
or with `model=from_checkpoint` the starting checkpoint's), the curriculum, every stage's layout as
the features that build it see it (`parallel.features`), the checkpoint it resumes and the optional
packages it asks for. Every error is a one-line `RecipeError` saying what to change."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from dataclasses import dataclass
from typing import Any

from megatron_exaone.checkpoint.resume import starting_checkpoint
from megatron_exaone.checkpoint.store import read_meta
from megatron_exaone.config.load import check_model_keys
from megatron_exaone.config.schema import ParallelConfig, RecipeError, TrainConfig
from megatron_exaone.curriculum import Curriculum, CurriculumError, Stage
from megatron_exaone.errors import UserError
from megatron_exaone.model.config import ConfigError, ModelConfig
from megatron_exaone.parallel.features import Build, Shapes, validate_build
from megatron_exaone.parallel.mesh import LayoutError, ParallelDims

from .offload import offload_unavailable


@dataclass(frozen=True)
class ValidatedConfig:
    """What `validate` checked and built: the trainer starts from these, never from raw config
    values.

    `stage_parallel[i]` is the layout of curriculum stage i (the `parallel` group with the stage's
    overrides), with dp resolved; `dims` is the base layout's. A launch runs the layout of the stage
    it starts in.
    """

    config: TrainConfig
    model: ModelConfig
    dims: ParallelDims
    curriculum: Curriculum
    stage_parallel: tuple[ParallelConfig, ...]


def validate(cfg: TrainConfig, world_size: int, device_type: str | None = None) -> ValidatedConfig:
    """Every check that needs more than one field, for `world_size` ranks; raises `RecipeError`.

    `device_type` ("cpu"/"cuda", from `training.device.resolve_device(cfg.trainer.device)`) is the
    device this process will run on; None skips the checks that depend on the machine (FP8 libraries
    and GPU capability), so a recipe for a GPU cluster can be checked anywhere.
    """
    model = build_model_config(model_fields(cfg))
    p = cfg.parallel
    needed = p.tp * p.cp * p.pp * (p.dp or 1)
    if world_size == 1 and needed > 1:
        raise RecipeError(
            f"this recipe's layout (tp={p.tp} pp={p.pp} cp={p.cp} dp={p.dp or 1}, ep={p.ep}) needs "
            f"{needed} processes and this is a single process: launch with `launch/local.sh "
            f"{needed} ...` (CPU) or `python -m megatron_exaone.cli.torchrun --nproc-per-node "
            f"{needed} -m megatron_exaone.cli.train ...`, or add parallel=single."
        )
    try:
        dims = ParallelDims.of(cfg.parallel).validate(world_size, model)
    except LayoutError as exc:
        raise RecipeError(f"parallel layout for {world_size} ranks: {exc}") from None
    stage_parallel = tuple(
        _check_stage(cfg, i, stage, model, world_size, device_type)
        for i, stage in enumerate(cfg.curriculum.stages)
    )
    if not stage_parallel:
        _check(
            lambda: validate_build(Build(model, cfg.parallel, cfg.precision, dims, device_type)), ""
        )
    multiple = (
        math.gcd(*(cfg.trainer.micro_batch_size * p.dp for p in stage_parallel))
        if stage_parallel
        else 1
    )
    try:
        curriculum = cfg.curriculum.build(batch_multiple=multiple)
    except CurriculumError as exc:
        raise RecipeError(
            f"{exc} Change the curriculum recipe (or the override of that stage)."
        ) from None
    if cfg.wandb.enabled and importlib.util.find_spec("wandb") is None:
        raise RecipeError(
            "wandb.enabled=true but the wandb package is not installed: install it with "
            "`pip install 'megatron-exaone[wandb]'`, or set wandb.enabled=false."
        )
    if cfg.tensorboard.enabled and importlib.util.find_spec("tensorboard") is None:
        raise RecipeError(
            "tensorboard.enabled=true but the tensorboard package is not installed: install it "
            "with `pip install 'megatron-exaone[tensorboard]'`, or set tensorboard.enabled=false."
        )
    if cfg.optim.offload == "cpu" and device_type is not None:
        reason = offload_unavailable()
        if reason:
            raise RecipeError(f"{reason}, or set optim.offload=none.")
    _check_resume(cfg, model)
    return ValidatedConfig(
        config=cfg, model=model, dims=dims, curriculum=curriculum, stage_parallel=stage_parallel
    )


def _check(run, where: str) -> None:
    try:
        run()
    except UserError as exc:
        raise RecipeError(f"{where}{exc}") from None


def _check_stage(
    cfg: TrainConfig,
    index: int,
    stage: Stage,
    model: ModelConfig,
    world_size: int,
    device_type: str | None,
) -> ParallelConfig:
    """The layout of one curriculum stage, checked by every feature against its shapes, and its
    data."""
    where = f"curriculum stage {index} ({stage.name!r}): "
    try:
        layout = cfg.parallel.with_overrides(stage.parallel)
        dims = ParallelDims.of(layout).validate(world_size, model)
    except (LayoutError, ValueError) as exc:
        overrides = (
            f" with the stage's parallel overrides {dict(stage.parallel)}" if stage.parallel else ""
        )
        raise RecipeError(f"{where}layout{overrides} for {world_size} ranks: {exc}") from None
    layout = dataclasses.replace(layout, dp=dims.dp)
    unknown = sorted(set(stage.mixture) - set(cfg.data.datasets))
    if unknown:
        raise RecipeError(
            f"{where}mixture names datasets {unknown} that data.datasets does not define (it has "
            f"{sorted(cfg.data.datasets) or 'none'}); add them to the data recipe or fix the names."
        )
    if stage.seq_len > model.max_position_embeddings:
        raise RecipeError(
            f"{where}seq_len={stage.seq_len} exceeds model.max_position_embeddings="
            f"{model.max_position_embeddings}; shorten the stage or raise max_position_embeddings."
        )
    batches = [("global_batch_size", stage.global_batch_size)]
    if stage.batch_ramp_start is not None:
        batches += [
            ("batch_ramp_start", stage.batch_ramp_start),
            ("batch_ramp_increment", stage.batch_ramp_increment),
        ]
    shapes = Shapes(stage.seq_len, cfg.trainer.micro_batch_size, tuple(batches))
    _check(
        lambda: validate_build(Build(model, layout, cfg.precision, dims, device_type), shapes),
        where,
    )
    return layout


def model_fields(cfg: TrainConfig) -> dict[str, Any]:
    """The model recipe, or with `model=from_checkpoint` the model config saved in the starting
    checkpoint's meta.json (other keys of the recipe override it, e.g. mtp_loss_weight)."""
    fields = dict(cfg.model)
    if not fields.pop("from_checkpoint", False):
        return fields
    checkpoint = starting_checkpoint(cfg.run_dir, cfg.checkpoint.load)
    if checkpoint is None:
        raise RecipeError(
            "model=from_checkpoint needs a checkpoint: set checkpoint.load=PATH (for example the "
            "output of `exaone-convert from-hf`)."
        )
    saved = read_meta(checkpoint).get("model_config")
    if not saved:
        raise RecipeError(
            f"{checkpoint}/meta.json has no model_config; use a model recipe instead of "
            "model=from_checkpoint."
        )
    return {**saved, **fields}


def build_model_config(fields: dict[str, Any]) -> ModelConfig:
    """`ModelConfig(**fields)`, with unknown names and impossible models reported as
    `RecipeError`."""
    check_model_keys(fields, "the model config")
    try:
        return ModelConfig(**fields)
    except ConfigError as exc:
        raise RecipeError(f"model: {exc}") from None


def _check_resume(cfg: TrainConfig, model: ModelConfig) -> None:
    """A launch that continues from a checkpoint (its run's own, or checkpoint.load) needs the model
    the checkpoint holds: checked here, before anything is loaded or written."""
    checkpoint = starting_checkpoint(cfg.run_dir, cfg.checkpoint.load)
    saved = read_meta(checkpoint).get("model_config") if checkpoint is not None else None
    if not saved:
        return
    try:
        differences = ModelConfig(**saved).weight_differences(model)
    except (TypeError, ConfigError) as exc:
        raise RecipeError(
            f"{checkpoint}/meta.json: its model_config is not valid ({exc})."
        ) from None
    if differences:
        listed = ", ".join(
            f"{name} {_short(there)} there, {_short(here)} here"
            for name, (there, here) in list(differences.items())[:4]
        )
        raise RecipeError(
            f"{checkpoint} holds another model ({listed}): resume with the model it was trained "
            "with (model=from_checkpoint takes it from the checkpoint), or start a new run_dir."
        )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
