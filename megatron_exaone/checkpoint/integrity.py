"""Checkpoint files as untrusted input: content checksums written beside the data, verified on load,
and a DCP metadata reader that cannot run code.

**Checksums.** Each file's checksum is its XXH3-128 digest (the `xxh128sum` of the xxHash tools),
computed from the bytes as DCP writes them (`HashingWriter`: no second read) and, on load, by each
rank for its share of the files in background threads while DCP reads (`Verification`). XXH3 runs at
memory speed (about 20 GB/s per core, 11x SHA-256 on the machines here), so neither saving nor
loading waits for it; it detects damaged or changed bytes as well as a cryptographic hash, and a
cryptographic one would add no protection: whoever can rewrite a data file can rewrite the manifest
beside it. Each rank leaves its files' digests in a small sidecar (`__R_xxh128.json`) that the
coordinator folds into the checkpoint's manifest (`store`), so no extra collective is needed,
asynchronous saves included.

**Metadata.** DCP's `.metadata` is a pickle. `read_metadata` unpickles it with an allow-list of the
classes DCP metadata is made of (dataclasses of sizes, offsets and dtypes) and refuses anything
else, naming the file and the class. It also refuses checkpoints that hold pickled ("bytes")
entries: DCP unpickles those with `torch.load(weights_only=False)`, and this project never writes
them (its own state is tensors + JSON).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import pickle
import re
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint.filesystem as dcp_fs
import torch.distributed.checkpoint.metadata as dcp_md
import xxhash
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

from megatron_exaone.errors import UserError
from megatron_exaone.files import write_json_atomic

CHECKSUM = "xxh128"  # the manifest's key for a file's digest: XXH3-128, hex
READ_CHUNK = 16 << 20
VERIFY_THREADS = 4  # files of one rank's share checked at once
DIGEST_SIDECAR = f"{CHECKSUM}.json"  # `__<rank>_xxh128.json`: one rank's files -> [bytes, digest]
METADATA_FILE = ".metadata"
DATA_SUFFIX = ".distcp"


class UntrustedCheckpointError(UserError, ValueError):
    """A checkpoint file that could run code if it were loaded (a class outside DCP metadata, a
    pickled entry)."""


# ------------------------------------------------------------------------------------------ hashing
def file_digest(path: str | os.PathLike) -> tuple[int, str]:
    """(size in bytes, XXH3-128 hex digest) of a file."""
    digest = xxhash.xxh3_128()
    size = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(READ_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


class _HashingFile:
    """A file DCP writes sequentially, hashed from the bytes written to it. Only what DCP calls is
    exposed (no seek: a rewrite would break the digest)."""

    def __init__(self, file: io.BufferedWriter, errors: list[OSError]) -> None:
        self._file = file
        self._errors = errors
        self._digest = xxhash.xxh3_128()
        self._size = 0

    def write(self, data) -> int:
        try:
            written = self._file.write(data)
        except OSError as exc:  # torch.save turns it into a RuntimeError without the errno: keep it
            self._errors.append(exc)
            raise
        self._digest.update(memoryview(data).cast("B")[:written])
        self._size += written
        return written

    def tell(self) -> int:
        return self._file.tell()

    def flush(self) -> None:
        self._file.flush()

    def fileno(self) -> int:
        return self._file.fileno()

    def close(self) -> None:
        self._file.close()

    def digest(self) -> tuple[int, str]:
        """(bytes written, digest) of the file so far."""
        if not self._file.closed and self._file.tell() != self._size:
            raise OSError(f"{self._file.name}: written out of order; its checksum would be wrong")
        return self._size, self._digest.hexdigest()


class _HashingFileSystem(FileSystem):
    def __init__(self) -> None:
        super().__init__()
        # file name -> (bytes, digest), for the data files
        self.digests: dict[str, tuple[int, str]] = {}
        # torch.save hides a write's OSError (ENOSPC...) behind a RuntimeError
        self.write_errors: list[OSError] = []

    @contextlib.contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[Any]:
        # .metadata is hashed when published
        if "w" not in mode or not str(path).endswith(DATA_SUFFIX):
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        with super().create_stream(path, mode) as file:
            stream = _HashingFile(file, self.write_errors)
            yield stream
            self.digests[Path(path).name] = stream.digest()


class HashingWriter(FileSystemWriter):
    """DCP's file writer, hashing every data file as it is written and leaving this rank's digests
    in `__R_xxh128.json` (R: this rank's file prefix) for the coordinator's manifest."""

    def __init__(self, path: str | os.PathLike, **kwargs: Any) -> None:
        super().__init__(path, **kwargs)
        self.fs = _HashingFileSystem()

    def write_data(self, plan, planner) -> Future:
        try:
            future = super().write_data(plan, planner)
        except Exception as exc:
            raise (self.fs.write_errors[0] if self.fs.write_errors else exc) from exc
        prefix = plan.storage_data.prefix
        mine = {name: list(d) for name, d in self.fs.digests.items() if name.startswith(prefix)}
        sidecar = Path(self.path) / f"{prefix}{DIGEST_SIDECAR}"
        write_json_atomic(sidecar, mine, indent=None)
        return future


def collect_digests(directory: Path) -> dict[str, tuple[int, str]]:
    """Every rank's sidecar digests under `directory`, merged; the sidecars are removed."""
    digests: dict[str, tuple[int, str]] = {}
    for sidecar in directory.glob(f"__*_{DIGEST_SIDECAR}"):
        digests.update(
            {name: (int(d[0]), str(d[1])) for name, d in json.loads(sidecar.read_text()).items()}
        )
        sidecar.unlink()
    return digests


# ------------------------------------------------------------------------------------- verification
def writer_rank(name: str) -> int:
    """The rank whose DCP file this is (`__3_0.distcp` -> 3); 0 for other files."""
    match = re.match(r"__(\d+)_", name)
    return int(match.group(1)) if match else 0


def check_file(directory: Path, name: str, expected: dict[str, Any]) -> str | None:
    """What is wrong with file `name` against its manifest entry (missing, other size, other
    content), or None."""
    try:
        size, digest = file_digest(directory / name)
    except OSError as exc:
        return f"file {name} cannot be read ({exc.strerror or exc})"
    if size != expected["bytes"]:
        return f"file {name} has {size} bytes, {expected['bytes']} were written"
    if digest != expected[CHECKSUM]:
        return (
            f"file {name} does not match the checksum recorded when it was written (its content "
            "changed: a damaged disk or a copy that went wrong)"
        )
    return None


class Verification:
    """Checksums of one rank's share of a checkpoint's files, checked in background threads
    (`result()` waits). Rank r checks the files rank r % shares wrote, so a resume under the same
    layout reads each file from the page cache that its own load just filled."""

    def __init__(
        self, directory: Path, manifest: dict[str, dict[str, Any]], share: int = 0, shares: int = 1
    ):
        names = sorted(n for n in manifest if writer_rank(n) % shares == share)
        self._pool = ThreadPoolExecutor(VERIFY_THREADS, thread_name_prefix="checkpoint-verify")
        self._checks = [
            self._pool.submit(check_file, directory, name, manifest[name]) for name in names
        ]

    def result(self) -> list[str]:
        try:
            return [problem for check in self._checks if (problem := check.result())]
        finally:
            self._pool.shutdown()


# ------------------------------------------------------------------------------------ safe metadata
def _allowed_classes() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {
        ("torch", "Size"): torch.Size,
        ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): dcp_fs._StorageInfo,
        # DCP records the path it wrote to; never used here
        ("pathlib", "PosixPath"): pathlib.PurePosixPath,
        ("pathlib", "WindowsPath"): pathlib.PureWindowsPath,
    }
    for name in (
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "ChunkStorageMetadata",
        "BytesStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    ):
        allowed[("torch.distributed.checkpoint.metadata", name)] = getattr(dcp_md, name)
    for name in dir(torch):
        if isinstance(getattr(torch, name, None), torch.dtype):
            allowed[("torch", name)] = getattr(torch, name)
    return allowed


_ALLOWED = _allowed_classes()


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path) -> None:
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UntrustedCheckpointError(
                f"{self._path}: refers to {module}.{name}, which is not part of checkpoint "
                "metadata; loading it could run code, so it is refused (was the file replaced?)"
            ) from None


def read_metadata(path: str | os.PathLike) -> Metadata:
    """A DCP `.metadata` file (or the one in a checkpoint directory), unpickled with the allow-list
    only."""
    path = Path(path)
    if path.is_dir():
        path = path / METADATA_FILE
    with open(path, "rb") as f:
        try:
            metadata = _MetadataUnpickler(f, path).load()
        except UntrustedCheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001 - any other unpickling failure is a damaged file
            raise UntrustedCheckpointError(
                f"{path}: not readable as checkpoint metadata ({exc})"
            ) from None
    if not isinstance(metadata, Metadata):
        raise UntrustedCheckpointError(
            f"{path}: holds a {type(metadata).__name__}, not checkpoint metadata"
        )
    pickled = sorted(
        k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)
    )
    if pickled:
        raise UntrustedCheckpointError(
            f"{path}: entries {pickled[:4]} are pickled Python objects, which loading would "
            "execute; this project never writes them (a checkpoint from an older development "
            "version, or a tampered one): refused"
        )
    return metadata


class SafeReader(FileSystemReader):
    """DCP's file reader over metadata already read with `read_metadata` (so DCP never unpickles);
    tensor data is read with `torch.load(weights_only=True)`."""

    def __init__(self, path: str | os.PathLike, metadata: Metadata) -> None:
        super().__init__(str(path))
        self._metadata = metadata

    # no **kwargs: DCP then never looks for per-rank metadata files
    def read_metadata(self) -> Metadata:
        if getattr(self._metadata, "storage_meta", None) is None:
            self._metadata.storage_meta = dcp_md.StorageMeta()
        self._metadata.storage_meta.load_id = self.load_id
        return self._metadata
