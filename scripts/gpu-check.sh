#!/usr/bin/env bash
# Runs on the GPU machine from the repository root, with .gpu/ built by
# scripts/build-gpu-bundle.sh: every test (GPU ones included), the C examples,
# compute-sanitizer memcheck, the demo and the benchmarks. Logs go to $OUT.
# Env: SANITIZE=0 / BENCH=0 / DEMO=0 / GEMM=0 skip parts; REPS (transfer),
# DEMO_REPS (demo).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PIPESWITCH_ROOT=$PWD
log=$OUT/gpu-check.log
: >"$log"
nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.max,pcie.link.width.max --format=csv | tee -a "$log"
fail=0
for t in .gpu/deps/*; do
  case $(basename "$t") in header) continue;; esac  # needs the sources and cbindgen
  name=$(basename "$t")
  echo "=== $name --include-ignored" | tee -a "$log"
  if ! "$t" --include-ignored --test-threads=1 >>"$log" 2>&1; then
    echo "FAILED: $name" | tee -a "$log"; fail=1
  fi
  tail -n 3 "$log" | grep "test result" || true
done
if [ "${SANITIZE:-1}" = 1 ]; then
  echo "=== compute-sanitizer memcheck: gpu tests" | tee -a "$log"
  compute-sanitizer --tool memcheck --error-exitcode 9 .gpu/deps/gpu --ignored --test-threads=1 \
    --skip ipc --skip worker --skip dies --skip error_paths --skip forged >"$OUT/memcheck.log" 2>&1
  echo "memcheck rc=$?" | tee -a "$log"; tail -n 5 "$OUT/memcheck.log" | tee -a "$log"
  echo "=== compute-sanitizer memcheck: worker (every kernel through the small models)" | tee -a "$log"
  compute-sanitizer --tool memcheck --error-exitcode 9 .gpu/deps/worker_gpu --ignored --test-threads=1 \
    --skip full_size >"$OUT/memcheck-worker.log" 2>&1
  echo "memcheck rc=$?" | tee -a "$log"; tail -n 5 "$OUT/memcheck-worker.log" | tee -a "$log"
fi
if [ "${DEMO:-1}" = 1 ]; then
  echo "=== pipeswitch demo" | tee -a "$log"
  .gpu/pipeswitch demo --reps "${DEMO_REPS:-20}" --out-dir "$OUT" 2>&1 | tee -a "$log" || fail=1
fi
if [ "${GEMM:-1}" = 1 ]; then
  echo "=== bench gemm (ours vs cuBLAS through PyTorch)" | tee -a "$log"
  OUT="$OUT" TILES=0 bash bench/gemm.sh 2>&1 | tail -n 30 | tee -a "$log" || fail=1
fi
if [ "${BENCH:-1}" = 1 ]; then
  echo "=== bench transfer" | tee -a "$log"
  .gpu/pipeswitch bench transfer --reps "${REPS:-20}" --json-out "$OUT/transfer.json" 2>&1 | tee -a "$log"
  echo "=== bench kernels" | tee -a "$log"
  .gpu/pipeswitch bench kernels 2>&1 | tee -a "$log"
fi
echo "overall fail=$fail" | tee -a "$log"
exit $fail
