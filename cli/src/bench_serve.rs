//! `pipeswitch bench serve`: the system's experiments (issue 10), with the
//! three reference models and the built-in worker, each in the same run:
//!
//! 1. switch + first inference through the daemon (client wall time, every
//!    request for another model than the last, the residency area holding
//!    one model) against the same switch in this process and against the
//!    ready model (resident, through the daemon and in this process);
//! 2. the worker ablation: active-standby workers, one worker that is set
//!    up for each model on the critical path, a new process per task;
//! 3. residency: an area that holds two of the three models, a Zipf mix of
//!    requests: hit rate and latency, against an area that holds one;
//! 4. a soak: many requests among small models with several workers; GPU
//!    memory and the processes' resident memory at the start and the end,
//!    no request lost.
//!
//! Writes one JSON report; prints a table.

use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pipeswitch::arena::Arena;
use pipeswitch::client::Client;
use pipeswitch::cuda::Device;
use pipeswitch::error::{Error, Result};
use pipeswitch::ffi::plan::plan_stored_model;
use pipeswitch::model::cpu::{example_inputs, tiny_models};
use pipeswitch::model::reference::{reference_models, ModelDef};
use pipeswitch::model::weights::write_model_file;
use pipeswitch::protocol::io::TensorRef;
use pipeswitch::store::Store;
use pipeswitch::switch::Switch;
use pipeswitch::worker::{Program, RunOptions, Worker};

use crate::bench::Stats;
use crate::serve::{CudaGpu, Daemon, ServeConfig};

/// Settings of a run.
#[derive(Debug, Clone)]
pub struct ServeBenchOptions {
    pub device: i32,
    /// Requests per model and variant.
    pub reps: usize,
    pub zipf_requests: usize,
    pub zipf_s: f64,
    pub soak_requests: usize,
    /// The `pipeswitch` program (its `worker` subcommand is the worker).
    pub exe: PathBuf,
    pub workdir: PathBuf,
}

#[derive(Debug, Serialize)]
pub struct LatencyRow {
    pub model: String,
    pub bytes: u64,
    pub bytes_over_peak_ms: f64,
    pub in_process_ready_ms: Stats,
    pub in_process_switch_ms: Stats,
    /// In process with the request's inputs set from host memory and its
    /// outputs read back (what the daemon's requests carry too).
    pub in_process_request_ready_ms: Stats,
    pub in_process_request_switch_ms: Stats,
    pub daemon_ready_ms: Stats,
    pub daemon_switch_ms: Stats,
    pub activation_ms: Stats,
    /// Of a switched request, as the daemon reports it: waiting in its
    /// queue; the worker from activation to its result; the daemon from the
    /// request's arrival to its result leaving (the rest of the client's
    /// wall time is the sockets and the tensor files).
    pub switch_queued_ms: Stats,
    pub switch_worker_ms: Stats,
    pub switch_daemon_total_ms: Stats,
    /// The same of a ready request (the model again, on the same worker).
    pub ready_worker_ms: Stats,
    pub ready_daemon_total_ms: Stats,
    /// daemon switch median minus in-process switch median.
    pub daemon_overhead_ms: f64,
    /// daemon switch median minus the in-process request's (inputs and
    /// outputs included on both sides): what the daemon itself adds.
    pub daemon_overhead_request_ms: f64,
}

#[derive(Debug, Serialize)]
pub struct AblationRow {
    pub mode: String,
    pub switch_ms: Stats,
    pub workers_started: u64,
}

#[derive(Debug, Serialize)]
pub struct ResidencyRow {
    pub area: String,
    pub requests: usize,
    pub hit_rate: f64,
    pub latency_ms: Stats,
}

#[derive(Debug, Serialize)]
pub struct SoakReport {
    pub requests: usize,
    pub failed: u64,
    pub seconds: f64,
    pub gpu_free_bytes_start: u64,
    pub gpu_free_bytes_end: u64,
    pub rss_kib_start: u64,
    pub rss_kib_end: u64,
    pub workers_lost: u64,
    /// Worker processes at the start and at the end.
    pub workers_start: u32,
    pub workers_end: u32,
}

#[derive(Debug, Serialize)]
pub struct ServeBenchReport {
    pub card: String,
    pub date_unix_s: u64,
    pub h2d_peak_gbps: f64,
    pub conditions: String,
    pub latency: Vec<LatencyRow>,
    pub ablation: Vec<AblationRow>,
    pub residency: Vec<ResidencyRow>,
    pub soak: SoakReport,
}

struct Model {
    def: ModelDef,
    bytes: u64,
    inputs: Vec<(String, u32, Vec<u64>, Vec<u8>)>,
}

impl Model {
    fn refs(&self) -> Vec<TensorRef<'_>> {
        self.inputs.iter().map(|(n, d, s, b)| TensorRef { name: n, dtype: *d, shape: s, data: b }).collect()
    }
}

fn load(store: &Store, defs: Vec<ModelDef>, dir: &Path) -> Result<Vec<Model>> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    let mut out = Vec::new();
    for d in defs {
        let path = dir.join(format!("{}.safetensors", d.graph.name));
        write_model_file(&d, &path, 5, &mut |_, _| {})?;
        store.add_safetensors(&d.graph.name, &path, None, &mut |_, _| {})?;
        let _ = std::fs::remove_file(&path);
        let ins = example_inputs(&d.graph, 5, d.vocab());
        let inputs = d
            .graph
            .inputs
            .iter()
            .map(|(n, decl)| {
                let dtype = if decl.dtype == "I32" { 9 } else { 11 };
                (n.clone(), dtype, decl.shape.iter().map(|&x| x as u64).collect(), ins[n].to_le_bytes())
            })
            .collect();
        out.push(Model { bytes: store.model(&d.graph.name)?.bytes, def: d, inputs });
    }
    Ok(out)
}

/// Resident memory of this process and its children, KiB.
fn rss_kib() -> u64 {
    let me = std::process::id().to_string();
    let mut total = 0;
    let Ok(dir) = std::fs::read_dir("/proc") else { return 0 };
    for e in dir.flatten() {
        let pid = e.file_name().to_string_lossy().to_string();
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        let rest = stat.rsplit_once(") ").map(|r| r.1).unwrap_or("");
        let ppid = rest.split_whitespace().nth(1).unwrap_or("");
        if pid == me || ppid == me {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            total += status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    total
}

struct Served {
    daemon: Daemon,
    client: Client,
}

fn serve(opts: &ServeBenchOptions, store: &str, dir: &Path, residency: u64, standbys: usize, mode: (bool, bool)) -> Result<Served> {
    let worker_region = 512 << 20;
    let cfg = ServeConfig {
        device: opts.device,
        store: store.to_string(),
        socket_dir: dir.join(format!("sock-{}-{}", residency, standbys)),
        residency_bytes: residency,
        worker_region_bytes: worker_region,
        standbys,
        single_worker: mode.0,
        process_per_task: mode.1,
        worker_cmd: vec![opts.exe.clone().into_os_string(), "worker".into()],
        max_queue: 1024,
        hello_timeout: Duration::from_secs(5),
        worker_start_timeout: Duration::from_secs(120),
        max_input_area: crate::serve::DEFAULT_MAX_INPUT_AREA,
        input_areas_bytes: crate::serve::DEFAULT_INPUT_AREAS_BYTES,
    };
    let gpu = CudaGpu::new(opts.device, residency + (standbys as u64 + 2) * worker_region + (64 << 20))?;
    let daemon = Daemon::start(cfg, Box::new(gpu))?;
    let mut client = Client::connect(daemon.socket(), Some(Duration::from_secs(120)))?;
    let t0 = Instant::now();
    while client.stats()?.standbys < standbys.max(usize::from(mode.0)) as u32 {
        if t0.elapsed() > Duration::from_secs(120) {
            return Err(Error::InvalidState("the daemon's workers did not come up in 120 s".into()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // The client's input area, reserved before the first request (as an
    // application that sends images would): the workers map and page-lock
    // it now, off every measured request.
    client.reserve_inputs(INPUT_AREA_BYTES)?;
    Ok(Served { daemon, client })
}

/// The input area of the benchmark's client: what a client reserves by
/// itself (a batch of 8 images is 4.8 MB).
const INPUT_AREA_BYTES: u64 = pipeswitch::client::AUTO_AREA_MIN;

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// Runs the experiments.
pub fn run(opts: &ServeBenchOptions, log: &mut dyn FnMut(&str)) -> Result<ServeBenchReport> {
    if !pipeswitch::cuda::driver_available() {
        return Err(Error::NoDriver);
    }
    let device = Device::get(opts.device)?;
    let card = device.name()?;
    let h2d = pipeswitch::measure::measure_h2d(opts.device, 512 << 20, 9)?;
    log(&format!("{card}: H2D peak {:.2} GB/s", h2d.peak_gbps));
    let store_name = format!("bench-serve-{}", std::process::id());
    let defs = reference_models(8, 128);
    let cap: u64 = defs.iter().map(|d| d.n_params() as u64 * 4 + (64 << 20)).sum::<u64>() + (64 << 20);
    let store = Arc::new(Store::create(&store_name, cap, 16)?);
    struct Guard(String);
    impl Drop for Guard {
        fn drop(&mut self) {
            let _ = Store::destroy(&self.0);
        }
    }
    let _guard = Guard(store_name.clone());
    let models = load(&store, defs, &opts.workdir)?;
    let largest = models.iter().map(|m| m.bytes).max().unwrap_or(0);

    // In this process: profile each model (stored with it, so the daemon's
    // plans use the same profile), then ready and pipelined switch + run.
    let act: u64 = models.iter().map(|m| Program::from_store(&store, &m.def.graph.name).map(|p| p.activation_bytes())).collect::<Result<Vec<_>>>()?.into_iter().max().unwrap_or(0);
    let total: u64 = models.iter().map(|m| m.bytes + (2 << 20)).sum();
    let arena = Arc::new(Arena::create(opts.device, total + act + (64 << 20), 0)?);
    let mut worker = Worker::new(&arena)?;
    let mut in_process = Vec::new();
    for m in &models {
        let name = &m.def.graph.name;
        let program = Program::from_store(&store, name)?;
        worker.prepare(&program)?;
        let region = arena.alloc(m.bytes)?;
        let mut sw = Switch::new(opts.device)?;
        sw.start_whole(&store, name, &arena, region)?;
        for (n, _, _, b) in &m.inputs {
            worker.set_input(&program, n, b)?;
        }
        worker.run(&program, &sw, RunOptions { profile: true })?;
        worker.synchronize()?;
        store.set_layer_exec_ms(name, &worker.layer_ms(&program)?)?;
        let stored = store.model(name)?;
        let plan = plan_stored_model(&stored, h2d.peak_gbps, h2d.overhead_ms, 0.005)?.group_starts;
        let (mut ready, mut switched) = (Vec::new(), Vec::new());
        for _ in 0..opts.reps {
            let t = Instant::now();
            sw.start_resident(&store, name, &arena, region)?;
            worker.run(&program, &sw, RunOptions::default())?;
            worker.synchronize()?;
            ready.push(ms_since(t));
            let t = Instant::now();
            sw.start(&store, name, &arena, region, &plan)?;
            worker.run(&program, &sw, RunOptions::default())?;
            worker.synchronize()?;
            sw.synchronize()?;
            switched.push(ms_since(t));
        }
        // The same as a request of a server that links the library: its
        // inputs from host memory first, its outputs read back to host
        // memory at the end (what the daemon's requests carry too).
        let mut outs: Vec<(String, Vec<u8>)> = Vec::new();
        for n in &program.graph().outputs {
            outs.push((n.clone(), vec![0u8; program.slot(n)?.bytes as usize]));
        }
        let (mut req_ready, mut req_switched) = (Vec::new(), Vec::new());
        for _ in 0..opts.reps {
            for resident in [true, false] {
                let t = Instant::now();
                for (n, _, _, b) in &m.inputs {
                    worker.set_input(&program, n, b)?;
                }
                if resident {
                    sw.start_resident(&store, name, &arena, region)?;
                } else {
                    sw.start(&store, name, &arena, region, &plan)?;
                }
                worker.run(&program, &sw, RunOptions::default())?;
                for (n, buf) in outs.iter_mut() {
                    worker.read(&program, n, buf)?;
                }
                sw.synchronize()?;
                if resident { req_ready.push(ms_since(t)) } else { req_switched.push(ms_since(t)) }
            }
        }
        in_process.push((Stats::of(&ready), Stats::of(&switched), Stats::of(&req_ready), Stats::of(&req_switched)));
    }
    drop(worker);
    drop(arena);
    log("in-process baselines done");

    // 1. Through the daemon: an area for one model, so that every request
    // for another model switches.
    let mut s = serve(opts, &store_name, &opts.workdir, largest + (1 << 20), 2, (false, false))?;
    let n = models.len();
    let (mut sw_ms, mut ready_ms, mut act_ms) = (vec![Vec::new(); n], vec![Vec::new(); n], vec![Vec::new(); n]);
    // Per model: the daemon's timings of switched and ready requests.
    let mut sw_t: Vec<Vec<pipeswitch::protocol::Timing>> = vec![Vec::new(); n];
    let mut rd_t: Vec<Vec<pipeswitch::protocol::Timing>> = vec![Vec::new(); n];
    for r in 0..opts.reps + 1 {
        for (i, m) in models.iter().enumerate() {
            let t = Instant::now();
            let out = s.client.infer(&m.def.graph.name, &m.refs())?;
            let switch = ms_since(t);
            let t = Instant::now();
            let again = s.client.infer(&m.def.graph.name, &m.refs())?;
            let ready = ms_since(t);
            if r > 0 {
                sw_ms[i].push(switch);
                ready_ms[i].push(ready);
                act_ms[i].push(out.timing.activation_ms);
                sw_t[i].push(out.timing);
                rd_t[i].push(again.timing);
            }
        }
    }
    let of = |v: &[pipeswitch::protocol::Timing], f: fn(&pipeswitch::protocol::Timing) -> f64| {
        Stats::of(&v.iter().map(f).collect::<Vec<f64>>())
    };
    s.daemon.stop()?;
    let latency: Vec<LatencyRow> = models
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let daemon_switch_ms = Stats::of(&sw_ms[i]);
            LatencyRow {
                model: m.def.graph.name.clone(),
                bytes: m.bytes,
                bytes_over_peak_ms: m.bytes as f64 / (h2d.peak_gbps * 1e6),
                in_process_ready_ms: in_process[i].0.clone(),
                daemon_overhead_ms: daemon_switch_ms.median - in_process[i].1.median,
                daemon_overhead_request_ms: daemon_switch_ms.median - in_process[i].3.median,
                in_process_switch_ms: in_process[i].1.clone(),
                in_process_request_ready_ms: in_process[i].2.clone(),
                in_process_request_switch_ms: in_process[i].3.clone(),
                daemon_ready_ms: Stats::of(&ready_ms[i]),
                daemon_switch_ms,
                activation_ms: Stats::of(&act_ms[i]),
                switch_queued_ms: of(&sw_t[i], |t| t.queued_ms),
                switch_worker_ms: of(&sw_t[i], |t| t.worker_ms),
                switch_daemon_total_ms: of(&sw_t[i], |t| t.total_ms),
                ready_worker_ms: of(&rd_t[i], |t| t.worker_ms),
                ready_daemon_total_ms: of(&rd_t[i], |t| t.total_ms),
            }
        })
        .collect();
    log("daemon latencies done");

    // 2. Worker ablation, the same alternating requests.
    let mut ablation = Vec::new();
    for (label, standbys, mode) in [("active-standby", 2, (false, false)), ("single worker", 0, (true, false)), ("process per task", 0, (false, true))] {
        let mut s = serve(opts, &store_name, &opts.workdir, largest + (1 << 20), standbys, mode)?;
        let mut v = Vec::new();
        for r in 0..opts.reps.min(10) + 1 {
            for m in &models {
                let t = Instant::now();
                s.client.infer(&m.def.graph.name, &m.refs())?;
                if r > 0 {
                    v.push(ms_since(t));
                }
            }
        }
        let st = s.client.stats()?;
        s.daemon.stop()?;
        ablation.push(AblationRow { mode: label.into(), switch_ms: Stats::of(&v), workers_started: st.workers_started });
        log(&format!("ablation {label} done"));
    }

    // 3. Residency with a Zipf mix: two of three models fit, against one.
    let mut sizes: Vec<u64> = models.iter().map(|m| m.bytes.next_multiple_of(256)).collect();
    sizes.sort_unstable();
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let weights: Vec<f64> = (1..=n).map(|k| 1.0 / (k as f64).powf(opts.zipf_s)).collect();
    let wsum: f64 = weights.iter().sum();
    let mix: Vec<usize> = (0..opts.zipf_requests)
        .map(|_| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let mut u = (rng >> 11) as f64 / (1u64 << 53) as f64 * wsum;
            weights.iter().position(|w| {
                u -= w;
                u <= 0.0
            }).unwrap_or(n - 1)
        })
        .collect();
    let mut residency = Vec::new();
    for (label, bytes) in [("two of three models", sizes[n - 1] + sizes[n - 2]), ("one model", sizes[n - 1])] {
        let mut s = serve(opts, &store_name, &opts.workdir, bytes, 2, (false, false))?;
        let mut v = Vec::new();
        for &i in &mix {
            let t = Instant::now();
            s.client.infer(&models[i].def.graph.name, &models[i].refs())?;
            v.push(ms_since(t));
        }
        let st = s.client.stats()?;
        s.daemon.stop()?;
        residency.push(ResidencyRow {
            area: label.into(),
            requests: mix.len(),
            hit_rate: st.hits as f64 / (st.hits + st.misses).max(1) as f64,
            latency_ms: Stats::of(&v),
        });
    }
    log("residency done");

    // 4. Soak with small models (their switches take a millisecond).
    let tiny = load(&store, tiny_models(2, 16).into_iter().take(3).collect(), &opts.workdir)?;
    let mut tsizes: Vec<u64> = tiny.iter().map(|m| m.bytes.next_multiple_of(256)).collect();
    tsizes.sort_unstable();
    const SOAK_STANDBYS: usize = 3;
    let mut s = serve(opts, &store_name, &opts.workdir, tsizes[2] + tsizes[1], SOAK_STANDBYS, (false, false))?;
    let warm: Vec<&Model> = tiny.iter().collect();
    for m in &warm {
        s.client.infer(&m.def.graph.name, &m.refs())?;
    }
    // The replacement standbys the warm-up started are up (their contexts
    // counted) before the first measurement.
    let t0 = Instant::now();
    while (s.client.stats()?.standbys as usize) < SOAK_STANDBYS && t0.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let workers_start = s.client.stats()?.workers;
    let (gpu_free_bytes_start, _) = device.memory_info()?;
    let rss_kib_start = rss_kib();
    let t0 = Instant::now();
    let mut failed = 0;
    for k in 0..opts.soak_requests {
        let m = &tiny[(k * 7 + k / 3) % tiny.len()];
        if s.client.infer(&m.def.graph.name, &m.refs()).is_err() {
            failed += 1;
        }
    }
    let seconds = t0.elapsed().as_secs_f64();
    let (gpu_free_bytes_end, _) = device.memory_info()?;
    let rss_kib_end = rss_kib();
    let st = s.client.stats()?;
    s.daemon.stop()?;
    let soak = SoakReport {
        requests: opts.soak_requests,
        failed: failed + st.failed,
        seconds,
        gpu_free_bytes_start,
        gpu_free_bytes_end,
        rss_kib_start,
        rss_kib_end,
        workers_lost: st.workers_lost,
        workers_start,
        workers_end: st.workers,
    };
    log("soak done");
    Ok(ServeBenchReport {
        card,
        date_unix_s: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        h2d_peak_gbps: h2d.peak_gbps,
        conditions: format!(
            "reference models, fp32, batch 8 (224x224 images, 128 tokens), built-in worker; {} requests per model and variant, \
             every switched request for another model than the last; Zipf s = {} over {} requests; soak: {} requests among \
             three small models, three workers; the client's inputs in its input area of {} MiB (page-locked by every worker)",
            opts.reps, opts.zipf_s, opts.zipf_requests, opts.soak_requests, INPUT_AREA_BYTES >> 20
        ),
        latency,
        ablation,
        residency,
        soak,
    })
}

/// The report as table lines.
pub fn table(r: &ServeBenchReport) -> Vec<String> {
    let mut out = vec![
        format!("{} — medians in ms (p10-p90); H2D peak {:.1} GB/s", r.card, r.h2d_peak_gbps),
        "| model | bytes/peak | ready, in process | ready, daemon | switch, in process | switch, daemon | daemon - in process | activation |".into(),
        "|---|---|---|---|---|---|---|---|".into(),
    ];
    let f = |s: &Stats| format!("{:.2} ({:.2}-{:.2})", s.median, s.p10, s.p90);
    for l in &r.latency {
        out.push(format!(
            "| {} | {:.2} | {} | {} | {} | {} | {:+.2} | {:.3} |",
            l.model,
            l.bytes_over_peak_ms,
            f(&l.in_process_ready_ms),
            f(&l.daemon_ready_ms),
            f(&l.in_process_switch_ms),
            f(&l.daemon_switch_ms),
            l.daemon_overhead_ms,
            l.activation_ms.median
        ));
    }
    out.push(String::new());
    out.push("| model | request in process: ready | request in process: switch | daemon - request in process | switch: queued | switch: worker | switch: in the daemon | ready: worker | ready: in the daemon |".into());
    out.push("|---|---|---|---|---|---|---|---|---|".into());
    for l in &r.latency {
        out.push(format!(
            "| {} | {} | {} | {:+.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
            l.model,
            f(&l.in_process_request_ready_ms),
            f(&l.in_process_request_switch_ms),
            l.daemon_overhead_request_ms,
            l.switch_queued_ms.median,
            l.switch_worker_ms.median,
            l.switch_daemon_total_ms.median,
            l.ready_worker_ms.median,
            l.ready_daemon_total_ms.median
        ));
    }
    out.push(String::new());
    out.push("| workers | switch + first inference, all models | processes started |".into());
    out.push("|---|---|---|".into());
    for a in &r.ablation {
        out.push(format!("| {} | {} | {} |", a.mode, f(&a.switch_ms), a.workers_started));
    }
    out.push(String::new());
    out.push("| residency area | requests | hit rate | latency |".into());
    out.push("|---|---|---|---|".into());
    for x in &r.residency {
        out.push(format!("| {} | {} | {:.0}% | {} |", x.area, x.requests, x.hit_rate * 100.0, f(&x.latency_ms)));
    }
    let s = &r.soak;
    out.push(String::new());
    out.push(format!(
        "soak: {} requests in {:.1} s, {} failed, {} workers lost, {} -> {} worker processes; GPU free {} -> {} MiB; RSS {} -> {} MiB",
        s.requests,
        s.seconds,
        s.failed,
        s.workers_lost,
        s.workers_start,
        s.workers_end,
        s.gpu_free_bytes_start >> 20,
        s.gpu_free_bytes_end >> 20,
        s.rss_kib_start >> 10,
        s.rss_kib_end >> 10
    ));
    out
}
