#!/usr/bin/env bash
# Fetches a real tritonserver (2.51, the one in the PyPI wheel nvidia-pytriton
# 0.7.0: bin/tritonserver and the libraries its RPATH names) for the Triton
# backend's tests, once, and prints the binary's path.
#
#   scripts/fetch-tritonserver.sh            # prints .../bin/tritonserver
#   scripts/fetch-tritonserver.sh --minimal DIR
#       also writes DIR/tritonserver.tar.xz: only the binary and the libraries
#       it loads (what scripts/gpu-triton.sh needs on the GPU machine).
#
# Cache: $PIPESWITCH_CACHE (default ~/.cache/pipeswitch). Needs pip and unzip
# (or python3's zipfile).
set -euo pipefail
version=0.7.0
cache="${PIPESWITCH_CACHE:-$HOME/.cache/pipeswitch}"
root="$cache/pytriton-$version"
bin="$root/pytriton/tritonserver/bin/tritonserver"
if [ ! -x "$bin" ]; then
  mkdir -p "$cache"
  whl="$(ls "$cache"/nvidia_pytriton-$version-*.whl 2>/dev/null | head -n1 || true)"
  if [ -z "$whl" ]; then
    python3 -m pip download -q "nvidia-pytriton==$version" --no-deps -d "$cache" >&2
    whl="$(ls "$cache"/nvidia_pytriton-$version-*.whl | head -n1)"
  fi
  rm -rf "$root.tmp" && mkdir -p "$root.tmp"
  # Only the server and its libraries (not the Python package).
  python3 - "$whl" "$root.tmp" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    for n in z.namelist():
        if n.startswith(("pytriton/tritonserver/bin/", "pytriton/tritonserver/lib", "nvidia_pytriton.libs/")):
            z.extract(n, sys.argv[2])
PY
  # The wheel's zip entries carry no exec bit.
  chmod +x "$root.tmp/pytriton/tritonserver/bin/tritonserver"
  rm -rf "$root" && mv "$root.tmp" "$root"
fi
if [ "${1:-}" = "--minimal" ]; then
  out="${2:?--minimal DIR}"
  mkdir -p "$out"
  # The libraries the server actually loads, found through its RPATH.
  libs="$(ldd "$bin" | awk '/nvidia_pytriton.libs/ {print $3}')"
  stage="$(mktemp -d)"
  trap 'rm -rf "$stage"' EXIT
  mkdir -p "$stage/pytriton/tritonserver/bin" "$stage/nvidia_pytriton.libs"
  cp "$bin" "$stage/pytriton/tritonserver/bin/"
  for l in $libs; do cp "$l" "$stage/nvidia_pytriton.libs/"; done
  strip --strip-unneeded "$stage/pytriton/tritonserver/bin/tritonserver" "$stage"/nvidia_pytriton.libs/* 2>/dev/null || true
  tar -C "$stage" -cJf "$out/tritonserver.tar.xz" .
  echo "$out/tritonserver.tar.xz"
  exit 0
fi
echo "$bin"
