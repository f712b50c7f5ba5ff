"""The daemon protocol (``pipeswitch serve``) in Python: the same frames and
messages as the Rust side (``src/protocol``), byte for byte.

A frame is a 16-byte header then a body::

    magic "PSWP" | version u16 | kind u16 | body length u32 | fds u32 | body

Everything is little-endian. Bodies are at most :data:`MAX_BODY` bytes;
tensors larger than :data:`INLINE_LIMIT` travel in one shared-memory file (a
memfd) passed beside the frame with ``SCM_RIGHTS`` (``fds`` = 1), each naming
its byte range in it, or in the client's *input area* (kinds 20..23: a sealed
memfd the client gives once, that the daemon passes to every worker; requests
name byte ranges of it, :class:`Area`). Decoding checks every length against the bytes present
and a limit before it allocates; anything malformed raises
:class:`pipeswitch.ProtocolError` (status 700), never another exception.

Standard library only. Messages are plain dataclasses; :func:`encode_frame`
and :func:`decode_frame` turn them into bytes and back; :func:`send` and
:func:`recv` move them over a Unix stream socket with at most one file;
:func:`pack_tensors` / :func:`unpack_tensors` put tensor bytes inline or in a
memfd and read them back (ranges checked against the file's size, areas
read from the receiver's mappings); :func:`create_area`, :func:`map_area` and
:func:`area_layout` are the input areas' two sides (as ``src/protocol/area.rs``).
"""

import fcntl
import mmap
import os
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from .errors import ArgumentError, Disconnected, OsError, ProtocolError, from_status

__all__ = [
    "MAGIC", "VERSION", "HEADER_BYTES", "MAX_BODY", "INLINE_LIMIT", "MAX_DIMS", "MAX_SHARED_TENSOR",
    "MAX_STR", "MAX_LIST", "ROLE_CLIENT", "ROLE_WORKER", "TASK_INFERENCE", "TASK_TRAINING",
    "Inline", "Shared", "Area", "Tensor", "Timing", "Stats", "Task",
    "Hello", "Welcome", "Error", "Infer", "InferResult", "Standby", "Activate", "TaskDone",
    "StatsRequest", "StatsReply", "Shutdown", "Deactivate", "InputArea", "InputAreaReady", "AreaAdd", "AreaDrop",
    "PREEMPT_ABANDON", "PREEMPT_BOUNDARY", "SAVE_RESIDENT", "SAVE_HOST", "SAVE_AUTO", "POLICY_INFERENCE_FIRST",
    "POLICY_TIME_SHARE", "JOB_STATES", "PROGRESS_ITERATION", "PROGRESS_CHECKPOINT", "PROGRESS_RESUMED",
    "STOP_PREEMPTED", "STOP_FINISHED", "STOP_FAILED", "TrainJob", "TrainTask",
    "TrainSubmit", "TrainStatus", "TrainQuery", "TrainStart", "Preempt", "TrainProgress", "TrainStopped",
    "Header", "encode_body", "decode_body", "encode_frame", "decode_frame", "send", "recv",
    "pack_tensors", "unpack_tensors", "AREA_ALIGN", "area_layout", "create_area", "check_area_file", "map_area",
    "monotonic_ns", "default_socket_dir", "socket_path",
    "protocol_error", "error_of",
]

MAGIC = b"PSWP"
#: Protocol version: bumped by any change to a message's encoding.
VERSION = 1
HEADER_BYTES = 16
#: Largest body of a frame.
MAX_BODY = 1 << 20
#: Tensors up to this many bytes travel inside the frame.
INLINE_LIMIT = 64 << 10
#: Most dimensions of a tensor in a message.
MAX_DIMS = 8
#: The largest byte count a tensor in shared memory may claim.
MAX_SHARED_TENSOR = 1 << 40
#: Longest string in a message.
MAX_STR = 16 << 10
#: Most elements of any list in a message.
MAX_LIST = 4096

ROLE_CLIENT = 1
ROLE_WORKER = 2
TASK_INFERENCE = 1
TASK_TRAINING = 2

# Training (frame kinds 13..19: added without changing kinds 1..12).
PREEMPT_ABANDON = 1   # at once: the step in flight is abandoned
PREEMPT_BOUNDARY = 2  # at the next iteration boundary
SAVE_RESIDENT = 1     # the state stays in the worker's GPU memory
SAVE_HOST = 2         # written back to pinned host memory, freed on the GPU
SAVE_AUTO = 3         # the daemon decides at each preemption (resident while there is room)
POLICY_INFERENCE_FIRST = 1
POLICY_TIME_SHARE = 2
#: Job states of :class:`TrainStatus`, by code.
JOB_STATES = {1: "waiting", 2: "running", 3: "preempting", 4: "paused", 5: "finished", 6: "failed",
              7: "cancelled"}
PROGRESS_ITERATION = 1
PROGRESS_CHECKPOINT = 2
PROGRESS_RESUMED = 3
STOP_PREEMPTED = 1
STOP_FINISHED = 2
STOP_FAILED = 3

_PS_ERR_PROTOCOL = 700
_PS_ERR_DISCONNECTED = 701
_U64 = (1 << 64) - 1


def protocol_error(message):
    """A :class:`ProtocolError` (status 700) with ``message``."""
    return ProtocolError(_PS_ERR_PROTOCOL, "PS_ERR_PROTOCOL", message)


def _malformed(what):
    return protocol_error("malformed message: " + what)


def _disconnected(message):
    return Disconnected(_PS_ERR_DISCONNECTED, "PS_ERR_DISCONNECTED", message)


def _os_error(what, e):
    return OsError(401, "PS_ERR_OS", "%s: %s" % (what, e))


def error_of(status, message):
    """The exception a daemon's error status and message stand for."""
    from ._lib import STATUS_NAMES

    status = int(status)
    if status == 0:
        return protocol_error("an error with status 0: " + message)
    return from_status(status, STATUS_NAMES.get(status, "PS_ERR_UNKNOWN"), message)


# ---------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------

@dataclass
class Inline:
    """Tensor bytes carried inside the frame."""
    data: bytes


@dataclass
class Shared:
    """Bytes ``[offset, offset + bytes)`` of the file passed with the frame."""
    offset: int
    bytes: int


@dataclass
class Area:
    """Bytes ``[offset, offset + bytes)`` of input area ``area``: the client's
    own area in an ``Infer``, the same in the ``Activate`` the daemon forwards."""
    area: int
    offset: int
    bytes: int


@dataclass
class Tensor:
    """A named tensor of a request or a result: ``dtype`` is a ``PS_DTYPE_*``
    code, ``data`` an :class:`Inline`, a :class:`Shared` or an :class:`Area`."""
    name: str
    dtype: int
    shape: List[int]
    data: object


@dataclass
class Timing:
    """Where a request's time went, in ms (0 where not measured)."""
    queued_ms: float = 0.0
    activation_ms: float = 0.0
    worker_ms: float = 0.0
    total_ms: float = 0.0


@dataclass
class Stats:
    """Counters of a daemon."""
    requests: int = 0
    failed: int = 0
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes_copied: int = 0
    workers: int = 0
    standbys: int = 0
    workers_started: int = 0
    workers_lost: int = 0


@dataclass
class Task:
    """A task the daemon hands to a standby worker."""
    task_id: int
    kind: int
    model: str
    model_id: int
    region_offset: int
    resident: bool
    plan: List[int]
    inputs: List[Tensor]
    decided_ns: int


@dataclass
class TrainJob:
    """A training job: ``entry`` is its factory, ``module:function``."""
    name: str
    entry: str
    preempt: int = PREEMPT_ABANDON
    save: int = SAVE_AUTO
    policy: int = POLICY_INFERENCE_FIRST
    share: float = 0.5
    period_ms: int = 5000
    idle_ms: int = 100
    iterations: int = 0
    checkpoint_every: int = 0


@dataclass
class TrainTask:
    """The daemon starts (``resume_iteration`` 0) or resumes a job."""
    task_id: int
    job_id: int
    job: TrainJob
    checkpoint_path: str
    resume_iteration: int
    decided_ns: int


# ---------------------------------------------------------------------------
# Messages (frame kinds 1..19)
# ---------------------------------------------------------------------------

@dataclass
class Hello:
    KIND = 1
    role: int
    pid: int
    worker_kind: str = ""


@dataclass
class Welcome:
    KIND = 2
    daemon_pid: int
    device: int
    store: str
    worker_id: int
    arena_handle: bytes = b""
    activation_offset: int = 0
    activation_bytes: int = 0


@dataclass
class Error:
    KIND = 3
    request_id: int
    status: int
    message: str


@dataclass
class Infer:
    KIND = 4
    request_id: int
    model: str
    inputs: List[Tensor] = field(default_factory=list)


@dataclass
class InferResult:
    KIND = 5
    request_id: int
    outputs: List[Tensor] = field(default_factory=list)
    timing: Timing = field(default_factory=Timing)


@dataclass
class Standby:
    KIND = 6
    worker_id: int


@dataclass
class Activate:
    KIND = 7
    task: Task


@dataclass
class TaskDone:
    KIND = 8
    task_id: int
    status: int = 0
    message: str = ""
    outputs: List[Tensor] = field(default_factory=list)
    timing: Timing = field(default_factory=Timing)


@dataclass
class StatsRequest:
    KIND = 9


@dataclass
class StatsReply:
    KIND = 10
    stats: Stats


@dataclass
class Shutdown:
    KIND = 11


@dataclass
class Deactivate:
    KIND = 12


@dataclass
class TrainSubmit:
    KIND = 13
    request_id: int
    job: TrainJob


@dataclass
class TrainStatus:
    KIND = 14
    request_id: int
    job_id: int
    state: int
    iteration: int = 0
    checkpoint: int = 0
    preemptions: int = 0
    status: int = 0
    message: str = ""

    @property
    def state_name(self):
        return JOB_STATES.get(self.state, "unknown")


@dataclass
class TrainQuery:
    KIND = 15
    request_id: int
    job_id: int
    cancel: bool = False


@dataclass
class TrainStart:
    KIND = 16
    task: TrainTask


@dataclass
class Preempt:
    KIND = 17
    task_id: int
    mode: int
    save: int
    decided_ns: int = 0


@dataclass
class TrainProgress:
    KIND = 18
    task_id: int
    event: int
    iteration: int
    checkpoint: int = 0
    state_bytes: int = 0


@dataclass
class TrainStopped:
    KIND = 19
    task_id: int
    reason: int
    iteration: int
    checkpoint: int = 0
    status: int = 0
    message: str = ""
    stop_ms: float = 0.0
    save_ms: float = 0.0


# Input areas (kinds 20..23, and the tensor placement 2: added the same way).

@dataclass
class InputArea:
    """A client gives the daemon its input area: the file passed with the
    frame, sealed against shrinking, of at least ``bytes`` bytes. It replaces
    the client's earlier area. Answered with :class:`InputAreaReady` or an
    :class:`Error` of ``request_id``."""
    KIND = 20
    request_id: int
    bytes: int


@dataclass
class InputAreaReady:
    """The area is accepted: requests name it as ``area``."""
    KIND = 21
    request_id: int
    area: int
    bytes: int


@dataclass
class AreaAdd:
    """The daemon gives a worker a client's input area (the file passed with
    the frame): map it and keep it until :class:`AreaDrop`."""
    KIND = 22
    area: int
    bytes: int


@dataclass
class AreaDrop:
    """The area's client left or replaced it: no later task names it."""
    KIND = 23
    area: int


_KINDS = {c.KIND: c for c in (Hello, Welcome, Error, Infer, InferResult, Standby, Activate, TaskDone,
                              StatsRequest, StatsReply, Shutdown, Deactivate, TrainSubmit, TrainStatus,
                              TrainQuery, TrainStart, Preempt, TrainProgress, TrainStopped, InputArea,
                              InputAreaReady, AreaAdd, AreaDrop)}


# ---------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------

class _Writer:
    def __init__(self):
        self.parts = []

    def _pack(self, fmt, v, what):
        try:
            self.parts.append(struct.pack(fmt, v))
        except (struct.error, TypeError, OverflowError) as e:
            raise protocol_error("cannot encode %s = %r: %s" % (what, v, e)) from None
        return self

    def u8(self, v, what="u8"):
        return self._pack("<B", v, what)

    def u32(self, v, what="u32"):
        return self._pack("<I", v, what)

    def i32(self, v, what="i32"):
        return self._pack("<i", v, what)

    def u64(self, v, what="u64"):
        return self._pack("<Q", v, what)

    def f64(self, v, what="f64"):
        return self._pack("<d", v, what)

    def bool(self, v, what="bool"):
        return self.u8(1 if v else 0, what)

    def bytes(self, v, what="bytes"):
        v = bytes(v)
        self.u32(len(v), what)
        self.parts.append(v)
        return self

    def str(self, v, what="string"):
        if not isinstance(v, str):
            raise protocol_error("%s must be a str, not %s" % (what, type(v).__name__))
        return self.bytes(v.encode("utf-8"), what)

    def len(self, n, what="list"):
        return self.u32(n, what)

    def body(self):
        return b"".join(self.parts)


def _put_tensors(w, ts):
    w.len(len(ts), "tensors")
    for t in ts:
        w.str(t.name, "tensor name").u32(t.dtype, "tensor dtype").len(len(t.shape), "tensor shape")
        for d in t.shape:
            w.u64(d, "tensor dimension")
        if isinstance(t.data, Inline):
            w.u8(0).bytes(t.data.data, "tensor bytes")
        elif isinstance(t.data, Shared):
            w.u8(1).u64(t.data.offset, "tensor offset").u64(t.data.bytes, "tensor bytes")
        elif isinstance(t.data, Area):
            w.u8(2).u64(t.data.area, "tensor area").u64(t.data.offset, "tensor offset").u64(t.data.bytes, "tensor bytes")
        else:
            raise protocol_error("tensor %r: data must be Inline, Shared or Area, not %s"
                                 % (t.name, type(t.data).__name__))


def _put_timing(w, t):
    w.f64(t.queued_ms).f64(t.activation_ms).f64(t.worker_ms).f64(t.total_ms)


def _put_job(w, j):
    w.str(j.name, "job name").str(j.entry, "job entry").u8(j.preempt, "preempt mode").u8(j.save, "save mode")
    w.u8(j.policy, "share policy").f64(j.share, "share").u32(j.period_ms, "period ms").u32(j.idle_ms, "idle ms")
    w.u64(j.iterations, "iterations").u32(j.checkpoint_every, "checkpoint every")


def encode_body(msg):
    """The body of ``msg`` (no length limit checked: see :func:`encode_frame`)."""
    w = _Writer()
    if isinstance(msg, Hello):
        w.u8(msg.role, "role").u32(msg.pid, "pid").str(msg.worker_kind, "worker kind")
    elif isinstance(msg, Welcome):
        w.u32(msg.daemon_pid).i32(msg.device).str(msg.store).u32(msg.worker_id).bytes(msg.arena_handle)
        w.u64(msg.activation_offset).u64(msg.activation_bytes)
    elif isinstance(msg, Error):
        w.u64(msg.request_id).u32(msg.status).str(msg.message)
    elif isinstance(msg, Infer):
        w.u64(msg.request_id).str(msg.model)
        _put_tensors(w, msg.inputs)
    elif isinstance(msg, InferResult):
        w.u64(msg.request_id)
        _put_tensors(w, msg.outputs)
        _put_timing(w, msg.timing)
    elif isinstance(msg, Standby):
        w.u32(msg.worker_id)
    elif isinstance(msg, Activate):
        t = msg.task
        w.u64(t.task_id).u8(t.kind).str(t.model).u64(t.model_id).u64(t.region_offset).bool(t.resident)
        w.len(len(t.plan), "plan")
        for s in t.plan:
            w.u32(s, "plan")
        _put_tensors(w, t.inputs)
        w.u64(t.decided_ns)
    elif isinstance(msg, TaskDone):
        w.u64(msg.task_id).u32(msg.status).str(msg.message)
        _put_tensors(w, msg.outputs)
        _put_timing(w, msg.timing)
    elif isinstance(msg, StatsReply):
        s = msg.stats
        w.u64(s.requests).u64(s.failed).u64(s.hits).u64(s.misses).u64(s.evictions).u64(s.bytes_copied)
        w.u32(s.workers).u32(s.standbys).u64(s.workers_started).u64(s.workers_lost)
    elif isinstance(msg, (StatsRequest, Shutdown, Deactivate)):
        pass
    elif isinstance(msg, TrainSubmit):
        w.u64(msg.request_id)
        _put_job(w, msg.job)
    elif isinstance(msg, TrainStatus):
        w.u64(msg.request_id).u64(msg.job_id).u8(msg.state, "job state").u64(msg.iteration).u64(msg.checkpoint)
        w.u64(msg.preemptions).u32(msg.status).str(msg.message)
    elif isinstance(msg, TrainQuery):
        w.u64(msg.request_id).u64(msg.job_id).bool(msg.cancel)
    elif isinstance(msg, TrainStart):
        t = msg.task
        w.u64(t.task_id).u64(t.job_id)
        _put_job(w, t.job)
        w.str(t.checkpoint_path, "checkpoint path").u64(t.resume_iteration).u64(t.decided_ns)
    elif isinstance(msg, Preempt):
        w.u64(msg.task_id).u8(msg.mode, "preempt mode").u8(msg.save, "save mode").u64(msg.decided_ns)
    elif isinstance(msg, TrainProgress):
        w.u64(msg.task_id).u8(msg.event, "progress event").u64(msg.iteration).u64(msg.checkpoint)
        w.u64(msg.state_bytes)
    elif isinstance(msg, TrainStopped):
        w.u64(msg.task_id).u8(msg.reason, "stop reason").u64(msg.iteration).u64(msg.checkpoint)
        w.u32(msg.status).str(msg.message).f64(msg.stop_ms).f64(msg.save_ms)
    elif isinstance(msg, InputArea):
        w.u64(msg.request_id).u64(msg.bytes, "area bytes")
    elif isinstance(msg, InputAreaReady):
        w.u64(msg.request_id).u64(msg.area, "area").u64(msg.bytes, "area bytes")
    elif isinstance(msg, AreaAdd):
        w.u64(msg.area, "area").u64(msg.bytes, "area bytes")
    elif isinstance(msg, AreaDrop):
        w.u64(msg.area, "area")
    else:
        raise protocol_error("not a protocol message: %r" % (msg,))
    return w.body()


# ---------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------

class _Reader:
    def __init__(self, buf):
        self.buf = buf
        self.pos = 0

    def take(self, n, what):
        if n > len(self.buf) - self.pos:
            raise _malformed("%s: %d bytes needed, %d left" % (what, n, len(self.buf) - self.pos))
        s = self.buf[self.pos:self.pos + n]
        self.pos += n
        return s

    def u8(self, what):
        return self.take(1, what)[0]

    def u32(self, what):
        return struct.unpack("<I", self.take(4, what))[0]

    def i32(self, what):
        return struct.unpack("<i", self.take(4, what))[0]

    def u64(self, what):
        return struct.unpack("<Q", self.take(8, what))[0]

    def f64(self, what):
        return struct.unpack("<d", self.take(8, what))[0]

    def bool(self, what):
        v = self.u8(what)
        if v > 1:
            raise _malformed("%s: %d is not a boolean" % (what, v))
        return v == 1

    def bytes(self, max_len, what):
        n = self.u32(what)
        if n > max_len:
            raise _malformed("%s: %d bytes, at most %d" % (what, n, max_len))
        return bytes(self.take(n, what))

    def str(self, what):
        b = self.bytes(MAX_STR, what)
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            raise _malformed("%s is not UTF-8" % what) from None

    def len(self, min_elem, what):
        n = self.u32(what)
        left = len(self.buf) - self.pos
        if n > MAX_LIST or n * max(min_elem, 1) > left:
            raise _malformed("%s: %d elements do not fit" % (what, n))
        return n

    def finish(self, what):
        if self.pos != len(self.buf):
            raise _malformed("%s: %d trailing bytes" % (what, len(self.buf) - self.pos))


def _get_tensors(r):
    # A tensor takes at least 4 (name) + 4 (dtype) + 4 (ndim) + 1 + 4 bytes.
    n = r.len(17, "tensors")
    out = []
    for _ in range(n):
        name = r.str("tensor name")
        dtype = r.u32("tensor dtype")
        ndim = r.len(8, "tensor shape")
        if ndim > MAX_DIMS:
            raise _malformed("tensor %r has %d dimensions, at most %d" % (name, ndim, MAX_DIMS))
        shape = [r.u64("tensor dimension") for _ in range(ndim)]
        placement = r.u8("tensor placement")
        if placement == 0:
            data = Inline(r.bytes(MAX_BODY, "tensor bytes"))
        elif placement == 1:
            offset = r.u64("tensor offset")
            nbytes = r.u64("tensor bytes")
            if nbytes > MAX_SHARED_TENSOR or offset + nbytes > _U64:
                raise _malformed("tensor %r: [%d, +%d) is out of range" % (name, offset, nbytes))
            data = Shared(offset, nbytes)
        elif placement == 2:
            area = r.u64("tensor area")
            offset = r.u64("tensor offset")
            nbytes = r.u64("tensor bytes")
            if nbytes > MAX_SHARED_TENSOR or offset + nbytes > _U64:
                raise _malformed("tensor %r: [%d, +%d) of area %d is out of range" % (name, offset, nbytes, area))
            data = Area(area, offset, nbytes)
        else:
            raise _malformed("tensor %r: unknown placement %d" % (name, placement))
        out.append(Tensor(name, dtype, shape, data))
    return out


def _area_bytes(r):
    """An area's size as a message claims it: 1 byte to :data:`MAX_SHARED_TENSOR`."""
    n = r.u64("area bytes")
    if n == 0 or n > MAX_SHARED_TENSOR:
        raise _malformed("an input area of %d bytes (1 to %d)" % (n, MAX_SHARED_TENSOR))
    return n


def _get_timing(r):
    return Timing(r.f64("queued ms"), r.f64("activation ms"), r.f64("worker ms"), r.f64("total ms"))


def _get_code(r, what, allowed):
    v = r.u8(what)
    if v not in allowed:
        raise _malformed("unknown %s %d" % (what, v))
    return v


def _get_job(r):
    return TrainJob(r.str("job name"), r.str("job entry"), _get_code(r, "preempt mode", (1, 2)),
                    _get_code(r, "save mode", (1, 2, 3)), _get_code(r, "share policy", (1, 2)), r.f64("share"),
                    r.u32("period ms"), r.u32("idle ms"), r.u64("iterations"), r.u32("checkpoint every"))


def decode_body(kind, body):
    """Decodes a body of frame ``kind``; every byte must be used."""
    body = bytes(body)
    if len(body) > MAX_BODY:
        raise _malformed("a body of %d bytes exceeds %d" % (len(body), MAX_BODY))
    r = _Reader(body)
    if kind == 1:
        role = r.u8("role")
        if role not in (ROLE_CLIENT, ROLE_WORKER):
            raise _malformed("unknown role %d" % role)
        m = Hello(role, r.u32("pid"), r.str("worker kind"))
    elif kind == 2:
        daemon_pid, device, store, worker_id = r.u32("daemon pid"), r.i32("device"), r.str("store"), r.u32("worker id")
        h = r.bytes(128, "arena handle")
        if h and len(h) != 128:
            raise _malformed("an arena handle of %d bytes (128 expected)" % len(h))
        m = Welcome(daemon_pid, device, store, worker_id, h, r.u64("activation offset"), r.u64("activation bytes"))
    elif kind == 3:
        m = Error(r.u64("request id"), r.u32("status"), r.str("message"))
    elif kind == 4:
        m = Infer(r.u64("request id"), r.str("model"), _get_tensors(r))
    elif kind == 5:
        m = InferResult(r.u64("request id"), _get_tensors(r), _get_timing(r))
    elif kind == 6:
        m = Standby(r.u32("worker id"))
    elif kind == 7:
        task_id = r.u64("task id")
        tk = r.u8("task kind")
        if tk not in (TASK_INFERENCE, TASK_TRAINING):
            raise _malformed("unknown task kind %d" % tk)
        model = r.str("model")
        model_id = r.u64("model id")
        region_offset = r.u64("region offset")
        resident = r.bool("resident")
        n = r.len(4, "plan")
        plan = [r.u32("plan") for _ in range(n)]
        inputs = _get_tensors(r)
        m = Activate(Task(task_id, tk, model, model_id, region_offset, resident, plan, inputs, r.u64("decision time")))
    elif kind == 8:
        m = TaskDone(r.u64("task id"), r.u32("status"), r.str("message"), _get_tensors(r), _get_timing(r))
    elif kind == 9:
        m = StatsRequest()
    elif kind == 10:
        m = StatsReply(Stats(r.u64("requests"), r.u64("failed"), r.u64("hits"), r.u64("misses"),
                             r.u64("evictions"), r.u64("bytes copied"), r.u32("workers"), r.u32("standbys"),
                             r.u64("workers started"), r.u64("workers lost")))
    elif kind == 11:
        m = Shutdown()
    elif kind == 12:
        m = Deactivate()
    elif kind == 13:
        m = TrainSubmit(r.u64("request id"), _get_job(r))
    elif kind == 14:
        m = TrainStatus(r.u64("request id"), r.u64("job id"), _get_code(r, "job state", JOB_STATES),
                        r.u64("iteration"), r.u64("checkpoint"), r.u64("preemptions"), r.u32("status"),
                        r.str("message"))
    elif kind == 15:
        m = TrainQuery(r.u64("request id"), r.u64("job id"), r.bool("cancel"))
    elif kind == 16:
        m = TrainStart(TrainTask(r.u64("task id"), r.u64("job id"), _get_job(r), r.str("checkpoint path"),
                                 r.u64("resume iteration"), r.u64("decision time")))
    elif kind == 17:
        m = Preempt(r.u64("task id"), _get_code(r, "preempt mode", (1, 2)), _get_code(r, "save mode", (1, 2, 3)),
                    r.u64("decision time"))
    elif kind == 18:
        m = TrainProgress(r.u64("task id"), _get_code(r, "progress event", (1, 2, 3)), r.u64("iteration"),
                          r.u64("checkpoint"), r.u64("state bytes"))
    elif kind == 19:
        m = TrainStopped(r.u64("task id"), _get_code(r, "stop reason", (1, 2, 3)), r.u64("iteration"),
                         r.u64("checkpoint"), r.u32("status"), r.str("message"), r.f64("stop ms"),
                         r.f64("save ms"))
    elif kind == 20:
        m = InputArea(r.u64("request id"), _area_bytes(r))
    elif kind == 21:
        m = InputAreaReady(r.u64("request id"), r.u64("area"), _area_bytes(r))
    elif kind == 22:
        m = AreaAdd(r.u64("area"), _area_bytes(r))
    elif kind == 23:
        m = AreaDrop(r.u64("area"))
    else:
        raise _malformed("unknown message kind %r" % (kind,))
    r.finish("message")
    return m


# ---------------------------------------------------------------------------
# Frames
# ---------------------------------------------------------------------------

@dataclass
class Header:
    kind: int
    body_len: int
    fds: int = 0

    def encode(self):
        return MAGIC + struct.pack("<HHII", VERSION, self.kind, self.body_len, self.fds)

    @classmethod
    def decode(cls, b):
        """Checks magic, version, size limit and fd count."""
        b = bytes(b)
        if len(b) != HEADER_BYTES:
            raise protocol_error("a frame header has %d bytes, not %d" % (len(b), HEADER_BYTES))
        if b[:4] != MAGIC:
            raise protocol_error("not a pipeswitch frame (bad magic)")
        version, kind, body_len, fds = struct.unpack("<HHII", b[4:])
        if version != VERSION:
            raise protocol_error("protocol version %d is not supported (this side speaks version %d)"
                                 % (version, VERSION))
        if body_len > MAX_BODY:
            raise protocol_error("a frame of %d bytes exceeds the limit of %d" % (body_len, MAX_BODY))
        if fds > 1:
            raise protocol_error("a frame claims %d files; at most 1" % fds)
        return cls(kind, body_len, fds)


def encode_frame(msg, fds=0):
    """A whole frame (header and body) for ``msg`` with ``fds`` files beside it."""
    body = encode_body(msg)
    if len(body) > MAX_BODY:
        raise ArgumentError(101, "PS_ERR_INVALID_ARGUMENT",
                            "a message of %d bytes exceeds the protocol's %d: tensors over %d bytes "
                            "go in shared memory" % (len(body), MAX_BODY, INLINE_LIMIT))
    return Header(type(msg).KIND, len(body), fds).encode() + body


def decode_frame(data):
    """Decodes one whole frame (header, body, nothing after): ``(Header, message)``."""
    data = bytes(data)
    if len(data) < HEADER_BYTES:
        raise protocol_error("a frame of %d bytes is shorter than its header" % len(data))
    h = Header.decode(data[:HEADER_BYTES])
    body = data[HEADER_BYTES:]
    if len(body) != h.body_len:
        raise protocol_error("the header announces %d bytes, the frame has %d" % (h.body_len, len(body)))
    return h, decode_body(h.kind, body)


# ---------------------------------------------------------------------------
# Sockets
# ---------------------------------------------------------------------------

_MSG_NOSIGNAL = getattr(socket, "MSG_NOSIGNAL", 0)
_MSG_CMSG_CLOEXEC = getattr(socket, "MSG_CMSG_CLOEXEC", 0)


def _fileno(f):
    return f if isinstance(f, int) else f.fileno()


def send(sock, msg, file=None):
    """Sends ``msg`` over the Unix stream socket ``sock``, with ``file`` (an fd
    or an object with ``fileno()``) beside it if given. A peer that went away
    raises :class:`pipeswitch.Disconnected` (never SIGPIPE)."""
    data = memoryview(encode_frame(msg, 0 if file is None else 1))
    fd = None if file is None else _fileno(file)
    while len(data) or fd is not None:
        anc = [] if fd is None else [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))]
        try:
            n = sock.sendmsg([data], anc, _MSG_NOSIGNAL)
        except InterruptedError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            raise _disconnected("the peer closed the connection") from None
        except socket.timeout:
            raise _disconnected("timed out sending a frame") from None
        except OSError as e:
            raise _os_error("sending a frame", e) from None
        data = data[n:]
        fd = None


def _recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = sock.recv(n - len(buf))
        except InterruptedError:
            continue
        except socket.timeout:
            raise _disconnected("timed out in the middle of a frame") from None
        except ConnectionResetError:
            raise _disconnected("the peer reset the connection") from None
        except OSError as e:
            raise _os_error("reading a frame", e) from None
        if not chunk:
            raise protocol_error("the connection closed in the middle of a frame")
        buf += chunk
    return bytes(buf)


def recv(sock):
    """Receives one frame: ``(message, fd or None)``, or None if the peer closed
    the connection between frames. The fd (close-on-exec) belongs to the
    caller. A frame cut short, a bad header or body, or a file where none was
    announced (or none where one was) raise :class:`pipeswitch.ProtocolError`."""
    fds = []
    try:
        while True:
            try:
                data, anc, flags, _ = sock.recvmsg(HEADER_BYTES, socket.CMSG_SPACE(2 * 4), _MSG_CMSG_CLOEXEC)
                break
            except InterruptedError:
                continue
            except socket.timeout:
                raise _disconnected("timed out waiting for the peer") from None
            except ConnectionResetError:
                raise _disconnected("the peer reset the connection") from None
            except OSError as e:
                raise _os_error("receiving a frame", e) from None
        for level, typ, payload in anc:
            if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % 4
                fds.extend(struct.unpack("%di" % (usable // 4), payload[:usable]))
        if len(fds) > 1 or flags & getattr(socket, "MSG_CTRUNC", 0x8):
            raise protocol_error("a frame came with more than one file")
        if not data:
            if fds:
                raise protocol_error("a file came without a frame")
            return None
        head = data + _recv_exact(sock, HEADER_BYTES - len(data))
        h = Header.decode(head)
        if h.fds == 0 and fds:
            raise protocol_error("a file came with a frame that announced none")
        if h.fds == 1 and not fds:
            raise protocol_error("a frame announced a file that did not come")
        body = _recv_exact(sock, h.body_len)
        msg = decode_body(h.kind, body)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return msg, (fds[0] if fds else None)


# ---------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------

def pack_tensors(tensors):
    """Packs ``[(name, dtype_code, shape, data)]`` (data: bytes-like) for a
    message: small ones inline, the rest into one new memfd, sealed once
    written (no shrinking, growing or writing: a receiver may map it).
    Returns ``(tensors, fd or None)``; the fd belongs to the caller (close
    it after sending)."""
    items = []
    for name, dtype, shape, data in tensors:
        try:
            mv = memoryview(data)
            if mv.format != "B" or mv.ndim != 1:
                mv = mv.cast("B")
        except (TypeError, ValueError) as e:
            raise ArgumentError(101, "PS_ERR_INVALID_ARGUMENT",
                                "tensor %r: its data is not a contiguous buffer: %s" % (name, e)) from None
        items.append((name, int(dtype), [int(d) for d in shape], mv))
    shared = sum(len(mv) for *_, mv in items if len(mv) > INLINE_LIMIT)
    fd = None
    try:
        if shared:
            try:
                fd = os.memfd_create("pipeswitch-tensors", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
                os.ftruncate(fd, shared)
            except OSError as e:
                raise _os_error("a memfd for %d bytes of tensors" % shared, e) from None
        out, offset = [], 0
        for name, dtype, shape, mv in items:
            if len(mv) > INLINE_LIMIT:
                done = 0
                while done < len(mv):
                    try:
                        done += os.pwrite(fd, mv[done:], offset + done)
                    except OSError as e:
                        raise _os_error("writing tensor %r to shared memory" % name, e) from None
                out.append(Tensor(name, dtype, shape, Shared(offset, len(mv))))
                offset += len(mv)
            else:
                out.append(Tensor(name, dtype, shape, Inline(bytes(mv))))
        if fd is not None:
            try:
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                            fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
            except OSError as e:
                raise _os_error("sealing the tensor memfd", e) from None
    except BaseException:
        if fd is not None:
            os.close(fd)
        raise
    return out, fd


def unpack_tensors(tensors, fd=None, into=None, areas=None):
    """The tensors of a received message with their bytes: ``[(Tensor, data)]``;
    shared ones are read from ``fd``, each range checked against its size.
    ``data`` is ``bytes`` for an inline tensor and a ``bytearray`` (read once,
    not copied again: writable, for ``torch.frombuffer``) for a shared one.
    ``into(i, n)``, when given, may return a writable buffer of at least
    ``n`` bytes for shared tensor ``i`` (e.g. pinned memory): the bytes are
    read straight into it, and ``data`` is a memoryview of its first ``n``.
    A tensor in an input area is read from ``areas`` (area id -> its
    mapping, e.g. from :func:`map_area`): ``data`` is a memoryview of the
    mapping's range, not a copy (``into`` is not asked for it); an area not
    in ``areas`` or a range outside it raises :class:`ProtocolError`,
    before any byte is read."""
    for t in tensors:
        if isinstance(t.data, Area):
            _area_range(areas, t)
    size = None
    if fd is not None:
        try:
            size = os.fstat(_fileno(fd)).st_size
        except OSError as e:
            raise protocol_error("fstat of a tensor file: %s" % e) from None
    out = []
    for i, t in enumerate(tensors):
        if isinstance(t.data, Inline):
            out.append((t, t.data.data))
            continue
        if isinstance(t.data, Area):
            out.append((t, _area_range(areas, t)))
            continue
        off, n = t.data.offset, t.data.bytes
        if size is None:
            raise protocol_error("tensor %r is in a file that did not come" % t.name)
        if off + n > size:
            raise protocol_error("tensor %r claims [%d, +%d) of a %d-byte file" % (t.name, off, n, size))
        given = into(i, n) if into is not None and n > 0 else None
        if given is not None:
            buf = memoryview(given).cast("B")[:n]
            if len(buf) != n or buf.readonly:
                raise ValueError("into(%d, %d) gave a buffer of %d bytes%s" % (i, n, len(buf), " (read-only)" if buf.readonly else ""))
        else:
            buf = bytearray(n)
        view = memoryview(buf)
        try:
            if n >= PARALLEL_READ_BYTES:
                # Large ones in parallel ranges (preadv releases the GIL).
                step = -(-n // READ_THREADS)
                step = -(-step // 4096) * 4096
                jobs = [_reader().submit(_read_range, fd, view, off, a, min(n, a + step), t.name)
                        for a in range(0, n, step)]
                for j in jobs:
                    j.result()
            else:
                _read_range(fd, view, off, 0, n, t.name)
        except OSError as e:
            raise protocol_error("reading tensor %r: %s" % (t.name, e)) from None
        out.append((t, buf))
    return out


def _area_range(areas, t):
    """The memoryview of area tensor ``t``'s bytes in ``areas``, checked."""
    a, off, n = t.data.area, t.data.offset, t.data.bytes
    m = None if areas is None else areas.get(a)
    if m is None:
        raise protocol_error("tensor %r names input area %d, which is not held here" % (t.name, a))
    view = memoryview(m)
    size = view.nbytes
    if off + n > size:
        raise protocol_error("tensor %r: [%d, +%d) lies outside input area %d of %d bytes" % (t.name, off, n, a, size))
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view[off:off + n]


#: A shared tensor at least this large is read by :data:`READ_THREADS` threads.
PARALLEL_READ_BYTES = 4 << 20
READ_THREADS = 4
_READER = []


def _reader():
    """The thread pool that reads large tensors (made on first use)."""
    if not _READER:
        from concurrent.futures import ThreadPoolExecutor
        _READER.append(ThreadPoolExecutor(READ_THREADS, thread_name_prefix="pipeswitch-read"))
    return _READER[0]


def _read_range(fd, view, off, a, b, name):
    """Reads bytes ``[a, b)`` of a tensor at file offset ``off`` into ``view``."""
    done = a
    while done < b:
        got = os.preadv(_fileno(fd), [view[done:b]], off + done)
        if got == 0:
            raise protocol_error("tensor %r: the file ended early" % name)
        done += got


# ---------------------------------------------------------------------------
# Input areas
# ---------------------------------------------------------------------------

#: Where tensors start in an input area: a multiple of this.
AREA_ALIGN = 256


def area_layout(sizes):
    """Where tensors of ``sizes`` bytes go in an input area, as Rust's
    ``ClientArea::pack`` puts them: ``(offsets, end)``, the offset of each
    tensor larger than :data:`INLINE_LIMIT` (None for one that travels
    inline), each at the next multiple of :data:`AREA_ALIGN` from 0, and
    the bytes they take."""
    offsets, end = [], 0
    for n in sizes:
        if n > INLINE_LIMIT:
            at = -(-end // AREA_ALIGN) * AREA_ALIGN
            offsets.append(at)
            end = at + n
        else:
            offsets.append(None)
    return offsets, end


def _area_size(nbytes):
    n = int(nbytes)
    if n <= 0 or n > MAX_SHARED_TENSOR:
        raise ArgumentError(101, "PS_ERR_INVALID_ARGUMENT",
                            "an input area of %d bytes (1 to %d)" % (n, MAX_SHARED_TENSOR))
    return n


_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


def create_area(nbytes):
    """A new input area (the client's side): a memfd of ``nbytes`` bytes (1
    to :data:`MAX_SHARED_TENSOR`) sealed against shrinking and growing (a
    worker's mapping of it can never fault) and against further seals,
    mapped shared for writing, its pages populated now rather than by the
    first request. Returns ``(fd, mapping)``: pass the fd with
    :class:`InputArea`, then close it (the mapping keeps the file)."""
    n = _area_size(nbytes)
    try:
        phys = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        phys = None
    if phys and n > phys:
        # Its pages are populated now: refused here rather than left to the OOM killer.
        raise ArgumentError(101, "PS_ERR_INVALID_ARGUMENT",
                            "an input area of %d bytes is more than this machine's memory (%d bytes)" % (n, phys))
    fd = None
    try:
        try:
            fd = os.memfd_create("pipeswitch-input-area", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            os.ftruncate(fd, n)
        except OSError as e:
            raise _os_error("a memfd for an input area of %d bytes" % n, e) from None
        try:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
        except OSError as e:
            raise _os_error("sealing an input area", e) from None
        try:
            m = mmap.mmap(fd, n, flags=mmap.MAP_SHARED | _POPULATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError, OverflowError) as e:
            raise _os_error("mapping an input area of %d bytes" % n, e) from None
    except BaseException:
        if fd is not None:
            os.close(fd)
        raise
    return fd, m


def check_area_file(fd, nbytes):
    """What the daemon checks of the file a client gives as its input area
    (as Rust's ``area::check_file``): sealed against shrinking, so that a
    mapping of it cannot fault, and at least ``nbytes`` long. Raises
    :class:`pipeswitch.ArgumentError`."""
    try:
        seals = fcntl.fcntl(_fileno(fd), fcntl.F_GET_SEALS)
    except OSError:
        seals = 0
    if not seals & fcntl.F_SEAL_SHRINK:
        raise ArgumentError(101, "PS_ERR_INVALID_ARGUMENT",
                            "an input area must be a memfd sealed against shrinking (F_SEAL_SHRINK)")
    try:
        size = os.fstat(_fileno(fd)).st_size
    except OSError as e:
        raise _os_error("fstat of an input area", e) from None
    if size < nbytes:
        raise ArgumentError(101, "PS_ERR_INVALID_ARGUMENT", "an input area of %d bytes in a file of %d" % (nbytes, size))


def map_area(fd, nbytes):
    """A receiver's (worker's) read-only mapping of the first ``nbytes``
    bytes of an input area's file, checked as :func:`check_area_file` does
    and populated (reading inputs from it takes no page faults)."""
    n = _area_size(nbytes)
    check_area_file(fd, n)
    try:
        return mmap.mmap(_fileno(fd), n, flags=mmap.MAP_SHARED | _POPULATE, prot=mmap.PROT_READ)
    except (OSError, ValueError, OverflowError) as e:
        raise _os_error("mapping an input area of %d bytes" % n, e) from None


# ---------------------------------------------------------------------------
# Clock and paths
# ---------------------------------------------------------------------------

def monotonic_ns():
    """CLOCK_MONOTONIC in ns: comparable between the daemon and its workers."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def default_socket_dir():
    """``$PIPESWITCH_SOCKET_DIR``, else ``$XDG_RUNTIME_DIR/pipeswitch``, else
    ``/tmp/pipeswitch-<uid>`` (as ``pipeswitch::protocol::default_socket_dir``)."""
    d = os.environ.get("PIPESWITCH_SOCKET_DIR")
    if d is not None:
        return d
    d = os.environ.get("XDG_RUNTIME_DIR")
    if d:
        return os.path.join(d, "pipeswitch")
    return "/tmp/pipeswitch-%d" % os.geteuid()


def socket_path(directory, device):
    """The socket of the daemon that serves GPU ``device`` in ``directory``."""
    return os.path.join(directory, "gpu%d.sock" % int(device))

