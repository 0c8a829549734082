#!/usr/bin/env bash
# Installs memoplan with its test dependencies and runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python3 -m pytest -q "$@"
