"""Training-time data: packing, position ids, mixtures, rank splits, exact resume and the index
cache."""

import threading
import time

import numpy as np
import pytest
import torch

import megatron_exaone.data.loader as loader_mod
from megatron_exaone.data import DataStage, IndexedDatasetWriter, MixtureLoader
from megatron_exaone.data.cache import cached_array
from megatron_exaone.data.mixture import blend
from megatron_exaone.data.packing import EpochIndex, assemble, build_epoch

STRIDE = 1000  # token = base + doc * STRIDE + position: every token says where it came from


def make_dataset(path, num_docs, seed, base=0, max_len=120):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, max_len, num_docs)
    lengths[:3] = [0, 1, max_len * 3]  # empty, single-token and longer-than-a-sample documents
    with IndexedDatasetWriter(path, np.int32) as w:
        for d, n in enumerate(lengths):
            w.add_document(base + d * STRIDE + np.arange(n))
    return lengths


@pytest.fixture()
def data(tmp_path):
    return {
        name: (tmp_path / name, make_dataset(tmp_path / name, 300, seed=i, base=i * 10_000_000))
        for i, name in enumerate(["web", "code", "math"])
    }


def origin(tokens):
    t = np.asarray(tokens)
    return (t % 10_000_000) // STRIDE, t % STRIDE  # (document, position in document)


def check_sample(input_ids, labels, position_ids):
    """Position ids restart exactly where a new document starts; labels are the inputs shifted by
    one."""
    real = labels != -100
    doc, pos = origin(input_ids)
    new_doc = np.r_[True, (doc[1:] != doc[:-1]) | (pos[1:] != pos[:-1] + 1)]
    expected = np.zeros(len(input_ids), np.int64)
    for i in range(1, len(expected)):
        expected[i] = 0 if new_doc[i] else expected[i - 1] + 1
    n_real = int(real.sum()) + 1 if not real.all() else len(input_ids)
    assert np.array_equal(position_ids[:n_real], expected[:n_real])
    assert np.array_equal(labels[:-1][real[:-1]], input_ids[1:][real[:-1]])


def read(lengths):
    return lambda seq, start, count: seq * STRIDE + np.arange(start, start + count)


@pytest.mark.parametrize("mode", ["concat", "best_fit"])
def test_epoch_packing_covers_every_token_once(mode):
    lengths = np.random.default_rng(0).integers(0, 90, 400)
    seq_len = 64
    index = EpochIndex(build_epoch(mode, lengths, seq_len, np.random.default_rng(1)), mode, seq_len)
    seen, cut = [], set()
    for i in range(index.num_samples):
        pieces = index.pieces(i)
        inputs, labels, positions = assemble(pieces, read(lengths), seq_len, pad_id=0)
        check_sample(inputs, labels, positions)
        seen += [(s, o + k) for s, o, n in pieces for k in range(n)][1:]  # tokens used as labels
        cut |= {s for s, o, n in pieces if o > 0 or o + n < lengths[s]}
    predictable = {(d, p) for d, n in enumerate(lengths) for p in range(1, n)}
    if mode == "best_fit":
        # Every predictable token is a label exactly once; documents that fit a sample are never
        # cut.
        labelled = [
            (s, o + k)
            for i in range(index.num_samples)
            for s, o, n in index.pieces(i)
            for k in range(1, n)
        ]
        assert sorted(labelled) == sorted(predictable)
        assert not {s for s in cut if lengths[s] <= seq_len + 1}
    else:
        assert len(set(seen)) == len(seen) == index.num_samples * seq_len
        assert index.num_samples == (lengths.sum() - 1) // seq_len
        assert {s for s in cut if lengths[s] <= seq_len + 1}  # concatenation does cut documents


def test_best_fit_pads_with_ignored_labels():
    lengths = np.array([10, 30, 50, 7, 64, 65, 100])
    index = EpochIndex(
        build_epoch("best_fit", lengths, 64, np.random.default_rng(0)), "best_fit", 64
    )
    padded = 0
    for i in range(index.num_samples):
        inputs, labels, positions = assemble(index.pieces(i), read(lengths), 64, pad_id=-7)
        fill = sum(n for _, _, n in index.pieces(i))
        assert (labels[: fill - 1] != -100).all()
        if fill < 65:
            assert (inputs[fill:] == -7).all() and (labels[fill - 1 :] == -100).all()
            assert fill == 64 or positions[fill] == 0  # padding is a document of its own
            padded += 1
    assert padded and index.num_samples < len(lengths) + 2


def test_blend_follows_weights_at_every_prefix_and_any_window():
    w = [0.5, 0.3, 0.2, 0.0]
    d, k = blend(w, 0, 20_000)
    counts = np.stack([np.cumsum(d == i) for i in range(4)])
    expected = np.outer(np.array(w) / sum(w), np.arange(1, 20_001))
    assert np.abs(counts - expected).max() <= 1.0 and counts[3, -1] == 0
    for i in range(3):  # each dataset's samples come in order 0, 1, 2, ...
        assert np.array_equal(k[d == i], np.arange((d == i).sum()))
    for start, stop in [(0, 1), (7, 8), (1234, 1300), (19_000, 20_000), (10**9, 10**9 + 50)]:
        d2, k2 = blend(w, start, stop)
        if stop <= 20_000:
            assert np.array_equal(d2, d[start:stop]) and np.array_equal(k2, k[start:stop])
        assert len(d2) == stop - start
    far_d, far_k = blend([1, 1, 1], 3 * 10**9, 3 * 10**9 + 3)
    assert sorted(far_d) == [0, 1, 2] and set(far_k) == {10**9}
    with pytest.raises(ValueError, match="not all zero"):
        blend([0, 0], 0, 1)


def make_loader(data, stages, **kw):
    kw.setdefault("seq_len", 32)
    kw.setdefault("global_batch_size", 8)
    return MixtureLoader({n: p for n, (p, _) in data.items()}, stages, **kw)


def test_mixture_proportions_and_sample_contents(data):
    loader = make_loader(data, [{"web": 0.6, "code": 0.3, "math": 0.1}], global_batch_size=32)
    sources = []
    for _ in range(40):
        batch = loader.next_batch()
        assert all(v.dtype == torch.int64 and v.shape == (32, 32) for v in batch.values())
        for row in range(32):
            inputs, labels, positions = (
                batch[k][row].numpy() for k in ("input_ids", "labels", "position_ids")
            )
            check_sample(inputs, labels, positions)
            sources.append(int(inputs[0]) // 10_000_000)
    share = np.bincount(sources, minlength=3) / len(sources)
    assert np.allclose(share, [0.6, 0.3, 0.1], atol=0.01)
    assert loader.state_dict() == {
        "seed": 1234,
        "stage": 0,
        "tokens_consumed": 40 * 32 * 32,
        "stage_start_tokens": 0,
    }


@pytest.mark.parametrize("packing", ["concat", "best_fit"])
def test_resume_is_exact_across_stages_and_rank_layouts(data, packing):
    stages = [
        {"web": 1, "code": 1},
        DataStage({"math": 2, "code": 1}, seq_len=48, global_batch_size=4),
    ]

    def run(loader, steps, resume_from=None):
        out = []
        for step in range(steps):
            if step == 3:
                loader.set_stage(1)
            if resume_from is None or step >= resume_from:
                out.append(loader.next_batch())
        return out

    full = run(make_loader(data, stages, packing=packing, seed=5), 8)
    assert full[2]["input_ids"].shape == (8, 32) and full[3]["input_ids"].shape == (4, 48)
    for stop in (2, 5):
        first = make_loader(data, stages, packing=packing, seed=5)
        run(first, stop)
        state = first.state_dict()
        assert all(type(v) is int for v in state.values())
        resumed = make_loader(data, stages, packing=packing, seed=5)
        resumed.load_state_dict(state)
        rest = run(resumed, 8, resume_from=stop)
        assert len(rest) == 8 - stop
        for a, b in zip(full[stop:], rest):
            assert all(torch.equal(a[k], b[k]) for k in a)
    # Two data-parallel ranks together see exactly the single-rank global batch.
    ranks = [
        run(make_loader(data, stages, packing=packing, seed=5, dp_rank=r, dp_size=2), 8)
        for r in (0, 1)
    ]
    for step, batch in enumerate(full):
        for key in batch:
            assert torch.equal(torch.cat([ranks[0][step][key], ranks[1][step][key]]), batch[key])
    other_seed = make_loader(data, stages, packing=packing, seed=6).next_batch()
    assert not torch.equal(other_seed["input_ids"], full[0]["input_ids"])


def test_index_is_built_once_and_reused(data, monkeypatch, tmp_path):
    calls = []
    real = loader_mod.build_epoch
    monkeypatch.setattr(loader_mod, "build_epoch", lambda *a: calls.append(a[0]) or real(*a))
    first = make_loader(data, [{"web": 1}], cache_dir=tmp_path / "cache").next_batch()
    assert calls == ["concat"] and len(list((tmp_path / "cache").glob("web-concat-*.npy"))) == 1
    again = make_loader(data, [{"web": 1}], cache_dir=tmp_path / "cache").next_batch()
    assert calls == ["concat"] and torch.equal(first["input_ids"], again["input_ids"])
    make_loader(data, [{"web": 1}], cache_dir=tmp_path / "cache", seed=99).next_batch()
    assert calls == ["concat", "concat"]


def test_waits_for_another_builder(tmp_path):
    path = tmp_path / "idx.npy"
    lock = tmp_path / "idx.npy.lock"
    lock.write_text("other rank\n")

    def other_rank():
        time.sleep(0.3)
        np.save(path, np.arange(5))
        lock.unlink()

    threading.Thread(target=other_rank).start()
    got = cached_array(path, lambda: pytest.fail("a second process built the index"))
    assert got.tolist() == [0, 1, 2, 3, 4]


def test_configuration_errors_are_explained(data, tmp_path):
    with pytest.raises(ValueError, match=r"unknown datasets \['books'\]"):
        make_loader(data, [{"books": 1}])
    with pytest.raises(ValueError, match="not a positive multiple of dp_size 3"):
        make_loader(data, [{"web": 1}], dp_size=3)
    with pytest.raises(ValueError, match="packing must be one of"):
        make_loader(data, [{"web": 1}], packing="greedy")
    loader = make_loader(data, [{"web": 1}])
    with pytest.raises(ValueError, match="differs from this loader's seed"):
        loader.load_state_dict(
            {"seed": 1, "stage": 0, "tokens_consumed": 0, "stage_start_tokens": 0}
        )
    with pytest.raises(ValueError, match="stage 4 does not exist"):
        loader.set_stage(4)
    with IndexedDatasetWriter(tmp_path / "tiny", np.uint16) as w:
        w.add_document(np.arange(10))
    with pytest.raises(ValueError, match="dataset 'tiny': 10 tokens cannot fill one sample"):
        MixtureLoader(
            {"tiny": tmp_path / "tiny"}, [{"tiny": 1}], seq_len=32, global_batch_size=2
        ).next_batch()


# ------------------------------------------------------------------------------------ held out
def documents_read(loader, name, batches=100):
    """The documents of dataset `name` a loader's batches contain."""
    seen = set()
    for _ in range(batches):
        batch = loader.next_batch()
        docs, _ = origin(batch["input_ids"].numpy().ravel())
        real = batch["labels"].numpy().ravel() != -100
        seen |= set(docs[real].tolist())
    return seen


def test_held_out_documents_are_never_trained_on(data):
    path, lengths = data["web"]
    documents = np.flatnonzero(lengths > 0)  # the document of each sequence (empty ones have none)
    held = loader_mod.held_out_documents(len(documents), 0.2, "web")
    assert 0.1 < held.mean() < 0.3
    # a fixed function of the index and the name: more documents keep the earlier ones' fate
    more = loader_mod.held_out_documents(len(documents) + 50, 0.2, "web")
    assert np.array_equal(more[: len(documents)], held)
    assert not np.array_equal(loader_mod.held_out_documents(len(documents), 0.2, "code"), held)

    def loader(held_out):
        return MixtureLoader(
            {"web": path}, [{"web": 1.0}], 32, 8, seed=3, holdout={"web": 0.2}, held_out=held_out
        )

    training, evaluation = documents_read(loader(False), "web"), documents_read(loader(True), "web")
    assert training and evaluation and not training & evaluation
    assert training <= set(documents[~held].tolist())
    assert evaluation <= set(documents[held].tolist())
    # every epoch goes through all the documents a loader may read
    assert training | evaluation == set(documents.tolist())


def test_a_holdout_that_leaves_nothing_is_refused(data):
    path, _ = data["web"]
    with pytest.raises(ValueError, match="leaves no evaluation documents"):
        MixtureLoader({"web": path}, [{"web": 1.0}], 32, 8, holdout={"web": 1e-9}, held_out=True)
