"""`exaone-convert`: training checkpoints <-> Hugging Face format, and checkpoint inspection.

  exaone-convert to-hf CHECKPOINT_DIR OUT_DIR [--dtype bf16|fp32] [--max-shard-size 5GB] [--tokenizer DIR]
  exaone-convert from-hf HF_DIR OUT_DIR
  exaone-convert inspect PATH
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import torch

from megatron_exaone.convert.checkpoint import (CheckpointFormatError, checkpoint_to_hf, describe,
                                                hf_to_checkpoint, verify_with_transformers)
from megatron_exaone.convert.hf import HFFormatError

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="exaone-convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    to_hf = sub.add_parser("to-hf", help="a training checkpoint (any layout) -> HF safetensors directory")
    to_hf.add_argument("checkpoint", help="a run's checkpoints/ folder (newest complete checkpoint) or one checkpoint")
    to_hf.add_argument("out_dir")
    to_hf.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                       help="weight dtype (the expert-score correction bias stays fp32)")
    to_hf.add_argument("--max-shard-size", default="5GB", help="e.g. 5GB, 500MB, 2GiB")
    to_hf.add_argument("--tokenizer", help="directory with tokenizer.json to copy (default: the run's tokenizer)")
    to_hf.add_argument("--verify", action="store_true",
                       help="load the export with transformers and compare its logits with the checkpoint's "
                            "(loads both models whole: for small models)")
    from_hf = sub.add_parser("from-hf", help="an HF directory -> a training checkpoint for continued pretraining")
    from_hf.add_argument("hf_dir")
    from_hf.add_argument("out_dir")
    inspect = sub.add_parser("inspect", help="summary of a checkpoint or an HF directory")
    inspect.add_argument("path")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        if args.command == "to-hf":
            out = checkpoint_to_hf(args.checkpoint, args.out_dir, DTYPES[args.dtype], args.max_shard_size,
                                   args.tokenizer)
            print(f"wrote {out} (transformers: AutoModelForCausalLM.from_pretrained({str(out)!r}))")
            if args.verify:
                diff = verify_with_transformers(args.checkpoint, out)
                print(f"verified: transformers' ExaoneMoeForCausalLM loads it; max |logit difference| vs the "
                      f"checkpoint's model: {diff:.2e} (weights stored as {args.dtype})")
        elif args.command == "from-hf":
            out = hf_to_checkpoint(args.hf_dir, args.out_dir)
            print(f"wrote {out}; continue pretraining with: exaone-train ... model=from_checkpoint "
                  f"checkpoint.load={args.out_dir}")
        else:
            summary = describe(args.path)
            if args.json:
                print(json.dumps(summary, indent=2))
            else:
                for key, value in summary.items():
                    shown = f"{value:,}" if isinstance(value, int) and key.endswith("parameters") else value
                    print(f"{key:>28}: {shown}")
    except (CheckpointFormatError, HFFormatError, OSError, ValueError) as exc:
        print(f"exaone-convert {args.command}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
