#!/usr/bin/env bash
# Creates .venv (if missing) and installs megatron-exaone with the pinned, tested CPU environment.
# GPU users: install into your own environment with `pip install -e '.[dev]'` to keep your CUDA torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "Creating the virtual environment in .venv"
  "$PYTHON" -m venv .venv
fi
echo "Installing megatron-exaone and its pinned CPU dependencies (constraints-cpu.txt)"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints-cpu.txt -e '.[dev]'
echo "Building DeepSpeed's CPU Adam op for optim.offload=cpu (about a minute the first time, then cached)"
.venv/bin/python -m megatron_exaone.training.offload
