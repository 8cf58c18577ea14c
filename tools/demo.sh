#!/usr/bin/env bash
# `make demo`: synthetic chat data -> tiny GPT-NeoX base -> DeepSpeed ZeRO-3 fine-tune on 2 CPU ranks
# (or your GPUs) -> Hugging Face export -> held-out exact-match accuracy through the chat engine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
OUT=outputs/demo
start=$(date +%s)
step() { printf '\n==> [%ss] %s\n' "$(( $(date +%s) - start ))" "$*"; }

rm -rf "$OUT"   # the demo's own outputs from an earlier run
mkdir -p "$OUT"
step "1/5 writing the synthetic chat dataset"
"$PY" data/demo/prepare.py --out data/demo/files
cp data/demo/files/heldout.jsonl "$OUT/heldout.jsonl"

step "2/5 building the tiny GPT-NeoX base with a locally trained tokenizer"
"$PY" pretrained/tiny/prepare.py --corpus data/demo/files/train.jsonl --out pretrained/tiny/model

step "3/5 fine-tuning with DeepSpeed ZeRO-3"
bash training/finetune_demo.sh

step "4/5 exporting to Hugging Face format"
"$PY" tools/convert_to_hf.py --checkpoint "$OUT/checkpoints" --out "$OUT/hf"

step "5/5 answering the held-out conversations through the chat engine"
"$PY" tools/evaluate.py --model "$OUT/hf" --data "$OUT/heldout.jsonl" --predictions "$OUT/predictions.jsonl"
echo "chat with it: $PY inference/bot.py --model $OUT/hf   (or serve it: $PY inference/serve.py --model $OUT/hf)"
