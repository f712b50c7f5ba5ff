"""figures.py on a synthetic result made by experiments.py's own bookkeeping
(Experiment.finalize), and the pure helpers of experiments.py. No PyTorch,
no GPU: ``python3 -m pytest bench/paper -q``."""

import json
import os
import random
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import experiments as E  # noqa: E402
import figures as F  # noqa: E402

SVG_NS = "{http://www.w3.org/2000/svg}"

# Synthetic medians (ms) per model and variant.
BASE = {
    "resnet152": {"ready_torch": 13.4, "ready_pipeswitch": 13.5, "pipeswitch": 14.0, "transfer_then_run": 17.9,
                  "model_to": 57, "mps": 120, "stop_and_start": 8355, "per_layer_groups": 16.0,
                  "hand_groups": 14.5, "mem_workspace": 14.1, "mem_caching": 14.0, "mem_caching_emptied": 16.0,
                  "pinned_py": 15.5, "pageable_py": 40.0},
    "inception_v3": {"ready_torch": 11.5, "ready_pipeswitch": 11.6, "pipeswitch": 12.0,
                     "transfer_then_run": 13.8, "model_to": 57, "mps": 100, "stop_and_start": 7437},
    "bert_base": {"ready_torch": 7.1, "pipeswitch": 9.5, "transfer_then_run": 15.4, "model_to": 70,
                  "stop_and_start": 11530},
    "gpt2_medium": {"ready_torch": 21.7, "pipeswitch": 29.5, "transfer_then_run": 48.2, "model_to": 164},
}
BYTES = {"resnet152": 241416704, "inception_v3": 95513600, "bert_base": 437937152, "gpt2_medium": 1419292672}


def synthetic(tmp_path, mps_ok=True):
    args = E.parse_args(["--out", str(tmp_path / "paper.json"), "--runs", "12"])
    exp = E.Experiment(args)
    rng = random.Random(0)
    exp.result["h2d"] = {"peak_gbps": 54.8, "end_peak_gbps": 54.6, "per_copy_overhead_ms": 0.005}
    exp.result["environment"] = {"card": "NVIDIA H100 80GB HBM3", "torch": "2.11.0"}
    exp.result["runs_done"] = 12
    for m, variants in BASE.items():
        exp.result["models"][m].update(bytes=BYTES[m], plans={
            "optimal": {"groups": 9, "starts": [0, 3], "predicted_ms": 13.0},
            "per_layer": {"groups": 300, "starts": [], "predicted_ms": 15.0},
            "one_group": {"groups": 1, "starts": [0], "predicted_ms": 17.0},
            "hand": {"groups": 52, "starts": [], "predicted_ms": 14.0, "blocks": ["(stem)"]}})
        for v, med in variants.items():
            if v == "mps" and not mps_ok:
                v = "two_process_no_mps"
            n = 3 if v == "stop_and_start" else 12
            recs = []
            for _ in range(n):
                t = med * (1 + rng.uniform(-0.05, 0.05))
                r = {"total_ms": t}
                if v in ("pipeswitch", "ready_pipeswitch"):
                    r.update(switch_call_ms=0.2, enqueue_ms=0.4 * t, compute_stream_ms=0.9 * t,
                             copy_gpu_ms=BYTES[m] / 54e9 * 1e3)
                recs.append(r)
            exp.samples[m][v] = recs
    exp.errors["gpt2_medium"]["mps"] = ["TimeoutError: no reply"]
    exp.write()
    return args.out


def test_finalize_targets_and_where_the_time_goes(tmp_path):
    data = json.load(open(synthetic(tmp_path)))
    assert data["schema"] == E.SCHEMA
    assert data["h2d"]["peak_for_target_gbps"] == 54.8
    r = data["models"]["resnet152"]
    v = r["variants"]["pipeswitch"]
    assert v["n"] == 12 and v["p10"] <= v["median"] <= v["p90"] and v["min"] <= v["p10"] and v["p90"] <= v["max"]
    assert len(v["samples_ms"]) == 12
    t = r["target"]
    assert t["target_ms"] == pytest.approx(1.08 * max(r["variants"]["ready_torch"]["median"], BYTES["resnet152"] / 54.8e6),
                                           rel=1e-4)
    assert t["pass"] is True and t["pass_pipelined"] is True
    g = data["models"]["gpt2_medium"]["target"]
    assert g["pass_target"] is False and g["pass"] is False and g["missed_because"]
    w = data["models"]["gpt2_medium"]["where_the_time_goes"]
    assert w["copy_gbps"] == pytest.approx(54.0, rel=1e-3) and w["notes"]
    assert data["models"]["gpt2_medium"]["variants"]["mps"]["errors"] == ["TimeoutError: no reply"]
    assert data["models"]["gpt2_medium"]["variants"]["mps"]["n"] == 0


def test_svgs_parse_and_have_bars(tmp_path):
    path = synthetic(tmp_path)
    paths = F.write_all(path, str(tmp_path / "figs"))
    assert [os.path.basename(p) for p in paths] == ["fig-total-latency.svg", "fig-grouping.svg", "fig-memory.svg"]
    for p in paths:
        root = ET.parse(p).getroot()
        assert root.tag == SVG_NS + "svg"
        rects = root.findall(".//" + SVG_NS + "rect")
        assert len(rects) > 5, p
        texts = [t.text for t in root.iter(SVG_NS + "text")]
        assert "ResNet-152" in texts and "GPT-2 medium" in texts
    total = ET.parse(paths[0]).getroot()
    titles = [t.text for t in total.iter(SVG_NS + "title")]
    assert any(t.startswith("ResNet-152, stop-and-start") for t in titles)
    assert any("log scale" in (t.text or "") for t in total.iter(SVG_NS + "text"))
    # Linear variant too.
    svg = F.fig_total(json.load(open(path)), log=False)
    ET.fromstring(svg)


def test_markdown_table_rows(tmp_path):
    data = json.load(open(synthetic(tmp_path)))
    table = F.main_table(data)
    lines = [line for line in table.splitlines() if line.startswith("|")]
    assert lines[0] == ("| model | bytes | bytes/peak | ready | libpipeswitch | transfer-then-run | model.to | "
                        "MPS | stop-and-start | target | pass |")
    rows = lines[2:]
    assert [r.split("|")[1].strip() for r in rows] == ["ResNet-152", "Inception-v3", "BERT-base", "GPT-2 medium"]
    for r in rows:
        assert len(r.split("|")) == 13
    res = rows[0].split("|")
    assert res[2].strip() == "241 MB" and res[3].strip() == "4.4"
    assert res[11].strip() == "yes"
    assert res[9].strip().endswith(")") and res[9].strip().startswith("8.")  # seconds
    assert rows[3].split("|")[11].strip().startswith("**no**")
    assert rows[3].split("|")[8].strip() == "error"  # mps failed for GPT-2
    assert rows[2].split("|")[8].strip() == "-"      # not measured
    md = F.markdown_tables(data)
    assert "### Grouping ablation" in md and "### Memory ablation" in md and "hand-chosen" in md


def test_table_marks_two_processes_without_mps(tmp_path):
    data = json.load(open(synthetic(tmp_path, mps_ok=False)))
    table = F.main_table(data)
    assert "*" in table.splitlines()[2].split("|")[8]
    assert "MPS could not be started" in table


def test_figures_cli(tmp_path):
    path = synthetic(tmp_path)
    r = subprocess.run([sys.executable, os.path.join(HERE, "figures.py"), path, "--out-dir", str(tmp_path / "o")],
                       capture_output=True, text=True, check=True)
    assert "| ResNet-152 |" in r.stdout
    assert sorted(os.listdir(tmp_path / "o")) == ["fig-grouping.svg", "fig-memory.svg", "fig-total-latency.svg"]


def test_empty_result_still_draws(tmp_path):
    data = {"models": {"resnet152": {"label": "ResNet-152", "variants": {}}}}
    for svg in (F.fig_total(data), F.fig_grouping(data), F.fig_memory(data)):
        ET.fromstring(svg)
    assert "ResNet-152" in F.main_table(data)


# ---------------------------------------------------------------------------
# experiments.py helpers
# ---------------------------------------------------------------------------

def test_percentile_and_summarize():
    assert E.percentile([], 0.5) is None
    assert E.percentile([3.0], 0.9) == 3.0
    assert E.percentile([1, 2, 3, 4], 0.5) == 2.5
    vals = list(range(1, 12))  # 1..11
    assert E.percentile(vals, 0.1) == pytest.approx(2.0)
    assert E.percentile(vals, 0.9) == pytest.approx(10.0)
    assert E.percentile([5, 1, 4, 2, 3], 0.25) == 2.0  # unsorted input
    s = E.summarize([4.0, 1.0, None, float("nan"), 3.0, 2.0])
    assert s == {"median": 2.5, "p10": pytest.approx(1.3), "p90": pytest.approx(3.7), "min": 1.0, "max": 4.0,
                 "mean": 2.5, "n": 4}
    assert E.summarize([]) == {"n": 0}


def test_interleave_round_robin():
    order = E.interleave(["A", "B", "C"], 2, warmup=1)
    assert [v for _, v in order] == ["A", "B", "C"] * 3
    assert [r for r, _ in order] == [-1] * 3 + [0] * 3 + [1] * 3
    assert E.interleave(["A"], 0) == []


def test_hand_plan_per_block():
    resnet = ["conv1", "bn1", "layer1.0.conv1", "layer1.0.bn1", "layer1.0.downsample.0", "layer1.1.conv1",
              "layer2.0.conv1", "fc"]
    assert E.hand_plan(resnet) == ([0, 2, 5, 6, 7], ["(stem)", "layer1.0", "layer1.1", "layer2.0", "(head)"])
    inception = ["Conv2d_1a_3x3.conv", "Conv2d_1a_3x3.bn", "Conv2d_2a_3x3.conv", "Mixed_5b.branch1x1.conv",
                 "Mixed_5b.branch_pool.bn", "Mixed_5c.branch1x1.conv", "fc"]
    assert E.hand_plan(inception) == ([0, 3, 5, 6], ["(stem)", "Mixed_5b", "Mixed_5c", "(head)"])
    bert = ["embeddings", "embeddings.word_embeddings", "encoder.layer.0.attention.self.query",
            "encoder.layer.0.output.LayerNorm", "encoder.layer.1.attention.self.query",
            "encoder.layer.10.attention.self.query", "pooler.dense"]
    assert E.hand_plan(bert)[1] == ["(stem)", "encoder.layer.0", "encoder.layer.1", "encoder.layer.10", "(head)"]
    gpt2 = ["wte", "wpe", "h.0.ln_1", "h.0.attn", "h.1.ln_1", "ln_f"]
    assert E.hand_plan(gpt2) == ([0, 2, 4, 5], ["(stem)", "h.0", "h.1", "(head)"])
    assert E.hand_plan(["(root)"]) == ([0], ["(stem)"])


def test_evaluate_target():
    t = E.evaluate_target(241e6, 55.2, 13.4, 14.0, 15.5)
    assert t["bytes_over_peak_ms"] == pytest.approx(241e6 / 55.2e9 * 1e3)
    assert t["target_ms"] == pytest.approx(1.08 * 13.4)
    assert t["pass"] is True
    t = E.evaluate_target(1419e6, 55.2, 21.7, 28.0, 29.1)  # bytes/peak 25.7 bounds it
    assert t["target_ms"] == pytest.approx(1.08 * 1419e6 / 55.2e9 * 1e3)
    assert t["pass_target"] is False and t["pass_pipelined"] is True and t["pass"] is False
    t = E.evaluate_target(100e6, 50.0, None, 5.0, 6.0)
    assert t["target_ms"] is None and t["pass"] is None and t["pass_pipelined"] is True


def test_clean_floats_and_write_json(tmp_path):
    obj = {"a": float("nan"), "b": [1.23456789, float("inf")], "c": {"d": 2}}
    p = tmp_path / "x" / "o.json"
    E.write_json(str(p), E._clean_floats(obj))
    assert json.load(open(p)) == {"a": None, "b": [1.23457, None], "c": {"d": 2}}


def test_parse_args_defaults():
    a = E.parse_args([])
    assert (a.runs, a.ss_runs, a.budget_s, a.warmup, a.models) == (40, 3, 330.0, 2, E.MODELS)
    q = E.parse_args(["--quick", "--skip", "mps,stop_and_start", "--models", "bert_base"])
    assert (q.runs, q.ss_runs, q.budget_s, q.warmup, q.skip, q.models) == (
        10, 1, 115.0, 1, ["mps", "stop_and_start"], ["bert_base"])
    with pytest.raises(SystemExit):
        E.parse_args(["--skip", "nonsense"])


def test_targets_reference_matches_targets_md():
    # The four pipelined numbers of ../shared/TARGETS.md, hard-coded in experiments.py.
    assert {m: r["pipelined_ms"] for m, r in E.TARGETS_REF.items()} == {
        "resnet152": 15.5, "inception_v3": 12.3, "bert_base": 9.1, "gpt2_medium": 29.1}
    shared = os.path.join(E.REPO_ROOT, "..", "shared", "TARGETS.md")
    if os.path.exists(shared):
        text = open(shared).read()
        for m, r in E.TARGETS_REF.items():
            assert "| %s |" % E.MODEL_LABELS[m] in text
            row = [line for line in text.splitlines() if line.startswith("| %s |" % E.MODEL_LABELS[m])][0]
            assert "| %s |" % r["pipelined_ms"] in row


def test_child_protocol_round_trip(tmp_path):
    """Child/Proto over a real pipe, with a tiny stand-in child."""
    code = (
        "import sys; sys.path.insert(0, %r)\n"
        "import experiments as E\n"
        "p = E.Proto()\n"
        "print('library noise goes to stderr')\n"
        "p.send({'ok': True, 'phase': 'cpu'})\n"
        "def boom(msg): raise ValueError('bad')\n"
        "E._child_loop(p, {'echo': lambda msg: {'x': msg['x'] * 2}, 'boom': boom})\n" % HERE)
    ch = E.Child("t", [sys.executable, "-c", code], dict(os.environ))
    try:
        assert ch.recv(30) == {"ok": True, "phase": "cpu"}
        assert ch.request({"cmd": "echo", "x": 21}, 30)["x"] == 42
        with pytest.raises(RuntimeError, match="ValueError: bad"):
            ch.request({"cmd": "boom"}, 30)
        assert ch.request({"cmd": "echo", "x": 1}, 30)["x"] == 2
    finally:
        ch.close()
    assert ch.proc.returncode == 0
    with pytest.raises(E.ChildDied):
        ch.recv(1)


def test_child_timeout_and_death():
    ch = E.Child("sleepy", [sys.executable, "-c", "import time; time.sleep(30)"], dict(os.environ))
    try:
        with pytest.raises(TimeoutError):
            ch.recv(0.3)
    finally:
        ch.proc.kill()
        ch.proc.wait()
    dead = E.Child("dead", [sys.executable, "-c", "pass"], dict(os.environ))
    with pytest.raises(E.ChildDied):
        dead.recv(10)
    dead.close()


def test_merge_takes_the_multi_process_variants_from_phase_b():
    import importlib.util, os
    spec = importlib.util.spec_from_file_location("merge", os.path.join(os.path.dirname(__file__), "merge.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    a = {"argv": ["a"], "models": {"m": {"variants": {"pipeswitch": {"n": 40}, "mps": {"n": 0}}}}, "errors": ["ea"]}
    b = {"argv": ["b"], "mps": {"status": "active"}, "errors": ["eb"],
         "models": {"m": {"variants": {"pipeswitch": {"n": 5}, "mps": {"n": 20}, "stop_and_start": {"n": 2}}}}}
    out = mod.merge(a, b)
    v = out["models"]["m"]["variants"]
    assert v["pipeswitch"] == {"n": 40}, "phase A keeps its own main variants"
    assert v["mps"] == {"n": 20} and v["stop_and_start"] == {"n": 2}
    assert out["mps"] == {"status": "active"} and out["errors"] == ["ea", "eb"]
    assert out["phases"]["B"]["argv"] == ["b"]


def test_plan_checks_of_issue_15():
    from experiments import plan_checks, transfer_ms

    def var(ms):
        return {"stats": {"total_ms": {"median": ms}}}

    mres = {"bytes": int(8e9), "plans": {"optimal": {"predicted_ms": 10.0}, "hand": {"predicted_ms": 10.5},
                                         "per_layer": {"predicted_ms": 11.0}, "one_group": {"predicted_ms": 20.0}}}
    variants = {"pipeswitch": var(10.2), "hand_groups": var(10.1), "per_layer_groups": var(11.0),
                "transfer_then_run": var(19.0)}
    c = plan_checks(mres, variants, 800.0, 9.8)  # bytes/peak = 10 ms
    assert transfer_ms(mres["bytes"], 800.0) == 10.0
    assert c["optimal_within_2pct_of_best_other"] is True  # 10.2 <= 1.02 x 10.1
    assert c["measured_within_3pct_of_predicted"] is True  # 10.2 vs 10.0
    assert c["target_1_05_ms"] == 10.5 and c["meets_1_05"] is True
    variants["pipeswitch"] = var(10.4)
    c = plan_checks(mres, variants, 800.0, 9.8)
    assert c["optimal_within_2pct_of_best_other"] is False
    assert c["measured_within_3pct_of_predicted"] is False  # 4% off
    assert c["meets_1_05"] is True
    c = plan_checks({"bytes": 1}, {}, None, None)
    assert c["optimal_within_2pct_of_best_other"] is None and c["meets_1_05"] is None


def test_plans_table_reads_both_workers():
    import plans_table

    def v(name, ms, pred):
        return {"variant": name, "ms": {"median": ms}, "predicted_ms": pred}

    demo = {"card": "H100", "models": [{
        "model": "resnet152", "bytes_over_peak_ms": 4.6, "target_ms": 9.9, "optimal_group_starts": [0, 2, 30],
        "optimal_within_2pct_of_best_other": True, "within_3pct_of_prediction": False, "meets_target": True,
        "variants": [v("ready", 9.2, 9.2), v("transfer_then_run", 13.7, 13.5), v("pipelined_optimal", 9.4, 9.3),
                     v("pipelined_per_layer", 9.5, 9.6)]}]}
    paper = {"environment": {"card": "H100"}, "models": {"bert_base": {
        "bytes_over_peak_ms": 7.9, "plans": {"optimal": {"groups": 14}},
        "variants": {"ready_torch": {"median": 7.6}},
        "plan_checks": {"measured_ms": {"optimal": 8.2, "hand": 8.24, "per_layer": 8.5, "one_group": 15.0},
                        "predicted_ms": {"optimal": 8.1, "hand": 8.2, "per_layer": 8.6, "one_group": 15.2},
                        "optimal_within_2pct_of_best_other": True, "measured_within_3pct_of_predicted": True,
                        "target_1_05_ms": 8.3, "meets_1_05": True}}}}
    text = plans_table.table([demo, paper])
    lines = text.splitlines()
    assert len(lines) == 4
    assert "| built-in | resnet152 | 9.20 | 4.60 | 9.40 (9.30), 3 groups | - | 9.50 (9.60) | 13.70 (13.50) |" in lines[2]
    assert "**no**" in lines[2]
    assert lines[3].startswith("| PyTorch | bert_base | 7.60 | 7.90 | 8.20 (8.10), 14 groups | 8.24 (8.20) |")


def test_where_the_time_goes_of_a_fused_replay():
    # A fused replay (experiments.py --graphs) records no switch_to call and no copy time:
    # the compute stream spans the whole graph, the host side is launch and synchronize.
    def variant(**fields):
        return {"stats": {k: {"median": v} for k, v in fields.items()}}
    variants = {"pipeswitch": variant(total_ms=5.0, enqueue_ms=0.05, compute_stream_ms=4.8),
                "ready_pipeswitch": variant(total_ms=4.5, enqueue_ms=0.03, compute_stream_ms=4.4),
                "ready_torch": variant(total_ms=6.0)}
    w = E.where_the_time_goes("resnet152", variants, BYTES["resnet152"], 54.8)
    assert w["switch_call_ms"] is None and w["copy_gpu_ms"] is None
    assert w["host_ms"] == pytest.approx(0.2) and w["stall_ms"] == pytest.approx(0.4)
    assert any("fused graph" in n for n in w["notes"]) and not any("switch_to call" in n for n in w["notes"])
    assert E.parse_args(["--graphs"]).fused and not E.parse_args(["--graphs", "--no-fused"]).fused


def test_the_llm_row_of_the_main_table(tmp_path):
    """`pipeswitch bench llm`'s report becomes a row of the main table: time
    to first token per variant, the whole model's bytes over the peak, the
    1.03 x target and its verdict; PyTorch's load from the reference."""
    def st(med):
        return {"median": med, "p10": med - 1, "p90": med + 2}
    llm = {"card": "Test GPU", "config": "llama3-8b", "model_bytes": 16_000_000_000, "h2d_peak_gbps": 50.0,
           "floor_ms": 320.0, "ttft_ms": {"pipelined": st(325.0), "ready": st(150.0), "plain_load": st(480.0)}}
    row = F.llm_row(llm, {"torch_plain_load_ttft_ms": 400.25})
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0].startswith("Llama-3-8B")
    assert cells[1:5] == ["16000 MB", "320.0", "150.0 (149.0-152.0)", "325.0 (324.0-327.0)"]
    assert cells[5] == "480.0 (479.0-482.0)" and cells[6] == "400.2" and cells[7:9] == ["-", "-"]
    assert cells[9] == "329.6" and cells[10] == "yes"  # 1.03 x max(150, 320)
    llm["ttft_ms"]["pipelined"] = st(330.0)
    assert F.llm_row(llm).rstrip(" |").endswith("**no** (> target)")
    # No floor in the report: the bytes over the peak.
    del llm["floor_ms"]
    assert "| 320.0 |" in F.llm_row(llm)
    # In the table and through the command line.
    data = {"models": {}}
    assert "Llama-3-8B" in F.main_table(data, llm) and "its own run, Test GPU" in F.main_table(data, llm)
    paper, lj = tmp_path / "paper.json", tmp_path / "llm.json"
    paper.write_text(json.dumps({"models": {}}))
    lj.write_text(json.dumps(llm))
    out = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "figures.py"), str(paper),
                          "--out-dir", str(tmp_path), "--llm", str(lj)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "| Llama-3-8B (bf16, built-in worker; time to first token) | 16000 MB | 320.0 |" in out.stdout
