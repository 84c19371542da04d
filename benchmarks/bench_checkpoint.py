"""What the checkpoint checksums cost: save and load of one state with this project's store (an
XXH3-128 checksum of every file while it is written, verified by threads while it loads) against
plain DCP (FileSystemWriter / FileSystemReader), in the same process, runs interleaved.

    .venv/bin/python benchmarks/bench_checkpoint.py [--gib 1] [--repeats 5] [--dir DIR]

Prints the median and the min-max of each, and the ratio of the medians; when the spreads overlap
the ratio is reported as no difference. Runs in one process, like one rank; DIR defaults to a
temporary folder. Every timed call starts after os.sync(), and the two sides take turns going first.
The loads read from the page cache (the files were just written), where hashing is the most visible;
on a tmpfs (`--dir /dev/shm`) the saves are too.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

from megatron_exaone.checkpoint.store import load_checkpoint, save_checkpoint

warnings.filterwarnings(
    "ignore", message=".*assuming the intent is to (save|load) in a single process.*"
)


def state_of(gib: float, tensors: int = 64) -> dict[str, torch.Tensor]:
    numel = int(gib * 2**30 / 4 / tensors)
    gen = torch.Generator().manual_seed(0)
    return {f"layer{i}.weight": torch.randn(numel, generator=gen) for i in range(tensors)}


def timed(fn) -> float:
    os.sync()  # the previous writes' dirty pages must not slow this one down
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def summary(name: str, times: list[float]) -> str:
    median = statistics.median(times)
    return f"{name}: median {median:.3f} s (min {min(times):.3f}, max {max(times):.3f})"


def compare(what: str, plain: list[float], ours: list[float]) -> None:
    ratio = statistics.median(ours) / statistics.median(plain)
    overlap = min(ours) <= max(plain) and min(plain) <= max(ours)
    verdict = "no difference (the spreads overlap)" if overlap else f"{ratio:.2f}x plain DCP"
    print(
        f"{what}: {summary('plain DCP', plain)}; {summary('checksummed', ours)}; ratio {ratio:.2f} "
        f"-> {verdict}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=1.0, help="size of the state (fp32)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", type=Path, help="where to write (default: a temporary folder)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-checkpoint-", dir=args.dir))
    state = state_of(args.gib)
    target = {k: torch.empty_like(v) for k, v in state.items()}
    times: dict[str, list[float]] = {"plain save": [], "save": [], "plain load": [], "load": []}
    try:
        for i in range(args.repeats + 1):  # the first round warms up and is not counted
            plain_dir, root = work / f"plain{i}", work / f"ours{i}"
            plain_writer = FileSystemWriter(str(plain_dir))
            runs = {
                "plain save": functools.partial(dcp.save, state, storage_writer=plain_writer),
                "save": functools.partial(save_checkpoint, root, 1, state),
                "plain load": functools.partial(
                    dcp.load, target, storage_reader=FileSystemReader(str(plain_dir))
                ),
                "load": functools.partial(load_checkpoint, root / "step_00000001", target),
            }
            order = (
                ["plain save", "save", "plain load", "load"]
                if i % 2
                else ["save", "plain save", "load", "plain load"]
            )
            # each goes first in half the rounds
            round_times = {name: timed(runs[name]) for name in order}
            if i:
                for key, value in round_times.items():
                    times[key].append(value)
            shutil.rmtree(plain_dir)
            shutil.rmtree(root)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"state: {args.gib:g} GiB fp32 in 64 tensors, {args.repeats} runs each, "
        f"{torch.get_num_threads()} threads"
    )
    compare("save", times["plain save"], times["save"])
    compare("load", times["plain load"], times["load"])


if __name__ == "__main__":
    main()
