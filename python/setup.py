"""Builds libpipeswitch.so with cargo and bundles it in the package.

``pip install ./python`` and ``pip wheel ./python`` run
``cargo build --release --lib`` on the crate one directory up (the
repository root; CARGO_TARGET_DIR is honoured, so a build already made by
scripts/test.sh or scripts/install.sh is reused as is) and put the library
into the package as ``pipeswitch/libpipeswitch.so``, where ``_lib.py`` finds
it (after PIPESWITCH_LIB). Nothing is copied by hand.

The package is loaded with ctypes, not imported as a CPython extension, so
the wheel is ``py3-none-<platform>``: one wheel for every Python 3. The
platform tag is ``manylinux_X_Y_<arch>`` when the library only needs the
libraries and symbol versions manylinux allows (PEP 600: glibc X.Y or newer
is the only requirement left), read from the built file with readelf:

- its DT_NEEDED entries are all among libc, libm, libdl, librt, libpthread,
  libgcc_s and the dynamic loader (no libstdc++, no CUDA: the driver is
  dlopen'ed at run time);
- the newest GLIBC_X.Y symbol version it references gives X.Y;
- its GCC_* (libgcc_s) versions are at most 4.8.0, which every manylinux
  from 2.17 on provides.

Otherwise it is ``linux_<arch>`` (installable only where it was built).
"""

import json
import os
import platform
import re
import shutil
import subprocess
import sys

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

try:
    from setuptools.command.bdist_wheel import bdist_wheel  # setuptools >= 70.1
except ImportError:  # older setuptools: the wheel package's
    from wheel.bdist_wheel import bdist_wheel

HERE = os.path.dirname(os.path.abspath(__file__))
CRATE = os.path.dirname(HERE)
LIB_FILE = "libpipeswitch.so"

#: DT_NEEDED entries every manylinux policy allows (and all this library needs).
MANYLINUX_LIBS = {
    "libc.so.6", "libm.so.6", "libdl.so.2", "librt.so.1", "libpthread.so.0", "libgcc_s.so.1",
    "ld-linux-x86-64.so.2", "ld-linux-aarch64.so.1",
}
#: The newest libgcc_s symbol version of manylinux_2_17 (manylinux2014).
MAX_GCC = (4, 8, 0)
MIN_GLIBC = (2, 17)


def cargo_version():
    with open(os.path.join(CRATE, "Cargo.toml"), encoding="utf-8") as f:
        m = re.search(r'^\[package\][^\[]*?^version\s*=\s*"([^"]+)"', f.read(), re.M | re.S)
    if not m:
        sys.exit("setup.py: no [package] version in %s" % os.path.join(CRATE, "Cargo.toml"))
    return m.group(1)


def pyproject_version():
    with open(os.path.join(HERE, "pyproject.toml"), encoding="utf-8") as f:
        m = re.search(r'^version\s*=\s*"([^"]+)"', f.read(), re.M)
    return m and m.group(1)


def build_library():
    """Runs cargo and returns the path of the cdylib it built."""
    manifest = os.path.join(CRATE, "Cargo.toml")
    if not os.path.exists(manifest):
        sys.exit("setup.py: %s not found: the package is built from the libpipeswitch repository "
                 "(pip install ./python from its root)" % manifest)
    cargo = os.environ.get("CARGO", "cargo")
    if shutil.which(cargo) is None:
        sys.exit("setup.py: cargo not found: building the package needs a Rust toolchain "
                 "(https://rustup.rs); a wheel made by `pip wheel ./python` installs without one")
    cmd = [cargo, "build", "--release", "--lib", "--message-format=json-render-diagnostics",
           "--manifest-path", manifest]
    print("building libpipeswitch: %s" % " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=CRATE, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        sys.exit("setup.py: cargo build failed (status %d)" % proc.returncode)
    for line in proc.stdout.splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if msg.get("reason") == "compiler-artifact" and "cdylib" in msg["target"]["kind"]:
            for path in msg["filenames"]:
                if path.endswith(".so"):
                    return path
    sys.exit("setup.py: cargo build reported no %s" % LIB_FILE)


def _readelf(args, path):
    return subprocess.run(["readelf"] + args + [path], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, check=True).stdout


def manylinux_tag(lib, arch):
    """``manylinux_X_Y_<arch>`` for the library, or None with the reason."""
    try:
        needed = re.findall(r"\(NEEDED\).*\[(.*)\]", _readelf(["-d"], lib))
        versions = re.findall(r"Name: (GLIBC|GCC)_([0-9.]+)", _readelf(["-V"], lib))
    except (OSError, subprocess.CalledProcessError) as e:
        return None, "readelf failed (%s)" % e
    others = sorted(set(needed) - MANYLINUX_LIBS)
    if others:
        return None, "it needs %s" % ", ".join(others)
    glibc = [tuple(int(x) for x in v.split(".")) for name, v in versions if name == "GLIBC"]
    gcc = [tuple(int(x) for x in v.split(".")) for name, v in versions if name == "GCC"]
    if not glibc:
        return None, "no GLIBC symbol versions (not a glibc build)"
    if gcc and max(gcc) > MAX_GCC:
        return None, "it needs libgcc_s GCC_%s" % ".".join(map(str, max(gcc)))
    x, y = max(max(glibc)[:2], MIN_GLIBC)
    return "manylinux_%d_%d_%s" % (x, y, arch), None


class BuildPyWithLibrary(build_py):
    """build_py, then the library built by cargo into the package."""

    built_library = None

    def run(self):
        if pyproject_version() != cargo_version():
            sys.exit("setup.py: python/pyproject.toml's version %s differs from Cargo.toml's %s"
                     % (pyproject_version(), cargo_version()))
        super().run()
        lib = build_library()
        BuildPyWithLibrary.built_library = lib
        if getattr(self, "editable_mode", False):
            # pip install -e: the package runs from the source tree, and
            # _lib.py finds target/release/libpipeswitch.so there.
            return
        self.copy_file(lib, os.path.join(self.build_lib, "pipeswitch", LIB_FILE))


class BdistWheelPlatform(bdist_wheel):
    """A wheel tagged py3-none-<platform>: the library is platform code, the
    Python is not tied to a CPython ABI (ctypes)."""

    def get_tag(self):
        plat = self.plat_name if self.plat_name_supplied else None
        if plat is None:
            arch = platform.machine()
            lib = BuildPyWithLibrary.built_library
            tag, why = manylinux_tag(lib, arch) if lib and sys.platform.startswith("linux") else (None, "not Linux")
            if tag is None:
                print("setup.py: wheel tagged linux_%s, not manylinux: %s" % (arch, why), flush=True)
                tag = "linux_%s" % arch if sys.platform.startswith("linux") else super().get_tag()[2]
            plat = tag
        return "py3", "none", plat.replace("-", "_").replace(".", "_")


class PlatformDistribution(Distribution):
    """Platform code inside: installed into platlib, the wheel not pure."""

    def has_ext_modules(self):
        return True


setup(distclass=PlatformDistribution,
      cmdclass={"build_py": BuildPyWithLibrary, "bdist_wheel": BdistWheelPlatform})
