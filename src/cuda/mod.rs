//! CUDA, in three layers as cudarc does it: the raw `sys` calls (cudarc,
//! loaded dynamically, so the crate builds and runs without CUDA), the result
//! layer ([`result`]: `cu!`, [`CudaError`]), and RAII types used by the rest of
//! the crate: [`Device`] (the primary context), [`Stream`], [`Event`],
//! [`DeviceAlloc`], [`PinnedHost`], [`HostRegistration`], [`IpcMapping`],
//! [`Module`] and [`Graph`]. Nothing outside this module calls the driver directly.

pub mod device;
pub mod event;
pub mod graph;
pub mod memory;
pub mod module;
pub mod result;
pub mod stream;

pub use cudarc::driver::sys::{CUdeviceptr, CUevent, CUstream};
pub use device::Device;
pub use event::Event;
pub use graph::Graph;
pub use memory::{DeviceAlloc, HostRegistration, IpcHandle, IpcMapping, PinnedHost};
pub use module::{Function, LaunchConfig, Module};
pub use result::{driver, driver_available, CudaError};
pub use stream::Stream;
