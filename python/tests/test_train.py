"""Training in the worker (pipeswitch.worker with pipeswitch.train).

CPU, no torch: the training loop of ``pipeswitch.worker.serve`` against a
fake daemon on a socket pair, with a job in plain Python (floats and a
``random.Random``): preempted jobs (the step in flight abandoned, or at the
iteration boundary) end with the same numbers, bit for bit, as a job never
preempted; a worker killed mid-run is replaced by one that resumes from the
checkpoint file; a resume without saved state and a job that raises are
answered with clear failures, and the worker serves on.

With torch (skipped without it; CUDA used where present): the real
TorchTrainRun on a small CNN with batch norm and dropout: parameters,
buffers and optimiser state after N iterations equal, bit for bit, those of
a run with abandoned steps, written-back state and a checkpoint restored
into a fresh run.
"""

import json
import os
import random
import socket
import threading
import time

import pytest

from pipeswitch import protocol as P
from pipeswitch import worker as W
from pipeswitch.train import Abandoned

HANDLE = bytes(range(128))


class PlainRun:
    """A job of floats: w and momentum updated from data(iteration) and a
    seeded RNG; a step waits 2 ms between its halves (the window in which an
    abandoning preemption lands), up to 2 s at the iterations the job's name
    lists after "hold=" (once each: the test preempts it there); checkpoint
    writes after the first wait up to 2 s for a preemption if the name has
    "ckhold"; "state=N" makes it report a state of N bytes."""

    def __init__(self, job, seed=5, raise_at=None):
        opts = dict(kv.split("=", 1) if "=" in kv else (kv, "") for kv in job.name.split()[1:])
        self.hold = {int(x) for x in opts.get("hold", "").split(",") if x}
        self.bytes = int(opts.get("state", 64))  # what state_bytes() reports
        self.ckhold = "ckhold" in opts
        self.w = [0.5, -1.0, 2.0, 0.25]
        self.m = [0.0] * 4
        self.rng = random.Random(seed)
        self.raise_at = raise_at
        self.abandon = job.preempt == P.PREEMPT_ABANDON
        self.where = "gpu"
        self.steps_abandoned = 0
        self.checkpoints_cut = 0
        self.closed = False

    @staticmethod
    def data(i):
        return [((i * 7 + k * 3) % 11) / 11.0 for k in range(4)]

    def step(self, i, stop):
        assert self.where == "gpu", "a step on state that was written back"
        if i == self.raise_at:
            raise ValueError("bad batch %d" % i)
        saved = self.rng.getstate()
        noise = [self.rng.random() * 1e-3 for _ in range(4)]
        grad = [w - x + n for w, x, n in zip(self.w, self.data(i), noise)]
        if i in self.hold:
            self.hold.discard(i)
            stop.wait(2.0)
        else:
            stop.wait(0.002)
        if self.abandon and stop.is_set():
            self.rng.setstate(saved)
            self.steps_abandoned += 1
            return False
        self.m = [0.9 * m + g for m, g in zip(self.m, grad)]
        self.w = [w - 0.1 * m for w, m in zip(self.w, self.m)]
        return True

    def save(self, mode):
        if mode == P.SAVE_HOST:
            self.where = "host"

    def restore_held(self):
        self.where = "gpu"

    def state(self):
        return {"w": self.w, "m": self.m, "rng": self.rng.getstate()}

    def checkpoint(self, path, it, stop):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"iteration": it, "w": self.w, "m": self.m, "rng": self.rng.getstate()}, f)
        if stop.wait(2.0 if self.ckhold and it > 1 else 0.0):  # a preemption while the state is written
            os.unlink(tmp)
            self.checkpoints_cut += 1
            raise Abandoned()
        os.replace(tmp, path)

    def load_checkpoint(self, path, it):
        try:
            with open(path) as f:
                s = json.load(f)
        except FileNotFoundError:
            raise LookupError("no file") from None
        if s["iteration"] != it:
            raise LookupError("iteration %d in the file" % s["iteration"])
        self.w, self.m = s["w"], s["m"]
        st = s["rng"]
        self.rng.setstate((st[0], tuple(st[1]), st[2]))

    def state_bytes(self):
        return self.bytes

    def close(self):
        self.closed = True


class PlainBackend:
    def __init__(self, welcome):
        self.runs = []
        self.deactivated = 0

    def train_job(self, task):
        if task.job.entry == "plain:raise":
            self.runs.append(PlainRun(task.job, raise_at=4))
        else:
            self.runs.append(PlainRun(task.job))
        return self.runs[-1]

    def run(self, task, inputs):
        return [], 0.0

    def deactivate(self):
        self.deactivated += 1

    def close(self):
        pass


def start():
    daemon, sock = socket.socketpair()
    daemon.settimeout(20)
    made, result = [], {}

    def run():
        try:
            W.serve(sock, lambda w: made.append(PlainBackend(w)) or made[-1])
            result["ok"] = True
        except BaseException as e:  # checked by the test
            result["error"] = e
        finally:
            sock.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert isinstance(P.recv(daemon)[0], P.Hello)
    P.send(daemon, P.Welcome(1, 0, "s", 4, HANDLE, 0, 0))
    assert P.recv(daemon) == (P.Standby(4), None)
    return daemon, t, made, result


def job(**kw):
    j = P.TrainJob("plain", "plain:job", iterations=30)
    for k, v in kw.items():
        setattr(j, k, v)
    return j


def start_task(daemon, task_id, j, resume, path="/nonexistent"):
    P.send(daemon, P.TrainStart(P.TrainTask(task_id, 1, j, path, resume, P.monotonic_ns())))
    m = P.recv(daemon)[0]
    return m


def until(daemon, pred):
    """Frames until one satisfies pred (returned); progress is collected."""
    seen = []
    while True:
        m = P.recv(daemon)[0]
        seen.append(m)
        if pred(m):
            return m, seen


def reference(j):
    daemon, t, made, result = start()
    with daemon:
        m = start_task(daemon, 1, j, 0)
        assert isinstance(m, P.TrainProgress) and m.event == P.PROGRESS_RESUMED and m.iteration == 0
        stop, seen = until(daemon, lambda m: isinstance(m, P.TrainStopped))
        assert (stop.reason, stop.iteration) == (P.STOP_FINISHED, j.iterations), stop
        its = [m.iteration for m in seen if isinstance(m, P.TrainProgress) and m.event == P.PROGRESS_ITERATION]
        assert its == list(range(1, j.iterations + 1))
        P.send(daemon, P.Shutdown())
        t.join(10)
    return made[0].runs[0].state()


@pytest.mark.parametrize("mode", [P.PREEMPT_ABANDON, P.PREEMPT_BOUNDARY])
@pytest.mark.parametrize("save", [P.SAVE_RESIDENT, P.SAVE_HOST])
def test_preempted_training_ends_bit_for_bit_like_an_uninterrupted_run(mode, save):
    holds = [5, 10, 15, 20, 25]
    want = reference(job(preempt=mode))
    j = job(preempt=mode, name="plain hold=" + ",".join(map(str, holds)))
    daemon, t, made, result = start()
    with daemon:
        it, task_id, preemptions = 0, 10, 0
        while True:
            m = start_task(daemon, task_id, j, it)
            assert m == P.TrainProgress(task_id, P.PROGRESS_RESUMED, it, 0, 64)
            # Preempt while the step of the next held iteration is in flight.
            h = min([x for x in holds if x > it + 1] or [0])
            m, _ = until(daemon, lambda m: isinstance(m, P.TrainStopped) or m.iteration == h - 1)
            if isinstance(m, P.TrainStopped):
                assert (m.reason, m.iteration, h) == (P.STOP_FINISHED, 30, 0)
                break
            time.sleep(0.1)  # the worker is in step h, which waits up to 2 s
            P.send(daemon, P.Preempt(task_id, mode, save, P.monotonic_ns()))
            stop, _ = until(daemon, lambda m: isinstance(m, P.TrainStopped))
            want_it = h - 1 if mode == P.PREEMPT_ABANDON else h
            assert (stop.reason, stop.iteration) == (P.STOP_PREEMPTED, want_it), stop
            assert stop.stop_ms < 1000, "the step in flight was waited for"
            assert stop.stop_ms >= 0 and stop.save_ms >= 0
            run = made[0].runs[-1]
            assert run.where == ("host" if save == P.SAVE_HOST else "gpu")
            it, task_id, preemptions = stop.iteration, task_id + 1, preemptions + 1
        P.send(daemon, P.Shutdown())
        t.join(10)
    assert result == {"ok": True}
    assert preemptions == 5 and len(made[0].runs) == 1, "one run, resumed from the state it held"
    assert made[0].runs[0].steps_abandoned == (5 if mode == P.PREEMPT_ABANDON else 0)
    assert made[0].runs[0].state() == want


def test_a_paused_resident_state_is_written_back_when_the_daemon_needs_its_room():
    """save=auto: the daemon may send a Preempt with SAVE_HOST to a worker
    whose job is paused with its state resident; the state goes to host
    memory, the answer is TrainStopped again, and the job still ends bit
    for bit like an uninterrupted run."""
    want = reference(job())
    j = job(name="plain hold=10", save=P.SAVE_AUTO)
    daemon, t, made, result = start()
    with daemon:
        m = start_task(daemon, 1, j, 0)
        assert m == P.TrainProgress(1, P.PROGRESS_RESUMED, 0, 0, 64)
        # The size is reported again after the first step (lazily made optimiser state).
        m, _ = until(daemon, lambda m: isinstance(m, P.TrainProgress) and m.event == P.PROGRESS_ITERATION)
        assert (m.iteration, m.state_bytes) == (1, 64)
        m, _ = until(daemon, lambda m: m.iteration == 2)
        assert m.state_bytes == 0
        until(daemon, lambda m: m.iteration == 9)
        time.sleep(0.1)
        P.send(daemon, P.Preempt(1, P.PREEMPT_ABANDON, P.SAVE_RESIDENT, P.monotonic_ns()))
        stop, _ = until(daemon, lambda m: isinstance(m, P.TrainStopped))
        assert (stop.reason, stop.iteration) == (P.STOP_PREEMPTED, 9)
        run = made[0].runs[0]
        assert run.where == "gpu"
        # Paused: a preemption of another task is no write-back (nothing answers) ...
        P.send(daemon, P.Preempt(7, P.PREEMPT_ABANDON, P.SAVE_HOST, P.monotonic_ns()))
        # ... one of its last task is.
        P.send(daemon, P.Preempt(1, P.PREEMPT_ABANDON, P.SAVE_HOST, P.monotonic_ns()))
        back = P.recv(daemon)[0]
        assert isinstance(back, P.TrainStopped) and (back.task_id, back.reason, back.iteration) == (1, P.STOP_PREEMPTED, 9)
        assert run.where == "host"
        m = start_task(daemon, 2, j, 9)
        assert m == P.TrainProgress(2, P.PROGRESS_RESUMED, 9, 0, 64)
        stop, _ = until(daemon, lambda m: isinstance(m, P.TrainStopped))
        assert (stop.reason, stop.iteration) == (P.STOP_FINISHED, 30)
        # A preemption that crossed the end of the job is no write-back: no answer.
        P.send(daemon, P.Preempt(2, P.PREEMPT_ABANDON, P.SAVE_HOST, P.monotonic_ns()))
        P.send(daemon, P.Shutdown())
        assert P.recv(daemon) is None
        t.join(10)
    assert result == {"ok": True}
    assert len(made[0].runs) == 1 and made[0].runs[0].state() == want


def test_a_killed_worker_is_replaced_by_one_that_resumes_from_the_checkpoint(tmp_path):
    j = job(checkpoint_every=5)
    want = reference(j)
    path = str(tmp_path / "ckpt")
    daemon, t, made, result = start()
    with daemon:
        start_task(daemon, 1, j, 0, path)
        m, seen = until(daemon, lambda m: isinstance(m, P.TrainProgress) and m.iteration >= 12)
        assert [m.iteration for m in seen if m.event == P.PROGRESS_CHECKPOINT] == [5, 10]
    # The daemon's side closed: the worker ends (as if the daemon had killed it).
    t.join(10)
    assert not t.is_alive()
    daemon, t, made, result = start()
    with daemon:
        # A resume from a state nobody holds: a clear failure, the worker lives on.
        m = start_task(daemon, 2, j, 12, path)
        assert isinstance(m, P.TrainStopped) and m.reason == P.STOP_FAILED and m.status == 204, m
        assert "no saved state of iteration 12" in m.message and "iteration 10 in the file" in m.message
        m = start_task(daemon, 3, j, 10, path)
        assert m == P.TrainProgress(3, P.PROGRESS_RESUMED, 10, 10, 64)
        stop, _ = until(daemon, lambda m: isinstance(m, P.TrainStopped))
        assert (stop.reason, stop.iteration, stop.checkpoint) == (P.STOP_FINISHED, 30, 30)
        state = made[0].runs[-1].state()
        state["rng"] = list(state["rng"])
        P.send(daemon, P.Shutdown())
        t.join(10)
    want["rng"] = list(want["rng"])
    assert json.loads(json.dumps(state)) == json.loads(json.dumps(want))


def test_a_job_that_raises_fails_with_its_message_and_the_worker_serves_on():
    daemon, t, made, result = start()
    with daemon:
        start_task(daemon, 1, job(entry="plain:raise"), 0)
        stop, _ = until(daemon, lambda m: isinstance(m, P.TrainStopped))
        assert (stop.reason, stop.iteration, stop.status) == (P.STOP_FAILED, 3, 101), stop
        assert "ValueError: bad batch 4" in stop.message
        assert made[0].runs[0].closed, "the failed job's state is dropped"
        # A preemption that crosses the failure is ignored; deactivate works.
        P.send(daemon, P.Preempt(1, P.PREEMPT_ABANDON, P.SAVE_HOST, 0))
        P.send(daemon, P.Deactivate())
        assert P.recv(daemon) == (P.Standby(4), None)
        # The next job on the same worker runs and is preempted as usual.
        m = start_task(daemon, 2, job(), 0)
        assert isinstance(m, P.TrainProgress)
        P.send(daemon, P.Preempt(2, P.PREEMPT_BOUNDARY, P.SAVE_RESIDENT, 0))
        stop, _ = until(daemon, lambda m: isinstance(m, P.TrainStopped))
        assert stop.reason == P.STOP_PREEMPTED
        P.send(daemon, P.Shutdown())
        t.join(10)
    assert result == {"ok": True}


# ---------------------------------------------------------------------------
# With torch
# ---------------------------------------------------------------------------

def _torch():
    return pytest.importorskip("torch")


def _state(torch, run):
    out = {k: v.detach().cpu().clone() for k, v in run.model.state_dict().items()}
    for i, st in enumerate(run.optimizer.state.values()):
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                out["opt%d.%s" % (i, k)] = v.detach().cpu().clone()
    return out


@pytest.mark.parametrize("cuda", [False, True])
def test_torch_training_with_preemptions_is_bit_for_bit_the_same(cuda, tmp_path):
    torch = _torch()
    if cuda and not torch.cuda.is_available():
        pytest.skip("no CUDA")
    old = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    try:
        _compare(torch, cuda, tmp_path)
    finally:
        torch.use_deterministic_algorithms(old[0])
        torch.backends.cudnn.benchmark = old[1]


def _compare(torch, cuda, tmp_path):
    from pipeswitch.train import TorchTrainRun, tiny_job

    dev = torch.device("cuda", 0) if cuda else torch.device("cpu")
    n = 12
    never = threading.Event()

    ref = TorchTrainRun(tiny_job(dev), dev, abandon=True)
    for i in range(1, n + 1):
        assert ref.step(i, never)
    want = _state(torch, ref)
    # The size the worker reports (save=auto): parameters and their
    # gradients, buffers, and the optimiser's momentum.
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    params, bufs = nbytes(ref.model.parameters()), nbytes(ref.model.buffers())
    moms = nbytes(v for st in ref.optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor))
    assert moms == params and ref.state_bytes() == 2 * params + bufs + moms

    run = TorchTrainRun(tiny_job(dev), dev, abandon=True)
    stop = threading.Event()
    trip = {"at": None}

    def arm_forward(*_):  # a preemption that lands in the middle of the forward
        if trip["at"] in (3, 7):
            stop.set()

    def arm_backward(module, args, out):  # ... or of the backward
        if trip["at"] == 10:
            out.register_hook(lambda g: stop.set())

    reached = []  # iterations whose backward reached the first block

    def mark(module, args, out):
        at = trip["at"]
        out.register_hook(lambda g: reached.append(at))

    def arm(run):
        blocks = list(run.model.children())
        return [blocks[1].register_forward_pre_hook(arm_forward), blocks[2].register_forward_hook(arm_backward),
                blocks[0].register_forward_hook(mark)]

    hooks = arm(run)
    i = 0
    abandoned = 0
    while i < n:
        trip["at"] = i + 1 if (i + 1) in (3, 7, 10) and stop_count(abandoned, i) else None
        if run.step(i + 1, stop):
            i += 1
        else:
            abandoned += 1
            stop.clear()
            trip["at"] = None
            if i == 2:
                # save=auto: paused resident, then written back when a model needs the room.
                run.save(1)
            run.save(2)  # SAVE_HOST: written back (a no-op on the CPU)
            run.restore_held()
            if i == 6:
                # Through the checkpoint file into a fresh run.
                run.checkpoint(str(tmp_path / "ck"), i)
                for h in hooks:
                    h.remove()
                run.close()
                run = TorchTrainRun(tiny_job(dev), dev, abandon=True)
                run.load_checkpoint(str(tmp_path / "ck"), i)
                hooks = arm(run)
    assert abandoned == 3
    assert not set(reached) & {3, 7, 10}, "an abandoned step's backward went on: %s" % reached
    got = _state(torch, run)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def stop_count(abandoned, i):
    # Each of iterations 3, 7 and 10 is abandoned once, then redone.
    return abandoned < [3, 7, 10].index(i + 1) + 1


def test_a_preemption_while_the_state_is_written_cuts_the_checkpoint_short(tmp_path):
    """Every iteration writes a checkpoint, which waits (up to 2 s) for a
    preemption: each preemption lands in a write and is answered without
    waiting for it; the file keeps the last whole checkpoint, which the
    reply names."""
    path = str(tmp_path / "ckpt")
    daemon, t, made, result = start()
    with daemon:
        # A first checkpoint, written whole.
        start_task(daemon, 1, job(checkpoint_every=1, iterations=1, name="plain ckhold"), 0, path)
        stop, _ = until(daemon, lambda m: isinstance(m, P.TrainStopped))
        assert (stop.reason, stop.checkpoint) == (P.STOP_FINISHED, 1)
        j = job(checkpoint_every=1, iterations=0, name="plain ckhold")
        it, task_id = 1, 2
        for _ in range(3):
            start_task(daemon, task_id, j, it, path)
            # An iteration's report comes just before its checkpoint is written.
            until(daemon, lambda m: isinstance(m, P.TrainProgress) and m.event == P.PROGRESS_ITERATION)
            P.send(daemon, P.Preempt(task_id, P.PREEMPT_ABANDON, P.SAVE_HOST, P.monotonic_ns()))
            stop, _ = until(daemon, lambda m: isinstance(m, P.TrainStopped))
            assert stop.reason == P.STOP_PREEMPTED and stop.stop_ms < 1000
            with open(path) as f:
                on_file = json.load(f)["iteration"]
            assert (stop.iteration, stop.checkpoint, on_file) == (it + 1, 1, 1), stop
            it, task_id = stop.iteration, task_id + 1
        P.send(daemon, P.Shutdown())
        t.join(10)
    assert result == {"ok": True}
    run = made[0].runs[0]
    assert (run.checkpoints_cut, run.steps_abandoned) == (3, 0)
    assert not os.path.exists(path + ".tmp")


def test_the_reference_data_is_a_function_of_the_iteration_made_on_the_device():
    """A batch is the same at every call for its iteration (an abandoned
    step is redone with the same data), differs between iterations, is
    made on the job's device, and leaves the job's own RNG (dropout's)
    alone."""
    torch = _torch()
    from pipeswitch.train import _synthetic, tiny_job

    devs = [torch.device("cpu")] + ([torch.device("cuda", 0)] if torch.cuda.is_available() else [])
    for dev in devs:
        data = _synthetic(torch, dev, (3, 5, 5), 10, 4, 7)
        rng = lambda: (torch.get_rng_state(),) + ((torch.cuda.get_rng_state(dev),) if dev.type == "cuda" else ())  # noqa: E731
        before = rng()
        x1, y1 = data(1)
        x2, y2 = data(2)
        again = data(1)
        assert all(torch.equal(a, b) for a, b in zip(rng(), before)), "the data function drew from the job's RNG"
        assert x1.device.type == dev.type and y1.device.type == dev.type
        assert (tuple(x1.shape), tuple(y1.shape), x1.dtype, y1.dtype) == ((4, 3, 5, 5), (4,), torch.float32, torch.int64)
        assert torch.equal(x1, again[0]) and torch.equal(y1, again[1])
        assert not torch.equal(x1, x2)
        assert int(y1.min()) >= 0 and int(y1.max()) < 10
        # Another job's data (another seed) differs; the same job made twice does not.
        assert not torch.equal(_synthetic(torch, dev, (3, 5, 5), 10, 4, 8)(1)[0], x1)
        assert torch.equal(tiny_job(dev).data(3)[0], tiny_job(dev).data(3)[0])


def test_the_write_back_image_holds_every_tensor_apart_and_bit_for_bit(monkeypatch):
    """The write-back's host buffer: each tensor of the state (dtypes and
    shapes mixed, empty and scalar ones, one bigger than a copy's chunk)
    at its own aligned place, copied in and out bit for bit; the image is
    reused only for the same layout."""
    torch = _torch()
    from pipeswitch import train as T

    monkeypatch.setattr(T, "CHUNK_BYTES", 64)  # the 40-float tensor goes in 3 pieces
    g = torch.Generator().manual_seed(3)
    state = [torch.randn(40, generator=g), torch.randint(-9, 9, (3, 2), generator=g), torch.zeros(0),
             torch.tensor(5, dtype=torch.int64), torch.randn(2, 3, generator=g).double(),
             torch.tensor([True, False, True]), torch.randn(7, generator=g).half()]
    img = T._HostImage(torch, state, pin=False)
    assert img.fits(state) and not img.fits(state[:-1])
    assert not img.fits(state[:-1] + [torch.randn(8).half()]) and not img.fits(state[:-1] + [state[-1].float()])
    ptrs = [v.data_ptr() for v in img.views if v.numel()]
    assert all((p - img.buf.data_ptr()) % T._HostImage.ALIGN == 0 for p in ptrs)
    assert img.nbytes >= sum(t.numel() * t.element_size() for t in state)
    T._copy_pieces(torch, img.views, state, non_blocking=False)
    for v, t in zip(img.views, state):
        assert v.dtype == t.dtype and v.shape == t.shape and torch.equal(v, t)
    # Apart: every byte of the buffer belongs to one tensor at most.
    ends = sorted((v.data_ptr(), v.data_ptr() + v.numel() * v.element_size()) for v in img.views if v.numel())
    assert all(a[1] <= b[0] for a, b in zip(ends, ends[1:]))
    back = [torch.empty_like(t) for t in state]
    T._copy_pieces(torch, back, img.views, non_blocking=False)
    assert all(torch.equal(b, t) for b, t in zip(back, state))


def test_a_step_switches_threads_quickly_and_puts_the_interval_back():
    """While a step runs (done, abandoned or raising), Python's switch
    interval is SWITCH_INTERVAL_S, so that the thread that sees the
    preemption gets the GIL from the training thread within it; the
    interpreter's own is back after; ``switch_interval = None`` leaves it."""
    import sys

    torch = _torch()
    from pipeswitch.train import SWITCH_INTERVAL_S, TorchTrainRun, tiny_job

    seen = []
    dev = torch.device("cpu")
    run = TorchTrainRun(tiny_job(dev), dev, abandon=True)
    run.model[1].register_forward_pre_hook(lambda m, a: seen.append(sys.getswitchinterval()))
    old = sys.getswitchinterval()
    stop = threading.Event()
    assert run.step(1, stop) and seen[-1] == SWITCH_INTERVAL_S < old
    assert sys.getswitchinterval() == old
    stop.set()
    made = []
    data = run.spec.data
    run.spec.data = lambda i: made.append(i) or data(i)
    rng = torch.get_rng_state()
    assert not run.step(2, stop) and sys.getswitchinterval() == old
    assert made == [] and torch.equal(torch.get_rng_state(), rng), "a step preempted before it began made its data"
    run.spec.data = data
    bad = run.spec.data
    run.spec.data = lambda i: (_ for _ in ()).throw(ValueError("bad batch"))
    with pytest.raises(ValueError):
        run.step(2, threading.Event())
    assert sys.getswitchinterval() == old
    run.spec.data = bad
    run.switch_interval = None
    assert run.step(2, threading.Event()) and seen[-1] == old
    run.close()


def test_a_preemption_seen_by_another_thread_ends_the_step_within_one_block():
    """The worker's way: a thread woken by the daemon's socket sets the
    event while a block of the forward runs (blocks that hold the GIL, as
    kernel launches do); the next block's check ends the step, which
    leaves nothing of it (the same numbers as a run never preempted)."""
    import sys

    torch = _torch()
    from pipeswitch.train import TorchTrainRun

    nn = torch.nn
    ran = []
    entered = threading.Event()

    class Busy(nn.Module):
        def __init__(self, k):
            super().__init__()
            self.k = k
            self.lin = nn.Linear(6, 6)

        def forward(self, x):
            ran.append(self.k)
            if self.k == 2:
                entered.set()
            end = time.perf_counter() + 0.03
            while time.perf_counter() < end:  # Python work, the GIL held
                pass
            return torch.relu(self.lin(x))

    def make():
        torch.manual_seed(1)
        model = nn.Sequential(*[Busy(k) for k in range(6)])
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        g = torch.Generator()

        def data(i):
            g.manual_seed(i)
            return torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
        return {"model": model, "optimizer": opt, "data": data, "loss": nn.functional.mse_loss}

    dev = torch.device("cpu")
    ref = TorchTrainRun(make(), dev, abandon=True)
    for i in (1, 2):
        assert ref.step(i, threading.Event())
    run = TorchTrainRun(make(), dev, abandon=True)
    assert run.step(1, threading.Event())
    a, b = socket.socketpair()
    stop = threading.Event()

    def watch():  # as pipeswitch.worker's watcher: poll the socket, set the event
        import select

        p = select.poll()
        p.register(b.fileno(), select.POLLIN)
        p.poll(5000)
        stop.set()

    t = threading.Thread(target=watch)
    t.start()
    entered.clear()
    del ran[:]
    threading.Thread(target=lambda: entered.wait(5) and a.send(b"P")).start()
    interval = sys.getswitchinterval()
    assert not run.step(2, stop), "the step was not abandoned"
    assert sys.getswitchinterval() == interval, "an abandoned step kept its quick switch interval"
    t.join(5)
    a.close()
    b.close()
    assert ran == [0, 1, 2], "the step went on %d blocks past the one the preemption landed in" % (ran[-1] - 2)
    assert run.step(2, threading.Event())
    for (k, v), w in zip(run.model.state_dict().items(), ref.model.state_dict().values()):
        assert torch.equal(v, w), k


def test_the_write_back_pins_one_buffer_once_and_frees_the_gpu_copy():
    """SAVE_HOST on CUDA: the state goes into one pinned buffer, pinned at
    the first write-back and reused by the next ones; the parameters' GPU
    memory is freed; the state comes back bit for bit."""
    torch = _torch()
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    from pipeswitch.train import TorchTrainRun, tiny_job

    dev = torch.device("cuda", 0)
    run = TorchTrainRun(tiny_job(dev), dev, abandon=True)
    never = threading.Event()
    for i in (1, 2):
        assert run.step(i, never)
    buf = None
    for n in range(3):
        before = _state(torch, run)
        params = sum(p.numel() * p.element_size() for p in run.model.parameters())
        run.save(P.SAVE_HOST)
        s = run.last_save
        assert s["pinned_new"] == (n == 0) and s["bytes"] >= 2 * params and s["total_ms"] >= 0  # and momentum
        assert run._image.buf.is_pinned()
        assert buf is None or run._image.buf.data_ptr() == buf
        buf = run._image.buf.data_ptr()
        assert all(p.numel() == 0 and p.device.type == "cuda" for p in run.model.parameters())
        run.restore_held()
        run._wait_all()
        after = _state(torch, run)
        assert all(torch.equal(after[k], before[k]) for k in before)
        assert run.step(3 + n, never)
    run.close()


def test_the_stop_bench_runs_through_the_workers_loop(tmp_path):
    """bench/train/stop_bench.py (run on the GPU machine) on the CPU with the
    small job: every variant's preemptions are answered by the worker's
    loop, stopped, with the iteration kept."""
    _torch()
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.path.join(root, "python"))
    p = subprocess.run([sys.executable, os.path.join(root, "bench", "train", "stop_bench.py"), "--device", "cpu",
                        "--models", "tiny", "--trials", "3", "--host-trials", "2", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    with open(tmp_path / "train-stop.json") as f:
        r = json.load(f)["models"]["tiny"]
    assert "error" not in r, r.get("error")
    for name in ("cpu-data/5ms", "device-data/5ms", "device-data/quick", "host-save"):
        trials = r[name]["trials"]
        assert len(trials) == (2 if name == "host-save" else 3)
        assert all(0 <= t["stop_ms"] < 1000 and t["iteration"] >= 3 for t in trials), trials
        # The watcher's notice is a part of the stop (the same clock).
        assert all(t["notice_ms"] is None or 0 <= t["notice_ms"] <= t["stop_ms"] for t in trials), trials
    its = [t["iteration"] for t in r["device-data/quick"]["trials"]]
    assert its == sorted(its), "the iterations went back"
