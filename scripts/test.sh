#!/usr/bin/env bash
# The test command: three fresh environments, then the tests.
#  1. .venv        tokenmem on the newest transformers pip resolves  -> every test not marked `peers`
#                  (tests/test_packaging.py also builds the wheel and runs `tokenmem demo --quick` from it in a
#                  fresh environment outside the checkout)
#  2. .venv-peers  tokenmem beside kvpress on the oldest supported transformers (pyproject's lower bound, 5.2;
#                  kvpress needs < 5.3) -> the tests marked `peers`, then the exactness and cache-keyword tests
#  3. .venv-vision torch 2.14.1 + torchvision 0.29.1 (torchvision does not import beside torch 2.13.0's CPU build)
#                  -> our LLaVA-NeXT-Video frame preprocessing equals transformers' LlavaNextVideoProcessor
set -euo pipefail
export TOKENMEM_NATIVE=require  # a broken build of the fused CPU kernel fails the tests instead of warning
cd "$(dirname "$0")/.."
oldest=$(sed -n 's/^ *"transformers>=\([0-9.]*\),.*/\1/p' pyproject.toml)  # e.g. 5.2 (== 5.2 matches 5.2.0)
bash scripts/setup.sh .venv
.venv/bin/python -m pytest -q -p no:cacheprovider
bash scripts/setup.sh .venv-peers kvpress "transformers==${oldest:?no transformers lower bound in pyproject.toml}"
.venv-peers/bin/python -m pytest -q -p no:cacheprovider -m peers
.venv-peers/bin/python -m pytest -q -p no:cacheprovider tests/test_exactness.py tests/test_compat.py
bash scripts/setup.sh .venv-vision torch==2.14.1 torchvision==0.29.1
.venv-vision/bin/python -m pytest -q -p no:cacheprovider tests/test_video_processor.py
