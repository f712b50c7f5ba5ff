//! A client of `pipeswitch serve`: connects to the daemon of a GPU and sends
//! inference requests for stored models, as an application would.
//!
//! Large inputs go through the client's input area (see
//! [`crate::protocol`]): reserved with [`Client::reserve_inputs`], or
//! automatically by the first request that needs one (16 MiB, or the next
//! power of two of what it needs, up to [`AUTO_AREA_MAX`]). A daemon that
//! refuses an area of some size is not asked for one as large again; such
//! requests send their inputs in a file of their own.

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::protocol::area::{area_bytes_for, ClientArea};
use crate::protocol::io::{pack_tensors, recv, send, unpack_tensors, TensorRef};
use crate::protocol::{Message, Role, Stats, Tensor, Timing};

/// The smallest input area reserved automatically.
pub const AUTO_AREA_MIN: u64 = 16 << 20;
/// The largest input area reserved automatically.
pub const AUTO_AREA_MAX: u64 = 256 << 20;

/// The result of a request: its output tensors with their bytes, and where
/// the time went.
#[derive(Debug, Clone)]
pub struct InferOutput {
    pub outputs: Vec<(Tensor, Vec<u8>)>,
    pub timing: Timing,
}

/// A training job's status (see [`Client::train_query`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrainStatus {
    pub job_id: u64,
    pub state: crate::protocol::JobState,
    /// Iterations completed.
    pub iteration: u64,
    /// The iteration of the last checkpoint (0: none).
    pub checkpoint: u64,
    pub preemptions: u64,
    /// A failed job's status and message.
    pub status: u32,
    pub message: String,
}

/// A connection to a daemon. One request at a time.
#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
    next_id: u64,
    /// Set when a frame was cut short or malformed: the stream's position
    /// is lost, so the connection is not used again.
    broken: Option<String>,
    /// The input area the daemon accepted.
    area: Option<ClientArea>,
    /// Reserve an input area when a request needs one.
    pub auto_area: bool,
    /// The smallest area size the daemon refused.
    refused_area: Option<u64>,
    pub daemon_pid: u32,
    pub device: i32,
    pub store: String,
}

impl Client {
    /// Connects to the daemon listening on `socket` (see
    /// [`crate::protocol::socket_path`]). `timeout`: how long a request may
    /// wait for its answer (None: forever).
    pub fn connect(socket: &Path, timeout: Option<Duration>) -> Result<Client> {
        let stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => Error::Disconnected(format!(
                "no daemon listens on {} ({e}): start one with `pipeswitch serve`",
                socket.display()
            )),
            _ => Error::io(format!("connecting to {}", socket.display()), e),
        })?;
        stream.set_read_timeout(timeout).map_err(|e| Error::io("setting a read timeout", e))?;
        send(&stream, &Message::Hello { role: Role::Client, pid: std::process::id(), worker_kind: String::new() }, None)?;
        match recv(&stream)? {
            Some((Message::Welcome { daemon_pid, device, store, .. }, _)) => {
                Ok(Client { stream, next_id: 1, broken: None, area: None, auto_area: true, refused_area: None, daemon_pid, device, store })
            }
            Some((Message::Error { status, message, .. }, _)) => Err(error_of(status, message)),
            Some((m, _)) => Err(Error::Protocol(format!("the daemon answered hello with {m:?}"))),
            None => Err(Error::Disconnected("the daemon closed the connection".into())),
        }
    }

    /// Receives a frame; a failure in the middle of one breaks the connection.
    fn recv(&mut self) -> Result<Option<(Message, Option<std::os::fd::OwnedFd>)>> {
        if let Some(why) = &self.broken {
            return Err(Error::Disconnected(format!("the connection is closed after an earlier failure ({why})")));
        }
        recv(&self.stream).inspect_err(|e| {
            if matches!(e, Error::Protocol(_) | Error::Disconnected(_) | Error::Io { .. } | Error::Os { .. }) {
                self.broken = Some(e.to_string());
                let _ = self.stream.shutdown(std::net::Shutdown::Both);
            }
        })
    }

    /// Gives the daemon an input area of `bytes` bytes for the inputs of
    /// later requests (replacing the one before, if the daemon accepts
    /// it; kept otherwise). Returns its size.
    pub fn reserve_inputs(&mut self, bytes: u64) -> Result<u64> {
        let mut area = ClientArea::create(bytes)?;
        let request_id = self.next_id;
        self.next_id += 1;
        send(&self.stream, &Message::InputArea { request_id, bytes }, Some(area.fd()))?;
        loop {
            match self.recv()? {
                Some((Message::InputAreaReady { request_id: id, area: area_id, bytes: b }, _)) if id == request_id => {
                    if b != bytes || area_id == 0 {
                        return Err(Error::Protocol(format!("the daemon accepted an input area of {bytes} bytes as area {area_id} of {b}")));
                    }
                    area.id = area_id;
                    self.area = Some(area);
                    return Ok(bytes);
                }
                Some((Message::Error { request_id: id, status, message }, _)) if id == request_id || id == 0 => {
                    return Err(error_of(status, message));
                }
                Some((Message::InferResult { .. } | Message::Error { .. }, _)) => continue,
                Some((m, _)) => return Err(Error::Protocol(format!("unexpected message {m:?}"))),
                None => return Err(Error::Disconnected("the daemon closed the connection".into())),
            }
        }
    }

    /// The size of the input area the daemon accepted (0: none).
    pub fn input_area_bytes(&self) -> u64 {
        self.area.as_ref().map_or(0, |a| a.bytes())
    }

    /// The message tensors of `inputs`: in the input area where they fit
    /// (reserving one if allowed), else with a file of their own.
    fn pack(&mut self, inputs: &[TensorRef<'_>]) -> Result<(Vec<Tensor>, Option<std::os::fd::OwnedFd>)> {
        let need = area_bytes_for(inputs);
        if need > 0 && need > self.input_area_bytes() && self.auto_area {
            let size = need.next_power_of_two().max(AUTO_AREA_MIN);
            if size <= AUTO_AREA_MAX && self.refused_area.is_none_or(|r| size < r) {
                match self.reserve_inputs(size) {
                    Ok(_) => {}
                    Err(e @ (Error::Refused(_) | Error::InvalidArgument(_) | Error::Os { .. } | Error::Io { .. })) if self.broken.is_none() => {
                        tracing::debug!("no input area of {size} bytes: {e}");
                        self.refused_area = Some(self.refused_area.map_or(size, |r| r.min(size)));
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        if need > 0 {
            if let Some(tensors) = self.area.as_mut().and_then(|a| a.pack(inputs)) {
                return Ok((tensors, None));
            }
        }
        pack_tensors(inputs)
    }

    /// Runs `model` on `inputs` through the daemon and waits for the result.
    pub fn infer(&mut self, model: &str, inputs: &[TensorRef<'_>]) -> Result<InferOutput> {
        let (tensors, file) = self.pack(inputs)?;
        let request_id = self.next_id;
        self.next_id += 1;
        send(&self.stream, &Message::Infer { request_id, model: model.to_string(), inputs: tensors }, file.as_ref().map(|f| f.as_fd()))?;
        loop {
            match self.recv()? {
                Some((Message::InferResult { request_id: id, outputs, timing }, file)) if id == request_id => {
                    return Ok(InferOutput { outputs: unpack_tensors(outputs, file.as_ref())?, timing });
                }
                Some((Message::Error { request_id: id, status, message }, _)) if id == request_id || id == 0 => {
                    return Err(error_of(status, message));
                }
                // An answer to an earlier request that timed out here.
                Some((Message::InferResult { .. } | Message::Error { .. }, _)) => continue,
                Some((m, _)) => return Err(Error::Protocol(format!("unexpected message {m:?}"))),
                None => return Err(Error::Disconnected("the daemon closed the connection".into())),
            }
        }
    }

    /// Submits a training job; the answer is its first status (its id).
    pub fn train_submit(&mut self, job: &crate::protocol::TrainJob) -> Result<TrainStatus> {
        let request_id = self.next_id;
        self.next_id += 1;
        send(&self.stream, &Message::TrainSubmit { request_id, job: job.clone() }, None)?;
        self.train_answer(request_id)
    }

    /// A training job's status; `cancel` ends the job first.
    pub fn train_query(&mut self, job_id: u64, cancel: bool) -> Result<TrainStatus> {
        let request_id = self.next_id;
        self.next_id += 1;
        send(&self.stream, &Message::TrainQuery { request_id, job_id, cancel }, None)?;
        self.train_answer(request_id)
    }

    fn train_answer(&mut self, request_id: u64) -> Result<TrainStatus> {
        loop {
            match self.recv()? {
                Some((Message::TrainStatus { request_id: id, job_id, state, iteration, checkpoint, preemptions, status, message }, _))
                    if id == request_id =>
                {
                    return Ok(TrainStatus { job_id, state, iteration, checkpoint, preemptions, status, message });
                }
                Some((Message::Error { request_id: id, status, message }, _)) if id == request_id || id == 0 => {
                    return Err(error_of(status, message));
                }
                Some((Message::InferResult { .. } | Message::Error { .. } | Message::TrainStatus { .. }, _)) => continue,
                Some((m, _)) => return Err(Error::Protocol(format!("unexpected message {m:?}"))),
                None => return Err(Error::Disconnected("the daemon closed the connection".into())),
            }
        }
    }

    /// The daemon's counters.
    pub fn stats(&mut self) -> Result<Stats> {
        send(&self.stream, &Message::StatsRequest, None)?;
        loop {
            match self.recv()? {
                Some((Message::StatsReply(s), _)) => return Ok(s),
                Some((Message::InferResult { .. } | Message::Error { request_id: 1.., .. }, _)) => continue,
                Some((Message::Error { status, message, .. }, _)) => return Err(error_of(status, message)),
                Some((m, _)) => return Err(Error::Protocol(format!("unexpected message {m:?}"))),
                None => return Err(Error::Disconnected("the daemon closed the connection".into())),
            }
        }
    }
}

/// The error a daemon's status and message stand for.
pub fn error_of(status: u32, message: String) -> Error {
    use crate::ffi::status::*;
    match status {
        PS_ERR_NOT_FOUND => Error::NotFound(message),
        PS_ERR_INVALID_ARGUMENT | PS_ERR_NULL_ARGUMENT => Error::InvalidArgument(message),
        PS_ERR_ARENA_FULL => Error::ArenaFull(message),
        PS_ERR_INVALID_STATE => Error::InvalidState(message),
        PS_ERR_DISCONNECTED => Error::Disconnected(message),
        PS_ERR_REFUSED => Error::Refused(message),
        PS_ERR_PROTOCOL => Error::Protocol(message),
        PS_OK => Error::Protocol(format!("an error with status 0: {message}")),
        _ => Error::Remote { status, message },
    }
}
