"""benchmarks/bench_train_gpu.py runs the trainer's step on packed sample-corpus batches for every
kind of variant: checked on the CPU with the tiny model (what it prints about time is not checked;
its figures come from a GPU)."""

from __future__ import annotations

import re

from benchmarks.bench_train_gpu import Timing, main
from tests.runs import free_port


def test_ratios_inside_the_spread_are_no_difference():
    base = Timing.of([1.0, 1.1, 1.2])
    assert "no difference" in Timing.of([1.05, 1.3]).against(base, "bf16")
    faster = Timing.of([0.5, 0.6]).against(base, "bf16")
    assert faster.startswith("2.00x the speed of bf16") and "no difference" not in faster


def test_every_kind_of_variant_runs_the_trainer_step_on_the_cpu(capsys, monkeypatch):
    # its one-process group's rendezvous; restored afterwards
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    main(
        [
            "--device", "cpu", "--model", "tiny", "--seq-len", "64", "--micro-batch", "2",
            "--micro-batches", "2", "--steps", "2", "--warmup", "1",
            "--variants", "fp32,fp32+muon,fp8_emulated+fp8_mtp+fp8_head,fp32+offload",
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert "failed" not in out, out
    assert "packed sample-corpus documents" in out and "as Megatron-LM counts them" in out
    results = [line for line in out.splitlines() if "tokens/s" in line]
    for variant in ("fp32", "fp32+muon", "fp8_emulated+fp8_mtp+fp8_head", "fp32+offload"):
        line = next(line for line in results if line.startswith(f"{variant}: "))
        assert re.search(r"tokens/s \([\d,]+-[\d,]+\), [\d.]+ ms \([\d.]+-[\d.]+\)/step", line)
