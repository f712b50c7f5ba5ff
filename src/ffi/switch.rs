//! `ps_switch_*`: the pipelined switch.

use std::ffi::{c_char, c_void};
use std::sync::RwLock;

use super::arena::arena_ref;
use super::store::store_ref;
use super::{boundary, handles, out, ps_status, slice_arg, str_arg};
use crate::error::Result;
use crate::switch::{Chunking, Switch};

/// A switch engine for one device: a copy stream and per-group events,
/// reused by every switch. Thread-safe: a start waits for the calls that
/// read the last switch (a worker's run included) and they wait for it.
pub struct ps_switch {
    inner: RwLock<Switch>,
}

impl handles::Lockable for ps_switch {
    type Inner = Switch;
    fn lock(&self) -> &RwLock<Switch> {
        &self.inner
    }
}

/// The switch of a live handle, shared with other readers for one call.
pub(crate) fn switch_ref(p: *const ps_switch) -> Result<handles::Read<Switch>> {
    handles::read(p, "switch")
}

/// The switch of a live handle, alone for one call (a start, a setting).
pub(crate) fn switch_mut(p: *const ps_switch) -> Result<handles::Write<Switch>> {
    handles::write(p, "switch")
}

fn sw(p: *const ps_switch) -> Result<handles::Read<Switch>> {
    switch_ref(p)
}

/// A switch engine for `device`.
#[no_mangle]
pub extern "C" fn ps_switch_new(device: i32, switch_out: *mut *mut ps_switch) -> ps_status {
    boundary("ps_switch_new", || {
        let o = out(switch_out, "switch_out")?;
        let s = Switch::new(device)?;
        o.write(handles::register(ps_switch { inner: RwLock::new(s) }));
        Ok(())
    })
}

/// Waits for the last switch's copies, then frees the engine. NULL does
/// nothing. A call on it in another thread keeps it until that call returns.
#[no_mangle]
pub extern "C" fn ps_switch_free(switch: *mut ps_switch) -> ps_status {
    boundary("ps_switch_free", || handles::free(switch, "switch"))
}

/// Sets copy chunking: consecutive groups share a copy until it holds
/// `min_chunk` bytes; no copy exceeds `max_chunk` (defaults 4 MiB, 64 MiB).
#[no_mangle]
pub extern "C" fn ps_switch_set_chunking(switch: *mut ps_switch, min_chunk: u64, max_chunk: u64) -> ps_status {
    boundary("ps_switch_set_chunking", || {
        switch_mut(switch)?.set_chunking(Chunking { min_chunk, max_chunk })
    })
}

/// Starts the pipelined switch: copies `model` from `store` into `arena` at
/// `dst_offset` (a region from `ps_arena_alloc` of at least the model's
/// bytes), in the groups that start at `group_starts[0..n_groups]` (from
/// `ps_plan_groups`; the first is 0). Returns once the copies are enqueued.
#[no_mangle]
pub extern "C" fn ps_switch_start(
    switch: *mut ps_switch,
    store: *const super::store::ps_store,
    model: *const c_char,
    arena: *const super::arena::ps_arena,
    dst_offset: u64,
    group_starts: *const usize,
    n_groups: usize,
) -> ps_status {
    boundary("ps_switch_start", || {
        let mut s = switch_mut(switch)?;
        let starts = slice_arg(group_starts, n_groups, "group_starts")?;
        s.start(&store_ref(store)?, str_arg(model, "model")?, &arena_ref(arena)?, dst_offset, starts)
    })
}

/// Starts a whole-model transfer: one copy, one event (group 0). The
/// transfer-then-run baseline.
#[no_mangle]
pub extern "C" fn ps_switch_start_whole(
    switch: *mut ps_switch,
    store: *const super::store::ps_store,
    model: *const c_char,
    arena: *const super::arena::ps_arena,
    dst_offset: u64,
) -> ps_status {
    boundary("ps_switch_start_whole", || {
        let mut s = switch_mut(switch)?;
        s.start_whole(&store_ref(store)?, str_arg(model, "model")?, &arena_ref(arena)?, dst_offset)
    })
}

/// Attaches `model`, whose bytes are already at `dst_offset` of `arena` (a
/// resident model, e.g. as the daemon or a residency manager reports it):
/// no copy; one group (0) that completes as soon as the copy stream reaches
/// it. Workers then run the model exactly as after `ps_switch_start`.
#[no_mangle]
pub extern "C" fn ps_switch_start_resident(
    switch: *mut ps_switch,
    store: *const super::store::ps_store,
    model: *const c_char,
    arena: *const super::arena::ps_arena,
    dst_offset: u64,
) -> ps_status {
    boundary("ps_switch_start_resident", || {
        let mut s = switch_mut(switch)?;
        s.start_resident(&store_ref(store)?, str_arg(model, "model")?, &arena_ref(arena)?, dst_offset)
    })
}

/// Makes `stream` (a CUstream of the device's primary context, e.g. PyTorch's
/// current stream; NULL is the legacy default stream) wait on the GPU for
/// group `group`. The host does not block.
///
/// On a stream that is being captured into a CUDA graph, the wait is captured
/// as an external event-wait node on this switch's event of group `group`:
/// each launch of the graph then waits for that group of the switch most
/// recently started on this handle before the launch (the events are reused
/// by every switch of the handle), so a forward captured once serves every
/// later switch of the same model with the same plan and region.
#[no_mangle]
pub extern "C" fn ps_switch_wait_group(switch: *const ps_switch, group: usize, stream: *mut c_void) -> ps_status {
    boundary("ps_switch_wait_group", || sw(switch)?.wait_group(group, stream.cast()))
}

/// The group that holds `layer` in the last switch.
#[no_mangle]
pub extern "C" fn ps_switch_group_of_layer(switch: *const ps_switch, layer: usize, group_out: *mut usize) -> ps_status {
    boundary("ps_switch_group_of_layer", || {
        let s = sw(switch)?;
        let o = out(group_out, "group_out")?;
        o.write(s.group_of_layer(layer)?);
        Ok(())
    })
}

/// Number of groups of the last switch.
#[no_mangle]
pub extern "C" fn ps_switch_n_groups(switch: *const ps_switch, n_out: *mut usize) -> ps_status {
    boundary("ps_switch_n_groups", || {
        let s = sw(switch)?;
        let o = out(n_out, "n_out")?;
        o.write(s.n_groups()?);
        Ok(())
    })
}

/// Whether group `group` has arrived (non-blocking): 1 or 0 in `ready_out`.
#[no_mangle]
pub extern "C" fn ps_switch_group_ready(switch: *const ps_switch, group: usize, ready_out: *mut i32) -> ps_status {
    boundary("ps_switch_group_ready", || {
        let s = sw(switch)?;
        let o = out(ready_out, "ready_out")?;
        o.write(i32::from(s.group_ready(group)?));
        Ok(())
    })
}

/// Device address (CUdeviceptr) of tensor `tensor` (model order) after the
/// last switch.
#[no_mangle]
pub extern "C" fn ps_switch_tensor_ptr(switch: *const ps_switch, tensor: usize, ptr_out: *mut u64) -> ps_status {
    boundary("ps_switch_tensor_ptr", || {
        let s = sw(switch)?;
        let o = out(ptr_out, "ptr_out")?;
        o.write(s.tensor_ptr(tensor)?.0);
        Ok(())
    })
}

/// Device address of the tensor called `name` after the last switch.
#[no_mangle]
pub extern "C" fn ps_switch_tensor_ptr_by_name(
    switch: *const ps_switch,
    name: *const c_char,
    ptr_out: *mut u64,
) -> ps_status {
    boundary("ps_switch_tensor_ptr_by_name", || {
        let s = sw(switch)?;
        let name = str_arg(name, "name")?;
        let o = out(ptr_out, "ptr_out")?;
        o.write(s.tensor_ptr_by_name(name)?.0);
        Ok(())
    })
}

/// The address at which kernels can read the last switch's model straight
/// from the store's pinned pages over PCIe (tensor `i` is at this address
/// plus its offset): e.g. the few rows of an embedding table that has not
/// arrived yet. Valid while the store stays open.
#[no_mangle]
pub extern "C" fn ps_switch_host_model_ptr(switch: *const ps_switch, ptr_out: *mut u64) -> ps_status {
    boundary("ps_switch_host_model_ptr", || {
        let o = out(ptr_out, "ptr_out")?;
        o.write(sw(switch)?.host_model_base()?);
        Ok(())
    })
}

/// Blocks until the whole model has arrived.
#[no_mangle]
pub extern "C" fn ps_switch_synchronize(switch: *const ps_switch) -> ps_status {
    boundary("ps_switch_synchronize", || sw(switch)?.synchronize())
}

/// GPU time of the last switch's copies in ms (waits for them).
#[no_mangle]
pub extern "C" fn ps_switch_elapsed_ms(switch: *const ps_switch, ms_out: *mut f64) -> ps_status {
    boundary("ps_switch_elapsed_ms", || {
        let s = sw(switch)?;
        let o = out(ms_out, "ms_out")?;
        o.write(s.elapsed_ms()?);
        Ok(())
    })
}

/// The engine's copy stream (a CUstream).
#[no_mangle]
pub extern "C" fn ps_switch_copy_stream(switch: *const ps_switch, stream_out: *mut *mut c_void) -> ps_status {
    boundary("ps_switch_copy_stream", || {
        let s = sw(switch)?;
        let o = out(stream_out, "stream_out")?;
        o.write(s.copy_stream().cast());
        Ok(())
    })
}
