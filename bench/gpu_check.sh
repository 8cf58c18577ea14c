#!/usr/bin/env bash
# The GPU check: what the CPU suite cannot see, in about ten minutes on a machine with one GPU or more.
#
#   bash bench/gpu_check.sh            # or: make gpu-check
#   bash bench/gpu_check.sh --dry-run  # print every command, run none
#   RECIPES="koala openalpaca" bash bench/gpu_check.sh   # only these recipes' tiny variants
#
# Sections, each reported PASS/FAIL/SKIP with its log, the run going on after a failure:
#   1. environment: GPUs, driver, torch/CUDA/NCCL, deepspeed, transformers, bitsandbytes, flash-attn;
#   2. the gpu test tier (pytest -m gpu);
#   3. every recipe's tiny variant on one GPU: fp16 for 4 steps saving at step 2, resumed to 6 steps,
#      exported to Hugging Face format; then bf16 for 4 steps;
#   4. with two GPUs or more: a 2-stage pipeline run (the Pythia recipe's tiny variant);
#   5. attention memory and speed at 2K-32K tokens (bench/long_context.py on the GPU);
#   6. decode speed (bench/chat_latency.py --quick);
#   and vLLM parity: the first recipe's export served by vLLM says what the bot says (tools/vllm_parity.py).
# Everything lands in outputs/gpu-check/ (one log per step, summary.txt); the exit status is the
# number of failed steps (0: all passed), so a CI job can run it as it is.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
OUT=${GPU_CHECK_OUT:-outputs/gpu-check}
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
RECIPES=${RECIPES:-$(for f in config/*.yaml; do b=$(basename "$f" .yaml); case $b in tiny|demo|demo-dpo) ;; *) echo "$b" ;; esac; done)}
STEP_TIMEOUT=${STEP_TIMEOUT:-600}
failed=0
start=$(date +%s)
if [ "$DRY" = 0 ]; then mkdir -p "$OUT" && : > "$OUT/summary.txt"; fi

# run NAME CMD...: one step, its output in $OUT/NAME.log, a PASS/FAIL line in the summary.
run() {
    local name=$1
    shift
    if [ "$DRY" = 1 ]; then
        printf '%s: %s\n' "$name" "$*"
        return 0
    fi
    local t0=$(date +%s)
    printf '==> [%ss] %s\n' "$(( t0 - start ))" "$name"
    if timeout "$STEP_TIMEOUT" "$@" > "$OUT/$name.log" 2>&1; then
        printf 'PASS %-44s %4ss\n' "$name" "$(( $(date +%s) - t0 ))" | tee -a "$OUT/summary.txt"
    else
        failed=$((failed + 1))
        printf 'FAIL %-44s %4ss  (%s)\n' "$name" "$(( $(date +%s) - t0 ))" "$OUT/$name.log" | tee -a "$OUT/summary.txt"
        tail -n 5 "$OUT/$name.log" | sed 's/^/     /'
    fi
}

skip() {
    if [ "$DRY" = 1 ]; then printf '%s: skipped (%s)\n' "$1" "$2"; else
        printf 'SKIP %-44s %s\n' "$1" "$2" | tee -a "$OUT/summary.txt"; fi
}

gpus=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>/dev/null || echo 0)
if [ "$DRY" = 0 ] && [ "$gpus" = 0 ]; then
    echo "error: torch sees no CUDA device: the GPU check needs one (README, section GPUs, installs a CUDA torch)" >&2
    exit 2
fi

# 1. environment
run environment "$PY" - <<'EOF'
import importlib, platform, subprocess
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| NCCL", ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else "-")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {p.name} {p.total_memory / 2**30:.0f} GiB sm_{p.major}{p.minor} bf16={torch.cuda.is_bf16_supported()}")
for m in ("deepspeed", "transformers", "peft", "bitsandbytes", "flash_attn", "vllm"):
    try:
        print(m, importlib.import_module(m).__version__)
    except Exception as e:
        print(m, "not usable:", type(e).__name__)
print(subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout)
EOF
[ "$DRY" = 0 ] && sed 's/^/     /' "$OUT/environment.log" | head -n 12

# 2. the gpu test tier
run gpu-tier "$PY" -m pytest -q -m gpu tests

# 3. each recipe's tiny variant on one GPU: fp16 with save, resume and export; bf16
for r in $RECIPES; do
    sh=training/finetune_$r.sh
    [ -f "$sh" ] || { skip "$r" "no $sh"; continue; }
    o=$OUT/$r
    run "$r-fp16" bash "$sh" --tiny --num-gpus 1 --master-port 0 precision=fp16 max_steps=4 save_every=2 \
        "output_dir=$o-fp16"
    run "$r-fp16-resume" bash "$sh" --tiny --num-gpus 1 --master-port 0 precision=fp16 max_steps=6 \
        save_every=2 resume=auto "output_dir=$o-fp16"
    run "$r-export" "$PY" tools/convert_to_hf.py --checkpoint "$o-fp16/checkpoints" --out "$o-fp16/hf"
    run "$r-bf16" bash "$sh" --tiny --num-gpus 1 --master-port 0 precision=bf16 max_steps=4 "output_dir=$o-bf16"
done

# 4. a 2-stage pipeline on two GPUs
if [ "$DRY" = 1 ] || [ "$gpus" -ge 2 ]; then
    run pipeline-2gpu bash training/finetune_Pythia-Chat-Base-7B.sh --tiny --num-gpus 2 --master-port 0 \
        precision=bf16 deepspeed=pipeline pipeline_stages=2 max_steps=4 "output_dir=$OUT/pipeline-2gpu"
else
    skip pipeline-2gpu "one GPU: a pipeline needs two"
fi

# vLLM serving the first recipe's export: the same prompt and greedy reply as the bot (skips without vllm)
first=$(echo $RECIPES | awk '{print $1}')
run vllm-parity "$PY" tools/vllm_parity.py --model "$OUT/$first-fp16/hf"

# 5. attention memory and speed at 2K-32K tokens; 6. decode speed
run long-context "$PY" bench/long_context.py
run decode "$PY" bench/chat_latency.py --quick
[ "$DRY" = 0 ] && for b in long-context decode; do tail -n 1 "$OUT/$b.log" | sed "s/^/     $b: /"; done

if [ "$DRY" = 0 ]; then
    printf '\n%s failed step(s) in %ss; summary: %s\n' "$failed" "$(( $(date +%s) - start ))" "$OUT/summary.txt"
fi
exit "$failed"
