//! The thin result layer: every `CUresult` becomes a typed [`CudaError`] that
//! carries the name of the driver call that failed. Only the `cuda` module
//! calls `cudarc::driver::sys`, and only through [`cu!`](crate::cu).

use cudarc::driver::sys::{self, CUresult};
use std::sync::OnceLock;

use crate::error::{Error, Result};

/// A failed driver call: which call, and the driver's own error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{call} failed: {code:?}")]
pub struct CudaError {
    pub call: &'static str,
    pub code: CUresult,
}

impl CudaError {
    pub fn is_out_of_memory(&self) -> bool {
        self.code == CUresult::CUDA_ERROR_OUT_OF_MEMORY
    }
    pub fn is_no_device(&self) -> bool {
        matches!(
            self.code,
            CUresult::CUDA_ERROR_NO_DEVICE | CUresult::CUDA_ERROR_INVALID_DEVICE
        )
    }
}

/// Turns a `CUresult` into `Ok(())` or a [`CudaError`] naming `call`.
#[inline]
pub(crate) fn check(call: &'static str, code: CUresult) -> Result<(), CudaError> {
    if code == CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(CudaError { call, code })
    }
}

/// Calls a raw driver function and checks its result:
/// `cu!(cuMemAlloc_v2(&mut ptr, bytes))?`. The caller guarantees the
/// arguments' validity, exactly as for the raw call, hence `unsafe` inside.
#[macro_export]
#[doc(hidden)]
macro_rules! cu {
    ($call:ident ( $($arg:expr),* $(,)? )) => {{
        #[allow(unused_unsafe)]
        let code = unsafe { ::cudarc::driver::sys::$call($($arg),*) };
        $crate::cuda::result::check(stringify!($call), code)
    }};
}

/// Loads libcuda and runs `cuInit` once per process. Every entry point that
/// needs the driver calls this first: with no driver installed it returns
/// [`Error::NoDriver`] instead of letting the dynamic loader panic.
pub fn driver() -> Result<()> {
    static INIT: OnceLock<Result<(), Option<CudaError>>> = OnceLock::new();
    let state = INIT.get_or_init(|| {
        // SAFETY: only tries to dlopen libcuda; no symbol is called.
        if !unsafe { sys::is_culib_present() } {
            return Err(None);
        }
        // The library may still lack a symbol: that panics inside cudarc, and
        // the loader's panic must not escape this function.
        match std::panic::catch_unwind(|| cu!(cuInit(0))) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Some(e)),
            Err(_) => Err(None),
        }
    });
    match state {
        Ok(()) => Ok(()),
        Err(None) => Err(Error::NoDriver),
        Err(Some(e)) => Err(Error::Cuda(*e)),
    }
}

/// True when a CUDA driver is present and initialises. Never panics.
pub fn driver_available() -> bool {
    driver().is_ok()
}
