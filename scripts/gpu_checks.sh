#!/usr/bin/env bash
# The checks only a GPU can run, in one go (under 10 minutes on one H100/H200): the K-EXAONE layer benchmark (BF16
# and FP8, compiled, 4 micro-batches per weight update, FP8 with and without the weight cache), the GPU tests, and
# the proxy training-step benchmark as the trainer steps (gradient accumulation over packed sample-corpus batches,
# clipping, the expert-bias update; 8 timed steps, median and range): BF16, FP8 with the MTP layer and the output
# head in FP8 too (the proxy's FP8 share of FLOPs, 17% by default, is then 64%, K-EXAONE's 66%) with its kernel
# profile, the same with q, k, v and gate, up unfused, and with no layer kept in BF16, Muon, and AdamW offloaded to
# the host (optim.offload=cpu); all compiled with gathered parameters kept. The time limits add up to 590 s, under
# one device call's 10 minutes (set from the earlier, shorter runs: not yet calibrated for these). Each
# step's full output goes to $OUT (default: gpu_checks/) as layer.txt, tests.txt and proxy.txt; a summary is
# printed. Extra arguments go to pytest. PYTHON picks the interpreter (default: python). CHECKS picks which of
# the three run (default "layer tests proxy"), to split them over device calls: e.g. CHECKS=proxy.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export TORCHINDUCTOR_COMPILE_THREADS="${TORCHINDUCTOR_COMPILE_THREADS:-16}"
py="${PYTHON:-python}"
out="${OUT:-gpu_checks}"
mkdir -p "$out"
checks=" ${CHECKS:-layer tests proxy} "
status=0
if [[ "$checks" == *" layer "* ]]; then
  timeout 120 "$py" benchmarks/bench_layer_gpu.py --micro-batches 4 --steps 8 \
      --variants bf16+compile,fp8_torch+compile,fp8_torch+compile+weight_cache >"$out/layer.txt" 2>&1 || status=1
  grep -hE "^(device|bf16|fp8)" "$out/layer.txt"
fi
if [[ "$checks" == *" tests "* ]]; then
  timeout 180 "$py" -m pytest -q tests/gpu -p no:cacheprovider "$@" >"$out/tests.txt" 2>&1 || status=1
  tail -n 3 "$out/tests.txt"
fi
if [[ "$checks" == *" proxy "* ]]; then
  fp8=fp8_torch+compile+keep_gathered+weight_cache+fp8_mtp+fp8_head
  timeout 290 "$py" benchmarks/bench_train_gpu.py --micro-batch 4 --micro-batches 4 --steps 8 --warmup 2 \
      --variants bf16+compile+keep_gathered,$fp8,$fp8+unfused,$fp8+no_bf16_layers,bf16+compile+keep_gathered+muon,bf16+compile+keep_gathered+offload \
      --profile "$fp8" >"$out/proxy.txt" 2>&1 || status=1
  grep -hE "^(device|bf16|fp8)" "$out/proxy.txt"
fi
exit "$status"
