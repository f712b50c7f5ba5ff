#!/usr/bin/env bash
# Builds libpipeswitch in release and installs it under PREFIX:
#   PREFIX/lib/libpipeswitch.so.X.Y.Z   (SONAME libpipeswitch.so.X, set by build.rs)
#   PREFIX/lib/libpipeswitch.so.X -> libpipeswitch.so.X.Y.Z
#   PREFIX/lib/libpipeswitch.so   -> libpipeswitch.so.X
#   PREFIX/lib/libpipeswitch.a
#   PREFIX/include/pipeswitch.h
#   PREFIX/lib/pkgconfig/pipeswitch.pc  (pkg-config --cflags --libs pipeswitch)
# X.Y.Z is Cargo.toml's version. DESTDIR is honoured (staged installs).
# Usage: scripts/install.sh PREFIX   (e.g. /usr/local, or $HOME/.local)
set -euo pipefail
if [ $# -ne 1 ] || [ -z "$1" ]; then
  echo "usage: $0 PREFIX" >&2
  exit 2
fi
root=$(cd "$(dirname "$0")/.." && pwd)
case $1 in
  /*) prefix=$1 ;;
  *) prefix=$(pwd)/$1 ;;  # the .pc file needs an absolute prefix
esac
prefix=${prefix%/}
cd "$root"

version=$(sed -n 's/^version *= *"\([0-9][0-9.]*\)".*/\1/p' Cargo.toml | head -n 1)
major=${version%%.*}
[ -n "$version" ] || { echo "install.sh: no version in Cargo.toml" >&2; exit 1; }

cargo build --release --lib
# The target directory as cargo resolves it (CARGO_TARGET_DIR, .cargo/config).
target=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
rel=${target:-target}/release
so=$rel/libpipeswitch.so
soname=$(readelf -d "$so" | sed -n 's/.*(SONAME).*\[\(.*\)\]/\1/p')
if [ "$soname" != "libpipeswitch.so.$major" ]; then
  echo "install.sh: $so has SONAME '$soname', expected libpipeswitch.so.$major (build.rs sets it)" >&2
  exit 1
fi

dest=${DESTDIR:-}$prefix
install -d "$dest/lib/pkgconfig" "$dest/include"
install -m 755 "$so" "$dest/lib/libpipeswitch.so.$version"
ln -sfn "libpipeswitch.so.$version" "$dest/lib/libpipeswitch.so.$major"
ln -sfn "libpipeswitch.so.$major" "$dest/lib/libpipeswitch.so"
install -m 644 "$rel/libpipeswitch.a" "$dest/lib/libpipeswitch.a"
install -m 644 include/pipeswitch.h "$dest/include/pipeswitch.h"

# Libs.private: the system libraries the static library needs on Linux
# (`rustc --print native-static-libs` for this crate: the Rust standard
# library's unwinder and libc pieces). A static link uses them with
# `pkg-config --static --libs pipeswitch`; CI links an example that way.
cat >"$dest/lib/pkgconfig/pipeswitch.pc" <<PC
prefix=$prefix
exec_prefix=\${prefix}
libdir=\${exec_prefix}/lib
includedir=\${prefix}/include

Name: pipeswitch
Description: Millisecond GPU model switching (PipeSwitch): pinned shared-memory model store, device arena, pipelined switch
Version: $version
Libs: -L\${libdir} -lpipeswitch
Libs.private: -lgcc_s -lutil -lrt -lpthread -lm -ldl -lc
Cflags: -I\${includedir}
PC
echo "installed libpipeswitch $version under $dest"
