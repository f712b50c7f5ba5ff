"""Training jobs for ``pipeswitch serve``: the step-function API, the saving
and restoring of a job's state, and the reference job.

A job is a factory, ``module:function``, called with the CUDA device (or
``torch.device("cpu")``) and the job's name; it returns a :class:`TrainSpec`
(or a dict with the same keys):

- ``model``: an ``nn.Module`` on the device, in train mode;
- ``optimizer``: a ``torch.optim`` optimiser over its parameters;
- ``data(iteration)``: the batch ``(inputs, targets)`` of an iteration
  (1, 2, ...), on the device. A batch depends on its iteration only, so that
  an abandoned iteration is redone with the same data (a data loader is
  wrapped by indexing into it, e.g. a seeded sampler per epoch). It runs at
  the start of the step, before the step's first check for a preemption:
  the time it holds the host is added to the stop of a preemption that
  lands in it. It should return quickly: make synthetic data on the device
  (as the reference jobs do, with a generator seeded by the iteration),
  and have a real loader prefetch (its worker processes, pinned memory,
  ``non_blocking`` copies) rather than decode and copy synchronously here;
- ``loss(outputs, targets)``: a scalar tensor;
- ``samples``: samples per iteration (for throughput figures).

The worker (``python -m pipeswitch.worker``) runs the steps
(:meth:`TorchTrainRun.step`): data, forward, loss, backward, and, unless a
preemption came meanwhile, the optimiser's step. With ``PREEMPT_ABANDON``,
the forward checks for a preemption at every block (pre-hooks on the
model's blocks), the backward at every block too (hooks on the gradients of
the blocks' inputs), with the host kept at most two blocks ahead of the
GPU; the step checks again while the backward's last kernels finish,
before the optimiser's step. A preempted step is abandoned (gradients
dropped, the buffers, e.g. batch-norm statistics, and the RNG put back) and
redone on resume. With ``PREEMPT_BOUNDARY`` the step completes. The
preemption is seen by another thread of the worker, which must take the GIL
from the training thread: while a step runs, Python switches threads every
:data:`SWITCH_INTERVAL_S` (0.5 ms) instead of its default 5 ms.

The state of a job is its parameters, buffers, optimiser state, RNG
(CPU and CUDA) and iteration. When preempted it either stays in GPU memory
(``SAVE_RESIDENT``) or is written back to pinned host memory (one buffer
pinned at the first write-back and reused) in chunked multi-tensor copies
on a side stream and freed on the GPU (``SAVE_HOST``); with
``SAVE_AUTO`` (the default) the daemon picks one of the two at each
preemption, from the state's size the worker reports; resuming
copies it back the same way, pipelined with the first step: buffers first,
then the parameters module by module in the model's order (each module's
forward waits, on the GPU, for its own parameters only), the optimiser's
state last (waited for before the optimiser's step). A checkpoint (every ``checkpoint_every``
iterations) writes it to the job's shared-memory file, to a temporary file
renamed over the last one, so that a worker killed at any point leaves the
previous checkpoint whole; a new worker resumes from it.

Command line (a client of the daemon)::

    python -m pipeswitch.train submit r152 pipeswitch.train:resnet152_job --idle-ms 200
    python -m pipeswitch.train status 1 --watch 30     # a line per change: running, paused ...
    python -m pipeswitch.train cancel 1
"""

import argparse
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

__all__ = ["TrainSpec", "TorchTrainRun", "Abandoned", "resnet152_job", "inception_v3_job", "bert_base_job",
           "tiny_job", "CHUNK_BYTES", "SWITCH_INTERVAL_S"]

#: Bytes per copy of the chunked write-back and restore.
CHUNK_BYTES = 8 << 20

#: Python's thread switch interval while a step runs (seconds; the
#: interpreter's default is 5 ms). The preemption is seen by a thread of the
#: worker that must take the GIL from the training thread, which holds it
#: while it launches kernels: with the default it waits up to 5 ms for it,
#: twice (the socket, then the event), before the step can see the stop.
SWITCH_INTERVAL_S = 0.0005


class Abandoned(Exception):
    """A step stopped by a preemption (internal)."""


@dataclass
class TrainSpec:
    model: object
    optimizer: object
    data: Callable
    loss: Callable
    samples: int = 1


def _spec_of(obj):
    if isinstance(obj, TrainSpec):
        return obj
    if isinstance(obj, dict):
        missing = [k for k in ("model", "optimizer", "data", "loss") if k not in obj]
        if missing:
            raise TypeError("a training job's dict lacks %s" % ", ".join(missing))
        return TrainSpec(obj["model"], obj["optimizer"], obj["data"], obj["loss"], int(obj.get("samples", 1)))
    raise TypeError("a training job factory returned a %s, not a TrainSpec or a dict" % type(obj).__name__)


def _blocks(model):
    """The modules whose pre-hooks check for preemption: the entries of the
    model's Sequential/ModuleList containers (ResNet's bottlenecks, BERT's
    layers), else its children."""
    import torch

    found = []
    for m in model.modules():
        if isinstance(m, (torch.nn.Sequential, torch.nn.ModuleList)):
            found.extend(c for c in m.children() if any(True for _ in c.parameters()))
    if len(found) < 4:
        found = [c for c in model.children()]
    return found


class TorchTrainRun:
    """One training job in a worker: its spec, the steps, and its state
    saved and restored (see the module's text)."""

    def __init__(self, spec, device, abandon):
        import torch

        self.torch = torch
        self.spec = _spec_of(spec)
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.abandon = bool(abandon)
        self.switch_interval = SWITCH_INTERVAL_S  # None: Python's own
        self.model = self.spec.model
        self.optimizer = self.spec.optimizer
        self.model.train()
        self.stop = None  # a threading.Event while a step runs
        self.on_gpu = True  # False: the state is in pinned host memory
        self._image = None  # the pinned host buffer of the write-back, reused
        self.last_save = None  # the last write-back's times (save())
        self._held = []
        self._ring = []
        # The buffers (e.g. batch-norm statistics) as they were before the
        # step in flight, put back when it is abandoned; reused every step.
        self._buf_snap = None
        self._hooks = []
        # Events of a pipelined restore: module -> its parameters copied;
        # the buffers; the optimiser's state.
        self._ready = {}
        self._buf_ready = None
        self._opt_ready = None
        self.side = torch.cuda.Stream(self.device) if self.cuda else None
        if self.cuda:
            for mod in self.model.modules():
                if any(True for _ in mod.parameters(recurse=False)):
                    self._hooks.append(mod.register_forward_pre_hook(self._wait_module))
        if self.abandon:
            for b in _blocks(self.model):
                self._hooks.append(b.register_forward_pre_hook(self._pre))

    # -- steps ------------------------------------------------------------

    def _wait_module(self, module, args):
        ev = self._ready.pop(module, None)
        if ev is not None:
            self.torch.cuda.current_stream(self.device).wait_event(ev)

    def _wait_params(self):
        """The current stream waits for every parameter being restored."""
        if self._ready:
            cur = self.torch.cuda.current_stream(self.device)
            for ev in self._ready.values():
                cur.wait_event(ev)
            self._ready.clear()

    def _wait_all(self):
        """The current stream waits for the whole restore."""
        if self.cuda and (self._ready or self._buf_ready is not None or self._opt_ready is not None):
            self.torch.cuda.current_stream(self.device).wait_stream(self.side)
        self._ready.clear()
        self._buf_ready = self._opt_ready = None

    def _pre(self, module, args):
        self._check()
        if self.torch.is_grad_enabled():
            # The backward passes this block when its input's gradient is done.
            for a in args:
                if isinstance(a, self.torch.Tensor) and a.requires_grad:
                    try:
                        a.register_hook(self._backward_check)
                    except RuntimeError:
                        pass  # a tensor that takes no hooks: the next block's check serves

    def _backward_check(self, grad):
        self._check()

    def _check(self, *_):
        if self.stop is not None and self.stop.is_set():
            raise Abandoned()
        if self.cuda:
            # At most two blocks ahead of the GPU: a preemption does not wait
            # for a long queue of launched kernels.
            ev = self.torch.cuda.Event()
            ev.record()
            self._ring.append(ev)
            if len(self._ring) > 2:
                old = self._ring.pop(0)
                while not old.query():
                    if self.stop is not None and self.stop.is_set():
                        raise Abandoned()
                    time.sleep(50e-6)

    def _rng(self):
        torch = self.torch
        return torch.get_rng_state(), (torch.cuda.get_rng_state(self.device) if self.cuda else None)

    def _set_rng(self, rng):
        torch = self.torch
        torch.set_rng_state(rng[0])
        if self.cuda and rng[1] is not None:
            torch.cuda.set_rng_state(rng[1], self.device)

    def step(self, iteration, stop):
        """Runs iteration ``iteration``; False if abandoned (nothing of it
        kept), True when done (its kernels finished). While it runs, Python
        switches threads every :data:`SWITCH_INTERVAL_S` at most (the
        interpreter's own interval is put back after)."""
        old = sys.getswitchinterval()
        quick = self.switch_interval is not None and 0 < self.switch_interval < old
        if quick:
            sys.setswitchinterval(self.switch_interval)
        try:
            return self._step(iteration, stop)
        finally:
            if quick:
                sys.setswitchinterval(old)

    def _step(self, iteration, stop):
        torch = self.torch
        if self.abandon and stop.is_set():
            return False  # preempted before it began: nothing to undo, no data made
        if self._buf_ready is not None:
            torch.cuda.current_stream(self.device).wait_event(self._buf_ready)
            self._buf_ready = None
        self.stop = stop if self.abandon else None
        rng = self._rng() if self.abandon else None
        bufs = self._snapshot_buffers() if self.abandon else None
        self._ring = []
        try:
            x, y = self.spec.data(iteration)
            self._check()
            out = self.model(x)
            if self.cuda:
                self._wait_params()  # any not used by their own module's forward
            loss = self.spec.loss(out, y)
            self._check()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self._check()
            if self.cuda:
                # Before the optimiser's step: the last chance to abandon.
                ev = torch.cuda.Event()
                ev.record()
                while not ev.query():
                    if self.stop is not None and self.stop.is_set():
                        raise Abandoned()
                    time.sleep(50e-6)
            self._check()
        except BaseException as e:
            if self.stop is not None and self.stop.is_set() and (isinstance(e, Abandoned) or "Abandoned" in repr(e)):
                self._undo(rng, bufs)
                return False
            raise
        finally:
            self.stop = None
        if self._opt_ready is not None:
            torch.cuda.current_stream(self.device).wait_event(self._opt_ready)
            self._opt_ready = None
        self.optimizer.step()
        if self.cuda:
            torch.cuda.current_stream(self.device).synchronize()
        return True

    def _snapshot_buffers(self):
        """The buffers copied into the snapshot kept for this (a few
        multi-tensor copies, not one per buffer: ResNet-152 has 466); a new
        snapshot when the buffers changed."""
        torch = self.torch
        bufs = [b.detach() for b in self.model.buffers()]
        snap = self._buf_snap
        if snap is None or len(snap) != len(bufs) or any(
                s.shape != b.shape or s.dtype != b.dtype or s.device != b.device for s, b in zip(snap, bufs)):
            self._buf_snap = [b.clone() for b in bufs]
        else:
            with torch.no_grad():
                _copy_all(torch, snap, bufs)
        return self._buf_snap

    def _undo(self, rng, bufs):
        torch = self.torch
        if self.cuda:
            self._wait_all()
        with torch.no_grad():
            self.optimizer.zero_grad(set_to_none=True)
            _copy_all(torch, [b.detach() for b in self.model.buffers()], bufs)
        self._set_rng(rng)
        if self.cuda:
            torch.cuda.current_stream(self.device).synchronize()

    # -- state --------------------------------------------------------------

    def _tensors(self):
        """``[(holder, key, tensor, group)]``: every tensor of the state, with
        where it lives (a parameter/buffer object, or an optimiser state
        dict) and its group of the pipelined restore ("buffers", the module
        that owns the parameter, "optimizer"), in the order of the copies."""
        out = [(b, None, b.data, "buffers") for b in self.model.buffers()]
        seen = set()
        for mod in self.model.modules():
            for p in mod.parameters(recurse=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append((p, None, p.data, mod))
        for st in self.optimizer.state.values():
            for k, v in st.items():
                if isinstance(v, self.torch.Tensor) and v.device.type == self.device.type:
                    out.append((st, k, v, "optimizer"))
        return out

    def state_bytes(self):
        """Bytes of the state on the GPU while training runs: parameters,
        their gradients (counted whether or not a step has made them yet),
        buffers and optimiser state; what the daemon accounts in its
        residency area under ``SAVE_AUTO``."""
        total = 0
        for holder, key, t, _ in self._tensors():
            n = t.numel() * t.element_size()
            if key is None and getattr(holder, "requires_grad", False):
                n *= 2  # its gradient
            total += n
        return total

    def save(self, mode):
        """After a stop: ``SAVE_RESIDENT`` keeps the state where it is,
        ``SAVE_HOST`` writes it back to pinned host memory and frees it on
        the GPU. The state goes into one pinned buffer (:class:`_HostImage`,
        allocated at the first write-back and reused while the state's
        layout stays the same) with multi-tensor copies on the side stream
        and one wait; the GPU memory, the cached activations included, is
        then given back to the driver for the other workers.
        ``last_save`` tells where the time went."""
        from . import protocol as P

        if mode != P.SAVE_HOST or not self.cuda or not self.on_gpu:
            return
        torch = self.torch
        t0 = time.perf_counter()
        self._wait_all()
        # Gradients are recomputed by every step: dropped, not saved.
        self.optimizer.zero_grad(set_to_none=True)
        items = self._tensors()
        srcs = [t for _, _, t, _ in items]
        img = self._image
        new = img is None or not img.fits(srcs)
        if new:
            self._image = img = None  # the old buffer goes before a new one is pinned
            img = self._image = _HostImage(torch, srcs, pin=True)
        t1 = time.perf_counter()
        self.side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.side):
            _copy_pieces(torch, img.views, srcs, non_blocking=True)
        t2 = time.perf_counter()
        self.side.synchronize()
        t3 = time.perf_counter()
        self._held = []
        t = None
        for (holder, key, t, group), h in zip(items, img.views):
            if key is None:
                holder.data = torch.empty(0, dtype=t.dtype, device=self.device)
            else:
                holder[key] = h
            self._held.append((holder, key, h, group))
        del items, srcs, t
        self._buf_snap = None  # made again by the next step
        torch.cuda.empty_cache()
        t4 = time.perf_counter()
        self.on_gpu = False
        self.last_save = {"bytes": img.nbytes, "tensors": len(img.views), "pinned_new": new,
                          "prepare_ms": (t1 - t0) * 1e3, "launch_ms": (t2 - t1) * 1e3, "copy_wait_ms": (t3 - t2) * 1e3,
                          "free_ms": (t4 - t3) * 1e3, "total_ms": (t4 - t0) * 1e3}

    def restore_held(self):
        """Starts copying a written-back state to the GPU (nothing if
        resident): the copies run on the side stream while the next step
        runs, each group's event telling the step when it may use it."""
        if self.on_gpu:
            return
        torch = self.torch
        # Allocated on the stream that uses them; copied on the side stream,
        # a group at a time (the image stays pinned for the next save,
        # which the side stream orders after these copies).
        gpu = [torch.empty(h.shape, dtype=h.dtype, device=self.device) for _, _, h, _ in self._held]
        self.side.wait_stream(torch.cuda.current_stream(self.device))
        held = self._held
        first = 0  # of the group being copied
        with torch.cuda.stream(self.side):
            for i, ((holder, key, h, group), g) in enumerate(zip(held, gpu)):
                if key is None:
                    holder.data = g
                else:
                    holder[key] = g
                if i + 1 == len(held) or held[i + 1][3] is not group:
                    _copy_pieces(torch, gpu[first:i + 1], [x[2] for x in held[first:i + 1]], non_blocking=True)
                    first = i + 1
                    ev = torch.cuda.Event()
                    ev.record(self.side)
                    if group == "buffers":
                        self._buf_ready = ev
                    elif group == "optimizer":
                        self._opt_ready = ev
                    else:
                        self._ready[group] = ev
        self._held = []
        self.on_gpu = True

    def checkpoint(self, path, iteration, stop=None):
        """Writes the state of ``iteration`` to ``path`` (a temporary file
        renamed over it). A preemption (``stop`` set) cuts it short: raises
        :class:`Abandoned`, the last checkpoint left as it was."""
        torch = self.torch

        def check():
            if stop is not None and stop.is_set():
                raise Abandoned()

        self.restore_held()
        if self.cuda:
            self._wait_all()
        model = {}
        for k, v in self.model.state_dict().items():
            check()
            model[k] = v.detach().to("cpu", copy=True)
        check()
        state = {"iteration": int(iteration), "model": model,
                 "optimizer": _to_cpu(torch, self.optimizer.state_dict()), "rng": self._rng()}
        check()
        tmp = "%s.tmp%d" % (path, os.getpid())
        try:
            torch.save(state, tmp)
            check()
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def load_checkpoint(self, path, iteration):
        torch = self.torch
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except FileNotFoundError:
            raise LookupError("no checkpoint at %s" % path) from None
        if state.get("iteration") != iteration:
            raise LookupError("the checkpoint at %s is of iteration %s, not %d"
                              % (path, state.get("iteration"), iteration))
        self.restore_held()
        if self.cuda:
            self._wait_all()
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self._set_rng(state["rng"])

    def close(self):
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self.cuda:
            self._wait_all()
            self.side.synchronize()
        self._held = []
        self._image = None


def _copy_all(torch, dst, src):
    """``d.copy_(s)`` for every pair, as one multi-tensor copy per dtype
    and device (``torch._foreach_copy_``) where PyTorch has it."""
    foreach = getattr(torch, "_foreach_copy_", None)
    if foreach is None:
        for d, s in zip(dst, src):
            d.copy_(s)
        return
    groups = {}
    for d, s in zip(dst, src):
        groups.setdefault((d.dtype, d.device, s.dtype, s.device), ([], []))
        g = groups[(d.dtype, d.device, s.dtype, s.device)]
        g[0].append(d)
        g[1].append(s)
    for ds, ss in groups.values():
        foreach(ds, ss)


class _HostImage:
    """The tensors of a state back to back in one host buffer (each at a
    256-byte boundary), pinned where ``pin``: one allocation instead of
    one per tensor, reused by every write-back of the same layout."""

    ALIGN = 256

    def __init__(self, torch, tensors, pin):
        self.layout = _layout(tensors)
        offsets, end = [], 0
        for t in tensors:
            end = -(-end // self.ALIGN) * self.ALIGN
            offsets.append(end)
            end += t.numel() * t.element_size()
        self.nbytes = end
        self.buf = torch.empty(max(end, 1), dtype=torch.uint8, device="cpu", pin_memory=pin)
        self.views = [self.buf[o:o + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
                      for o, t in zip(offsets, tensors)]

    def fits(self, tensors):
        """Whether ``tensors`` have the layout of this image."""
        return _layout(tensors) == self.layout


def _layout(tensors):
    return [(tuple(t.shape), t.dtype) for t in tensors]


def _copy_pieces(torch, dst, src, non_blocking):
    """``d.copy_(s)`` for every pair, tensors of more than CHUNK_BYTES in
    pieces of that size, as one multi-tensor copy (``torch._foreach_copy_``,
    which copies pair by pair in C++ where the devices differ) where
    PyTorch has it, else one call per piece."""
    ds, ss = [], []
    for d, s in zip(dst, src):
        n = s.numel()
        if n * s.element_size() <= CHUNK_BYTES:
            ds.append(d)
            ss.append(s)
            continue
        fd, fs = d.reshape(-1), s.reshape(-1)
        per = max(1, CHUNK_BYTES // s.element_size())
        for i in range(0, n, per):
            ds.append(fd[i:i + per])
            ss.append(fs[i:i + per])
    foreach = getattr(torch, "_foreach_copy_", None)
    if foreach is not None and ds:
        try:
            foreach(ds, ss, non_blocking=non_blocking)
            return
        except (RuntimeError, TypeError, NotImplementedError):
            pass  # an older PyTorch without the cross-device case: pair by pair
    for d, s in zip(ds, ss):
        d.copy_(s, non_blocking=non_blocking)


def _to_cpu(torch, obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(torch, v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(torch, v) for v in obj]
    return obj


# ---------------------------------------------------------------------------
# Reference jobs (synthetic data: a batch is a function of its iteration)
# ---------------------------------------------------------------------------

def _seeded(torch, device):
    """A generator on ``device`` of the data function's own (the job's
    default RNG, which dropout draws from, is left alone) and its seeding
    per iteration: on CUDA the numbers are drawn by kernels, so making a
    batch costs the host a few launches, not tens of milliseconds of
    uninterruptible CPU work and a synchronous copy."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    g = torch.Generator(device=device)

    def seed(value):
        g.manual_seed(int(value))  # also resets a CUDA generator's offset
        return g
    return device, seed


def _synthetic(torch, device, shape, classes, batch, seed):
    """``data(iteration)``: a batch of normal images and class labels made on
    ``device``, the same for the same iteration (a pure function of it)."""
    device, seeded = _seeded(torch, device)

    def data(iteration):
        g = seeded(seed * 1_000_003 + int(iteration))
        x = torch.randn((batch,) + tuple(shape), generator=g, device=device)
        y = torch.randint(0, classes, (batch,), generator=g, device=device)
        return x, y
    return data


def _vision_job(device, factory, shape, batch, seed=0):
    import torch

    torch.manual_seed(seed)
    model = factory().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    ce = torch.nn.CrossEntropyLoss()

    def loss(out, y):
        if isinstance(out, tuple):  # inception's aux logits
            out = out[0]
        if hasattr(out, "logits"):
            out = out.logits
        return ce(out, y)
    return TrainSpec(model, opt, _synthetic(torch, device, shape, 1000, batch, seed), loss, batch)


def resnet152_job(device, name="resnet152", batch=32):
    """The reference job: ResNet-152, SGD with momentum 0.9, synthetic
    ImageNet-sized data, batch 32."""
    import torchvision

    return _vision_job(device, lambda: torchvision.models.resnet152(weights=None), (3, 224, 224), batch)


def inception_v3_job(device, name="inception_v3", batch=32):
    import torchvision

    return _vision_job(device, lambda: torchvision.models.inception_v3(weights=None, aux_logits=True,
                                                                       init_weights=False),
                       (3, 299, 299), batch)


def bert_base_job(device, name="bert_base", batch=32, seq=128):
    """BERT-base (random weights) on a synthetic two-class task."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig()
    cfg.num_labels = 2
    model = transformers.BertForSequenceClassification(cfg).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    device, seeded = _seeded(torch, device)

    def data(iteration):
        g = seeded(1_000_003 + int(iteration))
        ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g, device=device)
        y = torch.randint(0, 2, (batch,), generator=g, device=device)
        return ids, y

    ce = torch.nn.CrossEntropyLoss()
    return TrainSpec(model, opt, data, lambda out, y: ce(out.logits, y), batch)


def tiny_job(device, name="tiny", batch=8):
    """A small CNN with batch norm and dropout (tests)."""
    import torch

    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
        nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(8 * 8 * 8, 10)),
        nn.Sequential(nn.ReLU(), nn.Linear(10, 10)),
    ).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ce = nn.CrossEntropyLoss()
    return TrainSpec(model, opt, _synthetic(torch, device, (3, 8, 8), 10, batch, 7), ce, batch)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def _line(st):
    s = "job %d %s: iteration %d, checkpoint %d, preemptions %d" % (
        st.job_id, st.state_name, st.iteration, st.checkpoint, st.preemptions)
    if st.message:
        s += ": " + st.message
    return s


def main(argv=None):
    from .client import Client
    from .errors import PipeSwitchError

    ap = argparse.ArgumentParser(prog="python -m pipeswitch.train",
                                 description="Submit, watch and cancel training jobs of `pipeswitch serve`.")
    ap.add_argument("--socket", default=None, help="the daemon's socket (default: the one of --device)")
    ap.add_argument("--device", type=int, default=0)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("submit", help="submit a job: NAME module:function")
    s.add_argument("name")
    s.add_argument("entry")
    s.add_argument("--preempt", choices=["abandon", "boundary"], default="abandon")
    s.add_argument("--save", choices=["auto", "host", "resident"], default="auto",
                   help="where a preempted job's state waits (auto: the daemon decides by the room left)")
    s.add_argument("--policy", choices=["inference-first", "time-share"], default="inference-first")
    s.add_argument("--share", type=float, default=0.5, help="training's share of each period (time-share)")
    s.add_argument("--period-ms", type=int, default=5000)
    s.add_argument("--idle-ms", type=int, default=100, help="idle inference time before training resumes")
    s.add_argument("--iterations", type=int, default=0, help="0: until cancelled")
    s.add_argument("--checkpoint-every", type=int, default=0)
    st = sub.add_parser("status", help="a job's state")
    st.add_argument("job", type=int)
    st.add_argument("--watch", type=float, default=0.0, metavar="SECONDS",
                    help="print a line at every change of state for this long")
    c = sub.add_parser("cancel", help="end a job")
    c.add_argument("job", type=int)
    a = ap.parse_args(argv)
    try:
        with Client(socket=a.socket, device=a.device, timeout=30) as cl:
            if a.cmd == "submit":
                r = cl.train(a.name, a.entry, a.preempt, a.save, a.policy, a.share, a.period_ms, a.idle_ms,
                             a.iterations, a.checkpoint_every)
                print(_line(r))
            elif a.cmd == "cancel":
                print(_line(cl.train_status(a.job, cancel=True)))
            else:
                r = cl.train_status(a.job)
                print(_line(r), flush=True)
                end = time.monotonic() + a.watch
                last = (r.state, r.preemptions)
                while time.monotonic() < end and r.state_name not in ("finished", "failed", "cancelled"):
                    time.sleep(0.05)
                    r = cl.train_status(a.job)
                    if (r.state, r.preemptions) != last:
                        last = (r.state, r.preemptions)
                        print("%s %s" % (time.strftime("%H:%M:%S"), _line(r)), flush=True)
    except PipeSwitchError as e:
        print("error: %s" % e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
