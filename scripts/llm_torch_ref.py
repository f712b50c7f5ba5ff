#!/usr/bin/env python3
"""PyTorch side of the LLM benchmark (run on the GPU machine after
`pipeswitch bench llm --keep-store`): the same weights, read from the
store's segment file through the manifest the benchmark wrote.

1. Correctness: a PyTorch implementation of the Llama architecture written
   here (not transformers'), with the worker's specified numerics (f32
   activations, weights as stored, K and V rounded to bf16; where the
   worker's prefill ran on the tensor cores, the report's
   `tensor_core_rows`, the inputs of the linears of a chunk of at least
   that many tokens rounded to the weights' type), computes the
   prompt's logits and 32 greedy tokens; they must match the worker's
   (logits within bf16 tolerance, the same tokens).
2. Baselines for time to first token: a plain PyTorch load of the weights
   from pinned memory (one copy) and a sleep-mode-like wake (tensor by
   tensor synchronous copies), each followed by a bf16 prefill in PyTorch.

Usage: llm_torch_ref.py MANIFEST WORKER_JSON WORKER_LOGITS OUT_JSON
Exit status 1 when the worker's results do not match.
"""

import json
import math
import sys
import time

import numpy as np
import torch


def rope_table(cfg, n, d):
    half = d // 2
    inv = []
    for i in range(half):
        f = cfg["rope_theta"] ** (-(2.0 * i) / d)
        if cfg["rope_factor"] > 0:
            factor, lo, hi, orig = cfg["rope_factor"], cfg["rope_low_freq_factor"], cfg["rope_high_freq_factor"], cfg["rope_original_max_positions"]
            wavelen = 2 * math.pi / f
            if wavelen < orig / hi:
                pass
            elif wavelen > orig / lo:
                f = f / factor
            else:
                smooth = (orig / wavelen - lo) / (hi - lo)
                f = (1 - smooth) * f / factor + smooth * f
        inv.append(f)
    pos = np.arange(n, dtype=np.float64)[:, None] * np.array(inv)[None, :]
    return torch.tensor(np.cos(pos), dtype=torch.float32), torch.tensor(np.sin(pos), dtype=torch.float32)


def rot(x, cos, sin):
    # x [T, H, d]; cos/sin [T, d/2]
    half = x.shape[-1] // 2
    x0, x1 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat([x0 * c - x1 * s, x1 * c + x0 * s], dim=-1)


class Ref:
    """The worker's numerics: f32 activations, weights upcast from bf16."""

    def __init__(self, cfg, w, dev, tc_rows=None):
        self.c, self.w, self.dev = cfg, w, dev
        # The worker's tensor-core path: a linear of at least tc_rows rows
        # reads its input rounded to the weights' type (None: never).
        self.tc_rows = tc_rows
        n = cfg["max_positions"]
        self.cos, self.sin = rope_table(cfg, n, cfg["head_dim"])
        self.cos, self.sin = self.cos.to(dev), self.sin.to(dev)
        self.k = [None] * cfg["layers"]
        self.v = [None] * cfg["layers"]

    def W(self, n):
        return self.w[n].float()

    def lin(self, x, n):
        """x @ W(n).T, x rounded to W's type first where the worker's tensor-core path rounds it."""
        if self.tc_rows is not None and x.shape[0] >= self.tc_rows:
            x = x.to(self.w[n].dtype).float()
        return x @ self.W(n).T

    def rms(self, x, g):
        r = torch.rsqrt((x.double() ** 2).mean(-1, keepdim=True) + self.c["rms_eps"]).float()
        return (x * r) * self.W(g)

    def step(self, ids, pos):
        c = self.c
        d, H, KV = c["head_dim"], c["heads"], c["kv_heads"]
        T = ids.shape[0]
        x = self.W("model.embed_tokens.weight")[ids]
        cos, sin = self.cos[pos:pos + T], self.sin[pos:pos + T]
        for l in range(c["layers"]):
            p = f"model.layers.{l}"
            xn = self.rms(x, f"{p}.input_layernorm.weight")
            q = self.lin(xn, f"{p}.self_attn.q_proj.weight").view(T, H, d)
            k = self.lin(xn, f"{p}.self_attn.k_proj.weight").view(T, KV, d)
            v = self.lin(xn, f"{p}.self_attn.v_proj.weight").view(T, KV, d)
            q, k = rot(q, cos, sin), rot(k, cos, sin)
            k = k.to(torch.bfloat16).float()
            v = v.to(torch.bfloat16).float()
            self.k[l] = k if self.k[l] is None else torch.cat([self.k[l], k])
            self.v[l] = v if self.v[l] is None else torch.cat([self.v[l], v])
            K = self.k[l].repeat_interleave(H // KV, dim=1)  # [S, H, d]
            V = self.v[l].repeat_interleave(H // KV, dim=1)
            s = torch.einsum("thd,shd->hts", q, K) / math.sqrt(d)
            S = K.shape[0]
            mask = torch.arange(S, device=self.dev)[None, :] > (pos + torch.arange(T, device=self.dev))[:, None]
            s = s.masked_fill(mask[None], float("-inf"))
            a = torch.softmax(s.double(), dim=-1).float()
            ctx = torch.einsum("hts,shd->thd", a, V).reshape(T, H * d)
            h1 = x + self.lin(ctx, f"{p}.self_attn.o_proj.weight")
            xn2 = self.rms(h1, f"{p}.post_attention_layernorm.weight")
            g = self.lin(xn2, f"{p}.mlp.gate_proj.weight")
            u = self.lin(xn2, f"{p}.mlp.up_proj.weight")
            x = h1 + self.lin(torch.nn.functional.silu(g) * u, f"{p}.mlp.down_proj.weight")
        xn = self.rms(x[-1:], "model.norm.weight")
        head = "model.embed_tokens.weight" if c["tie_embeddings"] else "lm_head.weight"
        return self.lin(xn, head)[0]


def bf16_prefill(cfg, w, ids):
    """A plain bf16 PyTorch prefill (for the baselines' time to first token)."""
    c = cfg
    d, H, KV = c["head_dim"], c["heads"], c["kv_heads"]
    T = ids.shape[0]
    cos, sin = rope_table(c, T, d)
    cos, sin = cos.to(ids.device, torch.bfloat16), sin.to(ids.device, torch.bfloat16)
    x = w["model.embed_tokens.weight"][ids]
    F = torch.nn.functional
    for l in range(c["layers"]):
        p = f"model.layers.{l}"
        xn = F.rms_norm(x, (x.shape[-1],), w[f"{p}.input_layernorm.weight"], c["rms_eps"])
        q = F.linear(xn, w[f"{p}.self_attn.q_proj.weight"]).view(T, H, d)
        k = F.linear(xn, w[f"{p}.self_attn.k_proj.weight"]).view(T, KV, d)
        v = F.linear(xn, w[f"{p}.self_attn.v_proj.weight"]).view(T, KV, d)
        q, k = rot(q, cos, sin), rot(k, cos, sin)
        o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], is_causal=True, enable_gqa=True)
        x = x + F.linear(o[0].transpose(0, 1).reshape(T, H * d), w[f"{p}.self_attn.o_proj.weight"])
        xn = F.rms_norm(x, (x.shape[-1],), w[f"{p}.post_attention_layernorm.weight"], c["rms_eps"])
        x = x + F.linear(F.silu(F.linear(xn, w[f"{p}.mlp.gate_proj.weight"])) * F.linear(xn, w[f"{p}.mlp.up_proj.weight"]), w[f"{p}.mlp.down_proj.weight"])
    xn = F.rms_norm(x[-1:], (x.shape[-1],), w["model.norm.weight"], c["rms_eps"])
    head = "model.embed_tokens.weight" if c["tie_embeddings"] else "lm_head.weight"
    return int(F.linear(xn, w[head]).argmax(-1)[0])


def main():
    manifest, worker_json, worker_logits, out_json = sys.argv[1:5]
    man = json.load(open(manifest))
    rep = json.load(open(worker_json))
    cfg = man["config"]
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    seg = np.memmap(man["segment"], dtype=np.uint8, mode="r")
    tensors = [t for t in man["tensors"] if t["name"] != "rope.cos_sin"]
    total = sum(t["bytes"] for t in tensors)
    out = {"card": torch.cuda.get_device_name(0), "model_bytes": total}

    # Pinned host copy of the weights (not timed as part of any request).
    t0 = time.perf_counter()
    pinned = torch.empty(total, dtype=torch.uint8, pin_memory=True)
    views, at = {}, 0
    for t in tensors:
        src = torch.from_numpy(np.asarray(seg[t["offset"]:t["offset"] + t["bytes"]]))
        pinned[at:at + t["bytes"]].copy_(src)
        views[t["name"]] = (at, t)
        at += t["bytes"]
    out["pin_s"] = time.perf_counter() - t0
    print(f"weights pinned in {out['pin_s']:.1f} s ({total / 1e9:.2f} GB)", flush=True)

    def as_tensors(buf):
        w = {}
        for name, (o, t) in views.items():
            assert t["dtype"] == "BF16", t
            w[name] = buf[o:o + t["bytes"]].view(torch.bfloat16).view(*t["shape"])
        return w

    ids = torch.tensor(man["prompt"], dtype=torch.long, device=dev)
    # Warm up the bf16 kernels on a first load.
    gpu = pinned.to(dev, non_blocking=True)
    bf16_prefill(cfg, as_tensors(gpu), ids)
    torch.cuda.synchronize()
    del gpu
    torch.cuda.empty_cache()

    plain, wake = [], []
    for _ in range(3):
        torch.cuda.synchronize()
        t = time.perf_counter()
        gpu = pinned.to(dev, non_blocking=True)
        tok = bf16_prefill(cfg, as_tensors(gpu), ids)
        plain.append((time.perf_counter() - t) * 1e3)
        del gpu
        torch.cuda.empty_cache()
        host = as_tensors(pinned)
        torch.cuda.synchronize()
        t = time.perf_counter()
        w = {n: v.to(dev) for n, v in host.items()}  # one synchronous copy per tensor
        tok2 = bf16_prefill(cfg, w, ids)
        wake.append((time.perf_counter() - t) * 1e3)
        del w
        torch.cuda.empty_cache()
    out["torch_plain_load_ttft_ms"] = sorted(plain)[1]
    out["torch_sleep_wake_ttft_ms"] = sorted(wake)[1]
    out["torch_bf16_first_token"] = tok
    print(f"PyTorch: plain load from pinned memory + prefill {out['torch_plain_load_ttft_ms']:.1f} ms; "
          f"tensor-by-tensor wake + prefill {out['torch_sleep_wake_ttft_ms']:.1f} ms (first token {tok}, {tok2})", flush=True)

    # Correctness against the worker.
    gpu = pinned.to(dev)
    tc_rows = rep.get("tensor_core_rows")
    ref = Ref(cfg, as_tensors(gpu), dev, tc_rows)
    print(f"reference numerics: linears' inputs rounded from {tc_rows} rows (the worker's tensor-core prefill)" if tc_rows
          else "reference numerics: f32 linears' inputs (the worker's GEMV prefill)", flush=True)
    wtok = rep["tokens_batch1"]
    steps = len(wtok)
    logits = ref.step(ids, 0)
    wl = torch.tensor(np.fromfile(worker_logits, dtype=np.float32), device=dev)
    scale = logits.abs().max().item()
    err = (wl - logits).abs().max().item() / scale
    # The reference is fed the worker's tokens (teacher forcing), as the GPU
    # tests feed both sides the same ones: a near tie decided the other way
    # (sums in another order, a K or V value rounded to the other bf16
    # neighbour) is then one step's difference, not a different sequence.
    # A step passes when the worker's token is the reference's argmax or
    # within 1e-3 of the logits' scale of its maximum.
    tokens, near, bad = [], [], []
    lg, pos = logits, ids.shape[0]
    for i in range(steps):
        best = int(lg.argmax())
        tokens.append(best)
        if not 0 <= wtok[i] < lg.shape[0]:
            bad.append({"step": i, "worker": wtok[i], "reference": best, "gap": None, "tolerance": None})
            break
        if wtok[i] != best:
            gap = (lg.max() - lg[wtok[i]]).item()
            tol = 1e-3 * lg.abs().max().item()
            (near if gap <= tol else bad).append({"step": i, "worker": wtok[i], "reference": best, "gap": gap, "tolerance": tol})
        if i + 1 < steps:
            lg = ref.step(torch.tensor([wtok[i]], device=dev), pos)
            pos += 1
    same = tokens == wtok
    out.update({"tensor_core_rows": tc_rows, "logits_max_err_over_scale": err, "logits_scale": scale, "reference_tokens": tokens, "worker_tokens": wtok, "same_tokens": same,
                "near_ties_accepted": near, "mismatches": bad})
    # bf16 tolerance: the worker and this reference differ only in the order
    # of f32 sums (and the rounding of K and V that follows): 1e-2 of the
    # logits' scale. A path that rounds its linears' inputs to bf16 (the
    # tensor-core prefill) turns those f32-level differences into whole-ulp
    # differences wherever a value lies near a rounding boundary, and through
    # 32 layers of random weights that moves the logits by about as much as
    # the rounding itself does (the fourth H100 run: the worker's tensor-core
    # logits 2.42e-2 from a reference that rounds the same inputs, 3.78e-2
    # from the worker's own GEMV path, the two references 3.62e-2 apart). So a
    # rounding path is held to the band its rounding opens: nearer its own
    # rounding reference than the rounding moves the reference (and at least
    # 1e-2), with the same tokens.
    tol = 1e-2
    ok = not bad and err < tol
    # The prompt's logits with the worker's other prefill path (GEMV or
    # tensor cores), against this reference rounding as that path does.
    other_file = rep.get("other_prefill_logits")
    if other_file:
        import os
        other_rows = rep.get("other_prefill_tensor_core_rows")
        ol = torch.tensor(np.fromfile(os.path.join(os.path.dirname(worker_logits), other_file), dtype=np.float32), device=dev)
        ref_other = Ref(cfg, as_tensors(gpu), dev, other_rows)
        lo = ref_other.step(ids, 0)
        oerr = (ol - lo).abs().max().item() / lo.abs().max().item()
        otok, obest = int(ol.argmax()), int(lo.argmax())
        ogap = (lo.max() - lo[otok]).item()
        # The rounding's own effect: this path's reference against the other's.
        moved = (lo - logits).abs().max().item() / scale
        otol = max(1e-2, moved) if other_rows else 1e-2
        ook = oerr < otol and (otok == obest or ogap <= 1e-3 * lo.abs().max().item())
        if tc_rows:
            # The default path rounds: its band is the same.
            tol = max(1e-2, moved)
            ok = not bad and err < tol
        out["other_prefill"] = {"tensor_core_rows": other_rows, "logits_max_err_over_scale": oerr, "first_token": otok, "reference_first_token": obest,
                                "rounding_moves_reference_logits_by": moved, "tolerance": otol, "pass": ook}
        path = f"tensor cores from {other_rows} rows" if other_rows else "GEMV"
        print(f"other prefill path ({path}): logits max error {oerr:.2e} of their scale (tolerance {otol:.2e}); first token {otok} "
              f"(reference {obest}); the two paths' references differ by {moved:.2e} -> {'PASS' if ook else 'FAIL'}", flush=True)
        ok = ok and ook
    out["pass"] = ok
    out["logits_tolerance"] = tol
    print(f"reference vs worker: logits max error {err:.2e} of their scale ({scale:.2f}; tolerance {tol:.2e}); "
          f"{sum(a == b for a, b in zip(tokens, wtok))}/{steps} tokens equal, {len(near)} near ties, {len(bad)} mismatches {bad} -> {'PASS' if ok else 'FAIL'}", flush=True)
    json.dump(out, open(out_json, "w"), indent=1)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
