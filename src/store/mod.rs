//! The host model store: a named shared-memory segment holding every model's
//! weights, in execution order, plus a table describing them. Any process can
//! open a store by name; each pins it once with `cuMemHostRegister` so that
//! copies to the GPU run at full PCIe speed.
//!
//! Changes (add, remove, profile updates) take the segment's exclusive lock;
//! a model's bytes are written outside the lock into space reserved for it,
//! and become visible only when its entry is committed. An add that dies
//! half-way leaves a `Writing` entry that the next add reclaims once its
//! writer process is gone: stored models are never touched.

pub mod layout;
pub mod model;
pub mod safetensors;
pub mod shm;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::cuda::{Device, HostRegistration};
use crate::error::{Error, Result};
use layout::{Entry, EntryState, Header, ALLOC_ALIGN, ENTRY_BYTES, MAX_NAME};
pub use model::{Dtype, LayerInfo, LayerSpec, Model, ModelSpec, TensorInfo, TensorSpec, GRAPH_ATTRIBUTE, TENSOR_ALIGN};
use model::align_up;
use shm::Segment;

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

/// How full a store is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub largest_free_bytes: u64,
    pub models: u32,
    pub max_models: u32,
}

/// An open store.
pub struct Store {
    name: String,
    seg: Segment,
    header: Header,
    /// Serialises this process's threads (flock does not: it is per open file).
    local: Mutex<()>,
    cache: Mutex<(u64, HashMap<String, Arc<Model>>)>,
    pinned: Mutex<Option<HostRegistration>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("name", &self.name).field("path", &self.seg.path).finish()
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

fn process_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else { return false };
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Ok(()) => true,
        Err(e) => e != nix::errno::Errno::ESRCH,
    }
}

impl Store {
    /// Creates a store named `name` with room for `capacity_bytes` of model
    /// data and `max_models` models. Fails if it exists or shared memory is short.
    pub fn create(name: &str, capacity_bytes: u64, max_models: u32) -> Result<Store> {
        let path = shm::path_of(name)?;
        let header = Header::plan(capacity_bytes, max_models)?;
        let seg = Segment::create(&path, header.total_bytes)?;
        // The magic goes in last: a concurrent open of a half-made store sees
        // a bad magic, never a wrong table.
        let bytes = header.encode();
        seg.write(8, &bytes[8..])?;
        seg.write(0, &bytes[..8])?;
        Ok(Store::from_segment(name, seg, header))
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
        Ok(Store::from_segment(name, seg, header))
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

    fn from_segment(name: &str, seg: Segment, header: Header) -> Store {
        Store {
            name: name.to_string(),
            seg,
            header,
            local: Mutex::new(()),
            cache: Mutex::new((0, HashMap::new())),
            pinned: Mutex::new(None),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> &Path {
        &self.seg.path
    }

    /// Bytes available for model data.
    pub fn capacity(&self) -> u64 {
        self.header.data_bytes
    }

    fn generation_cell(&self) -> &AtomicU64 {
        // SAFETY: offset 64 is 8-aligned inside the page-aligned mapping,
        // which lives as long as self.
        unsafe { &*(self.seg.ptr().add(layout::H_GENERATION) as *const AtomicU64) }
    }

    /// Changes with every add, remove and profile update, in any process.
    pub fn generation(&self) -> u64 {
        self.generation_cell().load(Ordering::Acquire)
    }

    fn read_u64(&self, off: usize) -> Result<u64> {
        let mut b = [0u8; 8];
        self.seg.read(off as u64, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn entry_offset(&self, slot: u32) -> u64 {
        self.header.table_offset + u64::from(slot) * ENTRY_BYTES
    }

    /// All table slots; unreadable entries come back as errors.
    fn entries(&self) -> Result<Vec<(u32, Result<Option<Entry>>)>> {
        let cap = self.header.table_capacity;
        let mut table = vec![0u8; (u64::from(cap) * ENTRY_BYTES) as usize];
        self.seg.read(self.header.table_offset, &mut table)?;
        Ok((0..cap)
            .map(|slot| {
                let o = (u64::from(slot) * ENTRY_BYTES) as usize;
                (slot, Entry::decode(&table[o..o + ENTRY_BYTES as usize], &self.header))
            })
            .collect())
    }

    fn write_entry(&self, slot: u32, e: Option<&Entry>) -> Result<()> {
        let bytes = e.map_or([0u8; ENTRY_BYTES as usize], Entry::encode);
        self.seg.write(self.entry_offset(slot), &bytes)
    }

    fn bump_generation(&self) {
        self.generation_cell().fetch_add(1, Ordering::AcqRel);
    }

    fn find_ready(&self, name: &str) -> Result<(u32, Entry)> {
        for (slot, e) in self.entries()? {
            if let Ok(Some(e)) = e {
                if e.state == EntryState::Ready && e.name == name {
                    return Ok((slot, e));
                }
            }
        }
        Err(Error::NotFound(format!("no model named {name:?} in store {:?}", self.name)))
    }

    /// The models in the store, in table order.
    pub fn models(&self) -> Result<Vec<ModelSummary>> {
        let _l = lock(&self.local);
        let _g = self.seg.lock(false)?;
        let mut out = Vec::new();
        for (slot, e) in self.entries()? {
            match e {
                Ok(Some(e)) if e.state == EntryState::Ready => out.push(ModelSummary {
                    name: e.name,
                    id: e.id,
                    bytes: e.data_bytes,
                    n_layers: e.n_layers,
                    n_tensors: e.n_tensors,
                }),
                Ok(_) => {}
                Err(err) => tracing::warn!("store {:?}: skipping table slot {slot}: {err}", self.name),
            }
        }
        Ok(out)
    }

    /// How full the store is.
    pub fn usage(&self) -> Result<Usage> {
        let _l = lock(&self.local);
        let _g = self.seg.lock(false)?;
        let (ranges, models) = self.allocated()?;
        let used = ranges.iter().map(|r| r.1 - r.0).sum();
        Ok(Usage {
            capacity_bytes: self.header.data_bytes,
            used_bytes: used,
            largest_free_bytes: self.gaps(&ranges).iter().map(|g| g.1 - g.0).max().unwrap_or(0),
            models,
            max_models: self.header.table_capacity,
        })
    }

    /// Allocated ranges (sorted) and the number of ready models. Slots that
    /// cannot be read keep no range: nothing trustworthy says where they lie.
    fn allocated(&self) -> Result<(Vec<(u64, u64)>, u32)> {
        let mut ranges = Vec::new();
        let mut ready = 0;
        for (_, e) in self.entries()? {
            if let Ok(Some(e)) = e {
                ranges.push((e.alloc_offset, e.alloc_offset + e.alloc_bytes));
                ready += u32::from(e.state == EntryState::Ready);
            }
        }
        ranges.sort_unstable();
        Ok((ranges, ready))
    }

    fn gaps(&self, ranges: &[(u64, u64)]) -> Vec<(u64, u64)> {
        let mut gaps = Vec::new();
        let mut pos = self.header.data_offset;
        for &(s, e) in ranges {
            if s > pos {
                gaps.push((pos, s));
            }
            pos = pos.max(e);
        }
        if self.header.total_bytes > pos {
            gaps.push((pos, self.header.total_bytes));
        }
        gaps
    }

    /// A stored model's full description. Cached per process and refreshed
    /// when any process changes the store.
    pub fn model(&self, name: &str) -> Result<Arc<Model>> {
        let gen = self.generation();
        {
            let cache = lock(&self.cache);
            if cache.0 == gen {
                if let Some(m) = cache.1.get(name) {
                    return Ok(m.clone());
                }
            }
        }
        let _l = lock(&self.local);
        let _g = self.seg.lock(false)?;
        let gen = self.generation();
        let (_, e) = self.find_ready(name)?;
        let mut meta = vec![0u8; e.meta_bytes as usize];
        self.seg.read(e.meta_offset, &mut meta)?;
        let model = Arc::new(layout::decode_model(&e, &meta)?);
        let mut cache = lock(&self.cache);
        if cache.0 != gen {
            *cache = (gen, HashMap::new());
        }
        cache.1.insert(name.to_string(), model.clone());
        Ok(model)
    }

    /// Host address of a model's first byte inside this process's mapping.
    pub(crate) fn host_ptr(&self, model: &Model) -> Result<*const u8> {
        let end = model.segment_offset.checked_add(model.bytes);
        if model.segment_offset < self.header.data_offset || end.is_none_or(|e| e > self.seg.len()) {
            return Err(Error::invalid(format!("model {:?} is not from this store", model.name)));
        }
        // SAFETY: in range of the mapping, checked above.
        Ok(unsafe { self.seg.ptr().add(model.segment_offset as usize) })
    }

    /// The address at which kernels read `model`'s bytes straight from this
    /// store's pinned pages over PCIe (needs [`Store::pin`] first).
    pub fn mapped_model_ptr(&self, model: &Model) -> Result<crate::cuda::CUdeviceptr> {
        let host = self.host_ptr(model)?;
        let pinned = lock(&self.pinned);
        let reg = pinned.as_ref().ok_or_else(|| Error::InvalidState(format!("store {:?} is not pinned", self.name)))?;
        reg.device_ptr(host as usize - self.seg.ptr() as usize)
    }

    /// Copies `bytes` of `model`'s data from `offset` to `dst`.
    pub(crate) fn read_model_bytes(&self, model: &Model, offset: u64, dst: *mut u8, bytes: usize) -> Result<()> {
        if offset.checked_add(bytes as u64).is_none_or(|e| e > model.bytes) {
            return Err(Error::invalid("read outside the model"));
        }
        let src = self.host_ptr(model)?;
        // SAFETY: src + offset .. + bytes lies inside the model (checked) and
        // the mapping; dst is caller-provided writable memory.
        unsafe { std::ptr::copy_nonoverlapping(src.add(offset as usize), dst, bytes) };
        Ok(())
    }

    /// The bytes of a stored model, borrowed from the mapping.
    pub fn model_bytes(&self, model: &Model) -> Result<&[u8]> {
        let src = self.host_ptr(model)?;
        // SAFETY: host_ptr checked the range against the mapping, which lives
        // as long as self.
        Ok(unsafe { std::slice::from_raw_parts(src, model.bytes as usize) })
    }

    /// True if `model` (by id) is still stored: a switch checks this so that it
    /// never copies a removed model's space.
    pub fn contains(&self, model: &Model) -> Result<bool> {
        match self.model(&model.name) {
            Ok(m) => Ok(m.id == model.id),
            Err(Error::NotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Adds a model. Its bytes are written into space reserved for it; the
    /// model becomes visible to every process only once fully written.
    pub fn add_model(&self, name: &str, spec: &ModelSpec<'_>, progress: Progress<'_>) -> Result<Arc<Model>> {
        check_model_name(name)?;
        let lay = layout::layout_model(spec)?;
        let meta_offset_rel = lay.data_bytes;
        let alloc_bytes = align_up(lay.data_bytes + lay.meta.len() as u64, ALLOC_ALIGN);
        let (slot, mut entry) = self.reserve(name, alloc_bytes, &lay)?;
        entry.meta_offset = entry.alloc_offset + meta_offset_rel;
        // Frees the reservation unless the add commits: on an error, and also
        // when a panicking progress callback unwinds through here (a `Writing`
        // entry of a live process is never reclaimed by anyone else).
        struct Abandon<'s> {
            store: &'s Store,
            slot: Option<u32>,
        }
        impl Drop for Abandon<'_> {
            fn drop(&mut self) {
                if let Some(slot) = self.slot {
                    let _l = lock(&self.store.local);
                    if let Ok(_g) = self.store.seg.lock(true) {
                        let _ = self.store.write_entry(slot, None);
                    }
                }
            }
        }
        let mut abandon = Abandon { store: self, slot: Some(slot) };
        self.write_model(&entry, spec, &lay, progress)?;
        {
            let _l = lock(&self.local);
            let _g = self.seg.lock(true)?;
            entry.state = EntryState::Ready;
            entry.meta_checksum = layout::meta_checksum(&lay.meta)?;
            self.write_entry(slot, Some(&entry))?;
            self.bump_generation();
        }
        abandon.slot = None;
        tracing::debug!("store {:?}: added model {name:?} ({} bytes)", self.name, lay.data_bytes);
        self.model(name)
    }

    /// Under the exclusive lock: checks the name is free, reclaims abandoned
    /// writes, picks a slot and a gap, and writes a `Writing` entry.
    fn reserve(&self, name: &str, alloc_bytes: u64, lay: &layout::ModelLayout) -> Result<(u32, Entry)> {
        let _l = lock(&self.local);
        let _g = self.seg.lock(true)?;
        let me = std::process::id();
        let mut free_slot = None;
        for (slot, e) in self.entries()? {
            match e {
                Ok(None) => {
                    free_slot.get_or_insert(slot);
                }
                Ok(Some(e)) if e.state == EntryState::Writing && e.writer_pid != me && !process_alive(e.writer_pid) => {
                    tracing::warn!(
                        "store {:?}: reclaiming the space of {:?}, whose writer (pid {}) died",
                        self.name,
                        e.name,
                        e.writer_pid
                    );
                    self.write_entry(slot, None)?;
                    free_slot.get_or_insert(slot);
                }
                Ok(Some(e)) if e.name == name => {
                    return Err(Error::AlreadyExists(format!(
                        "store {:?} already has a model named {name:?}",
                        self.name
                    )));
                }
                _ => {}
            }
        }
        let slot = free_slot.ok_or_else(|| {
            Error::StoreFull(format!(
                "store {:?} holds its maximum of {} models",
                self.name, self.header.table_capacity
            ))
        })?;
        let (ranges, _) = self.allocated()?;
        let gaps = self.gaps(&ranges);
        let gap = gaps.iter().find(|g| g.1 - g.0 >= alloc_bytes).ok_or_else(|| {
            let largest = gaps.iter().map(|g| g.1 - g.0).max().unwrap_or(0);
            Error::StoreFull(format!(
                "model {name:?} needs {alloc_bytes} bytes but store {:?} has at most {largest} free in one piece (capacity {})",
                self.name, self.header.data_bytes
            ))
        })?;
        let id = self.read_u64(layout::H_NEXT_ID)?;
        self.seg.write(layout::H_NEXT_ID as u64, &(id + 1).to_le_bytes())?;
        let entry = Entry {
            state: EntryState::Writing,
            writer_pid: me,
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
        self.write_entry(slot, Some(&entry))?;
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
                self.seg.write(e.alloc_offset + pos, &vec![0u8; (off - pos) as usize])?;
            }
            for (i, piece) in t.data.chunks(PIECE).enumerate() {
                self.seg.write(e.alloc_offset + off + (i * PIECE) as u64, piece)?;
                done += piece.len() as u64;
                progress(done, total);
            }
            pos = off + t.data.len() as u64;
        }
        if total > pos {
            self.seg.write(e.alloc_offset + pos, &vec![0u8; (total - pos) as usize])?;
        }
        self.seg.write(e.meta_offset, &lay.meta)?;
        progress(total, total);
        Ok(())
    }

    /// Removes a model; its space becomes free for later adds.
    pub fn remove_model(&self, name: &str) -> Result<()> {
        let _l = lock(&self.local);
        let _g = self.seg.lock(true)?;
        let (slot, _) = self.find_ready(name)?;
        self.write_entry(slot, None)?;
        self.bump_generation();
        Ok(())
    }

    /// Stores measured per-layer execution times (ms) with the model, for the
    /// planner. `exec_ms.len()` must equal the model's layer count.
    pub fn set_layer_exec_ms(&self, name: &str, exec_ms: &[f64]) -> Result<()> {
        if let Some((i, v)) = exec_ms.iter().enumerate().find(|(_, v)| !v.is_finite() || **v < 0.0) {
            return Err(Error::invalid(format!("exec_ms[{i}] = {v} is not a finite non-negative time")));
        }
        let _l = lock(&self.local);
        let _g = self.seg.lock(true)?;
        let (_, e) = self.find_ready(name)?;
        if exec_ms.len() != e.n_layers as usize {
            return Err(Error::invalid(format!(
                "model {name:?} has {} layers but {} times were given",
                e.n_layers,
                exec_ms.len()
            )));
        }
        let mut meta = vec![0u8; e.meta_bytes as usize];
        self.seg.read(e.meta_offset, &mut meta)?;
        layout::decode_model(&e, &meta)?;
        let mut bytes = Vec::with_capacity(8 * exec_ms.len());
        for v in exec_ms {
            bytes.extend_from_slice(&v.to_bits().to_le_bytes());
        }
        self.seg.write(e.meta_offset + layout::profile_offset(&meta) as u64, &bytes)?;
        self.bump_generation();
        Ok(())
    }

    /// Stores a fitted cost model and the predicted and measured makespans
    /// of its plan with the model (in place, under the exclusive lock, like
    /// [`Store::set_layer_exec_ms`]). Models added by a library without the
    /// cost area cannot keep one (an error: add them again).
    pub fn set_cost(&self, name: &str, cost: &crate::cost::StoredCost) -> Result<()> {
        cost.validate()?;
        let _l = lock(&self.local);
        let _g = self.seg.lock(true)?;
        let (_, e) = self.find_ready(name)?;
        let mut meta = vec![0u8; e.meta_bytes as usize];
        self.seg.read(e.meta_offset, &mut meta)?;
        layout::decode_model(&e, &meta)?;
        let off = layout::cost_offset(&meta, e.n_layers as usize).ok_or_else(|| {
            Error::InvalidState(format!("model {name:?} was stored without room for a cost model; add it again"))
        })?;
        self.seg.write(e.meta_offset + off as u64, &cost.to_bytes())?;
        self.bump_generation();
        Ok(())
    }

    /// The cost model stored with a model, `None` if there is none.
    pub fn cost(&self, name: &str) -> Result<Option<crate::cost::StoredCost>> {
        let _l = lock(&self.local);
        let _g = self.seg.lock(false)?;
        let (_, e) = self.find_ready(name)?;
        let mut meta = vec![0u8; e.meta_bytes as usize];
        self.seg.read(e.meta_offset, &mut meta)?;
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
        let mut pinned = lock(&self.pinned);
        if pinned.is_none() {
            // SAFETY: the mapping is page-aligned and lives as long as self;
            // the registration is dropped before the mapping (field order).
            let reg = unsafe { HostRegistration::new(device, self.seg.ptr(), self.seg.len() as usize) }.map_err(|e| match e {
                Error::Cuda(c)
                    if matches!(
                        c.code,
                        cudarc::driver::sys::CUresult::CUDA_ERROR_INVALID_VALUE
                            | cudarc::driver::sys::CUresult::CUDA_ERROR_NOT_SUPPORTED
                    ) =>
                {
                    Error::InvalidState(format!(
                    "store {:?} ({}) could not be page-locked: {c}; stores must live on tmpfs (/dev/shm) or hugetlbfs, see {}",
                    self.name,
                    self.seg.path.display(),
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

impl Drop for Store {
    fn drop(&mut self) {
        // Unregister before the mapping goes away.
        lock(&self.pinned).take();
    }
}
