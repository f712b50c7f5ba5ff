"""The stop of a preempted training step, on the GPU machine, without the
daemon (issue 11: the time from the daemon's Preempt to the training step
giving way is most of a preempting request's extra latency).

For each model's reference job (``pipeswitch.train``: ResNet-152,
Inception-v3, BERT-base; batch 32, SGD with momentum): the worker's own
training loop (``pipeswitch.worker``'s ``_Training`` and its watcher
thread) on one end of a socket pair, and this script as the daemon on the
other: it resumes the job, waits for the resume's first step to end, sends
a ``Preempt`` at a uniformly random moment within one step's time (so that
preemptions land in every phase of a step, unlike the fixed-rate requests
of experiment.py, whose arrivals fall in about the same phase every time),
and reads the worker's ``TrainStopped``: ``stop_ms`` (the Preempt's
decision to the step given way, measured by the worker, the figure of the
daemon's log), of which ``notice_ms`` (the decision to the watcher's
event: the socket and the GIL), and ``save_ms``. Variants, to show what
each change gives:

- ``cpu-data/5ms``: the reference data as it was (made by a CPU generator,
  copied synchronously from pageable memory) and Python's 5 ms switch
  interval;
- ``device-data/5ms``: the batch made on the GPU, the 5 ms interval;
- ``device-data/quick``: the batch made on the GPU and
  ``pipeswitch.train.SWITCH_INTERVAL_S`` while a step runs (the default).

And for the first model, preemptions that write the state back to pinned
host memory (``SAVE_HOST``): ``save_ms`` and ``TorchTrainRun.last_save``
(the preparation, the pinning at the first included; the copies' launches;
their wait; the freeing), and the resume's first step (the restore
pipelined with it). Also each model's step time and the host time of each
variant's data function. One JSON file.

    python bench/train/stop_bench.py --out $OUT [--models resnet152] [--trials 20]
"""

import argparse
import json
import os
import random
import socket
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "python"))

T0 = time.monotonic()


def log(*a):
    print("[%6.1f s]" % (time.monotonic() - T0), *a, file=sys.stderr, flush=True)


def stats(xs):
    xs = sorted(xs)
    if not xs:
        return None

    def pct(p):
        return xs[min(len(xs) - 1, max(0, int(round(p / 100.0 * (len(xs) - 1)))))]
    return {"n": len(xs), "mean": sum(xs) / len(xs), "p50": pct(50), "p90": pct(90), "p99": pct(99), "max": xs[-1]}


JOBS = {"resnet152": "resnet152_job", "inception_v3": "inception_v3_job", "bert_base": "bert_base_job",
        "tiny": "tiny_job"}  # tiny: a smoke test of this script (--device cpu works with it)


def former_data(torch, device, model, batch=32):
    """The reference data as pipeswitch.train made it before (a CPU
    generator, then a synchronous copy from pageable memory)."""
    if model == "bert_base":
        def data(i):
            g = torch.Generator(device="cpu").manual_seed(1_000_003 + int(i))
            ids = torch.randint(0, 30522, (batch, 128), generator=g)
            y = torch.randint(0, 2, (batch,), generator=g)
            return ids.to(device), y.to(device)
        return data
    shape, classes = {"inception_v3": ((3, 299, 299), 1000), "tiny": ((3, 8, 8), 10)}.get(model, ((3, 224, 224), 1000))

    def data(i):
        g = torch.Generator(device="cpu").manual_seed(int(i))
        x = torch.randn((batch,) + shape, generator=g)
        y = torch.randint(0, classes, (batch,), generator=g)
        return x.to(device, non_blocking=False), y.to(device, non_blocking=False)
    return data


class _SeenEvent(threading.Event):
    """The watcher's event, with the moment it was set."""

    set_ns = None

    def set(self):
        if self.set_ns is None:
            from pipeswitch import protocol as P

            self.set_ns = P.monotonic_ns()
        super().set()


def timed_watcher(W):
    """pipeswitch.worker's watcher, its event timed (the last one made is
    ``cls.last``): the Preempt's decision to the event splits the stop into
    the notice (the socket and the GIL) and the step's giving way."""
    class Watcher(W._Watcher):
        last = None

        def __init__(self, sock):
            super().__init__(sock)
            self.preempt = _SeenEvent()  # before any Preempt: the bench sends it later
            Watcher.last = self
    return Watcher


class Backend:
    """The worker's backend, holding one run."""

    def __init__(self, run):
        self.run = run

    def train_job(self, task):
        return self.run

    def train_released(self):
        pass


class Bench:
    def __init__(self, torch, run, model):
        from pipeswitch import protocol as P
        from pipeswitch import worker as W

        self.torch, self.run, self.model, self.P = torch, run, model, P
        self.daemon, self.sock = socket.socketpair()
        self.daemon.settimeout(60)
        self.watcher = W._Watcher = timed_watcher(W)  # the training loop makes one per task
        self.training = W._Training(self.sock, Backend(run), 1)
        self.job = P.TrainJob(model, "bench:" + model, preempt=P.PREEMPT_ABANDON, save=P.SAVE_RESIDENT)
        self.training.runner, self.training.job_id = run, 1  # the job of every task here
        self.task_id = 0
        self.iteration = 0

    def recv(self):
        got = self.P.recv(self.daemon)
        if got is None:
            raise RuntimeError("the training loop closed its socket")
        return got[0]

    def trial(self, delay_s, save):
        """Resumes the job; ``delay_s`` after its first step, a Preempt;
        the TrainStopped and the resume's first step's time."""
        P = self.P
        self.task_id += 1
        self.training.held = self.iteration  # steps run outside the loop (the step times) count
        task = P.TrainTask(self.task_id, 1, self.job, "/nonexistent", self.iteration, P.monotonic_ns())
        out = {}
        t = threading.Thread(target=lambda: out.setdefault("ok", self.training.run(task)))
        started = time.monotonic()
        t.start()
        first = None
        while True:
            m = self.recv()
            if isinstance(m, P.TrainStopped):
                t.join()
                raise RuntimeError("the job stopped before its preemption: %s" % (m,))
            if m.event == P.PROGRESS_ITERATION:
                first = time.monotonic() - started
                break
        time.sleep(delay_s)
        decided = P.monotonic_ns()
        P.send(self.daemon, P.Preempt(self.task_id, P.PREEMPT_ABANDON, save, decided))
        while True:
            m = self.recv()
            if isinstance(m, P.TrainStopped):
                break
        t.join()
        if m.reason != P.STOP_PREEMPTED:
            raise RuntimeError("the job stopped with %s" % (m,))
        self.iteration = m.iteration
        w = self.watcher.last
        seen = w.preempt.set_ns if w is not None else None
        return {"delay_ms": delay_s * 1e3, "stop_ms": m.stop_ms, "save_ms": m.save_ms,
                "notice_ms": (seen - decided) / 1e6 if seen is not None else None,
                "resume_first_step_ms": first * 1e3, "iteration": m.iteration}

    def close(self):
        from pipeswitch import protocol as P

        P.send(self.daemon, P.Shutdown())
        self.daemon.close()
        self.training.drop()
        self.sock.close()


def sync(torch, dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(torch, dev, fn, n):
    """Host ms of each call, and ms until its GPU work ended."""
    host, done = [], []
    for _ in range(n):
        sync(torch, dev)
        t = time.perf_counter()
        fn()
        host.append((time.perf_counter() - t) * 1e3)
        sync(torch, dev)
        done.append((time.perf_counter() - t) * 1e3)
    return {"host_ms": stats(host), "done_ms": stats(done)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    ap.add_argument("--models", default="resnet152,inception_v3,bert_base")
    ap.add_argument("--trials", type=int, default=20, help="preemptions per variant")
    ap.add_argument("--host-trials", type=int, default=8, help="write-back preemptions (first model)")
    ap.add_argument("--budget-s", type=float, default=150.0, help="no new model after this")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--device", default="cuda", help="cuda (the GPU machine) or cpu (a smoke test, --models tiny)")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)

    import torch

    from pipeswitch import protocol as P
    from pipeswitch import train as T

    dev = torch.device("cuda", 0) if a.device == "cuda" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    rnd = random.Random(a.seed)
    res = {"card": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu", "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
           "conditions": {"trials_per_variant": a.trials, "preempt": "abandon",
                          "delay": "uniform in [0, one step's time) after the resume's first step",
                          "python_switch_interval_s": sys.getswitchinterval(),
                          "quick_switch_interval_s": T.SWITCH_INTERVAL_S,
                          "stop_ms": "the worker's: the Preempt's decision to the step given way (abandoned "
                                     "and undone, kernels finished)"},
           "models": {}, "skipped": []}
    path = os.path.join(a.out, "train-stop.json")

    def save():
        with open(path, "w") as f:
            json.dump(res, f, indent=1)

    for mi, m in enumerate(x for x in a.models.split(",") if x):
        if time.monotonic() - T0 > a.budget_s:
            res["skipped"].append(m)
            log("budget: skipping", m)
            continue
        r = res["models"][m] = {}
        try:
            log(m, "build")
            spec = getattr(T, JOBS[m])(dev)
            run = T.TorchTrainRun(spec, dev, abandon=True)
            device_data, cpu_data = spec.data, former_data(torch, dev, m, spec.samples)
            r["batch"] = spec.samples
            never = threading.Event()
            for i in range(1, 4):
                run.step(i, never)
            r["data"] = {"device": timed(torch, dev, lambda: device_data(5), 5),
                         "cpu (former)": timed(torch, dev, lambda: cpu_data(5), 5)}
            b = Bench(torch, run, m)
            b.iteration = 3
            variants = [("cpu-data/5ms", cpu_data, None), ("device-data/5ms", device_data, None),
                        ("device-data/quick", device_data, T.SWITCH_INTERVAL_S)]
            for name, data, interval in variants:
                run.spec.data, run.switch_interval = data, interval
                steps = []
                for _ in range(4):
                    sync(torch, dev)
                    t = time.perf_counter()
                    assert run.step(b.iteration + 1, never)
                    steps.append((time.perf_counter() - t) * 1e3)
                    b.iteration += 1
                step_s = sorted(steps)[len(steps) // 2] / 1e3
                log(m, name, "step %.1f ms" % (step_s * 1e3))
                trials = [b.trial(rnd.uniform(0, step_s), P.SAVE_RESIDENT) for _ in range(a.trials)]
                r[name] = {"step_ms": stats(steps), "stop_ms": stats([x["stop_ms"] for x in trials]),
                           "notice_ms": stats([x["notice_ms"] for x in trials if x["notice_ms"] is not None]),
                           "save_ms": stats([x["save_ms"] for x in trials]), "trials": trials}
                log(m, name, "stop mean %.2f p99 %.2f ms, of which the watcher's notice %s ms" % (
                    r[name]["stop_ms"]["mean"], r[name]["stop_ms"]["p99"],
                    "%.2f" % r[name]["notice_ms"]["mean"] if r[name]["notice_ms"] else "-"))
                save()
            if mi == 0 and a.host_trials:
                run.spec.data, run.switch_interval = device_data, T.SWITCH_INTERVAL_S
                step_s = r["device-data/quick"]["step_ms"]["p50"] / 1e3
                trials = []
                for _ in range(a.host_trials + 1):
                    x = b.trial(rnd.uniform(0, step_s), P.SAVE_HOST)
                    x["last_save"] = dict(run.last_save or {})
                    trials.append(x)
                # The resume after a write-back: the next trial's first step.
                for x, nxt in zip(trials, trials[1:]):
                    x["next_resume_first_step_ms"] = nxt["resume_first_step_ms"]
                trials = trials[:-1]
                ls = [x["last_save"] for x in trials if x["last_save"]]
                r["host-save"] = {
                    "stop_ms": stats([x["stop_ms"] for x in trials]), "save_ms": stats([x["save_ms"] for x in trials]),
                    "save_ms_after_the_first": stats([x["save_ms"] for x in trials[1:]]),
                    "parts_after_the_first_ms": {k: stats([s[k] for s in ls[1:]])
                                                 for k in ("prepare_ms", "launch_ms", "copy_wait_ms", "free_ms")},
                    "bytes": ls[0]["bytes"] if ls else None, "tensors": ls[0]["tensors"] if ls else None,
                    "resume_first_step_ms": stats([x["next_resume_first_step_ms"] for x in trials]),
                    "trials": trials}
                log(m, "host save: save mean %.1f ms (after the first %.1f), resume's first step %.1f ms" % (
                    r["host-save"]["save_ms"]["mean"], (r["host-save"]["save_ms_after_the_first"] or {"mean": 0})["mean"],
                    r["host-save"]["resume_first_step_ms"]["mean"]))
            b.close()
            run.close()
            del run, spec, b
        except Exception as e:  # noqa: BLE001 - recorded
            import traceback

            r["error"] = traceback.format_exc()
            log(m, "failed:", e)
        import gc

        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        save()
    res["elapsed_s"] = time.monotonic() - T0
    save()
    for m, r in res["models"].items():
        for k, v in r.items():
            if isinstance(v, dict) and "stop_ms" in v and v["stop_ms"]:
                print("%-13s %-18s stop mean %6.2f p50 %6.2f p99 %6.2f ms  step %6.1f ms" % (
                    m, k, v["stop_ms"]["mean"], v["stop_ms"]["p50"], v["stop_ms"]["p99"],
                    (v.get("step_ms") or v.get("resume_first_step_ms") or {"p50": 0})["p50"]), file=sys.stderr)
    log("wrote", path)


if __name__ == "__main__":
    main()
