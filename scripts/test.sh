#!/usr/bin/env bash
# Run the whole test suite against real parts: vLLM's CPU engine, real kernels, a real
# two-node Slurm cluster with Ray (scripts/dev-cluster, started here), and JupyterLab in
# Debian's Chromium. As root it installs the Debian packages it needs (slurm, munge,
# chromium). Extra arguments go to pytest.
set -euo pipefail
case "${1:-}" in -h|--help)
  cat <<'USAGE'
usage: bash scripts/test.sh [PYTEST ARGS...]

Runs the whole test suite: the fast tier (pytest -m "not slow"), then the slow tier against real parts
(vLLM's CPU engine, kernels, a two-node Slurm cluster with Ray, JupyterLab in Chromium, two user accounts).
First it creates or updates .venv (scripts/setup.sh), installs Debian's chromium, slurm and munge as root,
and starts the dev Slurm cluster (scripts/dev-cluster up; stopped again at the end).
Selecting tests (-k, -m, a path or a node id) runs just those, in one pytest call.
  bash scripts/test.sh -m "not slow"        the fast tier alone
  bash scripts/test.sh tests/test_units.py  one file
USAGE
  exit 0 ;;
esac
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${VLLM_NOTEBOOK_VENV:-.venv}
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
export PYTHONUNBUFFERED=1
if ! [ -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ]; then  # the browser tests drive Debian's Chromium
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1 \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }
fi
if bash scripts/dev-cluster up; then
  eval "$(bash scripts/dev-cluster env)"
  trap 'bash scripts/dev-cluster down >/dev/null 2>&1 || true' EXIT
elif [ -n "${CI:-}" ]; then
  echo "the dev Slurm cluster did not start" >&2
  exit 1
else
  echo "warning: no dev Slurm cluster (needs root); the cluster tests will be skipped" >&2
fi
# Two tiers: the fast one (no vLLM engine, kernel, server, Slurm or browser; under a minute) first, so a broken
# change fails at once, then the slow one. Selecting tests yourself (-k, -m, a path) runs just those.
selected=
for a in "$@"; do case "$a" in -k|-m|tests/*|*.py|*::*) selected=1 ;; esac; done
if [ -n "$selected" ]; then
  status=0
  "$VENV/bin/python" -m pytest -p no:cacheprovider "$@" || status=$?
  exit "$status"  # not exec: the EXIT trap stops the dev cluster
fi
"$VENV/bin/python" -m pytest -p no:cacheprovider -q -m "not slow" -x
"$VENV/bin/python" -m pytest -p no:cacheprovider -m slow --durations=40 "$@"
