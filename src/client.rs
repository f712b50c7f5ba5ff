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

/// A connection to a daemon. One request at a time.
#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
    next_id: u64,
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
                Ok(Client { stream, next_id: 1, daemon_pid, device, store })
            }
            Some((Message::Error { status, message, .. }, _)) => Err(error_of(status, message)),
            Some((m, _)) => Err(Error::Protocol(format!("the daemon answered hello with {m:?}"))),
            None => Err(Error::Disconnected("the daemon closed the connection".into())),
        }
    }

    /// Runs `model` on `inputs` through the daemon and waits for the result.
    pub fn infer(&mut self, model: &str, inputs: &[TensorRef<'_>]) -> Result<InferOutput> {
        let request_id = self.next_id;
        self.next_id += 1;
        let (tensors, file) = pack_tensors(inputs)?;
        send(&self.stream, &Message::Infer { request_id, model: model.to_string(), inputs: tensors }, file.as_ref().map(|f| f.as_fd()))?;
        loop {
            match recv(&self.stream)? {
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

    /// The daemon's counters.
    pub fn stats(&mut self) -> Result<Stats> {
        send(&self.stream, &Message::StatsRequest, None)?;
        loop {
            match recv(&self.stream)? {
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
