"""The host optimizer step of optim.offload=cpu: DeepSpeed's CPU Adam against torch's AdamW on the
same CPU tensors, at the sizes one K-EXAONE rank steps.

    PYTHONPATH=. python benchmarks/bench_cpu_adam.py [--layout k_exaone_236b_h100x64]
        [--elements 2e8] [--repeats 5] [--threads N]

The tensors are one decoder layer's local pieces on a rank of the layout (its routed experts whole
under EP, its dense weights cut by TP and sharded by FSDP2), scaled to about --elements in total so
that four FP32 copies of each fit this machine's memory. Every optimizer steps the same gradients
(AdamW, weight decay 0.1 on matrices). Prints each one's median time per step over --repeats steps
after one warm-up (with the spread), its throughput in elements per second, the ratios against
torch's foreach AdamW (the trainer's optimizer without offload, on CPU), and the projected host
step of a whole rank of the layout (its local elements / the measured throughput) on this machine.
A ratio inside the spread is no difference.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch

from megatron_exaone.model import k_exaone_236b
from megatron_exaone.parallel.mesh import ParallelDims
from megatron_exaone.training.offload import CpuOffloadAdamW, load_cpu_adam
from tools import planner


def layout_dims(layout: str) -> ParallelDims:
    """The sizes of recipes/parallel/<layout>.yaml."""
    sizes = planner.load_layout(layout)
    return ParallelDims(**{k: sizes[k] for k in ("tp", "pp", "vpp", "ep", "etp", "dp", "cp")})


def layer_shapes(layout: str) -> list[tuple[int, ...]]:
    """The local shapes of one MoE decoder layer's parameters on a rank of `layout`."""
    model = k_exaone_236b()
    dims = layout_dims(layout)
    shapes = []
    for name, shape in planner._model_params(model):
        if not name.startswith("model.layers.1."):  # layer 1 is a MoE layer
            continue
        local = planner.local_numel(name, shape, model, dims)
        shard = dims.edp if ".experts." in name else dims.dp * dims.cp
        shapes.append((max(1, local // shard),))
    return shapes


def rank_elements(layout: str) -> float:
    """Local elements the worst rank of `layout` keeps on the host with AdamW offloaded."""
    inp = planner.PlanInput(model=k_exaone_236b(), dims=layout_dims(layout), offload="cpu")
    result = planner.plan(inp)
    return max(r.host_bytes for r in result.ranks) / 16


def timed_steps(optimizer, params, grads, repeats: int) -> list[float]:
    times = []
    for i in range(repeats + 1):
        for p, g in zip(params, grads):
            p.grad = g
        start = time.perf_counter()
        optimizer.step()
        elapsed = time.perf_counter() - start
        if i:  # the first step allocates the moments
            times.append(elapsed)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layout", default="k_exaone_236b_h100x64")
    p.add_argument("--elements", type=float, default=2e8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    shapes = layer_shapes(args.layout)
    scale = args.elements / sum(math.prod(s) for s in shapes)
    shapes = [(max(1, int(s[0] * scale)),) for s in shapes]
    total = sum(math.prod(s) for s in shapes)
    print(
        f"layout {args.layout}: one MoE layer's {len(shapes)} local tensors scaled to "
        f"{total / 1e6:.0f}M elements; {args.threads} threads; median (min-max) of "
        f"{args.repeats} steps"
    )
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(s, generator=gen) * 1e-3 for s in shapes]
    start = [torch.randn(s, generator=gen) * 0.02 for s in shapes]

    def params() -> list[torch.nn.Parameter]:
        return [torch.nn.Parameter(t.clone()) for t in start]

    def groups(ps):
        return [{"params": ps, "weight_decay": 0.1}]

    cpu_adam = load_cpu_adam()
    candidates = {
        "torch AdamW (foreach)": lambda ps: torch.optim.AdamW(groups(ps), lr=1e-4, foreach=True),
        "torch AdamW (fused)": lambda ps: torch.optim.AdamW(groups(ps), lr=1e-4, fused=True),
        "DeepSpeedCPUAdam": lambda ps: cpu_adam(groups(ps), lr=1e-4, adamw_mode=True),
        # the whole host step of optim.offload=cpu: gradients in, DeepSpeed's step, weights out
        "CpuOffloadAdamW": lambda ps: CpuOffloadAdamW(
            groups(ps), lr=1e-4, betas=(0.9, 0.999), eps=1e-8
        ),
    }
    results = {}
    for name, make in candidates.items():
        ps = params()
        optimizer = make(ps)
        results[name] = timed_steps(optimizer, ps, grads, args.repeats)
        del optimizer, ps
    baseline = statistics.median(results["torch AdamW (foreach)"])
    per_rank = rank_elements(args.layout)
    for name, times in results.items():
        median = statistics.median(times)
        print(
            f"{name}: {median * 1e3:.0f} ms ({min(times) * 1e3:.0f}-{max(times) * 1e3:.0f}) per "
            f"step, {total / median / 1e9:.2f} G elements/s ({baseline / median:.2f}x torch "
            f"foreach AdamW); a whole rank's {per_rank / 1e9:.2f}G elements: "
            f"{per_rank / total * median:.1f} s"
        )


if __name__ == "__main__":
    main()
