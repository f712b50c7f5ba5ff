#!/usr/bin/env bash
# Issue 10's experiments on the GPU machine, from the repository root, with
# .gpu/ built by scripts/build-gpu-bundle.sh: `pipeswitch bench serve` (the
# built-in worker: latency through the daemon, worker ablation, Zipf
# residency, soak) and bench/serve_torch.py (the same with PyTorch workers
# replaying CUDA graphs). Writes under $OUT: serve.json, serve.log,
# serve-torch.json, serve-torch.log, serve-torch-daemon.log (its tail).
# About 5 minutes; each part has its own time limit.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PIPESWITCH_BIN=$PWD/.gpu/pipeswitch PIPESWITCH_LIB=$PWD/.gpu/libpipeswitch.so
export PYTHONPATH=$PWD/python${PYTHONPATH:+:$PYTHONPATH}
fail=0
timeout --kill-after=5 "${SERVE_TIMEOUT_S:-170}" .gpu/pipeswitch bench serve --json-out "$OUT/serve.json" >"$OUT/serve.log" 2>&1 || fail=1
echo "bench serve rc=$?" >>"$OUT/serve.log"
grep -v " INFO " "$OUT/serve.log" | tail -n 40
timeout --kill-after=5 "${TORCH_TIMEOUT_S:-200}" python3 bench/serve_torch.py --out "$OUT/serve-torch.json" \
  --log "$OUT/serve-torch-daemon.full.log" >"$OUT/serve-torch.log" 2>&1 || fail=1
tail -n 20 "$OUT/serve-torch.log"
[ -f "$OUT/serve-torch-daemon.full.log" ] && tail -n 300 "$OUT/serve-torch-daemon.full.log" >"$OUT/serve-torch-daemon.log" && rm -f "$OUT/serve-torch-daemon.full.log"
echo "overall fail=$fail"
exit $fail
