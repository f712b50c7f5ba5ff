#![no_main]
//! libFuzzer target; the body is `harness::graph_bind` (replayed on stable by
//! tests/fuzz_corpus.rs).

#[path = "../harness.rs"]
#[allow(dead_code)]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::graph_bind(data));
