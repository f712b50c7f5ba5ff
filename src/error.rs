//! The crate's one internal error type. Every fallible function returns
//! [`Result`]; the C ABI converts an [`Error`] into a `ps_status` code exactly
//! once, at the boundary (see `ffi::status`).

use crate::cuda::CudaError;
use crate::planner::PlanError;

/// Everything that can go wrong inside libpipeswitch.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0} is NULL")]
    NullArgument(&'static str),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("{0} is not a live handle (never created, or freed already)")]
    InvalidHandle(&'static str),
    #[error("{expected} is not a live handle: it is a {found} handle")]
    HandleType { expected: &'static str, found: &'static str },
    #[error("buffer too small: {needed} needed, capacity {capacity}")]
    BufferTooSmall { needed: usize, capacity: usize },

    #[error("not found: {0}")]
    NotFound(String),
    #[error("already exists: {0}")]
    AlreadyExists(String),
    #[error("store full: {0}")]
    StoreFull(String),
    #[error("arena full: {0}")]
    ArenaFull(String),
    #[error("invalid state: {0}")]
    InvalidState(String),

    #[error("no CUDA driver found (libcuda.so could not be loaded)")]
    NoDriver,
    #[error(transparent)]
    Cuda(#[from] CudaError),

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{context}: {source}")]
    Os {
        context: String,
        #[source]
        source: nix::errno::Errno,
    },

    #[error("corrupt store: {0}")]
    CorruptStore(String),
    #[error("store layout version {found} is not supported (this library reads version {supported})")]
    StoreVersion { found: u32, supported: u32 },
    #[error("invalid safetensors file {path}: {reason}")]
    Safetensors { path: String, reason: String },

    #[error("PTX module {module}: {message}")]
    Ptx { module: String, message: String },

    #[error(transparent)]
    Plan(#[from] PlanError),

    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("disconnected: {0}")]
    Disconnected(String),
    #[error("refused: {0}")]
    Refused(String),
    /// A failure the daemon or a worker reported, with its status code.
    #[error("{message} (status {status})")]
    Remote { status: u32, message: String },

    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io { context: context.into(), source }
    }
    pub fn os(context: impl Into<String>, source: nix::errno::Errno) -> Self {
        Error::Os { context: context.into(), source }
    }
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidArgument(msg.into())
    }
    pub fn corrupt(msg: impl Into<String>) -> Self {
        Error::CorruptStore(msg.into())
    }
}
