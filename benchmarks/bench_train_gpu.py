"""Training step of the ~2B proxy model (recipes/model/proxy_2b.yaml) in BF16 and in FP8
(torch-native backend) on one GPU, as the trainer runs it: the parallel builder (precision pass),
FSDP2 mixed precision (BF16 compute, FP32 master weights and gradient reduction), the step runner
(micro-batch accumulation, one metric reduction), gradient clipping, the expert-bias update and the
optimizer, on packed batches of the bundled sample corpus (real documents: FlexAttention document
masks), a different batch every step.

Each variant is a precision with options (`parse_variant`), e.g. `fp8_torch:rowwise+compile`
(`+compile`: `parallel.compile`, every decoder layer compiled; `+muon`: Muon instead of AdamW;
`+offload`: `optim.offload=cpu`). Prints, with the device name, each variant's tokens/s and ms per
step (median and min-max of --steps timed steps after --warmup), MFU against the H100 dense BF16
peak (989 TFLOP/s) counted our way (`training.flops.flops_per_token`: sliding windows, router) and
Megatron-LM's way (`megatron_flops_per_token`: every layer causal over the whole sequence, no
router), and its speed against the first variant, measured in the same process; a ratio whose
step times overlap the baseline's range is reported as no difference. `--profile VARIANT` adds a
table of the CUDA kernels of one step. `--micro-batches N` accumulates gradients over N forward +
backward passes per optimizer step, as pretraining does. Run on a GPU, from the repository root:
  PYTHONPATH=. python benchmarks/bench_train_gpu.py \
      [--variants bf16,bf16+compile,fp8_torch+compile] [--seq-len 4096]
  (the proxy's step with and without optimizer offload: --variants bf16,bf16+offload)
`--device cpu --model tiny` runs the same path on the CPU (a check that it runs; its times mean
nothing).
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import socket
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from torch import nn

from data_tools.sample_data import prepare_sample_data
from megatron_exaone.config.schema import ParallelConfig, PrecisionConfig
from megatron_exaone.data.loader import DataStage, MixtureLoader
from megatron_exaone.model import ModelConfig
from megatron_exaone.model.moe import update_expert_bias
from megatron_exaone.parallel.build import build_chunks
from megatron_exaone.parallel.comm import all_reduce_
from megatron_exaone.parallel.features import Build
from megatron_exaone.parallel.grad_norm import clip_grad_norm_
from megatron_exaone.parallel.mesh import ParallelDims, build_mesh
from megatron_exaone.parallel.pipeline import embedding_copies
from megatron_exaone.parallel.step import step_runner
from megatron_exaone.precision import is_fp8, mark_fp8_weights_stale
from megatron_exaone.training.flops import (
    flops_per_token,
    fp8_matmul_flops,
    megatron_flops_per_token,
    peak_flops,
)
from megatron_exaone.training.offload import build_for_optimizer
from megatron_exaone.training.optim import build_optimizer

MODEL_RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "model"


def model_config(name: str, layers: int | None) -> ModelConfig:
    """The model of recipes/model/<name>.yaml, with `layers` decoder layers if given."""
    fields = yaml.safe_load((MODEL_RECIPES / f"{name}.yaml").read_text())
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


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels (a timer around GPU work needs it; the CPU runs
    synchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize()


@dataclass(frozen=True)
class Timing:
    """Seconds of the timed repeats: median and range."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, times: list[float]) -> Timing:
        return cls(statistics.median(times), min(times), max(times))

    def ms(self) -> str:
        return f"{self.median * 1e3:.1f} ms ({self.low * 1e3:.1f}-{self.high * 1e3:.1f})"

    def against(self, baseline: Timing, name: str) -> str:
        """This timing's speed against `baseline`'s: a ratio, or no difference when the two ranges
        overlap."""
        ratio = f"{baseline.median / self.median:.2f}x the speed of {name}"
        if self.low <= baseline.high and baseline.low <= self.high:
            return f"{ratio}: no difference, inside the spread"
        return ratio


def measure_variants(
    variants: list[str], measure: Callable[[str], tuple[list[float], float]]
) -> Iterator[tuple[str, Timing, float, str]]:
    """(variant, its timing, peak GiB, its speed against the first variant that ran) for each
    variant; `measure` returns the timed repeats' seconds and the peak. A variant that fails is
    reported and the others still run; compiled graphs (and what they hold) are dropped between
    variants."""
    baseline: tuple[str, Timing] | None = None
    for variant in variants:
        torch._dynamo.utils.counters.clear()  # this variant's graph breaks only
        try:
            times, peak = measure(variant)
            timing = Timing.of(times)
        except Exception:
            print(f"{variant}: failed:\n{traceback.format_exc(limit=-4)}", flush=True)
            continue
        finally:
            breaks = torch._dynamo.utils.counters["graph_break"]
            if breaks:
                print(f"{variant}: torch.compile graph breaks: {dict(breaks)}", flush=True)
            torch._dynamo.reset()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if baseline is None:
            baseline = variant, timing
            yield variant, timing, peak, "baseline"
        else:
            yield variant, timing, peak, timing.against(baseline[1], baseline[0])


VARIANT_OPTIONS = (
    "compile",
    "fp8_wgrad",
    "keep_gathered",
    "weight_cache",
    "fp8_mtp",
    "fp8_head",
    "offload",
    "muon",
    "no_bf16_layers",
    "unfused",
)


def parse_variant(variant: str) -> tuple[PrecisionConfig, set[str]]:
    """ "<precision>[:<recipe>][+option...]" -> (precision plan, options). Options: compile (every
    decoder layer compiled), fp8_wgrad (the routed experts' weight gradient in FP8 too:
    PrecisionConfig.fp8_expert_wgrad), keep_gathered (FSDP2 keeps gathered parameters from forward
    to backward: parallel.reshard_after_forward=false), weight_cache (FP8 weights quantized once per
    optimizer step: precision.fp8_weight_cache), fp8_mtp (the MTP module's projections in FP8 too:
    precision.fp8_mtp), fp8_head (the output head's logits and hidden-state gradient in FP8:
    precision.fp8_lm_head), offload (AdamW's masters and moments on the host, BF16 parameters on
    the GPU: optim.offload=cpu), muon (Muon on the hidden matrices, as the K-EXAONE recipes),
    no_bf16_layers (no decoder layer kept in BF16 at either end: precision.keep_bf16_first_layers
    and keep_bf16_last_layers 0), unfused (q, k, v and gate, up as separate FP8 GEMMs:
    precision.fp8_fuse_inputs=false)."""
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
        fp8_fuse_inputs="unfused" not in options,
        **(
            dict(keep_bf16_first_layers=0, keep_bf16_last_layers=0)
            if "no_bf16_layers" in options
            else {}
        ),
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


def packed_batches(
    config: ModelConfig, seq_len: int, global_batch: int, count: int, device: torch.device
) -> list[dict[str, torch.Tensor]]:
    """`count` global batches of the bundled sample corpus packed as the trainer's loader packs them
    (documents concatenated, position ids restarting at each document), on `device`. The corpus
    tokenizer's 4096 ids are valid ids of any larger vocabulary; the output head costs the same."""
    data_dir = Path(tempfile.gettempdir()) / "megatron-exaone-bench-data"
    _tokenizer, prefix = prepare_sample_data(data_dir, 4096)
    loader = MixtureLoader(
        {"sample": [str(prefix)]},
        [DataStage({"sample": 1.0}, seq_len, global_batch)],
        seq_len=seq_len,
        global_batch_size=global_batch,
        vocab_size=config.vocab_size,
        cache_dir=data_dir / "index",
    )
    return [
        {k: v.to(device) for k, v in loader.next_batch(global_batch).items()} for _ in range(count)
    ]


def trainer_step(
    model: nn.Module, optimizer, mesh, config: ModelConfig, micro_batches: int
) -> Callable[[dict[str, torch.Tensor]], None]:
    """One optimizer step as `training.trainer` runs it: the step runner over `micro_batches`
    (FSDP2 reduces after the last; one metric reduction), the global-norm clip, the expert-bias
    update (counts summed over the ranks) and the optimizer."""
    runner = step_runner([model], mesh, "1f1b", micro_batches)
    group = mesh.tp_cp_dp_group

    def step(batch: dict[str, torch.Tensor]) -> None:
        mark_fp8_weights_stale(model)
        runner.step(batch["input_ids"], batch["labels"], batch["position_ids"])
        clip_grad_norm_([model], 1.0, mesh, embedding_copies(config, 1)).item()
        update_expert_bias(model, 1e-3, lambda t: all_reduce_(t, group))
        optimizer.step()
        optimizer.zero_grad()

    return step


def time_steps(
    config: ModelConfig,
    variant: str,
    batches: list[dict[str, torch.Tensor]],
    micro_batches: int,
    warmup: int,
    profile: bool,
    device: torch.device,
) -> tuple[list[float], float]:
    """(seconds of each timed optimizer step, peak GiB) for one variant (see `parse_variant`): one
    step per batch of `batches`, the first `warmup` untimed."""
    plan, options = parse_variant(variant)
    mesh = build_mesh(ParallelDims(), device.type)
    layout = ParallelConfig(
        compile="compile" in options, reshard_after_forward="keep_gathered" not in options
    )
    # as the trainer builds
    optimizer_name = "muon" if "muon" in options else "adamw"
    offload = "cpu" if "offload" in options else "none"
    build = Build(config, layout, plan, mesh.dims, device.type, seed=0)
    build = build_for_optimizer(build, offload, optimizer_name)
    (model,) = build_chunks(build, mesh)
    optimizer = build_optimizer([model], optimizer_name, lr=1e-4, offload=offload)
    step = trainer_step(model, optimizer, mesh, config, micro_batches)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for index, batch in enumerate(batches):
        synchronize(device)
        start = time.perf_counter()
        step(batch)
        synchronize(device)
        if index >= warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    retries = torch.cuda.memory_stats().get("num_alloc_retries", 0) if cuda else 0
    # the allocator freed its cache to satisfy an allocation: slows the steps, near the memory limit
    if retries:
        print(f"{variant}: {retries} allocator retries (memory pressure)", flush=True)
    if profile and cuda:
        print_kernel_profile(functools.partial(step, batches[-1]), f"one {variant} step")
    del step, model, optimizer
    if cuda:
        torch.cuda.empty_cache()
    return times, peak


def gib(memory: float) -> str:
    return "n/a" if math.isnan(memory) else f"{memory:.1f} GiB"


def main(argv: list[str] | None = None) -> None:
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
    parser.add_argument("--steps", type=int, default=8, help="timed steps (at least 8 to compare)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--layers", type=int, default=None, help="override the model's layer count")
    parser.add_argument("--model", default="proxy_2b", help="a recipes/model/<name>.yaml")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
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
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_train_gpu needs a CUDA GPU (--device cpu checks that it runs).")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ.setdefault("MASTER_PORT", str(s.getsockname()[1]))
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo", rank=0, world_size=1)
    if args.device == "cuda":
        torch.cuda.set_device(0)
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    config = model_config(args.model, args.layers)
    global_batch = args.micro_batches * args.micro_batch
    tokens = global_batch * args.seq_len
    count = args.warmup + args.steps
    batches = packed_batches(config, args.seq_len, global_batch, count, device)
    flops = flops_per_token(config, args.seq_len)
    megatron_flops = megatron_flops_per_token(config, args.seq_len)
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    peak = peak_flops(name)
    print(
        f"device: {name}; torch {torch.__version__}; {args.model} model "
        f"{config.num_hidden_layers} layers, {config.num_experts} experts "
        f"top-{config.num_experts_per_tok}; {args.micro_batches} x {args.micro_batch} x "
        f"{args.seq_len} tokens per optimizer step, packed sample-corpus documents; "
        f"{flops / 1e9:.2f} GFLOP per token (model FLOPs; as Megatron-LM counts them "
        f"{megatron_flops / 1e9:.2f}); {args.steps} timed steps after {args.warmup}"
    )

    def measure(variant: str) -> tuple[list[float], float]:
        return time_steps(
            config,
            variant,
            batches,
            args.micro_batches,
            args.warmup,
            profile=variant in args.profile.split(","),
            device=device,
        )

    try:
        for variant, timing, memory, ratio in measure_variants(args.variants.split(","), measure):
            rates = [tokens / t for t in (timing.median, timing.high, timing.low)]
            mfu = (
                f"MFU {100 * flops * rates[0] / peak:.1f}% (Megatron-LM's counting "
                f"{100 * megatron_flops * rates[0] / peak:.1f}%) of {peak / 1e12:.0f} TFLOP/s"
                if peak
                else "MFU n/a"
            )
            share = fp8_share(config, args.seq_len, parse_variant(variant)[0])
            print(
                f"{variant}: {rates[0]:,.0f} tokens/s ({rates[1]:,.0f}-{rates[2]:,.0f}), "
                f"{timing.ms()}/step, {mfu}, peak memory {gib(memory)} ({ratio}{share})",
                flush=True,
            )
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
