"""The embedded default data: a SuperBPE tokenizer and Megatron shards built from the bundled sample corpus."""

from __future__ import annotations

import logging
from pathlib import Path

from data_tools import sample_corpus
from data_tools.cli import main as exaone_data

log = logging.getLogger(__name__)


def _exaone_data(argv: list[str]) -> None:
    if exaone_data(argv) != 0:
        raise RuntimeError(f"exaone-data {argv[0]} failed (see the messages above)")


def prepare_sample_data(data_dir: Path, vocab_size: int) -> tuple[Path, Path]:
    """Train a tokenizer on the bundled corpus and tokenize it into DATA_DIR/sample.{bin,idx}; reuse both when
    they already exist (a resumed run). Returns (tokenizer directory, shard prefix)."""
    inputs = [str(p) for p in sample_corpus.files()]
    tokenizer_dir = data_dir / "tokenizer"
    prefix = data_dir / "sample"
    if not (tokenizer_dir / "tokenizer.json").is_file():
        log.info("training a SuperBPE tokenizer (vocab %d) on the bundled sample corpus", vocab_size)
        _exaone_data(["train-tokenizer", "--input", *inputs, "--vocab-size", str(vocab_size),
                      "--output", str(tokenizer_dir)])
    if not prefix.with_suffix(".idx").is_file():
        log.info("tokenizing the bundled corpus into Megatron .bin/.idx shards under %s", data_dir)
        _exaone_data(["tokenize", "--input", *inputs, "--tokenizer", str(tokenizer_dir), "--output-prefix",
                      str(prefix), "--workers", "2"])
    return tokenizer_dir, prefix
