#!/usr/bin/env bash
# Create (or update) a virtual environment with tokenmem installed.
#   scripts/setup.sh [VENV_DIR] [EXTRA_PIP_ARGS...]
# TOKENMEM_EXTRAS picks the extras (default `dev`: everything the tests need; scripts/demo.sh uses `demo`).
# torch==2.13.0 is installed first: it is the CPU build; a bare `torch` requirement would pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"; shift || true
extras="${TOKENMEM_EXTRAS:-dev}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --disable-pip-version-check torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
"$venv/bin/python" -m pip install -q --disable-pip-version-check -e ".[$extras]" "$@" 2>&1 | grep -v "^WARNING: Location" || true
"$venv/bin/python" -c "import torch, transformers, tokenmem; print(f'{tokenmem.__name__} {tokenmem.__version__} | torch {torch.__version__} | transformers {transformers.__version__}')"
