#!/usr/bin/env bash
# Issue 10's experiments on the GPU machine, from the repository root, with
# .gpu/ built by scripts/build-gpu-bundle.sh (test binaries serve_gpu and
# worker_gpu among DEPS). PARTS (default "tests bench torch") picks:
#   tests  the daemon's GPU tests (serve_gpu: requests against the CPU
#          reference, a killed worker, large inputs through the client's
#          input area), worker_gpu's input staging and page-locked areas,
#          and the Python protocol/client/worker tests with torch on CUDA
#          -> serve-gpu-tests.log
#   bench  `pipeswitch bench serve` (the built-in worker: latency through the
#          daemon, worker ablation, Zipf residency, soak)
#          -> serve.json, serve.log
#   torch  bench/serve_torch.py (PyTorch workers replaying CUDA graphs, a
#          switch one replay of the fused graph, inputs from input areas)
#          -> serve-torch.json, serve-torch.log, serve-torch-daemon.log
# The three parts take up to 4 + 3 + 3.5 minutes: run "tests bench" and
# "torch" as two commands when the per-command limit is 10 minutes.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
PARTS=${PARTS:-tests bench torch}
export PIPESWITCH_BIN=$PWD/.gpu/pipeswitch PIPESWITCH_LIB=$PWD/.gpu/libpipeswitch.so
export PYTHONPATH=$PWD/python${PYTHONPATH:+:$PYTHONPATH}
export PIPESWITCH_ROOT=$PWD
fail=0
has() { case " $PARTS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
if has tests; then
  {
    timeout --kill-after=5 "${TESTS_TIMEOUT_S:-90}" .gpu/deps/serve_gpu --ignored --test-threads=1 --nocapture || { echo "serve_gpu FAILED"; fail=1; }
    timeout --kill-after=5 45 .gpu/deps/worker_gpu --ignored inputs_ --test-threads=1 --nocapture || { echo "worker_gpu inputs_ FAILED"; fail=1; }
    timeout --kill-after=5 "${PYTEST_TIMEOUT_S:-100}" python3 -m pytest python/tests/test_protocol.py python/tests/test_client.py \
      python/tests/test_worker.py -q -rs -p no:cacheprovider || { echo "pytest (protocol, client, worker) FAILED"; fail=1; }
  } >"$OUT/serve-gpu-tests.log" 2>&1
  grep -E "^test |test result|FAILED|activation ms|passed|failed" "$OUT/serve-gpu-tests.log" | tail -n 30
fi
if has bench; then
  timeout --kill-after=5 "${SERVE_TIMEOUT_S:-170}" .gpu/pipeswitch bench serve --json-out "$OUT/serve.json" >"$OUT/serve.log" 2>&1 || fail=1
  echo "bench serve rc=$?" >>"$OUT/serve.log"
  grep -v " INFO " "$OUT/serve.log" | tail -n 40
  grep -E "groups of" "$OUT/serve.log" | head -n 6
fi
if has torch; then
  timeout --kill-after=5 "${TORCH_TIMEOUT_S:-200}" python3 bench/serve_torch.py --out "$OUT/serve-torch.json" \
    --log "$OUT/serve-torch-daemon.full.log" >"$OUT/serve-torch.log" 2>&1 || fail=1
  tail -n 20 "$OUT/serve-torch.log"
  [ -f "$OUT/serve-torch-daemon.full.log" ] && tail -n 300 "$OUT/serve-torch-daemon.full.log" >"$OUT/serve-torch-daemon.log" && rm -f "$OUT/serve-torch-daemon.full.log"
fi
echo "overall fail=$fail"
exit $fail
