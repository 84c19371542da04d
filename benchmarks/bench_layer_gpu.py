"""One K-EXAONE decoder layer at its published size (hidden 6144, 64 query / 8 KV heads, sliding
window 128, 128 routed experts of 2048 top-8 plus a shared expert), forward + backward on one GPU,
in BF16 and in FP8 (torch-native backend), each variant compiled or not (variants as in
bench_train_gpu.py).

The proxy benchmark (bench_train_gpu.py) spends most of its FLOPs in a 153,600-row output head that
stays in BF16; this one measures the part of the real model that FP8 covers: prints ms per forward +
backward, achieved TFLOP/s and each variant's speed-up over the first, with the device name.
`--micro-batches N` runs N forward + backward passes per weight update (what `+weight_cache`,
precision.fp8_weight_cache, amortizes) and reports the time per pass. Run on a GPU, from the
repository root:
  PYTHONPATH=. python benchmarks/bench_layer_gpu.py \
      [--variants bf16+compile,fp8_torch+compile] [--batch 4] [--micro-batches 4]
`--device cpu --model tiny` runs the same path on the CPU (a check that it runs; its times mean
nothing).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch
from torch import nn

from benchmarks.bench_train_gpu import (
    gib,
    measure_variants,
    model_config,
    parse_variant,
    print_kernel_profile,
    synchronize,
)
from megatron_exaone.model.attention import attention_mask
from megatron_exaone.model.config import SLIDING, SPARSE
from megatron_exaone.model.layers import DecoderLayer
from megatron_exaone.model.rope import rope_cos_sin
from megatron_exaone.parallel.compile import apply_compile
from megatron_exaone.precision import apply_precision, mark_fp8_weights_stale
from megatron_exaone.training.flops import attended_keys, attention_weights, moe_active_weights


class OneLayer(nn.Module):
    """`model.layers.0` alone, so the precision pass sees the name it expects."""

    def __init__(self, layer: DecoderLayer) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([layer])


def layer_flops_per_token(config, seq_len: int) -> float:
    attention = (
        12
        * config.num_attention_heads
        * config.head_dim
        * attended_keys(SLIDING, seq_len, config.sliding_window)
    )
    return 6 * (attention_weights(config) + moe_active_weights(config)) + attention


def time_layer(
    config,
    variant: str,
    seq_len: int,
    batch: int,
    micro_batches: int,
    steps: int,
    warmup: int,
    device: torch.device,
    profile: bool = False,
) -> tuple[list[float], float]:
    """(seconds per forward + backward of each timed step, peak GiB; NaN on the CPU). A step
    accumulates gradients over `micro_batches` forward + backward passes of the same weights (the
    FP8 weight cache, `+weight_cache`, quantizes them on the first)."""
    plan, options = parse_variant(variant)
    torch.manual_seed(0)
    with device:
        layer = DecoderLayer(config, SLIDING, SPARSE).to(torch.bfloat16)
    for name, param in layer.named_parameters():
        if "norm" in name:
            nn.init.ones_(param)
        else:
            nn.init.normal_(param, std=0.02)
    root = OneLayer(layer)
    if plan.name != "bf16":  # the single layer is not one of the "first/last layers kept in BF16"
        apply_precision(
            root,
            dataclasses.replace(plan, keep_bf16_first_layers=0, keep_bf16_last_layers=0),
            1,
            device.type,
        )
    if "compile" in options:
        apply_compile(root)
    positions = torch.arange(seq_len, device=device).expand(batch, seq_len)
    rope = rope_cos_sin(positions, config.head_dim, config.rope_theta, torch.bfloat16)
    masks = {SLIDING: attention_mask(positions, config.sliding_window)}
    x = torch.randn(
        batch, seq_len, config.hidden_size, device=device, dtype=torch.bfloat16, requires_grad=True
    )
    grad = torch.randn_like(x)

    def step() -> None:
        mark_fp8_weights_stale(root)
        for _ in range(micro_batches):
            layer(x, rope, masks).backward(grad)
        for param in layer.parameters():
            param.grad = None

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for index in range(warmup + steps):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        if index >= warmup:
            times.append((time.perf_counter() - start) / micro_batches)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    if profile and cuda:
        print_kernel_profile(step, f"one {variant} step of {micro_batches} forward + backward")
    return times, peak


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variants", default="bf16+compile,fp8_torch+compile")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument(
        "--micro-batches",
        type=int,
        default=1,
        help="forward + backward passes per step (weights unchanged within a step)",
    )
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--model",
        default="k_exaone_236b",
        help="a recipes/model/<name>.yaml whose sliding MoE layer to time",
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument(
        "--profile",
        default="",
        metavar="VARIANTS",
        help="comma-separated variants whose kernel table to print",
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_layer_gpu needs a CUDA GPU (--device cpu checks that it runs).")
    device = torch.device(args.device)
    config = model_config(args.model, None)
    tokens = args.batch * args.seq_len
    flops = layer_flops_per_token(config, args.seq_len) * tokens
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    print(
        f"device: {name}; torch {torch.__version__}; one {args.model} sliding MoE layer, "
        f"{args.batch} x {args.seq_len} tokens, {flops / 1e12:.1f} TFLOP per forward + backward"
    )

    def measure(variant: str) -> tuple[list[float], float]:
        return time_layer(
            config,
            variant,
            args.seq_len,
            args.batch,
            args.micro_batches,
            args.steps,
            args.warmup,
            device,
            profile=variant in args.profile.split(","),
        )

    for variant, timing, peak, ratio in measure_variants(args.variants.split(","), measure):
        print(
            f"{variant}: {timing.ms()}, {flops / timing.median / 1e12:.0f} TFLOP/s "
            f"({flops / timing.high / 1e12:.0f}-{flops / timing.low / 1e12:.0f}), peak memory "
            f"{gib(peak)} ({ratio})",
            flush=True,
        )


if __name__ == "__main__":
    main()
