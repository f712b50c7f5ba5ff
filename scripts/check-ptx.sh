#!/usr/bin/env bash
# Assembles every kernel module in kernels/ with NVIDIA's ptxas for sm_90
# (sm_90a for the Hopper part of gemm.ptx), as the driver's JIT does on the
# GPU, so that a PTX error fails here and not on the GPU machine. ptxas comes
# from the nvidia-cuda-nvcc-cu12 wheel (PyPI), installed once into a cache
# directory; PTXAS=/path/to/ptxas uses another. Also checks that the
# generated kernels/llama.ptx is its generator's output.
set -euo pipefail
cd "$(dirname "$0")/.."
cache="${PIPESWITCH_CACHE:-$HOME/.cache/pipeswitch}/nvcc-12.9.86"
ptxas="${PTXAS:-$cache/nvidia/cuda_nvcc/bin/ptxas}"
if [ ! -x "$ptxas" ]; then
  python3 -m pip install -q --disable-pip-version-check --target "$cache" nvidia-cuda-nvcc-cu12==12.9.86
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail=0
for f in kernels/*.ptx; do
  if [ "$f" = kernels/gemm.ptx ]; then
    # Two modules: the sm_90 byte range named on the first line, and the
    # whole file (sm_90a, with the wgmma kernels).
    python3 - "$f" "$tmp" <<'PY'
import re, sys
b = open(sys.argv[1], "rb").read()
m = re.search(rb"bytes \[(\d+), (\d+)\)", b.split(b"\n", 1)[0])
s, e = int(m.group(1)), int(m.group(2))
open(sys.argv[2] + "/gemm_sm90.ptx", "wb").write(b[s:e])
PY
    "$ptxas" -arch=sm_90 "$tmp/gemm_sm90.ptx" -o /dev/null || { echo "ptxas: $f (sm_90 module) failed"; fail=1; }
    "$ptxas" -arch=sm_90a "$f" -o /dev/null || { echo "ptxas: $f (sm_90a module) failed"; fail=1; }
  else
    "$ptxas" -arch=sm_90 "$f" -o /dev/null || { echo "ptxas: $f failed"; fail=1; }
  fi
done
python3 kernels/gen/llama.py | cmp -s - kernels/llama.ptx || { echo "kernels/llama.ptx is not kernels/gen/llama.py's output"; fail=1; }
[ "$fail" = 0 ] && echo "ptxas -arch=sm_90: every kernel module assembles"
exit "$fail"
