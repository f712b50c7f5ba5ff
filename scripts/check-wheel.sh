#!/usr/bin/env bash
# The Python wheel as a user gets it: `pip wheel ./python` (which builds
# libpipeswitch with cargo, reusing target/, and bundles it), installed into
# a fresh venv, then the package's CPU tests run against the installed copy
# with no cargo on PATH, no PIPESWITCH_LIB and no source tree on sys.path.
# Needs network to PyPI (setuptools for the build, pytest for the venv).
set -euo pipefail
export PIP_DISABLE_PIP_VERSION_CHECK=1
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# A fresh venv: its pip builds the wheel (build isolation: nothing is
# installed into the venv by that), then installs it.
python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip wheel -q --no-deps -w "$work/dist" "$root/python"
# pip builds in the source tree: leave no build/ or egg-info there.
rm -rf "$root/python/build" "$root/python/pipeswitch.egg-info"
wheels=("$work"/dist/pipeswitch-*.whl)
[ ${#wheels[@]} -eq 1 ] || { echo "check-wheel: expected one wheel, got: ${wheels[*]}" >&2; exit 1; }
wheel=${wheels[0]}
echo "wheel: $(basename "$wheel") ($(du -k "$wheel" | cut -f1) KiB)"
case $(basename "$wheel") in
  pipeswitch-*-py3-none-manylinux_*_"$(uname -m)".whl | pipeswitch-*-py3-none-linux_"$(uname -m)".whl) ;;
  *) echo "check-wheel: unexpected wheel tag: $(basename "$wheel")" >&2; exit 1 ;;
esac
python3 -c 'import sys, zipfile; sys.exit("pipeswitch/libpipeswitch.so" not in zipfile.ZipFile(sys.argv[1]).namelist())' "$wheel" \
  || { echo "check-wheel: the wheel has no pipeswitch/libpipeswitch.so" >&2; exit 1; }

"$work/venv/bin/python" -m pip install -q "$wheel" pytest

# PATH without any directory holding cargo (rustup's ~/.cargo/bin included).
clean_path=$work/venv/bin
IFS=: read -r -a dirs <<<"$PATH"
for d in "${dirs[@]}"; do
  [ -n "$d" ] && [ ! -e "$d/cargo" ] && clean_path=$clean_path:$d
done
run() {
  (cd "$work" && env -u PIPESWITCH_LIB -u CARGO -u PYTHONPATH PATH="$clean_path" PIPESWITCH_TEST_INSTALLED=1 "$@")
}
if run sh -c 'command -v cargo' >/dev/null; then
  echo "check-wheel: cargo is still on PATH" >&2; exit 1
fi
# The package and the library it loads are the venv's.
run python -c '
import sys, pipeswitch, pipeswitch._lib as l
pkg, lib = pipeswitch.__file__, l.library_path()
print("package:", pkg); print("library:", lib, "version", pipeswitch.version() if hasattr(pipeswitch, "version") else "")
assert pkg.startswith(sys.prefix) and lib.startswith(sys.prefix), (sys.prefix, pkg, lib)
'
run python -m pytest -q -p no:cacheprovider "$root/python/tests"
