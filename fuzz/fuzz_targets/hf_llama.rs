#![no_main]
//! libFuzzer target; the body is `harness::hf_llama` (replayed on stable by
//! tests/fuzz_corpus.rs).

#[path = "../harness.rs"]
#[allow(dead_code)]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::hf_llama(data));
