//! `libtriton_pipeswitch.so`: a Triton Inference Server backend that serves
//! models of a pipeswitch store from one GPU with pipelined switches.
//!
//! A model's `config.pbtxt` says `backend: "pipeswitch"` and names the store
//! and the stored model (one that carries its graph) in `parameters`:
//! `store` and `model`. At load the configuration's inputs and outputs are
//! checked against the stored graph. Every instance on a GPU shares that
//! GPU's device arena and its residency manager ([`state`]): a request for
//! a resident model runs at once, any other starts the model's pipelined
//! switch and runs the built-in worker group by group as the groups arrive.
//!
//! The entry points are the `TRITONBACKEND_*` functions below; the server
//! resolves the `TRITONSERVER_*`/`TRITONBACKEND_*` functions the backend
//! calls when it loads it (nothing links against libtritonserver.so).

// The TRITONBACKEND_* entry points take the server's raw handles, as C
// functions do; they are not `unsafe fn` because the server calls them.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

pub mod config;
mod execute;
pub mod state;
#[allow(non_upper_case_globals, non_camel_case_types, non_snake_case, dead_code, clippy::all)]
pub mod sys;
pub mod triton;

use std::ffi::c_char;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use pipeswitch::cuda::Device;
use pipeswitch::model::graph::Graph;
use pipeswitch::store::{Store, GRAPH_ATTRIBUTE};
use pipeswitch::worker::{Program, Worker};

use config::{BackendConfig, Executor, ModelConfig};
use triton::{check, message_of, TResult, TritonError};

/// Runs an entry point's body: a panic becomes an internal error, never an
/// unwind into the server.
fn boundary(what: &str, f: impl FnOnce() -> TResult<()>) -> *mut sys::TRITONSERVER_Error {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => std::ptr::null_mut(),
        Ok(Err(e)) => e.into_raw(),
        Err(_) => TritonError::internal(format!("pipeswitch: {what} panicked")).into_raw(),
    }
}

/// A loaded model: its configuration, the stored model and its program.
pub struct ModelState {
    pub name: String,
    pub config: ModelConfig,
    pub store: Arc<Store>,
    pub program: Arc<Program>,
    /// For the CPU reference executor: the weights as fp32 arrays.
    pub host_weights: Option<pipeswitch::model::cpu::HostWeights>,
}

/// One instance: its GPU, worker and plan (or the CPU reference).
pub struct InstanceState {
    pub name: String,
    pub gpu: Option<(Arc<state::Gpu>, Worker, Vec<usize>)>,
}

#[no_mangle]
pub extern "C" fn TRITONBACKEND_Initialize(backend: *mut sys::TRITONBACKEND_Backend) -> *mut sys::TRITONSERVER_Error {
    boundary("TRITONBACKEND_Initialize", || {
        let (mut major, mut minor) = (0u32, 0u32);
        // SAFETY: plain out-parameters.
        check(unsafe { sys::TRITONBACKEND_ApiVersion(&mut major, &mut minor) }, "TRITONBACKEND_ApiVersion")?;
        let (want_major, want_minor) = (sys::TRITONBACKEND_API_VERSION_MAJOR, sys::TRITONBACKEND_API_VERSION_MINOR);
        if major != want_major || minor < want_minor {
            return Err(TritonError::unavailable(format!(
                "pipeswitch: the server's backend API is {major}.{minor}; this backend was built for {want_major}.{want_minor} (Triton 2.51, r24.10, or later 1.x)"
            )));
        }
        let mut msg = std::ptr::null_mut();
        // SAFETY: `backend` is the server's, and so is the message.
        check(unsafe { sys::TRITONBACKEND_BackendConfig(backend, &mut msg) }, "TRITONBACKEND_BackendConfig")?;
        let json = unsafe { triton::message_json(msg, false) }?;
        let c = BackendConfig::from_json(&json).map_err(|e| TritonError::invalid(format!("pipeswitch: {e}")))?;
        triton::info(&format!(
            "pipeswitch backend: libpipeswitch {}, Triton backend API {major}.{minor} (built for {want_major}.{want_minor}); arena {} bytes, residency {} bytes",
            pipeswitch::VERSION,
            c.arena_bytes,
            c.residency_bytes
        ));
        state::set_config(c);
        Ok(())
    })
}

#[no_mangle]
pub extern "C" fn TRITONBACKEND_Finalize(_backend: *mut sys::TRITONBACKEND_Backend) -> *mut sys::TRITONSERVER_Error {
    std::ptr::null_mut()
}

/// Loads a model: reads and checks its configuration against the stored graph.
fn model_initialize(model: *mut sys::TRITONBACKEND_Model) -> TResult<()> {
    let mut name: *const c_char = std::ptr::null();
    // SAFETY: `model` is the server's; the name lives as long as the model.
    check(unsafe { sys::TRITONBACKEND_ModelName(model, &mut name) }, "TRITONBACKEND_ModelName")?;
    let name = unsafe { triton::string(name) };
    let mut msg = std::ptr::null_mut();
    // The model's configuration message is ours to delete.
    check(unsafe { sys::TRITONBACKEND_ModelConfig(model, 1, &mut msg) }, "TRITONBACKEND_ModelConfig")?;
    let json = unsafe { triton::message_json(msg, true) }?;
    let fail = |e: String| TritonError::invalid(format!("pipeswitch: model {name:?}: {e}"));
    let mut config = ModelConfig::from_json(&json).map_err(fail)?;
    let store = state::store(&config.store)
        .map_err(|e| fail(format!("store {:?} cannot be opened: {}", config.store, e)))?;
    let stored = store.model(&config.model).map_err(|_| {
        let have: Vec<String> = store.models().map(|v| v.into_iter().map(|m| m.name).collect()).unwrap_or_default();
        fail(format!("store {:?} has no model {:?} (it holds: {})", config.store, config.model, have.join(", ")))
    })?;
    let graph_json = stored.attributes.iter().find(|(k, _)| k == GRAPH_ATTRIBUTE).map(|(_, v)| v.clone()).ok_or_else(|| {
        fail(format!("stored model {:?} carries no graph (attribute {GRAPH_ATTRIBUTE:?}): the built-in worker cannot run it", config.model))
    })?;
    let graph = Graph::from_json(&graph_json).map_err(|e| fail(format!("the graph of stored model {:?}: {e}", config.model)))?;
    // Auto-completion (unless the server runs with
    // --disable-auto-complete-config): a configuration without inputs and
    // outputs gets the stored graph's.
    let mut auto = false;
    check(unsafe { sys::TRITONBACKEND_ModelAutoCompleteConfig(model, &mut auto) }, "TRITONBACKEND_ModelAutoCompleteConfig")?;
    if auto {
        if let Some(done) = config::complete(&json, &graph).map_err(fail)? {
            let mut msg = std::ptr::null_mut();
            check(
                unsafe { sys::TRITONSERVER_MessageNewFromSerializedJson(&mut msg, done.as_ptr().cast(), done.len()) },
                "TRITONSERVER_MessageNewFromSerializedJson",
            )?;
            // The message stays ours.
            let set = check(unsafe { sys::TRITONBACKEND_ModelSetConfig(model, 1, msg) }, "TRITONBACKEND_ModelSetConfig");
            unsafe { sys::TRITONSERVER_MessageDelete(msg) };
            set?;
            let mut msg = std::ptr::null_mut();
            check(unsafe { sys::TRITONBACKEND_ModelConfig(model, 1, &mut msg) }, "TRITONBACKEND_ModelConfig")?;
            let json = unsafe { triton::message_json(msg, true) }?;
            config = ModelConfig::from_json(&json).map_err(fail)?;
            triton::info(&format!("pipeswitch: model {name:?}: inputs and outputs completed from the stored graph"));
        }
    }
    config.check_against(&graph).map_err(fail)?;
    let program = Program::from_store(&store, &config.model).map_err(|e| fail(message_of(&e)))?;
    let host_weights = match config.executor {
        Executor::CpuReference => Some(execute::host_weights(&store, program.model()).map_err(|e| fail(message_of(&e)))?),
        Executor::Gpu => {
            // No GPU: the one-line message, before any instance is made.
            let n = Device::count().map_err(|e| TritonError::unavailable(format!("pipeswitch: model {name:?}: {}", message_of(&e))))?;
            if n == 0 {
                return Err(TritonError::unavailable(format!("pipeswitch: model {name:?}: no CUDA device")));
            }
            None
        }
    };
    triton::info(&format!(
        "pipeswitch: model {name:?} is {:?} of store {:?} ({} bytes, {} layers, executor {:?})",
        config.model,
        config.store,
        stored.bytes,
        stored.layers.len(),
        config.executor
    ));
    let state = Box::new(ModelState { name, config, store, program: Arc::new(program), host_weights });
    let raw = Box::into_raw(state);
    // SAFETY: the state is taken back in TRITONBACKEND_ModelFinalize.
    if let Err(e) = check(unsafe { sys::TRITONBACKEND_ModelSetState(model, raw.cast()) }, "TRITONBACKEND_ModelSetState") {
        drop(unsafe { Box::from_raw(raw) });
        return Err(e);
    }
    Ok(())
}

#[no_mangle]
pub extern "C" fn TRITONBACKEND_ModelInitialize(model: *mut sys::TRITONBACKEND_Model) -> *mut sys::TRITONSERVER_Error {
    boundary("TRITONBACKEND_ModelInitialize", || model_initialize(model))
}

#[no_mangle]
pub extern "C" fn TRITONBACKEND_ModelFinalize(model: *mut sys::TRITONBACKEND_Model) -> *mut sys::TRITONSERVER_Error {
    boundary("TRITONBACKEND_ModelFinalize", || {
        let mut p = std::ptr::null_mut();
        check(unsafe { sys::TRITONBACKEND_ModelState(model, &mut p) }, "TRITONBACKEND_ModelState")?;
        if !p.is_null() {
            // SAFETY: set by model_initialize from Box::into_raw, taken once.
            drop(unsafe { Box::from_raw(p.cast::<ModelState>()) });
        }
        Ok(())
    })
}

/// # Safety
/// `instance` is the server's; its model's state was set by model_initialize.
unsafe fn model_state<'a>(instance: *mut sys::TRITONBACKEND_ModelInstance) -> TResult<&'a ModelState> {
    let mut model = std::ptr::null_mut();
    check(sys::TRITONBACKEND_ModelInstanceModel(instance, &mut model), "TRITONBACKEND_ModelInstanceModel")?;
    let mut p = std::ptr::null_mut();
    check(sys::TRITONBACKEND_ModelState(model, &mut p), "TRITONBACKEND_ModelState")?;
    p.cast::<ModelState>().as_ref().ok_or_else(|| TritonError::internal("pipeswitch: the model has no state"))
}

fn instance_initialize(instance: *mut sys::TRITONBACKEND_ModelInstance) -> TResult<()> {
    // SAFETY: the server's instance of a model this backend loaded.
    let m = unsafe { model_state(instance) }?;
    let mut name: *const c_char = std::ptr::null();
    check(unsafe { sys::TRITONBACKEND_ModelInstanceName(instance, &mut name) }, "TRITONBACKEND_ModelInstanceName")?;
    let name = unsafe { triton::string(name) };
    let gpu = match m.config.executor {
        Executor::CpuReference => None,
        Executor::Gpu => {
            let mut kind = sys::TRITONSERVER_INSTANCEGROUPKIND_AUTO;
            check(unsafe { sys::TRITONBACKEND_ModelInstanceKind(instance, &mut kind) }, "TRITONBACKEND_ModelInstanceKind")?;
            let mut ordinal = 0i32;
            if kind == sys::TRITONSERVER_INSTANCEGROUPKIND_GPU {
                check(unsafe { sys::TRITONBACKEND_ModelInstanceDeviceId(instance, &mut ordinal) }, "TRITONBACKEND_ModelInstanceDeviceId")?;
            }
            let fail = |e: pipeswitch::Error| {
                let message = format!("pipeswitch: instance {name:?} on GPU {ordinal}: {}", message_of(&e));
                TritonError { message, ..TritonError::from(e) }
            };
            let gpu = state::gpu(ordinal).map_err(fail)?;
            m.store.pin(gpu.arena.device()).map_err(fail)?;
            let mut worker = Worker::new(&gpu.arena).map_err(fail)?;
            worker.prepare(&m.program).map_err(fail)?;
            let plan = pipeswitch::cost::plan_for_stored(&m.store, m.program.model(), gpu.h2d);
            triton::info(&format!(
                "pipeswitch: instance {name:?} on GPU {ordinal}: {} groups, {} bytes of activations",
                plan.len(),
                m.program.activation_bytes()
            ));
            Some((gpu, worker, plan))
        }
    };
    let raw = Box::into_raw(Box::new(InstanceState { name, gpu }));
    if let Err(e) = check(unsafe { sys::TRITONBACKEND_ModelInstanceSetState(instance, raw.cast()) }, "TRITONBACKEND_ModelInstanceSetState") {
        drop(unsafe { Box::from_raw(raw) });
        return Err(e);
    }
    Ok(())
}

#[no_mangle]
pub extern "C" fn TRITONBACKEND_ModelInstanceInitialize(instance: *mut sys::TRITONBACKEND_ModelInstance) -> *mut sys::TRITONSERVER_Error {
    boundary("TRITONBACKEND_ModelInstanceInitialize", || instance_initialize(instance))
}

#[no_mangle]
pub extern "C" fn TRITONBACKEND_ModelInstanceFinalize(instance: *mut sys::TRITONBACKEND_ModelInstance) -> *mut sys::TRITONSERVER_Error {
    boundary("TRITONBACKEND_ModelInstanceFinalize", || {
        let mut p = std::ptr::null_mut();
        check(unsafe { sys::TRITONBACKEND_ModelInstanceState(instance, &mut p) }, "TRITONBACKEND_ModelInstanceState")?;
        if !p.is_null() {
            // SAFETY: set by instance_initialize from Box::into_raw, taken once.
            drop(unsafe { Box::from_raw(p.cast::<InstanceState>()) });
        }
        Ok(())
    })
}

/// Runs a batch of requests, one at a time. Every request gets its response
/// (an error response where it failed) and is released here, so this
/// returns an error only when it could not even read its state, before
/// touching any request.
#[no_mangle]
pub extern "C" fn TRITONBACKEND_ModelInstanceExecute(
    instance: *mut sys::TRITONBACKEND_ModelInstance,
    requests: *mut *mut sys::TRITONBACKEND_Request,
    request_count: u32,
) -> *mut sys::TRITONSERVER_Error {
    let states = catch_unwind(AssertUnwindSafe(|| -> TResult<(&ModelState, &mut InstanceState)> {
        // SAFETY: the server's instance; the states were set at initialization.
        let m = unsafe { model_state(instance) }?;
        let mut p = std::ptr::null_mut();
        check(unsafe { sys::TRITONBACKEND_ModelInstanceState(instance, &mut p) }, "TRITONBACKEND_ModelInstanceState")?;
        // SAFETY: the server calls Execute of one instance from one thread at a time.
        let inst = unsafe { p.cast::<InstanceState>().as_mut() }.ok_or_else(|| TritonError::internal("pipeswitch: the instance has no state"))?;
        Ok((m, inst))
    }));
    let (m, inst) = match states {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return e.into_raw(),
        Err(_) => return TritonError::internal("pipeswitch: reading the instance state panicked").into_raw(),
    };
    let requests: &[*mut sys::TRITONBACKEND_Request] = if requests.is_null() || request_count == 0 {
        &[]
    } else {
        // SAFETY: the server passes `request_count` requests.
        unsafe { std::slice::from_raw_parts(requests, request_count as usize) }
    };
    for &r in requests {
        execute::serve_request(instance, m, inst, r);
    }
    std::ptr::null_mut()
}
