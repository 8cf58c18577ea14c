#!/usr/bin/env bash
# The CPU default recipe (config/tiny.yaml): the tiny model, ZeRO-3, on the GPUs torch sees or 2 CPU ranks.
# Extra arguments are key=value overrides or launcher flags (--dry-run, --cpu-ranks N, --hostfile H ...).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
exec "$PY" -m chatkit.launch config/tiny.yaml "$@"
