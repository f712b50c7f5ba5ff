#!/usr/bin/env python3
"""PipeSwitch's evaluation (OSDI 2020, sections 6.1-6.4) re-done on one GPU with
libpipeswitch: total latency of switch + first inference, the grouping
ablation and the memory ablation, for ResNet-152, Inception-v3, BERT-base
and GPT-2 medium (random weights, fp32, batch 8).

Run from the repository root on the GPU machine::

    PYTHONPATH=python python3 bench/paper/experiments.py --out $OUT/paper.json

``--quick`` (fewer runs, one stop-and-start per model), ``--runs N``,
``--models resnet152 bert_base``, ``--skip mps,stop_and_start``. Progress goes
to stderr; the JSON (and, unless ``--no-figures``, the SVG figures of
``figures.py``) go next to ``--out``. Every variant fails soft: its error is
recorded in the JSON and the others go on. See README.md beside this file for
what each variant measures.

The top of this file (helpers, stats, plans, targets) needs no PyTorch, so
that tests and ``figures.py`` can import it anywhere.
"""

import argparse
import dataclasses
import gc
import json
import math
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(os.path.dirname(HERE))

SCHEMA = "pipeswitch-paper-experiments/1"

#: Models, in the paper's order plus GPT-2 medium.
MODELS = ["resnet152", "inception_v3", "bert_base", "gpt2_medium"]
MODEL_LABELS = {
    "resnet152": "ResNet-152",
    "inception_v3": "Inception-v3",
    "bert_base": "BERT-base",
    "gpt2_medium": "GPT-2 medium",
}

#: Same-card reference numbers, copied from ../shared/TARGETS.md ("The same
#: work on our H100 (PyTorch 2.11, fp32, batch 8, median ms of 40 interleaved
#: runs)"). "pipelined_ms" is PipeSwitch's mechanism re-created in plain
#: PyTorch; libpipeswitch must beat it on every model. "model_to_ms" is the
#: sentence under that table (plain model.to("cuda") from pageable memory).
TARGETS_REF = {
    "resnet152": {"weights_mb": 241, "bytes_over_peak_ms": 4.4, "ready_ms": 13.4,
                  "transfer_then_run_ms": 17.9, "pipelined_ms": 15.5, "stop_and_start_ms": 8355,
                  "model_to_ms": 57},
    "inception_v3": {"weights_mb": 95, "bytes_over_peak_ms": 1.7, "ready_ms": 11.5,
                     "transfer_then_run_ms": 13.8, "pipelined_ms": 12.3, "stop_and_start_ms": 7437,
                     "model_to_ms": 57},
    "bert_base": {"weights_mb": 438, "bytes_over_peak_ms": 7.9, "ready_ms": 7.1,
                  "transfer_then_run_ms": 15.4, "pipelined_ms": 9.1, "stop_and_start_ms": 11530,
                  "model_to_ms": 70},
    "gpt2_medium": {"weights_mb": 1419, "bytes_over_peak_ms": 25.7, "ready_ms": 21.7,
                    "transfer_then_run_ms": 48.2, "pipelined_ms": 29.1, "stop_and_start_ms": 15168,
                    "model_to_ms": 164},
}
TARGETS_REF_PEAK_GBPS = 55.2
#: Switch target (TARGETS.md): total <= TARGET_FACTOR x max(ready, bytes / H2D peak).
TARGET_FACTOR = 1.08

#: Every variant: (key, figure, label, what it measures).
VARIANTS = [
    ("ready_torch", "total", "ready (PyTorch)",
     "The model already resident on the GPU in plain PyTorch (weights allocated by PyTorch's caching "
     "allocator): host wall time of the forward + torch.cuda.synchronize()."),
    ("ready_pipeswitch", "total", "ready (libpipeswitch)",
     "The model already switched in by a libpipeswitch Worker (weights are views of arena memory, "
     "group pre-hooks in place, no copy): forward + synchronize."),
    ("pipeswitch", "total", "libpipeswitch",
     "Worker.switch_to(model) with the planner's optimal plan (pipelined copy from the pinned "
     "shared-memory store into the model's arena region), then the forward, whose layer groups wait "
     "on the GPU for their bytes; host wall time from the switch_to call to synchronize() after the "
     "forward. Every switch copies the whole model (the worker alternates between the models). With "
     "--graphs (unless --no-fused) the switch and the forward are one replay of a fused CUDA graph "
     "(CapturedForward.switch_and_run: the copies on a side stream inside the graph, the group waits "
     "edges of it), timed from that call to synchronize()."),
    ("transfer_then_run", "total", "transfer then run",
     "The same Worker path with one group (plan=[0]): the forward waits until the whole model has "
     "arrived. Also the grouping ablation's 'one group'."),
    ("model_to", "total", "model.to(\"cuda\")",
     "Plain PyTorch: the model's CPU tensors (pageable memory) copied with model.to('cuda'), then the "
     "forward + synchronize. Between runs the module gets its CPU tensors back (untimed; the freed GPU "
     "blocks stay in PyTorch's cache, the best case for PyTorch)."),
    ("mps", "total", "MPS",
     "Two more processes under NVIDIA MPS (private pipe/log directories): a 'previous task' holding "
     "ResNet-152 on the GPU, pinged for one inference right before each request, and a standby process "
     "with its CUDA context ready and the models in pageable host memory. Host wall time in this process "
     "from writing the request to the standby's pipe to reading its reply; the standby does "
     "model.to('cuda') + forward + synchronize, replies, then (untimed) gives the weights back and "
     "empties PyTorch's cache, as a switched-out task must."),
    ("two_process_no_mps", "total", "2 processes (no MPS)",
     "The MPS protocol without MPS (recorded only when MPS could not be started): the same two "
     "processes time-slicing the GPU."),
    ("stop_and_start", "total", "stop-and-start",
     "A new Python process that imports torch (and torchvision/transformers), builds the model with "
     "random init on the CPU, creates the CUDA context, moves the model to the GPU and runs one "
     "inference: host wall time from spawning it to reading its result line."),
    ("per_layer_groups", "grouping", "one layer per group",
     "Worker path with one group per layer (every layer waits for its own event)."),
    ("hand_groups", "grouping", "hand-chosen groups",
     "Worker path with one group per block, as PipeSwitch's release: per Bottleneck (ResNet), per "
     "Mixed_* block (Inception, stem convolutions together), per transformer layer (BERT, GPT-2), "
     "embeddings/stem and head each one group."),
    ("mem_workspace", "memory", "arena workspace",
     "A separate process whose PyTorch allocations all come from the arena's workspace "
     "(Worker.install_allocator before CUDA init): switch_to (optimal plan) + forward, timed inside "
     "that process."),
    ("mem_caching", "memory", "caching allocator",
     "A separate process with PyTorch's own caching allocator (warm: blocks cached from earlier "
     "runs); weights in the arena as usual; same measurement as mem_workspace."),
    ("mem_caching_emptied", "memory", "caching, emptied",
     "The mem_caching process with torch.cuda.empty_cache() before each request (untimed), so the "
     "forward's activations are cudaMalloc'ed again: memory without a manager, as in the paper's "
     "'no memory management' ablation (weights still in the arena)."),
    ("pinned_py", "memory", "pinned (Python copies)",
     "The optimal plan's groups copied by a Python thread with torch copy_(non_blocking=True) from a "
     "pinned host buffer (cudaHostAlloc) into the same arena region, one event per group, the forward's "
     "group pre-hooks waiting for each event (token tables, copied last, read from that pinned buffer "
     "until their group arrives, as the Worker reads its store): the control for pageable_py."),
    ("pageable_py", "memory", "pageable (Python copies)",
     "As pinned_py from an ordinary (pageable) host buffer holding the same bytes. libpipeswitch always "
     "page-locks its store (no pageable mode), so this is the 'no pinned memory' ablation: the driver "
     "stages each copy through its own pinned buffer and the issuing thread blocks until each is staged; "
     "the GPU cannot read pageable memory, so the token tables' lookups wait for their group."),
]
VARIANT_KEYS = [v[0] for v in VARIANTS]
VARIANT_LABELS = {v[0]: v[2] for v in VARIANTS}

CONFIG = {"batch": 8, "image": 224, "inception_image": 299, "seq_len": 128, "dtype": "float32",
          "bert_vocab": 30522, "gpt2_vocab": 50257}


def log(*parts):
    """Progress on stderr, with the elapsed time."""
    t = time.perf_counter() - _T0
    print("[%7.1fs] %s" % (t, " ".join(str(p) for p in parts)), file=sys.stderr, flush=True)


_T0 = time.perf_counter()


# ---------------------------------------------------------------------------
# Pure helpers (no PyTorch): statistics, schedules, plans, targets
# ---------------------------------------------------------------------------

def percentile(values, q):
    """The ``q``-quantile (0..1) of ``values`` with linear interpolation
    between order statistics (numpy's default); None for no values."""
    s = sorted(float(v) for v in values)
    if not s:
        return None
    if len(s) == 1:
        return s[0]
    pos = (len(s) - 1) * float(q)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(values):
    """median, p10, p90, min, max, mean, n of ``values`` (NaN/None dropped);
    ``{"n": 0}`` for none."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return {"n": 0}
    return {
        "median": percentile(vals, 0.5),
        "p10": percentile(vals, 0.1),
        "p90": percentile(vals, 0.9),
        "min": min(vals),
        "max": max(vals),
        "mean": sum(vals) / len(vals),
        "n": len(vals),
    }


def interleave(variants, runs, warmup=0):
    """The measurement order: ``warmup`` unrecorded rounds, then ``runs``
    recorded ones, each round every variant once in the given order
    (A B C A B C ...). Returns ``[(run, variant)]`` with run < 0 for warm-up."""
    order = []
    for run in range(-int(warmup), int(runs)):
        for v in variants:
            order.append((run, v))
    return order


_BLOCK_RE = re.compile(r"^(.*?\.\d+)(?:\.|$)")


def block_key(layer_name):
    """The block a layer belongs to for the hand-chosen plan: ``Mixed_*``
    (Inception), else the name up to its first numeric component
    (``layer3.12``, ``encoder.layer.5``, ``h.17``); None outside blocks."""
    first = layer_name.split(".")[0]
    if first.startswith("Mixed_"):
        return first
    m = _BLOCK_RE.match(layer_name)
    return m.group(1) if m else None


def hand_plan(layer_names):
    """One group per block (:func:`block_key`), layers before the first
    block as one group ("(stem)") and after the last as one ("(head)").
    Returns (group starts, group names)."""
    keys = []
    seen_block = False
    for name in layer_names:
        k = block_key(name)
        if k is None:
            k = "(head)" if seen_block else "(stem)"
        else:
            seen_block = True
        keys.append(k)
    starts = [i for i, k in enumerate(keys) if i == 0 or k != keys[i - 1]]
    return starts, [keys[i] for i in starts]


def transfer_ms(nbytes, gbps):
    """ms to move ``nbytes`` at ``gbps`` GB/s (10^9 bytes/s)."""
    return float(nbytes) / (float(gbps) * 1e9) * 1e3


def evaluate_target(model_bytes, peak_gbps, ready_ms, lib_ms, pipelined_ms):
    """TARGETS.md's switch target for one model: libpipeswitch's total <=
    1.08 x max(ready, bytes / peak), and below the pipelined column."""
    out = {"bytes_over_peak_ms": None, "ready_ms": ready_ms, "bound_ms": None, "target_ms": None,
           "libpipeswitch_ms": lib_ms, "pipelined_ref_ms": pipelined_ms,
           "pass_target": None, "pass_pipelined": None, "pass": None}
    if model_bytes and peak_gbps:
        out["bytes_over_peak_ms"] = transfer_ms(model_bytes, peak_gbps)
    if out["bytes_over_peak_ms"] is not None and ready_ms is not None:
        out["bound_ms"] = max(ready_ms, out["bytes_over_peak_ms"])
        out["target_ms"] = TARGET_FACTOR * out["bound_ms"]
    if lib_ms is not None:
        if out["target_ms"] is not None:
            out["pass_target"] = lib_ms <= out["target_ms"]
        if pipelined_ms is not None:
            out["pass_pipelined"] = lib_ms < pipelined_ms
        if out["pass_target"] is not None and out["pass_pipelined"] is not None:
            out["pass"] = out["pass_target"] and out["pass_pipelined"]
    return out


def plan_checks(mres, variants, peak, ready):
    """Issue 15's checks of the optimal plan: within 2% of the best of the other
    plans (hand-chosen, one group per layer, one group), measured within 3% of
    predicted (the fitted cost model), total <= 1.05 x max(ready, bytes/peak)."""
    plans = mres.get("plans") or {}
    keys = {"optimal": "pipeswitch", "hand": "hand_groups", "per_layer": "per_layer_groups",
            "one_group": "transfer_then_run"}
    measured = {k: _med(variants, v) for k, v in keys.items()}
    predicted = {k: (plans.get(k) or {}).get("predicted_ms") for k in keys}
    opt, pred = measured["optimal"], predicted["optimal"]
    others = [v for k, v in measured.items() if k != "optimal" and v is not None]
    floor = None
    if ready is not None and mres.get("bytes") and peak:
        floor = max(ready, transfer_ms(mres["bytes"], peak))
    out = {"measured_ms": measured, "predicted_ms": predicted,
           "optimal_within_2pct_of_best_other": (opt <= 1.02 * min(others)) if opt is not None and others else None,
           "measured_within_3pct_of_predicted": (abs(opt / pred - 1) <= 0.03) if opt and pred else None,
           "target_1_05_ms": 1.05 * floor if floor else None,
           "meets_1_05": (opt <= 1.05 * floor) if opt is not None and floor else None}
    return out


def _med(variants, key, field="total_ms"):
    v = variants.get(key) or {}
    s = (v.get("stats") or {}).get(field) or {}
    return s.get("median")


def where_the_time_goes(model, variants, model_bytes, peak_gbps, plan_info=None):
    """Numbers and sentences that say where libpipeswitch's total latency
    goes for one model (medians of the recorded components)."""
    tot = _med(variants, "pipeswitch")
    call = _med(variants, "pipeswitch", "switch_call_ms")
    enq = _med(variants, "pipeswitch", "enqueue_ms")
    gpu = _med(variants, "pipeswitch", "compute_stream_ms")
    copy = _med(variants, "pipeswitch", "copy_gpu_ms")
    ready_t = _med(variants, "ready_torch")
    ready_p = _med(variants, "ready_pipeswitch")
    ready_gpu = _med(variants, "ready_pipeswitch", "compute_stream_ms")
    ready_enq = _med(variants, "ready_pipeswitch", "enqueue_ms")
    out = {"total_ms": tot, "switch_call_ms": call, "forward_enqueue_ms": enq,
           "compute_stream_ms": gpu, "copy_gpu_ms": copy, "ready_torch_ms": ready_t,
           "ready_pipeswitch_ms": ready_p, "ready_compute_stream_ms": ready_gpu,
           "bytes_over_peak_ms": transfer_ms(model_bytes, peak_gbps) if model_bytes and peak_gbps else None,
           "copy_gbps": None, "copy_pct_of_peak": None, "stall_ms": None, "host_ms": None,
           "predicted_makespan_ms": (plan_info or {}).get("predicted_ms"), "notes": []}
    notes = out["notes"]
    if tot is None:
        notes.append("no libpipeswitch measurement")
        return out
    if copy and model_bytes:
        out["copy_gbps"] = model_bytes / (copy * 1e-3) / 1e9
        if peak_gbps:
            out["copy_pct_of_peak"] = 100.0 * out["copy_gbps"] / peak_gbps
            notes.append("copies: %.2f ms on the GPU, %.1f GB/s = %.0f%% of the measured peak"
                         % (copy, out["copy_gbps"], out["copy_pct_of_peak"]))
    if gpu is not None and ready_gpu is not None:
        out["stall_ms"] = gpu - ready_gpu
        notes.append("forward on the compute stream: %.2f ms after the switch vs %.2f ms on resident "
                     "weights: %.2f ms spent waiting for groups" % (gpu, ready_gpu, gpu - ready_gpu))
    if gpu is not None:
        out["host_ms"] = tot - gpu
        if call is None:  # a fused replay: the graph spans the switch and the forward
            notes.append("host side not covered by the fused graph on the compute stream: %.2f ms "
                         "(launch and synchronize)" % (tot - gpu))
        else:
            notes.append("host side not covered by the GPU forward: %.2f ms (switch_to call %.2f ms, "
                         "launch and synchronize)" % (tot - gpu, call))
    if enq is not None and gpu is not None and enq > 0.8 * gpu:
        notes.append("host-bound: Python took %.2f ms to issue the forward (GPU forward %.2f ms), so "
                     "the GPU waits for launches, not for bytes" % (enq, gpu))
    if ready_p is not None and ready_t is not None and ready_p > 1.05 * ready_t:
        notes.append("the forward on arena weights with group hooks is %.1f%% slower than plain "
                     "PyTorch (%.2f vs %.2f ms)" % (100.0 * (ready_p / ready_t - 1.0), ready_p, ready_t))
    if ready_enq is not None and enq is not None:
        notes.append("issuing the forward: %.2f ms after a switch vs %.2f ms resident" % (enq, ready_enq))
    if out["predicted_makespan_ms"]:
        notes.append("planner's predicted makespan %.2f ms (%s groups)"
                     % (out["predicted_makespan_ms"], (plan_info or {}).get("groups")))
    return out


class Deadline:
    """Seconds left of a budget that started at construction."""

    def __init__(self, budget_s):
        self.budget_s = float(budget_s)
        self.t0 = time.perf_counter()

    def elapsed(self):
        return time.perf_counter() - self.t0

    def left(self):
        return self.budget_s - self.elapsed()


def stop_and_start_estimate_s(model):
    """A guess of one stop-and-start run: TARGETS.md's number on this card + 10% + 1 s."""
    ref = TARGETS_REF.get(model, {}).get("stop_and_start_ms", 15000)
    return ref * 1.1 / 1e3 + 1.0


def write_json(path, obj):
    """Writes ``obj`` to ``path`` atomically (temporary file, then rename)."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".paper-", suffix=".json", dir=d)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=False, default=_json_default)
        f.write("\n")
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, float) and (math.isnan(o) or math.isinf(o)):
        return None
    return str(o)


def _clean_floats(o):
    """NaN/inf -> None, floats to 6 significant digits (JSON stays valid and small)."""
    if isinstance(o, float):
        if math.isnan(o) or math.isinf(o):
            return None
        return float("%.6g" % o)
    if isinstance(o, dict):
        return {k: _clean_floats(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean_floats(v) for v in o]
    return o


def card_slug(name):
    return re.sub(r"[^a-z0-9]+", "-", (name or "unknown").lower()).strip("-") or "unknown"


def _setup_paths():
    """Makes ``import pipeswitch`` find this checkout's package and, unless
    PIPESWITCH_LIB is set, the GPU bundle's library (.gpu/libpipeswitch.so)
    or the release build; children inherit both through the environment."""
    py = os.path.join(REPO_ROOT, "python")
    if os.path.isdir(py):
        if py not in sys.path:
            sys.path.insert(0, py)
        pp = os.environ.get("PYTHONPATH", "")
        if py not in pp.split(os.pathsep):
            os.environ["PYTHONPATH"] = py + (os.pathsep + pp if pp else "")
    if not os.environ.get("PIPESWITCH_LIB"):
        for cand in (os.path.join(REPO_ROOT, ".gpu", "libpipeswitch.so"),
                     os.path.join(REPO_ROOT, "target", "release", "libpipeswitch.so")):
            if os.path.exists(cand):
                os.environ["PIPESWITCH_LIB"] = cand
                break


def _err(e):
    return "%s: %s" % (type(e).__name__, str(e).strip().splitlines()[0][:500] if str(e).strip() else "")


# ---------------------------------------------------------------------------
# Models (PyTorch from here on)
# ---------------------------------------------------------------------------

def build_model(name, seed=0):
    """The model with random weights (no download), eval mode, on the
    current default device (CPU, or meta under ``torch.device("meta")``)."""
    import torch

    torch.manual_seed(seed)
    if name == "resnet152":
        import torchvision
        m = torchvision.models.resnet152(weights=None)
    elif name == "inception_v3":
        import torchvision
        m = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False)
    elif name == "bert_base":
        from transformers import BertConfig, BertModel
        m = BertModel(BertConfig())
    elif name == "gpt2_medium":
        from transformers import GPT2Config, GPT2Model
        m = GPT2Model(GPT2Config(n_embd=1024, n_layer=24, n_head=16, use_cache=False))
    else:
        raise ValueError("unknown model %r (known: %s)" % (name, ", ".join(MODELS)))
    return m.eval()


def build_skeleton(name, cpu_model=None):
    """The model's structure for Worker.attach: built on the meta device
    (no memory, no init), else a deep copy of ``cpu_model``, else built on
    the CPU."""
    import copy

    import torch

    try:
        with torch.device("meta"):
            return build_model(name), "meta"
    except Exception as e:  # noqa: BLE001 - any failure: fall back to real tensors
        log("meta build of %s failed (%s); using real tensors" % (name, _err(e)))
    if cpu_model is not None:
        return copy.deepcopy(cpu_model), "deepcopy"
    return build_model(name), "cpu"


def make_inputs(name, device="cpu", batch=None, seq_len=None):
    """The example inputs: a tuple of positional arguments."""
    import torch

    batch = batch or CONFIG["batch"]
    seq_len = seq_len or CONFIG["seq_len"]
    g = torch.Generator().manual_seed(1234)
    if name == "resnet152":
        x = torch.randn(batch, 3, CONFIG["image"], CONFIG["image"], generator=g)
    elif name == "inception_v3":
        x = torch.randn(batch, 3, CONFIG["inception_image"], CONFIG["inception_image"], generator=g)
    elif name == "bert_base":
        x = torch.randint(0, CONFIG["bert_vocab"], (batch, seq_len), generator=g)
    elif name == "gpt2_medium":
        x = torch.randint(0, CONFIG["gpt2_vocab"], (batch, seq_len), generator=g)
    else:
        raise ValueError(name)
    return (x.to(device),)


def first_tensor(out):
    """The main output tensor of a forward (logits, last_hidden_state, ...)."""
    import torch

    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "last_hidden_state") and out.last_hidden_state is not None:
        return out.last_hidden_state
    if isinstance(out, dict):
        for v in out.values():
            return first_tensor(v)
    if isinstance(out, (tuple, list)) and out:
        return first_tensor(out[0])
    if hasattr(out, "to_tuple"):
        return first_tensor(out.to_tuple())
    raise TypeError("no tensor in output of type %s" % type(out).__name__)


def checksum(out):
    return float(first_tensor(out).double().abs().sum().item())


def unique_tensor_bytes(module):
    """Bytes of the module's distinct tensors (parameters and buffers, ties once)."""
    seen, total, count = set(), 0, 0
    for t in list(module.parameters()) + list(module.buffers()):
        key = (t.data_ptr(), tuple(t.shape), t.dtype)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
        count += 1
    return total, count


def cpu_snapshot(module):
    """What :func:`restore_snapshot` needs to give ``module`` back its
    current (CPU) tensors after a ``module.to("cuda")``, without a copy."""
    params, bufs = [], []
    for m in module.modules():
        for k, p in m._parameters.items():
            if p is not None:
                params.append((m, k, p, p.data))
        for k, b in m._buffers.items():
            if b is not None:
                bufs.append((m, k, b))
    return params, bufs


def restore_snapshot(snap):
    params, bufs = snap
    for m, k, p, data in params:
        p.data = data
        m._parameters[k] = p
    for m, k, b in bufs:
        m._buffers[k] = b


def align_up(n, a):
    return (int(n) + a - 1) // a * a


def regions_bytes(model_bytes):
    """Arena bytes for one region per model (256-aligned) plus slack."""
    return sum(align_up(b, 1 << 21) for b in model_bytes) + (64 << 20)


class CudaMemory:
    """Device memory as a flat uint8 array for ``torch.as_tensor`` (CUDA
    Array Interface v3, no stream synchronisation on import)."""

    def __init__(self, ptr, nbytes):
        self.__cuda_array_interface__ = {"shape": (int(nbytes),), "typestr": "|u1",
                                         "data": (int(ptr), False), "strides": None,
                                         "version": 3, "stream": None}


def owner_module(module, tensor_name):
    """The module that owns the (dotted) tensor name."""
    if "." not in tensor_name:
        return module
    return module.get_submodule(tensor_name.rsplit(".", 1)[0])


class PyPipelined:
    """PipeSwitch's mechanism in Python for the pinned/pageable ablation:
    one copy per group (byte ranges of ``plan``) from a host buffer into an
    arena region, issued by a helper thread on a side stream with one event
    per group; a forward pre-hook on each group's first module waits (on
    the host) until that group's copy has been issued, then makes the
    compute stream wait for its event (on the GPU).

    Token tables stored last (``pipeswitch.torch.table_layers``) are treated
    as the Worker treats them: no group waits for them; while a table's group
    has not arrived, its lookups read the host buffer directly when that is
    pinned (device-mapped), and wait for the group when it is pageable (the
    GPU cannot read pageable memory)."""

    def __init__(self, skel, info, plan, region_ptr, device):
        import bisect
        import queue

        import torch

        from pipeswitch.torch import table_layers

        self.torch = torch
        self.device = device
        self.region = torch.as_tensor(CudaMemory(region_ptr, info.bytes), device=device)
        if self.region.data_ptr() != region_ptr:
            raise RuntimeError("could not map the arena region")
        bounds = [info.layers[s].offset for s in plan] + [info.bytes]
        self.ranges = list(zip(bounds[:-1], bounds[1:]))
        self.events = [torch.cuda.Event(enable_timing=True) for _ in plan]
        self.start_event = torch.cuda.Event(enable_timing=True)
        self.flags = [threading.Event() for _ in plan]
        self.stream = torch.cuda.Stream(device)
        self.active = False
        self.error = None
        self.hooks = []
        tables = table_layers(info, skel)
        n_waited = len(info.layers) - len(tables)
        for g, first_layer in enumerate(plan):
            if first_layer >= n_waited:
                continue  # tables only
            mod = owner_module(skel, info.layers[first_layer].tensors[0])
            self.hooks.append(mod.register_forward_pre_hook(self._hook(g)))
        self.host = None
        self.host_views = {}  # host data_ptr -> {table layer: [views]}
        self.tables = []
        for i in tables:
            layer = info.layers[i]
            mod = owner_module(skel, layer.tensors[0])
            own = []
            for name in layer.tensors:
                attr = name.rsplit(".", 1)[1]
                is_param = attr in mod._parameters
                t = (mod._parameters if is_param else mod._buffers)[attr]
                own.append((attr, is_param, t.dtype, info.tensor(name)))
            self.tables.append((i, own))
            pre, post = self._table_hooks(i, own, bisect.bisect_right(plan, i) - 1)
            self.hooks.append(mod.register_forward_pre_hook(pre))
            self.hooks.append(mod.register_forward_hook(post, always_call=True))
        self.queue = queue.Queue()
        self.thread = threading.Thread(target=self._copier, daemon=True)
        self.thread.start()

    def _hook(self, g):
        def hook(mod, args):
            if not self.active:
                return
            if not self.flags[g].wait(60.0):
                raise RuntimeError("group %d was not issued within 60 s" % g)
            if self.error is not None:
                raise RuntimeError("copy thread failed: %s" % self.error)
            self.torch.cuda.current_stream(self.device).wait_event(self.events[g])
        return hook

    def _table_hooks(self, layer, own, g):
        saved = []
        wait = self._hook(g)

        def pre(mod, args):
            if not self.active or (self.flags[g].is_set() and self.events[g].query()):
                return  # in the arena
            views = self._views().get(layer)
            if views is None:  # pageable: the GPU cannot read it
                wait(mod, args)
                return
            for (attr, is_param, _, _), v in zip(own, views):
                d = mod._parameters if is_param else mod._buffers
                saved.append((d, attr, d[attr]))
                d[attr] = v

        def post(mod, args, out):
            while saved:
                d, attr, t = saved.pop()
                d[attr] = t

        return pre, post

    def _views(self):
        """{table layer: [tensors viewing the pinned host buffer]} ({} when
        the host buffer is pageable), made once per buffer."""
        torch, host = self.torch, self.host
        if host is None:
            return {}
        views = self.host_views.get(host.data_ptr())
        if views is None and not host.is_pinned():
            views = self.host_views[host.data_ptr()] = {}
        if views is None:
            views = {}
            try:
                for layer, own in self.tables:
                    vs = []
                    for attr, is_param, dtype, ti in own:
                        ptr = host.data_ptr() + ti.offset
                        raw = torch.as_tensor(CudaMemory(ptr, ti.bytes), device=self.device)
                        if raw.data_ptr() != ptr or raw.device != self.device:
                            raise RuntimeError("PyTorch mapped %#x on %s" % (raw.data_ptr(), raw.device))
                        v = raw.view(dtype).view(ti.shape)
                        vs.append(torch.nn.Parameter(v, requires_grad=False) if is_param else v)
                    views[layer] = vs
            except (RuntimeError, TypeError, ValueError) as e:
                log("pinned host buffer not mappable (%s): tables wait for their group" % _err(e))
                views = {}
            self.host_views[host.data_ptr()] = views
        return views

    def _copier(self):
        torch = self.torch
        torch.cuda.set_device(self.device)
        while True:
            host = self.queue.get()
            if host is None:
                return
            try:
                with torch.cuda.stream(self.stream):
                    self.start_event.record(self.stream)
                    for g, (a, b) in enumerate(self.ranges):
                        if b > a:
                            self.region[a:b].copy_(host[a:b], non_blocking=True)
                        self.events[g].record(self.stream)
                        self.flags[g].set()
            except BaseException as e:  # noqa: BLE001 - reported by the hooks
                self.error = _err(e)
                for f in self.flags:
                    f.set()

    def start(self, host):
        """Starts the copies from ``host`` (a CPU uint8 tensor of the model's
        bytes); returns at once."""
        self.stream.wait_stream(self.torch.cuda.current_stream(self.device))
        for f in self.flags:
            f.clear()
        self.error = None
        self.host = host
        self.active = True
        self.queue.put(host)

    def finish(self):
        """After synchronize: the GPU time of the copies (ms)."""
        self.active = False
        for f in self.flags:
            f.wait(60.0)
        return self.start_event.elapsed_time(self.events[-1])

    def close(self):
        self.queue.put(None)
        for h in self.hooks:
            h.remove()


# ---------------------------------------------------------------------------
# Talking to child processes (one JSON object a line)
# ---------------------------------------------------------------------------

class ChildDied(RuntimeError):
    pass


class Child:
    """A child process running this script with ``--child``: requests on
    its stdin, replies on its stdout (its library output goes to stderr)."""

    def __init__(self, name, argv, env):
        self.name = name
        self.buf = b""
        self.dead = None
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)

    def send(self, obj):
        if self.dead:
            raise ChildDied("%s: %s" % (self.name, self.dead))
        try:
            self.proc.stdin.write((json.dumps(obj) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as e:
            self.dead = "pipe closed (%s), exit code %s" % (e, self.proc.poll())
            raise ChildDied("%s: %s" % (self.name, self.dead)) from e

    def recv(self, timeout):
        if self.dead:
            raise ChildDied("%s: %s" % (self.name, self.dead))
        end = time.perf_counter() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            left = end - time.perf_counter()
            if left <= 0:
                raise TimeoutError("%s: no reply within %.0f s" % (self.name, timeout))
            r, _, _ = select.select([fd], [], [], left)
            if not r:
                continue
            data = os.read(fd, 1 << 16)
            if not data:
                self.dead = "exited with code %s" % self.proc.wait(timeout=10)
                raise ChildDied("%s %s" % (self.name, self.dead))
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def request(self, obj, timeout):
        self.send(obj)
        reply = self.recv(timeout)
        if not reply.get("ok", False):
            raise RuntimeError("%s: %s" % (self.name, reply.get("error", "failed")))
        return reply

    def close(self, timeout=10.0):
        if self.proc.poll() is None:
            try:
                self.send({"cmd": "quit"})
            except ChildDied:
                pass
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=5)
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        self.dead = self.dead or "closed (exit code %s)" % self.proc.returncode


class Proto:
    """The child's side of :class:`Child`. Takes fd 1 for the replies and
    points fd 1 (print, libraries) at stderr."""

    def __init__(self):
        sys.stdout.flush()
        self.out = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)
        self.inp = sys.stdin.buffer

    def recv(self):
        line = self.inp.readline()
        if not line:
            return None
        return json.loads(line)

    def send(self, obj):
        self.out.write(json.dumps(obj, default=_json_default) + "\n")
        self.out.flush()


def _child_loop(proto, handlers):
    """Serves requests until "quit" or EOF; a handler's exception is
    replied as an error."""
    while True:
        msg = proto.recv()
        if msg is None or msg.get("cmd") == "quit":
            return
        try:
            reply = handlers[msg["cmd"]](msg)
            reply.setdefault("ok", True)
        except Exception as e:  # noqa: BLE001 - sent to the parent
            reply = {"ok": False, "error": _err(e), "trace": traceback.format_exc()[-2000:]}
        proto.send(reply)


# ---------------------------------------------------------------------------
# Timed bodies, shared by the main process and the memory children
# ---------------------------------------------------------------------------

def timed_switch(torch, worker, name, skel, inputs, ev0, ev1):
    """switch_to + forward + synchronize; returns (record, output)."""
    stream = torch.cuda.current_stream()
    t0 = time.perf_counter()
    worker.switch_to(name)
    t1 = time.perf_counter()
    ev0.record(stream)
    y = skel(*inputs)
    ev1.record(stream)
    t2 = time.perf_counter()
    torch.cuda.synchronize()
    t3 = time.perf_counter()
    rec = {"total_ms": (t3 - t0) * 1e3, "switch_call_ms": (t1 - t0) * 1e3,
           "enqueue_ms": (t2 - t1) * 1e3, "compute_stream_ms": ev0.elapsed_time(ev1),
           "copy_gpu_ms": worker.switch.elapsed_ms()}
    return rec, y


def timed_fused_switch(torch, cap, inputs, ev0, ev1):
    """CapturedForward.switch_and_run (the switch and the forward as one
    replay of the fused CUDA graph) + synchronize; returns (record, output).
    compute_stream_ms spans the whole graph (copies included); the copies'
    own GPU time is not measured (they run inside the graph)."""
    stream = torch.cuda.current_stream()
    t0 = time.perf_counter()
    ev0.record(stream)
    y = cap.switch_and_run(*inputs)
    ev1.record(stream)
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    rec = {"total_ms": (t2 - t0) * 1e3, "enqueue_ms": (t1 - t0) * 1e3,
           "compute_stream_ms": ev0.elapsed_time(ev1)}
    return rec, y


def timed_forward(torch, module, inputs, ev0, ev1):
    stream = torch.cuda.current_stream()
    t0 = time.perf_counter()
    ev0.record(stream)
    y = module(*inputs)
    ev1.record(stream)
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return {"total_ms": (t2 - t0) * 1e3, "enqueue_ms": (t1 - t0) * 1e3,
            "compute_stream_ms": ev0.elapsed_time(ev1)}, y


# ---------------------------------------------------------------------------
# Children
# ---------------------------------------------------------------------------

def child_stop_and_start(args):
    """A cold process: import, build, CUDA context, to GPU, one inference.
    Prints one RESULT line with phase times (wall clock, from the parent's
    spawn time)."""
    t_begin = time.time()
    import torch
    t_import = time.time()
    torch.set_grad_enabled(False)
    model = build_model(args.model)
    inputs = make_inputs(args.model)
    t_build = time.time()
    torch.cuda.init()
    torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    t_ctx = time.time()
    model.to("cuda")
    inputs = tuple(x.to("cuda") for x in inputs)
    y = model(*inputs)
    torch.cuda.synchronize()
    t_done = time.time()
    spawn = args.t_spawn or t_begin
    res = {"ok": True, "model": args.model, "checksum": checksum(y),
           "phases_ms": {"interpreter_start": (t_begin - spawn) * 1e3, "import_torch": (t_import - t_begin) * 1e3,
                         "build_model": (t_build - t_import) * 1e3, "cuda_context": (t_ctx - t_build) * 1e3,
                         "to_cuda_and_forward": (t_done - t_ctx) * 1e3},
           "child_total_ms": (t_done - spawn) * 1e3}
    sys.stdout.write("RESULT " + json.dumps(res) + "\n")
    sys.stdout.flush()


def child_mps_standby(args):
    """The MPS standby task: models in pageable host memory, CUDA context
    ready; on "run": model.to('cuda') + forward, reply; on "cleanup": CPU
    tensors back, empty PyTorch's cache."""
    proto = Proto()
    import torch
    torch.set_grad_enabled(False)
    torch.set_num_threads(min(4, os.cpu_count() or 4))
    models, inputs, snaps, failed = {}, {}, {}, {}
    for m in args.models:
        try:
            models[m] = build_model(m)
            inputs[m] = make_inputs(m)
        except Exception as e:  # noqa: BLE001 - that model's requests fail, the others go on
            failed[m] = _err(e)
    proto.send({"ok": True, "phase": "cpu", "pid": os.getpid(), "failed": failed})
    state = {"y": None}

    def go(msg):
        t0 = time.perf_counter()
        torch.cuda.init()
        torch.zeros(1, device="cuda")
        torch.cuda.synchronize()
        for m in models:
            inputs[m] = tuple(x.to("cuda") for x in inputs[m])
        return {"context_ms": (time.perf_counter() - t0) * 1e3, "pid": os.getpid()}

    def run(msg):
        m = models[msg["model"]]
        snaps[msg["model"]] = cpu_snapshot(m)
        t0 = time.perf_counter()
        m.to("cuda")
        y = m(*inputs[msg["model"]])
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        state["y"] = y
        out = {"inner_ms": (t1 - t0) * 1e3}
        if msg.get("checksum"):
            out["checksum"] = checksum(y)
        return out

    def cleanup(msg):
        state["y"] = None
        snap = snaps.pop(msg["model"], None)
        if snap is not None:
            restore_snapshot(snap)
        if msg.get("empty_cache", True):
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        on_cpu = all(p.device.type == "cpu" for p in models[msg["model"]].parameters())
        return {"on_cpu": on_cpu}

    _child_loop(proto, {"go": go, "run": run, "cleanup": cleanup})


def child_mps_prev(args):
    """The previous task: ResNet-152 resident on the GPU; "ping" runs one inference."""
    proto = Proto()
    import torch
    torch.set_grad_enabled(False)
    torch.set_num_threads(min(4, os.cpu_count() or 4))
    model = build_model("resnet152", seed=7)
    x = make_inputs("resnet152")
    proto.send({"ok": True, "phase": "cpu", "pid": os.getpid()})
    state = {}

    def go(msg):
        state["model"] = model.to("cuda")
        state["x"] = tuple(t.to("cuda") for t in x)
        state["model"](*state["x"])
        torch.cuda.synchronize()
        return {"pid": os.getpid()}

    def ping(msg):
        t0 = time.perf_counter()
        state["model"](*state["x"])
        torch.cuda.synchronize()
        return {"ms": (time.perf_counter() - t0) * 1e3}

    _child_loop(proto, {"go": go, "ping": ping})


def child_mem(args):
    """A memory-ablation worker: its own arena (with a workspace that all of
    PyTorch's allocations use, or none and PyTorch's caching allocator),
    the main process's store and plans; "run" times switch_to + forward.

    Nothing but torch and pipeswitch is imported before "go": the allocator
    must be installed before anything (transformers included) could
    initialise CUDA in PyTorch, so the skeletons are built after it."""
    proto = Proto()
    import torch
    torch.set_grad_enabled(False)
    torch.set_num_threads(min(4, os.cpu_count() or 4))
    import pipeswitch as ps
    from pipeswitch.torch import Worker

    skels, inputs, kinds = {}, {}, {}
    proto.send({"ok": True, "phase": "cpu", "pid": os.getpid()})
    st = {}

    def go(msg):
        t0 = time.perf_counter()
        store = ps.Store.open(msg["store"])
        ws = int(msg["workspace_bytes"]) if args.allocator == "workspace" else 0
        arena = ps.Arena.create(0, regions_bytes(msg["model_bytes"].values()) + ws, ws)
        if args.allocator == "workspace":
            Worker.install_allocator(arena)
        worker = Worker(0, arena=arena, store=store, bandwidth_gbps=msg["bw"],
                        group_transfer_overhead_ms=msg["a"])
        store.pin(0)
        for m in msg["plans"]:
            skels[m], kinds[m] = build_skeleton(m)
            worker.attach(skels[m], m, plan=msg["plans"][m])
            inputs[m] = make_inputs(m, "cuda")
        st.update(store=store, arena=arena, worker=worker,
                  ev=(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
        sums = {}
        for _ in range(2):
            for m in msg["plans"]:
                _, y = timed_switch(torch, worker, m, skels[m], inputs[m], *st["ev"])
                sums[m] = checksum(y)
        return {"setup_ms": (time.perf_counter() - t0) * 1e3, "checksums": sums,
                "allocator": args.allocator, "workspace_bytes": ws, "skeletons": kinds}

    def run(msg):
        m = msg["model"]
        if msg.get("empty_cache"):
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        rec, y = timed_switch(torch, st["worker"], m, skels[m], inputs[m], *st["ev"])
        if args.allocator == "workspace":
            rec["workspace_used_bytes"] = ps.workspace_usage()[0]
        else:
            rec["torch_reserved_bytes"] = torch.cuda.memory_reserved()
        if msg.get("checksum"):
            rec["checksum"] = checksum(y)
        del y
        return rec

    _child_loop(proto, {"go": go, "run": run})


# ---------------------------------------------------------------------------
# MPS
# ---------------------------------------------------------------------------

class MPS:
    """An MPS control daemon with private pipe and log directories."""

    def __init__(self):
        self.exe = shutil.which("nvidia-cuda-mps-control")
        self.dir = None
        self.env = None
        self.started = False
        self.info = {"status": "not started", "reason": None}

    def start(self):
        if not self.exe:
            self.info.update(status="failed", reason="nvidia-cuda-mps-control not found on PATH")
            return False
        self.dir = tempfile.mkdtemp(prefix="ps-mps-", dir="/tmp")
        pipe, logd = os.path.join(self.dir, "pipe"), os.path.join(self.dir, "log")
        os.makedirs(pipe)
        os.makedirs(logd)
        self.env = dict(os.environ, CUDA_MPS_PIPE_DIRECTORY=pipe, CUDA_MPS_LOG_DIRECTORY=logd)
        self.info.update(pipe_dir=pipe, log_dir=logd, exe=self.exe)
        try:
            r = subprocess.run([self.exe, "-d"], env=self.env, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as e:
            self.info.update(status="failed", reason="nvidia-cuda-mps-control -d: %s" % _err(e))
            return False
        if r.returncode != 0:
            self.info.update(status="failed", reason="nvidia-cuda-mps-control -d exited %d: %s"
                             % (r.returncode, (r.stderr or r.stdout).strip()[:500]))
            return False
        self.started = True
        self.info.update(status="daemon started")
        return True

    def query(self, command):
        if not self.started:
            return None
        try:
            r = subprocess.run([self.exe], input=command + "\n", env=self.env, capture_output=True,
                               text=True, timeout=15)
            return (r.stdout + r.stderr).strip()
        except (OSError, subprocess.SubprocessError) as e:
            return "error: %s" % _err(e)

    def log_tail(self, n=15):
        out = {}
        if self.dir:
            for f in ("control.log", "server.log"):
                p = os.path.join(self.dir, "log", f)
                if os.path.exists(p):
                    with open(p, errors="replace") as fh:
                        out[f] = fh.read().splitlines()[-n:]
        return out

    def stop(self):
        if not self.started:
            return
        self.started = False
        try:
            subprocess.run([self.exe], input="quit\n", env=self.env, capture_output=True, text=True,
                           timeout=30)
        except (OSError, subprocess.SubprocessError) as e:
            self.info["stop_error"] = _err(e)
        self.info["log_tail"] = self.log_tail()
        shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------------------------------
# The main process
# ---------------------------------------------------------------------------

class Experiment:
    def __init__(self, args):
        self.args = args
        self.models = list(args.models)
        self.skip = set(args.skip)
        self.result = {
            "schema": SCHEMA,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "argv": sys.argv[1:],
            "quick": bool(args.quick),
            "runs_requested": args.runs,
            "warmup_rounds": args.warmup,
            "config": dict(CONFIG),
            "target_factor": TARGET_FACTOR,
            "targets_reference": {"source": "../shared/TARGETS.md, 'The same work on our H100' table",
                                  "peak_gbps": TARGETS_REF_PEAK_GBPS, "models": TARGETS_REF},
            "variants": {k: {"figure": f, "label": lab, "measures": what} for k, f, lab, what in VARIANTS},
            "aliases": {"grouping/optimal": "pipeswitch", "grouping/one_group": "transfer_then_run",
                        "memory/pinned_store": "pipeswitch"},
            "environment": {},
            "h2d": {},
            "models": {m: {"label": MODEL_LABELS[m], "variants": {}, "reference": TARGETS_REF.get(m)}
                       for m in self.models},
            "mps": {},
            "errors": [],
            "timing_s": {},
            "complete": False,
        }
        self.samples = {m: {} for m in self.models}   # model -> variant -> [record]
        self.errors = {m: {} for m in self.models}    # model -> variant -> [str]
        self.checks = {m: {} for m in self.models}
        self.disabled = {m: set() for m in self.models}
        self.children = {}
        self.mps = MPS()
        self.store = None
        self.store_name = None
        self.deadline = Deadline(args.budget_s)
        self.mps_variant = "mps"
        self._consec = {}
        self.ref_out, self.ref_sum = {}, {}

    # -- bookkeeping ---------------------------------------------------------
    def error(self, where, e):
        msg = "%s: %s" % (where, _err(e))
        log("ERROR", msg)
        self.result["errors"].append(msg)

    def drop_model(self, model, step, e):
        """A model that failed in setup: recorded, measured no further."""
        self.error("%s (%s)" % (step, model), e)
        self.result["models"][model]["error"] = "%s: %s" % (step, _err(e))
        if model in self.models:
            self.models.remove(model)

    def record(self, model, variant, rec, run):
        if run >= 0:
            self.samples[model].setdefault(variant, []).append(rec)

    def fail(self, model, variant, e):
        errs = self.errors[model].setdefault(variant, [])
        msg = _err(e)
        if len(errs) < 5:
            errs.append(msg)
            log("  %s/%s failed: %s" % (model, variant, msg))
        n = self._consec.get((model, variant), 0) + 1
        self._consec[(model, variant)] = n
        if n >= 3 or isinstance(e, ChildDied):
            self.disabled[model].add(variant)
            log("  %s/%s disabled" % (model, variant))

    def ok(self, model, variant):
        self._consec.pop((model, variant), None)

    def check(self, model, variant, y=None, value=None):
        """Compares an output (or a child's checksum) with the ready model's."""
        ref = self.ref_out.get(model)
        c = {}
        try:
            if y is not None and ref is not None:
                t = first_tensor(y).float()
                diff = float((t - ref).abs().max().item())
                scale = float(ref.abs().max().item()) or 1.0
                c = {"max_abs_diff": diff, "rel_diff": diff / scale, "ok": diff / scale < 1e-2}
            elif value is not None and self.ref_sum.get(model):
                rel = abs(value - self.ref_sum[model]) / self.ref_sum[model]
                c = {"checksum": value, "ref_checksum": self.ref_sum[model], "rel_diff": rel, "ok": rel < 1e-2}
        except Exception as e:  # noqa: BLE001
            c = {"error": _err(e)}
        self.checks[model][variant] = c
        if c.get("ok") is False:
            log("  CHECK %s/%s: output differs from the ready model's (rel %.3g)" % (model, variant, c["rel_diff"]))

    # -- children ------------------------------------------------------------
    def child_argv(self, kind, *extra):
        return [sys.executable, os.path.abspath(__file__), "--child", kind, "--models"] + self.models + list(extra)

    def spawn_children(self):
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        if not ({"mem_workspace"} <= self.skip):
            try:
                self.children["mem_workspace"] = Child("mem-workspace", self.child_argv(
                    "mem", "--allocator", "workspace"), env)
            except OSError as e:
                self.error("spawn mem-workspace", e)
        if not ({"mem_caching", "mem_caching_emptied"} <= self.skip):
            try:
                self.children["mem_caching"] = Child("mem-caching", self.child_argv(
                    "mem", "--allocator", "caching"), env)
            except OSError as e:
                self.error("spawn mem-caching", e)
        if "mps" not in self.skip:
            self.spawn_mps_children(use_mps=True)

    def spawn_mps_children(self, use_mps):
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        if use_mps:
            if self.mps.start():
                env = dict(self.mps.env, PYTHONUNBUFFERED="1")
                self.mps_variant = "mps"
            else:
                log("MPS: %s; measuring two processes without MPS" % self.mps.info["reason"])
                self.mps_variant = "two_process_no_mps"
        else:
            self.mps_variant = "two_process_no_mps"
        try:
            self.children["mps_prev"] = Child("mps-prev", self.child_argv("mps_prev"), env)
            self.children["mps_standby"] = Child("mps-standby", self.child_argv("mps_standby"), env)
        except OSError as e:
            self.error("spawn MPS children", e)

    def wait_cpu_phase(self, key, timeout):
        ch = self.children.get(key)
        if ch is None:
            return None
        try:
            return ch.recv(timeout)
        except Exception as e:  # noqa: BLE001
            self.error("%s start" % ch.name, e)
            self.drop_child(key)
            return None

    def drop_child(self, key):
        ch = self.children.pop(key, None)
        if ch is not None:
            try:
                ch.close(timeout=3)
            except Exception:  # noqa: BLE001
                pass

    def start_mps_pair(self):
        """CPU phase and "go" for the two MPS children; on failure under MPS,
        stops MPS and retries without it (two_process_no_mps)."""
        for attempt in range(2):
            if "mps_prev" not in self.children or "mps_standby" not in self.children:
                reason = "MPS children could not be spawned"
            else:
                try:
                    for key in ("mps_prev", "mps_standby"):
                        r = self.children[key].recv(180)
                        if not r.get("ok"):
                            raise RuntimeError(r.get("error"))
                    self.children["mps_prev"].request({"cmd": "go"}, 90)
                    r = self.children["mps_standby"].request({"cmd": "go"}, 90)
                    self.result["mps"].update(standby_context_ms=r.get("context_ms"))
                    if self.mps.started:
                        servers = self.mps.query("get_server_list") or ""
                        self.mps.info["server_list"] = servers
                        if any(tok.isdigit() for tok in servers.split()):
                            self.mps.info["status"] = "ok"
                            log("MPS active; server pid(s): %s" % servers)
                        else:
                            # The clients run, but not through an MPS server: say so.
                            self.mps.info.update(status="failed", reason="the clients started but "
                                                 "get_server_list shows no MPS server: %r" % servers)
                            self.mps_variant = "two_process_no_mps"
                            log("MPS: no server behind the clients; recording two_process_no_mps")
                    return True
                except Exception as e:  # noqa: BLE001
                    reason = _err(e)
            self.drop_child("mps_prev")
            self.drop_child("mps_standby")
            if attempt == 0 and self.mps.started:
                self.mps.info.update(status="failed", reason="clients under MPS failed: %s" % reason)
                log("MPS clients failed (%s); retrying without MPS" % reason)
                self.mps.stop()
                self.spawn_mps_children(use_mps=False)
                continue
            msg = "MPS/two-process variant: %s" % reason
            log("ERROR", msg)
            self.result["errors"].append(msg)
            return False
        return False

    # -- setup ---------------------------------------------------------------
    def setup(self):
        args = self.args
        _setup_paths()
        t0 = time.perf_counter()
        import torch
        self.torch = torch
        torch.set_grad_enabled(False)
        env = self.result["environment"]
        env.update(python=sys.version.split()[0], torch=torch.__version__,
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                   cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                   matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
                   cudnn_benchmark=torch.backends.cudnn.benchmark,
                   pipeswitch_lib=os.environ.get("PIPESWITCH_LIB"))
        for mod in ("torchvision", "transformers", "numpy"):
            try:
                env[mod] = __import__(mod).__version__
            except Exception as e:  # noqa: BLE001
                env[mod] = "unavailable: %s" % _err(e)
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA is not available to PyTorch")
        env["card"] = torch.cuda.get_device_name(0)
        try:
            r = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,pcie.link.gen.max,"
                                "pcie.link.width.max,memory.total", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=20)
            env["nvidia_smi"] = r.stdout.strip()
        except (OSError, subprocess.SubprocessError) as e:
            env["nvidia_smi"] = "unavailable: %s" % _err(e)

        import pipeswitch as ps
        import pipeswitch.torch as pst
        self.ps, self.pst = ps, pst
        env["libpipeswitch"] = ps.version()
        env["library_path"] = ps.library_path()
        log("card %s, torch %s, libpipeswitch %s (%s)" % (env["card"], torch.__version__, ps.version(),
                                                         ps.library_path()))

        # H2D peak before anything else uses the GPU: one 1 GiB pinned copy.
        bw, a = ps.measure_h2d(0, 1 << 30)
        self.peak, self.a = bw, a
        self.result["h2d"] = {"peak_gbps": bw, "per_copy_overhead_ms": a, "bytes": 1 << 30,
                              "how": "pipeswitch.measure_h2d(0, 1 GiB): median of single pinned copies; "
                                     "overhead from a linear fit over 64 KiB..64 MiB copies"}
        log("H2D peak %.2f GB/s, per-copy overhead %.1f us" % (bw, a * 1e3))

        # Models: CPU (pageable, model_to), GPU (ready_torch, registration).
        self.cpu, self.gpu, self.inputs, self.info = {}, {}, {}, {}
        import copy
        est = 0
        for m in list(self.models):
            tb = time.perf_counter()
            try:
                self.cpu[m] = build_model(m)
                nbytes, ntensors = unique_tensor_bytes(self.cpu[m])
                self.gpu[m] = copy.deepcopy(self.cpu[m]).to("cuda")
                self.inputs[m] = make_inputs(m, "cuda")
            except Exception as e:  # noqa: BLE001
                self.drop_model(m, "build", e)
                continue
            est += nbytes + 512 * ntensors + (4 << 20)
            log("built %s: %.1f MB, %d tensors (%.1f s)" % (m, nbytes / 1e6, ntensors, time.perf_counter() - tb))
        if not self.models:
            raise RuntimeError("no model could be built")
        self.store_name = "paper-%d-%s" % (os.getpid(), uuid.uuid4().hex[:8])
        shm = os.environ.get("PIPESWITCH_SHM_DIR", "/dev/shm")
        try:
            st = os.statvfs(shm)
            self.result["environment"]["shm_free_bytes"] = st.f_bavail * st.f_frsize
        except OSError:
            pass
        self.store = ps.Store.create(self.store_name, est + (64 << 20))
        for m in list(self.models):
            tb = time.perf_counter()
            try:
                info = pst.register_module(self.store, m, self.gpu[m], self.inputs[m], device="cuda:0",
                                           hold_gpu=self.args.graphs)
                self.info[m] = info
                y = self.gpu[m](*self.inputs[m])
            except Exception as e:  # noqa: BLE001
                self.drop_model(m, "register", e)
                continue
            self.ref_out[m] = first_tensor(y).float().clone()
            self.ref_sum[m] = checksum(y)
            self.result["models"][m].update(bytes=info.bytes, layers=len(info.layers), tensors=len(info.tensors),
                                            bytes_over_peak_ms=transfer_ms(info.bytes, bw))
            log("registered %s: %d layers, %.1f MB, sum of layer times %.2f ms (%.1f s)"
                % (m, len(info.layers), info.bytes / 1e6, sum(info.exec_ms), time.perf_counter() - tb))
        self.store.pin(0)

        # Plans.
        self.plans = {}
        for m in list(self.models):
            info = self.info[m]
            names = [layer.name for layer in info.layers]
            try:
                # The token tables, stored last (register_module's tables_last), travel as one
                # last group that the forward never waits for: planned without them.
                opt, makespan = pst.plan_module(self.store, m, self.gpu[m], bw, a, 0.01)
            except Exception as e:  # noqa: BLE001
                self.drop_model(m, "plan", e)
                continue
            hand, blocks = hand_plan(names)
            plans = {"optimal": opt, "per_layer": list(range(len(names))), "one_group": [0], "hand": hand}
            tms = [transfer_ms(layer.bytes, bw) for layer in info.layers]
            xms = list(info.exec_ms)
            desc = {}
            for k, p in plans.items():
                try:
                    pred = ps.plan_makespan(tms, xms, p, a, 0.01)
                except Exception as e:  # noqa: BLE001
                    pred = None
                    self.error("plan_makespan %s/%s" % (m, k), e)
                desc[k] = {"groups": len(p), "starts": p, "predicted_ms": pred}
            desc["optimal"]["planner_makespan_ms"] = makespan
            desc["hand"]["blocks"] = blocks
            self.plans[m] = plans
            self.result["models"][m]["plans"] = desc
            self.result["models"][m]["layer_exec_ms_sum"] = sum(xms)
            log("plans %s: optimal %d groups (predicted %.2f ms), hand %d, per-layer %d"
                % (m, len(opt), makespan, len(hand), len(names)))

        # Children start only now, so that the H2D peak and the per-layer times
        # above were measured with no other process working on this machine.
        log("spawning child processes")
        self.spawn_children()
        gomsg = {"cmd": "go", "store": self.store_name, "bw": bw, "a": a,
                 "model_bytes": {m: self.info[m].bytes for m in self.models},
                 "plans": {m: self.plans[m]["optimal"] for m in self.models},
                 "workspace_bytes": args.workspace_mb << 20}
        for key in ("mem_workspace", "mem_caching"):
            r = self.wait_cpu_phase(key, 240)
            if r is not None:
                try:
                    self.children[key].send(gomsg)
                except Exception as e:  # noqa: BLE001
                    self.error(key, e)
                    self.drop_child(key)

        # Main-process workers: one per plan kind, each with every model in its own region.
        tb = time.perf_counter()
        kinds = ["ready", "optimal", "one_group", "per_layer", "hand", "py"]
        total = regions_bytes([self.info[m].bytes for m in self.models])
        self.arena = ps.Arena.create(0, total * len(kinds) + (64 << 20), 0)
        self.workers, self.skels, self.skel_kind, self.py_region = {}, {}, {}, {}
        base = {}
        for k in kinds:
            self.workers[k] = pst.Worker(0, arena=self.arena, store=self.store, bandwidth_gbps=bw,
                                         group_transfer_overhead_ms=a)
        for m in list(self.models):
            try:
                base[m], self.skel_kind[m] = build_skeleton(m, self.cpu[m])
                for k in kinds:
                    skel = copy.deepcopy(base[m])
                    plan = {"ready": self.plans[m]["optimal"], "py": [0]}.get(k, self.plans[m].get(k))
                    region = None
                    if k == "py":  # PyPipelined copies into it too
                        region = self.arena.alloc(self.info[m].bytes)
                        self.py_region[m] = region
                    self.workers[k].attach(skel, m, region_offset=region, plan=plan)
                    self.skels[(k, m)] = skel
                for k in ("ready", "py"):
                    self.workers[k].switch_to(m)
                    self.workers[k].synchronize()
            except Exception as e:  # noqa: BLE001
                self.drop_model(m, "attach", e)
        if not self.models:
            raise RuntimeError("no model could be attached")
        torch.cuda.synchronize()
        log("arena %.1f GB, %d workers attached (%.1f s)" % (self.arena.size() / 1e9, len(kinds),
                                                               time.perf_counter() - tb))

        # Closed-loop planning (issue 15): per model, the cost model is calibrated on the
        # "optimal" worker as a server runs it (each switch right after another model's
        # forward), fitted, the optimum planned and measured, refitted while off by > 3%;
        # the chosen plan replaces the unfitted planner's, and the fitted model predicts
        # every plan of the grouping ablation.
        if not args.no_calibrate:
            self.calibrate()
        # CUDA graphs (--graphs): every Worker variant replays its captured forward; the
        # switch variants (all but "ready") also a fused graph, the switch and the forward in
        # one launch (CapturedForward.switch_and_run), unless --no-fused.
        self.caps = {}
        if args.graphs:
            tc = time.perf_counter()
            for m in list(self.models):
                try:
                    for k in ("ready", "optimal", "one_group", "per_layer", "hand"):
                        self.caps[(k, m)] = self.workers[k].capture(m, self.inputs[m],
                                                                    fused=args.fused and k != "ready")
                except Exception as e:  # noqa: BLE001
                    self.drop_model(m, "capture", e)
            log("captured the CUDA graphs in %.1f s" % (time.perf_counter() - tc))

        # Python pipelined loaders (pinned/pageable ablation).
        self.py, self.host = {}, {}
        if not ({"pinned_py", "pageable_py"} <= self.skip):
            for m in self.models:
                try:
                    info = self.info[m]
                    region = self.arena.base() + self.py_region[m]
                    self.py[m] = PyPipelined(self.skels[("py", m)], info, self.plans[m]["optimal"], region,
                                             torch.device("cuda", 0))
                    pinned = torch.empty(info.bytes, dtype=torch.uint8, pin_memory=True)
                    pageable = torch.empty(info.bytes, dtype=torch.uint8)
                    self.store.read_into(m, 0, pinned)
                    self.store.read_into(m, 0, pageable)
                    self.host[m] = {"pinned_py": pinned, "pageable_py": pageable}
                except Exception as e:  # noqa: BLE001
                    self.error("python loader %s" % m, e)

        # MPS children: GPU phase.
        if "mps_standby" in self.children or "mps_prev" in self.children:
            self.start_mps_pair()
        self.result["mps"].update(self.mps.info, variant=self.mps_variant)

        # Memory children: ready?
        for key in ("mem_workspace", "mem_caching"):
            ch = self.children.get(key)
            if ch is None:
                continue
            try:
                r = ch.recv(240)
                if not r.get("ok"):
                    raise RuntimeError(r.get("error"))
                self.result.setdefault("memory_children", {})[key] = {
                    k: r.get(k) for k in ("setup_ms", "allocator", "workspace_bytes", "checksums")}
            except Exception as e:  # noqa: BLE001
                self.error("%s setup" % key, e)
                self.drop_child(key)
        self.result["environment"]["skeletons"] = self.skel_kind
        self.result["environment"]["cuda_graphs"] = bool(self.args.graphs)
        self.result["environment"]["fused_switch_graphs"] = bool(self.args.graphs and self.args.fused)
        self.result["timing_s"]["setup"] = time.perf_counter() - t0
        log("setup done in %.1f s" % (time.perf_counter() - t0))

    def before_fn(self, m):
        """A forward of another model (resident on the "ready" worker): what a
        server ran right before a switch to ``m``; None with one model."""
        others = [o for o in self.models if o != m]
        if not others:
            return None
        o = others[(self.models.index(m)) % len(others)] if m in self.models else others[0]
        skel, inputs = self.skels[("ready", o)], self.inputs[o]

        def before():
            skel(*inputs)
        return before

    def calibrate(self):
        pst, args = self.pst, self.args
        cal = self.result.setdefault("calibration", {})
        for m in list(self.models):
            tb = time.perf_counter()
            try:
                r = pst.calibrate_module(self.workers["optimal"], m, self.inputs[m], before=self.before_fn(m),
                                         reps=args.cal_reps, extra_plans=[self.plans[m]["hand"]], max_rounds=4,
                                         graphs=args.graphs, fused=args.fused)
            except Exception as e:  # noqa: BLE001
                self.error("calibrate %s" % m, e)
                continue
            rec = r["record"]
            desc = self.result["models"][m]["plans"]
            desc["optimal_unfitted"] = dict(desc["optimal"])
            self.plans[m]["optimal"] = r["plan"]
            desc["optimal"] = {"groups": len(r["plan"]), "starts": r["plan"]}
            for k, p in self.plans[m].items():
                try:
                    desc[k]["predicted_ms"] = pst.predict_plan(self.info[m], self.skels[("optimal", m)], rec.model,
                                                               p, self.peak)
                except Exception as e:  # noqa: BLE001
                    self.error("predict %s/%s" % (m, k), e)
            cal[m] = {"record": dataclasses.asdict(rec), "ready_ms": r["ready_ms"],
                      "needed_layers": r["needed_layers"], "seconds": time.perf_counter() - tb,
                      "protocol": "median of %d switches, each right after another model's forward" % args.cal_reps}
            log("calibrated %s: %d groups, predicted %.2f ms, measured %.2f ms (fit rms %.1f%%, %d refit rounds, %.1f s)"
                % (m, rec.groups, rec.predicted_ms, rec.measured_ms, 100 * rec.fit_rms_rel_error, rec.rounds,
                   time.perf_counter() - tb))

    # -- the variants ----------------------------------------------------------
    def variant_plan(self, m):
        """``[(variant, callable(run) -> record)]`` for model ``m``, in order."""
        torch = self.torch
        ev = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        out = []
        first = {"done": set()}

        def chk(v, y):
            if v not in first["done"]:
                first["done"].add(v)
                self.check(m, v, y=y)

        def ready_torch(run):
            rec, y = timed_forward(torch, self.gpu[m], self.inputs[m], *ev)
            chk("ready_torch", y)
            return rec

        def fwd(kind):
            """The forward of worker ``kind``'s model: its captured graph (--graphs) or the module."""
            return self.caps.get((kind, m)) or self.skels[(kind, m)]

        def ready_ps(run):
            rec, y = timed_forward(torch, fwd("ready"), self.inputs[m], *ev)
            chk("ready_pipeswitch", y)
            return rec

        before = self.before_fn(m) if self.args.server_order else None

        def switch(kind, v):
            def f(run):
                if before is not None:  # as a server runs it: right after another model's forward
                    before()
                    torch.cuda.synchronize()
                cap = self.caps.get((kind, m))
                if cap is not None and cap.fused:
                    rec, y = timed_fused_switch(torch, cap, self.inputs[m], *ev)
                else:
                    rec, y = timed_switch(torch, self.workers[kind], m, fwd(kind), self.inputs[m], *ev)
                chk(v, y)
                return rec
            return f

        def model_to(run):
            mod = self.cpu[m]
            snap = cpu_snapshot(mod)
            try:
                stream = torch.cuda.current_stream()
                t0 = time.perf_counter()
                mod.to("cuda")
                t1 = time.perf_counter()
                ev[0].record(stream)
                y = mod(*self.inputs[m])
                ev[1].record(stream)
                torch.cuda.synchronize()
                t2 = time.perf_counter()
                chk("model_to", y)
                del y
            finally:
                restore_snapshot(snap)
            return {"total_ms": (t2 - t0) * 1e3, "to_call_ms": (t1 - t0) * 1e3,
                    "compute_stream_ms": ev[0].elapsed_time(ev[1])}

        def py(v):
            def f(run):
                loader, host = self.py[m], self.host[m][v]
                t0 = time.perf_counter()
                loader.start(host)
                try:
                    y = self.skels[("py", m)](*self.inputs[m])
                    torch.cuda.synchronize()
                    t1 = time.perf_counter()
                finally:
                    loader.active = False
                copy_ms = loader.finish()
                chk(v, y)
                return {"total_ms": (t1 - t0) * 1e3, "copy_gpu_ms": copy_ms}
            return f

        def mem(key, v, empty):
            def f(run):
                need_sum = v not in self.checks[m]
                r = self.children[key].request({"cmd": "run", "model": m, "empty_cache": empty,
                                                "checksum": need_sum}, 60)
                if need_sum:
                    self.check(m, v, value=r.get("checksum"))
                r.pop("ok", None)
                r.pop("checksum", None)
                return r
            return f

        def mps(run):
            prev, standby = self.children["mps_prev"], self.children["mps_standby"]
            prev.request({"cmd": "ping"}, 60)
            want_sum = run < 0
            t0 = time.perf_counter()
            r = standby.request({"cmd": "run", "model": m, "checksum": want_sum}, 120)
            t1 = time.perf_counter()
            c = standby.request({"cmd": "cleanup", "model": m, "empty_cache": True}, 60)
            if not c.get("on_cpu", True):
                raise RuntimeError("standby's model did not return to the CPU")
            rec = {"total_ms": (t1 - t0) * 1e3, "inner_ms": r.get("inner_ms")}
            if want_sum and self.mps_variant not in self.checks[m]:
                self.check(m, self.mps_variant, value=r.get("checksum"))
            if run < 0 and "first_request_ms" not in self.result["models"][m].setdefault("mps_cold", {}):
                self.result["models"][m]["mps_cold"]["first_request_ms"] = rec["total_ms"]
            return rec

        def add(v, f):
            if v not in self.skip:
                out.append((v, f))

        add("ready_torch", ready_torch)
        add("ready_pipeswitch", ready_ps)
        add("pipeswitch", switch("optimal", "pipeswitch"))
        add("transfer_then_run", switch("one_group", "transfer_then_run"))
        add("per_layer_groups", switch("per_layer", "per_layer_groups"))
        add("hand_groups", switch("hand", "hand_groups"))
        add("model_to", model_to)
        if m in self.py:
            add("pinned_py", py("pinned_py"))
            add("pageable_py", py("pageable_py"))
        if "mem_workspace" in self.children:
            add("mem_workspace", mem("mem_workspace", "mem_workspace", False))
        if "mem_caching" in self.children:
            add("mem_caching", mem("mem_caching", "mem_caching", False))
            add("mem_caching_emptied", mem("mem_caching", "mem_caching_emptied", True))
        if "mps_standby" in self.children and "mps_prev" in self.children and "mps" not in self.skip:
            out.append((self.mps_variant, mps))
        return out

    def stop_and_start_reserve(self):
        if "stop_and_start" in self.skip:
            return 0.0
        return self.args.ss_runs * sum(stop_and_start_estimate_s(m) for m in self.models)

    def main_loop(self):
        args = self.args
        t0 = time.perf_counter()
        plans = {m: self.variant_plan(m) for m in self.models}
        reserve = self.stop_and_start_reserve() + 10.0
        gc.collect()
        gc.disable()  # no collector pauses inside timed regions; collected between rounds
        try:
            self._rounds(args, plans, reserve)
        finally:
            gc.enable()
        self.result["timing_s"]["main_loop"] = time.perf_counter() - t0

    def _rounds(self, args, plans, reserve):
        done = 0
        last_round = 0.0
        for run in range(-args.warmup, args.runs):
            if run >= 0 and self.deadline.left() < reserve + 1.5 * last_round:
                log("stopping after %d runs: %.0f s left, %.0f s kept for stop-and-start and teardown"
                    % (done, self.deadline.left(), reserve))
                self.result["errors"].append("main loop stopped by the time budget after %d of %d runs"
                                             % (done, args.runs))
                break
            tr = time.perf_counter()
            for m in self.models:
                for v, f in plans[m]:
                    if v in self.disabled[m]:
                        continue
                    try:
                        rec = f(run)
                        self.ok(m, v)
                        self.record(m, v, rec, run)
                    except Exception as e:  # noqa: BLE001
                        self.fail(m, v, e)
                        try:
                            self.torch.cuda.synchronize()
                        except Exception:  # noqa: BLE001
                            pass
            last_round = time.perf_counter() - tr
            gc.collect()
            if run >= 0:
                done += 1
            if run < 0 or run % max(1, args.runs // 8) == 0 or run == args.runs - 1:
                parts = []
                for m in self.models:
                    s = self.samples[m].get("pipeswitch") or []
                    r = self.samples[m].get("ready_torch") or []
                    if s:
                        parts.append("%s %.1f/%.1f" % (m, summarize([x["total_ms"] for x in s])["median"],
                                                       summarize([x["total_ms"] for x in r])["median"] if r else float("nan")))
                log("run %d/%d (%s, round %.2f s) pipeswitch/ready medians: %s"
                    % (run + 1, args.runs, "warm-up" if run < 0 else "recorded", last_round, ", ".join(parts)))
        self.result["runs_done"] = done

    def stop_and_start(self):
        args = self.args
        if "stop_and_start" in self.skip or args.ss_runs <= 0:
            return
        t0 = time.perf_counter()
        env = dict(os.environ)
        for k in ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY"):
            env.pop(k, None)
        for i in range(args.ss_runs):
            for m in self.models:
                need = stop_and_start_estimate_s(m)
                if self.deadline.left() < need + 5.0:
                    self.fail(m, "stop_and_start", RuntimeError(
                        "skipped run %d: %.0f s left of the budget, %.0f s needed" % (i + 1, self.deadline.left(), need)))
                    continue
                if "stop_and_start" in self.disabled[m]:
                    continue
                try:
                    rec = self.one_stop_and_start(m, env, timeout=max(60.0, 4 * need))
                    self.record(m, "stop_and_start", rec, i)
                    if "stop_and_start" not in self.checks[m]:
                        self.check(m, "stop_and_start", value=rec.get("checksum"))
                    log("stop-and-start %s run %d: %.0f ms" % (m, i + 1, rec["total_ms"]))
                except Exception as e:  # noqa: BLE001
                    self.fail(m, "stop_and_start", e)
        self.result["timing_s"]["stop_and_start"] = time.perf_counter() - t0

    def one_stop_and_start(self, m, env, timeout):
        t_wall = time.time()
        t0 = time.perf_counter()
        p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", "stop_and_start",
                              "--model", m, "--t-spawn", repr(t_wall)], stdout=subprocess.PIPE, env=env)
        res = None
        try:
            buf = b""
            fd = p.stdout.fileno()
            end = t0 + timeout
            while res is None:
                left = end - time.perf_counter()
                if left <= 0:
                    raise TimeoutError("no result within %.0f s" % timeout)
                r, _, _ = select.select([fd], [], [], left)
                if not r:
                    continue
                data = os.read(fd, 1 << 16)
                if not data:
                    raise ChildDied("exited with code %s before its result" % p.wait(timeout=10))
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.startswith(b"RESULT "):
                        t1 = time.perf_counter()
                        res = json.loads(line[7:])
                        res["total_ms"] = (t1 - t0) * 1e3
                        break
        finally:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
            p.stdout.close()
        return {"total_ms": res["total_ms"], "child_total_ms": res.get("child_total_ms"),
                "phases_ms": res.get("phases_ms"), "checksum": res.get("checksum")}

    # -- teardown and results ----------------------------------------------------
    def close_children(self):
        for key in list(self.children):
            self.drop_child(key)
        if self.mps.started:
            self.mps.stop()
            self.result["mps"].update(self.mps.info)

    def close_gpu(self):
        for loader in getattr(self, "py", {}).values():
            try:
                loader.close()
            except Exception:  # noqa: BLE001
                pass
        for w in getattr(self, "workers", {}).values():
            try:
                w.close()
            except Exception as e:  # noqa: BLE001
                self.error("worker close", e)
        self.workers, self.py, self.host, self.gpu = {}, {}, {}, {}
        if getattr(self, "arena", None) is not None:
            try:
                self.arena.close()
            except Exception as e:  # noqa: BLE001
                self.error("arena close", e)
            self.arena = None
        try:
            self.torch.cuda.synchronize()
            self.torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001
            pass

    def end_h2d(self):
        try:
            bw, a = self.ps.measure_h2d(0, 1 << 30)
            self.result["h2d"]["end_peak_gbps"] = bw
            log("H2D peak at the end %.2f GB/s" % bw)
        except Exception as e:  # noqa: BLE001
            self.error("measure_h2d at the end", e)

    def unlink_store(self):
        if self.store is not None:
            try:
                self.store.close()
            except Exception:  # noqa: BLE001
                pass
        if self.store_name:
            try:
                import pipeswitch as ps
                ps.Store.unlink(self.store_name)
            except Exception:  # noqa: BLE001
                pass
            self.store_name = None

    def finalize(self):
        """Statistics, targets and the where-the-time-goes breakdown into the result."""
        res = self.result
        h2d = res.get("h2d") or {}
        peaks = [p for p in (h2d.get("peak_gbps"), h2d.get("end_peak_gbps")) if p]
        # The stricter of the two measurements (a higher peak makes bytes/peak smaller).
        peak = max(peaks) if peaks else None
        if peak:
            h2d["peak_for_target_gbps"] = peak
        fields = ("total_ms", "switch_call_ms", "enqueue_ms", "compute_stream_ms", "copy_gpu_ms",
                  "inner_ms", "to_call_ms", "child_total_ms", "workspace_used_bytes", "torch_reserved_bytes")
        for m in self.models:
            mres = res["models"][m]
            variants = mres["variants"]
            if mres.get("bytes") and peak:
                mres["bytes_over_peak_ms"] = transfer_ms(mres["bytes"], peak)
            names = set(self.samples[m]) | set(self.errors[m]) | {k for k in self.checks[m] if not k.startswith("_")}
            for v in sorted(names, key=lambda k: VARIANT_KEYS.index(k) if k in VARIANT_KEYS else 99):
                recs = self.samples[m].get(v, [])
                entry = {"stats": {}, "samples_ms": [r.get("total_ms") for r in recs],
                         "errors": self.errors[m].get(v, []), "check": self.checks[m].get(v),
                         "disabled": v in self.disabled[m]}
                for fld in fields:
                    vals = [r.get(fld) for r in recs if r.get(fld) is not None]
                    if vals:
                        entry["stats"][fld] = summarize(vals)
                entry.update(entry["stats"].get("total_ms", {"n": 0}))
                if v == "stop_and_start" and recs:
                    entry["phases_ms"] = [r.get("phases_ms") for r in recs]
                variants[v] = entry
            ready = _med(variants, "ready_torch")
            lib = _med(variants, "pipeswitch")
            ref = TARGETS_REF.get(m, {})
            t = evaluate_target(mres.get("bytes"), peak, ready, lib, ref.get("pipelined_ms"))
            mres["target"] = t
            # Issue 15's floor: the fastest way to run the model already on the GPU (eager
            # PyTorch, or with --graphs the replayed graph on resident weights).
            readies = [r for r in (ready, _med(variants, "ready_pipeswitch")) if r is not None]
            mres["plan_checks"] = plan_checks(mres, variants, peak, min(readies) if readies else None)
            mres["plan_checks"]["ready_ms"] = min(readies) if readies else None
            mres["where_the_time_goes"] = where_the_time_goes(
                m, variants, mres.get("bytes"), peak, (mres.get("plans") or {}).get("optimal"))
            if t.get("pass") is False:
                why = []
                if t.get("pass_target") is False:
                    why.append("%.2f ms > target %.2f ms (1.08 x max(ready %.2f, bytes/peak %.2f))"
                               % (lib, t["target_ms"], t["ready_ms"], t["bytes_over_peak_ms"]))
                if t.get("pass_pipelined") is False:
                    why.append("%.2f ms >= TARGETS.md pipelined %.2f ms" % (lib, t["pipelined_ref_ms"]))
                mres["target"]["missed_because"] = why
        res["summary"] = {m: {"libpipeswitch_ms": res["models"][m]["target"]["libpipeswitch_ms"],
                              "target_ms": res["models"][m]["target"]["target_ms"],
                              "pass": res["models"][m]["target"]["pass"]} for m in self.models}

    def run(self):
        try:
            self.setup()
            self.main_loop()
            self.write(partial=True)
        finally:
            self.close_children()
        self.end_h2d()
        self.close_gpu()
        self.unlink_store()
        self.stop_and_start()
        self.result["complete"] = True

    def write(self, partial=False):
        self.result["timing_s"]["total"] = self.deadline.elapsed()
        try:
            self.finalize()
        except Exception as e:  # noqa: BLE001
            self.result["errors"].append("finalize: %s" % _err(e))
        self.result["partial"] = bool(partial)
        write_json(self.args.out, _clean_floats(self.result))


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="JSON output (default bench/results/paper-<card>.json)")
    p.add_argument("--runs", type=int, help="recorded interleaved runs per variant (default 40, --quick 10)")
    p.add_argument("--warmup", type=int, help="unrecorded warm-up rounds (default 2, --quick 1)")
    p.add_argument("--quick", action="store_true", help="fewer runs, one stop-and-start per model")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--skip", default="", help="comma-separated variants to leave out (e.g. mps,stop_and_start)")
    p.add_argument("--ss-runs", type=int, help="stop-and-start runs per model (default 3, --quick 1)")
    p.add_argument("--budget-s", type=float, help="wall-clock budget; the interleaved loop stops early to keep "
                   "it (default 330, --quick 115)")
    p.add_argument("--workspace-mb", type=int, default=8192,
                   help="arena workspace of the mem_workspace process (default 8192 MiB)")
    p.add_argument("--no-figures", action="store_true", help="do not write the SVG figures next to --out")
    p.add_argument("--cal-reps", type=int, help="switches per calibration plan of the cost model's fit "
                   "(default 5, --quick 3)")
    p.add_argument("--no-calibrate", action="store_true", help="plan with the unfitted two-overhead model")
    p.add_argument("--graphs", action="store_true",
                   help="the libpipeswitch Worker variants replay CUDA graphs of the forward (Worker.capture; "
                        "per-layer times of the GPU alone), instead of eager PyTorch")
    p.add_argument("--no-fused", dest="fused", action="store_false",
                   help="with --graphs: time the switch variants as switch_to + a replay of the forward's graph, "
                        "not as one replay of the fused switch + forward graph (nor calibrate that way)")
    p.add_argument("--no-server-order", dest="server_order", action="store_false",
                   help="do not run another model's forward before each timed switch")
    p.add_argument("--child", choices=["stop_and_start", "mps_standby", "mps_prev", "mem"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--allocator", choices=["workspace", "caching"], help=argparse.SUPPRESS)
    p.add_argument("--t-spawn", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.runs is None:
        args.runs = 10 if args.quick else 40
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2
    if args.ss_runs is None:
        args.ss_runs = 1 if args.quick else 3
    if args.budget_s is None:
        args.budget_s = 115.0 if args.quick else 330.0
    if args.cal_reps is None:
        args.cal_reps = 3 if args.quick else 5
    args.skip = [s.strip() for s in args.skip.split(",") if s.strip()]
    unknown = [s for s in args.skip if s not in VARIANT_KEYS]
    if unknown:
        p.error("unknown variant(s) in --skip: %s (known: %s)" % (", ".join(unknown), ", ".join(VARIANT_KEYS)))
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        _setup_paths()
        {"stop_and_start": child_stop_and_start, "mps_standby": child_mps_standby,
         "mps_prev": child_mps_prev, "mem": child_mem}[args.child](args)
        return 0

    exp = Experiment(args)
    if not args.out:
        args.out = os.path.join(REPO_ROOT, "bench", "results", "paper.json")
        exp._default_out = True

    def on_signal(signum, frame):
        raise SystemExit("signal %d" % signum)

    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)
    rc = 0
    try:
        exp.run()
    except BaseException as e:  # noqa: BLE001 - everything goes to the JSON
        rc = 1
        exp.result["errors"].append("aborted: %s\n%s" % (_err(e), traceback.format_exc()[-3000:]))
        log("ABORTED:", _err(e))
        exp.close_children()
        exp.unlink_store()
    finally:
        if getattr(exp, "_default_out", False) and exp.result["environment"].get("card"):
            args.out = os.path.join(REPO_ROOT, "bench", "results",
                                    "paper-%s.json" % card_slug(exp.result["environment"]["card"]))
        exp.write(partial=not exp.result["complete"])
        log("wrote", args.out)
    if not args.no_figures:
        try:
            sys.path.insert(0, HERE)
            import figures
            figures.write_all(args.out, os.path.dirname(os.path.abspath(args.out)))
            print(figures.markdown_tables(json.load(open(args.out))))
        except Exception as e:  # noqa: BLE001
            log("figures failed: %s" % _err(e))
    s = exp.result.get("summary") or {}
    for m, v in s.items():
        log("%-13s libpipeswitch %s ms, target %s ms: %s" % (m, v.get("libpipeswitch_ms"), v.get("target_ms"),
                                                         {True: "PASS", False: "MISS", None: "n/a"}[v.get("pass")]))
    return rc


if __name__ == "__main__":
    sys.exit(main())
