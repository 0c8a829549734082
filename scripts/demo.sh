#!/usr/bin/env bash
# The main job on the bundled example, on a CPU: profile the tiny Llama, then the later stages.
# Results land in out/ (profile.json, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p out
memoplan profile examples/llama/model.py -o out/profile.json
