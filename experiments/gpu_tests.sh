#!/usr/bin/env bash
# The test suite and the encode benchmark on a lent CUDA machine (~6-8 min): what a user with a GPU runs. Most tests
# leave the device to the code (FLES1Encoder, SparseEncoder, the trainers pick CUDA when present), so on such a
# machine they exercise the CUDA paths that CI, which has no GPU, never reaches. Logs and JSON land in $OUT.
#
# Expects a copy of ../shared in .devshare/ (the device tool carries ignored folders only when named) and, where
# the machine lacks them, wheels in .whl/ for datasets, bm25s, PyStemmer, pytrec-eval-terrier.
#   device run: carry [".devshare", ".whl"], command: bash experiments/gpu_tests.sh
set -uo pipefail
cd "$(dirname "$0")/.."
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

START=$SECONDS
timeout 420 python3 -m pytest -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest.log" | grep -v "^\.\+\s*\[" | tail -40
echo "== pytest: exit ${PIPESTATUS[0]} after $((SECONDS - START))s"

START=$SECONDS
timeout 120 python3 benchmarks/bench_encode.py --output "$OUT/bench_encode.json" > "$OUT/bench_encode.log" 2>&1
echo "== bench_encode: exit $? after $((SECONDS - START))s"
grep -v "Loading weights\|Writing model\|it/s\]" "$OUT/bench_encode.log" | tail -20
