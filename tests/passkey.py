"""Synthetic pass-key text for the needle-in-a-haystack tests: documents of filler sentences with
the evaluation's own needle sentence somewhere among them and its question and answer at the end
(the pass-key task of Mohtashami & Jaggi, 2023, "Landmark Attention"), and filler-only documents to
cut haystacks from. One-digit keys: the tiny model learns to fetch one in a few hundred steps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from megatron_exaone.evaluation.niah import ANSWER, NEEDLE, QUESTION

FILLER = (
    " The grass is green.",
    " The sky is blue.",
    " The sun is yellow.",
    " Here we go.",
    " There and back again.",
)


def _filler(rng: np.random.Generator, sentences: int) -> str:
    return "".join(FILLER[i] for i in rng.integers(len(FILLER), size=sentences))


def write_corpora(directory: Path, documents: int, seed: int = 0) -> tuple[Path, Path]:
    """`passkey.jsonl` (up to 4 filler sentences around a needle, then the question and its answer:
    under 64 tokens) and `filler.jsonl` (haystack text); returns their paths."""
    rng = np.random.default_rng(seed)
    passkey, filler = directory / "passkey.jsonl", directory / "filler.jsonl"
    with passkey.open("w") as out:
        for _ in range(documents):
            key = int(rng.integers(1, 10))
            sentences = int(rng.integers(0, 5))
            before = int(rng.integers(0, sentences + 1))
            text = (
                _filler(rng, before)
                + NEEDLE.format(key=key)
                + _filler(rng, sentences - before)
                + QUESTION
                + ANSWER.format(key=key)
            )
            out.write(json.dumps({"text": text}) + "\n")
    with filler.open("w") as out:
        for _ in range(200):
            out.write(json.dumps({"text": _filler(rng, 60)}) + "\n")
    return passkey, filler
