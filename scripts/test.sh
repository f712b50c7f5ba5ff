#!/usr/bin/env bash
# The test command (README): everything that runs without a GPU. Tests that
# need one are #[ignore]d here; run them with scripts/gpu-check.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
# The C example tests link libpipeswitch.so, which `cargo test` alone does not build.
cargo build --lib
cargo test --all-targets
cargo test --doc
# The Triton backend (backends/triton) in a real tritonserver 2.51, fetched
# once from PyPI (nvidia-pytriton 0.7.0) into ~/.cache/pipeswitch. Its
# tests include the triton_config fuzz replay (tests/fuzz_corpus.rs, no
# server needed); the library's fuzz replays run in `cargo test` above.
PIPESWITCH_TRITONSERVER="$(scripts/fetch-tritonserver.sh)" cargo test -p pipeswitch-triton
if [ -d python/tests ]; then
  cargo build --release --lib
  PIPESWITCH_LIB="$PWD/target/release/libpipeswitch.so" python3 -m pytest python/tests -q
fi
# Packaging: scripts/install.sh into a temporary prefix, the C examples built
# from it with pkg-config (shared and static) and run; the C ABI against its
# record (abi/pipeswitch.abi); the wheel (pip wheel ./python) in a fresh venv
# without cargo, running python/tests.
scripts/check-install.sh
python3 scripts/abi.py check
python3 -m pytest scripts/tests -q -p no:cacheprovider
scripts/check-wheel.sh
# The experiments' figure and bookkeeping code (standard library only).
python3 -m pytest bench/paper -q
# kernels/gemm.ptx is expanded by its generator: the two must agree.
python3 kernels/gen/gemm.py 2>/dev/null | cmp - kernels/gemm.ptx
# Every kernel module assembles with ptxas for sm_90 (installed from PyPI
# into a cache once), and kernels/llama.ptx is its generator's output.
scripts/check-ptx.sh
