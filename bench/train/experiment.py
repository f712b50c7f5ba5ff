"""Training and inference sharing one GPU (issue 11), on the GPU machine.

For each model (ResNet-152, Inception-v3, BERT-base): an inference service
of the model (batch 1, requests at a fixed rate, open loop) and a training
job of the same model (batch 32, SGD with momentum, synthetic data), under

- PipeSwitch, inference first: requests preempt training at once (the step
  in flight abandoned; the state stays on the GPU, which has room, and for
  the first model also a run that writes it back to pinned host memory);
  training resumes after an idle time;
- PipeSwitch, time share: the task switched every C seconds (training gets
  half of every cycle under load), for each cycle C;
- a dedicated GPU for each (plain PyTorch processes, one at a time);
- NVIDIA MPS (the same two plain processes side by side);
- stop-and-start (a new process per switch): the cold start of an
  inference process and of a training process, measured; the cycles'
  figures are derived from them (stated in the JSON).

Figures: inference latency (mean, p99) from each request's scheduled
arrival, training throughput (samples/s), GPU utilisation (nvidia-smi
sampled every 100 ms), preemption latency split into stop (waiting for
training to stop and save), switch (decision to first kernel) and run, and
a Perfetto trace (Chrome JSON) of one preempted request. Durations are
short so that the whole run fits 8 minutes; they are in the JSON.

    python bench/train/experiment.py --bin .gpu/pipeswitch --out $OUT
"""

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "python"))

T0 = time.monotonic()


def log(*a):
    print("[%6.1f s]" % (time.monotonic() - T0), *a, file=sys.stderr, flush=True)


def pct(xs, p):
    xs = sorted(xs)
    if not xs:
        return None
    k = min(len(xs) - 1, max(0, int(round(p / 100.0 * (len(xs) - 1)))))
    return xs[k]


def mean(xs):
    return sum(xs) / len(xs) if xs else None


class Util:
    """GPU utilisation sampled by nvidia-smi every 100 ms."""

    def __enter__(self):
        self.p = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                   "-lms", "100"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.samples = []
        self.t = threading.Thread(target=self._read, daemon=True)
        self.t.start()
        return self

    def _read(self):
        for line in self.p.stdout:
            try:
                self.samples.append(float(line.strip()))
            except ValueError:
                pass

    def __exit__(self, *e):
        self.p.terminate()
        self.p.wait()
        self.t.join(2)

    def mean(self):
        return mean(self.samples)


class Load:
    """Requests for ``model`` at ``rate`` per second for ``seconds``, open
    loop (a pool of clients; latency from each request's due time)."""

    def __init__(self, path, model, inputs, rate, seconds, clients=8):
        self.path, self.model, self.inputs = path, model, inputs
        self.rate, self.seconds, self.clients = rate, seconds, clients
        self.results = []
        self.errors = []
        self.lock = threading.Lock()

    def run(self):
        from pipeswitch.client import Client

        start = time.monotonic() + 0.05
        n = int(self.seconds * self.rate)
        next_k = [0]

        def worker():
            with Client(socket=self.path, timeout=120) as c:
                while True:
                    with self.lock:
                        k = next_k[0]
                        next_k[0] += 1
                    if k >= n:
                        return
                    due = start + k / self.rate
                    now = time.monotonic()
                    if due > now:
                        time.sleep(due - now)
                    try:
                        out = c.infer(self.model, self.inputs)
                        done = time.monotonic()
                        t = out.timing
                        with self.lock:
                            self.results.append({"due": due - start, "latency_ms": (done - due) * 1e3,
                                                 "queued_ms": t.queued_ms, "activation_ms": t.activation_ms,
                                                 "worker_ms": t.worker_ms, "total_ms": t.total_ms})
                    except Exception as e:  # noqa: BLE001 - counted
                        with self.lock:
                            self.errors.append(str(e))

        ts = [threading.Thread(target=worker) for _ in range(self.clients)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        return self

    def summary(self):
        lat = [r["latency_ms"] for r in self.results]
        return {"requests": len(self.results), "errors": len(self.errors), "error_examples": self.errors[:3],
                "rate_per_s": self.rate, "mean_ms": mean(lat), "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99),
                "max_ms": max(lat) if lat else None,
                "mean_queued_ms": mean([r["queued_ms"] for r in self.results]),
                "mean_activation_ms": mean([r["activation_ms"] for r in self.results])}


STOP_RE = re.compile(r"training job (\d+) stopped at iteration (\d+): stop ([0-9.]+) ms, save ([0-9.]+) ms")


class Daemon:
    def __init__(self, binary, store, models, log_path, graphs=True):
        self.dir = tempfile.mkdtemp(prefix="ps-train-")
        self.path = os.path.join(self.dir, "gpu0.sock")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, os.path.join(ROOT, "python"),
                                                           os.environ.get("PYTHONPATH", "")]),
                   PIPESWITCH_LOG="info", NO_COLOR="1")
        specs = ["%s=%s" % (m, f) for m, f in models.items()]
        self.log_path = log_path
        self.logf = open(log_path, "a")
        self.p = subprocess.Popen([binary, "serve", "--store", store, "--device", "0", "--arena-size", "6G",
                                   "--worker-region", "64M", "--standbys", "2", "--socket-dir", self.dir,
                                   "--worker-cmd", sys.executable, "-m", "pipeswitch.worker",
                                   *(["--graphs"] if graphs else []), "--models", *specs],
                                  env=env, stdout=self.logf, stderr=subprocess.STDOUT)

    def wait_ready(self, standbys=2, timeout=150):
        from pipeswitch.client import Client

        deadline = time.monotonic() + timeout
        while not os.path.exists(self.path):
            if self.p.poll() is not None:
                raise RuntimeError("the daemon exited with %s" % self.p.returncode)
            if time.monotonic() > deadline:
                raise RuntimeError("no daemon socket")
            time.sleep(0.1)
        with Client(socket=self.path, timeout=30) as c:
            while c.stats().standbys < standbys:
                if time.monotonic() > deadline:
                    raise RuntimeError("workers never became standbys: %s" % c.stats())
                time.sleep(0.2)

    def stops(self):
        with open(self.log_path) as f:
            return [(int(m.group(2)), float(m.group(3)), float(m.group(4))) for m in STOP_RE.finditer(f.read())]

    def close(self):
        self.p.send_signal(signal.SIGTERM)
        try:
            self.p.wait(30)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
        self.logf.close()


def job_run(path, entry, name, policy, cycle_s, model, inputs, rate, seconds, idle_ms, save="resident", warm_iters=3,
            standbys=2):
    """One PipeSwitch run: a training job and requests at ``rate`` for
    ``seconds``; the job is cancelled after. The requests start once the
    job has run ``warm_iters`` iterations and the daemon has ``standbys``
    standby workers again: the job takes a standby, and the worker the
    daemon starts in its place loads the GPU for seconds (its context,
    the store's registration, PyTorch's start; the fifth H100 run's stops
    were 30-120 ms while two workers started, 5-10 ms after)."""
    from pipeswitch.client import Client

    with Client(socket=path, timeout=120) as c:
        st = c.train(name, entry, preempt="abandon", save=save, policy=policy, share=0.5,
                     period_ms=int(cycle_s * 1000) if cycle_s else 1000, idle_ms=idle_ms)
        job = st.job_id
        t = time.monotonic()
        while True:
            st = c.train_status(job)
            if st.state_name in ("failed", "cancelled", "finished"):
                raise RuntimeError("training job %s: %s" % (st.state_name, st.message))
            if st.iteration >= warm_iters and c.stats().standbys >= standbys:
                break
            if time.monotonic() - t > 150:
                raise RuntimeError("training never reached iteration %d with %d standbys: %s, %s"
                                   % (warm_iters, standbys, st, c.stats()))
            time.sleep(0.05)
        before = c.train_status(job)
        t_start = time.monotonic()
        with Util() as u:
            load = Load(path, model, inputs, rate, seconds).run() if rate > 0 else time.sleep(seconds)
            after = c.train_status(job)
        el = time.monotonic() - t_start
        c.train_status(job, cancel=True)
        t = time.monotonic()
        while c.train_status(job).state_name != "cancelled" and time.monotonic() - t < 30:
            time.sleep(0.05)
    return load, before, after, el, u.mean()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(ROOT, ".gpu", "pipeswitch"))
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    ap.add_argument("--models", default="resnet152,inception_v3,bert_base")
    ap.add_argument("--cycles", default="1,5")
    ap.add_argument("--long-cycle", type=float, default=30.0, help="also for the first model only (0: none)")
    ap.add_argument("--seconds", type=float, default=6.0, help="length of each measured run")
    ap.add_argument("--rate", type=float, default=5.0, help="requests per second")
    ap.add_argument("--idle-ms", type=int, default=20)
    ap.add_argument("--warm-iters", type=int, default=20,
                    help="training iterations a job completes before the requests start (default 20: its first "
                         "iterations are slow, and so are their stops; the paper measures the steady state)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop starting new parts after this")
    ap.add_argument("--no-graphs", dest="graphs", action="store_false",
                    help="the inference workers run eager forwards (default: --graphs, forwards replayed from "
                         "CUDA graphs, for the idle-GPU baseline and the shared runs alike)")
    ap.add_argument("--skip", default="",
                    help="parts left out, comma-separated: baselines (dedicated, cold starts), host-save, cycles, mps")
    a = ap.parse_args()
    skip = {x for x in a.skip.split(",") if x}
    unknown = skip - {"baselines", "host-save", "cycles", "mps"}
    if unknown:
        ap.error("--skip: unknown parts %s" % ", ".join(sorted(unknown)))
    os.makedirs(a.out, exist_ok=True)

    import torch

    import pipeswitch
    import train_models
    from pipeswitch.client import Client
    from pipeswitch.torch import register_module

    card = torch.cuda.get_device_name(0)
    models = [m for m in a.models.split(",") if m]
    cycles = [float(c) for c in a.cycles.split(",") if c]
    res = {"card": card, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
           "conditions": {"inference_batch": 1, "training_batch": 32, "rate_per_s": a.rate,
                          "run_seconds": a.seconds, "cycles_s": cycles,
                          "long_cycle_s": a.long_cycle, "long_cycle_models": models[:1],
                          "time_share": 0.5, "idle_ms": a.idle_ms, "preempt": "abandon",
                          "warm_iterations": a.warm_iters,
                          "requests_start": "after the job's warm iterations, once the daemon has its 2 standby "
                                            "workers again (a worker that starts loads the GPU)",
                          "save": "resident (the H100 has room); one run with the state written back to "
                                  "pinned host memory for the first model",
                          "training": "SGD momentum 0.9, lr 0.01, synthetic data made on the GPU "
                                      "(pipeswitch.train), random weights",
                          "inference_worker": "python -m pipeswitch.worker %s" % (
                              "--graphs (forwards replayed from CUDA graphs)" if a.graphs else "(eager forwards)"),
                          "dedicated_inference": "plain.py infer%s" % (" --graphs (a CUDA graph per model)" if a.graphs
                                                                       else " (eager)"),
                          "left_out": sorted(skip),
                          "shortened": "runs of %.0f s (the 30 s cycle: one cycle, first model only) "
                                       "to fit the 8-minute budget of one GPU session" % a.seconds},
           "models": {}, "skipped": [], "notes": []}
    out_json = os.path.join(a.out, "train-experiments.json")

    def over(what):
        if time.monotonic() - T0 > a.budget_s:
            res["skipped"].append(what)
            log("budget: skipping", what)
            return True
        return False

    def save():
        with open(out_json, "w") as f:
            json.dump(res, f, indent=1)

    # --- baselines without the daemon: dedicated, MPS, cold starts -------
    plain = os.path.join(HERE, "plain.py")
    graphs = ["--graphs"] if a.graphs else []  # the dedicated inference as the workers run it

    def plain_run(*args, env=None, timeout=120):
        p = subprocess.run([sys.executable, plain, *args], capture_output=True, text=True, timeout=timeout, env=env)
        if p.returncode != 0:
            raise RuntimeError("plain.py %s: %s" % (" ".join(args), p.stderr[-800:]))
        return json.loads(p.stdout.strip().splitlines()[-1])

    for m in models:
        r = res["models"].setdefault(m, {})
        if "baselines" in skip or over("%s baselines" % m):
            continue
        try:
            log(m, "dedicated training")
            with Util() as u:
                r["dedicated_train"] = plain_run("train", "--model", m, "--seconds", str(a.seconds / 2))
            r["dedicated_train"]["gpu_util"] = u.mean()
            log(m, "dedicated inference")
            with Util() as u:
                r["dedicated_infer"] = plain_run("infer", "--model", m, "--rate", str(a.rate), "--seconds",
                                                 str(a.seconds / 2), *graphs)
            r["dedicated_infer"]["gpu_util"] = u.mean()
            log(m, "cold starts (stop-and-start)")
            t = time.monotonic()
            ci = plain_run("cold-infer", "--model", m)
            ci["wall_s"] = time.monotonic() - t
            # The dedicated training process's start to its first iteration
            # (measured from the interpreter's start) is a training restart.
            ct = {"wall_s": r["dedicated_train"]["startup_s"], "what": "dedicated_train.startup_s"}
            r["stop_and_start"] = {"cold_infer": ci, "cold_train": ct,
                                   "request_latency_ms": ci["wall_s"] * 1e3,
                                   "note": "a request that arrives while training waits for a new inference "
                                           "process (wall time from spawn to its first result); training "
                                           "restarts cost cold_train.wall_s each cycle"}
        except Exception as e:  # noqa: BLE001 - recorded
            r["baseline_error"] = str(e)
            log(m, "baseline failed:", e)
        save()

    # --- PipeSwitch ----------------------------------------------------------
    def run_mps():
        # MPS: both plain processes side by side.
        if "mps" in skip:
            return
        mps_dir = tempfile.mkdtemp(prefix="ps-mps-")
        menv = dict(os.environ, CUDA_MPS_PIPE_DIRECTORY=mps_dir, CUDA_MPS_LOG_DIRECTORY=mps_dir)
        mps = subprocess.run(["nvidia-cuda-mps-control", "-d"], env=menv, capture_output=True, text=True)
        if mps.returncode != 0:
            res["notes"].append("MPS did not start: %s" % (mps.stderr or mps.stdout))
        else:
            try:
                for m in models:
                    if over("%s MPS" % m):
                        continue
                    log(m, "MPS")
                    try:
                        with Util() as u:
                            pt = subprocess.Popen([sys.executable, plain, "train", "--model", m, "--seconds",
                                                   str(a.seconds)], env=menv, stdout=subprocess.PIPE,
                                                  stderr=subprocess.PIPE, text=True)
                            time.sleep(4)  # its model built and warm before the requests start
                            pi = plain_run("infer", "--model", m, "--rate", str(a.rate), "--seconds",
                                           str(a.seconds / 2), *graphs, env=menv)
                            o, e = pt.communicate(timeout=120)
                        if pt.returncode != 0:
                            raise RuntimeError(e[-800:])
                        res["models"][m]["mps"] = {"infer": pi, "train": json.loads(o.strip().splitlines()[-1]),
                                                   "gpu_util": u.mean()}
                    except Exception as e:  # noqa: BLE001 - recorded
                        res["models"][m]["mps_error"] = str(e)
                    save()
            finally:
                subprocess.run(["nvidia-cuda-mps-control"], input="quit\n", env=menv, text=True, capture_output=True)
                time.sleep(1)


    def derive():
        # Derived figures: shares of the dedicated GPU, stop-and-start cycles.
        for m, r in res["models"].items():
            ded = r.get("dedicated_train", {}).get("samples_per_s")
            if not ded:
                continue
            for cyc, x in r.get("pipeswitch_cycles", {}).items():
                x["train_vs_dedicated_share"] = x["train_samples_per_s"] / (0.5 * ded)
            ss = r.get("stop_and_start")
            if ss:
                restart = ss["cold_train"]["wall_s"]
                ss["derived_cycles"] = {("%g" % c): {"train_samples_per_s": ded * max(0.0, 0.5 * c - restart) / c,
                                                     "train_vs_dedicated_share": max(0.0, 0.5 * c - restart) / (0.5 * c)}
                                        for c in cycles + [a.long_cycle] if c}

    if over("PipeSwitch runs"):
        run_mps()
        derive()
        save()
        return
    store_name = "train-bench-%s" % uuid.uuid4().hex[:8]
    store = pipeswitch.Store.create(store_name, 2 << 30)
    factories = {m: train_models.MODELS[m][0] for m in models}
    inputs = {}
    daemon = None
    try:
        for m in models:
            log(m, "register")
            mod = getattr(train_models, m)()
            ex = train_models.example(m)
            register_module(store, m, mod, ex, device="cuda:0")
            inputs[m] = {("x%d" % i): t.numpy() for i, t in enumerate(ex)}
            del mod
        torch.cuda.empty_cache()
        daemon = Daemon(a.bin, store_name, factories, os.path.join(a.out, "train-daemon.log"), a.graphs)
        daemon.wait_ready()
        log("daemon ready")
        for mi, m in enumerate(models):
            r = res["models"][m]
            entry = train_models.MODELS[m][1]
            # The same request on an idle GPU: the first a pipelined switch,
            # the next ones on a resident model.
            if over("%s PipeSwitch" % m):
                continue
            try:
                with Client(socket=daemon.path, timeout=120) as c:
                    idle = []
                    for _ in range(6):
                        t = time.monotonic()
                        o = c.infer(m, inputs[m])
                        idle.append({"latency_ms": (time.monotonic() - t) * 1e3, "activation_ms": o.timing.activation_ms,
                                     "worker_ms": o.timing.worker_ms})
                        time.sleep(0.05)
                r["idle_gpu"] = {"first_switch": idle[0], "resident": idle[1:],
                                 "resident_mean_ms": mean([x["latency_ms"] for x in idle[1:]])}
                log(m, "inference first")
                n0 = len(daemon.stops())
                load, b, e, el, util = job_run(daemon.path, entry, "%s-train" % m, "inference-first", 0, m,
                                               inputs[m], a.rate, a.seconds, a.idle_ms, warm_iters=a.warm_iters)
                batch = r.get("dedicated_train", {}).get("batch", 32)
                stops = daemon.stops()[n0:]
                r["pipeswitch_inference_first"] = {
                    "infer": load.summary(), "train_samples_per_s": (e.iteration - b.iteration) * batch / el,
                    "preemptions": e.preemptions - b.preemptions, "gpu_util": util,
                    "stop_ms_mean": mean([s[1] for s in stops]), "save_ms_mean": mean([s[2] for s in stops]),
                    "stop_ms_p99": pct([s[1] for s in stops], 99), "save_ms_p99": pct([s[2] for s in stops], 99)}
                # Preemption latency split, and a trace of one request.
                pre = [x for x in load.results if x["queued_ms"] > 0.5]
                if pre:
                    pre.sort(key=lambda x: x["latency_ms"])
                    one = pre[len(pre) // 2]
                    run_ms = max(0.0, one["total_ms"] - one["queued_ms"] - one["activation_ms"])
                    r["preemption_split_ms"] = {
                        "requests_that_preempted": len(pre),
                        "stop_mean": mean([x["queued_ms"] for x in pre]),
                        "switch_mean": mean([x["activation_ms"] for x in pre]),
                        "run_mean": mean([max(0.0, x["total_ms"] - x["queued_ms"] - x["activation_ms"]) for x in pre]),
                        "total_mean": mean([x["total_ms"] for x in pre]),
                        "idle_gpu_resident_mean": r["idle_gpu"]["resident_mean_ms"],
                        "note": "stop: queued in the daemon while training stops and writes its state back; "
                                "switch: decision to the worker's first kernel; run: the rest"}
                    if mi == 0:
                        ev = [
                            {"name": "training: stop + write back", "ph": "X", "ts": 0, "dur": one["queued_ms"] * 1e3,
                             "pid": 1, "tid": 1, "args": {"stop_ms_mean": r["pipeswitch_inference_first"]["stop_ms_mean"],
                                                          "save_ms_mean": r["pipeswitch_inference_first"]["save_ms_mean"]}},
                            {"name": "switch (decision to first kernel)", "ph": "X", "ts": one["queued_ms"] * 1e3,
                             "dur": one["activation_ms"] * 1e3, "pid": 1, "tid": 2},
                            {"name": "run", "ph": "X", "ts": (one["queued_ms"] + one["activation_ms"]) * 1e3,
                             "dur": run_ms * 1e3, "pid": 1, "tid": 2},
                            {"name": "thread_name", "ph": "M", "pid": 1, "tid": 1, "args": {"name": "training worker"}},
                            {"name": "thread_name", "ph": "M", "pid": 1, "tid": 2, "args": {"name": "inference worker"}},
                        ]
                        with open(os.path.join(a.out, "train-preemption-trace.json"), "w") as f:
                            json.dump({"traceEvents": ev, "displayTimeUnit": "ms",
                                       "otherData": {"model": m, "card": card}}, f)
                save()
                if mi == 0 and "host-save" not in skip and not over("%s inference first, host save" % m):
                    log(m, "inference first, state written back to host memory")
                    n0 = len(daemon.stops())
                    load, b, e, el, util = job_run(daemon.path, entry, "%s-train" % m, "inference-first", 0, m,
                                                   inputs[m], a.rate, a.seconds / 2, a.idle_ms, save="host",
                                                   warm_iters=a.warm_iters)
                    stops = daemon.stops()[n0:]
                    r["pipeswitch_inference_first_host_save"] = {
                        "seconds": a.seconds / 2, "infer": load.summary(),
                        "train_samples_per_s": (e.iteration - b.iteration) * batch / el,
                        "preemptions": e.preemptions - b.preemptions, "gpu_util": util,
                        "stop_ms_mean": mean([s[1] for s in stops]), "save_ms_mean": mean([s[2] for s in stops])}
                    save()
            except Exception as e:  # noqa: BLE001 - recorded
                r["pipeswitch_error"] = repr(e)
                log(m, "PipeSwitch run failed:", e)
                save()
        # The time-share cycles, after every model's inference-first run
        # (the figures the budget must not cut first).
        for mi, m in enumerate([] if "cycles" in skip else models):
            r = res["models"][m]
            entry = train_models.MODELS[m][1]
            batch = r.get("dedicated_train", {}).get("batch", 32)
            try:
                for cyc in cycles + ([a.long_cycle] if mi == 0 and a.long_cycle else []):
                    if over("%s cycle %g s" % (m, cyc)):
                        continue
                    # One cycle for the long one (the 8-minute budget), two for the others.
                    secs = cyc if cyc >= 10 else max(a.seconds, 2 * cyc)
                    log(m, "time share, cycle %g s, %g s" % (cyc, secs))
                    load, b, e, el, util = job_run(daemon.path, entry, "%s-train" % m, "time-share", cyc, m,
                                                   inputs[m], a.rate, secs, a.idle_ms, warm_iters=a.warm_iters)
                    r.setdefault("pipeswitch_cycles", {})["%g" % cyc] = {
                        "seconds": secs, "infer": load.summary(),
                        "train_samples_per_s": (e.iteration - b.iteration) * batch / el,
                        "preemptions": e.preemptions - b.preemptions, "gpu_util": util}
                    save()
            except Exception as e:  # noqa: BLE001 - recorded
                r["pipeswitch_cycles_error"] = repr(e)
                log(m, "time-share run failed:", e)
                save()
        with Client(socket=daemon.path, timeout=30) as c:
            s = c.stats()
            res["daemon_stats"] = {k: getattr(s, k) for k in ("requests", "failed", "hits", "misses", "workers",
                                                              "workers_started", "workers_lost")}
    finally:
        if daemon is not None:
            daemon.close()
        store.close()
        pipeswitch.Store.unlink(store_name)
    run_mps()
    derive()
    res["elapsed_s"] = time.monotonic() - T0
    save()
    for line in table(res):
        print(line, file=sys.stderr)
    log("wrote", out_json)


def table(res):
    """A markdown table of the run (for the README)."""
    def f(v, fmt="%.1f"):
        return "-" if v is None else fmt % v

    rows = ["| model | system | inference mean / p99 (ms) | training (samples/s) | GPU util (%) |",
            "| --- | --- | --- | --- | --- |"]
    for m, r in res["models"].items():
        if "dedicated_infer" in r:
            rows.append("| %s | dedicated GPU | %s / %s | %s | %s / %s |" % (
                m, f(r["dedicated_infer"]["mean_ms"]), f(r["dedicated_infer"]["p99_ms"]),
                f(r.get("dedicated_train", {}).get("samples_per_s")),
                f(r.get("dedicated_train", {}).get("gpu_util"), "%.0f"), f(r["dedicated_infer"].get("gpu_util"), "%.0f")))
        x = r.get("pipeswitch_inference_first")
        if x:
            rows.append("| %s | PipeSwitch, inference first | %s / %s | %s | %s |" % (
                m, f(x["infer"]["mean_ms"]), f(x["infer"]["p99_ms"]), f(x["train_samples_per_s"]),
                f(x["gpu_util"], "%.0f")))
        for c, x in r.get("pipeswitch_cycles", {}).items():
            rows.append("| %s | PipeSwitch, cycle %s s | %s / %s | %s (%s of half) | %s |" % (
                m, c, f(x["infer"]["mean_ms"]), f(x["infer"]["p99_ms"]), f(x["train_samples_per_s"]),
                f(100 * x.get("train_vs_dedicated_share", 0), "%.0f%%"), f(x["gpu_util"], "%.0f")))
        x = r.get("mps")
        if x:
            rows.append("| %s | MPS | %s / %s | %s | %s |" % (
                m, f(x["infer"]["mean_ms"]), f(x["infer"]["p99_ms"]), f(x["train"]["samples_per_s"]),
                f(x["gpu_util"], "%.0f")))
        x = r.get("stop_and_start")
        if x:
            rows.append("| %s | stop-and-start | %s (cold start) | restart %.1f s | - |" % (
                m, f(x["request_latency_ms"]), x["cold_train"]["wall_s"]))
        x = r.get("preemption_split_ms")
        if x:
            rows.append("| %s | preemption split (ms) | stop %s, switch %s, run %s; idle GPU %s | | |" % (
                m, f(x["stop_mean"], "%.2f"), f(x["switch_mean"], "%.2f"), f(x["run_mean"], "%.2f"),
                f(x["idle_gpu_resident_mean"], "%.2f")))
    return rows


if __name__ == "__main__":
    main()
