#!/usr/bin/env bash
# Run the whole test suite on the real vLLM CPU engine (sets up .venv first).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${VLLM_NOTEBOOK_VENV:-.venv}
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
export PYTHONUNBUFFERED=1
exec "$VENV/bin/python" -m pytest -p no:cacheprovider "$@"
