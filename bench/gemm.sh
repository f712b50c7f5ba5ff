#!/usr/bin/env bash
# GEMM: our kernels vs cuBLAS through PyTorch, same card, same run.
# Run on the GPU machine from the repository root, with the CLI built here by
# scripts/build-gpu-bundle.sh at .gpu/pipeswitch:
#     bash bench/gemm.sh            (REPS=50 by default; OUT=/tmp/out if unset;
#                                    TILES=0 skips timing every block tile forced)
# Writes $OUT/gemm-torch-<card>.json (cuBLAS via bench/gemm_torch.py) and
# $OUT/gemm-<card>.json (ours, with the torch medians and ratios); commit the
# latter (and the former) under bench/results/.
set -euo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
REPS=${REPS:-50}
DEVICE=${DEVICE:-0}
TILES=${TILES:-1}
PY=${PYTHON:-python3}
[ -x .gpu/pipeswitch ] || { echo "bench/gemm.sh: .gpu/pipeswitch missing (run scripts/build-gpu-bundle.sh first)" >&2; exit 2; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv -i "$DEVICE" || true
card=$(nvidia-smi --query-gpu=name --format=csv,noheader -i "$DEVICE" 2>/dev/null | head -n1 || true)
[ -n "$card" ] || card=$("$PY" -c "import torch, sys; print(torch.cuda.get_device_name(int(sys.argv[1])))" "$DEVICE")
slug=$(printf '%s' "$card" | tr '[:upper:]' '[:lower:]' | sed 's/[^a-z0-9]/-/g')
torch_json="$OUT/gemm-torch-$slug.json"
echo "=== cuBLAS through PyTorch ($card)"
"$PY" bench/gemm_torch.py --reps "$REPS" --device "$DEVICE" --out "$torch_json"
echo "=== ours"
tiles=(); [ "$TILES" = 1 ] && tiles=(--all-tiles)
.gpu/pipeswitch bench gemm --device "$DEVICE" --reps "$REPS" --torch "$torch_json" ${tiles[@]+"${tiles[@]}"} --json-out "$OUT/gemm-$slug.json"
