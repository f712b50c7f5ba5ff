//! `pipeswitch`: the command-line tool over libpipeswitch.

use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use pipeswitch::error::{Error, Result};
use pipeswitch::ffi::plan::layer_transfer_ms;
use pipeswitch::store::Store;
use pipeswitch::planner::Costs;
use pipeswitch::{measure, planner};

use pipeswitch_cli::{bench, bench_gemm, bench_kernels, bench_llm, bench_serve, demo};

#[derive(Parser)]
#[command(name = "pipeswitch", version, about = "Millisecond GPU model switching: store, plan, switch, measure")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Manage a host model store (shared memory, /dev/shm/pipeswitch-<name>).
    #[command(subcommand)]
    Store(StoreCmd),
    /// Compute the optimal layer grouping of a stored model.
    Plan {
        store: String,
        model: String,
        /// H2D bandwidth in GB/s (default: measured on the GPU).
        #[arg(long)]
        bandwidth_gbps: Option<f64>,
        /// Per-group transfer overhead a, ms (default: measured on the GPU).
        #[arg(long)]
        transfer_overhead_ms: Option<f64>,
        /// Per-group execution overhead b, ms.
        #[arg(long, default_value_t = 0.005)]
        exec_overhead_ms: f64,
        /// Execution time per layer when the model has none measured: a
        /// multiple of its transfer time (e.g. 1.0).
        #[arg(long)]
        assume_exec_ratio: Option<f64>,
        #[arg(long, default_value_t = 0)]
        device: i32,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Measure the H2D bandwidth and per-copy overhead on a GPU.
    Measure {
        #[arg(long, default_value_t = 0)]
        device: i32,
    },
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCmd),
    /// Run the daemon that owns one GPU: the store, the device arena, the
    /// residency of models, standby workers and a queue of inference
    /// requests, on a Unix socket in a private directory. Stop it with
    /// SIGTERM or SIGINT (Ctrl-C).
    ///
    /// Example: `pipeswitch store create models --size 8G`, add models, then
    /// `pipeswitch serve --store models`; clients connect to
    /// `$XDG_RUNTIME_DIR/pipeswitch/gpu0.sock` (or /tmp/pipeswitch-<uid>/).
    Serve {
        /// The store that holds the models.
        #[arg(long)]
        store: String,
        #[arg(long, default_value_t = 0)]
        device: i32,
        /// Bytes of GPU memory for the arena (models and worker regions), e.g. 16G.
        #[arg(long, default_value = "8G", value_parser = parse_size)]
        arena_size: u64,
        /// Bytes of the arena that keep models resident (default: what the
        /// worker regions leave: one per standby, the active worker and a
        /// training job's worker).
        #[arg(long, value_parser = parse_size)]
        residency_size: Option<u64>,
        /// Activation bytes of each worker.
        #[arg(long, default_value = "512M", value_parser = parse_size)]
        worker_region: u64,
        /// Standby workers kept ready.
        #[arg(long, default_value_t = 2)]
        standbys: usize,
        /// Ablation: one worker serves every model, set up for each on the
        /// critical path (no standby).
        #[arg(long, conflicts_with = "process_per_task")]
        single_worker: bool,
        /// Ablation: a new worker process for every task (process start and
        /// CUDA context on the critical path).
        #[arg(long)]
        process_per_task: bool,
        /// The worker command (default: this program's `worker`).
        #[arg(long, num_args = 1.., allow_hyphen_values = true)]
        worker_cmd: Option<Vec<String>>,
        /// Directory of the socket (default $PIPESWITCH_SOCKET_DIR,
        /// $XDG_RUNTIME_DIR/pipeswitch or /tmp/pipeswitch-<uid>).
        #[arg(long)]
        socket_dir: Option<PathBuf>,
        /// Requests queued at most.
        #[arg(long, default_value_t = 1024)]
        max_queue: usize,
        /// The largest input area a client may give (its shared memory for
        /// requests' inputs, page-locked by every worker).
        #[arg(long, default_value = "256M", value_parser = parse_size)]
        max_input_area: u64,
        /// The bytes of all clients' input areas together; a client refused
        /// an area sends its inputs with each request.
        #[arg(long, default_value = "1G", value_parser = parse_size)]
        input_areas_size: u64,
    },
    /// A built-in worker process for `pipeswitch serve` (the daemon starts
    /// these itself; the socket comes in PIPESWITCH_SOCKET).
    Worker {
        #[arg(long, env = "PIPESWITCH_SOCKET")]
        socket: PathBuf,
    },
    /// The whole idea end to end: writes, ingests, profiles and plans the
    /// three reference models (ResNet-152, BERT-base, GPT-2 medium), switches
    /// among them and prints ready / transfer-then-run / pipelined latencies;
    /// writes a JSON report and a Chrome trace (open it in Perfetto).
    Demo {
        #[arg(long, default_value_t = 0)]
        device: i32,
        /// Measured switches per model and variant.
        #[arg(long, default_value_t = 20)]
        reps: usize,
        /// Where the JSON report and the trace are written.
        #[arg(long, default_value = "bench/results")]
        out_dir: PathBuf,
        /// Where the model files are written (default: the temp dir).
        #[arg(long)]
        workdir: Option<PathBuf>,
        /// Keep the model files after ingesting them.
        #[arg(long)]
        keep_files: bool,
        /// Only these models (resnet152, bert-base, gpt2-medium); or, alone,
        /// llama3-8b (tiny-llama: its small configuration): the LLM run of
        /// `pipeswitch bench llm`.
        #[arg(long, value_delimiter = ',')]
        models: Vec<String>,
        /// Switches per calibration plan of the cost model's fit.
        #[arg(long, default_value_t = 5)]
        calibration_reps: usize,
        /// Refit-and-replan rounds of the closed loop, at most.
        #[arg(long, default_value_t = 4)]
        max_rounds: usize,
    },
}

#[derive(Subcommand)]
enum StoreCmd {
    /// Create a store with room for SIZE bytes of models (e.g. 8G, 512M).
    Create {
        name: String,
        #[arg(long, value_parser = parse_size)]
        size: u64,
        #[arg(long, default_value_t = pipeswitch::store::DEFAULT_MAX_MODELS)]
        max_models: u32,
    },
    /// Add the model in a safetensors file.
    Add {
        store: String,
        model: String,
        file: PathBuf,
        /// Layer names in execution order, comma-separated (default: the
        /// file's pipeswitch.layers metadata, else the tensor-name prefixes).
        #[arg(long, value_delimiter = ',')]
        layers: Option<Vec<String>>,
    },
    /// Add a Llama: a Hugging Face directory (config.json and *.safetensors
    /// shards) or, with --random, deterministic random weights of a known
    /// configuration (llama3-8b, tiny), written straight into the store.
    AddLlama {
        store: String,
        model: String,
        /// The Hugging Face directory.
        #[arg(long, conflicts_with = "random", required_unless_present = "random")]
        hf_dir: Option<PathBuf>,
        /// llama3-8b or tiny: random weights of that configuration.
        #[arg(long)]
        random: Option<String>,
        /// Rows of the rotary table: the longest sequence a run may reach.
        #[arg(long, default_value_t = 2048)]
        max_positions: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// List the models of a store.
    List { store: String },
    /// Show a model's layers and tensors.
    Show { store: String, model: String },
    /// Remove a model.
    Remove { store: String, model: String },
    /// Delete the store itself.
    Destroy { name: String },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Store-to-arena transfer of real-sized models vs the card's H2D peak.
    Transfer {
        #[arg(long, default_value_t = 0)]
        device: i32,
        #[arg(long, default_value_t = 20)]
        reps: usize,
        /// Where to write the JSON (default: bench/results/transfer-<card>.json).
        #[arg(long)]
        json_out: Option<PathBuf>,
    },
    /// An 8B Llama switched in and served: time to first token (pipelined
    /// switch, ready, plain load, sleep-mode-like wake) against the PCIe
    /// floor, decoding against the HBM roofline, two and three models.
    Llm {
        #[arg(long, default_value_t = 0)]
        device: i32,
        /// llama3-8b or tiny.
        #[arg(long, default_value = "llama3-8b")]
        config: String,
        /// A Hugging Face directory (config.json + *.safetensors) instead of random weights.
        #[arg(long)]
        hf_dir: Option<PathBuf>,
        /// Models in the store (1 to 3; 2 and 3 add the multi-model runs).
        #[arg(long, default_value_t = 1)]
        models: usize,
        #[arg(long, default_value_t = 5)]
        reps: usize,
        #[arg(long, default_value_t = 128)]
        prompt: usize,
        #[arg(long, default_value_t = 32)]
        decode_steps: usize,
        /// Keep the store and write a manifest for scripts/llm_torch_ref.py.
        #[arg(long)]
        keep_store: bool,
        #[arg(long)]
        store_name: Option<String>,
        #[arg(long, default_value = "bench/results")]
        out_dir: PathBuf,
    },
    /// Our GEMM kernels vs cuBLAS through PyTorch (bench/gemm.sh runs both).
    Gemm {
        #[arg(long, default_value_t = 0)]
        device: i32,
        #[arg(long, default_value_t = 50)]
        reps: usize,
        /// JSON from bench/gemm_torch.py run on the same card.
        #[arg(long)]
        torch: Option<PathBuf>,
        /// Also time every block tile forced in turn (tile-choice check).
        #[arg(long)]
        all_tiles: bool,
        /// Where to write the JSON (default: bench/results/gemm-<card>.json).
        #[arg(long)]
        json_out: Option<PathBuf>,
    },
    /// Our conv kernels at every ResNet-152 shape (each tile and the automatic
    /// choice) and the transformer kernels at the demo's shapes.
    Kernels {
        #[arg(long, default_value_t = 0)]
        device: i32,
        #[arg(long, default_value_t = 20)]
        reps: usize,
    },
    /// The daemon's experiments with the reference models: switch latency
    /// through the daemon vs in this process vs ready, the worker ablation
    /// (standbys / one worker / a process per task), residency under a Zipf
    /// mix, and a soak.
    Serve {
        #[arg(long, default_value_t = 0)]
        device: i32,
        #[arg(long, default_value_t = 20)]
        reps: usize,
        #[arg(long, default_value_t = 300)]
        zipf_requests: usize,
        #[arg(long, default_value_t = 1.1)]
        zipf_s: f64,
        #[arg(long, default_value_t = 10_000)]
        soak_requests: usize,
        /// Where to write the JSON (default: bench/results/serve-<card>.json).
        #[arg(long)]
        json_out: Option<PathBuf>,
    },
}

/// A size on the command line (`pipeswitch::units::parse_size`: `512M`,
/// `1.5G`, ...); at least one byte.
fn parse_size(s: &str) -> std::result::Result<u64, String> {
    match pipeswitch::units::parse_size(s)? {
        0 => Err(format!("{s:?}: a size of at least one byte")),
        n => Ok(n),
    }
}

fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Error::NoDriver) => {
            eprintln!("pipeswitch: no CUDA driver found: this command needs an NVIDIA GPU");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("pipeswitch: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Store(cmd) => store_cmd(cmd),
        Command::Plan { store, model, bandwidth_gbps, transfer_overhead_ms, exec_overhead_ms, assume_exec_ratio, device, json } => {
            let s = Store::open(&store)?;
            let m = s.model(&model)?;
            // A fitted cost model stored with the model (pipeswitch demo, the
            // Python calibrate) gives the terms, the bandwidth and a.
            let stored = s.cost(&model)?;
            let (bw, a) = match (bandwidth_gbps, transfer_overhead_ms, &stored) {
                (Some(bw), Some(a), _) => (bw, a),
                (bw, a, Some(c)) => (bw.unwrap_or(c.bandwidth_gbps), a.unwrap_or(c.costs.transfer_overhead_ms)),
                (bw, a, None) => {
                    let p = measure::measure_h2d(device, 256 << 20, 9)?;
                    (bw.unwrap_or(p.peak_gbps), a.unwrap_or(p.overhead_ms))
                }
            };
            let costs = match &stored {
                Some(c) => Costs { transfer_overhead_ms: a, ..c.costs },
                None => Costs::new(a, exec_overhead_ms),
            };
            let t = layer_transfer_ms(&m, bw)?;
            let x: Vec<f64> = match assume_exec_ratio {
                Some(r) if m.layers.iter().any(|l| l.exec_ms.is_nan()) => t.iter().map(|v| v * r).collect(),
                _ => m.layers.iter().map(|l| l.exec_ms).collect(),
            };
            if x.iter().any(|v| v.is_nan()) {
                return Err(Error::InvalidState(format!(
                    "model {model:?} has no measured execution times; pass --assume-exec-ratio R to plan with R x transfer time"
                )));
            }
            let plan = planner::plan_groups_with(&t, &x, &costs)?;
            let timeline = planner::timeline_with(&t, &x, &costs, &plan.group_starts)?;
            let per_layer = planner::makespan_with(&t, &x, &costs, &planner::per_layer_plan(t.len()))?;
            let single = planner::makespan_with(&t, &x, &costs, &planner::single_group_plan(t.len()))?;
            if json {
                let v = serde_json::json!({
                    "model": model, "bandwidth_gbps": bw, "transfer_overhead_ms": a,
                    "exec_overhead_ms": costs.exec_overhead_ms, "costs": costs, "group_starts": plan.group_starts,
                    "makespan_ms": plan.makespan_ms,
                    "per_layer_makespan_ms": per_layer,
                    "single_group_makespan_ms": single,
                    "stored_cost": stored,
                });
                println!("{}", serde_json::to_string_pretty(&v).map_err(|e| Error::Internal(e.to_string()))?);
            } else {
                println!("model {model}: {} layers, {}, bandwidth {bw:.2} GB/s, a = {a:.4} ms, b = {:.4} ms", m.layers.len(), human(m.bytes), costs.exec_overhead_ms);
                match &stored {
                    Some(c) => {
                        println!(
                            "fitted cost model (stored): L = {:.4} ms, κ = {:.4}, σ = {:.4}, floor R = {:.3} ms + h = {:.4} ms per group; fit rms {:.2}%, {} refit rounds",
                            c.costs.first_kernel_ms,
                            c.costs.exec_scale,
                            c.costs.copy_slowdown,
                            c.costs.floor_ms,
                            c.costs.floor_per_group_ms,
                            c.fit_rms_rel_error * 100.0,
                            c.rounds
                        );
                        println!(
                            "chosen plan when fitted: {} groups, predicted {:.3} ms, measured {:.3} ms ({:+.1}%)",
                            c.groups,
                            c.predicted_ms,
                            c.measured_ms,
                            (c.measured_ms / c.predicted_ms - 1.0) * 100.0
                        );
                    }
                    None => println!("no fitted cost model stored (pipeswitch demo or pipeswitch.torch.calibrate_module store one): the two-overhead model"),
                }
                println!("{:>5} {:>7} {:>7} {:>10} {:>10} {:>10} {:>10}", "group", "first", "end", "bytes", "copy end", "run start", "run end");
                for (g, tl) in timeline.iter().enumerate() {
                    let (s, e) = m.layer_range(tl.first_layer, tl.end_layer).unwrap_or((0, 0));
                    println!(
                        "{g:>5} {:>7} {:>7} {:>10} {:>10.3} {:>10.3} {:>10.3}",
                        tl.first_layer, tl.end_layer, human(e - s), tl.transfer_end_ms, tl.exec_start_ms, tl.exec_end_ms
                    );
                }
                println!("makespan: optimal {:.3} ms, one group per layer {per_layer:.3} ms, one group {single:.3} ms", plan.makespan_ms);
            }
            Ok(())
        }
        Command::Serve {
            store,
            device,
            arena_size,
            residency_size,
            worker_region,
            standbys,
            single_worker,
            process_per_task,
            worker_cmd,
            socket_dir,
            max_queue,
            max_input_area,
            input_areas_size,
        } => {
            let mode = (single_worker, process_per_task);
            let areas = (max_input_area, input_areas_size);
            serve_cmd(store, device, arena_size, residency_size, worker_region, standbys, mode, worker_cmd, socket_dir, max_queue, areas)
        }
        Command::Worker { socket } => {
            init_logging();
            pipeswitch_cli::worker::run(&socket)
        }
        Command::Demo { device, reps, out_dir, workdir: _, keep_files: _, models, calibration_reps: _, max_rounds: _ }
            if models.iter().any(|m| m == "llama3-8b" || m == "tiny-llama") =>
        {
            if models.len() != 1 {
                return Err(pipeswitch::error::Error::invalid("the LLM demo runs alone: --models llama3-8b (or tiny-llama)"));
            }
            let tiny = models[0] == "tiny-llama";
            let opts = bench_llm::LlmOptions {
                device,
                config: if tiny { "tiny".into() } else { "llama3-8b".into() },
                reps: reps.clamp(1, 10),
                // The tiny configuration has 64 positions.
                prompt: if tiny { 32 } else { 128 },
                decode_steps: if tiny { 16 } else { 32 },
                out_dir,
                ..Default::default()
            };
            bench_llm::run(&opts, &mut |line| println!("{line}")).map(|_| ())
        }
        Command::Demo { device, reps, out_dir, workdir, keep_files, models, calibration_reps, max_rounds } => {
            let mut opts = demo::DemoOptions {
                device,
                reps: reps.max(1),
                out_dir,
                keep_files,
                models,
                calibration_reps: calibration_reps.max(1),
                max_rounds,
                ..Default::default()
            };
            if let Some(w) = workdir {
                opts.workdir = w;
            }
            demo::run(&opts, &mut |line| println!("{line}")).map(|_| ())
        }
        Command::Measure { device } => {
            let p = measure::measure_h2d(device, 1 << 30, 9)?;
            println!("H2D peak (one 1 GiB copy): {:.2} GB/s", p.peak_gbps);
            println!("per-copy overhead a: {:.4} ms (fit bandwidth {:.2} GB/s)", p.overhead_ms, p.fit_gbps);
            for (b, ms) in &p.samples {
                println!("  {:>10}  {ms:.4} ms  {:.2} GB/s", human(*b), *b as f64 / (ms * 1e6));
            }
            Ok(())
        }
        Command::Bench(BenchCmd::Transfer { device, reps, json_out }) => {
            let report = bench::run_transfer(device, reps.max(3), &mut |line| println!("{line}"))?;
            let slug = bench::card_slug(&report.card);
            let path = json_out.unwrap_or_else(|| PathBuf::from(format!("bench/results/transfer-{slug}.json")));
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
            }
            let text = serde_json::to_string_pretty(&report).map_err(|e| Error::Internal(e.to_string()))?;
            std::fs::write(&path, text).map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
            println!("targets: {}", report.targets);
            println!("wrote {}", path.display());
            Ok(())
        }
        Command::Bench(BenchCmd::Serve { device, reps, zipf_requests, zipf_s, soak_requests, json_out }) => {
            init_logging();
            let workdir = std::env::temp_dir().join(format!("pipeswitch-bench-serve-{}", std::process::id()));
            let opts = bench_serve::ServeBenchOptions {
                device,
                reps: reps.max(3),
                zipf_requests,
                zipf_s,
                soak_requests,
                exe: std::env::current_exe().map_err(|e| Error::io("locating this program", e))?,
                workdir: workdir.clone(),
            };
            let report = bench_serve::run(&opts, &mut |line| eprintln!("{line}"));
            let _ = std::fs::remove_dir_all(&workdir);
            let report = report?;
            for line in bench_serve::table(&report) {
                println!("{line}");
            }
            let path = json_out.unwrap_or_else(|| PathBuf::from(format!("bench/results/serve-{}.json", bench::card_slug(&report.card))));
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
            }
            let text = serde_json::to_string_pretty(&report).map_err(|e| Error::Internal(e.to_string()))?;
            std::fs::write(&path, text).map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
            println!("wrote {}", path.display());
            Ok(())
        }
        Command::Bench(BenchCmd::Llm { device, config, hf_dir, models, reps, prompt, decode_steps, keep_store, store_name, out_dir }) => {
            let mut opts = bench_llm::LlmOptions { device, config, hf_dir, models, reps: reps.max(1), prompt, decode_steps, keep_store, out_dir, ..Default::default() };
            if let Some(n) = store_name {
                opts.store_name = n;
            }
            bench_llm::run(&opts, &mut |line| eprintln!("{line}")).map(|_| ())
        }
        Command::Bench(BenchCmd::Kernels { device, reps }) => {
            bench_kernels::run_kernels(device, reps, &mut |line| println!("{line}"))
        }
        Command::Bench(BenchCmd::Gemm { device, reps, torch, all_tiles, json_out }) => {
            let dev = pipeswitch::cuda::Device::get(device)?;
            let report = bench_gemm::run_gemm_bench_logged(dev, reps, torch.as_deref(), all_tiles, &mut |line| eprintln!("{line}"))?;
            print!("{}", bench_gemm::format_table(&report));
            let path = json_out.unwrap_or_else(|| PathBuf::from(format!("bench/results/gemm-{}.json", bench_gemm::card_slug(&report.card))));
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
            }
            let text = serde_json::to_string_pretty(&report).map_err(|e| Error::Internal(e.to_string()))?;
            std::fs::write(&path, text).map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
            println!("wrote {}", path.display());
            Ok(())
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PIPESWITCH_LOG").unwrap_or_else(|_| "info".into());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

#[allow(clippy::too_many_arguments)]
fn serve_cmd(
    store: String,
    device: i32,
    arena_size: u64,
    residency_size: Option<u64>,
    worker_region: u64,
    standbys: usize,
    (single_worker, process_per_task): (bool, bool),
    worker_cmd: Option<Vec<String>>,
    socket_dir: Option<PathBuf>,
    max_queue: usize,
    (max_input_area, input_areas_bytes): (u64, u64),
) -> Result<()> {
    use pipeswitch_cli::serve::{CudaGpu, Daemon, ServeConfig};
    if !pipeswitch::cuda::driver_available() {
        return Err(Error::NoDriver);
    }
    init_logging();
    // SIGTERM and SIGINT are taken by this thread alone (blocked before any
    // other thread starts, so they inherit the mask).
    let mut signals = nix::sys::signal::SigSet::empty();
    signals.add(nix::sys::signal::Signal::SIGTERM);
    signals.add(nix::sys::signal::Signal::SIGINT);
    signals.thread_block().map_err(|e| Error::os("blocking SIGTERM/SIGINT", e))?;
    // Regions for the standbys, the active worker and a training job's worker.
    let regions = (standbys as u64 + 2).saturating_mul(worker_region);
    let residency = residency_size.unwrap_or_else(|| arena_size.saturating_sub(regions).saturating_sub(4 << 20));
    let gpu = CudaGpu::new(device, arena_size)?;
    let worker_cmd = match worker_cmd {
        Some(c) => c.into_iter().map(Into::into).collect(),
        None => {
            let exe = std::env::current_exe().map_err(|e| Error::io("locating this program", e))?;
            vec![exe.into_os_string(), "worker".into()]
        }
    };
    let config = ServeConfig {
        device,
        store,
        socket_dir: socket_dir.unwrap_or_else(pipeswitch::protocol::default_socket_dir),
        residency_bytes: residency,
        worker_region_bytes: worker_region,
        standbys: if single_worker || process_per_task { 0 } else { standbys },
        single_worker,
        process_per_task,
        worker_cmd,
        max_queue,
        hello_timeout: std::time::Duration::from_secs(5),
        worker_start_timeout: std::time::Duration::from_secs(120),
        max_input_area,
        input_areas_bytes,
    };
    let daemon = Daemon::start(config, Box::new(gpu))?;
    println!("pipeswitch: serving GPU {device} on {} (stop with Ctrl-C or SIGTERM)", daemon.socket().display());
    let sig = signals.wait().map_err(|e| Error::os("waiting for a signal", e))?;
    tracing::info!("{sig:?}: stopping");
    daemon.stop()
}

fn store_cmd(cmd: StoreCmd) -> Result<()> {
    match cmd {
        StoreCmd::Create { name, size, max_models } => {
            let s = Store::create(&name, size, max_models)?;
            println!("created store {name} at {} ({} for models, up to {max_models} models)", s.path().display(), human(s.capacity()));
        }
        StoreCmd::Add { store, model, file, layers } => {
            let s = Arc::new(Store::open(&store)?);
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            bar.set_message(format!("adding {model}"));
            let m = s.add_safetensors(&model, &file, layers.as_deref(), &mut |done, total| {
                bar.set_length(total);
                bar.set_position(done);
            })?;
            bar.finish_and_clear();
            println!("added {model}: {} layers, {} tensors, {}", m.layers.len(), m.tensors.len(), human(m.bytes));
        }
        StoreCmd::AddLlama { store, model, hf_dir, random, max_positions, seed } => {
            use pipeswitch::model::llama::{self, LlamaConfig};
            let s = Store::open(&store)?;
            let m = match (hf_dir, random.as_deref()) {
                (Some(dir), _) => llama::add_hf_dir(&s, &model, &dir, max_positions, &mut |_, _| {})?,
                (None, Some(name)) => {
                    let mut cfg = match name {
                        "llama3-8b" => LlamaConfig::LLAMA3_8B,
                        "tiny" => LlamaConfig::tiny(false),
                        _ => return Err(pipeswitch::error::Error::invalid(format!("unknown Llama configuration {name:?} (llama3-8b, tiny)"))),
                    };
                    cfg.max_positions = max_positions;
                    let threads = std::thread::available_parallelism().map_or(4, |n| n.get());
                    llama::add_random(&s, &model, &cfg, seed, threads, &mut |_, _| {})?
                }
                (None, None) => return Err(pipeswitch::error::Error::invalid("give --hf-dir or --random")),
            };
            let cfg = llama::stored_config(&m)?;
            println!(
                "added {model}: Llama, {} blocks, hidden {}, {} heads ({} KV), {} {}, {} layers, {}",
                cfg.layers, cfg.hidden, cfg.heads, cfg.kv_heads, cfg.dtype.name(), if cfg.tie_embeddings { "tied" } else { "untied" }, m.layers.len(), human(m.bytes)
            );
        }
        StoreCmd::List { store } => {
            let s = Store::open(&store)?;
            let u = s.usage()?;
            println!(
                "store {store}: {} models of at most {}, {} used of {} (largest free piece {})",
                u.models, u.max_models, human(u.used_bytes), human(u.capacity_bytes), human(u.largest_free_bytes)
            );
            for m in s.models()? {
                println!("  {:<32} {:>12} {:>6} layers {:>6} tensors", m.name, human(m.bytes), m.n_layers, m.n_tensors);
            }
        }
        StoreCmd::Show { store, model } => {
            let s = Store::open(&store)?;
            let m = s.model(&model)?;
            println!("model {model}: id {}, {}, {} layers, {} tensors", m.id, human(m.bytes), m.layers.len(), m.tensors.len());
            for (i, l) in m.layers.iter().enumerate() {
                let exec = if l.exec_ms.is_nan() { "-".to_string() } else { format!("{:.4} ms", l.exec_ms) };
                println!("  layer {i:>4} {:<40} {:>10} at {:>12} exec {exec}", l.name, human(l.bytes), l.offset);
                for t in &m.tensors[l.first_tensor..l.first_tensor + l.n_tensors] {
                    println!("      {:<44} {:<8} {:?}", t.name, t.dtype.name(), t.shape);
                }
            }
        }
        StoreCmd::Remove { store, model } => {
            Store::open(&store)?.remove_model(&model)?;
            println!("removed {model}");
        }
        StoreCmd::Destroy { name } => {
            Store::destroy(&name)?;
            println!("destroyed store {name}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("8G").unwrap(), 8 << 30);
        assert_eq!(parse_size("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_size("64mb").unwrap(), 64 << 20);
        assert!(parse_size("x").is_err());
        assert!(parse_size("5Q").is_err());
        assert!(parse_size("0").is_err());
    }
}
