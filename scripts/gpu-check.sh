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
if [ "${PYTEST:-1}" = 1 ]; then
  echo "=== python tests with PyTorch on the GPU" | tee -a "$log"
  PIPESWITCH_LIB=$PWD/.gpu/libpipeswitch.so python3 -m pytest python/tests -q -p no:cacheprovider >"$OUT/pytest-gpu.log" 2>&1
  rc=$?; echo "pytest rc=$rc" | tee -a "$log"; tail -n 3 "$OUT/pytest-gpu.log" | tee -a "$log"
  [ $rc = 0 ] || fail=1
fi
if [ "${SANITIZE:-1}" = 1 ]; then
  # memcheck, racecheck (shared-memory hazards in our kernels) and synccheck
  # (barrier misuse) on every test binary that runs kernels or switches; the
  # full-size and timing-only tests are skipped (same kernels, larger inputs).
  # A test binary's own failure or a sanitizer error both count.
  sanitize() {
    local tool=$1 name=$2; shift 2
    local slog="$OUT/$tool-$name.log"
    echo "=== compute-sanitizer $tool: $name $*" | tee -a "$log"
    timeout "${SAN_TIMEOUT:-150}" compute-sanitizer --tool "$tool" --error-exitcode 9 ".gpu/deps/$name" --ignored --test-threads=1 "$@" >"$slog" 2>&1
    local rc=$?
    echo "$tool $name rc=$rc" | tee -a "$log"
    grep -E "test result|ERROR SUMMARY|RACECHECK SUMMARY" "$slog" | tail -n 3 | tee -a "$log"
    [ $rc = 0 ] || fail=1
  }
  for tool in ${SANITIZERS:-memcheck racecheck synccheck}; do
    sanitize "$tool" gpu --skip ipc --skip worker --skip dies --skip error_paths --skip measured --skip forged
    sanitize "$tool" worker_gpu --skip full_size
    sanitize "$tool" kernels_misc
    sanitize "$tool" kernels_conv --skip resnet
    sanitize "$tool" kernels_gemm
  done
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
