//! Measurements the planner needs, taken on the current device: the pinned
//! host-to-device bandwidth, and the fixed cost `a` of one more group (a copy
//! plus its event), from a linear fit `t(bytes) = a + bytes / bandwidth` over
//! copies of several sizes, each timed with events.

use crate::cuda::{memory, Device, DeviceAlloc, Event, PinnedHost, Stream};
use crate::error::{Error, Result};

/// What [`measure_h2d`] found.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct H2dProfile {
    /// Median bandwidth of one copy of `peak_bytes`, GB/s (1e9 bytes/s).
    pub peak_gbps: f64,
    pub peak_bytes: u64,
    /// Per-copy overhead from the linear fit, ms (the planner's `a`).
    pub overhead_ms: f64,
    /// Bandwidth from the fit's slope, GB/s.
    pub fit_gbps: f64,
    /// (bytes, median ms) of each copy size measured.
    pub samples: Vec<(u64, f64)>,
}

/// Fills `buf` with pseudo-random bytes (never zeros: zeros can hide bugs
/// and run faster than real data).
pub fn fill_random(buf: &mut [u8], seed: u64) {
    let mut s = seed | 1;
    for chunk in buf.chunks_mut(8) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        let b = s.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

pub fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Least-squares fit y = a + b x; returns (a, b).
pub fn linear_fit(points: &[(f64, f64)]) -> Option<(f64, f64)> {
    let n = points.len() as f64;
    if points.len() < 2 {
        return None;
    }
    let (sx, sy) = points.iter().fold((0.0, 0.0), |(sx, sy), (x, y)| (sx + x, sy + y));
    let (mx, my) = (sx / n, sy / n);
    let sxx: f64 = points.iter().map(|(x, _)| (x - mx) * (x - mx)).sum();
    let sxy: f64 = points.iter().map(|(x, y)| (x - mx) * (y - my)).sum();
    if sxx == 0.0 {
        return None;
    }
    let b = sxy / sxx;
    Some((my - b * mx, b))
}

/// Times `reps` copies of `bytes` from pinned memory, one event pair each;
/// returns the per-copy times in ms.
pub fn time_copies(device: &'static Device, src: &PinnedHost, dst: &DeviceAlloc, bytes: usize, reps: usize) -> Result<Vec<f64>> {
    if bytes > src.len() || bytes > dst.bytes() {
        return Err(Error::invalid("copy larger than its buffers"));
    }
    let stream = Stream::new(device)?;
    let start = Event::new(device, true)?;
    let end = Event::new(device, true)?;
    let mut out = Vec::with_capacity(reps);
    for _ in 0..reps {
        start.record(stream.raw())?;
        // SAFETY: both buffers hold at least `bytes` and outlive the sync below.
        unsafe { memory::copy_htod_async(dst.ptr(), src.as_ptr(), bytes, stream.raw())? };
        end.record(stream.raw())?;
        end.synchronize()?;
        out.push(f64::from(Event::elapsed_ms(&start, &end)?));
    }
    Ok(out)
}

/// Measures the H2D peak with one copy of `peak_bytes` (median of `reps`) and
/// fits the per-copy overhead over sizes from 64 KiB to 64 MiB.
pub fn measure_h2d(ordinal: i32, peak_bytes: u64, reps: usize) -> Result<H2dProfile> {
    if peak_bytes < (1 << 20) {
        return Err(Error::invalid("measure with at least 1 MiB"));
    }
    let reps = reps.max(3);
    let device = Device::get(ordinal)?;
    let fit_max: u64 = 64 << 20;
    let buf = peak_bytes.max(fit_max) as usize;
    let mut src = PinnedHost::new(device, buf)?;
    fill_random(src.as_mut_slice(), 0x2545_f491_4f6c_dd1d);
    let dst = DeviceAlloc::new(device, buf)?;
    // Warm-up.
    time_copies(device, &src, &dst, fit_max as usize, 2)?;
    let mut peak = time_copies(device, &src, &dst, peak_bytes as usize, reps)?;
    let peak_ms = median(&mut peak);
    let mut samples = Vec::new();
    let mut size: u64 = 64 << 10;
    while size <= fit_max {
        let mut t = time_copies(device, &src, &dst, size as usize, reps.max(9))?;
        samples.push((size, median(&mut t)));
        size *= 2;
    }
    let pts: Vec<(f64, f64)> = samples.iter().map(|&(b, ms)| (b as f64, ms)).collect();
    let (a, slope) = linear_fit(&pts).ok_or_else(|| Error::Internal("degenerate fit".into()))?;
    Ok(H2dProfile {
        peak_gbps: peak_bytes as f64 / (peak_ms * 1e-3) / 1e9,
        peak_bytes,
        overhead_ms: a.max(0.0),
        fit_gbps: if slope > 0.0 { 1.0 / slope / 1e6 } else { f64::NAN },
        samples,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit_recovers_a_line() {
        let pts: Vec<(f64, f64)> = (1..10).map(|i| (i as f64 * 1e6, 0.01 + i as f64 * 1e6 / 50e6)).collect();
        let (a, b) = linear_fit(&pts).unwrap();
        assert!((a - 0.01).abs() < 1e-9);
        assert!((1.0 / b / 1e6 - 50.0).abs() < 1e-6);
        assert!(linear_fit(&[(1.0, 1.0)]).is_none());
        assert!(linear_fit(&[(1.0, 1.0), (1.0, 2.0)]).is_none());
    }

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&mut []).is_nan());
    }
}
