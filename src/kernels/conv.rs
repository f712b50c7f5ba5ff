//! conv kernels (kernels/conv.ptx): launchers and CPU references.

/// Module name in the kernel cache.
pub const MODULE: &str = "conv";
/// The PTX text.
pub const PTX: &str = include_str!("../../kernels/conv.ptx");
