"""`exaone-data tokenize`: documents -> Megatron `.bin/.idx`, in parallel, resumably.

The main process reads raw records and hands byte-sized batches to worker processes, which parse and
encode them; results come back in order and are written into parts of `docs_per_shard` records each
under `PREFIX.parts/`. A part takes its final name only when complete, so an interrupted run resumes
by skipping finished parts. At the end the parts become `PREFIX.bin/.idx` (a Megatron data-path
prefix) and `PREFIX.stats.json`. Batch and part boundaries depend on the input only, so the output
is byte-identical for any number of workers.

At cluster scale the work splits into shards (`--num-shards N`, one Slurm array task each): shard i
reads the records whose first byte lies in [i*T/N, (i+1)*T/N) of the inputs concatenated in their
resolved order (T bytes in all); files that can only be read from their start (compressed JSONL,
Parquet, saved datasets) go whole to the shard holding their first byte. Each shard is a dataset
of its own, BASE-SSSSS-of-NNNNN, and `merge_shards` concatenates all N into the very bytes a single
run writes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

from data_tools.encode_worker import (
    EncodedBatch,
    EncodeSettings,
    encode_records,
    init_pool_worker,
    init_worker,
)
from data_tools.progress import ByteProgress, byte_progress
from data_tools.readers import (
    Record,
    resolve_inputs,
)
from data_tools.shards import ShardInputs, resolve_shard
from megatron_exaone.data.indexed import (
    IndexedDatasetWriter,
    dataset_paths,
    merge_datasets,
    optimal_dtype,
    stats_path,
)
from megatron_exaone.data.tokenizer import (
    file_sha256,
    load_tokenizer,
    resolve_eod,
    tokenizer_json_path,
)
from megatron_exaone.errors import UserError
from megatron_exaone.files import write_json_atomic

log = logging.getLogger("exaone_data")
# the CPUs this process may use: a Slurm job's allocation, not the whole node
CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
STAT_KEYS = ("records", "documents", "tokens", "bytes", "empty_documents", "bad_lines")
MAX_BAD_EXAMPLES = 20
ARRAY_TASK = "SLURM_ARRAY_TASK_ID"


class BadInputError(UserError, ValueError):
    """An input record that cannot be tokenized, with --on-bad-line fail."""


@dataclass
class TokenizeConfig:
    inputs: Sequence[str | os.PathLike]
    tokenizer: str | os.PathLike
    output_prefix: str | os.PathLike
    workers: int = CPUS
    text_field: str = "text"
    split: str | None = None  # split of a saved DatasetDict
    append_eod: bool = True
    eod_token: str | None = None
    on_bad_line: str = "fail"  # or "skip"
    docs_per_shard: int = 100_000  # records per resumable part
    batch_bytes: int = 1 << 20  # input bytes per worker task
    split_chars: int = 16_384  # longer documents are cut at safe points (pieces encode in parallel)
    overwrite: bool = False
    show_progress: bool = True
    num_shards: int | None = None  # None: tokenize everything into output_prefix itself
    shard_index: int | None = None  # None: $SLURM_ARRAY_TASK_ID


class _InlineExecutor:
    """The executor interface, run in this process (workers=1)."""

    def submit(self, fn, *args) -> Future:
        fut: Future = Future()
        try:
            fut.set_result(fn(*args))
        except Exception as e:  # delivered through .result(), as a process pool would
            fut.set_exception(e)
        return fut

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


def _batches(
    records: Iterator[Record], docs_per_part: int, batch_bytes: int
) -> Iterator[tuple[int, list, bool]]:
    """(part, records, last batch of its part): batches cut by size and at every part boundary."""
    part = in_part = size = 0
    batch: list[Record] = []
    for rec in records:
        batch.append(rec)
        in_part += 1
        size += len(rec[2] or "")
        if in_part == docs_per_part:
            yield part, batch, True
            part, in_part, size, batch = part + 1, 0, 0, []
        elif size >= batch_bytes:
            yield part, batch, False
            size, batch = 0, []
    if in_part:
        yield part, batch, True


class _Parts:
    """The resumable work directory PREFIX.parts/: finished parts, their stats, and the settings
    they were made with."""

    def __init__(self, prefix: Path, manifest: dict) -> None:
        self.dir = prefix.with_name(prefix.name + ".parts")
        path = self.dir / "manifest.json"
        if path.is_file():
            old = json.loads(path.read_text())
            changed = sorted(
                k for k in manifest.keys() | old.keys() if manifest.get(k) != old.get(k)
            )
            if changed:
                raise ValueError(
                    f"{self.dir} holds an unfinished run with different settings "
                    f"({', '.join(changed)}); rerun with the same settings to resume it, or delete "
                    "the directory to start over"
                )
        else:
            self.dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, manifest)

    def prefix(self, part: int) -> Path:
        return self.dir / f"part-{part:05d}"

    def stats(self, part: int) -> dict | None:
        path = self.prefix(part).with_suffix(".json")
        return json.loads(path.read_text()) if path.is_file() else None

    def finished(self) -> list[int]:
        """Parts whose stats file exists (written last) and whose data files are still there."""
        done = (int(p.stem.split("-")[1]) for p in self.dir.glob("part-*.json"))
        return sorted(p for p in done if all(f.is_file() for f in dataset_paths(self.prefix(p))))


class _PartWriter:
    """Accumulates the batches of one part; `finish` makes it visible (data first, its stats file
    last)."""

    def __init__(self, parts: _Parts, part: int, dtype) -> None:
        self.parts, self.part = parts, part
        self.writer = IndexedDatasetWriter(parts.prefix(part), dtype)
        self.stats = dict.fromkeys(STAT_KEYS, 0)
        # the largest token id written (-1: none), so a loader can check its vocabulary early
        self.max_id = -1
        self.bad_examples: list[str] = []

    def add(self, result: EncodedBatch, records: int) -> None:
        self.writer.add_documents(result.tokens, result.lengths)
        for key, value in (
            ("records", records),
            ("documents", len(result.lengths)),
            ("tokens", len(result.tokens)),
            ("bytes", result.text_bytes),
            ("empty_documents", result.empty),
            ("bad_lines", len(result.bad)),
        ):
            self.stats[key] += value
        if len(result.tokens):
            self.max_id = max(self.max_id, int(result.tokens.max()))

    def finish(self) -> None:
        self.writer.finish()
        write_json_atomic(
            self.parts.prefix(self.part).with_suffix(".json"),
            dict(self.stats, max_id=self.max_id, bad_examples=self.bad_examples),
        )


def _input_manifest(
    reader: ShardInputs, tokenizer: Path, cfg: TokenizeConfig, eod_id: int | None, dtype
) -> dict:
    shard = reader.shard
    return {
        "inputs": [
            {"path": str(i.path.resolve()), "size": i.size, "mtime_ns": i.path.stat().st_mtime_ns}
            for i in reader.inputs
        ],
        "shard": [shard.index, shard.count] if shard else None,
        "tokenizer_sha256": file_sha256(tokenizer),
        "text_field": cfg.text_field,
        "split": cfg.split,
        "eod_id": eod_id,
        "docs_per_shard": cfg.docs_per_shard,
        "dtype": str(dtype),
    }


def tokenize(cfg: TokenizeConfig) -> dict:
    """Tokenize `cfg.inputs`, or one shard of them, into PREFIX.bin/.idx + PREFIX.stats.json (a
    shard's PREFIX is `Shard.prefix` of `cfg.output_prefix`); returns the stats."""
    shard = resolve_shard(cfg.num_shards, cfg.shard_index)
    if cfg.on_bad_line not in ("skip", "fail"):
        raise ValueError(f"--on-bad-line must be skip or fail, not {cfg.on_bad_line!r}")
    if cfg.workers < 1 or cfg.docs_per_shard < 1:
        raise ValueError("--workers and --docs-per-shard must be at least 1")
    started = time.time()
    reader = ShardInputs(resolve_inputs(cfg.inputs), shard)
    tok_path = tokenizer_json_path(cfg.tokenizer)
    tokenizer = load_tokenizer(tok_path)
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    dtype = optimal_dtype(vocab_size)
    eod_token, eod_id = (
        resolve_eod(tok_path, tokenizer, cfg.eod_token) if cfg.append_eod else (None, None)
    )
    prefix = shard.prefix(cfg.output_prefix) if shard else Path(cfg.output_prefix)
    check_new_output(prefix, cfg.overwrite)
    parts = _Parts(prefix, _input_manifest(reader, tok_path, cfg, eod_id, dtype))
    done = set(parts.finished())
    log.info(
        "tokenizing %s with %d worker(s): %s (vocab %d -> %s), end-of-document %s",
        reader.describe(),
        cfg.workers,
        tok_path,
        vocab_size,
        dtype,
        f"{eod_token!r} (id {eod_id})" if cfg.append_eod else "not appended",
    )
    if done:
        log.info("resuming: %d finished part(s) in %s are kept", len(done), parts.dir)

    settings = EncodeSettings(
        str(tok_path),
        cfg.text_field,
        eod_id,
        str(dtype),
        cfg.split_chars,
        threads=0 if cfg.workers == 1 else max(1, CPUS // cfg.workers),
    )
    _encode_parts(cfg, settings, reader, parts, done, dtype)
    return _finalize(
        parts, prefix, reader, tok_path, eod_token, eod_id, dtype, vocab_size, cfg, started
    )


def check_new_output(prefix: Path, overwrite: bool) -> None:
    out_bin, out_idx = dataset_paths(prefix)
    if (out_bin.exists() or out_idx.exists()) and not overwrite:
        raise FileExistsError(
            f"{out_bin} / {out_idx} already exist; pass --overwrite to replace them"
        )


def _encode_parts(
    cfg: TokenizeConfig,
    settings: EncodeSettings,
    reader: ShardInputs,
    parts: _Parts,
    done: set[int],
    dtype,
) -> None:
    """Feed batches of unfinished parts to the workers and write their results in input order."""
    if cfg.workers == 1:
        init_worker(settings)
        executor = _InlineExecutor()
    else:
        # Workers die with this process, even when it is killed (they are started by submit() in
        # this thread).
        executor = ProcessPoolExecutor(
            cfg.workers,
            mp_context=get_context("spawn"),
            initializer=init_pool_worker,
            initargs=(os.getpid(), settings),
        )
    bar = byte_progress(log, "tokenize", reader.size, cfg.show_progress)
    open_parts: dict[int, _PartWriter] = {}
    pending: deque[tuple[int, int, bool, Future]] = deque()
    try:
        records = reader.records(cfg.text_field, cfg.split, on_progress=bar.update)
        for part, batch, last in _batches(records, cfg.docs_per_shard, cfg.batch_bytes):
            if part in done:
                continue
            pending.append((part, len(batch), last, executor.submit(encode_records, batch)))
            # Write what is ready at once (an interruption then loses little); wait only when too
            # much is queued.
            while pending and (pending[0][3].done() or len(pending) > 2 * cfg.workers):
                _collect(pending.popleft(), open_parts, parts, reader, cfg, dtype, bar)
        while pending:
            _collect(pending.popleft(), open_parts, parts, reader, cfg, dtype, bar)
    except BaseException:
        for writer in open_parts.values():
            writer.writer.abort()
        executor.shutdown(wait=False, cancel_futures=True)
        log.info(
            "stopped; %d finished part(s) stay in %s: rerun the same command to resume",
            len(parts.finished()),
            parts.dir,
        )
        raise
    finally:
        bar.close()
    executor.shutdown()


def _collect(
    item: tuple[int, int, bool, Future],
    open_parts: dict[int, _PartWriter],
    parts: _Parts,
    reader: ShardInputs,
    cfg: TokenizeConfig,
    dtype,
    bar: ByteProgress,
) -> None:
    part, records, last, future = item
    result: EncodedBatch = future.result()
    writer = open_parts.get(part) or open_parts.setdefault(part, _PartWriter(parts, part, dtype))
    for source, line, problem in result.bad:
        where = reader.where(source, line)
        if cfg.on_bad_line == "fail":
            raise BadInputError(
                f"{where}: {problem}; fix the input or pass --on-bad-line skip to skip such lines"
            )
        if len(writer.bad_examples) < MAX_BAD_EXAMPLES:
            log.warning("%s: skipped: %s", where, problem)
            writer.bad_examples.append(f"{where}: {problem}")
    writer.add(result, records)
    bar.set_postfix(docs=writer.stats["documents"], part=part, refresh=False)
    if last:
        open_parts.pop(part).finish()


def _finalize(
    parts: _Parts,
    prefix: Path,
    reader: ShardInputs,
    tok_path: Path,
    eod_token: str | None,
    eod_id: int | None,
    dtype,
    vocab_size: int,
    cfg: TokenizeConfig,
    started: float,
) -> dict:
    finished = parts.finished()
    if finished != list(range(len(finished))):
        raise RuntimeError(
            f"{parts.dir}: parts {finished} are not consecutive; delete the directory and rerun"
        )
    part_stats = [parts.stats(p) for p in finished]
    totals = {k: sum(s[k] for s in part_stats) for k in STAT_KEYS}
    if not finished:
        log.warning("no documents in %s; writing an empty dataset", reader.describe())
        IndexedDatasetWriter(prefix, dtype).finish()
    elif len(finished) == 1:  # nothing to concatenate: the part becomes the output
        for src, dst in zip(dataset_paths(parts.prefix(0)), dataset_paths(prefix)):
            os.replace(src, dst)
    else:
        merge_datasets([parts.prefix(p) for p in finished], prefix)
    # every document but the empty ones ends with the end-of-document token
    ends = totals["documents"] - totals["empty_documents"] if eod_id is not None else 0
    text_tokens = totals["tokens"] - ends
    stats = {
        "format": "megatron-mmidx-v1",
        "prefix": str(prefix),
        "dtype": str(dtype),
        "vocab_size": vocab_size,
        "max_id": max_id(part_stats),
        **totals,
        "text_tokens": text_tokens,
        "bytes_per_token": totals["bytes"] / max(text_tokens, 1),
        "bad_line_examples": [e for s in part_stats for e in s["bad_examples"]][:MAX_BAD_EXAMPLES],
        "tokenizer": {
            "path": str(tok_path.resolve()),
            "sha256": file_sha256(tok_path),
            "eod_token": eod_token,
            "eod_id": eod_id,
        },
        "text_field": cfg.text_field,
        "inputs": [{"path": str(i.path), "size": i.size} for i in reader.inputs],
        **({"shard": reader.record()} if reader.shard else {}),
        "workers": cfg.workers,
        "seconds": round(time.time() - started, 3),
    }
    write_json_atomic(stats_path(prefix), stats)
    shutil.rmtree(parts.dir)
    log_written(stats)
    return stats


def log_written(stats: dict) -> None:
    log.info(
        "wrote %s.{bin,idx}: %d documents, %d tokens, %.2f bytes/token, %d bad line(s) skipped, "
        "%.1f s",
        stats["prefix"],
        stats["documents"],
        stats["tokens"],
        stats["bytes_per_token"],
        stats["bad_lines"],
        stats["seconds"],
    )


def max_id(part_stats: list[dict]) -> int | None:
    """The largest token id over all parts; None when a part (from an older version of this tool)
    lacks it."""
    ids = [s.get("max_id") for s in part_stats]
    return None if None in ids else max(ids, default=-1)
