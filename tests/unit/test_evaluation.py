"""Evaluation pieces: bytes per token for bits per byte, the needle-in-a-haystack samples, the
evaluation batches and the gate messages."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from data_tools.sample_corpus import files
from megatron_exaone.curriculum import Gate, Stage
from megatron_exaone.data.tokenizer import load_tokenizer
from megatron_exaone.evaluation import gate_failures
from megatron_exaone.evaluation.niah import (
    ANSWER,
    NEEDLE,
    QUESTION,
    NiahSettings,
    _batch,
    _sample,
    niah_lengths,
)
from megatron_exaone.evaluation.text_bytes import sentence_end_tokens, token_byte_lengths
from megatron_exaone.evaluation.validation import build_eval_set


def _option(overrides: list[str], key: str) -> str:
    return next(o.split("=", 1)[1] for o in overrides if o.startswith(f"{key}="))


@pytest.fixture(scope="module")
def tokenizer_dir(sample_data) -> Path:
    return Path(_option(sample_data, "data.tokenizer"))


@pytest.fixture(scope="module")
def shard_prefix(sample_data) -> str:
    return _option(sample_data, "data.datasets.sample").strip("[]")


def test_token_bytes_add_up_to_the_decoded_text(tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    lengths = token_byte_lengths(tokenizer_dir, tokenizer.get_vocab_size() + 100)
    assert (lengths[tokenizer.get_vocab_size() :] == 0).all()  # padding past the tokenizer
    assert lengths[tokenizer.token_to_id("<|endoftext|>")] == 0  # special: not text
    for path in files():
        for line in path.read_text(encoding="utf-8").splitlines()[:5]:
            text = json.loads(line)["text"]
            ids = tokenizer.encode(text).ids
            assert lengths[ids].sum() == len(tokenizer.decode(ids).encode()) == len(text.encode())


def test_eval_sets_are_fixed_and_count_their_bytes(shard_prefix, tokenizer_dir, tmp_path):
    vocab = load_tokenizer(tokenizer_dir).get_vocab_size()
    lengths = token_byte_lengths(tokenizer_dir, vocab)

    def build(dp, holdout=None):
        return build_eval_set(
            "sample", [shard_prefix], 64, 600, dp, holdout=holdout, cache_dir=tmp_path,
            vocab_size=vocab, byte_lengths=lengths,
        )  # fmt: skip

    one, three = build(1), build(3)
    assert one.input_ids.shape == (10, 64) and three.input_ids.shape == (12, 64)  # ceil(600/64)
    # the padding rows have no labels, so every layout evaluates the same tokens
    assert torch.equal(three.input_ids[:10], one.input_ids) and (three.labels[10:] == -100).all()
    assert one.tokens == three.tokens == int((one.labels != -100).sum())
    assert one.text_bytes == int(lengths[one.labels[one.labels != -100].numpy()].sum())
    held = build(1, holdout=0.2)
    assert not torch.equal(held.input_ids, one.input_ids)
    assert torch.equal(build(1, holdout=0.2).input_ids, held.input_ids)


SETTINGS = NiahSettings(
    lengths=[0.25, 0.5, 1.0], depths=[0.0, 0.5, 1.0], trials=2, candidates=4, key_digits=5, seed=0
)


def test_niah_lengths_fit_the_layout():
    assert niah_lengths(SETTINGS, 1024, multiple=8) == [256, 512, 1024]
    assert niah_lengths(SETTINGS, 100, multiple=16) == [16, 48, 96]


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_a_niah_sample_holds_the_needle_at_its_depth_and_labels_only_the_answer(
    tokenizer_dir, depth
):
    tokenizer = load_tokenizer(tokenizer_dir)

    def encode(text):
        return tokenizer.encode(text, add_special_tokens=False).ids

    text = " ".join(json.loads(line)["text"] for line in files()[0].read_text().splitlines())
    haystack = np.asarray(encode(text))
    ends = sentence_end_tokens(tokenizer_dir, tokenizer.get_vocab_size())
    sample = _sample(SETTINGS, encode, haystack, ends, 256, depth, trial=1)
    rows = sample.rows
    assert len(rows) == SETTINGS.candidates
    prompt = rows[0][0][: rows[0][1]]
    assert all(ids[:start] == prompt for ids, start in rows)  # one prompt, four answers
    question = encode(QUESTION)
    assert prompt[-len(question) :] == question
    answers = [ids[start:] for ids, start in rows]
    keys = [tokenizer.decode(a).strip().rstrip(".") for a in answers]
    assert len(set(keys)) == 4 and all(len(k) == 5 and k.isdigit() for k in keys)
    needle = encode(NEEDLE.format(key=keys[0]))  # the true key is candidate 0
    at = next(i for i in range(len(prompt)) if prompt[i : i + len(needle)] == needle)
    room = len(prompt) - len(needle) - len(question)
    # at the sentence end nearest to the depth
    boundaries = [0, room] + [
        i + 1 for i in range(room) if ends[prompt[i if i < at else i + len(needle)]]
    ]
    assert at in boundaries
    assert at in (0, room) or tokenizer.decode(prompt[at - 1 : at]).rstrip().endswith(".")
    assert abs(at - depth * room) == min(abs(b - depth * room) for b in boundaries)
    assert all(len(ids) <= 256 for ids, _ in rows)
    assert [tokenizer.decode(a) for a in answers[:1]] == [ANSWER.format(key=keys[0])]

    input_ids, labels = _batch(rows, 256, dp=3, pad_token_id=0)
    assert input_ids.shape == (6, 256) and (labels[4:] == -100).all()
    for row, (ids, start) in enumerate(rows):
        labelled = torch.nonzero(labels[row] != -100).flatten().tolist()
        assert labelled == list(range(start - 1, len(ids) - 1))
        assert labels[row, labelled].tolist() == ids[start:]
    # the same sample every time (the gate must be reproducible)
    assert _sample(SETTINGS, encode, haystack, ends, 256, depth, trial=1) == sample


def test_gate_failures_name_the_stage_metric_and_value():
    stage = Stage(
        "ctx32k", tokens=64, seq_len=64, global_batch_size=1,
        gates=[Gate(min=0.9, on_fail="stop"), Gate(min=0.5, on_fail="warn")],
    )  # fmt: skip
    failures = gate_failures(2, stage, {"eval/niah/acc": 0.6})
    assert [(gate.on_fail, message) for gate, message in failures] == [
        ("stop", "stage 2 (ctx32k) failed its gate: eval/niah/acc = 0.600, below the minimum 0.9")
    ]
    assert len(gate_failures(2, stage, {"eval/niah/acc": 0.2})) == 2
    assert gate_failures(2, stage, {"eval/niah/acc": 0.95}) == []
