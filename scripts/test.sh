#!/usr/bin/env bash
# The test command: three fresh environments, then the tests.
#  1. .venv        tokenmem on the newest transformers pip resolves  -> every test not marked `peers`
#  2. .venv-peers  tokenmem beside kvpress (transformers < 5.3)      -> the tests marked `peers`
#  3. .venv-vision torch 2.14.1 + torchvision 0.29.1 (torchvision does not import beside torch 2.13.0's CPU build)
#                  -> our LLaVA-NeXT-Video frame preprocessing equals transformers' LlavaNextVideoProcessor
set -euo pipefail
export TOKENMEM_NATIVE=require  # a broken build of the fused CPU kernel fails the tests instead of warning
cd "$(dirname "$0")/.."
bash scripts/setup.sh .venv
.venv/bin/python -m pytest -q -p no:cacheprovider
bash scripts/setup.sh .venv-peers kvpress
.venv-peers/bin/python -m pytest -q -p no:cacheprovider -m peers
bash scripts/setup.sh .venv-vision torch==2.14.1 torchvision==0.29.1
.venv-vision/bin/python -m pytest -q -p no:cacheprovider tests/test_video_processor.py
