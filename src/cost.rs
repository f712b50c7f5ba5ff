//! A cost model that predicts what the GPU does, fitted to measurements, and
//! closed-loop planning (issue 15).
//!
//! The planner ([`crate::planner`]) is exact for the costs it is given. What
//! it is given comes from here:
//!
//! 1. **Calibration.** A few plans of the model (one group, one group per
//!    layer, `2, 4, 8, 16` equal groups, and any the caller adds, e.g.
//!    hand-chosen ones) are measured as a server runs them (the caller's
//!    `measure` callback: GPU events, each switch right after another model's
//!    run).
//! 2. **Fit.** [`fit`] chooses the terms of [`Costs`] that are not measured
//!    directly (per-group execution overhead `b`, first-kernel latency `L`,
//!    execution scale `κ`, slowdown under copies `σ`, per-group floor `h`)
//!    to minimise the squared relative error of the predicted makespans
//!    (a bounded compass search from several starts; the transfer side `a`,
//!    the per-layer times and the floor `R` are inputs).
//! 3. **Closed loop.** [`plan_closed_loop`] plans with the fitted model,
//!    measures the plan, and where the measurement is off the prediction by
//!    more than the tolerance (3%) adds it to the data, refits and replans,
//!    at most `max_rounds` times. The plan returned is the best *measured*
//!    one among everything measured (the model's plan unless a measured
//!    alternative beat it), with the fitted model's prediction for it.
//!
//! [`StoredCost`] is what is kept with the model in the store
//! (`Store::set_cost`): the fitted terms and the predicted and measured
//! makespans of the chosen plan.

use serde::Serialize;

use crate::error::{Error, Result};
use crate::planner::{self, Costs};

/// One measured plan.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Measurement {
    pub group_starts: Vec<usize>,
    /// Switch + first run, ms (a median of several runs).
    pub measured_ms: f64,
}

/// Which terms [`fit`] may change (the others keep the base value).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FitTerms {
    pub exec_overhead: bool,
    pub first_kernel: bool,
    pub exec_scale: bool,
    pub copy_slowdown: bool,
    pub floor_per_group: bool,
}

impl Default for FitTerms {
    fn default() -> Self {
        FitTerms { exec_overhead: true, first_kernel: true, exec_scale: true, copy_slowdown: true, floor_per_group: true }
    }
}

/// A fitted model and how well it explains its data.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Fit {
    pub costs: Costs,
    /// Root mean square of `predicted / measured - 1` over the data.
    pub rms_rel_error: f64,
    /// Largest `|predicted / measured - 1|`.
    pub max_rel_error: f64,
}

/// Upper bounds of the fitted terms (a term outside them means the data are
/// not switches of this model).
const MAX_OVERHEAD_MS: f64 = 5.0;
const MAX_FIRST_KERNEL_MS: f64 = 50.0;
const SCALE_RANGE: (f64, f64) = (0.05, 20.0);
const MAX_SLOWDOWN: f64 = 2.0;

/// The plans measured to calibrate a model of `n` layers: one group, one
/// group per layer, and `2, 4, 8, 16` groups of (nearly) equal layer counts,
/// without repeats, in that order.
pub fn calibration_plans(n: usize) -> Vec<Vec<usize>> {
    let mut plans: Vec<Vec<usize>> = Vec::new();
    let mut push = |p: Vec<usize>| {
        if !p.is_empty() && !plans.contains(&p) {
            plans.push(p);
        }
    };
    push(planner::single_group_plan(n));
    push(planner::per_layer_plan(n));
    for k in [2usize, 4, 8, 16] {
        if k < n {
            let mut p: Vec<usize> = (0..k).map(|g| g * n / k).collect();
            p.dedup();
            push(p);
        }
    }
    plans
}

fn check_data(t: &[f64], x: &[f64], base: &Costs, data: &[Measurement]) -> Result<()> {
    if data.is_empty() {
        return Err(Error::invalid("a fit needs at least one measured plan"));
    }
    for (i, d) in data.iter().enumerate() {
        if !(d.measured_ms.is_finite() && d.measured_ms > 0.0) {
            return Err(Error::invalid(format!("measurement {i}: {} ms is not a positive time", d.measured_ms)));
        }
        planner::makespan_with(t, x, base, &d.group_starts)?;
    }
    Ok(())
}

/// Weighted squared relative errors of `costs` on `data` (validated), summed.
fn loss(t: &[f64], x: &[f64], costs: &Costs, data: &[Measurement], weights: &[f64]) -> f64 {
    data.iter()
        .zip(weights)
        .map(|(d, w)| match planner::makespan_with(t, x, costs, &d.group_starts) {
            Ok(p) => w * (p / d.measured_ms - 1.0).powi(2),
            Err(_) => f64::INFINITY,
        })
        .sum()
}

/// Weight of a plan the closed loop measured (the model's own optimum)
/// against a calibration plan's 1: the fit must be right where the plan is.
const LOOP_WEIGHT: f64 = 4.0;

/// The free terms as a vector, and back.
fn params(c: &Costs) -> [f64; 5] {
    [c.exec_overhead_ms, c.first_kernel_ms, c.exec_scale, c.copy_slowdown, c.floor_per_group_ms]
}

fn with_params(base: &Costs, p: &[f64; 5]) -> Costs {
    Costs {
        exec_overhead_ms: p[0],
        first_kernel_ms: p[1],
        exec_scale: p[2],
        copy_slowdown: p[3],
        floor_per_group_ms: p[4],
        ..*base
    }
}

fn clamp_params(p: &mut [f64; 5]) {
    p[0] = p[0].clamp(0.0, MAX_OVERHEAD_MS);
    p[1] = p[1].clamp(0.0, MAX_FIRST_KERNEL_MS);
    p[2] = p[2].clamp(SCALE_RANGE.0, SCALE_RANGE.1);
    p[3] = p[3].clamp(0.0, MAX_SLOWDOWN);
    p[4] = p[4].clamp(0.0, MAX_OVERHEAD_MS);
}

/// Fits the free terms (`terms`) of `base` to `data`: the model whose
/// predicted makespans have the smallest squared relative error (a local
/// optimum of a bounded compass search from several starts; deterministic).
/// `t`, `x`: per-layer transfer and (measured) execution times, ms.
pub fn fit(t: &[f64], x: &[f64], base: &Costs, terms: FitTerms, data: &[Measurement]) -> Result<Fit> {
    fit_weighted(t, x, base, terms, data, &vec![1.0; data.len()])
}

/// [`fit`] with a weight per measurement.
fn fit_weighted(t: &[f64], x: &[f64], base: &Costs, terms: FitTerms, data: &[Measurement], weights: &[f64]) -> Result<Fit> {
    base.validate()?;
    check_data(t, x, base, data)?;
    let free = [terms.exec_overhead, terms.first_kernel, terms.exec_scale, terms.copy_slowdown, terms.floor_per_group];
    let total_x: f64 = x.iter().sum();
    // Step sizes start at a tenth of the scale of each term.
    let scale_ms = (total_x / x.len().max(1) as f64).max(1e-3);
    let steps0 = [scale_ms, scale_ms * 4.0, 0.1, 0.1, scale_ms];
    let mut starts = vec![params(base)];
    for kappa in [0.6, 1.0, 1.4] {
        let mut p = params(base);
        if free[2] {
            p[2] = kappa;
        }
        if !starts.contains(&p) {
            starts.push(p);
        }
    }
    let mut best: Option<([f64; 5], f64)> = None;
    for mut p in starts {
        clamp_params(&mut p);
        let mut f = loss(t, x, &with_params(base, &p), data, weights);
        let mut steps = steps0;
        for _ in 0..4000 {
            let mut improved = false;
            for i in 0..5 {
                if !free[i] {
                    continue;
                }
                for dir in [1.0, -1.0] {
                    let mut q = p;
                    q[i] += dir * steps[i];
                    clamp_params(&mut q);
                    if q == p {
                        continue;
                    }
                    let g = loss(t, x, &with_params(base, &q), data, weights);
                    if g < f {
                        (p, f, improved) = (q, g, true);
                        break;
                    }
                }
            }
            if !improved {
                let mut any = false;
                for (i, s) in steps.iter_mut().enumerate() {
                    if free[i] && *s > 1e-9 * steps0[i] {
                        *s *= 0.5;
                        any = true;
                    }
                }
                if !any {
                    break;
                }
            }
        }
        if best.is_none_or(|(_, bf)| f < bf) {
            best = Some((p, f));
        }
    }
    let (p, _) = best.ok_or_else(|| Error::Internal("no fit".into()))?;
    let costs = with_params(base, &p);
    let errs: Vec<f64> = data
        .iter()
        .map(|d| planner::makespan_with(t, x, &costs, &d.group_starts).map(|m| m / d.measured_ms - 1.0))
        .collect::<std::result::Result<_, _>>()?;
    let rms = (errs.iter().map(|e| e * e).sum::<f64>() / errs.len() as f64).sqrt();
    let max = errs.iter().fold(0.0_f64, |m, e| m.max(e.abs()));
    Ok(Fit { costs, rms_rel_error: rms, max_rel_error: max })
}

/// Options of [`plan_closed_loop`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoopOptions {
    /// Refit and replan when `|measured / predicted - 1|` exceeds this.
    pub tolerance: f64,
    /// At most this many measure-refit-replan rounds after calibration.
    pub max_rounds: usize,
    pub terms: FitTerms,
}

impl Default for LoopOptions {
    fn default() -> Self {
        LoopOptions { tolerance: 0.03, max_rounds: 4, terms: FitTerms::default() }
    }
}

/// What [`plan_closed_loop`] chose and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoopResult {
    /// The plan to use: the best measured plan.
    pub group_starts: Vec<usize>,
    pub predicted_ms: f64,
    pub measured_ms: f64,
    /// The model's own optimum at the end (equal to `group_starts` unless a
    /// measured alternative beat it).
    pub model_plan: Vec<usize>,
    pub model_plan_predicted_ms: f64,
    pub model_plan_measured_ms: f64,
    pub fit: Fit,
    /// Measure-refit-replan rounds run (0: the first plan was within tolerance).
    pub rounds: usize,
    /// Every measurement, calibration first.
    pub data: Vec<Measurement>,
}

impl LoopResult {
    /// `|measured / predicted - 1|` of the chosen plan.
    pub fn rel_error(&self) -> f64 {
        (self.measured_ms / self.predicted_ms - 1.0).abs()
    }
}

/// Calibrates, fits, plans, measures the plan and, while measured and
/// predicted differ by more than `opts.tolerance`, refits and replans (at
/// most `opts.max_rounds` times). `extra_plans` are measured with the
/// calibration plans (e.g. hand-chosen groups). `measure(plan)` returns the
/// measured switch + run time of a plan, ms. See the module documentation.
pub fn plan_closed_loop(
    t: &[f64],
    x: &[f64],
    base: &Costs,
    extra_plans: &[Vec<usize>],
    opts: LoopOptions,
    measure: &mut dyn FnMut(&[usize]) -> Result<f64>,
) -> Result<LoopResult> {
    if !(opts.tolerance.is_finite() && opts.tolerance >= 0.0) {
        return Err(Error::invalid(format!("tolerance {} is not a non-negative number", opts.tolerance)));
    }
    planner::makespan_with(t, x, base, &planner::single_group_plan(t.len()))?;
    let mut data: Vec<Measurement> = Vec::new();
    let mut measure_plan = |plan: &[usize], data: &mut Vec<Measurement>| -> Result<f64> {
        let ms = measure(plan)?;
        if !(ms.is_finite() && ms > 0.0) {
            return Err(Error::invalid(format!("the measurement of a plan of {} groups is {ms} ms", plan.len())));
        }
        data.push(Measurement { group_starts: plan.to_vec(), measured_ms: ms });
        Ok(ms)
    };
    for p in calibration_plans(t.len()).iter().chain(extra_plans) {
        planner::makespan_with(t, x, base, p)?;
        if !data.iter().any(|d| &d.group_starts == p) {
            measure_plan(p, &mut data)?;
        }
    }
    let calibrated = data.len();
    let weights = |data: &[Measurement], w: f64| -> Vec<f64> { (0..data.len()).map(|i| if i < calibrated { 1.0 } else { w }).collect() };
    let mut fitted = fit(t, x, base, opts.terms, &data)?;
    let mut plan = planner::plan_groups_with(t, x, &fitted.costs)?;
    let mut measured = measure_plan(&plan.group_starts, &mut data)?;
    let mut rounds = 0;
    let mut loop_weight = LOOP_WEIGHT;
    let off = |measured: f64, predicted: f64| (measured / predicted - 1.0).abs() > opts.tolerance;
    while off(measured, plan.makespan_ms) && rounds < opts.max_rounds {
        rounds += 1;
        fitted = fit_weighted(t, x, &fitted.costs, opts.terms, &data, &weights(&data, loop_weight))?;
        let next = planner::plan_groups_with(t, x, &fitted.costs)?;
        if next.group_starts == plan.group_starts {
            // The refit keeps the plan but may still mispredict it, where the
            // terms cannot explain the calibration plans and this one at
            // once: weigh the plans the loop measured more, so that the model
            // is right where the plan is (the prediction a user reads).
            plan = next;
            loop_weight *= LOOP_WEIGHT;
            continue;
        }
        plan = next;
        measured = measure_plan(&plan.group_starts, &mut data)?;
    }
    if off(measured, plan.makespan_ms) {
        // One last fit that includes the last measurement, for the predictions below.
        fitted = fit_weighted(t, x, &fitted.costs, opts.terms, &data, &weights(&data, loop_weight))?;
    }
    // Per plan, the median of its measurements (a plan may be measured twice).
    let measured_of = |p: &[usize]| {
        let mut v: Vec<f64> = data.iter().filter(|d| d.group_starts == p).map(|d| d.measured_ms).collect();
        crate::measure::median(&mut v)
    };
    let model_plan_measured_ms = measured_of(&plan.group_starts);
    let mut chosen = plan.group_starts.clone();
    let mut chosen_ms = model_plan_measured_ms;
    for d in &data {
        let ms = measured_of(&d.group_starts);
        if ms < chosen_ms {
            (chosen, chosen_ms) = (d.group_starts.clone(), ms);
        }
    }
    Ok(LoopResult {
        predicted_ms: planner::makespan_with(t, x, &fitted.costs, &chosen)?,
        measured_ms: chosen_ms,
        group_starts: chosen,
        model_plan_predicted_ms: planner::makespan_with(t, x, &fitted.costs, &plan.group_starts)?,
        model_plan: plan.group_starts,
        model_plan_measured_ms,
        fit: fitted,
        rounds,
        data,
    })
}

/// What is kept with a model in the store: the fitted cost model and the
/// predicted and measured makespans of the plan chosen with it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct StoredCost {
    pub costs: Costs,
    /// Bandwidth the transfer times were computed with, GB/s.
    pub bandwidth_gbps: f64,
    pub predicted_ms: f64,
    pub measured_ms: f64,
    /// Groups of the chosen plan.
    pub groups: u32,
    /// Refit rounds of the closed loop.
    pub rounds: u32,
    pub fit_rms_rel_error: f64,
    /// When it was stored, seconds since the Unix epoch.
    pub unix_s: u64,
}

impl StoredCost {
    /// From a closed loop's result.
    pub fn from_loop(r: &LoopResult, bandwidth_gbps: f64) -> StoredCost {
        StoredCost {
            costs: r.fit.costs,
            bandwidth_gbps,
            predicted_ms: r.predicted_ms,
            measured_ms: r.measured_ms,
            groups: r.group_starts.len() as u32,
            rounds: r.rounds as u32,
            fit_rms_rel_error: r.fit.rms_rel_error,
            unix_s: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        }
    }

    /// Checks every field (what `Store::set_cost` accepts).
    pub fn validate(&self) -> Result<()> {
        self.costs.validate()?;
        for (what, v) in [
            ("bandwidth_gbps", self.bandwidth_gbps),
            ("predicted_ms", self.predicted_ms),
            ("measured_ms", self.measured_ms),
            ("fit_rms_rel_error", self.fit_rms_rel_error),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(Error::invalid(format!("{what} = {v} is not a finite non-negative number")));
            }
        }
        Ok(())
    }

    /// Size of [`StoredCost::to_bytes`].
    pub const BYTES: usize = 8 * 15;

    /// Little-endian fields, a version word first.
    pub fn to_bytes(&self) -> [u8; Self::BYTES] {
        let c = &self.costs;
        let words: [u64; 15] = [
            COST_RECORD_VERSION,
            c.transfer_overhead_ms.to_bits(),
            c.exec_overhead_ms.to_bits(),
            c.first_kernel_ms.to_bits(),
            c.exec_scale.to_bits(),
            c.copy_slowdown.to_bits(),
            c.floor_ms.to_bits(),
            c.floor_per_group_ms.to_bits(),
            self.bandwidth_gbps.to_bits(),
            self.predicted_ms.to_bits(),
            self.measured_ms.to_bits(),
            self.groups as u64 | (self.rounds as u64) << 32,
            self.fit_rms_rel_error.to_bits(),
            self.unix_s,
            0,
        ];
        let mut out = [0u8; Self::BYTES];
        for (i, w) in words.iter().enumerate() {
            out[8 * i..8 * i + 8].copy_from_slice(&w.to_le_bytes());
        }
        out
    }

    /// `None` when nothing is stored (version word 0); an error when the
    /// record is not one this library wrote, or does not validate.
    pub fn from_bytes(b: &[u8]) -> Result<Option<StoredCost>> {
        if b.len() < Self::BYTES {
            return Err(Error::corrupt("cost record truncated"));
        }
        let w = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[8 * i..8 * i + 8]);
            u64::from_le_bytes(a)
        };
        let f = |i: usize| f64::from_bits(w(i));
        match w(0) {
            0 => return Ok(None),
            COST_RECORD_VERSION => {}
            v => return Err(Error::corrupt(format!("cost record version {v} is unknown"))),
        }
        let s = StoredCost {
            costs: Costs {
                transfer_overhead_ms: f(1),
                exec_overhead_ms: f(2),
                first_kernel_ms: f(3),
                exec_scale: f(4),
                copy_slowdown: f(5),
                floor_ms: f(6),
                floor_per_group_ms: f(7),
            },
            bandwidth_gbps: f(8),
            predicted_ms: f(9),
            measured_ms: f(10),
            groups: w(11) as u32,
            rounds: (w(11) >> 32) as u32,
            fit_rms_rel_error: f(12),
            unix_s: w(13),
        };
        s.validate().map_err(|e| Error::corrupt(format!("cost record: {e}")))?;
        Ok(Some(s))
    }
}

const COST_RECORD_VERSION: u64 = 0x5053_434f_5354_0001; // "PSCOST" v1

/// The plan a server uses for stored model `m`: from the cost model fitted
/// and stored with it (the closed loop of `pipeswitch demo` or a library
/// calibration), else from its stored per-layer times with the link
/// `(bandwidth_gbps, per-copy overhead ms)` and default overheads, else one
/// group per layer. Group starts.
pub fn plan_for_stored(store: &crate::store::Store, m: &crate::store::Model, link: (f64, f64)) -> Vec<usize> {
    let fitted = store.cost(&m.name).ok().flatten().and_then(|c| {
        let t = crate::ffi::plan::layer_transfer_ms(m, c.bandwidth_gbps).ok()?;
        let x: Vec<f64> = m.layers.iter().map(|l| l.exec_ms).collect();
        planner::plan_groups_with(&t, &x, &c.costs).ok()
    });
    fitted
        .or_else(|| crate::ffi::plan::plan_stored_model(m, link.0, link.1, 0.005).ok())
        .map(|p| p.group_starts)
        .unwrap_or_else(|| planner::per_layer_plan(m.layers.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model whose "GPU" follows the extended cost model with known terms.
    struct Synthetic {
        t: Vec<f64>,
        x: Vec<f64>,
        truth: Costs,
    }

    fn synthetic(n: usize, seed: u64, truth: Costs) -> Synthetic {
        let mut s = seed;
        let mut next = || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 11) as f64) / ((1u64 << 53) as f64)
        };
        let t = (0..n).map(|_| 0.05 + 0.3 * next()).collect();
        let x = (0..n).map(|_| 0.05 + 0.3 * next()).collect();
        Synthetic { t, x, truth }
    }

    fn true_ms(s: &Synthetic, plan: &[usize]) -> f64 {
        planner::makespan_with(&s.t, &s.x, &s.truth, plan).expect("valid plan")
    }

    fn gpu_like() -> Costs {
        Costs {
            transfer_overhead_ms: 0.004,
            exec_overhead_ms: 0.03,
            first_kernel_ms: 0.4,
            exec_scale: 0.8,
            copy_slowdown: 0.1,
            floor_ms: 0.0,
            floor_per_group_ms: 0.0,
        }
    }

    #[test]
    fn calibration_plans_are_distinct_and_valid() {
        assert_eq!(calibration_plans(1), vec![vec![0]]);
        assert_eq!(calibration_plans(3), vec![vec![0], vec![0, 1, 2], vec![0, 1]]);
        let plans = calibration_plans(100);
        assert_eq!(plans.len(), 6);
        assert_eq!(plans[5], (0..16).map(|g| g * 100 / 16).collect::<Vec<_>>());
        for p in &plans {
            assert!(planner::makespan(&[1.0; 100], &[1.0; 100], 0.0, 0.0, p).is_ok());
        }
    }

    #[test]
    fn fit_recovers_predictions_of_a_known_model() {
        let s = synthetic(60, 7, gpu_like());
        let mut plans = calibration_plans(60);
        plans.push(vec![0, 3, 10, 30]);
        let data: Vec<Measurement> =
            plans.iter().map(|p| Measurement { group_starts: p.clone(), measured_ms: true_ms(&s, p) }).collect();
        // Start from the naive model: only a is known.
        let base = Costs::new(0.004, 0.0);
        let f = fit(&s.t, &s.x, &base, FitTerms::default(), &data).expect("fit");
        assert!(f.max_rel_error < 2e-3, "{f:?}");
        // Held-out plans are predicted as well.
        for p in [vec![0, 1], vec![0, 5, 6, 7, 40], vec![0, 20, 40]] {
            let pred = planner::makespan_with(&s.t, &s.x, &f.costs, &p).expect("valid");
            let truth = true_ms(&s, &p);
            assert!((pred / truth - 1.0).abs() < 0.01, "{p:?}: {pred} vs {truth} ({f:?})");
        }
    }

    #[test]
    fn fit_keeps_fixed_terms() {
        let s = synthetic(20, 8, gpu_like());
        let data: Vec<Measurement> = calibration_plans(20)
            .iter()
            .map(|p| Measurement { group_starts: p.clone(), measured_ms: true_ms(&s, p) })
            .collect();
        let base = Costs { floor_ms: 1.5, ..Costs::new(0.004, 0.02) };
        let terms = FitTerms { exec_overhead: false, copy_slowdown: false, ..FitTerms::default() };
        let f = fit(&s.t, &s.x, &base, terms, &data).expect("fit");
        assert_eq!(f.costs.exec_overhead_ms, 0.02);
        assert_eq!(f.costs.copy_slowdown, 0.0);
        assert_eq!(f.costs.floor_ms, 1.5);
        assert_eq!(f.costs.transfer_overhead_ms, 0.004);
    }

    #[test]
    fn fit_rejects_bad_data() {
        let (t, x) = ([1.0, 1.0], [1.0, 1.0]);
        let base = Costs::new(0.0, 0.0);
        assert!(fit(&t, &x, &base, FitTerms::default(), &[]).is_err());
        for ms in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let d = [Measurement { group_starts: vec![0], measured_ms: ms }];
            assert!(fit(&t, &x, &base, FitTerms::default(), &d).is_err(), "{ms}");
        }
        let d = [Measurement { group_starts: vec![0, 2], measured_ms: 1.0 }];
        assert!(fit(&t, &x, &base, FitTerms::default(), &d).is_err());
    }

    #[test]
    fn closed_loop_finds_the_true_optimum_from_a_wrong_model() {
        for (seed, truth) in [
            (11, gpu_like()),
            (12, Costs { copy_slowdown: 0.0, first_kernel_ms: 1.0, ..gpu_like() }),
            (13, Costs { exec_scale: 0.6, floor_ms: 6.0, floor_per_group_ms: 0.05, ..gpu_like() }),
            (14, Costs { exec_overhead_ms: 0.3, exec_scale: 0.5, ..gpu_like() }),
        ] {
            let s = synthetic(50, seed, truth);
            // The planner's old inputs: the per-layer times as measured, a and b only.
            let base = Costs::new(0.004, 0.005);
            let naive = planner::plan_groups_with(&s.t, &s.x, &base).expect("plan");
            let optimum = planner::plan_groups_with(&s.t, &s.x, &s.truth).expect("plan").makespan_ms;
            let mut calls = 0;
            let r = plan_closed_loop(&s.t, &s.x, &Costs { floor_ms: truth.floor_ms, ..base }, &[], LoopOptions::default(), &mut |p| {
                calls += 1;
                Ok(true_ms(&s, p))
            })
            .expect("loop");
            assert!(r.rel_error() <= 0.03, "seed {seed}: {r:?}");
            assert!(r.measured_ms <= optimum * 1.01, "seed {seed}: measured {} vs optimum {optimum}", r.measured_ms);
            let naive_ms = true_ms(&s, &naive.group_starts);
            println!("seed {seed}: naive {naive_ms:.4} ms, loop {:.4} ms (predicted {:.4}), optimum {optimum:.4}, {} rounds, {} measured", r.measured_ms, r.predicted_ms, r.rounds, r.data.len());
            assert!(r.measured_ms <= naive_ms * 1.01);
            if seed == 14 {
                // Here the naive model is clearly wrong, and the loop fixes it.
                assert!(naive_ms > optimum * 1.05, "{naive_ms} vs {optimum}");
            }
            assert_eq!(calls, r.data.len());
            assert!(r.rounds <= LoopOptions::default().max_rounds);
        }
    }

    #[test]
    fn closed_loop_refits_when_the_first_plan_is_off() {
        // A "GPU" that the extended model cannot express: every group after a
        // stall costs 0.2 ms more. The loop must stay bounded and return the
        // best plan it measured.
        let s = synthetic(30, 21, gpu_like());
        let gpu = |p: &[usize]| true_ms(&s, p) + 0.2 * p.len() as f64 * (p.len() > 3) as u8 as f64;
        let opts = LoopOptions { max_rounds: 3, ..LoopOptions::default() };
        let r = plan_closed_loop(&s.t, &s.x, &Costs::new(0.004, 0.0), &[vec![0, 2]], opts, &mut |p| Ok(gpu(p))).expect("loop");
        println!("{:?}", (r.rounds, r.data.len(), &r.group_starts, r.measured_ms, r.predicted_ms, &r.model_plan));
        assert!((1..=3).contains(&r.rounds), "the first plan is off, so the loop refits");
        let best = r.data.iter().map(|d| d.measured_ms).fold(f64::INFINITY, f64::min);
        assert_eq!(r.measured_ms, best);
        assert!(r.data.iter().any(|d| d.group_starts == vec![0, 2]));
        // A failing measurement is an error, not a plan.
        let err = plan_closed_loop(&s.t, &s.x, &Costs::new(0.0, 0.0), &[], opts, &mut |_| Ok(f64::NAN));
        assert!(err.is_err());
    }

    #[test]
    fn closed_loop_is_right_where_its_plan_is() {
        // A "GPU" on which the optimum of the true terms costs 6% less than
        // any set of terms predicts from the other plans (as GPT-2 medium's
        // 8-group plan did on the H100: predicted 27.03 ms, measured 25.92).
        // Where a refit keeps the plan (seed 35), the loop weighs the plans it
        // measured more until the prediction is within the tolerance.
        for seed in [35, 41] {
            let s = synthetic(40, seed, gpu_like());
            let optimum = planner::plan_groups_with(&s.t, &s.x, &s.truth).expect("plan").group_starts;
            let gpu = |p: &[usize]| true_ms(&s, p) * if p == optimum.as_slice() { 0.94 } else { 1.0 };
            let opts = LoopOptions::default();
            let r = plan_closed_loop(&s.t, &s.x, &Costs::new(0.004, 0.0), &[], opts, &mut |p| Ok(gpu(p))).expect("loop");
            let err = (r.model_plan_measured_ms / r.model_plan_predicted_ms - 1.0).abs();
            println!("seed {seed}: {} groups, predicted {:.4}, measured {:.4}, {} rounds", r.model_plan.len(), r.model_plan_predicted_ms, r.model_plan_measured_ms, r.rounds);
            assert!(r.rounds >= 1 && r.rounds <= opts.max_rounds, "seed {seed}: {} rounds", r.rounds);
            assert!(err <= opts.tolerance, "seed {seed}: {r:?}");
        }
    }

    #[test]
    fn fit_of_a_large_model_is_fast() {
        // ResNet-152 as PyTorch registers it: 311 layers; 10 measured plans.
        let s = synthetic(311, 31, gpu_like());
        let mut plans = calibration_plans(311);
        plans.extend([vec![0, 5, 40], vec![0, 1, 2, 3, 100, 200], vec![0, 150], vec![0, 10, 20, 30]]);
        let data: Vec<Measurement> =
            plans.iter().map(|p| Measurement { group_starts: p.clone(), measured_ms: true_ms(&s, p) }).collect();
        let start = std::time::Instant::now();
        let f = fit(&s.t, &s.x, &Costs::new(0.004, 0.0), FitTerms::default(), &data).expect("fit");
        let secs = start.elapsed().as_secs_f64();
        println!("fit of 311 layers, {} plans: {:.3} s, max error {:.2e}", data.len(), secs, f.max_rel_error);
        assert!(f.max_rel_error < 5e-3, "{f:?}");
        if !cfg!(debug_assertions) {
            assert!(secs < 1.0, "{secs} s");
        }
    }

    #[test]
    fn stored_cost_round_trips_and_rejects_garbage() {
        let s = StoredCost {
            costs: gpu_like(),
            bandwidth_gbps: 53.2,
            predicted_ms: 9.4,
            measured_ms: 9.5,
            groups: 4,
            rounds: 2,
            fit_rms_rel_error: 0.01,
            unix_s: 1_800_000_000,
        };
        let b = s.to_bytes();
        assert_eq!(StoredCost::from_bytes(&b).expect("valid"), Some(s));
        assert_eq!(StoredCost::from_bytes(&[0u8; StoredCost::BYTES]).expect("empty"), None);
        let mut bad = b;
        bad[0] ^= 1;
        assert!(StoredCost::from_bytes(&bad).is_err());
        let mut bad = b;
        bad[8 * 4..8 * 5].copy_from_slice(&f64::NAN.to_bits().to_le_bytes());
        assert!(StoredCost::from_bytes(&bad).is_err());
        assert!(StoredCost::from_bytes(&b[..10]).is_err());
        assert!(StoredCost { measured_ms: -1.0, ..s }.validate().is_err());
    }
}
