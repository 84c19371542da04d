"""Data-side faults: killed tokenize commands leave no workers, huge one-line documents, vocabulary
mismatches and broken shards all end in one clear line, never a panic or a traceback."""

import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

import data_tools.tokenize_corpus as tc
from data_tools.encode_worker import MAX_PIECE_CHARS, document_pieces, safe_split
from data_tools.readers import BadRecord
from data_tools.sample_corpus import files, iter_texts
from megatron_exaone.data import (
    IndexedDataset,
    IndexedDatasetError,
    IndexedDatasetWriter,
    MixtureLoader,
)
from megatron_exaone.errors import UserError
from megatron_exaone.lifetime import child_pids
from tests.commands import HANG_GUARD, REPO, exaone_data


def error_lines(stderr: str) -> list[str]:
    """The command's stderr without its two progress lines (which share the `exaone-data:`
    prefix)."""
    return [
        line
        for line in stderr.splitlines()
        if not line.startswith("exaone-data: tokenizing")
        and not line.startswith("exaone-data: stopped;")
    ]


# 1. Tokenize workers die with their command.


def _alive(pid: int) -> bool:
    """Running, not a zombie (an orphan killed in a container may stay a zombie if nothing reaps
    it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _is_pool_worker(pid: int) -> bool:
    try:
        return b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_killed_tokenize_command_takes_its_workers_with_it(tmp_path, tokenizers_dir):
    line = json.dumps({"text": " ".join(iter_texts())[:20_000]}) + "\n"
    # ~40 MB: far more than is encoded before the kill
    (tmp_path / "big.jsonl").write_text(line * 2_000)
    command = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "data_tools",
            "tokenize",
            "--input",
            str(tmp_path / "big.jsonl"),
            "--tokenizer",
            str(tokenizers_dir["superbpe-default"]),
            "--output-prefix",
            str(tmp_path / "out"),
            "--workers",
            "2",
            "--no-progress",
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    children: list[int] = []
    try:
        deadline = time.monotonic() + HANG_GUARD
        while sum(map(_is_pool_worker, children)) < 2:
            assert command.poll() is None and time.monotonic() < deadline, (
                "the workers never started"
            )
            time.sleep(0.05)
            children = child_pids(command.pid)
        command.kill()
        command.wait(timeout=HANG_GUARD)
        deadline = time.monotonic() + 20
        while any(map(_alive, children)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in children if _alive(pid)], (
            "processes outlived their killed tokenize command"
        )
    finally:
        for pid in [command.pid, *children]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


# 2. One-line documents too long for the tokenizer's regex engine.

SINGLE_LINES = [
    "alpha beta  gamma   delta\t epsilon \u3000zeta\u00a0 eta \u2028 theta \x1c iota",
    "x1 y22 z333 4444w 55555v a1b2c3 1² 2³x ab:12 :1 ,1. 12,345.67 99%  100 ok",
    "version 3 of 7 says 10:30 at 2024-01-05 (ref 12a) then  two  spaces \t\t and 8\ttabs",
    "한국어 1개 日本語 2つ Tiếng Việt 3 câu  Größe 4 Maß \u00a0 5",
]


@pytest.mark.parametrize("pretokenizer", ["superbpe-default", "k-exaone"])
def test_single_lines_are_cut_without_changing_ids(tokenizers_dir, pretokenizer):
    tok = Tokenizer.from_file(str(tokenizers_dir[pretokenizer] / "tokenizer.json"))
    # the whole sample corpus as one line
    prose = " ".join(t.replace("\n", " ") for t in iter_texts())
    for text, targets in [(line, (1, 3, 8, 64)) for line in SINGLE_LINES] + [(prose, (64, 4096))]:
        whole = tok.encode(text, add_special_tokens=False).ids
        for target in targets:
            pieces = safe_split(text, target)
            assert "".join(pieces) == text and (len(pieces) > 1 or len(text) <= target)
            encoded = tok.encode_batch(pieces, add_special_tokens=False)
            assert [i for e in encoded for i in e.ids] == whole


def test_long_single_line_with_cut_points_is_encoded_exactly(tmp_path, tokenizers_dir):
    # starts with a letter, ends with a digit
    unit = "Section 12 of the report  lists 3 items, each worth 42"
    repeats = MAX_PIECE_CHARS // len(unit) + 100  # longer than any one piece may be
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": unit * repeats}) + "\n")
    tok_dir = tokenizers_dir["superbpe-default"]
    tc.tokenize(
        tc.TokenizeConfig(
            inputs=[str(tmp_path / "d.jsonl")],
            tokenizer=tok_dir,
            output_prefix=tmp_path / "o",
            workers=1,
            show_progress=False,
        )
    )
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    expected = tok.encode(unit, add_special_tokens=False).ids * repeats + [
        tok.token_to_id("<|endoftext|>")
    ]
    assert IndexedDataset(tmp_path / "o").get(0).tolist() == expected


def test_a_50mb_line_without_cut_points_fails_its_record_in_one_line(tmp_path, tokenizers_dir):
    words = "the quick brown fox jumps over the lazy dog "  # one SuperBPE pretoken, however long
    huge = (words * (50_000_000 // len(words) + 1))[:50_000_000].strip()
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("first", huge, "last")))
    tok_dir = str(tokenizers_dir["superbpe-default"])
    done = exaone_data(
        "tokenize",
        "--input",
        str(path),
        "--tokenizer",
        tok_dir,
        "--output-prefix",
        str(tmp_path / "o"),
        "--workers",
        "2",
        "--no-progress",
    )
    assert done.returncode == 2, done.stderr
    assert error_lines(done.stderr) == [
        f"exaone-data: {path}:2: document of {len(huge):,} characters has a stretch of "
        f"{len(huge):,} characters with no point where it can be cut without changing its tokens "
        "(a line break or a run of spaces before a non-space, the edge of a number), more than "
        f"the tokenizer's regex engine can encode at once ({MAX_PIECE_CHARS:,} characters); split "
        "it into smaller documents, for example at paragraphs; fix the input or pass "
        "--on-bad-line skip to skip such lines"
    ]
    stats = tc.tokenize(
        tc.TokenizeConfig(
            inputs=[str(path)],
            tokenizer=tok_dir,
            output_prefix=tmp_path / "o",
            workers=1,
            on_bad_line="skip",
            show_progress=False,
        )
    )
    assert stats["documents"] == 2 and stats["bad_lines"] == 1
    assert stats["bad_line_examples"][0].startswith(
        f"{path}:2: document of {len(huge):,} characters"
    )


def test_whole_documents_too_long_for_the_regex_engine_are_bad_records():
    with pytest.raises(
        BadRecord, match=f"longer than the {MAX_PIECE_CHARS:,} characters .* --split-chars 0"
    ):
        document_pieces("a\nb" * (MAX_PIECE_CHARS // 3 + 1), split_chars=0)
    assert len(document_pieces("a\nb" * (MAX_PIECE_CHARS // 3 + 1), split_chars=16_384)) > 1


# 3. Data ids the model's vocabulary cannot hold.


def loader(datasets, vocab_size):
    return MixtureLoader(
        datasets,
        [dict.fromkeys(datasets, 1.0)],
        seq_len=32,
        global_batch_size=2,
        vocab_size=vocab_size,
    )


def test_ids_past_the_model_vocabulary_fail_naming_dataset_shard_and_id(tmp_path):
    with IndexedDatasetWriter(tmp_path / "web", np.uint16) as w:
        for doc in range(20):
            w.add_document(np.arange(40) + 10 * doc)  # ids 0 .. 229
    assert loader({"web": tmp_path / "web"}, vocab_size=230).next_batch()["input_ids"].max() < 230
    small = loader({"web": tmp_path / "web"}, vocab_size=100)
    with pytest.raises(
        IndexedDatasetError,
        match=rf"dataset 'web': {re.escape(str(tmp_path))}/web.bin holds token "
        r"id \d+, but the model's vocabulary has 100 ids .*the tokenizer "
        r"the model was built for, or raise model.vocab_size",
    ):
        for _ in range(20):
            small.next_batch()


def test_the_stats_sidecar_fails_a_vocabulary_mismatch_when_the_loader_opens(
    tmp_path, tokenizers_dir
):
    tc.tokenize(
        tc.TokenizeConfig(
            inputs=[str(f) for f in files(["en"])],
            tokenizer=tokenizers_dir["k-exaone"],
            output_prefix=tmp_path / "en",
            workers=1,
            show_progress=False,
        )
    )
    stats = json.loads((tmp_path / "en.stats.json").read_text())
    data = IndexedDataset(tmp_path / "en")
    assert stats["max_id"] == max(
        int(np.max(data.get(i))) for i in range(len(data)) if data.sequence_lengths[i]
    )
    loader({"en": tmp_path / "en"}, vocab_size=stats["max_id"] + 1).next_batch()
    folder = re.escape(str(tmp_path))
    with pytest.raises(
        IndexedDatasetError,
        match=rf"dataset 'en': {folder}/en.bin holds token ids up to "
        rf"{stats['max_id']} \({folder}/en.stats.json records "
        rf"max_id {stats['max_id']}, vocab_size 1500\)",
    ):
        loader({"en": tmp_path / "en"}, vocab_size=stats["max_id"])


# 4. Missing, truncated, garbage or unreadable shards.


def shard(path: Path) -> None:
    """A 2,048-token uint16 dataset of 3 sequences: its .bin is 4096 bytes, its .idx 102."""
    with IndexedDatasetWriter(path, np.uint16) as w:
        w.add_documents(np.arange(2048) % 500, np.array([1000, 24, 1024]))


def patch(path: Path, offset: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


def _refuses_root(path: Path) -> bool:
    try:
        path.open("rb").close()
    except PermissionError:
        return path.stat().st_size == 4096
    return False


def make_unreadable(path: Path) -> None:
    """Permission denied. Root may read any file, so then the file becomes a link to one the kernel
    refuses to read even to root: a write-only sysfs attribute, 4096 bytes like the shard's .bin."""
    if os.geteuid() != 0:
        path.chmod(0)
        return
    refusing = [p for p in sorted(Path("/sys/bus").glob("*/uevent")) if _refuses_root(p)]
    if not refusing:
        pytest.skip(
            "running as root, and no write-only sysfs file to stand in for an unreadable one"
        )
    path.unlink()
    path.symlink_to(refusing[0])


def replace_by_directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


IDX, BIN = Path("c.idx"), Path("c.bin")
# name: (what to open, relative to the shard "c" in its folder; the fault planted; what the error
# must say)
FAULTS = {
    "missing prefix": (
        "nothing",
        None,
        r"nothing.idx: file not found, so .*nothing is not a dataset; a prefix "
        r"PREFIX names the files PREFIX.bin \+ PREFIX.idx",
    ),
    "directory as prefix": (
        ".",
        None,
        r"is a directory, not a dataset prefix \(datasets in it: .*c\); a prefix "
        r"PREFIX names the files PREFIX.bin \+ PREFIX.idx",
    ),
    "empty idx": (
        "c",
        lambda d: (d / IDX).write_bytes(b""),
        r"c.idx: 0 bytes, shorter than the 34-byte MMIDIDX "
        r"header .*: re-create the dataset",
    ),
    "truncated idx": (
        "c",
        lambda d: (d / IDX).write_bytes((d / IDX).read_bytes()[:50]),
        r"c.idx: 50 bytes but its header .* needs 102; the file is truncated or corrupted: "
        r"re-create",
    ),
    "random idx": (
        "c",
        lambda d: (d / IDX).write_bytes(np.random.default_rng(0).bytes(102)),
        r"c.idx: starts with .*, not the MMIDIDX magic .*: check the path, or re-create the "
        r"dataset",
    ),
    "random idx after its header": (
        "c",
        lambda d: patch(d / IDX, 34, np.random.default_rng(1).bytes(102 - 34)),
        r"c.idx: (document boundaries|negative sequence length|sequence byte offsets)"
        r".*\(corrupted\): re-create the dataset",
    ),
    "negative length": (
        "c",
        lambda d: patch(d / IDX, 34 + 8, struct.pack("<i", -5)),
        r"c.idx: negative sequence length -5 \(corrupted\): re-create the dataset",
    ),
    "wrong offset": (
        "c",
        lambda d: patch(d / IDX, 34 + 12 + 8, struct.pack("<q", 7)),
        r"c.idx: sequence byte offsets do not match the sequence lengths \(corrupted\): re-create",
    ),
    "truncated bin": (
        "c",
        lambda d: (d / BIN).write_bytes(b"\x00" * 4000),
        r"c.bin: 4000 bytes but c.idx describes 4096 bytes \(truncated\).*: re-create the dataset",
    ),
    "trailing bin bytes": (
        "c",
        lambda d: (d / BIN).write_bytes(b"\x00" * 4100),
        r"c.bin: 4100 bytes but c.idx describes 4096 bytes \(trailing data\)",
    ),
    "idx is a directory": (
        "c",
        lambda d: replace_by_directory(d / IDX),
        r"c.idx: is not a regular file, so .*c is not a dataset",
    ),
    "unreadable idx": (
        "c",
        lambda d: make_unreadable(d / IDX),
        r"c.idx: cannot read \(Permission denied\); make the file readable",
    ),
    "unreadable bin": (
        "c",
        lambda d: make_unreadable(d / BIN),
        r"c.bin: cannot read \(Permission denied\); make the file readable",
    ),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_broken_shards_fail_with_the_file_and_what_to_do(tmp_path, fault):
    target, plant, message = FAULTS[fault]
    shard(tmp_path / "c")
    if plant:
        plant(tmp_path)
    with pytest.raises(IndexedDatasetError, match=message):
        IndexedDataset(tmp_path / target)
    with pytest.raises(IndexedDatasetError, match="dataset 'web': .*" + message):
        loader({"web": tmp_path / target}, vocab_size=None)


def test_broken_shard_reaches_the_user_as_one_line(tmp_path):
    shard(tmp_path / "c")
    (tmp_path / "c.idx").write_bytes(b"MMIDIDX\x00\x00" + b"\x01" * 40)
    done = exaone_data("inspect", str(tmp_path / "c"))
    assert done.returncode == 2 and done.stdout == ""
    [line] = done.stderr.splitlines()
    assert line.startswith(
        f"exaone-data: {tmp_path / 'c.idx'}: index version 72340172838076673, only version 1 "
    )


# 5. The data errors are user errors.


def test_data_errors_are_user_errors():
    for error in (IndexedDatasetError, tc.BadInputError, BadRecord):
        assert issubclass(error, UserError) and issubclass(error, ValueError)


def test_a_planted_index_cache_file_runs_no_code(tmp_path):
    """The loader's cached index arrays (`index-cache/*.npy`) are read without unpickling: a pickled
    object array put in their place is refused, naming the file, and its payload never runs."""
    from tests.faults import Payload

    with IndexedDatasetWriter(tmp_path / "web", np.uint16) as w:
        for doc in range(20):
            w.add_document(np.arange(40) + doc)
    loader({"web": tmp_path / "web"}, vocab_size=100).next_batch()
    (cached,) = (tmp_path / "index-cache").glob("*.npy")
    marker = tmp_path / "payload-ran"
    np.save(cached, np.array([Payload(marker)], dtype=object), allow_pickle=True)
    with pytest.raises(
        IndexedDatasetError, match=rf"{re.escape(str(cached))}: not a plain index array"
    ):
        loader({"web": tmp_path / "web"}, vocab_size=100).next_batch()
    assert not marker.exists()
