//! CUDA graphs: the work a stream was given, captured once and launched
//! again with one call (RAII over `cuStreamBeginCapture` /
//! `cuStreamEndCapture` / `cuGraphInstantiateWithFlags`).

use cudarc::driver::sys::{CUgraph, CUgraphExec, CUstream, CUstreamCaptureMode};

use super::Device;
use crate::cu;
use crate::error::Result;

/// An instantiated graph of one device.
#[derive(Debug)]
pub struct Graph {
    device: &'static Device,
    graph: CUgraph,
    exec: CUgraphExec,
}

// SAFETY: graph handles may be used from any thread of the process (one
// launch at a time is the caller's concern, as for a stream).
unsafe impl Send for Graph {}
unsafe impl Sync for Graph {}

impl Graph {
    /// Captures what `body` enqueues on `stream` (relaxed mode: `body` may
    /// query events and streams, but nothing it does runs now) and
    /// instantiates it. The capture ends whatever `body` returns; its error
    /// comes first.
    // CUstream is an opaque driver handle: passed to the driver, never dereferenced here.
    #[allow(clippy::not_unsafe_ptr_arg_deref)]
    pub fn capture(device: &'static Device, stream: CUstream, body: impl FnOnce() -> Result<()>) -> Result<Graph> {
        device.bind()?;
        cu!(cuStreamBeginCapture_v2(stream, CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED))?;
        let r = body();
        let mut graph: CUgraph = std::ptr::null_mut();
        let end = cu!(cuStreamEndCapture(stream, &mut graph));
        let destroy = |g: CUgraph| {
            if !g.is_null() {
                let _ = cu!(cuGraphDestroy(g));
            }
        };
        if let Err(e) = r {
            destroy(graph);
            return Err(e);
        }
        if let Err(e) = end {
            destroy(graph);
            return Err(e.into());
        }
        let mut exec: CUgraphExec = std::ptr::null_mut();
        if let Err(e) = cu!(cuGraphInstantiateWithFlags(&mut exec, graph, 0)) {
            destroy(graph);
            return Err(e.into());
        }
        Ok(Graph { device, graph, exec })
    }

    /// Enqueues one run of the graph on `stream`.
    #[allow(clippy::not_unsafe_ptr_arg_deref)] // an opaque handle, as above
    pub fn launch(&self, stream: CUstream) -> Result<()> {
        self.device.bind()?;
        cu!(cuGraphLaunch(self.exec, stream))?;
        Ok(())
    }
}

impl Drop for Graph {
    fn drop(&mut self) {
        let r = self.device.bind().and_then(|_| {
            cu!(cuGraphExecDestroy(self.exec))?;
            Ok(cu!(cuGraphDestroy(self.graph))?)
        });
        if let Err(e) = r {
            tracing::warn!("destroying a CUDA graph failed: {e}");
        }
    }
}
