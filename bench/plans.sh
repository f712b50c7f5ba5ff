#!/usr/bin/env bash
# Issue 15's measurements in one run (about 4 minutes of GPU time, at most 6):
# for every model of `pipeswitch demo` (built-in worker) and of
# bench/paper/experiments.py (PyTorch), in the same run, the optimal plan
# (closed loop: calibrated, fitted, replanned) against hand-chosen groups, one
# group per layer and a single group, predicted against measured, with every
# switch timed right after another model's run.
#
# On the GPU machine, from the repository root:
#   bench/plans.sh BIN_DIR OUT_DIR
# BIN_DIR holds `pipeswitch` and `libpipeswitch.so` built here
# (cargo build --release --bins --lib). PIPESWITCH_ROOT (default: .) is the
# tree whose python/ and bench/paper/ are used; DEMO_TIMEOUT_S (240),
# PAPER_TIMEOUT_S (270) and PAPER_BUDGET_S (240) bound the two parts;
# DEMO_REPS (20), CAL_REPS (5) and PAPER_MODELS (all) shorten a trial run;
# GRAPHS=1 runs the PyTorch Worker variants as replayed CUDA graphs
# (experiments.py --graphs), each switch as one replay of the fused switch +
# forward graph (CapturedForward.switch_and_run; FUSED=0: switch_to + a
# replay, --no-fused); DEMO=0 leaves out the built-in worker.
# Writes OUT_DIR/{demo-<card>.json, demo-trace-<card>.json, plans-demo.log,
# plans-paper.json, plans-paper.log, plans-table.md}.
set -u -o pipefail
BIN=$(realpath "${1:?usage: bench/plans.sh BIN_DIR OUT_DIR}")
OUT=$(realpath -m "${2:?usage: bench/plans.sh BIN_DIR OUT_DIR}")
ROOT=$(realpath "${PIPESWITCH_ROOT:-.}")
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PIPESWITCH_LIB="$BIN/libpipeswitch.so" PYTHONPATH="$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
status=0
if [ "${DEMO:-1}" = 1 ]; then
echo "== built-in worker: pipeswitch demo (3 models interleaved, closed-loop plans, 20 runs)"
timeout "${DEMO_TIMEOUT_S:-240}" "$BIN/pipeswitch" demo --reps "${DEMO_REPS:-20}" --calibration-reps "${CAL_REPS:-5}" --out-dir "$OUT" 2>&1 | tee "$OUT/plans-demo.log" || status=1
fi
echo "== PyTorch: experiments.py --quick, grouping variants only"
timeout "${PAPER_TIMEOUT_S:-270}" python3 "$ROOT/bench/paper/experiments.py" --quick --budget-s "${PAPER_BUDGET_S:-240}" --no-figures \
    ${PAPER_MODELS:+--models $PAPER_MODELS} $([ "${GRAPHS:-0}" = 1 ] && echo --graphs) $([ "${FUSED:-1}" = 0 ] && echo --no-fused) \
    --skip model_to,pinned_py,pageable_py,mem_workspace,mem_caching,mem_caching_emptied,mps,two_process_no_mps,stop_and_start \
    --out "$OUT/plans-paper.json" 2>&1 | tee "$OUT/plans-paper.log" || status=1
python3 "$ROOT/bench/paper/plans_table.py" $(ls "$OUT"/demo-nvidia*.json 2>/dev/null) "$OUT/plans-paper.json" | tee "$OUT/plans-table.md" || status=1
exit $status
