//! Status codes of the C ABI. Grouped by category in hundreds; a code is
//! never renumbered or reused.

use crate::error::Error;

/// Result of every fallible C call: `PS_OK` (0) or a `PS_ERR_*` code.
#[allow(non_camel_case_types)]
pub type ps_status = u32;

/// Success.
pub const PS_OK: ps_status = 0;

/// A required pointer argument was NULL.
pub const PS_ERR_NULL_ARGUMENT: ps_status = 100;
/// An argument is out of range, malformed or inconsistent.
pub const PS_ERR_INVALID_ARGUMENT: ps_status = 101;
/// An output buffer is too small; the required size is reported where possible.
pub const PS_ERR_BUFFER_TOO_SMALL: ps_status = 102;
/// A handle is not live (never created by this library, or freed already).
pub const PS_ERR_INVALID_HANDLE: ps_status = 103;

/// A named store, model, layer or tensor does not exist.
pub const PS_ERR_NOT_FOUND: ps_status = 200;
/// A store or model of that name exists already.
pub const PS_ERR_ALREADY_EXISTS: ps_status = 201;
/// The store (or shared memory) has no room for this model.
pub const PS_ERR_STORE_FULL: ps_status = 202;
/// The arena (or the device) has no room.
pub const PS_ERR_ARENA_FULL: ps_status = 203;
/// The call does not fit the object's current state.
pub const PS_ERR_INVALID_STATE: ps_status = 204;

/// No CUDA driver could be loaded (libcuda.so missing).
pub const PS_ERR_NO_DRIVER: ps_status = 300;
/// No CUDA device, or no device with that ordinal.
pub const PS_ERR_NO_DEVICE: ps_status = 301;
/// A CUDA driver call failed; the message names the call and the CUDA error.
pub const PS_ERR_CUDA: ps_status = 302;
/// The device ran out of memory.
pub const PS_ERR_CUDA_OUT_OF_MEMORY: ps_status = 303;

/// A file operation failed (the message carries the OS error).
pub const PS_ERR_IO: ps_status = 400;
/// A system call on shared memory or a lock failed (the message carries errno).
pub const PS_ERR_OS: ps_status = 401;

/// A store segment failed its checks (bad magic, checksum, sizes).
pub const PS_ERR_CORRUPT_STORE: ps_status = 500;
/// A store segment has a layout version this library does not read.
pub const PS_ERR_STORE_VERSION: ps_status = 501;
/// A safetensors file is malformed or truncated.
pub const PS_ERR_SAFETENSORS: ps_status = 502;

/// A PTX module failed to load or lacks a kernel.
pub const PS_ERR_PTX: ps_status = 600;

/// A message from a daemon, worker or client is malformed, too large, or of
/// another protocol version.
pub const PS_ERR_PROTOCOL: ps_status = 700;
/// The peer (daemon, worker or client) went away or did not answer in time.
pub const PS_ERR_DISCONNECTED: ps_status = 701;
/// The daemon refused the connection or the request (another user, a second
/// daemon on the same GPU, a full queue).
pub const PS_ERR_REFUSED: ps_status = 702;

/// A bug inside the library was caught at the boundary (a Rust panic).
pub const PS_ERR_PANIC: ps_status = 900;
/// An internal invariant failed.
pub const PS_ERR_INTERNAL: ps_status = 901;

/// The status code of an error (what the C ABI returns for it).
pub fn status_of(e: &Error) -> ps_status {
    match e {
        Error::NullArgument(_) => PS_ERR_NULL_ARGUMENT,
        Error::InvalidArgument(_) | Error::Plan(_) => PS_ERR_INVALID_ARGUMENT,
        Error::BufferTooSmall { .. } => PS_ERR_BUFFER_TOO_SMALL,
        Error::InvalidHandle(_) | Error::HandleType { .. } => PS_ERR_INVALID_HANDLE,
        Error::NotFound(_) => PS_ERR_NOT_FOUND,
        Error::AlreadyExists(_) => PS_ERR_ALREADY_EXISTS,
        Error::StoreFull(_) => PS_ERR_STORE_FULL,
        Error::ArenaFull(_) => PS_ERR_ARENA_FULL,
        Error::InvalidState(_) => PS_ERR_INVALID_STATE,
        Error::NoDriver => PS_ERR_NO_DRIVER,
        Error::Cuda(c) if c.is_out_of_memory() => PS_ERR_CUDA_OUT_OF_MEMORY,
        Error::Cuda(c) if c.is_no_device() => PS_ERR_NO_DEVICE,
        Error::Cuda(_) => PS_ERR_CUDA,
        Error::Io { .. } => PS_ERR_IO,
        Error::Os { .. } => PS_ERR_OS,
        Error::CorruptStore(_) => PS_ERR_CORRUPT_STORE,
        Error::StoreVersion { .. } => PS_ERR_STORE_VERSION,
        Error::Safetensors { .. } => PS_ERR_SAFETENSORS,
        Error::Ptx { .. } => PS_ERR_PTX,
        Error::Protocol(_) => PS_ERR_PROTOCOL,
        Error::Disconnected(_) => PS_ERR_DISCONNECTED,
        Error::Refused(_) => PS_ERR_REFUSED,
        Error::Remote { status, .. } => *status,
        Error::Internal(_) => PS_ERR_INTERNAL,
    }
}

/// The static description of a status code (never NULL).
pub(crate) fn status_str(s: ps_status) -> &'static std::ffi::CStr {
    match s {
        PS_OK => c"success",
        PS_ERR_NULL_ARGUMENT => c"a required argument is NULL",
        PS_ERR_INVALID_ARGUMENT => c"invalid argument",
        PS_ERR_BUFFER_TOO_SMALL => c"output buffer too small",
        PS_ERR_INVALID_HANDLE => c"not a live handle (freed already?)",
        PS_ERR_NOT_FOUND => c"not found",
        PS_ERR_ALREADY_EXISTS => c"already exists",
        PS_ERR_STORE_FULL => c"store full",
        PS_ERR_ARENA_FULL => c"arena full",
        PS_ERR_INVALID_STATE => c"invalid state for this call",
        PS_ERR_NO_DRIVER => c"no CUDA driver found",
        PS_ERR_NO_DEVICE => c"no such CUDA device",
        PS_ERR_CUDA => c"CUDA driver call failed",
        PS_ERR_CUDA_OUT_OF_MEMORY => c"CUDA device out of memory",
        PS_ERR_IO => c"I/O error",
        PS_ERR_OS => c"operating system call failed",
        PS_ERR_CORRUPT_STORE => c"corrupt store",
        PS_ERR_STORE_VERSION => c"unsupported store layout version",
        PS_ERR_SAFETENSORS => c"invalid safetensors file",
        PS_ERR_PTX => c"PTX module error",
        PS_ERR_PROTOCOL => c"malformed or unsupported protocol message",
        PS_ERR_DISCONNECTED => c"the peer went away",
        PS_ERR_REFUSED => c"refused by the daemon",
        PS_ERR_PANIC => c"internal panic caught at the library boundary",
        PS_ERR_INTERNAL => c"internal error",
        _ => c"unknown status code",
    }
}
