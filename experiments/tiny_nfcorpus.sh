#!/usr/bin/env bash
# Issue 6: the FLES-1 recipe on the shipped backbone (recipes/fles1-tiny-nfcorpus.yaml), scaled to 2 CPU cores.
#
#   bash experiments/tiny_nfcorpus.sh RUN_NAME SEED [extra train_fles1.py args, e.g. --set loss.regularizer=flops]
#
# CPU schedule (stated in the card): 60 optimizer steps of batch 32 x (1 positive + 7 negatives), training
# documents truncated at 128 tokens (evaluation uses the model's 256), CLFR every 20 steps toward 160 document
# non-zeros (the backbone's own density at 128 tokens is ~170), in-batch false negatives masked (nfcorpus
# judges ~43 documents relevant per train query, so other queries' documents are often relevant to this one),
# everything else the recipe's (tau 0.05, L1 FLOPS lambda_d 3e-5, gain 0.1, AdamW lr 2e-5). Selection on dev,
# report on test; results/runs/RUN_NAME keeps the JSONs, training log and plots (never weights).
#
# The committed runs (experiments/study.sh runs them all):
#   fnmask-seed{0,1,2}     the recipe above, three seeds
#   fnmask-fixed-seed0     CLFR off: lambda_d fixed at 3e-5                (--set clfr.enabled=false)
#   fnmask-flops-seed0     classic squared FLOPS instead of L1 FLOPS       (--set loss.regularizer=flops)
# Exploration runs, seed 0 (committed too):
#   clfr-l1-seed0          before false-negative masking (--set data.mask_false_negatives=false)
#   tau1-seed0             before masking, tau 1.0       (--set data.mask_false_negatives=false --set loss.temperature=1.0)
#   probe-bm25pos-seed0    positive = the relevant document BM25 ranks first (--set data.positive=bm25)
# Selected on dev (the only setting that beat the backbone on dev), three seeds:
#   probe-bm25pos-tau1-seed{0,1,2}    --set data.positive=bm25 --set loss.temperature=1.0
#   rerun-check-seed0      probe-bm25pos-tau1-seed0's command run again: bitwise-identical weights and metrics
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
if [ $# -lt 2 ]; then
  echo "usage: bash experiments/tiny_nfcorpus.sh RUN_NAME SEED [train_fles1.py args]  (e.g. main 0)" >&2
  exit 2
fi
run=$1; seed=$2; shift 2
if [[ ! $run =~ ^[A-Za-z0-9._-]+$ || $run == . || $run == .. ]]; then  # a folder name under outputs/ and results/runs/
  echo "RUN_NAME must be letters, digits, '.', '_' or '-', got '$run'" >&2
  exit 2
fi
if [[ ! $seed =~ ^[0-9]+$ ]]; then
  echo "SEED must be a non-negative integer, got '$seed'" >&2
  exit 2
fi
out=outputs/$run
results=results/runs/$run
fresh=--overwrite  # a rerun starts over in outputs/RUN_NAME; pass --resume to continue an interrupted one instead
for arg in "$@"; do
  if [[ $arg == --resume* ]]; then fresh=; fi
done
python train_fles1.py --recipe recipes/fles1-tiny-nfcorpus.yaml --output-dir "$out" --max-steps 60 $fresh \
  --set model.document_max_length=128 --set clfr.target_nnz_d=160 --set clfr.interval_steps=20 \
  --set training.save_steps=20 --set training.logging_steps=5 --set data.mask_false_negatives=true \
  --set training.seed="$seed" --set training.data_seed="$seed" --set data.seed="$seed" "$@"
# an earlier run's results go now: a step failing below must not leave them beside this run's (a folder that
# looks complete but mixes two runs)
rm -f "$results"/eval_dev.json "$results"/eval_test.json "$results"/eval_test.md "$results"/training_log.json \
  "$results"/*.png
python eval_fles1.py --model "$out" --data ../shared/data/nfcorpus --split dev --threshold 0.3 \
  --no-bm25 --no-production --output "$results/eval_dev.json"
python eval_fles1.py --model "$out" --data ../shared/data/nfcorpus --split test --threshold 0.3 \
  --latency-queries 50 --output "$results/eval_test.json" --markdown "$results/eval_test.md"
cp "$out"/training_log.json "$results/"
for plot in "$out"/*.png; do  # none when the run logged no row (fewer steps than training.logging_steps)
  if [ -e "$plot" ]; then cp "$plot" "$results/"; fi
done
