#!/usr/bin/env bash
# Not part of CI (it installs a second environment): the test suite on the lower bound of every requirement at
# once, to keep requirements.txt's floors honest. Needs uv (pip install uv); VENV defaults to /tmp/fles1-lowest.
# uv does not read pip's configuration: FIND_LINKS (default: pip's find-links, where this disk keeps the CPU torch
# wheel) keeps it from installing the multi-GB CUDA build of torch.
#   bash .ci/lowest_versions.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-/tmp/fles1-lowest}
FIND_LINKS=${FIND_LINKS-$(python -m pip config get global.find-links 2>/dev/null || true)}
uv venv -q --allow-existing "$VENV"
# every "name>=floor" pinned to "name==floor" (torch is pinned already)
sed -n 's/^\([A-Za-z0-9_.-]*\)>=\([^,]*\).*/\1==\2/p' requirements.txt > "$VENV/floors.txt"
uv pip install -q -p "$VENV/bin/python" ${FIND_LINKS:+--find-links "$FIND_LINKS"} -r requirements.txt -c "$VENV/floors.txt"
"$VENV/bin/python" - <<'PY'
import importlib.metadata as m
names = ["torch", "transformers", "sentence-transformers", "huggingface-hub", "safetensors", "datasets", "accelerate",
         "numpy", "scipy", "matplotlib", "pytrec-eval-terrier", "bm25s", "PyStemmer"]
print(" ".join(f"{n}=={m.version(n)}" for n in names))
PY
HF_HUB_OFFLINE=1 "$VENV/bin/python" -m pytest -q -p no:cacheprovider
