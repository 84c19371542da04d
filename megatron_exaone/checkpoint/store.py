"""Checkpoint directories written with torch.distributed.checkpoint (DCP): visible only once
complete, checksummed, read without unpickling anything but DCP's metadata classes, pruned by step
number.

Layout: ROOT/step_00000040/ (DCP files + meta.json), ROOT/latest (the name of the newest checkpoint
written, for people and tools). DCP writes into ROOT/.step_00000040.tmp, hashing each file as it
goes (`integrity`); rank 0 adds meta.json, renames the directory and rewrites `latest` only when
every rank's data and DCP's .metadata are on disk. Works in one process (no process group) and on
every rank of a job (all ranks call save; rank 0 alone touches directories and pointers).

meta.json lists every file with its size and XXH3-128 checksum (`files`). Choosing a checkpoint
(`checkpoint_candidates`) skips, with a warning, one whose files are missing or of another size;
loading one (`load_checkpoint`) verifies the digests while DCP reads, and a mismatch raises
`CorruptCheckpointError`, naming the file, so the caller can fall back to the previous checkpoint.
Checkpoints are ordered by their step number.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import os
import re
import shutil
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import SavePlanner

from megatron_exaone.errors import UserError
from megatron_exaone.files import write_text_atomic
from megatron_exaone.parallel.comm import all_gather_objects, barrier

from . import integrity

log = logging.getLogger(__name__)
LATEST = "latest"
META = "meta.json"
# meta.json key: file name (relative to the checkpoint) -> {"bytes": n, "xxh128": digest}
MANIFEST = "files"
# 2: per-file checksums in the manifest, no pickled entries (format 1 pickled the run state).
FORMAT = 2
_STEP_DIR = re.compile(r"step_(\d+)$")


class CorruptCheckpointError(UserError, ValueError):
    """A checkpoint whose files do not match the checksums recorded when it was written."""

    def __init__(self, checkpoint: Path, problems: list[str]) -> None:
        self.checkpoint = checkpoint
        self.problems = problems
        super().__init__(f"checkpoint {checkpoint}: {'; '.join(problems)}")


class CheckpointSaveError(UserError, OSError):
    """A checkpoint that could not be written (a full disk, a permission); earlier checkpoints are
    untouched."""


class NoUsableCheckpointError(UserError, FileNotFoundError):
    """Checkpoints are there but none of them can be used."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_dirs(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, directory) of every `step_N` directory under `root`, by step number."""
    root = Path(root)
    found = []
    for path in root.glob("step_*") if root.is_dir() else ():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def unusable_reason(path: str | os.PathLike) -> str | None:
    """Why checkpoint `path` cannot be used without reading its data (missing .metadata or
    meta.json, a format this version cannot load safely, a file of its manifest missing or of
    another size), or None."""
    path = Path(path)
    if not ((path / ".metadata").is_file() and (path / META).is_file()):
        return "it is incomplete (no .metadata or meta.json)"
    try:
        meta = read_meta(path)
    except (OSError, ValueError) as exc:
        return f"its {META} cannot be read ({exc})"
    if meta.get("format", 1) < FORMAT:
        return (
            "it was written by an earlier development version of megatron-exaone whose run state "
            "is pickled, which cannot be loaded safely"
        )
    for name, entry in (meta.get(MANIFEST) or {}).items():
        file = path / name
        if not file.is_file():
            return f"file {name} is missing"
        actual, size = file.stat().st_size, entry["bytes"]
        if actual != size:
            problem = "truncated" if actual < size else "the wrong size"
            return f"file {name} is {problem} ({actual} of {size} bytes)"
    return None


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    barrier()


# DCP warns on every save/load without a process group; one process is a supported mode here. Also
# process-wide, because async saves warn from their background thread.
_SINGLE_PROCESS_WARNING = ".*assuming the intent is to (save|load) in a single process.*"
warnings.filterwarnings("ignore", message=_SINGLE_PROCESS_WARNING)


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SINGLE_PROCESS_WARNING)
        yield


# ------------------------------------------------------------------------------------------- saving
def _check_tensors(state: dict[str, Any], prefix: str = "") -> None:
    """Only tensors are saved: DCP would pickle anything else, and loading a pickle can run code."""
    for key, value in state.items():
        if isinstance(value, dict):
            _check_tensors(value, f"{prefix}{key}.")
        elif not isinstance(value, torch.Tensor):
            raise TypeError(
                f"checkpoint entry {prefix}{key} is a {type(value).__name__}; save tensors only"
            )


def _prepare(root: str | os.PathLike, step: int, state: dict[str, Any]) -> tuple[Path, Path, Path]:
    """(root, final dir, temporary dir), the temporary dir emptied by rank 0 before any rank writes
    into it."""
    _check_tensors(state)
    root = Path(root)
    final = root / step_dir_name(step)
    tmp = root / f".{final.name}.tmp"
    if _rank_world()[0] == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    return root, final, tmp


def _manifest(directory: Path) -> dict[str, dict[str, Any]]:
    """Every file under `directory` (meta.json excepted) -> its size and digest: the data files'
    from the ranks' sidecars (hashed while written), the rest (DCP's .metadata) hashed here."""
    digests = integrity.collect_digests(directory)
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != META):
        name = path.relative_to(directory).as_posix()
        size, digest = digests.get(name) or integrity.file_digest(path)
        if size != path.stat().st_size:
            raise OSError(
                f"{path} changed after it was written ({path.stat().st_size} bytes, {size} hashed)"
            )
        files[name] = {"bytes": size, integrity.CHECKSUM: digest}
    return files


def _publish(
    root: Path,
    final: Path,
    tmp: Path,
    step: int,
    meta: dict[str, Any] | None,
    keep_last: int | None,
) -> None:
    """Rank 0, once the DCP files are complete: meta.json (with the manifest), rename, `latest`,
    retention. Every rank's files and digest sidecars are complete here: DCP's coordinator (rank 0)
    writes .metadata and returns only after every rank has reported its data files written (and
    fsynced); the same holds when an async save's future completes on rank 0."""
    record = {"step": step, **(meta or {}), "format": FORMAT, MANIFEST: _manifest(tmp)}
    write_text_atomic(tmp / META, json.dumps(record, indent=2) + "\n")
    # the same step written again (a resumed run passing it anew): the new one replaces it
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_text_atomic(root / LATEST, final.name + "\n")
    if keep_last:
        prune(root, step, keep_last)


def prune(root: Path, newest: int, keep_last: int) -> list[Path]:
    """Remove the checkpoints older than the `keep_last` newest usable ones up to step `newest` (the
    one just written). Checkpoints of later steps are never removed (a run that resumed from an
    earlier checkpoint replaces them as it passes their steps); unusable ones do not count towards
    `keep_last`. Returns what was removed."""
    kept, removed = 0, []
    for step, path in reversed(checkpoint_dirs(root)):
        if step > newest:
            continue
        if kept >= keep_last:
            shutil.rmtree(path)
            removed.append(path)
        elif unusable_reason(path) is None:
            kept += 1
    return removed


def _failed_save(
    tmp: Path, step: int, exc: BaseException, writer: integrity.HashingWriter | None
) -> UserError:
    """Remove what a failed save wrote (rank 0, once every rank has stopped writing) and explain the
    failure."""
    _barrier()
    if _rank_world()[0] == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    cause = writer.fs.write_errors[0] if writer is not None and writer.fs.write_errors else exc
    free = shutil.disk_usage(tmp.parent).free if tmp.parent.exists() else 0
    full = getattr(cause, "errno", None) == errno.ENOSPC or "No space left" in str(cause)
    what = "no space left on the device" if full else str(cause).splitlines()[0]
    return CheckpointSaveError(
        f"could not write the checkpoint of step {step} to {tmp.parent}: {what} "
        f"({free / 2**30:.1f} GiB free there). Earlier checkpoints are intact; free space "
        "(or lower checkpoint.keep_last) and relaunch to resume from the newest one."
    )


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    state: dict[str, Any],
    meta: dict[str, Any] | None = None,
    keep_last: int | None = None,
    planner: SavePlanner | None = None,
    file_per_tensor: bool = False,
) -> Path:
    """Save `state` (a DCP state dict of tensors) as ROOT/step_N; older checkpoints beyond
    `keep_last` are removed. Collective under torch.distributed: returns on every rank once the
    checkpoint is visible. `planner`: DCP's default unless given (the HF importer's builds tensors
    as they are written). `file_per_tensor`: one file per tensor instead of one per rank; DCP keeps
    every tensor of a file alive until the file is closed. A failed save removes its partial files
    and raises `CheckpointSaveError` on every rank."""
    root, final, tmp = _prepare(root, step, state)
    writer = integrity.HashingWriter(str(tmp), single_file_per_rank=not file_per_tensor)
    try:
        with _quiet():
            dcp.save(state, storage_writer=writer, planner=planner)
        if _rank_world()[0] == 0:
            _publish(root, final, tmp, step, meta, keep_last)
    # DCP's wrapper of the ranks' errors is a BaseException
    except (Exception, CheckpointException) as exc:
        raise _failed_save(tmp, step, exc, writer) from exc
    _barrier()
    return final


_PENDING: PendingCheckpoint | None = None


class PendingCheckpoint:
    """An async save in flight. Rank 0 publishes the checkpoint (meta.json, rename, `latest`) as
    soon as DCP has written everything; `wait()` (collective) returns the checkpoint directory once
    it is visible on every rank."""

    def __init__(
        self,
        future: Future,
        final: Path,
        tmp: Path,
        step: int,
        publish: Callable[[], None],
        writer: integrity.HashingWriter,
    ) -> None:
        self.path = final
        self._future = future
        self._tmp, self._step, self._writer = tmp, step, writer
        self._published = threading.Event()
        self._error: BaseException | None = None
        self._waited = False
        if _rank_world()[0] == 0:

            def on_done(done: Future) -> None:
                try:
                    if done.exception() is None:
                        publish()
                except BaseException as exc:  # noqa: BLE001 - re-raised by wait()
                    self._error = exc
                finally:
                    self._published.set()

            future.add_done_callback(on_done)
        else:
            self._published.set()

    def done(self) -> bool:
        return self._future.done() and self._published.is_set()

    def wait(self) -> Path:
        global _PENDING
        if not self._waited:
            self._waited = True
            try:
                self._future.result()
                self._published.wait()
                if self._error is not None:
                    raise self._error
            except (Exception, CheckpointException) as exc:  # as in save_checkpoint
                raise _failed_save(self._tmp, self._step, exc, self._writer) from exc
            finally:
                if _PENDING is self:
                    _PENDING = None
            _barrier()
        return self.path


def async_save_checkpoint(
    root: str | os.PathLike,
    step: int,
    state: dict[str, Any],
    meta: dict[str, Any] | None = None,
    keep_last: int | None = None,
    group: dist.ProcessGroup | None = None,
) -> PendingCheckpoint:
    """Like `save_checkpoint`, but returns once `state` is copied to memory (`dcp.async_save`); the
    files are written by a background thread, whose collectives run on `group` (all ranks, gloo:
    `ParallelMesh.background_group`) so they never interleave with the training's. A previous
    pending save is waited for first. Collective."""
    global _PENDING
    if _PENDING is not None:
        _PENDING.wait()
    root, final, tmp = _prepare(root, step, state)
    if group is None and _rank_world()[1] > 1:
        raise ValueError(
            "an asynchronous save of several ranks needs a background process group (group=...)"
        )
    writer = integrity.HashingWriter(str(tmp))
    with _quiet():
        result = dcp.async_save(
            state, storage_writer=writer, process_group=group, no_dist=group is None
        )
    future = getattr(result, "upload_completion", result)
    publish = functools.partial(_publish, root, final, tmp, step, meta, keep_last)
    _PENDING = PendingCheckpoint(future, final, tmp, step, publish, writer)
    return _PENDING


def wait_pending() -> Path | None:
    """Wait for the async save in flight, if any (collective); its directory once visible, else
    None."""
    return _PENDING.wait() if _PENDING is not None else None


# ----------------------------------------------------------------------------------------- choosing
def is_checkpoint(path: str | os.PathLike) -> bool:
    """Is `path` one checkpoint (rather than a folder of them)?"""
    path = Path(path)
    return (path / META).is_file() or (path / ".metadata").is_file()


def checkpoint_candidates(path: str | os.PathLike) -> list[Path]:
    """The usable checkpoints at `path`, newest first: `path` itself if it is one checkpoint, else
    the `step_N` directories under it by step number, skipping (with a warning) incomplete,
    truncated or unloadable ones."""
    path = Path(path)
    if is_checkpoint(path):
        problem = unusable_reason(path)
        if problem is not None:
            log.warning("cannot use checkpoint %s: %s", path, problem)
            return []
        return [path]
    usable = []
    for _step, candidate in reversed(checkpoint_dirs(path)):
        problem = unusable_reason(candidate)
        if problem is None:
            usable.append(candidate)
        elif not usable:
            log.warning(
                "skipping checkpoint %s: %s; using the previous complete checkpoint instead",
                candidate,
                problem,
            )
    if not usable and checkpoint_dirs(path):
        log.warning(
            "no complete checkpoint under %s (%d incomplete one(s) skipped)",
            path,
            len(checkpoint_dirs(path)),
        )
    return usable


def find_checkpoint(path: str | os.PathLike) -> Path | None:
    """The newest usable checkpoint at `path` (see `checkpoint_candidates`), or None. Sizes are
    checked, not the checksums: those are verified as the checkpoint loads."""
    candidates = checkpoint_candidates(path)
    return candidates[0] if candidates else None


def read_meta(checkpoint: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(checkpoint) / META).read_text())


def dcp_metadata(checkpoint: str | os.PathLike) -> Metadata:
    """DCP's metadata of a checkpoint, through the safe reader. A .metadata that cannot be read and
    no longer matches its checksum is a damaged file (`CorruptCheckpointError`: the caller may fall
    back); one that matches what was written is refused as it is (`UntrustedCheckpointError`)."""
    checkpoint = Path(checkpoint)
    try:
        return integrity.read_metadata(checkpoint)
    except integrity.UntrustedCheckpointError:
        entry = (read_meta(checkpoint).get(MANIFEST) or {}).get(integrity.METADATA_FILE)
        problem = entry and integrity.check_file(checkpoint, integrity.METADATA_FILE, entry)
        if problem:
            raise CorruptCheckpointError(checkpoint, [problem]) from None
        raise


def saved_tensors(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """The entries stored in a checkpoint (name -> DCP TensorStorageMetadata: size, dtype), read
    from its .metadata with the safe reader, no tensor data."""
    return dict(dcp_metadata(checkpoint).state_dict_metadata)


# ------------------------------------------------------------------------------------------ loading
def checksum_problems(checkpoint: str | os.PathLike, share: int = 0, shares: int = 1) -> list[str]:
    """What does not match meta.json's manifest in share `share` of `shares` of the checkpoint's
    files (default: all of them), checked in threads."""
    checkpoint = Path(checkpoint)
    manifest = read_meta(checkpoint).get(MANIFEST) or {}
    extra = sorted(
        p.name
        for p in checkpoint.iterdir()
        if p.is_file() and p.name not in manifest and p.name != META
    )
    problems = [f"file {name} is not in the manifest" for name in extra if share == 0]
    return problems + integrity.Verification(checkpoint, manifest, share, shares).result()


def read_tensors(
    checkpoint: str | os.PathLike, state: dict[str, Any], metadata: Metadata | None = None
) -> None:
    """Load into `state` in place, without checking the checksums (callers that verify once for many
    reads, as the streaming converter does). Collective under torch.distributed."""
    metadata = metadata if metadata is not None else dcp_metadata(checkpoint)
    with _quiet():
        dcp.load(state, storage_reader=integrity.SafeReader(checkpoint, metadata))


def load_checkpoint(checkpoint: str | os.PathLike, state: dict[str, Any]) -> None:
    """Load into `state` in place (DCP reshards to whatever layout `state` has), verifying the
    checkpoint's checksums meanwhile: each rank checks a share of the files in background threads.
    Collective. Raises `CorruptCheckpointError` on every rank when any file does not match."""
    checkpoint = Path(checkpoint)
    rank, world = _rank_world()
    metadata = dcp_metadata(checkpoint)
    checking = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-check")
    problems_here = checking.submit(checksum_problems, checkpoint, rank, world)
    error: BaseException | None = None
    try:
        read_tensors(checkpoint, state, metadata)
    # a damaged file can fail the load itself: checksums say which
    except (Exception, CheckpointException) as exc:
        error = exc
    finally:
        checking.shutdown()
    problems = [p for share in all_gather_objects(problems_here.result()) for p in share]
    if problems:
        raise CorruptCheckpointError(checkpoint, problems)
    if error is not None:
        raise error
