"""``python -m pipeswitch.worker``: the PyTorch worker process of
``pipeswitch serve``.

::

    pipeswitch serve --store models --worker-cmd python -m pipeswitch.worker \\
        --models resnet152=torchvision.models:resnet152 bert=mypkg.models:bert

It connects to the daemon (the socket in ``PIPESWITCH_SOCKET``, or
``--socket``), says hello (role worker, kind ``"torch"``) and gets its
welcome: the store's name, the arena's 128-byte IPC handle and its
activation region. It then opens and pins the store, imports the arena,
warms PyTorch (CUDA context, a cuBLAS matmul, a cuDNN convolution, the
caching allocator), builds each ``--models`` module (the factory is called
with no arguments; eval mode; on the meta device or the CPU) and attaches it
to the stored model of the same name (:meth:`pipeswitch.torch.Worker.attach`),
then reports standby.

On ``Activate`` it checks the stored model's id against the task's, binds
the model at the task's region with the daemon's plan, starts the pipelined
copy (or declares the model resident: no copy), builds the inputs as CUDA
tensors and runs the module on them (positional arguments, in the order
given), the first groups computing while the later ones are still copied.
``activation_ms`` is CLOCK_MONOTONIC just before the forward minus the
daemon's decision time. The outputs (a tensor, a tuple/list of tensors, or
a dict / HF ``ModelOutput``) go back as ``out0``, ``out1``, ... or by key.
A failed task is answered with its status and message, and the worker keeps
serving. On ``Deactivate`` it synchronizes, drops the task's state and
answers ``Standby``; on ``Shutdown`` or when the daemon goes away it exits 0.

Training (``TrainStart``): the job's factory (``module:function``, see
:mod:`pipeswitch.train`) is built on first start; the worker then runs its
steps, reporting each completed iteration and each checkpoint
(``TrainProgress``), until a ``Preempt`` comes (the step in flight is
abandoned or completed as the job says, the state saved resident or to
pinned host memory: ``TrainStopped`` with the stop and save times), the job
has run its iterations, or a step raises (``TrainStopped`` with the status
and message; the worker lives on). A later ``TrainStart`` resumes from the
state it holds, or from the job's checkpoint file if the iteration asked
for is that one (a new worker after a crash); ``Deactivate`` drops the job.
While a training task runs, a watcher thread peeks at the socket (without
reading it) so that a preemption is seen within the step; the frames are
read between steps. Inference tasks are read as before, with no thread
between the socket and the task.

Input areas (``AreaAdd`` / ``AreaDrop``, in both loops): the worker maps
each client's area read-only once (its seals and size checked as the
daemon checks them) and page-locks it (``cuMemHostRegister``, portable and
read-only); a task's inputs in an area are then copied to the GPU straight
from it, without a host copy and without waiting (an area that could not be
page-locked is logged once, and its inputs go through the pinned staging as
a file's do). A task naming an area the worker does not hold, or a range
outside it, fails with that message; the worker goes on.

The protocol loop (:func:`serve`) is separate from the framework
(:class:`TorchBackend`), so the loop can be tested with a fake backend.
"""

import argparse
import ctypes
import importlib
import logging
import math
import os
import select
import socket
import struct
import sys
import threading
import time

from . import protocol as P
from ._lib import DTYPE_SIZES
from .train import Abandoned
from .errors import Disconnected, PipeSwitchError

__all__ = ["serve", "TorchBackend", "TaskError", "status_of", "main"]

log = logging.getLogger("pipeswitch.worker")

# Status codes (pipeswitch.h).
_INVALID_ARGUMENT = 101
_NOT_FOUND = 200
_INVALID_STATE = 204
_CUDA = 302
_CUDA_OOM = 303
_INTERNAL = 901


class TaskError(Exception):
    """A task failed with ``status`` (a ``PS_ERR_*`` code)."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = int(status)


def status_of(e):
    """The status a task's exception is answered with."""
    if isinstance(e, (TaskError, PipeSwitchError)):
        return e.status
    name = type(e).__name__
    text = str(e)
    if name == "OutOfMemoryError" or "out of memory" in text:
        return _CUDA_OOM
    if "CUDA" in text or "cuBLAS" in text or "cuDNN" in text or name == "AcceleratorError":
        return _CUDA
    if isinstance(e, (ValueError, TypeError, IndexError)):
        return _INVALID_ARGUMENT
    if isinstance(e, KeyError):
        return _NOT_FOUND
    return _INTERNAL


def _message_of(e):
    if isinstance(e, PipeSwitchError):
        return e.message
    return "%s: %s" % (type(e).__name__, e)


def serve(sock, make_backend, kind="torch"):
    """Runs the worker's side of the protocol on the connected ``sock`` until
    the daemon shuts it down or goes away (then returns).

    ``make_backend(welcome)`` sets everything up and returns an object with
    ``run(task, inputs) -> (outputs, activation_ms)`` (``inputs``:
    ``[(protocol.Tensor, bytes)]``; ``outputs``: ``[(name, dtype_code, shape,
    bytes-like)]``), ``deactivate()`` and ``close()``; for training,
    ``train_job(train_task)`` returns a run with ``step(iteration, stop_event)
    -> bool``, ``save(mode)``, ``restore_held()``, ``checkpoint(path,
    iteration, stop_event)`` (raises :class:`pipeswitch.train.Abandoned`
    when a preemption cuts it short, the last checkpoint left whole),
    ``load_checkpoint(path, iteration)``, ``state_bytes()`` and
    ``close()`` (:class:`pipeswitch.train.TorchTrainRun`)."""
    P.send(sock, P.Hello(P.ROLE_WORKER, os.getpid(), kind))
    got = P.recv(sock)
    if got is None:
        raise P._disconnected("the daemon closed the connection before its welcome")
    msg, fd = got
    if fd is not None:
        os.close(fd)
    if isinstance(msg, P.Error):
        raise P.error_of(msg.status, msg.message)
    if not isinstance(msg, P.Welcome):
        raise P.protocol_error("expected welcome, got %s" % type(msg).__name__)
    if len(msg.arena_handle) != 128:
        raise P.protocol_error("an arena handle of %d bytes (128 expected)" % len(msg.arena_handle))
    worker_id = msg.worker_id
    t0 = time.monotonic()
    backend = make_backend(msg)
    areas = _InputAreas(backend, worker_id)
    training = _Training(sock, backend, worker_id, areas)
    try:
        log.info("worker %d: ready in %.0f ms", worker_id, (time.monotonic() - t0) * 1e3)
        P.send(sock, P.Standby(worker_id))
        while True:
            got = P.recv(sock)
            if got is None:
                return
            msg, fd = got
            try:
                if isinstance(msg, P.Activate):
                    _task(sock, backend, msg.task, fd, worker_id, areas)
                elif areas.handle(msg, fd):
                    pass
                elif isinstance(msg, P.TrainStart):
                    if not training.run(msg.task):
                        return
                elif isinstance(msg, P.Preempt):
                    if not training.write_back(msg):
                        # It came after the task had ended on its own: nothing runs.
                        log.info("worker %d: a preemption of task %d, which is not running", worker_id, msg.task_id)
                elif isinstance(msg, P.Deactivate):
                    training.drop()
                    backend.deactivate()
                    P.send(sock, P.Standby(worker_id))
                elif isinstance(msg, P.Shutdown):
                    return
                else:
                    raise P.protocol_error("a worker does not expect message %s" % type(msg).__name__)
            finally:
                if fd is not None:
                    os.close(fd)
    finally:
        training.drop()
        try:
            areas.close()
        finally:
            backend.close()


class _InputAreas:
    """A worker's input areas: id -> its read-only mapping
    (:func:`protocol.map_area`), each offered to the backend to page-lock
    (``add_area``) and taken back before it is unmapped (``drop_area``)."""

    def __init__(self, backend, worker_id):
        self.backend = backend
        self.worker_id = worker_id
        self.maps = {}

    def handle(self, msg, fd):
        """Handles ``AreaAdd`` / ``AreaDrop``; False for other messages."""
        if isinstance(msg, P.AreaAdd):
            self.add(msg.area, msg.bytes, fd)
        elif isinstance(msg, P.AreaDrop):
            self.drop(msg.area)
        else:
            return False
        return True

    def add(self, area_id, nbytes, fd):
        """Maps the area (replacing one of the same id). A file that is
        missing, not sealed or too short is logged and not held: tasks that
        name the area fail with that."""
        self.drop(area_id)
        if fd is None:
            log.warning("worker %d: input area %d came without its file; tasks naming it will fail",
                        self.worker_id, area_id)
            return
        try:
            m = P.map_area(fd, nbytes)
        except PipeSwitchError as e:
            log.warning("worker %d: input area %d not held: %s", self.worker_id, area_id, e.message)
            return
        self.maps[area_id] = m
        add = getattr(self.backend, "add_area", None)
        if add is not None:
            try:
                add(area_id, m)
            except Exception as e:  # noqa: BLE001 - the area is read as it is (no page-locking)
                log.warning("worker %d: input area %d: %s", self.worker_id, area_id, _message_of(e))
        log.debug("worker %d: input area %d of %d bytes", self.worker_id, area_id, nbytes)

    def drop(self, area_id):
        m = self.maps.pop(area_id, None)
        if m is None:
            return
        drop = getattr(self.backend, "drop_area", None)
        if drop is not None:
            try:
                drop(area_id)
            except Exception as e:  # noqa: BLE001 - unmapped anyway
                log.warning("worker %d: dropping input area %d: %s", self.worker_id, area_id, _message_of(e))
        try:
            m.close()
        except BufferError:
            # A view of it is still alive somewhere: it is unmapped with the last one.
            log.warning("worker %d: input area %d is still in use; unmapped when released", self.worker_id, area_id)

    def close(self):
        for a in list(self.maps):
            self.drop(a)


class _Watcher:
    """Peeks at the daemon's socket while a training task runs: ``preempt``
    is set the moment a ``Preempt`` frame is there (the frame itself is read
    by the training loop between steps)."""

    def __init__(self, sock):
        self.sock = sock
        self.preempt = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pipeswitch-worker-watch", daemon=True)
        self._thread.start()

    def _readable(self, timeout_ms):
        p = select.poll()
        p.register(self.sock.fileno(), select.POLLIN | select.POLLHUP | select.POLLERR)
        return bool(p.poll(timeout_ms))

    def _run(self):
        kind = struct.Struct("<4sHH")
        while not self._done.is_set():
            try:
                if not self._readable(5):
                    continue
                head = self.sock.recv(8, socket.MSG_PEEK)
            except (OSError, ValueError):
                return  # closed: the training loop sees it
            if len(head) < 8:
                if not head:
                    return
                time.sleep(0.0002)  # the rest of the header is on its way
                continue
            magic, _, k = kind.unpack(head)
            if magic == P.MAGIC and k == P.Preempt.KIND:
                self.preempt.set()
                return
            # Another frame waits for the loop (deactivate, shutdown).
            self._done.wait(0.001)

    def pending(self):
        """Whether a frame is there to read."""
        try:
            return self._readable(0)
        except (OSError, ValueError):
            return True  # recv reports it

    def stop(self):
        self._done.set()
        self._thread.join()


class _Training:
    """The worker's side of a training job: runs steps until preempted,
    finished or failed, and holds the job's state between its tasks."""

    def __init__(self, sock, backend, worker_id, areas=None):
        self.sock = sock
        self.backend = backend
        self.worker_id = worker_id
        self.areas = areas if areas is not None else _InputAreas(backend, worker_id)
        self.job_id = None
        self.runner = None
        self.held = None  # the iteration whose state the runner holds
        self.checkpoint = 0
        self.task_id = None  # the last training task

    def drop(self):
        if self.runner is not None:
            try:
                self.runner.close()
            except Exception as e:  # noqa: BLE001 - logged; the state goes anyway
                log.warning("worker %d: dropping a training job: %s", self.worker_id, e)
            self.runner = None
            released = getattr(self.backend, "train_released", None)
            if released is not None:
                released()
        self.runner, self.job_id, self.held, self.checkpoint, self.task_id = None, None, None, 0, None

    def _stopped(self, task, reason, iteration, status=0, message="", stop_ms=0.0, save_ms=0.0):
        if len(message.encode("utf-8")) > P.MAX_STR:
            message = message.encode("utf-8")[:P.MAX_STR - 3].decode("utf-8", "ignore") + "..."
        P.send(self.sock, P.TrainStopped(task.task_id, reason, iteration, self.checkpoint, status, message,
                                         stop_ms, save_ms))

    def write_back(self, msg):
        """A ``Preempt`` of the last task while the job is paused with its
        state on the GPU: the daemon needs the room (``SAVE_AUTO``), so the
        state is written back to pinned host memory now and the answer is
        ``TrainStopped`` again. False if there is no such paused job."""
        if self.runner is None or self.held is None or msg.task_id != self.task_id:
            return False
        task = P.TrainTask(msg.task_id, self.job_id, None, "", self.held, 0)
        started = P.monotonic_ns()
        try:
            self.runner.save(P.SAVE_RESIDENT if msg.save == P.SAVE_RESIDENT else P.SAVE_HOST)
        except Exception as e:
            self._fail(task, self.held, e)
            return True
        self._stopped(task, P.STOP_PREEMPTED, self.held, save_ms=(P.monotonic_ns() - started) / 1e6)
        return True

    def _fail(self, task, iteration, e):
        log.warning("worker %d: training task %d failed: %s", self.worker_id, task.task_id, e)
        self.drop()
        self._stopped(task, P.STOP_FAILED, iteration, status_of(e), _message_of(e))

    def run(self, task):
        """Runs the task until it stops; False if the daemon went away or
        shut the worker down meanwhile."""
        watch = _Watcher(self.sock)
        try:
            return self._run(task, watch)
        finally:
            watch.stop()

    def _run(self, task, watch):
        job = task.job
        it = task.resume_iteration
        self.task_id = task.task_id
        first = True  # the state's size is reported again after the first step (the optimiser's state is made lazily)
        try:
            if self.runner is not None and self.job_id != task.job_id:
                self.drop()
            if self.runner is None:
                self.runner = self.backend.train_job(task)
                self.job_id = task.job_id
                self.held = 0
            if it == self.held:
                self.runner.restore_held()
            else:
                # A new worker after a crash: the checkpoint file.
                try:
                    self.runner.load_checkpoint(task.checkpoint_path, it)
                except LookupError as e:
                    raise TaskError(_INVALID_STATE, "training job %d: no saved state of iteration %d (%s)"
                                    % (task.job_id, it, e)) from None
                self.checkpoint = it
            self.held = None
            P.send(self.sock, P.TrainProgress(task.task_id, P.PROGRESS_RESUMED, it, self.checkpoint,
                                              self.runner.state_bytes()))
        except Exception as e:
            self._fail(task, it, e)
            return True
        while True:
            if watch.pending():
                got = P.recv(self.sock)
                if got is None:
                    return False
                msg, fd = got
                try:
                    if self.areas.handle(msg, fd):
                        continue
                finally:
                    if fd is not None:
                        os.close(fd)
                if isinstance(msg, P.Preempt):
                    return self._preempt(task, msg, it)
                if isinstance(msg, P.Shutdown):
                    return False
                if isinstance(msg, P.Deactivate):
                    self.drop()
                    self.backend.deactivate()
                    P.send(self.sock, P.Standby(self.worker_id))
                    return True
                raise P.protocol_error("a training worker does not expect message %s" % type(msg).__name__)
            if job.iterations and it >= job.iterations:
                self.held = it
                self.task_id = None  # finished: a late Preempt is no write-back
                self._stopped(task, P.STOP_FINISHED, it)
                return True
            try:
                done = self.runner.step(it + 1, watch.preempt)
            except Exception as e:
                self._fail(task, it, e)
                return True
            if not done:
                continue  # abandoned: the preemption is the next frame
            it += 1
            size = self.runner.state_bytes() if first else 0
            first = False
            P.send(self.sock, P.TrainProgress(task.task_id, P.PROGRESS_ITERATION, it, self.checkpoint, size))
            if job.checkpoint_every and it % job.checkpoint_every == 0:
                try:
                    self.runner.checkpoint(task.checkpoint_path, it, watch.preempt)
                except Abandoned:
                    # A preemption came while the state was written to the
                    # file: the last checkpoint stands, the preemption is next.
                    continue
                except Exception as e:
                    self._fail(task, it, e)
                    return True
                self.checkpoint = it
                P.send(self.sock, P.TrainProgress(task.task_id, P.PROGRESS_CHECKPOINT, it, it, 0))

    def _preempt(self, task, msg, it):
        stopped = P.monotonic_ns()
        stop_ms = max(0.0, (stopped - msg.decided_ns) / 1e6) if msg.decided_ns else 0.0
        try:
            # The daemon sends its decision; a job's SAVE_AUTO is never in a
            # preemption, and writing back is the choice that cannot run out of room.
            self.runner.save(P.SAVE_RESIDENT if msg.save == P.SAVE_RESIDENT else P.SAVE_HOST)
        except Exception as e:
            self._fail(task, it, e)
            return True
        save_ms = (P.monotonic_ns() - stopped) / 1e6
        self.held = it
        self._stopped(task, P.STOP_PREEMPTED, it, stop_ms=stop_ms, save_ms=save_ms)
        return True


def _same_memory(view, tensor):
    """Whether memoryview ``view`` starts at ``tensor``'s first byte."""
    import ctypes
    try:
        addr = ctypes.addressof(ctypes.c_char.from_buffer(view))
    except (TypeError, ValueError):
        return False
    return addr == tensor.data_ptr()


def _task(sock, backend, task, fd, worker_id, areas=None):
    started = time.monotonic()
    try:
        inputs = P.unpack_tensors(task.inputs, fd, into=getattr(backend, "input_buffer", None),
                                  areas=areas.maps if areas is not None else None)
        outputs, activation_ms = backend.run(task, inputs)
        del inputs  # views of input areas: not kept past the task
        tensors, ofd = P.pack_tensors(outputs)
    except Exception as e:  # answered; the worker keeps serving
        log.warning("worker %d: task %d failed: %s", worker_id, task.task_id, e)
        msg = _message_of(e)
        if len(msg.encode("utf-8")) > P.MAX_STR:
            msg = msg.encode("utf-8")[:P.MAX_STR - 3].decode("utf-8", "ignore") + "..."
        P.send(sock, P.TaskDone(task.task_id, status_of(e), msg, [], P.Timing()))
        return
    timing = P.Timing(activation_ms=activation_ms, worker_ms=(time.monotonic() - started) * 1e3)
    try:
        P.send(sock, P.TaskDone(task.task_id, 0, "", tensors, timing), ofd)
    finally:
        if ofd is not None:
            os.close(ofd)


# ---------------------------------------------------------------------------
# The PyTorch backend
# ---------------------------------------------------------------------------

def load_factory(spec):
    """``"module:factory"`` -> the callable."""
    mod, sep, attr = spec.partition(":")
    if not sep or not mod or not attr:
        raise ValueError("%r: a model factory is module:callable (e.g. torchvision.models:resnet18)" % spec)
    obj = importlib.import_module(mod)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError("%s is not callable" % spec)
    return obj


def parse_models(specs):
    """``["name=module:factory", ...]`` -> ``{name: "module:factory"}``."""
    out = {}
    for s in specs:
        name, sep, spec = s.partition("=")
        if not sep or not name:
            raise ValueError("%r: use NAME=module:factory" % s)
        if name in out:
            raise ValueError("model %r is given twice" % name)
        out[name] = spec
    return out


def outputs_of(result):
    """``[(name, tensor)]`` of a forward's result: ``out0`` for a tensor,
    ``out0``, ``out1``, ... for a tuple or list, the keys for a dict or HF
    ``ModelOutput``; nested ones are named ``key.0``, ``out1.0``, ``out0.key``;
    None entries are skipped."""
    import torch

    out = []

    def walk(obj, name):
        if isinstance(obj, torch.Tensor):
            out.append((name or "out0", obj))
        elif isinstance(obj, dict):
            for k, v in obj.items():
                if v is not None:
                    walk(v, str(k) if name is None else "%s.%s" % (name, k))
        elif isinstance(obj, (tuple, list)):
            for i, v in enumerate(obj):
                if v is not None:
                    walk(v, "out%d" % i if name is None else "%s.%d" % (name, i))
        elif obj is not None:
            raise TypeError("a forward returned a %s; a tensor, a tuple/list or a dict of tensors is needed"
                            % type(obj).__name__)

    walk(result, None)
    return out


def _tensor_bytes(t):
    """A CPU, contiguous tensor's bytes (no numpy needed)."""
    n = t.numel() * t.element_size()
    return ctypes.string_at(t.data_ptr(), n) if n else b""


class TorchBackend:
    """The PyTorch side of a worker: store, arena, a
    :class:`pipeswitch.torch.Worker` and the ``--models`` modules."""

    def __init__(self, welcome, models, device=None, warm_bytes=64 << 20, graphs=False, fused=True):
        import torch

        from . import core
        from .torch import Worker, _torch_dtype

        self._torch = torch
        self._torch_dtype = _torch_dtype
        # --graphs: forwards replayed from CUDA graphs (Worker.capture), one
        # per model and input signature, captured on the first request.
        self.graphs = graphs
        # With graphs: a switch is one replay of the fused graph (the plan's
        # copies and the forward, CapturedForward.switch_and_run) rather
        # than switch_to + a replay; a forward that cannot be fused falls
        # back to the latter.
        self.fused = bool(graphs and fused)
        self.captured = {}
        # Per input position: (pinned host buffer or None, device buffer), bytes.
        self._staging = {}
        # Input areas: id -> (a CPU uint8 tensor over the whole mapping, page-locked?).
        self._areas = {}
        self._area_warned = False
        dev = welcome.device if device is None else device
        self.device = torch.device("cuda", dev)
        torch.cuda.set_device(self.device)
        self.arena = core.Arena.import_(welcome.arena_handle, dev)
        self.store = core.Store.open(welcome.store)
        self.store.pin(dev)
        # Plans come from the daemon: no link measurement here.
        self.worker = Worker(self.device, self.arena, self.store, bandwidth_gbps=1.0,
                             group_transfer_overhead_ms=0.0)
        # Its region of the arena: PyTorch's activations use its own caching
        # allocator instead (the arena's workspace allocator is per process
        # and would not know the region).
        self.activation = (welcome.activation_offset, welcome.activation_bytes)
        self._warm(warm_bytes)
        self.modules = {}
        for name, spec in models.items():
            m = load_factory(spec)()
            if not isinstance(m, torch.nn.Module):
                raise TypeError("%s returned a %s, not an nn.Module" % (spec, type(m).__name__))
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)
            self.modules[name] = m
            if name in self.store:
                self._attach(name, 0, [0])
            else:
                log.warning("model %r is not in store %r yet: it is attached when first activated",
                            name, welcome.store)

    def _warm(self, warm_bytes):
        torch = self._torch
        with torch.inference_mode():
            a = torch.randn(256, 256, device=self.device)
            (a @ a).sum().item()
            h = torch.randn(64, 256, device=self.device, dtype=torch.float16)
            (h @ h.t()).float().sum().item()
            try:
                x = torch.randn(1, 3, 16, 16, device=self.device)
                w = torch.randn(4, 3, 3, 3, device=self.device)
                torch.nn.functional.conv2d(x, w).sum().item()
            except RuntimeError as e:  # no cuDNN: not fatal
                log.warning("cuDNN warm-up failed: %s", e)
            if warm_bytes > 0:
                # The caching allocator keeps this block for the forwards.
                block = torch.empty(int(warm_bytes), dtype=torch.uint8, device=self.device)
                del block
        torch.cuda.synchronize(self.device)

    def _attach(self, name, offset, plan):
        info = self.store.model_info(name)
        if offset + info.bytes > self.arena.size():
            offset = 0
        self.worker.attach(self.modules[name], name, region_offset=offset, plan=plan)
        return info

    def run(self, task, inputs):
        torch = self._torch
        if task.kind != P.TASK_INFERENCE:
            raise TaskError(_INVALID_ARGUMENT, "task kind %d: this worker runs inference tasks only" % task.kind)
        module = self.modules.get(task.model)
        if module is None:
            raise TaskError(_NOT_FOUND, "this worker has no module for model %r (its --models: %s)"
                            % (task.model, ", ".join(self.modules) or "none"))
        # The id alone (one call): model_info of a large model takes milliseconds.
        model_id = self.store.model_id(task.model)
        if model_id != task.model_id:
            raise TaskError(_INVALID_STATE, "model %r changed in the store (id %d now, %d asked for)"
                            % (task.model, model_id, task.model_id))
        entry = self.worker._models.get(task.model)
        if entry is not None and entry.info.id != model_id:
            self.worker.detach(task.model)  # re-added under the same name: attach afresh
            entry = None
        if entry is None:
            self._attach(task.model, task.region_offset, task.plan)
        # The inputs first: their copy shares the host-to-device engine with
        # the model's, and the first kernel needs both (staged after the
        # switch, they waited behind the whole model).
        args = self._stage_inputs(inputs)
        cap = None
        if self.fused and not task.resident:
            # The region and plan the daemon chose, bound without a switch:
            # the fused graph's replay makes it.
            self.worker.rebind(task.model, task.region_offset, task.plan)
            cap = self._captured(task.model, args)
        if cap is not None and cap.fused:
            forward = cap.switch_and_run
        else:
            # A resident model waits for no group: its plan does not matter,
            # and keeping the bound one spares a rebind on every hit.
            self.worker.switch_to(task.model, region_offset=task.region_offset,
                                  plan=None if task.resident else task.plan, resident=task.resident)
            cap = self._captured(task.model, args) if self.graphs else None
            forward = cap if cap is not None else module
        with torch.inference_mode():
            activation_ms = (P.monotonic_ns() - task.decided_ns) / 1e6
            outs = outputs_of(forward(*args))
            cpu = [(n, t.detach().contiguous().to("cpu")) for n, t in outs]
        return [(n, _dtype_code(t.dtype), list(t.shape), _tensor_bytes(t)) for n, t in cpu], activation_ms

    def _buffers(self, i, n, pinned=True):
        """(pinned host, device) buffers of at least ``n`` bytes for input
        position ``i``, kept for later requests and grown as needed; with
        ``pinned`` False (an input copied from a page-locked input area) the
        device one only (the pinned one is None unless made before)."""
        torch = self._torch
        host, dev = self._staging.get(i, (None, None))
        grow_host = pinned and (host is None or host.numel() < n)
        grow_dev = dev is None or dev.numel() < n
        if grow_host or grow_dev:
            # The stream may still read the old ones.
            torch.cuda.current_stream(self.device).synchronize()
            if grow_host:
                host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
            if grow_dev:
                dev = torch.empty(n, dtype=torch.uint8, device=self.device)
            self._staging[i] = (host, dev)
        return host, dev

    # -- input areas -----------------------------------------------------------

    def add_area(self, area_id, mapping):
        """Page-locks an input area (the worker's read-only mapping), so that
        inputs in it are copied to the GPU straight from it without a wait.
        A failure is logged once (later ones at debug level) and the area is
        read as it is: its inputs go through the pinned staging."""
        torch = self._torch
        with _quiet_readonly():
            whole = torch.frombuffer(mapping, dtype=torch.uint8)
        why = self._page_lock(whole)
        self._areas[area_id] = (whole, why is None)
        if why is not None:
            (log.debug if self._area_warned else log.warning)(
                "input area %d is not page-locked (%s): its inputs go through the pinned staging", area_id, why)
            self._area_warned = True
        return why is None

    def _page_lock(self, whole):
        """Registers the tensor's bytes with CUDA: None, or why not."""
        n = whole.numel()
        try:
            err = self._cu_register(whole.data_ptr(), n, _HOST_REGISTER_PORTABLE | _HOST_REGISTER_READ_ONLY)
        except (OSError, AttributeError) as e:  # no driver library
            return "the CUDA driver: %s" % e
        if err != 0:
            return "cuMemHostRegister of %d bytes failed with CUresult %d" % (n, err)
        if not whole.is_pinned():
            self._cu_unregister(whole.data_ptr())
            return "registered, but PyTorch does not see the %d bytes as pinned" % n
        return None

    def drop_area(self, area_id):
        """Unregisters an input area (after the copies out of it are done)."""
        entry = self._areas.pop(area_id, None)
        if entry is None:
            return
        whole, registered = entry
        if registered:
            self._torch.cuda.current_stream(self.device).synchronize()
            err = self._cu_unregister(whole.data_ptr())
            if err != 0:
                log.warning("input area %d: cuMemHostUnregister failed with CUresult %d", area_id, err)

    @staticmethod
    def _cu_register(ptr, nbytes, flags):
        """``cuMemHostRegister``: the driver API, which keeps no "last error"
        (a failed ``cudaHostRegister`` would be reported again by PyTorch's
        check after the next kernel launch). PyTorch's primary context is
        current on this thread."""
        return _driver().cuMemHostRegister_v2(ptr, nbytes, flags)

    @staticmethod
    def _cu_unregister(ptr):
        return _driver().cuMemHostUnregister(ptr)

    def input_buffer(self, i, n):
        """For :func:`protocol.unpack_tensors`: shared input ``i`` is read
        from its file straight into pinned memory (no second host copy)."""
        # The previous request's copies out of it are done (its outputs were
        # read), unless it failed half-way: wait, it costs nothing if idle.
        self._torch.cuda.current_stream(self.device).synchronize()
        pinned, _ = self._buffers(i, n)
        return pinned[:n].numpy()

    def _stage_inputs(self, inputs):
        """The request's inputs on the device: each in a pinned buffer kept
        per input position (read there from the request's file by
        :meth:`input_buffer`, else copied there), then copied to a device
        buffer on the current stream without a host wait. The buffers are
        reused by the next request, whose copies come after this one's
        outputs were read (a wait for the stream)."""
        torch = self._torch
        args = []
        for i, (t, data) in enumerate(inputs):
            name = _dtype_name(t.dtype)
            dt = self._torch_dtype(name)
            shape = [int(d) for d in t.shape]
            want = math.prod(shape) * DTYPE_SIZES[t.dtype]
            if want != len(data):
                raise TaskError(_INVALID_ARGUMENT, "input %r: a %s tensor of shape %s has %d bytes, not %d"
                                % (t.name, name, shape, want, len(data)))
            if len(data) == 0:
                args.append(torch.empty(shape, dtype=dt, device=self.device))
                continue
            area = self._areas.get(t.data.area) if isinstance(t.data, P.Area) else None
            if area is not None and area[1]:
                # Straight from the page-locked area: one DMA, no host copy.
                _, dev = self._buffers(i, want, pinned=False)
                dev[:want].copy_(area[0][t.data.offset:t.data.offset + want], non_blocking=True)
                args.append(dev[:want].view(dt).reshape(shape))
                continue
            pinned, dev = self._buffers(i, want)
            if area is not None:
                src = area[0][t.data.offset:t.data.offset + want]
            elif isinstance(data, memoryview) and data.obj is not None and _same_memory(data, pinned):
                src = None  # read from its file into the pinned buffer already
            elif isinstance(data, memoryview) and data.readonly:
                with _quiet_readonly():
                    src = torch.frombuffer(data, dtype=torch.uint8)
            else:
                src = torch.frombuffer(data if isinstance(data, bytearray) else bytearray(data), dtype=torch.uint8)
            if src is not None:
                pinned[:want].copy_(src)
            dev[:want].copy_(pinned[:want], non_blocking=True)
            args.append(dev[:want].view(dt).reshape(shape))
        return args

    def _captured(self, model, args):
        """The captured forward of ``model`` for inputs like ``args``:
        captured on first use (and again after a rebind); None, with a
        warning once, for a forward that cannot be captured (it then runs
        eagerly)."""
        entry = self.worker._models[model]
        key = (model, tuple((tuple(a.shape), a.dtype) for a in args))
        cap = self.captured.get(key)
        if cap is False:
            return None
        if cap is None or cap.version != entry.version:
            cap = None
            if self.fused:
                try:
                    cap = self.worker.capture(model, tuple(args), fused=True)
                except Exception as e:  # noqa: BLE001 - not fusable: switch_to + a replay
                    log.warning("model %r: its switch and forward could not be captured as one graph (%s); "
                                "switches replay its forward after switch_to", model, e)
                    self._torch.cuda.synchronize(self.device)
            try:
                if cap is None:
                    cap = self.worker.capture(model, tuple(args))
            except Exception as e:  # noqa: BLE001 - not capturable: eager from now on
                log.warning("model %r: its forward could not be captured as a CUDA graph (%s); it runs eagerly",
                            model, e)
                self.captured[key] = False
                self._torch.cuda.synchronize(self.device)
                return None
            self.captured[key] = cap
        return cap

    def train_job(self, task):
        """A training job's run (:class:`pipeswitch.train.TorchTrainRun`)."""
        from .train import TorchTrainRun

        spec = load_factory(task.job.entry)(self.device, task.job.name)
        return TorchTrainRun(spec, self.device, task.job.preempt == P.PREEMPT_ABANDON)

    def train_released(self):
        """A training job's memory goes back to the GPU (other workers need it)."""
        import gc

        gc.collect()
        self._torch.cuda.synchronize(self.device)
        self._torch.cuda.empty_cache()

    def deactivate(self):
        """Waits for the task's kernels and copies. An error here (a sticky
        CUDA error) ends the worker: the daemon starts a fresh one."""
        self._torch.cuda.synchronize(self.device)
        if self.worker._current is not None:
            self.worker.synchronize()

    def close(self):
        try:
            self._torch.cuda.synchronize(self.device)
        finally:
            self.worker.close()


# cuMemHostRegister flags (CU_MEMHOSTREGISTER_*; the same values as cudaHostRegister*).
_HOST_REGISTER_PORTABLE = 1
_HOST_REGISTER_READ_ONLY = 8
_DRIVER = []


def _driver():
    """libcuda (loaded by PyTorch already), with the two calls declared."""
    if not _DRIVER:
        lib = ctypes.CDLL("libcuda.so.1")
        lib.cuMemHostRegister_v2.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
        lib.cuMemHostRegister_v2.restype = ctypes.c_int
        lib.cuMemHostUnregister.argtypes = [ctypes.c_void_p]
        lib.cuMemHostUnregister.restype = ctypes.c_int
        _DRIVER.append(lib)
    return _DRIVER[0]


class _quiet_readonly:
    """Silences PyTorch's warning that a tensor over a read-only buffer (an
    input area, mapped read-only) is writable: nothing writes through it."""

    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.filterwarnings("ignore", message="The given buffer is not writable")

    def __exit__(self, *exc):
        return self._w.__exit__(*exc)


def _dtype_name(code):
    from .core import DTYPE_NAMES

    name = DTYPE_NAMES.get(code)
    if name is None:
        raise TaskError(_INVALID_ARGUMENT, "unknown dtype code %d" % code)
    return name


def _dtype_code(torch_dtype):
    from .core import dtype_code

    return dtype_code(str(torch_dtype))


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m pipeswitch.worker",
                                 description="The PyTorch worker of `pipeswitch serve`.")
    ap.add_argument("--models", nargs="+", default=[], metavar="NAME=module:factory",
                    help="modules to serve: the stored model NAME is run by module:factory()")
    ap.add_argument("--socket", default=os.environ.get("PIPESWITCH_SOCKET"),
                    help="the daemon's socket (default $PIPESWITCH_SOCKET)")
    ap.add_argument("--device", type=int, default=None, help="CUDA device (default: the daemon's)")
    ap.add_argument("--warm-bytes", type=int, default=64 << 20,
                    help="bytes the caching allocator reserves at start (default 64 MiB)")
    ap.add_argument("--graphs", action="store_true",
                    help="replay each model's forward from CUDA graphs, captured on its first request per input "
                         "shape (for forwards without data-dependent control flow)")
    ap.add_argument("--no-fused", dest="fused", action="store_false",
                    help="with --graphs: a switch is switch_to + a replay of the forward, not one replay of the "
                         "fused graph (the plan's copies and the forward)")
    args = ap.parse_args(argv)
    level = os.environ.get("PIPESWITCH_LOG", "info").upper()
    logging.basicConfig(level=level if level in ("DEBUG", "INFO", "WARNING", "ERROR") else "INFO", format="pipeswitch.worker[%(process)d] %(levelname)s %(message)s")
    if not args.socket:
        ap.error("no socket: pass --socket or set PIPESWITCH_SOCKET (the daemon sets it)")
    try:
        models = parse_models(args.models)
    except ValueError as e:
        ap.error(str(e))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(args.socket)
    except OSError as e:
        log.error("connecting to %s: %s", args.socket, e)
        return 1
    try:
        serve(sock, lambda w: TorchBackend(w, models, args.device, args.warm_bytes, args.graphs, args.fused))
    except PipeSwitchError as e:
        if isinstance(e, Disconnected):
            return 0  # the daemon went away
        log.error("%s", e)
        return 1
    except Exception as e:
        log.exception("worker failed: %s", e)
        return 1
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
