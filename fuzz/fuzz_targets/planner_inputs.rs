#![no_main]
//! libFuzzer target; the body is `harness::planner_inputs` (replayed on stable by
//! tests/fuzz_corpus.rs).

#[path = "../harness.rs"]
#[allow(dead_code)]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::planner_inputs(data));
