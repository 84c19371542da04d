"""Tokenization throughput: `exaone-data tokenize` against a straightforward per-document loop.

Both use the same tokenizer, the same number of worker processes and the same shard writer; the
baseline is the Megatron `tools/preprocess_data.py` pattern (a process pool maps one `encode()` per
JSON line, chunksize 32, and the main process writes each document). Both outputs must be
byte-identical. Each variant runs in a fresh subprocess so its peak memory is its own; runs
alternate and the fastest of `--repeat` counts, which damps noise from other work on the machine.

    python benchmarks/bench_tokenize.py [--mb 30] [--workers 2] [--repeat 3] [--tokenizer PATH]

Prints `tokenize: X MB/s (R x vs per-document loop baseline Y MB/s), peak RSS ...`.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from multiprocessing import get_context
from pathlib import Path

import numpy as np

_tok = None


def _init_baseline(path: str) -> None:
    global _tok
    from tokenizers import Tokenizer

    _tok = Tokenizer.from_file(path)
    _tok.encode_special_tokens = True


def _encode_line(line: str) -> list[int]:
    return _tok.encode(json.loads(line)["text"], add_special_tokens=False).ids


def baseline(corpus: Path, tokenizer: Path, prefix: Path, workers: int) -> None:
    from megatron_exaone.data.indexed import IndexedDatasetWriter, optimal_dtype
    from megatron_exaone.data.tokenizer import load_tokenizer, resolve_eod

    tok = load_tokenizer(tokenizer)
    _, eod = resolve_eod(tokenizer, tok)
    with (
        get_context("spawn").Pool(workers, _init_baseline, (str(tokenizer),)) as pool,
        open(corpus, encoding="utf-8") as lines,
        IndexedDatasetWriter(prefix, optimal_dtype(tok.get_vocab_size())) as writer,
    ):
        for ids in pool.imap(_encode_line, lines, 32):
            writer.add_document(np.array(ids + [eod]))


def ours(corpus: Path, tokenizer: Path, prefix: Path, workers: int) -> None:
    from data_tools.tokenize_corpus import TokenizeConfig, tokenize

    tokenize(
        TokenizeConfig(
            inputs=[corpus],
            tokenizer=tokenizer,
            output_prefix=prefix,
            workers=workers,
            show_progress=False,
        )
    )


def make_corpus(path: Path, megabytes: float) -> None:
    """Documents recombined from the sample corpus's paragraphs, in all its languages."""
    from data_tools.sample_corpus import iter_texts

    paragraphs = [p for text in iter_texts() for p in text.split("\n\n")]
    rng, size = random.Random(0), 0
    with open(path, "w", encoding="utf-8") as f:
        while size < megabytes * 1e6:
            text = "\n\n".join(rng.sample(paragraphs, rng.randint(1, 12)))
            line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
            f.write(line)
            size += len(line.encode())


def default_tokenizer(out: Path) -> Path:
    from data_tools.sample_corpus import files
    from data_tools.train_tokenizer import TrainTokenizerConfig, train_tokenizer

    train_tokenizer(
        TrainTokenizerConfig(
            inputs=files(),
            output=out,
            vocab_size=8000,
            pretokenizer="k-exaone",
            show_progress=False,
        )
    )
    return out / "tokenizer.json"


def run_variant(name: str, corpus: Path, tokenizer: Path, prefix: Path, workers: int) -> dict:
    """Run one variant in a fresh interpreter: wall and CPU seconds (all processes), peak RSS (MB)
    of the main process and of its largest worker."""
    code = (
        f"import sys, json, time, resource; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
        f"import bench_tokenize as b; from pathlib import Path; t = time.perf_counter(); "
        f"b.{name}(Path({str(corpus)!r}), Path({str(tokenizer)!r}), "
        f"Path({str(prefix)!r}), {workers}); "
        "me = resource.getrusage(resource.RUSAGE_SELF); "
        "kids = resource.getrusage(resource.RUSAGE_CHILDREN); "
        "print(json.dumps({'seconds': time.perf_counter() - t, "
        "'cpu_seconds': me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime, "
        "'main_mb': me.ru_maxrss / 1024, 'worker_mb': kids.ru_maxrss / 1024}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=30.0, help="corpus size in MB (default 30)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs per variant, fastest counts (default 3)"
    )
    parser.add_argument(
        "--tokenizer",
        type=Path,
        help="tokenizer.json (default: SuperBPE, 8000 tokens, trained here)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        tokenizer = args.tokenizer or default_tokenizer(tmp / "tok")
        corpus = tmp / "corpus.jsonl"
        make_corpus(corpus, args.mb)
        mb = corpus.stat().st_size / 1e6
        runs: dict[str, list[dict]] = {"baseline": [], "ours": []}
        for _ in range(args.repeat):
            for name, prefix in (("baseline", "base"), ("ours", "ours")):
                for f in tmp.glob(f"{prefix}.*"):
                    f.unlink()
                runs[name].append(run_variant(name, corpus, tokenizer, tmp / prefix, args.workers))
        base, fast = (min(runs[n], key=lambda r: r["seconds"]) for n in ("baseline", "ours"))
        identical = all(
            (tmp / f"base.{e}").read_bytes() == (tmp / f"ours.{e}").read_bytes()
            for e in ("bin", "idx")
        )
    print(
        f"corpus: {mb:.1f} MB JSONL, {args.workers} workers, outputs identical: {identical}; "
        f"seconds per run: ours {[round(r['seconds'], 2) for r in runs['ours']]}, baseline "
        f"{[round(r['seconds'], 2) for r in runs['baseline']]}"
    )
    print(
        f"tokenize: {mb / fast['seconds']:.2f} MB/s ({base['seconds'] / fast['seconds']:.2f}x vs "
        f"per-document loop baseline {mb / base['seconds']:.2f} MB/s), peak RSS main "
        f"{fast['main_mb']:.0f} MB + largest worker {fast['worker_mb']:.0f} MB (baseline "
        f"{base['main_mb']:.0f} + {base['worker_mb']:.0f} MB)"
    )
    cpu = {n: min(r["cpu_seconds"] for r in runs[n]) for n in runs}
    print(
        f"tokenize cpu: {mb / cpu['ours']:.2f} MB per CPU-second "
        f"({cpu['baseline'] / cpu['ours']:.2f}x vs baseline {mb / cpu['baseline']:.2f}); less "
        "sensitive than wall time to other work on the machine"
    )
    if not identical:
        sys.exit("outputs differ")


if __name__ == "__main__":
    main()
