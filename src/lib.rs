//! libpipeswitch: millisecond GPU model switching (PipeSwitch, OSDI 2020).
//!
//! Where things are:
//! - [`store`]: the pinned host model store in shared memory;
//! - [`arena`]: the device arena (one allocation per GPU, CUDA IPC export);
//! - [`planner`]: the optimal layer grouping;
//! - [`cost`]: the cost model fitted to measurements, closed-loop planning;
//! - [`client`]: an application's connection to the GPU daemon;
//! - [`protocol`]: the messages between the daemon, its workers and clients;
//! - [`residency`]: which models stay in an arena between uses, and where;
//! - [`switch`]: pipelined transfer with one event per group;
//! - [`worker`]: runs a model graph from the arena as its groups arrive;
//! - [`kernels`] and [`model`]: hand-written PTX layers, model graphs;
//! - [`measure`]: bandwidth and per-group overhead on the current device;
//! - [`cuda`]: the driver layer (dynamic loading: builds and runs without CUDA);
//! - [`ffi`]: the C ABI (`include/pipeswitch.h`).

pub mod arena;
pub mod client;
pub mod cost;
pub mod cuda;
pub mod error;
pub mod ffi;
pub mod kernels;
pub mod measure;
pub mod model;
pub mod planner;
pub mod protocol;
pub mod residency;
pub mod store;
pub mod switch;
pub mod units;
pub mod worker;

pub use error::{Error, Result};

/// Library version, also in the header as `PS_VERSION_*`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
