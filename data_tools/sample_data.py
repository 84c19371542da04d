"""The embedded default data (`data.prepare_sample` of exaone-train): a SuperBPE tokenizer and
Megatron shards built from the bundled sample corpus. `exaone-data prepare-sample DIR --vocab-size
N` runs it."""

from __future__ import annotations

import logging
from pathlib import Path

from data_tools import sample_corpus
from data_tools.tokenize_corpus import TokenizeConfig, tokenize
from data_tools.train_tokenizer import TrainTokenizerConfig, train_tokenizer

log = logging.getLogger(__name__)


def prepare_sample_data(data_dir: Path, vocab_size: int) -> tuple[Path, Path]:
    """Train a tokenizer on the bundled corpus and tokenize it into DATA_DIR/sample.{bin,idx}; reuse
    both when they already exist (a resumed run). Returns (tokenizer directory, shard prefix)."""
    inputs = [str(p) for p in sample_corpus.files()]
    tokenizer_dir = data_dir / "tokenizer"
    prefix = data_dir / "sample"
    if not (tokenizer_dir / "tokenizer.json").is_file():
        log.info(
            "training a SuperBPE tokenizer (vocab %d) on the bundled sample corpus", vocab_size
        )
        train_tokenizer(
            TrainTokenizerConfig(inputs=inputs, output=tokenizer_dir, vocab_size=vocab_size)
        )
    if not prefix.with_suffix(".idx").is_file():
        log.info("tokenizing the bundled corpus into Megatron .bin/.idx shards under %s", data_dir)
        tokenize(
            TokenizeConfig(
                inputs=inputs, tokenizer=str(tokenizer_dir), output_prefix=str(prefix), workers=2
            )
        )
    return tokenizer_dir, prefix
