//! `ps_residency_*` and `ps_model_use_*`: the residency manager of an arena,
//! for servers that share one GPU among models in one process.

use std::ffi::{c_char, c_void};
use std::sync::Arc;

use super::arena::arena_ref;
use super::store::store_ref;
use super::worker::{program, worker};
use super::{boundary, handles, out, ps_status, slice_arg, str_arg};
use crate::error::{Error, Result};
use crate::residency::{ModelUse, ResidencyManager};
use crate::worker::RunOptions;

/// The residency manager of one arena: keeps models in a region of it while
/// there is room. Thread-safe.
pub struct ps_residency {
    inner: Arc<ResidencyManager>,
}

/// One use of a model placed by a residency manager; ends with
/// `ps_model_use_free`. Thread-safe (it does not change).
pub struct ps_model_use {
    inner: ModelUse,
}

/// A residency manager's counters.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct ps_residency_stats {
    /// Uses of a model that was resident (or arriving): no copy.
    pub hits: u64,
    /// Uses that started a copy.
    pub misses: u64,
    pub evictions: u64,
    /// Models moved inside the region to make room, and their bytes.
    pub moves: u64,
    pub bytes_moved: u64,
    /// Bytes of completed copies.
    pub bytes_loaded: u64,
    pub failed_loads: u64,
    /// GPU time of completed switches (copies), ms.
    pub switch_ms: f64,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
}

fn manager(p: *const ps_residency) -> Result<Arc<ps_residency>> {
    handles::get(p, "residency")
}

fn use_ref(p: *const ps_model_use) -> Result<Arc<ps_model_use>> {
    handles::get(p, "model use")
}

/// A residency manager that keeps models in `bytes` bytes of `arena` (a
/// region it allocates now; in the arena's owner process).
#[no_mangle]
pub extern "C" fn ps_residency_new(arena: *const super::arena::ps_arena, bytes: u64, residency_out: *mut *mut ps_residency) -> ps_status {
    boundary("ps_residency_new", || {
        let o = out(residency_out, "residency_out")?;
        let m = ResidencyManager::new(&arena_ref(arena)?, bytes)?;
        o.write(handles::register(ps_residency { inner: m }));
        Ok(())
    })
}

/// Frees the manager once every use of it has been freed (uses keep it
/// alive until then). NULL does nothing.
#[no_mangle]
pub extern "C" fn ps_residency_free(residency: *mut ps_residency) -> ps_status {
    boundary("ps_residency_free", || handles::free(residency, "residency"))
}

/// Starts a use of `model` from `store`. A resident model comes back at once
/// with nothing to copy; otherwise the model's pipelined switch starts now
/// with the groups starting at `group_starts` (NULL, 0: one group per
/// layer), evicting least recently used models that are not in use, or
/// moving them to make a contiguous gap. `PS_ERR_ARENA_FULL` says why a
/// model cannot get in (models in use split the space, or it is larger than
/// the region). Wait per group with `ps_model_use_wait_group`, or run the
/// built-in worker with `ps_worker_run_use`.
#[no_mangle]
pub extern "C" fn ps_residency_acquire(
    residency: *const ps_residency,
    store: *const super::store::ps_store,
    model: *const c_char,
    group_starts: *const usize,
    n_groups: usize,
    use_out: *mut *mut ps_model_use,
) -> ps_status {
    boundary("ps_residency_acquire", || {
        let o = out(use_out, "use_out")?;
        let m = manager(residency)?;
        let plan = if n_groups == 0 { None } else { Some(slice_arg(group_starts, n_groups, "group_starts")?) };
        let u = m.inner.acquire(&store_ref(store)?, str_arg(model, "model")?, plan)?;
        o.write(handles::register(ps_model_use { inner: u }));
        Ok(())
    })
}

/// Ends a use; the model stays resident until its room is needed. Free a
/// use only after the GPU work that reads the model has completed (or is
/// ordered before later copies). NULL does nothing.
#[no_mangle]
pub extern "C" fn ps_model_use_free(model_use: *mut ps_model_use) -> ps_status {
    boundary("ps_model_use_free", || handles::free(model_use, "model use"))
}

/// Arena offset of the model's first byte, and whether the use found it
/// placed already (1: no copy was started for it).
#[no_mangle]
pub extern "C" fn ps_model_use_offset(model_use: *const ps_model_use, offset_out: *mut u64, was_hit_out: *mut i32) -> ps_status {
    boundary("ps_model_use_offset", || {
        let o = out(offset_out, "offset_out")?;
        let h = out(was_hit_out, "was_hit_out")?;
        let u = use_ref(model_use)?;
        o.write(u.inner.offset());
        h.write(i32::from(u.inner.was_hit()));
        Ok(())
    })
}

/// Makes `stream` (a CUstream of the device's primary context; NULL: the
/// legacy default stream) wait on the GPU for group `group` of the model;
/// for a resident model there is nothing to wait for.
#[no_mangle]
pub extern "C" fn ps_model_use_wait_group(model_use: *const ps_model_use, group: usize, stream: *mut c_void) -> ps_status {
    boundary("ps_model_use_wait_group", || use_ref(model_use)?.inner.wait_group(group, stream.cast()))
}

/// The group that holds `layer`.
#[no_mangle]
pub extern "C" fn ps_model_use_group_of_layer(model_use: *const ps_model_use, layer: usize, group_out: *mut usize) -> ps_status {
    boundary("ps_model_use_group_of_layer", || {
        let o = out(group_out, "group_out")?;
        o.write(use_ref(model_use)?.inner.group_of_layer(layer)?);
        Ok(())
    })
}

/// Blocks the host until the model has arrived.
#[no_mangle]
pub extern "C" fn ps_model_use_synchronize(model_use: *const ps_model_use) -> ps_status {
    boundary("ps_model_use_synchronize", || use_ref(model_use)?.inner.synchronize())
}

/// Runs `program` (bound to the use's model) on the built-in worker, each
/// group's kernels waiting on the GPU for that group (as `ps_worker_run`).
#[no_mangle]
pub extern "C" fn ps_worker_run_use(
    worker_handle: *mut super::worker::ps_worker,
    program_handle: *const super::worker::ps_program,
    model_use: *const ps_model_use,
    profile: i32,
) -> ps_status {
    boundary("ps_worker_run_use", || {
        let u = use_ref(model_use)?;
        let p = program(program_handle)?;
        let sw = u.inner.switch().ok_or_else(|| Error::InvalidState("the use has no switch to run with".into()))?;
        if p.model().id != u.inner.model().id {
            return Err(Error::invalid(format!(
                "the program is bound to model {:?}, the use is of {:?}",
                p.model().name,
                u.inner.model().name
            )));
        }
        worker(worker_handle)?.run(&p, sw, RunOptions { profile: profile != 0 })
    })
}

/// The manager's counters.
#[no_mangle]
pub extern "C" fn ps_residency_get_stats(residency: *const ps_residency, stats_out: *mut ps_residency_stats) -> ps_status {
    boundary("ps_residency_get_stats", || {
        let o = out(stats_out, "stats_out")?;
        let s = manager(residency)?.inner.stats()?;
        let c = s.counters;
        o.write(ps_residency_stats {
            hits: c.hits,
            misses: c.misses,
            evictions: c.evictions,
            moves: c.moves,
            bytes_moved: c.bytes_moved,
            bytes_loaded: c.bytes_loaded,
            failed_loads: c.failed_loads,
            switch_ms: s.switch_ms,
            capacity_bytes: s.capacity_bytes,
            used_bytes: s.used_bytes,
        });
        Ok(())
    })
}

/// The bytes of `model` in the arena can no longer be trusted (a worker
/// died writing them): it is copied again at its next use.
#[no_mangle]
pub extern "C" fn ps_residency_invalidate(residency: *const ps_residency, store: *const super::store::ps_store, model: *const c_char) -> ps_status {
    boundary("ps_residency_invalidate", || {
        let s = store_ref(store)?;
        manager(residency)?.inner.invalidate(&s, str_arg(model, "model")?)
    })
}
