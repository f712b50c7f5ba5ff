"""Finding, loading and declaring ``libpipeswitch.so``: the raw ctypes layer.

Everything in ``include/pipeswitch.h`` is mirrored here: every ``PS_*``
constant (module attributes of the same name), every struct (ctypes
``Structure`` classes of the same name), and every ``ps_*`` function, with
``argtypes`` and ``restype`` set (:data:`SIGNATURES`). Functions that return a
``ps_status`` raise :class:`pipeswitch.PipeSwitchError` (a subclass chosen by
the status) through ``errcheck``; calling them through :func:`lib` therefore
never needs a status check.

The library is found, on first use (:func:`lib`), in this order:

1. the environment variable ``PIPESWITCH_LIB`` (a path to the ``.so``);
2. ``libpipeswitch.so`` inside this package's directory (``pip install
   ./python`` and the wheel put it there: ``python/setup.py`` builds it);
3. ``target/release/libpipeswitch.so`` of the repository that holds this
   package's source (for ``pip install -e ./python`` or a source checkout);
4. ``ctypes.util.find_library("pipeswitch")`` (the system's search path).

If none loads, :class:`LibraryNotFound` is raised, naming every place tried.
Importing the package never fails for a missing library.
"""

import ctypes
import ctypes.util
import os
import threading
from ctypes import (
    POINTER,
    Structure,
    c_char,
    c_char_p,
    c_double,
    c_int32,
    c_size_t,
    c_uint8,
    c_uint32,
    c_uint64,
    c_void_p,
)

from . import errors

# ---------------------------------------------------------------------------
# Constants (the header's #defines)
# ---------------------------------------------------------------------------

PS_DTYPE_BOOL = 0
PS_DTYPE_U8 = 1
PS_DTYPE_I8 = 2
PS_DTYPE_F8_E4M3 = 3
PS_DTYPE_F8_E5M2 = 4
PS_DTYPE_I16 = 5
PS_DTYPE_U16 = 6
PS_DTYPE_F16 = 7
PS_DTYPE_BF16 = 8
PS_DTYPE_I32 = 9
PS_DTYPE_U32 = 10
PS_DTYPE_F32 = 11
PS_DTYPE_I64 = 12
PS_DTYPE_U64 = 13
PS_DTYPE_F64 = 14

PS_MAX_DIMS = 8

PS_VERSION_MAJOR = 0
PS_VERSION_MINOR = 2
PS_VERSION_PATCH = 0
PS_VERSION_NUMBER = 2000

PS_OK = 0
PS_ERR_NULL_ARGUMENT = 100
PS_ERR_INVALID_ARGUMENT = 101
PS_ERR_BUFFER_TOO_SMALL = 102
PS_ERR_INVALID_HANDLE = 103
PS_ERR_NOT_FOUND = 200
PS_ERR_ALREADY_EXISTS = 201
PS_ERR_STORE_FULL = 202
PS_ERR_ARENA_FULL = 203
PS_ERR_INVALID_STATE = 204
PS_ERR_NO_DRIVER = 300
PS_ERR_NO_DEVICE = 301
PS_ERR_CUDA = 302
PS_ERR_CUDA_OUT_OF_MEMORY = 303
PS_ERR_IO = 400
PS_ERR_OS = 401
PS_ERR_CORRUPT_STORE = 500
PS_ERR_STORE_VERSION = 501
PS_ERR_SAFETENSORS = 502
PS_ERR_PTX = 600
PS_ERR_PROTOCOL = 700
PS_ERR_DISCONNECTED = 701
PS_ERR_REFUSED = 702
PS_ERR_PANIC = 900
PS_ERR_INTERNAL = 901

#: Every ``PS_*`` constant of the header, by name.
CONSTANTS = {k: v for k, v in globals().items() if k.startswith("PS_")}

#: Status code -> its ``PS_*`` name (``PS_OK`` and every ``PS_ERR_*``).
STATUS_NAMES = {v: k for k, v in CONSTANTS.items() if k == "PS_OK" or k.startswith("PS_ERR_")}

#: ``PS_DTYPE_*`` code -> element size in bytes.
DTYPE_SIZES = {
    PS_DTYPE_BOOL: 1, PS_DTYPE_U8: 1, PS_DTYPE_I8: 1, PS_DTYPE_F8_E4M3: 1, PS_DTYPE_F8_E5M2: 1,
    PS_DTYPE_I16: 2, PS_DTYPE_U16: 2, PS_DTYPE_F16: 2, PS_DTYPE_BF16: 2,
    PS_DTYPE_I32: 4, PS_DTYPE_U32: 4, PS_DTYPE_F32: 4,
    PS_DTYPE_I64: 8, PS_DTYPE_U64: 8, PS_DTYPE_F64: 8,
}

# ---------------------------------------------------------------------------
# Types (the header's typedefs and structs)
# ---------------------------------------------------------------------------

ps_status = c_uint32


class ps_arena(Structure):
    """Opaque: a device arena."""


class ps_store(Structure):
    """Opaque: an open host model store."""


class ps_switch(Structure):
    """Opaque: a switch engine for one device."""


class ps_program(Structure):
    """Opaque: a stored model's graph bound to the model."""


class ps_worker(Structure):
    """Opaque: the built-in worker (compute stream, activation buffer)."""


class ps_client(Structure):
    """Opaque: a connection to the GPU daemon."""


class ps_result(Structure):
    """Opaque: the outputs of one daemon request."""


class ps_residency(Structure):
    """Opaque: the residency manager of an arena."""


class ps_model_use(Structure):
    """Opaque: one use of a model placed by a residency manager."""


class ps_model_lease(Structure):
    """Opaque: a lease on a stored model (its bytes stay put while it lives)."""


class ps_tensor_view(Structure):
    _fields_ = [
        ("name", c_char_p),
        ("dtype", c_uint32),
        ("ndim", c_uint32),
        ("shape", c_uint64 * 8),
        ("data", c_void_p),
        ("bytes", c_uint64),
    ]


class ps_timing(Structure):
    _fields_ = [("queued_ms", c_double), ("activation_ms", c_double), ("worker_ms", c_double), ("total_ms", c_double)]


class ps_daemon_stats(Structure):
    _fields_ = [
        ("requests", c_uint64),
        ("failed", c_uint64),
        ("hits", c_uint64),
        ("misses", c_uint64),
        ("evictions", c_uint64),
        ("bytes_copied", c_uint64),
        ("workers", c_uint32),
        ("standbys", c_uint32),
        ("workers_started", c_uint64),
        ("workers_lost", c_uint64),
    ]


class ps_residency_stats(Structure):
    _fields_ = [
        ("hits", c_uint64),
        ("misses", c_uint64),
        ("evictions", c_uint64),
        ("moves", c_uint64),
        ("bytes_moved", c_uint64),
        ("bytes_loaded", c_uint64),
        ("failed_loads", c_uint64),
        ("switch_ms", c_double),
        ("capacity_bytes", c_uint64),
        ("used_bytes", c_uint64),
    ]


class ps_arena_ipc_handle(Structure):
    _fields_ = [("bytes", c_uint8 * 128)]


class ps_layer_desc(Structure):
    _fields_ = [("name", c_char_p), ("n_tensors", c_size_t)]


class ps_tensor_desc(Structure):
    _fields_ = [
        ("name", c_char_p),
        ("dtype", c_uint32),
        ("ndim", c_uint32),
        ("shape", POINTER(c_uint64)),
        ("data", c_void_p),
        ("bytes", c_uint64),
    ]


class ps_model_info(Structure):
    _fields_ = [("id", c_uint64), ("bytes", c_uint64), ("n_layers", c_size_t), ("n_tensors", c_size_t)]


class ps_layer_info(Structure):
    _fields_ = [
        ("first_tensor", c_size_t),
        ("n_tensors", c_size_t),
        ("offset", c_uint64),
        ("bytes", c_uint64),
        ("exec_ms", c_double),
    ]


class ps_tensor_info(Structure):
    _fields_ = [
        ("dtype", c_uint32),
        ("ndim", c_uint32),
        ("shape", c_uint64 * 8),
        ("offset", c_uint64),
        ("bytes", c_uint64),
        ("layer", c_size_t),
    ]


class ps_store_usage(Structure):
    _fields_ = [
        ("capacity_bytes", c_uint64),
        ("used_bytes", c_uint64),
        ("largest_free_bytes", c_uint64),
        ("models", c_uint32),
        ("max_models", c_uint32),
    ]


class ps_cost_model(Structure):
    _fields_ = [
        ("transfer_overhead_ms", c_double),
        ("exec_overhead_ms", c_double),
        ("first_kernel_ms", c_double),
        ("exec_scale", c_double),
        ("copy_slowdown", c_double),
        ("floor_ms", c_double),
        ("floor_per_group_ms", c_double),
    ]


class ps_cost_record(Structure):
    _fields_ = [
        ("model", ps_cost_model),
        ("bandwidth_gbps", c_double),
        ("predicted_ms", c_double),
        ("measured_ms", c_double),
        ("groups", c_uint32),
        ("rounds", c_uint32),
        ("fit_rms_rel_error", c_double),
        ("unix_s", c_uint64),
    ]


#: Every struct of the header, by name.
STRUCTS = {
    c.__name__: c
    for c in (ps_arena, ps_store, ps_switch, ps_program, ps_worker, ps_arena_ipc_handle, ps_layer_desc, ps_tensor_desc,
              ps_model_info, ps_layer_info, ps_tensor_info, ps_store_usage, ps_cost_model, ps_cost_record,
              ps_client, ps_result, ps_residency, ps_model_use, ps_model_lease, ps_tensor_view, ps_timing,
              ps_daemon_stats, ps_residency_stats)
}

#: ``ps_measure_plan_fn``: (user, group starts, number of groups, out ms) -> 0 or an error code.
ps_measure_plan_fn = ctypes.CFUNCTYPE(c_int32, c_void_p, POINTER(c_size_t), c_size_t, POINTER(c_double))

# Pointer shorthands.
_P = POINTER
_store_p = _P(ps_store)
_arena_p = _P(ps_arena)
_switch_p = _P(ps_switch)
_program_p = _P(ps_program)
_worker_p = _P(ps_worker)
_client_p = _P(ps_client)
_result_p = _P(ps_result)
_residency_p = _P(ps_residency)
_use_p = _P(ps_model_use)
_lease_p = _P(ps_model_lease)
_u64_p = _P(c_uint64)
_size_p = _P(c_size_t)
_f64_p = _P(c_double)
_i32_p = _P(c_int32)
_char_buf = _P(c_char)

#: Marks a function that returns a ``ps_status``: its restype is
#: :data:`ps_status` and a non-OK status raises (see the module doc).
STATUS = "ps_status"

#: name -> (restype, argtypes) for every function of the header.
SIGNATURES = {
    "ps_status_str": (c_char_p, [ps_status]),
    "ps_last_error_message": (c_char_p, []),
    # arena
    "ps_arena_create": (STATUS, [c_int32, c_uint64, c_uint64, _P(_arena_p)]),
    "ps_arena_free": (STATUS, [_arena_p]),
    "ps_arena_alloc": (STATUS, [_arena_p, c_uint64, _u64_p]),
    "ps_arena_release": (STATUS, [_arena_p, c_uint64]),
    "ps_arena_base": (STATUS, [_arena_p, _u64_p, _u64_p]),
    "ps_arena_workspace": (STATUS, [_arena_p, _u64_p, _u64_p]),
    "ps_arena_export": (STATUS, [_arena_p, _P(ps_arena_ipc_handle)]),
    "ps_arena_import": (STATUS, [_P(ps_arena_ipc_handle), _P(_arena_p)]),
    "ps_arena_read": (STATUS, [_arena_p, c_uint64, c_void_p, c_size_t]),
    "ps_arena_write": (STATUS, [_arena_p, c_uint64, c_void_p, c_size_t]),
    # planner and measurement
    "ps_plan_groups": (STATUS, [_f64_p, _f64_p, c_size_t, c_double, c_double, _size_p, c_size_t,
                                   _size_p, _f64_p]),
    "ps_plan_makespan": (STATUS, [_f64_p, _f64_p, c_size_t, c_double, c_double, _size_p, c_size_t,
                                     _f64_p]),
    "ps_plan_model": (STATUS, [_store_p, c_char_p, c_double, c_double, c_double, _size_p, c_size_t,
                                  _size_p, _f64_p]),
    "ps_measure_h2d": (STATUS, [c_int32, c_uint64, _f64_p, _f64_p]),
    "ps_plan_groups_cost": (STATUS, [_f64_p, _f64_p, c_size_t, _P(ps_cost_model), _size_p, c_size_t, _size_p,
                                        _f64_p]),
    "ps_plan_makespan_cost": (STATUS, [_f64_p, _f64_p, c_size_t, _P(ps_cost_model), _size_p, c_size_t, _f64_p]),
    "ps_plan_closed_loop": (STATUS, [_f64_p, _f64_p, c_size_t, _P(ps_cost_model), _size_p, _size_p, c_size_t,
                                        ps_measure_plan_fn, c_void_p, c_size_t, c_double, _P(ps_cost_record),
                                        _size_p, c_size_t, _size_p]),
    "ps_store_set_cost": (STATUS, [_store_p, c_char_p, _P(ps_cost_record)]),
    "ps_store_get_cost": (STATUS, [_store_p, c_char_p, _P(ps_cost_record), _P(c_uint32)]),
    # store
    "ps_store_create": (STATUS, [c_char_p, c_uint64, c_uint32, _P(_store_p)]),
    "ps_store_open": (STATUS, [c_char_p, _P(_store_p)]),
    "ps_store_free": (STATUS, [_store_p]),
    "ps_store_unlink": (STATUS, [c_char_p]),
    "ps_store_add_model": (STATUS, [_store_p, c_char_p, _P(ps_layer_desc), c_size_t,
                                       _P(ps_tensor_desc), c_size_t]),
    "ps_store_add_safetensors": (STATUS, [_store_p, c_char_p, c_char_p, _P(c_char_p), c_size_t]),
    "ps_store_remove_model": (STATUS, [_store_p, c_char_p]),
    "ps_store_model_count": (STATUS, [_store_p, _size_p]),
    "ps_store_model_name": (STATUS, [_store_p, c_size_t, _char_buf, c_size_t, _size_p]),
    "ps_store_model_info": (STATUS, [_store_p, c_char_p, _P(ps_model_info)]),
    "ps_store_layer_info": (STATUS, [_store_p, c_char_p, c_size_t, _P(ps_layer_info), _char_buf,
                                        c_size_t]),
    "ps_store_tensor_info": (STATUS, [_store_p, c_char_p, c_size_t, _P(ps_tensor_info), _char_buf,
                                         c_size_t]),
    "ps_store_tensor_index": (STATUS, [_store_p, c_char_p, c_char_p, _size_p]),
    "ps_store_set_layer_exec_ms": (STATUS, [_store_p, c_char_p, _f64_p, c_size_t]),
    "ps_store_get_usage": (STATUS, [_store_p, _P(ps_store_usage)]),
    "ps_store_pin": (STATUS, [_store_p, c_int32]),
    "ps_store_read": (STATUS, [_store_p, c_char_p, c_uint64, c_void_p, c_size_t]),
    "ps_store_check": (STATUS, [_store_p]),
    "ps_store_model_footprint": (STATUS, [_store_p, c_char_p, _u64_p]),
    "ps_store_safetensors_footprint": (STATUS, [c_char_p, _P(c_char_p), c_size_t, _u64_p]),
    "ps_store_capacity_for": (STATUS, [_u64_p, c_size_t, _u64_p]),
    "ps_store_group_ranges": (STATUS, [_store_p, c_char_p, _size_p, c_size_t, _u64_p, _u64_p]),
    "ps_store_model_host_ptr": (STATUS, [_store_p, c_char_p, _u64_p]),
    "ps_store_lease": (STATUS, [_store_p, c_char_p, _u64_p, _u64_p, _P(_lease_p)]),
    "ps_model_lease_free": (STATUS, [_lease_p]),
    "ps_store_copy_schedule": (STATUS, [_store_p, c_char_p, _size_p, c_size_t, c_uint64, c_uint64, _u64_p,
                                        c_size_t, _size_p, _size_p]),
    # switch
    "ps_switch_new": (STATUS, [c_int32, _P(_switch_p)]),
    "ps_switch_free": (STATUS, [_switch_p]),
    "ps_switch_set_chunking": (STATUS, [_switch_p, c_uint64, c_uint64]),
    "ps_switch_start": (STATUS, [_switch_p, _store_p, c_char_p, _arena_p, c_uint64, _size_p,
                                    c_size_t]),
    "ps_switch_start_whole": (STATUS, [_switch_p, _store_p, c_char_p, _arena_p, c_uint64]),
    "ps_switch_start_resident": (STATUS, [_switch_p, _store_p, c_char_p, _arena_p, c_uint64]),
    "ps_switch_wait_group": (STATUS, [_switch_p, c_size_t, c_void_p]),
    "ps_switch_group_of_layer": (STATUS, [_switch_p, c_size_t, _size_p]),
    "ps_switch_n_groups": (STATUS, [_switch_p, _size_p]),
    "ps_switch_group_ready": (STATUS, [_switch_p, c_size_t, _i32_p]),
    "ps_switch_tensor_ptr": (STATUS, [_switch_p, c_size_t, _u64_p]),
    "ps_switch_tensor_ptr_by_name": (STATUS, [_switch_p, c_char_p, _u64_p]),
    "ps_switch_host_model_ptr": (STATUS, [_switch_p, _u64_p]),
    "ps_switch_synchronize": (STATUS, [_switch_p]),
    "ps_switch_elapsed_ms": (STATUS, [_switch_p, _f64_p]),
    "ps_switch_copy_stream": (STATUS, [_switch_p, _P(c_void_p)]),
    # built-in worker
    "ps_program_from_store": (STATUS, [_store_p, c_char_p, _P(_program_p)]),
    "ps_program_free": (STATUS, [_program_p]),
    "ps_program_activation_bytes": (STATUS, [_program_p, _u64_p]),
    "ps_program_tensor_bytes": (STATUS, [_program_p, c_char_p, _u64_p]),
    "ps_program_n_inputs": (STATUS, [_program_p, _size_p]),
    "ps_program_input_name": (STATUS, [_program_p, c_size_t, _char_buf, c_size_t, _size_p]),
    "ps_program_n_outputs": (STATUS, [_program_p, _size_p]),
    "ps_program_output_name": (STATUS, [_program_p, c_size_t, _char_buf, c_size_t, _size_p]),
    "ps_worker_new": (STATUS, [_arena_p, _P(_worker_p)]),
    "ps_worker_free": (STATUS, [_worker_p]),
    "ps_worker_prepare": (STATUS, [_worker_p, _program_p]),
    "ps_worker_set_input": (STATUS, [_worker_p, _program_p, c_char_p, c_void_p, c_size_t]),
    "ps_worker_run": (STATUS, [_worker_p, _program_p, _switch_p, c_int32]),
    "ps_worker_run_use": (STATUS, [_worker_p, _program_p, _use_p, c_int32]),
    "ps_client_connect": (STATUS, [c_char_p, c_int32, c_uint64, _P(_client_p)]),
    "ps_client_free": (STATUS, [_client_p]),
    "ps_client_infer": (STATUS, [_client_p, c_char_p, _P(ps_tensor_desc), c_size_t, _P(_result_p)]),
    "ps_client_reserve_inputs": (STATUS, [_client_p, c_uint64]),
    "ps_client_get_stats": (STATUS, [_client_p, _P(ps_daemon_stats)]),
    "ps_result_count": (STATUS, [_result_p, _size_p]),
    "ps_result_tensor": (STATUS, [_result_p, c_size_t, _P(ps_tensor_view)]),
    "ps_result_timing": (STATUS, [_result_p, _P(ps_timing)]),
    "ps_result_free": (STATUS, [_result_p]),
    "ps_residency_new": (STATUS, [_arena_p, c_uint64, _P(_residency_p)]),
    "ps_residency_free": (STATUS, [_residency_p]),
    "ps_residency_acquire": (STATUS, [_residency_p, _store_p, c_char_p, _size_p, c_size_t, _P(_use_p)]),
    "ps_residency_get_stats": (STATUS, [_residency_p, _P(ps_residency_stats)]),
    "ps_residency_invalidate": (STATUS, [_residency_p, _store_p, c_char_p]),
    "ps_model_use_free": (STATUS, [_use_p]),
    "ps_model_use_offset": (STATUS, [_use_p, _u64_p, _i32_p]),
    "ps_model_use_wait_group": (STATUS, [_use_p, c_size_t, c_void_p]),
    "ps_model_use_group_of_layer": (STATUS, [_use_p, c_size_t, _size_p]),
    "ps_model_use_synchronize": (STATUS, [_use_p]),
    "ps_worker_synchronize": (STATUS, [_worker_p]),
    "ps_worker_read": (STATUS, [_worker_p, _program_p, c_char_p, c_void_p, c_size_t]),
    "ps_worker_layer_ms": (STATUS, [_worker_p, _program_p, _f64_p, c_size_t]),
    # version and driver
    "ps_version_number": (c_uint32, []),
    "ps_version_string": (c_char_p, []),
    "ps_driver_available": (c_int32, []),
    "ps_device_count": (STATUS, [_i32_p]),
    # workspace (the malloc/free pair has PyTorch's pluggable-allocator signatures)
    "ps_workspace_attach": (STATUS, [_arena_p]),
    "ps_workspace_detach": (STATUS, []),
    "ps_workspace_malloc": (c_void_p, [c_size_t, c_int32, c_void_p]),
    "ps_workspace_free": (None, [c_void_p, c_size_t, c_int32, c_void_p]),
    "ps_workspace_usage": (STATUS, [_u64_p, _u64_p]),
}

# ---------------------------------------------------------------------------
# Discovery and loading
# ---------------------------------------------------------------------------

LIB_FILE = "libpipeswitch.so"
ENV_VAR = "PIPESWITCH_LIB"

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# python/pipeswitch/_lib.py -> the repository root is two levels up.
_REPO_ROOT = os.path.dirname(os.path.dirname(_PACKAGE_DIR))

_lock = threading.Lock()
_lib = None
_lib_path = None


def candidates():
    """The places searched, in order: a list of ``(how, path_or_name)``."""
    out = []
    env = os.environ.get(ENV_VAR)
    if env:
        out.append((ENV_VAR, env))
    out.append(("package directory", os.path.join(_PACKAGE_DIR, LIB_FILE)))
    if os.path.exists(os.path.join(_REPO_ROOT, "Cargo.toml")):  # a source checkout
        out.append(("repository build", os.path.join(_REPO_ROOT, "target", "release", LIB_FILE)))
    found = ctypes.util.find_library("pipeswitch")
    out.append(('ctypes.util.find_library("pipeswitch")', found))
    return out


def _declare(cdll):
    def check(result, func, args):
        if result != PS_OK:
            msg = cdll.ps_last_error_message()
            raise errors.from_status(
                result, STATUS_NAMES.get(result, "PS_ERR_UNKNOWN"),
                msg.decode("utf-8", "replace") if msg else "")
        return result

    for name, (restype, argtypes) in SIGNATURES.items():
        f = getattr(cdll, name)  # AttributeError: the library lacks a header function
        f.argtypes = argtypes
        if restype == STATUS:
            f.restype = ps_status
            f.errcheck = check
        else:
            f.restype = restype


def _load():
    tried = []
    for how, path in candidates():
        if path is None:
            tried.append("%s: not found" % how)
            continue
        if how != ENV_VAR and os.sep in path and not os.path.exists(path):
            tried.append("%s: %s (no such file)" % (how, path))
            continue
        try:
            cdll = ctypes.CDLL(path)
        except OSError as e:
            if how == ENV_VAR:
                raise errors.LibraryNotFound(
                    "%s=%s does not load: %s" % (ENV_VAR, path, e)) from None
            tried.append("%s: %s (%s)" % (how, path, e))
            continue
        try:
            _declare(cdll)
        except AttributeError as e:
            raise errors.LibraryVersionMismatch(
                "%s (%s) lacks a function of the bindings' header: %s" % (path, how, e)) from None
        number = cdll.ps_version_number()
        major, minor = number // 1000000, number // 1000 % 1000
        if (major, minor) != (PS_VERSION_MAJOR, PS_VERSION_MINOR):
            raise errors.LibraryVersionMismatch(
                "%s (%s) is libpipeswitch %s (version number %d) but these bindings are for "
                "%d.%d.x (%d): rebuild the library or reinstall the package"
                % (path, how, cdll.ps_version_string().decode(), number,
                   PS_VERSION_MAJOR, PS_VERSION_MINOR, PS_VERSION_NUMBER))
        return cdll, path
    raise errors.LibraryNotFound(
        "libpipeswitch.so was not found. Install the package with `pip install ./python` (it builds "
        "and bundles the library), or build it (cargo build --release --lib) and set "
        "%s=/path/to/libpipeswitch.so (package directory: %s). Tried:\n  %s"
        % (ENV_VAR, _PACKAGE_DIR, "\n  ".join(tried)))


def lib():
    """The loaded library (a ``ctypes.CDLL`` with every function declared).

    Loads it on the first call; raises :class:`LibraryNotFound` or
    :class:`LibraryVersionMismatch` if that fails (and again on later calls).
    """
    global _lib, _lib_path
    if _lib is None:
        with _lock:
            if _lib is None:
                cdll, path = _load()
                _lib_path = path
                _lib = cdll
    return _lib


def library_path():
    """The path (or, from ``find_library``, the name) the library was loaded from."""
    lib()
    return _lib_path
