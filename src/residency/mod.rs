//! The residency manager: keeps models in a device arena while there is room,
//! so that a model used again pays no copy at all.
//!
//! One manager per arena (the daemon's, or an in-process server's). It takes
//! one region of the arena and places models inside it by the rules of
//! [`ResidencyPolicy`]: [`ResidencyManager::acquire`] hands back a
//! [`ModelUse`] at once, either of a resident model (nothing to wait for),
//! of a model whose copy another use started (wait on the same groups), or of
//! a model whose pipelined switch it has just started (wait per group, as on
//! any [`Switch`]). Dropping the use ends it; the model stays resident until
//! the room is needed by another.
//!
//! A use must be dropped only once the GPU work that reads the model has been
//! enqueued behind something that orders it before later copies (in
//! practice: after the request that used it completed). Models moved to make
//! room are moved on the manager's stream and the host waits for the moves
//! (rare: only when the free space is fragmented) before the new copy starts.

pub mod policy;

use cudarc::driver::sys::{CUdeviceptr, CUstream};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::arena::{Arena, REGION_ALIGN};
use crate::cuda::{Device, Stream};
use crate::error::{Error, Result};
use crate::store::{Model, Store};
use crate::switch::Switch;
pub use policy::{Acquire, Counters, Move, ResidencyPolicy, Ticket};

/// A model as the manager knows it: the store, the model's name and its id
/// (ids are never reused in a store, so a model removed and added again under
/// the same name is another model).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ModelKey {
    pub store: String,
    pub model: String,
    pub id: u64,
}

/// Counters of a manager, with the GPU time its switches took.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ResidencyStats {
    pub counters: Counters,
    /// GPU time of completed switches (copies), in ms.
    pub switch_ms: f64,
    /// Bytes of the manager's region and the bytes placed models take.
    pub capacity_bytes: u64,
    pub used_bytes: u64,
}

struct Inner {
    policy: ResidencyPolicy<ModelKey>,
    /// Switches whose copies may still be in flight, by model.
    loads: HashMap<ModelKey, Arc<Switch>>,
    /// Switches done with their copies, kept until no use holds them.
    draining: Vec<Arc<Switch>>,
    idle: Vec<Switch>,
    moves: Stream,
    switch_ms: f64,
}

/// The residency manager of one arena.
pub struct ResidencyManager {
    arena: Arc<Arena>,
    device: &'static Device,
    /// The manager's region of the arena.
    offset: u64,
    bytes: u64,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for ResidencyManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResidencyManager").field("offset", &self.offset).field("bytes", &self.bytes).finish()
    }
}

/// One use of a model placed by a [`ResidencyManager`]; ends when dropped.
pub struct ModelUse {
    manager: Arc<ResidencyManager>,
    ticket: Ticket,
    model: Arc<Model>,
    /// Arena offset of the model's first byte.
    offset: u64,
    /// The switch that copies the model in, while this use may wait on it.
    load: Option<Arc<Switch>>,
    hit: bool,
}

impl std::fmt::Debug for ModelUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelUse")
            .field("model", &self.model.name)
            .field("offset", &self.offset)
            .field("hit", &self.hit)
            .field("loading", &self.load.is_some())
            .finish()
    }
}

fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    // Poison: the policy's state is updated only after each decision is
    // complete, so a panic elsewhere leaves it consistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ResidencyManager {
    /// A manager that places models in `bytes` bytes of `arena` (a region it
    /// allocates now; the arena's owner only).
    pub fn new(arena: &Arc<Arena>, bytes: u64) -> Result<Arc<ResidencyManager>> {
        let device = arena.device();
        let offset = arena.alloc(bytes)?;
        let made = (|| {
            Ok(Inner {
                policy: ResidencyPolicy::new(bytes, REGION_ALIGN)?,
                loads: HashMap::new(),
                draining: Vec::new(),
                idle: Vec::new(),
                moves: Stream::new(device)?,
                switch_ms: 0.0,
            })
        })();
        match made {
            Ok(inner) => Ok(Arc::new(ResidencyManager { arena: arena.clone(), device, offset, bytes, inner: Mutex::new(inner) })),
            Err(e) => {
                let _ = arena.release(offset);
                Err(e)
            }
        }
    }

    pub fn arena(&self) -> &Arc<Arena> {
        &self.arena
    }

    /// Counters and sizes.
    pub fn stats(&self) -> Result<ResidencyStats> {
        let mut inner = lock(&self.inner);
        self.reap(&mut inner)?;
        Ok(ResidencyStats {
            counters: inner.policy.counters(),
            switch_ms: inner.switch_ms,
            capacity_bytes: inner.policy.capacity(),
            used_bytes: inner.policy.used_bytes(),
        })
    }

    /// Whether `model` of `store` is resident now (its copy complete).
    pub fn is_resident(&self, store: &Store, model: &str) -> Result<bool> {
        let m = store.model(model)?;
        let key = key_of(store, &m);
        let mut inner = lock(&self.inner);
        self.reap(&mut inner)?;
        Ok(inner.policy.is_resident(&key))
    }

    /// Starts a use of `model` from `store`. A resident model is handed back
    /// at once with nothing to wait for; otherwise its pipelined switch with
    /// `group_starts` (the model's plan; `None`: one group per layer) starts
    /// now, and the use waits per group.
    pub fn acquire(self: &Arc<Self>, store: &Arc<Store>, model: &str, group_starts: Option<&[usize]>) -> Result<ModelUse> {
        let m = store.model(model)?;
        let key = key_of(store, &m);
        let mut inner = lock(&self.inner);
        self.reap(&mut inner)?;
        let (ticket, decision) = inner.policy.acquire(&key, m.bytes)?;
        let (offset, load, hit) = match decision {
            Acquire::Hit { offset, loading } => {
                let load = if loading { inner.loads.get(&key).cloned() } else { None };
                (offset, load, true)
            }
            Acquire::Miss { offset, evicted, moves } => {
                for k in &evicted {
                    tracing::debug!("residency: evicted {:?} of store {:?}", k.model, k.store);
                }
                let started = self.move_models(&inner, &moves).and_then(|()| {
                    let mut sw = match inner.idle.pop() {
                        Some(sw) => sw,
                        None => Switch::new(self.device.ordinal())?,
                    };
                    let plan: Vec<usize> = match group_starts {
                        Some(p) => p.to_vec(),
                        None => (0..m.layers.len()).collect(),
                    };
                    match sw.start(store, model, &self.arena, self.offset + offset, &plan) {
                        Ok(()) => Ok(sw),
                        Err(e) => {
                            inner.idle.push(sw);
                            Err(e)
                        }
                    }
                });
                match started {
                    Ok(sw) => {
                        let sw = Arc::new(sw);
                        inner.loads.insert(key.clone(), sw.clone());
                        (offset, Some(sw), false)
                    }
                    Err(e) => {
                        // Not resident; the use never started.
                        inner.policy.failed(&key)?;
                        inner.policy.release(ticket)?;
                        return Err(e);
                    }
                }
            }
        };
        Ok(ModelUse { manager: self.clone(), ticket, model: m, offset: self.offset + offset, load, hit })
    }

    /// Moves resident models inside the region and waits for the moves.
    fn move_models(&self, inner: &Inner, moves: &[Move<ModelKey>]) -> Result<()> {
        if moves.is_empty() {
            return Ok(());
        }
        self.device.bind()?;
        for m in moves {
            self.arena.move_bytes(self.offset + m.from, self.offset + m.to, m.bytes, inner.moves.raw())?;
        }
        inner.moves.synchronize()
    }

    /// Marks finished copies resident and recycles switches no use holds.
    fn reap(&self, inner: &mut Inner) -> Result<()> {
        let mut finished = Vec::new();
        for (k, sw) in &inner.loads {
            let last = sw.n_groups()? - 1;
            if sw.group_ready(last)? {
                finished.push(k.clone());
            }
        }
        for k in finished {
            let sw = inner.loads.remove(&k).expect("listed above");
            inner.switch_ms += sw.elapsed_ms()?;
            // The model may have been declared failed meanwhile.
            if inner.policy.offset(&k).is_some() {
                inner.policy.loaded(&k)?;
            }
            inner.draining.push(sw);
        }
        let mut still = Vec::new();
        for sw in inner.draining.drain(..) {
            match Arc::try_unwrap(sw) {
                Ok(sw) => inner.idle.push(sw),
                Err(sw) => still.push(sw),
            }
        }
        inner.draining = still;
        Ok(())
    }

    /// The bytes of `model` of `store` can no longer be trusted (e.g. a
    /// worker died while writing them): it is not resident any more.
    pub fn invalidate(&self, store: &Store, model: &str) -> Result<()> {
        let m = store.model(model)?;
        let key = key_of(store, &m);
        let mut inner = lock(&self.inner);
        if inner.policy.offset(&key).is_some() {
            inner.policy.failed(&key)?;
        }
        if let Some(sw) = inner.loads.remove(&key) {
            inner.draining.push(sw);
        }
        Ok(())
    }

    fn release(&self, ticket: Ticket) {
        let mut inner = lock(&self.inner);
        if let Err(e) = inner.policy.release(ticket) {
            tracing::error!("residency: {e}");
        }
    }
}

impl Drop for ResidencyManager {
    fn drop(&mut self) {
        let inner = self.inner.get_mut().unwrap_or_else(|p| p.into_inner());
        // Switches wait for their copies when dropped; then the region goes.
        inner.loads.clear();
        inner.draining.clear();
        inner.idle.clear();
        if let Err(e) = self.arena.release(self.offset) {
            tracing::warn!("residency: releasing the region: {e}");
        }
    }
}

fn key_of(store: &Store, m: &Model) -> ModelKey {
    ModelKey { store: store.name().to_string(), model: m.name.clone(), id: m.id }
}

impl ModelUse {
    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// Arena offset of the model's first byte.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Device address of the model's first byte.
    pub fn base(&self) -> CUdeviceptr {
        self.manager.arena.base() + self.offset
    }

    /// True if the model was placed already (resident or arriving) when the
    /// use began: no copy was started for it.
    pub fn was_hit(&self) -> bool {
        self.hit
    }

    /// Makes `stream` wait on the GPU until group `group` of the model's copy
    /// has arrived; nothing to wait for once the model is resident.
    pub fn wait_group(&self, group: usize, stream: CUstream) -> Result<()> {
        match &self.load {
            Some(sw) => sw.wait_group(group, stream),
            None => Ok(()),
        }
    }

    /// The group that holds `layer` (0 for a model that was resident).
    pub fn group_of_layer(&self, layer: usize) -> Result<usize> {
        if layer >= self.model.layers.len() {
            return Err(Error::invalid(format!("layer {layer} out of range")));
        }
        match &self.load {
            Some(sw) => sw.group_of_layer(layer),
            None => Ok(0),
        }
    }

    /// Blocks the host until the model has arrived.
    pub fn synchronize(&self) -> Result<()> {
        match &self.load {
            Some(sw) => sw.synchronize(),
            None => Ok(()),
        }
    }

    /// The switch copying the model in, if this use started or joined one.
    pub fn switch(&self) -> Option<&Switch> {
        self.load.as_deref()
    }
}

impl Drop for ModelUse {
    fn drop(&mut self) {
        self.load = None;
        self.manager.release(self.ticket);
    }
}
