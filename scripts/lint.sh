#!/usr/bin/env bash
# The house style: ruff's lint rules and formatter (configured in pyproject.toml, lines of at most
# 100 characters). `scripts/lint.sh --fix` applies what ruff can fix itself.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--fix" ]; then
  .venv/bin/ruff check --fix .
  exec .venv/bin/ruff format .
fi
.venv/bin/ruff check .
exec .venv/bin/ruff format --check .
