#!/usr/bin/env python3
"""Issue 10's PyTorch rows: switch + first inference through ``pipeswitch
serve`` with PyTorch workers (``python -m pipeswitch.worker``), against the
same switch in one process (``pipeswitch.torch.Worker``) and against the
ready (resident) model, for ResNet-152, Inception-v3 and BERT-base with
random weights, batch 8 (224x224 / 299x299 images, 128 tokens), fp32.

With ``--graphs`` (the default) both sides replay CUDA graphs of the
forwards (``Worker.capture``; the workers run with ``--graphs``), else eager
PyTorch. Every switched request is for another model than the last, and the daemon's
residency area holds one model, so each of them copies the whole model
(pipelined). The worker ablation (active-standby, one worker set up per
task, a new process per task) runs the same alternating requests. Each
client reserves its input area when it connects (``Client.reserve_inputs``:
the workers map and page-lock it then, not in a measured request), so the
image batches are copied to the GPU straight from it (``--no-input-area``:
a new file per request, as before areas).

Run on a GPU machine from the repository root::

    python3 bench/serve_torch.py --out bench/results/serve-torch-<card>.json

(``PIPESWITCH_BIN``: the ``pipeswitch`` program, default .gpu/pipeswitch
or target/release/pipeswitch; ``PIPESWITCH_LIB``: libpipeswitch.so.)
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(HERE, "paper"))

import experiments as E  # noqa: E402  (bench/paper/experiments.py: models, inputs, stats)

MODELS = ["resnet152", "inception_v3", "bert_base"]

# The factories the worker processes import (``--models NAME=serve_models:NAME``):
# the same structures as experiments.build_skeleton, on the meta device.
FACTORIES = '''
import sys
sys.path.insert(0, %r)
import experiments as E

def _skel(name):
    return E.build_skeleton(name)[0]

def resnet152():
    return _skel("resnet152")

def inception_v3():
    return _skel("inception_v3")

def bert_base():
    return _skel("bert_base")
''' % os.path.join(HERE, "paper")


def pipeswitch_bin():
    for p in (os.environ.get("PIPESWITCH_BIN"), os.path.join(ROOT, ".gpu", "pipeswitch"),
              os.path.join(ROOT, "target", "release", "pipeswitch")):
        if p and os.access(p, os.X_OK):
            return p
    raise SystemExit("no pipeswitch program: build it (cargo build --release) or set PIPESWITCH_BIN")


def stats(values):
    s = E.summarize(values)
    return {k: s[k] for k in ("median", "p10", "p90", "mean", "n") if k in s}


class Daemon:
    """``pipeswitch serve`` with PyTorch workers, as a child process."""

    def __init__(self, store, models, factories_dir, residency, region, standbys=2, mode=None, log_path=None,
                 graphs=False, area_bytes=0, fused=True):
        self.area_bytes = area_bytes
        self.area_refusal = None
        self.dir = tempfile.mkdtemp(prefix="ps-serve-torch-")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([factories_dir, os.path.join(ROOT, "python"),
                                                           os.environ.get("PYTHONPATH", "")]))
        arena = residency + (standbys + 2) * region + (64 << 20)
        cmd = [pipeswitch_bin(), "serve", "--store", store, "--device", "0", "--arena-size", str(arena),
               "--residency-size", str(residency), "--worker-region", str(region), "--standbys", str(standbys),
               "--socket-dir", self.dir]
        if mode:
            cmd.append(mode)
        cmd += ["--worker-cmd", sys.executable, "-m", "pipeswitch.worker"] + (["--graphs"] if graphs else [])
        cmd += ([] if fused else ["--no-fused"]) + ["--models"]
        cmd += ["%s=serve_models:%s" % (m, m) for m in models]
        self.log = open(log_path or os.devnull, "ab")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=self.log)
        from pipeswitch import protocol as P
        self.path = P.socket_path(self.dir, 0)

    def client(self, want_standbys, timeout=300):
        from pipeswitch.client import Client
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.path):
            if self.proc.poll() is not None:
                raise RuntimeError("the daemon exited with %s" % self.proc.returncode)
            if time.monotonic() > deadline:
                raise RuntimeError("no socket after %d s" % timeout)
            time.sleep(0.1)
        c = Client(socket=self.path, timeout=600, input_area=self.area_bytes > 0)
        while c.stats().standbys < want_standbys:
            if time.monotonic() > deadline:
                raise RuntimeError("the workers did not come up in %d s" % timeout)
            time.sleep(0.2)
        if self.area_bytes:
            from pipeswitch import PipeSwitchError
            try:
                c.reserve_inputs(self.area_bytes)
            except PipeSwitchError as e:
                # Refused (or a daemon without areas): files per request, said in the JSON.
                self.area_refusal = str(e)
                E.log("input area of %d bytes refused: %s" % (self.area_bytes, e))
            else:
                time.sleep(0.5)  # the workers map and page-lock it (AreaAdd) before the first request
        return c

    def stop(self):
        self.proc.terminate()
        try:
            rc = self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.log.close()
        return rc


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="JSON output (default bench/results/serve-torch-<card>.json)")
    p.add_argument("--reps", type=int, default=10, help="recorded alternating rounds (default 10)")
    p.add_argument("--ablation-reps", type=int, default=2, help="rounds per ablation mode (default 2)")
    p.add_argument("--no-ablation", dest="ablation", action="store_false", help="skip the worker ablation")
    p.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    p.add_argument("--log", help="the daemons' log file")
    p.add_argument("--eager", dest="graphs", action="store_false", help="eager forwards (default: CUDA graphs)")
    p.add_argument("--no-fused", dest="fused", action="store_false",
                   help="with graphs: a switch is switch_to + a replay, in process and in the workers (default: "
                        "one replay of the fused graph, the plan's copies and the forward)")
    p.add_argument("--no-input-area", dest="input_area", action="store_false",
                   help="no input area: every request's large inputs in a new file (as before areas)")
    p.add_argument("--warmup", type=int, default=3,
                   help="unrecorded rounds through the daemon (each worker process meets each model; default 3)")
    args = p.parse_args(argv)

    E._setup_paths()
    import torch
    import pipeswitch as ps
    import pipeswitch.torch as pst

    card = torch.cuda.get_device_name(0)
    peak, overhead = ps.measure_h2d(0, 512 << 20)
    E.log("%s: H2D peak %.2f GB/s" % (card, peak))
    factories_dir = tempfile.mkdtemp(prefix="ps-serve-models-")
    with open(os.path.join(factories_dir, "serve_models.py"), "w") as f:
        f.write(FACTORIES)

    # The store: each model registered on the GPU (layer times measured there).
    name = "serve-torch-%s" % uuid.uuid4().hex[:10]
    cpu, inputs, ref, info = {}, {}, {}, {}
    sizes = {}
    for m in args.models:
        cpu[m] = E.build_model(m)
        sizes[m] = E.unique_tensor_bytes(cpu[m])[0]
    store = ps.Store.create(name, sum(sizes.values()) + len(sizes) * (256 << 20), 16)
    report = {"schema": "pipeswitch-serve-torch/1", "card": card, "h2d_peak_gbps": peak,
              "date_unix_s": int(time.time()), "models": {}, "ablation": [],
              "conditions": "PyTorch %s, random weights, fp32, batch %d (%dx%d / %dx%d images, %d tokens); "
                            "requests alternate among the models; the daemon's residency area holds one "
                            "model, two PyTorch standbys; %d recorded rounds after %d warm-up rounds; forwards %s"
                            % (torch.__version__, E.CONFIG["batch"], E.CONFIG["image"], E.CONFIG["image"],
                               E.CONFIG["inception_image"], E.CONFIG["inception_image"], E.CONFIG["seq_len"],
                               args.reps, args.warmup,
                               "replayed from CUDA graphs (Worker.capture)" if args.graphs else "eager")}
    out_path = args.out or os.path.join(ROOT, "bench", "results", "serve-torch-%s.json" % E.card_slug(card))
    report["complete"] = False

    def save():
        """Written after every part: a run cut short keeps what it measured."""
        E.write_json(out_path, report)

    try:
        with torch.no_grad():
            for m in args.models:
                gpu = cpu[m].to("cuda:0")
                inputs[m] = E.make_inputs(m, "cuda:0")
                info[m] = pst.register_module(store, m, gpu, inputs[m], device="cuda:0", hold_gpu=args.graphs)
                ref[m] = E.first_tensor(gpu(*inputs[m])).float().cpu()
                del gpu
                torch.cuda.empty_cache()
                E.log("%s registered: %.1f MB" % (m, store.model_info(m).bytes / 1e6))

            # In this process: one worker, each model in its own region.
            total = E.regions_bytes([store.model_info(m).bytes for m in args.models])
            arena = ps.Arena.create(0, total + (64 << 20), 0)
            worker = pst.Worker(0, arena=arena, store=store, bandwidth_gbps=peak)
            skel = {}
            for m in args.models:
                skel[m] = E.build_skeleton(m, cpu[m])[0]
                worker.attach(skel[m], m)
                if args.graphs:
                    # The closed loop with graphs (issue 15): the fitted cost is stored with the
                    # model, so the daemon plans with it too.
                    cal = pst.calibrate_module(worker, m, inputs[m], reps=5, graphs=True)
                    rec = cal["record"]
                    E.log("%s calibrated: %d groups, predicted %.2f ms, measured %.2f ms"
                          % (m, rec.groups, rec.predicted_ms, rec.measured_ms))
                    skel[m] = cal["captured"]
            inproc = {m: {"switch": [], "ready": []} for m in args.models}
            # The fused switch where every model has its fused graph.
            fused = args.graphs and args.fused and all(getattr(skel[m], "fused", False) for m in args.models)
            report["fused"] = fused
            report["conditions"] += ("; a switch is one replay of the fused graph (the plan's copies and the "
                                     "forward), in process and in the workers" if fused else
                                     "; a switch is switch_to + a replay of the forward")
            for r in range(args.reps + 1):
                for m in args.models:
                    t = time.perf_counter()
                    if fused:
                        out = skel[m].switch_and_run(*inputs[m])
                    else:
                        worker.switch_to(m)
                        out = skel[m](*inputs[m])
                    torch.cuda.synchronize()
                    sw = (time.perf_counter() - t) * 1e3
                    t = time.perf_counter()
                    worker.switch_to(m, resident=True)
                    skel[m](*inputs[m])
                    torch.cuda.synchronize()
                    rd = (time.perf_counter() - t) * 1e3
                    if r > 0:
                        inproc[m]["switch"].append(sw)
                        inproc[m]["ready"].append(rd)
                    else:
                        err = (E.first_tensor(out).float().cpu() - ref[m]).abs().max().item()
                        E.log("%s in process: max |diff| vs the GPU module %.3g" % (m, err))
            worker.close()
            del worker, skel, arena
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            E.log("in-process baselines done")

            host_in = {m: [("in%d" % i, x.cpu(), None, None) for i, x in enumerate(inputs[m])] for m in args.models}
            largest = max(store.model_info(m).bytes for m in args.models)
            region = 2 << 30
            # The input area: room for the largest request's inputs (as the client
            # would reserve it by itself: at least 16 MiB, a power of two).
            from pipeswitch import protocol as P
            from pipeswitch.client import AUTO_AREA_MIN
            need = max(P.area_layout([x.numel() * x.element_size() for x in inputs[m]])[1] for m in args.models)
            area_bytes = max(AUTO_AREA_MIN, 1 << max(need - 1, 0).bit_length()) if args.input_area and need else 0
            report["input_area"] = {"reserved_at_connect": area_bytes > 0, "bytes": area_bytes, "inputs_bytes": need,
                                    "refused": None}
            report["conditions"] += ("; each client reserves a %d MiB input area when it connects (inputs copied "
                                     "to the GPU from it)" % (area_bytes >> 20) if area_bytes else
                                     "; no input area (every request's inputs in a new file)")

            # Through the daemon: an area for one model, so every request switches.
            d = Daemon(name, args.models, factories_dir, largest + (1 << 20), region, 2, log_path=args.log,
                       graphs=args.graphs, area_bytes=area_bytes, fused=args.fused)
            try:
                c = d.client(2)
                lat = {m: {"switch": [], "ready": [], "activation": [], "worker": []} for m in args.models}
                for r in range(args.warmup + args.reps):
                    if r == args.warmup:  # the replacement standbys up before the recorded rounds
                        c.close()
                        c = d.client(2)
                    for m in args.models:
                        t = time.perf_counter()
                        out = c.infer(m, host_in[m])
                        sw = (time.perf_counter() - t) * 1e3
                        t = time.perf_counter()
                        c.infer(m, host_in[m])
                        rd = (time.perf_counter() - t) * 1e3
                        if r < args.warmup:
                            if r > 0:
                                continue
                            first = next(iter(out.values()))
                            got = torch.from_numpy(first.copy()).float() if hasattr(first, "copy") else None
                            if got is not None and got.shape == ref[m].shape:
                                E.log("%s through the daemon: max |diff| %.3g" % (m, (got - ref[m]).abs().max().item()))
                            continue
                        lat[m]["switch"].append(sw)
                        lat[m]["ready"].append(rd)
                        lat[m]["activation"].append(out.timing.activation_ms)
                        lat[m]["worker"].append(out.timing.worker_ms)
                st = c.stats()
                report["input_area"]["refused"] = d.area_refusal
                report["input_area"]["used"] = c.input_area_bytes > 0
                c.close()
            finally:
                rc = d.stop()
            E.log("daemon latencies done (daemon exit %s; %s)" % (rc, st))
            for m in args.models:
                b = store.model_info(m).bytes
                ds, ips = stats(lat[m]["switch"]), stats(inproc[m]["switch"])
                report["models"][m] = {
                    "bytes": b, "bytes_over_peak_ms": b / (peak * 1e6),
                    "in_process_ready_ms": stats(inproc[m]["ready"]), "in_process_switch_ms": ips,
                    "daemon_ready_ms": stats(lat[m]["ready"]), "daemon_switch_ms": ds,
                    "activation_ms": stats(lat[m]["activation"]), "worker_ms": stats(lat[m]["worker"]),
                    "daemon_overhead_ms": ds["median"] - ips["median"],
                }
            save()

            # Worker ablation.
            modes = (("active-standby", 2, None), ("single worker", 0, "--single-worker"),
                     ("process per task", 0, "--process-per-task"))
            for label, standbys, mode in modes if args.ablation else ():
                d = Daemon(name, args.models, factories_dir, largest + (1 << 20), region, standbys, mode,
                           log_path=args.log, graphs=args.graphs, area_bytes=area_bytes, fused=args.fused)
                try:
                    c = d.client(standbys if mode is None else (1 if mode == "--single-worker" else 0))
                    v = []
                    # A new process per task takes seconds a request: one recorded round, no warm-up.
                    warm, rounds = (0, 1) if mode == "--process-per-task" else (args.warmup, args.ablation_reps)
                    for r in range(warm + rounds):
                        for m in args.models:
                            t = time.perf_counter()
                            c.infer(m, host_in[m])
                            if r >= warm:
                                v.append((time.perf_counter() - t) * 1e3)
                    st = c.stats()
                    c.close()
                finally:
                    d.stop()
                report["ablation"].append({"mode": label, "switch_ms": stats(v),
                                           "workers_started": st.workers_started, "failed": st.failed,
                                           "input_area_refused": d.area_refusal})
                E.log("ablation %s: median %.1f ms" % (label, report["ablation"][-1]["switch_ms"]["median"]))
                save()
    finally:
        store.close()
        ps.Store.unlink(name)

    report["complete"] = True
    save()
    f = lambda s: "%.2f (%.2f-%.2f)" % (s["median"], s["p10"], s["p90"])  # noqa: E731
    print("| model | bytes/peak | ready, in process | ready, daemon | switch, in process | switch, daemon "
          "| daemon - in process | activation |")
    print("|---|---|---|---|---|---|---|---|")
    for m, r in report["models"].items():
        print("| %s | %.2f | %s | %s | %s | %s | %+.2f | %.3f |" % (
            m, r["bytes_over_peak_ms"], f(r["in_process_ready_ms"]), f(r["daemon_ready_ms"]),
            f(r["in_process_switch_ms"]), f(r["daemon_switch_ms"]), r["daemon_overhead_ms"],
            r["activation_ms"]["median"]))
    print()
    print("| workers | switch + first inference | processes started |")
    print("|---|---|---|")
    for a in report["ablation"]:
        print("| %s | %s | %d |" % (a["mode"], f(a["switch_ms"]), a["workers_started"]))
    print("wrote", out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
