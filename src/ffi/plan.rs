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
