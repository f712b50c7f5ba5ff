//! The `pipeswitch` command's parts that tests drive directly: the GPU
//! daemon (`serve`) and its built-in worker process (`worker`).

pub mod serve;
pub mod worker;
