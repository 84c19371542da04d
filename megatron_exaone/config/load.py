"""From Hydra recipes and command-line overrides to a typed `TrainConfig` (Hydra stops here).

`load_config` composes `recipes/` (or a run directory's resolved config.yaml) with Hydra's compose
API onto the structured schema, so a misspelt key or a badly typed value fails with the key, where
it came from and the nearest valid name (a `RecipeError` whose message is one paragraph saying what
to change). The checks that need the world size, the model and the machine are
`training.plan.validate`'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import os
import re
import site
import sysconfig
import typing
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.default_element import DefaultsTreeNode, ResultDefault
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from megatron_exaone.model.config import ModelConfig

from .schema import RecipeError, TrainConfig

RECIPES_ENV = "MEGATRON_EXAONE_RECIPES"
# the ConfigStore node that recipes/config.yaml lists first in its defaults
SCHEMA_NAME = "train_schema"


# ------------------------------------------------------------------------------------------ loading
def recipes_dir(override: str | os.PathLike | None = None) -> Path:
    """The recipes directory: `override` (the CLI's --config-dir), else $MEGATRON_EXAONE_RECIPES,
    else the `recipes/` folder beside the package (a source checkout or editable install), else the
    copy a wheel install puts under <prefix>/share/megatron-exaone/recipes (pyproject.toml's
    data-files)."""
    chosen = override or os.environ.get(RECIPES_ENV)
    if chosen:
        candidates = [Path(chosen)]
    else:
        installed = Path("share") / "megatron-exaone" / "recipes"
        candidates = [
            Path(__file__).resolve().parents[2] / "recipes",
            Path(sysconfig.get_path("data")) / installed,
            Path(site.getuserbase()) / installed,
        ]
    path = next((c for c in candidates if (c / "config.yaml").is_file()), None)
    if path is None:
        origin = (
            "--config-dir"
            if override
            else RECIPES_ENV
            if chosen
            else "the source checkout or the installation"
        )
        raise RecipeError(
            f"no recipes found at {', '.join(map(str, candidates))} (from {origin}): no "
            f"config.yaml. Point --config-dir or ${RECIPES_ENV} at megatron-exaone's recipes/ "
            "folder (or a copy)."
        )
    return path.resolve()


def load_config(
    overrides: Sequence[str] = (),
    config_dir: str | os.PathLike | None = None,
    config_name: str = "config",
) -> TrainConfig:
    """Compose `config_dir/config_name.yaml` (default: `recipes_dir()`) with Hydra `overrides` such
    as `experiment=cpu_tiny parallel.tp=2`, into a typed `TrainConfig`.

    `config_dir` may also be a run directory: its resolved config.yaml (`save_resolved`) composes as
    it is.
    """
    overrides = list(overrides)
    merged, _, source = _composition(overrides, config_dir, config_name)
    try:
        cfg: TrainConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise RecipeError(_explain(exc, overrides, source)) from None
    except ValueError as exc:  # a field check in schema.py
        raise RecipeError(str(exc)) from None
    check_model_keys(cfg.model, source, overrides)
    return cfg


def compose_job(
    overrides: Sequence[str] = (),
    config_dir: str | os.PathLike | None = None,
    config_name: str = "config",
) -> tuple[DictConfig, DictConfig]:
    """The training config as `load_config` composes it (merged onto the schema, so every default
    shows), kept a `DictConfig` with its interpolations for printing, and Hydra's own `hydra` node
    (runtime.choices, runtime.config_sources, ...). Raises the RecipeError training would for a bad
    override or key; the schema's field checks are left to `load_config`."""
    overrides = list(overrides)
    job, hydra_node, source = _composition(overrides, config_dir, config_name)
    check_model_keys(job.model, source, overrides)
    return job, hydra_node


def compose_defaults(
    overrides: Sequence[str] = (),
    config_dir: str | os.PathLike | None = None,
    config_name: str = "config",
) -> tuple[list[ResultDefault], DefaultsTreeNode]:
    """Hydra's defaults list for these overrides (each config file composed, in order, with its
    package) and the tree it comes from."""
    overrides = list(overrides)
    with _recipes(recipes_dir(config_dir), overrides, config_name):
        loader = GlobalHydra.instance().config_loader()
        computed = loader.compute_defaults_list(config_name, overrides, RunMode.RUN)
    return computed.defaults, computed.defaults_tree


def recipe_groups(config_dir: str | os.PathLike | None = None) -> dict[str, list[str]]:
    """Each recipe group (a subdirectory of the recipes directory) -> its options (YAML file names
    without the suffix, sorted)."""
    directory = recipes_dir(config_dir)
    groups = {
        group.name: sorted(path.stem for path in group.glob("*.yaml"))
        for group in sorted(directory.iterdir())
        if group.is_dir()
    }
    return {group: options for group, options in groups.items() if options}


def _composition(
    overrides: list[str], config_dir: str | os.PathLike | None, config_name: str
) -> tuple[DictConfig, DictConfig, str]:
    """The composed training config merged onto the schema, Hydra's node, and where the config
    came from (for errors found after composition)."""
    directory = recipes_dir(config_dir)
    with _recipes(directory, overrides, config_name):
        composed = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    source = _composed_from(composed.hydra.runtime.choices, directory / f"{config_name}.yaml")
    plain = OmegaConf.to_container(composed)
    del plain["hydra"]
    try:
        # Merge plain containers: Hydra's `+key=value` unlocks typed nodes, and that flag would
        # survive a merge.
        merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), plain)
    except OmegaConfBaseException as exc:
        raise RecipeError(_explain(exc, overrides, source)) from None
    return merged, composed.hydra, source


@contextlib.contextmanager
def _recipes(directory: Path, overrides: list[str], config_name: str) -> Iterator[None]:
    """Hydra initialized on `directory` with the schema registered; Hydra's errors inside become
    one-paragraph RecipeErrors."""
    ConfigStore.instance().store(name=SCHEMA_NAME, node=TrainConfig)
    try:
        with initialize_config_dir(
            config_dir=str(directory), version_base=None, job_name="megatron_exaone"
        ):
            yield
    except (HydraException, OmegaConfBaseException) as exc:
        raise RecipeError(
            _explain(exc, overrides, str(directory / f"{config_name}.yaml"))
        ) from None


def save_resolved(cfg: TrainConfig, path: str | os.PathLike | None = None) -> Path:
    """Write the resolved config as YAML (default `run_dir/config.yaml`, the run's record; rank 0
    only). `load_config([], config_dir=run_dir)` reads it back equal."""
    path = Path(path) if path is not None else Path(cfg.run_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg), resolve=True))
    tmp.replace(path)
    return path


# ----------------------------------------------------------------------------------- error messages
def _composed_from(choices: Any, primary: Path) -> str:
    """Where a composed config came from, for errors found after composition: the recipe group
    choices."""
    picked = [
        f"{group}={name}"
        for group, name in choices.items()
        if name and not group.startswith("hydra")
    ]
    return f"the recipes composed from {primary} ({' '.join(picked)})" if picked else str(primary)


def check_model_keys(fields: dict[str, Any], source: str, overrides: Sequence[str] = ()) -> None:
    """`model` is a free-form map in the schema (ModelConfig has union-typed fields OmegaConf cannot
    express), so its names are checked here against ModelConfig (plus `from_checkpoint`, see
    `model_fields`)."""
    unknown = sorted(
        set(fields) - {f.name for f in dataclasses.fields(ModelConfig)} - {"from_checkpoint"}
    )
    if unknown:
        key = f"model.{unknown[0]}"
        override = next((o for o in overrides if o.lstrip("+~").split("=", 1)[0] == key), None)
        raise RecipeError(_unknown_key(key, f"the override {override!r}" if override else source))


def _explain(exc: BaseException, overrides: list[str], primary: str) -> str:
    """One paragraph for a Hydra/OmegaConf error: the key, where it was set, and what would be
    valid."""
    causes = [exc, exc.__cause__] if exc.__cause__ else [exc]
    text = " ".join(str(e) for e in causes)
    key = next((e.full_key for e in causes if getattr(e, "full_key", None)), None)
    match = re.search(r"full_key: (\S+)", text) or re.search(r"override '([^']+)'", text)
    key = key or (match.group(1) if match else None)
    key = _hydra_key(key) if key else None
    file_match = re.search(r"In '([^']+)'", text)
    override = next(
        (o for o in overrides if key and _within(key, o.lstrip("+~").split("=", 1)[0])), None
    )
    source = (
        f"the override {override!r}"
        if override
        else f"recipes file {file_match.group(1)}.yaml"
        if file_match
        else primary
    )
    missing_key = (
        any(isinstance(e, (ConfigKeyError, ConfigAttributeError)) for e in causes)
        or re.search(r"Key '[^']+' (is )?not in", text) is not None
    )
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
    # a name -> value map (mixture, datasets): its entries are not fixed by the schema
    if parent and not valid:
        return (
            f"'{parent}' has no entry '{leaf}' (from {source}); add a new entry with "
            f"'+{key}=VALUE', or replace the whole map in the recipe file."
        )
    # a valid field the composed recipe does not set (model recipes list only what they change)
    if leaf in valid:
        return (
            f"'{key}' is not set by the recipes composed here (from {source}); "
            f"add it with '+{key}=VALUE'."
        )
    close = difflib.get_close_matches(leaf, valid, n=1)
    hint = f" Did you mean '{parent + '.' if parent else ''}{close[0]}'?" if close else ""
    where = f"'{parent}'" if parent else "the top level"
    return (
        f"Unknown config key '{key}' in {source}: {where} has no '{leaf}'.{hint} Valid keys there: "
        f"{', '.join(valid)}."
    )


def _valid_keys(path: str) -> list[str]:
    """Field names of the schema node at dotted `path` (`model` -> ModelConfig,
    `curriculum.stages.0` -> curriculum.Stage)."""
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
    return (
        sorted(f.name for f in dataclasses.fields(node)) if dataclasses.is_dataclass(node) else []
    )
