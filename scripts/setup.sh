#!/usr/bin/env bash
# Installs memoplan and what it needs. torch comes in as the CPU build 2.13.0 first, so that the
# project's "torch>=2.5" requirement is already met and pip never pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q "torch==2.13.0"
python3 -m pip install -q -e ".[test]"
