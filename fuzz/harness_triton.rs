//! The body of the `triton_config` fuzz target, shared by the libFuzzer
//! binary (`fuzz/fuzz_targets/triton_config.rs`) and the stable replay
//! (`backends/triton/tests/fuzz_corpus.rs`, in the backend's package since
//! it depends on the library). See docs/fuzzing.md.
//!
//! The Triton backend's configuration parsers (`backends/triton/src/config.rs`)
//! read what Triton hands over: the model's `config.pbtxt` as JSON, and the
//! `--backend-config` settings. Every function answers Ok or an error with a
//! message, never a panic, and what it accepts is consistent.

use std::sync::OnceLock;

use pipeswitch::model::graph::Graph;
use pipeswitch::model::{cpu, llama};
use triton_pipeswitch::config::{complete, parse_size, BackendConfig, ModelConfig};

/// The reference graphs: the five tiny models and the tiny Llama's decode
/// step (I32 inputs, two outputs).
pub fn graphs() -> &'static [Graph] {
    static G: OnceLock<Vec<Graph>> = OnceLock::new();
    G.get_or_init(|| {
        let mut v: Vec<Graph> = cpu::tiny_models(2, 8).into_iter().map(|d| d.graph).collect();
        v.push(llama::graph(&llama::LlamaConfig::tiny(false), 1, 1, 16));
        v
    })
}

/// Byte 0 picks the reference graph; the rest is the text (UTF-8, lossily)
/// given to `ModelConfig::from_json` (and `check_against` the graph),
/// `complete`, `BackendConfig::from_json` and `parse_size`.
pub fn triton_config(data: &[u8]) {
    let Some((&pick, text)) = data.split_first() else { return };
    let g = &graphs()[pick as usize % graphs().len()];
    let text = String::from_utf8_lossy(text);
    let parsed = ModelConfig::from_json(&text);
    match &parsed {
        Ok(c) => {
            assert!(!c.store.is_empty() && !c.model.is_empty());
            // The batch size read is the one written (not an unreadable one taken as 0).
            if let Ok(serde_json::Value::Object(o)) = serde_json::from_str::<serde_json::Value>(&text) {
                match o.get("max_batch_size") {
                    Some(serde_json::Value::Number(n)) => assert_eq!(n.as_i64(), Some(c.max_batch_size), "max_batch_size {n}"),
                    Some(serde_json::Value::String(s)) => assert_eq!(s.parse::<i64>().ok(), Some(c.max_batch_size), "max_batch_size {s:?}"),
                    _ => {}
                }
            }
            match c.check_against(g) {
                Ok(()) => {
                    assert_eq!(c.max_batch_size, 0);
                    for (n, _) in &g.inputs {
                        assert!(c.inputs.iter().any(|i| i.name == *n), "input {n} not listed, yet the check passes");
                    }
                    for n in &g.outputs {
                        assert!(c.outputs.iter().any(|o| o.name == *n), "output {n} not listed, yet the check passes");
                    }
                }
                Err(e) => assert!(!e.is_empty()),
            }
        }
        Err(e) => assert!(!e.is_empty()),
    }
    match complete(&text, g) {
        Ok(Some(out)) => {
            // A completed configuration reads as the original (same
            // parameters, same batch size), lists the graph's inputs and
            // outputs, passes the check unless the batch size was set, and
            // is not completed again.
            let again = ModelConfig::from_json(&out);
            match (&parsed, &again) {
                (Ok(c), Ok(d)) => {
                    assert_eq!((&c.store, &c.model, c.executor), (&d.store, &d.model, d.executor));
                    assert_eq!(c.max_batch_size, d.max_batch_size, "completion changed max_batch_size: {out}");
                    match d.check_against(g) {
                        Ok(()) => {}
                        Err(e) => assert!(d.max_batch_size != 0 && e.contains("max_batch_size"), "a completed configuration fails the check: {e}\n{out}"),
                    }
                }
                (Err(_), Err(_)) => {}
                (a, b) => panic!("the original reads as {a:?}, its completion ({out}) as {b:?}"),
            }
            assert_eq!(complete(&out, g), Ok(None), "a completed configuration is completed again");
        }
        Ok(None) => {}
        Err(e) => assert!(!e.is_empty()),
    }
    match BackendConfig::from_json(&text) {
        Ok(c) => assert!(c.residency_bytes < c.arena_bytes, "{c:?}"),
        Err(e) => assert!(!e.is_empty()),
    }
    match parse_size(&text) {
        Ok(n) => assert_eq!(parse_size(&n.to_string()), Ok(n)),
        Err(e) => assert!(!e.is_empty()),
    }
}

/// Valid and broken inputs: the starting corpus, also replayed by the test.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let params = r#""parameters":{"store":{"string_value":"s"},"model":{"string_value":"m"}}"#;
    for (i, g) in graphs().iter().enumerate() {
        let bare = format!(r#"{{"name":"m","backend":"pipeswitch","max_batch_size":0,{params}}}"#);
        let done = complete(&bare, g).expect("completing a seed").expect("a bare config is completed");
        let mut with = |name: String, text: &str| {
            let mut v = vec![i as u8];
            v.extend_from_slice(text.as_bytes());
            out.push((format!("{name}-{}", g.name), v));
        };
        with("bare".into(), &bare);
        with("complete".into(), &done);
        with("batch8".into(), &done.replace("\"max_batch_size\":0", "\"max_batch_size\":8"));
    }
    let texts = [
        ("backend", r#"{"cmdline":{"arena-bytes":"8G","residency-bytes":"6G","workspace-bytes":"64MiB","backend-directory":"/x"}}"#),
        ("backend-bad", r#"{"cmdline":{"arena-bytes":"1G","residency-bytes":"1G"}}"#),
        ("size", "512 KiB"),
        ("size-overflow", "99999999999T"),
        ("executor", r#"{"parameters":{"store":{"string_value":"s"},"model":{"string_value":"m"},"executor":{"string_value":"cpu-reference"}},"input":[{"name":"x","data_type":"TYPE_FP32","dims":["2","3"]}]}"#),
        ("no-store", r#"{"parameters":{"model":{"string_value":"m"}}}"#),
    ];
    for (name, t) in texts {
        let mut v = vec![0u8];
        v.extend_from_slice(t.as_bytes());
        out.push((name.into(), v));
    }
    out
}
