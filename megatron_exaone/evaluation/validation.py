"""Validation loss, perplexity and bits per byte of an evaluation dataset.

An `EvalSet` is a fixed batch: the dataset's first sequences of one length in a packing that
depends on nothing but the dataset (not the run's seed, layout or position), so every layout and
every resumed run evaluates the same tokens. `validation_metrics` runs it through the training
forward (`StepRunner.sequence_losses`).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from megatron_exaone.data.loader import MixtureLoader
from megatron_exaone.model.loss import IGNORE_INDEX
from megatron_exaone.parallel.step import StepRunner

log = logging.getLogger("megatron_exaone.eval")
EVAL_SEED = 0  # fixed, so that runs with different seeds evaluate the same tokens


@dataclass(frozen=True)
class EvalSet:
    """[rows, seq_len] inputs, labels and position ids (rows padded to a multiple of the
    data-parallel size with sequences that have no labels); `tokens`: the labels evaluated;
    `text_bytes`: the UTF-8 bytes those labels decode to (None without a tokenizer)."""

    name: str
    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    tokens: int
    text_bytes: int | None


def build_eval_set(
    name: str,
    prefixes: Sequence[str | os.PathLike],
    seq_len: int,
    tokens: int,
    dp: int,
    *,
    holdout: float | None = None,
    cache_dir: str | os.PathLike | None = None,
    vocab_size: int | None = None,
    pad_token_id: int = 0,
    byte_lengths: np.ndarray | None = None,
) -> EvalSet:
    """The first `tokens` tokens (whole sequences, at least one) of dataset `name` in sequences of
    `seq_len`, packed as training packs ("concat", documents masked from each other). `holdout`:
    read only the documents the training dataset `name` holds out
    (`data.loader.held_out_documents`)."""
    loader = MixtureLoader(
        {name: list(prefixes)},
        [{name: 1.0}],
        seq_len=seq_len,
        global_batch_size=1,
        seed=EVAL_SEED,
        packing="concat",
        pad_token_id=pad_token_id,
        cache_dir=cache_dir,
        vocab_size=vocab_size,
        holdout={name: holdout} if holdout else None,
        held_out=bool(holdout),
    )
    available = int(loader.sources[name].lengths.sum())
    rows = max(1, math.ceil(tokens / seq_len))
    if rows * seq_len > available:
        rows = max(1, available // seq_len)
        log.warning(
            "evaluation dataset %s holds %s tokens, fewer than eval.tokens=%s: evaluating %d "
            "sequence(s) of %d",
            name,
            f"{available:,}",
            f"{tokens:,}",
            rows,
            seq_len,
        )
    batch = loader.next_batch(rows)
    padding = -rows % dp
    input_ids = _pad_rows(batch["input_ids"], padding, pad_token_id)
    labels = _pad_rows(batch["labels"], padding, IGNORE_INDEX)
    position_ids = torch.cat(
        [batch["position_ids"], torch.arange(seq_len).expand(padding, seq_len)]
    )
    valid = labels[labels != IGNORE_INDEX]
    text_bytes = int(byte_lengths[valid.numpy()].sum()) if byte_lengths is not None else None
    return EvalSet(name, input_ids, labels, position_ids, int(valid.numel()), text_bytes)


def _pad_rows(x: torch.Tensor, rows: int, value: int) -> torch.Tensor:
    return torch.cat([x, x.new_full((rows, x.shape[1]), value)])


def validation_metrics(runner: StepRunner, eval_set: EvalSet) -> dict[str, float | None]:
    """`eval/<name>/loss` (mean next-token CE, nats), `/ppl` and `/bpb` (bits per UTF-8 byte of
    the evaluated text; None without a tokenizer)."""
    total = float(
        runner.sequence_losses(eval_set.input_ids, eval_set.labels, eval_set.position_ids)
        .double()
        .sum()
    )
    loss = total / max(1, eval_set.tokens)
    bpb = total / (math.log(2) * eval_set.text_bytes) if eval_set.text_bytes else None
    prefix = f"eval/{eval_set.name}"
    return {
        f"{prefix}/loss": loss,
        f"{prefix}/ppl": math.exp(min(loss, 700.0)),
        f"{prefix}/bpb": bpb,
    }
