"""Training data: Megatron `.bin/.idx` shards, tokenizer loading, packing, mixtures and the
resumable loader.

`MixtureLoader` and `DataStage` (which import torch) load on first use, so tokenization workers stay
light.
"""

from megatron_exaone.data.indexed import (
    IndexedDataset,
    IndexedDatasetError,
    IndexedDatasetWriter,
    merge_datasets,
    optimal_dtype,
)
from megatron_exaone.data.tokenizer import load_tokenizer, resolve_eod

__all__ = [
    "IndexedDataset",
    "IndexedDatasetError",
    "IndexedDatasetWriter",
    "merge_datasets",
    "optimal_dtype",
    "load_tokenizer",
    "resolve_eod",
    "MixtureLoader",
    "DataStage",
]


def __getattr__(name: str):
    if name in ("MixtureLoader", "DataStage"):
        from megatron_exaone.data import loader

        return getattr(loader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
