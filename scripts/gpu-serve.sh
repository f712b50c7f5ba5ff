#!/usr/bin/env bash
# Issue 10's experiments on the GPU machine, from the repository root, with
# .gpu/ built by scripts/build-gpu-bundle.sh: `pipeswitch bench serve` (the
# built-in worker: latency through the daemon, worker ablation, Zipf
# residency, soak) and bench/serve_torch.py (the same with PyTorch workers
# replaying CUDA graphs), after the GPU tests of the daemon and of the
# worker's input staging (serve_gpu: requests against the CPU reference, a
# killed worker, large inputs through the client's input area; worker_gpu:
# inputs staged and copied from a page-locked area). Writes under $OUT:
# serve-gpu-tests.log, serve.json, serve.log, serve-torch.json,
# serve-torch.log, serve-torch-daemon.log (its tail). About 6 minutes; each
# part has its own time limit.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PIPESWITCH_BIN=$PWD/.gpu/pipeswitch PIPESWITCH_LIB=$PWD/.gpu/libpipeswitch.so
export PYTHONPATH=$PWD/python${PYTHONPATH:+:$PYTHONPATH}
export PIPESWITCH_ROOT=$PWD
fail=0
{
  timeout --kill-after=5 "${TESTS_TIMEOUT_S:-100}" .gpu/deps/serve_gpu --ignored --test-threads=1 --nocapture || { echo "serve_gpu FAILED"; fail=1; }
  timeout --kill-after=5 60 .gpu/deps/worker_gpu --ignored inputs_ --test-threads=1 --nocapture || { echo "worker_gpu inputs_ FAILED"; fail=1; }
} >"$OUT/serve-gpu-tests.log" 2>&1
grep -E "^test |test result|FAILED|activation ms" "$OUT/serve-gpu-tests.log"
timeout --kill-after=5 "${SERVE_TIMEOUT_S:-170}" .gpu/pipeswitch bench serve --json-out "$OUT/serve.json" >"$OUT/serve.log" 2>&1 || fail=1
echo "bench serve rc=$?" >>"$OUT/serve.log"
grep -v " INFO " "$OUT/serve.log" | tail -n 40
timeout --kill-after=5 "${TORCH_TIMEOUT_S:-200}" python3 bench/serve_torch.py --out "$OUT/serve-torch.json" \
  --log "$OUT/serve-torch-daemon.full.log" >"$OUT/serve-torch.log" 2>&1 || fail=1
tail -n 20 "$OUT/serve-torch.log"
[ -f "$OUT/serve-torch-daemon.full.log" ] && tail -n 300 "$OUT/serve-torch-daemon.full.log" >"$OUT/serve-torch-daemon.log" && rm -f "$OUT/serve-torch-daemon.full.log"
echo "overall fail=$fail"
exit $fail
