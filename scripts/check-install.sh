#!/usr/bin/env bash
# The installed library as a C user gets it: scripts/install.sh into a
# temporary prefix, then the C examples built from that prefix with
# `pkg-config --cflags --libs pipeswitch` (and switch_model.c once against
# the static library with `pkg-config --static`) and their CPU parts run:
#   switch_model: store, ingest, layer listing, plan (the GPU part too where
#                 a CUDA driver loads);
#   run_model:    usage and missing-store errors;
#   header_check: the header as C++17, version agreement.
# Also checks the SONAME recorded by the linked programs and the symlinks.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fail() { echo "check-install: $*" >&2; exit 1; }

prefix=$work/prefix
"$root/scripts/install.sh" "$prefix"
version=$(sed -n 's/^version *= *"\([0-9][0-9.]*\)".*/\1/p' "$root/Cargo.toml" | head -n 1)
major=${version%%.*}
lib=$prefix/lib
[ "$(readlink "$lib/libpipeswitch.so")" = "libpipeswitch.so.$major" ] || fail "libpipeswitch.so link"
[ "$(readlink "$lib/libpipeswitch.so.$major")" = "libpipeswitch.so.$version" ] || fail "libpipeswitch.so.$major link"
readelf -d "$lib/libpipeswitch.so.$version" | grep -q "(SONAME).*\[libpipeswitch.so.$major\]" || fail "SONAME"

export PKG_CONFIG_PATH=$lib/pkgconfig
[ "$(pkg-config --modversion pipeswitch)" = "$version" ] || fail "pkg-config version"
read -r -a cflags <<<"$(pkg-config --cflags pipeswitch)"
read -r -a libs <<<"$(pkg-config --libs pipeswitch)"
rpath=-Wl,-rpath,$(pkg-config --variable=libdir pipeswitch)
warn=(-Wall -Wextra -Werror -pedantic)
cc -std=c11 "${warn[@]}" "${cflags[@]}" "$root/c_examples/switch_model.c" "${libs[@]}" "$rpath" -o "$work/switch_model"
cc -std=c11 "${warn[@]}" "${cflags[@]}" "$root/c_examples/run_model.c" "${libs[@]}" "$rpath" -o "$work/run_model"
c++ -std=c++17 "${warn[@]}" "${cflags[@]}" "$root/c_examples/header_check.cpp" "${libs[@]}" "$rpath" -o "$work/header_check"
for exe in switch_model run_model header_check; do
  readelf -d "$work/$exe" | grep -q "(NEEDED).*\[libpipeswitch.so.$major\]" || fail "$exe does not need libpipeswitch.so.$major"
done
# Static: the archive itself (-l:libpipeswitch.a, as -lpipeswitch would take
# the .so) with the system libraries of Libs.private.
read -r -a static_libs <<<"$(pkg-config --static --libs pipeswitch | sed 's/-lpipeswitch\b/-l:libpipeswitch.a/')"
cc -std=c11 "${warn[@]}" "${cflags[@]}" "$root/c_examples/switch_model.c" "${static_libs[@]}" -o "$work/switch_model_static"
if readelf -d "$work/switch_model_static" | grep -q "(NEEDED).*libpipeswitch"; then
  fail "switch_model_static links libpipeswitch dynamically"
fi

# switch_model's model: the tensors of tests/c_abi.rs, as a safetensors file.
python3 - "$work/model.safetensors" <<'PY'
import json, random, struct, sys
shapes = [("embed.weight", [1000, 64]), ("block.0.fc.weight", [64, 256]), ("block.0.fc.bias", [256]),
          ("block.1.fc.weight", [256, 64]), ("head.weight", [64, 10])]
rng, header, blobs, off = random.Random(77), {}, [], 0
for name, shape in shapes:
    n = 1
    for d in shape:
        n *= d
    blobs.append(struct.pack("<%df" % n, *(rng.uniform(-1, 1) for _ in range(n))))
    header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [off, off + 4 * n]}
    off += 4 * n
h = json.dumps(header).encode()
h += b" " * (-len(h) % 8)
with open(sys.argv[1], "wb") as f:
    f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))
PY
shm=$(mktemp -d -p "$( [ -w /dev/shm ] && echo /dev/shm || echo "$work")" pipeswitch-install-XXXXXX)
trap 'rm -rf "$work" "$shm"' EXIT
export PIPESWITCH_SHM_DIR=$shm

expect() {  # expect OUTPUT_FILE STRING...
  local f=$1; shift
  for s in "$@"; do grep -qF -- "$s" "$f" || { cat "$f" >&2; fail "no '$s' in the output of $(basename "$f" .out)"; }; done
}
for exe in switch_model switch_model_static; do
  "$work/$exe" "install-check-$exe-$$" "$work/model.safetensors" >"$work/$exe.out" 2>&1 \
    || { cat "$work/$exe.out" >&2; fail "$exe failed"; }
  expect "$work/$exe.out" "libpipeswitch $version" "model: " "5 tensors" "layer 2 block.1.fc" \
    "adding it twice: already exists" "plan: "
  grep -qE "no CUDA driver: stopping before the GPU part|verified " "$work/$exe.out" \
    || { cat "$work/$exe.out" >&2; fail "$exe: neither stopped before the GPU part nor verified the switch"; }
  echo "$exe: $(grep -E '^model: |^plan: ' "$work/$exe.out" | tr '\n' ' ')"
done
set +e
"$work/run_model" >"$work/run_model.out" 2>&1; rc=$?
[ $rc -eq 2 ] || fail "run_model without arguments: exit $rc, expected 2"
expect "$work/run_model.out" "usage: "
"$work/run_model" "install-check-none-$$" tiny-gpt2 --output ln_f.out >"$work/run_model.out" 2>&1; rc=$?
set -e
[ $rc -eq 1 ] || fail "run_model on a missing store: exit $rc, expected 1"
expect "$work/run_model.out" "ps_store_open(store_name, &store) failed: not found (200)"
"$work/header_check" >"$work/header_check.out" 2>&1 || { cat "$work/header_check.out" >&2; fail "header_check failed"; }
expect "$work/header_check.out" "C++ OK: $version"
echo "check-install: libpipeswitch $version from $prefix: pkg-config, shared and static links, C examples OK"
