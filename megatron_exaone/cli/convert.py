"""`exaone-convert`: training checkpoints <-> Hugging Face format, and checkpoint inspection.

exaone-convert to-hf CHECKPOINT_DIR OUT_DIR [--dtype bf16|fp32] [--max-shard-size 5GB] [--tokenizer
DIR] exaone-convert from-hf HF_DIR OUT_DIR exaone-convert inspect PATH [--json] [--verify]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
from collections.abc import Iterator

import torch

from megatron_exaone.checkpoint.store import checksum_problems
from megatron_exaone.convert.checkpoint import (
    CheckpointFormatError,
    checkpoint_to_hf,
    describe,
    hf_to_checkpoint,
    verify_with_transformers,
)
from megatron_exaone.errors import UserError, one_line

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="exaone-convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    to_hf = sub.add_parser(
        "to-hf", help="a training checkpoint (any layout) -> HF safetensors directory"
    )
    to_hf.add_argument(
        "checkpoint",
        help="a run's checkpoints/ folder (newest complete checkpoint) or one checkpoint",
    )
    to_hf.add_argument("out_dir")
    to_hf.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="bf16",
        help="weight dtype (the expert-score correction bias stays fp32)",
    )
    to_hf.add_argument("--max-shard-size", default="5GB", help="e.g. 5GB, 500MB, 2GiB")
    to_hf.add_argument(
        "--tokenizer", help="directory with tokenizer.json to copy (default: the run's tokenizer)"
    )
    to_hf.add_argument(
        "--verify",
        action="store_true",
        help="load the export with transformers and compare its logits with the checkpoint's "
        "(loads both models whole: for small models)",
    )
    from_hf = sub.add_parser(
        "from-hf", help="an HF directory -> a training checkpoint for continued pretraining"
    )
    from_hf.add_argument("hf_dir")
    from_hf.add_argument("out_dir")
    inspect = sub.add_parser("inspect", help="summary of a checkpoint or an HF directory")
    inspect.add_argument("path")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.add_argument(
        "--verify",
        action="store_true",
        help="also check every file of a training checkpoint against the checksums "
        "recorded when it was written (exit 1 on a mismatch)",
    )
    return parser


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """SIGTERM raises SystemExit (status 143) instead of ending the process at once, so that a
    conversion's `finally` removes its partial output on the way out. The previous handler is
    restored afterwards."""

    def unwind(signum: int, _frame) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, unwind)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    with sigterm_unwinds():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        if args.command == "to-hf":
            out = checkpoint_to_hf(
                args.checkpoint,
                args.out_dir,
                DTYPES[args.dtype],
                args.max_shard_size,
                args.tokenizer,
            )
            print(f"wrote {out} (transformers: AutoModelForCausalLM.from_pretrained({str(out)!r}))")
            if args.verify:
                diff = verify_with_transformers(args.checkpoint, out)
                print(
                    "verified: transformers' ExaoneMoeForCausalLM loads it; max |logit "
                    f"difference| vs the checkpoint's model: {diff:.2e} (weights stored as "
                    f"{args.dtype})"
                )
        elif args.command == "from-hf":
            out = hf_to_checkpoint(args.hf_dir, args.out_dir)
            print(
                f"wrote {out}; continue pretraining with: exaone-train ... model=from_checkpoint "
                f"checkpoint.load={args.out_dir}"
            )
        else:
            summary = describe(args.path)
            if args.verify:
                summary["checksums"] = verify_checksums(summary)
            if args.json:
                print(json.dumps(summary, indent=2))
            else:
                for key, value in summary.items():
                    shown = (
                        f"{value:,}"
                        if isinstance(value, int) and key.endswith("parameters")
                        else value
                    )
                    print(f"{key:>28}: {shown}")
            if args.verify and summary["checksums"] != "ok":
                return 1
    except (UserError, OSError, ValueError) as exc:
        print(f"exaone-convert {args.command}: {one_line(str(exc))}", file=sys.stderr)
        return 2
    return 0


def verify_checksums(summary: dict) -> str:
    """ "ok", or the files of the described training checkpoint that do not match their recorded
    checksums."""
    if "checkpoint" not in summary:
        raise CheckpointFormatError(
            f"{summary['path']}: --verify checks training checkpoints; this is a "
            f"{summary['kind']} (safetensors files carry no checksums)."
        )
    problems = checksum_problems(summary["checkpoint"])
    return "ok" if not problems else "; ".join(problems)


if __name__ == "__main__":
    raise SystemExit(main())
