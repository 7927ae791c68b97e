#!/usr/bin/env bash
# The test suite and the encode benchmark on a lent CUDA machine (~5-8 min): what a user with a GPU runs. Most tests
# leave the device to the code (FLES1Encoder, SparseEncoder, the trainers pick CUDA when present), so on such a
# machine they exercise the CUDA paths that CI, which has no GPU, never reaches. Logs and JSON land in $OUT.
#
# Expects a copy of ../shared in .devshare/ (the device tool carries ignored folders only when named) and, where
# the machine lacks them, wheels in .whl/ for datasets, bm25s, PyStemmer, pytrec-eval-terrier.
#   device run: carry [".devshare", ".whl"], command: bash experiments/gpu_tests.sh
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-/tmp/gpu_tests}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
[ -d ../shared/models/splade-tiny ] || ln -sfn "$PWD/.devshare" ../shared  # tests read ../shared
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU"
  python3 -c "import torch, transformers, sentence_transformers as st; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__, 'sentence-transformers', st.__version__)"
} | tee "$OUT/machine.txt"
# without CUDA this is CI's run under another name (ALLOW_CPU=1 for a check of the script itself)
if [ "${ALLOW_CPU:-0}" != 1 ] && ! python3 -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  echo "error: no CUDA device: this script runs the tests on a lent GPU machine (ALLOW_CPU=1 to run it anyway)" >&2
  exit 2
fi

# Where pytest-xdist and pytest-timeout are installed (the device image has both), the tests run on 8 workers with
# 2 CPU threads each (16 threads each oversubscribed the 16 cores: the CPU-only nfcorpus fixture took > 110 s, and
# with one worker per file the run outlasted 300 s) and a hanging test fails alone with its stack; the failures
# then run again one at a time, which tells a test that fails beside others from one that fails.
PARALLEL=() THREADS=()
if python3 -c "import xdist, pytest_timeout" 2>/dev/null; then
  WORKERS=${WORKERS:-8}
  CORES=$(nproc --all)  # plain nproc follows OMP_NUM_THREADS
  THREADS=(env OMP_NUM_THREADS=$(( CORES / WORKERS > 0 ? CORES / WORKERS : 1 )))  # the tests only, not the benchmark
  PARALLEL=(-p no:benchmark -n "$WORKERS" --dist load --timeout 150 -v --tb=short -rfE)
fi
START=$SECONDS
timeout "${PYTEST_LIMIT:-300}" "${THREADS[@]}" python3 -m pytest -q -o cache_dir=/tmp/gpu_tests_cache "${PARALLEL[@]}" 2>&1 \
  | tee "$OUT/pytest.log" | grep -v "PASSED\|^\[gw.*linux\|^\.\+\s*\[" | tail -60
status=${PIPESTATUS[0]}
echo "== pytest: exit $status after $((SECONDS - START))s"
if [ "$status" = 1 ]; then
  START=$SECONDS
  timeout "${RERUN_LIMIT:-120}" python3 -m pytest -q -o cache_dir=/tmp/gpu_tests_cache --last-failed --tb=short 2>&1 \
    | tee "$OUT/pytest-failures-alone.log" | tail -30
  echo "== pytest --last-failed, one at a time: exit ${PIPESTATUS[0]} after $((SECONDS - START))s"
fi

START=$SECONDS
timeout "${BENCH_LIMIT:-90}" python3 benchmarks/bench_encode.py --output "$OUT/bench_encode.json" > "$OUT/bench_encode.log" 2>&1
bench_status=$?
echo "== bench_encode: exit $bench_status after $((SECONDS - START))s"
grep -v "Loading weights\|Writing model\|it/s\]" "$OUT/bench_encode.log" | tail -20
# the tests' status (a failure stays one when it passed alone: it fails beside others), else the benchmark's
[ "$status" = 0 ] || exit "$status"
exit "$bench_status"
