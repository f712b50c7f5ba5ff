//! Optimal layer grouping for pipelined model transmission (PipeSwitch, OSDI 2020).
//!
//! # Model
//!
//! A model has `n` layers in execution order; layer `i` takes `t_i` ms to copy
//! over PCIe and `x_i` ms to execute. A plan partitions the layers into
//! consecutive groups; group `k` holds layers `[s_k, s_{k+1})` with `s_0 = 0`.
//! Each group pays a transfer overhead `a` and an execution overhead `b`:
//!
//! ```text
//! T_k = T_{k-1} + a + sum_{i in group k} t_i                  (transfer of group k ends)
//! E_k = max(E_{k-1}, T_k) + b + sum_{i in group k} x_i        (execution of group k ends)
//! T_0 = E_0 = 0
//! ```
//!
//! The makespan of a plan is the `E` of its last group; [`plan_groups`] returns
//! a plan minimising it.
//!
//! # The extended cost model ([`Costs`], [`plan_groups_with`])
//!
//! What a GPU does differs from the two-overhead model in ways measurements
//! show (see `crate::cost`, which fits these terms): the first kernel starts
//! `L` after its group arrives; every layer's measured time is off by a
//! factor `κ` (profiling probes, launch gaps); kernels run `σ` slower while
//! copies still run (every group but the last); and a run cannot end before
//! a floor `R + h·K` (a host-bound forward: `R` is the ready run, `h` the
//! host cost of one group's wait). For a plan of `K` groups:
//!
//! ```text
//! E_k = max(E_{k-1}, T_k) + [k = 1]·L + b + κ·(1 + [k < K]·σ)·sum_{i in group k} x_i
//! makespan = max(E_K, R + h·K)
//! ```
//!
//! With `L = σ = R = h = 0` and `κ = 1` this is the model above. The DP below
//! stays exact: `L` only enters the first row, the last group's unscaled
//! execution is a separate exact transition into `f(k, n)` (the last group is
//! the one ending at `n`), and the floor depends on `K` only, which the DP
//! enumerates. The memory of the back-pointers is bounded by
//! [`MAX_BACKPOINTERS`]; a search that would need more fails with
//! [`PlanError::TooLarge`] instead of growing without bound.
//!
//! # Algorithm
//!
//! Let `P(i)`, `X(i)` be the prefix sums of `t` and `x` over the first `i`
//! layers, and `f(k, i)` the smallest `E` over all plans of the first `i`
//! layers with exactly `k` groups. For a fixed `(k, i)` the transfer end
//! `T = k·a + P(i)` does not depend on where the groups are cut, and the rest
//! of the schedule depends only on `(T, E)` and is monotone non-decreasing in
//! `E`; so keeping the minimal `E` per `(k, i)` loses nothing:
//!
//! ```text
//! f(0, 0) = 0
//! f(k, i) = b + X(i) + min_{j < i} h_j(T),   h_j(T) = max(f(k-1, j), T) - X(j)
//! ```
//!
//! and the optimum is `min_k f(k, n)`. Evaluating the minimum naively costs
//! `O(n)` per state (`O(n³)` overall). Instead, for a fixed `k` the states are
//! swept by increasing `i`, so `T` only grows, and a monotone queue keeps the
//! candidates `j` that can still be optimal:
//!
//! * if `j₁ < j₂` and `f(k-1, j₂) - X(j₂) <= f(k-1, j₁) - X(j₁)`, then
//!   `h_{j₂} <= h_{j₁}` for every `T` (because `X(j₂) >= X(j₁)`), so `j₁` is
//!   dropped for good when `j₂` arrives. The queue therefore holds strictly
//!   increasing `u_j = f(k-1, j) - X(j)` and hence strictly increasing
//!   activation points `f(k-1, j)`;
//! * once `T >= f(k-1, j)` ("active"), `h_j(T) = T - X(j)`, so among active
//!   candidates the latest one is best, now and for every larger `T`; earlier
//!   active candidates are popped from the front;
//! * inactive candidates cost `u_j`, smallest at the first inactive one.
//!
//! The minimum is thus attained at one of the first two queue entries, and each
//! `j` enters and leaves the queue once: `O(n)` per group count `k`. The group
//! counts are tried in increasing order and the search stops at the first `k`
//! whose lower bound `max(k·a + P(n) + b + x_{n-1}, a + t_0 + k·b + X(n))`
//! (non-decreasing in `k`) cannot beat the best makespan found. Every step is
//! an exact equivalence or a proven bound, so the result is the exact optimum.
//! Time is `O(n·K)` and memory `O(n·K)` (the back-pointers, 4 bytes each), where
//! `K <= n` is the number of group counts examined; at worst (`a = b = 0`)
//! `O(n²)`, so `n·K` is capped at [`MAX_BACKPOINTERS`] (an error beyond).
//!
//! Ties: a plan with more groups replaces the best one only when its makespan
//! is smaller by more than a relative `1e-12`, so among (near-)optimal plans the
//! one with the fewest groups wins. The reported makespan is recomputed by
//! [`makespan`], so it is exactly what the simulation of the plan gives.

use std::collections::VecDeque;
use std::iter;

/// Relative tolerance under which two makespans count as equal (fewer groups win).
const TIE_RELATIVE_TOLERANCE: f64 = 1e-12;

/// Marks a back-pointer that was never set.
const NO_PARENT: u32 = u32::MAX;

/// The most back-pointers one plan search may keep (`n + 1` per group count
/// examined, 4 bytes each: 256 MiB). Beyond it [`plan_groups`] fails with
/// [`PlanError::TooLarge`]; positive overheads (which end the search after
/// few group counts) or merging layers keep a model below it.
pub const MAX_BACKPOINTERS: usize = 1 << 26;

/// The terms of the cost model (module documentation, "The extended cost
/// model"). [`Costs::new`] gives the two-overhead model.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Costs {
    /// `a`: transfer overhead per group (ms).
    pub transfer_overhead_ms: f64,
    /// `b`: execution overhead per group (its wait and launch, ms).
    pub exec_overhead_ms: f64,
    /// `L`: latency of the first kernel after the first group arrives (ms).
    pub first_kernel_ms: f64,
    /// `κ`: measured per-layer time to the time it takes in a switch.
    pub exec_scale: f64,
    /// `σ`: relative slowdown of kernels while copies run (every group but the last).
    pub copy_slowdown: f64,
    /// `R`: no switch ends before this (ms; e.g. the ready run when the host issues slower than the GPU runs).
    pub floor_ms: f64,
    /// `h`: the floor grows by this per group (ms).
    pub floor_per_group_ms: f64,
}

impl Costs {
    /// The two-overhead model: `a` and `b`, nothing else.
    pub fn new(a: f64, b: f64) -> Costs {
        Costs {
            transfer_overhead_ms: a,
            exec_overhead_ms: b,
            first_kernel_ms: 0.0,
            exec_scale: 1.0,
            copy_slowdown: 0.0,
            floor_ms: 0.0,
            floor_per_group_ms: 0.0,
        }
    }

    /// Checks every term: finite and non-negative (`exec_scale` positive,
    /// and `exec_scale · (1 + copy_slowdown)` finite).
    pub fn validate(&self) -> Result<(), PlanError> {
        for (what, value) in [
            ("group_transfer_overhead_ms", self.transfer_overhead_ms),
            ("group_exec_overhead_ms", self.exec_overhead_ms),
            ("first_kernel_ms", self.first_kernel_ms),
            ("exec_scale", self.exec_scale),
            ("copy_slowdown", self.copy_slowdown),
            ("floor_ms", self.floor_ms),
            ("floor_per_group_ms", self.floor_per_group_ms),
        ] {
            if !is_valid(value) || (what == "exec_scale" && value == 0.0) {
                return Err(PlanError::BadOverhead { what, value });
            }
        }
        // The slowed-down scale must stay finite: an infinite one times a
        // group's zero execution time is NaN, which `max` then drops,
        // making a plan look far faster than it is.
        if !(self.exec_scale * (1.0 + self.copy_slowdown)).is_finite() {
            return Err(PlanError::BadOverhead { what: "copy_slowdown", value: self.copy_slowdown });
        }
        Ok(())
    }
}

/// A grouping of layers and its makespan.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// First layer of each group: starts at 0, strictly increasing, all `< n`.
    pub group_starts: Vec<usize>,
    /// Makespan of the plan under the cost model, in ms.
    pub makespan_ms: f64,
}

/// Invalid input to the planner.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    /// The model has no layers.
    #[error("a plan needs at least one layer")]
    NoLayers,
    /// The per-layer slices differ in length.
    #[error("transfer_ms has {transfer} entries but exec_ms has {exec}")]
    LengthMismatch {
        /// Length of `transfer_ms`.
        transfer: usize,
        /// Length of `exec_ms`.
        exec: usize,
    },
    /// A bad per-layer value, or (with `what = "group_starts"`) a bad plan entry;
    /// an empty plan is reported as index 0 with value NaN.
    #[error("{what}[{index}] = {value} is not a finite non-negative number")]
    BadValue {
        /// Name of the offending slice.
        what: &'static str,
        /// Index of the offending entry.
        index: usize,
        /// The offending entry.
        value: f64,
    },
    /// A per-group overhead (or another term of [`Costs`]) that is negative,
    /// infinite or NaN (`exec_scale`: also 0).
    #[error("{what} = {value} is not a finite non-negative number")]
    BadOverhead {
        /// Name of the offending overhead.
        what: &'static str,
        /// The offending value.
        value: f64,
    },
    /// The search would keep more than [`MAX_BACKPOINTERS`] back-pointers.
    #[error("planning {layers} layers needs more than {limit} back-pointers ({group_counts} group counts examined so far); give positive per-group overheads or merge layers")]
    TooLarge {
        /// Number of layers.
        layers: usize,
        /// Group counts examined when the limit was reached.
        group_counts: usize,
        /// [`MAX_BACKPOINTERS`].
        limit: usize,
    },
}

/// Timeline of one group of a plan, in ms from the start of the switch.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupTiming {
    /// First layer of the group.
    pub first_layer: usize,
    /// One past the last layer of the group.
    pub end_layer: usize,
    /// `T_{k-1}`: the transfer of the previous group has ended.
    pub transfer_start_ms: f64,
    /// `T_k`.
    pub transfer_end_ms: f64,
    /// `max(E_{k-1}, T_k)`.
    pub exec_start_ms: f64,
    /// `E_k`.
    pub exec_end_ms: f64,
}

/// Validates inputs, returns the optimal plan.
///
/// `transfer_ms[i]` and `exec_ms[i]` are the transfer and execution times of
/// layer `i`; every group additionally costs `group_transfer_overhead_ms` of
/// transfer and `group_exec_overhead_ms` of execution. All values must be
/// finite and non-negative. Should sums overflow to infinity the single-group
/// plan is returned with an infinite makespan.
pub fn plan_groups(
    transfer_ms: &[f64],
    exec_ms: &[f64],
    group_transfer_overhead_ms: f64,
    group_exec_overhead_ms: f64,
) -> Result<Plan, PlanError> {
    let costs = Costs::new(group_transfer_overhead_ms, group_exec_overhead_ms);
    plan_groups_with(transfer_ms, exec_ms, &costs)
}

/// The optimal plan under the extended cost model `costs` (exact).
pub fn plan_groups_with(transfer_ms: &[f64], exec_ms: &[f64], costs: &Costs) -> Result<Plan, PlanError> {
    validate_inputs(transfer_ms, exec_ms, costs.transfer_overhead_ms, costs.exec_overhead_ms)?;
    costs.validate()?;
    let group_starts = optimal_group_starts(transfer_ms, exec_ms, costs, MAX_BACKPOINTERS)?;
    let makespan_ms = makespan_with(transfer_ms, exec_ms, costs, &group_starts)?;
    Ok(Plan {
        group_starts,
        makespan_ms,
    })
}

/// [`makespan`] under the extended cost model.
pub fn makespan_with(transfer_ms: &[f64], exec_ms: &[f64], costs: &Costs, group_starts: &[usize]) -> Result<f64, PlanError> {
    costs.validate()?;
    simulate(transfer_ms, exec_ms, costs, group_starts, |_| {})
}

/// [`timeline`] under the extended cost model (the floor `R + h·K` is not a
/// group's: the makespan is the larger of it and the last `exec_end_ms`).
pub fn timeline_with(transfer_ms: &[f64], exec_ms: &[f64], costs: &Costs, group_starts: &[usize]) -> Result<Vec<GroupTiming>, PlanError> {
    costs.validate()?;
    let mut groups = Vec::with_capacity(group_starts.len());
    simulate(transfer_ms, exec_ms, costs, group_starts, |g| groups.push(g))?;
    Ok(groups)
}

/// Simulates the cost model for a given plan and returns its makespan.
///
/// `group_starts[0]` must be 0, the entries strictly increasing and all `< n`;
/// otherwise [`PlanError::BadValue`] with `what = "group_starts"` is returned.
pub fn makespan(
    transfer_ms: &[f64],
    exec_ms: &[f64],
    a: f64,
    b: f64,
    group_starts: &[usize],
) -> Result<f64, PlanError> {
    simulate(transfer_ms, exec_ms, &Costs::new(a, b), group_starts, |_| {})
}

/// Per-group timeline of a plan, for traces and reports.
///
/// Validates like [`makespan`]; the last entry's `exec_end_ms` is the makespan.
pub fn timeline(
    transfer_ms: &[f64],
    exec_ms: &[f64],
    a: f64,
    b: f64,
    group_starts: &[usize],
) -> Result<Vec<GroupTiming>, PlanError> {
    let mut groups = Vec::with_capacity(group_starts.len());
    simulate(transfer_ms, exec_ms, &Costs::new(a, b), group_starts, |g| groups.push(g))?;
    Ok(groups)
}

/// One group per layer: `[0, 1, ..., n-1]`.
pub fn per_layer_plan(n: usize) -> Vec<usize> {
    (0..n).collect()
}

/// A single group holding every layer: `[0]` (empty when `n == 0`).
pub fn single_group_plan(n: usize) -> Vec<usize> {
    if n == 0 {
        Vec::new()
    } else {
        vec![0]
    }
}

fn is_valid(value: f64) -> bool {
    value.is_finite() && value >= 0.0
}

/// Checks lengths and values; returns the number of layers.
fn validate_inputs(
    transfer_ms: &[f64],
    exec_ms: &[f64],
    a: f64,
    b: f64,
) -> Result<usize, PlanError> {
    if transfer_ms.len() != exec_ms.len() {
        return Err(PlanError::LengthMismatch {
            transfer: transfer_ms.len(),
            exec: exec_ms.len(),
        });
    }
    if transfer_ms.is_empty() {
        return Err(PlanError::NoLayers);
    }
    for (what, values) in [("transfer_ms", transfer_ms), ("exec_ms", exec_ms)] {
        if let Some((index, &value)) = values.iter().enumerate().find(|(_, &v)| !is_valid(v)) {
            return Err(PlanError::BadValue { what, index, value });
        }
    }
    for (what, value) in [
        ("group_transfer_overhead_ms", a),
        ("group_exec_overhead_ms", b),
    ] {
        if !is_valid(value) {
            return Err(PlanError::BadOverhead { what, value });
        }
    }
    Ok(transfer_ms.len())
}

/// Checks that `group_starts` is a valid plan for `n` layers.
fn validate_plan(group_starts: &[usize], n: usize) -> Result<(), PlanError> {
    let bad = |index: usize, value: f64| PlanError::BadValue {
        what: "group_starts",
        index,
        value,
    };
    if group_starts.is_empty() {
        return Err(bad(0, f64::NAN));
    }
    let mut previous: Option<usize> = None;
    for (index, &start) in group_starts.iter().enumerate() {
        let ordered = match previous {
            None => start == 0,
            Some(p) => start > p,
        };
        if !ordered || start >= n {
            return Err(bad(index, start as f64));
        }
        previous = Some(start);
    }
    Ok(())
}

/// Runs the cost model over a validated plan, reporting each group to `visit`.
fn simulate(
    transfer_ms: &[f64],
    exec_ms: &[f64],
    costs: &Costs,
    group_starts: &[usize],
    mut visit: impl FnMut(GroupTiming),
) -> Result<f64, PlanError> {
    let (a, b) = (costs.transfer_overhead_ms, costs.exec_overhead_ms);
    let n = validate_inputs(transfer_ms, exec_ms, a, b)?;
    validate_plan(group_starts, n)?;
    let groups = group_starts.len();
    let ends = group_starts.iter().skip(1).chain(iter::once(&n));
    let (mut transfer_end, mut exec_end) = (0.0_f64, 0.0_f64);
    for (k, (&first_layer, &end_layer)) in group_starts.iter().zip(ends).enumerate() {
        // Validated: first_layer < end_layer <= n.
        let group_transfer: f64 = transfer_ms[first_layer..end_layer].iter().sum();
        let group_exec: f64 = exec_ms[first_layer..end_layer].iter().sum();
        let transfer_start = transfer_end;
        transfer_end = transfer_start + a + group_transfer;
        let mut exec_start = exec_end.max(transfer_end);
        if k == 0 {
            exec_start += costs.first_kernel_ms;
        }
        let scale = if k + 1 < groups { costs.exec_scale * (1.0 + costs.copy_slowdown) } else { costs.exec_scale };
        exec_end = exec_start + b + scale * group_exec;
        visit(GroupTiming {
            first_layer,
            end_layer,
            transfer_start_ms: transfer_start,
            transfer_end_ms: transfer_end,
            exec_start_ms: exec_start,
            exec_end_ms: exec_end,
        });
    }
    Ok(exec_end.max(floor(costs, groups)))
}

/// `R + h·K`, 0 when both are 0 (no floor).
fn floor(costs: &Costs, groups: usize) -> f64 {
    if costs.floor_ms == 0.0 && costs.floor_per_group_ms == 0.0 {
        0.0
    } else {
        costs.floor_ms + costs.floor_per_group_ms * groups as f64
    }
}

/// `[0, v_0, v_0 + v_1, ...]`, length `values.len() + 1`.
fn prefix_sums(values: &[f64]) -> Vec<f64> {
    iter::once(0.0)
        .chain(values.iter().scan(0.0, |sum, &v| {
            *sum += v;
            Some(*sum)
        }))
        .collect()
}

/// Whether `candidate` beats `best` by more than the tie tolerance.
fn improves(candidate: f64, best: Option<f64>) -> bool {
    match best {
        None => true,
        Some(best) => candidate < best - TIE_RELATIVE_TOLERANCE * best,
    }
}

/// The DP of the module documentation, on validated non-empty input, keeping
/// at most `max_backpointers` back-pointers.
fn optimal_group_starts(transfer_ms: &[f64], exec_ms: &[f64], costs: &Costs, max_backpointers: usize) -> Result<Vec<usize>, PlanError> {
    let n = transfer_ms.len();
    let (Some(&first_transfer), Some(&last_exec)) = (transfer_ms.first(), exec_ms.last()) else {
        return Ok(single_group_plan(n));
    };
    if n >= NO_PARENT as usize {
        return Err(PlanError::TooLarge { layers: n, group_counts: 0, limit: max_backpointers });
    }
    let (a, b) = (costs.transfer_overhead_ms, costs.exec_overhead_ms);
    let first_kernel = costs.first_kernel_ms;
    let prefix_t = prefix_sums(transfer_ms);
    // Groups before the last run while copies do (scaled by 1 + σ); the last
    // group (the one ending at n) is unscaled.
    let busy = costs.exec_scale * (1.0 + costs.copy_slowdown);
    let prefix_x: Vec<f64> = prefix_sums(exec_ms).into_iter().map(|v| v * busy).collect();
    let prefix_last: Vec<f64> = prefix_sums(exec_ms).into_iter().map(|v| v * costs.exec_scale).collect();
    let slowed = costs.copy_slowdown != 0.0;
    let (total_t, total_x) = (prefix_t[n], prefix_last[n]);
    let stride = n + 1;

    // prev[j] = f(k-1, j), cur[i] = f(k, i); infinity marks unreachable states.
    let mut prev = vec![f64::INFINITY; stride];
    prev[0] = 0.0;
    let mut cur = vec![f64::INFINITY; stride];
    // parents[(k-1)*stride + i] = start of the last group in the best plan for f(k, i).
    let mut parents: Vec<u32> = Vec::new();
    // Candidate j with u_j = f(k-1, j) - X(j), both strictly increasing front to back.
    let mut queue: VecDeque<(usize, f64)> = VecDeque::with_capacity(stride);
    let mut best: Option<(usize, f64)> = None;

    for groups in 1..=n {
        let k = groups as f64;
        let floor_k = floor(costs, groups);
        if let Some((_, best_ms)) = best {
            let lower_bound = (k * a + total_t + b + costs.exec_scale * last_exec)
                .max(a + first_transfer + first_kernel + k * b + total_x)
                .max(floor_k);
            if lower_bound >= best_ms {
                break;
            }
        }
        let row = parents.len();
        if row + stride > max_backpointers {
            return Err(PlanError::TooLarge { layers: n, group_counts: groups - 1, limit: max_backpointers });
        }
        parents.resize(row + stride, NO_PARENT);
        cur.fill(f64::INFINITY);
        queue.clear();
        let mut reachable = false;
        let first = if groups == 1 { first_kernel } else { 0.0 };

        for end in groups..=n {
            let newest = end - 1;
            let ready = prev[newest];
            if ready.is_finite() {
                let u = ready - prefix_x[newest];
                while queue.back().is_some_and(|&(_, back_u)| back_u >= u) {
                    queue.pop_back();
                }
                queue.push_back((newest, u));
            }
            let transfer_end = k * a + prefix_t[end];
            if end == n && slowed {
                // The last group: its own (unscaled) transition, every j.
                let mut choice: Option<(usize, f64)> = None;
                for j in (groups - 1)..n {
                    if prev[j].is_finite() {
                        let c = prev[j].max(transfer_end) - prefix_last[j];
                        if choice.is_none_or(|(_, best_c)| c < best_c) {
                            choice = Some((j, c));
                        }
                    }
                }
                if let Some((j, c)) = choice {
                    cur[n] = c + first + b + prefix_last[n];
                    parents[row + n] = j as u32;
                    reachable = true;
                }
                continue;
            }
            while queue.get(1).is_some_and(|&(j, _)| prev[j] <= transfer_end) {
                queue.pop_front();
            }
            let cost = |j: usize| prev[j].max(transfer_end) - prefix_x[j];
            let choice = match (queue.front(), queue.get(1)) {
                (Some(&(j0, _)), Some(&(j1, _))) if cost(j1) < cost(j0) => j1,
                (Some(&(j0, _)), _) => j0,
                (None, _) => continue,
            };
            // (Without a slowdown the last group's scale is the others'.)
            cur[end] = cost(choice) + first + b + prefix_x[end];
            parents[row + end] = choice as u32;
            reachable = true;
        }

        let total = cur[n].max(floor_k);
        if total.is_finite() && improves(total, best.map(|(_, ms)| ms)) {
            best = Some((groups, total));
        }
        std::mem::swap(&mut prev, &mut cur);
        if !reachable {
            break;
        }
    }

    Ok(best
        .and_then(|(groups, _)| reconstruct(&parents, stride, groups, n))
        .unwrap_or_else(|| single_group_plan(n)))
}

/// Follows the back-pointers from `f(groups, n)` to the group starts.
fn reconstruct(parents: &[u32], stride: usize, groups: usize, n: usize) -> Option<Vec<usize>> {
    let mut starts = Vec::with_capacity(groups);
    let mut end = n;
    for k in (1..=groups).rev() {
        let start = *parents.get((k - 1) * stride + end)? as usize;
        if start >= end {
            return None;
        }
        starts.push(start);
        end = start;
    }
    starts.reverse();
    (end == 0).then_some(starts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// SplitMix64: a tiny deterministic PRNG for test instances.
    struct SplitMix64(u64);

    impl SplitMix64 {
        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        /// Uniform in [0, 1).
        fn unit(&mut self) -> f64 {
            (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
        }

        fn range(&mut self, lo: f64, hi: f64) -> f64 {
            lo + (hi - lo) * self.unit()
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next_u64() % n
        }
    }

    #[derive(Debug, Clone)]
    struct Instance {
        t: Vec<f64>,
        x: Vec<f64>,
        a: f64,
        b: f64,
    }

    #[derive(Debug, Clone, Copy)]
    enum Regime {
        Balanced,
        TransferDominates,
        ExecDominates,
        SparseZeros,
        AllZeroExec,
        Integers,
    }

    const REGIMES: [Regime; 6] = [
        Regime::Balanced,
        Regime::TransferDominates,
        Regime::ExecDominates,
        Regime::SparseZeros,
        Regime::AllZeroExec,
        Regime::Integers,
    ];

    fn random_instance(
        rng: &mut SplitMix64,
        n: usize,
        regime: Regime,
        overheads: bool,
    ) -> Instance {
        let mut t = Vec::with_capacity(n);
        let mut x = Vec::with_capacity(n);
        for _ in 0..n {
            let (ti, xi) = match regime {
                Regime::Balanced => (rng.range(0.0, 2.0), rng.range(0.0, 2.0)),
                Regime::TransferDominates => (rng.range(1.0, 10.0), rng.range(0.0, 1.0)),
                Regime::ExecDominates => (rng.range(0.0, 1.0), rng.range(1.0, 10.0)),
                Regime::SparseZeros => {
                    let ti = if rng.below(3) == 0 {
                        0.0
                    } else {
                        rng.range(0.0, 3.0)
                    };
                    let xi = if rng.below(3) == 0 {
                        0.0
                    } else {
                        rng.range(0.0, 3.0)
                    };
                    (ti, xi)
                }
                Regime::AllZeroExec => (rng.range(0.0, 2.0), 0.0),
                Regime::Integers => (rng.below(4) as f64, rng.below(4) as f64),
            };
            t.push(ti);
            x.push(xi);
        }
        let (a, b) = if overheads {
            match regime {
                Regime::Integers => (rng.below(3) as f64, rng.below(3) as f64),
                _ => (rng.range(0.0, 3.0), rng.range(0.0, 3.0)),
            }
        } else {
            (0.0, 0.0)
        };
        Instance { t, x, a, b }
    }

    /// All 2^(n-1) partitions: (makespan, number of groups) of each.
    fn all_partitions(inst: &Instance) -> Vec<(f64, usize)> {
        let n = inst.t.len();
        (0..1u32 << (n - 1))
            .map(|mask| {
                let starts: Vec<usize> = iter::once(0)
                    .chain((1..n).filter(|i| mask & (1 << (i - 1)) != 0))
                    .collect();
                let ms =
                    makespan(&inst.t, &inst.x, inst.a, inst.b, &starts).expect("valid partition");
                (ms, starts.len())
            })
            .collect()
    }

    fn rel_close(x: f64, y: f64, tol: f64) -> bool {
        (x - y).abs() <= tol * x.abs().max(y.abs()).max(1.0)
    }

    /// Plain O(n³) DP over (groups, end layer), for cross-checking larger instances.
    fn cubic_reference(inst: &Instance) -> f64 {
        let n = inst.t.len();
        let pt = prefix_sums(&inst.t);
        let px = prefix_sums(&inst.x);
        let mut prev = vec![f64::INFINITY; n + 1];
        prev[0] = 0.0;
        let mut best = f64::INFINITY;
        for k in 1..=n {
            let mut cur = vec![f64::INFINITY; n + 1];
            for i in k..=n {
                let t_end = k as f64 * inst.a + pt[i];
                for j in (k - 1)..i {
                    let e = prev[j].max(t_end) + inst.b + (px[i] - px[j]);
                    cur[i] = cur[i].min(e);
                }
            }
            best = best.min(cur[n]);
            prev = cur;
        }
        best
    }

    fn check_against_brute_force(inst: &Instance) {
        let plan = plan_groups(&inst.t, &inst.x, inst.a, inst.b).expect("valid instance");
        let simulated = makespan(&inst.t, &inst.x, inst.a, inst.b, &plan.group_starts)
            .expect("planner returns a valid plan");
        assert_eq!(simulated, plan.makespan_ms, "{inst:?}");

        let partitions = all_partitions(inst);
        let brute = partitions
            .iter()
            .map(|&(ms, _)| ms)
            .fold(f64::INFINITY, f64::min);
        assert!(
            rel_close(plan.makespan_ms, brute, 1e-9),
            "dp {} vs brute {brute} for {inst:?}",
            plan.makespan_ms
        );
        // Fewest groups among (near-)ties: any plan with fewer groups is strictly worse.
        let groups = plan.group_starts.len();
        for &(ms, g) in &partitions {
            if g < groups {
                assert!(
                    ms > plan.makespan_ms * (1.0 + 1e-14),
                    "plan with {g} < {groups} groups ties ({ms} vs {}) for {inst:?}",
                    plan.makespan_ms
                );
            }
        }
    }

    #[test]
    fn matches_brute_force_on_random_instances() {
        let mut rng = SplitMix64(0x5EED_0001);
        let mut count = 0;
        for n in 1..=12 {
            let reps = if n <= 9 { 30 } else { 6 };
            for regime in REGIMES {
                for overheads in [false, true] {
                    for _ in 0..reps {
                        let inst = random_instance(&mut rng, n, regime, overheads);
                        check_against_brute_force(&inst);
                        count += 1;
                    }
                }
            }
        }
        assert!(count > 2000);
    }

    #[test]
    fn matches_brute_force_with_lopsided_overheads() {
        let mut rng = SplitMix64(0x5EED_0002);
        for n in 1..=10 {
            for regime in REGIMES {
                for _ in 0..10 {
                    let mut inst = random_instance(&mut rng, n, regime, false);
                    // Only one of the overheads, sometimes huge.
                    let scale = [0.01, 1.0, 100.0][rng.below(3) as usize];
                    if rng.below(2) == 0 {
                        inst.a = rng.range(0.0, scale);
                    } else {
                        inst.b = rng.range(0.0, scale);
                    }
                    check_against_brute_force(&inst);
                }
            }
        }
    }

    fn random_costs(rng: &mut SplitMix64, a: f64, b: f64) -> Costs {
        let pick = |rng: &mut SplitMix64, hi: f64| if rng.below(3) == 0 { 0.0 } else { rng.range(0.0, hi) };
        Costs {
            transfer_overhead_ms: a,
            exec_overhead_ms: b,
            first_kernel_ms: pick(rng, 3.0),
            exec_scale: rng.range(0.3, 2.0),
            copy_slowdown: pick(rng, 1.0),
            floor_ms: pick(rng, 20.0),
            floor_per_group_ms: pick(rng, 2.0),
        }
    }

    #[test]
    fn extended_model_matches_brute_force() {
        let mut rng = SplitMix64(0x5EED_0010);
        let mut count = 0;
        for n in 1..=10 {
            for regime in REGIMES {
                for _ in 0..12 {
                    let overheads = rng.below(2) == 0;
                    let inst = random_instance(&mut rng, n, regime, overheads);
                    let costs = random_costs(&mut rng, inst.a, inst.b);
                    let plan = plan_groups_with(&inst.t, &inst.x, &costs).expect("valid");
                    assert_eq!(makespan_with(&inst.t, &inst.x, &costs, &plan.group_starts), Ok(plan.makespan_ms));
                    let brute = (0..1u32 << (n - 1))
                        .map(|mask| {
                            let starts: Vec<usize> =
                                iter::once(0).chain((1..n).filter(|i| mask & (1 << (i - 1)) != 0)).collect();
                            makespan_with(&inst.t, &inst.x, &costs, &starts).expect("valid partition")
                        })
                        .fold(f64::INFINITY, f64::min);
                    assert!(
                        rel_close(plan.makespan_ms, brute, 1e-9),
                        "dp {} vs brute {brute} for {inst:?} {costs:?}",
                        plan.makespan_ms
                    );
                    count += 1;
                }
            }
        }
        assert!(count >= 700);
    }

    #[test]
    fn extended_model_with_default_terms_is_the_two_overhead_model() {
        let mut rng = SplitMix64(0x5EED_0011);
        for n in [1, 7, 40, 200] {
            for regime in REGIMES {
                let inst = random_instance(&mut rng, n, regime, true);
                let old = plan_groups(&inst.t, &inst.x, inst.a, inst.b).expect("valid");
                let new = plan_groups_with(&inst.t, &inst.x, &Costs::new(inst.a, inst.b)).expect("valid");
                assert_eq!(old, new);
            }
        }
    }

    #[test]
    fn extended_terms_hand_computed() {
        // t = [1, 1], x = [1, 1], L = 0.5, κ = 2, σ = 0.5.
        // [0]    : T = 2, E = 2 + 0.5 + 2·2 = 6.5
        // [0, 1] : T1 = 1, E1 = 1 + 0.5 + 3·1 = 4.5; T2 = 2, E2 = 4.5 + 2·1 = 6.5
        let costs = Costs { first_kernel_ms: 0.5, exec_scale: 2.0, copy_slowdown: 0.5, ..Costs::new(0.0, 0.0) };
        let (t, x) = ([1.0, 1.0], [1.0, 1.0]);
        assert_eq!(makespan_with(&t, &x, &costs, &[0]), Ok(6.5));
        assert_eq!(makespan_with(&t, &x, &costs, &[0, 1]), Ok(6.5));
        // A floor of 6 + 0.25 per group: [0] -> 6.5, [0, 1] -> max(6.5, 6.5) = 6.5; with h = 0.5, [0, 1] -> 7.
        let floored = Costs { floor_ms: 6.0, floor_per_group_ms: 0.5, ..costs };
        assert_eq!(makespan_with(&t, &x, &floored, &[0, 1]), Ok(7.0));
        let plan = plan_groups_with(&t, &x, &floored).expect("valid");
        assert_eq!(plan.group_starts, vec![0]);
        assert_eq!(plan.makespan_ms, 6.5);
        // The slowdown makes splitting lose: without it [0, 1] -> E1 = 3.5, E2 = 5.5 < 6.5.
        let fast = Costs { copy_slowdown: 0.0, ..costs };
        let plan = plan_groups_with(&t, &x, &fast).expect("valid");
        assert_eq!(plan, Plan { group_starts: vec![0, 1], makespan_ms: 5.5 });
    }

    #[test]
    fn rejects_bad_cost_terms() {
        for (costs, what) in [
            (Costs { exec_scale: 0.0, ..Costs::new(0.0, 0.0) }, "exec_scale"),
            (Costs { first_kernel_ms: -1.0, ..Costs::new(0.0, 0.0) }, "first_kernel_ms"),
            (Costs { copy_slowdown: f64::NAN, ..Costs::new(0.0, 0.0) }, "copy_slowdown"),
            (Costs { floor_ms: f64::INFINITY, ..Costs::new(0.0, 0.0) }, "floor_ms"),
            (Costs { floor_per_group_ms: -0.5, ..Costs::new(0.0, 0.0) }, "floor_per_group_ms"),
        ] {
            assert!(
                matches!(plan_groups_with(&[1.0], &[1.0], &costs), Err(PlanError::BadOverhead { what: w, .. }) if w == what),
                "{what}"
            );
            assert!(matches!(makespan_with(&[1.0], &[1.0], &costs, &[0]), Err(PlanError::BadOverhead { .. })));
        }
    }

    #[test]
    fn memory_is_bounded() {
        // Issue 9: 20,000 layers with no overheads took 3.1 GB of back-pointers.
        // Now the search stops at MAX_BACKPOINTERS with a clear error.
        let n = 20_000;
        let mut rng = SplitMix64(0x5EED_0012);
        let t: Vec<f64> = (0..n).map(|_| rng.range(0.0, 1.0)).collect();
        let x: Vec<f64> = (0..n).map(|_| rng.range(0.0, 1.0)).collect();
        match plan_groups(&t, &x, 0.0, 0.0) {
            Err(PlanError::TooLarge { layers, group_counts, limit }) => {
                assert_eq!((layers, limit), (n, MAX_BACKPOINTERS));
                assert!(group_counts * (n + 1) <= MAX_BACKPOINTERS);
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
        // The limit is checked before any row is kept: a tiny one fails at once.
        let costs = Costs::new(0.0, 0.0);
        assert!(matches!(
            optimal_group_starts(&t[..10], &x[..10], &costs, 5),
            Err(PlanError::TooLarge { layers: 10, group_counts: 0, limit: 5 })
        ));
        // With overheads the same model plans within the bound.
        let plan = plan_groups(&t, &x, 0.01, 0.01).expect("fits");
        assert!(plan.group_starts.len() > 1);
    }

    #[test]
    fn matches_cubic_dp_on_larger_instances() {
        let mut rng = SplitMix64(0x5EED_0003);
        for n in [20, 47, 100, 150] {
            for regime in REGIMES {
                for overheads in [false, true] {
                    let inst = random_instance(&mut rng, n, regime, overheads);
                    let plan = plan_groups(&inst.t, &inst.x, inst.a, inst.b).expect("valid");
                    let reference = cubic_reference(&inst);
                    assert!(
                        rel_close(plan.makespan_ms, reference, 1e-9),
                        "n={n} {regime:?}: dp {} vs cubic {reference}",
                        plan.makespan_ms
                    );
                }
            }
        }
    }

    #[test]
    fn all_zero_layers_give_a_single_group() {
        for n in 1..=8 {
            let zeros = vec![0.0; n];
            for (a, b) in [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0)] {
                let plan = plan_groups(&zeros, &zeros, a, b).expect("valid");
                assert_eq!(plan.group_starts, vec![0]);
                assert_eq!(plan.makespan_ms, a + b);
            }
        }
    }

    #[test]
    fn exact_ties_prefer_fewer_groups() {
        // No execution time and no overheads: every plan has makespan sum(t).
        let t = [1.0, 2.0, 3.0, 4.0];
        let plan = plan_groups(&t, &[0.0; 4], 0.0, 0.0).expect("valid");
        assert_eq!(plan.group_starts, vec![0]);
        assert_eq!(plan.makespan_ms, 10.0);
        // Zero-time tail layers: splitting them off never helps.
        let plan =
            plan_groups(&[1.0, 1.0, 0.0, 0.0], &[1.0, 1.0, 0.0, 0.0], 0.0, 0.0).expect("valid");
        assert_eq!(plan.group_starts, vec![0, 1]);
        assert_eq!(plan.makespan_ms, 3.0);
    }

    #[test]
    fn is_deterministic() {
        let mut rng = SplitMix64(0x5EED_0004);
        let inst = random_instance(&mut rng, 300, Regime::SparseZeros, true);
        let first = plan_groups(&inst.t, &inst.x, inst.a, inst.b).expect("valid");
        let second = plan_groups(&inst.t, &inst.x, inst.a, inst.b).expect("valid");
        assert_eq!(first, second);
    }

    #[test]
    fn two_layers_where_splitting_helps() {
        // Single group: T = 2, E = 4. Split: T1 = 1, E1 = 2, T2 = 2, E2 = 3.
        let (t, x) = ([1.0, 1.0], [1.0, 1.0]);
        assert_eq!(makespan(&t, &x, 0.0, 0.0, &[0]), Ok(4.0));
        let plan = plan_groups(&t, &x, 0.0, 0.0).expect("valid");
        assert_eq!(
            plan,
            Plan {
                group_starts: vec![0, 1],
                makespan_ms: 3.0
            }
        );
    }

    #[test]
    fn large_transfer_overhead_makes_a_single_group_optimal() {
        // a = 10. Single: T = 12, E = 14. Split: T1 = 11, E1 = 12, T2 = 22, E2 = 23.
        let (t, x) = ([1.0, 1.0], [1.0, 1.0]);
        assert_eq!(makespan(&t, &x, 10.0, 0.0, &[0, 1]), Ok(23.0));
        let plan = plan_groups(&t, &x, 10.0, 0.0).expect("valid");
        assert_eq!(plan.group_starts, vec![0]);
        assert_eq!(plan.makespan_ms, 14.0);
        // The same with a large execution overhead instead.
        let plan = plan_groups(&t, &x, 0.0, 10.0).expect("valid");
        assert_eq!(plan.group_starts, vec![0]);
        assert_eq!(plan.makespan_ms, 14.0);
    }

    #[test]
    fn three_layers_hand_computed() {
        // t = [4, 1, 1], x = [1, 4, 4], a = 1, b = 0.5.
        // [0]       : T = 7,                                          E = 7 + 0.5 + 9 = 16.5
        // [0, 1]    : T1 = 5, E1 = 6.5;  T2 = 8,                      E2 = 8 + 0.5 + 8 = 16.5
        // [0, 2]    : T1 = 6, E1 = 11.5; T2 = 8,                      E2 = 11.5 + 0.5 + 4 = 16
        // [0, 1, 2] : T1 = 5, E1 = 6.5;  T2 = 7, E2 = 11.5; T3 = 9,   E3 = 11.5 + 0.5 + 4 = 16
        // Optimum 16, tied between 2 and 3 groups: the 2-group plan wins.
        let (t, x) = ([4.0, 1.0, 1.0], [1.0, 4.0, 4.0]);
        for (starts, expected) in [
            (vec![0], 16.5),
            (vec![0, 1], 16.5),
            (vec![0, 2], 16.0),
            (vec![0, 1, 2], 16.0),
        ] {
            assert_eq!(makespan(&t, &x, 1.0, 0.5, &starts), Ok(expected));
        }
        let plan = plan_groups(&t, &x, 1.0, 0.5).expect("valid");
        assert_eq!(plan.group_starts, vec![0, 2]);
        assert_eq!(plan.makespan_ms, 16.0);
        // With a = 0.5 the 3-group plan is strictly better: [0] -> 16, [0, 1] -> 15.5,
        // [0, 2] -> 15.5, [0, 1, 2] -> T1 = 4.5, E1 = 6; T2 = 6, E2 = 10.5; T3 = 7.5, E3 = 15.
        let plan = plan_groups(&t, &x, 0.5, 0.5).expect("valid");
        assert_eq!(plan.group_starts, vec![0, 1, 2]);
        assert_eq!(plan.makespan_ms, 15.0);
    }

    #[test]
    fn single_layer() {
        let plan = plan_groups(&[2.0], &[3.0], 0.5, 0.25).expect("valid");
        assert_eq!(
            plan,
            Plan {
                group_starts: vec![0],
                makespan_ms: 5.75
            }
        );
    }

    #[test]
    fn timeline_matches_the_cost_model() {
        let (t, x) = ([4.0, 1.0, 1.0], [1.0, 4.0, 4.0]);
        let groups = timeline(&t, &x, 1.0, 0.5, &[0, 2]).expect("valid");
        assert_eq!(
            groups,
            vec![
                GroupTiming {
                    first_layer: 0,
                    end_layer: 2,
                    transfer_start_ms: 0.0,
                    transfer_end_ms: 6.0,
                    exec_start_ms: 6.0,
                    exec_end_ms: 11.5,
                },
                GroupTiming {
                    first_layer: 2,
                    end_layer: 3,
                    transfer_start_ms: 6.0,
                    transfer_end_ms: 8.0,
                    exec_start_ms: 11.5,
                    exec_end_ms: 16.0,
                },
            ]
        );
    }

    #[test]
    fn timeline_is_consistent_on_random_plans() {
        let mut rng = SplitMix64(0x5EED_0005);
        for _ in 0..50 {
            let inst = random_instance(&mut rng, 40, Regime::Balanced, true);
            let plan = plan_groups(&inst.t, &inst.x, inst.a, inst.b).expect("valid");
            let groups =
                timeline(&inst.t, &inst.x, inst.a, inst.b, &plan.group_starts).expect("valid");
            assert_eq!(groups.len(), plan.group_starts.len());
            assert_eq!(groups.first().map(|g| g.first_layer), Some(0));
            assert_eq!(groups.last().map(|g| g.end_layer), Some(40));
            assert_eq!(groups.last().map(|g| g.exec_end_ms), Some(plan.makespan_ms));
            let mut previous: Option<&GroupTiming> = None;
            for (g, &start) in groups.iter().zip(&plan.group_starts) {
                assert_eq!(g.first_layer, start);
                assert!(g.end_layer > g.first_layer);
                assert!(g.transfer_end_ms >= g.transfer_start_ms + inst.a);
                assert!(g.exec_start_ms >= g.transfer_end_ms);
                assert!(g.exec_end_ms >= g.exec_start_ms + inst.b);
                let (t_prev, e_prev) = previous.map_or((0.0, 0.0), |p| {
                    assert_eq!(p.end_layer, g.first_layer);
                    (p.transfer_end_ms, p.exec_end_ms)
                });
                assert_eq!(g.transfer_start_ms, t_prev);
                assert_eq!(g.exec_start_ms, e_prev.max(g.transfer_end_ms));
                previous = Some(g);
            }
        }
    }

    #[test]
    fn optimal_beats_or_ties_baselines() {
        let mut rng = SplitMix64(0x5EED_0006);
        for n in [1, 2, 5, 30, 120, 400] {
            for regime in REGIMES {
                for overheads in [false, true] {
                    let inst = random_instance(&mut rng, n, regime, overheads);
                    let plan = plan_groups(&inst.t, &inst.x, inst.a, inst.b).expect("valid");
                    for baseline in [per_layer_plan(n), single_group_plan(n)] {
                        let ms = makespan(&inst.t, &inst.x, inst.a, inst.b, &baseline)
                            .expect("valid baseline");
                        assert!(
                            plan.makespan_ms <= ms * (1.0 + 1e-12),
                            "n={n} {regime:?}: {} > {ms}",
                            plan.makespan_ms
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn baseline_plans() {
        assert_eq!(per_layer_plan(0), Vec::<usize>::new());
        assert_eq!(per_layer_plan(4), vec![0, 1, 2, 3]);
        assert_eq!(single_group_plan(0), Vec::<usize>::new());
        assert_eq!(single_group_plan(4), vec![0]);
    }

    #[test]
    fn rejects_bad_inputs() {
        assert_eq!(plan_groups(&[], &[], 0.0, 0.0), Err(PlanError::NoLayers));
        assert_eq!(
            plan_groups(&[1.0, 2.0], &[1.0], 0.0, 0.0),
            Err(PlanError::LengthMismatch {
                transfer: 2,
                exec: 1
            })
        );
        assert_eq!(
            plan_groups(&[], &[1.0], 0.0, 0.0),
            Err(PlanError::LengthMismatch {
                transfer: 0,
                exec: 1
            })
        );
        for bad in [f64::INFINITY, f64::NEG_INFINITY, -1.0, -1e-300] {
            assert_eq!(
                plan_groups(&[1.0, bad], &[1.0, 1.0], 0.0, 0.0),
                Err(PlanError::BadValue {
                    what: "transfer_ms",
                    index: 1,
                    value: bad
                })
            );
            assert_eq!(
                plan_groups(&[1.0, 1.0], &[bad, 1.0], 0.0, 0.0),
                Err(PlanError::BadValue {
                    what: "exec_ms",
                    index: 0,
                    value: bad
                })
            );
            assert_eq!(
                plan_groups(&[1.0], &[1.0], bad, 0.0),
                Err(PlanError::BadOverhead {
                    what: "group_transfer_overhead_ms",
                    value: bad
                })
            );
            assert_eq!(
                plan_groups(&[1.0], &[1.0], 0.0, bad),
                Err(PlanError::BadOverhead {
                    what: "group_exec_overhead_ms",
                    value: bad
                })
            );
        }
        // NaN never compares equal, so match on the shape.
        assert!(matches!(
            plan_groups(&[1.0, 1.0, f64::NAN], &[1.0; 3], 0.0, 0.0),
            Err(PlanError::BadValue { what: "transfer_ms", index: 2, value }) if value.is_nan()
        ));
        assert!(matches!(
            plan_groups(&[1.0], &[f64::NAN], 0.0, 0.0),
            Err(PlanError::BadValue { what: "exec_ms", index: 0, value }) if value.is_nan()
        ));
        assert!(matches!(
            plan_groups(&[1.0], &[1.0], f64::NAN, 0.0),
            Err(PlanError::BadOverhead { what: "group_transfer_overhead_ms", value }) if value.is_nan()
        ));
        assert!(matches!(
            plan_groups(&[1.0], &[1.0], 0.0, f64::NAN),
            Err(PlanError::BadOverhead { what: "group_exec_overhead_ms", value }) if value.is_nan()
        ));
        // The simulation validates its inputs the same way.
        assert_eq!(makespan(&[], &[], 0.0, 0.0, &[0]), Err(PlanError::NoLayers));
        assert!(matches!(
            timeline(&[1.0], &[-2.0], 0.0, 0.0, &[0]),
            Err(PlanError::BadValue {
                what: "exec_ms",
                ..
            })
        ));
    }

    #[test]
    fn rejects_bad_plans() {
        let (t, x) = ([1.0; 4], [1.0; 4]);
        let bad = |index: usize, value: f64| {
            Err(PlanError::BadValue {
                what: "group_starts",
                index,
                value,
            })
        };
        assert!(matches!(
            makespan(&t, &x, 0.0, 0.0, &[]),
            Err(PlanError::BadValue { what: "group_starts", index: 0, value }) if value.is_nan()
        ));
        assert_eq!(makespan(&t, &x, 0.0, 0.0, &[1, 2]), bad(0, 1.0));
        assert_eq!(makespan(&t, &x, 0.0, 0.0, &[0, 2, 2]), bad(2, 2.0));
        assert_eq!(makespan(&t, &x, 0.0, 0.0, &[0, 3, 1]), bad(2, 1.0));
        assert_eq!(makespan(&t, &x, 0.0, 0.0, &[0, 4]), bad(1, 4.0));
        assert_eq!(makespan(&t, &x, 0.0, 0.0, &[0, 0]), bad(1, 0.0));
        assert_eq!(
            timeline(&t, &x, 0.0, 0.0, &[0, 1, 9]).err(),
            bad(2, 9.0).err()
        );
        assert!(makespan(&t, &x, 0.0, 0.0, &[0, 1, 2, 3]).is_ok());
    }

    #[test]
    fn error_messages() {
        assert_eq!(
            PlanError::NoLayers.to_string(),
            "a plan needs at least one layer"
        );
        assert_eq!(
            PlanError::LengthMismatch {
                transfer: 3,
                exec: 2
            }
            .to_string(),
            "transfer_ms has 3 entries but exec_ms has 2"
        );
        assert_eq!(
            PlanError::BadValue {
                what: "exec_ms",
                index: 4,
                value: -1.5
            }
            .to_string(),
            "exec_ms[4] = -1.5 is not a finite non-negative number"
        );
        assert_eq!(
            PlanError::BadOverhead {
                what: "group_exec_overhead_ms",
                value: f64::INFINITY
            }
            .to_string(),
            "group_exec_overhead_ms = inf is not a finite non-negative number"
        );
    }

    #[test]
    fn overflowing_sums_do_not_panic() {
        let huge = f64::MAX / 2.0;
        let plan = plan_groups(&[huge; 4], &[huge; 4], huge, huge).expect("valid");
        assert!(!plan.group_starts.is_empty());
        assert_eq!(plan.group_starts.first(), Some(&0));
    }

    fn time_plan(n: usize, seed: u64, overheads: bool) -> (f64, Plan) {
        let mut rng = SplitMix64(seed);
        let inst = random_instance(&mut rng, n, Regime::Balanced, overheads);
        let start = Instant::now();
        let plan = plan_groups(&inst.t, &inst.x, inst.a * 0.01, inst.b * 0.01).expect("valid");
        (start.elapsed().as_secs_f64(), plan)
    }

    #[test]
    fn thousand_layers_are_fast() {
        for (n, overheads) in [(1000, true), (1000, false), (2000, true), (2000, false)] {
            let (secs, plan) = time_plan(n, 0x5EED_1000 + n as u64, overheads);
            println!(
                "plan_groups: n = {n}, overheads = {overheads}: {:.2} ms, {} groups, makespan {:.3} ms",
                secs * 1e3,
                plan.group_starts.len(),
                plan.makespan_ms
            );
            if n == 1000 && !cfg!(debug_assertions) {
                assert!(secs < 2.0, "n = {n} took {secs} s");
            }
        }
    }
}
