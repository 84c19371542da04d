"""The training-time loader: a weighted mixture of packed `.bin/.idx` datasets, split across
data-parallel ranks.

Within curriculum stage s the global sample stream is a pure function of (seed, s): the mixture
interleave (`mixture.blend`) picks, for every global sample, a dataset and that dataset's next
sample; each dataset's samples come epoch after epoch from packed, shuffled epoch indices
(`packing`) seeded by (seed, s, dataset name, epoch). The loader's position is the number of tokens
consumed, so its whole state is a few integers: a resumed loader continues with exactly the batches
the uninterrupted one would have produced, under any number of ranks.

A dataset can hold out a fraction of its documents for evaluation (`held_out_documents`): the
training loader then reads only the others, an evaluation loader (`held_out=True`) only those.
"""

from __future__ import annotations

import hashlib
import os
import re
import zlib
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megatron_exaone.data.cache import cache_key, cached_array
from megatron_exaone.data.indexed import IndexedDataset, IndexedDatasetError, read_stats, stats_path
from megatron_exaone.data.mixture import blend, normalize_weights
from megatron_exaone.data.packing import PACKING_MODES, EpochIndex, Pieces, assemble, build_epoch

# one shard prefix or several read as one dataset
Prefixes = str | os.PathLike | Sequence[str | os.PathLike]
INDEX_VERSION = 1  # bump when the index layout or the packing rules change, to invalidate caches
HOLDOUT_SEED = 0x5E1EC7  # fixed: the held-out documents must not change with the run's seed


def held_out_documents(num_documents: int, fraction: float, name: str) -> np.ndarray:
    """Which of dataset `name`'s documents are held out for evaluation: a boolean mask, about
    `fraction` of them, a fixed function of each document's index and the name (documents appended
    to a dataset later do not change the earlier ones' fate)."""
    rng = np.random.default_rng([HOLDOUT_SEED, zlib.crc32(name.encode())])
    return rng.random(num_documents) < fraction


@dataclass(frozen=True)
class DataStage:
    """One curriculum stage: mixture weights by dataset name; seq_len / global batch override the
    loader's."""

    weights: Mapping[str, float]
    seq_len: int | None = None
    global_batch_size: int | None = None


class _Source:
    """A named dataset: one or more shard prefixes read as one list of sequences. With `vocab_size`,
    every read is checked to hold only ids the model can embed (an id past the embedding would fail
    deep inside the model). `documents`: a boolean mask of the sequences it reads (all when None),
    the rest being invisible to packing and reads."""

    def __init__(
        self,
        name: str,
        prefixes: Sequence[str | os.PathLike],
        cache_dir: str | os.PathLike | None,
        vocab_size: int | None = None,
        documents: Callable[[int], np.ndarray] | None = None,
    ):
        if not prefixes:
            raise ValueError(f"dataset {name!r} names no shard prefix")
        self.name, self.vocab_size = name, vocab_size
        self.parts = [self._open(p) for p in prefixes]
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])
        lengths = np.concatenate(
            [np.asarray(p.sequence_lengths, dtype=np.int64) for p in self.parts]
        )
        self.selected = None if documents is None else np.flatnonzero(documents(len(lengths)))
        self.lengths = lengths if self.selected is None else lengths[self.selected]
        digest = hashlib.sha256(self.lengths.tobytes())
        for p in self.parts:
            digest.update(str(p.dtype).encode())
        if self.selected is not None:
            digest.update(self.selected.tobytes())
        self.digest = digest.hexdigest()
        self.cache_dir = Path(cache_dir) if cache_dir else Path(prefixes[0]).parent / "index-cache"

    def _open(self, prefix: str | os.PathLike) -> IndexedDataset:
        try:
            part = IndexedDataset(prefix)
            stats = read_stats(prefix) if self.vocab_size is not None else {}
        except IndexedDatasetError as e:
            raise IndexedDatasetError(f"dataset {self.name!r}: {e}") from None
        if self.vocab_size is not None:
            self._check_recorded_ids(part, stats)
        return part

    def _check_recorded_ids(self, part: IndexedDataset, stats: dict) -> None:
        """Fail before training when the shard's stats sidecar says it holds ids the model cannot
        embed."""
        recorded = {
            key: stats[key] for key in ("max_id", "vocab_size") if isinstance(stats.get(key), int)
        }
        largest = recorded["max_id"] if "max_id" in recorded else recorded.get("vocab_size", 0) - 1
        if largest >= self.vocab_size:
            detail = ", ".join(f"{key} {value}" for key, value in recorded.items())
            raise self._vocab_error(
                part,
                f"holds token ids up to {largest} ({stats_path(part.bin_path)} records {detail})",
            )

    def _vocab_error(self, part: IndexedDataset, finding: str) -> IndexedDatasetError:
        return IndexedDatasetError(
            f"dataset {self.name!r}: {part.bin_path} {finding}, but the model's vocabulary has "
            f"{self.vocab_size} ids (0..{self.vocab_size - 1}); tokenize the data with the "
            "tokenizer the model was built for, or raise model.vocab_size to cover every id"
        )

    def read(self, seq: int, start: int, count: int) -> np.ndarray:
        if self.selected is not None:
            seq = int(self.selected[seq])
        part = int(np.searchsorted(self.offsets, seq, side="right")) - 1
        tokens = self.parts[part].get(seq - int(self.offsets[part]), start, count)
        if self.vocab_size is not None and len(tokens) and int(tokens.max()) >= self.vocab_size:
            raise self._vocab_error(self.parts[part], f"holds token id {int(tokens.max())}")
        return tokens


def _document_filter(name: str, fraction: float, held_out: bool) -> Callable[[int], np.ndarray]:
    def documents(count: int) -> np.ndarray:
        mask = held_out_documents(count, fraction, name)
        if not mask.any() if held_out else mask.all():
            raise ValueError(
                f"dataset {name!r}: holding out {fraction:g} of its {count} documents leaves "
                f"{'no evaluation' if held_out else 'no training'} documents; change the fraction"
            )
        return mask if held_out else ~mask

    return documents


def _as_prefixes(value: Prefixes) -> list[str | os.PathLike]:
    return [value] if isinstance(value, (str, os.PathLike)) else list(value)


class MixtureLoader:
    """`next_batch()` -> this rank's share of the next global batch: int64 tensors [global_batch /
    dp_size, seq_len] `input_ids`, `labels` (inputs shifted by one; -100 only on padding) and
    `position_ids` (0 at each document start).

    datasets: name -> shard prefix(es), as a mapping or (name, prefixes) pairs; several prefixes
    form one dataset. stages: one DataStage (or a plain weights mapping) per curriculum stage.
    packing: "concat" (Megatron) or "best_fit" (no cuts in documents that fit a sample; pads). Index
    files are cached in cache_dir (default: `index-cache/` beside each dataset) and shared by all
    ranks and later runs. vocab_size: the model's vocabulary; an id at or past it, recorded in a
    shard's stats sidecar or met in a sample, raises IndexedDatasetError naming the dataset and
    shard.
    """

    def __init__(
        self,
        datasets: Mapping[str, Prefixes] | Sequence[tuple[str, Prefixes]],
        stages: Sequence[DataStage | Mapping[str, float]],
        seq_len: int,
        global_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 1234,
        packing: str = "concat",
        pad_token_id: int = 0,
        cache_dir: str | os.PathLike | None = None,
        vocab_size: int | None = None,
        holdout: Mapping[str, float] | None = None,
        held_out: bool = False,
    ) -> None:
        if packing not in PACKING_MODES:
            raise ValueError(f"packing must be one of {', '.join(PACKING_MODES)}, not {packing!r}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is outside [0, dp_size={dp_size})")
        if seed < 0:
            raise ValueError("seed must be a non-negative integer")
        if vocab_size is not None and vocab_size < 1:
            raise ValueError(f"vocab_size must be positive, not {vocab_size}")
        holdout = dict(holdout or {})
        self.sources = {
            name: _Source(
                name,
                _as_prefixes(p),
                cache_dir,
                vocab_size,
                _document_filter(name, holdout[name], held_out) if name in holdout else None,
            )
            for name, p in dict(datasets).items()
        }
        self.stages = [s if isinstance(s, DataStage) else DataStage(dict(s)) for s in stages]
        if not self.stages:
            raise ValueError("give at least one stage (mixture weights by dataset name)")
        self.default_seq_len, self.default_global_batch_size = seq_len, global_batch_size
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.packing, self.pad_token_id = packing, pad_token_id
        for i, stage in enumerate(self.stages):
            unknown = sorted(set(stage.weights) - set(self.sources))
            if unknown:
                raise ValueError(
                    f"stage {i} weights name unknown datasets {unknown}; known: "
                    f"{sorted(self.sources)}"
                )
            normalize_weights([stage.weights.get(n, 0.0) for n in self.sources])
            if self._stage_value(i, "seq_len", seq_len) < 1:
                raise ValueError(f"stage {i}: seq_len must be positive")
            batch = self._stage_value(i, "global_batch_size", global_batch_size)
            if batch < 1 or batch % dp_size:
                raise ValueError(
                    f"stage {i}: global batch size {batch} is not a positive multiple of "
                    f"dp_size {dp_size}"
                )
        self.stage, self.tokens_consumed, self.stage_start_tokens = 0, 0, 0
        self._epochs: OrderedDict[tuple, EpochIndex] = OrderedDict()
        self._epoch_sizes: dict[tuple, list[int]] = {}

    def _stage_value(self, stage: int, field: str, default: int) -> int:
        value = getattr(self.stages[stage], field)
        return default if value is None else value

    @property
    def seq_len(self) -> int:
        return self._stage_value(self.stage, "seq_len", self.default_seq_len)

    @property
    def global_batch_size(self) -> int:
        return self._stage_value(self.stage, "global_batch_size", self.default_global_batch_size)

    def set_stage(self, stage: int) -> None:
        """Enter curriculum stage `stage` at the current token count (a no-op if already there)."""
        if not 0 <= stage < len(self.stages):
            raise ValueError(
                f"stage {stage} does not exist; the loader has {len(self.stages)} stage(s)"
            )
        if stage != self.stage:
            self.stage, self.stage_start_tokens = stage, self.tokens_consumed

    def state_dict(self) -> dict[str, int]:
        return {
            "seed": self.seed,
            "stage": self.stage,
            "tokens_consumed": self.tokens_consumed,
            "stage_start_tokens": self.stage_start_tokens,
        }

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(
                f"checkpointed data seed {state['seed']} differs from this loader's seed "
                f"{self.seed}; resume with the same seed (or start a new run)"
            )
        stage = int(state["stage"])
        if not 0 <= stage < len(self.stages):
            raise ValueError(
                f"checkpointed stage {stage} does not exist in this loader's {len(self.stages)} "
                "stages"
            )
        self.stage = stage
        self.tokens_consumed = int(state["tokens_consumed"])
        self.stage_start_tokens = int(state["stage_start_tokens"])

    def __iter__(self) -> MixtureLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return self.next_batch()

    def next_batch(self, global_batch_size: int | None = None) -> dict[str, torch.Tensor]:
        """This rank's rows of the next global batch (`global_batch_size` overrides the stage's, for
        a batch ramp)."""
        seq_len, batch = self.seq_len, global_batch_size or self.global_batch_size
        if batch % self.dp_size:
            raise ValueError(
                f"global batch size {batch} is not a multiple of dp_size {self.dp_size}"
            )
        consumed = self.tokens_consumed - self.stage_start_tokens
        if consumed % seq_len:
            raise RuntimeError(
                f"{consumed} tokens consumed in stage {self.stage} is not a multiple of its "
                f"seq_len {seq_len}; the state does not belong to this configuration"
            )
        local = batch // self.dp_size
        first = consumed // seq_len + self.dp_rank * local
        names = list(self.sources)
        weights = [self.stages[self.stage].weights.get(n, 0.0) for n in names]
        rows = [
            self._sample(names[d], int(k), seq_len)
            for d, k in zip(*blend(weights, first, first + local))
        ]
        self.tokens_consumed += batch * seq_len
        return {
            key: torch.from_numpy(np.stack([r[i] for r in rows]))
            for i, key in enumerate(("input_ids", "labels", "position_ids"))
        }

    def _sample(self, name: str, k: int, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sample k of dataset `name`'s stream in the current stage."""
        epoch, i = self._locate(name, k, seq_len)
        pieces: Pieces = self._epoch(name, epoch, seq_len).pieces(i)
        return assemble(pieces, self.sources[name].read, seq_len, self.pad_token_id)

    def _locate(self, name: str, k: int, seq_len: int) -> tuple[int, int]:
        if self.packing == "concat":  # every epoch holds the same number of samples
            per_epoch = self._epoch(name, 0, seq_len).num_samples
            return k // per_epoch, k % per_epoch
        sizes = self._epoch_sizes.setdefault((name, self.stage, seq_len), [])
        epoch = 0
        while True:
            if epoch == len(sizes):
                sizes.append(self._epoch(name, epoch, seq_len).num_samples)
            if k < sizes[epoch]:
                return epoch, k
            k -= sizes[epoch]
            epoch += 1

    def _epoch(self, name: str, epoch: int, seq_len: int) -> EpochIndex:
        key = (name, self.stage, seq_len, epoch)
        if key in self._epochs:
            self._epochs.move_to_end(key)
            return self._epochs[key]
        src = self.sources[name]
        params = {
            "v": INDEX_VERSION,
            "packing": self.packing,
            "data": src.digest,
            "seq_len": seq_len,
            "seed": self.seed,
            "stage": self.stage,
            "name": name,
            "epoch": epoch,
        }
        label = re.sub(r"[^\w.-]", "_", name)
        path = (
            src.cache_dir
            / f"{label}-{self.packing}-s{self.stage}-L{seq_len}-e{epoch}-{cache_key(params)}.npy"
        )
        rng = np.random.default_rng([self.seed, self.stage, zlib.crc32(name.encode()), epoch])
        try:
            flat = cached_array(path, lambda: build_epoch(self.packing, src.lengths, seq_len, rng))
        except ValueError as e:
            raise type(e)(f"dataset {name!r}: {e}") from None
        index = self._epochs[key] = EpochIndex(flat, self.packing, seq_len)
        if len(self._epochs) > 4 * len(self.sources):
            self._epochs.popitem(last=False)
        return index
