#!/usr/bin/env bash
# Issue 6: every committed run, in order (about 5-6 minutes each on 2 free CPU cores), then the summary.
set -euo pipefail
cd "$(dirname "$0")/.."
for seed in 0 1 2; do bash experiments/tiny_nfcorpus.sh fnmask-seed$seed $seed; done
bash experiments/tiny_nfcorpus.sh fnmask-fixed-seed0 0 --set clfr.enabled=false
bash experiments/tiny_nfcorpus.sh fnmask-flops-seed0 0 --set loss.regularizer=flops
python experiments/summarize.py
