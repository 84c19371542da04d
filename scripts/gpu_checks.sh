#!/usr/bin/env bash
# The checks only a GPU can run, in one go (about 6 minutes on one H100/H200 with warm compile caches): the GPU
# tests, the proxy training-step benchmark (BF16 and FP8 variants, compiled) and the K-EXAONE layer benchmark with
# the FP8 kernel profile. Extra arguments go to pytest. PYTHON picks the interpreter (default: python).
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
py="${PYTHON:-python}"
status=0
"$py" -m pytest -q tests/gpu -p no:cacheprovider "$@" || status=1
"$py" benchmarks/bench_train_gpu.py --steps 4 \
    --variants bf16+compile,fp8_torch+compile,fp8_torch:rowwise+compile,fp8_torch+compile+fp8_wgrad || status=1
"$py" benchmarks/bench_layer_gpu.py --variants bf16+compile,fp8_torch+compile,fp8_torch:rowwise+compile \
    --profile fp8_torch+compile || status=1
exit "$status"
