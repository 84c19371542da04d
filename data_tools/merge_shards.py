"""`exaone-data merge`: the N shards of one sharded `exaone-data tokenize` run joined into the very
`.bin/.idx` bytes one unsharded run writes (Megatron-LM's tools/merge_datasets.py does the same
job for its own shards), after checking that they are one whole, finished set."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

from data_tools.shards import ShardError
from data_tools.tokenize_corpus import (
    MAX_BAD_EXAMPLES,
    STAT_KEYS,
    check_new_output,
    log_written,
    max_id,
)
from megatron_exaone.data.indexed import IndexedDataset, merge_datasets, read_stats, stats_path
from megatron_exaone.files import write_json_atomic


def merge_shards(
    shard_prefixes: Sequence[str | os.PathLike],
    output_prefix: str | os.PathLike,
    overwrite: bool = False,
) -> dict:
    """Concatenate all N shards of one `tokenize --num-shards N` run, given in shard order, into
    `output_prefix`: byte for byte the `.bin/.idx` one unsharded run writes, and the summed stats.
    Returns the stats."""
    started = time.time()
    shards = [Path(p) for p in shard_prefixes]
    stats = [_finished_shard(p) for p in shards]
    _check_one_set(shards, stats)
    prefix = Path(output_prefix)
    check_new_output(prefix, overwrite)
    merge_datasets(shards, prefix)
    # an unsharded run's keys in its order; those that all shards share were checked equal
    merged = dict(stats[0])
    del merged["shard"], merged["workers"]
    merged.update(
        {k: sum(s[k] for s in stats) for k in (*STAT_KEYS, "text_tokens")},
        prefix=str(prefix),
        max_id=max_id(stats),
        bad_line_examples=[e for s in stats for e in s["bad_line_examples"]][:MAX_BAD_EXAMPLES],
        seconds=round(time.time() - started, 3),
        merged_from=[str(p) for p in shards],
    )
    merged["bytes_per_token"] = merged["bytes"] / max(merged["text_tokens"], 1)
    write_json_atomic(stats_path(prefix), merged)
    log_written(merged)
    return merged


def _finished_shard(prefix: Path) -> dict:
    """The stats of a finished shard, checked against its data."""
    stats = read_stats(prefix)
    if not stats:
        parts = prefix.with_name(prefix.name + ".parts")
        state = f"unfinished ({parts} holds its progress)" if parts.is_dir() else "not found"
        raise ShardError(
            f"{prefix}: shard {state}; run (or rerun) its `exaone-data tokenize --num-shards N "
            "--shard-index I` to the end before merging"
        )
    if "shard" not in stats:
        raise ShardError(
            f"{prefix} is not a shard ({stats_path(prefix).name} records no shard index): merge "
            "joins the outputs of `exaone-data tokenize --num-shards N`"
        )
    tokens = IndexedDataset(prefix).num_tokens
    if tokens != stats["tokens"]:
        raise ShardError(
            f"{prefix}: the .bin holds {tokens} tokens but its stats.json records "
            f"{stats['tokens']}; they come from different runs: tokenize the shard again with "
            "--overwrite"
        )
    return stats


def _set_of(stats: dict) -> dict:
    """What the shards of one run share."""
    return {
        "inputs": stats["inputs"],
        "tokenizer": stats["tokenizer"]["sha256"],
        "end-of-document id": stats["tokenizer"]["eod_id"],
        "text field": stats["text_field"],
        "dtype": stats["dtype"],
        "number of shards": stats["shard"]["count"],
    }


def _check_one_set(shards: list[Path], stats: list[dict]) -> None:
    """All shards come from one run and are all there, in order: shard i at position i."""
    first = _set_of(stats[0])
    for prefix, other in zip(shards[1:], stats[1:]):
        differs = [key for key, value in _set_of(other).items() if value != first[key]]
        if differs:
            raise ShardError(
                f"{prefix} and {shards[0]} are shards of different runs (different "
                f"{', '.join(differs)}); merge the shards of one `exaone-data tokenize "
                "--num-shards N` command"
            )
    count, order = first["number of shards"], [s["shard"]["index"] for s in stats]
    if order == list(range(count)):
        return
    missing = sorted(set(range(count)) - set(order))
    if missing:
        indices = _id_ranges(missing)
        raise ShardError(
            f"shard(s) {indices} of {count} are not among the shards given: the merge needs all "
            f"{count}, in order; tokenize the missing ones (--num-shards {count} --shard-index I, "
            f"or sbatch --array={indices}) or name them"
        )
    raise ShardError(
        f"shards given in the order {', '.join(map(str, order))}: give each of the {count} "
        f"shards once, in order 0..{count - 1}"
    )


def _id_ranges(ids: list[int]) -> str:
    """Sorted ids as sbatch --array writes them: [0, 1, 2, 5] -> "0-2,5"."""
    runs: list[list[int]] = []
    for i in ids:
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
