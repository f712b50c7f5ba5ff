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
    /// answers `Standby`.
    Deactivate,
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
        }
    }
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
            v => return Err(malformed(format!("tensor {name:?}: unknown placement {v}"))),
        };
        out.push(Tensor { name, dtype, shape, data });
    }
    debug_assert!(out.len() <= MAX_LIST);
    Ok(out)
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
