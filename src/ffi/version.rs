//! Versions and the driver probe.

use std::ffi::c_char;

use super::{boundary, out, ps_status};
use crate::cuda::{driver_available, Device};

pub const PS_VERSION_MAJOR: u32 = 0;
pub const PS_VERSION_MINOR: u32 = 2;
pub const PS_VERSION_PATCH: u32 = 0;
/// major * 1000000 + minor * 1000 + patch.
pub const PS_VERSION_NUMBER: u32 = 2000;

const _: () = assert!(PS_VERSION_NUMBER == PS_VERSION_MAJOR * 1_000_000 + PS_VERSION_MINOR * 1000 + PS_VERSION_PATCH);

/// The library's version as `PS_VERSION_NUMBER` computes it: compare with
/// the header's macro to detect a header/library mismatch.
#[no_mangle]
pub extern "C" fn ps_version_number() -> u32 {
    PS_VERSION_NUMBER
}

/// The library's version, "major.minor.patch" (static string).
#[no_mangle]
pub extern "C" fn ps_version_string() -> *const c_char {
    c"0.2.0".as_ptr()
}

/// 1 if a CUDA driver loads and initialises, else 0. Never fails.
#[no_mangle]
pub extern "C" fn ps_driver_available() -> i32 {
    i32::from(driver_available())
}

/// Number of CUDA devices (`PS_ERR_NO_DRIVER` without a driver).
#[no_mangle]
pub extern "C" fn ps_device_count(count_out: *mut i32) -> ps_status {
    boundary("ps_device_count", || {
        let o = out(count_out, "count_out")?;
        o.write(Device::count()?);
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_constants_match_the_crate() {
        let v = format!("{PS_VERSION_MAJOR}.{PS_VERSION_MINOR}.{PS_VERSION_PATCH}");
        assert_eq!(v, env!("CARGO_PKG_VERSION"));
        // SAFETY: static NUL-terminated string.
        let s = unsafe { std::ffi::CStr::from_ptr(ps_version_string()) };
        assert_eq!(s.to_str().unwrap(), v);
        assert_eq!(ps_version_number(), PS_VERSION_NUMBER);
    }
}
