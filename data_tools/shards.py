"""Which records a shard of a sharded `exaone-data tokenize` reads.

Shard i of N reads the records whose first byte lies in [i*T/N, (i+1)*T/N) of the inputs
concatenated in their resolved order (T bytes in all); files that can only be read from their start
(compressed JSON lines, Parquet, saved datasets) go whole to the shard holding their first byte.
The index comes from --shard-index or a Slurm array task's id.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from data_tools.progress import human_bytes
from data_tools.readers import (
    COMPRESSED_SUFFIXES,
    InputFile,
    Record,
    iter_records,
    jsonl_range_records,
    line_number_at,
)
from megatron_exaone.errors import UserError

log = logging.getLogger("exaone_data")
ARRAY_TASK = "SLURM_ARRAY_TASK_ID"


class ShardError(UserError, ValueError):
    """A shard that --num-shards and --shard-index do not name, or shards to merge that are not
    one whole set."""


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count`: the records whose first byte is in its byte range of the inputs."""

    index: int
    count: int

    def byte_range(self, total: int) -> tuple[int, int]:
        """[start, end) of `total` bytes: the index-th of `count` equal ranges."""
        return self.index * total // self.count, (self.index + 1) * total // self.count

    def prefix(self, base: str | os.PathLike) -> Path:
        """The shard's own dataset, BASE-SSSSS-of-NNNNN (zero-padded: names sort in shard order)."""
        base = Path(base)
        return base.with_name(f"{base.name}-{self.index:05d}-of-{self.count:05d}")


def resolve_shard(
    num_shards: int | None, shard_index: int | None, env: Mapping[str, str] = os.environ
) -> Shard | None:
    """The shard a run tokenizes (`shard_index`, else the Slurm array task id); None: all input."""
    if num_shards is None:
        if shard_index is not None:
            raise ShardError("--shard-index needs --num-shards, the number of shards")
        return None
    if num_shards < 1:
        raise ShardError(f"--num-shards must be at least 1, not {num_shards}")
    if shard_index is None:
        shard_index = _array_task(num_shards, env)
    if not 0 <= shard_index < num_shards:
        raise ShardError(
            f"shard index {shard_index} is outside 0..{num_shards - 1} (--num-shards {num_shards})"
        )
    return Shard(shard_index, num_shards)


def _array_task(num_shards: int, env: Mapping[str, str]) -> int:
    """$SLURM_ARRAY_TASK_ID, after checking that the array's ids are shard indices."""
    last = num_shards - 1
    if ARRAY_TASK not in env:
        raise ShardError(
            f"--num-shards {num_shards} needs --shard-index I (0..{last}), or a Slurm array task "
            f"(sbatch --array=0-{last}) whose ${ARRAY_TASK} names the shard"
        )
    low = int(env.get("SLURM_ARRAY_TASK_MIN", 0))
    high = int(env.get("SLURM_ARRAY_TASK_MAX", last))
    # Task ids are used as shard indices as they are: an array numbered from 1 would skip shard 0
    # and fail at its last task, so every task of it stops here, before any work.
    if high > last:
        raise ShardError(
            f"this Slurm array's task ids run {low}..{high}, but the {num_shards} shards are "
            f"0..{last}, one per task id: submit it with --array=0-{last}"
        )
    if low > 0:  # a rerun of some shards (--array=3,7) is fine; say which ones it leaves out
        log.warning(
            "this Slurm array's task ids start at %d (SLURM_ARRAY_TASK_MIN): shards 0..%d are "
            "not in it; they must come from another run before `exaone-data merge`",
            low,
            low - 1,
        )
    return int(env[ARRAY_TASK])


def _splittable(inp: InputFile) -> bool:
    """Plain JSON lines can be read from any byte on; compressed files, Parquet and saved datasets
    only from their start."""
    return inp.kind == "jsonl" and not inp.path.name.lower().endswith(COMPRESSED_SUFFIXES)


class ShardInputs:
    """What one run reads: all of the inputs, or one shard of them."""

    def __init__(self, inputs: list[InputFile], shard: Shard | None) -> None:
        self.inputs, self.shard = inputs, shard
        self.total = sum(i.size for i in inputs)
        self.start, self.end = shard.byte_range(self.total) if shard else (0, self.total)
        # input index -> the bytes [lo, hi) of that file that are read
        self.ranges: dict[int, tuple[int, int]] = {}
        offset = 0
        for index, inp in enumerate(inputs):
            if shard is None:
                self.ranges[index] = (0, inp.size)
            elif _splittable(inp):
                lo, hi = max(self.start - offset, 0), min(self.end - offset, inp.size)
                if lo < hi:
                    self.ranges[index] = (lo, hi)
            elif self.start <= offset < self.end:
                self.ranges[index] = (0, inp.size)
            offset += inp.size
        self.size = sum(hi - lo for lo, hi in self.ranges.values())
        self._lines_before: dict[int, int] = {}

    def describe(self) -> str:
        what = f"{len(self.inputs)} input(s), {self.total / 1e6:.1f} MB"
        if self.shard is None:
            return what
        return (
            f"shard {self.shard.index} of {self.shard.count} (bytes {self.start}..{self.end}; "
            f"{human_bytes(self.size)} to read) of {what}"
        )

    def record(self) -> dict:
        """Which shard this is (of a sharded run), for its stats.json and `merge_shards`' checks."""
        return {
            "index": self.shard.index,
            "count": self.shard.count,
            "byte_range": [self.start, self.end],
            "input_bytes": self.total,
        }

    def records(
        self, text_field: str, split: str | None, on_progress: Callable[[int], None]
    ) -> Iterator[Record]:
        for index, (lo, hi) in self.ranges.items():
            inp = self.inputs[index]
            if (lo, hi) == (0, inp.size):
                whole = iter_records([inp], text_field, split, on_progress)
                yield from ((index, line, payload) for _, line, payload in whole)
            else:
                yield from jsonl_range_records(index, inp.path, lo, hi, on_progress)

    def where(self, source: int, line: int) -> str:
        """FILE:LINE of a record. A range that starts inside a file numbers its lines from there;
        the lines before it are counted only for a bad record (it reads the file up to there)."""
        path, lo = self.inputs[source].path, self.ranges[source][0]
        if lo and source not in self._lines_before:
            self._lines_before[source] = line_number_at(path, lo - 1)
        return f"{path}:{self._lines_before.get(source, 0) + line}"
