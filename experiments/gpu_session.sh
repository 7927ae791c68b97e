#!/usr/bin/env bash
# One lent-GPU session (~8 min of commands): the checks that need CUDA, in priority order, each bounded so that
# the whole script ends inside one device call. Results land in $OUT/gpu_results.tgz (one file back).
#
#   1. benchmarks/bench_encode.py on CUDA (issue 2's bench: FLES1Encoder vs SparseEncoder, same folder and texts)
#   2. the nfcorpus recipe at its full schedule -- 2 epochs = 162 steps, 256-token training documents, CLFR every
#      epoch toward 400 -- as written, and with the dev-selected setting (tau 1, BM25-chosen positive, FN mask);
#      each evaluated on dev and test at threshold 0.3 with eval_fles1.py
#   3. benchmarks/bench_train.py on CUDA (issue 4's ratio: FLES1Trainer vs SparseEncoderTrainer, batch 32 x 8 x 256)
#   4. if time is left, the selected setting for 10 epochs
#
# Expects ../shared (or a copy of it in .devshare/, which the device tool carries) and, where the machine lacks
# them, wheels in .whl/ for datasets, bm25s, PyStemmer, pytrec-eval-terrier. SMOKE=1 shrinks every step (CPU check).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-/tmp/gpu_out}
RESULTS=/tmp/gpu_results
BUDGET=${BUDGET:-500}           # seconds for all steps together
START=$SECONDS
# a rerun on a warm machine starts clean: an earlier session's results and runs would be packed as this one's
rm -rf "$RESULTS" /tmp/runs /tmp/fles1-tiny
mkdir -p "$OUT" "$RESULTS"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
SHARED=../shared
[ -d "$SHARED/models/splade-tiny" ] || SHARED=.devshare
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
SMOKE=${SMOKE:-0}
FAILED=() OPTIONAL=0  # OPTIONAL=1: a step cut short by the budget (exit 124) is not a failure

step() {  # step NAME SECONDS COMMAND...: run with a timeout, never past the budget; log to $RESULTS/NAME.log
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - (SECONDS - START)))
  if [ "$left" -lt 30 ]; then echo "== $name: skipped (budget spent)"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit}s, ${left}s left)"
  timeout "$limit" "$@" > "$RESULTS/$name.log" 2>&1
  local status=$?
  echo "== $name: exit $status after $((SECONDS - START))s"
  [ "$status" = 0 ] || { [ "$OPTIONAL" = 1 ] && [ "$status" = 124 ]; } || FAILED+=("$name (exit $status)")
  grep -v "Loading weights\|Writing model\|it/s\]" "$RESULTS/$name.log" | tail -12
}

{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU"
  python3 -c "import torch, transformers, sentence_transformers as st; print('torch', torch.__version__, 'transformers', transformers.__version__, 'sentence-transformers', st.__version__)"
} | tee "$RESULTS/machine.txt"
# without CUDA every step would run its GPU-sized workload on the CPU until its timeout
if [ "$SMOKE" != 1 ] && ! python3 -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  echo "error: no CUDA device: this script is for a lent GPU machine (SMOKE=1 runs its CPU check)" >&2
  exit 2
fi

if [ "$SMOKE" = 1 ]; then BENCH="--num-docs 64 --num-queries 10 --rounds 1"; STEPS="--max-steps 2"; TRAIN="--steps 1 --warmup 1 --batch-size 2"
else BENCH="--num-docs 2048 --num-queries 200 --rounds 3"; STEPS=""; TRAIN="--steps 10 --warmup 2"; fi

python3 convert_fles1.py "$SHARED/models/splade-tiny" /tmp/fles1-tiny > "$RESULTS/convert.log" 2>&1 \
  || { tail -5 "$RESULTS/convert.log"; echo "error: the backbone did not convert" >&2; exit 1; }
step bench_encode 150 python3 benchmarks/bench_encode.py --model /tmp/fles1-tiny --data "$SHARED/data/nfcorpus" $BENCH \
  --output "$RESULTS/bench_encode.json"

train_and_eval() {  # train_and_eval NAME [--set ...]
  local name=$1; shift
  step "train_$name" 200 python3 train_fles1.py --recipe recipes/fles1-tiny-nfcorpus.yaml --output-dir "/tmp/runs/$name" \
    --model "$SHARED/models/splade-tiny" --data "$SHARED/data/nfcorpus" $STEPS --set training.save_steps=81 --set training.logging_steps=5 "$@"
  [ -f "/tmp/runs/$name/training_log.json" ] || { echo "== $name: no trained model, not evaluated"; return; }
  cp "/tmp/runs/$name/training_log.json" "$RESULTS/${name}_training_log.json"
  for plot in /tmp/runs/"$name"/*.png; do [ -e "$plot" ] && cp "$plot" "$RESULTS/${name}_$(basename "$plot")"; done
  step "eval_dev_$name" 60 python3 eval_fles1.py --model "/tmp/runs/$name" --data "$SHARED/data/nfcorpus" --split dev \
    --threshold 0.3 --no-bm25 --no-production --output "$RESULTS/${name}_eval_dev.json"
  step "eval_test_$name" 90 python3 eval_fles1.py --model "/tmp/runs/$name" --data "$SHARED/data/nfcorpus" --split test \
    --threshold 0.3 --latency-queries 100 --output "$RESULTS/${name}_eval_test.json"
}
train_and_eval gpu-recipe
train_and_eval gpu-selected --set data.positive=bm25 --set loss.temperature=1.0 --set data.mask_false_negatives=true

DATA_ARGS="--model $SHARED/models/splade-tiny --data $SHARED/data/nfcorpus"
step bench_train 120 python3 benchmarks/bench_train.py $DATA_ARGS $TRAIN --output "$RESULTS/bench_train.json"
step bench_train_bf16 90 python3 benchmarks/bench_train.py $DATA_ARGS $TRAIN --bf16 --output "$RESULTS/bench_train_bf16.json"

# If time is left: the selected setting trained 5x longer (10 epochs = 810 steps).
OPTIONAL=1
train_and_eval gpu-selected-10ep --set data.positive=bm25 --set loss.temperature=1.0 --set data.mask_false_negatives=true \
  --set training.num_train_epochs=10

tar czf "$OUT/gpu_results.tgz" -C "$RESULTS" .
echo "done in $((SECONDS - START))s"
if [ "${#FAILED[@]}" -gt 0 ]; then  # a step that failed or ran out of time: its results are missing or partial
  echo "failed: ${FAILED[*]}" >&2
  exit 1
fi
