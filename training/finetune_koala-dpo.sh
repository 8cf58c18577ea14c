#!/usr/bin/env bash
# The koala-dpo recipe (config/koala-dpo.yaml): DPO on Koala's three preference sets, from the koala
# run's export. On the GPUs torch sees, or CPU ranks. `--tiny` runs its tiny variant on CPU (the tiny
# llama and the demo's preference pairs); `--dry-run` prints the resolved config, the plan and the
# command. Extra arguments are key=value overrides or launcher flags (--num-gpus N, --cpu-ranks N, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
exec "$PY" -m chatkit.launch config/koala-dpo.yaml "$@"
