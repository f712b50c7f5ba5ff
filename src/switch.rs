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
//! `min_chunk` bytes later than a copy of its own would have finished. The
//! first group is the exception: it is copied on its own however small, as
//! nothing can run before it has arrived (merged with the next groups, the
//! first kernel would wait for `min_chunk` bytes: 76 us at 55 GB/s).

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
        if end - chunk_start >= chunking.min_chunk || g == 0 || g + 1 == group_ends.len() {
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

/// The end of each layer's bytes in `model`, checked: a store's table comes
/// from shared memory, and a layer that overflowed or ended past the model
/// would make the switch read past the model and write past its region.
pub fn layer_ends(model: &Model) -> Result<Vec<u64>> {
    model
        .layers
        .iter()
        .map(|l| {
            l.offset.checked_add(l.bytes).filter(|&e| e <= model.bytes).ok_or_else(|| {
                Error::corrupt(format!(
                    "layer {:?} of model {:?} ([{}, +{})) ends past the model's {} bytes",
                    l.name, model.name, l.offset, l.bytes, model.bytes
                ))
            })
        })
        .collect()
}

/// Where group `g` of a plan ends in the model's bytes, and which group holds
/// each layer: group g covers layers `[starts[g], starts[g+1])` (the last one
/// runs to the end), `layer_ends[l]` is the end of layer l's bytes. Pure
/// logic; `starts` must have passed [`check_plan`] for `layer_ends.len()`.
pub fn group_layout(layer_ends: &[u64], starts: &[usize]) -> (Vec<u64>, Vec<usize>) {
    let n_layers = layer_ends.len();
    let mut group_ends = Vec::with_capacity(starts.len());
    let mut layer_group = vec![0usize; n_layers];
    for (g, &s) in starts.iter().enumerate() {
        let e = starts.get(g + 1).copied().unwrap_or(n_layers);
        group_ends.push(layer_ends[e - 1]);
        layer_group[s..e].iter_mut().for_each(|x| *x = g);
    }
    (group_ends, layer_group)
}

/// What a switch does on the GPU, one call per operation, in the order the
/// switch issues them. [`CudaCopies`] is the real one (a copy stream, a pool
/// of group events, start and end events); the tests use a fake that
/// records the operations and fails where it is told to.
pub(crate) trait CopyEngine {
    /// Makes events for groups `0..n` exist (the pool only grows).
    fn reserve_groups(&mut self, n: usize) -> Result<()>;
    /// Records the start event (the origin of the switch's timeline).
    fn record_start(&mut self) -> Result<()>;
    /// Enqueues a copy of `bytes` from host `src` to device `dst`.
    ///
    /// # Safety
    /// Both ranges must stay valid (the host range pinned) until the copy
    /// has completed, that is until [`CopyEngine::is_done`] says so after a
    /// later [`CopyEngine::record_end`], or [`CopyEngine::drain`] returns Ok.
    unsafe fn copy(&mut self, dst: CUdeviceptr, src: *const u8, bytes: usize) -> Result<()>;
    /// Records group `g`'s event after everything enqueued so far.
    fn record_group(&mut self, g: usize) -> Result<()>;
    /// Records the end event after everything enqueued so far.
    fn record_end(&mut self) -> Result<()>;
    /// True once everything before the end event's last record has completed
    /// (no host wait).
    fn is_done(&self) -> Result<bool>;
    /// Blocks the host until the end event's last record has completed.
    fn wait_end(&self) -> Result<()>;
    /// Blocks the host until everything enqueued so far has completed, also
    /// copies enqueued after the last end event (a switch that failed half-way).
    fn drain(&self) -> Result<()>;
    /// Makes `stream` wait on the GPU for group `g`'s last record.
    fn wait_group(&self, g: usize, stream: CUstream) -> Result<()>;
    /// True once group `g`'s last record has completed.
    fn group_done(&self, g: usize) -> Result<bool>;
}

/// The switch's operations on a CUDA copy stream of one device.
struct CudaCopies {
    device: &'static Device,
    stream: Stream,
    events: Vec<Event>,
    start_event: Event,
    end_event: Event,
    /// Group events carry timestamps (for traces), at a small cost per record.
    timing: bool,
}

impl CudaCopies {
    fn new(device: &'static Device) -> Result<CudaCopies> {
        Ok(CudaCopies {
            device,
            stream: Stream::new(device)?,
            events: Vec::new(),
            start_event: Event::new(device, true)?,
            end_event: Event::new(device, true)?,
            timing: false,
        })
    }
}

impl CopyEngine for CudaCopies {
    fn reserve_groups(&mut self, n: usize) -> Result<()> {
        while self.events.len() < n {
            self.events.push(Event::new(self.device, self.timing)?);
        }
        Ok(())
    }
    fn record_start(&mut self) -> Result<()> {
        self.start_event.record(self.stream.raw())
    }
    unsafe fn copy(&mut self, dst: CUdeviceptr, src: *const u8, bytes: usize) -> Result<()> {
        // SAFETY: the caller keeps both ranges valid until the copy completes.
        unsafe { memory::copy_htod_async(dst, src, bytes, self.stream.raw()) }
    }
    fn record_group(&mut self, g: usize) -> Result<()> {
        self.events[g].record(self.stream.raw())
    }
    fn record_end(&mut self) -> Result<()> {
        self.end_event.record(self.stream.raw())
    }
    fn is_done(&self) -> Result<bool> {
        self.end_event.is_complete()
    }
    fn wait_end(&self) -> Result<()> {
        self.end_event.synchronize()
    }
    fn drain(&self) -> Result<()> {
        self.stream.synchronize()
    }
    fn wait_group(&self, g: usize, stream: CUstream) -> Result<()> {
        self.device.bind()?;
        stream::wait_event_raw(stream, &self.events[g])
    }
    fn group_done(&self, g: usize) -> Result<bool> {
        self.events[g].is_complete()
    }
}

/// The switch in flight (or last completed): what its copies read and write,
/// kept alive until they have completed.
/// How a switch brings its model in.
#[derive(Clone, Copy)]
enum Mode<'a> {
    /// Pipelined, in the groups that start at these layers.
    Plan(&'a [usize]),
    /// One copy, one group.
    Whole,
    /// No copy: the bytes are in place already.
    Resident,
}

struct InFlight {
    model: Arc<Model>,
    /// The model's lease: its bytes stay in the store until the copies are
    /// done (the pipeline keeps a retired switch's `InFlight` until then).
    #[allow(dead_code)]
    lease: ModelLease,
    store: Arc<Store>,
    /// Held, not read: the copies write into it.
    #[allow(dead_code)]
    arena: Arc<Arena>,
}

/// One started switch: what it holds, where it writes, its plan.
struct Running<H> {
    held: H,
    dst: CUdeviceptr,
    group_starts: Vec<usize>,
    layer_group: Vec<usize>,
    copies: usize,
}

/// The switch's state machine over a [`CopyEngine`], generic over what a
/// switch holds (`H`: the store, arena and model for the real switch).
///
/// - `current` is the last switch whose every operation was enqueued, or
///   None (no switch yet, or the last one failed: `failed` says why).
/// - What an earlier switch holds is kept in `retired` until the engine says
///   its copies are done: a new switch never waits on the host for the
///   previous one, and never frees what queued copies still use.
/// - When an operation fails half-way, the switch drains the engine (the
///   partial copies complete while what they use is still held), then resets:
///   no `current`, so waits on its groups fail instead of waiting on events
///   that describe half a switch.
pub(crate) struct Pipeline<E: CopyEngine, H> {
    engine: E,
    current: Option<Running<H>>,
    retired: Vec<H>,
    failed: Option<String>,
    /// A failed switch's copies were never waited for (the drain failed):
    /// the end event does not cover them, only a successful drain does.
    undrained: bool,
}

impl<E: CopyEngine, H> Pipeline<E, H> {
    pub(crate) fn new(engine: E) -> Self {
        Pipeline { engine, current: None, retired: Vec::new(), failed: None, undrained: false }
    }

    fn current(&self) -> Result<&Running<H>> {
        self.current.as_ref().ok_or_else(|| match &self.failed {
            Some(why) => Error::InvalidState(format!("the last switch failed ({why}); start a new one")),
            None => Error::InvalidState("no switch has been started".into()),
        })
    }

    /// Enqueues a switch: `copies` (from [`copy_schedule`]) from `src` to
    /// `dst`, each followed by its groups' events, between the start and the
    /// end events. `held` keeps what the copies use alive until they are done.
    ///
    /// # Safety
    /// `src..src+copies.last().end` must be pinned host memory and
    /// `dst..dst+copies.last().end` device memory, both valid while `held` lives.
    pub(crate) unsafe fn start(
        &mut self,
        held: H,
        dst: CUdeviceptr,
        src: *const u8,
        group_starts: Vec<usize>,
        layer_group: Vec<usize>,
        copies: &[Copy],
    ) -> Result<()> {
        // From here on the previous switch is no longer `current`: whatever
        // fails below, nothing describes it while its events are re-recorded.
        if let Some(prev) = self.current.take() {
            self.retired.push(prev.held);
        }
        self.failed = None;
        // SAFETY: forwarded from the caller.
        match unsafe { self.enqueue(dst, src, group_starts.len(), copies) } {
            Ok(()) => {
                let copies = copies.iter().filter(|c| c.end > c.start).count();
                self.current = Some(Running { held, dst, group_starts, layer_group, copies });
                Ok(())
            }
            Err(e) => {
                self.reset(held, &e);
                Err(e)
            }
        }
    }

    unsafe fn enqueue(&mut self, dst: CUdeviceptr, src: *const u8, n_groups: usize, copies: &[Copy]) -> Result<()> {
        self.engine.reserve_groups(n_groups)?;
        // The end event's last record follows every earlier switch's copies:
        // once it has completed, what they held may go. Copies of a failed
        // switch that could not be waited for come after it: they need a drain.
        if self.undrained {
            self.engine.drain()?;
            self.undrained = false;
            self.retired.clear();
        } else if !self.retired.is_empty() && self.engine.is_done()? {
            self.retired.clear();
        }
        self.engine.record_start()?;
        for c in copies {
            if c.end > c.start {
                // SAFETY: inside the ranges the caller vouches for; they stay
                // valid while `held` lives, which is until the copies are done.
                unsafe { self.engine.copy(dst + c.start, src.add(c.start as usize), (c.end - c.start) as usize)? };
            }
            for &g in &c.completes_groups {
                self.engine.record_group(g)?;
            }
        }
        self.engine.record_end()
    }

    /// After a failed operation: lets whatever was enqueued finish while
    /// `held` (and every retired switch) is still alive, then forgets the
    /// switch. If even that wait fails, nothing is released (the copies might
    /// still run): `held` joins the retired, freed by a later successful wait.
    fn reset(&mut self, held: H, e: &Error) {
        self.failed = Some(e.to_string());
        match self.engine.drain() {
            Ok(()) => {
                self.retired.clear();
                self.undrained = false;
                drop(held);
            }
            Err(d) => {
                tracing::warn!("a switch failed ({e}) and waiting for its copies failed too ({d})");
                self.retired.push(held);
                self.undrained = true;
            }
        }
    }

    /// Waits (host) for every copy enqueued so far and forgets the last
    /// switch: nothing is in flight afterwards.
    pub(crate) fn quiesce(&mut self) -> Result<()> {
        if self.current.is_some() || !self.retired.is_empty() {
            self.engine.drain()?;
        }
        self.current = None;
        self.retired.clear();
        self.undrained = false;
        Ok(())
    }

    /// Blocks the host until the last switch's copies are done. (What
    /// earlier switches held goes at the next start, which sees them done.)
    pub(crate) fn synchronize(&self) -> Result<()> {
        self.current()?;
        self.engine.wait_end()
    }

    /// Makes `stream` wait on the GPU for group `group` of the last switch.
    #[inline]
    pub(crate) fn wait_group(&self, group: usize, stream: CUstream) -> Result<()> {
        let cur = self.current()?;
        if group >= cur.group_starts.len() {
            return Err(Error::invalid(format!(
                "group {group} out of range: the switch has {} groups",
                cur.group_starts.len()
            )));
        }
        self.engine.wait_group(group, stream)
    }

    pub(crate) fn group_ready(&self, group: usize) -> Result<bool> {
        let cur = self.current()?;
        if group >= cur.group_starts.len() {
            return Err(Error::invalid(format!("group {group} out of range")));
        }
        self.engine.group_done(group)
    }

    pub(crate) fn is_idle(&self) -> bool {
        self.current.is_none() && self.retired.is_empty()
    }
}

impl<E: CopyEngine, H> Drop for Pipeline<E, H> {
    fn drop(&mut self) {
        // Queued copies read and write what `current` and `retired` keep
        // alive: they must finish before those references go.
        if !self.is_idle() {
            if let Err(e) = self.engine.drain() {
                tracing::warn!("waiting for a switch's copies failed: {e}");
            }
        }
    }
}

/// A reusable switch engine for one device: its copy stream, a pool of group
/// events and two timing events. One switch at a time is in flight on it.
pub struct Switch {
    device: &'static Device,
    chunking: Chunking,
    pipe: Pipeline<CudaCopies, InFlight>,
}

impl std::fmt::Debug for Switch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Switch")
            .field("device", &self.device.ordinal())
            .field("model", &self.pipe.current.as_ref().map(|c| c.held.model.name.clone()))
            .finish()
    }
}

impl Switch {
    pub fn new(ordinal: i32) -> Result<Switch> {
        let device = Device::get(ordinal)?;
        Ok(Switch { device, chunking: Chunking::default(), pipe: Pipeline::new(CudaCopies::new(device)?) })
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
        if timing != self.pipe.engine.timing {
            self.pipe.quiesce()?;
            self.pipe.engine.events.clear();
            self.pipe.engine.timing = timing;
        }
        Ok(())
    }

    fn current(&self) -> Result<&Running<InFlight>> {
        self.pipe.current()
    }

    /// The event recorded on the copy stream before the last switch's first
    /// copy: the origin of the switch's timeline.
    pub fn start_event(&self) -> Result<&Event> {
        self.current()?;
        Ok(&self.pipe.engine.start_event)
    }

    /// When each group of the last switch arrived, in ms after
    /// [`Switch::start_event`] (synchronizes; needs [`Switch::set_timing`]).
    pub fn group_arrival_ms(&self) -> Result<Vec<f64>> {
        let e = &self.pipe.engine;
        if !e.timing {
            return Err(Error::InvalidState("group arrival times need set_timing(true) before the switch".into()));
        }
        let cur = self.current()?;
        e.end_event.synchronize()?;
        (0..cur.group_starts.len())
            .map(|g| Ok(f64::from(Event::elapsed_ms(&e.start_event, &e.events[g])?)))
            .collect()
    }

    /// Address at which kernels can read the last switch's model straight
    /// from the store's pinned pages (over PCIe), e.g. the few rows of an
    /// embedding table that has not arrived yet.
    pub fn host_model_base(&self) -> Result<CUdeviceptr> {
        let cur = &self.current()?.held;
        cur.store.mapped_model_ptr(&cur.model)
    }

    /// Device address of the last switch's model (its first byte in the arena).
    pub fn model_base(&self) -> Result<CUdeviceptr> {
        Ok(self.current()?.dst)
    }

    /// The copy stream (raw), e.g. to order other work after the switch.
    pub fn copy_stream(&self) -> CUstream {
        self.pipe.engine.stream.raw()
    }

    /// Starts the pipelined copy of `model_name` into `arena` at `dst_offset`
    /// (a region allocated from the arena, at least the model's size), with
    /// layer groups starting at `group_starts`. Returns once everything is
    /// enqueued; nothing waits on the host.
    ///
    /// Bad arguments leave the previous switch as it was. A driver error
    /// half-way waits for what was enqueued and resets the switch: calls about
    /// groups fail until the next start.
    pub fn start(
        &mut self,
        store: &Arc<Store>,
        model_name: &str,
        arena: &Arc<Arena>,
        dst_offset: u64,
        group_starts: &[usize],
    ) -> Result<()> {
        self.begin(store, model_name, arena, dst_offset, Mode::Plan(group_starts))
    }

    /// The whole model in one copy with one event (group 0): transfer-then-run,
    /// the baseline that pipelining is measured against.
    pub fn start_whole(&mut self, store: &Arc<Store>, model_name: &str, arena: &Arc<Arena>, dst_offset: u64) -> Result<()> {
        self.begin(store, model_name, arena, dst_offset, Mode::Whole)
    }

    /// Attaches a model whose bytes are already at `dst_offset` (resident, as
    /// the residency manager reports): no copy, one group that is complete as
    /// soon as the copy stream reaches it. A worker then runs the model as it
    /// runs a switched one.
    pub fn start_resident(&mut self, store: &Arc<Store>, model_name: &str, arena: &Arc<Arena>, dst_offset: u64) -> Result<()> {
        self.begin(store, model_name, arena, dst_offset, Mode::Resident)
    }

    fn begin(
        &mut self,
        store: &Arc<Store>,
        model_name: &str,
        arena: &Arc<Arena>,
        dst_offset: u64,
        mode: Mode<'_>,
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
        let starts: Vec<usize> = match mode {
            Mode::Plan(s) => {
                check_plan(s, n_layers)?;
                s.to_vec()
            }
            Mode::Whole | Mode::Resident => vec![0],
        };
        arena.check_region(dst_offset, model.bytes)?;
        self.device.bind()?;
        store.pin(self.device)?;
        let host = store.host_ptr(&model)?;

        let layer_ends = layer_ends(&model)?;
        let (group_ends, layer_group) = group_layout(&layer_ends, &starts);
        let copies = match mode {
            Mode::Plan(_) => copy_schedule(&group_ends, self.chunking)?,
            Mode::Whole => vec![Copy { start: 0, end: model.bytes, completes_groups: vec![0] }],
            // An empty copy: only the group's event.
            Mode::Resident => vec![Copy { start: 0, end: 0, completes_groups: vec![0] }],
        };
        let dst = arena.base() + dst_offset;
        let held = InFlight { model, lease, store: store.clone(), arena: arena.clone() };
        // SAFETY: the source lies inside the pinned store mapping (host_ptr
        // checked the model's range), the destination inside the arena
        // (check_region); `held` keeps both alive, and the model's lease keeps
        // its bytes in place, until the copies complete.
        unsafe { self.pipe.start(held, dst, host, starts, layer_group, &copies) }
    }

    /// The model of the last switch.
    pub fn model(&self) -> Result<&Arc<Model>> {
        Ok(&self.current()?.held.model)
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
        self.pipe.wait_group(group, stream)
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
        self.pipe.group_ready(group)
    }

    /// Device address of tensor `index` (in the model's order).
    pub fn tensor_ptr(&self, index: usize) -> Result<(CUdeviceptr, &TensorInfo)> {
        let cur = self.current()?;
        let model = &cur.held.model;
        let t = model.tensors.get(index).ok_or_else(|| {
            Error::invalid(format!("tensor {index} out of range: the model has {} tensors", model.tensors.len()))
        })?;
        Ok((cur.dst + t.offset, t))
    }

    /// Device address of the tensor called `name`.
    pub fn tensor_ptr_by_name(&self, name: &str) -> Result<(CUdeviceptr, &TensorInfo)> {
        let model = &self.current()?.held.model;
        let (i, _) = model
            .tensor(name)
            .ok_or_else(|| Error::NotFound(format!("no tensor {name:?} in model {:?}", model.name)))?;
        self.tensor_ptr(i)
    }

    /// Blocks the host until the whole model has arrived.
    pub fn synchronize(&self) -> Result<()> {
        self.pipe.synchronize()
    }

    /// GPU time of the last switch's copies, in ms (synchronizes).
    pub fn elapsed_ms(&self) -> Result<f64> {
        self.synchronize()?;
        let e = &self.pipe.engine;
        Ok(f64::from(Event::elapsed_ms(&e.start_event, &e.end_event)?))
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
    fn small_groups_share_copies_but_the_first_has_its_own() {
        let ch = Chunking { min_chunk: 4 * MB, max_chunk: 64 * MB };
        let ends: Vec<u64> = (1..=100).map(|i| i * MB / 2).collect(); // 100 groups of 512 KiB
        let copies = copy_schedule(&ends, ch).unwrap();
        check_covers(&copies, &ends, ch);
        // Group 0 alone (nothing runs before it), then 12 copies of 4 MiB
        // and the 1.5 MiB tail.
        assert_eq!((copies[0].start, copies[0].end, copies[0].completes_groups.clone()), (0, MB / 2, vec![0]));
        assert_eq!(copies.len(), 14);
        assert!(copies[1..13].iter().all(|c| c.end - c.start == 4 * MB));
        // A tiny first group (a stem convolution) is not held back either.
        let ends = [9 * 1024, 3 * MB, 6 * MB];
        let copies = copy_schedule(&ends, ch).unwrap();
        check_covers(&copies, &ends, ch);
        assert_eq!(copies[0].end, 9 * 1024);
        assert_eq!(copies.len(), 2, "the later small groups still share a copy");
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
    // ------------------------------------------------ the state machine, on a fake engine

    use std::cell::RefCell;
    use std::rc::Rc;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Op {
        Reserve(usize),
        Start,
        Copy { dst: u64, src: usize, bytes: usize },
        Group(usize),
        End,
        Query,
        WaitEnd,
        Drain,
        Wait(usize),
        Ready(usize),
    }

    /// What the fake engine did and will do, shared with the test.
    #[derive(Default)]
    struct Log {
        ops: Vec<Op>,
        /// Indices (into `ops`) of operations that fail.
        fail: Vec<usize>,
        /// Whether every enqueued copy has completed ("the GPU").
        done: bool,
        /// Events in the pool.
        events: usize,
    }

    #[derive(Clone, Default)]
    struct Fake(Rc<RefCell<Log>>);

    impl Fake {
        fn op(&self, op: Op) -> Result<()> {
            let mut l = self.0.borrow_mut();
            l.ops.push(op);
            let i = l.ops.len() - 1;
            if l.fail.contains(&i) {
                return Err(Error::Internal(format!("injected failure at operation {i} ({op:?})")));
            }
            match op {
                Op::Copy { .. } => l.done = false,
                Op::WaitEnd | Op::Drain => l.done = true,
                Op::Group(g) | Op::Wait(g) | Op::Ready(g) => assert!(g < l.events, "group {g} has no event"),
                _ => {}
            }
            Ok(())
        }
        fn ops(&self) -> Vec<Op> {
            self.0.borrow().ops.clone()
        }
        fn n_ops(&self) -> usize {
            self.0.borrow().ops.len()
        }
        fn fail_at(&self, i: usize) {
            self.0.borrow_mut().fail.push(i);
        }
        fn set_done(&self, done: bool) {
            self.0.borrow_mut().done = done;
        }
    }

    impl CopyEngine for Fake {
        fn reserve_groups(&mut self, n: usize) -> Result<()> {
            self.op(Op::Reserve(n))?;
            let mut l = self.0.borrow_mut();
            l.events = l.events.max(n);
            Ok(())
        }
        fn record_start(&mut self) -> Result<()> {
            self.op(Op::Start)
        }
        unsafe fn copy(&mut self, dst: CUdeviceptr, src: *const u8, bytes: usize) -> Result<()> {
            self.op(Op::Copy { dst, src: src as usize, bytes })
        }
        fn record_group(&mut self, g: usize) -> Result<()> {
            self.op(Op::Group(g))
        }
        fn record_end(&mut self) -> Result<()> {
            self.op(Op::End)
        }
        fn is_done(&self) -> Result<bool> {
            self.op(Op::Query)?;
            Ok(self.0.borrow().done)
        }
        fn wait_end(&self) -> Result<()> {
            self.op(Op::WaitEnd)
        }
        fn drain(&self) -> Result<()> {
            self.op(Op::Drain)
        }
        fn wait_group(&self, g: usize, _stream: CUstream) -> Result<()> {
            self.op(Op::Wait(g))
        }
        fn group_done(&self, g: usize) -> Result<bool> {
            self.op(Op::Ready(g))?;
            Ok(self.0.borrow().done)
        }
    }

    /// What a switch holds, observable through its strong count.
    type Token = Arc<&'static str>;
    type Pipe = Pipeline<Fake, Vec<Token>>;

    const DST: u64 = 0x7f00_0000_0000;

    struct Xs(u64);
    impl Xs {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    /// A model of random layer sizes (some empty), a random valid plan and
    /// chunking, and its schedule.
    struct Case {
        layer_ends: Vec<u64>,
        starts: Vec<usize>,
        group_ends: Vec<u64>,
        layer_group: Vec<usize>,
        copies: Vec<Copy>,
        host: Vec<u8>,
    }

    fn case(r: &mut Xs) -> Case {
        let n_layers = 1 + (r.next() % 30) as usize;
        let mut pos = 0;
        let layer_ends: Vec<u64> = (0..n_layers)
            .map(|_| {
                if r.next() % 5 != 0 {
                    pos += 256 * (1 + r.next() % 20);
                }
                pos
            })
            .collect();
        let mut starts = vec![0];
        starts.extend((1..n_layers).filter(|_| r.next() % 3 == 0));
        check_plan(&starts, n_layers).unwrap();
        let min_chunk = 1 + r.next() % 4096;
        let chunking = Chunking { min_chunk, max_chunk: min_chunk + r.next() % 8192 };
        let (group_ends, layer_group) = group_layout(&layer_ends, &starts);
        let copies = copy_schedule(&group_ends, chunking).unwrap();
        Case { host: vec![0; pos as usize + 1], layer_ends, starts, group_ends, layer_group, copies }
    }

    fn start(p: &mut Pipe, c: &Case, held: &[&Token]) -> Result<()> {
        let held = held.iter().map(|t| Arc::clone(t)).collect();
        // SAFETY: the fake engine never touches memory; `host` covers every copy's source.
        unsafe { p.start(held, DST, c.host.as_ptr(), c.starts.clone(), c.layer_group.clone(), &c.copies) }
    }

    /// The operations a switch of `c` must issue, `query` if an earlier switch is still held.
    fn expected_ops(c: &Case, src: usize, query: bool) -> Vec<Op> {
        let mut ops = vec![Op::Reserve(c.starts.len())];
        if query {
            ops.push(Op::Query);
        }
        ops.push(Op::Start);
        for cp in &c.copies {
            if cp.end > cp.start {
                ops.push(Op::Copy { dst: DST + cp.start, src: src + cp.start as usize, bytes: (cp.end - cp.start) as usize });
            }
            ops.extend(cp.completes_groups.iter().map(|&g| Op::Group(g)));
        }
        ops.push(Op::End);
        ops
    }

    #[test]
    fn layers_past_the_model_are_refused() {
        use crate::store::LayerInfo;
        let layer = |offset: u64, bytes: u64| LayerInfo {
            name: format!("l{offset}"),
            first_tensor: 0,
            n_tensors: 0,
            offset,
            bytes,
            exec_ms: f64::NAN,
        };
        let mut m = Model {
            name: "m".into(),
            id: 1,
            segment_offset: 4096,
            bytes: 1024,
            layers: vec![layer(0, 512), layer(512, 512)],
            tensors: Vec::new(),
            attributes: Vec::new(),
        };
        assert_eq!(layer_ends(&m).unwrap(), vec![512, 1024]);
        m.layers[1].bytes = 513;
        assert!(matches!(layer_ends(&m), Err(Error::CorruptStore(_))));
        m.layers[1] = layer(u64::MAX, 2);
        assert!(matches!(layer_ends(&m), Err(Error::CorruptStore(_))));
        m.layers[1] = layer(512, u64::MAX);
        assert!(matches!(layer_ends(&m), Err(Error::CorruptStore(_))));
    }

    #[test]
    fn group_layout_maps_layers_to_groups() {
        let ends = [100, 100, 300, 600, 1000];
        let (g, lg) = group_layout(&ends, &[0, 2, 4]);
        assert_eq!(g, vec![100, 600, 1000]);
        assert_eq!(lg, vec![0, 0, 1, 1, 2]);
        let (g, lg) = group_layout(&ends, &[0]);
        assert_eq!((g, lg), (vec![1000], vec![0; 5]));
    }

    #[test]
    fn operations_follow_the_schedule_for_many_plans_and_chunkings() {
        let mut r = Xs(0x5eed_1234_abcd_0001);
        let fake = Fake::default();
        let mut p = Pipe::new(fake.clone());
        let tok: Token = Arc::new("model");
        for i in 0..300 {
            let c = case(&mut r);
            let before = fake.n_ops();
            fake.set_done(i % 2 == 0);
            start(&mut p, &c, &[&tok]).unwrap();
            let src = c.host.as_ptr() as usize;
            let ops = fake.ops()[before..].to_vec();
            assert_eq!(ops, expected_ops(&c, src, i > 0), "case {i}");
            // Independently of the schedule: the copies tile [0, model end)
            // in order, and no copy starts while a group whose bytes have
            // all arrived is still unsignalled; every group once.
            let total = *c.layer_ends.last().unwrap();
            let (mut copied, mut signalled) = (0u64, Vec::new());
            for op in &ops {
                match *op {
                    Op::Copy { dst, src: s, bytes } => {
                        assert_eq!((dst - DST, (s - src) as u64), (copied, copied), "case {i}: copies out of order");
                        let late: Vec<usize> = (0..c.group_ends.len())
                            .filter(|g| c.group_ends[*g] <= copied && !signalled.contains(g))
                            .collect();
                        assert!(late.is_empty() || copied == 0, "case {i}: groups {late:?} signalled late");
                        copied += bytes as u64;
                    }
                    Op::Group(g) => {
                        assert!(c.group_ends[g] <= copied, "case {i}: group {g} signalled before its bytes");
                        signalled.push(g);
                    }
                    _ => {}
                }
            }
            assert_eq!(copied, total);
            assert_eq!(signalled, (0..c.starts.len()).collect::<Vec<_>>());
            // Waits: one engine call per wait, range checked first.
            let cur = p.current().unwrap();
            assert_eq!(cur.copies, c.copies.iter().filter(|x| x.end > x.start).count());
            for l in 0..c.layer_ends.len() {
                let g = cur.layer_group[l];
                assert!(c.starts[g] <= l && c.starts.get(g + 1).is_none_or(|&e| l < e));
            }
            let n = fake.n_ops();
            let last = c.starts.len() - 1;
            p.wait_group(last, std::ptr::null_mut()).unwrap();
            assert!(matches!(p.wait_group(last + 1, std::ptr::null_mut()), Err(Error::InvalidArgument(_))));
            assert_eq!(fake.ops()[n..], [Op::Wait(last)]);
        }
    }

    #[test]
    fn a_failure_at_every_step_resets_the_switch() {
        let mut r = Xs(0xfa11_0000_0000_0077);
        for round in 0..40 {
            let (a, b, c) = (case(&mut r), case(&mut r), case(&mut r));
            let n_b = expected_ops(&b, 0, true).len();
            for k in 0..n_b {
                let fake = Fake::default();
                let mut p = Pipe::new(fake.clone());
                let (ta, tb, tc): (Token, Token, Token) = (Arc::new("a"), Arc::new("b"), Arc::new("c"));
                start(&mut p, &a, &[&ta]).unwrap();
                let before = fake.n_ops();
                fake.fail_at(before + k);
                let e = start(&mut p, &b, &[&tb]).unwrap_err();
                assert!(e.to_string().contains("injected failure"), "{e}");
                // Nothing was enqueued after the failing operation but a drain
                // (the partial copies finish while b is held), then all is released.
                let ops = fake.ops();
                assert_eq!(ops[before..before + k + 1], expected_ops(&b, b.host.as_ptr() as usize, true)[..k + 1], "round {round} step {k}");
                assert_eq!(ops[before + k + 1..], [Op::Drain], "round {round} step {k}");
                assert_eq!((Arc::strong_count(&ta), Arc::strong_count(&tb)), (1, 1), "round {round} step {k}: held after the drain");
                // The switch is reset: no group of a nor b can be waited on.
                for g in [0, 1] {
                    let w = p.wait_group(g, std::ptr::null_mut()).unwrap_err();
                    assert!(matches!(&w, Error::InvalidState(m) if m.contains("last switch failed")), "{w}");
                    assert!(matches!(p.group_ready(g), Err(Error::InvalidState(_))));
                    assert!(p.synchronize().is_err());
                }
                assert!(p.current.is_none());
                // The next switch works and issues exactly its own operations.
                let before = fake.n_ops();
                start(&mut p, &c, &[&tc]).unwrap();
                assert_eq!(fake.ops()[before..], expected_ops(&c, c.host.as_ptr() as usize, false));
                p.wait_group(c.starts.len() - 1, std::ptr::null_mut()).unwrap();
                assert_eq!(Arc::strong_count(&tc), 2);
                drop(p);
                assert_eq!(*fake.ops().last().unwrap(), Op::Drain, "dropping an engine with copies in flight waits for them");
                assert_eq!(Arc::strong_count(&tc), 1);
            }
        }
    }

    #[test]
    fn a_failed_drain_keeps_everything_until_a_drain_succeeds() {
        let mut r = Xs(0xd4a1_0000_0000_0003);
        let (a, b, c) = (case(&mut r), case(&mut r), case(&mut r));
        for c_drain_fails in [false, true] {
            let fake = Fake::default();
            let mut p = Pipe::new(fake.clone());
            let (ta, tb, tc): (Token, Token, Token) = (Arc::new("a"), Arc::new("b"), Arc::new("c"));
            start(&mut p, &a, &[&ta]).unwrap();
            let before = fake.n_ops();
            // b fails at its start event, and the drain after it fails too.
            fake.fail_at(before + 2);
            fake.fail_at(before + 3);
            assert!(start(&mut p, &b, &[&tb]).is_err());
            assert_eq!(fake.ops()[before + 2..], [Op::Start, Op::Drain]);
            assert_eq!((Arc::strong_count(&ta), Arc::strong_count(&tb)), (2, 2), "released while copies may still run");
            assert!(p.wait_group(0, std::ptr::null_mut()).is_err());
            // The end event does not cover b's partial copies, so even a
            // "done" end event releases nothing: c's start drains first.
            fake.set_done(true);
            let before = fake.n_ops();
            if c_drain_fails {
                fake.fail_at(before + 1);
                assert!(start(&mut p, &c, &[&tc]).is_err());
                // The reset's own drain succeeds: everything goes.
                assert_eq!(fake.ops()[before..], [Op::Reserve(c.starts.len()), Op::Drain, Op::Drain]);
                assert!(p.wait_group(0, std::ptr::null_mut()).is_err());
            } else {
                start(&mut p, &c, &[&tc]).unwrap();
                let mut want = expected_ops(&c, c.host.as_ptr() as usize, false);
                want.insert(1, Op::Drain);
                assert_eq!(fake.ops()[before..], want);
                assert_eq!(Arc::strong_count(&tc), 2);
            }
            assert_eq!((Arc::strong_count(&ta), Arc::strong_count(&tb)), (1, 1));
            // From now on, the end event is trusted again.
            let before = fake.n_ops();
            start(&mut p, &a, &[&ta]).unwrap();
            assert_eq!(fake.ops()[before..], expected_ops(&a, a.host.as_ptr() as usize, !c_drain_fails));
        }
    }

    #[test]
    fn an_earlier_switch_is_held_until_its_copies_are_done_and_never_waited_on() {
        let mut r = Xs(0x0dd5_0000_0000_0042);
        let (a, b, c) = (case(&mut r), case(&mut r), case(&mut r));
        let fake = Fake::default();
        let mut p = Pipe::new(fake.clone());
        let store1: Token = Arc::new("store 1");
        let store2: Token = Arc::new("store 2");
        let arena: Token = Arc::new("arena");
        start(&mut p, &a, &[&store1, &arena]).unwrap();
        // b reads another store: a's copies may still be running, so store 1
        // stays held, and b's start does not block the host for them.
        fake.set_done(false);
        let before = fake.n_ops();
        start(&mut p, &b, &[&store2, &arena]).unwrap();
        assert!(!fake.ops()[before..].iter().any(|o| matches!(o, Op::Drain | Op::WaitEnd)));
        assert_eq!((Arc::strong_count(&store1), Arc::strong_count(&arena)), (2, 3));
        // Synchronising on b waits for its end event (after a's copies too);
        // the next start sees everything done and lets a's store go.
        p.synchronize().unwrap();
        assert_eq!(fake.ops().last(), Some(&Op::WaitEnd));
        start(&mut p, &c, &[&store2, &arena]).unwrap();
        assert_eq!((Arc::strong_count(&store1), Arc::strong_count(&store2), Arc::strong_count(&arena)), (1, 2, 2));
        // quiesce waits for everything and holds nothing.
        p.quiesce().unwrap();
        assert_eq!(fake.ops().last(), Some(&Op::Drain));
        assert_eq!((Arc::strong_count(&store2), Arc::strong_count(&arena)), (1, 1));
        assert!(p.is_idle());
        let n = fake.n_ops();
        drop(p);
        assert_eq!(fake.n_ops(), n, "an idle engine's drop does not wait");
    }

    #[test]
    fn nothing_is_waited_on_before_a_switch_starts() {
        let fake = Fake::default();
        let p = Pipe::new(fake.clone());
        assert!(matches!(p.wait_group(0, std::ptr::null_mut()), Err(Error::InvalidState(m)) if m.contains("no switch")));
        assert!(p.synchronize().is_err());
        drop(p);
        assert!(fake.ops().is_empty());
    }
}
