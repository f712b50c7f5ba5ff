//! One request: its inputs read and checked, the model run (switched in by
//! the residency manager where it is not resident), its outputs written in
//! the memory Triton asks for, its response sent, its statistics reported
//! and the request released, also when something fails.

use std::collections::HashMap;
use std::ffi::{c_char, c_void, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use pipeswitch::cuda::memory;
use pipeswitch::error::Result;
use pipeswitch::model::cpu::{run_graph_cpu, HostTensor, HostWeights};
use pipeswitch::protocol::monotonic_ns;
use pipeswitch::store::{Dtype, Model, Store};
use pipeswitch::worker::RunOptions;

use crate::config::wire_type_of;
use crate::sys;
use crate::triton::{check, TResult, TritonError};
use crate::{InstanceState, ModelState};

/// A stored model's weights as fp32 arrays, for the CPU reference.
pub fn host_weights(store: &Store, m: &Model) -> Result<HostWeights> {
    let bytes = store.model_bytes(m)?;
    let mut w = HostWeights::new();
    for t in &m.tensors {
        if t.dtype != Dtype::F32 {
            continue;
        }
        let b = &bytes[t.offset as usize..(t.offset + t.bytes) as usize];
        let v: Vec<f32> = b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        w.insert(t.name.clone(), (t.shape.iter().map(|&d| d as usize).collect(), v));
    }
    Ok(w)
}

/// Triton's data type of a stored dtype.
fn triton_type(d: Dtype) -> sys::TRITONSERVER_DataType {
    match d {
        Dtype::Bool => sys::TRITONSERVER_TYPE_BOOL,
        Dtype::U8 => sys::TRITONSERVER_TYPE_UINT8,
        Dtype::I8 => sys::TRITONSERVER_TYPE_INT8,
        Dtype::I16 => sys::TRITONSERVER_TYPE_INT16,
        Dtype::U16 => sys::TRITONSERVER_TYPE_UINT16,
        Dtype::F16 => sys::TRITONSERVER_TYPE_FP16,
        Dtype::Bf16 => sys::TRITONSERVER_TYPE_BF16,
        Dtype::I32 => sys::TRITONSERVER_TYPE_INT32,
        Dtype::U32 => sys::TRITONSERVER_TYPE_UINT32,
        Dtype::F32 => sys::TRITONSERVER_TYPE_FP32,
        Dtype::I64 => sys::TRITONSERVER_TYPE_INT64,
        Dtype::U64 => sys::TRITONSERVER_TYPE_UINT64,
        Dtype::F64 => sys::TRITONSERVER_TYPE_FP64,
        Dtype::F8E4M3 | Dtype::F8E5M2 => sys::TRITONSERVER_TYPE_INVALID,
    }
}

fn type_name(t: sys::TRITONSERVER_DataType) -> String {
    // SAFETY: returns a static string for any value.
    unsafe { crate::triton::string(sys::TRITONSERVER_DataTypeString(t)) }
}

/// Timestamps of one request (steady clock, ns), as Triton's statistics take them.
#[derive(Default, Clone, Copy)]
struct Times {
    exec_start: u64,
    compute_start: u64,
    compute_end: u64,
}

/// Serves one request to the end: a response is sent (with the error where
/// anything failed), statistics are reported and the request is released.
pub fn serve_request(
    instance: *mut sys::TRITONBACKEND_ModelInstance,
    m: &ModelState,
    inst: &mut InstanceState,
    request: *mut sys::TRITONBACKEND_Request,
) {
    let mut times = Times { exec_start: monotonic_ns(), ..Times::default() };
    let mut response: *mut sys::TRITONBACKEND_Response = std::ptr::null_mut();
    // SAFETY: a request the server handed to Execute, not yet released.
    let created = check(unsafe { sys::TRITONBACKEND_ResponseNew(&mut response, request) }, "TRITONBACKEND_ResponseNew");
    let result = match created {
        Ok(()) => match catch_unwind(AssertUnwindSafe(|| run_request(m, inst, request, response, &mut times))) {
            Ok(r) => r,
            Err(_) => Err(TritonError::internal(format!("pipeswitch: model {:?}: the request panicked", m.name))),
        },
        Err(e) => Err(e),
    };
    if times.compute_start == 0 {
        times.compute_start = monotonic_ns();
    }
    if times.compute_end == 0 {
        times.compute_end = monotonic_ns();
    }
    let ok = result.is_ok();
    if let Err(e) = &result {
        crate::triton::warn(&format!("pipeswitch: model {:?}, instance {:?}: request failed: {}", m.name, inst.name, e.message));
    }
    if !response.is_null() {
        let err = match result {
            Ok(()) => std::ptr::null_mut(),
            Err(e) => e.into_raw(),
        };
        // SAFETY: the response is ours and the server takes it; `err` stays
        // ours (the server copies its code and message), deleted here.
        let sent = check(
            unsafe { sys::TRITONBACKEND_ResponseSend(response, sys::TRITONSERVER_RESPONSE_COMPLETE_FINAL, err) },
            "TRITONBACKEND_ResponseSend",
        );
        if !err.is_null() {
            unsafe { sys::TRITONSERVER_ErrorDelete(err) };
        }
        if let Err(e) = sent {
            crate::triton::warn(&format!("pipeswitch: model {:?}: {}", m.name, e.message));
        }
    }
    let exec_end = monotonic_ns();
    // SAFETY: instance and request are the server's, the request not yet released.
    unsafe {
        let stats = sys::TRITONBACKEND_ModelInstanceReportStatistics(
            instance,
            request,
            ok,
            times.exec_start,
            times.compute_start,
            times.compute_end,
            exec_end,
        );
        let _ = check(stats, "TRITONBACKEND_ModelInstanceReportStatistics");
        if ok {
            let batch = sys::TRITONBACKEND_ModelInstanceReportBatchStatistics(
                instance,
                1,
                times.exec_start,
                times.compute_start,
                times.compute_end,
                exec_end,
            );
            let _ = check(batch, "TRITONBACKEND_ModelInstanceReportBatchStatistics");
        }
        let released = sys::TRITONBACKEND_RequestRelease(request, sys::TRITONSERVER_REQUEST_RELEASE_ALL);
        if let Err(e) = check(released, "TRITONBACKEND_RequestRelease") {
            crate::triton::warn(&format!("pipeswitch: model {:?}: {}", m.name, e.message));
        }
    }
}

/// Copies `bytes` from memory of `kind` at `src` into `dst` on the host.
///
/// # Safety
/// `src` holds `dst.len()` bytes of that kind.
unsafe fn copy_in(dst: &mut [u8], src: *const c_void, kind: sys::TRITONSERVER_MemoryType) -> TResult<()> {
    if kind == sys::TRITONSERVER_MEMORY_GPU {
        memory::copy_dtoh(dst.as_mut_ptr(), src as u64, dst.len())?;
    } else {
        std::ptr::copy_nonoverlapping(src.cast::<u8>(), dst.as_mut_ptr(), dst.len());
    }
    Ok(())
}

/// Reads and checks the request's inputs against the graph's.
fn read_inputs(m: &ModelState, request: *mut sys::TRITONBACKEND_Request) -> TResult<Vec<(String, Dtype, Vec<u8>)>> {
    let graph = m.program.graph();
    let expected = || {
        graph
            .inputs
            .iter()
            .map(|(n, d)| format!("{n} ({} {:?})", d.dtype().ok().and_then(wire_type_of).unwrap_or("?"), d.shape))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut count = 0u32;
    // SAFETY: the server's request.
    check(unsafe { sys::TRITONBACKEND_RequestInputCount(request, &mut count) }, "TRITONBACKEND_RequestInputCount")?;
    for i in 0..count {
        let mut name: *const c_char = std::ptr::null();
        check(unsafe { sys::TRITONBACKEND_RequestInputName(request, i, &mut name) }, "TRITONBACKEND_RequestInputName")?;
        let name = unsafe { crate::triton::string(name) };
        if !graph.inputs.iter().any(|(n, _)| *n == name) {
            return Err(TritonError::invalid(format!("model {:?} has no input {name:?}; it takes {}", m.name, expected())));
        }
    }
    let mut out = Vec::with_capacity(graph.inputs.len());
    for (name, decl) in &graph.inputs {
        let dtype = decl.dtype()?;
        let cname = CString::new(name.as_str()).map_err(|_| TritonError::internal("input name with NUL"))?;
        let mut input = std::ptr::null_mut();
        if check(unsafe { sys::TRITONBACKEND_RequestInput(request, cname.as_ptr(), &mut input) }, "input").is_err() {
            return Err(TritonError::invalid(format!("model {:?}: the request lacks input {name:?}; it takes {}", m.name, expected())));
        }
        let (mut dt, mut shape, mut dims, mut byte_size, mut buffers) = (0, std::ptr::null(), 0u32, 0u64, 0u32);
        let mut iname: *const c_char = std::ptr::null();
        check(
            unsafe { sys::TRITONBACKEND_InputProperties(input, &mut iname, &mut dt, &mut shape, &mut dims, &mut byte_size, &mut buffers) },
            "TRITONBACKEND_InputProperties",
        )?;
        let shape: &[i64] = if shape.is_null() || dims == 0 { &[] } else { unsafe { std::slice::from_raw_parts(shape, dims as usize) } };
        if dt != triton_type(dtype) {
            return Err(TritonError::invalid(format!(
                "model {:?}: input {name:?} is {}, the model takes {}",
                m.name,
                type_name(dt),
                type_name(triton_type(dtype))
            )));
        }
        let want: Vec<i64> = decl.shape.iter().map(|&d| d as i64).collect();
        if shape != want.as_slice() {
            return Err(TritonError::invalid(format!("model {:?}: input {name:?} has shape {shape:?}, the model takes {want:?}", m.name)));
        }
        let need = decl.bytes()? as u64;
        if byte_size != need {
            return Err(TritonError::invalid(format!("model {:?}: input {name:?} has {byte_size} bytes, the model takes {need}", m.name)));
        }
        let mut data = vec![0u8; need as usize];
        let mut at = 0usize;
        for b in 0..buffers {
            let (mut ptr, mut size, mut kind, mut kind_id) = (std::ptr::null(), 0u64, sys::TRITONSERVER_MEMORY_CPU, 0i64);
            check(unsafe { sys::TRITONBACKEND_InputBuffer(input, b, &mut ptr, &mut size, &mut kind, &mut kind_id) }, "TRITONBACKEND_InputBuffer")?;
            let end = at + size as usize;
            if end > data.len() || (size > 0 && ptr.is_null()) {
                return Err(TritonError::invalid(format!("model {:?}: input {name:?}: its buffers exceed {need} bytes", m.name)));
            }
            // SAFETY: the server's buffer of `size` bytes of that kind.
            unsafe { copy_in(&mut data[at..end], ptr, kind) }?;
            at = end;
        }
        if at != data.len() {
            return Err(TritonError::invalid(format!("model {:?}: input {name:?}: {at} bytes in its buffers, {need} expected", m.name)));
        }
        out.push((name.clone(), dtype, data));
    }
    Ok(out)
}

/// Most time a request waits for room that models in use by other
/// instances hold.
const ROOM_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Starts a use of the model. Where the models other instances are running
/// hold the room it needs, waits for them to finish (they release it as soon
/// as their outputs are read); a model larger than the whole residency area
/// fails at once.
fn acquire(gpu: &crate::state::Gpu, m: &ModelState, plan: &[usize]) -> TResult<pipeswitch::residency::ModelUse> {
    let t0 = std::time::Instant::now();
    loop {
        match gpu.residency.acquire(&m.store, &m.config.model, Some(plan)) {
            Err(pipeswitch::Error::ArenaFull(msg)) => {
                let capacity = gpu.residency.stats()?.capacity_bytes;
                let need = m.program.model().bytes.div_ceil(pipeswitch::arena::REGION_ALIGN) * pipeswitch::arena::REGION_ALIGN;
                if need > capacity || t0.elapsed() > ROOM_WAIT {
                    return Err(TritonError::unavailable(format!("pipeswitch: model {:?}: {msg}", m.name)));
                }
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
            r => return Ok(r?),
        }
    }
}

/// The outputs of a run: still in the worker's activation buffer (read
/// straight into Triton's buffers, then the model use ends), or on the host.
enum Outputs {
    Gpu(pipeswitch::residency::ModelUse),
    Host(HashMap<String, Vec<u8>>),
}

/// Runs the model on the inputs (enqueued; the outputs are read later).
fn compute(m: &ModelState, inst: &mut InstanceState, inputs: &[(String, Dtype, Vec<u8>)]) -> TResult<Outputs> {
    let program = &m.program;
    match (&mut inst.gpu, &m.host_weights) {
        (Some((gpu, worker, plan)), _) => {
            worker.device().bind()?;
            let model_use = acquire(gpu, m, plan)?;
            for (name, _, data) in inputs {
                worker.set_input(program, name, data)?;
            }
            let switch = model_use.switch().ok_or_else(|| TritonError::internal("pipeswitch: the model use has no switch"))?;
            worker.run(program, switch, RunOptions::default())?;
            Ok(Outputs::Gpu(model_use))
        }
        (None, Some(weights)) => {
            let mut host = HashMap::new();
            for (name, dtype, data) in inputs {
                let t = match dtype {
                    Dtype::F32 => HostTensor::F32(data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()),
                    Dtype::I32 => HostTensor::I32(data.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()),
                    d => return Err(TritonError::invalid(format!("the CPU reference takes F32 and I32 inputs, not {}", d.name()))),
                };
                host.insert(name.clone(), t);
            }
            let mut outs = HashMap::new();
            for (name, v) in run_graph_cpu(program.graph(), weights, &host)? {
                outs.insert(name, v.iter().flat_map(|x| x.to_le_bytes()).collect());
            }
            Ok(Outputs::Host(outs))
        }
        (None, None) => Err(TritonError::internal("pipeswitch: the instance has neither a GPU nor the CPU reference")),
    }
}

fn run_request(
    m: &ModelState,
    inst: &mut InstanceState,
    request: *mut sys::TRITONBACKEND_Request,
    response: *mut sys::TRITONBACKEND_Response,
    times: &mut Times,
) -> TResult<()> {
    if let Some((gpu, _, _)) = &inst.gpu {
        // Triton may call Execute from another thread than Initialize.
        gpu.arena.device().bind()?;
    }
    let inputs = read_inputs(m, request)?;
    let mut count = 0u32;
    check(unsafe { sys::TRITONBACKEND_RequestOutputCount(request, &mut count) }, "TRITONBACKEND_RequestOutputCount")?;
    let mut names = Vec::new();
    for i in 0..count {
        let mut name: *const c_char = std::ptr::null();
        check(unsafe { sys::TRITONBACKEND_RequestOutputName(request, i, &mut name) }, "TRITONBACKEND_RequestOutputName")?;
        names.push(unsafe { crate::triton::string(name) });
    }
    if names.is_empty() {
        names = m.program.graph().outputs.clone();
    }
    for name in &names {
        if !m.program.graph().outputs.contains(name) {
            return Err(TritonError::invalid(format!(
                "model {:?} has no output {name:?}; its outputs: {}",
                m.name,
                m.program.graph().outputs.join(", ")
            )));
        }
    }
    times.compute_start = monotonic_ns();
    let mut outs = compute(m, inst, &inputs)?;
    if let Outputs::Gpu(u) = &outs {
        // Whether the request had to switch its model in (no: it was resident
        // or already arriving), for clients that measure switches.
        let key = c"pipeswitch_switched";
        let set = unsafe { sys::TRITONBACKEND_ResponseSetBoolParameter(response, key.as_ptr(), !u.was_hit()) };
        check(set, "TRITONBACKEND_ResponseSetBoolParameter")?;
    }
    for name in names {
        let slot = m.program.slot(&name)?;
        let shape: Vec<i64> = slot.shape.iter().map(|&d| d as i64).collect();
        let bytes = slot.bytes as usize;
        let cname = CString::new(name.as_str()).map_err(|_| TritonError::internal("output name with NUL"))?;
        let mut output = std::ptr::null_mut();
        check(
            unsafe {
                sys::TRITONBACKEND_ResponseOutput(response, &mut output, cname.as_ptr(), triton_type(slot.dtype), shape.as_ptr(), shape.len() as u32)
            },
            "TRITONBACKEND_ResponseOutput",
        )?;
        // Host memory preferred; Triton may hand GPU memory instead.
        let (mut buf, mut kind, mut kind_id) = (std::ptr::null_mut(), sys::TRITONSERVER_MEMORY_CPU, 0i64);
        check(
            unsafe { sys::TRITONBACKEND_OutputBuffer(output, &mut buf, bytes as u64, &mut kind, &mut kind_id) },
            "TRITONBACKEND_OutputBuffer",
        )?;
        if bytes == 0 {
            continue;
        }
        if buf.is_null() {
            return Err(TritonError::internal(format!("pipeswitch: no buffer for output {name:?}")));
        }
        let host: Option<Vec<u8>> = match (&mut outs, kind == sys::TRITONSERVER_MEMORY_GPU) {
            (Outputs::Gpu(_), false) => {
                let (_, worker, _) = inst.gpu.as_mut().ok_or_else(|| TritonError::internal("pipeswitch: no worker"))?;
                // SAFETY: the server's host buffer of `bytes` bytes, ours until the response is sent.
                let out = unsafe { std::slice::from_raw_parts_mut(buf.cast::<u8>(), bytes) };
                worker.read(&m.program, &name, out)?;
                None
            }
            (Outputs::Gpu(_), true) => {
                let (_, worker, _) = inst.gpu.as_mut().ok_or_else(|| TritonError::internal("pipeswitch: no worker"))?;
                let mut v = vec![0u8; bytes];
                worker.read(&m.program, &name, &mut v)?;
                Some(v)
            }
            (Outputs::Host(h), _) => Some(h.remove(&name).ok_or_else(|| TritonError::internal(format!("no output {name:?}")))?),
        };
        if let Some(data) = host {
            if data.len() != bytes {
                return Err(TritonError::internal(format!("output {name:?}: {} bytes, {bytes} declared", data.len())));
            }
            // SAFETY: the server's buffer of `bytes` bytes of that kind.
            unsafe {
                if kind == sys::TRITONSERVER_MEMORY_GPU {
                    memory::copy_htod(buf as u64, data.as_ptr(), bytes)?;
                } else {
                    std::ptr::copy_nonoverlapping(data.as_ptr(), buf.cast::<u8>(), bytes);
                }
            }
        }
    }
    // The outputs are read (the run is over): the model use may end.
    drop(outs);
    times.compute_end = monotonic_ns();
    Ok(())
}
