#!/usr/bin/env bash
# Issue 11 on the GPU machine, from the repository root, with .gpu/ built by
# scripts/build-gpu-bundle.sh (this branch's daemon): the training tests with
# PyTorch on CUDA (bit-for-bit resume), then the experiments of
# bench/train/experiment.py (PipeSwitch inference-first and time-share
# cycles, dedicated GPU, MPS, stop-and-start; ResNet-152, Inception-v3,
# BERT-base). Writes under $OUT: train-gpu.log, train-experiments.json,
# train-daemon.log, train-preemption-trace.json (Perfetto / chrome://tracing).
# Finishes in under 8 minutes (the experiment stops starting parts after
# BUDGET_S seconds and is killed at EXP_TIMEOUT_S; its JSON is saved after
# every part).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
log=$OUT/train-gpu.log
: >"$log"
export PIPESWITCH_LIB=$PWD/.gpu/libpipeswitch.so PIPESWITCH_BIN=$PWD/.gpu/pipeswitch
export PYTHONPATH=$PWD/python${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee -a "$log"
fail=0
echo "=== python tests of training (torch on CUDA included)" | tee -a "$log"
timeout "${PYTEST_TIMEOUT:-60}" python3 -m pytest python/tests/test_train.py -q -rs -p no:cacheprovider >>"$log" 2>&1 || fail=1
tail -n 3 "$log"
echo "=== experiments" | tee -a "$log"
timeout --kill-after=5 "${EXP_TIMEOUT_S:-390}" python3 bench/train/experiment.py --bin .gpu/pipeswitch --out "$OUT" \
  --budget-s "${BUDGET_S:-320}" ${EXP_ARGS:-} >>"$log" 2>&1 || fail=1
tail -n 40 "$log"
echo "overall fail=$fail" | tee -a "$log"
exit $fail
