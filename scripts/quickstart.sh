#!/usr/bin/env bash
# The main job end to end on the embedded default: train a SuperBPE tokenizer on the bundled sample corpus,
# tokenize it into Megatron shards, train the tiny EXAONE-MoE model on CPU, checkpoint, export to Hugging Face.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m megatron_exaone.cli.quickstart "$@"
