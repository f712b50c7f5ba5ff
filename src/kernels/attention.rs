//! attention kernels (kernels/attention.ptx): launchers and CPU references.

/// Module name in the kernel cache.
pub const MODULE: &str = "attention";
/// The PTX text.
pub const PTX: &str = include_str!("../../kernels/attention.ptx");
