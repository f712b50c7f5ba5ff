"""Pythonic wrappers over the C API: :class:`Store`, :class:`Arena`,
:class:`Switch` and module functions. Failures raise
:class:`pipeswitch.PipeSwitchError` subclasses (see :mod:`pipeswitch.errors`).

Handles: each object owns one C handle, freed exactly once by ``close()``
(also by ``with`` and by garbage collection); ``close()`` again is a no-op,
and any other call on a closed object raises :class:`InvalidHandle`.
"""

import ctypes
import math
import os
from ctypes import byref, c_char, c_char_p, c_double, c_int32, c_size_t, c_uint64, c_void_p
from dataclasses import dataclass
from typing import List, Sequence, Tuple

from . import _lib as _c
from .errors import ArgumentError, InvalidHandle, NotFound, PipeSwitchError

__all__ = [
    "Store", "Arena", "Switch", "ModelInfo", "LayerInfo", "TensorInfo", "StoreUsage",
    "plan_groups", "plan_makespan", "plan_model", "measure_h2d", "driver_available",
    "device_count", "version", "version_number", "status_str", "last_error_message",
    "workspace_attach", "workspace_detach", "workspace_usage", "pluggable_allocator_args",
    "dtype_code", "dtype_name", "DTYPE_NAMES",
]

# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------

#: ``PS_DTYPE_*`` code -> its safetensors spelling.
DTYPE_NAMES = {
    _c.PS_DTYPE_BOOL: "BOOL", _c.PS_DTYPE_U8: "U8", _c.PS_DTYPE_I8: "I8",
    _c.PS_DTYPE_F8_E4M3: "F8_E4M3", _c.PS_DTYPE_F8_E5M2: "F8_E5M2",
    _c.PS_DTYPE_I16: "I16", _c.PS_DTYPE_U16: "U16", _c.PS_DTYPE_F16: "F16", _c.PS_DTYPE_BF16: "BF16",
    _c.PS_DTYPE_I32: "I32", _c.PS_DTYPE_U32: "U32", _c.PS_DTYPE_F32: "F32",
    _c.PS_DTYPE_I64: "I64", _c.PS_DTYPE_U64: "U64", _c.PS_DTYPE_F64: "F64",
}
_DTYPE_BY_NAME = {v: k for k, v in DTYPE_NAMES.items()}
_DTYPE_ALIASES = {
    "bool": "BOOL", "uint8": "U8", "int8": "I8",
    "float8_e4m3fn": "F8_E4M3", "float8_e4m3": "F8_E4M3", "float8_e5m2": "F8_E5M2",
    "int16": "I16", "short": "I16", "uint16": "U16", "float16": "F16", "half": "F16",
    "bfloat16": "BF16", "int32": "I32", "int": "I32", "uint32": "U32",
    "float32": "F32", "float": "F32", "int64": "I64", "long": "I64", "uint64": "U64",
    "float64": "F64", "double": "F64",
}


def dtype_code(dtype):
    """The ``PS_DTYPE_*`` code of ``dtype``: a code, a safetensors name ("F32",
    "BF16", "F8_E4M3"), a numpy/torch name ("float32", "bfloat16"), a numpy
    dtype, or a torch dtype (``torch.float16``)."""
    if isinstance(dtype, int) and not isinstance(dtype, bool):
        if dtype in DTYPE_NAMES:
            return dtype
    else:
        s = dtype.__name__ if isinstance(dtype, type) else str(dtype)  # np.float32 -> "float32"
        if s.startswith("torch."):
            s = s[len("torch."):]
        code = _DTYPE_BY_NAME.get(s.upper())
        if code is None:
            code = _DTYPE_BY_NAME.get(_DTYPE_ALIASES.get(s.lower(), ""))
        if code is not None:
            return code
    raise ArgumentError(_c.PS_ERR_INVALID_ARGUMENT, "PS_ERR_INVALID_ARGUMENT",
                        "unknown dtype %r (use one of %s)" % (dtype, ", ".join(_DTYPE_BY_NAME)))


def dtype_name(code):
    """The safetensors spelling of a ``PS_DTYPE_*`` code (``"F32"``)."""
    return DTYPE_NAMES.get(code, "DTYPE_%d" % code)


def _enc(s, what="name"):
    """A str (or bytes, or os.PathLike for paths) as NUL-free bytes."""
    if isinstance(s, os.PathLike):
        b = os.fsencode(s)
    elif isinstance(s, bytes):
        b = s
    elif isinstance(s, str):
        b = s.encode("utf-8")
    else:
        raise TypeError("%s must be a str, not %s" % (what, type(s).__name__))
    if b"\0" in b:
        raise ArgumentError(_c.PS_ERR_INVALID_ARGUMENT, "PS_ERR_INVALID_ARGUMENT",
                            "%s %r contains a NUL character" % (what, s))
    return b


def _closed(kind, what):
    return InvalidHandle(_c.PS_ERR_INVALID_HANDLE, "PS_ERR_INVALID_HANDLE",
                         "%s %s is closed" % (kind, what))


def _doubles(values, what):
    vals = [float(v) for v in values]
    return (c_double * max(len(vals), 1))(*vals), len(vals)


def _with_name_buffer(call, size=256):
    """Runs ``call(buf, capacity)``, growing ``buf`` while the library says it
    is too small; returns the NUL-terminated string it wrote."""
    while True:
        buf = ctypes.create_string_buffer(size)
        try:
            call(buf, size)
            return buf.value.decode("utf-8", "replace")
        except PipeSwitchError as e:
            if e.status != _c.PS_ERR_BUFFER_TOO_SMALL or size >= (1 << 24):
                raise
            size *= 16


# --- borrowing host buffers without copying -------------------------------

class _Py_buffer(ctypes.Structure):
    _fields_ = [
        ("buf", c_void_p),
        ("obj", c_void_p),  # a PyObject*, managed by PyBuffer_Release, not by ctypes
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", c_char_p),
        ("shape", ctypes.POINTER(ctypes.c_ssize_t)),
        ("strides", ctypes.POINTER(ctypes.c_ssize_t)),
        ("suboffsets", ctypes.POINTER(ctypes.c_ssize_t)),
        ("internal", c_void_p),
    ]


_PyBUF_WRITABLE = 0x0001
_PyBUF_C_CONTIGUOUS = 0x0038
try:
    _get_buffer = ctypes.pythonapi.PyObject_GetBuffer
    _get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_Py_buffer), ctypes.c_int]
    _get_buffer.restype = ctypes.c_int
    _release_buffer = ctypes.pythonapi.PyBuffer_Release
    _release_buffer.argtypes = [ctypes.POINTER(_Py_buffer)]
    _release_buffer.restype = None
except AttributeError:  # not CPython: copy instead
    _get_buffer = None


def _is_torch_tensor(obj):
    t = type(obj)
    return t.__module__.startswith("torch") and hasattr(obj, "data_ptr") and hasattr(obj, "element_size")


class _Borrowed:
    """The address and size of a host buffer, valid until :meth:`release`.

    Accepts anything with the buffer protocol (bytes, bytearray, memoryview,
    array.array, numpy arrays) and torch CPU tensors. C-contiguous buffers are
    borrowed in place (no copy); others are copied once into C order.
    """

    __slots__ = ("ptr", "nbytes", "_view", "_keep")

    def __init__(self, obj, writable=False):
        self._view = None
        self._keep = None
        if _is_torch_tensor(obj):
            t = obj.detach()
            if t.device.type != "cpu":
                raise ValueError("a tensor buffer must be on the CPU, not %s" % t.device)
            if writable and not t.is_contiguous():
                raise ValueError("the output tensor must be contiguous")
            t = t.contiguous()
            self._keep = t
            self.ptr = t.data_ptr()
            self.nbytes = t.numel() * t.element_size()
            return
        if _get_buffer is not None:
            view = _Py_buffer()
            flags = _PyBUF_C_CONTIGUOUS | (_PyBUF_WRITABLE if writable else 0)
            try:
                _get_buffer(obj, byref(view), flags)
            except (BufferError, ValueError):  # numpy raises ValueError
                if writable:
                    raise ValueError("the output buffer must be writable and C-contiguous") from None
                # Not C-contiguous: one copy, in C order.
                obj = memoryview(obj).tobytes()
                _get_buffer(obj, byref(view), flags)
            self._view = view
            self.ptr = view.buf or 0
            self.nbytes = view.len
            return
        # Non-CPython fallback.
        mv = memoryview(obj)
        if writable:
            arr = (c_char * mv.nbytes).from_buffer(mv.cast("B"))
            self._keep = (mv, arr)
            self.ptr = ctypes.addressof(arr)
        else:
            data = mv.tobytes()
            self._keep = data
            self.ptr = ctypes.cast(c_char_p(data), c_void_p).value or 0
        self.nbytes = mv.nbytes

    def release(self):
        if self._view is not None:
            _release_buffer(byref(self._view))
            self._view = None
        self._keep = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def __del__(self):
        try:
            self.release()
        except Exception:
            pass


# ---------------------------------------------------------------------------
# Info records
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorInfo:
    """A stored tensor. After a switch its device address is the region's
    base + ``offset``."""
    index: int
    name: str
    dtype: str  # safetensors spelling, e.g. "F32"
    shape: Tuple[int, ...]
    offset: int  # from the model's first byte
    bytes: int
    layer: int  # index of its layer


@dataclass(frozen=True)
class LayerInfo:
    """A stored layer: bytes ``[offset, offset + bytes)`` of the model."""
    index: int
    name: str
    offset: int
    bytes: int
    exec_ms: float  # NaN until measured (Store.set_layer_exec_ms)
    first_tensor: int
    n_tensors: int
    tensors: Tuple[str, ...]  # names of its tensors, in order


@dataclass(frozen=True)
class ModelInfo:
    """A stored model: its total size (what an arena region for it must hold),
    its layers in execution order and its tensors in model order."""
    name: str
    id: int
    bytes: int
    layers: Tuple[LayerInfo, ...]
    tensors: Tuple[TensorInfo, ...]

    @property
    def exec_ms(self) -> List[float]:
        return [layer.exec_ms for layer in self.layers]

    @property
    def measured(self) -> bool:
        """True when every layer has an execution time (the model can be planned)."""
        return all(not math.isnan(x) for x in self.exec_ms)

    def tensor(self, name) -> TensorInfo:
        """The tensor called ``name`` (KeyError if none)."""
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError("model %r has no tensor %r" % (self.name, name))


@dataclass(frozen=True)
class StoreUsage:
    capacity_bytes: int
    used_bytes: int
    largest_free_bytes: int
    models: int
    max_models: int


# ---------------------------------------------------------------------------
# Store
# ---------------------------------------------------------------------------

class _Owned:
    """An object that owns one C handle (``_h``) and frees it once with the
    library's ``_FREE`` function: by :meth:`close`, at the end of a ``with``
    block, or when it is collected."""

    _h = None
    _FREE = None

    @property
    def closed(self):
        return self._h is None

    def close(self):
        """Frees the handle (once; later calls do nothing)."""
        h, self._h = self._h, None
        if h is not None:
            getattr(_c.lib(), self._FREE)(h)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class Store(_Owned):
    """An open host model store (shared memory, see ``ps_store_*``). Thread-safe.

    Make one with :meth:`create` or :meth:`open`; close it with :meth:`close`
    or a ``with`` block. The store's contents outlive the handle until
    :meth:`unlink` removes its name.
    """

    _FREE = "ps_store_free"

    def __init__(self, handle, name):
        """Private: use :meth:`create` or :meth:`open`."""
        self._h = handle
        self.name = name

    @classmethod
    def create(cls, name, capacity_bytes, max_models=0):
        """Creates the store ``name`` with room for ``capacity_bytes`` of model
        data and ``max_models`` models (0: the library's default, 256).
        Raises :class:`AlreadyExists` if it exists, :class:`StoreFull` if
        shared memory is short."""
        h = ctypes.POINTER(_c.ps_store)()
        _c.lib().ps_store_create(_enc(name, "store name"), int(capacity_bytes), int(max_models), byref(h))
        return cls(h, name)

    @classmethod
    def open(cls, name):
        """Opens an existing store (from any process); :class:`NotFound` if none."""
        h = ctypes.POINTER(_c.ps_store)()
        _c.lib().ps_store_open(_enc(name, "store name"), byref(h))
        return cls(h, name)

    @staticmethod
    def unlink(name):
        """Removes the store's name; open handles keep working until closed."""
        _c.lib().ps_store_unlink(_enc(name, "store name"))

    # -- handle ------------------------------------------------------------
    def _handle(self):
        h = self._h
        if h is None:
            raise _closed("Store", repr(self.name))
        return h

    def __repr__(self):
        return "<pipeswitch.Store %r%s>" % (self.name, " closed" if self._h is None else "")

    # -- models ------------------------------------------------------------
    def add_model(self, name, layers):
        """Adds model ``name``. ``layers`` is a sequence of
        ``(layer_name, [(tensor_name, dtype, shape, buffer), ...])`` in
        execution order; ``dtype`` as for :func:`dtype_code`; ``buffer`` holds
        exactly the tensor's bytes (C order) and may be anything with the
        buffer protocol (bytes, bytearray, memoryview, array.array, numpy
        array) or a torch CPU tensor. Contiguous buffers are read in place;
        every byte is copied into the store during the call. On failure the
        store is unchanged."""
        h = self._handle()
        layer_list = list(layers)
        tensor_specs = []
        layer_descs = (_c.ps_layer_desc * max(len(layer_list), 1))()
        keep = []  # encoded names and shape arrays, alive until the call returns
        for i, item in enumerate(layer_list):
            lname, tensors = item
            tensors = list(tensors)
            lb = _enc(lname, "layer name")
            keep.append(lb)
            layer_descs[i].name = lb
            layer_descs[i].n_tensors = len(tensors)
            tensor_specs.extend(tensors)
        tensor_descs = (_c.ps_tensor_desc * max(len(tensor_specs), 1))()
        borrowed = []
        try:
            for i, spec in enumerate(tensor_specs):
                tname, dtype, shape, buf = spec
                tb = _enc(tname, "tensor name")
                shape = [int(d) for d in shape]
                shp = (c_uint64 * max(len(shape), 1))(*shape)
                b = _Borrowed(buf)
                borrowed.append(b)
                keep.extend((tb, shp))
                d = tensor_descs[i]
                d.name = tb
                d.dtype = dtype_code(dtype)
                d.ndim = len(shape)
                d.shape = ctypes.cast(shp, ctypes.POINTER(c_uint64))
                d.data = b.ptr
                d.bytes = b.nbytes
            _c.lib().ps_store_add_model(h, _enc(name, "model name"), layer_descs, len(layer_list),
                                        tensor_descs, len(tensor_specs))
        finally:
            for b in borrowed:
                b.release()

    def add_safetensors(self, name, path, layers=None):
        """Adds the model in a safetensors file. ``layers``: layer names in
        execution order (each tensor joins the longest listed dot-separated
        prefix of its name); None: the file's ``pipeswitch.layers`` metadata,
        else the tensor-name prefixes in data order. A malformed file raises
        :class:`FormatError`."""
        h = self._handle()
        names = [_enc(x, "layer name") for x in (layers or [])]
        arr = (c_char_p * max(len(names), 1))(*names)
        _c.lib().ps_store_add_safetensors(h, _enc(name, "model name"), _enc(path, "path"),
                                          arr if names else None, len(names))

    def remove_model(self, name):
        """Removes model ``name`` (:class:`NotFound` if absent)."""
        _c.lib().ps_store_remove_model(self._handle(), _enc(name, "model name"))

    def models(self) -> List[str]:
        """The names of the stored models (table order)."""
        h = self._handle()
        L = _c.lib()
        n = c_size_t()
        L.ps_store_model_count(h, byref(n))
        names = []
        for i in range(n.value):
            try:
                names.append(_with_name_buffer(
                    lambda buf, cap, i=i: L.ps_store_model_name(h, i, buf, cap, None)))
            except NotFound:  # removed meanwhile by another process
                break
        return names

    def __contains__(self, name):
        try:
            self._model_header(name)
            return True
        except NotFound:
            return False

    def _model_header(self, name):
        info = _c.ps_model_info()
        _c.lib().ps_store_model_info(self._handle(), _enc(name, "model name"), byref(info))
        return info

    def model_id(self, name) -> int:
        """The id of model ``name`` (new for every add, also under a reused
        name): a cheap check that a model is still the one a
        :meth:`model_info` describes."""
        return int(self._model_header(name).id)

    def model_info(self, name) -> ModelInfo:
        """Everything about model ``name``: see :class:`ModelInfo`."""
        h = self._handle()
        L = _c.lib()
        mb = _enc(name, "model name")
        head = self._model_header(name)
        tensors = []
        for i in range(head.n_tensors):
            ti = _c.ps_tensor_info()
            tname = _with_name_buffer(lambda buf, cap: L.ps_store_tensor_info(h, mb, i, byref(ti), buf, cap))
            tensors.append(TensorInfo(
                index=i, name=tname, dtype=dtype_name(ti.dtype),
                shape=tuple(int(ti.shape[d]) for d in range(ti.ndim)),
                offset=int(ti.offset), bytes=int(ti.bytes), layer=int(ti.layer)))
        layers = []
        for i in range(head.n_layers):
            li = _c.ps_layer_info()
            lname = _with_name_buffer(lambda buf, cap: L.ps_store_layer_info(h, mb, i, byref(li), buf, cap))
            first, n = int(li.first_tensor), int(li.n_tensors)
            layers.append(LayerInfo(
                index=i, name=lname, offset=int(li.offset), bytes=int(li.bytes),
                exec_ms=float(li.exec_ms), first_tensor=first, n_tensors=n,
                tensors=tuple(t.name for t in tensors[first:first + n])))
        return ModelInfo(name=name, id=int(head.id), bytes=int(head.bytes),
                         layers=tuple(layers), tensors=tuple(tensors))

    def tensor_index(self, model, tensor_name) -> int:
        """Index (model order) of the tensor called ``tensor_name``."""
        out = c_size_t()
        _c.lib().ps_store_tensor_index(self._handle(), _enc(model, "model name"),
                                       _enc(tensor_name, "tensor name"), byref(out))
        return out.value

    def group_ranges(self, name, group_starts) -> List[Tuple[int, int]]:
        """The bytes ``[start, end)`` of each layer group of the plan
        ``group_starts`` of model ``name``, relative to the model's first
        byte, as :meth:`Switch.start` copies them (contiguous, in order; the
        plan is checked as a switch checks it)."""
        arr, n = _size_array(group_starts)
        starts, ends = (c_uint64 * max(n, 1))(), (c_uint64 * max(n, 1))()
        _c.lib().ps_store_group_ranges(self._handle(), _enc(name, "model name"), arr, n, starts, ends)
        return [(int(starts[g]), int(ends[g])) for g in range(n)]

    def copy_schedule(self, name, group_starts, min_chunk=4 << 20, max_chunk=64 << 20):
        """The copies :meth:`Switch.start` makes for the plan
        ``group_starts`` of model ``name`` with this chunking (see
        :meth:`Switch.set_chunking`): ``(copies, group_copy)``, ``copies``
        the bytes ``[start, end)`` of each copy relative to the model's
        first byte, in order (consecutive small groups share a copy, large
        ones are split; a copy may be empty), and ``group_copy[g]`` the
        copy after which group ``g`` has arrived."""
        arr, n = _size_array(group_starts)
        cap = n + self._model_header(name).bytes // max(int(max_chunk), 1) + 1
        ranges, group_copy, count = (c_uint64 * (2 * cap))(), (c_size_t * max(n, 1))(), c_size_t()
        _c.lib().ps_store_copy_schedule(self._handle(), _enc(name, "model name"), arr, n, int(min_chunk),
                                        int(max_chunk), ranges, cap, byref(count), group_copy)
        copies = [(int(ranges[2 * i]), int(ranges[2 * i + 1])) for i in range(count.value)]
        return copies, [int(group_copy[g]) for g in range(n)]

    def model_host_ptr(self, name) -> int:
        """Address of model ``name``'s first byte in this process's mapping
        of the store (page-locked once :meth:`pin` ran). Not a lease: the
        bytes there are the model's only while it stays stored, so check
        :meth:`model_id` before each use."""
        out = c_uint64()
        _c.lib().ps_store_model_host_ptr(self._handle(), _enc(name, "model name"), byref(out))
        return out.value

    def lease(self, name) -> "ModelLease":
        """Leases model ``name``: while the lease lives (until its
        :meth:`ModelLease.release`), the model's bytes stay where they are in
        every process, even if the model is removed meanwhile. For copies
        made from :attr:`ModelLease.host_ptr` outside the library (e.g. a
        CUDA graph's): release it once they have completed."""
        return ModelLease(self, name)

    def set_layer_exec_ms(self, name, exec_ms: Sequence[float]):
        """Stores measured per-layer execution times (ms, one per layer) with
        the model, for :func:`plan_model`."""
        arr, n = _doubles(exec_ms, "exec_ms")
        _c.lib().ps_store_set_layer_exec_ms(self._handle(), _enc(name, "model name"), arr, n)

    def set_cost(self, name, record: "CostRecord"):
        """Keeps a :class:`CostRecord` (fitted cost model, predicted and
        measured) with model ``name``, readable by every process."""
        r = record._c()
        _c.lib().ps_store_set_cost(self._handle(), _enc(name, "model name"), byref(r))

    def get_cost(self, name):
        """The :class:`CostRecord` kept with model ``name``, or None."""
        r = _c.ps_cost_record()
        has = ctypes.c_uint32()
        _c.lib().ps_store_get_cost(self._handle(), _enc(name, "model name"), byref(r), byref(has))
        return CostRecord._from_c(r) if has.value else None

    def usage(self) -> StoreUsage:
        u = _c.ps_store_usage()
        _c.lib().ps_store_get_usage(self._handle(), byref(u))
        return StoreUsage(int(u.capacity_bytes), int(u.used_bytes), int(u.largest_free_bytes),
                          int(u.models), int(u.max_models))

    def read(self, name, offset, nbytes) -> bytes:
        """``nbytes`` bytes of model ``name``'s data from byte ``offset``."""
        nbytes = int(nbytes)
        buf = (c_char * max(nbytes, 1))()
        _c.lib().ps_store_read(self._handle(), _enc(name, "model name"), int(offset), buf, nbytes)
        return buf.raw[:nbytes]

    def read_into(self, name, offset, out):
        """Fills the writable, C-contiguous buffer ``out`` (bytearray, numpy
        array, CPU tensor, ...) from model ``name`` at byte ``offset``."""
        with _Borrowed(out, writable=True) as b:
            _c.lib().ps_store_read(self._handle(), _enc(name, "model name"), int(offset),
                                   b.ptr or None, b.nbytes)

    def pin(self, device=0):
        """Page-locks the store for this process now (else the first switch does)."""
        _c.lib().ps_store_pin(self._handle(), int(device))


# ---------------------------------------------------------------------------
# Arena
# ---------------------------------------------------------------------------

class ModelLease(_Owned):
    """A lease on a stored model (:meth:`Store.lease`): ``model_id`` and
    ``host_ptr`` (its first byte in this process's mapping of the store) are
    the model's until :meth:`release`."""

    _FREE = "ps_model_lease_free"

    def __init__(self, store, name):
        h = ctypes.POINTER(_c.ps_model_lease)()
        mid, ptr = c_uint64(), c_uint64()
        _c.lib().ps_store_lease(store._handle(), _enc(name, "model name"), byref(mid), byref(ptr), byref(h))
        self._h = h
        self.name = name
        self.model_id = mid.value
        self.host_ptr = ptr.value

    @property
    def released(self):
        return self._h is None

    def release(self):
        """Ends the lease (once); call it after the copies from the leased
        bytes have completed."""
        self.close()

    def __repr__(self):
        return "ModelLease(%r, id %d%s)" % (self.name, self.model_id, ", released" if self.released else "")


class Arena(_Owned):
    """A device arena: one device allocation holding model regions and, at its
    end, the workspace. Thread-safe. :meth:`create` one, or :meth:`import_`
    one that another process exported. :meth:`close` frees the handle; the
    memory goes once no switch uses it."""

    _FREE = "ps_arena_free"
    IPC_HANDLE_BYTES = 128

    def __init__(self, handle, device=None):
        """Private: use :meth:`create` or :meth:`import_`."""
        self._h = handle
        #: The device ordinal (None for an imported arena whose device was not given).
        self.device = device

    @classmethod
    def create(cls, device, nbytes, workspace_bytes=0):
        """Allocates ``nbytes`` on ``device``, the last ``workspace_bytes`` of
        it reserved as the workspace (sizes round up to 2 MiB)."""
        h = ctypes.POINTER(_c.ps_arena)()
        _c.lib().ps_arena_create(int(device), int(nbytes), int(workspace_bytes), byref(h))
        return cls(h, int(device))

    @classmethod
    def import_(cls, handle, device=None):
        """Imports an arena from the 128 bytes of another process's :meth:`export`.
        ``device`` is only recorded (for :class:`pipeswitch.torch.Worker`)."""
        data = bytes(handle)
        if len(data) != cls.IPC_HANDLE_BYTES:
            raise ArgumentError(_c.PS_ERR_INVALID_ARGUMENT, "PS_ERR_INVALID_ARGUMENT",
                                "an arena IPC handle has 128 bytes, not %d" % len(data))
        ipc = _c.ps_arena_ipc_handle()
        ctypes.memmove(ipc.bytes, data, len(data))
        h = ctypes.POINTER(_c.ps_arena)()
        _c.lib().ps_arena_import(byref(ipc), byref(h))
        return cls(h, device)

    def _handle(self):
        h = self._h
        if h is None:
            raise _closed("Arena", "on device %s" % self.device)
        return h

    def alloc(self, nbytes) -> int:
        """Reserves a model region of ``nbytes`` (256-aligned); returns its offset."""
        out = c_uint64()
        _c.lib().ps_arena_alloc(self._handle(), int(nbytes), byref(out))
        return out.value

    def release(self, offset):
        """Releases the region that starts at ``offset``."""
        _c.lib().ps_arena_release(self._handle(), int(offset))

    def _base_size(self):
        base, size = c_uint64(), c_uint64()
        _c.lib().ps_arena_base(self._handle(), byref(base), byref(size))
        return base.value, size.value

    def base(self) -> int:
        """The arena's device base address (a CUdeviceptr)."""
        return self._base_size()[0]

    def size(self) -> int:
        """The arena's size in bytes (workspace included)."""
        return self._base_size()[1]

    def workspace(self) -> Tuple[int, int]:
        """The workspace region: (offset from the base, bytes)."""
        off, n = c_uint64(), c_uint64()
        _c.lib().ps_arena_workspace(self._handle(), byref(off), byref(n))
        return off.value, n.value

    def export(self) -> bytes:
        """The 128-byte CUDA IPC handle for :meth:`import_` in another process."""
        ipc = _c.ps_arena_ipc_handle()
        _c.lib().ps_arena_export(self._handle(), byref(ipc))
        return bytes(ipc.bytes)

    def read(self, offset, nbytes) -> bytes:
        """``nbytes`` bytes of the arena at ``offset`` (synchronous copy)."""
        nbytes = int(nbytes)
        buf = (c_char * max(nbytes, 1))()
        _c.lib().ps_arena_read(self._handle(), int(offset), buf, nbytes)
        return buf.raw[:nbytes]

    def write(self, offset, data):
        """Copies the host buffer ``data`` into the arena at ``offset`` (synchronous)."""
        with _Borrowed(data) as b:
            _c.lib().ps_arena_write(self._handle(), int(offset), b.ptr or None, b.nbytes)


# ---------------------------------------------------------------------------
# Switch
# ---------------------------------------------------------------------------

def _size_array(values):
    vals = [int(v) for v in values]
    return (c_size_t * max(len(vals), 1))(*vals), len(vals)


class Switch(_Owned):
    """A switch engine for one device: a copy stream and one event per layer
    group, reused by every switch. Use it from one thread at a time.
    :meth:`close` waits for the last switch's copies, then frees it."""

    _FREE = "ps_switch_free"

    def __init__(self, device=0):
        h = ctypes.POINTER(_c.ps_switch)()
        L = _c.lib()
        L.ps_switch_new(int(device), byref(h))
        self._h = h
        self.device = int(device)
        self._wait = L.ps_switch_wait_group

    def _handle(self):
        h = self._h
        if h is None:
            raise _closed("Switch", "on device %d" % self.device)
        return h

    def set_chunking(self, min_chunk, max_chunk):
        """Consecutive groups share a copy until it holds ``min_chunk`` bytes;
        no copy exceeds ``max_chunk`` (defaults 4 MiB, 64 MiB)."""
        _c.lib().ps_switch_set_chunking(self._handle(), int(min_chunk), int(max_chunk))

    def start(self, store, model, arena, offset, group_starts):
        """Starts the pipelined copy of ``model`` from ``store`` into ``arena``
        at region ``offset`` in the groups that start at ``group_starts`` (the
        first is 0; e.g. from :func:`plan_model`). Returns once enqueued."""
        arr, n = _size_array(group_starts)
        _c.lib().ps_switch_start(self._handle(), store._handle(), _enc(model, "model name"),
                                 arena._handle(), int(offset), arr, n)

    def start_whole(self, store, model, arena, offset):
        """Starts a one-copy, one-group transfer (the transfer-then-run baseline)."""
        _c.lib().ps_switch_start_whole(self._handle(), store._handle(), _enc(model, "model name"),
                                       arena._handle(), int(offset))

    def start_resident(self, store, model, arena, offset):
        """Attaches ``model`` whose bytes are already at ``offset`` (resident):
        no copy, one group that is complete at once."""
        _c.lib().ps_switch_start_resident(self._handle(), store._handle(), _enc(model, "model name"),
                                          arena._handle(), int(offset))

    def wait_group(self, group, stream=0):
        """Makes ``stream`` wait on the GPU for group ``group`` of the last
        switch; the host does not block. ``stream``: an int CUstream handle of
        this device's primary context (e.g.
        ``torch.cuda.current_stream().cuda_stream``), or 0 for the legacy
        default stream."""
        h = self._h
        if h is None:
            raise _closed("Switch", "on device %d" % self.device)
        self._wait(h, group, stream or None)

    def group_of_layer(self, layer) -> int:
        out = c_size_t()
        _c.lib().ps_switch_group_of_layer(self._handle(), int(layer), byref(out))
        return out.value

    def n_groups(self) -> int:
        out = c_size_t()
        _c.lib().ps_switch_n_groups(self._handle(), byref(out))
        return out.value

    def group_ready(self, group) -> bool:
        """Whether group ``group`` has arrived (non-blocking)."""
        out = c_int32()
        _c.lib().ps_switch_group_ready(self._handle(), int(group), byref(out))
        return bool(out.value)

    def host_model_ptr(self) -> int:
        """Address at which kernels read the last switch's model straight
        from the store's pinned pages over PCIe (a tensor is at this address
        plus its offset): for the few rows of an embedding table that has
        not arrived yet."""
        out = c_uint64()
        _c.lib().ps_switch_host_model_ptr(self._handle(), byref(out))
        return out.value

    def tensor_ptr(self, tensor) -> int:
        """Device address of a tensor of the last switch's model, by index
        (model order) or by name."""
        out = c_uint64()
        if isinstance(tensor, (str, bytes)):
            _c.lib().ps_switch_tensor_ptr_by_name(self._handle(), _enc(tensor, "tensor name"), byref(out))
        else:
            _c.lib().ps_switch_tensor_ptr(self._handle(), int(tensor), byref(out))
        return out.value

    def synchronize(self):
        """Blocks until the whole model has arrived."""
        _c.lib().ps_switch_synchronize(self._handle())

    def elapsed_ms(self) -> float:
        """GPU time of the last switch's copies in ms (waits for them)."""
        out = c_double()
        _c.lib().ps_switch_elapsed_ms(self._handle(), byref(out))
        return out.value

    def copy_stream(self) -> int:
        """The engine's copy stream (a CUstream handle, as an int)."""
        out = c_void_p()
        _c.lib().ps_switch_copy_stream(self._handle(), byref(out))
        return out.value or 0


# ---------------------------------------------------------------------------
# Planner, measurement, version, workspace
# ---------------------------------------------------------------------------

def _plan_out(n):
    return (c_size_t * max(n, 1))(), c_size_t(), c_double()


def plan_groups(transfer_ms, exec_ms, a=0.0, b=0.0) -> Tuple[List[int], float]:
    """The optimal layer grouping under PipeSwitch's cost model (see
    ``ps_plan_groups``): per-layer transfer and execution times in ms, ``a``
    the per-group transfer overhead and ``b`` the per-group execution
    overhead. Returns (group starts, makespan ms). NaN, infinite or negative
    inputs raise :class:`ArgumentError`."""
    t, n = _doubles(transfer_ms, "transfer_ms")
    x, m = _doubles(exec_ms, "exec_ms")
    if n != m:
        raise ArgumentError(_c.PS_ERR_INVALID_ARGUMENT, "PS_ERR_INVALID_ARGUMENT",
                            "transfer_ms has %d values but exec_ms has %d" % (n, m))
    starts, ng, mk = _plan_out(n)
    _c.lib().ps_plan_groups(t, x, n, float(a), float(b), starts, len(starts), byref(ng), byref(mk))
    return list(starts[:ng.value]), mk.value


def plan_makespan(transfer_ms, exec_ms, group_starts, a=0.0, b=0.0) -> float:
    """The makespan (ms) of the plan ``group_starts`` under the same cost model."""
    t, n = _doubles(transfer_ms, "transfer_ms")
    x, m = _doubles(exec_ms, "exec_ms")
    if n != m:
        raise ArgumentError(_c.PS_ERR_INVALID_ARGUMENT, "PS_ERR_INVALID_ARGUMENT",
                            "transfer_ms has %d values but exec_ms has %d" % (n, m))
    s, k = _size_array(group_starts)
    out = c_double()
    _c.lib().ps_plan_makespan(t, x, n, float(a), float(b), s, k, byref(out))
    return out.value


def plan_model(store, model, bandwidth_gbps, a=0.0, b=0.0) -> Tuple[List[int], float]:
    """Plans stored ``model``: transfer times from its layer sizes over
    ``bandwidth_gbps`` (GB/s, e.g. from :func:`measure_h2d`), execution times
    stored with it (:class:`StateError` if a layer has none). Returns
    (group starts, makespan ms)."""
    n = store._model_header(model).n_layers
    starts, ng, mk = _plan_out(n)
    _c.lib().ps_plan_model(store._handle(), _enc(model, "model name"), float(bandwidth_gbps), float(a),
                           float(b), starts, len(starts), byref(ng), byref(mk))
    return list(starts[:ng.value]), mk.value


def measure_h2d(device=0, nbytes=64 << 20) -> Tuple[float, float]:
    """Measures pinned host-to-device copies on ``device``: (bandwidth GB/s,
    per-copy overhead ms), the planner's bandwidth and ``a``. About a second."""
    bw, a = c_double(), c_double()
    _c.lib().ps_measure_h2d(int(device), int(nbytes), byref(bw), byref(a))
    return bw.value, a.value


def driver_available() -> bool:
    """True if a CUDA driver loads and initialises (never raises)."""
    return bool(_c.lib().ps_driver_available())


def device_count() -> int:
    """Number of CUDA devices (:class:`NoDriver` without a driver)."""
    out = c_int32()
    _c.lib().ps_device_count(byref(out))
    return out.value


def version() -> str:
    """The library's version, "major.minor.patch"."""
    return _c.lib().ps_version_string().decode()


def version_number() -> int:
    """The library's version as major * 1000000 + minor * 1000 + patch."""
    return int(_c.lib().ps_version_number())


def status_str(status) -> str:
    """The library's description of a status code."""
    return _c.lib().ps_status_str(int(status)).decode()


def last_error_message() -> str:
    """The message of this thread's last failed call ("" if none)."""
    return (_c.lib().ps_last_error_message() or b"").decode("utf-8", "replace")


def workspace_attach(arena):
    """Serves workspace allocations (``ps_workspace_malloc``) from ``arena``'s
    workspace region, process-wide."""
    _c.lib().ps_workspace_attach(arena._handle())


def workspace_detach():
    """Detaches the workspace (no allocation may be live)."""
    _c.lib().ps_workspace_detach()


def workspace_usage() -> Tuple[int, int]:
    """(bytes in use, largest free piece) of the workspace; :class:`StateError`
    if no arena is attached."""
    used, free = c_uint64(), c_uint64()
    _c.lib().ps_workspace_usage(byref(used), byref(free))
    return used.value, free.value


def pluggable_allocator_args() -> Tuple[str, str, str]:
    """The arguments of ``torch.cuda.memory.CUDAPluggableAllocator`` that
    route PyTorch's allocations to the workspace: (library path,
    "ps_workspace_malloc", "ps_workspace_free"). The path is the library
    this process loaded, so PyTorch's dlopen gets the same instance (and the
    workspace that :func:`workspace_attach` attached)."""
    return _c.library_path(), "ps_workspace_malloc", "ps_workspace_free"


# ---------------------------------------------------------------------------
# The fitted cost model (issue 15)
# ---------------------------------------------------------------------------

_COST_FIELDS = ("transfer_overhead_ms", "exec_overhead_ms", "first_kernel_ms", "exec_scale", "copy_slowdown",
                "floor_ms", "floor_per_group_ms")


@dataclass(frozen=True)
class CostModel:
    """The terms of the extended cost model (``ps_cost_model``): per-group
    transfer overhead ``a`` and execution overhead ``b``, the first kernel's
    latency ``L``, the execution scale ``κ``, the slowdown of kernels while
    copies run ``σ``, and the floor ``R + h·K`` (ms). The defaults with ``a``
    and ``b`` are the two-overhead model of :func:`plan_groups`."""
    transfer_overhead_ms: float = 0.0
    exec_overhead_ms: float = 0.0
    first_kernel_ms: float = 0.0
    exec_scale: float = 1.0
    copy_slowdown: float = 0.0
    floor_ms: float = 0.0
    floor_per_group_ms: float = 0.0

    def _c(self):
        return _c.ps_cost_model(*[float(getattr(self, f)) for f in _COST_FIELDS])

    @classmethod
    def _from_c(cls, c):
        return cls(*[float(getattr(c, f)) for f in _COST_FIELDS])


@dataclass(frozen=True)
class CostRecord:
    """A fitted cost model and the predicted and measured switch + first run
    (ms) of the plan chosen with it, as kept with a model in the store."""
    model: CostModel
    bandwidth_gbps: float
    predicted_ms: float
    measured_ms: float
    groups: int
    rounds: int
    fit_rms_rel_error: float
    unix_s: int = 0

    def _c(self):
        return _c.ps_cost_record(self.model._c(), float(self.bandwidth_gbps), float(self.predicted_ms),
                                 float(self.measured_ms), int(self.groups), int(self.rounds),
                                 float(self.fit_rms_rel_error), int(self.unix_s))

    @classmethod
    def _from_c(cls, r):
        return cls(CostModel._from_c(r.model), float(r.bandwidth_gbps), float(r.predicted_ms),
                   float(r.measured_ms), int(r.groups), int(r.rounds), float(r.fit_rms_rel_error), int(r.unix_s))


def _times(transfer_ms, exec_ms):
    t, n = _doubles(transfer_ms, "transfer_ms")
    x, m = _doubles(exec_ms, "exec_ms")
    if n != m:
        raise ArgumentError(_c.PS_ERR_INVALID_ARGUMENT, "PS_ERR_INVALID_ARGUMENT",
                            "transfer_ms has %d values but exec_ms has %d" % (n, m))
    return t, x, n


def plan_groups_cost(transfer_ms, exec_ms, model: CostModel) -> Tuple[List[int], float]:
    """The optimal grouping under the extended cost model ``model``
    (``ps_plan_groups_cost``; exact). Returns (group starts, makespan ms)."""
    t, x, n = _times(transfer_ms, exec_ms)
    starts, ng, mk = _plan_out(n)
    cm = model._c()
    _c.lib().ps_plan_groups_cost(t, x, n, byref(cm), starts, len(starts), byref(ng), byref(mk))
    return list(starts[:ng.value]), mk.value


def plan_makespan_cost(transfer_ms, exec_ms, group_starts, model: CostModel) -> float:
    """The makespan (ms) of ``group_starts`` under the extended cost model."""
    t, x, n = _times(transfer_ms, exec_ms)
    s, k = _size_array(group_starts)
    out = c_double()
    cm = model._c()
    _c.lib().ps_plan_makespan_cost(t, x, n, byref(cm), s, k, byref(out))
    return out.value


def plan_closed_loop(transfer_ms, exec_ms, measure, base: CostModel = None, extra_plans=(), max_rounds=4,
                     tolerance=0.03) -> Tuple[List[int], CostRecord]:
    """Closed-loop planning (``ps_plan_closed_loop``): ``measure(plan)``
    returns the measured switch + first run (ms) of a plan (a list of group
    starts); the calibration plans and ``extra_plans`` are measured, the
    terms b, L, κ, σ, h of ``base`` fitted, the optimum planned and
    measured, and while prediction and measurement differ by more than
    ``tolerance`` the model is refitted and the plan replanned (at most
    ``max_rounds`` times). Returns (the best measured plan, its
    :class:`CostRecord`; ``bandwidth_gbps`` 0). An exception raised by
    ``measure`` stops the loop and is raised again here."""
    t, x, n = _times(transfer_ms, exec_ms)
    base = base or CostModel()
    plans = [[int(s) for s in p] for p in extra_plans]
    flat, _ = _size_array([s for p in plans for s in p])
    counts, k = _size_array([len(p) for p in plans])
    failure = []

    def trampoline(user, starts, ngroups, ms_out):
        try:
            ms = float(measure([int(starts[i]) for i in range(ngroups)]))
            ms_out[0] = ms
            return 0
        except BaseException as e:  # noqa: BLE001 - raised again below
            failure.append(e)
            return 1

    cb = _c.ps_measure_plan_fn(trampoline)
    rec = _c.ps_cost_record()
    out = (c_size_t * max(n, 1))()
    ng = c_size_t()
    bm = base._c()
    try:
        _c.lib().ps_plan_closed_loop(t, x, n, byref(bm), flat, counts, k, cb, None, int(max_rounds),
                                     float(tolerance), byref(rec), out, len(out), byref(ng))
    except PipeSwitchError:
        if failure:
            raise failure[0]
        raise
    return list(out[:ng.value]), CostRecord._from_c(rec)
