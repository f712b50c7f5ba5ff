//! The `pipeswitch` command's parts: the GPU daemon (`serve`) and its
//! built-in worker process (`worker`), the demo and the benchmarks. The
//! binary (`main.rs`) is their command line; tests drive them directly.

pub mod bench;
pub mod bench_gemm;
pub mod bench_kernels;
pub mod bench_llm;
pub mod bench_serve;
pub mod demo;
pub mod serve;
pub mod train_policy;
pub mod worker;
