//! A client of `pipeswitch serve`: connects to the daemon of a GPU and sends
//! inference requests for stored models, as an application would.

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::protocol::io::{pack_tensors, recv, send, unpack_tensors, TensorRef};
use crate::protocol::{Message, Role, Stats, Tensor, Timing};

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
                Ok(Client { stream, next_id: 1, broken: None, daemon_pid, device, store })
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

    /// Runs `model` on `inputs` through the daemon and waits for the result.
    pub fn infer(&mut self, model: &str, inputs: &[TensorRef<'_>]) -> Result<InferOutput> {
        let request_id = self.next_id;
        self.next_id += 1;
        let (tensors, file) = pack_tensors(inputs)?;
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
