#!/usr/bin/env bash
# Builds here what the GPU machine runs (it has no Rust toolchain) into .gpu/:
# the CLI, libpipeswitch.so, and the test binaries under .gpu/deps/.
# DEPS="llama_gpu worker_gpu": only those test binaries (the device tool
# carries at most 64 MiB, and all of them together are more).
set -euo pipefail
cd "$(dirname "$0")/.."
# --triton: only what scripts/gpu-triton.sh needs, into .gpu/triton (the
# Triton backend, its fixture and a minimal tritonserver; about 35 MB).
if [ "${1:-}" = "--triton" ]; then
  rm -rf .gpu/triton && mkdir -p .gpu/triton
  cargo build --release -p pipeswitch-triton --lib --examples
  cp target/release/libtriton_pipeswitch.so target/release/examples/triton_fixture .gpu/triton/
  strip .gpu/triton/libtriton_pipeswitch.so .gpu/triton/triton_fixture
  scripts/fetch-tritonserver.sh --minimal .gpu/triton >/dev/null
  ls -la .gpu/triton
  exit 0
fi
rm -rf .gpu && mkdir -p .gpu/deps
cargo build --release --bins --lib
cargo test --release --no-run --message-format=json 2>/dev/null \
  | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        t = m["target"]
        # Integration tests keep their names (gpu, worker_gpu, serve_gpu ...);
        # unit tests of a lib or bin are named after their package.
        name = t["name"] if t["kind"] == ["test"] else m["package_id"].split("#")[-1].split("@")[0] + "-unit-" + t["kind"][0]
        print(name, m["executable"])
' | while read -r name exe; do cp "$exe" ".gpu/deps/$name"; done
if [ -n "${DEPS:-}" ]; then
  for f in .gpu/deps/*; do
    case " $DEPS " in *" $(basename "$f") "*) ;; *) rm -f "$f" ;; esac
  done
fi
cp target/release/pipeswitch target/release/libpipeswitch.so .gpu/
strip .gpu/pipeswitch .gpu/libpipeswitch.so .gpu/deps/* 2>/dev/null || true
ls -la .gpu .gpu/deps
