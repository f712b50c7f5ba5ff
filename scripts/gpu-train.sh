#!/usr/bin/env bash
# Issue 11 on the GPU machine, from the repository root, with .gpu/ built by
# scripts/build-gpu-bundle.sh (this branch's daemon). Parts (PARTS, default
# "tests stop exp"):
# - tests: the training tests with PyTorch on CUDA (bit-for-bit resume, the
#   write-back's pinned buffer);
# - stop: bench/train/stop_bench.py, the stop of a preempted step measured
#   without the daemon, preemptions at random moments of a step, before and
#   after each change (data made on the CPU or the GPU, Python's 5 ms switch
#   interval or the step's quick one), and the write-back to host memory;
# - exp: the experiments of bench/train/experiment.py (PipeSwitch
#   inference-first for every model, then time-share cycles, dedicated GPU,
#   MPS, stop-and-start; ResNet-152, Inception-v3, BERT-base), inference
#   workers with --graphs; EXP_ARGS passes options (e.g. "--skip mps,cycles").
# Writes under $OUT: train-gpu.log, train-stop.json, train-experiments.json,
# train-daemon.log, train-preemption-trace.json (Perfetto / chrome://tracing).
# Finishes in under 8 minutes: each part has a time limit (PYTEST_TIMEOUT,
# STOP_TIMEOUT_S, EXP_TIMEOUT_S) and the benchmarks stop starting new parts
# after their budget (STOP_BUDGET_S, BUDGET_S); their JSON is saved after
# every part.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
log=$OUT/train-gpu.log
: >"$log"
PARTS=${PARTS:-tests stop exp}
export PIPESWITCH_LIB=$PWD/.gpu/libpipeswitch.so PIPESWITCH_BIN=$PWD/.gpu/pipeswitch
export PYTHONPATH=$PWD/python${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee -a "$log"
fail=0
has() { case " $PARTS " in *" $1 "*) return 0 ;; esac; return 1; }
if has tests; then
  echo "=== python tests of training (torch on CUDA included)" | tee -a "$log"
  timeout "${PYTEST_TIMEOUT:-60}" python3 -m pytest python/tests/test_train.py -q -rs -p no:cacheprovider >>"$log" 2>&1 || fail=1
  tail -n 3 "$log"
fi
if has stop; then
  echo "=== stop of a preempted step (no daemon)" | tee -a "$log"
  timeout --kill-after=5 "${STOP_TIMEOUT_S:-130}" python3 bench/train/stop_bench.py --out "$OUT" \
    --budget-s "${STOP_BUDGET_S:-80}" ${STOP_ARGS:-} >>"$log" 2>&1 || fail=1
  grep -E "stop mean|host save" "$log" | tail -n 14
fi
if has exp; then
  echo "=== experiments" | tee -a "$log"
  timeout --kill-after=5 "${EXP_TIMEOUT_S:-270}" python3 bench/train/experiment.py --bin .gpu/pipeswitch --out "$OUT" \
    --budget-s "${BUDGET_S:-215}" ${EXP_ARGS:-} >>"$log" 2>&1 || fail=1
  tail -n 40 "$log"
fi
echo "overall fail=$fail" | tee -a "$log"
exit $fail
