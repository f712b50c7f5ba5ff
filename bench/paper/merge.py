"""Merges the two phases of the H100 run into one result file.

The main comparison (ready, libpipeswitch, transfer then run, model.to, the
grouping ablation and the pinned/pageable copies) runs with no other process
on the GPU: phase A, ``--skip mps,mem_workspace,mem_caching,
mem_caching_emptied,stop_and_start``. The variants that need other processes
(MPS, the memory-ablation workers, stop-and-start) run in phase B, with a few
reference variants beside them. This takes phase B's multi-process variants
into phase A's file (which keeps its own targets and pass/fail), records both
files' provenance, and writes the merged JSON.

    python3 bench/paper/merge.py A.json B.json OUT.json
"""

import json
import sys

#: Variants taken from phase B.
FROM_B = ("mps", "two_process_no_mps", "mem_workspace", "mem_caching", "mem_caching_emptied", "stop_and_start")


def merge(a, b):
    out = dict(a)
    out["phases"] = {
        "A": {"argv": a.get("argv"), "created": a.get("created"), "runs_done": a.get("runs_done")},
        "B": {"argv": b.get("argv"), "created": b.get("created"), "runs_done": b.get("runs_done"),
              "variants": list(FROM_B)},
    }
    for key in ("mps", "memory_children"):
        if key in b:
            out[key] = b[key]
    out["errors"] = list(a.get("errors", [])) + list(b.get("errors", []))
    for m, mb in b.get("models", {}).items():
        ma = out["models"].setdefault(m, mb)
        for v in FROM_B:
            if v in mb.get("variants", {}):
                ma.setdefault("variants", {})[v] = mb["variants"][v]
        if "mps_cold" in mb:
            ma["mps_cold"] = mb["mps_cold"]
    return out


def main(argv):
    if len(argv) != 3:
        sys.exit(__doc__)
    with open(argv[0]) as f:
        a = json.load(f)
    with open(argv[1]) as f:
        b = json.load(f)
    with open(argv[2], "w") as f:
        json.dump(merge(a, b), f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
