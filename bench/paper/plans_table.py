#!/usr/bin/env python3
"""Issue 15's table: per model and worker, the optimal plan against the other
plans (hand-chosen, one group per layer, one group), predicted against
measured, and the three targets. Reads the JSON of ``pipeswitch demo``
(built-in worker) and of ``experiments.py`` (PyTorch), prints Markdown::

    python3 bench/paper/plans_table.py demo-<card>.json paper.json > table.md
"""

import json
import sys


def _f(v, fmt="%.2f"):
    return "-" if v is None else fmt % v


def _yes(b):
    return "-" if b is None else ("yes" if b else "**no**")


def demo_rows(d):
    rows = []
    for m in d.get("models", []):
        var = {v["variant"]: v for v in m["variants"]}

        def cell(k):
            v = var.get(k)
            return "-" if v is None else "%.2f (%.2f)" % (v["ms"]["median"], v["predicted_ms"])

        rows.append(["built-in", m["model"], _f(var["ready"]["ms"]["median"]), _f(m["bytes_over_peak_ms"]),
                     "%s, %d groups" % (cell("pipelined_optimal"), len(m["optimal_group_starts"])),
                     "-", cell("pipelined_per_layer"), cell("transfer_then_run"), _f(m["target_ms"]),
                     _yes(m["optimal_within_2pct_of_best_other"]), _yes(m["within_3pct_of_prediction"]),
                     _yes(m["meets_target"])])
    return rows


def paper_rows(d):
    rows = []
    for name, m in d.get("models", {}).items():
        c = m.get("plan_checks")
        if not c:
            continue
        meas, pred = c["measured_ms"], c["predicted_ms"]
        groups = ((m.get("plans") or {}).get("optimal") or {}).get("groups")

        def cell(k):
            return "%s (%s)" % (_f(meas.get(k)), _f(pred.get(k)))

        ready = c.get("ready_ms") or ((m.get("variants") or {}).get("ready_torch") or {}).get("median")
        rows.append(["PyTorch", name, _f(ready), _f(m.get("bytes_over_peak_ms")),
                     "%s, %s groups" % (cell("optimal"), groups), cell("hand"), cell("per_layer"),
                     cell("one_group"), _f(c.get("target_1_05_ms")),
                     _yes(c.get("optimal_within_2pct_of_best_other")), _yes(c.get("measured_within_3pct_of_predicted")),
                     _yes(c.get("meets_1_05"))])
    return rows


HEAD = ["worker", "model", "ready", "bytes/peak", "optimal (pred)", "hand (pred)", "per layer (pred)",
        "one group (pred)", "1.05 x max", "opt <= 1.02 x best", "within 3%", "<= 1.05 x"]


def table(docs):
    rows = []
    for d in docs:
        rows += demo_rows(d) if "models" in d and isinstance(d["models"], list) else paper_rows(d)
    out = ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def main(argv):
    docs = []
    for p in argv:
        with open(p) as f:
            docs.append(json.load(f))
    cards = sorted({d.get("card") or (d.get("environment") or {}).get("card") or "?" for d in docs})
    print("Switch + first inference, median ms (fitted cost model's prediction in parentheses); %s\n"
          % ", ".join(cards))
    print(table(docs))


if __name__ == "__main__":
    main(sys.argv[1:])
