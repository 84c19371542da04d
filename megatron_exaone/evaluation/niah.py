"""Needle in a haystack: can the model find a pass key anywhere in its context?

Each sample is a haystack of evaluation text with a needle sentence holding a random key inserted
at a depth (0 = the start, 1 = just before the question; at the sentence end nearest to it, as
needle-in-a-haystack tests place their needles), then a question whose answer is the key.
The model scores every candidate answer (the true key and `candidates - 1` other keys with as many
digits) by its log-likelihood through the training forward, with no sampling; a sample counts as
found when the true key is the most likely. Accuracy is reported overall (`eval/niah/acc`), per
length (`eval/niah/acc/len_<tokens>`) and per depth (`eval/niah/acc/depth_<percent>`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from megatron_exaone.model.loss import IGNORE_INDEX
from megatron_exaone.parallel.step import StepRunner

NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = " What is the pass key? The pass key is"
ANSWER = " {key}."


@dataclass(frozen=True)
class NiahSettings:
    """`lengths` and `depths` as fractions (of the sequence length and of the haystack); see
    `config.schema.NiahConfig`."""

    lengths: Sequence[float]
    depths: Sequence[float]
    trials: int
    candidates: int
    key_digits: int
    seed: int


def niah_lengths(settings: NiahSettings, seq_len: int, multiple: int) -> list[int]:
    """The sample lengths in tokens for sequences of `seq_len`: each fraction rounded down to a
    multiple of `multiple` (what the layout's sequence split needs), at least one multiple."""
    return sorted(
        {
            max(multiple, int(fraction * seq_len) // multiple * multiple)
            for fraction in settings.lengths
        }
    )


def niah_metrics(
    runner: StepRunner,
    settings: NiahSettings,
    encode: Callable[[str], list[int]],
    haystack: np.ndarray,
    sentence_ends: np.ndarray,
    seq_len: int,
    multiple: int,
    dp: int,
    pad_token_id: int,
) -> dict[str, float]:
    """Run the samples of every length through `runner` (one batch per length); accuracies by
    length, depth and overall. `haystack`: a stream of text token ids (no special tokens) the
    haystacks are cut from; `sentence_ends`: by token id, whether a token ends a sentence;
    `encode` turns the needle, question and answers into ids."""
    found: dict[tuple[int, float], list[bool]] = defaultdict(list)
    for length in niah_lengths(settings, seq_len, multiple):
        samples = [
            _sample(settings, encode, haystack, sentence_ends, length, depth, trial)
            for depth in settings.depths
            for trial in range(settings.trials)
        ]
        rows = [row for sample in samples for row in sample.rows]
        input_ids, labels = _batch(rows, length, dp, pad_token_id)
        position_ids = torch.arange(length).expand_as(input_ids)
        losses = runner.sequence_losses(input_ids, labels, position_ids)
        for i, sample in enumerate(samples):
            first = i * settings.candidates
            scores = losses[first : first + settings.candidates]
            # the true key (candidate 0) must be strictly the most likely
            found[(length, sample.depth)].append(bool((scores[1:] > scores[0]).all()))
    return _accuracies(found)


@dataclass(frozen=True)
class _Sample:
    depth: float
    rows: list[tuple[list[int], int]]  # (token ids, where the answer starts) per candidate


def _sample(
    settings: NiahSettings,
    encode: Callable[[str], list[int]],
    haystack: np.ndarray,
    sentence_ends: np.ndarray,
    length: int,
    depth: float,
    trial: int,
) -> _Sample:
    rng = np.random.default_rng([settings.seed, length, round(depth * 1000), trial])
    low = 10 ** (settings.key_digits - 1)
    keys = low + rng.choice(9 * low, size=settings.candidates, replace=False)
    needle = encode(NEEDLE.format(key=keys[0]))
    question = encode(QUESTION)
    answers = [encode(ANSWER.format(key=key)) for key in keys]
    room = length - len(needle) - len(question) - max(map(len, answers))
    if room < 1:
        raise ValueError(
            f"a needle-in-a-haystack sample of {length} tokens has no room for a haystack (the "
            f"needle, question and answer take {length - room}); use longer eval.niah.lengths."
        )
    start = int(rng.integers(len(haystack)))
    hay = np.resize(np.roll(haystack, -start), room)
    at = _sentence_boundary(hay, sentence_ends, round(depth * room))
    hay = hay.tolist()
    prompt = hay[:at] + needle + hay[at:] + question
    return _Sample(depth, [(prompt + answer, len(prompt)) for answer in answers])


def _sentence_boundary(hay: np.ndarray, sentence_ends: np.ndarray, target: int) -> int:
    """The place nearest `target` (the earlier on a tie) where a sentence ends: the start, the end,
    or after a token that ends one; `target` itself when the haystack has no sentence end."""
    boundaries = np.concatenate([[0], np.flatnonzero(sentence_ends[hay]) + 1, [len(hay)]])
    if len(boundaries) == 2 and 0 < target < len(hay):
        return target
    return int(boundaries[np.argmin(np.abs(boundaries - target))])


def _batch(
    rows: list[tuple[list[int], int]], length: int, dp: int, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs padded to `length`, labels only on the answers' tokens (the label at position t is
    the token at t + 1); rows padded to a multiple of `dp` with label-less rows."""
    count = len(rows) + (-len(rows) % dp)
    input_ids = torch.full((count, length), pad_token_id, dtype=torch.long)
    labels = torch.full((count, length), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, answer_start) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, answer_start - 1 : len(ids) - 1] = torch.tensor(ids[answer_start:])
    return input_ids, labels


def _accuracies(found: dict[tuple[int, float], list[bool]]) -> dict[str, float]:
    def mean(groups: list[list[bool]]) -> float:
        flat = [hit for group in groups for hit in group]
        return sum(flat) / len(flat)

    lengths = sorted({length for length, _ in found})
    depths = sorted({depth for _, depth in found})
    metrics = {"eval/niah/acc": mean(list(found.values()))}
    for length in lengths:
        metrics[f"eval/niah/acc/len_{length}"] = mean(
            [hits for (n, _), hits in found.items() if n == length]
        )
    for depth in depths:
        metrics[f"eval/niah/acc/depth_{round(depth * 100)}"] = mean(
            [hits for (_, d), hits in found.items() if d == depth]
        )
    return metrics
