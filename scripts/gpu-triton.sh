#!/usr/bin/env bash
# The Triton backend on the GPU machine: the three reference models in one
# tritonserver, requests alternating among them (switching / all resident /
# Triton's explicit unload+load), outputs against the built-in worker's, and
# a soak with GPU memory sampled. Writes $OUT/triton_gpu.json, the server
# logs and the fixture log (6 files).
#
# Here (build machine), once:  scripts/build-gpu-bundle.sh --triton
#   -> .gpu/triton/{libtriton_pipeswitch.so, triton_fixture, tritonserver.tar.xz}
#   (about 35 MB; the rest of .gpu is not needed by this script: drop
#   .gpu/deps if the carry limit of 64 MiB is in the way)
# There:                       OUT=/path scripts/gpu-triton.sh
# Without a GPU (a check of the client, tiny models on the CPU reference):
#                              OUT=/tmp/x scripts/gpu-triton.sh --cpu
#
# PIPESWITCH_TRITON_BUNDLE overrides .gpu/triton; PS_TRITON_ROUNDS,
# PS_TRITON_UNLOAD_ROUNDS, PS_TRITON_SOAK, PS_TRITON_SOAK_SECONDS and
# PS_TRITON_CONCURRENT the counts.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:?set OUT to the results directory}"
T="${PIPESWITCH_TRITON_BUNDLE:-.gpu/triton}"
for f in libtriton_pipeswitch.so triton_fixture tritonserver.tar.xz; do
  [ -e "$T/$f" ] || { echo "gpu-triton: $T/$f missing: run scripts/build-gpu-bundle.sh --triton here first" >&2; exit 2; }
done
mkdir -p "$OUT"
work="$(mktemp -d /tmp/ps-triton.XXXXXX)"
trap 'rm -rf "$work"' EXIT
tar -C "$work" -xJf "$T/tritonserver.tar.xz"
mkdir -p "$work/backends/pipeswitch"
cp "$T/libtriton_pipeswitch.so" "$work/backends/pipeswitch/"
cp "$T/triton_fixture" "$work/"
chmod +x "$work/triton_fixture" "$work/pytriton/tritonserver/bin/tritonserver"
{ nvidia-smi 2>&1 || echo "no nvidia-smi"; } > "$OUT/nvidia-smi.txt"
timeout 460 python3 scripts/gpu_triton.py \
  --server "$work/pytriton/tritonserver/bin/tritonserver" \
  --backends "$work/backends" --fixture "$work/triton_fixture" \
  --work "$work" --out "$OUT" "$@"
