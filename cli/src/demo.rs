//! `pipeswitch demo`: the whole PipeSwitch idea end to end on one GPU, with
//! nothing prepared. Writes the three reference models as safetensors files,
//! ingests them into a fresh store, profiles them with the worker, plans
//! them, then switches among them repeatedly (the variants interleaved) and
//! reports, per model: the ready-model latency, transfer-then-run, the
//! pipelined switch with the optimal plan and with one layer per group, and
//! the planner's predicted makespan; plus a Chrome trace of one switch per
//! model (copy and compute streams, one span per group).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use pipeswitch::arena::Arena;
use crate::bench::Stats;
use pipeswitch::cuda::{self, Device};
use pipeswitch::error::{Error, Result};
use pipeswitch::ffi::plan::layer_transfer_ms;
use pipeswitch::model::cpu::example_inputs;
use pipeswitch::model::reference::{reference_models, ModelDef};
use pipeswitch::model::weights::write_model_file;
use pipeswitch::store::Store;
use pipeswitch::switch::Switch;
use pipeswitch::worker::{Program, RunOptions, Worker};
use pipeswitch::{measure, planner};

/// What the demo does.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub device: i32,
    /// Measured switches per model and variant.
    pub reps: usize,
    pub batch: usize,
    pub seq: usize,
    /// Where the model files are written (deleted after ingest unless `keep_files`).
    pub workdir: PathBuf,
    pub keep_files: bool,
    /// Where the JSON report and the trace go.
    pub out_dir: PathBuf,
    /// Only these models (all three when empty).
    pub models: Vec<String>,
    /// Per-group execution overhead `b` given to the planner, ms.
    pub exec_overhead_ms: f64,
    pub seed: u64,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            device: 0,
            reps: 20,
            batch: 8,
            seq: 128,
            workdir: std::env::temp_dir().join("pipeswitch-demo"),
            keep_files: false,
            out_dir: PathBuf::from("bench/results"),
            models: vec![],
            exec_overhead_ms: 0.005,
            seed: 1,
        }
    }
}

/// One variant of one model: total latency of switch + first inference
/// (host wall time from the switch request until the output is ready on
/// the GPU and every byte of the model has arrived).
#[derive(Debug, Clone, Serialize)]
pub struct VariantReport {
    pub variant: String,
    pub groups: usize,
    pub ms: Stats,
    /// Every measured latency, in the order measured.
    pub samples_ms: Vec<f64>,
    /// The output equals the ready model's output, bit for bit.
    pub output_matches_ready: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelReport {
    pub model: String,
    pub bytes: u64,
    pub layers: usize,
    pub ops: usize,
    pub activation_bytes: u64,
    pub gflop: f64,
    /// Sum of the profiled per-layer execution times.
    pub profiled_exec_ms: f64,
    pub bytes_over_peak_ms: f64,
    pub optimal_group_starts: Vec<usize>,
    /// Layers a run waits for (the rest, a token table, is read from host
    /// memory until it arrives).
    pub needed_layers: usize,
    /// Per layer: name, bytes, profiled execution ms.
    pub layer_profile: Vec<(String, u64, f64)>,
    pub predicted_optimal_ms: f64,
    pub predicted_per_layer_ms: f64,
    pub predicted_single_group_ms: f64,
    pub variants: Vec<VariantReport>,
    /// `1.08 * max(ready, bytes / peak)`.
    pub target_ms: f64,
    pub meets_target: bool,
    /// Measured optimal pipelined latency within 10% of the predicted makespan.
    pub within_10pct_of_prediction: bool,
    /// Where the time goes when a target is missed.
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DemoReport {
    pub card: String,
    pub date_unix_s: u64,
    pub command: String,
    pub reps: usize,
    pub batch: usize,
    pub seq: usize,
    pub h2d_peak_gbps: f64,
    pub transfer_overhead_ms: f64,
    pub exec_overhead_ms: f64,
    pub store_pin_ms: f64,
    pub models: Vec<ModelReport>,
    pub trace_file: String,
}

fn bar(len: u64, msg: String) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{msg:32} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_message(msg);
    pb
}

/// Removes the demo's store however the demo ends.
struct StoreGuard(String);
impl Drop for StoreGuard {
    fn drop(&mut self) {
        let _ = Store::destroy(&self.0);
    }
}

/// Per-model state during the demo.
struct Entry {
    def: ModelDef,
    program: Program,
    inputs: HashMap<String, Vec<u8>>,
    optimal: Vec<usize>,
    per_layer: Vec<usize>,
    layer_ms: Vec<f64>,
    ready_output: Vec<f32>,
}

/// The plans of a model and the cost model's makespans for them.
struct Plans {
    /// Group starts for the switch: the optimal plan of the layers a run
    /// waits for, then one group for the rest (a token table stored last).
    optimal: Vec<usize>,
    predicted_optimal_ms: f64,
    predicted_per_layer_ms: f64,
    predicted_single_group_ms: f64,
}

/// Plans `m` from its stored profile. Only the first `needed` layers are
/// waited for by a run: the planner optimises them; the layers after them
/// (token tables) travel last, in a group of their own. A switch is over
/// when both its run and its copies are: the predicted time is the larger
/// of the planner's makespan and the last copy's end.
fn plans(m: &pipeswitch::store::Model, needed: usize, peak_gbps: f64, a: f64, b: f64) -> Result<Plans> {
    let t = layer_transfer_ms(m, peak_gbps)?;
    let x: Vec<f64> = m.layers.iter().map(|l| l.exec_ms).collect();
    let needed = needed.clamp(1, t.len());
    let copies_end = |groups: usize| t.iter().sum::<f64>() + a * groups as f64;
    let best = planner::plan_groups(&t[..needed], &x[..needed], a, b)?;
    let mut optimal = best.group_starts;
    if needed < t.len() {
        optimal.push(needed);
    }
    let per_layer = planner::makespan(&t[..needed], &x[..needed], a, b, &planner::per_layer_plan(needed))?;
    Ok(Plans {
        predicted_optimal_ms: best.makespan_ms.max(copies_end(optimal.len())),
        optimal,
        predicted_per_layer_ms: per_layer.max(copies_end(t.len())),
        predicted_single_group_ms: planner::makespan(&t, &x, a, b, &[0])?,
    })
}

/// The variants, in the order they are interleaved.
const VARIANTS: [&str; 4] = ["ready", "transfer_then_run", "pipelined_optimal", "pipelined_per_layer"];

/// Runs the demo; `log` receives the lines to print.
pub fn run(opts: &DemoOptions, log: &mut dyn FnMut(&str)) -> Result<DemoReport> {
    if !cuda::driver_available() {
        return Err(Error::NoDriver);
    }
    if cuda::Device::count()? <= opts.device {
        return Err(Error::invalid(format!("no CUDA device {}", opts.device)));
    }
    let device = Device::get(opts.device)?;
    let card = device.name()?;
    log(&format!("device {}: {card}", opts.device));
    pipeswitch::kernels::preload(device)?;

    let mut defs = reference_models(opts.batch, opts.seq);
    if !opts.models.is_empty() {
        defs.retain(|d| opts.models.contains(&d.graph.name));
        if defs.is_empty() {
            return Err(Error::invalid(format!("no reference model among {:?} (resnet152, bert-base, gpt2-medium)", opts.models)));
        }
    }

    // 1. Model files.
    std::fs::create_dir_all(&opts.workdir).map_err(|e| Error::io(format!("creating {}", opts.workdir.display()), e))?;
    let mut files = Vec::new();
    for d in &defs {
        let path = opts.workdir.join(format!("{}.safetensors", d.graph.name));
        let pb = bar(d.n_params() as u64 * 4, format!("writing {}", d.graph.name));
        write_model_file(d, &path, opts.seed, &mut |done, _| pb.set_position(done))?;
        pb.finish();
        files.push(path);
    }

    // 2. Store and ingest.
    let store_name = format!("demo-{}", std::process::id());
    let capacity: u64 = defs.iter().map(|d| d.n_params() as u64 * 4 + (64 << 20)).sum();
    let store = Arc::new(Store::create(&store_name, capacity, 16)?);
    let _guard = StoreGuard(store_name.clone());
    for (d, path) in defs.iter().zip(&files) {
        let pb = bar(d.n_params() as u64 * 4, format!("ingesting {}", d.graph.name));
        store.add_safetensors(&d.graph.name, path, None, &mut |done, total| {
            pb.set_length(total);
            pb.set_position(done);
        })?;
        pb.finish();
        if !opts.keep_files {
            let _ = std::fs::remove_file(path);
        }
    }
    let t = Instant::now();
    store.pin(device)?;
    let store_pin_ms = t.elapsed().as_secs_f64() * 1e3;

    // 3. Bandwidth, arena, worker.
    let h2d = measure::measure_h2d(opts.device, 512 << 20, 9)?;
    log(&format!(
        "H2D: peak {:.2} GB/s, per-copy overhead {:.4} ms; store pinned in {store_pin_ms:.0} ms",
        h2d.peak_gbps, h2d.overhead_ms
    ));
    let mut entries = Vec::new();
    for d in defs {
        let program = Program::from_store(&store, &d.graph.name)?;
        let inputs = example_inputs(&d.graph, opts.seed, d.vocab()).iter().map(|(k, v)| (k.clone(), v.to_le_bytes())).collect();
        entries.push(Entry { def: d, program, inputs, optimal: vec![], per_layer: vec![], layer_ms: vec![], ready_output: vec![] });
    }
    let region_bytes = entries.iter().map(|e| e.program.model().bytes).max().unwrap_or(0);
    let act_bytes = entries.iter().map(|e| e.program.activation_bytes()).max().unwrap_or(0);
    let arena = Arc::new(Arena::create(opts.device, region_bytes + act_bytes + (64 << 20), 64 << 20)?);
    let region = arena.alloc(region_bytes)?;
    let mut worker = Worker::new(&arena)?;
    let mut switch = Switch::new(opts.device)?;

    // 4. Profile (each model whole, then runs with an event per op) and plan.
    for e in &mut entries {
        let name = e.program.model().name.clone();
        worker.prepare(&e.program)?;
        switch.start_whole(&store, &name, &arena, region)?;
        for (k, v) in &e.inputs {
            worker.set_input(&e.program, k, v)?;
        }
        let mut per_layer: Vec<Vec<f64>> = Vec::new();
        for i in 0..6 {
            worker.run(&e.program, &switch, RunOptions { profile: true })?;
            if i > 0 {
                per_layer.push(worker.layer_ms(&e.program)?);
            }
        }
        let n = e.program.model().layers.len();
        let exec: Vec<f64> = (0..n).map(|l| measure::median(&mut per_layer.iter().map(|r| r[l]).collect::<Vec<_>>())).collect();
        store.set_layer_exec_ms(&name, &exec)?;
        let output = e.def.graph.outputs[0].clone();
        worker.run(&e.program, &switch, RunOptions::default())?;
        e.ready_output = worker.read_f32(&e.program, &output)?;
        if e.ready_output.iter().any(|v| !v.is_finite()) {
            return Err(Error::Internal(format!("model {name}: the output has non-finite values")));
        }
        let m = store.model(&name)?;
        let p = plans(&m, e.program.needed_layers(), h2d.peak_gbps, h2d.overhead_ms, opts.exec_overhead_ms)?;
        e.optimal = p.optimal.clone();
        e.per_layer = planner::per_layer_plan(n);
        e.layer_ms = exec.clone();
        let plan = p;
        log(&format!(
            "profiled {name}: {n} layers, {:.2} ms of kernels; optimal plan: {} groups, predicted {:.2} ms",
            exec.iter().sum::<f64>(),
            e.optimal.len(),
            plan.predicted_optimal_ms
        ));
    }

    // 5. Interleaved switches: per rep, per model, the variants in a rotating order.
    let mut times: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); VARIANTS.len()]; entries.len()];
    let mut matches: Vec<Vec<bool>> = vec![vec![true; VARIANTS.len()]; entries.len()];
    let pb = ProgressBar::new((opts.reps * entries.len() * VARIANTS.len()) as u64);
    pb.set_message("switching");
    for rep in 0..opts.reps + 1 {
        for (mi, e) in entries.iter().enumerate() {
            let name = e.program.model().name.clone();
            for k in 0..VARIANTS.len() {
                let v = (k + rep) % VARIANTS.len();
                worker.synchronize()?;
                if VARIANTS[v] == "ready" {
                    // Make the model resident first (not timed).
                    switch.start_whole(&store, &name, &arena, region)?;
                    switch.synchronize()?;
                }
                // Inputs are rewritten each time: the region's other models
                // share the activation buffer.
                for (k, val) in &e.inputs {
                    worker.set_input(&e.program, k, val)?;
                }
                switch.synchronize()?;
                let t0 = Instant::now();
                match VARIANTS[v] {
                    "ready" => {}
                    "transfer_then_run" => switch.start_whole(&store, &name, &arena, region)?,
                    "pipelined_optimal" => switch.start(&store, &name, &arena, region, &e.optimal)?,
                    _ => switch.start(&store, &name, &arena, region, &e.per_layer)?,
                }
                worker.run(&e.program, &switch, RunOptions::default())?;
                // Done when the output is ready and the whole model has
                // arrived (token tables may still be in flight after the run).
                worker.synchronize()?;
                switch.synchronize()?;
                let ms = t0.elapsed().as_secs_f64() * 1e3;
                // The first round warms up; its outputs are checked.
                if rep == 0 {
                    let out = worker.read_f32(&e.program, &e.def.graph.outputs[0])?;
                    matches[mi][v] = out == e.ready_output;
                } else {
                    times[mi][v].push(ms);
                    pb.inc(1);
                }
            }
        }
    }
    pb.finish_and_clear();

    // 6. Traced runs per model (an event per op): switches with the optimal
    // and the per-layer plan, and the ready model.
    switch.set_timing(true)?;
    let mut trace = Vec::new();
    let origin = pipeswitch::cuda::Event::new(device, true)?;
    for (mi, e) in entries.iter().enumerate() {
        let name = e.program.model().name.clone();
        for (k, plan) in [&e.optimal, &e.per_layer].into_iter().enumerate() {
            for (key, val) in &e.inputs {
                worker.set_input(&e.program, key, val)?;
            }
            switch.start(&store, &name, &arena, region, plan)?;
            worker.run(&e.program, &switch, RunOptions { profile: true })?;
            worker.synchronize()?;
            let arrivals = switch.group_arrival_ms()?;
            let ops = worker.op_times(&e.program, switch.start_event()?)?;
            let label = format!("switch to {name}, {plan_name}", plan_name = plan_label(k));
            trace_events(&mut trace, mi * 3 + k, &label, e, Some((&switch, &arrivals[..])), &ops.op_start_ms)?;
        }
        switch.synchronize()?;
        origin.record(worker.stream())?;
        worker.run(&e.program, &switch, RunOptions { profile: true })?;
        let ops = worker.op_times(&e.program, &origin)?;
        trace_events(&mut trace, mi * 3 + 2, &format!("{name} ready (already on the GPU)"), e, None, &ops.op_start_ms)?;
    }
    switch.set_timing(false)?;

    // 7. Report.
    let slug = crate::bench::card_slug(&card);
    std::fs::create_dir_all(&opts.out_dir).map_err(|e| Error::io(format!("creating {}", opts.out_dir.display()), e))?;
    let trace_path = opts.out_dir.join(format!("demo-trace-{slug}.json"));
    write_json(&trace_path, &serde_json::json!({ "traceEvents": trace, "displayTimeUnit": "ms" }))?;

    let mut models = Vec::new();
    for (mi, e) in entries.iter().enumerate() {
        let m = store.model(&e.program.model().name)?;
        let (a, b) = (h2d.overhead_ms, opts.exec_overhead_ms);
        let p = plans(&m, e.program.needed_layers(), h2d.peak_gbps, a, b)?;
        let (predicted_optimal_ms, predicted_per_layer_ms, predicted_single_group_ms) =
            (p.predicted_optimal_ms, p.predicted_per_layer_ms, p.predicted_single_group_ms);
        let t = layer_transfer_ms(&m, h2d.peak_gbps)?;
        let x: Vec<f64> = m.layers.iter().map(|l| l.exec_ms).collect();
        let variants: Vec<VariantReport> = VARIANTS
            .iter()
            .enumerate()
            .map(|(v, name)| VariantReport {
                variant: name.to_string(),
                groups: match *name {
                    "ready" => 0,
                    "transfer_then_run" => 1,
                    "pipelined_optimal" => e.optimal.len(),
                    _ => e.per_layer.len(),
                },
                ms: Stats::of(&times[mi][v]),
                samples_ms: times[mi][v].clone(),
                output_matches_ready: matches[mi][v],
            })
            .collect();
        let ready = variants[0].ms.median;
        let optimal = variants[2].ms.median;
        let bytes_over_peak_ms = m.bytes as f64 / (h2d.peak_gbps * 1e6);
        let target_ms = 1.08 * ready.max(bytes_over_peak_ms);
        let within = (optimal - predicted_optimal_ms).abs() <= 0.10 * predicted_optimal_ms;
        let mut notes = Vec::new();
        if optimal > target_ms || !within {
            notes.extend(explain(&m, &t, &x, &e.optimal, a, b, optimal, ready, predicted_optimal_ms));
        }
        models.push(ModelReport {
            model: m.name.clone(),
            bytes: m.bytes,
            layers: m.layers.len(),
            ops: e.def.graph.ops.len(),
            activation_bytes: e.program.activation_bytes(),
            gflop: e.def.graph.flops(&e.def.weight_shapes()) / 1e9,
            profiled_exec_ms: x.iter().sum(),
            bytes_over_peak_ms,
            optimal_group_starts: e.optimal.clone(),
            needed_layers: e.program.needed_layers(),
            layer_profile: m.layers.iter().zip(&e.layer_ms).map(|(l, ms)| (l.name.clone(), l.bytes, *ms)).collect(),
            predicted_optimal_ms,
            predicted_per_layer_ms,
            predicted_single_group_ms,
            variants,
            target_ms,
            meets_target: optimal <= target_ms,
            within_10pct_of_prediction: within,
            notes,
        });
    }
    let report = DemoReport {
        card,
        date_unix_s: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        reps: opts.reps,
        batch: opts.batch,
        seq: opts.seq,
        h2d_peak_gbps: h2d.peak_gbps,
        transfer_overhead_ms: h2d.overhead_ms,
        exec_overhead_ms: opts.exec_overhead_ms,
        store_pin_ms,
        models,
        trace_file: trace_path.display().to_string(),
    };
    let json_path = opts.out_dir.join(format!("demo-{slug}.json"));
    write_json(&json_path, &report)?;
    for line in table(&report) {
        log(&line);
    }
    log(&format!("wrote {} and {}", json_path.display(), trace_path.display()));
    Ok(report)
}

/// Where the time of a pipelined switch goes, from the cost model.
#[allow(clippy::too_many_arguments)]
fn explain(m: &pipeswitch::store::Model, t: &[f64], x: &[f64], plan: &[usize], a: f64, b: f64, measured: f64, ready: f64, predicted: f64) -> Vec<String> {
    let mut notes = Vec::new();
    if let Ok(tl) = planner::timeline(t, x, a, b, plan) {
        let first = &tl[0];
        let stall: f64 = tl.windows(2).map(|w| (w[1].transfer_end_ms - w[0].exec_end_ms).max(0.0)).sum();
        notes.push(format!(
            "model: the first group ({} layers, {:.2} ms of copy) must arrive before any kernel runs; compute then waits {stall:.2} ms in total on later groups",
            first.end_layer - first.first_layer,
            first.transfer_end_ms
        ));
    }
    let exec: f64 = x.iter().sum();
    notes.push(format!(
        "measured {measured:.2} ms vs predicted {predicted:.2} ms; profiled kernels {exec:.2} ms, ready run {ready:.2} ms (the difference is launch and wait overhead not in the profile), copies {:.2} ms at peak",
        t.iter().sum::<f64>()
    ));
    let _ = m;
    notes
}

fn plan_label(k: usize) -> &'static str {
    ["optimal plan", "one layer per group"][k]
}

/// Chrome trace events of one run: per group, its copy (copy stream) and
/// its ops (compute stream), and every op. `switch` is None for a ready run.
fn trace_events(out: &mut Vec<serde_json::Value>, pid: usize, label: &str, e: &Entry, switch: Option<(&Switch, &[f64])>, op_start: &[f64]) -> Result<()> {
    let meta = |tid: usize, what: &str| serde_json::json!({"ph": "M", "pid": pid, "tid": tid, "name": "thread_name", "args": {"name": what}});
    out.push(serde_json::json!({"ph": "M", "pid": pid, "name": "process_name", "args": {"name": label}}));
    out.push(meta(0, "copy stream (groups)"));
    out.push(meta(1, "compute stream (groups)"));
    out.push(meta(2, "compute stream (ops)"));
    let us = |ms: f64| ms * 1e3;
    let span = |tid: usize, label: String, start: f64, end: f64, args: serde_json::Value| {
        serde_json::json!({"ph": "X", "pid": pid, "tid": tid, "name": label, "ts": us(start), "dur": us((end - start).max(0.0)), "args": args})
    };
    let model = e.program.model();
    let n_layers = model.layers.len();
    if let Some((switch, arrivals)) = switch {
        let starts = switch.group_starts()?;
        for (g, &arr) in arrivals.iter().enumerate() {
            let begin = if g == 0 { 0.0 } else { arrivals[g - 1] };
            let end_layer = starts.get(g + 1).copied().unwrap_or(n_layers);
            let (lo, hi) = model.layer_range(starts[g], end_layer).unwrap_or((0, 0));
            out.push(span(0, format!("copy group {g}"), begin, arr, serde_json::json!({"layers": [starts[g], end_layer], "bytes": hi - lo})));
        }
    }
    // Compute: per group, from its first op's start to its last op's end.
    let layers = e.program.op_layers();
    let mut group_of_op = Vec::with_capacity(layers.len());
    let mut cur = 0usize;
    for l in layers {
        if let (Some(l), Some((switch, _))) = (l, switch) {
            cur = cur.max(switch.group_of_layer(*l)?);
        }
        group_of_op.push(cur);
    }
    let mut i = 0;
    while i < group_of_op.len() {
        let g = group_of_op[i];
        let mut j = i;
        while j + 1 < group_of_op.len() && group_of_op[j + 1] == g {
            j += 1;
        }
        out.push(span(1, format!("run group {g}"), op_start[i], op_start[j + 1], serde_json::json!({"ops": [i, j + 1]})));
        i = j + 1;
    }
    for (i, op) in e.def.graph.ops.iter().enumerate() {
        out.push(span(2, format!("{} {}", op.kind(), op.output()), op_start[i], op_start[i + 1], serde_json::json!({"group": group_of_op[i]})));
    }
    Ok(())
}

fn write_json<T: Serialize>(path: &Path, v: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|e| Error::Internal(e.to_string()))?;
    std::fs::write(path, text).map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

/// The demo's table (one row per model; medians, ms).
pub fn table(r: &DemoReport) -> Vec<String> {
    let mut lines = vec![
        format!("{} — switch + first inference, median of {} interleaved runs (ms); H2D peak {:.1} GB/s", r.card, r.reps, r.h2d_peak_gbps),
        format!(
            "| {:<12} | {:>8} | {:>8} | {:>9} | {:>9} | {:>9} | {:>9} | {:>9} | {:>8} | {:>6} |",
            "model", "MB", "bytes/pk", "ready", "xfer+run", "pipe opt", "per-layer", "predicted", "target", "meets"
        ),
        format!("|{}|", ["-"; 10].map(|_| "---").join("|")),
    ];
    for m in &r.models {
        let med = |v: &str| m.variants.iter().find(|x| x.variant == v).map_or(f64::NAN, |x| x.ms.median);
        lines.push(format!(
            "| {:<12} | {:>8.0} | {:>8.2} | {:>9.2} | {:>9.2} | {:>9.2} | {:>9.2} | {:>9.2} | {:>8.2} | {:>6} |",
            m.model,
            m.bytes as f64 / 1e6,
            m.bytes_over_peak_ms,
            med("ready"),
            med("transfer_then_run"),
            med("pipelined_optimal"),
            med("pipelined_per_layer"),
            m.predicted_optimal_ms,
            m.target_ms,
            if m.meets_target && m.within_10pct_of_prediction { "yes" } else { "no" }
        ));
    }
    lines
}
