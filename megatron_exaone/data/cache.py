"""Index arrays built once, cached as `.npy` files, shared by every rank and every later run.

The first process that needs a missing file takes a lock file (O_CREAT | O_EXCL) and builds it; the
others wait for the file to appear. The file is written under a temporary name and renamed into
place, so a reader never sees a partial index. A lock file works whether or not torch.distributed is
initialised, for ranks that build loaders at different moments (only some pipeline stages read
data), and for caches on node-local disks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from megatron_exaone.data.indexed import IndexedDatasetError

log = logging.getLogger(__name__)
POLL_S = 0.2
STALE_LOCK_S = 1800.0  # a lock older than this belongs to a builder that died


def cache_key(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:20]


def cached_array(path: Path, build: Callable[[], np.ndarray]) -> np.ndarray:
    """The array stored at `path` (memory-mapped), built by `build()` if no process has built it
    yet."""
    lock = path.with_name(path.name + ".lock")
    while not path.is_file():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            _wait(path, lock)
            continue
        except PermissionError as e:
            raise PermissionError(
                f"cannot write the index cache {path.parent} ({e.strerror}); "
                "pass a writable cache_dir"
            ) from None
        try:
            os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
            if not path.is_file():
                started = time.time()
                array = build()
                tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
                with open(tmp, "wb") as f:
                    np.save(f, array)
                os.replace(tmp, path)
                log.info("built index %s in %.2f s", path.name, time.time() - started)
        finally:
            os.close(fd)
            lock.unlink(missing_ok=True)
    try:  # never unpickle: a cache file is untrusted input like any other
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise IndexedDatasetError(
            f"{path}: not a plain index array ({exc}); delete it and it is built again"
        ) from None


def _wait(path: Path, lock: Path) -> None:
    while not path.is_file():
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return  # the builder finished or gave up: look again
        if age > STALE_LOCK_S:
            log.warning("removing stale index lock %s (%.0f s old)", lock, age)
            lock.unlink(missing_ok=True)
            return
        time.sleep(POLL_S)
