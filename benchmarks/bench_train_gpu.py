"""Single-GPU training step of the ~2B proxy model (recipes/model/proxy_2b.yaml) in BF16 and in FP8
(torch-native backend), through the real training path: the parallel builder (precision pass), FSDP2
mixed precision (BF16 compute, FP32 master weights and gradient reduction), fused output-projection
loss, AdamW.

Each variant is a precision with options (`parse_variant`), e.g. `fp8_torch:rowwise+compile`
(`+compile`: `parallel.compile`, every decoder layer compiled). Prints tokens/s and MFU against the
H100 dense BF16 peak (989 TFLOP/s) with the device name, and each variant's speed-up over the first
one, measured in the same process: `name: value (ratio vs baseline)`. `--profile VARIANT` adds a
table of the CUDA kernels of one step of that variant. `--micro-batches N` accumulates gradients
over N forward + backward passes per optimizer step, as pretraining does (the optimizer and FSDP's
gradient reduction then run once per N micro-batches). Run on a GPU, from the repository root:
  PYTHONPATH=. python benchmarks/bench_train_gpu.py \
      [--variants bf16,bf16+compile,fp8_torch+compile] [--seq-len 4096]
  (the proxy's step with and without optimizer offload: --variants bf16,bf16+offload)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import socket
import statistics
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from megatron_exaone.config.schema import ParallelConfig, PrecisionConfig
from megatron_exaone.model import ModelConfig
from megatron_exaone.model.mtp import shift_left
from megatron_exaone.parallel.build import build_chunks
from megatron_exaone.parallel.features import Build
from megatron_exaone.parallel.mesh import ParallelDims, build_mesh
from megatron_exaone.precision import is_fp8, mark_fp8_weights_stale
from megatron_exaone.training.flops import H100_BF16_DENSE_PEAK, flops_per_token, fp8_matmul_flops
from megatron_exaone.training.offload import device_param_dtype
from megatron_exaone.training.optim import build_optimizer

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "model" / "proxy_2b.yaml"


def proxy_config(layers: int | None) -> ModelConfig:
    fields = yaml.safe_load(RECIPE.read_text())
    if layers:
        fields["num_hidden_layers"] = layers
    return ModelConfig(**fields)


def print_kernel_profile(run: Callable[[], None], what: str, rows: int = 40) -> None:
    """Run `run` once under the profiler and print its largest CUDA kernels (ms, calls, name), then
    the aten operators that launched the most GPU time (with input shapes: where copies and casts
    come from)."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        run()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.self_device_time_total for e in kernels) / 1e3
    print(
        f"profile of {what}: {sum(e.count for e in kernels)} GPU kernels and copies, {busy:.1f} ms "
        "of GPU time; the largest (ms, calls, kernel):"
    )
    for event in sorted(kernels, key=lambda e: e.self_device_time_total, reverse=True)[:rows]:
        print(f"{event.self_device_time_total / 1e3:9.1f} {event.count:6d}  {event.key[:110]}")
    ops = [e for e in prof.key_averages(group_by_input_shape=True) if e.key.startswith("aten::")]
    print("aten operators by GPU time (ms, calls, operator, input shapes):")
    for event in sorted(ops, key=lambda e: e.device_time_total, reverse=True)[: rows // 2]:
        print(
            f"{event.device_time_total / 1e3:9.1f} {event.count:6d}  {event.key} "
            f"{str(event.input_shapes)[:90]}"
        )


def measure_variants(
    variants: list[str], measure: Callable[[str], tuple[float, float]]
) -> Iterator[tuple[str, float, float, str]]:
    """(variant, seconds, peak GiB, its speed against the first variant that ran) for each variant;
    `measure` returns the first two. A variant that fails is reported and the others still run;
    compiled graphs (and what they hold) are dropped between variants."""
    baseline: tuple[str, float] | None = None
    for variant in variants:
        try:
            seconds, peak = measure(variant)
        except Exception:
            print(f"{variant}: failed:\n{traceback.format_exc(limit=-4)}", flush=True)
            continue
        finally:
            breaks = torch._dynamo.utils.counters["graph_break"]
            if breaks:
                print(f"{variant}: torch.compile graph breaks: {dict(breaks)}", flush=True)
            torch._dynamo.reset()
            torch.cuda.empty_cache()
        if baseline is None:
            baseline = variant, seconds
            yield variant, seconds, peak, "baseline"
        else:
            yield variant, seconds, peak, f"{baseline[1] / seconds:.2f}x the speed of {baseline[0]}"


VARIANT_OPTIONS = (
    "compile",
    "fp8_wgrad",
    "keep_gathered",
    "weight_cache",
    "fp8_mtp",
    "fp8_head",
    "offload",
)


def parse_variant(variant: str) -> tuple[PrecisionConfig, set[str]]:
    """ "<precision>[:<recipe>][+option...]" -> (precision plan, options). Options: compile (every
    decoder layer compiled), fp8_wgrad (the routed experts' weight gradient in FP8 too:
    PrecisionConfig.fp8_expert_wgrad), keep_gathered (FSDP2 keeps gathered parameters from forward
    to backward: parallel.reshard_after_forward=false), weight_cache (FP8 weights quantized once per
    optimizer step: precision.fp8_weight_cache), fp8_mtp (the MTP module's projections in FP8 too:
    precision.fp8_mtp), fp8_head (the output head's logits and hidden-state gradient in FP8:
    precision.fp8_lm_head), offload (AdamW's masters and moments on the host, BF16 parameters on
    the GPU: optim.offload=cpu)."""
    name, *options = variant.split("+")
    unknown = set(options) - set(VARIANT_OPTIONS)
    if unknown:
        raise SystemExit(
            f"variant {variant!r}: unknown options {sorted(unknown)}; choose from {VARIANT_OPTIONS}"
        )
    precision, _, recipe = name.partition(":")
    plan = PrecisionConfig(
        precision,
        recipe=recipe or None,
        fp8_expert_wgrad="fp8_wgrad" in options,
        fp8_weight_cache="weight_cache" in options,
        fp8_mtp="fp8_mtp" in options,
        fp8_lm_head="fp8_head" in options,
    )
    return plan, set(options)


def fp8_share(config: ModelConfig, seq_len: int, plan: PrecisionConfig) -> str:
    """The part of the model's FLOPs that `plan` runs in FP8 GEMMs, and the speed-up that allows
    (Amdahl)."""
    if not is_fp8(plan):
        return ""
    share = fp8_matmul_flops(
        config,
        plan.keep_bf16_first_layers,
        plan.keep_bf16_last_layers,
        plan.fp8_expert_wgrad,
        plan.fp8_mtp,
        plan.fp8_lm_head,
    ) / flops_per_token(config, seq_len)
    return (
        f"; FP8 GEMMs are {100 * share:.0f}% of the model FLOPs: at most "
        f"{1 / (1 - share / 2):.2f}x the BF16 step if they ran twice as fast"
    )


def train_step(model, optimizer, x, labels, micro_batches: int) -> None:
    """One optimizer step over `micro_batches` forward + backward passes of (x, labels)."""
    mark_fp8_weights_stale(model)
    for micro in range(micro_batches):
        model.set_requires_gradient_sync(micro == micro_batches - 1)
        model(x, labels=labels, return_logits=False).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def time_steps(
    config: ModelConfig,
    variant: str,
    seq_len: int,
    micro_batch: int,
    micro_batches: int,
    steps: int,
    warmup: int,
    profile: bool,
) -> tuple[float, float]:
    """(median seconds per optimizer step, peak GiB) for one variant (see `parse_variant`). A step
    accumulates gradients over `micro_batches` forward + backward passes as the trainer does (FSDP2
    reduces them after the last one), then runs the optimizer."""
    plan, options = parse_variant(variant)
    mesh = build_mesh(ParallelDims(), "cuda")
    layout = ParallelConfig(
        compile="compile" in options, reshard_after_forward="keep_gathered" not in options
    )
    # as the trainer builds
    offload = "cpu" if "offload" in options else "none"
    build = Build(config, layout, plan, mesh.dims, "cuda", seed=0)
    build = dataclasses.replace(
        build, param_dtype=device_param_dtype(offload, "adamw", layout.fsdp, build.bf16)
    )
    (model,) = build_chunks(build, mesh)
    optimizer = build_optimizer([model], "adamw", lr=1e-4, offload=offload)
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randint(0, config.vocab_size, (micro_batch, seq_len), device="cuda", generator=gen)
    labels = shift_left(x, 1, -100)

    step = functools.partial(train_step, model, optimizer, x, labels, micro_batches)
    torch.cuda.reset_peak_memory_stats()
    times = []
    for index in range(warmup + steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        if index >= warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30
    retries = torch.cuda.memory_stats().get("num_alloc_retries", 0)
    # the allocator freed its cache to satisfy an allocation: slows the steps, near the memory limit
    if retries:
        print(f"{variant}: {retries} allocator retries (memory pressure)", flush=True)
    if profile:
        print_kernel_profile(step, f"one {variant} step")
    del step, model, optimizer
    torch.cuda.empty_cache()
    return statistics.median(times), peak


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument(
        "--micro-batches",
        type=int,
        default=1,
        help="forward + backward passes per optimizer step (gradient accumulation)",
    )
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--layers", type=int, default=None, help="override the proxy's layer count")
    parser.add_argument(
        "--variants",
        default="bf16,bf16+compile,fp8_torch+compile",
        help="comma-separated variants (see parse_variant); the first is the baseline",
    )
    parser.add_argument(
        "--profile",
        default="",
        metavar="VARIANTS",
        help="comma-separated variants whose kernel table to print",
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_train_gpu needs a CUDA GPU.")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ.setdefault("MASTER_PORT", str(s.getsockname()[1]))
    dist.init_process_group("nccl", rank=0, world_size=1)
    torch.cuda.set_device(0)
    config = proxy_config(args.layers)
    tokens = args.micro_batches * args.micro_batch * args.seq_len
    flops = flops_per_token(config, args.seq_len)
    name = torch.cuda.get_device_name(0)
    print(
        f"device: {name}; torch {torch.__version__}; proxy model {config.num_hidden_layers} "
        f"layers, {config.num_experts} experts top-{config.num_experts_per_tok}; "
        f"{args.micro_batches} x {args.micro_batch} x {args.seq_len} tokens per optimizer step; "
        f"{flops / 1e9:.2f} GFLOP per token (model FLOPs)"
    )

    def measure(variant: str) -> tuple[float, float]:
        return time_steps(
            config,
            variant,
            args.seq_len,
            args.micro_batch,
            args.micro_batches,
            args.steps,
            args.warmup,
            profile=variant in args.profile.split(","),
        )

    for variant, seconds, peak, ratio in measure_variants(args.variants.split(","), measure):
        rate = tokens / seconds
        mfu = flops * rate / H100_BF16_DENSE_PEAK
        share = fp8_share(config, args.seq_len, parse_variant(variant)[0])
        print(
            f"{variant}: {rate:,.0f} tokens/s, {seconds * 1e3:.1f} ms/step, MFU {100 * mfu:.1f}% "
            f"of 989 TFLOP/s, peak memory {peak:.1f} GiB ({ratio}{share})",
            flush=True,
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
