//! Replays the fuzz corpora on stable: every file under
//! `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/` goes through
//! the same harness function that the libFuzzer target runs
//! (`fuzz/harness.rs`), and so do the generated seeds. See docs/fuzzing.md.
//!
//! `PIPESWITCH_FUZZ_SEEDS=<dir>` also writes the seeds to `<dir>/<target>/`
//! (the starting corpus of a fresh fuzzing run).

#[path = "../fuzz/harness.rs"]
#[allow(dead_code)]
mod harness;

use std::path::{Path, PathBuf};

fn files(kind: &str, target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz").join(kind).join(target);
    let Ok(rd) = std::fs::read_dir(&dir) else { return Vec::new() };
    let mut v: Vec<PathBuf> = rd.map(|e| e.expect("directory entry").path()).filter(|p| p.is_file()).collect();
    v.sort();
    v
}

/// Runs `f` over the seeds and every stored input, naming the inputs that fail.
fn replay(target: &str, f: fn(&[u8])) {
    let mut failed = Vec::new();
    let seeds = harness::seeds(target);
    if let Some(dir) = std::env::var_os("PIPESWITCH_FUZZ_SEEDS") {
        let dir = Path::new(&dir).join(target);
        std::fs::create_dir_all(&dir).expect("seed directory");
        for (name, bytes) in &seeds {
            std::fs::write(dir.join(name), bytes).expect("writing a seed");
        }
    }
    for (name, bytes) in &seeds {
        if !passes(bytes, f) {
            failed.push(format!("seed {name}"));
        }
    }
    let corpus = files("corpus", target);
    assert!(!corpus.is_empty(), "fuzz/corpus/{target} is empty");
    let regressions = files("regressions", target);
    eprintln!("{target}: {} seeds, {} corpus files, {} regressions", seeds.len(), corpus.len(), regressions.len());
    for p in corpus.iter().chain(&regressions) {
        let bytes = std::fs::read(p).expect("reading a corpus file");
        if !passes(&bytes, f) {
            failed.push(p.display().to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "{target}: {} inputs fail (reproduce one with `cargo +nightly fuzz run {target} <file>` in fuzz/):\n{}",
        failed.len(),
        failed.join("\n")
    );
}

fn passes(bytes: &[u8], f: fn(&[u8])) -> bool {
    std::panic::catch_unwind(|| f(bytes)).is_ok()
}

#[test]
fn safetensors_ingest_corpus() {
    replay("safetensors_ingest", harness::safetensors_ingest);
}

#[test]
fn segment_open_corpus() {
    replay("segment_open", harness::segment_open);
}

#[test]
fn graph_bind_corpus() {
    replay("graph_bind", harness::graph_bind);
}

#[test]
fn planner_inputs_corpus() {
    replay("planner_inputs", harness::planner_inputs);
}

#[test]
fn daemon_message_corpus() {
    replay("daemon_message", harness::daemon_message);
}

#[test]
fn hf_llama_corpus() {
    replay("hf_llama", harness::hf_llama);
}

/// The seeds reach both sides: the valid directories are ingested (and so
/// pass the harness's read-back checks), the broken ones refused.
#[test]
fn hf_llama_seeds_ingest_or_not() {
    for (name, bytes) in harness::seeds("hf_llama") {
        let want = matches!(name.as_str(), "one-shard" | "two-shards" | "tied-with-extras" | "rope-scaling-f16");
        assert_eq!(harness::hf_llama_ingests(&bytes), want, "seed {name}");
    }
}
