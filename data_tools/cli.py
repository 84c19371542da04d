"""`exaone-data`: train a SuperBPE tokenizer, tokenize a corpus into Megatron shards (on one machine
or as shards of a cluster job, then merged), inspect shards, prepare the bundled sample data.

Argument parsing only; the work is done by data_tools.train_tokenizer, .tokenize_corpus,
.inspect_shards and .sample_data.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path

from data_tools.superbpe import PRETOKENIZERS
from megatron_exaone.errors import UserError, one_line, reported

log = logging.getLogger("exaone_data")


def _size(text: str) -> int:
    """Byte counts like 512M, 2G or 1000000."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().removesuffix("B")
    return int(float(text[:-1]) * units[text[-1]]) if text and text[-1] in units else int(text)


def _add_input(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="FILE",
        help=".jsonl[.gz|.zst], .parquet, a saved HF dataset directory, or a directory of such "
        "files",
    )


def _add_train_tokenizer(sub: argparse._SubParsersAction) -> None:
    from data_tools.train_tokenizer import DEFAULT_SPECIAL_TOKENS

    p = sub.add_parser(
        "train-tokenizer",
        help="train a two-stage SuperBPE tokenizer -> DIR/tokenizer.json",
        description="Stage 1: byte-level BPE with whitespace-aware pretokens up to the transition "
        "point; stage 2: superword merges across single spaces. Prints bytes/token "
        "against stage-1-only BPE of the same size on held-out text, per language.",
    )
    _add_input(p)
    p.add_argument(
        "--vocab-size",
        type=int,
        required=True,
        help="final vocabulary size, special tokens included",
    )
    p.add_argument("--output", required=True, metavar="DIR")
    stage = p.add_mutually_exclusive_group()
    stage.add_argument(
        "--transition-point",
        type=int,
        help="vocabulary size at which stage 2 starts (default: stage1-fraction x vocab size)",
    )
    stage.add_argument(
        "--stage1-fraction",
        type=float,
        default=0.8,
        help="transition point as a fraction of the vocabulary (default 0.8)",
    )
    p.add_argument(
        "--pretokenizer",
        choices=sorted(PRETOKENIZERS),
        default="superbpe-default",
        help="regex pair: superbpe-default (superwords across spaces and punctuation) or k-exaone "
        "(K-EXAONE's published regex: letter runs joined by single spaces)",
    )
    p.add_argument(
        "--special-tokens",
        nargs="+",
        default=list(DEFAULT_SPECIAL_TOKENS),
        metavar="[ROLE=]TOKEN",
        help="special tokens in id order; roles pad/bos/eos/eod/unk (default: %(default)s)",
    )
    p.add_argument(
        "--max-bytes", type=_size, default=1 << 30, help="text sampled for stage 1 (default 1G)"
    )
    p.add_argument(
        "--stage2-max-bytes",
        type=_size,
        default=256 << 20,
        help="text sampled for stage 2, which holds its windows in memory (default 256M)",
    )
    p.add_argument(
        "--heldout-fraction",
        type=float,
        default=0.1,
        help="share of each language's documents held out for the comparison (default 0.1)",
    )
    p.add_argument(
        "--max-words", type=int, default=4, help="most words in one superword token (default 4)"
    )
    p.add_argument("--text-field", default="text")
    p.add_argument(
        "--group-field",
        default="lang",
        help="field naming each document's language for the report (default: lang; else file name)",
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=_run_train_tokenizer)


def _run_train_tokenizer(args: argparse.Namespace) -> None:
    from data_tools.train_tokenizer import TrainTokenizerConfig, format_report, train_tokenizer

    report = train_tokenizer(
        TrainTokenizerConfig(
            inputs=args.input,
            output=args.output,
            vocab_size=args.vocab_size,
            transition_point=args.transition_point,
            stage1_fraction=args.stage1_fraction,
            pretokenizer=args.pretokenizer,
            special_tokens=args.special_tokens,
            max_bytes=args.max_bytes,
            stage2_max_bytes=args.stage2_max_bytes,
            heldout_fraction=args.heldout_fraction,
            max_words=args.max_words,
            text_field=args.text_field,
            group_field=args.group_field,
            show_progress=not args.no_progress,
        )
    )
    print(format_report(report))


def _add_tokenize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tokenize",
        help="tokenize documents into Megatron PREFIX.bin/.idx + PREFIX.stats.json",
        description="Parallel, resumable tokenization. The output prefix is a Megatron data path.",
    )
    _add_input(p)
    p.add_argument(
        "--tokenizer",
        required=True,
        metavar="PATH",
        help="a tokenizer.json or a directory holding one",
    )
    p.add_argument("--output-prefix", required=True, metavar="PREFIX")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes (default: the CPUs this process may use; 1 encodes in this process)",
    )
    p.add_argument("--text-field", default="text")
    p.add_argument("--split", help="split to read from a saved DatasetDict")
    eod = p.add_mutually_exclusive_group()
    eod.add_argument(
        "--eod-token",
        help="token appended after each document (default: tokenizer_config.json's "
        "eod_token or eos_token, else <|endoftext|> and similar)",
    )
    eod.add_argument("--no-eod", action="store_true", help="append nothing after documents")
    p.add_argument(
        "--on-bad-line",
        choices=("fail", "skip"),
        default="fail",
        help="a malformed record stops the run (default) or is skipped and counted",
    )
    p.add_argument(
        "--docs-per-shard",
        type=int,
        default=100_000,
        help="records per resumable part (default 100000); finished parts survive an interruption",
    )
    p.add_argument(
        "--split-chars",
        type=int,
        default=16_384,
        help="cut longer documents where no token can cross (line breaks, space runs, number "
        "edges) for parallel encoding, ids unchanged; 0 never cuts (then a document too long for "
        "the tokenizer's regex engine is a bad line)",
    )
    p.add_argument(
        "--num-shards",
        type=int,
        metavar="N",
        help="tokenize only shard I of N (a byte range of the inputs; one Slurm array task each) "
        "into PREFIX-IIIII-of-NNNNN; `exaone-data merge` joins the N shards",
    )
    p.add_argument(
        "--shard-index",
        type=int,
        metavar="I",
        help="which shard, 0..N-1 (default: $SLURM_ARRAY_TASK_ID)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing PREFIX.bin/.idx")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=_run_tokenize)


def _run_tokenize(args: argparse.Namespace) -> None:
    from data_tools.tokenize_corpus import CPUS, TokenizeConfig, tokenize

    tokenize(
        TokenizeConfig(
            inputs=args.input,
            tokenizer=args.tokenizer,
            output_prefix=args.output_prefix,
            workers=args.workers or CPUS,
            text_field=args.text_field,
            split=args.split,
            append_eod=not args.no_eod,
            eod_token=args.eod_token,
            on_bad_line=args.on_bad_line,
            docs_per_shard=args.docs_per_shard,
            split_chars=args.split_chars,
            overwrite=args.overwrite,
            show_progress=not args.no_progress,
            num_shards=args.num_shards,
            shard_index=args.shard_index,
        )
    )


def _add_merge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge",
        help="join the N shards of `tokenize --num-shards N` into one PREFIX.bin/.idx",
        description="Concatenates the shards into the bytes one unsharded `tokenize` run writes, "
        "and sums their statistics. Every shard of the run must be there, in order.",
    )
    p.add_argument(
        "shards",
        nargs="+",
        metavar="SHARD",
        help="the shard prefixes in order, e.g. out/web-0000{0,1,2}-of-00003 (the glob "
        "out/web-?????-of-00003 sorts right)",
    )
    p.add_argument("--output-prefix", required=True, metavar="PREFIX")
    p.add_argument("--overwrite", action="store_true", help="replace an existing PREFIX.bin/.idx")
    p.set_defaults(run=_run_merge)


def _run_merge(args: argparse.Namespace) -> None:
    from data_tools.merge_shards import merge_shards

    merge_shards(args.shards, args.output_prefix, args.overwrite)


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect", help="statistics and decoded samples of a shard or a directory of shards"
    )
    p.add_argument("path", metavar="PATH", help="dataset prefix, its .bin/.idx, or a directory")
    p.add_argument(
        "--tokenizer", help="for decoding samples (default: the one in PREFIX.stats.json)"
    )
    p.add_argument(
        "--samples", type=int, default=3, help="documents to decode per shard (default 3)"
    )
    p.add_argument(
        "--max-chars", type=int, default=500, help="characters shown per sample (default 500)"
    )
    p.add_argument(
        "--json",
        action="store_true",
        help='print one JSON list: per shard, its statistics and its decoded documents ("samples")',
    )
    p.set_defaults(run=_run_inspect)


def _run_inspect(args: argparse.Namespace) -> None:
    from data_tools import inspect_shards as shards

    stats = shards.inspect(args.path, args.tokenizer, args.samples, args.max_chars)
    if not args.json:
        print(shards.format_stats(stats))
        for block in shards.format_samples(stats):
            print(block)
        return
    # stdout holds the one JSON document (samples inside it); notes go to stderr
    for note in shards.undecoded(stats):
        log.warning("%s", note)
    print(json.dumps(stats, indent=2))


def _add_prepare_sample(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare-sample",
        help="the bundled sample corpus as a tokenizer and shards (exaone-train's "
        "data.prepare_sample)",
    )
    p.add_argument(
        "output", metavar="DIR", help="writes DIR/tokenizer/ and DIR/sample.{bin,idx}; reuses them"
    )
    p.add_argument("--vocab-size", type=int, required=True)
    p.set_defaults(run=_run_prepare_sample)


def _run_prepare_sample(args: argparse.Namespace) -> None:
    from data_tools.sample_data import prepare_sample_data

    # Slurm's time-limit warning reaches every process of a job step; the trainer that runs this
    # decides.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    prepare_sample_data(Path(args.output), args.vocab_size)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="exaone-data", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train_tokenizer(sub)
    _add_tokenize(sub)
    _add_merge(sub)
    _add_inspect(sub)
    _add_prepare_sample(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="exaone-data: %(message)s", stream=sys.stderr)
    try:
        # a UserError (bad input, corrupted shard): one line, exit status 2
        with reported("exaone-data"):
            args.run(args)
    except SystemExit as e:
        return int(e.code)
    # let through by `reported` only when $MEGATRON_EXAONE_DEBUG asks for the traceback
    except UserError:
        raise
    # other user-facing problems: one clear line, no traceback
    except (OSError, ValueError, RuntimeError) as e:
        log.error("%s", one_line(str(e)))
        return 1
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
