"""Checkpoint directories written with torch.distributed.checkpoint (DCP), visible only once complete.

Layout: ROOT/step_00000040/ (DCP files + meta.json), ROOT/latest (the name of the newest complete checkpoint,
written last and atomically). DCP writes into ROOT/.step_00000040.tmp; rank 0 adds meta.json, renames it and
rewrites `latest` only when every rank's data and DCP's .metadata are on disk. Works in one process (no process
group) and on every rank of a job (all ranks call save; rank 0 alone touches directories and pointers).

meta.json lists every file of the checkpoint with its size (`files`); `find_checkpoint` skips a checkpoint whose
files are missing or have another size (a copy cut short, a full disk, a damaged file system) and falls back to
the previous complete one. Checkpoints written before the manifest existed are accepted as they are.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.planner import SavePlanner

log = logging.getLogger(__name__)
LATEST = "latest"
META = "meta.json"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


MANIFEST = "files"  # the meta.json key of the manifest: file name (relative to the checkpoint) -> size in bytes


def is_complete(path: Path) -> bool:
    return (path / ".metadata").is_file() and (path / META).is_file()


def _manifest(directory: Path) -> dict[str, int]:
    """Every file under `directory` (meta.json excepted) -> its size in bytes."""
    return {p.relative_to(directory).as_posix(): p.stat().st_size for p in sorted(directory.rglob("*"))
            if p.is_file() and p != directory / META}


def verify(path: str | os.PathLike) -> str | None:
    """Why checkpoint `path` cannot be used (missing .metadata / meta.json, a file of its manifest missing or of
    another size), or None when it is complete. A checkpoint without a manifest (older ones) is checked for
    .metadata and meta.json only."""
    path = Path(path)
    if not is_complete(path):
        return "it is incomplete (no .metadata or meta.json)"
    try:
        files = read_meta(path).get(MANIFEST)
    except (OSError, ValueError) as exc:
        return f"its {META} cannot be read ({exc})"
    for name, size in (files or {}).items():
        file = path / name
        if not file.is_file():
            return f"file {name} is missing"
        actual = file.stat().st_size
        if actual != size:
            return f"file {name} is {'truncated' if actual < size else 'the wrong size'} ({actual} of {size} bytes)"
    return None


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if _rank_world()[1] > 1:
        dist.barrier()


# DCP warns on every save/load without a process group; one process is a supported mode here. Also process-wide,
# because async saves warn from their background thread.
_SINGLE_PROCESS_WARNING = ".*assuming the intent is to (save|load) in a single process.*"
warnings.filterwarnings("ignore", message=_SINGLE_PROCESS_WARNING)


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SINGLE_PROCESS_WARNING)
        yield


def _prepare(root: str | os.PathLike, step: int) -> tuple[Path, Path, Path]:
    """(root, final dir, temporary dir), the temporary dir emptied by rank 0 before any rank writes into it."""
    root = Path(root)
    final = root / step_dir_name(step)
    tmp = root / f".{final.name}.tmp"
    if _rank_world()[0] == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    return root, final, tmp


def _publish(root: Path, final: Path, tmp: Path, step: int, meta: dict[str, Any] | None,
             keep_last: int | None) -> None:
    """Rank 0, once the DCP files are complete: meta.json (with the manifest of the files), rename, `latest`,
    retention. Every rank's files are complete here: DCP's coordinator (rank 0) writes .metadata and returns only
    after every rank has reported its data files written (and fsynced); the same holds when an async save's future
    completes on rank 0."""
    record = {"step": step, **(meta or {}), MANIFEST: _manifest(tmp)}
    (tmp / META).write_text(json.dumps(record, indent=2) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    latest_tmp = root / f".{LATEST}.tmp"
    latest_tmp.write_text(final.name + "\n")
    os.replace(latest_tmp, root / LATEST)
    if keep_last:
        for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep_last]:
            shutil.rmtree(old)


def save_checkpoint(root: str | os.PathLike, step: int, state: dict[str, Any], meta: dict[str, Any] | None = None,
                    keep_last: int | None = None, planner: SavePlanner | None = None,
                    file_per_tensor: bool = False) -> Path:
    """Save `state` (a DCP state dict) as ROOT/step_N; older checkpoints beyond `keep_last` are removed.
    Collective under torch.distributed: returns on every rank once the checkpoint is visible. `planner`: DCP's
    default unless given (the HF importer's builds tensors as they are written). `file_per_tensor`: one file per
    tensor instead of one per rank; DCP keeps every tensor of a file alive until the file is closed."""
    root, final, tmp = _prepare(root, step)
    with _quiet():
        writer = FileSystemWriter(str(tmp), single_file_per_rank=not file_per_tensor)
        dcp.save(state, storage_writer=writer, planner=planner)
    if _rank_world()[0] == 0:
        _publish(root, final, tmp, step, meta, keep_last)
    _barrier()
    return final


_ASYNC_GROUP: dist.ProcessGroup | None = None
_PENDING: PendingCheckpoint | None = None


def _async_group() -> dist.ProcessGroup | None:
    """A gloo group of all ranks for the background thread's collectives, so they never interleave with the
    training's collectives on the default group. Created on the first async save (a collective call)."""
    global _ASYNC_GROUP
    if _rank_world()[1] == 1:
        return None
    if _ASYNC_GROUP is None:
        _ASYNC_GROUP = dist.new_group(backend="gloo")
    return _ASYNC_GROUP


class PendingCheckpoint:
    """An async save in flight. Rank 0 publishes the checkpoint (meta.json, rename, `latest`) as soon as DCP has
    written everything; `wait()` (collective) returns the checkpoint directory once it is visible on every rank."""

    def __init__(self, future: Future, root: Path, final: Path, tmp: Path, step: int,
                 meta: dict[str, Any] | None, keep_last: int | None) -> None:
        self.path = final
        self._future = future
        self._published = threading.Event()
        self._error: BaseException | None = None
        self._waited = False
        if _rank_world()[0] == 0:
            def publish(done: Future) -> None:
                try:
                    if done.exception() is None:
                        _publish(root, final, tmp, step, meta, keep_last)
                except BaseException as exc:  # noqa: BLE001 - re-raised by wait()
                    self._error = exc
                finally:
                    self._published.set()
            future.add_done_callback(publish)
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
            finally:
                if _PENDING is self:
                    _PENDING = None
            _barrier()
        return self.path


def async_save_checkpoint(root: str | os.PathLike, step: int, state: dict[str, Any],
                          meta: dict[str, Any] | None = None, keep_last: int | None = None) -> PendingCheckpoint:
    """Like `save_checkpoint`, but returns once `state` is copied to memory (`dcp.async_save`); the files are
    written by a background thread. A previous pending save is waited for first. Collective."""
    global _PENDING
    if _PENDING is not None:
        _PENDING.wait()
    root, final, tmp = _prepare(root, step)
    group = _async_group()
    with _quiet():
        result = dcp.async_save(state, checkpoint_id=str(tmp), process_group=group, no_dist=group is None)
    future = getattr(result, "upload_completion", result)
    _PENDING = PendingCheckpoint(future, root, final, tmp, step, meta, keep_last)
    return _PENDING


def wait_pending() -> Path | None:
    """Wait for the async save in flight, if any (collective); its directory once visible, else None."""
    return _PENDING.wait() if _PENDING is not None else None


def find_checkpoint(path: str | os.PathLike) -> Path | None:
    """A checkpoint directory itself, or the newest complete one under a root (following `latest`, and falling
    back past an incomplete, truncated or corrupt newest one with a warning). None when there is none."""
    path = Path(path)
    if (path / META).is_file() or (path / ".metadata").is_file():  # one checkpoint, named directly
        problem = verify(path)
        if problem is None:
            return path
        log.warning("cannot use checkpoint %s: %s", path, problem)
        return None
    if not path.is_dir():
        return None
    candidates = sorted((p for p in path.glob("step_*") if p.is_dir()), reverse=True)
    pointer = path / LATEST
    if pointer.is_file():
        named = path / pointer.read_text().strip()
        if named.is_dir():
            candidates = [named] + [p for p in candidates if p != named]
    for candidate in candidates:
        problem = verify(candidate)
        if problem is None:
            return candidate
        log.warning("skipping checkpoint %s: %s; using the previous complete checkpoint instead", candidate, problem)
    if candidates:
        log.warning("no complete checkpoint under %s (%d incomplete one(s) skipped)", path, len(candidates))
    return None


def read_meta(checkpoint: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(checkpoint) / META).read_text())


def saved_keys(checkpoint: str | os.PathLike) -> set[str]:
    """The keys stored in a DCP checkpoint (read from its .metadata, no tensor data)."""
    return set(dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata)


def load_checkpoint(checkpoint: str | os.PathLike, state: dict[str, Any]) -> None:
    """Load into `state` in place (DCP reshards to whatever layout `state` has)."""
    with _quiet():
        dcp.load(state, checkpoint_id=str(checkpoint))
