#!/usr/bin/env bash
# The demo recipe: the tiny model on the synthetic tasks (config/demo.yaml), ZeRO-3.
# Uses the GPUs torch sees, otherwise 2 CPU ranks. Extra arguments are key=value overrides or
# launcher flags (--dry-run, --cpu-ranks N, --hostfile H --node-rank R ...).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
exec "$PY" -m chatkit.launch config/demo.yaml "$@"
