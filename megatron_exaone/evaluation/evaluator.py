"""Evaluation on every rank of a layout: validation loss, perplexity and bits per byte of each
evaluation dataset, and the needle-in-a-haystack retrieval check; used by the trainer (in the loop,
at stage ends, for stage gates) and by `exaone-eval`."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from megatron_exaone.config.schema import EvalConfig, TrainConfig
from megatron_exaone.data.tokenizer import load_tokenizer
from megatron_exaone.model import ModelConfig
from megatron_exaone.parallel.mesh import ParallelDims
from megatron_exaone.parallel.step import StepRunner

from .niah import NiahSettings, niah_metrics
from .text_bytes import sentence_end_tokens, token_byte_lengths
from .validation import EvalSet, build_eval_set, validation_metrics


class Evaluator:
    """`evaluate(seq_len, niah_seq_len)` -> the metrics record (`eval/<dataset>/loss|ppl|bpb`,
    `eval/niah/...`, `eval/time_s`), the same on every rank.

    `training`: the training datasets (name -> absolute shard prefixes); `config.datasets`'
    prefixes are resolved against `run_dir`. Evaluation batches are built once per sequence
    length and kept."""

    def __init__(
        self,
        config: EvalConfig,
        runner: StepRunner,
        dims: ParallelDims,
        training: dict[str, list[str]],
        run_dir: str | os.PathLike,
        tokenizer_dir: str | os.PathLike | None,
        vocab_size: int,
        pad_token_id: int,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        self.config, self.runner, self.dims = config, runner, dims
        self.training = training
        self.shards = {
            name: [str((Path(run_dir) / Path(p).expanduser()).absolute()) for p in prefixes]
            for name, prefixes in config.datasets.items()
        }
        self.tokenizer_dir = tokenizer_dir
        self.vocab_size, self.pad_token_id, self.cache_dir = vocab_size, pad_token_id, cache_dir
        self.byte_lengths = (
            token_byte_lengths(tokenizer_dir, vocab_size) if tokenizer_dir is not None else None
        )
        self._sets: dict[tuple[str, int], EvalSet] = {}
        self._sentence_ends: np.ndarray | None = None

    @classmethod
    def for_run(
        cls, cfg: TrainConfig, runner: StepRunner, dims: ParallelDims, model_config: ModelConfig
    ) -> Evaluator:
        """The evaluator of a run's configuration (its datasets, tokenizer and caches, resolved
        against run_dir as training resolves them)."""
        data, run_dir = cfg.data, cfg.run_dir
        return cls(
            cfg.eval,
            runner,
            dims,
            data.resolved_datasets(run_dir),
            run_dir,
            data.resolved_path(data.tokenizer, run_dir),
            model_config.vocab_size,
            model_config.pad_token_id or 0,
            data.resolved_path(data.cache_dir, run_dir),
        )

    @property
    def dataset_names(self) -> list[str]:
        return self.config.dataset_names()

    def evaluate(
        self, seq_len: int | None, niah_seq_len: int | None = None
    ) -> dict[str, float | None]:
        """Validation of every evaluation dataset in sequences of `seq_len` (None: none) and the
        needle-in-a-haystack accuracies at `niah_seq_len` (None: none), with the wall time."""
        start = time.perf_counter()
        record: dict[str, float | None] = {}
        if seq_len is not None:
            for name in self.dataset_names:
                record.update(validation_metrics(self.runner, self.eval_set(name, seq_len)))
        if niah_seq_len is not None:
            record.update(self.niah(niah_seq_len))
        record["eval/time_s"] = time.perf_counter() - start
        return record

    def eval_set(self, name: str, seq_len: int) -> EvalSet:
        key = (name, seq_len)
        if key not in self._sets:
            holdout = self.config.holdout.get(name)
            prefixes = self.shards.get(name) or self.training[name]
            self._sets[key] = build_eval_set(
                name,
                prefixes,
                seq_len,
                self.config.tokens,
                self.dims.dp,
                holdout=holdout,
                cache_dir=self.cache_dir,
                vocab_size=self.vocab_size,
                pad_token_id=self.pad_token_id,
                byte_lengths=self.byte_lengths,
            )
        return self._sets[key]

    def niah(self, seq_len: int) -> dict[str, float]:
        """Needle-in-a-haystack accuracies at `seq_len` and the configured shorter lengths (needs
        the tokenizer; `TrainConfig` checks that a run asking for niah names one)."""
        niah = self.config.niah
        name = niah.dataset or next(iter(self.dataset_names or self.training))
        rows = self.eval_set(name, seq_len).input_ids.numpy().ravel()
        haystack = rows[self.byte_lengths[rows] > 0]  # text only: no document ends, no padding
        tokenizer = load_tokenizer(self.tokenizer_dir)
        if self._sentence_ends is None:
            self._sentence_ends = sentence_end_tokens(self.tokenizer_dir, self.vocab_size)
        settings = NiahSettings(
            niah.lengths, niah.depths, niah.trials, niah.candidates, niah.key_digits, niah.seed
        )
        return niah_metrics(
            self.runner,
            settings,
            lambda text: tokenizer.encode(text, add_special_tokens=False).ids,
            np.asarray(haystack),
            self._sentence_ends,
            seq_len,
            multiple=2 * self.dims.cp * self.dims.tp,
            dp=self.dims.dp,
            pad_token_id=self.pad_token_id,
        )
