//! `pipeswitch worker`: the built-in worker process of `pipeswitch serve`.
//!
//! It connects to the daemon, opens and pins the store, imports the arena,
//! loads every kernel and creates its streams, then waits as a standby. When
//! activated it runs the task's model: a resident model at once, otherwise
//! the pipelined switch into the region the daemon chose, each group's
//! kernels waiting on the GPU for that group's copy. It answers with the
//! outputs and goes on serving the same model until the daemon deactivates
//! it, then answers standby again.
//!
//! Clients' input areas (`AreaAdd`) are mapped and page-locked when they
//! come, off the critical path; a task's inputs in an area are copied to
//! the GPU straight from it (one DMA each, no host copy), the others
//! through the worker's pinned staging.

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use pipeswitch::arena::{Arena, ArenaIpcHandle};
use pipeswitch::cuda::memory::HostRegistration;
use pipeswitch::error::{Error, Result};
use pipeswitch::ffi::status::status_of;
use pipeswitch::protocol::io::{pack_tensors, recv, send, TensorRef, TensorViews};
use pipeswitch::protocol::area::{AreaMap, Areas};
use pipeswitch::protocol::{monotonic_ns, Message, Role, Task, TensorData, Timing};
use pipeswitch::store::Store;
use pipeswitch::switch::Switch;
use pipeswitch::worker::{Program, RunOptions, Worker};

/// Pinned bytes a standby reserves for the inputs of its first request.
const INPUT_STAGING_BYTES: usize = 16 << 20;

struct Ready {
    store: Arc<Store>,
    arena: Arc<Arena>,
    worker: Worker,
    switch: Switch,
    programs: HashMap<u64, Program>,
    worker_id: u32,
    /// Clients' input areas, and the page-locking of those registered
    /// (dropped before their mappings).
    pinned: HashMap<u64, HostRegistration>,
    areas: Areas,
}

/// Runs a worker until the daemon shuts it down or goes away.
pub fn run(socket: &Path) -> Result<()> {
    let stream = UnixStream::connect(socket).map_err(|e| Error::io(format!("connecting to {}", socket.display()), e))?;
    send(&stream, &Message::Hello { role: Role::Worker, pid: std::process::id(), worker_kind: "builtin".into() }, None)?;
    let (worker_id, store_name, handle, region) = match recv(&stream)? {
        Some((Message::Welcome { worker_id, store, arena_handle, activation_offset, activation_bytes, .. }, _)) => {
            (worker_id, store, arena_handle, (activation_offset, activation_bytes))
        }
        Some((Message::Error { message, status, .. }, _)) => return Err(pipeswitch::client::error_of(status, message)),
        Some((m, _)) => return Err(Error::Protocol(format!("expected welcome, got kind {}", m.kind()))),
        None => return Err(Error::Disconnected("the daemon closed the connection".into())),
    };
    let t0 = Instant::now();
    let handle: &[u8; 128] = handle
        .as_slice()
        .try_into()
        .map_err(|_| Error::Protocol(format!("an arena handle of {} bytes (128 expected)", handle.len())))?;
    let handle = ArenaIpcHandle::decode(handle)?;
    let arena = Arc::new(Arena::import(&handle)?);
    let store = Arc::new(Store::open(&store_name)?);
    store.pin(arena.device())?;
    let mut worker = Worker::with_region(&arena, region.0, region.1)?;
    // Pinned staging for requests' inputs, ready before the first one
    // (a batch of 8 ImageNet images is 4.8 MB; larger inputs grow it).
    worker.reserve_input_staging(INPUT_STAGING_BYTES)?;
    let switch = Switch::new(arena.device().ordinal())?;
    let mut me = Ready { store, arena, worker, switch, programs: HashMap::new(), worker_id, pinned: HashMap::new(), areas: Areas::default() };
    tracing::info!("worker {worker_id}: ready in {:.0} ms", t0.elapsed().as_secs_f64() * 1e3);
    send(&stream, &Message::Standby { worker_id }, None)?;
    loop {
        match recv(&stream)? {
            Some((Message::Activate(task), file)) => {
                let task_id = task.task_id;
                let started = Instant::now();
                match me.run(task, file.as_ref()) {
                    Ok((outputs, file, activation_ms)) => {
                        let timing = Timing { activation_ms, worker_ms: started.elapsed().as_secs_f64() * 1e3, ..Timing::default() };
                        let done = Message::TaskDone { task_id, status: 0, message: String::new(), outputs, timing };
                        send(&stream, &done, file.as_ref().map(|f| f.as_fd()))?;
                    }
                    Err(e) => {
                        tracing::warn!("worker {}: task {task_id} failed: {e}", me.worker_id);
                        let done = Message::TaskDone {
                            task_id,
                            status: status_of(&e),
                            message: e.to_string(),
                            outputs: Vec::new(),
                            timing: Timing::default(),
                        };
                        send(&stream, &done, None)?;
                    }
                }
            }
            Some((Message::AreaAdd { area, bytes }, file)) => me.add_area(area, bytes, file)?,
            Some((Message::AreaDrop { area }, _)) => me.drop_area(area)?,
            Some((Message::Deactivate, _)) => {
                me.worker.synchronize()?;
                send(&stream, &Message::Standby { worker_id: me.worker_id }, None)?;
            }
            Some((Message::Shutdown, _)) | None => return Ok(()),
            Some((m, _)) => return Err(Error::Protocol(format!("a worker does not expect message kind {}", m.kind()))),
        }
    }
}

impl Ready {
    /// Maps a client's input area and page-locks it. A failure is logged:
    /// an area not mapped fails the tasks that name it; one not
    /// page-locked has its inputs staged as the others.
    fn add_area(&mut self, area: u64, bytes: u64, file: Option<std::os::fd::OwnedFd>) -> Result<()> {
        self.drop_area(area)?;
        let map = match file.ok_or_else(|| Error::Protocol("an input area came without its file".into())).and_then(|f| AreaMap::open(&f, bytes)) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!("worker {}: input area {area} not mapped: {e}", self.worker_id);
                return Ok(());
            }
        };
        let t0 = Instant::now();
        // SAFETY: the mapping is owned by self.areas and dropped only after
        // this registration (drop_area).
        match unsafe { HostRegistration::new_read_only(self.arena.device(), map.as_ptr(), map.bytes() as usize) } {
            Ok(r) => {
                tracing::debug!("worker {}: input area {area} of {bytes} bytes page-locked in {:.2} ms", self.worker_id, t0.elapsed().as_secs_f64() * 1e3);
                self.pinned.insert(area, r);
            }
            Err(e) => tracing::warn!("worker {}: input area {area} not page-locked (its inputs are staged): {e}", self.worker_id),
        }
        self.areas.insert(area, map);
        Ok(())
    }

    /// Ends the page-locking of an area, after the copies from it.
    fn drop_registration(&mut self, area: u64) -> Result<()> {
        if self.pinned.contains_key(&area) {
            self.worker.synchronize()?;
            self.pinned.remove(&area);
        }
        Ok(())
    }

    fn drop_area(&mut self, area: u64) -> Result<()> {
        self.drop_registration(area)?;
        self.areas.remove(area);
        Ok(())
    }

    /// Runs one task; returns its outputs, the file that carries the large
    /// ones, and the activation time (decision to first kernel, ms).
    fn run(
        &mut self,
        task: Task,
        file: Option<&std::os::fd::OwnedFd>,
    ) -> Result<(Vec<pipeswitch::protocol::Tensor>, Option<std::os::fd::OwnedFd>, f64)> {
        let model = self.store.model(&task.model)?;
        if model.id != task.model_id {
            return Err(Error::InvalidState(format!(
                "model {:?} changed in the store (id {} now, {} asked for)",
                task.model, model.id, task.model_id
            )));
        }
        if !self.programs.contains_key(&model.id) {
            let p = Program::from_store(&self.store, &task.model)?;
            self.programs.insert(model.id, p);
        }
        let program = &self.programs[&model.id];
        self.worker.prepare(program)?;
        let inputs = TensorViews::with_areas(task.inputs, file, Some(&self.areas))?;
        // The inputs first: the model's copies share the host-to-device
        // copy engine with them, and the first kernel needs both (inputs
        // staged after the switch waited behind the whole model).
        for (t, bytes) in inputs.iter() {
            match t.data {
                TensorData::Area { area, .. } if self.pinned.contains_key(&area) => {
                    // SAFETY: the area is page-locked (self.pinned) and stays
                    // mapped and registered until an AreaDrop, which this
                    // worker handles after the task (after reading the
                    // outputs, which waits for the run); the client does not
                    // write into it while its request is in flight.
                    unsafe { self.worker.set_input_pinned(program, &t.name, bytes)? }
                }
                _ => self.worker.set_input(program, &t.name, bytes)?,
            }
        }
        if task.resident {
            self.switch.start_resident(&self.store, &task.model, &self.arena, task.region_offset)?;
        } else {
            let plan: Vec<usize> = task.plan.iter().map(|&s| s as usize).collect();
            self.switch.start(&self.store, &task.model, &self.arena, task.region_offset, &plan)?;
        }
        let activation_ms = monotonic_ns().saturating_sub(task.decided_ns) as f64 / 1e6;
        self.worker.run(program, &self.switch, RunOptions::default())?;
        let mut outs = Vec::new();
        for name in &program.graph().outputs {
            let slot = program.slot(name)?;
            let mut buf = vec![0u8; slot.bytes as usize];
            let (dtype, shape) = (slot.dtype as u32, slot.shape.iter().map(|&d| d as u64).collect::<Vec<u64>>());
            self.worker.read(program, name, &mut buf)?;
            outs.push((name.clone(), dtype, shape, buf));
        }
        let refs: Vec<TensorRef<'_>> =
            outs.iter().map(|(n, d, s, b)| TensorRef { name: n, dtype: *d, shape: s, data: b }).collect();
        let (tensors, file) = pack_tensors(&refs)?;
        Ok((tensors, file, activation_ms))
    }
}
