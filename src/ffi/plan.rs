//! `ps_plan_*` and `ps_measure_*`: the optimal grouping and the measurements
//! it is fed with.

use std::ffi::c_char;

use super::store::store_ref;
use super::{boundary, out, ps_status, slice_arg, str_arg};
use crate::error::{Error, Result};
use crate::planner;

fn write_plan(
    plan: &planner::Plan,
    group_starts_out: *mut usize,
    group_starts_capacity: usize,
    n_groups_out: *mut usize,
    makespan_ms_out: *mut f64,
) -> Result<()> {
    let n = out(n_groups_out, "n_groups_out")?;
    let m = out(makespan_ms_out, "makespan_ms_out")?;
    if group_starts_out.is_null() {
        return Err(Error::NullArgument("group_starts_out"));
    }
    if plan.group_starts.len() > group_starts_capacity {
        return Err(Error::BufferTooSmall { needed: plan.group_starts.len(), capacity: group_starts_capacity });
    }
    // SAFETY: the caller passes group_starts_capacity writable elements.
    unsafe { std::ptr::copy_nonoverlapping(plan.group_starts.as_ptr(), group_starts_out, plan.group_starts.len()) };
    n.write(plan.group_starts.len());
    m.write(plan.makespan_ms);
    Ok(())
}

/// The optimal grouping of `n_layers` layers (PipeSwitch's cost model):
/// group k holds layers [s_k, s_{k+1}); its transfer ends at
/// T_k = T_{k-1} + a + sum of its transfer times; its execution ends at
/// E_k = max(E_{k-1}, T_k) + b + sum of its execution times; the plan
/// minimises the last E (exactly). Writes the group starts (the first is 0),
/// their count and the makespan, only on success. NaN, infinite or negative
/// inputs and NULL pointers are errors; `PS_ERR_BUFFER_TOO_SMALL` if the
/// plan has more groups than `group_starts_capacity` (n_layers always suffices).
#[no_mangle]
pub extern "C" fn ps_plan_groups(
    transfer_ms: *const f64,
    exec_ms: *const f64,
    n_layers: usize,
    group_transfer_overhead_ms: f64,
    group_exec_overhead_ms: f64,
    group_starts_out: *mut usize,
    group_starts_capacity: usize,
    n_groups_out: *mut usize,
    makespan_ms_out: *mut f64,
) -> ps_status {
    boundary("ps_plan_groups", || {
        if n_layers == 0 {
            return Err(Error::invalid("n_layers is 0"));
        }
        if transfer_ms.is_null() {
            return Err(Error::NullArgument("transfer_ms"));
        }
        if exec_ms.is_null() {
            return Err(Error::NullArgument("exec_ms"));
        }
        let t = slice_arg(transfer_ms, n_layers, "transfer_ms")?;
        let x = slice_arg(exec_ms, n_layers, "exec_ms")?;
        let plan = planner::plan_groups(t, x, group_transfer_overhead_ms, group_exec_overhead_ms)?;
        write_plan(&plan, group_starts_out, group_starts_capacity, n_groups_out, makespan_ms_out)
    })
}

/// The makespan of a given plan under the same cost model.
#[no_mangle]
pub extern "C" fn ps_plan_makespan(
    transfer_ms: *const f64,
    exec_ms: *const f64,
    n_layers: usize,
    group_transfer_overhead_ms: f64,
    group_exec_overhead_ms: f64,
    group_starts: *const usize,
    n_groups: usize,
    makespan_ms_out: *mut f64,
) -> ps_status {
    boundary("ps_plan_makespan", || {
        if n_layers == 0 || n_groups == 0 {
            return Err(Error::invalid("n_layers and n_groups must be positive"));
        }
        let t = slice_arg(transfer_ms, n_layers, "transfer_ms")?;
        let x = slice_arg(exec_ms, n_layers, "exec_ms")?;
        let s = slice_arg(group_starts, n_groups, "group_starts")?;
        let o = out(makespan_ms_out, "makespan_ms_out")?;
        o.write(planner::makespan(t, x, group_transfer_overhead_ms, group_exec_overhead_ms, s)?);
        Ok(())
    })
}

/// Plans a stored model: per-layer transfer times from its layer sizes over
/// `bandwidth_gbps` (GB/s, e.g. from `ps_measure_h2d`), execution times from
/// the times stored with it (`ps_store_set_layer_exec_ms`; an error if any
/// layer has none), and the two per-group overheads. Output as for
/// `ps_plan_groups`.
#[no_mangle]
pub extern "C" fn ps_plan_model(
    store: *const super::store::ps_store,
    model: *const c_char,
    bandwidth_gbps: f64,
    group_transfer_overhead_ms: f64,
    group_exec_overhead_ms: f64,
    group_starts_out: *mut usize,
    group_starts_capacity: usize,
    n_groups_out: *mut usize,
    makespan_ms_out: *mut f64,
) -> ps_status {
    boundary("ps_plan_model", || {
        let m = store_ref(store)?.model(str_arg(model, "model")?)?;
        let plan = plan_stored_model(&m, bandwidth_gbps, group_transfer_overhead_ms, group_exec_overhead_ms)?;
        write_plan(&plan, group_starts_out, group_starts_capacity, n_groups_out, makespan_ms_out)
    })
}

/// Transfer times of a stored model's layers at `bandwidth_gbps`, in ms.
pub fn layer_transfer_ms(m: &crate::store::Model, bandwidth_gbps: f64) -> Result<Vec<f64>> {
    if !(bandwidth_gbps.is_finite() && bandwidth_gbps > 0.0) {
        return Err(Error::invalid(format!("bandwidth {bandwidth_gbps} GB/s is not a positive number")));
    }
    Ok(m.layers.iter().map(|l| l.bytes as f64 / (bandwidth_gbps * 1e6)).collect())
}

/// The optimal plan of a stored model from its measured execution times.
pub fn plan_stored_model(m: &crate::store::Model, bandwidth_gbps: f64, a: f64, b: f64) -> Result<planner::Plan> {
    let t = layer_transfer_ms(m, bandwidth_gbps)?;
    let x: Vec<f64> = m.layers.iter().map(|l| l.exec_ms).collect();
    if let Some(i) = x.iter().position(|v| v.is_nan()) {
        return Err(Error::InvalidState(format!(
            "model {:?} has no measured execution time for layer {i} ({:?}); store them with ps_store_set_layer_exec_ms",
            m.name, m.layers[i].name
        )));
    }
    Ok(planner::plan_groups(&t, &x, a, b)?)
}

/// Measures on `device` the pinned host-to-device bandwidth (median of one
/// copy of `bytes`, GB/s) and the per-copy overhead in ms (from a linear fit
/// over 64 KiB..64 MiB copies): the planner's bandwidth and `a`. Takes
/// about a second; allocates `max(bytes, 64 MiB)` on host and device.
#[no_mangle]
pub extern "C" fn ps_measure_h2d(
    device: i32,
    bytes: u64,
    bandwidth_gbps_out: *mut f64,
    overhead_ms_out: *mut f64,
) -> ps_status {
    boundary("ps_measure_h2d", || {
        let (bw, a) = (out(bandwidth_gbps_out, "bandwidth_gbps_out")?, out(overhead_ms_out, "overhead_ms_out")?);
        let p = crate::measure::measure_h2d(device, bytes, 9)?;
        bw.write(p.peak_gbps);
        a.write(p.overhead_ms);
        Ok(())
    })
}

// ---------------------------------------------------------------------------
// The fitted cost model (issue 15): planning with it, the closed loop, and
// the record kept with a model in the store.
// ---------------------------------------------------------------------------

/// The terms of the extended cost model (see `ps_plan_groups_cost`). The
/// two-overhead model of `ps_plan_groups` is `{a, b, 0, 1, 0, 0, 0}`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ps_cost_model {
    /// `a`: transfer overhead per group, ms.
    pub transfer_overhead_ms: f64,
    /// `b`: execution overhead per group (its wait and launch), ms.
    pub exec_overhead_ms: f64,
    /// `L`: latency of the first kernel after the first group arrives, ms.
    pub first_kernel_ms: f64,
    /// `κ` (> 0): measured per-layer time to the time it takes in a switch.
    pub exec_scale: f64,
    /// `σ`: relative slowdown of kernels while copies run (all groups but the last).
    pub copy_slowdown: f64,
    /// `R`: no switch ends before `R + h·K` (K groups), ms.
    pub floor_ms: f64,
    /// `h`, ms.
    pub floor_per_group_ms: f64,
}

impl From<ps_cost_model> for planner::Costs {
    fn from(c: ps_cost_model) -> Self {
        planner::Costs {
            transfer_overhead_ms: c.transfer_overhead_ms,
            exec_overhead_ms: c.exec_overhead_ms,
            first_kernel_ms: c.first_kernel_ms,
            exec_scale: c.exec_scale,
            copy_slowdown: c.copy_slowdown,
            floor_ms: c.floor_ms,
            floor_per_group_ms: c.floor_per_group_ms,
        }
    }
}

impl From<planner::Costs> for ps_cost_model {
    fn from(c: planner::Costs) -> Self {
        ps_cost_model {
            transfer_overhead_ms: c.transfer_overhead_ms,
            exec_overhead_ms: c.exec_overhead_ms,
            first_kernel_ms: c.first_kernel_ms,
            exec_scale: c.exec_scale,
            copy_slowdown: c.copy_slowdown,
            floor_ms: c.floor_ms,
            floor_per_group_ms: c.floor_per_group_ms,
        }
    }
}

/// A fitted cost model and the predicted and measured makespans of the plan
/// chosen with it, as kept with a model in the store.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ps_cost_record {
    pub model: ps_cost_model,
    /// Bandwidth the transfer times were computed with, GB/s.
    pub bandwidth_gbps: f64,
    /// Predicted and measured switch + first run of the chosen plan, ms.
    pub predicted_ms: f64,
    pub measured_ms: f64,
    /// Groups of the chosen plan.
    pub groups: u32,
    /// Refit-and-replan rounds the closed loop ran.
    pub rounds: u32,
    /// Root mean square of predicted / measured - 1 over the calibration.
    pub fit_rms_rel_error: f64,
    /// When it was stored, seconds since the Unix epoch (0: unknown).
    pub unix_s: u64,
}

impl From<crate::cost::StoredCost> for ps_cost_record {
    fn from(s: crate::cost::StoredCost) -> Self {
        ps_cost_record {
            model: s.costs.into(),
            bandwidth_gbps: s.bandwidth_gbps,
            predicted_ms: s.predicted_ms,
            measured_ms: s.measured_ms,
            groups: s.groups,
            rounds: s.rounds,
            fit_rms_rel_error: s.fit_rms_rel_error,
            unix_s: s.unix_s,
        }
    }
}

impl From<ps_cost_record> for crate::cost::StoredCost {
    fn from(r: ps_cost_record) -> Self {
        crate::cost::StoredCost {
            costs: r.model.into(),
            bandwidth_gbps: r.bandwidth_gbps,
            predicted_ms: r.predicted_ms,
            measured_ms: r.measured_ms,
            groups: r.groups,
            rounds: r.rounds,
            fit_rms_rel_error: r.fit_rms_rel_error,
            unix_s: r.unix_s,
        }
    }
}

fn cost_arg(model: *const ps_cost_model) -> Result<planner::Costs> {
    if model.is_null() {
        return Err(Error::NullArgument("model"));
    }
    // SAFETY: non-null; the caller passes a readable ps_cost_model.
    Ok(unsafe { *model }.into())
}

/// The optimal grouping under the extended cost model `model`: as
/// `ps_plan_groups`, with the first group's kernels starting `L` later,
/// execution times scaled by `κ` (and `1 + σ` in every group but the last),
/// and the makespan no less than `R + h·K` for `K` groups. Exact.
#[no_mangle]
pub extern "C" fn ps_plan_groups_cost(
    transfer_ms: *const f64,
    exec_ms: *const f64,
    n_layers: usize,
    model: *const ps_cost_model,
    group_starts_out: *mut usize,
    group_starts_capacity: usize,
    n_groups_out: *mut usize,
    makespan_ms_out: *mut f64,
) -> ps_status {
    boundary("ps_plan_groups_cost", || {
        if n_layers == 0 {
            return Err(Error::invalid("n_layers is 0"));
        }
        let costs = cost_arg(model)?;
        let t = slice_arg(transfer_ms, n_layers, "transfer_ms")?;
        let x = slice_arg(exec_ms, n_layers, "exec_ms")?;
        let plan = planner::plan_groups_with(t, x, &costs)?;
        write_plan(&plan, group_starts_out, group_starts_capacity, n_groups_out, makespan_ms_out)
    })
}

/// The makespan of a given plan under the extended cost model `model`.
#[no_mangle]
pub extern "C" fn ps_plan_makespan_cost(
    transfer_ms: *const f64,
    exec_ms: *const f64,
    n_layers: usize,
    model: *const ps_cost_model,
    group_starts: *const usize,
    n_groups: usize,
    makespan_ms_out: *mut f64,
) -> ps_status {
    boundary("ps_plan_makespan_cost", || {
        if n_layers == 0 || n_groups == 0 {
            return Err(Error::invalid("n_layers and n_groups must be positive"));
        }
        let costs = cost_arg(model)?;
        let t = slice_arg(transfer_ms, n_layers, "transfer_ms")?;
        let x = slice_arg(exec_ms, n_layers, "exec_ms")?;
        let s = slice_arg(group_starts, n_groups, "group_starts")?;
        let o = out(makespan_ms_out, "makespan_ms_out")?;
        o.write(planner::makespan_with(t, x, &costs, s)?);
        Ok(())
    })
}

/// Measures one plan for `ps_plan_closed_loop`: writes the switch + first
/// run time of the plan (`n_groups` group starts) to `*ms_out` and returns
/// 0, or returns non-zero to stop the loop (which then fails).
pub type ps_measure_plan_fn =
    Option<unsafe extern "C" fn(user: *mut std::ffi::c_void, group_starts: *const usize, n_groups: usize, ms_out: *mut f64) -> i32>;

/// Closed-loop planning: measures the calibration plans (one group, one
/// group per layer, 2, 4, 8, 16 equal groups) and the `n_extra` plans in
/// `extra_group_starts` (concatenated; `extra_n_groups[i]` starts each), fits
/// the terms b, L, κ, σ, h of `base` (a and R are kept), plans, measures the
/// plan, and while measured and predicted differ by more than `tolerance`
/// (e.g. 0.03) refits and replans, at most `max_rounds` times. Writes the
/// best measured plan and its record (fitted model, predicted, measured;
/// its `bandwidth_gbps` is 0: the loop sees transfer times only, so set it
/// before `ps_store_set_cost`); `measure` is called from this thread only.
#[no_mangle]
pub extern "C" fn ps_plan_closed_loop(
    transfer_ms: *const f64,
    exec_ms: *const f64,
    n_layers: usize,
    base: *const ps_cost_model,
    extra_group_starts: *const usize,
    extra_n_groups: *const usize,
    n_extra: usize,
    measure: ps_measure_plan_fn,
    user: *mut std::ffi::c_void,
    max_rounds: usize,
    tolerance: f64,
    record_out: *mut ps_cost_record,
    group_starts_out: *mut usize,
    group_starts_capacity: usize,
    n_groups_out: *mut usize,
) -> ps_status {
    boundary("ps_plan_closed_loop", || {
        if n_layers == 0 {
            return Err(Error::invalid("n_layers is 0"));
        }
        let costs = cost_arg(base)?;
        let t = slice_arg(transfer_ms, n_layers, "transfer_ms")?;
        let x = slice_arg(exec_ms, n_layers, "exec_ms")?;
        let counts = slice_arg(extra_n_groups, n_extra, "extra_n_groups")?;
        let total = counts.iter().try_fold(0usize, |s, &c| s.checked_add(c)).ok_or_else(|| Error::invalid("extra_n_groups overflow"))?;
        let flat = slice_arg(extra_group_starts, total, "extra_group_starts")?;
        let mut extra = Vec::with_capacity(n_extra);
        let mut pos = 0;
        for &c in counts {
            extra.push(flat[pos..pos + c].to_vec());
            pos += c;
        }
        let Some(measure) = measure else {
            return Err(Error::NullArgument("measure"));
        };
        let record = out(record_out, "record_out")?;
        let n_out = out(n_groups_out, "n_groups_out")?;
        let starts_out = super::slice_mut_arg(group_starts_out, group_starts_capacity, "group_starts_out")?;
        if group_starts_out.is_null() {
            return Err(Error::NullArgument("group_starts_out"));
        }
        let opts = crate::cost::LoopOptions { tolerance, max_rounds, ..Default::default() };
        // The callback gets `user` back untouched; this function never reads it.
        let user_addr = user as usize;
        let mut call = |p: &[usize]| -> Result<f64> {
            let mut ms = f64::NAN;
            // SAFETY: the caller's callback, with its own user pointer, a valid plan and out pointer.
            let rc = unsafe { measure(user_addr as *mut std::ffi::c_void, p.as_ptr(), p.len(), &mut ms) };
            if rc != 0 {
                return Err(Error::InvalidState(format!("the measure callback returned {rc}")));
            }
            Ok(ms)
        };
        let r = crate::cost::plan_closed_loop(t, x, &costs, &extra, opts, &mut call)?;
        if r.group_starts.len() > group_starts_capacity {
            return Err(Error::BufferTooSmall { needed: r.group_starts.len(), capacity: group_starts_capacity });
        }
        let stored = crate::cost::StoredCost::from_loop(&r, 0.0);
        starts_out[..r.group_starts.len()].copy_from_slice(&r.group_starts);
        n_out.write(r.group_starts.len());
        record.write(stored.into());
        Ok(())
    })
}

/// Keeps a cost record with model `model` in the store (in place; any
/// process that opens the store reads it with `ps_store_get_cost`).
#[no_mangle]
pub extern "C" fn ps_store_set_cost(store: *const super::store::ps_store, model: *const c_char, record: *const ps_cost_record) -> ps_status {
    boundary("ps_store_set_cost", || {
        let s = store_ref(store)?;
        let name = str_arg(model, "model")?;
        if record.is_null() {
            return Err(Error::NullArgument("record"));
        }
        let r = slice_arg(record, 1, "record")?[0];
        s.set_cost(name, &r.into())
    })
}

/// Reads the cost record kept with model `model`: `*has_record_out` is 0
/// (and `*record_out` untouched) when there is none, else 1.
#[no_mangle]
pub extern "C" fn ps_store_get_cost(
    store: *const super::store::ps_store,
    model: *const c_char,
    record_out: *mut ps_cost_record,
    has_record_out: *mut u32,
) -> ps_status {
    boundary("ps_store_get_cost", || {
        let s = store_ref(store)?;
        let name = str_arg(model, "model")?;
        let has = out(has_record_out, "has_record_out")?;
        let rec = out(record_out, "record_out")?;
        match s.cost(name)? {
            Some(c) => {
                rec.write(c.into());
                has.write(1);
            }
            None => has.write(0),
        }
        Ok(())
    })
}
