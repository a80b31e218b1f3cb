#!/usr/bin/env bash
# The test command: two fresh environments, then the tests.
#  1. .venv        tokenmem on the newest transformers pip resolves  -> every test not marked `peers`
#  2. .venv-peers  tokenmem beside kvpress (transformers < 5.3)      -> the tests marked `peers`
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh .venv
.venv/bin/python -m pytest -q -p no:cacheprovider
bash scripts/setup.sh .venv-peers kvpress
.venv-peers/bin/python -m pytest -q -p no:cacheprovider -m peers
