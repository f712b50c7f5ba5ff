//! `pipeswitch bench transfer`: store-to-arena transfer of real-sized models
//! against the card's own single-copy pinned H2D peak, measured in the same
//! run. Two synthetic models with real layer shapes (random bytes, fp32):
//! GPT-2 medium (few large tensors, 1.4 GB) and ResNet-152 (932 small
//! tensors, 241 MB). Variants are interleaved (A B C A B C ...).

use serde::Serialize;
use std::sync::Arc;
use std::time::Instant;

use pipeswitch::arena::Arena;
use pipeswitch::cuda::Device;
use pipeswitch::error::{Error, Result};
use pipeswitch::measure::{measure_h2d, median, H2dProfile};
use pipeswitch::model::synthetic::{add_synthetic, gpt2_medium_shape, resnet152_shape, shape_size};
use pipeswitch::planner;
use pipeswitch::store::Store;
use pipeswitch::switch::Switch;

/// "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3": the card's part of
/// result file names.
pub fn card_slug(card: &str) -> String {
    card.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).collect()
}

/// Statistics of a series of samples.
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    pub median: f64,
    pub p10: f64,
    pub p90: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Stats {
    pub fn of(v: &[f64]) -> Stats {
        let mut s = v.to_vec();
        let med = median(&mut s);
        let q = |p: f64| {
            if s.is_empty() {
                f64::NAN
            } else {
                s[((s.len() - 1) as f64 * p).round() as usize]
            }
        };
        Stats { median: med, p10: q(0.1), p90: q(0.9), min: q(0.0), max: q(1.0), n: s.len() }
    }
}

/// One variant's results for one model.
#[derive(Debug, Clone, Serialize)]
pub struct VariantResult {
    pub variant: String,
    pub groups: usize,
    pub copies: usize,
    /// GPU time from the first copy's start to the last group's event.
    pub ms: Stats,
    pub gbps: Stats,
    /// Median bandwidth over the same run's single-copy peak.
    pub fraction_of_peak: f64,
    /// Host time from the start call to the end of the synchronize, ms.
    pub host_ms: Stats,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelResult {
    pub model: String,
    pub bytes: u64,
    pub tensors: usize,
    pub layers: usize,
    pub verified: bool,
    pub variants: Vec<VariantResult>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TransferReport {
    pub card: String,
    pub date_unix_s: u64,
    pub command: String,
    pub h2d: H2dProfile,
    pub store_pin_ms: f64,
    pub reps: usize,
    pub plan_note: String,
    pub models: Vec<ModelResult>,
    pub targets: serde_json::Value,
}

/// Runs the transfer benchmark on `device`; `log` receives progress lines.
pub fn run_transfer(device: i32, reps: usize, log: &mut dyn FnMut(&str)) -> Result<TransferReport> {
    let dev = Device::get(device)?;
    let card = dev.name()?;
    log(&format!("device {device}: {card}"));
    let h2d = measure_h2d(device, 1 << 30, reps.max(5))?;
    log(&format!(
        "single-copy pinned H2D peak (1 GiB): {:.2} GB/s; per-copy overhead a = {:.4} ms (fit slope {:.2} GB/s)",
        h2d.peak_gbps, h2d.overhead_ms, h2d.fit_gbps
    ));

    let models = [("gpt2-medium-like", gpt2_medium_shape()), ("resnet152-like", resnet152_shape())];
    let mut capacity = 0u64;
    for (_, s) in &models {
        capacity += shape_size(s)?.0 + (8 << 20);
    }
    let store_name = format!("bench-{}", std::process::id());
    let _ = Store::destroy(&store_name);
    let store = Arc::new(Store::create(&store_name, capacity, 16)?);
    let result = (|| {
        for (i, (name, shape)) in models.iter().enumerate() {
            log(&format!("writing {name} into store {store_name}"));
            add_synthetic(&store, name, shape, 0x1234_5678 + i as u64, &mut |_, _| {})?;
        }
        let t0 = Instant::now();
        store.pin(dev)?;
        let store_pin_ms = t0.elapsed().as_secs_f64() * 1e3;
        log(&format!("pinned the {} MB store in {store_pin_ms:.1} ms", store.capacity() / 1_000_000));

        let max_bytes = models.iter().map(|(n, _)| store.model(n).map(|m| m.bytes)).collect::<Result<Vec<_>>>()?;
        let arena_bytes = max_bytes.iter().copied().max().unwrap_or(0) + (4 << 20);
        let arena = Arc::new(Arena::create(device, arena_bytes, 2 << 20)?);
        let mut sw = Switch::new(device)?;
        let mut out = Vec::new();
        for (name, _) in &models {
            let m = store.model(name)?;
            let region = arena.alloc(m.bytes)?;
            // The plan: transfer times from the layer sizes at the measured
            // peak, execution assumed to take as long as the transfer (a
            // balanced pipeline, the hardest case for the copy engine: many
            // groups), a from the fit, b = 0.
            let t: Vec<f64> = m.layers.iter().map(|l| l.bytes as f64 / (h2d.peak_gbps * 1e6)).collect();
            let plan = planner::plan_groups(&t, &t, h2d.overhead_ms, 0.0)?;
            let per_layer = planner::per_layer_plan(m.layers.len());
            enum V<'a> {
                Whole,
                Plan(&'a [usize]),
            }
            let variants: [(&str, V<'_>); 3] = [
                ("whole (one copy)", V::Whole),
                ("pipelined, optimal plan", V::Plan(&plan.group_starts)),
                ("pipelined, one group per layer", V::Plan(&per_layer)),
            ];
            let mut ms = vec![Vec::new(); variants.len()];
            let mut host = vec![Vec::new(); variants.len()];
            let mut copies = vec![0usize; variants.len()];
            let mut groups = vec![0usize; variants.len()];
            for rep in 0..reps + 2 {
                for (vi, (_, v)) in variants.iter().enumerate() {
                    let t0 = Instant::now();
                    match v {
                        V::Whole => sw.start_whole(&store, name, &arena, region)?,
                        V::Plan(p) => sw.start(&store, name, &arena, region, p)?,
                    }
                    sw.synchronize()?;
                    let host_ms = t0.elapsed().as_secs_f64() * 1e3;
                    if rep >= 2 {
                        ms[vi].push(sw.elapsed_ms()?);
                        host[vi].push(host_ms);
                    }
                    copies[vi] = sw.n_copies()?;
                    groups[vi] = sw.n_groups()?;
                }
            }
            // Verify once: the arena region holds exactly the store's bytes.
            let mut back = vec![0u8; m.bytes as usize];
            arena.read(region, &mut back)?;
            let verified = back == store.model_bytes(&m)?;
            if !verified {
                return Err(Error::Internal(format!("{name}: arena bytes differ from the store after the switch")));
            }
            let mut vr = Vec::new();
            for (vi, (vname, _)) in variants.iter().enumerate() {
                let gbps: Vec<f64> = ms[vi].iter().map(|t| m.bytes as f64 / (t * 1e6)).collect();
                let st = Stats::of(&gbps);
                log(&format!(
                    "{name:>18} {vname:<32} {:>4} groups {:>4} copies: median {:.2} GB/s ({:.1}% of peak), p10 {:.2}, p90 {:.2}; {:.3} ms",
                    groups[vi],
                    copies[vi],
                    st.median,
                    100.0 * st.median / h2d.peak_gbps,
                    st.p10,
                    st.p90,
                    Stats::of(&ms[vi]).median
                ));
                vr.push(VariantResult {
                    variant: vname.to_string(),
                    groups: groups[vi],
                    copies: copies[vi],
                    fraction_of_peak: st.median / h2d.peak_gbps,
                    ms: Stats::of(&ms[vi]),
                    gbps: st,
                    host_ms: Stats::of(&host[vi]),
                });
            }
            arena.release(region)?;
            out.push(ModelResult {
                model: name.to_string(),
                bytes: m.bytes,
                tensors: m.tensors.len(),
                layers: m.layers.len(),
                verified,
                variants: vr,
            });
        }
        Ok((out, store_pin_ms))
    })();
    let _ = Store::destroy(&store_name);
    let (out, store_pin_ms) = result?;
    let whole_ok = out.iter().all(|m| m.variants[0].fraction_of_peak >= 0.97);
    let pipe_ok = out.iter().all(|m| m.variants[1].fraction_of_peak >= 0.95);
    Ok(TransferReport {
        card,
        date_unix_s: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        h2d,
        store_pin_ms,
        reps,
        plan_note: "optimal plan from the planner with transfer times = layer bytes / measured peak, execution times = transfer times, a = measured per-copy overhead, b = 0".into(),
        models: out,
        targets: serde_json::json!({
            "whole_model_min_fraction_of_peak": 0.97,
            "pipelined_min_fraction_of_peak": 0.95,
            "whole_model_met": whole_ok,
            "pipelined_met": pipe_ok,
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_shapes_have_the_real_sizes() {
        let (b, n) = shape_size(&gpt2_medium_shape()).unwrap();
        // GPT-2 medium: 354.8M parameters (tied LM head not stored twice).
        assert_eq!(n, 2 + 24 * 12 + 2);
        assert!((1_410_000_000..1_430_000_000).contains(&b), "{b}");
        let (b, n) = shape_size(&resnet152_shape()).unwrap();
        // torchvision resnet152 state_dict: 60.19M parameters, 932 entries.
        assert_eq!(n, 932);
        assert!((240_000_000..243_000_000).contains(&b), "{b}");
    }

    #[test]
    fn stats_are_ordered() {
        let s = Stats::of(&[5.0, 1.0, 3.0, 2.0, 4.0]);
        assert_eq!((s.min, s.median, s.max, s.n), (1.0, 3.0, 5.0, 5));
        assert!(s.p10 <= s.median && s.median <= s.p90);
    }
}
