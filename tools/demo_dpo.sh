#!/usr/bin/env bash
# `make demo-dpo`: preference pairs -> DPO of the demo's model with DeepSpeed ZeRO-3 on 2 CPU ranks (or
# your GPUs) -> Hugging Face export -> held-out exact match and reward accuracy, before and after.
# Starts from `make demo`'s model (outputs/demo/hf), and runs `make demo` first when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
SFT=outputs/demo/hf
OUT=outputs/demo-dpo
if [ ! -f "$SFT/config.json" ]; then
  echo "==> $SFT is missing: running \`make demo\` first (about 8 minutes on 2 CPU cores)"
  bash tools/demo.sh
fi
start=$(date +%s)
step() { printf '\n==> [%ss] %s\n' "$(( $(date +%s) - start ))" "$*"; }

rm -rf "$OUT"   # this demo's own outputs from an earlier run
mkdir -p "$OUT"
step "1/5 writing synthetic preference pairs (chosen: the answer; rejected: a near miss)"
"$PY" data/demo/prepare.py --out data/demo/files --pairs 10000

step "2/5 the starting model: held-out exact match and how often it already prefers the answer"
"$PY" tools/evaluate.py --model "$SFT" --data outputs/demo/heldout.jsonl | tail -1 | tee "$OUT/before.txt"
"$PY" tools/evaluate.py --model "$SFT" --pairs data/demo/files/pairs_heldout.jsonl | tail -1 | tee -a "$OUT/before.txt"

step "3/5 DPO with DeepSpeed ZeRO-3 (reference: the starting model, scored once)"
bash training/finetune_demo-dpo.sh

step "4/5 exporting to Hugging Face format"
"$PY" tools/convert_to_hf.py --checkpoint "$OUT/checkpoints" --out "$OUT/hf"

step "5/5 the trained model on the held-out conversations and pairs"
echo "before: $(paste -sd ';' "$OUT/before.txt" | sed 's/;/; /'); reward accuracy 0 by definition (the model is its own reference)"
"$PY" tools/evaluate.py --model "$OUT/hf" --data outputs/demo/heldout.jsonl --predictions "$OUT/predictions.jsonl" | tail -1
"$PY" tools/evaluate.py --model "$OUT/hf" --pairs data/demo/files/pairs_heldout.jsonl --reference "$SFT" --beta 0.5
