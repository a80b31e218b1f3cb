#!/usr/bin/env bash
# The main job: set up .venv and run `tokenmem demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh .venv
.venv/bin/tokenmem demo "$@"
