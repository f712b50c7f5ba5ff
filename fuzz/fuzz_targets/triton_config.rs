#![no_main]
//! libFuzzer target; the body is `harness_triton::triton_config` (replayed
//! on stable by backends/triton/tests/fuzz_corpus.rs).

#[path = "../harness_triton.rs"]
#[allow(dead_code)]
mod harness_triton;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness_triton::triton_config(data));
