//! gemm kernels (kernels/gemm.ptx): launchers and CPU references.

/// Module name in the kernel cache.
pub const MODULE: &str = "gemm";
/// The PTX text.
pub const PTX: &str = include_str!("../../kernels/gemm.ptx");
