"""The PyTorch worker (python -m pipeswitch.worker).

CPU, no torch: the protocol loop (pipeswitch.worker.serve) against a fake
daemon on a socket pair with a fake backend (hello, welcome, standby, tasks
with inline and memfd tensors, failed tasks answered and survived,
deactivate, shutdown, EOF), input areas (added, read by tasks, replaced,
dropped; unknown ones and bad files refused with the worker serving on; in
the training loop too), the command line, and the PyTorch backend's
decisions with a fake torch (staging, page-locked input areas).

GPU (skipped without torch, CUDA and the driver): the real worker process
against a fake daemon that owns a real store and arena: pipelined and
resident activations, a moved region, a changed model id, an unknown model,
deactivate and shutdown.
"""

import contextlib
import ctypes
import os
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import types
import uuid

import pytest

import pipeswitch
from pipeswitch import protocol as P
from pipeswitch import worker as W

PKG_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HANDLE = bytes(range(128))


class FakeBackend:
    """Echoes its inputs reversed (bytes reversed too); model "bad" fails
    with a NotFound, model "boom" with a plain exception."""

    def __init__(self, welcome):
        self.welcome = welcome
        self.tasks = []
        self.deactivated = 0
        self.closed = False
        self.areas = []  # ("add", id, bytes) / ("drop", id)

    def run(self, task, inputs):
        self.tasks.append(task)
        if task.model == "bad":
            raise pipeswitch.NotFound(200, "PS_ERR_NOT_FOUND", "no model named 'bad'")
        if task.model == "boom":
            raise RuntimeError("boom")
        outs = [("out%d" % i, t.dtype, t.shape, bytes(data)[::-1]) for i, (t, data) in enumerate(reversed(inputs))]
        return outs, 1.5

    def add_area(self, area_id, mapping):
        self.areas.append(("add", area_id, len(mapping)))

    def drop_area(self, area_id):
        self.areas.append(("drop", area_id))

    def deactivate(self):
        self.deactivated += 1

    def close(self):
        self.closed = True


def start_worker(make_backend=FakeBackend):
    daemon, sock = socket.socketpair()
    daemon.settimeout(10)
    made = []
    result = {}

    def factory(welcome):
        made.append(make_backend(welcome))
        return made[-1]

    def run():
        try:
            W.serve(sock, factory)
            result["ok"] = True
        except BaseException as e:  # checked by the test
            result["error"] = e
        finally:
            sock.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return daemon, t, made, result



def welcome(daemon):
    """The daemon's side of a worker's start: its hello, a welcome (worker 7,
    64 MiB of activations at 1 GiB into the arena), and the worker standing
    by."""
    P.recv(daemon)
    P.send(daemon, P.Welcome(99, 0, "models", 7, HANDLE, 1 << 30, 64 << 20))
    assert P.recv(daemon) == (P.Standby(7), None)

def task(task_id, model, inputs, resident=False):
    return P.Task(task_id, P.TASK_INFERENCE, model, 3, 1 << 20, resident, [0, 2], inputs, P.monotonic_ns())


def test_the_task_loop_with_a_fake_backend():
    daemon, t, made, result = start_worker()
    with daemon:
        hello, fd = P.recv(daemon)
        assert hello == P.Hello(P.ROLE_WORKER, os.getpid(), "torch") and fd is None
        P.send(daemon, P.Welcome(99, 0, "models", 7, HANDLE, 1 << 30, 64 << 20))
        assert P.recv(daemon) == (P.Standby(7), None)
        assert made[0].welcome.arena_handle == HANDLE and made[0].welcome.activation_bytes == 64 << 20
        # A task with an inline and a memfd input.
        big = bytes(i % 253 for i in range(P.INLINE_LIMIT + 10))
        tensors, fd = P.pack_tensors([("a", 11, [2], b"\1\2\3\4\5\6\7\x08"), ("b", 1, [len(big)], big)])
        P.send(daemon, P.Activate(task(1, "m", tensors)), fd)
        os.close(fd)
        done, fd = P.recv(daemon)
        assert isinstance(done, P.TaskDone) and done.task_id == 1 and done.status == 0, done
        assert done.timing.activation_ms == 1.5 and done.timing.worker_ms > 0
        outs = P.unpack_tensors(done.outputs, fd)
        os.close(fd)
        assert [(o.name, o.dtype, o.shape, d) for o, d in outs] == [
            ("out0", 1, [len(big)], big[::-1]), ("out1", 11, [2], b"\x08\7\6\5\4\3\2\1")]
        assert made[0].tasks[0].plan == [0, 2] and made[0].tasks[0].region_offset == 1 << 20
        # Failed tasks are answered with their status; the worker keeps serving.
        P.send(daemon, P.Activate(task(2, "bad", [])))
        done = P.recv(daemon)[0]
        assert (done.task_id, done.status, done.message, done.outputs) == (2, 200, "no model named 'bad'", [])
        P.send(daemon, P.Activate(task(3, "boom", [])))
        done = P.recv(daemon)[0]
        assert (done.task_id, done.status) == (3, 901) and "RuntimeError: boom" in done.message
        # A task whose tensor claims bytes beyond its (missing) file.
        bad = [P.Tensor("x", 1, [4], P.Shared(0, 4))]
        P.send(daemon, P.Activate(task(4, "m", bad)))
        done = P.recv(daemon)[0]
        assert (done.task_id, done.status) == (4, 700) and "did not come" in done.message
        P.send(daemon, P.Activate(task(5, "m", [], resident=True)))
        done = P.recv(daemon)[0]
        assert (done.task_id, done.status, done.outputs) == (5, 0, [])
        assert made[0].tasks[-1].resident
        # Deactivate: cleaned up, standby again.
        P.send(daemon, P.Deactivate())
        assert P.recv(daemon) == (P.Standby(7), None)
        assert made[0].deactivated == 1
        P.send(daemon, P.Shutdown())
        t.join(10)
    assert result == {"ok": True} and made[0].closed


def test_eof_ends_the_worker_and_bad_daemons_are_errors():
    # EOF after standby: a clean end.
    daemon, t, made, result = start_worker()
    P.recv(daemon)
    P.send(daemon, P.Welcome(1, 0, "s", 1, HANDLE))
    P.recv(daemon)
    daemon.close()
    t.join(10)
    assert result == {"ok": True} and made[0].closed
    # A refusal instead of the welcome.
    daemon, t, made, result = start_worker()
    with daemon:
        P.recv(daemon)
        P.send(daemon, P.Error(0, 702, "too many workers"))
        t.join(10)
    assert isinstance(result["error"], pipeswitch.Refused) and not made
    # A welcome without an arena handle.
    daemon, t, made, result = start_worker()
    with daemon:
        P.recv(daemon)
        P.send(daemon, P.Welcome(1, 0, "s", 1, b""))
        t.join(10)
    assert isinstance(result["error"], pipeswitch.ProtocolError) and "arena handle" in str(result["error"])
    # A message a worker does not expect.
    daemon, t, made, result = start_worker()
    with daemon:
        P.recv(daemon)
        P.send(daemon, P.Welcome(1, 0, "s", 1, HANDLE))
        P.recv(daemon)
        P.send(daemon, P.Infer(1, "m", []))
        t.join(10)
    assert isinstance(result["error"], pipeswitch.ProtocolError) and made[0].closed
    # A backend that cannot start: the error comes out, nothing is sent.
    def broken(welcome):
        raise RuntimeError("no GPU here")

    daemon, t, made, result = start_worker(broken)
    with daemon:
        P.recv(daemon)
        P.send(daemon, P.Welcome(1, 0, "s", 1, HANDLE))
        t.join(10)
        assert P.recv(daemon) is None
    assert "no GPU here" in str(result["error"])


def test_status_of_task_errors():
    assert W.status_of(pipeswitch.ArenaFull(203, "PS_ERR_ARENA_FULL", "full")) == 203
    assert W.status_of(W.TaskError(204, "changed")) == 204
    assert W.status_of(RuntimeError("CUDA error: an illegal memory access")) == 302
    assert W.status_of(RuntimeError("CUDA out of memory. Tried to allocate")) == 303
    assert W.status_of(ValueError("bad shape")) == 101
    assert W.status_of(KeyError("x")) == 200
    assert W.status_of(ZeroDivisionError()) == 901


def test_model_specs():
    assert W.parse_models(["a=m:f", "b=x.y:z.w"]) == {"a": "m:f", "b": "x.y:z.w"}
    for bad in (["a"], ["=m:f"], ["a=m:f", "a=m:g"]):
        with pytest.raises(ValueError):
            W.parse_models(bad)
    assert W.load_factory("os.path:join") is os.path.join
    with pytest.raises(ValueError):
        W.load_factory("os.path")
    with pytest.raises(TypeError):
        W.load_factory("os:sep")


def run_cli(args, env_extra=None, timeout=60):
    env = dict(os.environ, PYTHONPATH=PKG_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("PIPESWITCH_SOCKET", None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "pipeswitch.worker"] + args, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_the_command_line():
    r = run_cli(["--models", "a=m:f"])
    assert r.returncode == 2 and "PIPESWITCH_SOCKET" in r.stderr
    r = run_cli(["--models", "nonsense"], {"PIPESWITCH_SOCKET": "/nonexistent"})
    assert r.returncode == 2 and "NAME=module:factory" in r.stderr
    r = run_cli([], {"PIPESWITCH_SOCKET": "/nonexistent/gpu0.sock"})
    assert r.returncode == 1 and "/nonexistent/gpu0.sock" in r.stderr
    # A daemon that accepts, reads the hello and closes: exit 0.
    d = tempfile.mkdtemp()
    path = os.path.join(d, "gpu0.sock")
    lst = socket.socket(socket.AF_UNIX)
    lst.bind(path)
    lst.listen(1)
    seen = []

    def daemon():
        c, _ = lst.accept()
        with c:
            seen.append(P.recv(c)[0])

    th = threading.Thread(target=daemon, daemon=True)
    th.start()
    try:
        r = run_cli(["--models", "a=m:f"], {"PIPESWITCH_SOCKET": path})
        th.join(10)
        assert r.returncode == 0, r.stderr
        assert seen[0].role == P.ROLE_WORKER and seen[0].worker_kind == "torch"
    finally:
        lst.close()
        os.unlink(path)
        os.rmdir(d)


# ---------------------------------------------------------------------------
# Input areas in the protocol loops
# ---------------------------------------------------------------------------

def run_task(daemon, task_id, inputs, fd=None, model="m"):
    P.send(daemon, P.Activate(task(task_id, model, inputs)), fd)
    done, ofd = P.recv(daemon)
    assert isinstance(done, P.TaskDone) and done.task_id == task_id, done
    outs = P.unpack_tensors(done.outputs, ofd) if done.status == 0 else []
    if ofd is not None:
        os.close(ofd)
    return done, [bytes(d) for _, d in outs]


def test_tasks_read_their_inputs_from_input_areas(caplog):
    daemon, t, made, result = start_worker()
    fd, w = P.create_area(1 << 20)
    fd2, w2 = P.create_area(256 << 10)
    try:
        with daemon:
            welcome(daemon)
            # The area comes once; tasks name ranges of it, beside inline and memfd tensors.
            P.send(daemon, P.AreaAdd(3, 1 << 20), fd)
            a, b = os.urandom(P.INLINE_LIMIT + 1), os.urandom(200_000)
            offs, _ = P.area_layout([len(a), 4, len(b)])
            w[offs[0]:offs[0] + len(a)] = a
            w[offs[2]:offs[2] + len(b)] = b
            shared = bytes(range(256)) * 300
            f_tensors, f_fd = P.pack_tensors([("f", 1, [len(shared)], shared)])
            inputs = [P.Tensor("a", 1, [len(a)], P.Area(3, offs[0], len(a))), P.Tensor("s", 1, [4], P.Inline(b"wxyz")),
                      P.Tensor("b", 1, [len(b)], P.Area(3, offs[2], len(b)))] + f_tensors
            done, outs = run_task(daemon, 1, inputs, f_fd)
            os.close(f_fd)
            assert done.status == 0 and outs == [shared[::-1], b[::-1], b"zyxw", a[::-1]]
            assert made[0].areas == [("add", 3, 1 << 20)]
            # The client writes the next request's bytes into the same area: the worker reads them.
            a2 = os.urandom(len(a))
            w[offs[0]:offs[0] + len(a2)] = a2
            done, outs = run_task(daemon, 2, inputs[:1])
            assert done.status == 0 and outs == [a2[::-1]]
            # An area it does not hold, a range outside it: the task fails with that; the worker serves on.
            done, _ = run_task(daemon, 3, [P.Tensor("x", 1, [4], P.Area(4, 0, 4))])
            assert (done.status, done.outputs) == (700, []) and "names input area 4, which is not held here" in done.message
            done, _ = run_task(daemon, 4, [P.Tensor("x", 1, [8], P.Area(3, (1 << 20) - 4, 8))])
            assert done.status == 700 and "lies outside input area 3 of 1048576 bytes" in done.message
            # Another area beside it; then the first is replaced under the same id (a new file).
            P.send(daemon, P.AreaAdd(5, 256 << 10), fd2)
            w2[0:len(a)] = a
            done, outs = run_task(daemon, 5, [P.Tensor("x", 1, [len(a)], P.Area(5, 0, len(a))),
                                              P.Tensor("y", 1, [len(b)], P.Area(3, offs[2], len(b)))])
            assert done.status == 0 and outs == [b[::-1], a[::-1]]
            P.send(daemon, P.AreaAdd(3, 128 << 10), fd2)
            done, outs = run_task(daemon, 6, [P.Tensor("x", 1, [len(a)], P.Area(3, 0, len(a)))])
            assert done.status == 0 and outs == [a[::-1]]
            done, _ = run_task(daemon, 7, [P.Tensor("y", 1, [len(b)], P.Area(3, offs[2], len(b)))])
            assert done.status == 700 and "outside input area 3 of 131072 bytes" in done.message
            assert made[0].areas == [("add", 3, 1 << 20), ("add", 5, 256 << 10), ("drop", 3), ("add", 3, 128 << 10)]
            # Dropped: no longer read; dropping one it does not hold is nothing.
            P.send(daemon, P.AreaDrop(5))
            P.send(daemon, P.AreaDrop(42))
            done, _ = run_task(daemon, 8, [P.Tensor("x", 1, [4], P.Area(5, 0, 4))])
            assert done.status == 700 and "not held here" in done.message
            # Bad files are not held (logged); tasks naming them fail; the worker goes on.
            unsealed = os.memfd_create("unsealed", os.MFD_CLOEXEC)
            os.ftruncate(unsealed, 4096)
            with caplog.at_level("WARNING", logger="pipeswitch.worker"):
                P.send(daemon, P.AreaAdd(6, 4096), unsealed)
                P.send(daemon, P.AreaAdd(7, 2 << 20), fd)  # larger than its file
                P.send(daemon, P.AreaAdd(8, 4096))  # no file
                done, _ = run_task(daemon, 9, [P.Tensor("x", 1, [4], P.Area(6, 0, 4))])
            os.close(unsealed)
            assert done.status == 700 and "not held here" in done.message
            text = caplog.text
            assert "input area 6 not held" in text and "F_SEAL_SHRINK" in text
            assert "input area 7 not held" in text and "in a file of 1048576" in text
            assert "input area 8 came without its file" in text
            done, outs = run_task(daemon, 10, inputs[1:2])
            assert done.status == 0 and outs == [b"zyxw"]
            P.send(daemon, P.Shutdown())
            t.join(10)
        assert result == {"ok": True} and made[0].closed
        # The areas still held were given back before the backend closed.
        assert made[0].areas[-1] == ("drop", 3)
    finally:
        w.close()
        w2.close()
        os.close(fd)
        os.close(fd2)


def test_the_python_client_and_worker_share_an_area_through_a_relaying_daemon():
    """The client's area, passed on as the daemon does (its file in AreaAdd
    to the worker; Infer forwarded as Activate with the same tensors): the
    worker reads each request's inputs from its own mapping of the client's
    file, at the offsets the client wrote them to."""
    from test_client import FakeDaemon

    from pipeswitch.client import Client

    worker, t, made, result = start_worker()
    welcome(worker)
    areas = []

    def relay(conn, msg, fd):
        if isinstance(msg, P.InputArea):
            P.check_area_file(fd, msg.bytes)
            areas.append(msg.bytes)
            if len(areas) > 1:
                P.send(worker, P.AreaDrop(len(areas) - 1))
            P.send(worker, P.AreaAdd(len(areas), msg.bytes), fd)
            P.send(conn, P.InputAreaReady(msg.request_id, len(areas), msg.bytes))
            return
        assert isinstance(msg, P.Infer)
        P.send(worker, P.Activate(task(msg.request_id, msg.model, msg.inputs)), fd)
        done, ofd = P.recv(worker)
        try:
            if done.status:
                P.send(conn, P.Error(msg.request_id, done.status, done.message))
            else:
                P.send(conn, P.InferResult(msg.request_id, done.outputs, done.timing), ofd)
        finally:
            if ofd is not None:
                os.close(ofd)

    d = FakeDaemon(relay)
    try:
        with Client(socket=d.path, timeout=10, numpy=False) as c:
            for i in range(3):
                a, b = os.urandom(P.INLINE_LIMIT + 1 + i), os.urandom(300_000)
                out = c.infer("m", [("a", a, "U8", [len(a)]), ("s", b"\1\2", "U8", [2]), ("b", b, "U8", [len(b)])])
                assert [out["out%d" % k][0] for k in range(3)] == [b[::-1], b"\2\1", a[::-1]]
            big = os.urandom((16 << 20) + 1)  # a larger area replaces the first
            out = c.infer("m", {"big": (big, "U8", [len(big)])})
            assert out["out0"][0] == big[::-1]
            assert areas == [16 << 20, 32 << 20] and c.input_area_id == 2
            assert [tk.inputs[0].data for tk in made[0].tasks[-2:]] == [P.Area(1, 0, P.INLINE_LIMIT + 3),
                                                                       P.Area(2, 0, len(big))]
        P.send(worker, P.Shutdown())
        t.join(10)
    finally:
        d.close()
        worker.close()
    assert not d.errors and result == {"ok": True}
    assert made[0].areas == [("add", 1, 16 << 20), ("drop", 1), ("add", 2, 32 << 20), ("drop", 2)]


class _Steps:
    """A training run of counted steps, 2 ms each."""

    def __init__(self):
        self.it = 0

    def step(self, i, stop):
        stop.wait(0.002)
        self.it = i
        return True

    def state_bytes(self):
        return 8

    def restore_held(self):
        pass

    def save(self, mode):
        pass

    def close(self):
        pass


def test_areas_come_and_go_while_a_training_task_runs():
    class Backend(FakeBackend):
        def train_job(self, task):
            return _Steps()

    daemon, t, made, result = start_worker(Backend)
    fd, w = P.create_area(1 << 16)
    try:
        with daemon:
            welcome(daemon)
            j = P.TrainJob("steps", "x:y", iterations=0)
            P.send(daemon, P.TrainStart(P.TrainTask(20, 1, j, "/nonexistent", 0, P.monotonic_ns())))
            assert P.recv(daemon)[0].event == P.PROGRESS_RESUMED
            P.recv(daemon)  # a step done: the loop runs
            P.send(daemon, P.AreaAdd(9, 1 << 16), fd)
            P.send(daemon, P.AreaDrop(9))
            P.send(daemon, P.AreaAdd(10, 1 << 16), fd)
            P.send(daemon, P.Preempt(20, P.PREEMPT_BOUNDARY, P.SAVE_RESIDENT, P.monotonic_ns()))
            while True:
                m = P.recv(daemon)[0]
                if isinstance(m, P.TrainStopped):
                    break
                assert isinstance(m, P.TrainProgress), m
            assert m.reason == P.STOP_PREEMPTED, m
            assert made[0].areas == [("add", 9, 1 << 16), ("drop", 9), ("add", 10, 1 << 16)]
            # The inference loop reads from the area the training loop took.
            w[0:4] = b"abcd"
            done, outs = run_task(daemon, 21, [P.Tensor("x", 1, [4], P.Area(10, 0, 4))])
            assert done.status == 0 and outs == [b"dcba"]
            P.send(daemon, P.Shutdown())
            t.join(10)
        assert result == {"ok": True}
    finally:
        w.close()
        os.close(fd)


# ---------------------------------------------------------------------------
# TorchBackend.run's decisions with a fake torch and a fake pipeswitch.torch.Worker
# ---------------------------------------------------------------------------

class _DType:
    def __init__(self, name, size):
        self.name, self.size = name, size

    def __str__(self):
        return "torch." + self.name


class _FakeTensor:
    """Bytes with a dtype and a shape; ``device`` records where it went.
    ``share``: ``data`` (a buffer) is used, not copied, as torch's slices,
    views and ``frombuffer`` share memory. A read-only buffer (an input
    area's mapping) gets a made-up address; ``registered`` (the fake
    torch's list of page-locked ``(address, bytes)``) makes ``is_pinned``
    true inside them, as CUDA's registration does."""

    _next_addr = [1 << 44]

    def __init__(self, data, dtype, shape, device="cpu", share=False, log=None, pinned=False, addr=None,
                 registered=None):
        self.buf = data if share else bytearray(data)
        self.dtype, self.shape, self.device = dtype, list(shape), device
        self.log, self.pinned, self.registered = log, pinned, registered
        self._c = None
        if addr is None and len(self.buf) and memoryview(self.buf).readonly:
            addr = self._next_addr[0]
            self._next_addr[0] += 1 << 32
        elif addr is None and len(self.buf):
            self._c = (ctypes.c_char * len(self.buf)).from_buffer(self.buf)
        self._addr = addr

    def _like(self, buf, dtype, shape, addr=None):
        return _FakeTensor(buf, dtype, shape, self.device, share=True, log=self.log, pinned=self.pinned, addr=addr,
                           registered=self.registered)

    def view(self, dtype):
        return self._like(self.buf, dtype, [len(self.buf) // dtype.size], self._addr)

    def reshape(self, shape):
        return self._like(self.buf, self.dtype, shape, self._addr)

    def __getitem__(self, sl):
        assert isinstance(sl, slice) and self.dtype.size == 1 and sl.step is None
        mv = memoryview(self.buf)[sl]
        start = sl.indices(len(self.buf))[0]
        return self._like(mv, self.dtype, [len(mv)], None if self._addr is None else self._addr + start)

    def is_pinned(self):
        p = self.data_ptr()
        return self.pinned or any(a <= p < a + n for a, n in (self.registered or []))

    def copy_(self, src, non_blocking=False):
        assert len(src.buf) == len(self.buf), "copy_ of %d bytes into %d" % (len(src.buf), len(self.buf))
        self.buf[:] = bytes(src.buf)
        if self.log is not None:
            self.log.append(("copy", src.device, "pinned" if src.is_pinned() else "", self.device,
                             "pinned" if self.is_pinned() else "", non_blocking))
        return self

    def numpy(self):
        return self.buf

    def to(self, device, non_blocking=False):
        return _FakeTensor(self.buf, self.dtype, self.shape, str(device))

    def detach(self):
        return self

    def contiguous(self):
        return self

    def numel(self):
        return len(self.buf) // self.dtype.size

    def element_size(self):
        return self.dtype.size

    def data_ptr(self):
        if self._addr is not None:
            return self._addr
        return ctypes.addressof(self._c) if self._c is not None else 0


class _FakeTorch:
    Tensor = _FakeTensor
    uint8 = _DType("uint8", 1)
    float32 = _DType("float32", 4)
    int64 = _DType("int64", 8)

    def __init__(self):
        self.synced = 0
        self.stream_synced = 0
        self.log = []
        self.registered = []

    def inference_mode(self):
        return contextlib.nullcontext()

    def frombuffer(self, buf, dtype):
        mv = memoryview(buf)
        if mv.readonly:
            import warnings

            warnings.warn("The given buffer is not writable, and PyTorch does not support non-writable tensors.")
        return _FakeTensor(mv, dtype, [mv.nbytes], share=True, log=self.log, registered=self.registered)

    def empty(self, shape, dtype, device=None, pin_memory=False):
        shape = [shape] if isinstance(shape, int) else list(shape)
        n = 1
        for d in shape:
            n *= d
        if pin_memory or device is not None:
            self.log.append(("alloc", str(device) if device is not None else "pinned", n * dtype.size))
        return _FakeTensor(bytes(n * dtype.size), dtype, shape, str(device) if device is not None else "cpu",
                           log=self.log, pinned=pin_memory)

    @property
    def cuda(self):
        fake = self

        class Stream:
            @staticmethod
            def synchronize():
                fake.stream_synced += 1
                fake.log.append(("stream synchronize",))

        class Cuda:
            @staticmethod
            def synchronize(device=None):
                fake.synced += 1

            @staticmethod
            def current_stream(device=None):
                return Stream
        return Cuda


class _FakeStore:
    def __init__(self, ids):
        self.ids = ids

    def model_info(self, name):
        if name not in self.ids:
            raise pipeswitch.NotFound(200, "PS_ERR_NOT_FOUND", "no model %r" % name)
        return types.SimpleNamespace(name=name, id=self.ids[name], bytes=1024)

    def model_id(self, name):
        return self.model_info(name).id


class _FakeTorchWorker:
    def __init__(self):
        self._models, self._current, self.calls = {}, None, []

    def attach(self, module, name, region_offset=None, plan=None):
        self.calls.append(("attach", name, region_offset, plan))
        self._models[name] = types.SimpleNamespace(info=self.store.model_info(name), module=module, version=1)

    def detach(self, name):
        self.calls.append(("detach", name))
        del self._models[name]

    def switch_to(self, name, region_offset=None, plan=None, resident=False):
        self.calls.append(("switch_to", name, region_offset, plan, resident))
        self._current = None if resident else name

    def rebind(self, name, region_offset=None, plan=None):
        self.calls.append(("rebind", name, region_offset, plan))

    def synchronize(self):
        self.calls.append(("synchronize",))

    def close(self):
        self.calls.append(("close",))


def test_graphs_are_captured_once_per_signature_and_again_after_a_rebind(monkeypatch):
    """--graphs: the first request of a model and input signature captures
    its forward, later ones replay it, a rebind (new version) captures again,
    and a forward that cannot be captured runs eagerly from then on."""
    eager = []

    def module(x):
        eager.append(x)
        return x

    b, torch = fake_backend(monkeypatch, {"m": 7, "bad": 3}, {"m": module, "bad": module})
    b.graphs = True
    captures = []

    class Cap:
        def __init__(self, version):
            self.version = version
            self.calls = 0

        def __call__(self, *args):
            self.calls += 1
            return args[0]

    def capture(name, args):
        captures.append(name)
        if name == "bad":
            raise RuntimeError("operation not permitted when stream is capturing")
        return Cap(b.worker._models[name].version)

    b.worker.capture = capture
    x = struct.pack("<4f", 1, 2, 3, 4)
    inputs = [(P.Tensor("x", pipeswitch.PS_DTYPE_F32, [2, 2], P.Inline(x)), x)]
    x8 = struct.pack("<8f", *range(8))
    inputs8 = [(P.Tensor("x", pipeswitch.PS_DTYPE_F32, [2, 4], P.Inline(x8)), x8)]
    b.run(ftask("m", 7, inputs), inputs)
    b.worker._models["m"].version = 1
    for _ in range(3):
        b.run(ftask("m", 7, inputs), inputs)
    assert captures == ["m"] and eager == [], "one capture, then replays"
    b.run(ftask("m", 7, inputs8), inputs8)  # another shape: another graph
    assert captures == ["m", "m"]
    b.worker._models["m"].version = 2  # rebound: the graph is stale
    b.run(ftask("m", 7, inputs), inputs)
    assert captures == ["m", "m", "m"] and eager == []
    for _ in range(2):
        outs, _ = b.run(ftask("bad", 3, inputs), inputs)
        assert outs[0][3] == x
    assert captures.count("bad") == 1 and len(eager) == 2, "tried once, eager after"


def test_fused_switches_replay_one_graph_and_hits_the_resident_one(monkeypatch):
    """--graphs with fusing (the default): a switch binds the daemon's
    region and plan without switching and replays the fused graph (the
    copies and the forward); a resident request switches to the resident
    model and replays its forward; a model whose switch cannot be fused is
    captured plain and switched with switch_to; a rebind captures again."""
    b, torch = fake_backend(monkeypatch, {"m": 7, "nofuse": 3}, {"m": lambda x: x, "nofuse": lambda x: x})
    b.graphs, b.fused = True, True
    captures = []

    class Cap:
        def __init__(self, version, fused):
            self.version, self.fused = version, fused
            self.runs = []

        def __call__(self, *args):
            self.runs.append("resident")
            return args[0]

        def switch_and_run(self, *args):
            assert self.fused
            self.runs.append("fused")
            return args[0]

    def capture(name, args, fused=False):
        captures.append((name, fused))
        if name == "nofuse" and fused:
            raise RuntimeError("a table read from the host cannot be fused")
        return Cap(b.worker._models[name].version, fused)

    b.worker.capture = capture
    x = struct.pack("<4f", 1, 2, 3, 4)
    inputs = [(P.Tensor("x", pipeswitch.PS_DTYPE_F32, [2, 2], P.Inline(x)), x)]
    outs, activation = b.run(ftask("m", 7, inputs, offset=8192, plan=(0, 3)), inputs)
    assert outs[0][3] == x and activation > 0
    (cap,) = [c for k, c in b.captured.items() if k[0] == "m"]
    assert captures == [("m", True)] and cap.runs == ["fused"]
    assert ("rebind", "m", 8192, [0, 3]) in b.worker.calls
    assert not any(c[0] == "switch_to" for c in b.worker.calls), "the fused graph makes the switch"
    b.run(ftask("m", 7, inputs, offset=8192, plan=(0, 3), resident=True), inputs)
    assert cap.runs == ["fused", "resident"] and b.worker.calls[-1] == ("switch_to", "m", 8192, None, True)
    b.run(ftask("m", 7, inputs, offset=8192, plan=(0, 3)), inputs)
    assert cap.runs == ["fused", "resident", "fused"] and captures == [("m", True)]
    b.worker._models["m"].version = 2  # rebound: captured again
    b.run(ftask("m", 7, inputs, offset=0, plan=(0, 1)), inputs)
    assert captures == [("m", True), ("m", True)]
    # Not fusable: captured plain once, switched with switch_to, replayed.
    for _ in range(2):
        outs, _ = b.run(ftask("nofuse", 3, inputs), inputs)
        assert outs[0][3] == x
    assert captures[2:] == [("nofuse", True), ("nofuse", False)]
    (plain,) = [c for k, c in b.captured.items() if k[0] == "nofuse"]
    assert not plain.fused and plain.runs == ["resident", "resident"]
    assert b.worker.calls[-1] == ("switch_to", "nofuse", 4096, [0, 2], False)


def fake_backend(monkeypatch, ids, modules):
    torch = _FakeTorch()
    monkeypatch.setitem(sys.modules, "torch", torch)
    b = object.__new__(W.TorchBackend)
    b._torch = torch
    b._torch_dtype = {"F32": torch.float32, "I64": torch.int64, "U8": torch.uint8}.__getitem__
    b.device = "cuda:0"
    b.store = _FakeStore(ids)
    b.worker = _FakeTorchWorker()
    b.worker.store = b.store
    b.modules = modules
    b.arena = types.SimpleNamespace(size=lambda: 1 << 30)
    b.graphs, b.fused, b.captured = False, False, {}
    b._staging = {}
    b._areas, b._area_warned = {}, False
    b._cu_register = b._cu_unregister = None  # no driver: set by the tests that page-lock
    return b, torch


def ftask(model, model_id, inputs, offset=4096, plan=(0, 2), resident=False):
    return P.Task(1, P.TASK_INFERENCE, model, model_id, offset, resident, list(plan), [], P.monotonic_ns() - 5_000_000)


def test_torch_backend_decisions_with_a_fake_torch(monkeypatch):
    seen = []

    def double_and_sum(x, y):
        seen.append((x, y))
        return {"first": x, "pair": (y, None)}

    b, torch = fake_backend(monkeypatch, {"m": 7, "other": 1}, {"m": double_and_sum, "nostore": lambda: None})
    x = struct.pack("<4f", 1, 2, 3, 4)
    y = struct.pack("<2q", 5, -6)
    inputs = [(P.Tensor("x", pipeswitch.PS_DTYPE_F32, [2, 2], P.Inline(x)), x),
              (P.Tensor("y", pipeswitch.PS_DTYPE_I64, [2], P.Inline(y)), y)]
    outs, activation_ms = b.run(ftask("m", 7, inputs), inputs)
    # Attached at the task's region with its plan, then switched with both.
    assert b.worker.calls == [("attach", "m", 4096, [0, 2]), ("switch_to", "m", 4096, [0, 2], False)]
    assert activation_ms >= 5
    (gx, gy), = seen
    assert (gx.device, gx.dtype.name, gx.shape, bytes(gx.buf)) == ("cuda:0", "float32", [2, 2], x)
    assert (gy.device, gy.dtype.name, gy.shape, bytes(gy.buf)) == ("cuda:0", "int64", [2], y)
    assert outs == [("first", pipeswitch.PS_DTYPE_F32, [2, 2], x), ("pair.0", pipeswitch.PS_DTYPE_I64, [2], y)]
    # A resident hit: no new attach, no plan (no rebind for the plan), resident.
    b.worker.calls.clear()
    b.run(ftask("m", 7, inputs, offset=8192, plan=[0], resident=True), inputs)
    assert b.worker.calls == [("switch_to", "m", 8192, None, True)]
    # The stored model changed since the daemon decided: refused with 204.
    with pytest.raises(W.TaskError) as e:
        b.run(ftask("m", 8, inputs), inputs)
    assert e.value.status == 204 and "changed" in str(e.value)
    # The store now has a new "m" (id 8): detached and attached afresh.
    b.store.ids["m"] = 8
    b.worker.calls.clear()
    b.run(ftask("m", 8, inputs), inputs)
    assert [c[0] for c in b.worker.calls] == ["detach", "attach", "switch_to"]
    # No module for the model: 200; not in the store: NotFound.
    with pytest.raises(W.TaskError) as e:
        b.run(ftask("other", 1, inputs), inputs)
    assert e.value.status == 200 and "no module" in str(e.value)
    with pytest.raises(pipeswitch.NotFound):
        b.run(ftask("nostore", 1, inputs), inputs)
    # Training tasks are not run as inference.
    t = ftask("m", 8, inputs)
    t.kind = P.TASK_TRAINING
    with pytest.raises(W.TaskError) as e:
        b.run(t, inputs)
    assert e.value.status == 101 and "inference" in str(e.value)
    # Inputs whose bytes do not match their shape: 101, before the forward.
    seen.clear()
    bad = [(P.Tensor("x", pipeswitch.PS_DTYPE_F32, [3], P.Inline(x)), x)]
    with pytest.raises(W.TaskError) as e:
        b.run(ftask("m", 8, bad), bad)
    assert e.value.status == 101 and not seen
    # Deactivate synchronizes the device, and the switch only when one is in flight.
    b.worker.calls.clear()
    b.deactivate()
    assert torch.synced == 1 and b.worker.calls == [("synchronize",)]
    b.worker._current = None
    b.deactivate()
    assert torch.synced == 2 and b.worker.calls == [("synchronize",)]


def test_inputs_are_staged_through_pinned_memory_before_the_switch(monkeypatch):
    """A request's inputs reach the device through pinned buffers kept per
    input position, copied without a host wait and before the switch starts
    (its copies share the copy engine); a shared input is read from its
    file straight into the pinned buffer (no second host copy)."""
    seen = []

    def module(x, y):
        seen.append((x.device, bytes(x.buf), bytes(y.buf)))
        return x

    b, torch = fake_backend(monkeypatch, {"m": 7}, {"m": module})
    switch_to = b.worker.switch_to

    def logged_switch_to(*a, **k):
        torch.log.append(("switch_to",))
        return switch_to(*a, **k)
    b.worker.switch_to = logged_switch_to
    big = bytes(range(256)) * (P.INLINE_LIMIT // 256 + 8)
    small = struct.pack("<2q", 5, -6)
    tensors, fd = P.pack_tensors([("x", pipeswitch.PS_DTYPE_U8, [len(big)], big),
                                  ("y", pipeswitch.PS_DTYPE_I64, [2], small)])
    try:
        assert fd is not None and isinstance(tensors[1].data, P.Inline)
        inputs = P.unpack_tensors(tensors, fd, into=b.input_buffer)
        assert isinstance(inputs[0][1], memoryview), "the shared input was read into the given buffer"
        b.run(ftask("m", 7, inputs), inputs)
        assert seen == [("cuda:0", big, small)]
        kinds = [e[0] for e in torch.log]
        assert kinds.index("switch_to") > max(i for i, k in enumerate(kinds) if k == "copy"), torch.log
        copies = [e for e in torch.log if e[0] == "copy"]
        # x: straight from its file into pinned memory, then one H2D copy;
        # y (inline): one host copy into pinned memory, then one H2D copy.
        assert copies == [("copy", "cpu", "pinned", "cuda:0", "", True),
                          ("copy", "cpu", "", "cpu", "pinned", False),
                          ("copy", "cpu", "pinned", "cuda:0", "", True)], copies
        allocs = [e for e in torch.log if e[0] == "alloc"]
        assert allocs == [("alloc", "pinned", len(big)), ("alloc", "cuda:0", len(big)),
                          ("alloc", "pinned", 16), ("alloc", "cuda:0", 16)]
        # The next request of the same sizes reuses the buffers.
        torch.log.clear()
        inputs = P.unpack_tensors(tensors, fd, into=b.input_buffer)
        b.run(ftask("m", 7, inputs), inputs)
        assert [e for e in torch.log if e[0] == "alloc"] == [] and seen[-1] == ("cuda:0", big, small)
        # into() must give a writable buffer of the size asked for.
        with pytest.raises(ValueError):
            P.unpack_tensors(tensors, fd, into=lambda i, n: bytes(n))
        with pytest.raises(ValueError):
            P.unpack_tensors(tensors, fd, into=lambda i, n: bytearray(n - 1))
    finally:
        os.close(fd)


def test_inputs_in_a_page_locked_area_are_copied_straight_to_the_device(monkeypatch, caplog):
    """An input area is page-locked once (portable, read-only) when it comes;
    a task's input in it is one copy to the device from the area itself (no
    pinned staging buffer, no host copy), before the switch; dropped, it is
    unregistered after the stream's copies. An area that cannot be
    page-locked is logged once and its inputs are staged as a file's are."""
    import warnings

    seen = []

    def module(x, y):
        seen.append((x.device, bytes(x.buf), bytes(y.buf)))
        return x

    b, torch = fake_backend(monkeypatch, {"m": 7}, {"m": module})
    calls = []
    result = {"register": 0, "track": True}

    def register(ptr, n, flags):
        calls.append(("register", ptr, n, flags))
        if result["register"] == 0 and result["track"]:
            torch.registered.append((ptr, n))
        return result["register"]

    def unregister(ptr):
        calls.append(("unregister", ptr))
        torch.registered[:] = [r for r in torch.registered if r[0] != ptr]
        return 0

    b._cu_register, b._cu_unregister = register, unregister
    switch_to = b.worker.switch_to

    def logged_switch_to(*a, **k):
        torch.log.append(("switch_to",))
        return switch_to(*a, **k)
    b.worker.switch_to = logged_switch_to

    fd, w = P.create_area(1 << 20)
    try:
        m = P.map_area(fd, 1 << 20)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the read-only warning is silenced
            assert b.add_area(3, m) is True
        ptr = b._areas[3][0].data_ptr()
        assert calls == [("register", ptr, 1 << 20, 1 | 8)]
        x = os.urandom(P.INLINE_LIMIT + 4)
        y = struct.pack("<2q", 5, -6)
        offs, _ = P.area_layout([len(x), len(y)])
        w[offs[0]:offs[0] + len(x)] = x
        tensors = [P.Tensor("x", pipeswitch.PS_DTYPE_U8, [len(x)], P.Area(3, offs[0], len(x))),
                   P.Tensor("y", pipeswitch.PS_DTYPE_I64, [2], P.Inline(y))]
        inputs = P.unpack_tensors(tensors, None, areas={3: m})
        b.run(ftask("m", 7, inputs), inputs)
        assert seen == [("cuda:0", x, y)]
        kinds = [e[0] for e in torch.log]
        assert kinds.index("switch_to") > max(i for i, k in enumerate(kinds) if k == "copy"), torch.log
        # x: one copy, from page-locked memory (the area: no pinned buffer was made for it);
        # y (inline): into pinned memory, then to the device.
        assert [e for e in torch.log if e[0] == "copy"] == [("copy", "cpu", "pinned", "cuda:0", "", True),
                                                           ("copy", "cpu", "", "cpu", "pinned", False),
                                                           ("copy", "cpu", "pinned", "cuda:0", "", True)], torch.log
        assert [e for e in torch.log if e[0] == "alloc"] == [("alloc", "cuda:0", len(x)), ("alloc", "pinned", 16),
                                                            ("alloc", "cuda:0", 16)]
        # The next request's bytes, written by the client into the area, are what the module gets.
        x2 = os.urandom(len(x))
        w[offs[0]:offs[0] + len(x2)] = x2
        torch.log.clear()
        b.run(ftask("m", 7, inputs), inputs)
        assert seen[-1] == ("cuda:0", x2, y) and [e for e in torch.log if e[0] == "alloc"] == []
        # Dropped: the stream's copies are waited for, then it is unregistered.
        torch.log.clear()
        b.drop_area(3)
        assert calls[-1] == ("unregister", ptr) and torch.log == [("stream synchronize",)]
        assert 3 not in b._areas
        del inputs
        m.close()  # nothing of the backend's keeps a view of it

        # Registration fails: logged once, read as it is through the pinned staging.
        result["register"] = 1
        m = P.map_area(fd, 1 << 20)
        with caplog.at_level("DEBUG", logger="pipeswitch.worker"):
            assert b.add_area(4, m) is False
            assert b.add_area(5, m) is False
        warned = [r for r in caplog.records if r.levelname == "WARNING"]
        assert len(warned) == 1 and "input area 4 is not page-locked" in warned[0].getMessage()
        assert "CUresult 1" in warned[0].getMessage()
        assert any("input area 5 is not page-locked" in r.getMessage() for r in caplog.records if r.levelname == "DEBUG")
        tensors[0].data.area = 4
        inputs = P.unpack_tensors(tensors, None, areas={4: m})
        torch.log.clear()
        b.run(ftask("m", 7, inputs), inputs)
        assert seen[-1] == ("cuda:0", x2, y)
        assert [e for e in torch.log if e[0] == "copy"][:2] == [("copy", "cpu", "", "cpu", "pinned", False),
                                                                ("copy", "cpu", "pinned", "cuda:0", "", True)]
        assert [e for e in torch.log if e[0] == "alloc"] == [("alloc", "pinned", len(x))], "a pinned buffer for x now"
        n_calls = len(calls)
        b.drop_area(4)
        b.drop_area(5)
        assert len(calls) == n_calls, "nothing to unregister"
        # Registered, but PyTorch does not see it pinned: unregistered again, not used as page-locked.
        result["register"], result["track"] = 0, False
        assert b.add_area(6, m) is False
        assert calls[-2:] == [("register", b._areas[6][0].data_ptr(), 1 << 20, 9), ("unregister", b._areas[6][0].data_ptr())]
        b.drop_area(6)
        # No driver library: the same.
        def no_driver(ptr, n, flags):
            raise OSError("libcuda.so.1: cannot open shared object file")
        b._cu_register = no_driver
        caplog.clear()
        b._area_warned = False
        with caplog.at_level("WARNING", logger="pipeswitch.worker"):
            assert b.add_area(7, m) is False
        assert "the CUDA driver: libcuda.so.1" in caplog.text
        b.drop_area(7)
        del inputs
        m.close()
    finally:
        w.close()
        os.close(fd)


def test_outputs_are_named_like_the_forward_returns_them(monkeypatch):
    torch = _FakeTorch()
    monkeypatch.setitem(sys.modules, "torch", torch)
    t = [_FakeTensor(b"\0" * 4, torch.float32, [1]) for _ in range(4)]
    assert W.outputs_of(t[0]) == [("out0", t[0])]
    assert W.outputs_of((t[0], None, [t[1], t[2]])) == [("out0", t[0]), ("out2.0", t[1]), ("out2.1", t[2])]
    assert W.outputs_of({"logits": t[0], "past": ((t[1], t[2]),), "none": None}) == [
        ("logits", t[0]), ("past.0.0", t[1]), ("past.0.1", t[2])]
    assert W.outputs_of([{"a": t[3]}]) == [("out0.a", t[3])]
    with pytest.raises(TypeError, match="str"):
        W.outputs_of("text")


# ---------------------------------------------------------------------------
# GPU: the real worker process
# ---------------------------------------------------------------------------

MODELS_PY = textwrap.dedent("""
    import torch
    from torch import nn

    def mlp():
        return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                             nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(8, 8)
            self.a = nn.Linear(8, 3)
            self.b = nn.Linear(8, 2)

        def forward(self, x, y):
            h = torch.relu(self.body(x + y))
            return {"logits": self.a(h), "extra": (self.b(h), None)}

    def two_heads():
        with torch.device("meta"):
            return TwoHeads()
""")


def _gpu_ready():
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available() and pipeswitch.driver_available()


gpu = pytest.mark.skipif(not _gpu_ready(), reason="needs torch, a CUDA GPU and the driver")


@gpu
def test_the_torch_worker_process_serves_a_fake_daemon(tmp_path):
    import torch

    from pipeswitch.torch import register_module

    sys.path.insert(0, str(tmp_path))
    (tmp_path / "psw_models.py").write_text(MODELS_PY)
    import psw_models

    name = "worker-%s" % uuid.uuid4().hex[:12]
    store = pipeswitch.Store.create(name, 64 << 20)
    arena = pipeswitch.Arena.create(0, 64 << 20, 8 << 20)
    proc = None
    try:
        torch.manual_seed(0)
        ref_mlp, ref_two = psw_models.mlp(), psw_models.TwoHeads()
        x = torch.randn(16, 32)
        register_module(store, "mlp", ref_mlp, (x,), measure=False)
        x8, y8 = torch.randn(4, 8), torch.randn(4, 8)
        register_module(store, "two", ref_two, (x8, y8), measure=False)
        mlp_info = store.model_info("mlp")
        region = arena.alloc(mlp_info.bytes)
        region2 = arena.alloc(mlp_info.bytes)
        region3 = arena.alloc(store.model_info("two").bytes)
        act = arena.alloc(4 << 20)

        path = str(tmp_path / "gpu0.sock")
        lst = socket.socket(socket.AF_UNIX)
        lst.bind(path)
        lst.listen(1)
        lst.settimeout(120)
        env = dict(os.environ, PIPESWITCH_SOCKET=path,
                   PYTHONPATH=os.pathsep.join([str(tmp_path), PKG_ROOT, os.environ.get("PYTHONPATH", "")]))
        worker_log = open(tmp_path / "worker.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "pipeswitch.worker", "--models", "mlp=psw_models:mlp",
                                 "two=psw_models:two_heads"], env=env, stderr=worker_log)
        conn, _ = lst.accept()
        conn.settimeout(120)
        hello = P.recv(conn)[0]
        assert hello.role == P.ROLE_WORKER and hello.worker_kind == "torch" and hello.pid == proc.pid
        P.send(conn, P.Welcome(os.getpid(), 0, name, 4, arena.export(), act, 4 << 20))
        assert P.recv(conn) == (P.Standby(4), None)

        def activate(task_id, model, inputs, offset, plan, resident=False, model_id=None):
            mid = store.model_info(model).id if model_id is None else model_id
            packed, fd = P.pack_tensors([(n, pipeswitch.dtype_code(str(t.dtype)), list(t.shape),
                                          t.contiguous().numpy().tobytes()) for n, t in inputs])
            P.send(conn, P.Activate(P.Task(task_id, P.TASK_INFERENCE, model, mid, offset, resident, plan, packed,
                                           P.monotonic_ns())), fd)
            if fd is not None:
                os.close(fd)
            done, fd = P.recv(conn)
            assert done.task_id == task_id
            outs = {}
            if done.status == 0:
                for t, data in P.unpack_tensors(done.outputs, fd):
                    assert t.dtype == pipeswitch.PS_DTYPE_F32
                    outs[t.name] = torch.frombuffer(bytearray(data), dtype=torch.float32).reshape(t.shape)
            if fd is not None:
                os.close(fd)
            return done, outs

        with torch.no_grad():
            ref = ref_mlp(x)
            n_layers = len(mlp_info.layers)
            # Pipelined, one group per layer.
            done, outs = activate(1, "mlp", [("x", x)], region, list(range(n_layers)))
            assert done.status == 0, done.message
            torch.testing.assert_close(outs["out0"], ref, rtol=1e-5, atol=1e-5)
            assert 0 < done.timing.activation_ms < 60_000 and done.timing.worker_ms > 0
            # Resident (no copy), a large input and output through memfds.
            xb = torch.randn(2048, 32)
            done, outs = activate(2, "mlp", [("x", xb)], region, [0], resident=True)
            assert done.status == 0, done.message
            assert isinstance(done.outputs[0].data, P.Shared)
            torch.testing.assert_close(outs["out0"], ref_mlp(xb), rtol=1e-5, atol=1e-5)
            # Moved to another region with another plan.
            P.send(conn, P.Deactivate())
            assert P.recv(conn) == (P.Standby(4), None)
            done, outs = activate(3, "mlp", [("x", x)], region2, [0, 2])
            assert done.status == 0, done.message
            torch.testing.assert_close(outs["out0"], ref, rtol=1e-5, atol=1e-5)
            # A dict output with a nested tuple; two positional inputs.
            done, outs = activate(4, "two", [("x", x8), ("y", y8)], region3, [0, 1])
            assert done.status == 0, done.message
            r = ref_two(x8, y8)
            assert sorted(outs) == ["extra.0", "logits"]
            torch.testing.assert_close(outs["logits"], r["logits"], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(outs["extra.0"], r["extra"][0], rtol=1e-5, atol=1e-5)
            # Refusals: a changed model id, a model without a module, bad inputs.
            done, _ = activate(5, "mlp", [("x", x)], region, [0], model_id=mlp_info.id + 1000)
            assert done.status == 204 and "changed" in done.message
            done, _ = activate(6, "nope", [("x", x)], region, [0], model_id=0)
            assert done.status == 200 and "no module" in done.message
            done, _ = activate(7, "mlp", [("x", torch.randn(16, 5))], region, [0])
            assert done.status != 0
            # ... and it still serves.
            done, outs = activate(8, "mlp", [("x", x)], region, [0, 3])
            assert done.status == 0, done.message
            torch.testing.assert_close(outs["out0"], ref, rtol=1e-5, atol=1e-5)

            # An input area: mapped and page-locked once; tasks' inputs copied from it to the GPU.
            afd, aw = P.create_area(4 << 20)
            try:
                P.send(conn, P.AreaAdd(11, 4 << 20), afd)

                def activate_area(task_id, xs, resident, area=11):
                    raw = xs.contiguous().numpy().tobytes()
                    aw[256:256 + len(raw)] = raw
                    ts = [P.Tensor("x", pipeswitch.PS_DTYPE_F32, list(xs.shape), P.Area(area, 256, len(raw)))]
                    P.send(conn, P.Activate(P.Task(task_id, P.TASK_INFERENCE, "mlp", mlp_info.id, region, resident,
                                                   [0, 2], ts, P.monotonic_ns())))
                    done, fd = P.recv(conn)
                    assert done.task_id == task_id
                    out = None
                    if done.status == 0:
                        [(t, data)] = P.unpack_tensors(done.outputs, fd)
                        out = torch.frombuffer(bytearray(data), dtype=torch.float32).reshape(t.shape)
                    if fd is not None:
                        os.close(fd)
                    return done, out

                for i in range(3):
                    xa = torch.randn(2048, 32)  # 256 KiB, rewritten in place each time
                    done, out = activate_area(20 + i, xa, resident=i > 0)
                    assert done.status == 0, done.message
                    torch.testing.assert_close(out, ref_mlp(xa), rtol=1e-5, atol=1e-5)
                done, _ = activate_area(23, x, True, area=12)
                assert done.status == 700 and "not held here" in done.message
                P.send(conn, P.AreaDrop(11))
                done, _ = activate_area(24, x, True)
                assert done.status == 700 and "not held here" in done.message
                done, outs = activate(25, "mlp", [("x", x)], region, [0], resident=True)
                assert done.status == 0, done.message
            finally:
                aw.close()
                os.close(afd)
        P.send(conn, P.Deactivate())
        assert P.recv(conn) == (P.Standby(4), None)
        P.send(conn, P.Shutdown())
        assert proc.wait(60) == 0
        text = (tmp_path / "worker.log").read_text()
        assert "not page-locked" not in text, "the input area could not be page-locked on this GPU"
        conn.close()
        lst.close()
    finally:
        sys.path.remove(str(tmp_path))
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc is not None:
            worker_log.close()
            sys.stderr.write((tmp_path / "worker.log").read_text())  # the worker's log, in pytest's report
        arena.close()
        store.close()
        pipeswitch.Store.unlink(name)


def _pipeswitch_bin():
    root = os.path.dirname(PKG_ROOT)
    for p in (os.environ.get("PIPESWITCH_BIN"), os.path.join(root, "target", "release", "pipeswitch"),
              os.path.join(root, "target", "debug", "pipeswitch")):
        if p and os.access(p, os.X_OK):
            return p
    return None


@gpu
@pytest.mark.skipif(_pipeswitch_bin() is None, reason="needs the pipeswitch program (cargo build; or PIPESWITCH_BIN)")
def test_serve_with_torch_workers_and_the_python_client(tmp_path):
    """End to end: `pipeswitch serve` starts `python -m pipeswitch.worker`
    standbys; the Python client's requests switch between two models and
    back, with the results of the reference modules."""
    import time

    import torch

    from pipeswitch.client import Client
    from pipeswitch.torch import register_module

    sys.path.insert(0, str(tmp_path))
    (tmp_path / "psw_models2.py").write_text(MODELS_PY)
    import psw_models2

    name = "serve-%s" % uuid.uuid4().hex[:12]
    store = pipeswitch.Store.create(name, 64 << 20)
    sock_dir = tempfile.mkdtemp(prefix="ps-serve-")
    daemon = None
    try:
        torch.manual_seed(0)
        ref_mlp, ref_two = psw_models2.mlp(), psw_models2.TwoHeads()
        x = torch.randn(16, 32)
        x8, y8 = torch.randn(4, 8), torch.randn(4, 8)
        register_module(store, "mlp", ref_mlp, (x,), device="cuda:0")
        register_module(store, "two", ref_two, (x8, y8), device="cuda:0")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), PKG_ROOT, os.environ.get("PYTHONPATH", "")]))
        daemon = subprocess.Popen(
            [_pipeswitch_bin(), "serve", "--store", name, "--device", "0", "--arena-size", "256M",
             "--worker-region", "16M", "--standbys", "2", "--socket-dir", sock_dir,
             "--worker-cmd", sys.executable, "-m", "pipeswitch.worker",
             "--models", "mlp=psw_models2:mlp", "two=psw_models2:two_heads"], env=env)
        path = P.socket_path(sock_dir, 0)
        deadline = time.monotonic() + 60
        while not os.path.exists(path):
            assert daemon.poll() is None, "the daemon exited with %s" % daemon.returncode
            assert time.monotonic() < deadline, "no socket after 60 s"
            time.sleep(0.1)

        def as_tensor(v):
            if isinstance(v, tuple):
                data, _, shape = v
                return torch.frombuffer(bytearray(data), dtype=torch.float32).reshape(shape)
            return torch.from_numpy(v.copy())

        with torch.no_grad(), Client(socket=path, timeout=180) as c:
            for _ in range(2):
                out = c.infer("mlp", {"x": x})
                torch.testing.assert_close(as_tensor(out["out0"]), ref_mlp(x), rtol=1e-5, atol=1e-5)
                assert out.timing.total_ms > 0 and out.timing.worker_ms > 0
                out = c.infer("two", [("x", x8, None, None), ("y", y8, None, None)])
                r = ref_two(x8, y8)
                torch.testing.assert_close(as_tensor(out["logits"]), r["logits"], rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(as_tensor(out["extra.0"]), r["extra"][0], rtol=1e-5, atol=1e-5)
            xb = torch.randn(4096, 32)  # 512 KiB: in the client's input area (reserved now), the result in a memfd
            out = c.infer("mlp", {"x": xb})
            torch.testing.assert_close(as_tensor(out["out0"]), ref_mlp(xb), rtol=1e-4, atol=1e-4)
            assert c.input_area_bytes == 16 << 20 and c.area_refusal is None, c.area_refusal
            xb2 = torch.randn(4096, 32)  # written over the first in the area
            out = c.infer("mlp", {"x": xb2})
            torch.testing.assert_close(as_tensor(out["out0"]), ref_mlp(xb2), rtol=1e-4, atol=1e-4)
            with pytest.raises(pipeswitch.NotFound):
                c.infer("absent", {"x": x})
            s = c.stats()
            # "absent" counts as a request and a failure.
            assert s.requests == 7 and s.failed == 1 and s.workers >= 2 and s.workers_lost == 0, s
            assert s.hits >= 2 and s.misses >= 2 and s.evictions == 0, s
    finally:
        sys.path.remove(str(tmp_path))
        if daemon is not None:
            daemon.terminate()
            try:
                assert daemon.wait(60) == 0
            finally:
                if daemon.poll() is None:
                    daemon.kill()
                    daemon.wait()
        store.close()
        pipeswitch.Store.unlink(name)
