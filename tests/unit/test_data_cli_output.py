"""What `exaone-data` writes when its output is a pipe or a log file (a Slurm job), not a terminal:
one parseable JSON document for `inspect --json`, no progress-bar debris, the text actually read."""

import json
import logging
import shutil
import subprocess
from pathlib import Path

import pytest

import data_tools.progress
from data_tools.cli import main
from data_tools.progress import human_bytes
from data_tools.sample_corpus import files, iter_texts
from data_tools.sample_data import prepare_sample_data
from tests.commands import exaone_data

CORPUS_BYTES = sum(len(t.encode("utf-8")) for t in iter_texts())


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory) -> Path:
    data_dir = tmp_path_factory.mktemp("sample")
    prepare_sample_data(data_dir, vocab_size=1000)
    return data_dir


@pytest.fixture(scope="module")
def piped_training(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """train-tokenizer with progress on (the default), its output piped."""
    out = tmp_path_factory.mktemp("tok")
    done = exaone_data(
        "train-tokenizer",
        "--input",
        *map(str, files()),
        "--vocab-size",
        "1000",
        "--output",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    return done, out


def test_inspect_json_is_one_document_holding_the_samples(sample_dir):
    done = exaone_data("inspect", str(sample_dir), "--json", "--samples", "2", "--max-chars", "50")
    assert done.returncode == 0 and done.stderr == ""
    [shard] = json.loads(done.stdout)
    assert shard["documents"] == 233 and len(shard["samples"]) == 2
    first = shard["samples"][0]
    assert first["sequence"] == 0 and first["tokens"] > 0
    assert len(first["text"]) == 50 and first["more_characters"] > 0
    # without --json: the same sample as text, as before
    text = exaone_data("inspect", str(sample_dir), "--samples", "2", "--max-chars", "50").stdout
    assert f"--- sequence 0 ({first['tokens']} tokens) ---\n{first['text']}" in text
    assert f" [... {first['more_characters']} more characters]" in text


def test_inspect_json_notes_an_undecodable_shard_on_stderr(sample_dir, tmp_path):
    for suffix in (".bin", ".idx"):  # no stats sidecar: no tokenizer known
        shutil.copy(sample_dir / f"sample{suffix}", tmp_path / f"bare{suffix}")
    done = exaone_data("inspect", str(tmp_path / "bare"), "--json")
    assert done.returncode == 0
    [shard] = json.loads(done.stdout)
    assert shard["samples"] is None
    assert "no tokenizer known" in done.stderr and "--tokenizer" in done.stderr


def test_piped_training_writes_no_blank_lines_or_carriage_returns(piped_training):
    done, _ = piped_training
    assert "\r" not in done.stdout and "\r" not in done.stderr
    assert "" not in done.stdout.splitlines() and "" not in done.stderr.splitlines()
    assert done.stdout.startswith("held-out bytes/token")


def test_piped_tokenize_logs_progress_lines(sample_dir, tmp_path, monkeypatch, caplog, capsys):
    monkeypatch.setattr(data_tools.progress, "LOG_EVERY_S", 0.0)
    caplog.set_level(logging.INFO, logger="exaone_data")
    args = ["--tokenizer", str(sample_dir / "tokenizer"), "--output-prefix", str(tmp_path / "t")]
    assert main(["tokenize", "--input", *map(str, files()), *args, "--workers", "1"]) == 0
    assert "\r" not in capsys.readouterr().err
    assert any(m.startswith("tokenize: ") and "%" in m for m in caplog.messages)


def test_log_reports_the_text_read_not_the_cap(piped_training):
    done, out = piped_training
    line = f"read {human_bytes(CORPUS_BYTES)} of text in 233 documents, all of the inputs"
    assert done.stderr.count(line) == 2  # stage 1 and stage 2
    read = json.loads((out / "superbpe_report.json").read_text())["text_read"]
    assert read["stage1"]["bytes"] == read["stage2"]["bytes"] == CORPUS_BYTES
    assert not read["stage1"]["capped"] and read["stage1"]["documents"] == 233


def test_log_says_when_the_cap_cut_the_corpus_short(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="exaone_data")
    args = ["--vocab-size", "1000", "--output", str(tmp_path), "--no-progress"]
    caps = ["--max-bytes", "40K", "--stage2-max-bytes", "20K"]
    assert main(["train-tokenizer", "--input", *map(str, files()), *args, *caps]) == 0
    stage1 = json.loads((tmp_path / "superbpe_report.json").read_text())["text_read"]["stage1"]
    assert stage1["capped"] and 40 << 10 <= stage1["bytes"] < CORPUS_BYTES
    assert (
        f"stage 1: read {human_bytes(stage1['bytes'])} of text in {stage1['documents']} documents, "
        "capped by --max-bytes 40.0 KiB: the inputs hold more than that" in caplog.text
    )
    assert "capped by --stage2-max-bytes 20.0 KiB" in caplog.text


def test_files_an_input_directory_does_not_read_are_reported(tmp_path, tokenizers_dir):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text('{"text": "read me"}\n')
    (corpus / "b.txt").write_text("plain text that is not read\n")
    (corpus / "c.csv").write_text("text\nnot read either\n")
    done = exaone_data(
        "tokenize", "--input", str(corpus), "--tokenizer", str(tokenizers_dir["superbpe-default"]),
        "--output-prefix", str(tmp_path / "out"), "--workers", "1",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (
        f"{corpus}: skipping 2 file(s) that are not .jsonl[.gz|.zst] or .parquet: b.txt, c.csv"
        in done.stderr
    )
