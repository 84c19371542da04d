#!/usr/bin/env bash
# Run exaone-train on N local processes (CPU/gloo, or one GPU each) with torchrun's standalone rendezvous, through
# megatron_exaone.cli.torchrun: SIGTERM, SIGINT (Ctrl-C) or SIGUSR1 to this process saves a checkpoint after the
# current step and exits 0; the ranks die with it.
#   launch/local.sh 4 experiment=cpu_tiny run_dir=runs/demo
# MODULE=megatron_exaone.cli.eval runs exaone-eval instead (the same overrides plus checkpoint.load=).
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: launch/local.sh NPROC [HYDRA OVERRIDES...]" >&2
  exit 2
fi
nproc=$1; shift
here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$here/.venv/bin/python}
[ -x "$python" ] || python=python3
# One thread per rank on CPU: the ranks already share the cores.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$python" -m megatron_exaone.cli.torchrun --standalone --nnodes 1 --nproc-per-node "$nproc" \
  -m "${MODULE:-megatron_exaone.cli.train}" "$@"
