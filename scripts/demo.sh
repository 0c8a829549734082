#!/usr/bin/env bash
# The main job on the bundled example, on a CPU: profile the tiny Llama, solve its plan for a
# 128K-token sequence on one H200 (also as a generated module), draw the plan, and train three
# steps with it (gradients are compared with plain training). Everything lands in out/.
# --keep-last 1: the tiny model would fit the GPU whole (the default then keeps every layer);
# this shows the offload path, the one long sequences need.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p out
memoplan profile examples/llama/model.py -o out/profile.json
memoplan solve out/profile.json --seq 128K --gpus 1 --hw h200 --keep-last 1 -o out/plan.json --emit out/runtime_plan.py
memoplan plot out/plan.json -o out/plots
python3 examples/train.py examples/llama/model.py out/plan.json --seq 512 --steps 3
