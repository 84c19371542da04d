"""SuperBPE against plain byte-level BPE on held-out text of a multilingual corpus, per language.

    python benchmarks/bench_superbpe.py CORPUS_DIR [--vocab 32768 65536]
        [--held-out-fraction 0.05] [--fractions 0.7 0.8 0.9] [--out-dir /tmp/superbpe_bench]

CORPUS_DIR holds one JSONL file per language (benchmarks/debian_corpus.py writes one; all.jsonl is
ignored). Every tokenizer is trained by the project's own trainer
(`data_tools.train_tokenizer.train_tokenizer`) on all languages together, and measured by it:

- held-out split: the trainer's own, every k-th document of each language (k = 1 /
  --held-out-fraction, so every 20th by default), the same documents in every run; they are left
  out of both training stages.
- plain BPE is the trainer's stage 1: byte-level BPE trained to the full vocabulary (the
  baseline in superbpe_report.json); SuperBPE keeps its merges up to the transition point and
  learns the rest in stage 2. BPE time is the stage-1 time, SuperBPE time both stages.

Runs: each --vocab at --default-fraction, then the other --fractions at --tune-vocab to choose the
default transition point. Prints `name: value` lines and tables, writes OUT_DIR/results.json and
keeps each tokenizer in OUT_DIR/v<vocab>_t<fraction>/.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from data_tools.train_tokenizer import TrainTokenizerConfig, train_tokenizer

STAGE_LOG = re.compile(r"^stage (\d): .*, ([\d.]+) s$")


class StageTimes(logging.Handler):
    """Collects the trainer's "stage N: ..., 12.3 s" log lines."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seconds: dict[int, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if m := STAGE_LOG.match(record.getMessage()):
            self.seconds[int(m.group(1))] = float(m.group(2))


@dataclass(frozen=True)
class Run:
    vocab: int
    fraction: float

    @property
    def name(self) -> str:
        return f"v{self.vocab}_t{self.fraction:g}"


def language_files(corpus: Path) -> list[Path]:
    files = sorted(p for p in corpus.glob("*.jsonl") if p.name != "all.jsonl")
    if not files:
        raise SystemExit(f"{corpus}: no <lang>.jsonl files (build them with debian_corpus.py)")
    return files


def train(run: Run, files: list[Path], out_dir: Path, args: argparse.Namespace) -> dict:
    """One training; its report plus wall-clock and per-stage seconds."""
    times = StageTimes()
    logger = logging.getLogger("exaone_data")
    logger.addHandler(times)
    started = time.monotonic()
    try:
        report = train_tokenizer(
            TrainTokenizerConfig(
                inputs=files,
                output=out_dir / run.name,
                vocab_size=run.vocab,
                stage1_fraction=run.fraction,
                max_bytes=args.max_bytes,
                stage2_max_bytes=args.max_bytes,
                heldout_fraction=args.held_out_fraction,
                show_progress=False,
            )
        )
    finally:
        logger.removeHandler(times)
    report["wall_seconds"] = time.monotonic() - started
    report["bpe_seconds"] = times.seconds.get(1)
    report["stage2_seconds"] = times.seconds.get(2)
    report["stage1_fraction"] = run.fraction
    return report


def held_out_texts(files: list[Path], every: int) -> dict[str, list[str]]:
    """The trainer's held-out documents when nothing is capped: every k-th of each language."""
    out: dict[str, list[str]] = {}
    for path in files:
        with open(path, encoding="utf-8") as f:
            docs = [json.loads(line) for line in f]
        for i, doc in enumerate(docs, 1):
            if i % every == 0:
                text = unicodedata.normalize("NFC", doc["text"])
                out.setdefault(doc.get("lang") or path.stem, []).append(text)
    return out


def verify(report: dict, tokenizer: Path, files: list[Path], every: int) -> float:
    """Largest relative difference between the report's SuperBPE bytes/token and a re-encoding
    of the held-out documents with the saved tokenizer.json (checks what the report measures)."""
    tok = Tokenizer.from_file(str(tokenizer))
    worst = 0.0
    rows = {r["group"]: r for r in report["heldout"]}
    for lang, texts in held_out_texts(files, every).items():
        nbytes = sum(len(t.encode("utf-8")) for t in texts)
        ids = sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False))
        ours, theirs = nbytes / ids, rows[lang]["superbpe_bytes_per_token"]
        worst = max(worst, abs(ours / theirs - 1))
    return worst


def print_run(report: dict) -> None:
    v, t = report["vocab_size"], report["transition_point"]
    print(
        f"\n== vocab {v}, transition point {t} ({report['stage1_fraction']:g}): "
        f"BPE {report['bpe_seconds']:.0f} s, SuperBPE {report['wall_seconds']:.0f} s "
        f"(stage 2 {report['stage2_seconds']:.0f} s), {report['superwords_in_vocab']:,} "
        "superwords in the vocabulary"
    )
    print(f"{'lang':<7}{'held-out':>11}{'BPE b/t':>9}{'SuperBPE b/t':>14}{'fewer tokens':>14}")
    for r in report["heldout"]:
        print(
            f"{r['group']:<7}{r['bytes']:>11,}{r['bpe_bytes_per_token']:>9.3f}"
            f"{r['superbpe_bytes_per_token']:>14.3f}{r['token_reduction']:>14.1%}"
        )
    for r in report["heldout"]:
        print(
            f"superbpe_gain_v{v}_{r['group']}: {r['token_reduction']:.1%} fewer tokens "
            f"(bytes/token {r['bpe_bytes_per_token']:.3f} -> {r['superbpe_bytes_per_token']:.3f}"
            f", x{r['superbpe_bytes_per_token'] / r['bpe_bytes_per_token']:.3f})"
        )


def print_summary(by_vocab: list[dict]) -> None:
    """Bytes/token per language, one column group per vocabulary size."""
    head = "".join(
        f"{'BPE ' + str(r['vocab_size']):>11}{'SuperBPE':>10}{'gain':>8}" for r in by_vocab
    )
    print(f"\n{'lang':<7}{head}")
    for i, row in enumerate(by_vocab[0]["heldout"]):
        cells = ""
        for report in by_vocab:
            r = report["heldout"][i]
            cells += (
                f"{r['bpe_bytes_per_token']:>11.3f}{r['superbpe_bytes_per_token']:>10.3f}"
                f"{r['token_reduction']:>8.1%}"
            )
        print(f"{row['group']:<7}{cells}")
    for r in by_vocab:
        print(
            f"train_seconds_v{r['vocab_size']}: BPE {r['bpe_seconds']:.0f}, SuperBPE "
            f"{r['wall_seconds']:.0f} (x{r['wall_seconds'] / r['bpe_seconds']:.2f})"
        )


def print_transitions(tuning: list[dict]) -> float:
    """Overall held-out bytes/token per transition point; returns the best fraction."""
    print(f"\n{'fraction':<10}{'t':>7}{'SuperBPE b/t':>14}{'fewer tokens':>14}{'stage 2 s':>11}")
    for r in tuning:
        total = r["heldout"][-1]
        print(
            f"{r['stage1_fraction']:<10g}{r['transition_point']:>7}"
            f"{total['superbpe_bytes_per_token']:>14.3f}{total['token_reduction']:>14.1%}"
            f"{r['stage2_seconds']:>11.0f}"
        )
    best = max(tuning, key=lambda r: r["heldout"][-1]["superbpe_bytes_per_token"])
    print(f"best_transition_fraction: {best['stage1_fraction']:g} (on held-out bytes/token)")
    return best["stage1_fraction"]


def byte_count(text: str) -> int:
    """1000000, 64M or 1G (binary units, as the trainer's --max-bytes)."""
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:].upper(), 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def plan(args: argparse.Namespace) -> list[Run]:
    runs = [Run(v, args.default_fraction) for v in args.vocab]
    runs += [Run(args.tune_vocab, f) for f in args.fractions if Run(args.tune_vocab, f) not in runs]
    return runs


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("corpus_dir", type=Path)
    ap.add_argument("--vocab", type=int, nargs="+", default=[32768, 65536])
    ap.add_argument("--held-out-fraction", type=float, default=0.05)
    ap.add_argument("--default-fraction", type=float, default=0.8)
    ap.add_argument("--fractions", type=float, nargs="*", default=[0.7, 0.8, 0.9])
    ap.add_argument("--tune-vocab", type=int, default=32768)
    ap.add_argument(
        "--max-bytes",
        type=byte_count,
        default=1 << 30,
        help="text read per stage, held-out included (trainer's --max-bytes and "
        "--stage2-max-bytes; default 1 GiB, i.e. all of a Debian corpus)",
    )
    ap.add_argument("--out-dir", type=Path, default=Path("/tmp/superbpe_bench"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    files = language_files(args.corpus_dir)
    every = round(1 / args.held_out_fraction)
    print(f"languages: {', '.join(p.stem for p in files)}; held out: every {every}th document")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    reports: dict[str, dict] = {}
    for run in plan(args):
        reports[run.name] = report = train(run, files, args.out_dir, args)
        print_run(report)
        if not report["text_read"]["stage1"]["capped"] and len(reports) == 1:
            worst = verify(report, args.out_dir / run.name / "tokenizer.json", files, every)
            print(f"check_reencode_vs_report: max relative difference {worst:.2e}")
        results = {"args": {k: str(v) for k, v in vars(args).items()}, "runs": reports}
        (args.out_dir / "results.json").write_text(json.dumps(results, indent=1))
    print_summary([reports[Run(v, args.default_fraction).name] for v in args.vocab])
    tuning = [reports[Run(args.tune_vocab, f).name] for f in sorted(set(args.fractions))]
    if len(tuning) > 1:
        results["best_transition_fraction"] = print_transitions(tuning)
    (args.out_dir / "results.json").write_text(json.dumps(results, indent=1))
    print(f"results: {args.out_dir / 'results.json'}")


if __name__ == "__main__":
    main()
