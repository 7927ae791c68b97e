#!/usr/bin/env bash
# Regenerates results/model_card/ (README.md + plots/) from committed result files only: the card of the selected
# setting (seed 0 published, seeds 1-2 in the reproducibility table) with the studies of results/STUDY.md. Needs
# seed 0's weights, outputs/probe-bm25pos-tau1-seed0 (not committed: `bash experiments/study.sh` trains it); the
# dry run validates the folder (three loaders) and uploads nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
RUNS=results/runs/probe-bm25pos-tau1-seed
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT  # also when push refuses
HUB=$SCRATCH/hub
python push_fles1.py --model outputs/probe-bm25pos-tau1-seed0 --repo-id mindoval/fles1-v14 --dry-run "$HUB" \
  --results ${RUNS}{0,1,2}/eval_test.json --training-log ${RUNS}{0,1,2}/training_log.json \
  --plots ${RUNS}0/{loss,nnz,lambda_d}.png \
          results/plots/{seeds_nnz,clfr_vs_fixed_nnz,l1_vs_squared_nnz,exploration_nnz,gpu_full_schedule_nnz}.png \
  --studies results/STUDY.md
cp "$HUB/README.md" results/model_card/README.md
cp "$HUB"/plots/*.png results/model_card/plots/
echo "results/model_card/ regenerated"
