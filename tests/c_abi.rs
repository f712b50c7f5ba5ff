//! The C examples, built with `-Wall -Wextra -Werror -pedantic` against the
//! committed header and the freshly built libpipeswitch.so, and run: their
//! CPU-side parts here (also under AddressSanitizer), all of it on a GPU.
//!
//! `switch_model.c` makes its own store; `run_model.c` runs a reference
//! model from a store these tests make (in this binary's
//! `PIPESWITCH_SHM_DIR`, which the C programs inherit) and its output is
//! compared with the CPU reference.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use pipeswitch::model::cpu::{example_inputs, reference_weights, run_graph_cpu, tiny_models, HostTensor};
use pipeswitch::model::reference::ModelDef;
use pipeswitch::model::weights::write_model_file;
use pipeswitch::store::Store;

mod common;

/// The repository (PIPESWITCH_ROOT when the tests run from a copy elsewhere,
/// as on the GPU machine).
fn root() -> PathBuf {
    std::env::var_os("PIPESWITCH_ROOT").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
}

/// The directory holding libpipeswitch.so: the test binary lives in <dir>/deps.
fn lib_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent().and_then(Path::parent).expect("target dir").to_path_buf()
}

fn out_dir() -> PathBuf {
    let d = lib_dir().join("c_examples");
    std::fs::create_dir_all(&d).expect("mkdir");
    d
}

fn compile(compiler: &str, std: &str, src: &str, out: &str, extra: &[&str]) -> PathBuf {
    let lib = lib_dir();
    assert!(lib.join("libpipeswitch.so").exists(), "libpipeswitch.so not built in {}: run `cargo build --lib` first (scripts/test.sh does)", lib.display());
    // The library's SONAME (build.rs) is what the linked program asks the
    // loader for; cargo names the file libpipeswitch.so only, so give the
    // SONAME a link next to it (scripts/install.sh makes the same link).
    let soname = lib.join(concat!("libpipeswitch.so.", env!("CARGO_PKG_VERSION_MAJOR")));
    if std::fs::symlink_metadata(&soname).is_err() {
        std::os::unix::fs::symlink("libpipeswitch.so", &soname)
            .or_else(|e| if soname.exists() { Ok(()) } else { Err(e) }) // another test thread made it
            .unwrap_or_else(|e| panic!("linking {}: {e}", soname.display()));
    }
    let exe = out_dir().join(out);
    let status = Command::new(compiler)
        .args([std, "-Wall", "-Wextra", "-Werror", "-pedantic", "-g"])
        .args(extra)
        .arg("-I")
        .arg(root().join("include"))
        .arg(root().join("c_examples").join(src))
        .arg("-L")
        .arg(&lib)
        .arg("-lpipeswitch")
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .arg("-o")
        .arg(&exe)
        .status()
        .unwrap_or_else(|e| panic!("running {compiler}: {e}"));
    assert!(status.success(), "{compiler} failed on {src}");
    exe
}

fn model_file(dir: &Path) -> PathBuf {
    use pipeswitch::store::safetensors::{write_file, WriteTensor};
    use pipeswitch::store::Dtype;
    let mut data = Vec::new();
    let shapes: [(&str, &[u64]); 5] = [
        ("embed.weight", &[1000, 64]),
        ("block.0.fc.weight", &[64, 256]),
        ("block.0.fc.bias", &[256]),
        ("block.1.fc.weight", &[256, 64]),
        ("head.weight", &[64, 10]),
    ];
    for (i, (_, s)) in shapes.iter().enumerate() {
        let n: u64 = s.iter().product();
        let mut v = vec![0u8; (n * 4) as usize];
        pipeswitch::measure::fill_random(&mut v, 77 + i as u64);
        data.push(v);
    }
    let tensors: Vec<WriteTensor<'_>> = shapes
        .iter()
        .zip(&data)
        .map(|((name, shape), d)| WriteTensor { name, dtype: Dtype::F32, shape, data: d })
        .collect();
    let path = dir.join("model.safetensors");
    write_file(&path, &tensors, None).expect("writing the model");
    path
}

fn run_example(exe: &Path, tag: &str, env: &[(&str, &str)]) -> (bool, String) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = model_file(tmp.path());
    let output = Command::new(exe)
        .arg(format!("cex-{tag}-{}", std::process::id()))
        .arg(&file)
        .envs(env.iter().copied())
        .output()
        .expect("running the example");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

fn check_cpu_part(text: &str) {
    assert!(text.contains("model: "), "{text}");
    assert!(text.contains("5 tensors"), "{text}");
    assert!(text.contains("layer 2 block.1.fc"), "{text}");
    assert!(text.contains("adding it twice: already exists"), "{text}");
    assert!(text.contains("plan: "), "{text}");
}

#[test]
fn c_example_runs_its_cpu_part() {
    if pipeswitch::cuda::driver_available() {
        return; // the GPU test below runs it whole
    }
    let exe = compile("cc", "-std=c11", "switch_model.c", "switch_model", &[]);
    let (ok, text) = run_example(&exe, "cpu", &[]);
    assert!(ok, "{text}");
    check_cpu_part(&text);
    assert!(text.contains("no CUDA driver: stopping before the GPU part"), "{text}");
}

#[test]
fn c_example_is_clean_under_address_sanitizer() {
    if pipeswitch::cuda::driver_available() {
        return; // ASan and the CUDA driver do not mix well; the CPU run covers the C side
    }
    let exe = compile("cc", "-std=c11", "switch_model.c", "switch_model_asan", &["-fsanitize=address", "-fno-omit-frame-pointer"]);
    let (ok, text) = run_example(&exe, "asan", &[("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=0")]);
    assert!(ok, "{text}");
    check_cpu_part(&text);
    assert!(!text.contains("AddressSanitizer"), "{text}");
}

/// `handle_threads.c`: store handles shared between POSIX threads (use
/// while another thread frees, double free from two threads, freed handles
/// kept while new ones are made). No GPU needed.
#[test]
fn c_handles_shared_between_threads() {
    common::shm_dir();
    let exe = compile("cc", "-std=c11", "handle_threads.c", "handle_threads", &["-pthread"]);
    let out = Command::new(&exe).arg(format!("cthreads-{}", std::process::id())).output().expect("running handle_threads");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "status {:?}: {text}", out.status);
    assert!(text.contains("handle threads: OK"), "{text}");
}

#[test]
fn header_compiles_as_cpp_and_matches_the_library() {
    let exe = compile("c++", "-std=c++17", "header_check.cpp", "header_check", &[]);
    let out = Command::new(&exe).output().expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("C++ OK: 0.1.0"), "{text}");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn c_example_switches_on_the_gpu() {
    let exe = compile("cc", "-std=c11", "switch_model.c", "switch_model_gpu", &[]);
    let (ok, text) = run_example(&exe, "gpu", &[]);
    println!("{text}");
    assert!(ok, "{text}");
    check_cpu_part(&text);
    assert!(text.contains("switch: "), "{text}");
    assert!(text.contains("verified "), "{text}");
}

// ---------------------------------------------------------------------------
// run_model.c: a reference model run from C with the built-in worker
// ---------------------------------------------------------------------------

const RUN_SEED: u64 = 11;

/// run_model, compiled once per test binary (tests run in parallel threads).
fn run_model_exe() -> &'static Path {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    EXE.get_or_init(|| compile("cc", "-std=c11", "run_model.c", "run_model", &[]))
}

fn run_model_asan_exe() -> &'static Path {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    EXE.get_or_init(|| {
        compile("cc", "-std=c11", "run_model.c", "run_model_asan", &["-fsanitize=address", "-fno-omit-frame-pointer"])
    })
}

fn tiny(name: &str) -> ModelDef {
    tiny_models(2, 16).into_iter().find(|d| d.graph.name == name).unwrap_or_else(|| panic!("no tiny model {name}"))
}

/// A store in this binary's shm directory holding reference models written
/// with their graphs by `write_model_file` (and optionally a model with
/// no graph, "nograph"); destroyed on drop.
struct ModelStore {
    name: String,
    dir: tempfile::TempDir,
}

impl Drop for ModelStore {
    fn drop(&mut self) {
        let _ = Store::destroy(&self.name);
    }
}

fn model_store(tag: &str, defs: &[&ModelDef], with_graphless: bool) -> ModelStore {
    common::shm_dir();
    let name = format!("cex-run-{tag}-{}", std::process::id());
    let _ = Store::destroy(&name);
    let dir = tempfile::tempdir().expect("tempdir");
    let cap: u64 = defs.iter().map(|d| d.n_params() as u64 * 4).sum::<u64>() + (16 << 20);
    let store = Store::create(&name, cap, 8).expect("creating the store");
    for d in defs {
        let path = dir.path().join(format!("{}.safetensors", d.graph.name));
        write_model_file(d, &path, RUN_SEED, &mut |_, _| {}).expect("writing the model");
        store.add_safetensors(&d.graph.name, &path, None, &mut |_, _| {}).expect("ingesting the model");
    }
    if with_graphless {
        let path = model_file(dir.path());
        store.add_safetensors("nograph", &path, None, &mut |_, _| {}).expect("ingesting the graphless model");
    }
    // The C program opens the store by name; this handle closes here.
    drop(store);
    ModelStore { name, dir }
}

/// Writes every input to `<dir>/<name>.bin` (little-endian, as the graph
/// declares it) and returns the `--input NAME=FILE` arguments.
fn input_args(dir: &Path, inputs: &HashMap<String, HostTensor>) -> Vec<String> {
    let mut args = Vec::new();
    let mut names: Vec<&String> = inputs.keys().collect();
    names.sort();
    for n in names {
        let path = dir.join(format!("{n}.bin"));
        std::fs::write(&path, inputs[n].to_le_bytes()).expect("writing an input");
        args.push("--input".to_string());
        args.push(format!("{n}={}", path.display()));
    }
    args
}

/// Runs `exe STORE args...`; returns the exit code (None: killed by a
/// signal) and stdout + stderr.
fn run_c(exe: &Path, store: &str, args: &[String], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let output = Command::new(exe).arg(store).args(args).envs(env.iter().copied()).output().expect("running run_model");
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.code(), text)
}

fn read_f32_file(path: &Path) -> Vec<f32> {
    let b = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    assert_eq!(b.len() % 4, 0, "{} is not float32", path.display());
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// max |got - ref| / max(1, max |ref|).
fn rel_err(got: &[f32], reference: &[f32]) -> f64 {
    assert_eq!(got.len(), reference.len(), "output sizes differ");
    let scale = reference.iter().fold(1.0f64, |m, v| m.max(f64::from(v.abs())));
    got.iter().zip(reference).map(|(a, b)| f64::from((a - b).abs())).fold(0.0, |m, d| if d.is_nan() { f64::INFINITY } else { m.max(d) }) / scale
}

fn cpu_reference(d: &ModelDef, inputs: &HashMap<String, HostTensor>) -> Vec<f32> {
    let mut out = run_graph_cpu(&d.graph, &reference_weights(d, RUN_SEED), inputs).expect("the CPU reference");
    out.remove(&d.graph.outputs[0]).expect("the output")
}

/// Runs `d` from a store with run_model on the GPU (inputs from
/// `example_inputs`, written to files) and checks its output file against
/// the CPU reference. Returns the store and the program's text.
fn run_model_on_gpu(tag: &str, d: &ModelDef) -> (ModelStore, String) {
    let ms = model_store(tag, &[d], false);
    let inputs = example_inputs(&d.graph, RUN_SEED, d.vocab());
    let out = ms.dir.path().join("out.bin");
    let output = &d.graph.outputs[0];
    let mut args = vec![d.graph.name.clone(), "--profile".into(), "--output".into(), format!("{output}={}", out.display())];
    args.extend(input_args(ms.dir.path(), &inputs));
    let (code, text) = run_c(run_model_exe(), &ms.name, &args, &[]);
    println!("{text}");
    assert_eq!(code, Some(0), "{text}");
    for want in ["profiled: whole-model switch", "plan: ", "pipelined switch + run: ", "pipelined vs whole-model run: max |diff| ", "wrote "] {
        assert!(text.contains(want), "no {want:?} in\n{text}");
    }
    let got = read_f32_file(&out);
    let err = rel_err(&got, &cpu_reference(d, &inputs));
    eprintln!("{}: run_model vs the CPU reference: rel err {err:.2e}", d.graph.name);
    assert!(err <= 1e-3, "{}: max abs error {err:e} x max(1, max|ref|) vs the CPU reference\n{text}", d.graph.name);
    assert!(got.iter().all(|v| v.is_finite()));
    (ms, text)
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn c_run_model_tiny_gpt2_matches_the_cpu_reference() {
    let d = tiny("tiny-gpt2");
    let (ms, _) = run_model_on_gpu("gpt2", &d);

    // Again with no --input (the program fills input_ids with i % 97) and
    // no --profile (the execution times stored by the first run are used).
    let out = ms.dir.path().join("out-default.bin");
    let args = vec![d.graph.name.clone(), "--output".into(), format!("ln_f.out={}", out.display())];
    let (code, text) = run_c(run_model_exe(), &ms.name, &args, &[]);
    println!("{text}");
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("input input_ids: 128 bytes, int32 ids i % 97 (generated)"), "{text}");
    assert!(text.contains("profile: using the execution times stored with the model"), "{text}");
    assert!(!text.contains("profiled: "), "{text}");
    let ids: Vec<i32> = (0..32).map(|i| i % 97).collect();
    let inputs = HashMap::from([("input_ids".to_string(), HostTensor::I32(ids))]);
    let err = rel_err(&read_f32_file(&out), &cpu_reference(&d, &inputs));
    assert!(err <= 1e-3, "generated inputs: relative error {err:e}\n{text}");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn c_run_model_tiny_bert_matches_the_cpu_reference() {
    run_model_on_gpu("bert", &tiny("tiny-bert"));
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn c_run_model_tiny_resnet_matches_the_cpu_reference() {
    run_model_on_gpu("resnet", &tiny("tiny-resnet"));
}

/// The environment that takes the GPU away from a child process: nothing
/// where no driver loads; on a GPU machine no visible device.
fn no_gpu_env() -> &'static [(&'static str, &'static str)] {
    if pipeswitch::cuda::driver_available() {
        &[("CUDA_VISIBLE_DEVICES", "")]
    } else {
        &[]
    }
}

/// Without a GPU run_model checks the store, the program and the inputs on
/// the CPU, then stops at the first GPU call with a status and a message.
fn check_run_model_without_a_gpu(exe: &Path, tag: &str, env: &[(&str, &str)]) -> String {
    let d = tiny("tiny-gpt2");
    let ms = model_store(tag, &[&d], false);
    let inputs = example_inputs(&d.graph, RUN_SEED, d.vocab());
    let out = ms.dir.path().join("out.bin");
    let mut args = vec![d.graph.name.clone(), "--output".into(), format!("ln_f.out={}", out.display())];
    args.extend(input_args(ms.dir.path(), &inputs));
    let (code, text) = run_c(exe, &ms.name, &args, env);
    println!("{text}");
    assert_eq!(code, Some(1), "run_model must fail without a GPU:\n{text}");
    // The CPU part ran: the program bound, the input read, the output sized.
    for want in ["model tiny-gpt2: ", "input input_ids: 128 bytes from ", "output ln_f.out: 16384 bytes (4096 float32)"] {
        assert!(text.contains(want), "no {want:?} in\n{text}");
    }
    assert!(
        text.contains("ps_measure_h2d failed: no CUDA driver found (300): ps_measure_h2d: ")
            || text.contains("ps_measure_h2d failed: no such CUDA device (301): ps_measure_h2d: "),
        "{text}"
    );
    assert!(text.contains("run_model needs a CUDA GPU"), "{text}");
    assert!(!text.contains("H2D: ") && !text.contains("wrote "), "{text}");
    assert!(!out.exists(), "no output file without a run");
    text
}

#[test]
fn c_run_model_without_a_gpu_fails_with_a_clear_message() {
    check_run_model_without_a_gpu(run_model_exe(), "nogpu", no_gpu_env());
}

#[test]
fn c_run_model_without_a_gpu_is_clean_under_address_sanitizer() {
    if pipeswitch::cuda::driver_available() {
        return; // ASan and the CUDA driver do not mix well; the plain run covers the GPU-less path
    }
    let text = check_run_model_without_a_gpu(
        run_model_asan_exe(),
        "nogpu-asan",
        &[("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=0")],
    );
    assert!(!text.contains("AddressSanitizer"), "{text}");
}

#[test]
fn c_run_model_reports_bad_arguments() {
    // Every case fails before the first GPU call, so it runs anywhere.
    let d = tiny("tiny-gpt2");
    let ms = model_store("badargs", &[&d], true);
    let exe = run_model_exe();
    let dir = ms.dir.path();
    let good_ids = dir.join("ids.bin");
    std::fs::write(&good_ids, vec![0u8; 128]).unwrap();
    let short_ids = dir.join("short.bin");
    std::fs::write(&short_ids, vec![0u8; 100]).unwrap();
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let ids_arg = format!("input_ids={}", good_ids.display());
    let short_arg = format!("input_ids={}", short_ids.display());
    let missing_arg = format!("input_ids={}", dir.join("missing.bin").display());
    let cases: Vec<(&str, Vec<String>, i32, &str)> = vec![
        ("no model", s(&[]), 2, "usage: "),
        ("bad option", s(&["tiny-gpt2", "--output", "ln_f.out", "--bogus"]), 2, "usage: "),
        ("input without a file", s(&["tiny-gpt2", "--output", "ln_f.out", "--input", "input_ids"]), 2, "bad --input input_ids"),
        ("unknown generator", s(&["tiny-gpt2", "--output", "ln_f.out", "--input", "input_ids=@nope"]), 2, "unknown generator @nope"),
        ("unknown model", s(&["nope", "--output", "ln_f.out"]), 1, "ps_store_model_info(store, model, &info) failed: not found (200): ps_store_model_info: "),
        ("model without a graph", s(&["nograph", "--output", "x"]), 1, "ps_program_from_store(store, model, &program) failed: not found (200): ps_program_from_store: "),
        ("unknown output", s(&["tiny-gpt2", "--output", "nope.out", "--input", &ids_arg]), 1, "ps_program_tensor_bytes(program, out_name, &out_bytes) failed: not found (200)"),
        ("unknown input", s(&["tiny-gpt2", "--output", "ln_f.out", "--input", "nope=@ids"]), 1, "ps_program_tensor_bytes(program, inputs[i].name, &b) failed: not found (200)"),
        ("input of the wrong size", s(&["tiny-gpt2", "--output", "ln_f.out", "--input", &short_arg]), 1, "has 100 bytes; the input needs 128"),
        ("missing input file", s(&["tiny-gpt2", "--output", "ln_f.out", "--input", &missing_arg]), 1, "missing.bin: No such file or directory"),
    ];
    for (what, args, want_code, want) in cases {
        let (code, text) = run_c(exe, &ms.name, &args, no_gpu_env());
        assert_eq!(code, Some(want_code), "{what}: exit code\n{text}");
        assert!(text.contains(want), "{what}: no {want:?} in\n{text}");
        assert!(!text.contains("H2D: "), "{what}: got to the GPU part\n{text}");
    }
    // An unknown store.
    let (code, text) = run_c(exe, "cex-no-such-store", &s(&["tiny-gpt2", "--output", "ln_f.out"]), &[]);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("ps_store_open(store_name, &store) failed: not found (200)"), "{text}");
}
