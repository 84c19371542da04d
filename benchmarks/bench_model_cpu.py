"""Forward+backward time on CPU: our ExaoneMoeForCausalLM vs transformers' (eager attention), same
weights.

Prints `name: value (ratio vs baseline)` lines. Default shape from the foundation issue: hidden 256,
4 layers, 32 experts top-4, batch 4 x seq 512.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from megatron_exaone.convert.hf import to_hf
from megatron_exaone.model import build_model, tiny
from megatron_exaone.model.mtp import shift_left


def step_time(step, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from transformers import ExaoneMoeForCausalLM as HFModel

    config = tiny(
        vocab_size=8192,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 32,
        num_key_value_heads=2,
        head_dim=32,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        moe_intermediate_size=args.hidden // 2,
        sliding_window=128,
        num_nextn_predict_layers=0,
    )
    ours = build_model(config, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        hf = HFModel.from_pretrained(
            to_hf(config, ours.state_dict(), Path(tmp) / "hf"), attn_implementation="eager"
        )
    x = torch.randint(
        1, config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)
    )
    labels = shift_left(x, 1, fill=-100)

    def ours_step():
        ours.zero_grad(set_to_none=True)
        ours(x, labels=labels, return_logits=False).lm_loss.backward()  # the training path

    def hf_step():
        hf.zero_grad(set_to_none=True)
        hf(x, labels=x).loss.backward()

    with torch.no_grad():
        diff = (ours(x).logits - hf(x).logits).abs().max().item()
    hf_s = step_time(hf_step, 1, args.repeats)
    ours_s = step_time(ours_step, 1, args.repeats)
    tokens = args.batch * args.seq
    print(f"device: cpu ({torch.get_num_threads()} threads), torch {torch.__version__}")
    print(
        f"shape: hidden {args.hidden}, {args.layers} layers, {args.experts} experts "
        f"top-{args.top_k}, batch {args.batch} x seq {args.seq}; max |logit diff| {diff:.2e}"
    )
    print(
        f"transformers eager fwd+bwd: {hf_s * 1e3:.1f} ms/step ({tokens / hf_s:.0f} tokens/s) "
        "(baseline)"
    )
    print(
        f"megatron-exaone fwd+bwd: {ours_s * 1e3:.1f} ms/step ({tokens / ours_s:.0f} tokens/s) "
        f"({hf_s / ours_s:.2f}x vs baseline)"
    )


if __name__ == "__main__":
    main()
