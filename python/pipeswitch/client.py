"""A client of ``pipeswitch serve``: connects to the daemon of a GPU and sends
inference requests for stored models, as an application would.

::

    from pipeswitch.client import Client

    with Client(device=0) as c:
        out = c.infer("resnet152", {"images": images})   # a numpy array
        logits = out["out0"]
        print(out.timing.activation_ms, out.timing.total_ms)

Inputs larger than :data:`~pipeswitch.protocol.INLINE_LIMIT` are written
into the client's *input area*: one sealed shared-memory file given to the
daemon once (:meth:`Client.reserve_inputs`), which every worker maps and
page-locks, so that a worker copies a request's inputs to the GPU straight
from it. By default the client reserves one when a request first needs it
(``input_area=False`` turns that off; a size the daemon refused is not
asked for again, and requests then send their inputs in a new file each, as
without areas).

Standard library only; numpy is used when it is importable (inputs may be
numpy arrays, outputs come back as numpy arrays), and CPU torch tensors are
accepted as inputs. Failures raise :mod:`pipeswitch.errors` classes by the
daemon's status (a missing model: :class:`~pipeswitch.NotFound`; a full
queue: :class:`~pipeswitch.Refused`; no daemon or a dead worker:
:class:`~pipeswitch.Disconnected`).
"""

import ctypes
import math
import os
import socket as _socket

from . import protocol as P
from ._lib import DTYPE_SIZES
from .core import dtype_code, dtype_name
from .errors import ArgumentError, Disconnected, PipeSwitchError

__all__ = ["Client", "Outputs", "to_bytes", "from_bytes", "AUTO_AREA_MIN", "AUTO_AREA_MAX"]

#: The smallest input area a client reserves by itself (a power of two).
AUTO_AREA_MIN = 16 << 20
#: The largest input area a client reserves by itself.
AUTO_AREA_MAX = 256 << 20

_NUMPY_NAMES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "F16": "float16",
    "I32": "int32", "U32": "uint32", "F32": "float32", "I64": "int64", "U64": "uint64", "F64": "float64",
}


def _numpy():
    try:
        import numpy
    except ImportError:
        return None
    return numpy


def _arg_error(msg):
    return ArgumentError(101, "PS_ERR_INVALID_ARGUMENT", msg)


def to_bytes(value, dtype=None, shape=None):
    """``(data, dtype_code, shape)`` of an input: a numpy array or a torch
    tensor (dtype and shape from it unless given), or bytes-like data with
    ``dtype`` and ``shape`` given. The byte count must match."""
    mod = type(value).__module__
    if mod.startswith("torch"):
        t = value.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        dtype = str(t.dtype) if dtype is None else dtype
        shape = tuple(t.shape) if shape is None else shape
        n = t.numel() * t.element_size()
        data = ctypes.string_at(t.data_ptr(), n) if n else b""
    elif mod.startswith("numpy") and hasattr(value, "dtype"):
        np = _numpy()
        a = np.ascontiguousarray(value)
        dtype = a.dtype.name if dtype is None else dtype
        shape = a.shape if shape is None else shape
        data = a.tobytes()
    else:
        if dtype is None or shape is None:
            raise _arg_error("bytes need a dtype and a shape")
        try:
            data = memoryview(value).cast("B")
        except TypeError as e:
            raise _arg_error("cannot send a %s as a tensor: %s" % (type(value).__name__, e)) from None
    code = dtype_code(dtype)
    shape = [int(d) for d in shape]
    if any(d < 0 for d in shape) or len(shape) > P.MAX_DIMS:
        raise _arg_error("shape %r: at most %d non-negative dimensions" % (shape, P.MAX_DIMS))
    want = math.prod(shape) * DTYPE_SIZES[code]
    if want != len(data):
        raise _arg_error("a %s tensor of shape %r has %d bytes, not %d" % (dtype_name(code), shape, want, len(data)))
    return data, code, shape


def from_bytes(data, dtype, shape, use_numpy=True):
    """An output as a numpy array (when numpy is importable and has the
    dtype), else ``(bytes, dtype_name, shape)``."""
    np = _numpy() if use_numpy else None
    name = dtype_name(dtype)
    if np is not None and name in _NUMPY_NAMES:
        want = math.prod(shape) * DTYPE_SIZES.get(dtype, 1)
        if want != len(data):
            raise P.protocol_error("output of shape %r and dtype %s has %d bytes, not %d"
                                   % (list(shape), name, len(data), want))
        return np.frombuffer(data, dtype=_NUMPY_NAMES[name]).reshape([int(d) for d in shape])
    return (bytes(data), name, tuple(int(d) for d in shape))


class Outputs(dict):
    """The outputs of a request, name -> array (see :func:`from_bytes`), with
    ``timing`` (a :class:`pipeswitch.protocol.Timing`, in ms) and
    ``request_id``."""

    def __init__(self, items, timing, request_id):
        super().__init__(items)
        self.timing = timing
        self.request_id = request_id


class Client:
    """A connection to the daemon serving GPU ``device`` (its socket:
    ``socket``, default :func:`pipeswitch.protocol.socket_path` in
    :func:`pipeswitch.protocol.default_socket_dir`, as the Rust side).
    ``timeout``: seconds a request may wait for its answer (None: forever).
    ``input_area``: reserve an input area when a request first needs one or
    a larger one (:meth:`reserve_inputs`: max(:data:`AUTO_AREA_MIN`, the next
    power of two of the bytes needed), never over :data:`AUTO_AREA_MAX` and
    never a size the daemon refused, or a larger one); False: only
    :meth:`reserve_inputs` reserves one.
    One request at a time; not for sharing between threads."""

    def __init__(self, socket=None, device=0, timeout=None, numpy=True, input_area=True):
        path = socket if socket is not None else P.socket_path(P.default_socket_dir(), device)
        self.socket_path = os.fspath(path)
        self.use_numpy = numpy
        self.auto_area = bool(input_area)
        #: Why the daemon last refused an input area (None if it never did).
        self.area_refusal = None
        # The input area: (id, bytes usable, mapping), or None.
        self._area = None
        # The request id of a request that names the area and whose answer
        # has not come (it timed out here): the daemon may still be reading
        # its bytes, so nothing is written into the area until it comes.
        self._area_busy = None
        # The smallest area size refused (or that could not be made): not
        # asked for again by the automatic reservation, nor anything larger.
        self._refused_area = None
        self._sock = None
        self._next_id = 1
        s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            s.settimeout(timeout)
            try:
                s.connect(self.socket_path)
            except (FileNotFoundError, ConnectionRefusedError) as e:
                raise Disconnected(701, "PS_ERR_DISCONNECTED",
                                   "no daemon listens on %s (%s): start one with `pipeswitch serve`"
                                   % (self.socket_path, e)) from None
            except OSError as e:
                raise Disconnected(701, "PS_ERR_DISCONNECTED", "connecting to %s: %s" % (self.socket_path, e)) from None
            P.send(s, P.Hello(P.ROLE_CLIENT, os.getpid(), ""))
            got = P.recv(s)
            msg = self._no_file(got)
            if isinstance(msg, P.Welcome):
                self.daemon_pid, self.device, self.store = msg.daemon_pid, msg.device, msg.store
            elif isinstance(msg, P.Error):
                raise P.error_of(msg.status, msg.message)
            elif msg is None:
                raise Disconnected(701, "PS_ERR_DISCONNECTED", "the daemon closed the connection")
            else:
                raise P.protocol_error("the daemon answered hello with %s" % type(msg).__name__)
        except BaseException:
            s.close()
            raise
        self._sock = s

    @staticmethod
    def _no_file(got):
        if got is None:
            return None
        msg, fd = got
        if fd is not None:
            os.close(fd)
        return msg

    def _conn(self):
        if self._sock is None:
            raise Disconnected(701, "PS_ERR_DISCONNECTED", "the client is closed")
        return self._sock

    def _recv(self):
        try:
            got = P.recv(self._conn())
        except Disconnected as e:
            if "waiting for the peer" not in e.message:
                self.close()  # gone, or out of step in the middle of a frame
            raise
        except Exception:
            self.close()  # a malformed frame: the stream is out of step
            raise
        if got is None:
            self.close()
            raise Disconnected(701, "PS_ERR_DISCONNECTED", "the daemon closed the connection")
        return got

    def infer(self, model, inputs):
        """Runs ``model`` on ``inputs`` through the daemon and waits for the
        result. ``inputs``: a dict name -> array (numpy or torch) or
        ``(data, dtype, shape)``, or a list of ``(name, data, dtype, shape)``
        (dtype and shape None for arrays), in the order the model's forward
        takes them. Returns :class:`Outputs`."""
        items = inputs.items() if isinstance(inputs, dict) else inputs
        packed = []
        for item in items:
            if isinstance(inputs, dict):
                name, v = item
                data, dtype, shape = (v if isinstance(v, tuple) else (v, None, None))
            else:
                name, data, dtype, shape = item
            packed.append((str(name),) + _reorder(to_bytes(data, dtype, shape)))
        sock = self._conn()
        tensors = self._pack_in_area(packed)
        fd = None
        if tensors is None:
            tensors, fd = P.pack_tensors(packed)
        request_id = self._next_id
        self._next_id += 1
        if fd is None and any(isinstance(t.data, P.Area) for t in tensors):
            self._area_busy = request_id  # until its answer comes
        try:
            P.send(sock, P.Infer(request_id, str(model), tensors), fd)
        finally:
            if fd is not None:
                os.close(fd)
        while True:
            msg, fd = self._recv()
            try:
                if isinstance(msg, P.InferResult) and msg.request_id == request_id:
                    self._answered(msg)
                    outs = P.unpack_tensors(msg.outputs, fd)
                    return Outputs([(t.name, from_bytes(b, t.dtype, t.shape, self.use_numpy)) for t, b in outs],
                                   msg.timing, request_id)
                if isinstance(msg, P.Error) and msg.request_id in (request_id, 0):
                    self._answered(msg)
                    raise P.error_of(msg.status, msg.message)
                if self._stale(msg):
                    continue
                raise P.protocol_error("unexpected message %s" % type(msg).__name__)
            finally:
                if fd is not None:
                    os.close(fd)

    # -- input areas ---------------------------------------------------------

    @property
    def input_area_bytes(self):
        """The bytes of the client's input area (0: none)."""
        return self._area[1] if self._area is not None else 0

    @property
    def input_area_id(self):
        """The daemon's id of the client's input area (None: none)."""
        return self._area[0] if self._area is not None else None

    def reserve_inputs(self, nbytes):
        """Gives the daemon a new input area of ``nbytes`` bytes (a sealed
        memfd, mapped here for writing), which replaces the client's earlier
        one once the daemon accepted it: the daemon passes it to every
        worker, each maps it once and page-locks it, and later requests
        write their inputs larger than :data:`~pipeswitch.protocol.INLINE_LIMIT`
        into it (from offset 0, each at a multiple of 256 bytes) instead of
        into a new file each. Reserve it before the requests whose latency
        counts: the workers page-lock it when it is given. Returns its
        bytes. A refusal (over the daemon's limits: :class:`~pipeswitch.Refused`)
        raises the daemon's error and keeps the earlier area."""
        sock = self._conn()
        fd, m = P.create_area(nbytes)
        n = len(m)
        try:
            request_id = self._next_id
            self._next_id += 1
            try:
                P.send(sock, P.InputArea(request_id, n), fd)
            finally:
                os.close(fd)
            while True:
                msg = self._no_file(self._recv())
                if isinstance(msg, P.InputAreaReady) and msg.request_id == request_id:
                    if msg.bytes != n or msg.area == 0:
                        raise P.protocol_error("the daemon accepted an input area of %d bytes as area %d of %d"
                                               % (n, msg.area, msg.bytes))
                    break
                if isinstance(msg, P.Error) and msg.request_id in (request_id, 0):
                    self._refused(n, msg.message)
                    raise P.error_of(msg.status, msg.message)
                if self._stale(msg):
                    continue
                raise P.protocol_error("unexpected message %s" % type(msg).__name__)
        except BaseException:
            m.close()
            raise
        old, self._area = self._area, (msg.area, msg.bytes, m)
        self._area_busy = None  # the new area: nothing in flight names it
        if old is not None:
            old[2].close()
        return msg.bytes

    def _refused(self, n, why):
        self.area_refusal = why
        if self._refused_area is None or n < self._refused_area:
            self._refused_area = n

    def _answered(self, msg):
        """``msg`` answers a request: if that one named the area, the area
        is free again."""
        if self._area_busy is not None and msg.request_id == self._area_busy:
            self._area_busy = None

    def _stale(self, msg):
        """Whether ``msg`` answers an earlier request that timed out here (it
        is skipped; an input area accepted after its request timed out
        replaced the client's area at the daemon, so the one held here is
        not used again)."""
        if isinstance(msg, P.InputAreaReady):
            if self._area is not None:
                old, self._area = self._area, None
                old[2].close()
            return True
        if isinstance(msg, (P.InferResult, P.TrainStatus)) or (isinstance(msg, P.Error) and msg.request_id != 0):
            self._answered(msg)
            return True
        return False

    def _pack_in_area(self, packed):
        """The request's tensors with the large ones written into the input
        area, or None where they go in a file of their own (none large, no
        area and none reserved, or the area still read by a request that
        timed out)."""
        offsets, need = P.area_layout([len(data) for _, _, _, data in packed])
        if need == 0 or self._area_busy is not None:
            return None
        if self._area is None or need > self._area[1]:
            if not self.auto_area:
                return None
            size = max(AUTO_AREA_MIN, 1 << (need - 1).bit_length())
            if size > AUTO_AREA_MAX or (self._refused_area is not None and size >= self._refused_area):
                return None
            try:
                self.reserve_inputs(size)
            except Disconnected:
                raise  # gone, or no answer in time
            except PipeSwitchError as e:
                if self.closed:
                    raise  # the daemon's answer was malformed: the connection is out of step
                # Refused (or not known to the daemon, or no memory here): files as before.
                self._refused(size, e.message)
                return None
        area_id, _, m = self._area
        out = []
        for (name, code, shape, data), off in zip(packed, offsets):
            if off is None:
                out.append(P.Tensor(name, code, shape, P.Inline(bytes(data))))
            else:
                m[off:off + len(data)] = data
                out.append(P.Tensor(name, code, shape, P.Area(area_id, off, len(data))))
        return out

    def stats(self):
        """The daemon's counters (a :class:`pipeswitch.protocol.Stats`)."""
        P.send(self._conn(), P.StatsRequest())
        while True:
            msg = self._no_file(self._recv())
            if isinstance(msg, P.StatsReply):
                return msg.stats
            if self._stale(msg):
                continue
            if isinstance(msg, P.Error):
                raise P.error_of(msg.status, msg.message)
            raise P.protocol_error("unexpected message %s" % type(msg).__name__)

    def train(self, name, entry, preempt="abandon", save="auto", policy="inference-first", share=0.5,
              period_ms=5000, idle_ms=100, iterations=0, checkpoint_every=0):
        """Submits a training job: ``entry`` is its factory, ``module:function``
        (see :mod:`pipeswitch.train`), run by the daemon's Python workers.
        ``preempt``: ``"abandon"`` (the step in flight is dropped) or
        ``"boundary"``; ``save``: ``"auto"`` (the daemon keeps the state on
        the GPU while its residency area has room for it beside the models
        in use, else writes it back), ``"host"`` (always written back to
        pinned host memory when preempted) or ``"resident"``; ``policy``:
        ``"inference-first"`` (training resumes after ``idle_ms`` without
        requests) or ``"time-share"`` (training gets ``share`` of every
        ``period_ms`` under load); ``iterations`` 0 runs until cancelled;
        ``checkpoint_every`` > 0 lets the job survive its worker's death.
        Returns the job's first :class:`pipeswitch.protocol.TrainStatus`
        (its ``job_id``)."""
        def pick(what, v, table):
            if v not in table:
                raise ArgumentError(101, "PS_ERR_INVALID_ARGUMENT", "%s must be one of %s, not %r"
                                    % (what, ", ".join(table), v))
            return table[v]

        job = P.TrainJob(str(name), str(entry),
                         pick("preempt", preempt, {"abandon": P.PREEMPT_ABANDON, "boundary": P.PREEMPT_BOUNDARY}),
                         pick("save", save, {"auto": P.SAVE_AUTO, "host": P.SAVE_HOST, "resident": P.SAVE_RESIDENT}),
                         pick("policy", policy, {"inference-first": P.POLICY_INFERENCE_FIRST,
                                                 "time-share": P.POLICY_TIME_SHARE}),
                         float(share), int(period_ms), int(idle_ms), int(iterations), int(checkpoint_every))
        return self._train_call(lambda rid: P.TrainSubmit(rid, job))

    def train_status(self, job_id, cancel=False):
        """A training job's :class:`pipeswitch.protocol.TrainStatus`
        (``state_name``: waiting, running, preempting, paused, finished,
        failed, cancelled); ``cancel`` ends the job first."""
        return self._train_call(lambda rid: P.TrainQuery(rid, int(job_id), bool(cancel)))

    def _train_call(self, make):
        request_id = self._next_id
        self._next_id += 1
        P.send(self._conn(), make(request_id))
        while True:
            msg = self._no_file(self._recv())
            if isinstance(msg, P.TrainStatus) and msg.request_id == request_id:
                return msg
            if isinstance(msg, P.Error) and msg.request_id in (request_id, 0):
                raise P.error_of(msg.status, msg.message)
            if self._stale(msg):
                continue
            raise P.protocol_error("unexpected message %s" % type(msg).__name__)

    def close(self):
        """Closes the connection and unmaps the input area (again: a no-op)."""
        s, self._sock = getattr(self, "_sock", None), None
        if s is not None:
            s.close()
        area, self._area = getattr(self, "_area", None), None
        if area is not None:
            area[2].close()

    @property
    def closed(self):
        return self._sock is None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        self.close()

    def __repr__(self):
        return "Client(%r%s)" % (self.socket_path, ", closed" if self.closed else "")


def _reorder(t):
    data, code, shape = t
    return code, shape, data
