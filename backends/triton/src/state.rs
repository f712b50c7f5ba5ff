//! Process-wide state of the backend: its configuration, the stores it has
//! opened, and per GPU one device arena with one residency manager that
//! every model instance on that GPU shares.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use pipeswitch::arena::Arena;
use pipeswitch::cuda::Device;
use pipeswitch::error::Result;
use pipeswitch::residency::ResidencyManager;
use pipeswitch::store::Store;

use crate::config::BackendConfig;

static CONFIG: OnceLock<BackendConfig> = OnceLock::new();

/// Sets the backend configuration (once, when the backend is loaded).
pub fn set_config(c: BackendConfig) {
    let _ = CONFIG.set(c);
}

pub fn config() -> BackendConfig {
    CONFIG.get().cloned().unwrap_or_default()
}

/// One GPU: its arena and the residency manager placing models in it.
pub struct Gpu {
    pub arena: Arc<Arena>,
    pub residency: Arc<ResidencyManager>,
    /// Measured H2D bandwidth (GB/s) and per-copy overhead (ms): what the
    /// plans of models without a fitted cost model are made with.
    pub h2d: (f64, f64),
}

/// The GPU with this ordinal, its arena created on first use and kept for
/// the life of the process (so GPU memory stays flat as models come and go).
pub fn gpu(ordinal: i32) -> Result<Arc<Gpu>> {
    static GPUS: OnceLock<Mutex<HashMap<i32, Arc<Gpu>>>> = OnceLock::new();
    let mut gpus = GPUS.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
    if let Some(g) = gpus.get(&ordinal) {
        return Ok(g.clone());
    }
    let c = config();
    let device = Device::get(ordinal)?;
    let h2d = pipeswitch::measure::measure_h2d(ordinal, 64 << 20, 5)
        .map(|p| (p.peak_gbps, p.overhead_ms))
        .unwrap_or((20.0, 0.01));
    let arena = Arc::new(Arena::create(device.ordinal(), c.arena_bytes, c.workspace_bytes)?);
    let residency = ResidencyManager::new(&arena, c.residency_bytes)?;
    let g = Arc::new(Gpu { arena, residency, h2d });
    gpus.insert(ordinal, g.clone());
    Ok(g)
}

/// The store of this name, opened once per process.
pub fn store(name: &str) -> Result<Arc<Store>> {
    static STORES: OnceLock<Mutex<HashMap<String, Arc<Store>>>> = OnceLock::new();
    let mut stores = STORES.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
    if let Some(s) = stores.get(name) {
        return Ok(s.clone());
    }
    let s = Arc::new(Store::open(name)?);
    stores.insert(name.to_string(), s.clone());
    Ok(s)
}
