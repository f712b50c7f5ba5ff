//! `ps_program_*` and `ps_worker_*`: the built-in worker, which runs a
//! stored model's graph from the arena as its groups arrive.

use std::ffi::{c_char, c_void};
use std::ops::Deref;
use std::sync::{Arc, RwLock};

use super::arena::arena_ref;
use super::store::store_ref;
use super::{boundary, handles, out, ps_status, str_arg};
use crate::error::{Error, Result};
use crate::worker::{Program, RunOptions, Worker};

/// A stored model's graph bound to the model (weights, activation layout).
/// Thread-safe (it does not change).
pub struct ps_program {
    inner: Program,
}

impl Deref for ps_program {
    type Target = Program;
    fn deref(&self) -> &Program {
        &self.inner
    }
}

/// A worker: a compute stream and an activation buffer from the arena.
/// Thread-safe: calls on one worker take turns (a run holds its switch, so
/// the switch's next start waits until the run is enqueued).
pub struct ps_worker {
    inner: RwLock<Worker>,
}

impl handles::Lockable for ps_worker {
    type Inner = Worker;
    fn lock(&self) -> &RwLock<Worker> {
        &self.inner
    }
}

/// The program of a live handle, held for one call.
pub(crate) fn program(p: *const ps_program) -> Result<Arc<ps_program>> {
    handles::get(p, "program")
}

/// The worker of a live handle, alone for one call.
pub(crate) fn worker(w: *const ps_worker) -> Result<handles::Write<Worker>> {
    handles::write(w, "worker")
}

/// The worker of a live handle, shared with other readers for one call.
pub(crate) fn worker_ref(w: *const ps_worker) -> Result<handles::Read<Worker>> {
    handles::read(w, "worker")
}

/// The program of `model`, whose graph was stored with it (a safetensors
/// file's `pipeswitch.graph` metadata). `PS_ERR_NOT_FOUND` if the model has
/// no graph; `PS_ERR_INVALID_ARGUMENT` if the graph does not fit the model.
#[no_mangle]
pub extern "C" fn ps_program_from_store(
    store: *const super::store::ps_store,
    model: *const c_char,
    program_out: *mut *mut ps_program,
) -> ps_status {
    boundary("ps_program_from_store", || {
        let o = out(program_out, "program_out")?;
        let store = store_ref(store)?;
        let p = Program::from_store(&store, str_arg(model, "model")?)?;
        o.write(handles::register(ps_program { inner: p }));
        Ok(())
    })
}

/// Frees a program. NULL does nothing.
#[no_mangle]
pub extern "C" fn ps_program_free(program: *mut ps_program) -> ps_status {
    boundary("ps_program_free", || handles::free(program, "program"))
}

/// Bytes of activation buffer the program needs (inputs and outputs included).
#[no_mangle]
pub extern "C" fn ps_program_activation_bytes(program: *const ps_program, bytes_out: *mut u64) -> ps_status {
    boundary("ps_program_activation_bytes", || {
        let o = out(bytes_out, "bytes_out")?;
        o.write(self::program(program)?.activation_bytes());
        Ok(())
    })
}

/// Bytes of input or output `name` (for `ps_worker_set_input` / `ps_worker_read`).
#[no_mangle]
pub extern "C" fn ps_program_tensor_bytes(program: *const ps_program, name: *const c_char, bytes_out: *mut u64) -> ps_status {
    boundary("ps_program_tensor_bytes", || {
        let o = out(bytes_out, "bytes_out")?;
        o.write(self::program(program)?.slot(str_arg(name, "name")?)?.bytes);
        Ok(())
    })
}

/// Number of inputs of the program (e.g. `input_ids`, `images`).
#[no_mangle]
pub extern "C" fn ps_program_n_inputs(program: *const ps_program, n_out: *mut usize) -> ps_status {
    boundary("ps_program_n_inputs", || {
        let o = out(n_out, "n_out")?;
        o.write(self::program(program)?.graph().inputs.len());
        Ok(())
    })
}

/// Name of input `index` into `(buf, cap)` (NUL-terminated; `len_out`, if
/// not NULL, gets its length, also when `cap` is too small).
#[no_mangle]
pub extern "C" fn ps_program_input_name(program: *const ps_program, index: usize, buf: *mut c_char, cap: usize, len_out: *mut usize) -> ps_status {
    boundary("ps_program_input_name", || {
        let p = self::program(program)?;
        let (name, _) = p.graph().inputs.get(index).ok_or_else(|| Error::invalid(format!("input {index} out of range: the program has {}", p.graph().inputs.len())))?;
        super::write_str(name, buf, cap, len_out)
    })
}

/// Number of outputs of the program.
#[no_mangle]
pub extern "C" fn ps_program_n_outputs(program: *const ps_program, n_out: *mut usize) -> ps_status {
    boundary("ps_program_n_outputs", || {
        let o = out(n_out, "n_out")?;
        o.write(self::program(program)?.graph().outputs.len());
        Ok(())
    })
}

/// Name of output `index` (float32), like `ps_program_input_name`.
#[no_mangle]
pub extern "C" fn ps_program_output_name(program: *const ps_program, index: usize, buf: *mut c_char, cap: usize, len_out: *mut usize) -> ps_status {
    boundary("ps_program_output_name", || {
        let p = self::program(program)?;
        let name = p.graph().outputs.get(index).ok_or_else(|| Error::invalid(format!("output {index} out of range: the program has {}", p.graph().outputs.len())))?;
        super::write_str(name, buf, cap, len_out)
    })
}

/// A worker running models switched into `arena`. In the process that owns
/// the arena its activations take a region of the arena (size the arena
/// for the models plus `ps_program_activation_bytes`); elsewhere they come
/// from the arena's workspace attached with `ps_workspace_attach`.
#[no_mangle]
pub extern "C" fn ps_worker_new(arena: *const super::arena::ps_arena, worker_out: *mut *mut ps_worker) -> ps_status {
    boundary("ps_worker_new", || {
        let o = out(worker_out, "worker_out")?;
        let w = Worker::new(&arena_ref(arena)?)?;
        o.write(handles::register(ps_worker { inner: RwLock::new(w) }));
        Ok(())
    })
}

/// Waits for the worker's last run, returns its activation buffer to the
/// arena and frees it. NULL does nothing. A call on it in another thread
/// keeps it until that call returns.
#[no_mangle]
pub extern "C" fn ps_worker_free(worker: *mut ps_worker) -> ps_status {
    boundary("ps_worker_free", || handles::free(worker, "worker"))
}

/// Makes the worker's activation buffer big enough for `program` (from the
/// arena: call it before switching, never during a switch).
#[no_mangle]
pub extern "C" fn ps_worker_prepare(worker: *mut ps_worker, program: *const ps_program) -> ps_status {
    boundary("ps_worker_prepare", || {
        let mut w = self::worker(worker)?;
        let p = self::program(program)?;
        w.prepare(&p)
    })
}

/// Copies `bytes` bytes of input `name` (dtype and shape as in the graph:
/// e.g. int32 token ids `[batch, seq]`) to the device, ordered after the
/// worker's previous run and before its next one. The bytes go through the
/// worker's pinned staging, so `data` may be reused when this returns.
#[no_mangle]
pub extern "C" fn ps_worker_set_input(
    worker: *mut ps_worker,
    program: *const ps_program,
    name: *const c_char,
    data: *const c_void,
    bytes: usize,
) -> ps_status {
    boundary("ps_worker_set_input", || {
        let data = super::slice_arg(data.cast::<u8>(), bytes, "data")?;
        let mut w = self::worker(worker)?;
        let p = self::program(program)?;
        w.set_input(&p, str_arg(name, "name")?, data)
    })
}

/// Enqueues one run of `program` on the model `switch` started copying;
/// every group is waited for on the GPU. `profile` != 0 records an event per
/// op (for `ps_worker_layer_ms`). Returns once enqueued.
#[no_mangle]
pub extern "C" fn ps_worker_run(
    worker: *mut ps_worker,
    program: *const ps_program,
    switch: *const super::switch::ps_switch,
    profile: i32,
) -> ps_status {
    boundary("ps_worker_run", || {
        // The switch is checked first (as it always was), locked second: a
        // call that takes two locks takes the worker's first.
        super::switch::switch_ref(switch)?;
        let mut w = self::worker(worker)?;
        let p = self::program(program)?;
        let sw = super::switch::switch_ref(switch)?;
        w.run(&p, &sw, RunOptions { profile: profile != 0 })
    })
}

/// Waits for the worker's last run.
#[no_mangle]
pub extern "C" fn ps_worker_synchronize(worker: *mut ps_worker) -> ps_status {
    boundary("ps_worker_synchronize", || worker_ref(worker)?.synchronize())
}

/// Waits for the last run and copies output (or activation) `name` into
/// `(out, bytes)`; `bytes` must be its exact size. `PS_ERR_INVALID_ARGUMENT`
/// if an input token id was out of range.
#[no_mangle]
pub extern "C" fn ps_worker_read(
    worker: *mut ps_worker,
    program: *const ps_program,
    name: *const c_char,
    out_buf: *mut c_void,
    bytes: usize,
) -> ps_status {
    boundary("ps_worker_read", || {
        if out_buf.is_null() {
            return Err(Error::NullArgument("out"));
        }
        let buf = super::slice_mut_arg(out_buf.cast::<u8>(), bytes, "out")?;
        let mut w = self::worker(worker)?;
        let p = self::program(program)?;
        w.read(&p, str_arg(name, "name")?, buf)
    })
}

/// Per-layer execution times (ms) of the last profiled run, into
/// `ms_out[0..n_layers]` (`n_layers` must be the model's layer count).
/// Store them with `ps_store_set_layer_exec_ms` so the planner plans from
/// measured numbers.
#[no_mangle]
pub extern "C" fn ps_worker_layer_ms(worker: *mut ps_worker, program: *const ps_program, ms_out: *mut f64, n_layers: usize) -> ps_status {
    boundary("ps_worker_layer_ms", || {
        if ms_out.is_null() {
            return Err(Error::NullArgument("ms_out"));
        }
        let p = self::program(program)?;
        let ms = worker_ref(worker)?.layer_ms(&p)?;
        if ms.len() != n_layers {
            return Err(Error::invalid(format!("model {:?} has {} layers, n_layers is {n_layers}", p.model().name, ms.len())));
        }
        super::slice_mut_arg(ms_out, n_layers, "ms_out")?.copy_from_slice(&ms);
        Ok(())
    })
}
