"""`exaone-data tokenize` against Megatron-LM's own `tools/preprocess_data.py`, measured fairly.

Both commands get the same JSONL corpus, the same Hugging Face tokenizer, the same end-of-document
token (the tokenizer's eos token, which Megatron appends) and the same worker count, and must write
byte-identical `.bin/.idx` files (checked after every run). Each run is a fresh command; the two
alternate, `--runs` times each. Reported, median and min-max over the runs:

- the whole command's wall time (interpreter start, imports, tokenizer load, pool start, the work,
  the final index);
- throughput after start-up: corpus MB / (wall time - the same command's wall time on a
  one-document corpus), so that start-up costs (Megatron's imports take seconds) do not decide the
  result; use a corpus of 100 MB or more;
- peak memory: the largest sum of resident memory over the command's process tree (sampled every
  50 ms from /proc).

A ratio whose two spreads overlap is reported as no difference.

    python benchmarks/bench_megatron_tokenize.py --megatron /path/to/Megatron-LM \\
        --megatron-python /path/to/python --corpus corpus.jsonl --tokenizer TOKENIZER_DIR \\
        [--workers 2] [--runs 3]

`--megatron-python` is an interpreter that can import Megatron-LM (it needs torch, transformers,
and for the current Megatron-LM Python 3.12 and triton); without `--megatron`, or when the
checkout has no tools/preprocess_data.py, the benchmark says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE_S = 0.05


def _tree_rss(root: int) -> int:
    """Resident bytes of `root` and all its descendants (0 for those gone meanwhile)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def timed(command: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, int]:
    """(wall seconds, peak tree RSS bytes) of a command, which must succeed."""
    start = time.perf_counter()
    process = subprocess.Popen(
        command,
        cwd=cwd,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    peak = 0
    while process.poll() is None:
        peak = max(peak, _tree_rss(process.pid))
        time.sleep(SAMPLE_S)
    wall = time.perf_counter() - start
    if process.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{process.stderr.read()[-3000:]}")
    return wall, peak


def megatron_command(args: argparse.Namespace, corpus: Path, prefix: Path) -> list[str]:
    return [
        args.megatron_python, str(args.megatron / "tools" / "preprocess_data.py"),
        "--input", str(corpus), "--output-prefix", str(prefix),
        "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(args.tokenizer),
        "--append-eod", "--workers", str(args.workers),
    ]  # fmt: skip


def our_command(args: argparse.Namespace, corpus: Path, prefix: Path) -> list[str]:
    return [
        sys.executable, "-m", "data_tools", "tokenize", "--input", str(corpus),
        "--tokenizer", str(args.tokenizer), "--output-prefix", str(prefix),
        "--eod-token", eos_token(args.tokenizer), "--workers", str(args.workers),
        "--no-progress", "--overwrite",
    ]  # fmt: skip


def eos_token(tokenizer: Path) -> str:
    config = json.loads((tokenizer / "tokenizer_config.json").read_text())
    eos = config["eos_token"]
    return eos["content"] if isinstance(eos, dict) else eos


def same_bytes(a: Path, b: Path) -> bool:
    return all(
        Path(f"{a}{ext}").read_bytes() == Path(f"{b}{ext}").read_bytes() for ext in (".bin", ".idx")
    )


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def ratio(slow: list[float], fast: list[float]) -> str:
    """`slow / fast` of the medians, or no difference when the spreads overlap."""
    if min(slow) <= max(fast) and min(fast) <= max(slow):
        return "no difference (spreads overlap)"
    return f"{statistics.median(slow) / statistics.median(fast):.2f}x"


@dataclass(frozen=True)
class Tool:
    command: Callable[[Path, Path], list[str]]  # (corpus, output prefix) -> argv
    cwd: Path
    env: dict[str, str]

    def measure(self, corpus: Path, one_doc: Path, work: Path) -> tuple[float, float, int]:
        """(whole-command wall, wall after start-up, peak RSS) of one run."""
        wall, peak = timed(self.command(corpus, work / "out"), self.cwd, self.env)
        startup, _ = timed(self.command(one_doc, work / "tiny"), self.cwd, self.env)
        return wall, wall - startup, peak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megatron", type=Path, help="a Megatron-LM checkout")
    parser.add_argument("--megatron-python", default=sys.executable)
    parser.add_argument("--corpus", type=Path, required=True, help="a JSONL file with a text field")
    parser.add_argument("--tokenizer", type=Path, required=True, help="a HF tokenizer directory")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if args.megatron is None or not (args.megatron / "tools" / "preprocess_data.py").is_file():
        print("skipped: pass --megatron DIR, a Megatron-LM checkout with tools/preprocess_data.py")
        return 0
    size = args.corpus.stat().st_size
    if size < 100e6:
        print(f"note: the corpus is {size / 1e6:.0f} MB; below 100 MB start-up costs weigh in")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        one_doc = work / "one.jsonl"
        with args.corpus.open() as f:
            one_doc.write_text(f.readline())
        tools = {
            # Megatron's tools import `megatron` from the checkout
            "megatron": Tool(
                partial(megatron_command, args), args.megatron, {"PYTHONPATH": str(args.megatron)}
            ),
            "ours": Tool(partial(our_command, args), REPO, {}),
        }
        results: dict[str, list[tuple[float, float, int]]] = {name: [] for name in tools}
        for run in range(args.runs):
            for name in list(tools) if run % 2 == 0 else list(tools)[::-1]:
                (work / name).mkdir(exist_ok=True)
                results[name].append(tools[name].measure(args.corpus, one_doc, work / name))
                print(f"run {run + 1} {name}: {results[name][-1][0]:.2f} s", flush=True)
            identical = same_bytes(work / "megatron" / "out_text_document", work / "ours" / "out")
            print(f"run {run + 1}: outputs byte-identical: {identical}", flush=True)
    mb = size / 1e6
    walls = {n: [r[0] for r in rs] for n, rs in results.items()}
    rates = {n: [mb / r[1] for r in rs] for n, rs in results.items()}
    peaks = {n: [r[2] / 2**30 for r in rs] for n, rs in results.items()}
    print(f"corpus: {mb:.1f} MB, {args.workers} worker(s), {args.runs} runs each")
    for name in ("megatron", "ours"):
        print(
            f"{name}: whole command {summary(walls[name])} s | after start-up "
            f"{summary(rates[name])} MB/s | peak memory {summary(peaks[name])} GiB"
        )
    print(f"whole command: {ratio(walls['megatron'], walls['ours'])} faster")
    print(f"throughput after start-up: {ratio(rates['ours'], rates['megatron'])} faster")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
