"""The ctypes bindings and Python wrappers, on the CPU (no GPU needed).

Store segments live in a temporary PIPESWITCH_SHM_DIR (see conftest.py);
every test uses its own store names. The library comes from PIPESWITCH_LIB
or the usual search (see pipeswitch/_lib.py).
"""

import array
import ctypes
import itertools
import json
import math
import os
import random
import re
import struct
import subprocess
import sys
import uuid

import pytest

import pipeswitch as ps
from pipeswitch import _lib

HERE = os.path.dirname(os.path.abspath(__file__))
PKG_ROOT = os.path.dirname(HERE)  # python/
HEADER = os.path.join(os.path.dirname(PKG_ROOT), "include", "pipeswitch.h")


def header_text():
    """The header without its comments."""
    if not os.path.exists(HEADER):
        pytest.skip("include/pipeswitch.h is not next to this source tree")
    with open(HEADER) as f:
        text = f.read()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def unique(prefix="t"):
    return "%s-%s" % (prefix, uuid.uuid4().hex[:12])


@pytest.fixture
def store():
    name = unique("store")
    s = ps.Store.create(name, 8 << 20)
    try:
        yield s
    finally:
        s.close()
        try:
            ps.Store.unlink(name)
        except ps.NotFound:
            pass


no_driver = pytest.mark.skipif(
    "ps.driver_available()", reason="a CUDA driver is present: the no-driver answers do not apply")


# ---------------------------------------------------------------------------
# Loading, version, the header's whole API
# ---------------------------------------------------------------------------

def test_library_loads():
    cdll = ps.lib()
    assert isinstance(cdll, ctypes.CDLL)
    assert ps.library_path()
    assert ps.lib() is cdll  # loaded once


def test_version_matches_header_constants():
    assert ps.version_number() == ps.PS_VERSION_NUMBER
    assert ps.version() == "%d.%d.%d" % (ps.PS_VERSION_MAJOR, ps.PS_VERSION_MINOR, ps.PS_VERSION_PATCH)
    assert ps.PS_VERSION_NUMBER == ps.PS_VERSION_MAJOR * 1000000 + ps.PS_VERSION_MINOR * 1000 + ps.PS_VERSION_PATCH


def test_every_header_function_is_declared():
    text = header_text()
    names = set(re.findall(r"\b(ps_[a-z0-9_]+)\s*\(", text))
    assert len(names) > 50
    assert names == set(_lib.SIGNATURES), "bindings and header differ"
    cdll = ps.lib()
    for name in sorted(names):
        f = getattr(cdll, name)
        assert f.argtypes is not None, name
        restype, argtypes = _lib.SIGNATURES[name]
        assert list(f.argtypes) == list(argtypes), name
        # Number of parameters equals the header's.
        m = re.search(r"\b%s\s*\(([^)]*)\)" % name, text)
        params = [p for p in m.group(1).split(",") if p.strip() and p.strip() != "void"]
        assert len(params) == len(argtypes), name
        if restype == _lib.STATUS:
            assert f.restype is _lib.ps_status and f.errcheck is not None, name
            assert re.search(r"ps_status\s+%s\s*\(" % name, text), name
        else:
            assert f.restype is restype, name
    # The one void function.
    assert cdll.ps_workspace_free.restype is None


def test_every_header_constant_is_defined():
    text = header_text()
    defines = dict((k, int(v)) for k, v in re.findall(r"#define\s+(PS_[A-Z0-9_]+)\s+(\d+)", text))
    assert len(defines) > 40
    assert defines == _lib.CONSTANTS
    for k, v in defines.items():
        assert getattr(ps, k) == v, k


def test_every_header_struct_is_mirrored():
    text = header_text()
    structs = set(re.findall(r"typedef struct (ps_[a-z_]+)", text))
    assert structs == set(_lib.STRUCTS)
    for name, body in re.findall(r"typedef struct (ps_[a-z_]+) \{(.*?)\}", text, re.S):
        fields = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:\[\d+\])?\s*;", body)
        assert [f[0] for f in _lib.STRUCTS[name]._fields_] == fields, name
    sizes = {"ps_arena_ipc_handle": 128, "ps_layer_desc": 16, "ps_tensor_desc": 40, "ps_model_info": 32,
             "ps_layer_info": 40, "ps_tensor_info": 96, "ps_store_usage": 32}
    for name, size in sizes.items():
        assert ctypes.sizeof(_lib.STRUCTS[name]) == size, name


def test_status_codes_map_to_exception_classes():
    from pipeswitch.errors import error_class

    expected = {
        ps.PS_ERR_NULL_ARGUMENT: ps.ArgumentError, ps.PS_ERR_INVALID_ARGUMENT: ps.ArgumentError,
        ps.PS_ERR_BUFFER_TOO_SMALL: ps.ArgumentError, ps.PS_ERR_INVALID_HANDLE: ps.InvalidHandle,
        ps.PS_ERR_NOT_FOUND: ps.NotFound, ps.PS_ERR_ALREADY_EXISTS: ps.AlreadyExists,
        ps.PS_ERR_STORE_FULL: ps.StoreFull, ps.PS_ERR_ARENA_FULL: ps.ArenaFull,
        ps.PS_ERR_INVALID_STATE: ps.StateError, ps.PS_ERR_NO_DRIVER: ps.NoDriver,
        ps.PS_ERR_NO_DEVICE: ps.NoDevice, ps.PS_ERR_CUDA: ps.CudaError,
        ps.PS_ERR_CUDA_OUT_OF_MEMORY: ps.CudaOutOfMemory, ps.PS_ERR_IO: ps.OsError, ps.PS_ERR_OS: ps.OsError,
        ps.PS_ERR_CORRUPT_STORE: ps.FormatError, ps.PS_ERR_STORE_VERSION: ps.FormatError,
        ps.PS_ERR_SAFETENSORS: ps.FormatError, ps.PS_ERR_PTX: ps.PtxError,
        ps.PS_ERR_PROTOCOL: ps.ProtocolError, ps.PS_ERR_DISCONNECTED: ps.Disconnected,
        ps.PS_ERR_REFUSED: ps.Refused,
        ps.PS_ERR_PANIC: ps.InternalError, ps.PS_ERR_INTERNAL: ps.InternalError,
    }
    assert set(expected) == set(_lib.STATUS_NAMES) - {ps.PS_OK}
    for code, cls in expected.items():
        assert error_class(code) is cls, code
        assert ps.status_str(code) and ps.status_str(code) != ps.status_str(12345)
    for sub in (ps.NotFound, ps.AlreadyExists, ps.StoreFull, ps.ArenaFull):
        assert issubclass(sub, ps.StateError)
    assert issubclass(ps.NoDriver, ps.CudaError) and issubclass(ps.OsError, OSError)
    assert issubclass(ps.ArgumentError, ValueError) and issubclass(ps.NotFound, LookupError)
    e = ps.NotFound(200, "PS_ERR_NOT_FOUND", "gone")
    assert (e.status, e.name, e.message) == (200, "PS_ERR_NOT_FOUND", "gone")
    assert "PS_ERR_NOT_FOUND" in str(e) and "gone" in str(e)
    import pickle
    e2 = pickle.loads(pickle.dumps(e))
    assert type(e2) is ps.NotFound and e2.message == "gone"


def test_errors_carry_the_library_message():
    with pytest.raises(ps.NotFound) as info:
        ps.Store.open(unique("absent"))
    e = info.value
    assert e.status == ps.PS_ERR_NOT_FOUND and e.name == "PS_ERR_NOT_FOUND"
    assert "ps_store_open" in e.message
    assert ps.last_error_message() == e.message


def _run_python(code, **env):
    full = dict(os.environ, **env)
    full["PYTHONPATH"] = PKG_ROOT + os.pathsep + full.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True)


def test_missing_library_raises_on_first_use_not_on_import():
    r = _run_python(
        "import pipeswitch as ps\n"
        "try:\n"
        "    ps.version()\n"
        "except ps.LibraryNotFound as e:\n"
        "    print('LibraryNotFound:', e)\n",
        PIPESWITCH_LIB="/nonexistent/libpipeswitch.so")
    assert r.returncode == 0, r.stderr
    assert "LibraryNotFound:" in r.stdout and "PIPESWITCH_LIB" in r.stdout


def test_import_does_not_import_torch_or_numpy():
    r = _run_python("import sys, pipeswitch\nprint('torch' in sys.modules, 'numpy' in sys.modules)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "False"]


# ---------------------------------------------------------------------------
# Store
# ---------------------------------------------------------------------------

def _f32(values):
    return struct.pack("<%df" % len(values), *values)


def test_store_round_trip(store):
    w0 = _f32([float(i) for i in range(12)])  # bytes
    b0 = bytearray(_f32([0.5] * 4))  # bytearray
    w1 = array.array("d", [1.5, -2.5])  # array.array
    x1 = memoryview(bytes([1, 2, 3]))  # memoryview
    store.add_model("m", [
        ("l0", [("l0.w", "F32", (3, 4), w0), ("l0.b", "float32", [4], b0)]),
        ("l1", [("l1.w", "F64", (2,), w1), ("l1.x", "U8", (3,), x1)]),
    ])
    assert store.models() == ["m"]
    assert "m" in store and "other" not in store
    info = store.model_info("m")
    assert info.name == "m" and info.id > 0
    assert [layer.name for layer in info.layers] == ["l0", "l1"]
    assert [t.name for t in info.tensors] == ["l0.w", "l0.b", "l1.w", "l1.x"]
    assert [t.dtype for t in info.tensors] == ["F32", "F32", "F64", "U8"]
    assert [t.shape for t in info.tensors] == [(3, 4), (4,), (2,), (3,)]
    assert [t.bytes for t in info.tensors] == [48, 16, 16, 3]
    assert [t.layer for t in info.tensors] == [0, 0, 1, 1]
    assert info.layers[0].tensors == ("l0.w", "l0.b") and info.layers[1].tensors == ("l1.w", "l1.x")
    assert info.layers[0].first_tensor == 0 and info.layers[1].first_tensor == 2
    assert all(t.offset % 256 == 0 for t in info.tensors)
    assert info.layers[0].offset == 0 and info.layers[1].offset == info.layers[0].bytes
    assert info.bytes >= info.layers[1].offset + info.layers[1].bytes
    assert all(math.isnan(x) for x in info.exec_ms) and not info.measured
    assert info.tensor("l1.w").offset == info.layers[1].offset
    with pytest.raises(KeyError):
        info.tensor("nope")
    # read() returns exactly the bytes that went in.
    for t, data in zip(info.tensors, [w0, bytes(b0), w1.tobytes(), x1.tobytes()]):
        assert store.read("m", t.offset, t.bytes) == data
        assert store.tensor_index("m", t.name) == t.index
    out = bytearray(48)
    store.read_into("m", info.tensor("l0.w").offset, out)
    assert bytes(out) == w0
    assert store.read("m", 0, 0) == b""
    with pytest.raises(ps.ArgumentError):
        store.read("m", info.bytes - 1, 2)  # past the end
    # Measured times.
    store.set_layer_exec_ms("m", [0.25, 0.5])
    info = store.model_info("m")
    assert info.exec_ms == [0.25, 0.5] and info.measured
    with pytest.raises(ps.ArgumentError):
        store.set_layer_exec_ms("m", [1.0])  # one per layer


def test_store_usage_and_remove(store):
    u0 = store.usage()
    assert u0.models == 0 and u0.used_bytes == 0 and u0.capacity_bytes >= 8 << 20 and u0.max_models == 256
    store.add_model("a", [("l", [("w", "U8", (1000,), bytes(1000))])])
    store.add_model("b", [("l", [("w", "I32", (10,), bytes(40))])])
    u1 = store.usage()
    assert u1.models == 2 and u1.used_bytes > 0 and u1.largest_free_bytes < u0.largest_free_bytes
    assert sorted(store.models()) == ["a", "b"]
    first_id = store.model_id("a")
    assert first_id == store.model_info("a").id and first_id != store.model_id("b")
    store.remove_model("a")
    assert store.models() == ["b"]
    with pytest.raises(ps.NotFound):
        store.model_id("a")
    store.add_model("a", [("l", [("w", "U8", (10,), bytes(10))])])
    assert store.model_id("a") not in (first_id, store.model_id("b"))  # a new add: a new id
    store.remove_model("a")
    assert store.usage().models == 1 and store.usage().used_bytes < u1.used_bytes
    store.remove_model("b")
    assert store.models() == [] and store.usage().used_bytes == 0
    with pytest.raises(ps.NotFound):
        store.remove_model("b")


def test_store_open_from_name_and_unlink():
    name = unique("shared")
    with ps.Store.create(name, 1 << 20) as s:
        s.add_model("m", [("l", [("w", "U8", (4,), b"abcd")])])
        with ps.Store.open(name) as s2:
            assert s2.models() == ["m"]
            assert s2.read("m", 0, 4) == b"abcd"
        with pytest.raises(ps.AlreadyExists):
            ps.Store.create(name, 1 << 20)
        ps.Store.unlink(name)
        assert s.read("m", 0, 4) == b"abcd"  # open handles keep working
    with pytest.raises(ps.NotFound):
        ps.Store.open(name)
    with pytest.raises(ps.NotFound):
        ps.Store.unlink(name)


def test_add_model_with_numpy(store):
    np = pytest.importorskip("numpy")
    w = np.arange(24, dtype=np.float32).reshape(4, 6)
    strided = w[:, ::2]  # not contiguous: copied once, in C order
    ro = np.arange(5, dtype=np.int64)
    ro.setflags(write=False)  # read-only: borrowed in place
    store.add_model("np", [
        ("a", [("a.w", np.float32, w.shape, w), ("a.s", w.dtype, strided.shape, strided)]),
        ("b", [("b.i", "int64", ro.shape, ro), ("b.h", "F16", (3,), np.ones(3, np.float16))]),
    ])
    info = store.model_info("np")
    got = lambda n, dt: np.frombuffer(store.read("np", info.tensor(n).offset, info.tensor(n).bytes), dt)
    assert (got("a.w", np.float32).reshape(4, 6) == w).all()
    assert (got("a.s", np.float32).reshape(4, 3) == strided).all()
    assert (got("b.i", np.int64) == ro).all()
    assert (got("b.h", np.float16) == 1).all()
    out = np.zeros(6, np.float32)
    store.read_into("np", info.tensor("a.w").offset, out)
    assert (out == w.ravel()[:6]).all()


def test_duplicate_and_missing_names(store):
    store.add_model("m", [("l", [("w", "U8", (1,), b"x")])])
    with pytest.raises(ps.AlreadyExists):
        store.add_model("m", [("l", [("w", "U8", (1,), b"y")])])
    assert store.read("m", 0, 1) == b"x"  # unchanged
    for call in (lambda: store.model_info("nope"), lambda: store.remove_model("nope"),
                 lambda: store.read("nope", 0, 1), lambda: store.tensor_index("m", "nope"),
                 lambda: store.set_layer_exec_ms("nope", [1.0])):
        with pytest.raises(ps.NotFound):
            call()


def test_bad_model_specs_are_argument_errors(store):
    cases = [
        [],  # no layers
        [("l", [])],  # a layer without tensors
        [("l", [("w", "F32", (3,), bytes(4))])],  # bytes do not match the shape
        [("l", [("w", "F32", (1,), bytes(4)), ("w", "F32", (1,), bytes(4))])],  # a name twice
        [("l", [("w", "complex64", (1,), bytes(8))])],  # unknown dtype
        [("l", [("w", "F32", (1,) * 9, bytes(4))])],  # more than PS_MAX_DIMS dimensions
        [("l", [("w\0x", "F32", (1,), bytes(4))])],  # NUL in a name
    ]
    for layers in cases:
        with pytest.raises(ps.ArgumentError):
            store.add_model("bad", layers)
    assert store.models() == []
    with pytest.raises(TypeError):
        store.add_model("bad", [("l", [("w", "U8", (1,), 12345)])])  # no buffer protocol
    with pytest.raises(ps.ArgumentError):
        ps.Store.create("bad/name", 1 << 20)


def test_store_limits(store):
    name = unique("small")
    with ps.Store.create(name, 1 << 20, max_models=1) as s:
        s.add_model("a", [("l", [("w", "U8", (1,), b"x")])])
        with pytest.raises(ps.StoreFull):
            s.add_model("b", [("l", [("w", "U8", (1,), b"x")])])
        assert s.usage().max_models == 1
    ps.Store.unlink(name)
    with pytest.raises(ps.StoreFull):
        store.add_model("huge", [("l", [("w", "U8", (16 << 20,), bytes(16 << 20))])])


def _write_safetensors(path, tensors, metadata=None):
    header, blobs, pos = {}, [], 0
    for name, dtype, shape, data in tensors:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + len(data)]}
        blobs.append(data)
        pos += len(data)
    if metadata:
        header["__metadata__"] = metadata
    h = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def test_add_safetensors(store, tmp_path):
    a, b, c = _f32([1, 2, 3, 4]), struct.pack("<q", -7), _f32([9])
    path = tmp_path / "m.safetensors"
    _write_safetensors(str(path), [("enc.w", "F32", (2, 2), a), ("enc.n", "I64", (1,), b),
                                   ("dec.w", "F32", (1,), c)])
    store.add_safetensors("auto", path)
    info = store.model_info("auto")
    assert [layer.name for layer in info.layers] == ["enc", "dec"]
    assert store.read("auto", info.tensor("enc.w").offset, 16) == a
    assert store.read("auto", info.tensor("enc.n").offset, 8) == b
    store.add_safetensors("listed", str(path), layers=["dec", "enc"])
    assert [layer.name for layer in store.model_info("listed").layers] == ["dec", "enc"]


def test_corrupt_or_missing_safetensors(store, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"this is not a safetensors file")
    with pytest.raises(ps.FormatError):
        store.add_safetensors("x", bad)
    truncated = tmp_path / "short.safetensors"
    _write_safetensors(str(truncated), [("a.w", "F32", (4,), _f32([1, 2, 3, 4]))])
    truncated.write_bytes(truncated.read_bytes()[:-3])
    with pytest.raises(ps.FormatError):
        store.add_safetensors("x", truncated)
    with pytest.raises(ps.PipeSwitchError):
        store.add_safetensors("x", tmp_path / "missing.safetensors")
    assert store.models() == []


def test_closed_store_is_a_clear_error_and_double_close_is_a_noop():
    name = unique("closed")
    s = ps.Store.create(name, 1 << 20)
    s.close()
    assert s.closed
    s.close()  # no-op
    with pytest.raises(ps.InvalidHandle, match="closed"):
        s.models()
    with pytest.raises(ps.InvalidHandle, match="closed"):
        s.add_model("m", [("l", [("w", "U8", (1,), b"x")])])
    with ps.Store.open(name) as s2:
        pass
    assert s2.closed
    ps.Store.unlink(name)


def test_raw_calls_with_null_or_dead_handles():
    cdll = ps.lib()
    with pytest.raises(ps.ArgumentError):
        cdll.ps_store_model_count(None, ctypes.byref(ctypes.c_size_t()))
    cdll.ps_store_free(None)  # NULL does nothing
    h = ctypes.POINTER(_lib.ps_store)()
    name = unique("raw").encode()
    cdll.ps_store_create(name, 1 << 20, 0, ctypes.byref(h))
    cdll.ps_store_free(h)
    with pytest.raises(ps.InvalidHandle):
        cdll.ps_store_free(h)  # double free through the raw API is reported, not a crash
    cdll.ps_store_unlink(name)


# ---------------------------------------------------------------------------
# Planner
# ---------------------------------------------------------------------------

def simulate(t, x, starts, a, b):
    """The cost model of ps_plan_groups, in Python."""
    T = E = 0.0
    bounds = list(starts) + [len(t)]
    for s, e in zip(bounds, bounds[1:]):
        T = T + a + sum(t[s:e])
        E = max(E, T) + b + sum(x[s:e])
    return E


def all_plans(n):
    for cuts in itertools.product([False, True], repeat=n - 1):
        yield [0] + [i + 1 for i, c in enumerate(cuts) if c]


def test_planner_equals_brute_force():
    rng = random.Random(1234)
    for _ in range(300):
        n = rng.randint(1, 8)
        t = [rng.choice([0.0, rng.uniform(0, 5)]) for _ in range(n)]
        x = [rng.choice([0.0, rng.uniform(0, 5)]) for _ in range(n)]
        a, b = rng.choice([0.0, rng.uniform(0, 2)]), rng.choice([0.0, rng.uniform(0, 2)])
        best = min(simulate(t, x, p, a, b) for p in all_plans(n))
        starts, makespan = ps.plan_groups(t, x, a, b)
        assert starts[0] == 0 and all(p < q for p, q in zip(starts, starts[1:])) and starts[-1] < n
        assert makespan == pytest.approx(best, rel=1e-9, abs=1e-12)
        assert simulate(t, x, starts, a, b) == pytest.approx(makespan, rel=1e-9, abs=1e-12)
        assert ps.plan_makespan(t, x, starts, a, b) == pytest.approx(makespan, rel=1e-12, abs=1e-12)
        p = rng.choice(list(all_plans(n)))
        assert ps.plan_makespan(t, x, p, a, b) == pytest.approx(simulate(t, x, p, a, b), rel=1e-9, abs=1e-12)


def test_plan_errors_are_argument_errors():
    bad = [
        ([float("nan")], [1.0], 0, 0), ([1.0], [float("inf")], 0, 0), ([-1.0], [1.0], 0, 0),
        ([1.0], [1.0], float("nan"), 0), ([1.0], [1.0], 0, -1), ([], [], 0, 0), ([1.0, 2.0], [1.0], 0, 0),
    ]
    for t, x, a, b in bad:
        with pytest.raises(ps.ArgumentError):
            ps.plan_groups(t, x, a, b)
    with pytest.raises(ps.ArgumentError):
        ps.plan_makespan([1.0, 1.0], [1.0, 1.0], [1])  # must start at 0
    with pytest.raises(ps.ArgumentError):
        ps.plan_makespan([1.0, 1.0], [1.0, 1.0], [0, 0])  # not increasing
    with pytest.raises(ps.ArgumentError):
        ps.plan_makespan([1.0], [1.0], [0], float("nan"))


def test_plan_model(store):
    sizes = [4096, 1 << 16, 1 << 20, 512]
    store.add_model("m", [("l%d" % i, [("w%d" % i, "U8", (n,), bytes(n))]) for i, n in enumerate(sizes)])
    with pytest.raises(ps.StateError):
        ps.plan_model(store, "m", 10.0)  # no execution times yet
    exec_ms = [0.05, 0.2, 0.4, 0.01]
    store.set_layer_exec_ms("m", exec_ms)
    info = store.model_info("m")
    bw, a, b = 12.0, 0.01, 0.002
    starts, makespan = ps.plan_model(store, "m", bw, a, b)
    transfer = [layer.bytes / (bw * 1e6) for layer in info.layers]
    expect = ps.plan_groups(transfer, exec_ms, a, b)
    assert starts == expect[0] and makespan == pytest.approx(expect[1], rel=1e-12)
    with pytest.raises(ps.ArgumentError):
        ps.plan_model(store, "m", 0.0)
    with pytest.raises(ps.NotFound):
        ps.plan_model(store, "nope", 10.0)


def test_group_ranges_and_model_host_ptr(store):
    sizes = [4096, 300, 1 << 16, 512]
    store.add_model("m", [("l%d" % i, [("w%d" % i, "U8", (n,), bytes([i + 1]) * n)]) for i, n in enumerate(sizes)])
    info = store.model_info("m")
    ends = [layer.offset + layer.bytes for layer in info.layers]
    for plan in ([0], [0, 1], [0, 2, 3], [0, 1, 2, 3]):
        ranges = store.group_ranges("m", plan)
        bounds = plan[1:] + [len(sizes)]
        assert ranges == [(0 if g == 0 else ends[plan[g] - 1], ends[b - 1]) for g, b in enumerate(bounds)]
    for bad in ([], [1], [0, 0], [0, 2, 1], [0, 4]):
        with pytest.raises(ps.ArgumentError):
            store.group_ranges("m", bad)
    with pytest.raises(ps.NotFound):
        store.group_ranges("nope", [0])
    # The switch's copies: with the default chunking the small model is the
    # first group's own copy (nothing runs before it) and one more; without
    # merging, one copy per group, split at max_chunk.
    copies, group_copy = store.copy_schedule("m", [0, 1, 2, 3])
    assert copies == [(0, ends[0]), (ends[0], ends[-1])] and group_copy == [0, 1, 1, 1]
    copies, group_copy = store.copy_schedule("m", [0, 1, 2, 3], min_chunk=1, max_chunk=8192)
    assert copies[0][0] == 0 and copies[-1][1] == ends[-1]
    assert all(a[1] == b[0] for a, b in zip(copies, copies[1:])) and all(e - s <= 8192 for s, e in copies)
    assert [copies[c][1] for c in group_copy] == ends
    assert len(copies) > 4  # the 64 KiB layer in pieces
    with pytest.raises(ps.ArgumentError):
        store.copy_schedule("m", [0, 1], min_chunk=10, max_chunk=1)
    with pytest.raises(ps.ArgumentError):
        store.copy_schedule("m", [1])
    # The model's bytes lie at the host address, as read() reads them.
    ptr = store.model_host_ptr("m")
    assert ctypes.string_at(ptr, info.bytes) == store.read("m", 0, info.bytes)
    with pytest.raises(ps.NotFound):
        store.model_host_ptr("nope")


def test_a_lease_keeps_a_removed_models_bytes_until_it_is_released(store):
    n = 1 << 20
    store.add_model("m", [("l0", [("w", "U8", (n,), bytes([7]) * n)])])
    lease = store.lease("m")
    assert lease.model_id == store.model_id("m") and not lease.released
    assert ctypes.string_at(lease.host_ptr, 64) == bytes([7]) * 64
    used = store.usage().used_bytes
    # Removed while leased: gone from lookups at once, its bytes kept.
    store.remove_model("m")
    with pytest.raises(ps.NotFound):
        store.model_id("m")
    with pytest.raises(ps.NotFound):
        store.lease("m")
    store.add_model("n", [("l0", [("w", "U8", (n,), bytes([9]) * n)])])
    assert store.model_host_ptr("n") != lease.host_ptr, "a leased model's space is not reused"
    assert ctypes.string_at(lease.host_ptr, n) == bytes([7]) * n
    assert store.usage().used_bytes > used
    # Released: the space comes back.
    lease.release()
    lease.release()  # once
    assert lease.released
    store.remove_model("n")
    assert store.usage().used_bytes == 0
    store.add_model("k", [("l0", [("w", "U8", (64,), bytes(64))])])
    with store.lease("k") as held:
        assert held.model_id == store.model_id("k")
    assert held.released
    with pytest.raises(ps.NotFound):
        store.lease("nope")


# ---------------------------------------------------------------------------
# Without a CUDA driver; the workspace without an arena
# ---------------------------------------------------------------------------

@no_driver
def test_no_driver_answers(store):
    assert ps.driver_available() is False
    with pytest.raises(ps.NoDriver):
        ps.device_count()
    with pytest.raises(ps.NoDriver):
        ps.Arena.create(0, 64 << 20, 8 << 20)
    with pytest.raises(ps.NoDriver):
        ps.Switch(0)
    with pytest.raises(ps.NoDriver):
        ps.measure_h2d(0, 1 << 20)
    store.add_model("m", [("l", [("w", "U8", (1,), b"x")])])
    with pytest.raises(ps.NoDriver):
        store.pin(0)


def test_workspace_without_an_arena():
    ps.workspace_detach()  # nothing attached: a no-op
    with pytest.raises(ps.StateError):
        ps.workspace_usage()
    cdll = ps.lib()
    assert cdll.ps_workspace_malloc(256, 0, None) is None  # NULL, with a message
    assert "attached" in ps.last_error_message()
    cdll.ps_workspace_free(None, 0, 0, None)  # NULL does nothing
    path, malloc_name, free_name = ps.pluggable_allocator_args()
    assert (malloc_name, free_name) == ("ps_workspace_malloc", "ps_workspace_free")
    assert path == ps.library_path()
    handle = ctypes.CDLL(path)  # the same library, by the same path
    assert hasattr(handle, malloc_name) and hasattr(handle, free_name)


def test_arena_import_checks_the_handle():
    with pytest.raises(ps.ArgumentError):
        ps.Arena.import_(b"short")
    with pytest.raises((ps.ArgumentError, ps.CudaError)):
        ps.Arena.import_(bytes(128))  # not an exported handle


def test_dtype_names():
    assert ps.dtype_code("F32") == ps.PS_DTYPE_F32 == ps.dtype_code("float32") == ps.dtype_code("torch.float32")
    assert ps.dtype_code("bf16") == ps.PS_DTYPE_BF16 == ps.dtype_code("bfloat16")
    assert ps.dtype_code("float8_e4m3fn") == ps.PS_DTYPE_F8_E4M3
    assert ps.dtype_code(ps.PS_DTYPE_I64) == ps.PS_DTYPE_I64
    assert [ps.dtype_name(c) for c in range(15)] == [
        "BOOL", "U8", "I8", "F8_E4M3", "F8_E5M2", "I16", "U16", "F16", "BF16",
        "I32", "U32", "F32", "I64", "U64", "F64"]
    for bad in ("complex64", 99, True, None):
        with pytest.raises(ps.ArgumentError):
            ps.dtype_code(bad)
