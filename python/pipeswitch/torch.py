"""PyTorch integration: put an ``nn.Module`` into a :class:`~pipeswitch.Store`
(:func:`register_module`) and run it from arena memory on a GPU worker
(:class:`Worker`), switching models with the pipelined switch.

Import it explicitly (``import pipeswitch.torch``); ``import pipeswitch``
never imports PyTorch. PyTorch itself is imported on first use.

Layers. A *layer* is a module that directly owns parameters or buffers
(``module._parameters`` / ``module._buffers`` non-empty, ``recurse=False``).
Layers are ordered by their first call in one forward pass (forward
pre-hooks, i.e. the order in which modules are *entered*; a module owning
tensors is entered before its children); modules never called come last, in
``named_modules()`` order. A layer's tensors are its own parameters, then its
own buffers (non-persistent ones included), in registration order, named by
their full dotted state-dict names (a module reachable under several names
uses its first). Shared (tied) tensors - the same tensor, or another tensor
with the same data pointer, shape, strides and dtype, e.g. GPT-2's
``lm_head.weight`` tied to ``transformer.wte.weight`` - are stored once and
belong to the *first layer that uses them* in that order; a layer whose
tensors are all tied to earlier layers is not stored (its time counts towards
the layer before it).

Contract for pipelining: a tensor must not be read before the module that
owns it (its layer) has been entered, in every forward. Modules that read
other modules' weights directly (e.g. a parent using ``child.weight``
without calling ``child`` first) break that and need the whole model in one
group (``plan=[0]``).

Token tables. A transformer's first layer is its token embedding (BERT-base
94 MB, GPT-2 medium 206 MB): in execution order its whole group would have
to cross PCIe before the first kernel runs. So :func:`register_module`
(``tables_last=True``, the default) stores *tables* after every other layer
(in their execution order among themselves), and the :class:`Worker` lets a
table's lookup read the few rows it needs straight from the store's pinned
host pages (``Switch.host_model_ptr``, mapped into the GPU's address space)
while the table's group is still on its way (direct host access, as in
DeepPlan); the forward never waits for a table's group. A *table* is a layer
whose module is a ``torch.nn.Embedding`` (subclasses included; nothing else,
e.g. not ``EmbeddingBag`` or a ``Linear``) that

- owns its tensors itself (none tied to an earlier layer) and shares none of
  them with any other module: a table tied to a later module (GPT-2's
  ``lm_head.weight``) is read whole by that module, not through lookups, so
  it stays where it is, in execution order;
- has ``max_norm`` None (``max_norm`` renormalises rows in place, which must
  not write to the store);
- has a weight of at least :data:`TABLE_MIN_BYTES` (smaller ones are not
  worth it).

A model of nothing but tables keeps its order. The :class:`Worker` treats
the tables at the *end* of the stored layer order (never layer 0) as moved
(:func:`table_layers`, checked against the module it attaches); tables
elsewhere (``tables_last=False``) are ordinary layers. Layer times measured
at registration stay with their layers. Plans: the moved tables travel as
one last group that no forward waits for, after the optimal plan of the
layers before them (:func:`plan_module`, :meth:`Worker.plan`); a hand-made
plan may put them in any group (a group's wait then goes on its first layer
that is not a table). Contract: a moved table's tensors are read only
inside calls of its own module (no module reads ``table.weight`` directly,
which the tie rule above ensures for parameters shared with other modules).
The lookups' reads over PCIe share the link with the
copies still running; they are a few rows per token (e.g. 8 x 128 rows of
3 KiB for BERT-base at batch 8).
"""

import bisect
import copy
import math
import dataclasses
import statistics
import time
import warnings

from .core import CostModel, Store, Switch, dtype_code, measure_h2d, plan_closed_loop, plan_groups, plan_makespan_cost, plan_model
from .core import pluggable_allocator_args, workspace_attach, workspace_detach
from .errors import PipeSwitchError

__all__ = ["register_module", "execution_order", "measure_layer_ms", "table_layers", "plan_module", "Worker",
           "CapturedForward"]

#: Name of the layer of the root module (when the root owns tensors itself).
ROOT_LAYER = "(root)"

#: Smallest workspace :meth:`Worker.install_allocator` accepts without a
#: warning: PyTorch's cuBLAS workspace (32 MiB on Hopper) plus room to work.
MIN_WORKSPACE_BYTES = 64 << 20

#: Chunking of a fused graph's copies (:meth:`Worker.capture`), the
#: :class:`Switch`'s defaults: consecutive groups share a copy until it holds
#: :data:`FUSED_MIN_COPY` bytes, no copy exceeds :data:`FUSED_MAX_COPY`
#: (:meth:`Store.copy_schedule`).
FUSED_MIN_COPY = 4 << 20
FUSED_MAX_COPY = 64 << 20

#: Smallest weight (bytes) of an ``nn.Embedding`` that :func:`register_module`
#: moves to the end of the stored order (see "Token tables" above).
TABLE_MIN_BYTES = 1 << 20


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

def _owned(module):
    """``[(attr, tensor, is_param)]`` that ``module`` owns directly: its
    parameters, then its buffers, in registration order (None entries skipped)."""
    out = [(k, p, True) for k, p in module._parameters.items() if p is not None]
    out += [(k, b, False) for k, b in module._buffers.items() if b is not None]
    return out


def _slots(module):
    """``(full_name, owner, attr, tensor, is_param)`` for every tensor owned by
    a module in ``module`` (each module once, under its first name)."""
    for mname, m in module.named_modules():
        prefix = mname + "." if mname else ""
        for attr, t, is_param in _owned(m):
            yield prefix + attr, m, attr, t, is_param


def _tie_key(t):
    """Equal for two tensors that are one and the same data (tied)."""
    if t.device.type == "meta" or t.numel() == 0:
        return ("object", id(t))
    return (str(t.device), t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _call(module, inputs):
    """Calls ``module``: a tuple is positional arguments, a dict keyword
    arguments, anything else the one positional argument."""
    if isinstance(inputs, tuple):
        return module(*inputs)
    if isinstance(inputs, dict):
        return module(**inputs)
    return module(inputs)


def _clone_tensors(x):
    """``x`` with every tensor replaced by a copy (tuples, lists, dicts kept)."""
    import torch

    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, tuple):
        return tuple(_clone_tensors(v) for v in x)
    if isinstance(x, list):
        return [_clone_tensors(v) for v in x]
    if isinstance(x, dict):
        return {k: _clone_tensors(v) for k, v in x.items()}
    return x


def _copy_into(static, x, where="input"):
    """Copies tensors of ``x`` into the same places of ``static`` (same
    structure, shapes and dtypes, else ValueError)."""
    import torch

    if isinstance(static, torch.Tensor):
        if not isinstance(x, torch.Tensor) or x.shape != static.shape or x.dtype != static.dtype:
            raise ValueError("%s: the graph was captured for a %s tensor of shape %s, got %s"
                             % (where, static.dtype, tuple(static.shape),
                                "%s %s" % (x.dtype, tuple(x.shape)) if isinstance(x, torch.Tensor)
                                else type(x).__name__))
        if x.data_ptr() != static.data_ptr():
            static.copy_(x, non_blocking=True)
        return
    if isinstance(static, (tuple, list)):
        if not isinstance(x, (tuple, list)) or len(x) != len(static):
            raise ValueError("%s: the graph was captured for %d arguments" % (where, len(static)))
        for i, (s, v) in enumerate(zip(static, x)):
            _copy_into(s, v, "%s %d" % (where, i))
        return
    if isinstance(static, dict):
        if not isinstance(x, dict) or set(x) != set(static):
            raise ValueError("%s: the graph was captured for the arguments %s" % (where, sorted(static)))
        for k in static:
            _copy_into(static[k], x[k], "%s %r" % (where, k))
        return
    if x != static:
        raise ValueError("%s: the graph was captured with %r, got %r" % (where, static, x))


def _to_device(x, device):
    import torch

    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, tuple):
        return tuple(_to_device(v, device) for v in x)
    if isinstance(x, list):
        return [_to_device(v, device) for v in x]
    if isinstance(x, dict):
        return {k: _to_device(v, device) for k, v in x.items()}
    return x


class _EvalMode:
    """Puts a module in eval mode and restores every submodule's flag after."""

    def __init__(self, module):
        self.module = module

    def __enter__(self):
        self.flags = [(m, m.training) for m in self.module.modules()]
        self.module.eval()

    def __exit__(self, *exc):
        for m, flag in self.flags:
            m.training = flag


def _torch_dtype(name):
    """The torch dtype of a store dtype name ("F32")."""
    import torch

    names = {
        "BOOL": "bool", "U8": "uint8", "I8": "int8", "F8_E4M3": "float8_e4m3fn",
        "F8_E5M2": "float8_e5m2", "I16": "int16", "U16": "uint16", "F16": "float16",
        "BF16": "bfloat16", "I32": "int32", "U32": "uint32", "F32": "float32",
        "I64": "int64", "U64": "uint64", "F64": "float64",
    }
    dt = getattr(torch, names.get(name, "?"), None)
    if dt is None:
        raise TypeError("this PyTorch has no dtype for stored dtype %s" % name)
    return dt


def _cuda_device(device):
    import torch

    if device is None:
        return torch.device("cuda", torch.cuda.current_device())
    if isinstance(device, int):
        return torch.device("cuda", device)
    d = torch.device(device)
    if d.type != "cuda":
        raise ValueError("a CUDA device is needed, not %s" % d)
    return d if d.index is not None else torch.device("cuda", torch.cuda.current_device())


# ---------------------------------------------------------------------------
# Registering
# ---------------------------------------------------------------------------

def execution_order(module, example_inputs):
    """Qualified names ("" for the root) of the modules of ``module`` that
    directly own tensors, in first-call order of one forward pass on
    ``example_inputs`` (run in eval mode under ``no_grad``, on whatever device
    the module and inputs are); modules never called come last, in
    ``named_modules()`` order."""
    import torch

    owners = [(name, m) for name, m in module.named_modules() if _owned(m)]
    called = []
    seen = set()
    handles = []

    def hook_for(name):
        def hook(mod, args):
            if id(mod) not in seen:
                seen.add(id(mod))
                called.append(name)
        return hook

    try:
        for name, m in owners:
            handles.append(m.register_forward_pre_hook(hook_for(name)))
        with torch.no_grad(), _EvalMode(module):
            _call(module, example_inputs)
    finally:
        for h in handles:
            h.remove()
    return called + [name for name, m in owners if id(m) not in seen]


def _layers(module, order):
    """``[(layer_name, module_name, [(full_name, tensor)])]`` in ``order``,
    each tied tensor with the first layer that has it, empty layers dropped."""
    modules = dict(module.named_modules())
    taken = set()
    layers = []
    for mname in order:
        prefix = mname + "." if mname else ""
        tensors = []
        for attr, t, _ in _owned(modules[mname]):
            key = _tie_key(t)
            if key in taken:
                continue
            taken.add(key)
            tensors.append((prefix + attr, t))
        if tensors:
            layers.append((mname or ROOT_LAYER, mname, tensors))
    return layers


def _tie_counts(module):
    """How many tensor slots of ``module`` hold each tensor (by :func:`_tie_key`)."""
    counts = {}
    for _, _, _, t, _ in _slots(module):
        k = _tie_key(t)
        counts[k] = counts.get(k, 0) + 1
    return counts


def _is_table(mod, mname, layer_tensors, weight_bytes, counts):
    """Whether the layer of module ``mod`` (qualified name ``mname``, stored
    tensor names ``layer_tensors``) is a token table (see the module doc)."""
    import torch

    if not mname or not isinstance(mod, torch.nn.Embedding) or getattr(mod, "max_norm", None) is not None:
        return False
    own = _owned(mod)
    if [mname + "." + attr for attr, _, _ in own] != list(layer_tensors):
        return False  # some tensor of it is tied to an earlier layer
    if any(counts.get(_tie_key(t), 0) > 1 for _, t, _ in own):
        return False  # shared with another module (e.g. a tied LM head)
    return weight_bytes >= TABLE_MIN_BYTES


def _tables_last(module, layers):
    """``layers`` (from :func:`_layers`) with the token tables moved to the
    end, each group in its original relative order."""
    import torch

    modules = dict(module.named_modules())
    counts = _tie_counts(module)
    rest, tables = [], []
    for layer in layers:
        _, mname, tensors = layer
        mod = modules[mname]
        w = mod._parameters.get("weight") if isinstance(mod, torch.nn.Embedding) else None
        table = w is not None and _is_table(mod, mname, [full for full, _ in tensors],
                                            w.numel() * w.element_size(), counts)
        (tables if table else rest).append(layer)
    if not rest:
        return layers  # nothing but tables: keep the execution order
    return rest + tables


def table_layers(info, module):
    """Indices of the stored layers of ``info`` (a :class:`~pipeswitch.ModelInfo`)
    that are token tables moved to the end by :func:`register_module`: the
    longest run of tables (see the module doc) at the end of the stored
    order, checked against ``module`` (the registered module, or a skeleton
    of it, e.g. on the ``meta`` device). Never includes layer 0; empty if
    there are none (``tables_last=False``, or no table)."""
    modules = dict(module.named_modules())
    counts = _tie_counts(module)
    stored = {t.name: t for t in info.tensors}
    first = len(info.layers)
    for i in range(len(info.layers) - 1, 0, -1):
        layer = info.layers[i]
        mname = "" if layer.name == ROOT_LAYER else layer.name
        mod = modules.get(mname)
        w = stored.get(mname + ".weight")
        if mod is None or w is None or not _is_table(mod, mname, layer.tensors, w.bytes, counts):
            break
        first = i
    return list(range(first, len(info.layers)))


def plan_module(store, name, module, bandwidth_gbps, a=0.0, b=0.0):
    """The optimal plan of model ``name`` as registered from ``module`` (or a
    skeleton of it): :func:`pipeswitch.plan_model` when it has no moved token
    tables (:func:`table_layers`); else the optimal plan of the layers a
    forward waits for (those before the tables), with the tables appended as
    one last group. Returns (group starts, makespan ms of the layers planned).
    Needs the per-layer times (:class:`~pipeswitch.StateError` otherwise)."""
    info = store.model_info(name)
    tables = table_layers(info, module)
    bw = float(bandwidth_gbps)
    if not tables or not info.measured or not (math.isfinite(bw) and bw > 0):
        return plan_model(store, name, bw, a, b)  # (raises for missing times or a bad bandwidth)
    needed = tables[0]
    transfer = [layer.bytes / (bw * 1e6) for layer in info.layers[:needed]]
    starts, makespan = plan_groups(transfer, info.exec_ms[:needed], a, b)
    return starts + [needed], makespan


def _sleep_cycles_per_ms(torch, device):
    """GPU clock cycles per ms of ``torch.cuda._sleep`` on ``device``."""
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    n = 2_000_000
    with torch.cuda.device(device):
        torch.cuda._sleep(n)  # warm
        a.record()
        torch.cuda._sleep(n)
        b.record()
        b.synchronize()
    return n / max(a.elapsed_time(b), 1e-3)


def measure_layer_ms(module, layer_modules, example_inputs, device=None, warmup=2, runs=5, hold_gpu=False):
    """Per-layer execution times in ms on CUDA ``device`` (median of ``runs``
    forward passes after ``warmup``), timed with CUDA events recorded in
    forward pre-hooks: a layer's time runs from its first entry in a pass to
    the first entry of the next layer entered (the last one's to the end of
    the forward), which is exactly the stretch of GPU work that a switch's
    wait for that layer's group gates. Layers not entered get 0.

    ``layer_modules``: qualified module names ("" for the root), one per
    layer. The module runs on ``device`` (a deep copy is moved there if it is
    elsewhere; the caller's module is never changed), in eval mode under
    ``no_grad``.

    ``hold_gpu``: each pass is queued behind a GPU sleep long enough for
    the host to issue the whole forward first, so the events time the GPU's
    work alone, back to back (what a replayed CUDA graph runs), not the
    host's pace of issuing an eager forward."""
    import torch

    device = _cuda_device(device)
    on_device = all(t.device == device for t in list(module.parameters()) + list(module.buffers()))
    m = module if on_device else copy.deepcopy(module).to(device)
    inputs = _to_device(example_inputs, device)
    modules = dict(m.named_modules())
    index = {}
    for i, name in enumerate(layer_modules):
        index.setdefault(id(modules[name]), i)
    samples = [[] for _ in layer_modules]
    marks = []  # (layer, event) of this pass, in entry order
    entered = set()

    def hook(mod, args):
        i = index[id(mod)]
        if i not in entered:
            entered.add(i)
            ev = torch.cuda.Event(enable_timing=True)
            ev.record(torch.cuda.current_stream(device))
            marks.append((i, ev))

    handles = [modules[name].register_forward_pre_hook(hook) for name in set(layer_modules)]
    hold = 0
    try:
        with torch.no_grad(), _EvalMode(m), torch.cuda.device(device):
            for run in range(warmup + runs):
                marks.clear()
                entered.clear()
                if hold:
                    torch.cuda._sleep(hold)
                t0 = time.perf_counter()
                _call(m, inputs)
                issue_ms = (time.perf_counter() - t0) * 1e3
                if hold_gpu and run == 0:
                    # Hold each later pass for twice this pass's issue time.
                    hold = int(_sleep_cycles_per_ms(torch, device) * max(2 * issue_ms, 1.0))
                end = torch.cuda.Event(enable_timing=True)
                end.record(torch.cuda.current_stream(device))
                torch.cuda.synchronize(device)
                if run < warmup:
                    continue
                times = [0.0] * len(layer_modules)
                for k, (i, ev) in enumerate(marks):
                    nxt = marks[k + 1][1] if k + 1 < len(marks) else end
                    times[i] += ev.elapsed_time(nxt)
                for i, t in enumerate(times):
                    samples[i].append(t)
    finally:
        for h in handles:
            h.remove()
    return [statistics.median(s) for s in samples]


def predict_plan(info, module, model, plan, bandwidth_gbps):
    """The cost model ``model``'s (a :class:`~pipeswitch.CostModel`)
    switch + first run time (ms) of ``plan`` (stored-layer group starts) for
    model ``info`` as registered from ``module``: when the moved token tables
    (:func:`table_layers`) travel as a group of their own, the planner's
    makespan of the layers a forward waits for, and no less than the last
    copy's end; else the makespan over every layer."""
    bw = float(bandwidth_gbps)
    t_all = [layer.bytes / (bw * 1e6) for layer in info.layers]
    tables = table_layers(info, module)
    needed = tables[0] if tables else len(info.layers)
    plan = [int(s) for s in plan]
    if needed < len(info.layers) and needed in plan:
        waited = [s for s in plan if s < needed]
        ms = plan_makespan_cost(t_all[:needed], list(info.exec_ms[:needed]), waited, model)
        return max(ms, sum(t_all) + model.transfer_overhead_ms * len(plan))
    return plan_makespan_cost(t_all, list(info.exec_ms), plan, model)


def calibrate_module(worker, model_name, example_inputs, before=None, reps=5, extra_plans=(), max_rounds=4,
                     tolerance=0.03, store_result=True, graphs=False, fused=True):
    """Closed-loop planning of model ``model_name`` attached to ``worker``
    (issue 15), measured as a server runs it.

    A measurement of a plan is the median of ``reps`` runs of: ``before()``
    (e.g. a forward of another model: what ran before the switch on a
    server; nothing when None), then :meth:`Worker.switch_to` + the forward
    on ``example_inputs`` + synchronize, host wall time. The per-layer times
    are the stored ones (:func:`measure_layer_ms`: CUDA events recorded on
    the compute stream in forward pre-hooks, warm, at the inputs' shapes).
    The calibration plans, ``extra_plans`` (e.g. hand-chosen groups) and the
    fitted model's plans are measured (:func:`pipeswitch.plan_closed_loop`);
    the moved token tables always travel as one last group. The floor ``R``
    is the larger of the ready model's run (measured the same way) and the
    copies at the bandwidth.

    The worker keeps the chosen plan (:meth:`Worker.set_plan`), and the
    :class:`~pipeswitch.CostRecord` is stored with the model when
    ``store_result``. ``graphs``: the forward runs as a captured CUDA graph
    (:meth:`Worker.capture`, captured again for each plan measured), as a
    server that replays graphs runs it; with ``fused`` (the default) the
    switch and the forward are one replay of the fused graph
    (:meth:`CapturedForward.switch_and_run`), timed from the call to the
    synchronize. Returns a dict: ``plan``,
    ``record``, ``ready_ms``, ``needed_layers``, ``bandwidth_gbps`` and,
    with ``graphs``, ``captured`` (the :class:`CapturedForward` of the
    chosen plan)."""
    import torch

    entry = worker._models.get(model_name)
    if entry is None:
        raise KeyError("model %r is not attached to this worker" % model_name)
    info, module = entry.info, entry.module
    if not info.measured:
        raise ValueError("model %r has no per-layer times: register it with measure=True" % model_name)
    bw, a = worker._link()
    tables = table_layers(info, module)
    needed = tables[0] if tables else len(info.layers)
    t_all = [layer.bytes / (bw * 1e6) for layer in info.layers]
    t, x = t_all[:needed], list(info.exec_ms[:needed])
    inputs = _to_device(example_inputs, worker.device)
    device = worker.device

    def full(p):
        return [int(s) for s in p] + ([needed] if needed < len(info.layers) else [])

    cap = {}

    def once(switch):
        if before is not None:
            before()
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        if switch and graphs and fused:
            cap["f"].switch_and_run()
            torch.cuda.synchronize(device)
            return (time.perf_counter() - t0) * 1e3
        if switch:
            worker.switch_to(model_name)
        elif graphs:
            worker.switch_to(model_name, resident=True)
        with torch.no_grad():
            if graphs:
                cap["f"]()
            else:
                _call(module, inputs)
        torch.cuda.synchronize(device)
        if switch:
            worker.synchronize()
        return (time.perf_counter() - t0) * 1e3

    def measure(p):
        worker.set_plan(model_name, full(p))
        if graphs:
            cap["f"] = worker.capture(model_name, inputs, fused=fused)
        once(True)  # warm: the first switch with new hooks
        return statistics.median(once(True) for _ in range(reps))

    if graphs:
        cap["f"] = worker.capture(model_name, inputs, fused=fused)
    worker.switch_to(model_name)
    worker.synchronize()
    ready_ms = statistics.median(once(False) for _ in range(max(reps, 3)))
    base = CostModel(a, worker.group_exec_overhead_ms, floor_ms=max(ready_ms, sum(t_all) + a))
    extra = []
    for p in extra_plans:
        q = [int(s) for s in p if int(s) < needed]
        if q and q[0] == 0 and q not in extra:
            extra.append(q)
    plan, rec = plan_closed_loop(t, x, measure, base, extra, max_rounds, tolerance)
    rec = dataclasses.replace(rec, bandwidth_gbps=bw)
    worker.set_plan(model_name, full(plan))
    if store_result:
        worker.store.set_cost(model_name, rec)
    result = {"plan": full(plan), "record": rec, "ready_ms": ready_ms, "needed_layers": needed,
              "bandwidth_gbps": bw}
    if graphs:
        result["captured"] = worker.capture(model_name, inputs, fused=fused)
    return result


def register_module(store, name, module, example_inputs, device=None, measure=True, tables_last=True,
                    hold_gpu=False):
    """Adds ``module`` to ``store`` as model ``name`` and returns its
    :class:`~pipeswitch.ModelInfo`.

    Layers and tensors are as described in this module's doc (one forward
    pass on ``example_inputs`` finds the execution order; tied tensors are
    stored once, with the first layer that uses them). The module's tensors
    must hold real data (not ``meta``); they are copied to contiguous CPU
    tensors and from there into the store. ``example_inputs``: a tuple of
    positional arguments, a dict of keyword arguments, or one argument.

    If ``measure`` and CUDA is available, the module also runs on ``device``
    (default: the current CUDA device) to measure per-layer execution times
    (:func:`measure_layer_ms`), which are stored with the model for
    :func:`pipeswitch.plan_model`. The caller's module is left as it was.
    ``hold_gpu``: time the GPU's work alone (see :func:`measure_layer_ms`),
    for a model that runs as a captured CUDA graph (:meth:`Worker.capture`).

    ``tables_last``: store the token tables (``nn.Embedding`` layers of at
    least :data:`TABLE_MIN_BYTES`, not tied to another module; see the module
    doc) after every other layer, so that a switch copies them last and a
    :class:`Worker` reads their rows from the host while they travel. False
    keeps the execution order for every layer. Plan such a model with
    :func:`plan_module` (or :meth:`Worker.plan`), not :func:`plan_model`.
    """
    import torch

    order = execution_order(module, example_inputs)
    layers = _layers(module, order)
    if not layers:
        raise ValueError("module %s owns no parameters or buffers" % type(module).__name__)
    if tables_last:
        layers = _tables_last(module, layers)
    spec = []
    keep = []
    for lname, _, tensors in layers:
        entries = []
        for full, t in tensors:
            if t.device.type == "meta":
                raise ValueError("tensor %r is on the meta device: register_module needs real weights" % full)
            c = t.detach().to("cpu").contiguous()
            keep.append(c)
            entries.append((full, dtype_code(c.dtype), tuple(c.shape), c))
        spec.append((lname, entries))
    store.add_model(name, spec)
    del keep
    if measure and torch.cuda.is_available():
        times = measure_layer_ms(module, [mname for _, mname, _ in layers], example_inputs, device,
                                 hold_gpu=hold_gpu)
        store.set_layer_exec_ms(name, times)
    return store.model_info(name)


# ---------------------------------------------------------------------------
# The worker
# ---------------------------------------------------------------------------

class _CudaMemory:
    """Device memory as a flat uint8 array, for ``torch.as_tensor`` (CUDA
    Array Interface v3; ``stream: None``: no synchronisation on import)."""

    def __init__(self, ptr, nbytes):
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (ptr, False),
            "strides": None,
            "version": 3,
            "stream": None,
        }


def _arena_tensor(ptr, tinfo, device, what="arena"):
    """A tensor of ``tinfo``'s dtype and shape that views the device memory at
    ``ptr`` (no copy; also device-mapped pinned host memory). Raises if
    PyTorch did not map that very address."""
    import torch

    dt = _torch_dtype(tinfo.dtype)
    if tinfo.bytes == 0:
        return torch.empty(tinfo.shape, dtype=dt, device=device)
    try:
        with torch.cuda.device(device):
            raw = torch.as_tensor(_CudaMemory(ptr, tinfo.bytes), device=device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise RuntimeError("tensor %r: PyTorch could not map %s memory through "
                           "__cuda_array_interface__ (it needs numpy for that): %s" % (tinfo.name, what, e)) from e
    t = raw.view(dt).view(tinfo.shape)
    if t.data_ptr() != ptr or t.device != device:
        raise RuntimeError(
            "tensor %r: PyTorch mapped %#x on %s, not the %s address %#x on %s"
            % (tinfo.name, t.data_ptr(), t.device, what, ptr, device))
    return t


class _Attached:
    """A model attached to a worker: its module, region and plan."""

    def __init__(self, name, module, info, offset, owns_region, plan):
        self.name = name
        self.module = module
        self.info = info
        self.offset = offset
        self.owns_region = owns_region
        self.plan = plan
        self.hooks = []
        self.resident = False  # its bytes are in its region (no later copy overwrote them)
        self.tables = []  # stored layer indices of its moved token tables (table_layers)
        self.waited = {}  # stream handle -> highest group it was made to wait for since the switch
        self.host_views = {}  # table layer -> (host_model_ptr, [tensor viewing the pinned store])
        self.host_error = None  # why host views could not be made (then tables wait for their group)
        self.version = 0  # bumped by every (re)bind: captured graphs of an older one are stale

    def overlaps(self, other):
        return self.offset < other.offset + other.info.bytes and other.offset < self.offset + self.info.bytes


class Worker:
    """The active-standby worker side: modules whose parameters and buffers
    live in an arena, switched in with the pipelined switch.

    ``Worker(device, arena, store)``: ``arena`` defaults to the one given to
    :meth:`install_allocator`; ``store`` is a :class:`~pipeswitch.Store` or
    a store name to open. ``bandwidth_gbps`` and
    ``group_transfer_overhead_ms`` (the planner's ``a``) are measured once
    with :func:`pipeswitch.measure_h2d` when first needed, unless given;
    ``group_exec_overhead_ms`` is the planner's ``b``.

    Use::

        worker = Worker(0, arena, store)
        worker.attach(module_on_meta, "resnet")   # once per model
        worker.switch_to("resnet")                # returns at once
        y = module_on_meta(x)                     # runs as the groups arrive

    Streams: the forward must run on the stream that was current on the
    worker's device when :meth:`switch_to` was called (the usual single
    serving stream); that is where the group waits and the ordering go.
    """

    _allocator_arena = None
    _allocator = None

    def __init__(self, device=0, arena=None, store=None, bandwidth_gbps=None,
                 group_transfer_overhead_ms=None, group_exec_overhead_ms=0.01):
        self.device = _cuda_device(device)
        if arena is None:
            arena = Worker._allocator_arena
        if arena is None:
            raise ValueError("Worker needs an arena (or Worker.install_allocator(arena) first)")
        if store is None:
            raise ValueError("Worker needs a store (a pipeswitch.Store or a store name)")
        if not isinstance(store, Store):
            store = Store.open(store)
        self.arena = arena
        self.store = store
        self.switch = Switch(self.device.index)
        self.bandwidth_gbps = bandwidth_gbps
        self.group_transfer_overhead_ms = group_transfer_overhead_ms
        self.group_exec_overhead_ms = group_exec_overhead_ms
        self._models = {}
        self._current = None  # the model whose switch hooks wait for (None: nothing in flight)
        self._last = None  # the model of the last switch_to
        self._copy_stream = None
        self._capturing = None  # the model whose forward is being captured (capture())
        self._fusing = None  # (entry, [event per group]) while its fused graph is captured
        self._leases = []  # (event, store lease): fused replays' copies in flight, the lease held until the event

    # -- the workspace allocator ------------------------------------------
    @classmethod
    def install_allocator(cls, arena):
        """Routes every PyTorch CUDA allocation of this process to ``arena``'s
        workspace (``ps_workspace_malloc``/``ps_workspace_free`` as a
        ``CUDAPluggableAllocator``), and makes ``arena`` the default arena of
        new workers. Must run before CUDA is initialised in this process
        (before the first CUDA tensor or any call that initialises CUDA);
        raises ``RuntimeError`` if it is too late.

        Size the workspace for *every* CUDA allocation of the process,
        PyTorch's own included: its cuBLAS workspace alone takes 32 MiB on
        Hopper (``CUBLAS_WORKSPACE_CONFIG``). When the workspace is full,
        ``ps_workspace_malloc`` returns NULL, and PyTorch (2.11) does not
        check that for its cuBLAS workspace: the next matmul then fails with
        an illegal memory access. Below :data:`MIN_WORKSPACE_BYTES` this
        warns."""
        import torch

        too_late = ("Worker.install_allocator must run before CUDA is initialised in this process "
                    "(before the first CUDA tensor or CUDA call of PyTorch): PyTorch cannot swap "
                    "its allocator afterwards")
        if torch.cuda.is_initialized():
            raise RuntimeError(too_late)
        if arena.workspace()[1] < MIN_WORKSPACE_BYTES:
            warnings.warn("the arena's workspace has %d bytes; PyTorch's cuBLAS workspace alone may take "
                          "32 MiB, and a full workspace makes kernels fail (see install_allocator)"
                          % arena.workspace()[1])
        path, malloc_fn, free_fn = pluggable_allocator_args()
        workspace_attach(arena)
        try:
            alloc = torch.cuda.memory.CUDAPluggableAllocator(path, malloc_fn, free_fn)
            torch.cuda.memory.change_current_allocator(alloc)
        except RuntimeError as e:
            workspace_detach()
            raise RuntimeError("%s (%s)" % (too_late, e)) from e
        cls._allocator = alloc  # kept alive for the process
        cls._allocator_arena = arena

    # -- attaching ---------------------------------------------------------
    def _link(self):
        if self.bandwidth_gbps is None or self.group_transfer_overhead_ms is None:
            bw, a = measure_h2d(self.device.index)
            if self.bandwidth_gbps is None:
                self.bandwidth_gbps = bw
            if self.group_transfer_overhead_ms is None:
                self.group_transfer_overhead_ms = a
        return self.bandwidth_gbps, self.group_transfer_overhead_ms

    def plan(self, model_name, module=None):
        """The plan :meth:`attach` uses by default: optimal if the model has
        measured layer times, else one group ``[0]``; either way, moved token
        tables (:func:`table_layers`, checked against ``module``: default the
        attached module of ``model_name``) travel as one last group of their
        own, after the plan of the layers a forward waits for
        (:func:`plan_module`; ``[0, first table]`` without times). Without a
        module: :func:`pipeswitch.plan_model` of all layers."""
        info = self.store.model_info(model_name)
        if module is None and model_name in self._models:
            module = self._models[model_name].module
        tables = table_layers(info, module) if module is not None else []
        if not info.measured:
            return [0, tables[0]] if tables else [0]
        bw, a = self._link()
        if module is None:
            starts, _ = plan_model(self.store, model_name, bw, a, self.group_exec_overhead_ms)
        else:
            starts, _ = plan_module(self.store, model_name, module, bw, a, self.group_exec_overhead_ms)
        return starts

    def attach(self, module, model_name, region_offset=None, plan=None):
        """Makes every parameter and buffer of ``module`` (built by the caller
        on the ``meta`` device or the CPU, with the structure that was
        registered) a view of the arena at base + ``region_offset`` + the
        stored tensor's offset, without copying; tied tensors stay tied.
        Parameters become ``requires_grad=False``. Returns ``module``.

        ``region_offset``: a region of at least the model's bytes from
        :meth:`Arena.alloc` (by the arena's owner); None allocates one (this
        worker's arena must then be the owner). ``plan``: the group starts
        (default :meth:`plan`), stored layer indices. A forward pre-hook on
        the first module of each group makes the current stream wait (on the
        GPU) for that group.

        Moved token tables (:func:`table_layers`) get no wait: they are
        skipped when picking a group's first module (so a group of tables
        only is never waited for), and a pre-hook on each table's module
        points its tensors at the store's pinned host pages for the call
        (:meth:`Switch.host_model_ptr` + offset; a forward hook points them
        back at the arena) while the table's group has not arrived
        (:meth:`Switch.group_ready`) and the current stream has not already
        waited for it; the values are the same bytes either way. If PyTorch
        cannot map the host pages, a table waits for its group instead (with
        a warning).

        The views are valid once :meth:`switch_to` has started this model
        and while no other model's switch overwrites the region; running the
        module otherwise raises."""
        if model_name in self._models:
            raise ValueError("model %r is attached already" % model_name)
        info = self.store.model_info(model_name)
        arena_size = self.arena.size()
        owns = region_offset is None
        if owns:
            region_offset = self.arena.alloc(info.bytes)
        try:
            if region_offset < 0 or region_offset + info.bytes > arena_size:
                raise ValueError("region [%d, +%d) lies outside the arena of %d bytes"
                                 % (region_offset, info.bytes, arena_size))
            plan = list(self.plan(model_name, module) if plan is None else plan)
            entry = _Attached(model_name, module, info, region_offset, owns, plan)
            self._bind(entry)
        except BaseException:
            if owns:
                self.arena.release(region_offset)
            raise
        self._models[model_name] = entry
        return module

    def _bind(self, entry):
        import torch

        info, module, device = entry.info, entry.module, self.device
        plan = entry.plan
        if not plan or plan[0] != 0 or any(a >= b for a, b in zip(plan, plan[1:])) \
                or plan[-1] >= len(info.layers):
            raise ValueError("plan %r: group starts must begin at 0, increase, and stay below %d layers"
                             % (plan, len(info.layers)))
        base = self.arena.base() + entry.offset
        stored = {t.name: t for t in info.tensors}
        slots = list(_slots(module))

        # Pass 1: a view for every stored tensor the module has (by name).
        by_name, by_key, owner_of = {}, {}, {}
        for full, m, attr, t, is_param in slots:
            ti = stored.get(full)
            if ti is None:
                continue
            if _torch_dtype(ti.dtype) != t.dtype or tuple(t.shape) != ti.shape:
                raise ValueError("tensor %r: the module has %s%s, model %r stores %s%s"
                                 % (full, t.dtype, tuple(t.shape), info.name, ti.dtype, ti.shape))
            v = _arena_tensor(base + ti.offset, ti, device)
            new = torch.nn.Parameter(v, requires_grad=False) if is_param else v
            by_name[full] = new
            by_key.setdefault(_tie_key(t), new)
            owner_of[full] = m

        # Pass 2: every slot gets its view, a tied slot its partner's view.
        missing, assign = [], []
        for full, m, attr, t, is_param in slots:
            new = by_name.get(full)
            if new is None:
                new = by_key.get(_tie_key(t))
            if new is None:
                if not is_param and attr in m._non_persistent_buffers_set and t.device.type != "meta":
                    new = t.to(device)  # computed state, not a weight
                else:
                    missing.append(full)
                    continue
            if is_param and not isinstance(new, torch.nn.Parameter):
                new = torch.nn.Parameter(new, requires_grad=False)
            elif not is_param and isinstance(new, torch.nn.Parameter):
                new = new.detach()
            assign.append((m, attr, is_param, new))
        if missing:
            raise KeyError("model %r has no tensor for %s of the module" % (info.name, ", ".join(missing)))
        unused = sorted(set(stored) - set(by_name))
        if unused:
            warnings.warn("model %r stores tensors the module does not have: %s"
                          % (info.name, ", ".join(unused)))
        # Group waits: on the module owning the first tensor of each group's
        # first layer that is not a moved table (the tables come last in the
        # stored order but are entered first; a group of tables only has none).
        tables = table_layers(info, module)
        owners = []
        for g, first_layer in enumerate(plan):
            end = plan[g + 1] if g + 1 < len(plan) else len(info.layers)
            waited = [i for i in range(first_layer, end) if i < len(info.layers) - len(tables)]
            if not waited:
                continue
            first = info.layers[waited[0]].tensors[0]
            if first not in owner_of:
                raise ValueError("group %d starts with tensor %r, which the module does not have" % (g, first))
            owners.append((g, owner_of[first]))
        table_hooks = []
        for i in tables:
            layer = info.layers[i]
            mod = owner_of[layer.tensors[0]]
            own = [(attr, is_param, stored[layer.name + "." + attr]) for attr, _, is_param in _owned(mod)]
            table_hooks.append((i, mod, own, bisect.bisect_right(plan, i) - 1))
        for m, attr, is_param, new in assign:
            (m._parameters if is_param else m._buffers)[attr] = new
        entry.tables = tables

        entry.version += 1
        for g, owner in owners:
            entry.hooks.append(owner.register_forward_pre_hook(self._group_hook(entry, g)))
        for i, mod, own, g in table_hooks:
            pre, post = self._table_hooks(entry, i, own, g)
            entry.hooks.append(mod.register_forward_pre_hook(pre))
            try:
                entry.hooks.append(mod.register_forward_hook(post, always_call=True))
            except TypeError:  # PyTorch < 2.0: no always_call
                entry.hooks.append(mod.register_forward_hook(post))

    def _group_hook(self, entry, group):
        import torch

        switch, device = self.switch, self.device

        def hook(mod, args):
            fusing = self._fusing
            if fusing is not None and fusing[0] is entry:
                # Capturing the fused graph: wait for this group's copy,
                # captured on a side stream of the same capture (a graph edge).
                torch.cuda.current_stream(device).wait_event(fusing[1][group])
                return
            if self._current is entry:
                stream = torch.cuda.current_stream(device).cuda_stream
                switch.wait_group(group, stream)
                if entry.tables and entry.waited.get(stream, -1) < group:
                    entry.waited[stream] = group  # groups arrive in order: all up to it
            elif not entry.resident:
                raise RuntimeError("model %r is not loaded on %s: call worker.switch_to(%r) first"
                                   % (entry.name, device, entry.name))
        return hook

    def _table_hooks(self, entry, layer, own, group):
        """(pre-hook, forward hook) of a moved table: while its group is on
        its way, the module's tensors ``own`` (``[(attr, is_param, TensorInfo)]``)
        view the pinned store for the call."""
        import torch

        switch, device = self.switch, self.device
        saved = []

        def pre(mod, args):
            fusing = self._fusing
            if fusing is not None and fusing[0] is entry:
                # Capturing the fused graph: the table's copy is in the same
                # graph; read the host (or, failing that, wait for the copy).
                views = self._host_views(entry, layer, own)
                if views is None:
                    torch.cuda.current_stream(device).wait_event(fusing[1][group])
                    return
            else:
                if self._current is not entry:
                    if not entry.resident:
                        raise RuntimeError("model %r is not loaded on %s: call worker.switch_to(%r) first"
                                           % (entry.name, device, entry.name))
                    return  # complete in its region
                stream = torch.cuda.current_stream(device).cuda_stream
                if entry.waited.get(stream, -1) >= group or \
                        (self._capturing is not entry and switch.group_ready(group)):
                    return  # in the arena, in this stream's order (a capture never asks: it reads the host)
                views = self._host_views(entry, layer, own)
                if views is None:
                    switch.wait_group(group, stream)
                    entry.waited[stream] = max(group, entry.waited.get(stream, -1))
                    return
            for (attr, is_param, _), v in zip(own, views):
                d = mod._parameters if is_param else mod._buffers
                saved.append((d, attr, d[attr]))
                d[attr] = v

        def post(mod, args, out):
            while saved:
                d, attr, t = saved.pop()
                d[attr] = t

        return pre, post

    def _host_views(self, entry, layer, own):
        """Tensors viewing table ``layer``'s bytes in the store's pinned pages
        (cached per host address), or None if they cannot be made."""
        import torch

        try:
            host = self.switch.host_model_ptr()
        except PipeSwitchError as e:
            host, error = None, str(e)
        cached = entry.host_views.get(layer)
        if cached is not None and cached[0] == host:
            return cached[1]
        if entry.host_error is not None:
            return None
        views = []
        try:
            if host is None:
                raise RuntimeError(error)
            with torch.inference_mode(False), torch.no_grad():
                for attr, is_param, ti in own:
                    v = _arena_tensor(host + ti.offset, ti, self.device, "pinned host")
                    views.append(torch.nn.Parameter(v, requires_grad=False) if is_param else v)
        except RuntimeError as e:
            entry.host_error = str(e)
            warnings.warn("model %r: token tables cannot be read from the host (%s); they wait for "
                          "their layer group instead" % (entry.name, e))
            return None
        entry.host_views[layer] = (host, views)
        return views

    def set_plan(self, model_name, plan):
        """Replaces the plan (group starts) of attached model ``model_name``;
        its group waits are rebuilt and the next :meth:`switch_to` uses it.
        If the model is the current one, its switch is waited for first (it
        stays usable, complete in its region)."""
        entry = self._models.get(model_name)
        if entry is None:
            raise KeyError("model %r is not attached to this worker" % model_name)
        if self._current is entry:
            self.switch.synchronize()
            self._current = None  # complete and resident: no group to wait for
        old = entry.plan
        for h in entry.hooks:
            h.remove()
        entry.hooks = []
        entry.plan = [int(s) for s in plan]
        try:
            self._bind(entry)
        except BaseException:
            for h in entry.hooks:
                h.remove()
            entry.hooks = []
            entry.plan = old
            self._bind(entry)
            raise

    def detach(self, model_name):
        """Forgets an attached model: removes its hooks and releases its region
        if :meth:`attach` allocated it (its module must not be used again)."""
        entry = self._models.pop(model_name)
        for h in entry.hooks:
            h.remove()
        if self._current is entry:
            self.switch.synchronize()
            self._current = None
        if self._last is entry:
            self._last = None
        if entry.owns_region:
            self.arena.release(entry.offset)

    @property
    def models(self):
        """Names of the attached models."""
        return list(self._models)

    @property
    def current(self):
        """Name of the model of the last switch (None before the first)."""
        return None if self._last is None else self._last.name

    def rebind(self, model_name, region_offset=None, plan=None):
        """Moves attached model ``model_name`` to arena ``region_offset``
        and/or gives it the group starts ``plan`` (None: unchanged): its
        tensors become views of the new region and its group waits are
        rebuilt. A region that :meth:`attach` allocated is released when the
        model moves. No bytes are copied: the next :meth:`switch_to` fills the
        region (or declares it resident). On failure nothing changes."""
        entry = self._models.get(model_name)
        if entry is None:
            raise KeyError("model %r is not attached to this worker" % model_name)
        offset = entry.offset if region_offset is None else int(region_offset)
        new_plan = entry.plan if plan is None else [int(x) for x in plan]
        if offset == entry.offset and new_plan == entry.plan:
            return
        if offset < 0 or offset + entry.info.bytes > self.arena.size():
            raise ValueError("region [%d, +%d) lies outside the arena of %d bytes"
                             % (offset, entry.info.bytes, self.arena.size()))
        if self._current is entry:
            self.switch.synchronize()
            self._current = None
        old = (entry.offset, entry.plan, entry.resident)
        for h in entry.hooks:
            h.remove()
        entry.hooks = []
        entry.offset, entry.plan = offset, new_plan
        if offset != old[0]:
            entry.resident = False
        try:
            self._bind(entry)
        except BaseException:
            for h in entry.hooks:
                h.remove()
            entry.hooks = []
            entry.offset, entry.plan, entry.resident = old
            self._bind(entry)
            raise
        if offset != old[0] and entry.owns_region:
            self.arena.release(old[0])
            entry.owns_region = False

    # -- switching -------------------------------------------------------
    def switch_to(self, model_name, region_offset=None, plan=None, resident=False):
        """Starts the pipelined copy of ``model_name`` (attached) into its own
        region with its plan, and returns at once (no host wait). The next
        forward of its module runs as the groups arrive: each group's
        pre-hook makes the current stream wait for that group on the GPU.

        ``region_offset`` / ``plan``: move the model to that region and/or
        use that plan first (:meth:`rebind`), e.g. as a daemon's task says.
        ``resident=True``: the model's bytes are in its region already (the
        caller knows, e.g. the daemon's residency policy): no copy
        (:meth:`Switch.start_resident`), and no forward waits.

        Ordering on the device's current stream: (1) the previous model's
        copies complete before anything enqueued later (so it stays usable
        from its own region); (2) the new copies start only after the work
        already enqueued, so no weight in use is overwritten."""
        import torch

        entry = self._models.get(model_name)
        if entry is None:
            raise KeyError("model %r is not attached to this worker (attached: %s)"
                           % (model_name, ", ".join(self._models) or "none"))
        if region_offset is not None or plan is not None:
            self.rebind(model_name, region_offset, plan)
        stream = torch.cuda.current_stream(self.device)
        prev = self._current
        if prev is not None:
            self.switch.wait_group(len(prev.plan) - 1, stream.cuda_stream)
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.ExternalStream(self.switch.copy_stream(), device=self.device)
        self._copy_stream.wait_stream(stream)
        for other in self._models.values():
            if other is not entry and other.overlaps(entry):
                other.resident = False
        self._current = None
        self._last = entry
        entry.waited = {}
        if resident:
            # Complete in its region: the hooks of a resident model that is
            # not _current wait for nothing.
            self.switch.start_resident(self.store, model_name, self.arena, entry.offset)
            entry.resident = True
            return
        entry.resident = False
        self.switch.start(self.store, model_name, self.arena, entry.offset, entry.plan)
        entry.resident = True
        self._current = entry

    def synchronize(self):
        """Blocks until the current model has arrived completely."""
        self.switch.synchronize()
        self._reap_leases(wait=True)

    def _reap_leases(self, wait=False):
        """Releases the store leases of fused replays whose graphs have run
        (all of them with ``wait``, after waiting for each)."""
        keep = []
        for ev, lease in self._leases:
            if wait:
                ev.synchronize()
            if wait or ev.query():
                lease.release()
            else:
                keep.append((ev, lease))
        self._leases = keep

    # -- CUDA graphs -----------------------------------------------------
    def capture(self, model_name, example_inputs, warmup=3, fused=False):
        """Captures the forward of attached model ``model_name`` on inputs of
        the shapes and dtypes of ``example_inputs`` as CUDA graphs, and
        returns a :class:`CapturedForward` that replays them.

        Eager PyTorch issues a forward of many small kernels (ResNet-152 at
        batch 8) more slowly than the GPU runs it, so the host, not the
        copies, sets the switch time. A replayed graph costs one launch. Two
        graphs are captured (each in its own memory pool):

        - *switched*: the forward as it runs right after :meth:`switch_to`:
          each group's pre-hook wait is captured as an external event-wait
          node (``ps_switch_wait_group`` on a capturing stream), which every
          replay resolves against the groups of the switch started before
          it; moved token tables are read from the pinned store;
        - *resident*: the forward on the complete region, with no waits.

        ``fused=True`` captures a third graph, *fused*: the whole switch and
        the forward in one graph (:meth:`CapturedForward.switch_and_run`),
        so that one launch does what :meth:`switch_to` + a replay do, with
        no host work between the copies and the forward. Its copies (those
        :meth:`Switch.start` makes for the plan with the default chunking,
        :meth:`Store.copy_schedule` with :data:`FUSED_MIN_COPY` and
        :data:`FUSED_MAX_COPY`) run from the store's pinned pages
        (:meth:`Store.model_host_ptr`) to the model's region on a side
        stream of the capture, each group's event recorded after the copy
        that completes it and waited on by the group's pre-hook (an edge
        inside the graph); moved token tables are read from the pinned
        store. A replay checks the store's model id before the launch and
        leases the model (:meth:`Store.lease`) right after it until the
        graph has run, checking the same id and host address: a model
        removed or added again is refused, and one removed in the instant
        between the check and the lease raises instead of returning outputs
        read from bytes that may no longer be its own. Off by default (a
        third graph and its memory pool).

        The model is switched in (and waited for) first, so the warm-up
        forwards run on its real weights. The graphs hold this binding's
        region and plan: after :meth:`set_plan` / :meth:`rebind` capture
        again (replaying a stale one raises)."""
        import torch

        entry = self._models.get(model_name)
        if entry is None:
            raise KeyError("model %r is not attached to this worker" % model_name)
        if not isinstance(example_inputs, (tuple, dict)):
            example_inputs = (example_inputs,)
        static = _to_device(example_inputs, self.device)
        static = _clone_tensors(static)
        self.switch_to(model_name)
        self.synchronize()
        stream = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(stream)
        with torch.no_grad(), torch.cuda.device(self.device), torch.cuda.stream(side):
            for _ in range(max(1, int(warmup))):
                _call(entry.module, static)
        stream.wait_stream(side)
        torch.cuda.synchronize(self.device)
        graphs = {}
        for kind in ("switched", "resident"):
            if kind == "switched":
                self.switch_to(model_name)  # in flight while capturing: the hooks wait on its groups
            else:
                self.synchronize()
                self.switch_to(model_name, resident=True)
            g = torch.cuda.CUDAGraph()
            self._capturing = entry
            try:
                with torch.no_grad(), torch.cuda.device(self.device), \
                        torch.cuda.graph(g, capture_error_mode="thread_local"):
                    out = _call(entry.module, static)
            finally:
                self._capturing = None
            graphs[kind] = (g, out)
        source = None
        if fused:
            graphs["fused"], source = self._capture_fused(entry, static)
        torch.cuda.synchronize(self.device)
        return CapturedForward(self, entry, static, graphs, source)

    def _capture_fused(self, entry, static):
        """The fused graph of ``entry`` (see :meth:`capture`): ``((graph,
        outputs), (model id, host address, what the graph's copies use))``.
        The model must be resident and the last switch (for the tables'
        host views)."""
        import ctypes
        import torch

        store, name = self.store, entry.name
        store.pin(self.device.index)
        # The id and the address of one and the same model (a lease; each
        # replay leases it again and checks both).
        with store.lease(name) as lease:
            model_id, host = lease.model_id, lease.host_ptr
        base = self.arena.base() + entry.offset
        copies, group_copy = store.copy_schedule(name, entry.plan, FUSED_MIN_COPY, FUSED_MAX_COPY)
        pairs = []  # (arena tensor, pinned host tensor) per copy; None for an empty one
        for a, b in copies:
            if b == a:
                pairs.append(None)
                continue
            src = torch.frombuffer((ctypes.c_uint8 * (b - a)).from_address(host + a), dtype=torch.uint8)
            with torch.cuda.device(self.device):
                dst = torch.as_tensor(_CudaMemory(base + a, b - a), device=self.device)
            if dst.data_ptr() != base + a:
                raise RuntimeError("PyTorch mapped arena address %#x at %#x" % (base + a, dst.data_ptr()))
            pairs.append((dst, src))
        events = [torch.cuda.Event() for _ in group_copy]
        completes = [[g for g, c in enumerate(group_copy) if c == i] for i in range(len(copies))]
        side = torch.cuda.Stream(self.device)
        self.switch_to(name, resident=True)  # complete; the tables' host views are of this model
        graph = torch.cuda.CUDAGraph()
        self._fusing = (entry, events)
        try:
            with torch.no_grad(), torch.cuda.device(self.device), \
                    torch.cuda.graph(graph, capture_error_mode="thread_local"):
                capture_stream = torch.cuda.current_stream(self.device)
                side.wait_stream(capture_stream)  # fork: the copies join the capture
                with torch.cuda.stream(side):
                    for pair, done in zip(pairs, completes):
                        if pair is not None:
                            pair[0].copy_(pair[1], non_blocking=True)
                        for group in done:
                            events[group].record(side)
                out = _call(entry.module, static)  # group pre-hooks wait on the events
                capture_stream.wait_stream(side)  # join: the graph ends after every copy
        finally:
            self._fusing = None
        return (graph, out), (model_id, host, (pairs, events, side))

    def close(self):
        """Detaches every model and frees the switch engine."""
        self._reap_leases(wait=True)
        for name in list(self._models):
            self.detach(name)
        self.switch.close()


class CapturedForward:
    """The CUDA graphs of one model's forward (:meth:`Worker.capture`).

    Call it right after :meth:`Worker.switch_to` of its model, with inputs
    of the captured shapes and dtypes (copied into the graphs' static
    inputs on the current stream; positional arguments, or one tuple/dict
    as the capture got): it replays the *switched* graph while the model's
    switch is in flight (the replay waits on the GPU for each group), else
    the *resident* one, on the current stream, and returns the outputs:
    the graphs' static tensors, overwritten by the next call (copy what
    must outlive it). Raises if the model is not loaded or if its plan or
    region changed since the capture.

    :meth:`switch_and_run` (captured with ``fused=True``) is the switch and
    the forward in one launch, instead of :meth:`Worker.switch_to` + a
    call."""

    def __init__(self, worker, entry, static_inputs, graphs, fused_source=None):
        self.worker = worker
        self.entry = entry
        self.inputs = static_inputs
        self.graphs = graphs
        self.version = entry.version
        self.last_kind = None
        self._source = fused_source  # (model id, host address, what the fused graph's copies use)

    def _check(self, inputs):
        w, entry = self.worker, self.entry
        if w._models.get(entry.name) is not entry or entry.version != self.version:
            raise RuntimeError("model %r was rebound (plan or region) since its forward was captured: "
                               "capture it again" % entry.name)
        if inputs:
            if isinstance(self.inputs, dict):
                if len(inputs) != 1:
                    raise ValueError("the graph was captured with keyword arguments: pass one dict")
                _copy_into(self.inputs, inputs[0])
            else:
                _copy_into(self.inputs, inputs)

    @property
    def fused(self):
        """Whether it has a fused graph (:meth:`switch_and_run`)."""
        return "fused" in self.graphs

    def switch_and_run(self, *inputs):
        """Switches its model in and runs the forward, as one replay of the
        fused graph (:meth:`Worker.capture` with ``fused=True``) on the
        current stream; returns the fused graph's static outputs
        (overwritten by its next replay). Inputs as for a call.

        Ordering on the current stream, as :meth:`Worker.switch_to`: (1) a
        switch of the worker's engine still in flight completes first; (2)
        the copies start after the work already enqueued. Afterwards the
        model is resident (models whose regions overlap its region are
        not), so calls replay the *resident* graph, and the worker's engine
        holds the model as a resident switch ordered after the graph
        (:meth:`Worker.synchronize` waits for the graph's copies; the
        store's model is leased from right after the launch until the graph
        has run). Raises if the model was rebound since the capture, if the
        store's model is gone (NotFound) or no longer the one captured
        (added again), and if it was removed in the instant between the
        check and the lease (the outputs, read from bytes that may no longer
        be the model's, are not returned)."""
        import torch

        w, entry = self.worker, self.entry
        if "fused" not in self.graphs:
            raise RuntimeError("model %r: its forward was captured without fused=True" % entry.name)
        # A cheap check before the launch (NotFound once removed); the lease
        # comes right after it, off the path to the GPU (a lease costs tens
        # of microseconds of host time).
        if w.store.model_id(entry.name) != self._source[0]:
            raise RuntimeError("model %r was removed from the store or added again since its fused graph was "
                               "captured: capture it again" % entry.name)
        self._check(inputs)
        stream = torch.cuda.current_stream(w.device)
        prev = w._current
        if prev is not None:
            w.switch.wait_group(len(prev.plan) - 1, stream.cuda_stream)
        g, out = self.graphs["fused"]
        g.replay()
        # The lease, held until the graph has run. A model still stored under
        # the id checked above was not removed in between (a model's space
        # is reused only after its removal, and an add gets a new id), so
        # the bytes the copies read were its own; otherwise the outputs are
        # not returned.
        try:
            lease = w.store.lease(entry.name)
        except Exception:
            lease = None
        if lease is None or (lease.model_id, lease.host_ptr) != tuple(self._source[:2]):
            if lease is not None:
                lease.release()
            stream.synchronize()
            entry.resident = False
            raise RuntimeError("model %r was removed from the store while its fused graph was launched: its "
                               "outputs are not returned" % entry.name)
        done = torch.cuda.Event()
        done.record(stream)
        w._reap_leases()
        w._leases.append((done, lease))
        for other in w._models.values():
            if other is not entry and other.overlaps(entry):
                other.resident = False
        w._current = None  # no group to wait for: its bytes come in this stream's order
        w._last = entry
        entry.waited = {}
        entry.resident = True
        self.last_kind = "fused"
        # After the launch (off the path to the GPU): the engine's resident
        # start of the model, ordered after the graph on the copy stream, so
        # that the engine holds the store's model (a lease) until the graph's
        # copies are done, and Worker.synchronize waits for them.
        if w._copy_stream is None:
            w._copy_stream = torch.cuda.ExternalStream(w.switch.copy_stream(), device=w.device)
        w._copy_stream.wait_stream(stream)
        w.switch.start_resident(w.store, entry.name, w.arena, entry.offset)
        return out

    def __call__(self, *inputs):
        w, entry = self.worker, self.entry
        self._check(inputs)
        if w._current is entry and not w.switch.group_ready(len(entry.plan) - 1):
            kind = "switched"
        elif entry.resident:
            kind = "resident"
        else:
            raise RuntimeError("model %r is not loaded on %s: call worker.switch_to(%r) first"
                               % (entry.name, w.device, entry.name))
        g, out = self.graphs[kind]
        g.replay()
        self.last_kind = kind
        return out
