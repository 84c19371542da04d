"""`exaone-data tokenize --num-shards N` and `exaone-data merge`: shards are byte ranges of the
inputs, their merge is byte-identical to one unsharded run, the shard index comes from a Slurm
array, and mistakes are one line with exit status 2."""

import gzip
import json
import shutil
from pathlib import Path

import pytest

import data_tools.tokenize_corpus as tc
from data_tools.merge_shards import merge_shards
from data_tools.sample_corpus import files
from data_tools.shards import Shard
from megatron_exaone.data.indexed import dataset_paths
from tests.commands import exaone_data
from tests.tokenizing import interrupt_encoding

ARRAY_VARIABLES = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_MAX")
# differ between a merge and a single run by nature
RUN_KEYS = ("prefix", "seconds", "workers", "merged_from")
BAD_LINE, BAD_PROBLEM = b'{"text": 1}\n', "'text' holds a int, expected a string"
EMPTY = b'{"text": ""}\n'  # a document of no sequence (Megatron's rule)


@pytest.fixture(autouse=True)
def outside_slurm(monkeypatch):
    """Tests that run inside a Slurm array job must not pick up its task id."""
    for name in ARRAY_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[Path]:
    """Inputs of several kinds and sizes (165 KB), in this order: a 66 KB .jsonl.gz stored without
    compression, read whole (with 7 shards, one shard's range lies inside it and gets no records), a
    22 KB .jsonl, a 78 KB .jsonl with blank lines, an empty document and a bad line, split by byte
    ranges, and a small .jsonl of an empty document and a record."""
    folder = tmp_path_factory.mktemp("corpus")
    sample = [path.read_bytes() for path in files()]
    paths = [folder / name for name in ("a.jsonl.gz", "b.jsonl", "c.jsonl", "d.jsonl")]
    paths[0].write_bytes(gzip.compress(b"".join(sample[:3]), compresslevel=0))
    paths[1].write_bytes(sample[3])
    paths[2].write_bytes(
        b"\n\n".join([sample[4], EMPTY, sample[5], BAD_LINE, sample[6], sample[1]])
    )
    paths[3].write_bytes(EMPTY + b'{"text": "one record"}\n')
    return paths


def tokenize(inputs: list[Path], tokenizer: Path, prefix: Path, **kw) -> dict:
    return tc.tokenize(
        tc.TokenizeConfig(
            inputs=[str(p) for p in inputs],
            tokenizer=tokenizer,
            output_prefix=prefix,
            workers=1,
            docs_per_shard=40,  # several resumable parts per shard
            on_bad_line="skip",
            show_progress=False,
            **kw,
        )
    )


def shard_prefixes(base: Path, count: int) -> list[Path]:
    return [Shard(i, count).prefix(base) for i in range(count)]


def same_dataset(a: Path, b: Path) -> bool:
    return all(x.read_bytes() == y.read_bytes() for x, y in zip(dataset_paths(a), dataset_paths(b)))


@pytest.fixture(scope="module")
def single(corpus, tokenizers_dir, tmp_path_factory) -> tuple[Path, dict]:
    prefix = tmp_path_factory.mktemp("single") / "web"
    return prefix, tokenize(corpus, tokenizers_dir["superbpe-default"], prefix)


@pytest.mark.parametrize("count", [1, 2, 3, 7])
def test_merged_shards_are_the_bytes_of_one_run(count, corpus, single, tokenizers_dir, tmp_path):
    tok = tokenizers_dir["superbpe-default"]
    shards = [
        tokenize(corpus, tok, tmp_path / "web", num_shards=count, shard_index=i)
        for i in range(count)
    ]
    merged = merge_shards(shard_prefixes(tmp_path / "web", count), tmp_path / "merged")
    prefix, expected = single
    assert same_dataset(tmp_path / "merged", prefix)
    assert {k: v for k, v in merged.items() if k not in RUN_KEYS} == {
        k: v for k, v in expected.items() if k not in RUN_KEYS
    }
    # the bad line's FILE:LINE, counted from the file's start even when a shard begins inside it
    bad_line = corpus[2].read_bytes().split(b"\n").index(BAD_LINE.strip()) + 1
    assert merged["bad_line_examples"] == [f"{corpus[2]}:{bad_line}: {BAD_PROBLEM}"]
    assert json.loads((tmp_path / "merged.stats.json").read_text()) == merged
    ranges = [s["shard"]["byte_range"] for s in shards]
    assert ranges[0][0] == 0 and ranges[-1][1] == sum(p.stat().st_size for p in corpus)
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    b_start = corpus[0].stat().st_size
    c_start = b_start + corpus[1].stat().st_size
    c_end = c_start + corpus[2].stat().st_size
    if count > 1:  # plain files are split between shards: b with 2 shards, the large c with 3 or 7
        assert any(b_start < start < c_start or c_start < start < c_end for start, _ in ranges)
    if count == 7:  # a range inside the compressed file, which shard 0 reads whole
        assert shards[1]["documents"] == 0 and shards[1]["records"] == 0


@pytest.mark.parametrize(("count", "documents"), [(10, [1] * 10), (4, [3, 2, 3, 2])])
def test_a_record_belongs_to_the_range_holding_its_first_byte(
    count, documents, tokenizers_dir, tmp_path
):
    # 10 lines of 20 bytes: with 10 shards every range starts on a line, with 4 in the middle of one
    lines = [json.dumps({"text": f"line {i}"}).ljust(19).encode() + b"\n" for i in range(10)]
    assert {len(line) for line in lines} == {20}
    (tmp_path / "in.jsonl").write_bytes(b"".join(lines))
    inputs, tok = [tmp_path / "in.jsonl"], tokenizers_dir["k-exaone"]
    shards = [
        tokenize(inputs, tok, tmp_path / "o", num_shards=count, shard_index=i) for i in range(count)
    ]
    assert [s["documents"] for s in shards] == documents


def test_an_interrupted_shard_resumes(corpus, tokenizers_dir, tmp_path, monkeypatch):
    tok = tokenizers_dir["superbpe-default"]
    tokenize(corpus, tok, tmp_path / "full", num_shards=3, shard_index=2)
    restore = interrupt_encoding(monkeypatch)  # in the third part (one batch per part)
    with pytest.raises(KeyboardInterrupt):
        tokenize(corpus, tok, tmp_path / "web", num_shards=3, shard_index=2, batch_bytes=1 << 30)
    assert (tmp_path / "web-00002-of-00003.parts" / "part-00001.json").is_file()
    restore()
    tokenize(corpus, tok, tmp_path / "web", num_shards=3, shard_index=2, batch_bytes=1 << 30)
    assert same_dataset(tmp_path / "web-00002-of-00003", tmp_path / "full-00002-of-00003")
    assert not (tmp_path / "web-00002-of-00003.parts").exists()


def test_the_shard_index_comes_from_the_slurm_array(corpus, tokenizers_dir, tmp_path, monkeypatch):
    tok = tokenizers_dir["superbpe-default"]
    tokenize(corpus, tok, tmp_path / "api", num_shards=3, shard_index=1)
    args = ["tokenize", "--input", *map(str, corpus), "--tokenizer", str(tok), "--workers", "1"]
    args += ["--on-bad-line", "skip", "--docs-per-shard", "40", "--num-shards", "3"]
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "0")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MAX", "2")
    done = exaone_data(*args, "--output-prefix", str(tmp_path / "cli"))
    assert done.returncode == 0, done.stderr
    assert same_dataset(tmp_path / "cli-00001-of-00003", tmp_path / "api-00001-of-00003")
    # a rerun of some shards (sbatch --array=1-2): shard 0 is not its job, and it says so
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    done = exaone_data(*args, "--output-prefix", str(tmp_path / "rerun"))
    assert done.returncode == 0 and "shards 0..0 are not in it" in done.stderr
    assert (tmp_path / "rerun-00002-of-00003.bin").is_file()


def one_line_error(*args: str) -> str:
    """stderr of an `exaone-data` command that must fail on a user error."""
    done = exaone_data(*args)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    return done.stderr


def test_mistakes_are_one_line_with_exit_status_2(
    corpus, single, tokenizers_dir, tmp_path, monkeypatch
):
    tokenize_args = ["tokenize", "--input", str(corpus[1]), "--tokenizer", "unused"]
    tokenize_args += ["--output-prefix", str(tmp_path / "x")]
    assert "needs --shard-index I (0..2)" in one_line_error(*tokenize_args, "--num-shards", "3")
    assert "shard index 3 is outside 0..2" in one_line_error(
        *tokenize_args, "--num-shards", "3", "--shard-index", "3"
    )
    assert "needs --num-shards" in one_line_error(*tokenize_args, "--shard-index", "0")
    # an array numbered from 1 stops in every task, before any work
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MAX", "3")
    assert "submit it with --array=0-2" in one_line_error(*tokenize_args, "--num-shards", "3")

    inputs, tok = corpus[1:], tokenizers_dir["superbpe-default"]
    web = shard_prefixes(tmp_path / "web", 3)
    for i in range(3):
        tokenize(inputs, tok, tmp_path / "web", num_shards=3, shard_index=i)
    tokenize(inputs, tokenizers_dir["k-exaone"], tmp_path / "other", num_shards=3, shard_index=1)
    merge = ["merge", "--output-prefix", str(tmp_path / "merged")]
    missing = one_line_error(*merge, str(web[0]))
    assert "shard(s) 1-2 of 3 are not among the shards given" in missing
    assert "--array=1-2" in missing
    assert "in order 0..2" in one_line_error(*merge, str(web[0]), str(web[2]), str(web[1]))
    other = str(tmp_path / "other-00001-of-00003")
    assert f"{other} and {web[0]} are shards of different runs (different tokenizer)" in (
        one_line_error(*merge, str(web[0]), other, str(web[2]))
    )
    assert "is not a shard" in one_line_error(*merge, str(single[0]))
    for shard_file, other_file in zip(dataset_paths(web[2]), dataset_paths(web[0])):
        shutil.copy(other_file, shard_file)
    assert f"{web[2]}: the .bin holds" in one_line_error(*merge, *map(str, web))
    (web[1].with_name(web[1].name + ".stats.json")).unlink()  # as if shard 1 still ran
    web[1].with_name(web[1].name + ".parts").mkdir()
    assert f"{web[1]}: shard unfinished" in one_line_error(*merge, *map(str, web))
    assert f"{tmp_path / 'nope'}: shard not found" in one_line_error(*merge, str(tmp_path / "nope"))
    assert not (tmp_path / "merged.bin").exists()
