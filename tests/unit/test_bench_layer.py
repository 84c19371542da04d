"""benchmarks/bench_layer_gpu.py times one sliding MoE decoder layer, BF16 against FP8 with and
without the weight cache: checked on the CPU with the tiny model and the emulated FP8 backend (what
it prints about time is not checked; its figures come from a GPU), so a GPU run starts from a
script that runs."""

from __future__ import annotations

import re

from benchmarks.bench_layer_gpu import main


def test_each_variant_times_the_layer_on_the_cpu(capsys):
    variants = ("bf16", "fp8_emulated", "fp8_emulated+weight_cache")
    main(
        [
            "--device", "cpu", "--model", "tiny", "--seq-len", "32", "--batch", "2",
            "--micro-batches", "2", "--steps", "2", "--warmup", "1",
            "--variants", ",".join(variants),
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert "failed" not in out, out
    assert out.startswith("device: cpu;") and "one tiny sliding MoE layer, 2 x 32 tokens" in out
    for variant in variants:
        line = next(line for line in out.splitlines() if line.startswith(f"{variant}: "))
        assert re.search(r"[\d.]+ ms \([\d.]+-[\d.]+\), \d+ TFLOP/s", line), line
