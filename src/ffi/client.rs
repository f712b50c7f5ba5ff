//! `ps_client_*` and `ps_result_*`: an application's connection to the GPU
//! daemon (`pipeswitch serve`), inference requests for stored models.

use std::ffi::{c_char, c_void, CString};
use std::path::PathBuf;
use std::sync::RwLock;
use std::time::Duration;

use super::store::ps_tensor_desc;
use super::{boundary, handles, out, ps_status, slice_arg, str_arg};
use crate::client::Client;
use crate::error::{Error, Result};
use crate::protocol::io::TensorRef;
use crate::protocol::{default_socket_dir, socket_path, MAX_DIMS};

/// A connection to a daemon. Thread-safe: requests on one client take turns.
pub struct ps_client {
    inner: RwLock<Client>,
}

impl handles::Lockable for ps_client {
    type Inner = Client;
    fn lock(&self) -> &RwLock<Client> {
        &self.inner
    }
}

/// The outputs of one request; read with `ps_result_*`, free with
/// `ps_result_free`. Thread-safe (it does not change).
pub struct ps_result {
    names: Vec<CString>,
    tensors: Vec<(u32, Vec<u64>, Vec<u8>)>,
    timing: ps_timing,
}

/// One output tensor of a result. `name` and `data` stay valid until the
/// result is freed.
#[repr(C)]
pub struct ps_tensor_view {
    pub name: *const c_char,
    /// One of `PS_DTYPE_*`.
    pub dtype: u32,
    pub ndim: u32,
    pub shape: [u64; 8],
    pub data: *const c_void,
    pub bytes: u64,
}

/// Where a request's time went, in ms.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct ps_timing {
    /// Waiting in the daemon's queue.
    pub queued_ms: f64,
    /// From the daemon's decision to the worker's first kernel.
    pub activation_ms: f64,
    /// The worker's time from activation to its result.
    pub worker_ms: f64,
    /// From the request's arrival at the daemon to its result leaving it.
    pub total_ms: f64,
}

/// A daemon's counters.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct ps_daemon_stats {
    pub requests: u64,
    pub failed: u64,
    /// Requests whose model was resident (no copy) and those that copied it.
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
    pub bytes_copied: u64,
    pub workers: u32,
    pub standbys: u32,
    pub workers_started: u64,
    pub workers_lost: u64,
}

/// Connects to the daemon of GPU `device`: at `socket_path`, or (NULL) at
/// the default socket (`$PIPESWITCH_SOCKET_DIR`, else
/// `$XDG_RUNTIME_DIR/pipeswitch`, else `/tmp/pipeswitch-<uid>`, then
/// `gpu<device>.sock`). `timeout_ms`: how long a request may wait for its
/// result (0: forever). `PS_ERR_DISCONNECTED` if no daemon listens there;
/// `PS_ERR_REFUSED` if it refuses this user.
#[no_mangle]
pub extern "C" fn ps_client_connect(
    socket_path_or_null: *const c_char,
    device: i32,
    timeout_ms: u64,
    client_out: *mut *mut ps_client,
) -> ps_status {
    boundary("ps_client_connect", || {
        let o = out(client_out, "client_out")?;
        let path = if socket_path_or_null.is_null() {
            socket_path(&default_socket_dir(), device)
        } else {
            PathBuf::from(str_arg(socket_path_or_null, "socket_path")?)
        };
        let timeout = (timeout_ms > 0).then(|| Duration::from_millis(timeout_ms));
        let c = Client::connect(&path, timeout)?;
        o.write(handles::register(ps_client { inner: RwLock::new(c) }));
        Ok(())
    })
}

/// Closes the connection. NULL does nothing.
#[no_mangle]
pub extern "C" fn ps_client_free(client: *mut ps_client) -> ps_status {
    boundary("ps_client_free", || handles::free(client, "client"))
}

/// Gives the daemon an input area of `bytes` bytes: shared memory of this
/// connection that later requests' large inputs are written into and that
/// every worker has mapped and page-locked beforehand, so that a worker
/// copies them to the GPU without a host copy on its critical path. It
/// replaces the connection's earlier area. Without this call, the first
/// request with large inputs reserves one (16 MiB, or the next power of two
/// of what it needs, up to 256 MiB). `PS_ERR_REFUSED` if the daemon's
/// limits do not allow it (requests then send their inputs as before);
/// `PS_ERR_INVALID_ARGUMENT` for 0 bytes.
#[no_mangle]
pub extern "C" fn ps_client_reserve_inputs(client: *mut ps_client, bytes: u64) -> ps_status {
    boundary("ps_client_reserve_inputs", || {
        if bytes == 0 {
            return Err(Error::invalid("an input area of 0 bytes"));
        }
        handles::write(client, "client")?.reserve_inputs(bytes)?;
        Ok(())
    })
}

/// Runs `model` on `inputs` (`n_inputs` tensors; each `data` holds `bytes`
/// bytes, the element size of `dtype` times the product of `shape`) through
/// the daemon and waits for its result. Large tensors travel in shared
/// memory, not through the socket: the connection's input area (see
/// `ps_client_reserve_inputs`) where they fit. A failure of the request (unknown model,
/// a model larger than the GPU's room, a worker that died) is this call's
/// status; the connection stays usable.
#[no_mangle]
pub extern "C" fn ps_client_infer(
    client: *mut ps_client,
    model: *const c_char,
    inputs: *const ps_tensor_desc,
    n_inputs: usize,
    result_out: *mut *mut ps_result,
) -> ps_status {
    boundary("ps_client_infer", || {
        let o = out(result_out, "result_out")?;
        let model = str_arg(model, "model")?;
        let descs = slice_arg(inputs, n_inputs, "inputs")?;
        let mut names = Vec::with_capacity(descs.len());
        let mut views = Vec::with_capacity(descs.len());
        for d in descs {
            let name = str_arg(d.name, "input name")?;
            if d.ndim as usize > MAX_DIMS {
                return Err(Error::invalid(format!("input {name:?}: {} dimensions, at most {MAX_DIMS}", d.ndim)));
            }
            let shape = slice_arg(d.shape, d.ndim as usize, "input shape")?;
            let bytes = usize::try_from(d.bytes).map_err(|_| Error::invalid("input too large"))?;
            let data = slice_arg(d.data.cast::<u8>(), bytes, "input data")?;
            names.push(name);
            views.push((d.dtype, shape, data));
        }
        let refs: Vec<TensorRef<'_>> =
            names.iter().zip(&views).map(|(n, (dtype, shape, data))| TensorRef { name: n, dtype: *dtype, shape, data }).collect();
        let mut c = handles::write(client, "client")?;
        let r = c.infer(model, &refs)?;
        let t = r.timing;
        let mut result = ps_result {
            names: Vec::with_capacity(r.outputs.len()),
            tensors: Vec::with_capacity(r.outputs.len()),
            timing: ps_timing { queued_ms: t.queued_ms, activation_ms: t.activation_ms, worker_ms: t.worker_ms, total_ms: t.total_ms },
        };
        for (t, bytes) in r.outputs {
            result.names.push(CString::new(t.name.replace('\0', "\\0")).unwrap_or_default());
            result.tensors.push((t.dtype, t.shape, bytes));
        }
        o.write(handles::register(result));
        Ok(())
    })
}

/// The daemon's counters.
#[no_mangle]
pub extern "C" fn ps_client_get_stats(client: *mut ps_client, stats_out: *mut ps_daemon_stats) -> ps_status {
    boundary("ps_client_get_stats", || {
        let o = out(stats_out, "stats_out")?;
        let s = handles::write(client, "client")?.stats()?;
        o.write(ps_daemon_stats {
            requests: s.requests,
            failed: s.failed,
            hits: s.hits,
            misses: s.misses,
            evictions: s.evictions,
            bytes_copied: s.bytes_copied,
            workers: s.workers,
            standbys: s.standbys,
            workers_started: s.workers_started,
            workers_lost: s.workers_lost,
        });
        Ok(())
    })
}

fn result_ref(r: *const ps_result) -> Result<std::sync::Arc<ps_result>> {
    handles::get(r, "result")
}

/// The number of output tensors.
#[no_mangle]
pub extern "C" fn ps_result_count(result: *const ps_result, count_out: *mut usize) -> ps_status {
    boundary("ps_result_count", || {
        let o = out(count_out, "count_out")?;
        o.write(result_ref(result)?.tensors.len());
        Ok(())
    })
}

/// Output tensor `index` (in the model's order of outputs).
#[no_mangle]
pub extern "C" fn ps_result_tensor(result: *const ps_result, index: usize, tensor_out: *mut ps_tensor_view) -> ps_status {
    boundary("ps_result_tensor", || {
        let o = out(tensor_out, "tensor_out")?;
        let r = result_ref(result)?;
        let (dtype, shape, data) = r
            .tensors
            .get(index)
            .ok_or_else(|| Error::invalid(format!("output {index} out of range: the result has {}", r.tensors.len())))?;
        let mut s = [0u64; 8];
        let ndim = shape.len().min(MAX_DIMS);
        s[..ndim].copy_from_slice(&shape[..ndim]);
        // The pointers stay valid while the result lives: it never changes,
        // and the registry frees it only through ps_result_free.
        o.write(ps_tensor_view {
            name: r.names[index].as_ptr(),
            dtype: *dtype,
            ndim: ndim as u32,
            shape: s,
            data: data.as_ptr().cast(),
            bytes: data.len() as u64,
        });
        Ok(())
    })
}

/// Where the request's time went.
#[no_mangle]
pub extern "C" fn ps_result_timing(result: *const ps_result, timing_out: *mut ps_timing) -> ps_status {
    boundary("ps_result_timing", || {
        let o = out(timing_out, "timing_out")?;
        o.write(result_ref(result)?.timing);
        Ok(())
    })
}

/// Frees a result; the views taken from it become invalid. NULL does nothing.
#[no_mangle]
pub extern "C" fn ps_result_free(result: *mut ps_result) -> ps_status {
    boundary("ps_result_free", || handles::free(result, "result"))
}
