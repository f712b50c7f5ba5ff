#!/usr/bin/env python3
"""The C ABI record (abi/pipeswitch.abi): what libpipeswitch exports, kept
in the repository so that CI notices any change of it.

It holds, for the version in Cargo.toml:
- every dynamic symbol the library defines (``nm -D --defined-only``); all
  must be ``ps_*`` (pipeswitch.map hides the rest);
- the prototype of every ``ps_*`` function of the header, parameter names
  dropped (a changed parameter type changes the ABI but not the symbol);
- size, alignment, and each field's offset and size of every struct of the
  header, as a C compiler lays them out (a generated C program prints them);
- the value of every ``PS_*`` constant of the header but the version ones.

Usage (from anywhere):
  scripts/abi.py check  [--lib LIB.so] [--header H]  # CI: exits 1 on a difference
  scripts/abi.py update [--lib LIB.so] [--header H]  # rewrite the record
  scripts/abi.py show   [--lib LIB.so] [--header H]  # print the current ABI

Without --lib, the library is built (``cargo build --release --lib``) and
taken from cargo's target directory; without --header, include/pipeswitch.h.

The rule: the ABI changes only with the version. ``check`` fails when the
record differs from the library in anything (an ABI change without a new
version, or a new version whose record was not made). ``update`` refuses to
record a different ABI under the version already recorded; bump the version
in Cargo.toml (and src/ffi/version.rs) first, or pass --same-version while
that version is unreleased.
"""

import argparse
import difflib
import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORD = os.path.join(ROOT, "abi", "pipeswitch.abi")
HEADER = os.path.join(ROOT, "include", "pipeswitch.h")
VERSION_CONSTANTS = {"PS_VERSION_MAJOR", "PS_VERSION_MINOR", "PS_VERSION_PATCH", "PS_VERSION_NUMBER"}


class AbiError(Exception):
    pass


def cargo_version():
    with open(os.path.join(ROOT, "Cargo.toml"), encoding="utf-8") as f:
        text = f.read()
    package = re.search(r"^\[package\]\s*$(.*?)(?=^\[|\Z)", text, re.M | re.S)
    m = package and re.search(r'^version\s*=\s*"([^"]+)"', package.group(1), re.M)
    if not m:
        raise AbiError("no [package] version in Cargo.toml")
    return m.group(1)


def build_library():
    """Builds the release cdylib and returns its path (from cargo's own report)."""
    proc = subprocess.run(
        ["cargo", "build", "--release", "--lib", "--message-format=json-render-diagnostics"],
        cwd=ROOT, stdout=subprocess.PIPE, check=True, text=True)
    for line in proc.stdout.splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if msg.get("reason") == "compiler-artifact" and "cdylib" in msg["target"]["kind"]:
            for path in msg["filenames"]:
                if path.endswith(".so"):
                    return path
    raise AbiError("cargo build reported no cdylib")


def strip_comments(text):
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", " ", text)


def header_parts(header):
    """(structs, functions, constants) of the header: structs as
    [(name, [field names])], functions as [(name, 'ret(name)(params)')],
    constants as [names]."""
    with open(header, encoding="utf-8") as f:
        text = strip_comments(f.read())
    structs = []
    for m in re.finditer(r"typedef\s+struct\s+(\w+)\s*\{(.*?)\}\s*(\w+)\s*;", text, re.S):
        if m.group(1) != m.group(3):
            raise AbiError("struct %s is typedef'd as %s" % (m.group(1), m.group(3)))
        fields = []
        for decl in m.group(2).split(";"):
            decl = decl.strip()
            if not decl:
                continue
            name = re.search(r"(\w+)\s*(\[[^\]]*\]\s*)*$", decl)
            if not name:
                raise AbiError("cannot read the field %r of %s" % (decl, m.group(1)))
            fields.append(name.group(1))
        structs.append((m.group(1), fields))
    functions = []
    decls = re.sub(r"^\s*#.*$", "", text, flags=re.M)  # preprocessor lines
    decls = re.sub(r'extern\s+"C"\s*\{|\}\s*$', "", decls, flags=re.M)
    for m in re.finditer(r"([A-Za-z_][\w\s\*]*?)\b(ps_\w+)\s*\(([^()]*)\)\s*;", decls):
        ret = " ".join(m.group(1).split())
        params = []
        for p in m.group(3).split(","):
            p = " ".join(p.split())
            if p and p != "void":
                p = re.sub(r"\s*\b\w+$", "", p)  # the parameter's name
            params.append(p.replace(" *", "*"))
        functions.append((m.group(2), "%s %s(%s)" % (ret.replace(" *", "*"), m.group(2), ", ".join(params))))
    constants = [n for n in re.findall(r"^\s*#\s*define\s+(PS_\w+)\s+\S", text, re.M) if n not in VERSION_CONSTANTS]
    return structs, functions, constants


def layouts(header, structs, constants):
    """Compiles and runs a C program printing the layouts and constants."""
    lines = ['#include <stddef.h>', '#include <stdio.h>', '#include "%s"' % os.path.abspath(header),
             "int main(void) {", '  printf("pointer size %zu\\n", sizeof(void *));']
    for name, fields in structs:
        lines.append('  printf("struct %s size %%zu align %%zu\\n", sizeof(%s), _Alignof(%s));' % (name, name, name))
        for f in fields:
            lines.append('  printf("  field %s offset %%zu size %%zu\\n", offsetof(%s, %s), sizeof(((%s *)0)->%s));'
                         % (f, name, f, name, f))
    for c in constants:
        lines.append('  printf("const %s %%lld\\n", (long long)(%s));' % (c, c))
    lines += ["  return 0;", "}", ""]
    with tempfile.TemporaryDirectory() as d:
        src, exe = os.path.join(d, "layout.c"), os.path.join(d, "layout")
        with open(src, "w", encoding="utf-8") as f:
            f.write("\n".join(lines))
        cc = os.environ.get("CC", "cc")
        subprocess.run([cc, "-std=c11", "-Wall", "-Werror", "-o", exe, src], check=True)
        return subprocess.run([exe], stdout=subprocess.PIPE, check=True, text=True).stdout.splitlines()


def exported(lib):
    out = subprocess.run(["nm", "-D", "--defined-only", lib], stdout=subprocess.PIPE, check=True, text=True).stdout
    syms = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2:
            syms.append((parts[-1].split("@")[0], parts[-2]))
    return sorted(set(syms))


def current(lib, header):
    """The ABI of (lib, header) as the record's lines, version first."""
    structs, functions, constants = header_parts(header)
    syms = exported(lib)
    foreign = [s for s, _ in syms if not s.startswith("ps_")]
    if foreign:
        raise AbiError("%s exports symbols other than ps_*: %s (pipeswitch.map must hide them)"
                       % (lib, ", ".join(foreign[:10])))
    declared = {n for n, _ in functions}
    funcs = {s for s, kind in syms if kind in ("T", "W", "i")}
    missing, undeclared = sorted(declared - funcs), sorted(funcs - declared)
    if missing or undeclared:
        raise AbiError("the header and %s disagree: declared but not exported: %s; exported but not declared: %s"
                       % (lib, ", ".join(missing) or "none", ", ".join(undeclared) or "none"))
    out = ["version %s" % cargo_version()]
    out += ["symbol %s %s" % (kind, s) for s, kind in syms]
    out += ["function %s" % sig for _, sig in sorted(functions)]
    out += layouts(header, structs, constants)
    return out


def read_record():
    if not os.path.exists(RECORD):
        return None
    with open(RECORD, encoding="utf-8") as f:
        return [l for l in f.read().splitlines() if l and not l.startswith("#")]


def write_record(lines):
    os.makedirs(os.path.dirname(RECORD), exist_ok=True)
    with open(RECORD, "w", encoding="utf-8") as f:
        f.write("# The C ABI of libpipeswitch (symbols, prototypes, struct layouts, constants).\n"
                "# Generated by scripts/abi.py update; CI runs scripts/abi.py check. Do not edit.\n")
        f.write("\n".join(lines) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["check", "update", "show"])
    ap.add_argument("--lib", help="libpipeswitch.so to read (default: build it)")
    ap.add_argument("--header", default=HEADER, help="pipeswitch.h to read (default: include/pipeswitch.h)")
    ap.add_argument("--same-version", action="store_true",
                    help="update: record a changed ABI under the version already recorded (unreleased version)")
    args = ap.parse_args(argv)
    try:
        now = current(args.lib or build_library(), args.header)
    except (AbiError, subprocess.CalledProcessError) as e:
        print("abi.py: %s" % e, file=sys.stderr)
        return 1
    if args.command == "show":
        print("\n".join(now))
        return 0
    rec = read_record()
    rel = os.path.relpath(RECORD, os.getcwd())
    if args.command == "update":
        if rec is not None and rec[0] == now[0] and rec != now and not args.same_version:
            print("abi.py: the ABI differs from the record but the version is still %s: bump the version "
                  "(Cargo.toml, src/ffi/version.rs) first, or pass --same-version if %s is unreleased"
                  % (now[0].split()[1], now[0].split()[1]), file=sys.stderr)
            return 1
        write_record(now)
        print("abi.py: wrote %s (%s)" % (rel, now[0]))
        return 0
    if rec is None:
        print("abi.py: no record %s: run scripts/abi.py update" % rel, file=sys.stderr)
        return 1
    if rec == now:
        print("abi.py: the ABI matches %s (%s)" % (rel, now[0]))
        return 0
    sys.stdout.writelines(l + "\n" for l in difflib.unified_diff(rec, now, rel, "current", lineterm=""))
    if rec[0] == now[0]:
        print("abi.py: the C ABI changed but the version is still %s: bump the version (Cargo.toml, "
              "src/ffi/version.rs), then run scripts/abi.py update" % now[0].split()[1], file=sys.stderr)
    else:
        print("abi.py: the record is for %s but Cargo.toml says %s: run scripts/abi.py update"
              % (rec[0].split()[1], now[0].split()[1]), file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
