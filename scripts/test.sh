#!/usr/bin/env bash
# Creates the environment and runs the whole test suite (exit code 5, "no tests collected", counts as failure).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest -q "$@"
