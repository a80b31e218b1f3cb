#!/usr/bin/env bash
# The main job: set up .venv with what the demo needs (tokenmem + the Hopper physics: the `demo` extra) and run
# `tokenmem demo` (arguments are passed on, e.g. --quick).
set -euo pipefail
cd "$(dirname "$0")/.."
TOKENMEM_EXTRAS=demo bash scripts/setup.sh .venv
.venv/bin/tokenmem demo "$@"
