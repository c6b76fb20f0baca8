#!/usr/bin/env bash
# The main job: run notebooks/quickstart.ipynb end to end on the demo model and print what it generated.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${VLLM_NOTEBOOK_VENV:-.venv}
exec "$VENV/bin/vllm-notebook" run notebooks/quickstart.ipynb "$@"
