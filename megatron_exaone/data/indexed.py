"""Megatron MMIDIDX indexed datasets: a `.bin` of concatenated token arrays and an `.idx` describing
them.

The byte layout is Megatron-LM's `megatron/core/datasets/indexed_dataset.py` (version 1), so files
written here are read by Megatron's `IndexedDataset` and the other way round:

    .idx  magic b"MMIDIDX\\x00\\x00" | uint64 version=1 | uint8 dtype code | uint64 N sequences
          | uint64 D | int32 lengths[N] | int64 byte offsets[N]
          | int64 document boundaries[D] (sequence indices, 0 ... N)
    .bin  the token arrays back to back, no header

A dataset is named by its prefix: `out/corpus` means `out/corpus.bin` + `out/corpus.idx`.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np

from megatron_exaone.errors import UserError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
# magic, version, dtype code, sequence count, document-boundary count
HEADER = struct.Struct("<9sQBQQ")
DTYPE_CODES: dict[int, type[np.generic]] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
CODE_OF_DTYPE = {np.dtype(t): code for code, t in DTYPE_CODES.items()}
RECREATE = "re-create the dataset (exaone-data tokenize)"


class IndexedDatasetError(UserError, ValueError):
    """A `.bin/.idx` pair that is missing, truncated, corrupted or inconsistent."""


def optimal_dtype(vocab_size: int) -> np.dtype:
    """Megatron's choice: uint16 when every id fits below 65,500, int32 otherwise."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def dataset_paths(prefix: str | os.PathLike) -> tuple[Path, Path]:
    """(`.bin`, `.idx`) paths of a prefix; a path already ending in .bin or .idx is accepted too."""
    p = Path(prefix)
    if p.suffix in (".bin", ".idx"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".bin"), p.with_name(p.name + ".idx")


def stats_path(prefix: str | os.PathLike) -> Path:
    """`PREFIX.stats.json`, the sidecar `exaone-data tokenize` writes beside a dataset."""
    p = dataset_paths(prefix)[0].with_suffix("")
    return p.with_name(p.name + ".stats.json")


def read_stats(prefix: str | os.PathLike) -> dict:
    """The stats sidecar of a dataset; empty when there is none."""
    path = stats_path(prefix)
    if not path.is_file():
        return {}
    try:
        stats = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IndexedDatasetError(
            f"{path}: unreadable statistics sidecar ({e}); delete it or {RECREATE}"
        ) from None
    if not isinstance(stats, dict):
        raise IndexedDatasetError(
            f"{path}: not a statistics sidecar (expected a JSON object); delete it or {RECREATE}"
        )
    return stats


def _replace_tmp(tmp: Path, final: Path) -> None:
    with open(tmp, "rb+") as f:  # durable before it becomes visible under the final name
        os.fsync(f.fileno())
    os.replace(tmp, final)


class IndexedDatasetWriter:
    """Writes one `.bin/.idx` pair; each added document is one sequence, except that a document of
    no tokens is a document of no sequences (its document index repeats the previous one), as
    Megatron-LM's `IndexedDatasetBuilder.add_document` writes it.

    Data goes to temporary files that take their final names only in `finish()`, `.bin` first and
    `.idx` last, so a reader never sees a partial dataset under the final name. Used as a context
    manager, an exception aborts the write and removes the temporary files.
    """

    def __init__(self, prefix: str | os.PathLike, dtype: np.dtype | type) -> None:
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF_DTYPE:
            raise ValueError(
                f"dtype {self.dtype} has no MMIDIDX code; use one of "
                f"{sorted(map(str, CODE_OF_DTYPE))}"
            )
        self.bin_path, self.idx_path = dataset_paths(prefix)
        self.bin_path.parent.mkdir(parents=True, exist_ok=True)
        suffix = f".tmp-{os.getpid()}"
        self._bin_tmp = self.bin_path.with_name(self.bin_path.name + suffix)
        self._idx_tmp = self.idx_path.with_name(self.idx_path.name + suffix)
        self._bin = open(self._bin_tmp, "wb")
        self._lengths: list[np.ndarray] = []

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents given as one flat token array and the length of each document."""
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != len(tokens):
            raise ValueError(
                f"lengths sum to {int(lengths.sum())} but {len(tokens)} tokens were given"
            )
        if len(lengths) and (lengths.min() < 0 or lengths.max() > np.iinfo(np.int32).max):
            raise ValueError("document lengths must be in [0, 2**31)")
        self._bin.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        self._lengths.append(lengths.astype(np.int32))

    def add_document(self, tokens: np.ndarray) -> None:
        self.add_documents(np.asarray(tokens), np.array([len(tokens)]))

    def finish(self) -> None:
        self._bin.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int32)
        documents = np.concatenate([[0], np.cumsum(lengths > 0)])
        write_index(self._idx_tmp, self.dtype, lengths[lengths > 0], documents)
        _replace_tmp(self._bin_tmp, self.bin_path)
        _replace_tmp(self._idx_tmp, self.idx_path)

    def abort(self) -> None:
        self._bin.close()
        for tmp in (self._bin_tmp, self._idx_tmp):
            tmp.unlink(missing_ok=True)

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.abort()


def _check_files(prefix: str | os.PathLike, bin_path: Path, idx_path: Path) -> None:
    """Both files of `prefix` exist and are regular files, or an error that says what a prefix
    is."""
    for path in (idx_path, bin_path):
        if path.is_file():
            continue
        if Path(prefix).is_dir():
            found = sorted(str(p.with_suffix("")) for p in Path(prefix).glob("*.idx"))[:3]
            hint = f" (datasets in it: {', '.join(found)})" if found else ""
            raise IndexedDatasetError(
                f"{prefix} is a directory, not a dataset prefix{hint}; a prefix PREFIX names "
                "the files PREFIX.bin + PREFIX.idx"
            )
        problem = "is not a regular file" if path.exists() else "file not found"
        raise IndexedDatasetError(
            f"{path}: {problem}, so {idx_path.with_suffix('')} is not a dataset; a prefix "
            "PREFIX names the files PREFIX.bin + PREFIX.idx: check the path"
        )


def write_index(
    path: Path, dtype: np.dtype, lengths: np.ndarray, document_indices: np.ndarray
) -> None:
    """Write an `.idx` file for sequences of `lengths` (byte offsets follow from them)."""
    lengths = np.asarray(lengths, dtype=np.int32)
    pointers = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1].astype(np.int64) * np.dtype(dtype).itemsize, out=pointers[1:])
    with open(path, "wb") as f:
        f.write(
            HEADER.pack(
                MAGIC, VERSION, CODE_OF_DTYPE[np.dtype(dtype)], len(lengths), len(document_indices)
            )
        )
        f.write(lengths.tobytes())
        f.write(pointers.tobytes())
        f.write(np.asarray(document_indices, dtype=np.int64).tobytes())


class IndexedDataset:
    """Memory-mapped reader of a `.bin/.idx` pair, validated on open.

    `get(i, offset, length)` returns a read-only view of sequence i's tokens; nothing is copied
    until used.
    """

    def __init__(self, prefix: str | os.PathLike) -> None:
        self.bin_path, self.idx_path = dataset_paths(prefix)
        _check_files(prefix, self.bin_path, self.idx_path)
        try:
            self.dtype, self.sequence_lengths, self.sequence_pointers, self.document_indices = (
                read_index(self.idx_path)
            )
            self._tokens = self._map_tokens()
        except OSError as e:  # permissions, I/O errors: name the file, never a bare OS traceback
            raise IndexedDatasetError(
                f"{e.filename or self.bin_path}: cannot read ({e.strerror or e}); make the "
                "file readable by this user, or copy the dataset where it can be read"
            ) from None

    def _map_tokens(self) -> np.ndarray:
        expected = (
            int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * self.dtype.itemsize
            if len(self.sequence_lengths)
            else 0
        )
        actual = self.bin_path.stat().st_size
        if actual != expected:
            raise IndexedDatasetError(
                f"{self.bin_path}: {actual} bytes but {self.idx_path.name} describes {expected} "
                f"bytes ({'truncated' if actual < expected else 'trailing data'}); the pair does "
                f"not belong together or the write was interrupted: {RECREATE}"
            )
        # np.memmap cannot map an empty file.
        return (
            np.memmap(self.bin_path, dtype=self.dtype, mode="r")
            if expected
            else np.zeros(0, dtype=self.dtype)
        )

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    @property
    def num_tokens(self) -> int:
        return len(self._tokens)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    def get(self, index: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens of sequence `index`, from `offset`, `length` of them (to its end by default)."""
        seq_len = int(self.sequence_lengths[index])
        if length is None:
            length = seq_len - offset
        if offset < 0 or length < 0 or offset + length > seq_len:
            raise IndexError(
                f"tokens [{offset}, {offset + length}) outside sequence {index} of length {seq_len}"
            )
        start = int(self.sequence_pointers[index]) // self.dtype.itemsize + offset
        return self._tokens[start : start + length]


def read_index(path: Path) -> tuple[np.dtype, np.ndarray, np.ndarray, np.ndarray]:
    """Parse and validate an `.idx` file: (dtype, lengths, byte offsets, document boundaries),
    arrays memory-mapped."""
    size = path.stat().st_size
    if size < HEADER.size:
        raise IndexedDatasetError(
            f"{path}: {size} bytes, shorter than the {HEADER.size}-byte MMIDIDX header "
            f"(truncated or not an index file): {RECREATE}"
        )
    with open(path, "rb") as f:
        magic, version, code, n, d = HEADER.unpack(f.read(HEADER.size))
    if magic != MAGIC:
        raise IndexedDatasetError(
            f"{path}: starts with {magic!r}, not the MMIDIDX magic {MAGIC!r}; "
            f"not a Megatron indexed-dataset index: check the path, or {RECREATE}"
        )
    if version != VERSION:
        raise IndexedDatasetError(
            f"{path}: index version {version}, only version {VERSION} is supported: {RECREATE}"
        )
    if code not in DTYPE_CODES:
        raise IndexedDatasetError(
            f"{path}: unknown dtype code {code} at byte 17 (valid codes: "
            + ", ".join(f"{c}={np.dtype(t)}" for c, t in DTYPE_CODES.items())
            + f"); the file is corrupted: {RECREATE}"
        )
    expected = HEADER.size + 12 * n + 8 * d
    if size != expected:
        raise IndexedDatasetError(
            f"{path}: {size} bytes but its header ({n} sequences, {d} document boundaries) "
            f"needs {expected}; the file is truncated or corrupted: {RECREATE}"
        )
    dtype = np.dtype(DTYPE_CODES[code])
    lengths = (
        np.memmap(path, dtype=np.int32, mode="r", offset=HEADER.size, shape=(n,))
        if n
        else np.zeros(0, np.int32)
    )
    pointers = (
        np.memmap(path, dtype=np.int64, mode="r", offset=HEADER.size + 4 * n, shape=(n,))
        if n
        else np.zeros(0, np.int64)
    )
    docs = (
        np.memmap(path, dtype=np.int64, mode="r", offset=HEADER.size + 12 * n, shape=(d,))
        if d
        else np.zeros(0)
    )
    if d < 1 or docs[0] != 0 or docs[-1] != n or np.any(np.diff(docs) < 0):
        raise IndexedDatasetError(
            f"{path}: document boundaries must rise from 0 to the sequence count {n} "
            f"(corrupted): {RECREATE}"
        )
    if n and lengths.min() < 0:
        raise IndexedDatasetError(
            f"{path}: negative sequence length {lengths.min()} (corrupted): {RECREATE}"
        )
    if n and (
        pointers[0] != 0
        or np.any(np.diff(pointers) != lengths[:-1].astype(np.int64) * dtype.itemsize)
    ):
        raise IndexedDatasetError(
            f"{path}: sequence byte offsets do not match the sequence lengths (corrupted): "
            f"{RECREATE}"
        )
    return dtype, lengths, pointers, docs


def merge_datasets(prefixes: list[str | os.PathLike], out_prefix: str | os.PathLike) -> None:
    """Concatenate datasets of one dtype into `out_prefix`, written under temporary names first."""
    if not prefixes:
        raise ValueError("nothing to merge")
    parts = [IndexedDataset(p) for p in prefixes]
    dtypes = {p.dtype for p in parts}
    if len(dtypes) != 1:
        raise IndexedDatasetError(
            f"cannot merge datasets of different dtypes {sorted(map(str, dtypes))}"
        )
    out_bin, out_idx = dataset_paths(out_prefix)
    tmp_bin, tmp_idx = (p.with_name(p.name + f".tmp-{os.getpid()}") for p in (out_bin, out_idx))
    try:
        with open(tmp_bin, "wb") as out:
            for part in parts:
                with open(part.bin_path, "rb") as src:
                    shutil.copyfileobj(src, out, 16 << 20)
        lengths = np.concatenate([np.asarray(p.sequence_lengths) for p in parts])
        offsets = np.cumsum([0] + [len(p) for p in parts[:-1]])
        docs = np.concatenate(
            [[0]] + [np.asarray(p.document_indices[1:]) + o for p, o in zip(parts, offsets)]
        )
        write_index(tmp_idx, parts[0].dtype, lengths, docs)
        _replace_tmp(tmp_bin, out_bin)
        _replace_tmp(tmp_idx, out_idx)
    finally:
        tmp_bin.unlink(missing_ok=True)
        tmp_idx.unlink(missing_ok=True)
