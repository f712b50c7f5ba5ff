#!/usr/bin/env python3
"""Figures and README tables from experiments.py's JSON, standard library only.

    python3 bench/paper/figures.py bench/results/paper-nvidia-h100-80gb-hbm3.json [--out-dir DIR] [--linear]

Writes ``fig-total-latency.svg`` (log scale unless ``--linear``),
``fig-grouping.svg`` and ``fig-memory.svg`` into ``--out-dir`` (default: the
JSON's folder) and prints the Markdown tables for the README on stdout.
Bars are medians, whiskers p10-p90.
"""

import argparse
import json
import math
import os
import sys
from xml.sax.saxutils import escape

MODEL_ORDER = ["resnet152", "inception_v3", "bert_base", "gpt2_medium"]

TOTAL_BARS = [
    ("ready_torch", "ready (PyTorch)"),
    ("ready_pipeswitch", "ready (libpipeswitch)"),
    ("pipeswitch", "libpipeswitch"),
    ("transfer_then_run", "transfer then run"),
    ("model_to", "model.to(\"cuda\")"),
    ("mps", "MPS"),
    ("two_process_no_mps", "2 processes (no MPS)"),
    ("stop_and_start", "stop-and-start"),
]
GROUPING_BARS = [("pipeswitch", "optimal plan"), ("per_layer_groups", "one layer per group"),
                 ("transfer_then_run", "one group"), ("hand_groups", "hand-chosen (per block)")]
MEMORY_BARS = [("mem_workspace", "arena workspace"), ("mem_caching", "caching allocator (warm)"),
               ("mem_caching_emptied", "caching, emptied per request"),
               ("pipeswitch", "pinned store (library, main process)"),
               ("pinned_py", "pinned buffer, Python copies"),
               ("pageable_py", "pageable buffer, Python copies")]

PALETTE = ["#4c72b0", "#55a868", "#c44e52", "#8172b2", "#ccb974", "#64b5cd", "#8c8c8c", "#dd8452",
           "#937860", "#da8bc3"]


# ---------------------------------------------------------------------------
# Reading the JSON
# ---------------------------------------------------------------------------

def models_of(data):
    ms = list((data.get("models") or {}).keys())
    return [m for m in MODEL_ORDER if m in ms] + [m for m in ms if m not in MODEL_ORDER]


def stat(data, model, variant):
    """(median, p10, p90) of a variant's total latency, or None."""
    v = (((data.get("models") or {}).get(model) or {}).get("variants") or {}).get(variant) or {}
    med = v.get("median")
    if med is None:
        return None
    p10 = v.get("p10", med)
    p90 = v.get("p90", med)
    return (float(med), float(p10 if p10 is not None else med), float(p90 if p90 is not None else med))


def present(data, bars):
    """The bars that have a value for at least one model."""
    return [(k, lab) for k, lab in bars if any(stat(data, m, k) for m in models_of(data))]


def label(data, model):
    return ((data.get("models") or {}).get(model) or {}).get("label") or model


# ---------------------------------------------------------------------------
# SVG
# ---------------------------------------------------------------------------

def _fmt(v):
    if v >= 1000:
        return "%.0f" % v
    if v >= 100:
        return "%.0f" % v
    if v >= 10:
        return "%.1f" % v
    return "%.2f" % v


def _tick(v):
    if abs(v - round(v)) < 1e-9:
        return "%d" % round(v)
    return ("%.3f" % v).rstrip("0").rstrip(".")


def _nice_step(span, n=5):
    raw = span / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def bar_chart(title, groups, series, values, ylabel="ms", log=False, markers=None,
              width=960, height=460, subtitle=None):
    """A grouped bar chart as an SVG string.

    ``groups``: x labels; ``series``: legend labels; ``values[g][s]``:
    (median, p10, p90) or None; ``markers[g]``: [(value, text)] drawn as
    dashed horizontal lines across group g."""
    markers = markers or {}
    left, right, top = 72, 16, 56
    legend_rows = int(math.ceil(len(series) / 3.0)) + (1 if markers else 0)
    bottom = 44 + 18 * legend_rows
    pw, ph = width - left - right, height - top - bottom
    allv = [x for row in values for cell in row if cell for x in cell if x is not None and x > 0]
    allv += [v for ms in markers.values() for v, _ in ms if v and v > 0]
    out = ['<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" '
           'font-family="Helvetica, Arial, sans-serif" font-size="12">' % (width, height, width, height),
           '<rect x="0" y="0" width="%d" height="%d" fill="white"/>' % (width, height),
           '<text x="%d" y="22" font-size="16" font-weight="bold">%s</text>' % (left, escape(title))]
    if subtitle:
        out.append('<text x="%d" y="40" font-size="11" fill="#555">%s</text>' % (left, escape(subtitle)))
    if not allv:
        out.append('<text x="%d" y="%d">no data</text>' % (left + 10, top + ph // 2))
        out.append("</svg>")
        return "\n".join(out)

    if log:
        lo = 10 ** math.floor(math.log10(min(allv)))
        hi = 10 ** math.ceil(math.log10(max(allv)))
        if hi <= lo:
            hi = lo * 10
        llo, lhi = math.log10(lo), math.log10(hi)

        def y_of(v):
            v = max(v, lo)
            return top + ph - (math.log10(v) - llo) / (lhi - llo) * ph
        ticks = [10 ** e for e in range(int(round(llo)), int(round(lhi)) + 1)]
        minor = [k * t for t in ticks[:-1] for k in range(2, 10)]
        base_y = top + ph
    else:
        hi = max(allv) * 1.08
        step = _nice_step(hi)
        hi = math.ceil(hi / step) * step

        def y_of(v):
            return top + ph - max(v, 0) / hi * ph
        ticks = [i * step for i in range(int(round(hi / step)) + 1)]
        minor = []
        base_y = top + ph

    # Grid and axis.
    for t in minor:
        y = y_of(t)
        out.append('<line x1="%d" x2="%d" y1="%.1f" y2="%.1f" stroke="#eee"/>' % (left, left + pw, y, y))
    for t in ticks:
        y = y_of(t)
        out.append('<line x1="%d" x2="%d" y1="%.1f" y2="%.1f" stroke="#ccc"/>' % (left, left + pw, y, y))
        out.append('<text x="%d" y="%.1f" text-anchor="end">%s</text>' % (left - 6, y + 4, escape(_tick(t))))
    out.append('<line x1="%d" x2="%d" y1="%d" y2="%d" stroke="#333"/>' % (left, left, top, top + ph))
    out.append('<line x1="%d" x2="%d" y1="%d" y2="%d" stroke="#333"/>' % (left, left + pw, top + ph, top + ph))
    out.append('<text transform="translate(18,%d) rotate(-90)" text-anchor="middle">%s%s</text>'
               % (top + ph // 2, escape(ylabel), " (log scale)" if log else ""))

    # Bars.
    ng, ns = max(len(groups), 1), max(len(series), 1)
    gw = pw / ng
    bw = gw * 0.82 / ns
    for gi, g in enumerate(groups):
        gx = left + gi * gw + gw * 0.09
        out.append('<text x="%.1f" y="%d" text-anchor="middle" font-weight="bold">%s</text>'
                   % (left + gi * gw + gw / 2, top + ph + 18, escape(g)))
        for si in range(len(series)):
            cell = values[gi][si] if gi < len(values) and si < len(values[gi]) else None
            x = gx + si * bw
            color = PALETTE[si % len(PALETTE)]
            if not cell:
                out.append('<text x="%.1f" y="%.1f" font-size="9" text-anchor="middle" fill="#999">n/a</text>'
                           % (x + bw / 2, base_y - 4))
                continue
            med, p10, p90 = cell
            y = y_of(med)
            out.append('<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="%s"><title>%s, %s: median '
                       '%s ms (p10 %s, p90 %s)</title></rect>'
                       % (x + 1, y, max(bw - 2, 1), max(base_y - y, 0.5), color, escape(g),
                          escape(series[si]), _fmt(med), _fmt(p10), _fmt(p90)))
            if p90 > p10:
                cx = x + bw / 2
                y10, y90 = y_of(p10), y_of(p90)
                cap = min(bw * 0.25, 5)
                out.append('<path d="M%.1f %.1f V%.1f M%.1f %.1f H%.1f M%.1f %.1f H%.1f" stroke="#222" '
                           'stroke-width="1"/>' % (cx, y10, y90, cx - cap, y10, cx + cap, cx - cap, y90, cx + cap))
            out.append('<text x="%.1f" y="%.1f" font-size="9" text-anchor="middle">%s</text>'
                       % (x + bw / 2, min(y, y_of(p90)) - 3, escape(_fmt(med))))
        for mi, (v, text) in enumerate(markers.get(g, [])):
            if not v:
                continue
            y = y_of(v)
            dash = "6,3" if mi == 0 else "2,2"
            out.append('<line x1="%.1f" x2="%.1f" y1="%.1f" y2="%.1f" stroke="#000" stroke-dasharray="%s" '
                       'stroke-width="1.5"><title>%s: %s ms</title></line>'
                       % (left + gi * gw + 2, left + (gi + 1) * gw - 2, y, y, dash, escape(text), _fmt(v)))

    # Legend.
    ly = top + ph + 36
    colw = pw / 3.0
    for si, s in enumerate(series):
        lx = left + (si % 3) * colw
        yy = ly + (si // 3) * 18
        out.append('<rect x="%.1f" y="%.1f" width="12" height="12" fill="%s"/>' % (lx, yy - 10, PALETTE[si % len(PALETTE)]))
        out.append('<text x="%.1f" y="%.1f">%s</text>' % (lx + 17, yy, escape(s)))
    if markers:
        yy = ly + int(math.ceil(len(series) / 3.0)) * 18
        names = []
        for ms in markers.values():
            for _, t in ms:
                if t not in names:
                    names.append(t)
        for i, t in enumerate(names[:2]):
            lx = left + i * colw
            dash = "6,3" if i == 0 else "2,2"
            out.append('<line x1="%.1f" x2="%.1f" y1="%.1f" y2="%.1f" stroke="#000" stroke-dasharray="%s" '
                       'stroke-width="1.5"/>' % (lx, lx + 14, yy - 4, yy - 4, dash))
            out.append('<text x="%.1f" y="%.1f">%s</text>' % (lx + 19, yy, escape(t)))
    out.append("</svg>")
    return "\n".join(out)


def _chart(data, bars, title, log=False, markers=None, subtitle=None):
    bars = present(data, bars)
    ms = models_of(data)
    values = [[stat(data, m, k) for k, _ in bars] for m in ms]
    mk = {}
    if markers:
        for m in ms:
            mk[label(data, m)] = markers(m)
    return bar_chart(title, [label(data, m) for m in ms], [lab for _, lab in bars], values, log=log,
                     markers=mk, subtitle=subtitle)


def _card(data):
    env = data.get("environment") or {}
    h2d = data.get("h2d") or {}
    parts = [env.get("card") or "unknown card"]
    if h2d.get("peak_gbps"):
        parts.append("H2D peak %.1f GB/s" % h2d.get("peak_for_target_gbps", h2d["peak_gbps"]))
    if env.get("torch"):
        parts.append("PyTorch %s" % env["torch"])
    cfg = data.get("config") or {}
    parts.append("fp32, batch %s; median of %s interleaved runs, whiskers p10-p90"
                 % (cfg.get("batch", 8), data.get("runs_done", data.get("runs_requested", "?"))))
    return ", ".join(parts)


def fig_total(data, log=True):
    def markers(m):
        t = ((data["models"].get(m) or {}).get("target") or {})
        ref = ((data["models"].get(m) or {}).get("reference") or {})
        return [(t.get("target_ms"), "target: 1.08 x max(ready, bytes/peak)"),
                (t.get("pipelined_ref_ms") or ref.get("pipelined_ms"), "TARGETS.md pipelined (plain PyTorch)")]
    return _chart(data, TOTAL_BARS, "Total latency: switch + first inference", log=log, markers=markers,
                  subtitle=_card(data))


def fig_grouping(data):
    return _chart(data, GROUPING_BARS, "Grouping ablation: libpipeswitch switch + first inference",
                  subtitle=_card(data))


def fig_memory(data):
    return _chart(data, MEMORY_BARS, "Memory ablation: switch + first inference", subtitle=_card(data))


def write_all(json_path, out_dir=None, log=True):
    """Writes the three figures; returns their paths."""
    with open(json_path) as f:
        data = json.load(f)
    out_dir = out_dir or os.path.dirname(os.path.abspath(json_path))
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, svg in (("fig-total-latency.svg", fig_total(data, log=log)),
                      ("fig-grouping.svg", fig_grouping(data)),
                      ("fig-memory.svg", fig_memory(data))):
        p = os.path.join(out_dir, name)
        with open(p, "w") as f:
            f.write(svg + "\n")
        paths.append(p)
    return paths


# ---------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------

def cell(data, model, variant, spread=True, scale=1.0, digits=1):
    s = stat(data, model, variant)
    if not s:
        v = (((data.get("models") or {}).get(model) or {}).get("variants") or {}).get(variant) or {}
        return "error" if v.get("errors") else "-"
    med, p10, p90 = (x * scale for x in s)
    f = "%%.%df" % digits
    if spread:
        return (f + " (" + f + "-" + f + ")") % (med, p10, p90)
    return f % med


def main_table(data, llm=None, llm_ref=None):
    """The README's table: one row per model (and the LLM's, from its own
    run, when ``llm`` is given: :func:`llm_row`)."""
    head = ["model", "bytes", "bytes/peak", "ready", "libpipeswitch", "transfer-then-run", "model.to",
            "MPS", "stop-and-start", "target", "pass"]
    rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    any_no_mps = False
    for m in models_of(data):
        md = data["models"][m]
        t = md.get("target") or {}
        nbytes = md.get("bytes")
        mps = cell(data, m, "mps")
        if mps in ("-",) and stat(data, m, "two_process_no_mps"):
            mps = cell(data, m, "two_process_no_mps") + " *"
            any_no_mps = True
        ss = stat(data, m, "stop_and_start")
        ss_cell = ("%.2f s" % (ss[0] / 1e3) + (" (%.2f-%.2f)" % (ss[1] / 1e3, ss[2] / 1e3) if ss[2] > ss[1] else "")) \
            if ss else cell(data, m, "stop_and_start")
        if t.get("pass") is True:
            verdict = "yes"
        elif t.get("pass") is False:
            why = []
            if t.get("pass_target") is False:
                why.append("> target")
            if t.get("pass_pipelined") is False:
                why.append(">= pipelined %.1f" % t["pipelined_ref_ms"])
            verdict = "**no** (%s)" % ", ".join(why)
        else:
            verdict = "n/a"
        rows.append("| " + " | ".join([
            md.get("label", m),
            "%.0f MB" % (nbytes / 1e6) if nbytes else "-",
            "%.1f" % md["bytes_over_peak_ms"] if md.get("bytes_over_peak_ms") else "-",
            cell(data, m, "ready_torch"),
            cell(data, m, "pipeswitch"),
            cell(data, m, "transfer_then_run"),
            cell(data, m, "model_to"),
            mps,
            ss_cell,
            "%.1f" % t["target_ms"] if t.get("target_ms") else "-",
            verdict,
        ]) + " |")
    if llm is not None:
        rows.append(llm_row(llm, llm_ref))
    notes = ["ms, median (p10-p90) of interleaved runs; stop-and-start in seconds. target = 1.08 x "
             "max(ready, bytes / H2D peak); pass = at or under the target and under TARGETS.md's "
             "pipelined column (PipeSwitch's mechanism in plain PyTorch)."]
    if llm is not None:
        notes.append("The LLM row is `pipeswitch bench llm` (its own run, %s): transfer-then-run = one copy "
                     "of the whole model then the prefill; model.to = PyTorch loading the same weights from "
                     "pinned memory, then its prefill; target = %.2f x max(ready, bytes / H2D peak)." % (llm.get("card", "?"), LLM_TARGET_FACTOR))
    if any_no_mps:
        notes.append("* MPS could not be started: two processes time-slicing the GPU without MPS "
                     "(see the JSON's mps.reason).")
    return "\n".join(rows) + "\n\n" + "\n".join(notes) + "\n"


#: The LLM row's target: at most this times max(ready, first-token bytes / peak) (issue 13).
LLM_TARGET_FACTOR = 1.03


def llm_row(llm, ref=None):
    """The main table's row of an LLM from ``pipeswitch bench llm``'s report
    ``llm`` (and ``scripts/llm_torch_ref.py``'s ``ref``, for PyTorch's load
    of the same weights): time to first token of a 128-token prompt instead
    of the first inference; bytes/peak is the whole model's, the floor of
    the issue's target (``LLM_TARGET_FACTOR``; the first token waits for
    less: an untied token table crosses last, its rows read from the
    host). Its own run: no MPS and no stop-and-start."""
    t = llm.get("ttft_ms") or {}

    def c(key):
        v = t.get(key)
        if not v:
            return "-"
        return "%.1f (%.1f-%.1f)" % (v["median"], v["p10"], v["p90"])

    nbytes = llm.get("model_bytes")
    peak = llm.get("h2d_peak_gbps")
    floor = llm.get("floor_ms") or (nbytes / (peak * 1e9) * 1e3 if nbytes and peak else None)
    ready = (t.get("ready") or {}).get("median")
    piped = (t.get("pipelined") or {}).get("median")
    target = LLM_TARGET_FACTOR * max(x for x in (ready, floor) if x is not None) if (ready or floor) else None
    verdict = "n/a" if target is None or piped is None else ("yes" if piped <= target else "**no** (> target)")
    torch_load = ref.get("torch_plain_load_ttft_ms") if ref else None
    label = "%s (bf16, built-in worker; time to first token)" % {"llama3-8b": "Llama-3-8B"}.get(
        llm.get("config"), llm.get("config", "LLM"))
    return "| " + " | ".join([
        label,
        "%.0f MB" % (nbytes / 1e6) if nbytes else "-",
        "%.1f" % floor if floor else "-",
        c("ready"),
        c("pipelined"),
        c("plain_load"),
        "%.1f" % torch_load if torch_load else "-",
        "-",
        "-",
        "%.1f" % target if target else "-",
        verdict,
    ]) + " |"


def ablation_table(data, bars, first="model"):
    bars = present(data, bars)
    head = [first] + [lab for _, lab in bars]
    rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for m in models_of(data):
        rows.append("| " + " | ".join([label(data, m)] + [cell(data, m, k) for k, _ in bars]) + " |")
    return "\n".join(rows) + "\n"


def grouping_extra(data):
    """Groups per plan and the planner's predicted makespan."""
    rows = ["| model | plan | groups | predicted ms | measured ms |", "| --- | --- | --- | --- | --- |"]
    pairs = [("optimal", "pipeswitch"), ("per_layer", "per_layer_groups"), ("one_group", "transfer_then_run"),
             ("hand", "hand_groups")]
    for m in models_of(data):
        plans = data["models"][m].get("plans") or {}
        for p, v in pairs:
            d = plans.get(p)
            if not d:
                continue
            pred = d.get("predicted_ms")
            rows.append("| %s | %s | %s | %s | %s |" % (label(data, m), p.replace("_", " "), d.get("groups"),
                                                         "%.2f" % pred if pred is not None else "-",
                                                         cell(data, m, v)))
    return "\n".join(rows) + "\n"


def markdown_tables(data, llm=None, llm_ref=None):
    parts = ["### Total latency (switch + first inference)", "", main_table(data, llm, llm_ref),
             "### Grouping ablation (libpipeswitch, ms)", "", ablation_table(data, GROUPING_BARS),
             grouping_extra(data),
             "### Memory ablation (ms)", "", ablation_table(data, MEMORY_BARS)]
    return "\n".join(parts)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json")
    p.add_argument("--out-dir")
    p.add_argument("--linear", action="store_true", help="linear y axis for the total-latency figure")
    p.add_argument("--llm", help="`pipeswitch bench llm`'s JSON: the LLM's row in the main table")
    p.add_argument("--llm-ref", help="scripts/llm_torch_ref.py's JSON (PyTorch's load of the same weights)")
    args = p.parse_args(argv)
    paths = write_all(args.json, args.out_dir, log=not args.linear)
    with open(args.json) as f:
        data = json.load(f)
    llm = ref = None
    if args.llm:
        with open(args.llm) as f:
            llm = json.load(f)
    if args.llm_ref:
        with open(args.llm_ref) as f:
            ref = json.load(f)
    print(markdown_tables(data, llm, ref))
    for path in paths:
        print("wrote", path, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
