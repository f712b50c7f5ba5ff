"""scripts/abi.py: the record catches ABI changes and refuses the wrong ones.

Needs the release library (scripts/test.sh builds it first) and a C
compiler. Each test works on a copy of the record in a temporary directory.
"""

import os
import shutil
import subprocess
import sys

import pytest

SCRIPTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(SCRIPTS)
sys.path.insert(0, SCRIPTS)
import abi  # noqa: E402

LIB = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release", "libpipeswitch.so")


@pytest.fixture
def record(tmp_path, monkeypatch):
    """A copy of the committed record, used by abi.py instead of the real one."""
    if not os.path.exists(LIB):
        pytest.skip("no %s: run cargo build --release --lib" % LIB)
    rec = tmp_path / "pipeswitch.abi"
    shutil.copy(abi.RECORD, rec)
    monkeypatch.setattr(abi, "RECORD", str(rec))
    return rec


def header_with(tmp_path, old, new):
    with open(abi.HEADER, encoding="utf-8") as f:
        text = f.read()
    assert old in text, old
    h = tmp_path / "pipeswitch.h"
    h.write_text(text.replace(old, new, 1))
    return str(h)


def test_the_committed_record_matches_the_library(record, capsys):
    assert abi.main(["check", "--lib", LIB]) == 0
    assert "the ABI matches" in capsys.readouterr().out


def test_a_changed_struct_layout_fails_until_the_version_is_bumped(record, tmp_path, capsys, monkeypatch):
    h = header_with(tmp_path, "  uint32_t max_models;", "  uint64_t max_models;")
    assert abi.main(["check", "--lib", LIB, "--header", h]) == 1
    out = capsys.readouterr()
    assert "-struct ps_store_usage size 32 align 8" in out.out
    assert "+struct ps_store_usage size 40 align 8" in out.out
    assert "the C ABI changed but the version is still" in out.err
    # update refuses the same version...
    before = record.read_text()
    assert abi.main(["update", "--lib", LIB, "--header", h]) == 1
    assert "bump the version" in capsys.readouterr().err
    assert record.read_text() == before
    # ...and records it under a new one, after which check passes.
    monkeypatch.setattr(abi, "cargo_version", lambda: "0.99.0")
    assert abi.main(["update", "--lib", LIB, "--header", h]) == 0
    assert "version 0.99.0" in record.read_text() and "size 40 align 8" in record.read_text()
    assert abi.main(["check", "--lib", LIB, "--header", h]) == 0


def test_a_changed_parameter_type_or_constant_is_caught(record, tmp_path, capsys):
    h = header_with(tmp_path, "ps_status ps_store_pin(const struct ps_store *store, int32_t",
                    "ps_status ps_store_pin(const struct ps_store *store, int64_t")
    assert abi.main(["check", "--lib", LIB, "--header", h]) == 1
    assert "+function ps_status ps_store_pin(const struct ps_store*, int64_t)" in capsys.readouterr().out
    h = header_with(tmp_path, "#define PS_ERR_NOT_FOUND 200", "#define PS_ERR_NOT_FOUND 210")
    assert abi.main(["check", "--lib", LIB, "--header", h]) == 1
    assert "+const PS_ERR_NOT_FOUND 210" in capsys.readouterr().out


def test_a_new_version_without_a_new_record_fails(record, capsys, monkeypatch):
    monkeypatch.setattr(abi, "cargo_version", lambda: "9.9.9")
    assert abi.main(["check", "--lib", LIB]) == 1
    err = capsys.readouterr().err
    assert "but Cargo.toml says 9.9.9: run scripts/abi.py update" in err


def test_a_header_function_the_library_lacks_is_an_error(record, tmp_path, capsys):
    h = header_with(tmp_path, "ps_status ps_store_unlink(", "ps_status ps_store_unlink_gone(const char *x);\n"
                    "ps_status ps_store_unlink(")
    assert abi.main(["check", "--lib", LIB, "--header", h]) == 1
    assert "declared but not exported: ps_store_unlink_gone" in capsys.readouterr().err


def test_a_library_exporting_other_symbols_is_refused(record, tmp_path, capsys):
    src = tmp_path / "leak.c"
    src.write_text("int ps_status_str(void) { return 0; }\nint helper_leak(void) { return 1; }\n")
    so = tmp_path / "libleak.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(so), str(src)], check=True)
    assert abi.main(["check", "--lib", str(so)]) == 1
    assert "exports symbols other than ps_*: helper_leak" in capsys.readouterr().err
