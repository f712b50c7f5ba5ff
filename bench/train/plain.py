"""Plain PyTorch processes for the baselines of the training experiments
(no daemon): a dedicated training job, a dedicated inference service at a
fixed rate (both also run side by side under MPS), and cold starts (the
stop-and-start baseline: a new process per task).

    python bench/train/plain.py train --model resnet152 --seconds 10
    python bench/train/plain.py infer --model resnet152 --rate 20 --seconds 10 [--graphs]
    python bench/train/plain.py cold-infer --model resnet152
    python bench/train/plain.py cold-train --model resnet152

Each prints one JSON line on stdout.
"""

import argparse
import json
import os
import sys
import time

T0 = time.monotonic()
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "..", "python"))


def _pct(xs, p):
    xs = sorted(xs)
    if not xs:
        return None
    k = min(len(xs) - 1, max(0, int(round(p / 100.0 * (len(xs) - 1)))))
    return xs[k]


def train(model, seconds, warm=3):
    import torch

    import train_models
    from pipeswitch import train as T

    dev = torch.device("cuda", 0)
    entry = train_models.MODELS[model][1].split(":")[1]
    spec = getattr(T, entry)(dev)
    t_built = time.monotonic()
    run = T.TorchTrainRun(spec, dev, abandon=False)
    import threading

    never = threading.Event()
    it = 0
    while it < warm:
        it += run.step(it + 1, never)
    t_first = time.monotonic()
    start, n = time.monotonic(), 0
    while time.monotonic() - start < seconds:
        run.step(it + 1, never)
        it += 1
        n += 1
    el = max(time.monotonic() - start, 1e-9)
    return {"mode": "train", "model": model, "iterations": n, "seconds": el, "samples_per_s": n * spec.samples / el,
            "batch": spec.samples, "startup_s": t_first - T0, "build_s": t_built - T0}


def _graphed(torch, m, xs):
    """``run(xs)``: the forward replayed from a CUDA graph (the request's
    inputs copied into the captured ones first), as the daemon's workers
    run it with --graphs; None where the forward cannot be captured."""
    static = [x.clone() for x in xs]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(side):
            for _ in range(2):
                m(*static)
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            m(*static)
    except Exception:  # noqa: BLE001 - eager instead, said in the result
        torch.cuda.synchronize()
        return None

    def run(inputs):
        for s, x in zip(static, inputs):
            s.copy_(x, non_blocking=True)
        g.replay()
    return run


def infer(model, rate, seconds, graphs=False):
    import torch

    import train_models

    dev = torch.device("cuda", 0)
    m = getattr(train_models, model)().to(dev)
    xs = [x.to(dev) for x in train_models.example(model)]
    with torch.inference_mode():
        for _ in range(3):
            m(*xs)
        torch.cuda.synchronize()
        run = _graphed(torch, m, xs) if graphs else None
        graphed = run is not None
        if run is None:
            def run(inputs):
                m(*inputs)
        for _ in range(2):
            run(xs)
        torch.cuda.synchronize()
        lat = []
        start = time.monotonic()
        k = 0
        while True:
            due = start + k / rate
            now = time.monotonic()
            if due - start > seconds:
                break
            if due > now:
                time.sleep(due - now)
            run(xs)
            torch.cuda.synchronize()
            lat.append((time.monotonic() - due) * 1e3)
            k += 1
    return {"mode": "infer", "model": model, "rate": rate, "requests": len(lat), "graphs": graphed,
            "mean_ms": sum(lat) / len(lat), "p99_ms": _pct(lat, 99), "p50_ms": _pct(lat, 50)}


def cold_infer(model):
    """Process start to the first result: what a stop-and-start switch to
    inference costs (the start of this interpreter is measured by the
    caller)."""
    import torch

    import train_models

    t_import = time.monotonic()
    dev = torch.device("cuda", 0)
    torch.cuda.init()
    torch.zeros(1, device=dev)
    t_ctx = time.monotonic()
    m = getattr(train_models, model)().to(dev)
    torch.cuda.synchronize()
    t_model = time.monotonic()
    xs = [x.to(dev) for x in train_models.example(model)]
    with torch.inference_mode():
        m(*xs)
    torch.cuda.synchronize()
    t_done = time.monotonic()
    return {"mode": "cold-infer", "model": model, "import_s": t_import - T0, "context_s": t_ctx - t_import,
            "model_s": t_model - t_ctx, "first_run_s": t_done - t_model, "in_process_s": t_done - T0}


def cold_train(model):
    r = train(model, 0.0, warm=1)
    r["mode"] = "cold-train"
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["train", "infer", "cold-infer", "cold-train"])
    ap.add_argument("--model", required=True)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=20.0)
    ap.add_argument("--graphs", action="store_true", help="infer: replay the forward from a CUDA graph")
    a = ap.parse_args()
    if a.mode == "train":
        r = train(a.model, a.seconds)
    elif a.mode == "infer":
        r = infer(a.model, a.rate, a.seconds, a.graphs)
    elif a.mode == "cold-infer":
        r = cold_infer(a.model)
    else:
        r = cold_train(a.model)
    print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
