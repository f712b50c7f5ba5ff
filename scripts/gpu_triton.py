#!/usr/bin/env python3
"""The Triton backend on the GPU machine (run by scripts/gpu-triton.sh).

One tritonserver serves the three reference models from one store through
libtriton_pipeswitch.so; a client (standard library only: HTTP and system
shared memory for the tensors, as Triton's own clients do) alternates its
requests among them and measures, per request, the client's wall time:

- "switching": the residency region holds about one model, so most requests
  switch their model in (the response says which did: pipeswitch_switched);
- "resident": the region holds all three; every request after the first
  finds its model resident;
- "unload_load": Triton's own answer, explicit model control: before each
  request the previous model is unloaded and the next one loaded through
  the repository API (timed with the request).

`gpu_triton.py --table triton_gpu.json` prints the README's table.

Outputs are compared bit for bit with the built-in worker's outputs for the
same inputs (triton_fixture). A soak of thousands of alternating requests
samples GPU memory (nvidia-smi) and checks that it stays flat. Writes
triton_gpu.json and the server logs under --out.

With --cpu it runs the same client against the backend's cpu-reference
executor and triton_fixture's tiny models (no GPU): a check of this script.
"""

import argparse
import http.client
import json
import mmap
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time


def log(msg):
    print(f"[gpu_triton {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def pct(values, q):
    v = sorted(values)
    if not v:
        return None
    k = min(len(v) - 1, max(0, int(round(q / 100.0 * (len(v) - 1)))))
    return v[k]


def summary(ms):
    if not ms:
        return {"n": 0}
    return {
        "n": len(ms),
        "median_ms": statistics.median(ms),
        "p99_ms": pct(ms, 99),
        "mean_ms": statistics.fmean(ms),
        "min_ms": min(ms),
        "max_ms": max(ms),
    }


def gpu_memory_mib():
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
            capture_output=True, text=True, timeout=20,
        ).stdout.strip()
        return float(out.splitlines()[0])
    except Exception:
        return None


class Server:
    def __init__(self, binary, repo, backends, log_path, backend_config, load=()):
        self.port = free_port()
        self.sent = {}
        self.log_path = log_path
        self.logf = open(log_path, "w")
        cmd = [
            binary, f"--model-repository={repo}", f"--backend-directory={backends}",
            "--allow-grpc=false", "--allow-metrics=false", "--exit-on-error=false",
            "--model-control-mode=explicit", f"--http-port={self.port}", "--log-verbose=0",
        ] + [f"--backend-config=pipeswitch,{k}={v}" for k, v in backend_config.items()]
        self.proc = subprocess.Popen(cmd, stdout=self.logf, stderr=subprocess.STDOUT)
        t0 = time.time()
        while True:
            try:
                if self.request("GET", "/v2/health/live")[0] == 200:
                    break
            except OSError:
                pass
            if self.proc.poll() is not None or time.time() - t0 > 60:
                raise RuntimeError(f"tritonserver did not start; see {log_path}")
            time.sleep(0.05)
        self.start_s = time.time() - t0
        for m in load:
            st, body = self.post(f"/v2/repository/models/{m}/load", {})
            if st != 200:
                raise RuntimeError(f"loading {m}: {st} {body}")

    def conn(self):
        if not hasattr(self, "_conn") or self._conn is None:
            self._conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        return self._conn

    def request(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        for attempt in range(2):
            c = self.conn()
            try:
                c.request(method, path, body=data, headers={"Content-Type": "application/json"})
                r = c.getresponse()
                raw = r.read()
                try:
                    return r.status, json.loads(raw) if raw else None
                except ValueError:
                    return r.status, raw.decode(errors="replace")
            except (http.client.HTTPException, OSError):
                self._conn = None
                if attempt == 1:
                    raise
        raise RuntimeError("unreachable")

    def post(self, path, body):
        return self.request("POST", path, body)

    def stop(self):
        # An open keep-alive connection would hold the server's exit for its
        # whole exit timeout.
        if getattr(self, "_conn", None) is not None:
            self._conn.close()
            self._conn = None
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.logf.close()


class Tensors:
    """The fixture's inputs and expected outputs, in system shared memory."""

    def __init__(self, manifest, tag):
        self.models = {}
        self.files = []
        for m in manifest["models"]:
            name = m["name"]
            entry = {"inputs": [], "outputs": []}
            for kind in ("inputs", "outputs"):
                off = 0
                specs = []
                blobs = []
                for t in m[kind]:
                    data = open(t["file"], "rb").read()
                    specs.append(dict(t, offset=off, size=len(data)))
                    blobs.append(data)
                    off += (len(data) + 63) // 64 * 64
                key = f"/ps-triton-{tag}-{name}-{kind}"
                path = "/dev/shm" + key
                with open(path, "wb") as f:
                    f.truncate(max(off, 64))
                    if kind == "inputs":
                        for s, d in zip(specs, blobs):
                            f.seek(s["offset"])
                            f.write(d)
                self.files.append(path)
                fd = os.open(path, os.O_RDWR)
                mm = mmap.mmap(fd, max(off, 64))
                os.close(fd)
                entry[kind] = specs
                entry[kind + "_region"] = f"{name}-{kind}"
                entry[kind + "_key"] = key
                entry[kind + "_size"] = max(off, 64)
                entry[kind + "_map"] = mm
                if kind == "outputs":
                    entry["expected"] = blobs
            self.models[name] = entry

    def register(self, server):
        for name, e in self.models.items():
            for kind in ("inputs", "outputs"):
                st, body = server.post(
                    f"/v2/systemsharedmemory/region/{e[kind + '_region']}/register",
                    {"key": e[kind + "_key"], "offset": 0, "byte_size": e[kind + "_size"]},
                )
                if st != 200:
                    raise RuntimeError(f"registering {kind} of {name}: {st} {body}")

    def body(self, name):
        e = self.models[name]
        shm = lambda region, s: {"shared_memory_region": region, "shared_memory_offset": s["offset"], "shared_memory_byte_size": s["size"]}
        return {
            "inputs": [
                {"name": s["name"], "shape": s["shape"], "datatype": s["datatype"], "parameters": shm(e["inputs_region"], s)}
                for s in e["inputs"]
            ],
            "outputs": [{"name": s["name"], "parameters": shm(e["outputs_region"], s)} for s in e["outputs"]],
        }

    def clear_outputs(self, name):
        e = self.models[name]
        mm = e["outputs_map"]
        mm.seek(0)
        mm.write(b"\xff" * e["outputs_size"])

    def compare(self, name):
        """Bit-for-bit equality of every output with the built-in worker's,
        and the largest absolute difference (fp32)."""
        import array
        e = self.models[name]
        mm = e["outputs_map"]
        equal = True
        max_abs = 0.0
        for s, want in zip(e["outputs"], e["expected"]):
            got = mm[s["offset"]:s["offset"] + s["size"]]
            if got != want:
                equal = False
                try:
                    import numpy as np
                    a = np.frombuffer(got, dtype=np.float32).astype(np.float64)
                    b = np.frombuffer(want, dtype=np.float32).astype(np.float64)
                    max_abs = max(max_abs, float(np.nanmax(np.abs(a - b))))
                except ImportError:
                    # Pure Python on the first million values (large outputs).
                    n = min(len(got), 4 << 20) // 4 * 4
                    a, b = array.array("f"), array.array("f")
                    a.frombytes(got[:n])
                    b.frombytes(want[:n])
                    max_abs = max(max_abs, max(abs(x - y) for x, y in zip(a, b)))
        return equal, max_abs

    def close(self):
        for e in self.models.values():
            e["inputs_map"].close()
            e["outputs_map"].close()
        for p in self.files:
            try:
                os.unlink(p)
            except OSError:
                pass


def infer(server, tensors, name):
    server.sent[name] = server.sent.get(name, 0) + 1
    t0 = time.perf_counter()
    st, body = server.post(f"/v2/models/{name}/infer", tensors.body(name))
    ms = (time.perf_counter() - t0) * 1e3
    if st != 200:
        raise RuntimeError(f"infer {name}: {st} {body}")
    switched = (body.get("parameters") or {}).get("pipeswitch_switched")
    return ms, switched


def write_repo(repo, manifest, executor):
    types = {"FP32": "TYPE_FP32", "INT32": "TYPE_INT32"}
    for m in manifest["models"]:
        d = os.path.join(repo, m["name"])
        os.makedirs(os.path.join(d, "1"), exist_ok=True)
        lines = [
            f'name: "{m["name"]}"', 'backend: "pipeswitch"', "max_batch_size: 0",
            f'parameters {{ key: "store" value: {{ string_value: "{manifest["store"]}" }} }}',
            f'parameters {{ key: "model" value: {{ string_value: "{m["name"]}" }} }}',
        ]
        if executor:
            lines.append(f'parameters {{ key: "executor" value: {{ string_value: "{executor}" }} }}')
        for kind, key in (("inputs", "input"), ("outputs", "output")):
            for t in m[kind]:
                lines.append(f'{key} {{ name: "{t["name"]}" data_type: {types[t["datatype"]]} dims: {json.dumps(t["shape"])} }}')
        lines.append("instance_group [ { count: 1 kind: %s } ]" % ("KIND_CPU" if executor else "KIND_GPU"))
        with open(os.path.join(d, "config.pbtxt"), "w") as f:
            f.write("\n".join(lines) + "\n")


def stats_counts(server, names):
    out = {}
    for n in names:
        st, body = server.request("GET", f"/v2/models/{n}/stats")
        s = body["model_stats"][0] if st == 200 and body.get("model_stats") else {}
        inf = s.get("inference_stats", {})
        out[n] = {
            "success": inf.get("success", {}).get("count"),
            "fail": inf.get("fail", {}).get("count"),
            "compute_infer_ms_mean": (inf.get("compute_infer", {}).get("ns", 0) / max(1, inf.get("success", {}).get("count", 0) or 1)) / 1e6,
            "execution_count": s.get("execution_count"),
        }
    return out


def latency_run(server, tensors, names, rounds, checks):
    rows = []
    for r in range(rounds):
        for n in names:
            ms, switched = infer(server, tensors, n)
            rows.append({"model": n, "ms": ms, "switched": switched})
    for n in names:
        tensors.clear_outputs(n)
        infer(server, tensors, n)
        checks.append((n, *tensors.compare(n)))
    return rows


def concurrent_run(server, tensors, names, per_model, checks):
    import threading
    lat, errors = [], []
    lock = threading.Lock()

    def client(n):
        # Its own connection (http.client connections are not shared).
        c = Server.__new__(Server)
        c.port, c.sent, c._conn = server.port, {}, None
        for _ in range(per_model):
            try:
                ms, _ = infer(c, tensors, n)
                with lock:
                    lat.append(ms)
            except Exception as e:
                with lock:
                    errors.append(f"{n}: {e}")
        if c._conn is not None:
            c._conn.close()
        with lock:
            for k, v in c.sent.items():
                server.sent[k] = server.sent.get(k, 0) + v

    t0 = time.time()
    threads = [threading.Thread(target=client, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.time() - t0
    for n in names:
        tensors.clear_outputs(n)
        infer(server, tensors, n)
        checks.append((n, *tensors.compare(n)))
    return {"per_model": per_model, "seconds": wall, "latency": summary(lat), "errors": errors[:20]}


def summarize(rows, names):
    res = {"all": summary([r["ms"] for r in rows])}
    for n in names:
        res[n] = summary([r["ms"] for r in rows if r["model"] == n])
    sw = [r["ms"] for r in rows if r["switched"] is True]
    hit = [r["ms"] for r in rows if r["switched"] is False]
    res["switched"] = summary(sw)
    res["not_switched"] = summary(hit)
    for n in names:
        res[n + "/switched"] = summary([r["ms"] for r in rows if r["model"] == n and r["switched"] is True])
    return res


def table(path):
    """The README's table from a triton_gpu.json."""
    r = json.load(open(path))
    names = [m["name"] for m in r["models"]]
    lat = r["latency"]
    print("| model | switching: median / p99 ms | all resident: median / p99 ms | unload+load+infer: median / p99 ms |")
    print("| --- | --- | --- | --- |")
    for n in names + ["all"]:
        cells = []
        for c in ("switching", "resident", "unload_load"):
            x = lat.get(c, {}).get(n, {})
            cells.append(f"{x['median_ms']:.1f} / {x['p99_ms']:.1f}" if x.get("n") else "-")
        print(f"| {n} | " + " | ".join(cells) + " |")
    sw = lat.get("switching", {})
    print(f"\nswitching: {sw.get('switched', {}).get('n', 0)} of {sw.get('all', {}).get('n', 0)} requests switched their model in; "
          f"soak: {r.get('soak', {}).get('requests')} requests, GPU memory spread {r.get('soak', {}).get('gpu_memory_spread_mib')} MiB; "
          f"outputs bit-equal to the built-in worker's: {r.get('outputs_all_equal')}")


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--table":
        table(sys.argv[2])
        return 0
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", required=True)
    ap.add_argument("--backends", required=True)
    ap.add_argument("--fixture", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--rounds", type=int, default=int(os.environ.get("PS_TRITON_ROUNDS", "40")))
    ap.add_argument("--unload-rounds", type=int, default=int(os.environ.get("PS_TRITON_UNLOAD_ROUNDS", "10")))
    ap.add_argument("--soak", type=int, default=int(os.environ.get("PS_TRITON_SOAK", "2000")))
    ap.add_argument("--soak-seconds", type=float, default=float(os.environ.get("PS_TRITON_SOAK_SECONDS", "200")))
    ap.add_argument("--concurrent", type=int, default=int(os.environ.get("PS_TRITON_CONCURRENT", "30")))
    ap.add_argument("--cpu", action="store_true", help="tiny models on the cpu-reference executor (no GPU)")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    tag = str(os.getpid())
    store = f"ps-triton-gpu-{tag}"
    fixdir = os.path.join(a.work, "fixture")
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "mode": "cpu-reference" if a.cpu else "gpu"}
    t0 = time.time()
    log("preparing the store and the reference outputs (triton_fixture)")
    with open(os.path.join(a.out, "fixture.log"), "w") as f:
        cmd = [a.fixture, "prepare-cpu" if a.cpu else "prepare", store, fixdir]
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT)
    result["fixture_s"] = time.time() - t0
    manifest = json.load(open(os.path.join(fixdir, "fixture.json")))
    names = [m["name"] for m in manifest["models"]]
    sizes = {m["name"]: m["bytes"] for m in manifest["models"]}
    result["models"] = [{k: m[k] for k in ("name", "bytes", "layers", "exec_ms", "activation_bytes")} for m in manifest["models"]]
    result["batch"], result["seq"] = manifest["batch"], manifest["seq"]
    repo = os.path.join(a.work, "repo")
    write_repo(repo, manifest, "cpu-reference" if a.cpu else "")
    tensors = Tensors(manifest, tag)
    mib = 1 << 20
    acts = sum(m["activation_bytes"] for m in manifest["models"])
    one = max(sizes.values()) + 64 * mib
    allm = sum(sizes.values()) + 256 * mib
    arena = allm + acts + 512 * mib
    configs = {
        "switching": {"arena-bytes": arena, "residency-bytes": one},
        "resident": {"arena-bytes": arena, "residency-bytes": allm},
    }
    result["backend_config"] = configs
    checks = []
    servers = []
    try:
        mem_before = gpu_memory_mib()
        for cname in ("resident", "switching"):
            log(f"server: {cname} {configs[cname]}")
            s = Server(a.server, repo, a.backends, os.path.join(a.out, f"server-{cname}.log"), configs[cname], load=names)
            servers.append(s)
            tensors.register(s)
            result.setdefault("server_start_s", {})[cname] = s.start_s
            # Warm-up: each model once (first use: pinning, kernels, first copy).
            warm = []
            for n in names:
                warm.append({"model": n, "ms": infer(s, tensors, n)[0]})
            result.setdefault("first_request_ms", {})[cname] = warm
            rows = latency_run(s, tensors, names, a.rounds, checks)
            result.setdefault("latency", {})[cname] = summarize(rows, names)
            result.setdefault("samples", {})[cname] = rows
            log(f"{cname}: median {result['latency'][cname]['all']['median_ms']:.2f} ms, p99 {result['latency'][cname]['all']['p99_ms']:.2f} ms")
            if cname == "switching":
                # Soak: alternating requests, GPU memory sampled.
                log(f"soak: up to {a.soak} requests or {a.soak_seconds} s")
                mem = []
                soak_ms = []
                t_soak = time.time()
                i = 0
                while i < a.soak and time.time() - t_soak < a.soak_seconds:
                    n = names[i % len(names)]
                    soak_ms.append(infer(s, tensors, n)[0])
                    if i % 100 == 0:
                        mem.append({"request": i, "mib": gpu_memory_mib()})
                    if i % 500 == 499:
                        tensors.clear_outputs(n)
                        infer(s, tensors, n)
                        checks.append((n, *tensors.compare(n)))
                    i += 1
                mem.append({"request": i, "mib": gpu_memory_mib()})
                vals = [m["mib"] for m in mem[1:] if m["mib"] is not None]
                result["soak"] = {
                    "requests": i, "seconds": time.time() - t_soak, "latency": summary(soak_ms),
                    "gpu_memory_mib": mem,
                    "gpu_memory_spread_mib": (max(vals) - min(vals)) if vals else None,
                    "flat": (max(vals) - min(vals) <= 2) if vals else None,
                }
                log(f"soak: {i} requests, GPU memory spread {result['soak']['gpu_memory_spread_mib']} MiB")
                # Concurrent clients, one per model: instances of different
                # models compete for the room of about one model.
                result["concurrent"] = concurrent_run(s, tensors, names, a.concurrent, checks)
                log(f"concurrent: {result['concurrent']['latency']['n']} requests, errors {len(result['concurrent']['errors'])}")
            st = stats_counts(s, names)
            result.setdefault("stats", {})[cname] = st
            # Triton's statistics (reported by the backend) count every request.
            result.setdefault("stats_match", {})[cname] = all(st[n]["success"] == s.sent.get(n, 0) for n in names)
            s.stop()
            servers.remove(s)
        # Triton's own answer: explicit unload of the previous model and load
        # of the next before each request (the residency region as in
        # "switching", so a loaded model's bytes are copied in again).
        cname = "unload_load"
        log("server: unload/load")
        s = Server(a.server, repo, a.backends, os.path.join(a.out, f"server-{cname}.log"), configs["switching"], load=names[:1])
        servers.append(s)
        tensors.register(s)
        infer(s, tensors, names[0])
        rows = []
        prev = names[0]
        for r in range(a.unload_rounds):
            for n in names[1:] + names[:1]:
                t = time.perf_counter()
                st, body = s.post(f"/v2/repository/models/{prev}/unload", {})
                if st != 200:
                    raise RuntimeError(f"unload {prev}: {st} {body}")
                t_unload = time.perf_counter()
                st, body = s.post(f"/v2/repository/models/{n}/load", {})
                if st != 200:
                    raise RuntimeError(f"load {n}: {st} {body}")
                t_load = time.perf_counter()
                ms, switched = infer(s, tensors, n)
                total = (time.perf_counter() - t) * 1e3
                rows.append({"model": n, "ms": total, "unload_ms": (t_unload - t) * 1e3, "load_ms": (t_load - t_unload) * 1e3, "infer_ms": ms, "switched": switched})
                prev = n
        tensors.clear_outputs(prev)
        infer(s, tensors, prev)
        checks.append((prev, *tensors.compare(prev)))
        lat = summarize(rows, names)
        lat["load"] = summary([r["load_ms"] for r in rows])
        lat["unload"] = summary([r["unload_ms"] for r in rows])
        lat["infer_after_load"] = summary([r["infer_ms"] for r in rows])
        result.setdefault("latency", {})[cname] = lat
        result.setdefault("samples", {})[cname] = rows
        log(f"{cname}: median {lat['all']['median_ms']:.2f} ms, p99 {lat['all']['p99_ms']:.2f} ms")
        s.stop()
        servers.remove(s)
        result["gpu_memory_mib_before"] = mem_before
        result["outputs"] = [{"model": n, "bit_equal": eq, "max_abs_diff": d} for n, eq, d in checks]
        result["outputs_all_equal"] = all(eq for _, eq, _ in checks)
        result["ok"] = result["outputs_all_equal"] and all(result["stats_match"].values()) and not result["concurrent"]["errors"] and (a.cpu or bool(result.get("soak", {}).get("flat")))
    except Exception as e:  # the JSON says what failed
        result["error"] = f"{type(e).__name__}: {e}"
        result["ok"] = False
        log(f"FAILED: {result['error']}")
    finally:
        for s in servers:
            s.stop()
        tensors.close()
        subprocess.run([a.fixture, "destroy", store], check=False)
        result["total_s"] = time.time() - t0
        with open(os.path.join(a.out, "triton_gpu.json"), "w") as f:
            json.dump(result, f, indent=1)
    log(f"done in {result['total_s']:.0f} s: ok={result['ok']}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
