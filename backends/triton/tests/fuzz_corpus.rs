//! Replays the `triton_config` fuzz corpus on stable: the seeds and every
//! file under `fuzz/corpus/triton_config/` and `fuzz/regressions/triton_config/`
//! go through the same function the libFuzzer target runs
//! (`fuzz/harness_triton.rs`). It lives here, not in the library's
//! tests/fuzz_corpus.rs, because this crate depends on the library. Needs no
//! tritonserver. See docs/fuzzing.md.
//!
//! `PIPESWITCH_FUZZ_SEEDS=<dir>` also writes the seeds to `<dir>/triton_config/`.

#[path = "../../../fuzz/harness_triton.rs"]
#[allow(dead_code)]
mod harness_triton;

use std::path::{Path, PathBuf};

fn files(kind: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz").join(kind).join("triton_config");
    let Ok(rd) = std::fs::read_dir(&dir) else { return Vec::new() };
    let mut v: Vec<PathBuf> = rd.map(|e| e.expect("directory entry").path()).filter(|p| p.is_file()).collect();
    v.sort();
    v
}

#[test]
fn triton_config_corpus() {
    let seeds = harness_triton::seeds();
    if let Some(dir) = std::env::var_os("PIPESWITCH_FUZZ_SEEDS") {
        let dir = Path::new(&dir).join("triton_config");
        std::fs::create_dir_all(&dir).expect("seed directory");
        for (name, bytes) in &seeds {
            std::fs::write(dir.join(name), bytes).expect("writing a seed");
        }
    }
    let corpus = files("corpus");
    assert!(!corpus.is_empty(), "fuzz/corpus/triton_config is empty");
    let regressions = files("regressions");
    eprintln!("triton_config: {} seeds, {} corpus files, {} regressions", seeds.len(), corpus.len(), regressions.len());
    let mut failed = Vec::new();
    for (name, bytes) in &seeds {
        if std::panic::catch_unwind(|| harness_triton::triton_config(bytes)).is_err() {
            failed.push(format!("seed {name}"));
        }
    }
    for p in corpus.iter().chain(&regressions) {
        let bytes = std::fs::read(p).expect("reading a corpus file");
        if std::panic::catch_unwind(|| harness_triton::triton_config(&bytes)).is_err() {
            failed.push(p.display().to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "triton_config: {} inputs fail (reproduce one with `cargo +nightly fuzz run triton_config <file>` in fuzz/):\n{}",
        failed.len(),
        failed.join("\n")
    );
}
