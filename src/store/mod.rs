//! The host model store: a named shared-memory segment holding every model's
//! weights, in execution order, plus a table describing them. Any process can
//! open a store by name; each pins it once with `cuMemHostRegister` so that
//! copies to the GPU run at full PCIe speed.
//!
//! Changes (add, remove, profile updates) take the segment's exclusive lock;
//! a model's bytes are written outside the lock into space reserved for it,
//! and become visible only when its entry is committed.
//!
//! Liveness never depends on process ids (which mean nothing across PID
//! namespaces): it rests on open-file-description locks on per-slot bytes of
//! the segment file (see [`shm::lock_byte`]), which the kernel drops when
//! their holder dies.
//! - A writer holds W(slot) while it writes; an add treats a `Writing`
//!   entry as abandoned only once nobody holds W(slot).
//! - A [`ModelLease`] holds L(slot) shared: a model being read, copied by a
//!   switch or bound by a program. Removing a model hides it at once
//!   (`Removing`) and frees its space only once nobody holds L(slot): at the
//!   remove, at the last lease's release, or at a later add.
//!
//! A handle is tied to the process that opened it: after `fork`, the child
//! must open the store again (an inherited handle refuses every operation,
//! as the segment lock would not tell the two processes apart).

pub mod layout;
pub mod model;
pub mod safetensors;
pub mod shm;

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::cuda::{Device, HostRegistration};
use crate::error::{Error, Result};
use layout::{Entry, EntryState, Header, ALLOC_ALIGN, ENTRY_BYTES, MAX_NAME};
pub use layout::MAX_MODELS;
pub use model::{Dtype, LayerInfo, LayerSpec, Model, ModelSpec, TensorInfo, TensorSpec, GRAPH_ATTRIBUTE, TENSOR_ALIGN};
use model::align_up;
use shm::{FlockGuard, LockKind, Segment};

/// Progress of a long operation: (bytes done, bytes in all).
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64);

/// Default number of models a store has room for.
pub const DEFAULT_MAX_MODELS: u32 = 256;

/// One line of [`Store::models`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSummary {
    pub name: String,
    pub id: u64,
    pub bytes: u64,
    pub n_layers: u32,
    pub n_tensors: u32,
}

/// How full a store is. `used_bytes` counts every model's footprint
/// ([`footprint`]), removed models still leased included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub largest_free_bytes: u64,
    pub models: u32,
    pub max_models: u32,
}

/// Bytes a model occupies in a store's data region: its weights (what
/// [`Model::bytes`] and an arena region count), then its metadata (names,
/// shapes, attributes such as its graph, the profile), rounded up to
/// [`ALLOC_ALIGN`]. Always more than the weights alone.
pub fn footprint(spec: &ModelSpec<'_>) -> Result<u64> {
    let lay = layout::layout_model(spec)?;
    Ok(align_up(lay.data_bytes + lay.meta.len() as u64, ALLOC_ALIGN))
}

/// The `capacity_bytes` to give [`Store::create`] so that a new store holds
/// models of these footprints ([`footprint`], [`Store::model_footprint`])
/// all at once. Removing and adding models of other sizes may fragment the
/// space: [`Usage::largest_free_bytes`] says what fits then.
pub fn capacity_for(footprints: &[u64]) -> Result<u64> {
    footprints
        .iter()
        .try_fold(0u64, |acc, &f| f.checked_next_multiple_of(ALLOC_ALIGN).and_then(|f| acc.checked_add(f)))
        .map(|total| total.max(ALLOC_ALIGN))
        .ok_or_else(|| Error::invalid("the footprints add up to more than 2^64 bytes"))
}

/// The lock byte a writer holds while it writes into `slot`.
fn writer_byte(slot: u32) -> i64 {
    shm::lock_byte(2 * u64::from(slot))
}

/// The lock byte every lease on `slot`'s model holds (shared).
fn lease_byte(slot: u32) -> i64 {
    shm::lock_byte(2 * u64::from(slot) + 1)
}

/// A table read under the segment lock.
struct Table {
    entries: Vec<(u32, Entry)>,
    free: Vec<u32>,
    damaged: Vec<(u32, Error)>,
}

/// What a store handle and its leases share: the mapping, the locks.
struct Shared {
    name: String,
    seg: Segment,
    header: Header,
    /// The process that opened the store. Locks and leases belong to it.
    pid: u32,
    /// Serialises this process's threads (flock does not: it is per open file).
    local: Mutex<()>,
    /// A second open file description for the slot locks this process holds
    /// (writes in progress, leases); `seg.file` probes for other holders.
    lock_file: File,
    /// Per slot, how many leases this process holds (one shared lock each slot).
    leases: Mutex<HashMap<u32, u64>>,
}

/// Writes bytes `[offset, offset + bytes.len())` of tensor `tensor`
/// ([`Store::add_model_filled`]): `fill(tensor, offset, bytes)`.
pub type FillFn<'a> = dyn Fn(usize, u64, &mut [u8]) -> Result<()> + Sync + 'a;

/// An open store.
pub struct Store {
    sh: Arc<Shared>,
    cache: Mutex<(u64, HashMap<String, Arc<Model>>)>,
    pinned: Mutex<Option<HostRegistration>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("name", &self.sh.name).field("path", &self.sh.seg.path).finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves no broken invariant
    // behind (the shared state lives in the segment), so poison is ignored.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn check_model_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > MAX_NAME || name.contains('\0') {
        return Err(Error::invalid(format!(
            "bad model name {name:?}: 1 to {MAX_NAME} bytes of UTF-8 without NUL"
        )));
    }
    Ok(())
}

/// A model that stays stored while this lives: its bytes are neither freed
/// nor reused, in any process, until the last clone is dropped (or its
/// process dies). A removed model disappears from lookups at once; its
/// space comes back when its last lease goes. Cheap to clone; derefs to the
/// [`Model`].
#[derive(Clone)]
pub struct ModelLease(Arc<LeaseInner>);

struct LeaseInner {
    sh: Arc<Shared>,
    slot: u32,
    model: Arc<Model>,
}

impl ModelLease {
    pub fn model(&self) -> &Arc<Model> {
        &self.0.model
    }

    fn belongs_to(&self, store: &Store) -> bool {
        Arc::ptr_eq(&self.0.sh, &store.sh)
    }
}

impl std::ops::Deref for ModelLease {
    type Target = Model;
    fn deref(&self) -> &Model {
        &self.0.model
    }
}

impl std::fmt::Debug for ModelLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelLease").field("model", &self.0.model.name).field("id", &self.0.model.id).finish()
    }
}

impl Drop for LeaseInner {
    fn drop(&mut self) {
        self.sh.release(self.slot);
    }
}

/// The segment lock held under this process's mutex. The flock is released
/// before the mutex (fields drop in order): the other threads of this
/// handle share its open file description, so a thread that took the mutex
/// while the flock was still held would *convert* that flock instead of
/// waiting for it, and the first thread's `LOCK_UN` would then release the
/// second thread's lock in the middle of its critical section (a reader in
/// another handle could then lease a model that was being freed).
struct Guards<'a> {
    _flock: FlockGuard<'a>,
    _local: MutexGuard<'a, ()>,
}

impl Shared {
    /// Refuses a handle inherited across fork: the segment lock would not
    /// exclude the parent, and the slot locks are the parent's.
    fn check_process(&self) -> Result<()> {
        if std::process::id() != self.pid {
            return Err(Error::InvalidState(format!(
                "store {:?}: store handle inherited across fork (opened by pid {}, used by pid {}): open the store again in this process",
                self.name,
                self.pid,
                std::process::id()
            )));
        }
        Ok(())
    }

    /// This process's mutex, then the segment lock.
    fn locked(&self, exclusive: bool) -> Result<Guards<'_>> {
        self.check_process()?;
        let local = lock(&self.local);
        let flock = self.seg.lock(exclusive)?;
        Ok(Guards { _flock: flock, _local: local })
    }

    fn generation_cell(&self) -> &AtomicU64 {
        // SAFETY: offset 64 is 8-aligned inside the page-aligned mapping,
        // which lives as long as self.
        unsafe { &*(self.seg.ptr().add(layout::H_GENERATION) as *const AtomicU64) }
    }

    fn bump_generation(&self) {
        self.generation_cell().fetch_add(1, Ordering::AcqRel);
    }

    fn read_u64(&self, off: usize) -> Result<u64> {
        let mut b = [0u8; 8];
        self.seg.read(off as u64, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn entry_offset(&self, slot: u32) -> u64 {
        self.header.table_offset + u64::from(slot) * ENTRY_BYTES
    }

    fn read_entry(&self, slot: u32) -> Result<Option<Entry>> {
        let mut b = [0u8; ENTRY_BYTES as usize];
        self.seg.read(self.entry_offset(slot), &mut b)?;
        Entry::decode(&b, &self.header)
    }

    fn write_entry(&self, slot: u32, e: Option<&Entry>) -> Result<()> {
        let bytes = e.map_or([0u8; ENTRY_BYTES as usize], Entry::encode);
        self.seg.write(self.entry_offset(slot), &bytes)
    }

    /// Every slot, one entry at a time (no allocation sized by the segment).
    fn scan(&self) -> Result<Table> {
        let mut t = Table { entries: Vec::new(), free: Vec::new(), damaged: Vec::new() };
        for slot in 0..self.header.table_capacity {
            match self.read_entry(slot) {
                Ok(None) => t.free.push(slot),
                Ok(Some(e)) => t.entries.push((slot, e)),
                Err(e) => t.damaged.push((slot, e)),
            }
        }
        Ok(t)
    }

    fn damage_error(&self, damaged: &[(u32, Error)]) -> Error {
        let list: Vec<String> = damaged
            .iter()
            .map(|(slot, e)| match e {
                Error::CorruptStore(m) => format!("slot {slot}: {m}"),
                e => format!("slot {slot}: {e}"),
            })
            .collect();
        Error::corrupt(format!(
            "store {:?}: {} damaged table {} ({}); the space of damaged entries stays reserved and adds are refused: copy the intact models to a new store",
            self.name,
            damaged.len(),
            if damaged.len() == 1 { "entry" } else { "entries" },
            list.join("; ")
        ))
    }

    fn check_table(&self, t: &Table) -> Result<()> {
        if t.damaged.is_empty() {
            Ok(())
        } else {
            Err(self.damage_error(&t.damaged))
        }
    }

    /// The ready model called `name`. Damaged entries do not hide intact
    /// ones, but a name not found while some entries are damaged is
    /// reported as damage (the model may be one of them).
    fn find_ready(&self, name: &str) -> Result<(u32, Entry)> {
        let t = self.scan()?;
        if let Some((slot, e)) = t.entries.into_iter().find(|(_, e)| e.state == EntryState::Ready && e.name == name) {
            return Ok((slot, e));
        }
        if !t.damaged.is_empty() {
            return Err(self.damage_error(&t.damaged));
        }
        Err(Error::NotFound(format!("no model named {name:?} in store {:?}", self.name)))
    }

    /// Under the exclusive segment lock: frees a `Removing` entry's space if
    /// no process holds a lease on it. True if freed.
    fn try_free_removed(&self, slot: u32) -> Result<bool> {
        if !shm::ofd_lock(&self.seg.file, lease_byte(slot), LockKind::Exclusive)? {
            return Ok(false);
        }
        let r = self.write_entry(slot, None);
        shm::ofd_lock(&self.seg.file, lease_byte(slot), LockKind::Unlock)?;
        r?;
        self.bump_generation();
        Ok(true)
    }

    /// Under the segment lock (shared at least): one more lease on `slot`.
    fn acquire(&self, slot: u32) -> Result<()> {
        let mut leases = lock(&self.leases);
        let n = leases.entry(slot).or_insert(0);
        if *n == 0 && !shm::ofd_lock(&self.lock_file, lease_byte(slot), LockKind::Shared)? {
            leases.remove(&slot);
            return Err(Error::Internal(format!("store {:?}: the lease lock of slot {slot} is held exclusively", self.name)));
        }
        *n += 1;
        Ok(())
    }

    /// One lease on `slot` fewer; the last one of this process drops the
    /// shared lock and frees the space of a model removed meanwhile.
    fn release(&self, slot: u32) {
        if std::process::id() != self.pid {
            // An inherited lease in a forked child: the lock belongs to the parent.
            return;
        }
        let last = {
            let mut leases = lock(&self.leases);
            match leases.get_mut(&slot) {
                Some(n) if *n > 1 => {
                    *n -= 1;
                    false
                }
                Some(_) => {
                    leases.remove(&slot);
                    if let Err(e) = shm::ofd_lock(&self.lock_file, lease_byte(slot), LockKind::Unlock) {
                        tracing::warn!("store {:?}: releasing the lease of slot {slot}: {e}", self.name);
                    }
                    true
                }
                None => false,
            }
        };
        if last {
            let r = self.locked(true).and_then(|_g| match self.read_entry(slot) {
                Ok(Some(e)) if e.state == EntryState::Removing => self.try_free_removed(slot).map(drop),
                _ => Ok(()),
            });
            if let Err(e) = r {
                tracing::warn!("store {:?}: freeing removed slot {slot}: {e}", self.name);
            }
        }
    }
}

impl Store {
    /// Creates a store named `name` with room for `capacity_bytes` of model
    /// data and `max_models` models. Fails if it exists or shared memory is
    /// short. Each model takes its [`footprint`] of the capacity, more than
    /// its weights: size stores with [`capacity_for`].
    pub fn create(name: &str, capacity_bytes: u64, max_models: u32) -> Result<Store> {
        let path = shm::path_of(name)?;
        let header = Header::plan(capacity_bytes, max_models)?;
        let seg = Segment::create(&path, header.total_bytes)?;
        // The magic goes in last: a concurrent open of a half-made store sees
        // a bad magic, never a wrong table.
        let bytes = header.encode();
        let made = seg.write(8, &bytes[8..]).and_then(|()| seg.write(0, &bytes[..8]));
        match made.and_then(|()| Store::from_segment(name, seg, header)) {
            Ok(s) => Ok(s),
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                Err(e)
            }
        }
    }

    /// Opens an existing store by name, checking its header.
    pub fn open(name: &str) -> Result<Store> {
        let path = shm::path_of(name)?;
        let seg = Segment::open(&path)?;
        let header = {
            let _g = seg.lock(false)?;
            let mut b = [0u8; 80];
            seg.read(0, &mut b)?;
            Header::decode(&b, seg.len())?
        };
        Store::from_segment(name, seg, header)
    }

    /// Removes the store's name. Processes that have it open keep their
    /// mappings until they close it.
    pub fn destroy(name: &str) -> Result<()> {
        let path = shm::path_of(name)?;
        std::fs::remove_file(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::NotFound(format!("no store named {name:?}")),
            _ => Error::io(format!("removing {}", path.display()), e),
        })
    }

    fn from_segment(name: &str, seg: Segment, header: Header) -> Result<Store> {
        let lock_file = seg.open_lock_file()?;
        Ok(Store {
            sh: Arc::new(Shared {
                name: name.to_string(),
                seg,
                header,
                pid: std::process::id(),
                local: Mutex::new(()),
                lock_file,
                leases: Mutex::new(HashMap::new()),
            }),
            cache: Mutex::new((0, HashMap::new())),
            pinned: Mutex::new(None),
        })
    }

    pub fn name(&self) -> &str {
        &self.sh.name
    }

    pub fn path(&self) -> &Path {
        &self.sh.seg.path
    }

    /// Bytes available for model data (each model takes its [`footprint`]).
    pub fn capacity(&self) -> u64 {
        self.sh.header.data_bytes
    }

    /// Changes with every add, remove and profile update, in any process.
    pub fn generation(&self) -> u64 {
        self.sh.generation_cell().load(Ordering::Acquire)
    }

    /// Checks every table entry: `Err(CorruptStore)` naming the damaged
    /// slots, if any. Damaged entries keep their space reserved (nothing
    /// trustworthy says where it ends), so adds are refused while any exists.
    pub fn check(&self) -> Result<()> {
        let _g = self.sh.locked(false)?;
        self.sh.check_table(&self.sh.scan()?)
    }

    /// The models in the store, in table order. A damaged table is reported
    /// as `CorruptStore`, never skipped.
    pub fn models(&self) -> Result<Vec<ModelSummary>> {
        let _g = self.sh.locked(false)?;
        let t = self.sh.scan()?;
        self.sh.check_table(&t)?;
        Ok(t.entries
            .into_iter()
            .filter(|(_, e)| e.state == EntryState::Ready)
            .map(|(_, e)| ModelSummary {
                name: e.name,
                id: e.id,
                bytes: e.data_bytes,
                n_layers: e.n_layers,
                n_tensors: e.n_tensors,
            })
            .collect())
    }

    /// How full the store is.
    pub fn usage(&self) -> Result<Usage> {
        let _g = self.sh.locked(false)?;
        let t = self.sh.scan()?;
        self.sh.check_table(&t)?;
        let ranges = ranges_of(&t);
        let used = ranges.iter().map(|r| r.1 - r.0).sum();
        Ok(Usage {
            capacity_bytes: self.sh.header.data_bytes,
            used_bytes: used,
            largest_free_bytes: self.gaps(&ranges).iter().map(|g| g.1 - g.0).max().unwrap_or(0),
            models: t.entries.iter().filter(|(_, e)| e.state == EntryState::Ready).count() as u32,
            max_models: self.sh.header.table_capacity,
        })
    }

    fn gaps(&self, ranges: &[(u64, u64)]) -> Vec<(u64, u64)> {
        let h = &self.sh.header;
        let mut gaps = Vec::new();
        let mut pos = h.data_offset;
        for &(s, e) in ranges {
            if s > pos {
                gaps.push((pos, s));
            }
            pos = pos.max(e);
        }
        if h.total_bytes > pos {
            gaps.push((pos, h.total_bytes));
        }
        gaps
    }

    /// The model of a ready entry, from the cache when current. Under the lock.
    fn load(&self, e: &Entry) -> Result<Arc<Model>> {
        let gen = self.generation();
        {
            let cache = lock(&self.cache);
            if cache.0 == gen {
                if let Some(m) = cache.1.get(&e.name).filter(|m| m.id == e.id) {
                    return Ok(m.clone());
                }
            }
        }
        let mut meta = vec![0u8; e.meta_bytes as usize];
        self.sh.seg.read(e.meta_offset, &mut meta)?;
        let model = Arc::new(layout::decode_model(e, &meta)?);
        let mut cache = lock(&self.cache);
        if cache.0 != gen {
            *cache = (gen, HashMap::new());
        }
        cache.1.insert(e.name.clone(), model.clone());
        Ok(model)
    }

    /// A stored model's full description. Cached per process and refreshed
    /// when any process changes the store. It says nothing of whether the
    /// model stays stored: to read or copy its bytes, take a [`Store::lease`].
    pub fn model(&self, name: &str) -> Result<Arc<Model>> {
        self.sh.check_process()?;
        {
            let cache = lock(&self.cache);
            if cache.0 == self.generation() {
                if let Some(m) = cache.1.get(name) {
                    return Ok(m.clone());
                }
            }
        }
        let _g = self.sh.locked(false)?;
        let (_, e) = self.sh.find_ready(name)?;
        self.load(&e)
    }

    /// Leases the model called `name`: until the lease (and its every clone)
    /// is dropped, its bytes stay where they are, in every process.
    pub fn lease(&self, name: &str) -> Result<ModelLease> {
        let _g = self.sh.locked(false)?;
        let (slot, e) = self.sh.find_ready(name)?;
        let model = self.load(&e)?;
        self.sh.acquire(slot)?;
        Ok(ModelLease(Arc::new(LeaseInner { sh: self.sh.clone(), slot, model })))
    }

    /// Host address of a leased model's first byte inside this process's
    /// mapping (`lease.bytes` bytes; pinned once [`Store::pin`] ran): for
    /// copies a caller times itself (benchmarks of other ways to load).
    /// Valid while the lease is held.
    pub fn leased_host_ptr(&self, lease: &ModelLease) -> Result<*const u8> {
        if !lease.belongs_to(self) {
            return Err(Error::invalid(format!("the lease on {:?} is not from store {:?}", lease.name, self.sh.name)));
        }
        self.host_ptr(lease)
    }

    /// Host address of a model's first byte inside this process's mapping.
    /// The bytes there are the model's only while a lease on it is held.
    pub(crate) fn host_ptr(&self, model: &Model) -> Result<*const u8> {
        self.sh.check_process()?;
        let end = model.segment_offset.checked_add(model.bytes);
        if model.segment_offset < self.sh.header.data_offset || end.is_none_or(|e| e > self.sh.seg.len()) {
            return Err(Error::invalid(format!("model {:?} is not from this store", model.name)));
        }
        // SAFETY: in range of the mapping, checked above.
        Ok(unsafe { self.sh.seg.ptr().add(model.segment_offset as usize) })
    }

    /// The address at which kernels read `model`'s bytes straight from this
    /// store's pinned pages over PCIe (needs [`Store::pin`] first). Valid
    /// for the model while a lease on it is held.
    pub fn mapped_model_ptr(&self, model: &Model) -> Result<crate::cuda::CUdeviceptr> {
        let host = self.host_ptr(model)?;
        let pinned = lock(&self.pinned);
        let reg = pinned.as_ref().ok_or_else(|| Error::InvalidState(format!("store {:?} is not pinned", self.sh.name)))?;
        reg.device_ptr(host as usize - self.sh.seg.ptr() as usize)
    }

    /// Copies `bytes` of a leased model's data from `offset` to `dst`.
    pub(crate) fn read_leased(&self, lease: &ModelLease, offset: u64, dst: *mut u8, bytes: usize) -> Result<()> {
        if !lease.belongs_to(self) {
            return Err(Error::invalid(format!("the lease on {:?} is not from store {:?}", lease.name, self.sh.name)));
        }
        if offset.checked_add(bytes as u64).is_none_or(|e| e > lease.bytes) {
            return Err(Error::invalid("read outside the model"));
        }
        let src = self.host_ptr(lease)?;
        // SAFETY: src + offset .. + bytes lies inside the model (checked) and
        // the mapping; the lease keeps every writer out of it; dst is
        // caller-provided writable memory of `bytes` bytes.
        unsafe { std::ptr::copy_nonoverlapping(src.add(offset as usize), dst, bytes) };
        Ok(())
    }

    /// Copies a leased model's bytes `[offset, offset + dst.len())` into `dst`.
    pub fn read(&self, lease: &ModelLease, offset: u64, dst: &mut [u8]) -> Result<()> {
        self.read_leased(lease, offset, dst.as_mut_ptr(), dst.len())
    }

    /// A copy of a stored model's bytes, read under a lease: `NotFound` if
    /// `model` (by name and id) is no longer stored.
    pub fn model_bytes(&self, model: &Model) -> Result<Vec<u8>> {
        let lease = self.lease(&model.name)?;
        if lease.id != model.id {
            return Err(Error::NotFound(format!(
                "model {:?} (id {}) was removed from store {:?}",
                model.name, model.id, self.sh.name
            )));
        }
        let mut out = vec![0u8; lease.bytes as usize];
        self.read(&lease, 0, &mut out)?;
        Ok(out)
    }

    /// True if `model` (by id) is still stored.
    pub fn contains(&self, model: &Model) -> Result<bool> {
        match self.model(&model.name) {
            Ok(m) => Ok(m.id == model.id),
            Err(Error::NotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Bytes the model called `name` occupies in this store ([`footprint`]).
    pub fn model_footprint(&self, name: &str) -> Result<u64> {
        let _g = self.sh.locked(false)?;
        Ok(self.sh.find_ready(name)?.1.alloc_bytes)
    }

    /// Adds a model. Its bytes are written into space reserved for it; the
    /// model becomes visible to every process only once fully written.
    /// It needs [`footprint`] bytes of free space in one piece.
    pub fn add_model(&self, name: &str, spec: &ModelSpec<'_>, progress: Progress<'_>) -> Result<Arc<Model>> {
        check_model_name(name)?;
        self.sh.check_process()?;
        let lay = layout::layout_model(spec)?;
        self.add_laid_out(name, &lay, |e| self.write_model(e, spec, &lay, progress))
    }

    /// Adds a model whose tensors are written in place, straight into the
    /// shared segment, by `fill(tensor, offset, bytes)`: `bytes` is the range
    /// `[offset, offset + bytes.len())` of tensor `tensor` (its index in
    /// `spec` order). Every tensor is split into pieces of `piece` bytes (a
    /// multiple of 256), filled by `threads` threads at once. `spec`'s
    /// tensors give names, dtypes and shapes; their `data` is ignored. For
    /// models too large to build in memory first (an 8B LLM's random
    /// weights): nothing is held twice. An error from `fill` abandons the
    /// add, as any failed add.
    pub fn add_model_filled(
        &self,
        name: &str,
        spec: &ModelSpec<'_>,
        piece: usize,
        threads: usize,
        fill: &FillFn<'_>,
        progress: Progress<'_>,
    ) -> Result<Arc<Model>> {
        check_model_name(name)?;
        self.sh.check_process()?;
        if piece == 0 || piece % 256 != 0 {
            return Err(Error::invalid(format!("piece size {piece} is not a positive multiple of 256")));
        }
        let lay = layout::layout_model_unfilled(spec)?;
        let sizes: Vec<u64> = spec
            .layers
            .iter()
            .flat_map(|l| l.tensors.iter())
            .map(|t| model::tensor_bytes(t.dtype, &t.shape))
            .collect::<Result<_>>()?;
        self.add_laid_out(name, &lay, |e| {
            let total = lay.data_bytes;
            progress(0, total);
            // Zero the alignment gaps (the space may have held another model).
            let mut pos = 0u64;
            for (&off, &n) in lay.tensor_offsets.iter().zip(&sizes) {
                if off > pos {
                    self.sh.seg.write(e.alloc_offset + pos, &vec![0u8; (off - pos) as usize])?;
                }
                pos = off + n;
            }
            if total > pos {
                self.sh.seg.write(e.alloc_offset + pos, &vec![0u8; (total - pos) as usize])?;
            }
            let mut work: Vec<(usize, u64, u64)> = Vec::new();
            for (i, &n) in sizes.iter().enumerate() {
                let mut o = 0u64;
                while o < n {
                    let len = (n - o).min(piece as u64);
                    work.push((i, o, len));
                    o += len;
                }
            }
            let base = e.alloc_offset;
            if base.checked_add(total).is_none_or(|end| end > self.sh.seg.len()) {
                return Err(Error::Internal("the reserved space lies outside the segment".into()));
            }
            if lay.tensor_offsets.iter().zip(&sizes).any(|(&off, &n)| off.checked_add(n).is_none_or(|end| end > total)) {
                return Err(Error::Internal("a tensor lies outside the model's laid-out bytes".into()));
            }
            let seg_ptr = self.sh.seg.ptr() as usize;
            let next = std::sync::atomic::AtomicUsize::new(0);
            let done = std::sync::atomic::AtomicU64::new(0);
            let failed: std::sync::Mutex<Option<Error>> = std::sync::Mutex::new(None);
            std::thread::scope(|s| {
                for _ in 0..threads.max(1) {
                    s.spawn(|| loop {
                        let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(&(i, o, len)) = work.get(k) else { break };
                        if failed.lock().map_or(true, |f| f.is_some()) {
                            break;
                        }
                        let at = base + lay.tensor_offsets[i] + o;
                        // SAFETY: [at, at + len) lies inside this model's
                        // reserved space (checked above: base + total is in
                        // the segment, and tensor ranges lie below total);
                        // work items never overlap, so each thread writes a
                        // range no other thread touches.
                        let bytes = unsafe { std::slice::from_raw_parts_mut((seg_ptr + at as usize) as *mut u8, len as usize) };
                        if let Err(err) = fill(i, o, bytes) {
                            if let Ok(mut f) = failed.lock() {
                                f.get_or_insert(err);
                            }
                            break;
                        }
                        done.fetch_add(len, std::sync::atomic::Ordering::Relaxed);
                    });
                }
            });
            if let Some(err) = failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
                return Err(err);
            }
            self.sh.seg.write(e.meta_offset, &lay.meta)?;
            progress(done.into_inner(), total);
            Ok(())
        })
    }

    /// Reserves space for a laid-out model, writes it with `write` and
    /// commits it (or abandons the reservation on any error).
    fn add_laid_out(&self, name: &str, lay: &layout::ModelLayout, write: impl FnOnce(&Entry) -> Result<()>) -> Result<Arc<Model>> {
        let meta_offset_rel = lay.data_bytes;
        let alloc_bytes = align_up(lay.data_bytes + lay.meta.len() as u64, ALLOC_ALIGN);
        let (slot, mut entry) = self.reserve(name, alloc_bytes, lay)?;
        entry.meta_offset = entry.alloc_offset + meta_offset_rel;
        // Frees the reservation unless the add commits: on an error, and also
        // when a panicking progress callback unwinds through here.
        struct Abandon<'s> {
            sh: &'s Shared,
            slot: u32,
            id: u64,
            armed: bool,
        }
        impl Drop for Abandon<'_> {
            fn drop(&mut self) {
                if self.armed {
                    if let Ok(_g) = self.sh.locked(true) {
                        if let Ok(Some(e)) = self.sh.read_entry(self.slot) {
                            if e.state == EntryState::Writing && e.id == self.id {
                                let _ = self.sh.write_entry(self.slot, None);
                            }
                        }
                        let _ = shm::ofd_lock(&self.sh.lock_file, writer_byte(self.slot), LockKind::Unlock);
                    }
                }
            }
        }
        let mut abandon = Abandon { sh: &self.sh, slot, id: entry.id, armed: true };
        write(&entry)?;
        {
            let _g = self.sh.locked(true)?;
            // The reservation must still be ours: nobody reclaims a slot
            // whose writer lock is held, but check rather than trust.
            match self.sh.read_entry(slot) {
                Ok(Some(e)) if e.state == EntryState::Writing && e.id == entry.id => {}
                other => {
                    abandon.armed = false;
                    let _ = shm::ofd_lock(&self.sh.lock_file, writer_byte(slot), LockKind::Unlock);
                    return Err(Error::InvalidState(format!(
                        "store {:?}: the space reserved for model {name:?} (slot {slot}, id {}) was taken while it was written ({})",
                        self.sh.name,
                        entry.id,
                        match other {
                            Ok(Some(e)) => format!("the slot now holds {:?}, id {}", e.name, e.id),
                            Ok(None) => "the slot is free".to_string(),
                            Err(e) => e.to_string(),
                        }
                    )));
                }
            }
            entry.state = EntryState::Ready;
            entry.meta_checksum = layout::meta_checksum(&lay.meta)?;
            self.sh.write_entry(slot, Some(&entry))?;
            abandon.armed = false;
            shm::ofd_lock(&self.sh.lock_file, writer_byte(slot), LockKind::Unlock)?;
            self.sh.bump_generation();
        }
        tracing::debug!("store {:?}: added model {name:?} ({} bytes)", self.sh.name, lay.data_bytes);
        self.model(name)
    }

    /// Under the exclusive lock: refuses a damaged table, reclaims abandoned
    /// writes and unleased removed models, checks the name is free, picks a
    /// slot and a gap, takes the slot's writer lock and writes a `Writing`
    /// entry.
    fn reserve(&self, name: &str, alloc_bytes: u64, lay: &layout::ModelLayout) -> Result<(u32, Entry)> {
        let sh = &*self.sh;
        let _g = sh.locked(true)?;
        let mut t = sh.scan()?;
        sh.check_table(&t)?;
        let mut kept = Vec::with_capacity(t.entries.len());
        for (slot, e) in std::mem::take(&mut t.entries) {
            let freed = match e.state {
                // A writer holds its slot's writer lock until it commits or
                // abandons; the kernel drops it if the writer dies.
                EntryState::Writing if !shm::ofd_locked_by_other(&sh.seg.file, writer_byte(slot))? => {
                    tracing::warn!(
                        "store {:?}: reclaiming the space of {:?}, whose writer (pid {} when it started) is gone",
                        sh.name,
                        e.name,
                        e.writer_pid
                    );
                    sh.write_entry(slot, None)?;
                    true
                }
                EntryState::Removing => sh.try_free_removed(slot)?,
                _ => false,
            };
            if freed {
                t.free.push(slot);
            } else {
                kept.push((slot, e));
            }
        }
        t.entries = kept;
        if t.entries.iter().any(|(_, e)| e.name == name && e.state != EntryState::Removing) {
            return Err(Error::AlreadyExists(format!("store {:?} already has a model named {name:?}", sh.name)));
        }
        let slot = t.free.iter().min().copied().ok_or_else(|| {
            Error::StoreFull(format!("store {:?} holds its maximum of {} models", sh.name, sh.header.table_capacity))
        })?;
        let gaps = self.gaps(&ranges_of(&t));
        let gap = gaps.iter().find(|g| g.1 - g.0 >= alloc_bytes).ok_or_else(|| {
            let largest = gaps.iter().map(|g| g.1 - g.0).max().unwrap_or(0);
            Error::StoreFull(format!(
                "model {name:?} needs {alloc_bytes} bytes (weights and metadata) but store {:?} has at most {largest} free in one piece (capacity {})",
                sh.name, sh.header.data_bytes
            ))
        })?;
        let id = sh.read_u64(layout::H_NEXT_ID)?;
        // Ids are never reused; a counter at its end is a damaged header.
        let next_id = id.checked_add(1).ok_or_else(|| {
            Error::corrupt(format!("store {:?}: the next model id {id} cannot grow (damaged header)", sh.name))
        })?;
        if !shm::ofd_lock(&sh.lock_file, writer_byte(slot), LockKind::Exclusive)? {
            return Err(Error::InvalidState(format!(
                "store {:?}: the writer lock of free slot {slot} is held by another process",
                sh.name
            )));
        }
        let entry = Entry {
            state: EntryState::Writing,
            writer_pid: std::process::id(),
            id,
            alloc_offset: gap.0,
            alloc_bytes,
            data_bytes: lay.data_bytes,
            meta_offset: gap.0 + lay.data_bytes,
            meta_bytes: lay.meta.len() as u64,
            meta_checksum: 0,
            n_layers: lay.n_layers,
            n_tensors: lay.n_tensors,
            name: name.to_string(),
        };
        let written = sh
            .seg
            .write(layout::H_NEXT_ID as u64, &next_id.to_le_bytes())
            .and_then(|()| sh.write_entry(slot, Some(&entry)));
        if let Err(e) = written {
            let _ = shm::ofd_lock(&sh.lock_file, writer_byte(slot), LockKind::Unlock);
            return Err(e);
        }
        Ok((slot, entry))
    }

    fn write_model(&self, e: &Entry, spec: &ModelSpec<'_>, lay: &layout::ModelLayout, progress: Progress<'_>) -> Result<()> {
        const PIECE: usize = 64 << 20;
        let total = lay.data_bytes;
        let mut done = 0u64;
        let mut pos = 0u64;
        progress(0, total);
        let tensors = spec.layers.iter().flat_map(|l| l.tensors.iter());
        for (t, &off) in tensors.zip(&lay.tensor_offsets) {
            if off > pos {
                self.sh.seg.write(e.alloc_offset + pos, &vec![0u8; (off - pos) as usize])?;
            }
            for (i, piece) in t.data.chunks(PIECE).enumerate() {
                self.sh.seg.write(e.alloc_offset + off + (i * PIECE) as u64, piece)?;
                done += piece.len() as u64;
                progress(done, total);
            }
            pos = off + t.data.len() as u64;
        }
        if total > pos {
            self.sh.seg.write(e.alloc_offset + pos, &vec![0u8; (total - pos) as usize])?;
        }
        self.sh.seg.write(e.meta_offset, &lay.meta)?;
        progress(total, total);
        Ok(())
    }

    /// Removes a model: it disappears from every lookup at once; its space
    /// becomes free for later adds once no process holds a lease on it.
    pub fn remove_model(&self, name: &str) -> Result<()> {
        let _g = self.sh.locked(true)?;
        let (slot, mut e) = self.sh.find_ready(name)?;
        e.state = EntryState::Removing;
        self.sh.write_entry(slot, Some(&e))?;
        self.sh.bump_generation();
        self.sh.try_free_removed(slot)?;
        Ok(())
    }

    /// Stores measured per-layer execution times (ms) with the model, for the
    /// planner. `exec_ms.len()` must equal the model's layer count.
    pub fn set_layer_exec_ms(&self, name: &str, exec_ms: &[f64]) -> Result<()> {
        if let Some((i, v)) = exec_ms.iter().enumerate().find(|(_, v)| !v.is_finite() || **v < 0.0) {
            return Err(Error::invalid(format!("exec_ms[{i}] = {v} is not a finite non-negative time")));
        }
        let _g = self.sh.locked(true)?;
        let (_, e) = self.sh.find_ready(name)?;
        if exec_ms.len() != e.n_layers as usize {
            return Err(Error::invalid(format!(
                "model {name:?} has {} layers but {} times were given",
                e.n_layers,
                exec_ms.len()
            )));
        }
        let mut meta = vec![0u8; e.meta_bytes as usize];
        self.sh.seg.read(e.meta_offset, &mut meta)?;
        layout::decode_model(&e, &meta)?;
        let mut bytes = Vec::with_capacity(8 * exec_ms.len());
        for v in exec_ms {
            bytes.extend_from_slice(&v.to_bits().to_le_bytes());
        }
        self.sh.seg.write(e.meta_offset + layout::profile_offset(&meta) as u64, &bytes)?;
        self.sh.bump_generation();
        Ok(())
    }

    /// Stores a fitted cost model and the predicted and measured makespans
    /// of its plan with the model (in place, under the exclusive lock, like
    /// [`Store::set_layer_exec_ms`]). Models added by a library without the
    /// cost area cannot keep one (an error: add them again).
    pub fn set_cost(&self, name: &str, cost: &crate::cost::StoredCost) -> Result<()> {
        cost.validate()?;
        let _g = self.sh.locked(true)?;
        let (_, e) = self.sh.find_ready(name)?;
        let mut meta = vec![0u8; e.meta_bytes as usize];
        self.sh.seg.read(e.meta_offset, &mut meta)?;
        layout::decode_model(&e, &meta)?;
        let off = layout::cost_offset(&meta, e.n_layers as usize).ok_or_else(|| {
            Error::InvalidState(format!("model {name:?} was stored without room for a cost model; add it again"))
        })?;
        self.sh.seg.write(e.meta_offset + off as u64, &cost.to_bytes())?;
        self.sh.bump_generation();
        Ok(())
    }

    /// The cost model stored with a model, `None` if there is none.
    pub fn cost(&self, name: &str) -> Result<Option<crate::cost::StoredCost>> {
        let _g = self.sh.locked(false)?;
        let (_, e) = self.sh.find_ready(name)?;
        let mut meta = vec![0u8; e.meta_bytes as usize];
        self.sh.seg.read(e.meta_offset, &mut meta)?;
        layout::decode_model(&e, &meta)?;
        match layout::cost_offset(&meta, e.n_layers as usize) {
            Some(off) => crate::cost::StoredCost::from_bytes(&meta[off..off + layout::COST_AREA_BYTES])
                .map_err(|err| Error::corrupt(format!("model {name:?}: {err}"))),
            None => Ok(None),
        }
    }

    /// Page-locks the whole segment for this process (`cuMemHostRegister`,
    /// portable), once: later calls return at once. Switches call it
    /// themselves; call it ahead to keep its cost (about 40 ms per GiB) out
    /// of the first switch.
    pub fn pin(&self, device: &'static Device) -> Result<()> {
        self.sh.check_process()?;
        let mut pinned = lock(&self.pinned);
        if pinned.is_none() {
            // SAFETY: the mapping is page-aligned and lives as long as self;
            // the registration is dropped before the mapping (field order).
            let reg = unsafe { HostRegistration::new(device, self.sh.seg.ptr(), self.sh.seg.len() as usize) }.map_err(|e| match e {
                Error::Cuda(c)
                    if matches!(
                        c.code,
                        cudarc::driver::sys::CUresult::CUDA_ERROR_INVALID_VALUE
                            | cudarc::driver::sys::CUresult::CUDA_ERROR_NOT_SUPPORTED
                    ) =>
                {
                    Error::InvalidState(format!(
                    "store {:?} ({}) could not be page-locked: {c}; stores must live on tmpfs (/dev/shm) or hugetlbfs, see {}",
                    self.sh.name,
                    self.sh.seg.path.display(),
                    shm::DIR_ENV
                ))
                }
                e => e,
            })?;
            *pinned = Some(reg);
        }
        Ok(())
    }

    pub fn is_pinned(&self) -> bool {
        lock(&self.pinned).is_some()
    }

    pub fn segment_path(name: &str) -> Result<PathBuf> {
        shm::path_of(name)
    }
}

/// The allocated ranges of a table's intact entries, sorted.
fn ranges_of(t: &Table) -> Vec<(u64, u64)> {
    let mut ranges: Vec<(u64, u64)> = t.entries.iter().map(|(_, e)| (e.alloc_offset, e.alloc_offset + e.alloc_bytes)).collect();
    ranges.sort_unstable();
    ranges
}

impl Drop for Store {
    fn drop(&mut self) {
        let reg = lock(&self.pinned).take();
        if std::process::id() == self.sh.pid {
            // Unregister before the mapping goes away.
            drop(reg);
        } else {
            // A forked child: the registration is the parent's CUDA context's.
            std::mem::forget(reg);
        }
    }
}
