#!/usr/bin/env bash
# Every GPU check of the runtime in one run (for a session that is lent a GPU; under 10 min on
# an H200, to fit one device call). Writes its tables to benchmarks/results/ and, when set, to
# $OUT, each as soon as it is measured (a run cut short keeps what it measured).
#
#   bash benchmarks/gpu_checks.sh            # from the repository root, on the GPU machine
#
# The GPU machine may lack python-mip: solve then writes checked greedy plans (it says so).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
RES=benchmarks/results
mkdir -p "$RES"
log() { echo "== $*" >&2; }
save() { if [ -n "${OUT:-}" ]; then cp "$RES"/gpu-* "$RES"/runtime-h200-* "$OUT"/ 2>/dev/null; fi; true; }

log "machine"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } \
  | tee "$RES/gpu-machine.txt"
save

log "planned allocator: build"
python -c "from memoplan.runtime.allocator import build; print(build())" || true

log "gradients under plans vs plain training (poison on), caching and planned allocator"
timeout 180 python benchmarks/gpu_correctness.py --device cuda --planned-allocator \
  --out "$RES/gpu-correctness.md"
echo "gpu_correctness exit $?"
save

log "2-layer 7B stack at 64K and 128K: all strategies side by side"
timeout 330 python benchmarks/runtime_bench.py --preset 7b --layers 2 --seq 65536 131072 \
  --device cuda --steps 2 --child-timeout 150 --out "$RES/runtime-h200-2layers.md"
echo "runtime_bench exit $?"
save

if [ "${MEMOPLAN_LONG:-0}" = 1 ]; then
  log "32-layer 7B stack at 128K: full recompute vs memoplan"
  timeout 900 python benchmarks/runtime_bench.py --preset 7b --layers 32 --seq 131072 \
    --device cuda --steps 2 --strategies "full recompute" memoplan "memoplan + planned allocator" \
    --out "$RES/runtime-h200-32layers.md"
fi

save
