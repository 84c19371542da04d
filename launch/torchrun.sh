#!/usr/bin/env bash
# Multi-node launch with torchrun's c10d rendezvous: run this same command on every node. It runs torchrun through
# megatron_exaone.cli.torchrun: SIGTERM, SIGINT or SIGUSR1 to it (or to any rank) saves a checkpoint after the
# current step on every node and exits 0; its ranks die with it.
#   NNODES=8 GPUS_PER_NODE=8 RDZV_HOST=node001 RDZV_ID=k-exaone-1 launch/torchrun.sh experiment=k_exaone_236b_h100x64
# Single node: NNODES=1 RDZV_HOST=localhost launch/torchrun.sh ...
# MODULE=megatron_exaone.cli.eval runs exaone-eval instead (the same overrides plus checkpoint.load=).
set -euo pipefail
: "${NNODES:?set NNODES (number of nodes)}"
: "${RDZV_HOST:?set RDZV_HOST (a host every node can reach, e.g. the first node)}"
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
RDZV_PORT=${RDZV_PORT:-29500}
RDZV_ID=${RDZV_ID:-megatron-exaone}
exec "${PYTHON:-python}" -m megatron_exaone.cli.torchrun --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE" \
  --rdzv-backend c10d --rdzv-endpoint "$RDZV_HOST:$RDZV_PORT" --rdzv-id "$RDZV_ID" \
  -m "${MODULE:-megatron_exaone.cli.train}" "$@"
