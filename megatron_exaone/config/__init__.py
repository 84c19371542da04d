"""Run configuration: the typed schema (`schema`), Hydra recipe loading and cross-field validation (`load`), and
the precision availability check (`precision`). Only this package and `cli/` import Hydra/OmegaConf; the rest of
the library receives the dataclasses of `schema` or the objects `validate` builds from them."""

from .load import RECIPES_ENV, RecipeError, ValidatedConfig, build_model_config, load_config, recipes_dir, \
    save_resolved, validate
from .precision import PrecisionUnavailable, resolve_device, validate_precision
from .schema import (CheckpointConfig, CurriculumConfig, DataConfig, LRConfig, OptimConfig, ParallelConfig,
                     PrecisionConfig, StageConfig, TrainConfig, TrainerConfig, WandbConfig)

__all__ = ["RECIPES_ENV", "RecipeError", "ValidatedConfig", "build_model_config", "load_config", "recipes_dir",
           "save_resolved", "validate", "PrecisionUnavailable", "resolve_device", "validate_precision",
           "CheckpointConfig", "CurriculumConfig", "DataConfig", "LRConfig", "OptimConfig", "ParallelConfig",
           "PrecisionConfig", "StageConfig", "TrainConfig", "TrainerConfig", "WandbConfig"]
