#!/usr/bin/env bash
# Issue 15, the fused switch + forward CUDA graph (Worker.capture(fused=True),
# CapturedForward.switch_and_run), on the GPU machine, from the repository
# root, with .gpu/ built by scripts/build-gpu-bundle.sh (libpipeswitch.so is
# all it uses): the GPU tests of pipeswitch.torch's graphs (the fused ones and
# the existing capture tests), then the plan measurements of bench/plans.sh
# with the PyTorch variants as fused graph replays (GRAPHS=1 DEMO=0).
# Writes under $OUT: gpu-fused.log, fused-timing.json (fused replay against
# switch_to + replay), plans/{plans-paper.json, plans-paper.log,
# plans-table.md}. Under 6 minutes: each step has its own timeout.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
log=$OUT/gpu-fused.log
: >"$log"
export PIPESWITCH_LIB=$PWD/.gpu/libpipeswitch.so PYTHONPATH=$PWD/python${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 PIPESWITCH_FUSED_TIMING=$OUT/fused-timing.json
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee -a "$log"
fail=0
echo "=== python GPU tests: fused graphs and captured graphs" | tee -a "$log"
timeout --kill-after=5 "${PYTEST_TIMEOUT:-80}" python3 -m pytest python/tests/test_torch.py -q -rs -s -p no:cacheprovider \
  -k "fused or captured" >>"$log" 2>&1 || fail=1
tail -n 15 "$log"
echo "=== bench/plans.sh with fused graphs (GRAPHS=1 DEMO=0)" | tee -a "$log"
GRAPHS=1 DEMO=0 PAPER_TIMEOUT_S="${PAPER_TIMEOUT_S:-255}" PAPER_BUDGET_S="${PAPER_BUDGET_S:-225}" \
  timeout --kill-after=5 "${PLANS_TIMEOUT_S:-270}" bash bench/plans.sh .gpu "$OUT/plans" >>"$log" 2>&1 || fail=1
tail -n 40 "$log"
echo "overall fail=$fail" | tee -a "$log"
exit $fail
