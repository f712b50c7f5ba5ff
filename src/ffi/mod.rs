//! The C ABI. Every `extern "C"` function runs its body inside [`boundary`],
//! which catches panics (`PS_ERR_PANIC`), converts the crate's [`Error`] to a
//! `ps_status` once, and records the message for `ps_last_error_message()`.
//! Handles are ids (never addresses, never reused) looked up in a registry of
//! live objects (`handles`), so NULL, freed, forged or wrongly typed handles
//! (a double free) give a status, never a crash, from any thread.

#![allow(non_camel_case_types)]

pub mod arena;
pub mod handles;
pub mod plan;
pub mod status;
pub mod store;
pub mod switch;
pub mod version;
pub mod worker;
pub mod workspace;

use std::cell::RefCell;
use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::error::{Error, Result};
pub use status::*;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(msg: String) {
    let c = CString::new(msg.replace('\0', "\\0")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// Runs one C entry point: panics and errors become a status and a message.
pub(crate) fn boundary(call: &'static str, body: impl FnOnce() -> Result<()>) -> ps_status {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => PS_OK,
        Ok(Err(e)) => {
            let status = status_of(&e);
            set_last_error(format!("{call}: {e}"));
            status
        }
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_last_error(format!("{call}: panic: {what}"));
            PS_ERR_PANIC
        }
    }
}

/// A NUL-terminated UTF-8 string argument.
pub(crate) fn str_arg<'a>(p: *const c_char, what: &'static str) -> Result<&'a str> {
    if p.is_null() {
        return Err(Error::NullArgument(what));
    }
    // SAFETY: the caller passes a NUL-terminated string (C API contract).
    unsafe { CStr::from_ptr(p) }
        .to_str()
        .map_err(|_| Error::invalid(format!("{what} is not valid UTF-8")))
}

/// A slice argument: (NULL, 0) is empty; (NULL, n > 0) is an error.
pub(crate) fn slice_arg<'a, T>(p: *const T, n: usize, what: &'static str) -> Result<&'a [T]> {
    if n == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(Error::NullArgument(what));
    }
    // SAFETY: the caller passes n readable elements (C API contract).
    Ok(unsafe { std::slice::from_raw_parts(p, n) })
}

/// A writable slice argument: (NULL, 0) is empty; (NULL, n > 0) is an error.
pub(crate) fn slice_mut_arg<'a, T>(p: *mut T, n: usize, what: &'static str) -> Result<&'a mut [T]> {
    if n == 0 {
        return Ok(&mut []);
    }
    if p.is_null() {
        return Err(Error::NullArgument(what));
    }
    // SAFETY: the caller passes n writable elements (C API contract).
    Ok(unsafe { std::slice::from_raw_parts_mut(p, n) })
}

/// Writes an output parameter (only on success, so callers' values survive failures).
pub(crate) fn out<T>(p: *mut T, what: &'static str) -> Result<OutParam<T>> {
    if p.is_null() {
        Err(Error::NullArgument(what))
    } else {
        Ok(OutParam(p))
    }
}

/// A checked, non-NULL output pointer.
pub(crate) struct OutParam<T>(*mut T);

impl<T> OutParam<T> {
    pub(crate) fn write(self, v: T) {
        // SAFETY: checked non-NULL; the caller passes writable memory.
        unsafe { self.0.write(v) }
    }
}

/// Copies `s` plus a NUL into `(buf, cap)`; reports the length (without NUL)
/// through `len_out` if not NULL, also when the buffer is too small (but not
/// when `buf` is NULL with a capacity that would hold the string).
pub(crate) fn write_str(s: &str, buf: *mut c_char, cap: usize, len_out: *mut usize) -> Result<()> {
    if buf.is_null() && cap > s.len() {
        return Err(Error::NullArgument("buf"));
    }
    if !len_out.is_null() {
        // SAFETY: non-NULL, caller-provided.
        unsafe { len_out.write(s.len()) };
    }
    if cap < s.len() + 1 {
        return Err(Error::BufferTooSmall { needed: s.len() + 1, capacity: cap });
    }
    if buf.is_null() {
        return Err(Error::NullArgument("buf"));
    }
    // SAFETY: buf holds cap >= len + 1 bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(s.as_ptr(), buf.cast::<u8>(), s.len());
        buf.add(s.len()).write(0);
    }
    Ok(())
}

/// The description of a status code: a static string, never NULL.
#[no_mangle]
pub extern "C" fn ps_status_str(status: ps_status) -> *const c_char {
    status_str(status).as_ptr()
}

/// The message of the calling thread's last failed call ("" if none): which
/// call failed and why (CUDA error name, errno, file). Valid until the
/// thread's next failing call.
#[no_mangle]
pub extern "C" fn ps_last_error_message() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}
