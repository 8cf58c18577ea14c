#!/usr/bin/env bash
# The DPO demo recipe (config/demo-dpo.yaml): preference training of the demo's model, ZeRO-3.
# Needs outputs/demo/hf (`make demo`) and data/demo/files/pairs_*.jsonl (data/demo/prepare.py --pairs).
# Uses the GPUs torch sees, otherwise 2 CPU ranks. Extra arguments are key=value overrides or
# launcher flags (--dry-run, --cpu-ranks N, --hostfile H --node-rank R ...).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
exec "$PY" -m chatkit.launch config/demo-dpo.yaml "$@"
