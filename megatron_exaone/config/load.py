"""From Hydra recipes and command-line overrides to a typed, validated `TrainConfig` (Hydra stops here).

`load_config` composes `recipes/` (or a run directory's resolved config.yaml) with Hydra's compose API onto the
structured schema, so a misspelt key or a badly typed value fails with the key, where it came from and the
nearest valid name. `validate` then runs every cross-field check that needs the world size and the model, before
any process group exists. Every error is a `RecipeError` whose message is one paragraph saying what to change.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import os
import re
import site
import sysconfig
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import OmegaConf, open_dict
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from megatron_exaone.checkpoint.resume import starting_checkpoint
from megatron_exaone.checkpoint.store import read_meta
from megatron_exaone.curriculum import Curriculum, CurriculumError
from megatron_exaone.errors import UserError
from megatron_exaone.model.config import ConfigError, ModelConfig
from megatron_exaone.parallel.mesh import LayoutError, ParallelDims
from megatron_exaone.parallel.pipeline import check_schedule, pipeline_layout, splits_weight_backward
from megatron_exaone.precision.fp8_te import is_te_precision

from .precision import PrecisionUnavailable, validate_precision
from .schema import ParallelConfig, StageConfig, TrainConfig

RECIPES_ENV = "MEGATRON_EXAONE_RECIPES"
SCHEMA_NAME = "train_schema"  # the ConfigStore node that recipes/config.yaml lists first in its defaults


class RecipeError(UserError, ValueError):
    """A configuration that cannot run; the message says what to change."""


@dataclass(frozen=True)
class ValidatedConfig:
    """What `validate` checked and built: the trainer starts from these, never from raw config values.

    `stage_parallel[i]` is the layout of curriculum stage i (the `parallel` group with the stage's overrides),
    with dp resolved; `dims` is the base layout's. A launch runs the layout of the stage it starts in.
    """

    config: TrainConfig
    model: ModelConfig
    dims: ParallelDims
    curriculum: Curriculum
    stage_parallel: tuple[ParallelConfig, ...]


# ---------------------------------------------------------------------------------------------- loading
def recipes_dir(override: str | os.PathLike | None = None) -> Path:
    """The recipes directory: `override` (the CLI's --config-dir), else $MEGATRON_EXAONE_RECIPES, else the
    `recipes/` folder beside the package (a source checkout or editable install), else the copy a wheel install
    puts under <prefix>/share/megatron-exaone/recipes (pyproject.toml's data-files)."""
    chosen = override or os.environ.get(RECIPES_ENV)
    if chosen:
        candidates = [Path(chosen)]
    else:
        installed = Path("share") / "megatron-exaone" / "recipes"
        candidates = [Path(__file__).resolve().parents[2] / "recipes", Path(sysconfig.get_path("data")) / installed,
                      Path(site.getuserbase()) / installed]
    path = next((c for c in candidates if (c / "config.yaml").is_file()), None)
    if path is None:
        origin = "--config-dir" if override else RECIPES_ENV if chosen else "the source checkout or the installation"
        raise RecipeError(f"no recipes found at {', '.join(map(str, candidates))} (from {origin}): no config.yaml. "
                          f"Point --config-dir or ${RECIPES_ENV} at megatron-exaone's recipes/ folder (or a copy).")
    return path.resolve()


def load_config(overrides: Sequence[str] = (), config_dir: str | os.PathLike | None = None,
                config_name: str = "config") -> TrainConfig:
    """Compose `config_dir/config_name.yaml` (default: `recipes_dir()`) with Hydra `overrides` such as
    `experiment=cpu_tiny parallel.tp=2`, into a typed `TrainConfig`.

    `config_dir` may also be a run directory: its resolved config.yaml (`save_resolved`) composes as it is.
    """
    overrides = list(overrides)
    directory = recipes_dir(config_dir)
    ConfigStore.instance().store(name=SCHEMA_NAME, node=TrainConfig)
    try:
        with initialize_config_dir(config_dir=str(directory), version_base=None, job_name="megatron_exaone"):
            composed = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as exc:
        raise RecipeError(_explain(exc, overrides, str(directory / f"{config_name}.yaml"))) from None
    source = _composed_from(composed.hydra.runtime.choices, directory / f"{config_name}.yaml")
    with open_dict(composed):
        del composed["hydra"]
    try:
        # Merge plain containers: Hydra's `+key=value` unlocks typed nodes, and that flag would survive a merge.
        merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.to_container(composed))
        cfg: TrainConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise RecipeError(_explain(exc, overrides, source)) from None
    except ValueError as exc:  # a field check in schema.py
        raise RecipeError(str(exc)) from None
    _check_model_keys(cfg.model, source, overrides)
    return cfg


def save_resolved(cfg: TrainConfig, path: str | os.PathLike | None = None) -> Path:
    """Write the resolved config as YAML (default `run_dir/config.yaml`, the run's record; rank 0 only).
    `load_config([], config_dir=run_dir)` reads it back equal."""
    path = Path(path) if path is not None else Path(cfg.run_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg), resolve=True))
    tmp.replace(path)
    return path


# ---------------------------------------------------------------------------------------------- error messages
def _composed_from(choices: Any, primary: Path) -> str:
    """Where a composed config came from, for errors found after composition: the recipe group choices."""
    picked = [f"{group}={name}" for group, name in choices.items() if name and not group.startswith("hydra")]
    return f"the recipes composed from {primary} ({' '.join(picked)})" if picked else str(primary)


def _check_model_keys(fields: dict[str, Any], source: str, overrides: Sequence[str] = ()) -> None:
    """`model` is a free-form map in the schema (ModelConfig has union-typed fields OmegaConf cannot express), so
    its names are checked here against ModelConfig (plus `from_checkpoint`, see `model_fields`)."""
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(ModelConfig)} - {"from_checkpoint"})
    if unknown:
        key = f"model.{unknown[0]}"
        override = next((o for o in overrides if o.lstrip("+~").split("=", 1)[0] == key), None)
        raise RecipeError(_unknown_key(key, f"the override {override!r}" if override else source))


def _explain(exc: BaseException, overrides: list[str], primary: str) -> str:
    """One paragraph for a Hydra/OmegaConf error: the key, where it was set, and what would be valid."""
    causes = [exc, exc.__cause__] if exc.__cause__ else [exc]
    text = " ".join(str(e) for e in causes)
    key = next((e.full_key for e in causes if getattr(e, "full_key", None)), None)
    match = re.search(r"full_key: (\S+)", text) or re.search(r"override '([^']+)'", text)
    key = key or (match.group(1) if match else None)
    key = _hydra_key(key) if key else None
    file_match = re.search(r"In '([^']+)'", text)
    override = next((o for o in overrides if key and _within(key, o.lstrip("+~").split("=", 1)[0])), None)
    source = (f"the override {override!r}" if override else
              f"recipes file {file_match.group(1)}.yaml" if file_match else primary)
    missing_key = any(isinstance(e, (ConfigKeyError, ConfigAttributeError)) for e in causes) or \
        re.search(r"Key '[^']+' (is )?not in", text) is not None
    if key and missing_key:
        return _unknown_key(key, source)
    detail = _first_line(str(causes[-1]))
    if key:
        return f"Invalid value for config key '{key}' in {source}: {detail}."
    message = str(exc).split("Config search path")[0]
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


def _hydra_key(key: str) -> str:
    """OmegaConf's `a.b[0].c` in the override syntax users type: `a.b.0.c`."""
    return re.sub(r"\[(\d+)\]", r".\1", key)


def _within(key: str, override_key: str) -> bool:
    """Is `key` at or under the key an override sets?"""
    return key == override_key or key.startswith(override_key + ".")


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0].rstrip(".") if message.strip() else message


def _unknown_key(key: str, source: str) -> str:
    parent, _, leaf = key.rpartition(".")
    valid = _valid_keys(parent)
    if parent and not valid:  # a name -> value map (mixture, datasets): its entries are not fixed by the schema
        return (f"'{parent}' has no entry '{leaf}' (from {source}); add a new entry with '+{key}=VALUE', or replace "
                "the whole map in the recipe file.")
    if leaf in valid:  # a valid field the composed recipe does not set (model recipes list only what they change)
        return (f"'{key}' is not set by the recipes composed here (from {source}); add it with '+{key}=VALUE'.")
    close = difflib.get_close_matches(leaf, valid, n=1)
    hint = f" Did you mean '{parent + '.' if parent else ''}{close[0]}'?" if close else ""
    where = f"'{parent}'" if parent else "the top level"
    return (f"Unknown config key '{key}' in {source}: {where} has no '{leaf}'.{hint} Valid keys there: "
            f"{', '.join(valid)}.")


def _valid_keys(path: str) -> list[str]:
    """Field names of the schema node at dotted `path` (`model` -> ModelConfig, `curriculum.stages.0` ->
    StageConfig)."""
    node: Any = TrainConfig
    for part in filter(None, path.split(".")):
        if part.isdigit():  # a list index: `node` already is the element type
            continue
        if node is TrainConfig and part == "model":
            node = ModelConfig
            continue
        if not dataclasses.is_dataclass(node):
            return []
        hint = typing.get_type_hints(node).get(part)
        node = typing.get_args(hint)[0] if typing.get_origin(hint) is list else hint
    return sorted(f.name for f in dataclasses.fields(node)) if dataclasses.is_dataclass(node) else []


# ---------------------------------------------------------------------------------------------- validation
def validate(cfg: TrainConfig, world_size: int, device_type: str | None = None) -> ValidatedConfig:
    """Every check that needs more than one field, for `world_size` ranks; raises `RecipeError`.

    `device_type` ("cpu"/"cuda", from `precision.resolve_device(cfg.trainer.device)`) is the device this process
    will run on; None skips the checks that depend on the machine (FP8 libraries and GPU capability), so a recipe
    for a GPU cluster can be checked anywhere.
    """
    model = build_model_config(model_fields(cfg))
    try:
        dims = cfg.parallel.to_dims().validate(world_size, model)
    except LayoutError as exc:
        raise RecipeError(f"parallel layout for {world_size} ranks: {exc}") from None
    stage_parallel = tuple(_check_stage(cfg, i, stage, model, world_size)
                           for i, stage in enumerate(cfg.curriculum.stages))
    multiple = math.gcd(*(cfg.trainer.micro_batch_size * p.dp for p in stage_parallel)) if stage_parallel else 1
    try:
        curriculum = cfg.curriculum.build(batch_multiple=multiple)
    except CurriculumError as exc:
        raise RecipeError(f"{exc} Change the curriculum recipe (or the override of that stage).") from None
    _check_precision(cfg, model, device_type)
    if cfg.wandb.enabled and importlib.util.find_spec("wandb") is None:
        raise RecipeError("wandb.enabled=true but the wandb package is not installed: install it with "
                          "`pip install 'megatron-exaone[wandb]'`, or set wandb.enabled=false.")
    _check_resume(cfg, model)
    return ValidatedConfig(config=cfg, model=model, dims=dims, curriculum=curriculum, stage_parallel=stage_parallel)


def model_fields(cfg: TrainConfig) -> dict[str, Any]:
    """The model recipe, or with `model=from_checkpoint` the model config saved in the starting checkpoint's
    meta.json (other keys of the recipe override it, e.g. mtp_loss_weight)."""
    fields = dict(cfg.model)
    if not fields.pop("from_checkpoint", False):
        return fields
    checkpoint = starting_checkpoint(cfg.run_dir, cfg.checkpoint.load)
    if checkpoint is None:
        raise RecipeError("model=from_checkpoint needs a checkpoint: set checkpoint.load=PATH (for example the "
                          "output of `exaone-convert from-hf`).")
    saved = read_meta(checkpoint).get("model_config")
    if not saved:
        raise RecipeError(f"{checkpoint}/meta.json has no model_config; use a model recipe instead of "
                          "model=from_checkpoint.")
    return {**saved, **fields}


def _check_resume(cfg: TrainConfig, model: ModelConfig) -> None:
    """A launch that continues from a checkpoint (its run's own, or checkpoint.load) needs the model the checkpoint
    holds: checked here, before anything is loaded or written."""
    checkpoint = starting_checkpoint(cfg.run_dir, cfg.checkpoint.load)
    saved = read_meta(checkpoint).get("model_config") if checkpoint is not None else None
    if not saved:
        return
    try:
        differences = ModelConfig(**saved).weight_differences(model)
    except (TypeError, ConfigError) as exc:
        raise RecipeError(f"{checkpoint}/meta.json: its model_config is not valid ({exc}).") from None
    if differences:
        listed = ", ".join(f"{name} {_short(there)} there, {_short(here)} here"
                           for name, (there, here) in list(differences.items())[:4])
        raise RecipeError(f"{checkpoint} holds another model ({listed}): resume with the model it was trained with "
                          "(model=from_checkpoint takes it from the checkpoint), or start a new run_dir.")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def build_model_config(fields: dict[str, Any]) -> ModelConfig:
    """`ModelConfig(**fields)`, with unknown names and impossible models reported as `RecipeError`."""
    _check_model_keys(fields, "the model config")
    try:
        return ModelConfig(**fields)
    except ConfigError as exc:
        raise RecipeError(f"model: {exc}") from None


def _check_stage(cfg: TrainConfig, index: int, stage: StageConfig, model: ModelConfig,
                 world_size: int) -> ParallelConfig:
    """The layout of one curriculum stage, checked against its batch sizes, sequence length and mixture."""
    where = f"curriculum stage {index} ({stage.name!r})"

    def fail(problem: str) -> RecipeError:
        return RecipeError(f"{where}: {problem}")

    try:
        layout = cfg.parallel.with_overrides(stage.parallel)
        dims = layout.to_dims().validate(world_size, model)
    except (LayoutError, ValueError) as exc:
        overrides = f" with the stage's parallel overrides {dict(stage.parallel)}" if stage.parallel else ""
        raise fail(f"layout{overrides} for {world_size} ranks: {exc}") from None
    layout = dataclasses.replace(layout, dp=dims.dp)
    if layout.reduce_grads_each_micro_batch and splits_weight_backward(layout.pipeline_schedule):
        raise fail(f"parallel.reduce_grads_each_micro_batch=true with pipeline_schedule={layout.pipeline_schedule}: "
                   "that schedule splits each backward and keeps parameters gathered; use 1f1b or "
                   "interleaved_1f1b, or set it to false.")
    if layout.compile and layout.recompute == "selective":
        raise fail("parallel.compile=true with recompute=selective: compiled layers recompute as a whole "
                   "(parallel/compile.py); use parallel.recompute=full or none, or parallel.compile=false.")

    unknown = sorted(set(stage.mixture) - set(cfg.data.datasets))
    if unknown:
        raise fail(f"mixture names datasets {unknown} that data.datasets does not define (it has "
                   f"{sorted(cfg.data.datasets) or 'none'}); add them to the data recipe or fix the names.")
    if stage.seq_len > model.max_position_embeddings:
        raise fail(f"seq_len={stage.seq_len} exceeds model.max_position_embeddings={model.max_position_embeddings}; "
                   "shorten the stage or raise max_position_embeddings.")
    if dims.cp > 1 and stage.seq_len % (2 * dims.cp):
        raise fail(f"seq_len={stage.seq_len} is not divisible by 2*cp = {2 * dims.cp}: context parallel splits "
                   "each sequence into 2*cp load-balanced chunks. Change seq_len or cp.")
    if layout.sequence_parallel and dims.tp > 1 and (stage.seq_len // dims.cp) % dims.tp:
        raise fail(f"seq_len/cp = {stage.seq_len // dims.cp} is not divisible by tp={dims.tp}: sequence parallel "
                   "splits each rank's tokens over tp. Change seq_len or tp, or set parallel.sequence_parallel=false.")

    if dims.cp > 1 and cfg.precision.te_attention:
        raise fail(f"cp={dims.cp} with precision.te_attention=true: context parallel attention runs on SDPA / "
                   "FlexAttention; set precision.te_attention=false.")
    rows = cfg.trainer.micro_batch_size * stage.seq_len // dims.cp
    if is_te_precision(cfg.precision) and rows % 8:
        raise fail(f"micro_batch_size x seq_len / cp = {rows} tokens reach each linear, and Transformer Engine's FP8 "
                   "linears need a multiple of 8 (TE's assert_dim_for_fp8_exec). Change seq_len or "
                   "trainer.micro_batch_size.")

    per_step = cfg.trainer.micro_batch_size * dims.dp
    batches = {"global_batch_size": stage.global_batch_size}
    if stage.batch_ramp_start is not None:
        batches.update(batch_ramp_start=stage.batch_ramp_start, batch_ramp_increment=stage.batch_ramp_increment)
    for name, value in batches.items():
        if value % per_step:
            raise fail(f"{name}={value} is not a multiple of micro_batch_size x dp = "
                       f"{cfg.trainer.micro_batch_size} x {dims.dp} = {per_step}; change it (or "
                       "trainer.micro_batch_size / the layout).")
    try:
        if layout.pipeline_layout is not None:
            pipeline_layout(model, dims.pp, dims.vpp, layout.pipeline_layout)
        if dims.pp > 1:
            for name in ("global_batch_size", "batch_ramp_start"):
                if batches.get(name):
                    check_schedule(layout.pipeline_schedule, dims.pp, dims.vpp, batches[name] // per_step)
    except LayoutError as exc:
        raise fail(f"pipeline ({layout.pipeline_schedule}, pp={dims.pp}, vpp={dims.vpp}, "
                   f"{stage.global_batch_size // per_step} micro-batches per step): {exc}") from None
    return layout


def _check_precision(cfg: TrainConfig, model: ModelConfig, device_type: str | None) -> None:
    precision = cfg.precision
    if precision.is_fp8 and precision.keep_bf16_first_layers + precision.keep_bf16_last_layers > \
            model.num_hidden_layers:
        raise RecipeError(f"precision: keep_bf16_first_layers + keep_bf16_last_layers = "
                          f"{precision.keep_bf16_first_layers + precision.keep_bf16_last_layers} exceeds the model's "
                          f"{model.num_hidden_layers} layers; lower them.")
    if cfg.parallel.compile and is_te_precision(precision):
        raise RecipeError(f"parallel.compile=true with precision={precision.name}: Transformer Engine modules fuse "
                          "their own kernels and do not run under torch.compile; set parallel.compile=false.")
    try:
        validate_precision(precision, device_type)
    except PrecisionUnavailable as exc:
        raise RecipeError(str(exc)) from None
