#!/usr/bin/env bash
# Set up gptoss-ray in ./.venv: torch first (the CUDA build where a GPU answers, the
# CPU build otherwise, so a laptop never pulls gigabytes of CUDA libraries), then the
# project with its test extras. Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null

if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: GPU found, installing torch $TORCH_VERSION (CUDA build)"
    python -m pip install -q "torch==$TORCH_VERSION"
  else
    echo "setup: no GPU, installing torch $TORCH_VERSION (CPU build)"
    # PyTorch's CPU index first; where it is unreachable pip moves on at once to the
    # configured indexes (a local CPU wheel, or PyPI).
    python -m pip install -q --timeout 10 --retries 0 "torch==$TORCH_VERSION" \
      --extra-index-url https://download.pytorch.org/whl/cpu
  fi
fi

python -m pip install -q -e ".[test]"
# Optional: a helm binary for the chart's lint/render tests (skipped without one).
bash deploy/fetch_helm.sh >/dev/null 2>&1 || echo "setup: no helm binary; the helm render tests will skip"
# Optional: PostgreSQL (Debian's package) for the shared Responses store tests, which
# start their own throwaway server; skipped where apt-get (or root/sudo) is not available.
if ! command -v pg_ctl >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo -n"; fi
  if command -v apt-get >/dev/null 2>&1 && { [ -z "$SUDO" ] || sudo -n true 2>/dev/null; }; then
    { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql; } \
      >/dev/null 2>&1 || echo "setup: could not install postgresql; the Postgres store tests will skip"
  else
    echo "setup: no postgresql (and no apt-get with root); the Postgres store tests will skip"
  fi
fi
echo "setup: ready ($(python -c 'import torch, ray; print(f"torch {torch.__version__}, ray {ray.__version__}")'))"
