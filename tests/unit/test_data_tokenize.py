"""`exaone-data tokenize`: exact round trips, worker-count independence, safe splits, inputs, bad
lines, resume."""

import gzip
import json
import struct
import subprocess
import sys
import unicodedata

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

import data_tools.tokenize_corpus as tc
from data_tools.cli import main
from data_tools.encode_worker import safe_split, without_nfc
from data_tools.sample_corpus import iter_texts
from megatron_exaone.data.indexed import IndexedDataset
from tests.tokenizing import interrupt_encoding

SPECIAL_DOCS = [
    "",
    "😀🎉👩‍👩‍👧🇰🇷 emoji only",
    "한국어와 日本語と Tiếng Việt, Deutsch: Größe, español: ¿qué?",
    "<|endoftext|> written in a document is text, not a control token [EOS]",
    "a very long line " * 3000,  # no newline: never cut
    "\n".join(f"line {i}: {'word ' * (i % 13)}" for i in range(2000)),  # many safe cut points
    "def f(x):\n    return x\n\n\n\tindented\n \n  \nend:\n\n",
    "",
    "trailing newline\n",
    # encoded as its NFC form
    unicodedata.normalize("NFD", "NFD input: Tiếng Việt, 한국어, Größe\n") * 3,
]


@pytest.fixture()
def corpus(tmp_path):
    docs = SPECIAL_DOCS + list(iter_texts())
    path = tmp_path / "docs.jsonl"
    path.write_text(
        "".join(
            json.dumps({"id": i, "text": t}, ensure_ascii=False) + "\n" for i, t in enumerate(docs)
        ),
        encoding="utf-8",
    )
    return path, docs


def run(inputs, tok, prefix, **kw):
    kw.setdefault("show_progress", False)
    return tc.tokenize(
        tc.TokenizeConfig(
            inputs=[str(i) for i in inputs], tokenizer=tok, output_prefix=prefix, **kw
        )
    )


def read_docs(prefix):
    ds = IndexedDataset(prefix)
    return [ds.get(i).tolist() for i in range(len(ds))]


def test_every_document_round_trips(tmp_path, corpus, tokenizers_dir):
    path, docs = corpus
    tok_dir = tokenizers_dir["superbpe-default"]
    stats = run(
        [path], tok_dir, tmp_path / "out" / "c", workers=1, split_chars=64, docs_per_shard=50
    )
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    eod = tok.token_to_id("<|endoftext|>")
    got = read_docs(tmp_path / "out" / "c")
    # Megatron's rule: an empty document is a document of no sequence, and gets no end token
    texts = [t for t in docs if t]
    assert len(got) == len(texts) and stats["documents"] == len(docs)
    assert IndexedDataset(tmp_path / "out" / "c").num_documents == len(docs)
    for ids, text in zip(got, texts):
        assert ids[-1] == eod and eod not in ids[:-1]
        assert tok.decode(ids[:-1], skip_special_tokens=False) == unicodedata.normalize("NFC", text)
    assert stats["empty_documents"] == 2 and stats["bytes"] == sum(len(t.encode()) for t in docs)
    assert sum(not unicodedata.is_normalized("NFC", t) for t in docs) == 1
    assert stats["tokens"] == stats["text_tokens"] + len(texts) and stats["dtype"] == "uint16"
    side = json.loads((tmp_path / "out" / "c.stats.json").read_text())
    assert side["tokenizer"]["eod_id"] == eod and len(side["tokenizer"]["sha256"]) == 64
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "c.bin",
        "c.idx",
        "c.stats.json",
    ]


def test_parallel_output_is_byte_identical_to_serial_and_per_document_encoding(
    tmp_path, corpus, tokenizers_dir
):
    path, docs = corpus
    tok_dir = tokenizers_dir["k-exaone"]
    run([path], tok_dir, tmp_path / "serial", workers=1, docs_per_shard=40, batch_bytes=4096)
    run(
        [path],
        tok_dir,
        tmp_path / "parallel",
        workers=2,
        docs_per_shard=40,
        batch_bytes=4096,
        split_chars=200,
    )
    for ext in ("bin", "idx"):
        assert (tmp_path / f"serial.{ext}").read_bytes() == (
            tmp_path / f"parallel.{ext}"
        ).read_bytes()
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    tok.encode_special_tokens = True
    eod = tok.token_to_id("<|endoftext|>")
    assert read_docs(tmp_path / "serial") == [
        tok.encode(t, add_special_tokens=False).ids + [eod] for t in docs if t
    ]


SPLIT_TEXTS = [
    "Hello world!\nNext line\n\nAfter blank\n \nspace line\n\tTab\r\nWindows\r\nend",
    "a:\nb: c\n'sx\n's\n12\n345 678\n(paren)\n...\n안녕\n日本\n😀\n- item\n  indented\nZ",
    "punct!!\n??\n/path/to\n/\nx\n\n\n\ny\n\u3000ideographic\n\u00a0nbsp\n\u200bzw\nq",
    "".join(f"{w}\n" for w in ["the", "cat", ":", " sat", "on", "-", "the", "mat", "", "!", "42"])
    * 20,
]


@pytest.mark.parametrize("pretokenizer", ["superbpe-default", "k-exaone"])
def test_safe_split_never_changes_ids(tokenizers_dir, pretokenizer):
    tok = Tokenizer.from_file(str(tokenizers_dir[pretokenizer] / "tokenizer.json"))
    texts = SPLIT_TEXTS + [t for t in iter_texts() if "\n" in t][:40]
    for text in texts:
        whole = tok.encode(text, add_special_tokens=False).ids
        for target in (1, 2, 5, 17, 64):
            pieces = safe_split(text, target)
            assert "".join(pieces) == text
            assert [i for p in pieces for i in tok.encode(p, add_special_tokens=False).ids] == whole


def test_nfc_shortcut_only_where_provably_equal(tokenizers_dir):
    tok = Tokenizer.from_file(str(tokenizers_dir["k-exaone"] / "tokenizer.json"))
    fast = without_nfc(tok)
    assert fast is not None and fast.normalizer is None
    for text in SPECIAL_DOCS + list(iter_texts(["vi", "ko", "ja"])):
        if unicodedata.is_normalized("NFC", text):
            assert fast.encode(text).ids == tok.encode(text).ids
    plain = Tokenizer(models.BPE())
    assert without_nfc(plain) is None  # no NFC normalizer: nothing to skip


def test_tokenizer_that_cannot_be_split_is_caught(tmp_path):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()  # prepends "▁" to every input, so pieces differ
    tok.train_from_iterator(
        ["hello world\nagain here"] * 10,
        trainers.BpeTrainer(vocab_size=60, special_tokens=["</s>"], show_progress=False),
    )
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "hello world\nagain here\n" * 20}) + "\n")
    with pytest.raises(RuntimeError, match="--split-chars 0"):
        run([tmp_path / "d.jsonl"], tmp_path, tmp_path / "o", workers=1, split_chars=30)
    run([tmp_path / "d.jsonl"], tmp_path, tmp_path / "o", workers=1, split_chars=0)
    assert read_docs(tmp_path / "o")[0][-1] == tok.token_to_id("</s>")


def test_all_input_formats_give_the_same_shard(tmp_path, tokenizers_dir):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    docs = list(iter_texts(["ko", "code"])) + SPECIAL_DOCS[:4]
    lines = "".join(json.dumps({"body": t}) + "\n" for t in docs).encode()
    (tmp_path / "a.jsonl").write_bytes(lines)
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(lines))
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    pq.write_table(
        pa.table({"body": docs, "n": list(range(len(docs)))}),
        tmp_path / "a.parquet",
        row_group_size=7,
    )
    datasets.Dataset.from_dict({"body": docs}).save_to_disk(str(tmp_path / "hf"))
    tok_dir = tokenizers_dir["superbpe-default"]
    outputs = []
    for i, inp in enumerate(["a.jsonl", "a.jsonl.gz", "a.jsonl.zst", "a.parquet", "hf"]):
        run([tmp_path / inp], tok_dir, tmp_path / f"o{i}", workers=1, text_field="body")
        outputs.append((tmp_path / f"o{i}.bin").read_bytes())
    assert all(o == outputs[0] for o in outputs) and len(read_docs(tmp_path / "o0")) == len(
        [t for t in docs if t]
    )
    with pytest.raises(ValueError, match=r"no column 'text' \(columns: body, n\)"):
        run([tmp_path / "a.parquet"], tok_dir, tmp_path / "bad", workers=1)
    with pytest.raises(ValueError, match="unsupported input"):
        run([tmp_path / "o0.bin"], tok_dir, tmp_path / "bad", workers=1)


BAD_LINES = [
    ('{"text": "good one"}', None),
    ('{"text": "broken', "invalid JSON"),
    ('{"body": "x"}', "missing key 'text' (keys present: body)"),
    ('{"text": 42}', "'text' holds a int, expected a string"),
    ('{"text": null}', "'text' is null"),
    ('["text"]', "expected a JSON object, got list"),
    ('{"text": "\\ud800 lone"}', "'text' contains an unpaired surrogate"),
    ("", None),  # blank lines are not records
    ('{"text": "good two"}', None),
]


def test_bad_lines_fail_or_skip_with_file_and_line(tmp_path, tokenizers_dir, caplog):
    path = tmp_path / "in.jsonl"
    path.write_bytes("\n".join(line for line, _ in BAD_LINES).encode() + b"\n\xff\xfe not utf-8\n")
    tok_dir = tokenizers_dir["superbpe-default"]
    with pytest.raises(tc.BadInputError, match=rf"{path}:2: invalid JSON: .*--on-bad-line skip"):
        run([path], tok_dir, tmp_path / "o", workers=1)
    assert not (tmp_path / "o.bin").exists() and not list((tmp_path / "o.parts").glob("part-*"))
    stats = run([path], tok_dir, tmp_path / "o", workers=2, on_bad_line="skip", overwrite=True)
    assert stats["documents"] == 2 and stats["bad_lines"] == 7
    for line_no, (_, problem) in enumerate(BAD_LINES, start=1):
        if problem:
            assert f"{path}:{line_no}: {problem}" in "\n".join(stats["bad_line_examples"])
    assert f"{path}:10: skipped: line is not valid UTF-8" in caplog.text


def test_interrupted_run_resumes_without_redoing_finished_parts(
    tmp_path, corpus, tokenizers_dir, monkeypatch
):
    path, docs = corpus
    tok_dir = tokenizers_dir["superbpe-default"]
    run([path], tok_dir, tmp_path / "full", workers=1, docs_per_shard=60, batch_bytes=1 << 30)
    restore = interrupt_encoding(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run([path], tok_dir, tmp_path / "r", workers=1, docs_per_shard=60, batch_bytes=1 << 30)
    parts = sorted(p.name for p in (tmp_path / "r.parts").iterdir())
    assert parts == [
        "manifest.json",
        "part-00000.bin",
        "part-00000.idx",
        "part-00000.json",
        "part-00001.bin",
        "part-00001.idx",
        "part-00001.json",
    ]
    assert not (tmp_path / "r.bin").exists()
    with pytest.raises(ValueError, match=r"different settings \(text_field\)"):
        run([path], tok_dir, tmp_path / "r", workers=1, docs_per_shard=60, text_field="body")
    restore()
    calls, real = [], tc.encode_records
    monkeypatch.setattr(
        tc, "encode_records", lambda records: calls.append(len(records)) or real(records)
    )
    stats = run([path], tok_dir, tmp_path / "r", workers=1, docs_per_shard=60, batch_bytes=1 << 30)
    assert len(calls) == -(-len(docs) // 60) - 2 and stats["documents"] == len(docs)
    for ext in ("bin", "idx"):
        assert (tmp_path / f"r.{ext}").read_bytes() == (tmp_path / f"full.{ext}").read_bytes()
    assert not (tmp_path / "r.parts").exists()
    with pytest.raises(FileExistsError, match="--overwrite"):
        run([path], tok_dir, tmp_path / "r", workers=1)


def test_eod_options_and_int32_for_large_vocabularies(tmp_path, tokenizers_dir):
    tok = Tokenizer.from_file(str(tokenizers_dir["superbpe-default"] / "tokenizer.json"))
    (tmp_path / "d.jsonl").write_text('{"text": "hello <x64400> world"}\n{"text": ""}\n')
    run(
        [tmp_path / "d.jsonl"],
        tokenizers_dir["superbpe-default"],
        tmp_path / "noeod",
        workers=1,
        append_eod=False,
    )
    assert read_docs(tmp_path / "noeod") == [tok.encode("hello <x64400> world").ids]
    with pytest.raises(ValueError, match="'<nope>' is not in the vocabulary"):
        run(
            [tmp_path / "d.jsonl"],
            tokenizers_dir["superbpe-default"],
            tmp_path / "x",
            eod_token="<nope>",
        )
    tok.add_tokens([f"<x{i}>" for i in range(66000 - tok.get_vocab_size())])
    tok.save(str(tmp_path / "big.json"))
    stats = run(
        [tmp_path / "d.jsonl"],
        tmp_path / "big.json",
        tmp_path / "big",
        workers=1,
        eod_token="[EOS]",
    )
    assert stats["dtype"] == "int32" and IndexedDataset(tmp_path / "big").dtype == np.int32
    assert read_docs(tmp_path / "big")[0] == tok.encode("hello <x64400> world").ids + [
        tok.token_to_id("[EOS]")
    ]
    assert tok.token_to_id("<x64400>") > 65535


def test_cli_tokenize_and_inspect(tmp_path, corpus, tokenizers_dir, capsys):
    path, docs = corpus
    tok_dir = tokenizers_dir["k-exaone"]
    assert (
        main(
            [
                "tokenize",
                "--input",
                str(path),
                "--tokenizer",
                str(tok_dir),
                "--output-prefix",
                str(tmp_path / "out" / "corpus"),
                "--workers",
                "2",
                "--no-progress",
            ]
        )
        == 0
    )
    assert main(["inspect", str(tmp_path / "out"), "--samples", "2", "--max-chars", "40"]) == 0
    out = capsys.readouterr().out
    assert f"{len(docs):,} documents" in out and "bytes/token" in out and "--- sequence 0" in out
    assert main(["inspect", str(tmp_path / "out" / "corpus.idx"), "--json", "--samples", "0"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats[0]["documents"] == len(docs) and stats[0]["dtype"] == "uint16"
    (tmp_path / "out" / "corpus.idx").write_bytes(b"garbage")
    # a UserError: one line, exit status 2
    assert main(["inspect", str(tmp_path / "out" / "corpus")]) == 2


def test_module_entry_point(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "data_tools", "tokenize", "--help"], capture_output=True, text=True
    )
    assert (
        done.returncode == 0 and "--output-prefix" in done.stdout and "--on-bad-line" in done.stdout
    )


# Megatron-LM's tools/preprocess_data.py at document level (no --split-sentences), written down from
# its source: each JSON record's text is encoded whole, without special tokens; a document that
# encodes to nothing writes no tokens and no sequence (not even the end-of-document token) but still
# records a document boundary (IndexedDatasetBuilder.add_document with no lengths); with
# --append-eod every other document ends with the end-of-document id, the HF tokenizer's eos token,
# inside its one sequence; ids are uint16 below a 65,500-token vocabulary.
MEGATRON_DOCS = [
    "",
    "   ",
    "\n\n",
    "plain text.",
    "",
    "a long line without a newline " * 40_000,  # 1.2 MB: cut into pieces for the workers
    "word\n" * 250_000,  # 1.25 MB of short lines
    "last",
]


def megatron_reference(texts, tok, eod, dtype):
    """(.bin bytes, .idx bytes) by those rules and the published MMIDIDX layout."""
    sequences = []
    boundaries = [0]
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False).ids
        if ids:
            sequences.append(ids + [eod])
        boundaries.append(len(sequences))
    data = b"".join(np.asarray(s, dtype=dtype).tobytes() for s in sequences)
    lengths = [len(s) for s in sequences]
    offsets = np.cumsum([0] + lengths[:-1]) * np.dtype(dtype).itemsize
    index = (
        b"MMIDIDX\x00\x00"
        + struct.pack("<QBQQ", 1, 8, len(sequences), len(boundaries))
        + np.asarray(lengths, "<i4").tobytes()
        + np.asarray(offsets, "<i8").tobytes()
        + np.asarray(boundaries, "<i8").tobytes()
    )
    return data, index


@pytest.mark.parametrize("workers", [1, 2])
def test_output_is_megatron_preprocess_datas_bytes(tmp_path, tokenizers_dir, workers):
    tok_dir = tokenizers_dir["superbpe-default"]
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in MEGATRON_DOCS))
    stats = run(
        [path], tok_dir, tmp_path / "ours", workers=workers, eod_token="[EOS]", docs_per_shard=3
    )
    data, index = megatron_reference(MEGATRON_DOCS, tok, tok.token_to_id("[EOS]"), np.uint16)
    assert (tmp_path / "ours.bin").read_bytes() == data
    assert (tmp_path / "ours.idx").read_bytes() == index
    assert stats["documents"] == len(MEGATRON_DOCS) and stats["empty_documents"] == 2
