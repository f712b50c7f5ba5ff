//! The built-in worker on the GPU: reference models (small configurations
//! and full-size ones on small inputs) ingested from safetensors files with
//! their graphs, switched in with pipelined plans and run from the arena,
//! compared with the CPU reference. `cargo test --test worker_gpu -- --ignored`.

use std::sync::Arc;

use pipeswitch::arena::Arena;
use pipeswitch::error::Error;
use pipeswitch::model::cpu::{example_inputs, reference_weights, run_graph_cpu, tiny_models};
use pipeswitch::model::reference::{bert, resnet, ModelDef, ResNetConfig, TransformerConfig};
use pipeswitch::model::weights::write_model_file;
use pipeswitch::planner;
use pipeswitch::store::{Store, GRAPH_ATTRIBUTE};
use pipeswitch::switch::Switch;
use pipeswitch::worker::{Program, RunOptions, Worker};

const SEED: u64 = 7;

struct TempStore(Arc<Store>, String);
impl Drop for TempStore {
    fn drop(&mut self) {
        let _ = Store::destroy(&self.1);
    }
}

/// A store holding `defs`, written as safetensors files and ingested.
fn store_of(tag: &str, defs: &[&ModelDef]) -> TempStore {
    let name = format!("workertest-{tag}-{}", std::process::id());
    let _ = Store::destroy(&name);
    let cap: u64 = defs.iter().map(|d| d.n_params() as u64 * 4 + (8 << 20)).sum();
    let store = Store::create(&name, cap, 16).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for d in defs {
        let path = dir.path().join(format!("{}.safetensors", d.graph.name));
        write_model_file(d, &path, SEED, &mut |_, _| {}).unwrap();
        store.add_safetensors(&d.graph.name, &path, None, &mut |_, _| {}).unwrap();
    }
    TempStore(Arc::new(store), name)
}

/// max |gpu - ref| / max(1, max |ref|)
fn rel_err(gpu: &[f32], reference: &[f32]) -> f64 {
    assert_eq!(gpu.len(), reference.len());
    let scale = reference.iter().fold(1.0f64, |m, v| m.max(f64::from(v.abs())));
    gpu.iter().zip(reference).map(|(a, b)| f64::from((a - b).abs())).fold(0.0, f64::max) / scale
}

struct Setup {
    store: TempStore,
    arena: Arc<Arena>,
    region: u64,
    worker: Worker,
    switch: Switch,
}

fn setup(tag: &str, defs: &[&ModelDef]) -> Setup {
    let store = store_of(tag, defs);
    let programs: Vec<Program> = defs.iter().map(|d| Program::from_store(&store.0, &d.graph.name).unwrap()).collect();
    let region_bytes = programs.iter().map(|p| p.model().bytes).max().unwrap();
    let act: u64 = programs.iter().map(|p| p.activation_bytes()).max().unwrap();
    let arena = Arc::new(Arena::create(0, region_bytes + act + (16 << 20), 8 << 20).unwrap());
    let region = arena.alloc(region_bytes).unwrap();
    let worker = Worker::new(&arena).unwrap();
    let switch = Switch::new(0).unwrap();
    Setup { store, arena, region, worker, switch }
}

/// Switches `d` in with `plan` (None: whole), runs it and returns its output.
fn switch_and_run(s: &mut Setup, d: &ModelDef, plan: Option<&[usize]>) -> Vec<f32> {
    let p = Program::from_store(&s.store.0, &d.graph.name).unwrap();
    s.worker.prepare(&p).unwrap();
    for (k, v) in example_inputs(&d.graph, SEED, d.vocab()) {
        s.worker.set_input(&p, &k, &v.to_le_bytes()).unwrap();
    }
    match plan {
        Some(plan) => s.switch.start(&s.store.0, &d.graph.name, &s.arena, s.region, plan).unwrap(),
        None => s.switch.start_whole(&s.store.0, &d.graph.name, &s.arena, s.region).unwrap(),
    }
    s.worker.run(&p, &s.switch, RunOptions::default()).unwrap();
    s.worker.read_f32(&p, &d.graph.outputs[0]).unwrap()
}

fn cpu_output(d: &ModelDef) -> Vec<f32> {
    let inputs = example_inputs(&d.graph, SEED, d.vocab());
    run_graph_cpu(&d.graph, &reference_weights(d, SEED), &inputs).unwrap().remove(&d.graph.outputs[0]).unwrap()
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn small_models_match_the_cpu_reference_with_every_plan() {
    let defs = tiny_models(2, 16);
    let refs: Vec<&ModelDef> = defs.iter().collect();
    let mut s = setup("tiny", &refs);
    for d in &defs {
        let expect = cpu_output(d);
        let n_layers = d.layers.len();
        let whole = switch_and_run(&mut s, d, None);
        let err = rel_err(&whole, &expect);
        assert!(err <= 1e-4, "{}: relative error {err:e} vs the CPU reference", d.graph.name);
        // Pipelined: one group per layer, and a plan with a few groups; the
        // same kernels on the same bytes give the same bits.
        let per_layer = switch_and_run(&mut s, d, Some(&planner::per_layer_plan(n_layers)));
        assert_eq!(per_layer, whole, "{}: per-layer plan", d.graph.name);
        let some: Vec<usize> = (0..n_layers).step_by(3).collect();
        let grouped = switch_and_run(&mut s, d, Some(&some));
        assert_eq!(grouped, whole, "{}: grouped plan", d.graph.name);
        eprintln!("{}: {} layers, rel err {err:.2e}", d.graph.name, n_layers);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn inputs_staged_while_runs_are_in_flight_reach_their_own_runs() {
    // An input of 1.2 MB: larger than the 1 MiB staging reserved first (it
    // grows), copied by several threads, and two of them do not fit the
    // staging together (the second waits for the first's copy).
    let d = resnet("big-input", ResNetConfig { blocks: [1, 1, 1, 1], width: 8, image: 160, classes: 10 }, 4);
    let mut s = setup("staging", &[&d]);
    s.worker.reserve_input_staging(1).unwrap();
    let p = Program::from_store(&s.store.0, &d.graph.name).unwrap();
    s.worker.prepare(&p).unwrap();
    let weights = reference_weights(&d, SEED);
    let inputs: Vec<_> = (0..3).map(|k| example_inputs(&d.graph, SEED + 1 + k, d.vocab())).collect();
    let expect: Vec<Vec<f32>> =
        inputs.iter().map(|i| run_graph_cpu(&d.graph, &weights, i).unwrap().remove(&d.graph.outputs[0]).unwrap()).collect();
    assert!(rel_err(&expect[0], &expect[1]) > 1e-3, "the inputs must give different outputs");
    let set = |s: &mut Setup, i: &std::collections::HashMap<String, pipeswitch::model::cpu::HostTensor>| {
        for (k, v) in i {
            assert!(v.to_le_bytes().len() > 1 << 20);
            s.worker.set_input(&p, k, &v.to_le_bytes()).unwrap();
        }
    };
    s.switch.start_whole(&s.store.0, &d.graph.name, &s.arena, s.region).unwrap();
    set(&mut s, &inputs[0]);
    s.worker.run(&p, &s.switch, RunOptions::default()).unwrap();
    // Staged while run 0 is in flight: must reach run 1 only.
    set(&mut s, &inputs[1]);
    let got0 = s.worker.read_f32(&p, &d.graph.outputs[0]).unwrap();
    s.worker.run(&p, &s.switch, RunOptions::default()).unwrap();
    set(&mut s, &inputs[2]);
    set(&mut s, &inputs[2]); // twice: the second does not fit after the first
    let got1 = s.worker.read_f32(&p, &d.graph.outputs[0]).unwrap();
    s.worker.run(&p, &s.switch, RunOptions::default()).unwrap();
    let got2 = s.worker.read_f32(&p, &d.graph.outputs[0]).unwrap();
    for (k, (got, want)) in [got0, got1, got2].iter().zip(&expect).enumerate() {
        let err = rel_err(got, want);
        assert!(err <= 1e-4, "run {k}: relative error {err:e} against its own input's reference");
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn inputs_copied_from_a_page_locked_input_area_reach_their_run() {
    // A client's input area as a worker holds it: a sealed memfd the client
    // writes, mapped read-only here and page-locked READ_ONLY; the input is
    // copied from it with one DMA (set_input_pinned), no staging.
    use pipeswitch::cuda::memory::HostRegistration;
    use pipeswitch::protocol::area::{AreaMap, ClientArea};
    use pipeswitch::protocol::io::TensorRef;
    let d = resnet("area-input", ResNetConfig { blocks: [1, 1, 1, 1], width: 8, image: 160, classes: 10 }, 4);
    let mut s = setup("area", &[&d]);
    let p = Program::from_store(&s.store.0, &d.graph.name).unwrap();
    s.worker.prepare(&p).unwrap();
    let weights = reference_weights(&d, SEED);
    let inputs: Vec<_> = (0..2).map(|k| example_inputs(&d.graph, SEED + 7 + k, d.vocab())).collect();
    let expect: Vec<Vec<f32>> =
        inputs.iter().map(|i| run_graph_cpu(&d.graph, &weights, i).unwrap().remove(&d.graph.outputs[0]).unwrap()).collect();
    let mut client = ClientArea::create(8 << 20).unwrap();
    client.id = 1;
    let fd = client.fd().try_clone_to_owned().unwrap();
    let map = AreaMap::open(&fd, client.bytes()).unwrap();
    let reg = unsafe { HostRegistration::new_read_only(s.arena.device(), map.as_ptr(), map.bytes() as usize) }.unwrap();
    s.switch.start_whole(&s.store.0, &d.graph.name, &s.arena, s.region).unwrap();
    for (k, input) in inputs.iter().enumerate() {
        let bytes: Vec<(String, Vec<u8>)> = input.iter().map(|(n, v)| (n.clone(), v.to_le_bytes())).collect();
        let refs: Vec<TensorRef<'_>> = bytes.iter().map(|(n, b)| TensorRef { name: n, dtype: 11, shape: &[], data: b }).collect();
        // The client writes the request into its area (the last run is done:
        // read_f32 below waited for it).
        let tensors = client.pack(&refs).expect("the input fits the area");
        let mut in_area = 0;
        for t in &tensors {
            match &t.data {
                pipeswitch::protocol::TensorData::Area { offset, bytes, .. } => {
                    in_area += 1;
                    let data = map.range(*offset, *bytes).unwrap();
                    unsafe { s.worker.set_input_pinned(&p, &t.name, data).unwrap() };
                }
                pipeswitch::protocol::TensorData::Inline(b) => s.worker.set_input(&p, &t.name, b).unwrap(),
                other => panic!("{other:?}"),
            }
        }
        assert!(in_area >= 1, "the 1.2 MB image comes from the area");
        s.worker.run(&p, &s.switch, RunOptions::default()).unwrap();
        let got = s.worker.read_f32(&p, &d.graph.outputs[0]).unwrap();
        let err = rel_err(&got, &expect[k]);
        assert!(err <= 1e-4, "run {k}: relative error {err:e} against its own input's reference");
    }
    drop(reg);
    drop(map);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn full_size_structures_match_the_cpu_reference_on_small_inputs() {
    // The real layer structure and parameter sizes, small inputs (the CPU
    // reference has to run them too).
    let bert_base = bert("bert-base", TransformerConfig::BERT_BASE, 1, 16);
    let resnet152 = resnet("resnet152", ResNetConfig { image: 64, ..ResNetConfig::RESNET152 }, 1);
    let mut s = setup("full", &[&bert_base, &resnet152]);
    for d in [&bert_base, &resnet152] {
        let expect = cpu_output(d);
        let got = switch_and_run(&mut s, d, Some(&planner::per_layer_plan(d.layers.len())));
        let err = rel_err(&got, &expect);
        eprintln!("{}: {} layers, rel err {err:.2e}", d.graph.name, d.layers.len());
        assert!(err <= 1e-3, "{}: relative error {err:e}", d.graph.name);
        assert!(got.iter().all(|v| v.is_finite()));
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn profiled_runs_give_layer_times_that_the_planner_uses() {
    let defs = tiny_models(4, 32);
    let d = &defs[2]; // tiny-gpt2
    let mut s = setup("profile", &[d]);
    let p = Program::from_store(&s.store.0, &d.graph.name).unwrap();
    assert!(s.store.0.model(&d.graph.name).unwrap().attribute(GRAPH_ATTRIBUTE).is_some());
    s.worker.prepare(&p).unwrap();
    for (k, v) in example_inputs(&d.graph, SEED, d.vocab()) {
        s.worker.set_input(&p, &k, &v.to_le_bytes()).unwrap();
    }
    s.switch.start_whole(&s.store.0, &d.graph.name, &s.arena, s.region).unwrap();
    s.worker.run(&p, &s.switch, RunOptions { profile: true }).unwrap();
    let ms = s.worker.layer_ms(&p).unwrap();
    assert_eq!(ms.len(), d.layers.len());
    assert!(ms.iter().all(|v| v.is_finite() && *v >= 0.0));
    assert!(ms.iter().sum::<f64>() > 0.0);
    // Layers with a GEMM take longer than the layer norms beside them.
    let idx = |n: &str| d.layers.iter().position(|(l, _)| l == n).unwrap();
    assert!(ms[idx("h.0.mlp.c_fc")] > 0.0 && ms[idx("h.0.attn.c_attn")] > 0.0);
    s.store.0.set_layer_exec_ms(&d.graph.name, &ms).unwrap();
    let m = s.store.0.model(&d.graph.name).unwrap();
    let plan = pipeswitch::ffi::plan::plan_stored_model(&m, 50.0, 0.01, 0.005).unwrap();
    assert!(plan.makespan_ms > 0.0 && !plan.group_starts.is_empty());
    // The op timeline is ordered and starts after the switch's start.
    s.switch.set_timing(true).unwrap();
    s.switch.start(&s.store.0, &d.graph.name, &s.arena, s.region, &plan.group_starts).unwrap();
    s.worker.run(&p, &s.switch, RunOptions { profile: true }).unwrap();
    let t = s.worker.op_times(&p, s.switch.start_event().unwrap()).unwrap();
    let arrivals = s.switch.group_arrival_ms().unwrap();
    assert_eq!(arrivals.len(), plan.group_starts.len());
    assert!(t.op_start_ms.windows(2).all(|w| w[1] >= w[0]));
    // The first op reads the first group: it cannot start before it arrived.
    assert!(t.op_start_ms[0] >= arrivals[0] - 1e-3, "op 0 at {} ms, group 0 at {} ms", t.op_start_ms[0], arrivals[0]);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn worker_misuse_gives_errors_not_crashes() {
    let defs = tiny_models(2, 8);
    let (rn, gpt) = (&defs[0], &defs[2]);
    let mut s = setup("errors", &[rn, gpt]);
    let p = Program::from_store(&s.store.0, &gpt.graph.name).unwrap();
    // Not prepared yet.
    assert!(matches!(s.worker.set_input(&p, "input_ids", &[0u8; 4]), Err(Error::InvalidState(_))));
    s.worker.prepare(&p).unwrap();
    assert!(matches!(s.worker.set_input(&p, "input_ids", &[0u8; 4]), Err(Error::InvalidArgument(_))), "wrong size");
    assert!(matches!(s.worker.set_input(&p, "nope", &[0u8; 4]), Err(Error::NotFound(_))));
    // The switch holds another model.
    let prn = Program::from_store(&s.store.0, &rn.graph.name).unwrap();
    s.switch.start_whole(&s.store.0, &rn.graph.name, &s.arena, s.region).unwrap();
    assert!(matches!(s.worker.run(&p, &s.switch, RunOptions::default()), Err(Error::InvalidState(_))));
    assert!(s.worker.layer_ms(&prn).is_err(), "no profiled run yet");
    // Out-of-range token ids: reported when the output is read, then the
    // worker runs correct inputs again.
    s.switch.start_whole(&s.store.0, &gpt.graph.name, &s.arena, s.region).unwrap();
    let bad: Vec<u8> = (0..16).flat_map(|i: i32| (if i == 3 { 100_000 } else { i }).to_le_bytes()).collect();
    s.worker.set_input(&p, "input_ids", &bad).unwrap();
    s.worker.run(&p, &s.switch, RunOptions::default()).unwrap();
    assert!(matches!(s.worker.read_f32(&p, &gpt.graph.outputs[0]), Err(Error::InvalidArgument(_))));
    let good = switch_and_run(&mut s, gpt, None);
    assert!(good.iter().all(|v| v.is_finite()));
}
