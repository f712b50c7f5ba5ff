//! Hand-written PTX kernels for the reference layers. The PTX text lives in
//! `kernels/*.ptx`, is embedded with `include_str!`, JIT-compiled once per
//! process and device (with the JIT's logs on failure) and cached here:
//! [`preload`] loads every module up front, so no switch ever waits for the
//! JIT. Each family's file holds its typed launchers and the CPU reference
//! that its tests compare against.

pub mod attention;
pub mod conv;
pub mod elementwise;
pub mod gemm;
pub mod llama;
pub mod llama_ref;
pub mod norm;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use crate::cuda::{Device, Function, Module};
use crate::error::Result;

type Cache = Mutex<HashMap<(i32, &'static str), Arc<Module>>>;

fn cache() -> &'static Cache {
    static CACHE: OnceLock<Cache> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The module `name` (PTX text `ptx`) on `device`, JIT-compiled on first use.
pub fn module(device: &'static Device, name: &'static str, ptx: &'static str) -> Result<Arc<Module>> {
    let key = (device.ordinal(), name);
    if let Some(m) = cache().lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
        return Ok(m.clone());
    }
    // Compile outside the lock; a racing thread's result is simply dropped.
    let m = Arc::new(Module::load_ptx(device, name, ptx)?);
    let mut c = cache().lock().unwrap_or_else(|p| p.into_inner());
    Ok(c.entry(key).or_insert(m).clone())
}

/// A kernel of module `name`.
pub fn function(device: &'static Device, name: &'static str, ptx: &'static str, entry: &str) -> Result<Function> {
    module(device, name, ptx)?.function(entry)
}

/// Every kernel family's PTX, by module name.
pub const MODULES: &[(&str, &str)] = &[
    (attention::MODULE, attention::PTX),
    (conv::MODULE, conv::PTX),
    (elementwise::MODULE, elementwise::PTX),
    (gemm::MODULE, gemm::PTX),
    (norm::MODULE, norm::PTX),
];

/// JIT-compiles every module on `device` now (about 100 ms the first time),
/// the Hopper-only GEMM module included where the device runs it.
pub fn preload(device: &'static Device) -> Result<()> {
    for (name, ptx) in MODULES {
        module(device, name, ptx)?;
    }
    gemm::preload_sm90a(device)
}
