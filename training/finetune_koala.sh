#!/usr/bin/env bash
# The koala recipe (config/koala.yaml): on the GPUs torch sees, or CPU ranks. `--tiny` runs its tiny
# variant on CPU; `--dry-run` prints the resolved config, the plan and the command. Extra arguments
# are key=value overrides or launcher flags (--num-gpus N, --cpu-ranks N, --hostfile H --node-rank R ...).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
exec "$PY" -m chatkit.launch config/koala.yaml "$@"
