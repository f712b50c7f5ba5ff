//! Streams: RAII over `cuStreamCreate` / `cuStreamDestroy`.

use cudarc::driver::sys::{CUevent_wait_flags, CUstream, CUstreamCaptureStatus, CUstream_flags};

use super::{Device, Event};
use crate::cu;
use crate::error::Result;

/// A non-blocking stream of one device's primary context.
#[derive(Debug)]
pub struct Stream {
    device: &'static Device,
    raw: CUstream,
}

// SAFETY: stream handles may be used from any thread of the process.
unsafe impl Send for Stream {}
unsafe impl Sync for Stream {}

impl Stream {
    /// A new stream that does not synchronise with the legacy default stream.
    pub fn new(device: &'static Device) -> Result<Stream> {
        device.bind()?;
        let mut raw: CUstream = std::ptr::null_mut();
        cu!(cuStreamCreate(&mut raw, CUstream_flags::CU_STREAM_NON_BLOCKING as u32))?;
        Ok(Stream { device, raw })
    }

    pub fn raw(&self) -> CUstream {
        self.raw
    }

    pub fn device(&self) -> &'static Device {
        self.device
    }

    /// Makes all future work on this stream wait for `event`'s last record.
    pub fn wait_event(&self, event: &Event) -> Result<()> {
        wait_event_raw(self.raw, event)
    }

    /// Blocks the host until all work enqueued so far has finished.
    pub fn synchronize(&self) -> Result<()> {
        cu!(cuStreamSynchronize(self.raw))?;
        Ok(())
    }
}

/// Makes a foreign stream (a worker's compute stream, possibly NULL for the
/// legacy default stream) wait for `event`, on the GPU: no host blocking.
// CUstream is an opaque driver handle: passed to the driver, never dereferenced here.
#[allow(clippy::not_unsafe_ptr_arg_deref)]
///
/// On a stream that is being captured into a CUDA graph the wait becomes an
/// external event-wait node (`CU_EVENT_WAIT_EXTERNAL`): each launch of the
/// graph waits for the event's latest record before that launch, so a graph
/// captured once serves every later switch that re-records the event.
pub fn wait_event_raw(stream: CUstream, event: &Event) -> Result<()> {
    let mut status = CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
    cu!(cuStreamIsCapturing(stream, &mut status))?;
    let flags = match status {
        CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE => CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
        _ => CUevent_wait_flags::CU_EVENT_WAIT_EXTERNAL,
    };
    cu!(cuStreamWaitEvent(stream, event.raw(), flags as u32))?;
    Ok(())
}

/// Blocks the host until the legacy default stream (NULL) has drained.
pub fn synchronize_legacy() -> Result<()> {
    cu!(cuStreamSynchronize(std::ptr::null_mut()))?;
    Ok(())
}

impl Drop for Stream {
    fn drop(&mut self) {
        let r = self.device.bind().and_then(|_| Ok(cu!(cuStreamDestroy_v2(self.raw))?));
        if let Err(e) = r {
            tracing::warn!("destroying a CUDA stream failed: {e}");
        }
    }
}
