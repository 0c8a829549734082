#!/usr/bin/env bash
# Every GPU check of the runtime in one run, for a session that is lent a GPU: at most 8 minutes
# on an H200 (each step runs under `timeout`; the limits and kill grace add up to 475 s). Each
# table goes to benchmarks/results/ (or $RES) and, when $OUT is set, is copied there as soon as
# it exists; a step that runs out of time gets a row saying so under the rows it measured.
# Besides the tables: gpu-machine.txt, gpu-steps.md (exit status and seconds per step) and
# gpu-log.txt (every step's output). What each table is: benchmarks/results/README.md.
#
#   bash benchmarks/gpu_checks.sh                                  # on the GPU machine
#   MEMOPLAN_CHECKS_CPU=1 RES=/tmp/r bash benchmarks/gpu_checks.sh  # same steps, tiny, on a CPU
#
# The GPU machine may lack python-mip: solve then writes checked greedy plans (tables say so).
# A limit can be changed for one run, e.g. T_MEMORY=240 (seconds).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
RES=${RES:-benchmarks/results}
mkdir -p "$RES"
TMP=$(mktemp -d)
LOG="$RES/gpu-log.txt"
STEPS="$RES/gpu-steps.md"
: > "$LOG"
printf '| step | exit | seconds | limit s |\n|---|---:|---:|---:|\n' > "$STEPS"

if [ "${MEMOPLAN_CHECKS_CPU:-0}" = 1 ]; then  # CI smoke: the same steps, tiny, on a CPU
  DEV=cpu PRESET=tiny S8K=256 S64K=512 S128K=768 PSEQ=128
else
  DEV=cuda PRESET=7b S8K=8192 S64K=65536 S128K=131072 PSEQ=1024
fi
T_MACHINE=${T_MACHINE:-10} T_BUILD=${T_BUILD:-50} T_GRADS=${T_GRADS:-150}
T_PHASES=${T_PHASES:-65} T_MEMORY=${T_MEMORY:-190}
KILL=2  # seconds between SIGTERM and SIGKILL when a step runs out of time
PROFILE="$TMP/stack-$PRESET.json"  # the stack's profile: made by the first step that needs it
TRACE="${OUT:-$TMP}/gpu-phases-$PRESET.trace.json"
COMMON=(--device "$DEV" --preset "$PRESET" --layers 2 --profile-seq "$PSEQ" --profile "$PROFILE")

save() { if [ -n "${OUT:-}" ]; then cp "$RES"/gpu-* "$OUT"/ 2>/dev/null; fi; true; }
if [ -n "${OUT:-}" ]; then  # also every 10 s: a run cut short from outside keeps its rows
  (while sleep 10; do save; done) >/dev/null 2>&1 &
  SAVER=$!
  trap 'kill "$SAVER" 2>/dev/null' EXIT
fi

# step NAME LIMIT TABLE COMMAND...: COMMAND under `timeout`, its output in the log; a row in
# TABLE (a file, or - for none) when it ran out of time; its status in gpu-steps.md.
step() {
  local name=$1 limit=$2 table=$3 began=$SECONDS rc
  shift 3
  echo "== $name (at most $limit s)" | tee -a "$LOG" >&2
  timeout -k "$KILL" "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    echo "== $name: timed out after $limit s" | tee -a "$LOG" >&2
    if [ "$table" != - ]; then
      echo "| timed out after $limit s: the rows above are what it measured |" >> "$table"
    fi
  fi
  echo "| $name | $rc | $((SECONDS - began)) | $limit |" >> "$STEPS"
  save
}

machine() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  python -c "import mip" 2>/dev/null && echo "python-mip: yes" || echo "python-mip: no (greedy plans)"
  echo "cpus: $(nproc)"
  grep -E '^(MemTotal|MemAvailable)' /proc/meminfo || true
  echo "locked-memory limit (ulimit -l): $(ulimit -l)"
}

step machine "$T_MACHINE" - bash -c "$(declare -f machine); machine > '$RES/gpu-machine.txt'; cat '$RES/gpu-machine.txt'"

if [ "$DEV" = cuda ]; then
  step "allocator build" "$T_BUILD" - \
    python -c "from memoplan.runtime.allocator import build; print(build())"
fi

# (a) bf16 gradients of the 7B-shaped stack at 8K, 3 layers (at alpha 0.5 layer 0 copies its
# split tensors' last tokens, its blocks growing down, and the kept layer 2's split tensors
# have blocks of their own): alpha 0, 0.5, 1, poison on, with PyTorch's allocator and (a
# child each) the planned one
step "gradients, $PRESET stack, $S8K tokens" "$T_GRADS" "$RES/gpu-grads-$PRESET.md" \
  python benchmarks/gpu_correctness.py "${COMMON[@]}" --models stack --seq "$S8K" \
  --layers 3 --profile "$TMP/stack3-$PRESET.json" \
  --alphas 0 0.5 1 --steps 2 --planned-allocator --child-timeout 45 \
  --out "$RES/gpu-grads-$PRESET.md"

# (b) one 64K step, timed per phase from a profiler trace
step "phases, $PRESET stack, $S64K tokens" "$T_PHASES" "$RES/gpu-phases-$PRESET.md" \
  python benchmarks/phase_timing.py "${COMMON[@]}" --seq "$S64K" --time-limit 2 \
  --trace "$TRACE" --out "$RES/gpu-phases-$PRESET.md"
if [ -f "$TRACE" ] && [ -n "${OUT:-}" ]; then gzip -f "$TRACE"; fi

# (c) time and memory at 64K and 128K: keep-all, full recompute, memoplan (PyTorch's allocator)
# in one process, memoplan with the planned allocator in a child per length
step "time and memory, $PRESET stack, $S64K and $S128K tokens" "$T_MEMORY" "$RES/gpu-runtime-$PRESET.md" \
  python benchmarks/runtime_bench.py "${COMMON[@]}" --seq "$S64K" "$S128K" --steps 2 \
  --strategies keep-all "full recompute" memoplan "memoplan + planned allocator" \
  --time-limit 2 --child-timeout 90 --out "$RES/gpu-runtime-$PRESET.md"

rm -rf "$TMP"
echo "== done in $SECONDS s; tables in $RES${OUT:+ and $OUT}" | tee -a "$LOG" >&2
save
