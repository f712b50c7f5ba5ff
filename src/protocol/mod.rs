//! The daemon protocol: how clients and workers talk to `pipeswitch serve`
//! over its Unix socket.
//!
//! A frame is a 16-byte header then a body:
//!
//! ```text
//! magic "PSWP" | version u16 | kind u16 | body length u32 | fds u32 | body
//! ```
//!
//! Everything is little-endian. The version is [`VERSION`]; a peer of another
//! version is refused with a message that names both. Bodies are at most
//! [`MAX_BODY`] bytes: tensors larger than [`INLINE_LIMIT`] do not travel in
//! the socket but in one shared-memory file (a memfd) passed with the frame
//! (`SCM_RIGHTS`, `fds` = 1), the tensors naming their byte ranges in it.
//! Decoding checks every length against the bytes present and a limit
//! before it allocates (see [`codec`]); the decoder is fuzzed.
//!
//! Kinds 1..=12 are the inference protocol. Training (kinds 13..=19) came
//! later as new kinds only: the encodings of 1..=12 did not change, so the
//! version stays 1 and a peer that predates training refuses a training
//! frame as an unknown kind, with that message.
//!
//! Input areas (kinds 20..=23 and the tensor placement 2) came the same
//! way. A client may give the daemon one shared-memory file of its own, its
//! input area ([`Message::InputArea`], the file sealed against shrinking):
//! the daemon passes it to every worker ([`Message::AreaAdd`]: to those
//! connected when it accepts the area, and to each new worker right after
//! its welcome), and each worker maps it once and page-locks it. The
//! client's requests then name byte ranges of it
//! ([`TensorData::Area`]): no new file per request, and a worker copies
//! the inputs to the GPU straight from the area, without a host copy, so
//! that its activation does not grow with the inputs' size. The area is
//! the client's until it leaves or gives another (the daemon sends
//! [`Message::AreaDrop`] after any task that names it): it must not write
//! into bytes a request in flight names (the client libraries send one
//! request at a time). The daemon bounds an area's bytes and the bytes of
//! all areas; a client refused an area sends its tensors as before.

pub mod area;
pub mod codec;
pub mod io;

use codec::{malformed, Reader, Writer, MAX_LIST};

use crate::error::{Error, Result};

pub const MAGIC: [u8; 4] = *b"PSWP";
/// Protocol version: bumped by any change to a message's encoding.
pub const VERSION: u16 = 1;
pub const HEADER_BYTES: usize = 16;
/// Largest body of a frame.
pub const MAX_BODY: usize = 1 << 20;
/// Tensors up to this many bytes travel inside the frame; larger ones in a
/// shared-memory file passed with it.
pub const INLINE_LIMIT: usize = 64 << 10;
/// Most dimensions of a tensor in a message.
pub const MAX_DIMS: usize = 8;
/// The largest byte count a tensor in shared memory may claim.
pub const MAX_SHARED_TENSOR: u64 = 1 << 40;

/// Who is connecting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Client = 1,
    Worker = 2,
}

/// Where a tensor's bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TensorData {
    Inline(Vec<u8>),
    /// Bytes `[offset, offset + bytes)` of the file passed with the frame.
    Shared { offset: u64, bytes: u64 },
    /// Bytes `[offset, offset + bytes)` of input area `area` (see the
    /// module's text): the client's own area in an `Infer`, the same in
    /// the `Activate` the daemon forwards.
    Area { area: u64, offset: u64, bytes: u64 },
}

/// A named tensor of a request or a result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tensor {
    pub name: String,
    /// One of the store's dtype codes (`PS_DTYPE_*`).
    pub dtype: u32,
    pub shape: Vec<u64>,
    pub data: TensorData,
}

/// What a task is: inference now; training (preempted by inference) later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskKind {
    Inference = 1,
    Training = 2,
}

/// A task the daemon hands to a standby worker.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    pub task_id: u64,
    pub kind: TaskKind,
    pub model: String,
    /// The stored model's id: the worker refuses a model that changed.
    pub model_id: u64,
    /// Arena offset of the model's region.
    pub region_offset: u64,
    /// True if the model's bytes are in the region already: no copy.
    pub resident: bool,
    /// First layer of each group of the pipelined copy.
    pub plan: Vec<u32>,
    pub inputs: Vec<Tensor>,
    /// When the daemon decided (CLOCK_MONOTONIC, ns): the worker measures
    /// its activation from here to its first kernel.
    pub decided_ns: u64,
}

/// Where a request's time went, in ms (0 where not measured).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Timing {
    /// Waiting in the daemon's queue.
    pub queued_ms: f64,
    /// From the daemon's decision to the worker's first kernel.
    pub activation_ms: f64,
    /// The worker's time from activation to its result.
    pub worker_ms: f64,
    /// From the request's arrival to its result leaving the daemon.
    pub total_ms: f64,
}

/// Counters of a daemon.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Stats {
    pub requests: u64,
    pub failed: u64,
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
    pub bytes_copied: u64,
    pub workers: u32,
    pub standbys: u32,
    pub workers_started: u64,
    pub workers_lost: u64,
}

/// How a training job is stopped when inference needs the GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreemptMode {
    /// At once: the step in flight is abandoned (at most one iteration is
    /// lost; it is redone on resume with the same data).
    Abandon = 1,
    /// At the next iteration boundary: the step in flight completes.
    Boundary = 2,
}

/// Where a preempted job's state waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveMode {
    /// Stays in the training worker's GPU memory.
    Resident = 1,
    /// Written back to pinned host memory (chunked copies) and freed on the
    /// GPU; copied back on resume.
    Host = 2,
    /// The daemon decides at each preemption (a job's option only; a
    /// `Preempt` carries the decision): resident while the residency area
    /// has room for the state beside the models in use, else written back.
    /// The daemon accounts the resident state in its residency policy from
    /// the `state_bytes` the worker reports.
    Auto = 3,
}

/// How the GPU is shared between a training job and inference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharePolicy {
    /// Inference preempts training at once; training resumes after the
    /// queue has been idle for the job's idle time (the paper's).
    InferenceFirst = 1,
    /// Under inference load, training gets `share` of every `period_ms`.
    TimeShare = 2,
}

/// A training job as a client submits it.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainJob {
    pub name: String,
    /// The job's factory, `module:function` (Python workers).
    pub entry: String,
    pub preempt: PreemptMode,
    pub save: SaveMode,
    pub policy: SharePolicy,
    /// Training's share of the GPU's time under `TimeShare`, in (0, 1).
    pub share: f64,
    /// The time-share cycle.
    pub period_ms: u32,
    /// Inference idle this long before training resumes.
    pub idle_ms: u32,
    /// Iterations to run; 0: until cancelled.
    pub iterations: u64,
    /// A checkpoint (the state in a shared-memory file that outlives the
    /// worker) every this many iterations; 0: none.
    pub checkpoint_every: u32,
}

impl TrainJob {
    /// A job with the default options (those of the Python client):
    /// abandon the step in flight, `SaveMode::Auto`, inference first, idle
    /// 100 ms, until cancelled, no checkpoints.
    pub fn new(name: impl Into<String>, entry: impl Into<String>) -> TrainJob {
        TrainJob {
            name: name.into(),
            entry: entry.into(),
            preempt: PreemptMode::Abandon,
            save: SaveMode::Auto,
            policy: SharePolicy::InferenceFirst,
            share: 0.5,
            period_ms: 5000,
            idle_ms: 100,
            iterations: 0,
            checkpoint_every: 0,
        }
    }

    /// Checks the options a client sent.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::invalid(format!("training job {:?}: {m}", self.name)));
        if self.name.is_empty() {
            return bad("no name".into());
        }
        let (module, function) = self.entry.split_once(':').unwrap_or(("", ""));
        if module.is_empty() || function.is_empty() {
            return bad(format!("entry {:?} is not module:function", self.entry));
        }
        if self.policy == SharePolicy::TimeShare {
            if !(self.share > 0.0 && self.share < 1.0) {
                return bad(format!("a time share of {} is not in (0, 1)", self.share));
            }
            if self.period_ms == 0 {
                return bad("a time share needs a period".into());
            }
        }
        Ok(())
    }
}

/// Where a training job stands (in `TrainStatus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    /// Accepted, waiting for a worker or for the GPU.
    Waiting = 1,
    Running = 2,
    /// Asked to stop, not yet stopped.
    Preempting = 3,
    /// Stopped for inference; resumes later.
    Paused = 4,
    Finished = 5,
    Failed = 6,
    Cancelled = 7,
}

/// A training task: the daemon starts (or resumes) a job on a worker.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainTask {
    pub task_id: u64,
    pub job_id: u64,
    pub job: TrainJob,
    /// The job's checkpoint file (shared memory).
    pub checkpoint_path: String,
    /// 0: a fresh start; else the iteration to continue after (from the
    /// worker's own saved state, or from the checkpoint file).
    pub resume_iteration: u64,
    pub decided_ns: u64,
}

/// What a training progress report says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// An iteration completed.
    Iteration = 1,
    /// A checkpoint of `checkpoint` was saved to the file.
    Checkpoint = 2,
    /// The job runs again (its state restored).
    Resumed = 3,
}

/// Why a training task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Preempted = 1,
    Finished = 2,
    Failed = 3,
}

/// Every message of the protocol.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// First message of every connection.
    Hello { role: Role, pid: u32, worker_kind: String },
    /// The daemon's answer to a worker's or client's hello.
    Welcome {
        daemon_pid: u32,
        device: i32,
        store: String,
        worker_id: u32,
        /// Workers: the arena's IPC handle (128 bytes); clients: empty.
        arena_handle: Vec<u8>,
        /// Workers: their activation region in the arena.
        activation_offset: u64,
        activation_bytes: u64,
    },
    /// A refusal or a failure that ends a connection or a request.
    Error { request_id: u64, status: u32, message: String },
    /// A client's inference request.
    Infer { request_id: u64, model: String, inputs: Vec<Tensor> },
    /// The result of a request.
    InferResult { request_id: u64, outputs: Vec<Tensor>, timing: Timing },
    /// A worker is ready (after setup, or after cleaning up its last task).
    Standby { worker_id: u32 },
    /// The daemon activates a standby worker.
    Activate(Task),
    /// A worker finished a task (status 0) or failed it.
    TaskDone { task_id: u64, status: u32, message: String, outputs: Vec<Tensor>, timing: Timing },
    /// Asks for counters; answered with `StatsReply`.
    StatsRequest,
    StatsReply(Stats),
    /// Ends a worker (daemon to worker) or asks a daemon to stop.
    Shutdown,
    /// The daemon takes the active worker off its model: it cleans up and
    /// answers `Standby`. A training worker drops its job's state.
    Deactivate,
    /// A client submits a training job; answered with `TrainStatus`.
    TrainSubmit { request_id: u64, job: TrainJob },
    /// A job's state (the answer to `TrainSubmit` and `TrainQuery`).
    TrainStatus {
        request_id: u64,
        job_id: u64,
        state: JobState,
        /// Iterations completed.
        iteration: u64,
        /// The iteration of the last checkpoint; 0: none.
        checkpoint: u64,
        preemptions: u64,
        /// Failed jobs: the status and message.
        status: u32,
        message: String,
    },
    /// Asks for a job's state, or cancels it.
    TrainQuery { request_id: u64, job_id: u64, cancel: bool },
    /// The daemon starts or resumes a training job on a worker.
    TrainStart(TrainTask),
    /// The daemon stops the training task: the worker saves the state as
    /// `save` says and answers `TrainStopped`.
    Preempt { task_id: u64, mode: PreemptMode, save: SaveMode, decided_ns: u64 },
    /// A training worker's progress. `state_bytes`: the bytes of the job's
    /// state on the GPU (parameters, gradients, optimiser state, buffers),
    /// 0 where not measured (the daemon keeps the last it was told).
    TrainProgress { task_id: u64, event: Progress, iteration: u64, checkpoint: u64, state_bytes: u64 },
    /// A training task ended: preempted (state saved), finished or failed.
    TrainStopped {
        task_id: u64,
        reason: StopReason,
        /// Iterations completed (the state saved is of this one).
        iteration: u64,
        checkpoint: u64,
        status: u32,
        message: String,
        /// Preempt to the step's end (abandoned or completed).
        stop_ms: f64,
        /// Writing the state back.
        save_ms: f64,
    },
    /// A client gives the daemon its input area: the file passed with the
    /// frame, sealed against shrinking, of at least `bytes` bytes. It
    /// replaces the client's earlier area. Answered with `InputAreaReady`
    /// or an `Error` of `request_id`.
    InputArea { request_id: u64, bytes: u64 },
    /// The area is accepted: requests name it as `area`.
    InputAreaReady { request_id: u64, area: u64, bytes: u64 },
    /// The daemon gives a worker a client's input area (the file passed
    /// with the frame): map it and keep it until `AreaDrop`.
    AreaAdd { area: u64, bytes: u64 },
    /// The area's client left or replaced it: no later task names it.
    AreaDrop { area: u64 },
}

impl Message {
    /// The frame kind.
    pub fn kind(&self) -> u16 {
        match self {
            Message::Hello { .. } => 1,
            Message::Welcome { .. } => 2,
            Message::Error { .. } => 3,
            Message::Infer { .. } => 4,
            Message::InferResult { .. } => 5,
            Message::Standby { .. } => 6,
            Message::Activate(_) => 7,
            Message::TaskDone { .. } => 8,
            Message::StatsRequest => 9,
            Message::StatsReply(_) => 10,
            Message::Shutdown => 11,
            Message::Deactivate => 12,
            Message::TrainSubmit { .. } => 13,
            Message::TrainStatus { .. } => 14,
            Message::TrainQuery { .. } => 15,
            Message::TrainStart(_) => 16,
            Message::Preempt { .. } => 17,
            Message::TrainProgress { .. } => 18,
            Message::TrainStopped { .. } => 19,
            Message::InputArea { .. } => 20,
            Message::InputAreaReady { .. } => 21,
            Message::AreaAdd { .. } => 22,
            Message::AreaDrop { .. } => 23,
        }
    }

    /// The body.
    pub fn encode_body(&self) -> Vec<u8> {
        let mut w = Writer::default();
        match self {
            Message::Hello { role, pid, worker_kind } => {
                w.u8(*role as u8).u32(*pid).str(worker_kind);
            }
            Message::Welcome { daemon_pid, device, store, worker_id, arena_handle, activation_offset, activation_bytes } => {
                w.u32(*daemon_pid).i32(*device).str(store).u32(*worker_id).bytes(arena_handle);
                w.u64(*activation_offset).u64(*activation_bytes);
            }
            Message::Error { request_id, status, message } => {
                w.u64(*request_id).u32(*status).str(message);
            }
            Message::Infer { request_id, model, inputs } => {
                w.u64(*request_id).str(model);
                put_tensors(&mut w, inputs);
            }
            Message::InferResult { request_id, outputs, timing } => {
                w.u64(*request_id);
                put_tensors(&mut w, outputs);
                put_timing(&mut w, timing);
            }
            Message::Standby { worker_id } => {
                w.u32(*worker_id);
            }
            Message::Activate(t) => {
                w.u64(t.task_id).u8(t.kind as u8).str(&t.model).u64(t.model_id).u64(t.region_offset).bool(t.resident);
                w.len(t.plan.len());
                for &s in &t.plan {
                    w.u32(s);
                }
                put_tensors(&mut w, &t.inputs);
                w.u64(t.decided_ns);
            }
            Message::TaskDone { task_id, status, message, outputs, timing } => {
                w.u64(*task_id).u32(*status).str(message);
                put_tensors(&mut w, outputs);
                put_timing(&mut w, timing);
            }
            Message::StatsRequest | Message::Shutdown | Message::Deactivate => {}
            Message::StatsReply(s) => {
                w.u64(s.requests).u64(s.failed).u64(s.hits).u64(s.misses).u64(s.evictions).u64(s.bytes_copied);
                w.u32(s.workers).u32(s.standbys).u64(s.workers_started).u64(s.workers_lost);
            }
            Message::TrainSubmit { request_id, job } => {
                w.u64(*request_id);
                put_job(&mut w, job);
            }
            Message::TrainStatus { request_id, job_id, state, iteration, checkpoint, preemptions, status, message } => {
                w.u64(*request_id).u64(*job_id).u8(*state as u8).u64(*iteration).u64(*checkpoint).u64(*preemptions);
                w.u32(*status).str(message);
            }
            Message::TrainQuery { request_id, job_id, cancel } => {
                w.u64(*request_id).u64(*job_id).bool(*cancel);
            }
            Message::TrainStart(t) => {
                w.u64(t.task_id).u64(t.job_id);
                put_job(&mut w, &t.job);
                w.str(&t.checkpoint_path).u64(t.resume_iteration).u64(t.decided_ns);
            }
            Message::Preempt { task_id, mode, save, decided_ns } => {
                w.u64(*task_id).u8(*mode as u8).u8(*save as u8).u64(*decided_ns);
            }
            Message::TrainProgress { task_id, event, iteration, checkpoint, state_bytes } => {
                w.u64(*task_id).u8(*event as u8).u64(*iteration).u64(*checkpoint).u64(*state_bytes);
            }
            Message::TrainStopped { task_id, reason, iteration, checkpoint, status, message, stop_ms, save_ms } => {
                w.u64(*task_id).u8(*reason as u8).u64(*iteration).u64(*checkpoint).u32(*status).str(message);
                w.f64(*stop_ms).f64(*save_ms);
            }
            Message::InputArea { request_id, bytes } => {
                w.u64(*request_id).u64(*bytes);
            }
            Message::InputAreaReady { request_id, area, bytes } => {
                w.u64(*request_id).u64(*area).u64(*bytes);
            }
            Message::AreaAdd { area, bytes } => {
                w.u64(*area).u64(*bytes);
            }
            Message::AreaDrop { area } => {
                w.u64(*area);
            }
        }
        w.buf
    }

    /// Decodes a body of frame `kind`; every byte must be used.
    pub fn decode_body(kind: u16, body: &[u8]) -> Result<Message> {
        if body.len() > MAX_BODY {
            return Err(malformed(format!("a body of {} bytes exceeds {MAX_BODY}", body.len())));
        }
        let mut r = Reader::new(body);
        let m = match kind {
            1 => {
                let role = match r.u8("role")? {
                    1 => Role::Client,
                    2 => Role::Worker,
                    v => return Err(malformed(format!("unknown role {v}"))),
                };
                Message::Hello { role, pid: r.u32("pid")?, worker_kind: r.str("worker kind")? }
            }
            2 => Message::Welcome {
                daemon_pid: r.u32("daemon pid")?,
                device: r.i32("device")?,
                store: r.str("store")?,
                worker_id: r.u32("worker id")?,
                arena_handle: {
                    let h = r.bytes(128, "arena handle")?;
                    if !h.is_empty() && h.len() != 128 {
                        return Err(malformed(format!("an arena handle of {} bytes (128 expected)", h.len())));
                    }
                    h.to_vec()
                },
                activation_offset: r.u64("activation offset")?,
                activation_bytes: r.u64("activation bytes")?,
            },
            3 => Message::Error { request_id: r.u64("request id")?, status: r.u32("status")?, message: r.str("message")? },
            4 => Message::Infer { request_id: r.u64("request id")?, model: r.str("model")?, inputs: get_tensors(&mut r)? },
            5 => Message::InferResult {
                request_id: r.u64("request id")?,
                outputs: get_tensors(&mut r)?,
                timing: get_timing(&mut r)?,
            },
            6 => Message::Standby { worker_id: r.u32("worker id")? },
            7 => {
                let task_id = r.u64("task id")?;
                let kind = match r.u8("task kind")? {
                    1 => TaskKind::Inference,
                    2 => TaskKind::Training,
                    v => return Err(malformed(format!("unknown task kind {v}"))),
                };
                let model = r.str("model")?;
                let model_id = r.u64("model id")?;
                let region_offset = r.u64("region offset")?;
                let resident = r.bool("resident")?;
                let n = r.len(4, "plan")?;
                let mut plan = Vec::with_capacity(n);
                for _ in 0..n {
                    plan.push(r.u32("plan")?);
                }
                let inputs = get_tensors(&mut r)?;
                let decided_ns = r.u64("decision time")?;
                Message::Activate(Task { task_id, kind, model, model_id, region_offset, resident, plan, inputs, decided_ns })
            }
            8 => Message::TaskDone {
                task_id: r.u64("task id")?,
                status: r.u32("status")?,
                message: r.str("message")?,
                outputs: get_tensors(&mut r)?,
                timing: get_timing(&mut r)?,
            },
            9 => Message::StatsRequest,
            10 => Message::StatsReply(Stats {
                requests: r.u64("requests")?,
                failed: r.u64("failed")?,
                hits: r.u64("hits")?,
                misses: r.u64("misses")?,
                evictions: r.u64("evictions")?,
                bytes_copied: r.u64("bytes copied")?,
                workers: r.u32("workers")?,
                standbys: r.u32("standbys")?,
                workers_started: r.u64("workers started")?,
                workers_lost: r.u64("workers lost")?,
            }),
            11 => Message::Shutdown,
            12 => Message::Deactivate,
            13 => Message::TrainSubmit { request_id: r.u64("request id")?, job: get_job(&mut r)? },
            14 => Message::TrainStatus {
                request_id: r.u64("request id")?,
                job_id: r.u64("job id")?,
                state: match r.u8("job state")? {
                    1 => JobState::Waiting,
                    2 => JobState::Running,
                    3 => JobState::Preempting,
                    4 => JobState::Paused,
                    5 => JobState::Finished,
                    6 => JobState::Failed,
                    7 => JobState::Cancelled,
                    v => return Err(malformed(format!("unknown job state {v}"))),
                },
                iteration: r.u64("iteration")?,
                checkpoint: r.u64("checkpoint")?,
                preemptions: r.u64("preemptions")?,
                status: r.u32("status")?,
                message: r.str("message")?,
            },
            15 => Message::TrainQuery { request_id: r.u64("request id")?, job_id: r.u64("job id")?, cancel: r.bool("cancel")? },
            16 => Message::TrainStart(TrainTask {
                task_id: r.u64("task id")?,
                job_id: r.u64("job id")?,
                job: get_job(&mut r)?,
                checkpoint_path: r.str("checkpoint path")?,
                resume_iteration: r.u64("resume iteration")?,
                decided_ns: r.u64("decision time")?,
            }),
            17 => Message::Preempt {
                task_id: r.u64("task id")?,
                mode: get_preempt(&mut r)?,
                save: get_save(&mut r)?,
                decided_ns: r.u64("decision time")?,
            },
            18 => Message::TrainProgress {
                task_id: r.u64("task id")?,
                event: match r.u8("progress event")? {
                    1 => Progress::Iteration,
                    2 => Progress::Checkpoint,
                    3 => Progress::Resumed,
                    v => return Err(malformed(format!("unknown progress event {v}"))),
                },
                iteration: r.u64("iteration")?,
                checkpoint: r.u64("checkpoint")?,
                state_bytes: r.u64("state bytes")?,
            },
            19 => Message::TrainStopped {
                task_id: r.u64("task id")?,
                reason: match r.u8("stop reason")? {
                    1 => StopReason::Preempted,
                    2 => StopReason::Finished,
                    3 => StopReason::Failed,
                    v => return Err(malformed(format!("unknown stop reason {v}"))),
                },
                iteration: r.u64("iteration")?,
                checkpoint: r.u64("checkpoint")?,
                status: r.u32("status")?,
                message: r.str("message")?,
                stop_ms: r.f64("stop ms")?,
                save_ms: r.f64("save ms")?,
            },
            20 => Message::InputArea { request_id: r.u64("request id")?, bytes: area_bytes(r.u64("area bytes")?)? },
            21 => Message::InputAreaReady {
                request_id: r.u64("request id")?,
                area: r.u64("area")?,
                bytes: area_bytes(r.u64("area bytes")?)?,
            },
            22 => Message::AreaAdd { area: r.u64("area")?, bytes: area_bytes(r.u64("area bytes")?)? },
            23 => Message::AreaDrop { area: r.u64("area")? },
            k => return Err(malformed(format!("unknown message kind {k}"))),
        };
        r.finish("message")?;
        Ok(m)
    }
}

fn put_tensors(w: &mut Writer, ts: &[Tensor]) {
    w.len(ts.len());
    for t in ts {
        w.str(&t.name).u32(t.dtype).len(t.shape.len());
        for &d in &t.shape {
            w.u64(d);
        }
        match &t.data {
            TensorData::Inline(b) => {
                w.u8(0).bytes(b);
            }
            TensorData::Shared { offset, bytes } => {
                w.u8(1).u64(*offset).u64(*bytes);
            }
            TensorData::Area { area, offset, bytes } => {
                w.u8(2).u64(*area).u64(*offset).u64(*bytes);
            }
        }
    }
}

/// An area's size as a message claims it: 1 byte to [`MAX_SHARED_TENSOR`].
fn area_bytes(bytes: u64) -> Result<u64> {
    if bytes == 0 || bytes > MAX_SHARED_TENSOR {
        return Err(malformed(format!("an input area of {bytes} bytes (1 to {MAX_SHARED_TENSOR})")));
    }
    Ok(bytes)
}

fn get_tensors(r: &mut Reader<'_>) -> Result<Vec<Tensor>> {
    // A tensor takes at least 4 (name) + 4 (dtype) + 4 (ndim) + 1 + 4 bytes.
    let n = r.len(17, "tensors")?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let name = r.str("tensor name")?;
        let dtype = r.u32("tensor dtype")?;
        let ndim = r.len(8, "tensor shape")?;
        if ndim > MAX_DIMS {
            return Err(malformed(format!("tensor {name:?} has {ndim} dimensions, at most {MAX_DIMS}")));
        }
        let mut shape = Vec::with_capacity(ndim);
        for _ in 0..ndim {
            shape.push(r.u64("tensor dimension")?);
        }
        let data = match r.u8("tensor placement")? {
            0 => TensorData::Inline(r.bytes(MAX_BODY, "tensor bytes")?.to_vec()),
            1 => {
                let offset = r.u64("tensor offset")?;
                let bytes = r.u64("tensor bytes")?;
                if bytes > MAX_SHARED_TENSOR || offset.checked_add(bytes).is_none() {
                    return Err(malformed(format!("tensor {name:?}: [{offset}, +{bytes}) is out of range")));
                }
                TensorData::Shared { offset, bytes }
            }
            2 => {
                let area = r.u64("tensor area")?;
                let offset = r.u64("tensor offset")?;
                let bytes = r.u64("tensor bytes")?;
                if bytes > MAX_SHARED_TENSOR || offset.checked_add(bytes).is_none() {
                    return Err(malformed(format!("tensor {name:?}: [{offset}, +{bytes}) of area {area} is out of range")));
                }
                TensorData::Area { area, offset, bytes }
            }
            v => return Err(malformed(format!("tensor {name:?}: unknown placement {v}"))),
        };
        out.push(Tensor { name, dtype, shape, data });
    }
    debug_assert!(out.len() <= MAX_LIST);
    Ok(out)
}

fn put_job(w: &mut Writer, j: &TrainJob) {
    w.str(&j.name).str(&j.entry).u8(j.preempt as u8).u8(j.save as u8).u8(j.policy as u8).f64(j.share);
    w.u32(j.period_ms).u32(j.idle_ms).u64(j.iterations).u32(j.checkpoint_every);
}

fn get_preempt(r: &mut Reader<'_>) -> Result<PreemptMode> {
    match r.u8("preempt mode")? {
        1 => Ok(PreemptMode::Abandon),
        2 => Ok(PreemptMode::Boundary),
        v => Err(malformed(format!("unknown preempt mode {v}"))),
    }
}

fn get_save(r: &mut Reader<'_>) -> Result<SaveMode> {
    match r.u8("save mode")? {
        1 => Ok(SaveMode::Resident),
        2 => Ok(SaveMode::Host),
        3 => Ok(SaveMode::Auto),
        v => Err(malformed(format!("unknown save mode {v}"))),
    }
}

fn get_job(r: &mut Reader<'_>) -> Result<TrainJob> {
    Ok(TrainJob {
        name: r.str("job name")?,
        entry: r.str("job entry")?,
        preempt: get_preempt(r)?,
        save: get_save(r)?,
        policy: match r.u8("share policy")? {
            1 => SharePolicy::InferenceFirst,
            2 => SharePolicy::TimeShare,
            v => return Err(malformed(format!("unknown share policy {v}"))),
        },
        share: r.f64("share")?,
        period_ms: r.u32("period ms")?,
        idle_ms: r.u32("idle ms")?,
        iterations: r.u64("iterations")?,
        checkpoint_every: r.u32("checkpoint every")?,
    })
}

fn put_timing(w: &mut Writer, t: &Timing) {
    w.f64(t.queued_ms).f64(t.activation_ms).f64(t.worker_ms).f64(t.total_ms);
}

fn get_timing(r: &mut Reader<'_>) -> Result<Timing> {
    Ok(Timing {
        queued_ms: r.f64("queued ms")?,
        activation_ms: r.f64("activation ms")?,
        worker_ms: r.f64("worker ms")?,
        total_ms: r.f64("total ms")?,
    })
}

/// A frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: u16,
    pub body_len: u32,
    pub fds: u32,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        b[..4].copy_from_slice(&MAGIC);
        b[4..6].copy_from_slice(&VERSION.to_le_bytes());
        b[6..8].copy_from_slice(&self.kind.to_le_bytes());
        b[8..12].copy_from_slice(&self.body_len.to_le_bytes());
        b[12..16].copy_from_slice(&self.fds.to_le_bytes());
        b
    }

    /// Checks magic, version, size limit and fd count.
    pub fn decode(b: &[u8; HEADER_BYTES]) -> Result<Header> {
        if b[..4] != MAGIC {
            return Err(Error::Protocol("not a pipeswitch frame (bad magic)".into()));
        }
        let version = u16::from_le_bytes([b[4], b[5]]);
        if version != VERSION {
            return Err(Error::Protocol(format!(
                "protocol version {version} is not supported (this side speaks version {VERSION})"
            )));
        }
        let h = Header {
            kind: u16::from_le_bytes([b[6], b[7]]),
            body_len: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            fds: u32::from_le_bytes([b[12], b[13], b[14], b[15]]),
        };
        if h.body_len as usize > MAX_BODY {
            return Err(Error::Protocol(format!("a frame of {} bytes exceeds the limit of {MAX_BODY}", h.body_len)));
        }
        if h.fds > 1 {
            return Err(Error::Protocol(format!("a frame claims {} files; at most 1", h.fds)));
        }
        Ok(h)
    }
}

/// Encodes a whole frame (header and body) for `msg`, with `fds` files
/// passed beside it.
pub fn encode_frame(msg: &Message, fds: u32) -> Result<Vec<u8>> {
    let body = msg.encode_body();
    if body.len() > MAX_BODY {
        return Err(Error::invalid(format!(
            "a message of {} bytes exceeds the protocol's {MAX_BODY}: tensors over {INLINE_LIMIT} bytes go in shared memory",
            body.len()
        )));
    }
    let mut out = Header { kind: msg.kind(), body_len: body.len() as u32, fds }.encode().to_vec();
    out.extend_from_slice(&body);
    Ok(out)
}

/// Decodes one whole frame from `bytes` (header, body, nothing after).
pub fn decode_frame(bytes: &[u8]) -> Result<(Header, Message)> {
    let Some(head) = bytes.get(..HEADER_BYTES) else {
        return Err(Error::Protocol(format!("a frame of {} bytes is shorter than its header", bytes.len())));
    };
    let h = Header::decode(head.try_into().expect("16 bytes"))?;
    let body = &bytes[HEADER_BYTES..];
    if body.len() != h.body_len as usize {
        return Err(Error::Protocol(format!("the header announces {} bytes, the frame has {}", h.body_len, body.len())));
    }
    Ok((h, Message::decode_body(h.kind, body)?))
}

/// CLOCK_MONOTONIC in ns: comparable between the daemon and its workers.
pub fn monotonic_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap_or_else(|_| nix::sys::time::TimeSpec::new(0, 0));
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

/// The directory of the daemons' sockets: `$PIPESWITCH_SOCKET_DIR`, else
/// `$XDG_RUNTIME_DIR/pipeswitch`, else `/tmp/pipeswitch-<uid>`. The daemon
/// creates it with mode 0700 and refuses one that others can enter.
pub fn default_socket_dir() -> std::path::PathBuf {
    if let Some(d) = std::env::var_os("PIPESWITCH_SOCKET_DIR") {
        return d.into();
    }
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return std::path::Path::new(&d).join("pipeswitch");
    }
    std::path::PathBuf::from(format!("/tmp/pipeswitch-{}", nix::unistd::geteuid()))
}

/// The socket of the daemon that serves GPU `device` in `dir`.
pub fn socket_path(dir: &std::path::Path, device: i32) -> std::path::PathBuf {
    dir.join(format!("gpu{device}.sock"))
}
