"""Peak memory and time of `exaone-convert to-hf` and `from-hf` against naive paths, on a checkpoint
of about 2 GB.

to-hf naive: load the whole checkpoint into one state dict, build transformers'
ExaoneMoeForCausalLM, load the weights, `save_pretrained` (bf16). ours: the streamed converter
(bf16). from-hf (of that bf16 export) naive: read every tensor into our full state dict (`from_hf`),
then one DCP save. ours: the streamed importer. Each runs in a fresh Python process; peak resident
memory is that process's ru_maxrss. Shards: the real default is 5GB for a 470 GB model (about 1%);
on a 2 GB checkpoint the benchmark uses --max-shard-size (default 256MB) to keep the same
proportion.

Prints `name: value (ratio vs baseline)` lines.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def make_checkpoint(root: Path, gigabytes: float) -> Path:
    from megatron_exaone.checkpoint.store import save_checkpoint
    from megatron_exaone.model import ExaoneMoeForCausalLM, tiny

    # ~0.5B fp32 parameters with K-EXAONE's structure (mostly routed experts, like the real model).
    layers = max(2, round(8 * gigabytes / 2))
    config = tiny(
        vocab_size=32768,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=128,
        num_experts=64,
        num_experts_per_tok=8,
        moe_intermediate_size=256,
        sliding_window=128,
    )
    with torch.device("meta"):
        shapes = ExaoneMoeForCausalLM(config).state_dict()
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=gen) * 0.02 for k, v in shapes.items()}
    import dataclasses

    return save_checkpoint(
        root, 1, state, meta={"model_config": dataclasses.asdict(config), "tokens": 0}
    )


def naive(checkpoint: str, out: str) -> None:
    from transformers import ExaoneMoeConfig, ExaoneMoeForCausalLM

    from megatron_exaone.convert.checkpoint import open_checkpoint, stream_model_tensors
    from megatron_exaone.convert.hf import to_hf_tensors

    info = open_checkpoint(checkpoint)
    state = dict(stream_model_tensors(info, 1 << 62))  # everything at once
    model = ExaoneMoeForCausalLM(ExaoneMoeConfig(**info.config.to_hf_config()))
    hf_state = {}
    for key, value in to_hf_tensors(state.items()):
        hf_state[key] = value
    fused = {}
    for key in list(hf_state):  # transformers keeps experts fused in memory
        if ".experts." in key:
            prefix, e, proj = key.rsplit(".", 3)[0], int(key.split(".")[-3]), key.split(".")[-2]
            fused.setdefault((prefix, proj), {})[e] = hf_state.pop(key)
    for (prefix, proj), per in fused.items():
        stacked = torch.stack([per[e] for e in sorted(per)])
        hf_state[f"{prefix}.{proj}"] = stacked
    for prefix in {p for p, _ in fused}:
        hf_state[f"{prefix}.gate_up_proj"] = torch.cat(
            [hf_state.pop(f"{prefix}.gate_proj"), hf_state.pop(f"{prefix}.up_proj")], dim=1
        )
    for key in [k for k in hf_state if k.endswith("mlp.e_score_correction_bias")]:
        hf_state[key.replace("mlp.e_score", "mlp.gate.e_score")] = hf_state.pop(key)
    model.load_state_dict(hf_state, strict=False)
    model.to(torch.bfloat16).save_pretrained(out, max_shard_size="5GB")


def ours(checkpoint: str, out: str, shard: str) -> None:
    from megatron_exaone.convert.checkpoint import checkpoint_to_hf

    checkpoint_to_hf(checkpoint, out, torch.bfloat16, shard)


def naive_import(hf_dir: str, out: str) -> None:
    from megatron_exaone.checkpoint.store import save_checkpoint
    from megatron_exaone.convert.hf import from_hf

    save_checkpoint(out, 0, from_hf(hf_dir)[1])


def ours_import(hf_dir: str, out: str) -> None:
    from megatron_exaone.convert.checkpoint import hf_to_checkpoint

    hf_to_checkpoint(hf_dir, out)


def measure(path: str, *args: str) -> tuple[float, float]:
    """(seconds, peak RSS in GiB) of one conversion path, run in a fresh Python process."""
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, __file__, "--run", path, *args])
    _, status, usage = os.wait4(child.pid, 0)
    if status != 0:
        raise SystemExit(f"the {path} conversion failed")
    return time.perf_counter() - start, usage.ru_maxrss / 2**20  # KiB -> GiB


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gigabytes", type=float, default=2.0, help="checkpoint size (fp32)")
    parser.add_argument("--max-shard-size", default="256MB")
    # internal: one conversion in this process
    parser.add_argument("--run", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        if args.run[0] == "make":
            make_checkpoint(Path(args.run[1]), float(args.run[2]))
        else:
            {
                "naive": naive,
                "ours": ours,
                "naive_import": naive_import,
                "ours_import": ours_import,
            }[args.run[0]](*args.run[1:])
        return
    work = Path(tempfile.mkdtemp(prefix="bench_convert_"))
    try:
        # Every step in its own process: Linux carries a parent's peak RSS into its children.
        measure("make", str(work / "ckpt"), str(args.gigabytes))
        checkpoint = work / "ckpt" / "step_00000001"
        size = sum(f.stat().st_size for f in checkpoint.iterdir()) / 2**30
        naive_s, naive_gb = measure("naive", str(checkpoint), str(work / "naive"))
        ours_s, ours_gb = measure("ours", str(checkpoint), str(work / "ours"), args.max_shard_size)
        print(f"checkpoint: {size:.2f} GiB fp32; output bf16; cpu, torch {torch.__version__}")
        print(
            f"naive (full state dict + transformers save_pretrained): {naive_s:.1f} s, peak RSS "
            f"{naive_gb:.2f} GiB (baseline)"
        )
        print(
            f"exaone-convert to-hf (streamed, {args.max_shard_size} shards): {ours_s:.1f} s "
            f"({ours_s / naive_s:.2f}x the time), peak RSS {ours_gb:.2f} GiB "
            f"({ours_gb / naive_gb:.2f}x the memory)"
        )
        naive_s, naive_gb = measure("naive_import", str(work / "ours"), str(work / "naive_import"))
        ours_s, ours_gb = measure("ours_import", str(work / "ours"), str(work / "ours_import"))
        print(
            f"naive from-hf (full state dict + one DCP save): {naive_s:.1f} s, peak RSS "
            f"{naive_gb:.2f} GiB (baseline)"
        )
        print(
            f"exaone-convert from-hf (streamed): {ours_s:.1f} s ({ours_s / naive_s:.2f}x the "
            f"time), peak RSS {ours_gb:.2f} GiB ({ours_gb / naive_gb:.2f}x the memory)"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
