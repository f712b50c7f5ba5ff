//! Thin helpers over the raw Triton API (`sys`): errors, strings, logging.

use std::ffi::{c_char, CStr, CString};

use crate::sys;

/// An error to hand to Triton: its code and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TritonError {
    pub code: sys::TRITONSERVER_Error_Code,
    pub message: String,
}

pub type TResult<T> = Result<T, TritonError>;

impl TritonError {
    /// A bad request or configuration (HTTP 400).
    pub fn invalid(message: impl Into<String>) -> TritonError {
        TritonError { code: sys::TRITONSERVER_ERROR_INVALID_ARG, message: message.into() }
    }
    pub fn internal(message: impl Into<String>) -> TritonError {
        TritonError { code: sys::TRITONSERVER_ERROR_INTERNAL, message: message.into() }
    }
    pub fn unavailable(message: impl Into<String>) -> TritonError {
        TritonError { code: sys::TRITONSERVER_ERROR_UNAVAILABLE, message: message.into() }
    }

    /// A new Triton error object (owned by whoever it is handed to).
    pub fn into_raw(self) -> *mut sys::TRITONSERVER_Error {
        let msg = CString::new(self.message.replace('\0', " ")).unwrap_or_default();
        // SAFETY: the server copies the message.
        unsafe { sys::TRITONSERVER_ErrorNew(self.code, msg.as_ptr()) }
    }
}

impl From<pipeswitch::Error> for TritonError {
    fn from(e: pipeswitch::Error) -> Self {
        use pipeswitch::Error as E;
        let code = match &e {
            E::InvalidArgument(_) | E::BufferTooSmall { .. } => sys::TRITONSERVER_ERROR_INVALID_ARG,
            E::NotFound(_) => sys::TRITONSERVER_ERROR_NOT_FOUND,
            E::ArenaFull(_) => sys::TRITONSERVER_ERROR_UNAVAILABLE,
            E::NoDriver => sys::TRITONSERVER_ERROR_UNAVAILABLE,
            _ => sys::TRITONSERVER_ERROR_INTERNAL,
        };
        TritonError { code, message: format!("pipeswitch: {}", message_of(&e)) }
    }
}

/// The message of a library error (without the "pipeswitch: " prefix the
/// backend's errors carry); the no-GPU case in one line.
pub fn message_of(e: &pipeswitch::Error) -> String {
    match e {
        pipeswitch::Error::NoDriver => "no CUDA driver found: this model needs an NVIDIA GPU".to_string(),
        e => e.to_string(),
    }
}

/// Turns an error Triton returned into ours (and deletes Triton's).
pub fn check(err: *mut sys::TRITONSERVER_Error, what: &str) -> TResult<()> {
    if err.is_null() {
        return Ok(());
    }
    // SAFETY: a non-NULL error from the server, deleted once here.
    unsafe {
        let code = sys::TRITONSERVER_ErrorCode(err);
        let msg = sys::TRITONSERVER_ErrorMessage(err);
        let message = if msg.is_null() { String::new() } else { CStr::from_ptr(msg).to_string_lossy().into_owned() };
        sys::TRITONSERVER_ErrorDelete(err);
        Err(TritonError { code, message: format!("{what}: {message}") })
    }
}

/// A string the server owns, copied.
///
/// # Safety
/// `p` is NULL or a NUL-terminated string.
pub unsafe fn string(p: *const c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        CStr::from_ptr(p).to_string_lossy().into_owned()
    }
}

/// The JSON text of a Triton message; deletes the message if `owned`
/// (a model's configuration is the caller's; the backend's is the server's).
///
/// # Safety
/// `msg` is a live message, the caller's if `owned`.
pub unsafe fn message_json(msg: *mut sys::TRITONSERVER_Message, owned: bool) -> TResult<String> {
    let mut base: *const c_char = std::ptr::null();
    let mut size = 0usize;
    let r = check(sys::TRITONSERVER_MessageSerializeToJson(msg, &mut base, &mut size), "reading a configuration");
    let text = match r {
        Ok(()) if !base.is_null() => String::from_utf8_lossy(std::slice::from_raw_parts(base.cast::<u8>(), size)).into_owned(),
        Ok(()) => String::new(),
        Err(e) => {
            if owned {
                sys::TRITONSERVER_MessageDelete(msg);
            }
            return Err(e);
        }
    };
    if owned {
        check(sys::TRITONSERVER_MessageDelete(msg), "deleting a message")?;
    }
    Ok(text)
}

/// Logs through the server's log.
pub fn log(level: sys::TRITONSERVER_LogLevel, msg: &str) {
    let file = c"pipeswitch";
    let m = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    // SAFETY: both strings live across the call.
    let err = unsafe { sys::TRITONSERVER_LogMessage(level, file.as_ptr(), 0, m.as_ptr()) };
    if !err.is_null() {
        // SAFETY: an error the server returned, ours to delete.
        unsafe { sys::TRITONSERVER_ErrorDelete(err) };
    }
}

pub fn info(msg: &str) {
    log(sys::TRITONSERVER_LOG_INFO, msg)
}
pub fn warn(msg: &str) {
    log(sys::TRITONSERVER_LOG_WARN, msg)
}
