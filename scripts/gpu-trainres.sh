#!/usr/bin/env bash
# save=auto (issue 11's residency of training state) on the GPU machine, from
# the repository root: the training tests with PyTorch on CUDA, which include
# the state's reported size (parameters, gradients, buffers, momentum) and a
# state kept resident, then written back and restored, ending bit for bit like
# a run never preempted. Writes $OUT/trainres-gpu.log; about a minute.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
log=$OUT/trainres-gpu.log
export PIPESWITCH_LIB=$PWD/.gpu/libpipeswitch.so
export PYTHONPATH=$PWD/python${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$log" 2>&1
timeout "${PYTEST_TIMEOUT:-120}" python3 -m pytest python/tests/test_train.py -q -rs -p no:cacheprovider >>"$log" 2>&1
rc=$?
tail -n 5 "$log"
echo "overall rc=$rc" | tee -a "$log"
exit $rc
