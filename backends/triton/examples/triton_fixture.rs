//! What scripts/gpu-triton.sh needs besides the server: a store with the
//! reference models (profiled on the GPU, so that their plans are the
//! planner's), and for each model its example inputs with the outputs the
//! built-in worker computes from them, as raw little-endian files.
//!
//!   triton_fixture prepare STORE DIR [BATCH SEQ]   # writes DIR/fixture.json
//!   triton_fixture prepare-cpu STORE DIR           # tiny models, CPU reference
//!   triton_fixture destroy STORE
//!
//! `prepare-cpu` needs no GPU: three tiny models whose outputs come from the
//! library's CPU reference, to try the GPU script's client on a machine
//! without a GPU (with the backend's cpu-reference executor).
//!
//! DIR/fixture.json lists, per model: its bytes, layers, profiled kernel
//! time, and its inputs and outputs (name, Triton datatype, shape, file).

use std::path::Path;
use std::sync::Arc;

use pipeswitch::arena::Arena;
use pipeswitch::error::{Error, Result};
use pipeswitch::measure::median;
use pipeswitch::model::cpu::example_inputs;
use pipeswitch::model::reference::reference_models;
use pipeswitch::model::weights::write_model_file;
use pipeswitch::store::Store;
use pipeswitch::switch::Switch;
use pipeswitch::worker::{Program, RunOptions, Worker};
use serde_json::json;

fn wire(dtype: &str) -> &'static str {
    match dtype {
        "F32" => "FP32",
        "I32" => "INT32",
        _ => "?",
    }
}

fn prepare(store_name: &str, dir: &Path, batch: usize, seq: usize) -> Result<()> {
    let io = |what: &str, e| Error::io(what.to_string(), e);
    std::fs::create_dir_all(dir).map_err(|e| io("creating the fixture dir", e))?;
    let defs = reference_models(batch, seq);
    let capacity: u64 = defs.iter().map(|d| d.n_params() as u64 * 4 + (64 << 20)).sum();
    let _ = Store::destroy(store_name);
    let store = Arc::new(Store::create(store_name, capacity, 16)?);
    for d in &defs {
        let path = dir.join(format!("{}.safetensors", d.graph.name));
        write_model_file(d, &path, 1, &mut |_, _| {})?;
        store.add_safetensors(&d.graph.name, &path, None, &mut |_, _| {})?;
        let _ = std::fs::remove_file(&path);
        eprintln!("triton_fixture: stored {}", d.graph.name);
    }
    let programs: Vec<Program> = defs.iter().map(|d| Program::from_store(&store, &d.graph.name)).collect::<Result<_>>()?;
    let model_bytes: u64 = programs.iter().map(|p| p.model().bytes + (2 << 20)).sum();
    let act = programs.iter().map(|p| p.activation_bytes()).max().unwrap_or(0);
    let arena = Arc::new(Arena::create(0, model_bytes + act + (64 << 20), 0)?);
    store.pin(arena.device())?;
    let mut worker = Worker::new(&arena)?;
    let mut models = Vec::new();
    for (d, program) in defs.iter().zip(&programs) {
        let name = &d.graph.name;
        worker.prepare(program)?;
        let region = arena.alloc(program.model().bytes)?;
        let mut switch = Switch::new(0)?;
        switch.start_whole(&store, name, &arena, region)?;
        switch.synchronize()?;
        let inputs = example_inputs(&d.graph, 11, d.vocab());
        let mdir = dir.join(name);
        std::fs::create_dir_all(&mdir).map_err(|e| io("creating a model dir", e))?;
        let mut ins = Vec::new();
        for (n, decl) in &d.graph.inputs {
            let bytes = inputs[n].to_le_bytes();
            worker.set_input(program, n, &bytes)?;
            let file = mdir.join(format!("in.{n}.bin"));
            std::fs::write(&file, &bytes).map_err(|e| io("writing an input", e))?;
            ins.push(json!({"name": n, "datatype": wire(&decl.dtype), "shape": decl.shape, "file": file}));
        }
        // Profile (the plans of the backend come from these times), then the
        // reference run whose outputs the server's must equal.
        let mut per_layer = Vec::new();
        for i in 0..6 {
            worker.run(program, &switch, RunOptions { profile: true })?;
            if i > 0 {
                per_layer.push(worker.layer_ms(program)?);
            }
        }
        let n_layers = program.model().layers.len();
        let exec: Vec<f64> = (0..n_layers).map(|l| median(&mut per_layer.iter().map(|r| r[l]).collect::<Vec<_>>())).collect();
        store.set_layer_exec_ms(name, &exec)?;
        worker.run(program, &switch, RunOptions::default())?;
        let mut outs = Vec::new();
        for o in &d.graph.outputs {
            let slot = program.slot(o)?;
            let mut buf = vec![0u8; slot.bytes as usize];
            worker.read(program, o, &mut buf)?;
            let file = mdir.join(format!("out.{o}.bin"));
            std::fs::write(&file, &buf).map_err(|e| io("writing an output", e))?;
            outs.push(json!({"name": o, "datatype": wire(slot.dtype.name()), "shape": slot.shape, "file": file}));
        }
        arena.release(region)?;
        let exec_ms: f64 = exec.iter().sum();
        eprintln!("triton_fixture: {name}: {n_layers} layers, {exec_ms:.2} ms of kernels, {} bytes", program.model().bytes);
        models.push(json!({
            "name": name, "bytes": program.model().bytes, "layers": n_layers, "exec_ms": exec_ms,
            "activation_bytes": program.activation_bytes(), "inputs": ins, "outputs": outs,
        }));
    }
    let manifest = json!({"store": store_name, "batch": batch, "seq": seq, "models": models});
    std::fs::write(dir.join("fixture.json"), serde_json::to_string_pretty(&manifest).unwrap_or_default())
        .map_err(|e| io("writing fixture.json", e))?;
    Ok(())
}

fn prepare_cpu(store_name: &str, dir: &Path) -> Result<()> {
    let io = |what: &str, e| Error::io(what.to_string(), e);
    std::fs::create_dir_all(dir).map_err(|e| io("creating the fixture dir", e))?;
    let defs: Vec<_> = pipeswitch::model::cpu::tiny_models(2, 8).into_iter().take(3).collect();
    let _ = Store::destroy(store_name);
    let store = Store::create(store_name, 64 << 20, 16)?;
    let mut models = Vec::new();
    for d in &defs {
        let name = &d.graph.name;
        let path = dir.join(format!("{name}.safetensors"));
        write_model_file(d, &path, 1, &mut |_, _| {})?;
        let m = store.add_safetensors(name, &path, None, &mut |_, _| {})?;
        let _ = std::fs::remove_file(&path);
        let inputs = example_inputs(&d.graph, 11, d.vocab());
        let weights = pipeswitch::model::cpu::reference_weights(d, 1);
        let outputs = pipeswitch::model::cpu::run_graph_cpu(&d.graph, &weights, &inputs)?;
        let mdir = dir.join(name);
        std::fs::create_dir_all(&mdir).map_err(|e| io("creating a model dir", e))?;
        let mut ins = Vec::new();
        for (n, decl) in &d.graph.inputs {
            let file = mdir.join(format!("in.{n}.bin"));
            std::fs::write(&file, inputs[n].to_le_bytes()).map_err(|e| io("writing an input", e))?;
            ins.push(json!({"name": n, "datatype": wire(&decl.dtype), "shape": decl.shape, "file": file}));
        }
        let mut outs = Vec::new();
        for o in &d.graph.outputs {
            let decl = &d.graph.activations.iter().find(|(a, _)| a == o).ok_or_else(|| Error::invalid("no output decl"))?.1;
            let file = mdir.join(format!("out.{o}.bin"));
            let bytes: Vec<u8> = outputs[o].iter().flat_map(|x| x.to_le_bytes()).collect();
            std::fs::write(&file, bytes).map_err(|e| io("writing an output", e))?;
            outs.push(json!({"name": o, "datatype": wire(&decl.dtype), "shape": decl.shape, "file": file}));
        }
        models.push(json!({
            "name": name, "bytes": m.bytes, "layers": m.layers.len(), "exec_ms": 0.0,
            "activation_bytes": Program::from_store(&store, name)?.activation_bytes(), "inputs": ins, "outputs": outs,
        }));
    }
    let manifest = json!({"store": store_name, "batch": 2, "seq": 8, "models": models});
    std::fs::write(dir.join("fixture.json"), serde_json::to_string_pretty(&manifest).unwrap_or_default())
        .map_err(|e| io("writing fixture.json", e))?;
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let r = match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["prepare", store, dir] => prepare(store, Path::new(dir), 8, 128),
        ["prepare", store, dir, b, s] => match (b.parse(), s.parse()) {
            (Ok(b), Ok(s)) => prepare(store, Path::new(dir), b, s),
            _ => Err(Error::invalid("BATCH and SEQ are numbers")),
        },
        ["prepare-cpu", store, dir] => prepare_cpu(store, Path::new(dir)),
        ["destroy", store] => Store::destroy(store),
        _ => {
            eprintln!("usage: triton_fixture prepare STORE DIR [BATCH SEQ] | prepare-cpu STORE DIR | destroy STORE");
            std::process::exit(2);
        }
    };
    if let Err(e) = r {
        eprintln!("triton_fixture: {e}");
        std::process::exit(1);
    }
}
