//! The C examples, built with `-Wall -Wextra -Werror -pedantic` against the
//! committed header and the freshly built libpipeswitch.so, and run: their
//! CPU-side parts here (also under AddressSanitizer), all of it on a GPU.

use std::path::{Path, PathBuf};
use std::process::Command;

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
        pipeswitch::bench::fill_random(&mut v, 77 + i as u64);
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
