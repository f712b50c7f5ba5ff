//! norm kernels (kernels/norm.ptx): launchers and CPU references.

/// Module name in the kernel cache.
pub const MODULE: &str = "norm";
/// The PTX text.
pub const PTX: &str = include_str!("../../kernels/norm.ptx");
