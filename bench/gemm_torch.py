#!/usr/bin/env python3
"""cuBLAS through PyTorch at the GEMM benchmark shapes: the baseline that
`pipeswitch bench gemm --torch FILE` compares our kernels against.

Times torch.nn.functional.linear(x[M,K], W[N,K], b[N]) for every shape and
dtype of bench/gemm_shapes.json (the same file src/bench_gemm.rs embeds), with
the same method as the Rust side (parameters under "method" in that file):

- inputs: `sets` copies of (x, W, b), together at least rotate_bytes (well
  over the L2 cache), rotated launch by launch so operands come from device
  memory; uniform random values in [-1, 1), never zeros;
- a check first: one call on set 0 against float64 (check_rows rows spread
  over M), ||y - ref|| / ||ref|| recorded (for fp32 this also shows whether
  TF32 was used: about 3e-4 with TF32, about 1e-6 without);
- each sample: a spin kernel (torch.cuda._sleep) on the stream, a start
  event, launches_per_sample back-to-back calls, an end event; the sample is
  kept only if the start event had not yet completed when the host finished
  enqueuing (the GPU never waited for the host, so host-side overhead is not
  timed), else it is discarded and the spin doubled;
- warm-up samples until warmup_min_samples and warmup_min_ms, then --reps
  samples; medians and spread (p10, p90, min, max) of ms per call and TFLOP/s
  (2 M N K per call; the bias add is not counted).

fp32: TF32 is OFF (torch.backends.cuda.matmul.allow_tf32 = False, matmul
precision "highest", the PyTorch default), because our fp32 kernels are plain
FFMA (no TF32); --tf32 turns it on for reference only. fp16/bf16 keep
PyTorch's defaults (fp32 accumulation; the reduced-precision split-K
reduction flags are recorded in the output).

Usage: python3 bench/gemm_torch.py --reps 50 --out torch.json
Needs only PyTorch and a CUDA GPU.
"""

import argparse
import json
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_SHAPES = os.path.join(HERE, "gemm_shapes.json")


def load_shapes(path):
    with open(path) as f:
        spec = json.load(f)
    for key in ("dtypes", "shapes", "method"):
        if key not in spec:
            raise ValueError(f"{path}: missing {key!r}")
    for s in spec["shapes"]:
        for key in ("model", "layer", "m", "n", "k"):
            if key not in s:
                raise ValueError(f"{path}: shape {s} lacks {key!r}")
    return spec


def stats(values):
    """Same definition as src/bench.rs Stats::of: median (mean of the two
    middle values for an even count), p10/p90/min/max by index
    round((n - 1) p) (half away from zero) in the sorted list."""
    s = sorted(values)
    n = len(s)
    if n == 0:
        nan = float("nan")
        return {"median": nan, "p10": nan, "p90": nan, "min": nan, "max": nan, "n": 0}
    med = s[n // 2] if n % 2 == 1 else (s[n // 2 - 1] + s[n // 2]) / 2.0

    def q(p):
        return s[int(math.floor((n - 1) * p + 0.5))]

    return {"median": med, "p10": q(0.1), "p90": q(0.9), "min": q(0.0), "max": q(1.0), "n": n}


def n_sets(method, set_bytes):
    need = -(-int(method["rotate_bytes"]) // max(set_bytes, 1))
    return max(2, min(int(method["max_sets"]), need))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=50, help="timed samples per shape and dtype (default 50)")
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help="shape list (default: bench/gemm_shapes.json)")
    ap.add_argument("--out", help="write the JSON here (default: stdout only)")
    ap.add_argument("--device", type=int, default=0, help="CUDA device index (default 0)")
    ap.add_argument("--dtypes", help="comma-separated subset of the file's dtypes (default: all)")
    ap.add_argument("--tf32", action="store_true", help="allow TF32 for fp32 (NOT like for like with our FFMA kernels)")
    args = ap.parse_args(argv)
    if args.reps < 1:
        ap.error("--reps must be at least 1")

    spec = load_shapes(args.shapes)
    method = spec["method"]
    dtypes = spec["dtypes"] if not args.dtypes else [d.strip() for d in args.dtypes.split(",")]
    for d in dtypes:
        if d not in ("f32", "f16", "bf16"):
            ap.error(f"unknown dtype {d!r} (f32, f16, bf16)")

    try:
        import torch
        import torch.nn.functional as F
    except ImportError as e:
        sys.exit(f"gemm_torch.py: PyTorch is needed ({e})")
    if not torch.cuda.is_available():
        sys.exit("gemm_torch.py: no CUDA GPU visible to PyTorch (torch.cuda.is_available() is False); "
                 "run this on the GPU machine")
    if args.device >= torch.cuda.device_count():
        sys.exit(f"gemm_torch.py: device {args.device} out of range ({torch.cuda.device_count()} GPUs)")

    dev = torch.device("cuda", args.device)
    torch.cuda.set_device(dev)
    torch.backends.cuda.matmul.allow_tf32 = bool(args.tf32)
    torch.set_float32_matmul_precision("high" if args.tf32 else "highest")
    tdt = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
    settings = {
        "allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "allow_fp16_reduced_precision_reduction": torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction,
        "allow_bf16_reduced_precision_reduction": torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction,
        "fp32_note": "TF32 off: our fp32 kernels are plain FFMA, so cuBLAS fp32 without TF32 is like for like"
        if not args.tf32 else "TF32 ON (--tf32): not like for like with our FFMA fp32 kernels",
    }
    props = torch.cuda.get_device_properties(dev)
    card = torch.cuda.get_device_name(dev)
    stream = torch.cuda.current_stream(dev)

    # Spin-kernel calibration: torch.cuda._sleep spins for a number of clock
    # cycles; measure cycles per microsecond once (after a warm-up, so the
    # clocks are up). Only used to size the spin; a sample whose spin was too
    # short is detected and discarded anyway.
    a = torch.randn(4096, 4096, device=dev)
    for _ in range(20):
        a @ a
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    cal = []
    for _ in range(5):
        e0.record()
        torch.cuda._sleep(2_000_000)
        e1.record()
        e1.synchronize()
        cal.append(2_000_000 / (e0.elapsed_time(e1) * 1e3))
    cycles_per_us = stats(cal)["median"]
    del a

    launches = int(method["launches_per_sample"])
    tol = method["check_tolerance"]
    rows = []
    print(f"{card}: torch {torch.__version__}, CUDA {torch.version.cuda}, allow_tf32 {settings['allow_tf32']}, "
          f"{args.reps} samples x {launches} calls", file=sys.stderr)
    for shp in spec["shapes"]:
        m, n, k = int(shp["m"]), int(shp["n"]), int(shp["k"])
        for dname in dtypes:
            dt = tdt[dname]
            esize = torch.tensor([], dtype=dt).element_size()
            set_bytes = (m * k + n * k + n + m * n) * esize
            sets = n_sets(method, set_bytes)
            g = torch.Generator(device=dev)
            g.manual_seed(0x5EED + m * 7 + n * 13 + k * 17)

            def rnd(*shape):
                return (torch.rand(*shape, device=dev, generator=g) * 2 - 1).to(dt)

            xs = [rnd(m, k) for _ in range(sets)]
            ws = [rnd(n, k) for _ in range(sets)]
            bs = [rnd(n) for _ in range(sets)]

            # Check on set 0 against float64.
            y = F.linear(xs[0], ws[0], bs[0])
            torch.cuda.synchronize(dev)
            ridx = torch.tensor(sorted({(r * (m - 1)) // max(int(method["check_rows"]) - 1, 1)
                                        for r in range(int(method["check_rows"]))}), device=dev)
            ref = xs[0][ridx].double() @ ws[0].double().t() + bs[0].double()
            got = y[ridx].double()
            finite = bool(torch.isfinite(y).all().item())
            rel_err = (torch.linalg.norm(got - ref) / torch.linalg.norm(ref)).item()
            check_ok = finite and rel_err <= float(tol[dname])
            del y

            spin_us = float(method["spin_start_us"])
            discarded = 0
            nxt = 0
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

            def sample():
                nonlocal nxt, spin_us, discarded
                while True:
                    torch.cuda._sleep(int(spin_us * cycles_per_us))
                    start.record(stream)
                    for _ in range(launches):
                        j = nxt % sets
                        F.linear(xs[j], ws[j], bs[j])
                        nxt += 1
                    end.record(stream)
                    gated = not start.query()
                    end.synchronize()
                    if gated:
                        return start.elapsed_time(end) / launches
                    discarded += 1
                    if discarded > int(method["max_discarded"]):
                        raise RuntimeError(f"{m}x{n}x{k} {dname}: the host could not get ahead of the GPU "
                                           f"even with a {spin_us:.0f} us spin")
                    spin_us = min(spin_us * 2, float(method["spin_max_us"]))

            warm_ms, warm_n = 0.0, 0
            while warm_n < int(method["warmup_min_samples"]) or warm_ms < float(method["warmup_min_ms"]):
                warm_ms += sample() * launches
                warm_n += 1
            ms = [sample() for _ in range(args.reps)]
            flops = 2.0 * m * n * k
            tflops = [flops / (t * 1e-3) / 1e12 for t in ms]
            row = {
                "model": shp["model"], "layer": shp["layer"], "m": m, "n": n, "k": k, "dtype": dname,
                "flops": flops, "ms": stats(ms), "tflops": stats(tflops),
                "sets": sets, "launches_per_sample": launches, "spin_us": spin_us, "discarded": discarded,
                "warmup_samples": warm_n, "rel_err": rel_err, "check_tolerance": float(tol[dname]),
                "check_ok": check_ok,
            }
            rows.append(row)
            print(f"  {m}x{n}x{k} {dname:>4}: {row['tflops']['median']:8.2f} TFLOP/s "
                  f"(p10 {row['tflops']['p10']:.2f}, p90 {row['tflops']['p90']:.2f}), "
                  f"{row['ms']['median'] * 1e3:.2f} us, rel err {rel_err:.2e}{'' if check_ok else ' CHECK FAILED'}",
                  file=sys.stderr)
            del xs, ws, bs
            torch.cuda.empty_cache()

    out = {
        "tool": "bench/gemm_torch.py",
        "op": "torch.nn.functional.linear(x[M,K], W[N,K], b[N])",
        "card": card,
        "device_index": args.device,
        "sms": props.multi_processor_count,
        "date_unix_s": int(time.time()),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "settings": settings,
        "reps": args.reps,
        "spin_cycles_per_us": cycles_per_us,
        "method": method,
        "rows": rows,
    }
    text = json.dumps(out, indent=2)
    if args.out:
        d = os.path.dirname(os.path.abspath(args.out))
        os.makedirs(d, exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        print(text)
    bad = [f"{r['m']}x{r['n']}x{r['k']} {r['dtype']}" for r in rows if not r["check_ok"]]
    if bad:
        print(f"gemm_torch.py: check failed (rel err over tolerance or non-finite) for: {', '.join(bad)}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
