//! elementwise kernels (kernels/elementwise.ptx): launchers and CPU references.

/// Module name in the kernel cache.
pub const MODULE: &str = "elementwise";
/// The PTX text.
pub const PTX: &str = include_str!("../../kernels/elementwise.ptx");
