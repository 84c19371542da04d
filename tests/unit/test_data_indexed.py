"""Megatron MMIDIDX shards: bytes checked by an independent reader written from the published
layout."""

import struct
from pathlib import Path

import numpy as np
import pytest

from megatron_exaone.data.indexed import (
    IndexedDataset,
    IndexedDatasetError,
    IndexedDatasetWriter,
    merge_datasets,
    optimal_dtype,
)

# Published layout (megatron/core/datasets/indexed_dataset.py), written out independently of the
# code under test.
CODES = {1: "u1", 2: "i1", 3: "<i2", 4: "<i4", 5: "<i8", 6: "<f8", 7: "<f4", 8: "<u2"}


def reference_read(prefix):
    """(dtype, sequences as lists, document boundaries) parsed byte by byte."""
    raw = open(f"{prefix}.idx", "rb").read()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    (version,) = struct.unpack_from("<Q", raw, 9)
    (code,) = struct.unpack_from("<B", raw, 17)
    n, d = struct.unpack_from("<QQ", raw, 18)
    assert version == 1 and len(raw) == 34 + 12 * n + 8 * d
    lengths = struct.unpack_from(f"<{n}i", raw, 34)
    pointers = struct.unpack_from(f"<{n}q", raw, 34 + 4 * n)
    docs = struct.unpack_from(f"<{d}q", raw, 34 + 12 * n)
    data = open(f"{prefix}.bin", "rb").read()
    item = np.dtype(CODES[code]).itemsize
    seqs = [
        np.frombuffer(data[p : p + item * ln], dtype=CODES[code]).tolist()
        for p, ln in zip(pointers, lengths)
    ]
    return np.dtype(CODES[code]), seqs, list(docs)


def write(prefix, docs, dtype):
    with IndexedDatasetWriter(prefix, dtype) as w:
        for doc in docs:
            w.add_document(np.array(doc))


@pytest.mark.parametrize(
    "vocab_size, dtype",
    [(4000, np.uint16), (65499, np.uint16), (65500, np.int32), (153600, np.int32)],
)
def test_writer_bytes_match_published_layout(tmp_path, vocab_size, dtype):
    assert optimal_dtype(vocab_size) == dtype
    docs = [[1, 2, 3], [], [vocab_size - 1] * 5, [0]]
    write(tmp_path / "c", docs, optimal_dtype(vocab_size))
    ref_dtype, seqs, bounds = reference_read(tmp_path / "c")
    # Megatron's add_document: an empty document has no sequence, its boundary repeats
    assert ref_dtype == dtype and seqs == [d for d in docs if d] and bounds == [0, 1, 1, 2, 3]
    ds = IndexedDataset(tmp_path / "c")
    assert [ds.get(i).tolist() for i in range(len(ds))] == seqs
    assert ds.get(1, offset=1, length=2).tolist() == [vocab_size - 1] * 2
    assert ds.num_documents == 4 and ds.num_tokens == 9


def test_batched_adds_and_merge(tmp_path):
    tokens, lengths = np.arange(10), np.array([4, 0, 6])
    with IndexedDatasetWriter(tmp_path / "a", np.uint16) as w:
        w.add_documents(tokens, lengths)
    write(tmp_path / "b", [[7, 7], [9]], np.uint16)
    merge_datasets([tmp_path / "a", tmp_path / "b"], tmp_path / "m")
    _, seqs, bounds = reference_read(tmp_path / "m")
    assert seqs == [[0, 1, 2, 3], [4, 5, 6, 7, 8, 9], [7, 7], [9]]
    assert bounds == [0, 1, 1, 2, 3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a.bin",
        "a.idx",
        "b.bin",
        "b.idx",
        "m.bin",
        "m.idx",
    ]


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(tmp_path / "x", np.uint16) as w:
            w.add_document(np.arange(3))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def _corrupt(path, offset=None, data=None, truncate=None, append=None):
    raw = bytearray(path.read_bytes())
    if truncate is not None:
        raw = raw[:truncate]
    if data is not None:
        raw[offset : offset + len(data)] = data
    if append is not None:
        raw += append
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    "target, change, message",
    [
        ("idx", dict(offset=0, data=b"NOTMEGA"), "not the MMIDIDX magic"),
        ("idx", dict(offset=9, data=struct.pack("<Q", 2)), "version 2"),
        ("idx", dict(offset=17, data=bytes([9])), "unknown dtype code 9"),
        ("idx", dict(truncate=20), "shorter than the 34-byte"),
        ("idx", dict(truncate=60), "truncated or corrupted"),
        ("idx", dict(offset=34 + 4 * 3, data=struct.pack("<q", 5)), "byte offsets do not match"),
        ("bin", dict(truncate=10), "truncated"),
        ("bin", dict(append=b"\x00\x00"), "trailing data"),
    ],
)
def test_corrupted_shards_fail_clearly(tmp_path, target, change, message):
    write(tmp_path / "c", [[1, 2, 3], [4, 5], [6, 7, 8, 9]], np.uint16)
    _corrupt(tmp_path / f"c.{target}", **change)
    with pytest.raises(IndexedDatasetError, match=message):
        IndexedDataset(tmp_path / "c")


def test_wrong_dtype_code_changes_meaning_and_size_check_catches_it(tmp_path):
    write(tmp_path / "c", [[1, 2, 3]], np.uint16)
    _corrupt(tmp_path / "c.idx", offset=17, data=bytes([4]))  # says int32, data is uint16
    with pytest.raises(IndexedDatasetError, match="truncated"):
        IndexedDataset(tmp_path / "c")


def test_missing_files(tmp_path):
    with pytest.raises(IndexedDatasetError, match="file not found"):
        IndexedDataset(tmp_path / "nothing")
    write(tmp_path / "c", [[1]], np.uint16)
    (tmp_path / "c.bin").unlink()
    with pytest.raises(IndexedDatasetError, match=r"c\.bin: file not found"):
        IndexedDataset(tmp_path / "c.idx")


@pytest.mark.parametrize("vocab_size", [4000, 153600])
def test_megatron_core_writes_our_bytes_and_each_reads_the_other(tmp_path, vocab_size):
    """Megatron-Core's own IndexedDatasetBuilder (as its preprocess_data.py drives it: one
    sequence per document, none for an empty one) writes the bytes our writer writes, each reader
    reads the other's shards, and its add_index concatenates to the bytes of our merge."""
    mcore = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    dtype = np.dtype(optimal_dtype(vocab_size)).type  # Megatron takes the scalar type
    parts = {"a": [[1, 2, 3], [], [vocab_size - 1, 70]], "b": [[0], [], [5] * 7]}

    def megatron_write(prefix, docs):
        builder = mcore.IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
        for doc in docs:  # preprocess_data.py passes the token list and its sentence lengths
            builder.add_document(doc, [len(doc)] if doc else [])
        builder.finalize(f"{prefix}.idx")

    def megatron_merge(prefix, prefixes):
        builder = mcore.IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
        for part in prefixes:
            builder.add_index(str(part))
        builder.finalize(f"{prefix}.idx")

    def same_bytes(ours, theirs):
        for suffix in (".bin", ".idx"):
            assert Path(f"{ours}{suffix}").read_bytes() == Path(f"{theirs}{suffix}").read_bytes()

    for name, docs in parts.items():
        write(tmp_path / name, docs, dtype)
        megatron_write(tmp_path / f"mcore_{name}", docs)
        same_bytes(tmp_path / name, tmp_path / f"mcore_{name}")
        seqs = [d for d in docs if d]
        theirs = mcore.IndexedDataset(str(tmp_path / name))
        assert [theirs[i].tolist() for i in range(len(theirs))] == seqs
        assert theirs.document_indices.tolist() == [0, 1, 1, 2]
        ours = IndexedDataset(tmp_path / f"mcore_{name}")
        assert [ours.get(i).tolist() for i in range(len(ours))] == seqs
    merge_datasets([tmp_path / "a", tmp_path / "b"], tmp_path / "merged")
    megatron_merge(tmp_path / "mcore_merged", [tmp_path / "a", tmp_path / "b"])
    same_bytes(tmp_path / "merged", tmp_path / "mcore_merged")
