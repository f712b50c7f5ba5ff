//! Events: RAII over `cuEventCreate` / `cuEventDestroy`.

use cudarc::driver::sys::{CUevent, CUevent_flags, CUresult, CUstream};

use super::Device;
use crate::cu;
use crate::error::Result;

/// A CUDA event. Timing events can measure elapsed time; others are cheaper
/// to record and wait on.
#[derive(Debug)]
pub struct Event {
    device: &'static Device,
    raw: CUevent,
}

// SAFETY: event handles may be used from any thread of the process.
unsafe impl Send for Event {}
unsafe impl Sync for Event {}

impl Event {
    pub fn new(device: &'static Device, timing: bool) -> Result<Event> {
        device.bind()?;
        let flags = if timing {
            CUevent_flags::CU_EVENT_DEFAULT as u32
        } else {
            CUevent_flags::CU_EVENT_DISABLE_TIMING as u32
        };
        let mut raw: CUevent = std::ptr::null_mut();
        cu!(cuEventCreate(&mut raw, flags))?;
        Ok(Event { device, raw })
    }

    pub fn raw(&self) -> CUevent {
        self.raw
    }

    /// Records the event at the current end of `stream` (raw: any stream of
    /// the same context, NULL for the legacy default stream).
    // CUstream is an opaque driver handle: passed to the driver, never dereferenced here.
    #[allow(clippy::not_unsafe_ptr_arg_deref)]
    pub fn record(&self, stream: CUstream) -> Result<()> {
        cu!(cuEventRecord(self.raw, stream))?;
        Ok(())
    }

    /// Blocks the host until the event's last record has completed.
    pub fn synchronize(&self) -> Result<()> {
        cu!(cuEventSynchronize(self.raw))?;
        Ok(())
    }

    /// True when the work before the event's last record has completed.
    pub fn is_complete(&self) -> Result<bool> {
        // SAFETY: a valid event handle.
        let code = unsafe { cudarc::driver::sys::cuEventQuery(self.raw) };
        match code {
            CUresult::CUDA_SUCCESS => Ok(true),
            CUresult::CUDA_ERROR_NOT_READY => Ok(false),
            code => Err(super::CudaError { call: "cuEventQuery", code }.into()),
        }
    }

    /// Milliseconds between two completed timing events.
    pub fn elapsed_ms(start: &Event, end: &Event) -> Result<f32> {
        let mut ms = 0f32;
        cu!(cuEventElapsedTime(&mut ms, start.raw, end.raw))?;
        Ok(ms)
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        let r = self.device.bind().and_then(|_| Ok(cu!(cuEventDestroy_v2(self.raw))?));
        if let Err(e) = r {
            tracing::warn!("destroying a CUDA event failed: {e}");
        }
    }
}
