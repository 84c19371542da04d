"""Reading documents from JSONL (plain, .gz, .zst), Parquet and saved Hugging Face `datasets`
directories.

Readers yield raw records `(input index, line or row number, payload)`: a JSONL payload is the
undecoded line (bytes), so JSON parsing can happen in worker processes; a columnar payload is the
text column's value. Every problem is reported with its file and line so the user can find and fix
it.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from megatron_exaone.errors import UserError

log = logging.getLogger("exaone_data")

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
COMPRESSED_SUFFIXES = (".gz", ".zst")
HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
PROGRESS_EVERY = 4096  # records between progress callbacks

Record = tuple[int, int, "bytes | str | None"]


class BadRecord(UserError, ValueError):
    """One input record that cannot be used as a document."""


@dataclass(frozen=True)
class InputFile:
    path: Path
    kind: str  # "jsonl", "parquet" or "hf"
    size: int  # bytes on disk, for progress bars


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    for comp in ("",) + COMPRESSED_SUFFIXES:
        if any(name.endswith(s + comp) for s in JSONL_SUFFIXES):
            return "jsonl"
    return "parquet" if name.endswith(".parquet") else None


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _report_skipped(directory: Path, skipped: list[Path]) -> None:
    """Say which files of an input directory are not read (a .txt or .csv corpus beside the .jsonl
    files would otherwise vanish without a word)."""
    if skipped:
        shown = ", ".join(str(f.relative_to(directory)) for f in skipped[:5])
        more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        log.warning(
            "%s: skipping %d file(s) that are not .jsonl[.gz|.zst] or .parquet: %s%s (convert "
            "them to JSON lines with a text field to include them)",
            directory,
            len(skipped),
            shown,
            more,
        )


def resolve_inputs(paths: Sequence[str | os.PathLike]) -> list[InputFile]:
    """Expand the user's inputs: files as given, saved HF datasets as one input, other directories
    to their files."""
    inputs: list[InputFile] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise FileNotFoundError(f"{path}: input not found")
        if path.is_dir() and any((path / m).is_file() for m in HF_MARKERS):
            inputs.append(InputFile(path, "hf", _dir_size(path)))
        elif path.is_dir():
            files = sorted(f for f in path.rglob("*") if f.is_file())
            found = [f for f in files if _kind(f)]
            _report_skipped(path, [f for f in files if not _kind(f)])
            if not found:
                raise ValueError(
                    f"{path}: directory holds no .jsonl[.gz|.zst] or .parquet files and is not a "
                    "saved Hugging Face dataset (no dataset_info.json)"
                )
            inputs += [InputFile(f, _kind(f), f.stat().st_size) for f in found]
        elif _kind(path):
            inputs.append(InputFile(path, _kind(path), path.stat().st_size))
        else:
            raise ValueError(
                f"{path}: unsupported input; expected .jsonl/.json/.ndjson (optionally .gz or "
                ".zst), .parquet, or a directory saved with datasets' save_to_disk"
            )
    return inputs


def parse_record(payload: bytes | str | None, text_field: str) -> tuple[str, int, dict | None]:
    """(text, its UTF-8 size, JSON object or None) of a record; raises BadRecord saying what is
    wrong."""
    obj = None
    if isinstance(payload, bytes):
        try:
            obj = json.loads(payload)
        except UnicodeDecodeError as e:
            raise BadRecord(f"line is not valid UTF-8 ({e.reason} at byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise BadRecord(f"invalid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(obj, dict):
            raise BadRecord(f"expected a JSON object, got {type(obj).__name__}")
        if text_field not in obj:
            keys = ", ".join(list(obj)[:10]) or "none"
            raise BadRecord(
                f"missing key {text_field!r} (keys present: {keys}); choose the field with "
                "--text-field"
            )
        payload = obj[text_field]
    if payload is None:
        raise BadRecord(f"{text_field!r} is null")
    if not isinstance(payload, str):
        raise BadRecord(f"{text_field!r} holds a {type(payload).__name__}, expected a string")
    try:
        size = len(payload) if payload.isascii() else len(payload.encode("utf-8"))
    except UnicodeEncodeError:  # JSON escapes such as "\\ud800" decode to unpaired surrogates
        raise BadRecord(
            f"{text_field!r} contains an unpaired surrogate escape; it is not encodable text"
        ) from None
    return payload, size, obj


def _open_jsonl(path: Path, raw: io.BufferedReader) -> io.BufferedIOBase:
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw)
    if name.endswith(".zst"):
        import zstandard  # optional until a .zst input appears

        return io.BufferedReader(
            zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        )
    return raw


def _jsonl_records(index: int, path: Path, on_progress: Callable[[int], None]) -> Iterator[Record]:
    with open(path, "rb") as raw:
        stream = _open_jsonl(path, raw)
        reported = 0
        try:
            for line_no, line in enumerate(stream, start=1):
                if line.strip():  # blank lines separate nothing in JSONL; they are not documents
                    yield index, line_no, line
                if line_no % PROGRESS_EVERY == 0:
                    on_progress(raw.tell() - reported)
                    reported = raw.tell()
        except (OSError, EOFError) as e:  # gzip/zstd corruption surfaces here
            raise ValueError(
                f"{path}: cannot decompress ({e}); the file is truncated or corrupted"
            ) from None
        on_progress(raw.tell() - reported)


def _check_string_column(path: Path, field: str, names: list[str], type_name: str) -> None:
    if field not in names:
        raise ValueError(
            f"{path}: no column {field!r} (columns: {', '.join(names)}); choose one with "
            "--text-field"
        )
    if "string" not in type_name:
        raise ValueError(f"{path}: column {field!r} has type {type_name}, expected strings")


def jsonl_range_records(
    index: int, path: Path, start: int, end: int, on_progress: Callable[[int], None]
) -> Iterator[Record]:
    """The records of a plain JSON-lines file that start in its bytes [start, end), numbered from 1
    at the first line that starts at or after `start`."""
    with open(path, "rb") as f:
        if start:
            f.seek(start - 1)
            f.readline()  # the line holding byte start-1 began before the range: not this one's
        pos, reported = f.tell(), start
        for line_no, line in enumerate(f, start=1):
            if pos >= end:
                break
            if line.strip():  # as _jsonl_records: blank lines are not documents
                yield index, line_no, line
            pos += len(line)
            if line_no % PROGRESS_EVERY == 0:
                on_progress(min(pos, end) - reported)
                reported = min(pos, end)
        on_progress(end - reported)


def line_number_at(path: Path, offset: int) -> int:
    """The number of the line that holds byte `offset` of a file."""
    newlines, left = 0, offset
    with open(path, "rb") as f:
        while left > 0 and (chunk := f.read(min(left, 16 << 20))):
            newlines += chunk.count(b"\n")
            left -= len(chunk)
    return newlines + 1


def _parquet_records(
    index: int, inp: InputFile, field: str, on_progress: Callable[[int], None]
) -> Iterator[Record]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(inp.path)
    _check_string_column(
        inp.path,
        field,
        pf.schema_arrow.names,
        str(pf.schema_arrow.field(field).type) if field in pf.schema_arrow.names else "",
    )
    rows, total = 0, max(pf.metadata.num_rows, 1)
    for batch in pf.iter_batches(batch_size=PROGRESS_EVERY, columns=[field]):
        for value in batch.column(0).to_pylist():
            rows += 1
            yield index, rows, value
        on_progress(inp.size * len(batch) // total)


def _hf_records(
    index: int, inp: InputFile, field: str, split: str | None, on_progress: Callable[[int], None]
) -> Iterator[Record]:
    try:
        import datasets
    except ImportError:
        raise RuntimeError(
            f"{inp.path} is a saved Hugging Face dataset; reading it needs the `datasets` package "
            "(pip install 'megatron-exaone[datasets]')"
        ) from None

    ds = datasets.load_from_disk(str(inp.path))
    if isinstance(ds, datasets.DatasetDict):
        if split is None and len(ds) == 1:
            split = next(iter(ds))
        if split not in ds:
            raise ValueError(
                f"{inp.path}: dataset has splits {', '.join(ds)}; choose one with --split"
            )
        ds = ds[split]
    dtype = getattr(ds.features.get(field), "dtype", "")
    _check_string_column(inp.path, field, ds.column_names, str(dtype))
    rows, total = 0, max(len(ds), 1)
    for table in ds.select_columns([field]).with_format("arrow").iter(batch_size=PROGRESS_EVERY):
        for value in table.column(0).to_pylist():
            rows += 1
            yield index, rows, value
        on_progress(inp.size * table.num_rows // total)


def iter_records(
    inputs: Sequence[InputFile],
    text_field: str,
    split: str | None = None,
    on_progress: Callable[[int], None] = lambda n: None,
) -> Iterator[Record]:
    """Every record of every input in order; `on_progress(bytes)` is called as input is consumed."""
    for index, inp in enumerate(inputs):
        if inp.kind == "jsonl":
            yield from _jsonl_records(index, inp.path, on_progress)
        elif inp.kind == "parquet":
            yield from _parquet_records(index, inp, text_field, on_progress)
        else:
            yield from _hf_records(index, inp, text_field, split, on_progress)
