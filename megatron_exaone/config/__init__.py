"""Run configuration: the typed schema (`schema`, plain dataclasses) and Hydra recipe loading
(`load`). Only this package and `cli/` import Hydra/OmegaConf, and only `load` does here: the rest
of the library imports `schema` and receives its dataclasses."""
