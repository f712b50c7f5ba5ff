#!/usr/bin/env bash
# Input areas on the Python side (issue 10) on the GPU machine, from the
# repository root, with .gpu/ built by scripts/build-gpu-bundle.sh (only
# the CLI and libpipeswitch.so are used: DEPS=none leaves the test binaries
# out; the daemon must be one that serves input areas). Writes under $OUT:
#   pytest-areas.log    python/tests/test_{protocol,client,worker}.py with
#                       torch and CUDA: the PyTorch worker against a fake
#                       daemon (an area page-locked, tasks reading from it,
#                       no "not page-locked" warning) and `pipeswitch serve`
#                       with the Python client (its area reserved by itself);
#   serve-torch-area.json, serve-torch-noarea.json, serve-torch-areas.log
#                       bench/serve_torch.py for the image models (no
#                       ablation) with each client's input area and without
#                       (a file per request): activation and switch latency.
# About 5 minutes; each part has its own time limit.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PIPESWITCH_BIN=$PWD/.gpu/pipeswitch PIPESWITCH_LIB=$PWD/.gpu/libpipeswitch.so
export PYTHONPATH=$PWD/python${PYTHONPATH:+:$PYTHONPATH}
fail=0
timeout --kill-after=5 "${PYTEST_TIMEOUT_S:-150}" python3 -m pytest python/tests/test_protocol.py \
  python/tests/test_client.py python/tests/test_worker.py -q -rs -p no:cacheprovider >"$OUT/pytest-areas.log" 2>&1 || fail=1
tail -n 8 "$OUT/pytest-areas.log"
log=$OUT/serve-torch-areas.log; : >"$log"
for mode in area noarea; do
  flag=; [ "$mode" = noarea ] && flag=--no-input-area
  echo "=== serve_torch $mode" >>"$log"
  timeout --kill-after=5 "${TORCH_TIMEOUT_S:-150}" python3 bench/serve_torch.py --models resnet152 inception_v3 \
    --no-ablation --reps "${REPS:-10}" $flag --out "$OUT/serve-torch-$mode.json" --log "$OUT/daemon-$mode.log" \
    >>"$log" 2>&1 || { echo "serve_torch $mode failed" >>"$log"; fail=1; }
  grep -v " INFO " "$OUT/daemon-$mode.log" 2>/dev/null | tail -n 30 >>"$log"; rm -f "$OUT/daemon-$mode.log"
done
python3 - "$OUT" <<'PY' | tee -a "$log"
import json, os, sys
rows = {}
for mode in ("area", "noarea"):
    p = os.path.join(sys.argv[1], "serve-torch-%s.json" % mode)
    if os.path.exists(p):
        rows[mode] = json.load(open(p))
print("| model | activation ms, area | activation ms, file | switch ms, area | switch ms, file |")
print("|---|---|---|---|---|")
models = sorted(set().union(*[r.get("models", {}) for r in rows.values()])) if rows else []
f = lambda r, m, k: "%.3f" % r["models"][m][k]["median"] if r and m in r.get("models", {}) else "-"
for m in models:
    a, n = rows.get("area"), rows.get("noarea")
    print("| %s | %s | %s | %s | %s |" % (m, f(a, m, "activation_ms"), f(n, m, "activation_ms"),
                                         f(a, m, "daemon_switch_ms"), f(n, m, "daemon_switch_ms")))
for mode, r in rows.items():
    print(mode, "input_area:", json.dumps(r.get("input_area")), "complete:", r.get("complete"))
PY
echo "overall fail=$fail"
exit $fail
