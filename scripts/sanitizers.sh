#!/usr/bin/env bash
# Runs the C ABI's CPU tests (every tests/ffi*.rs) under AddressSanitizer and
# ThreadSanitizer. Needs the nightly toolchain with rust-src
# (`rustup component add rust-src --toolchain nightly`); not part of CI.
# The library, its dependencies and std are all rebuilt instrumented
# (-Zbuild-std: an uninstrumented std gives TSan false positives and hides
# ASan findings in std's containers), into target/san/<sanitizer> so that
# normal builds are left alone. See docs/fuzzing.md for results.
#
# Usage: scripts/sanitizers.sh [address|thread]...   (default: both)
# Extra arguments for the test binaries go in SAN_TEST_ARGS; SAN_TESTS names
# other test files (e.g. SAN_TESTS="store_cpu store_hardening protocol_cpu").
set -euo pipefail
cd "$(dirname "$0")/.."

target=$(rustc +nightly -vV | sed -n 's/^host: //p')
tests=()
# SAN_TESTS="store_cpu protocol_cpu" picks other test files instead.
for f in ${SAN_TESTS:-tests/ffi*.rs}; do
  tests+=(--test "$(basename "$f" .rs)")
done
sanitizers=("$@")
[ ${#sanitizers[@]} -gt 0 ] || sanitizers=(address thread)

status=0
for san in "${sanitizers[@]}"; do
  case "$san" in
    address)
      # Leaks are checked too; the stores' segment files are removed by the
      # tests' own atexit handlers, which run before LeakSanitizer's report.
      export ASAN_OPTIONS="detect_leaks=1:abort_on_error=0:detect_stack_use_after_return=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
      ;;
    thread)
      export TSAN_OPTIONS="halt_on_error=0:second_deadlock_stack=1:suppressions=$PWD/scripts/tsan.supp${TSAN_OPTIONS:+:$TSAN_OPTIONS}"
      ;;
    *)
      echo "unknown sanitizer $san (address or thread)" >&2
      exit 2
      ;;
  esac
  echo "== $san: ${tests[*]}"
  # RUSTFLAGS apply to the target only (build scripts and proc macros stay
  # uninstrumented) because --target is given.
  if ! RUSTFLAGS="-Zsanitizer=$san -Cdebug-assertions=on" RUSTDOCFLAGS="-Zsanitizer=$san" \
    cargo +nightly test -Zbuild-std --target "$target" --target-dir "target/san/$san" \
      "${tests[@]}" -- ${SAN_TEST_ARGS:-}; then
    echo "== $san: FAILED"
    status=1
  else
    echo "== $san: passed"
  fi
done
exit $status
