//! The pipelined switch: copies a model's layer groups from the pinned store
//! into its arena region on a copy stream, and records one event per group,
//! so that a worker's compute stream can wait for group g on the GPU
//! (`cuStreamWaitEvent`) and run it while later groups are still in flight.
//!
//! Copies are chunked independently of the groups: consecutive small groups
//! share one copy (at least `min_chunk` bytes, so PCIe runs at full speed)
//! and large groups are split into pieces of at most `max_chunk`; each
//! group's event is recorded right after the copy that completes it. A group
//! is therefore never signalled before its bytes have arrived, and at most
//! `min_chunk` bytes later than a copy of its own would have finished.

use cudarc::driver::sys::{CUdeviceptr, CUstream};
use std::sync::Arc;

use crate::arena::Arena;
use crate::cuda::{memory, stream, Device, Event, Stream};
use crate::error::{Error, Result};
use crate::store::{Model, ModelLease, Store, TensorInfo};

/// Copy chunking, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunking {
    /// Consecutive groups are merged into one copy until it holds this many bytes.
    pub min_chunk: u64,
    /// No copy is larger than this.
    pub max_chunk: u64,
}

impl Default for Chunking {
    fn default() -> Self {
        Chunking { min_chunk: 4 << 20, max_chunk: 64 << 20 }
    }
}

/// One copy of the schedule: bytes `[start, end)` of the model, followed by
/// the events of the groups it completes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copy {
    pub start: u64,
    pub end: u64,
    pub completes_groups: Vec<usize>,
}

/// The copies for groups with byte ranges `group_ends` (group g covers
/// `[group_ends[g-1], group_ends[g])`, group 0 starts at 0). Pure logic.
pub fn copy_schedule(group_ends: &[u64], chunking: Chunking) -> Result<Vec<Copy>> {
    if chunking.min_chunk == 0 || chunking.max_chunk == 0 || chunking.min_chunk > chunking.max_chunk {
        return Err(Error::invalid(format!(
            "chunking needs 0 < min_chunk <= max_chunk, got {} and {}",
            chunking.min_chunk, chunking.max_chunk
        )));
    }
    let mut copies: Vec<Copy> = Vec::new();
    let mut chunk_start = 0u64;
    let mut pending: Vec<usize> = Vec::new();
    let mut prev_end = 0u64;
    for (g, &end) in group_ends.iter().enumerate() {
        if end < prev_end {
            return Err(Error::invalid("group byte ranges are not increasing"));
        }
        prev_end = end;
        // A group with no bytes past the last copy is complete with it.
        if end == chunk_start && pending.is_empty() {
            if let Some(last) = copies.last_mut() {
                last.completes_groups.push(g);
                continue;
            }
        }
        while end - chunk_start > chunking.max_chunk {
            copies.push(Copy {
                start: chunk_start,
                end: chunk_start + chunking.max_chunk,
                completes_groups: std::mem::take(&mut pending),
            });
            chunk_start += chunking.max_chunk;
        }
        pending.push(g);
        if end - chunk_start >= chunking.min_chunk || g + 1 == group_ends.len() {
            copies.push(Copy { start: chunk_start, end, completes_groups: std::mem::take(&mut pending) });
            chunk_start = end;
        }
    }
    // Empty copies (zero-byte groups at a chunk boundary) carry only events.
    Ok(copies)
}

/// Checks a plan for a model of `n_layers`: starts at 0, strictly increasing,
/// all below `n_layers`.
pub fn check_plan(group_starts: &[usize], n_layers: usize) -> Result<()> {
    if group_starts.first() != Some(&0) {
        return Err(Error::invalid("a plan's first group must start at layer 0"));
    }
    if let Some(w) = group_starts.windows(2).find(|w| w[0] >= w[1]) {
        return Err(Error::invalid(format!("group starts {} then {}: not increasing", w[0], w[1])));
    }
    if let Some(&last) = group_starts.last() {
        if last >= n_layers {
            return Err(Error::invalid(format!(
                "a group starts at layer {last} but the model has {n_layers} layers"
            )));
        }
    }
    Ok(())
}

struct InFlight {
    model: Arc<Model>,
    /// Leases on this switch's model and on earlier ones whose copies had
    /// not finished when it started: their bytes stay put until then.
    leases: Vec<ModelLease>,
    store: Arc<Store>,
    arena: Arc<Arena>,
    dst: CUdeviceptr,
    group_starts: Vec<usize>,
    layer_group: Vec<usize>,
    copies: usize,
}

/// A reusable switch engine for one device: its copy stream, a pool of group
/// events and two timing events. One switch at a time is in flight on it.
pub struct Switch {
    device: &'static Device,
    stream: Stream,
    events: Vec<Event>,
    start_event: Event,
    end_event: Event,
    chunking: Chunking,
    /// Group events carry timestamps (for traces), at a small cost per record.
    timing: bool,
    current: Option<InFlight>,
}

impl std::fmt::Debug for Switch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Switch")
            .field("device", &self.device.ordinal())
            .field("model", &self.current.as_ref().map(|c| c.model.name.clone()))
            .finish()
    }
}

impl Switch {
    pub fn new(ordinal: i32) -> Result<Switch> {
        let device = Device::get(ordinal)?;
        Ok(Switch {
            device,
            stream: Stream::new(device)?,
            events: Vec::new(),
            start_event: Event::new(device, true)?,
            end_event: Event::new(device, true)?,
            chunking: Chunking::default(),
            timing: false,
            current: None,
        })
    }

    pub fn device(&self) -> &'static Device {
        self.device
    }

    pub fn set_chunking(&mut self, chunking: Chunking) -> Result<()> {
        copy_schedule(&[1], chunking)?;
        self.chunking = chunking;
        Ok(())
    }

    /// Records group events with timestamps from the next switch on, so that
    /// [`Switch::group_arrival_ms`] can tell when each group arrived.
    pub fn set_timing(&mut self, timing: bool) -> Result<()> {
        if timing != self.timing {
            if self.current.is_some() {
                self.stream.synchronize()?;
            }
            self.events.clear();
            self.current = None;
            self.timing = timing;
        }
        Ok(())
    }

    /// The event recorded on the copy stream before the last switch's first
    /// copy: the origin of the switch's timeline.
    pub fn start_event(&self) -> Result<&Event> {
        self.current()?;
        Ok(&self.start_event)
    }

    /// When each group of the last switch arrived, in ms after
    /// [`Switch::start_event`] (synchronizes; needs [`Switch::set_timing`]).
    pub fn group_arrival_ms(&self) -> Result<Vec<f64>> {
        if !self.timing {
            return Err(Error::InvalidState("group arrival times need set_timing(true) before the switch".into()));
        }
        let cur = self.current()?;
        self.end_event.synchronize()?;
        (0..cur.group_starts.len())
            .map(|g| Ok(f64::from(Event::elapsed_ms(&self.start_event, &self.events[g])?)))
            .collect()
    }

    /// Address at which kernels can read the last switch's model straight
    /// from the store's pinned pages (over PCIe), e.g. the few rows of an
    /// embedding table that has not arrived yet.
    pub fn host_model_base(&self) -> Result<CUdeviceptr> {
        let cur = self.current()?;
        cur.store.mapped_model_ptr(&cur.model)
    }

    /// Device address of the last switch's model (its first byte in the arena).
    pub fn model_base(&self) -> Result<CUdeviceptr> {
        Ok(self.current()?.dst)
    }

    /// The copy stream (raw), e.g. to order other work after the switch.
    pub fn copy_stream(&self) -> CUstream {
        self.stream.raw()
    }

    /// Starts the pipelined copy of `model_name` into `arena` at `dst_offset`
    /// (a region allocated from the arena, at least the model's size), with
    /// layer groups starting at `group_starts`. Returns once everything is
    /// enqueued; nothing waits on the host.
    pub fn start(
        &mut self,
        store: &Arc<Store>,
        model_name: &str,
        arena: &Arc<Arena>,
        dst_offset: u64,
        group_starts: &[usize],
    ) -> Result<()> {
        self.begin(store, model_name, arena, dst_offset, Some(group_starts))
    }

    /// The whole model in one copy with one event (group 0): transfer-then-run,
    /// the baseline that pipelining is measured against.
    pub fn start_whole(&mut self, store: &Arc<Store>, model_name: &str, arena: &Arc<Arena>, dst_offset: u64) -> Result<()> {
        self.begin(store, model_name, arena, dst_offset, None)
    }

    fn begin(
        &mut self,
        store: &Arc<Store>,
        model_name: &str,
        arena: &Arc<Arena>,
        dst_offset: u64,
        group_starts: Option<&[usize]>,
    ) -> Result<()> {
        if arena.device().ordinal() != self.device.ordinal() {
            return Err(Error::invalid(format!(
                "the arena is on device {} but this switch copies to device {}",
                arena.device().ordinal(),
                self.device.ordinal()
            )));
        }
        let lease = store.lease(model_name)?;
        let model = lease.model().clone();
        let n_layers = model.layers.len();
        let starts: Vec<usize> = match group_starts {
            Some(s) => {
                check_plan(s, n_layers)?;
                s.to_vec()
            }
            None => vec![0],
        };
        arena.check_region(dst_offset, model.bytes)?;
        self.device.bind()?;
        store.pin(self.device)?;
        let host = store.host_ptr(&model)?;

        let group_ends: Vec<u64> = (0..starts.len())
            .map(|g| {
                let end_layer = starts.get(g + 1).copied().unwrap_or(n_layers);
                let last = &model.layers[end_layer - 1];
                last.offset + last.bytes
            })
            .collect();
        let copies = match group_starts {
            Some(_) => copy_schedule(&group_ends, self.chunking)?,
            None => vec![Copy { start: 0, end: model.bytes, completes_groups: vec![0] }],
        };
        while self.events.len() < starts.len() {
            self.events.push(Event::new(self.device, self.timing)?);
        }
        // A previous switch may still be copying out of another store or into
        // another arena whose last reference goes with it: let it finish first.
        if let Some(prev) = &self.current {
            let same = Arc::ptr_eq(&prev.store, store) && Arc::ptr_eq(&prev.arena, arena);
            if !same && !self.end_event.is_complete()? {
                self.stream.synchronize()?;
            }
        }
        let mut layer_group = vec![0usize; n_layers];
        for (g, &s) in starts.iter().enumerate() {
            let e = starts.get(g + 1).copied().unwrap_or(n_layers);
            layer_group[s..e].iter_mut().for_each(|x| *x = g);
        }
        let mut leases = vec![lease];
        if let Some(prev) = &self.current {
            if !self.end_event.is_complete()? {
                leases.extend(prev.leases.iter().cloned());
            }
        }
        let dst = arena.base() + dst_offset;
        let raw = self.stream.raw();
        self.start_event.record(raw)?;
        for c in &copies {
            if c.end > c.start {
                // SAFETY: the source lies inside the pinned store mapping (host_ptr
                // checked the model's range), the destination inside the arena
                // (check_region); both are kept alive by the Arcs held below
                // until the copies have completed.
                unsafe {
                    memory::copy_htod_async(
                        dst + c.start,
                        host.add(c.start as usize),
                        (c.end - c.start) as usize,
                        raw,
                    )?
                };
            }
            for &g in &c.completes_groups {
                self.events[g].record(raw)?;
            }
        }
        self.end_event.record(raw)?;
        self.current = Some(InFlight {
            model,
            leases,
            store: store.clone(),
            arena: arena.clone(),
            dst,
            group_starts: starts,
            layer_group,
            copies: copies.len(),
        });
        Ok(())
    }

    fn current(&self) -> Result<&InFlight> {
        self.current
            .as_ref()
            .ok_or_else(|| Error::InvalidState("no switch has been started".into()))
    }

    /// The model of the last switch.
    pub fn model(&self) -> Result<&Arc<Model>> {
        Ok(&self.current()?.model)
    }

    pub fn n_groups(&self) -> Result<usize> {
        Ok(self.current()?.group_starts.len())
    }

    pub fn group_starts(&self) -> Result<&[usize]> {
        Ok(&self.current()?.group_starts)
    }

    /// Number of copies the last switch enqueued.
    pub fn n_copies(&self) -> Result<usize> {
        Ok(self.current()?.copies)
    }

    /// Makes `stream` (any stream of this device's primary context; NULL is
    /// the legacy default stream) wait on the GPU until group `group` has
    /// arrived. The host does not block.
    pub fn wait_group(&self, group: usize, stream: CUstream) -> Result<()> {
        let cur = self.current()?;
        if group >= cur.group_starts.len() {
            return Err(Error::invalid(format!(
                "group {group} out of range: the switch has {} groups",
                cur.group_starts.len()
            )));
        }
        self.device.bind()?;
        stream::wait_event_raw(stream, &self.events[group])
    }

    /// The group that holds `layer`.
    pub fn group_of_layer(&self, layer: usize) -> Result<usize> {
        let cur = self.current()?;
        cur.layer_group.get(layer).copied().ok_or_else(|| {
            Error::invalid(format!("layer {layer} out of range: the model has {} layers", cur.layer_group.len()))
        })
    }

    /// True once group `group` has arrived.
    pub fn group_ready(&self, group: usize) -> Result<bool> {
        let cur = self.current()?;
        if group >= cur.group_starts.len() {
            return Err(Error::invalid(format!("group {group} out of range")));
        }
        self.events[group].is_complete()
    }

    /// Device address of tensor `index` (in the model's order).
    pub fn tensor_ptr(&self, index: usize) -> Result<(CUdeviceptr, &TensorInfo)> {
        let cur = self.current()?;
        let t = cur.model.tensors.get(index).ok_or_else(|| {
            Error::invalid(format!("tensor {index} out of range: the model has {} tensors", cur.model.tensors.len()))
        })?;
        Ok((cur.dst + t.offset, t))
    }

    /// Device address of the tensor called `name`.
    pub fn tensor_ptr_by_name(&self, name: &str) -> Result<(CUdeviceptr, &TensorInfo)> {
        let cur = self.current()?;
        let (i, _) = cur
            .model
            .tensor(name)
            .ok_or_else(|| Error::NotFound(format!("no tensor {name:?} in model {:?}", cur.model.name)))?;
        self.tensor_ptr(i)
    }

    /// Blocks the host until the whole model has arrived.
    pub fn synchronize(&self) -> Result<()> {
        self.current()?;
        self.end_event.synchronize()
    }

    /// GPU time of the last switch's copies, in ms (synchronizes).
    pub fn elapsed_ms(&self) -> Result<f64> {
        self.synchronize()?;
        Ok(f64::from(Event::elapsed_ms(&self.start_event, &self.end_event)?))
    }
}

impl Drop for Switch {
    fn drop(&mut self) {
        // In-flight copies read the store and write the arena that `current`
        // keeps alive: they must finish before those references go.
        if self.current.is_some() {
            if let Err(e) = self.stream.synchronize() {
                tracing::warn!("waiting for a switch's copies failed: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1 << 20;

    fn check_covers(copies: &[Copy], ends: &[u64], ch: Chunking) {
        // Contiguous cover of [0, last end), sizes within max_chunk.
        let mut pos = 0;
        for c in copies {
            assert_eq!(c.start, pos);
            assert!(c.end >= c.start);
            assert!(c.end - c.start <= ch.max_chunk);
            pos = c.end;
        }
        assert_eq!(pos, *ends.last().unwrap());
        // Every group's event comes exactly once, in order, right after the
        // copy that holds its last byte.
        let mut seen = Vec::new();
        for (i, c) in copies.iter().enumerate() {
            for &g in &c.completes_groups {
                assert!(c.end >= ends[g], "group {g} signalled before its bytes arrive");
                let first = copies.iter().position(|c| c.end >= ends[g]).unwrap();
                assert_eq!(i, first, "group {g} signalled later than the copy that completes it");
                seen.push(g);
            }
        }
        assert_eq!(seen, (0..ends.len()).collect::<Vec<_>>());
    }

    #[test]
    fn small_groups_share_copies() {
        let ch = Chunking { min_chunk: 4 * MB, max_chunk: 64 * MB };
        let ends: Vec<u64> = (1..=100).map(|i| i * MB / 2).collect(); // 100 groups of 512 KiB
        let copies = copy_schedule(&ends, ch).unwrap();
        check_covers(&copies, &ends, ch);
        assert_eq!(copies.len(), 13); // 12 copies of 4 MiB + the 2 MiB tail
    }

    #[test]
    fn large_groups_are_split() {
        let ch = Chunking { min_chunk: 4 * MB, max_chunk: 64 * MB };
        let ends = vec![200 * MB, 201 * MB, 300 * MB];
        let copies = copy_schedule(&ends, ch).unwrap();
        check_covers(&copies, &ends, ch);
        assert!(copies.iter().all(|c| c.end - c.start <= 64 * MB));
        // Group 0's event follows the copy ending at 200 MiB exactly.
        let c0 = copies.iter().find(|c| c.completes_groups.contains(&0)).unwrap();
        assert_eq!(c0.end, 200 * MB);
    }

    #[test]
    fn random_schedules_are_valid() {
        let mut s: u64 = 12345;
        for _ in 0..500 {
            let mut ends = Vec::new();
            let mut pos = 0;
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let n = 1 + (s % 40) as usize;
            for _ in 0..n {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                pos += (s % (3 * 64 * MB)) / 3 * (s % 2);
                ends.push(pos);
            }
            if pos == 0 {
                continue;
            }
            let ch = Chunking { min_chunk: 1 + s % (8 * MB), max_chunk: 8 * MB + s % (64 * MB) };
            check_covers(&copy_schedule(&ends, ch).unwrap(), &ends, ch);
        }
    }

    #[test]
    fn bad_chunking_and_plans_are_rejected() {
        assert!(copy_schedule(&[10], Chunking { min_chunk: 0, max_chunk: 1 }).is_err());
        assert!(copy_schedule(&[10], Chunking { min_chunk: 2, max_chunk: 1 }).is_err());
        assert!(copy_schedule(&[10, 5], Chunking::default()).is_err());
        assert!(check_plan(&[], 3).is_err());
        assert!(check_plan(&[1], 3).is_err());
        assert!(check_plan(&[0, 2, 2], 3).is_err());
        assert!(check_plan(&[0, 3], 3).is_err());
        assert!(check_plan(&[0, 1, 2], 3).is_ok());
    }
}
