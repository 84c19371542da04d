"""`python -m megatron_exaone.cli.quickstart`: the README's main job on the embedded default (CPU, minutes)."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from megatron_exaone.training import quickstart


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=quickstart.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=Path("runs") / time.strftime("quickstart-%Y%m%d-%H%M%S"),
                        help="where everything is written (default: runs/quickstart-<time>)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--global-batch", type=int, default=8, help="sequences per optimizer step")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=4096)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.run_dir.exists() and any(args.run_dir.iterdir()):
        parser.error(f"--run-dir {args.run_dir} is not empty; pick a new directory.")
    paths = quickstart.run(args.run_dir, steps=args.steps, seq_len=args.seq_len, global_batch=args.global_batch,
                           lr=args.lr, seed=args.seed, vocab_size=args.vocab_size)
    print("\nDone. Everything is under", paths["run"])
    for name in ("tokenizer", "data", "metrics", "checkpoint", "hf"):
        print(f"  {name:<11} {paths[name]}")


if __name__ == "__main__":
    main()
