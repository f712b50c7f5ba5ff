//! The daemon on a GPU with its real worker processes: requests for stored
//! reference models through a client give the CPU reference's outputs,
//! switches and hits alternate, and a killed worker is replaced.
//! `cargo test -p pipeswitch-cli --test serve_gpu -- --ignored`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pipeswitch::client::Client;
use pipeswitch::model::cpu::{example_inputs, reference_weights, run_graph_cpu, tiny_models};
use pipeswitch::model::reference::ModelDef;
use pipeswitch::model::weights::write_model_file;
use pipeswitch::protocol::io::TensorRef;
use pipeswitch::store::Store;
use pipeswitch_cli::serve::{CudaGpu, Daemon, ServeConfig};

const SEED: u64 = 11;

/// The pipeswitch binary: cargo's build, or on a GPU machine that got the
/// test binaries without the target dir, `$PIPESWITCH_ROOT/.gpu/pipeswitch`.
fn exe() -> PathBuf {
    let built = PathBuf::from(env!("CARGO_BIN_EXE_pipeswitch"));
    if built.exists() {
        return built;
    }
    PathBuf::from(std::env::var_os("PIPESWITCH_ROOT").expect("PIPESWITCH_ROOT")).join(".gpu/pipeswitch")
}

fn rel_err(gpu: &[f32], reference: &[f32]) -> f64 {
    assert_eq!(gpu.len(), reference.len());
    let scale = reference.iter().fold(1.0f64, |m, v| m.max(f64::from(v.abs())));
    gpu.iter().zip(reference).map(|(a, b)| f64::from((a - b).abs())).fold(0.0, f64::max) / scale
}

/// Worker processes of this test process (children named pipeswitch).
fn worker_pids() -> Vec<i32> {
    let me = std::process::id() as i32;
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        let Some(rest) = stat.rsplit_once(") ").map(|r| r.1) else { continue };
        let ppid: i32 = rest.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
        if ppid == me && stat.contains("(pipeswitch)") {
            out.push(pid);
        }
    }
    out
}

fn wait_for_standbys(c: &mut Client, n: u32) {
    let t0 = Instant::now();
    loop {
        let s = c.stats().unwrap();
        if s.standbys >= n {
            return;
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "standbys never came up: {s:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The daemon of these tests: two standbys of the built-in worker, 64 MiB
/// worker regions, `residency` bytes for models.
fn config(store_name: &str, sockets: &std::path::Path, residency: u64) -> ServeConfig {
    ServeConfig {
        device: 0,
        store: store_name.to_string(),
        socket_dir: sockets.join("s"),
        residency_bytes: residency,
        worker_region_bytes: 64 << 20,
        standbys: 2,
        single_worker: false,
        process_per_task: false,
        worker_cmd: vec![exe().into_os_string(), "worker".into()],
        max_queue: 64,
        hello_timeout: Duration::from_secs(5),
        worker_start_timeout: Duration::from_secs(120),
        max_input_area: pipeswitch_cli::serve::DEFAULT_MAX_INPUT_AREA,
        input_areas_bytes: pipeswitch_cli::serve::DEFAULT_INPUT_AREAS_BYTES,
    }
}

struct Case {
    def: ModelDef,
    inputs: Vec<(String, u32, Vec<u64>, Vec<u8>)>,
    expect: Vec<f32>,
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn requests_through_the_daemon_match_the_cpu_reference() {
    let shm = tempfile::tempdir_in("/dev/shm").expect("a tmpfs for stores");
    std::env::set_var(pipeswitch::store::shm::DIR_ENV, shm.path());
    let sockets = tempfile::tempdir().unwrap();
    let store_name = format!("serve-gpu-{}", std::process::id());
    let defs: Vec<ModelDef> = tiny_models(2, 16).into_iter().take(3).collect();
    let store = Store::create(&store_name, defs.iter().map(|d| d.n_params() as u64 * 4 + (8 << 20)).sum(), 8).unwrap();
    let files = tempfile::tempdir().unwrap();
    let mut cases = Vec::new();
    for d in defs {
        let path = files.path().join(format!("{}.safetensors", d.graph.name));
        write_model_file(&d, &path, SEED, &mut |_, _| {}).unwrap();
        store.add_safetensors(&d.graph.name, &path, None, &mut |_, _| {}).unwrap();
        let ins = example_inputs(&d.graph, SEED, d.vocab());
        let expect = run_graph_cpu(&d.graph, &reference_weights(&d, SEED), &ins).unwrap().remove(&d.graph.outputs[0]).unwrap();
        let mut inputs: Vec<(String, u32, Vec<u64>, Vec<u8>)> = Vec::new();
        for (name, decl) in &d.graph.inputs {
            let t = &ins[name];
            let dtype = if decl.dtype == "I32" { 9 } else { 11 };
            inputs.push((name.clone(), dtype, decl.shape.iter().map(|&x| x as u64).collect(), t.to_le_bytes()));
        }
        cases.push(Case { def: d, inputs, expect });
    }
    let store = Arc::new(store);
    let bytes: Vec<u64> = cases.iter().map(|c| store.model(&c.def.graph.name).unwrap().bytes).collect();
    // Room for two of the three models: the third evicts one.
    let mut sorted = bytes.clone();
    sorted.sort_unstable();
    let residency = sorted[1].next_multiple_of(256) + sorted[2].next_multiple_of(256);
    assert!(sorted[0] > 256, "the smallest model must not fit in the rounding");
    let config = config(&store_name, sockets.path(), residency);
    let gpu = CudaGpu::new(0, residency + 4 * (64 << 20) + (8 << 20)).unwrap();
    let daemon = Daemon::start(config, Box::new(gpu)).unwrap();
    let mut c = Client::connect(daemon.socket(), Some(Duration::from_secs(60))).unwrap();
    wait_for_standbys(&mut c, 2);
    let order = [0usize, 0, 1, 0, 2, 1, 2, 2, 0, 1];
    let mut activations = Vec::new();
    for &i in &order {
        let case = &cases[i];
        let refs: Vec<TensorRef<'_>> =
            case.inputs.iter().map(|(n, d, s, b)| TensorRef { name: n, dtype: *d, shape: s, data: b }).collect();
        let out = c.infer(&case.def.graph.name, &refs).unwrap();
        let (t, data) = out.outputs.iter().find(|(t, _)| t.name == case.def.graph.outputs[0]).expect("the model's output");
        assert_eq!(t.dtype, 11);
        let got: Vec<f32> = data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        let err = rel_err(&got, &case.expect);
        assert!(err <= 1e-4, "{}: relative error {err:e} vs the CPU reference", case.def.graph.name);
        activations.push(out.timing.activation_ms);
        eprintln!("{}: rel err {err:.1e}, timing {:?}", case.def.graph.name, out.timing);
    }
    let s = c.stats().unwrap();
    assert_eq!((s.requests, s.failed), (order.len() as u64, 0));
    assert!(s.misses >= 3 && s.evictions >= 1, "{s:?}");
    activations.sort_by(f64::total_cmp);
    eprintln!("activation ms: median {:.3}, max {:.3}", activations[activations.len() / 2], activations[activations.len() - 1]);
    // A killed worker is replaced, and requests go on.
    let pids = worker_pids();
    assert!(pids.len() >= 2, "{pids:?}");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pids[0]), nix::sys::signal::Signal::SIGKILL).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    wait_for_standbys(&mut c, 1);
    for case in &cases {
        let refs: Vec<TensorRef<'_>> =
            case.inputs.iter().map(|(n, d, s, b)| TensorRef { name: n, dtype: *d, shape: s, data: b }).collect();
        c.infer(&case.def.graph.name, &refs).unwrap();
    }
    let s = c.stats().unwrap();
    assert!(s.workers_lost >= 1 && s.workers_started >= 3, "{s:?}");
    daemon.stop().unwrap();
    Store::destroy(&store_name).unwrap();
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn large_inputs_come_through_the_clients_input_area() {
    // A 1.2 MB image batch: the client reserves its input area at the first
    // request, the worker maps and page-locks it and copies the input from
    // it; every request's output is its own input's CPU reference.
    use pipeswitch::model::reference::{resnet, ResNetConfig};
    let shm = tempfile::tempdir_in("/dev/shm").expect("a tmpfs for stores");
    std::env::set_var(pipeswitch::store::shm::DIR_ENV, shm.path());
    let sockets = tempfile::tempdir().unwrap();
    let store_name = format!("serve-gpu-area-{}", std::process::id());
    let d = resnet("area-resnet", ResNetConfig { blocks: [1, 1, 1, 1], width: 8, image: 160, classes: 10 }, 4);
    let store = Store::create(&store_name, d.n_params() as u64 * 4 + (8 << 20), 4).unwrap();
    let files = tempfile::tempdir().unwrap();
    let path = files.path().join("area-resnet.safetensors");
    write_model_file(&d, &path, SEED, &mut |_, _| {}).unwrap();
    store.add_safetensors(&d.graph.name, &path, None, &mut |_, _| {}).unwrap();
    let weights = reference_weights(&d, SEED);
    let bytes = store.model(&d.graph.name).unwrap().bytes;
    let config = config(&store_name, sockets.path(), bytes.next_multiple_of(1 << 20));
    let gpu = CudaGpu::new(0, bytes.next_multiple_of(1 << 20) + 4 * (64 << 20) + (8 << 20)).unwrap();
    let daemon = Daemon::start(config, Box::new(gpu)).unwrap();
    let mut c = Client::connect(daemon.socket(), Some(Duration::from_secs(60))).unwrap();
    wait_for_standbys(&mut c, 2);
    let mut activations = Vec::new();
    for k in 0..6u64 {
        let ins = example_inputs(&d.graph, SEED + 1 + k, d.vocab());
        let expect = run_graph_cpu(&d.graph, &weights, &ins).unwrap().remove(&d.graph.outputs[0]).unwrap();
        let owned: Vec<(String, Vec<u64>, Vec<u8>)> = d
            .graph
            .inputs
            .iter()
            .map(|(name, decl)| (name.clone(), decl.shape.iter().map(|&x| x as u64).collect(), ins[name].to_le_bytes()))
            .collect();
        assert!(owned.iter().any(|(_, _, b)| b.len() > 1 << 20), "the test needs an input over 1 MiB");
        let refs: Vec<TensorRef<'_>> = owned.iter().map(|(n, s, b)| TensorRef { name: n, dtype: 11, shape: s, data: b }).collect();
        let out = c.infer(&d.graph.name, &refs).unwrap();
        assert!(c.input_area_bytes() >= 16 << 20, "the first large request reserved an input area");
        let (_, data) = out.outputs.iter().find(|(t, _)| t.name == d.graph.outputs[0]).expect("the model's output");
        let got: Vec<f32> = data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        let err = rel_err(&got, &expect);
        assert!(err <= 1e-4, "request {k}: relative error {err:e} vs its own input's CPU reference");
        activations.push(out.timing.activation_ms);
        eprintln!("request {k}: rel err {err:.1e}, timing {:?}", out.timing);
    }
    activations.sort_by(f64::total_cmp);
    eprintln!("activation ms with a 1.2 MB input from the area: median {:.3}", activations[activations.len() / 2]);
    daemon.stop().unwrap();
    Store::destroy(&store_name).unwrap();
}
