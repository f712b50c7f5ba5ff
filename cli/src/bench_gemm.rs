//! `pipeswitch bench gemm`: our GEMM kernels against cuBLAS through PyTorch
//! at BERT-base and GPT-2-medium linear-layer shapes, fp32 / fp16 / bf16.
//!
//! The shapes, dtypes and timing parameters live in one file,
//! `bench/gemm_shapes.json`, embedded here and read by `bench/gemm_torch.py`
//! (the cuBLAS side), so the two cannot drift apart. Both sides time
//! `y[M,N] = x[M,K] W[N,K]^T + b[N]` (F.linear; here [`gemm`] with
//! `trans_b = true` and a bias) the same way:
//!
//! - `sets` input sets (x, W, b, y), together at least `rotate_bytes`, far
//!   more than the L2 cache, rotated launch by launch; random values in
//!   [-1, 1), never zeros;
//! - a check first: the output poisoned (NaN), one launch on set 0, every
//!   element finite, and `check_rows` rows against a float64 CPU reference
//!   (`||y - ref|| / ||ref||` under the dtype's tolerance; the fp32
//!   tolerance is below what TF32 would give);
//! - a sample = a spin kernel on the stream, a start event,
//!   `launches_per_sample` back-to-back launches, an end event; kept only when
//!   the start event had not completed by the time the host finished
//!   enqueuing (so the GPU never waited for the host and launch overhead is
//!   not timed), else discarded and the spin doubled;
//! - warm-up samples until `warmup_min_samples` and `warmup_min_ms`, then
//!   `reps` samples: median and spread of ms per launch and of TFLOP/s
//!   (2 M N K per launch).
//!
//! With the torch JSON, each row gets the cuBLAS median next to ours, the
//! ratio of the TFLOP/s medians (ours / cuBLAS) and `meets_50pct`.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::ffi::c_void;
use std::path::Path;

use cudarc::driver::sys::CUdevice_attribute;

use crate::bench::Stats;
use pipeswitch::cuda::{Device, DeviceAlloc, Event, LaunchConfig, Stream};
use pipeswitch::error::{Error, Result};
use pipeswitch::kernels::gemm::{self, from_half_bits, to_half_bits, Activation, GemmArgs, GemmDtype, GemmTile};

/// The shared shape list and method (also read by bench/gemm_torch.py).
pub const SHAPES_JSON: &str = include_str!("../../bench/gemm_shapes.json");

/// The target: ours at least this fraction of cuBLAS (TFLOP/s medians).
pub const TARGET_RATIO: f64 = 0.5;

/// One benchmark shape: `m` rows (batch x tokens), `k` in features, `n` out
/// features.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GemmShape {
    pub model: String,
    pub layer: String,
    pub m: usize,
    pub n: usize,
    pub k: usize,
}

/// Per-dtype check tolerances (relative error norms).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tolerances {
    pub f32: f64,
    pub f16: f64,
    pub bf16: f64,
}

/// Timing parameters shared with the torch script.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Method {
    pub launches_per_sample: usize,
    pub rotate_bytes: usize,
    pub max_sets: usize,
    pub spin_start_us: f64,
    pub spin_max_us: f64,
    pub max_discarded: usize,
    pub warmup_min_samples: usize,
    pub warmup_min_ms: f64,
    pub check_rows: usize,
    pub check_tolerance: Tolerances,
}

/// The parsed `bench/gemm_shapes.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShapeFile {
    pub dtypes: Vec<String>,
    pub shapes: Vec<GemmShape>,
    pub method: Method,
}

/// Parses a shape file's text and checks it.
pub fn parse_shapes(text: &str) -> Result<ShapeFile> {
    let f: ShapeFile = serde_json::from_str(text).map_err(|e| Error::invalid(format!("gemm shape file: {e}")))?;
    if f.shapes.is_empty() || f.dtypes.is_empty() {
        return Err(Error::invalid("gemm shape file: no shapes or no dtypes"));
    }
    for d in &f.dtypes {
        dtype_of(d)?;
    }
    for s in &f.shapes {
        if s.m == 0 || s.n == 0 || s.k == 0 {
            return Err(Error::invalid(format!("gemm shape file: empty shape {s:?}")));
        }
    }
    let m = &f.method;
    if m.launches_per_sample == 0 || m.max_sets < 2 || m.check_rows == 0 || !(m.spin_start_us > 0.0 && m.spin_max_us >= m.spin_start_us) {
        return Err(Error::invalid(format!("gemm shape file: bad method {m:?}")));
    }
    Ok(f)
}

/// The embedded shape file.
pub fn shapes() -> Result<ShapeFile> {
    parse_shapes(SHAPES_JSON)
}

/// "f32" / "f16" / "bf16" -> the kernel dtype.
pub fn dtype_of(name: &str) -> Result<GemmDtype> {
    match name {
        "f32" => Ok(GemmDtype::F32),
        "f16" => Ok(GemmDtype::F16),
        "bf16" => Ok(GemmDtype::Bf16),
        _ => Err(Error::invalid(format!("unknown gemm dtype {name:?} (f32, f16, bf16)"))),
    }
}

fn tolerance(t: &Tolerances, d: GemmDtype) -> f64 {
    match d {
        GemmDtype::F32 => t.f32,
        GemmDtype::F16 => t.f16,
        GemmDtype::Bf16 => t.bf16,
    }
}

/// Input sets for one shape: enough that together they hold `rotate_bytes`,
/// between 2 and `max_sets` (same formula as gemm_torch.py).
pub fn n_sets(method: &Method, set_bytes: usize) -> usize {
    method.rotate_bytes.div_ceil(set_bytes.max(1)).clamp(2, method.max_sets)
}

/// The rows checked against the CPU reference: `count` rows spread over M
/// (same formula as gemm_torch.py).
pub fn check_row_indices(m: usize, count: usize) -> Vec<usize> {
    let mut v: Vec<usize> = (0..count).map(|r| r * (m - 1) / (count - 1).max(1)).collect();
    v.dedup();
    v
}

/// `2 m n k`.
pub fn flops(m: usize, n: usize, k: usize) -> f64 {
    2.0 * m as f64 * n as f64 * k as f64
}

/// ms per launch -> TFLOP/s.
pub fn tflops(flops: f64, ms: f64) -> f64 {
    flops / (ms * 1e-3) / 1e12
}

/// How one side's samples were taken.
#[derive(Debug, Clone, Serialize)]
pub struct Timing {
    /// ms per launch.
    pub ms: Stats,
    pub tflops: Stats,
    pub sets: usize,
    pub launches_per_sample: usize,
    /// The spin that kept the host ahead (last value).
    pub spin_us: f64,
    /// Samples thrown away because the host fell behind the GPU.
    pub discarded: usize,
    pub warmup_samples: usize,
}

/// The correctness check of our output on set 0.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub rows_checked: usize,
    pub rel_err: f64,
    pub tolerance: f64,
    /// Every output element finite (the output was poisoned with NaN first).
    pub all_written: bool,
    pub ok: bool,
}

/// Our measurement of one (shape, dtype).
#[derive(Debug, Clone, Serialize)]
pub struct Measured {
    pub shape: GemmShape,
    pub dtype: String,
    pub kernel: String,
    pub flops: f64,
    pub timing: Timing,
    pub check: Check,
    /// With `all_tiles`: every block tile forced in turn (empty otherwise).
    pub tiles: Vec<TileTiming>,
}

/// One forced block tile (`gemm_with_tile`), timed like the chosen one.
#[derive(Debug, Clone, Serialize)]
pub struct TileTiming {
    /// "large 128x128", "medium 64x64", ...
    pub tile: String,
    /// The tile `gemm` chooses for this shape (so this is a second
    /// measurement of the same kernel: a noise estimate).
    pub chosen: bool,
    pub ms: Stats,
    pub tflops: Stats,
    pub discarded: usize,
    pub check: Check,
}

/// The cuBLAS side of one row, from the torch JSON.
#[derive(Debug, Clone, Serialize)]
pub struct TorchSide {
    pub ms: Stats,
    pub tflops: Stats,
    pub rel_err: Option<f64>,
    pub check_ok: Option<bool>,
    pub discarded: Option<usize>,
}

/// One row of the report.
#[derive(Debug, Clone, Serialize)]
pub struct GemmRow {
    pub model: String,
    pub layer: String,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub dtype: String,
    pub kernel: String,
    pub flops: f64,
    pub ours: Timing,
    pub check: Check,
    pub cublas: Option<TorchSide>,
    /// Median TFLOP/s, ours / cuBLAS.
    pub ratio: Option<f64>,
    /// `ratio >= 0.5` and our check passed (None without a torch row).
    pub meets_50pct: Option<bool>,
    /// With `--all-tiles`: every block tile forced in turn.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tiles: Vec<TileTiming>,
}

/// Where the cuBLAS numbers came from.
#[derive(Debug, Clone, Serialize)]
pub struct TorchInfo {
    pub file: String,
    pub card: String,
    /// The torch run saw the card this run measured.
    pub same_card: bool,
    /// The torch run used this file's method parameters.
    pub same_method: bool,
    /// The torch JSON without its rows (versions, TF32 setting, date...).
    pub meta: serde_json::Value,
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub rows: usize,
    pub compared: usize,
    pub met: usize,
    pub checks_ok: bool,
    /// Every row compared, on the same card and method, each meeting the target.
    pub all_met: Option<bool>,
    pub target_ratio: f64,
    /// "M x N x K dtype (ratio)" of each compared row under the target.
    pub below_target: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct GemmReport {
    pub card: String,
    pub sms: usize,
    pub date_unix_s: u64,
    pub date_utc: String,
    pub command: String,
    pub reps: usize,
    pub op: String,
    pub method: Method,
    pub method_note: String,
    pub torch: Option<TorchInfo>,
    pub rows: Vec<GemmRow>,
    pub summary: Summary,
}

#[derive(Debug, Deserialize)]
struct StatsIn {
    median: f64,
    #[serde(default = "nan")]
    p10: f64,
    #[serde(default = "nan")]
    p90: f64,
    #[serde(default = "nan")]
    min: f64,
    #[serde(default = "nan")]
    max: f64,
    #[serde(default)]
    n: usize,
}

fn nan() -> f64 {
    f64::NAN
}

impl From<StatsIn> for Stats {
    fn from(s: StatsIn) -> Stats {
        Stats {
            median: s.median,
            p10: s.p10,
            p90: s.p90,
            min: s.min,
            max: s.max,
            n: s.n,
        }
    }
}

#[derive(Debug, Deserialize)]
struct TorchRowIn {
    m: usize,
    n: usize,
    k: usize,
    dtype: String,
    ms: StatsIn,
    tflops: StatsIn,
    #[serde(default)]
    rel_err: Option<f64>,
    #[serde(default)]
    check_ok: Option<bool>,
    #[serde(default)]
    discarded: Option<usize>,
}

/// The parsed torch JSON: rows by (m, n, k, dtype), and the rest as meta.
#[derive(Debug)]
pub struct TorchResults {
    pub file: String,
    pub card: String,
    pub method: Option<serde_json::Value>,
    pub meta: serde_json::Value,
    rows: HashMap<(usize, usize, usize, String), TorchSide>,
}

/// Parses the JSON that bench/gemm_torch.py writes (`file` names it in the
/// report and in errors).
pub fn parse_torch(text: &str, file: &str) -> Result<TorchResults> {
    let bad = |msg: String| Error::invalid(format!("torch results {file}: {msg}"));
    let mut v: serde_json::Value = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
    let obj = v.as_object_mut().ok_or_else(|| bad("not a JSON object".into()))?;
    let rows_v = obj.remove("rows").ok_or_else(|| bad("no \"rows\"".into()))?;
    let rows_in: Vec<TorchRowIn> = serde_json::from_value(rows_v).map_err(|e| bad(format!("rows: {e}")))?;
    let card = obj.get("card").and_then(|c| c.as_str()).unwrap_or("").to_string();
    let method = obj.get("method").cloned();
    let mut rows = HashMap::new();
    for r in rows_in {
        dtype_of(&r.dtype).map_err(|e| bad(e.to_string()))?;
        if !(r.tflops.median.is_finite() && r.tflops.median > 0.0) {
            return Err(bad(format!(
                "{}x{}x{} {}: bad TFLOP/s median {}",
                r.m, r.n, r.k, r.dtype, r.tflops.median
            )));
        }
        let side = TorchSide {
            ms: r.ms.into(),
            tflops: r.tflops.into(),
            rel_err: r.rel_err,
            check_ok: r.check_ok,
            discarded: r.discarded,
        };
        if rows.insert((r.m, r.n, r.k, r.dtype.clone()), side).is_some() {
            return Err(bad(format!("{}x{}x{} {} appears twice", r.m, r.n, r.k, r.dtype)));
        }
    }
    Ok(TorchResults {
        file: file.to_string(),
        card,
        method,
        meta: v,
        rows,
    })
}

/// Days since 1970-01-01 -> (year, month, day) (proleptic Gregorian).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Unix seconds -> "YYYY-MM-DDTHH:MM:SSZ".
pub fn utc_string(unix_s: u64) -> String {
    let s = unix_s as i64;
    let (y, mo, d) = civil_from_days(s.div_euclid(86_400));
    let r = s.rem_euclid(86_400);
    format!("{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}Z", r / 3600, r % 3600 / 60, r % 60)
}

pub use crate::bench::card_slug;

const METHOD_NOTE: &str = "F.linear semantics (x[M,K] W[N,K]^T + b, trans_b = true, bias on); per (shape, dtype): \
rotating input sets totalling >= rotate_bytes; each sample = spin kernel, start event, launches_per_sample back-to-back \
launches, end event, kept only if the host had enqueued everything before the GPU passed the spin; warm-up samples first; \
ms per launch and TFLOP/s = 2MNK / time (bias add not counted); median and spread over reps samples. \
fp32 is plain FFMA on our side and cuBLAS with TF32 off on the torch side.";

/// Builds the report from our measurements and, optionally, the torch
/// results (pure: no GPU).
pub fn build_report(
    card: &str,
    sms: usize,
    reps: usize,
    spec: &ShapeFile,
    measured: Vec<Measured>,
    torch: Option<TorchResults>,
    date_unix_s: u64,
) -> GemmReport {
    let mut rows = Vec::with_capacity(measured.len());
    for ms in measured {
        let cublas = torch
            .as_ref()
            .and_then(|t| t.rows.get(&(ms.shape.m, ms.shape.n, ms.shape.k, ms.dtype.clone())))
            .cloned();
        let ratio = cublas.as_ref().map(|c| ms.timing.tflops.median / c.tflops.median);
        let meets = ratio.map(|r| r >= TARGET_RATIO && ms.check.ok);
        rows.push(GemmRow {
            model: ms.shape.model,
            layer: ms.shape.layer,
            m: ms.shape.m,
            n: ms.shape.n,
            k: ms.shape.k,
            dtype: ms.dtype,
            kernel: ms.kernel,
            flops: ms.flops,
            ours: ms.timing,
            check: ms.check,
            cublas,
            ratio,
            meets_50pct: meets,
            tiles: ms.tiles,
        });
    }
    let torch_info = torch.map(|t| {
        let same_method = t
            .method
            .as_ref()
            .and_then(|m| serde_json::from_value::<Method>(m.clone()).ok())
            .is_some_and(|m| m == spec.method);
        TorchInfo {
            file: t.file,
            same_card: t.card == card,
            card: t.card,
            same_method,
            meta: t.meta,
        }
    });
    let compared = rows.iter().filter(|r| r.ratio.is_some()).count();
    let met = rows.iter().filter(|r| r.meets_50pct == Some(true)).count();
    let below_target = rows
        .iter()
        .filter(|r| r.meets_50pct == Some(false))
        .map(|r| {
            format!(
                "{}x{}x{} {} ({:.2}{})",
                r.m,
                r.n,
                r.k,
                r.dtype,
                r.ratio.unwrap_or(f64::NAN),
                if r.check.ok { "" } else { ", check failed" }
            )
        })
        .collect();
    let checks_ok = rows.iter().all(|r| r.check.ok);
    let all_met = torch_info
        .as_ref()
        .map(|t| t.same_card && t.same_method && compared == rows.len() && met == rows.len());
    GemmReport {
        card: card.to_string(),
        sms,
        date_unix_s,
        date_utc: utc_string(date_unix_s),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        reps,
        op: "y[M,N] = x[M,K] W[N,K]^T + b[N] (torch.nn.functional.linear; gemm trans_b = true with bias)".into(),
        method: spec.method.clone(),
        method_note: METHOD_NOTE.into(),
        torch: torch_info,
        summary: Summary {
            rows: rows.len(),
            compared,
            met,
            checks_ok,
            all_met,
            target_ratio: TARGET_RATIO,
            below_target,
        },
        rows,
    }
}

/// The table the CLI prints.
pub fn format_table(r: &GemmReport) -> String {
    let mut s = String::new();
    s.push_str(&format!("{} ({} SMs), {} samples per row\n", r.card, r.sms, r.reps));
    if let Some(t) = &r.torch {
        let tf32 = t
            .meta
            .pointer("/settings/allow_tf32")
            .map(|v| v.to_string())
            .unwrap_or_else(|| "?".into());
        s.push_str(&format!(
            "cuBLAS via torch: {} (card {}{}; allow_tf32 {tf32}{})\n",
            t.file,
            t.card,
            if t.same_card { "" } else { ": NOT THE SAME CARD" },
            if t.same_method { "" } else { "; DIFFERENT METHOD" }
        ));
    }
    s.push_str(&format!(
        "{:<12} {:>15} {:>5} {:>22} {:>8} {:>13} {:>8} {:>13} {:>6} {:>5}\n",
        "model", "M x N x K", "dtype", "our kernel", "ours", "p10..p90", "cuBLAS", "p10..p90", "ratio", "check"
    ));
    let spread = |t: &Stats| format!("{:.1}..{:.1}", t.p10, t.p90);
    for row in &r.rows {
        let t = &row.ours.tflops;
        let (cub, cub_spread, ratio, mark) = match (&row.cublas, row.ratio) {
            (Some(c), Some(x)) => (
                format!("{:8.1}", c.tflops.median),
                spread(&c.tflops),
                format!("{x:6.2}"),
                if row.meets_50pct == Some(true) { "" } else { "  < 50%" },
            ),
            _ => (format!("{:>8}", "-"), "-".to_string(), format!("{:>6}", "-"), ""),
        };
        s.push_str(&format!(
            "{:<12} {:>15} {:>5} {:>22} {:8.1} {:>13} {cub} {cub_spread:>13} {ratio} {:>5}{mark}\n",
            row.model,
            format!("{}x{}x{}", row.m, row.n, row.k),
            row.dtype,
            row.kernel,
            t.median,
            spread(t),
            if row.check.ok { "ok" } else { "FAIL" },
        ));
    }
    s.push_str("TFLOP/s medians; ratio = ours / cuBLAS; target >= 0.50\n");
    if r.rows.iter().any(|row| !row.tiles.is_empty()) {
        s.push_str("forced block tiles, TFLOP/s medians (* = the tile gemm() chooses; ratio vs cuBLAS in brackets):\n");
        for row in r.rows.iter().filter(|row| !row.tiles.is_empty()) {
            let mut line = format!("  {:>15} {:>5}", format!("{}x{}x{}", row.m, row.n, row.k), row.dtype);
            for t in &row.tiles {
                let vs = row
                    .cublas
                    .as_ref()
                    .map(|c| format!(" [{:.2}]", t.tflops.median / c.tflops.median))
                    .unwrap_or_default();
                line.push_str(&format!(
                    "  {}{} {:.1}{vs}{}",
                    if t.chosen { "*" } else { "" },
                    t.tile,
                    t.tflops.median,
                    if t.check.ok { "" } else { " CHECK FAILED" }
                ));
            }
            s.push_str(&line);
            s.push('\n');
        }
    }
    let su = &r.summary;
    s.push_str(&format!(
        "met {}/{} compared rows ({} rows); all met: {}\n",
        su.met,
        su.compared,
        su.rows,
        match su.all_met {
            Some(b) => b.to_string(),
            None => "- (no torch results)".into(),
        }
    ));
    s
}

// ---------------------------------------------------------------------------
// GPU side
// ---------------------------------------------------------------------------

const SPIN_MODULE: &str = "bench_gemm_spin";
/// One thread spins until `ns` nanoseconds of the global timer have passed.
const SPIN_PTX: &str = r#"
.version 7.0
.target sm_70
.address_size 64

.visible .entry ps_bench_spin(
    .param .u64 ns
)
{
    .reg .pred %p;
    .reg .u64 %n, %t0, %t1, %d;

    ld.param.u64 %n, [ns];
    mov.u64 %t0, %globaltimer;
SPIN:
    nanosleep.u32 500;
    mov.u64 %t1, %globaltimer;
    sub.u64 %d, %t1, %t0;
    setp.lt.u64 %p, %d, %n;
    @%p bra SPIN;
    ret;
}
"#;

fn spin(device: &'static Device, stream: &Stream, us: f64) -> Result<()> {
    let f = pipeswitch::kernels::function(device, SPIN_MODULE, SPIN_PTX, "ps_bench_spin")?;
    let mut ns: u64 = (us * 1e3) as u64;
    let mut params: [*mut c_void; 1] = [(&mut ns as *mut u64).cast()];
    let cfg = LaunchConfig {
        grid: (1, 1, 1),
        block: (1, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: one u64 parameter, as the entry declares; no memory accessed.
    unsafe { f.launch(cfg, stream.raw(), &mut params) }
}

struct Rng(u64);
impl Rng {
    /// Uniform in [-1, 1).
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// `len` random values in `dtype`: (the device bytes, the same values as
/// f32, exactly).
fn random(rng: &mut Rng, dtype: GemmDtype, len: usize) -> (Vec<u8>, Vec<f32>) {
    let mut bytes = Vec::with_capacity(len * dtype.size());
    let mut vals = Vec::with_capacity(len);
    for _ in 0..len {
        let v = rng.next();
        match dtype {
            GemmDtype::F32 => {
                bytes.extend_from_slice(&v.to_ne_bytes());
                vals.push(v);
            }
            _ => {
                let h = to_half_bits(dtype, v);
                bytes.extend_from_slice(&h.to_ne_bytes());
                vals.push(from_half_bits(dtype, h));
            }
        }
    }
    (bytes, vals)
}

/// Relative error norm of sampled rows of `y` ([m, n] in `dtype`) against
/// x W^T + b in float64, and whether every element is finite.
#[allow(clippy::too_many_arguments)]
fn check_output(dtype: GemmDtype, y: &[u8], x: &[f32], w: &[f32], b: &[f32], m: usize, n: usize, k: usize, rows: &[usize]) -> (f64, bool) {
    let size = dtype.size();
    let get = |i: usize| -> f64 {
        let e = &y[i * size..(i + 1) * size];
        match dtype {
            GemmDtype::F32 => f32::from_ne_bytes([e[0], e[1], e[2], e[3]]) as f64,
            _ => from_half_bits(dtype, u16::from_ne_bytes([e[0], e[1]])) as f64,
        }
    };
    let all_finite = (0..m * n).all(|i| get(i).is_finite());
    let (mut num, mut den) = (0f64, 0f64);
    for &i in rows {
        let xi = &x[i * k..(i + 1) * k];
        for j in 0..n {
            let wj = &w[j * k..(j + 1) * k];
            let r = xi.iter().zip(wj).map(|(&a, &c)| a as f64 * c as f64).sum::<f64>() + b[j] as f64;
            let d = get(i * n + j) - r;
            num += d * d;
            den += r * r;
        }
    }
    let rel = if den > 0.0 { (num / den).sqrt() } else { f64::NAN };
    (if rel.is_nan() { f64::INFINITY } else { rel }, all_finite)
}

fn tile_label(dtype: GemmDtype, tile: GemmTile) -> &'static str {
    match (dtype, tile) {
        (_, GemmTile::Large) => "large 128x128",
        (GemmDtype::F32, _) => "medium 128x64",
        (_, GemmTile::Medium) => "medium 64x64",
        (_, GemmTile::Small) => "small 64x32",
    }
}

fn measure_one(
    device: &'static Device,
    sms: usize,
    spec: &ShapeFile,
    shape: &GemmShape,
    dname: &str,
    reps: usize,
    all_tiles: bool,
) -> Result<Measured> {
    let method = &spec.method;
    let dtype = dtype_of(dname)?;
    let (m, n, k) = (shape.m, shape.n, shape.k);
    let size = dtype.size();
    let set_bytes = (m * k + n * k + n + m * n) * size;
    let sets = n_sets(method, set_bytes);
    let mut rng = Rng(0x2545_f491_4f6c_dd1d ^ ((m * 7 + n * 13 + k * 17) as u64) ^ ((size as u64) << 40));
    let (xb, xv) = random(&mut rng, dtype, m * k);
    let (wb, wv) = random(&mut rng, dtype, n * k);
    let (bb, bv) = random(&mut rng, dtype, n);
    // Every set holds the same values at different addresses: what matters
    // to the caches is the addresses; to the power draw, that they are random.
    let mut bufs = Vec::with_capacity(sets);
    for _ in 0..sets {
        bufs.push((
            DeviceAlloc::from_slice(device, &xb)?,
            DeviceAlloc::from_slice(device, &wb)?,
            DeviceAlloc::from_slice(device, &bb)?,
            DeviceAlloc::new(device, m * n * size)?,
        ));
    }
    let args: Vec<GemmArgs> = bufs
        .iter()
        .map(|(x, w, b, y)| {
            let mut g = GemmArgs::dense(m, n, k, x.ptr(), w.ptr(), true, y.ptr());
            g.bias = b.ptr();
            g.act = Activation::None;
            g
        })
        .collect();
    // What gemm() runs: a wgmma kernel (Hopper, half types) or an mma.sync /
    // FFMA tile; only the latter can be forced below.
    let kernel = gemm::kernel_name_on(device, dtype, &args[0])?;
    let chosen = gemm::choose_kernel(dtype, &args[0], sms, gemm::wgmma_device(device)?);
    let stream = Stream::new(device)?;
    let launch = |g: &GemmArgs, tile: Option<GemmTile>| match tile {
        None => gemm::gemm(device, stream.raw(), dtype, g),
        Some(t) => gemm::gemm_with_tile(device, stream.raw(), dtype, g, t),
    };
    let rows = check_row_indices(m, method.check_rows);
    let tol = tolerance(&method.check_tolerance, dtype);

    // Check: poison, one launch, compare.
    let check = |tile: Option<GemmTile>| -> Result<Check> {
        bufs[0].3.fill(0xff)?;
        launch(&args[0], tile)?;
        stream.synchronize()?;
        let mut y = vec![0u8; m * n * size];
        bufs[0].3.copy_to_slice(&mut y)?;
        let (rel_err, all_written) = check_output(dtype, &y, &xv, &wv, &bv, m, n, k, &rows);
        Ok(Check {
            rows_checked: rows.len(),
            rel_err,
            tolerance: tol,
            all_written,
            ok: all_written && rel_err <= tol,
        })
    };

    let (start, end) = (Event::new(device, true)?, Event::new(device, true)?);
    let per = method.launches_per_sample;
    let mut next = 0usize;
    // Warm-up and `reps` samples of one variant: (ms per launch, warm-up
    // samples, last spin, discarded samples).
    let mut time = |tile: Option<GemmTile>| -> Result<(Vec<f64>, usize, f64, usize)> {
        let mut spin_us = method.spin_start_us;
        let mut discarded = 0usize;
        let mut sample = || -> Result<f64> {
            loop {
                spin(device, &stream, spin_us)?;
                start.record(stream.raw())?;
                for _ in 0..per {
                    launch(&args[next % sets], tile)?;
                    next += 1;
                }
                end.record(stream.raw())?;
                let gated = !start.is_complete()?;
                end.synchronize()?;
                if gated {
                    let t = Event::elapsed_ms(&start, &end)? as f64 / per as f64;
                    if t.is_nan() || t <= 0.0 {
                        return Err(Error::Internal(format!("bench gemm {m}x{n}x{k} {dname}: zero elapsed time")));
                    }
                    return Ok(t);
                }
                discarded += 1;
                if discarded > method.max_discarded {
                    return Err(Error::Internal(format!(
                        "bench gemm {m}x{n}x{k} {dname}: the host could not get ahead of the GPU even with a {spin_us:.0} us spin"
                    )));
                }
                spin_us = (spin_us * 2.0).min(method.spin_max_us);
            }
        };
        let (mut warm_ms, mut warm_n) = (0.0, 0usize);
        while warm_n < method.warmup_min_samples || warm_ms < method.warmup_min_ms {
            warm_ms += sample()? * per as f64;
            warm_n += 1;
        }
        let mut ms = Vec::with_capacity(reps);
        for _ in 0..reps {
            ms.push(sample()?);
        }
        Ok((ms, warm_n, spin_us, discarded))
    };
    let fl = flops(m, n, k);
    let to_tflops = |ms: &[f64]| -> Vec<f64> { ms.iter().map(|&t| tflops(fl, t)).collect() };

    let check_chosen = check(None)?;
    let (ms, warm_n, spin_us, discarded) = time(None)?;
    let timing = Timing {
        ms: Stats::of(&ms),
        tflops: Stats::of(&to_tflops(&ms)),
        sets,
        launches_per_sample: per,
        spin_us,
        discarded,
        warmup_samples: warm_n,
    };
    let mut tiles = Vec::new();
    if all_tiles {
        let list: &[GemmTile] = match dtype {
            // fp32 Medium and Small are the same kernel.
            GemmDtype::F32 => &[GemmTile::Large, GemmTile::Medium],
            _ => &[GemmTile::Large, GemmTile::Medium, GemmTile::Small],
        };
        for &t in list {
            let c = check(Some(t))?;
            let (ms, _, _, discarded) = time(Some(t))?;
            tiles.push(TileTiming {
                tile: tile_label(dtype, t).to_string(),
                chosen: matches!(chosen, gemm::GemmKernel::Sync(c) if tile_label(dtype, t) == tile_label(dtype, c)),
                ms: Stats::of(&ms),
                tflops: Stats::of(&to_tflops(&ms)),
                discarded,
                check: c,
            });
        }
    }
    stream.synchronize()?;
    Ok(Measured {
        shape: shape.clone(),
        dtype: dname.to_string(),
        kernel,
        flops: fl,
        timing,
        check: check_chosen,
        tiles,
    })
}

/// Times our kernels at every shape and dtype of the shape file on `device`;
/// with `torch_json` (written by bench/gemm_torch.py on the same card), puts
/// the cuBLAS medians and the ratios next to ours. Logs a line per row;
/// `all_tiles` also times
/// every block tile forced in turn (`gemm_with_tile`), to see whether the
/// tile choice is the best one at each shape.
pub fn run_gemm_bench_logged(
    device: &'static Device,
    reps: usize,
    torch_json: Option<&Path>,
    all_tiles: bool,
    log: &mut dyn FnMut(&str),
) -> Result<GemmReport> {
    if reps == 0 {
        return Err(Error::invalid("bench gemm: reps must be at least 1"));
    }
    let spec = shapes()?;
    // Read the torch results first: a bad file fails before any GPU work.
    let torch = match torch_json {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| Error::io(format!("reading {}", p.display()), e))?;
            Some(parse_torch(&text, &p.display().to_string())?)
        }
        None => None,
    };
    device.bind()?;
    let card = device.name()?;
    let sms = usize::try_from(device.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?)
        .unwrap_or(1)
        .max(1);
    log(&format!(
        "{card}: {sms} SMs, {reps} samples x {} launches per row",
        spec.method.launches_per_sample
    ));
    let mut measured = Vec::new();
    for shape in &spec.shapes {
        for d in &spec.dtypes {
            let r = measure_one(device, sms, &spec, shape, d, reps, all_tiles)?;
            log(&format!(
                "  {}x{}x{} {:>4} {:<22} {:8.2} TFLOP/s (p10 {:.2}, p90 {:.2}), {:.2} us, rel err {:.2e}{}",
                shape.m,
                shape.n,
                shape.k,
                d,
                r.kernel,
                r.timing.tflops.median,
                r.timing.tflops.p10,
                r.timing.tflops.p90,
                r.timing.ms.median * 1e3,
                r.check.rel_err,
                if r.check.ok { "" } else { " CHECK FAILED" }
            ));
            for t in &r.tiles {
                log(&format!(
                    "      forced {:<14} {:8.2} TFLOP/s (p10 {:.2}, p90 {:.2}){}{}",
                    t.tile,
                    t.tflops.median,
                    t.tflops.p10,
                    t.tflops.p90,
                    if t.chosen { " (chosen)" } else { "" },
                    if t.check.ok { "" } else { " CHECK FAILED" }
                ));
            }
            measured.push(r);
        }
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    Ok(build_report(&card, sms, reps, &spec, measured, torch, now))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_parse_and_are_the_issue_shapes() {
        let f = shapes().unwrap();
        assert_eq!(f.dtypes, ["f32", "f16", "bf16"]);
        let kn: Vec<(&str, usize, usize)> = f.shapes.iter().map(|s| (s.model.as_str(), s.k, s.n)).collect();
        assert_eq!(
            kn,
            [
                ("bert-base", 768, 768),
                ("bert-base", 768, 2304),
                ("bert-base", 768, 3072),
                ("bert-base", 3072, 768),
                ("gpt2-medium", 1024, 3072),
                ("gpt2-medium", 1024, 1024),
                ("gpt2-medium", 1024, 4096),
                ("gpt2-medium", 4096, 1024),
            ]
        );
        assert!(f.shapes.iter().all(|s| s.m == 1024));
        for d in &f.dtypes {
            dtype_of(d).unwrap();
        }
        // Half kernels need K a multiple of 8 (16-byte rows): all shapes do.
        assert!(f.shapes.iter().all(|s| s.k % 8 == 0));
        assert!(
            f.method.check_tolerance.f32 < 3e-4,
            "the fp32 tolerance must reject TF32-level error"
        );
        // The python side reads the same file.
        let py = include_str!("../../bench/gemm_torch.py");
        assert!(py.contains("gemm_shapes.json"));
        assert!(parse_shapes("{\"dtypes\": [\"f8\"], \"shapes\": [], \"method\": {}}").is_err());
        let mut bad: serde_json::Value = serde_json::from_str(SHAPES_JSON).unwrap();
        bad["dtypes"] = serde_json::json!(["f64"]);
        assert!(parse_shapes(&bad.to_string()).is_err());
    }

    #[test]
    fn sets_rows_dates_slugs() {
        let m = shapes().unwrap().method;
        // 1024x768x768 fp16: 4.3 MB a set -> 63 sets for 256 MiB.
        assert_eq!(n_sets(&m, (1024 * 768 + 768 * 768 + 768 + 1024 * 768) * 2), 63);
        assert_eq!(n_sets(&m, 1 << 30), 2);
        assert_eq!(n_sets(&m, 1), m.max_sets);
        let r = check_row_indices(1024, 16);
        assert_eq!((r.len(), r[0], r[15]), (16, 0, 1023));
        assert_eq!(check_row_indices(3, 16), [0, 1, 2]);
        assert_eq!(check_row_indices(1, 1), [0]);
        assert_eq!(utc_string(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_string(1_795_812_334), "2026-11-27T20:45:34Z");
        assert_eq!(utc_string(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(card_slug("NVIDIA H100 80GB HBM3"), "nvidia-h100-80gb-hbm3");
        assert!((tflops(flops(1024, 1024, 1024), 0.01) - 214.748_364_8).abs() < 1e-6);
    }

    #[test]
    fn check_output_measures_error() {
        // x [2,3], w [2,3] (N = 2), b [2]: y = x w^T + b.
        let x = [1.0f32, 2.0, 3.0, -1.0, 0.5, 2.0];
        let w = [1.0f32, 0.0, -1.0, 2.0, 1.0, 0.0];
        let b = [0.5f32, -1.0];
        let exact = [-1.5f32, 3.0, -2.5, -2.5];
        let bytes: Vec<u8> = exact.iter().flat_map(|v| v.to_ne_bytes()).collect();
        let (e, fin) = check_output(GemmDtype::F32, &bytes, &x, &w, &b, 2, 2, 3, &[0, 1]);
        assert_eq!((e, fin), (0.0, true));
        let mut off = exact;
        off[1] = 3.3;
        let bytes: Vec<u8> = off.iter().flat_map(|v| v.to_ne_bytes()).collect();
        let (e, _) = check_output(GemmDtype::F32, &bytes, &x, &w, &b, 2, 2, 3, &[0, 1]);
        assert!(e > 0.01 && e < 0.1, "{e}");
        // A NaN in an unchecked row still fails "all written".
        let mut nan = exact;
        nan[3] = f32::NAN;
        let bytes: Vec<u8> = nan.iter().flat_map(|v| v.to_ne_bytes()).collect();
        assert!(!check_output(GemmDtype::F32, &bytes, &x, &w, &b, 2, 2, 3, &[0]).1);
        // Half output.
        let bytes: Vec<u8> = exact.iter().flat_map(|&v| to_half_bits(GemmDtype::Bf16, v).to_ne_bytes()).collect();
        assert_eq!(check_output(GemmDtype::Bf16, &bytes, &x, &w, &b, 2, 2, 3, &[0, 1]), (0.0, true));
    }

    fn stats(median: f64) -> Stats {
        Stats {
            median,
            p10: median * 0.9,
            p90: median * 1.1,
            min: median * 0.8,
            max: median * 1.2,
            n: 5,
        }
    }

    fn measured(spec: &ShapeFile, i: usize, dtype: &str, tf: f64, ok: bool) -> Measured {
        let s = spec.shapes[i].clone();
        let fl = flops(s.m, s.n, s.k);
        Measured {
            dtype: dtype.into(),
            kernel: "gemm_x".into(),
            flops: fl,
            timing: Timing {
                ms: stats(fl / (tf * 1e12) * 1e3),
                tflops: stats(tf),
                sets: 2,
                launches_per_sample: 20,
                spin_us: 200.0,
                discarded: 0,
                warmup_samples: 3,
            },
            check: Check {
                rows_checked: 16,
                rel_err: 1e-6,
                tolerance: 5e-5,
                all_written: ok,
                ok,
            },
            tiles: Vec::new(),
            shape: s,
        }
    }

    fn torch_json(spec: &ShapeFile, card: &str, rows: &[(usize, &str, f64)]) -> String {
        let rows: Vec<serde_json::Value> = rows
            .iter()
            .map(|&(i, d, tf)| {
                let s = &spec.shapes[i];
                let ms = flops(s.m, s.n, s.k) / (tf * 1e12) * 1e3;
                serde_json::json!({
                    "model": s.model, "layer": s.layer, "m": s.m, "n": s.n, "k": s.k, "dtype": d,
                    "ms": {"median": ms, "p10": ms, "p90": ms, "min": ms, "max": ms, "n": 5},
                    "tflops": {"median": tf, "p10": tf, "p90": tf, "min": tf, "max": tf, "n": 5},
                    "rel_err": 1e-7, "check_ok": true, "discarded": 1
                })
            })
            .collect();
        serde_json::json!({
            "card": card, "torch": "2.11.0", "settings": {"allow_tf32": false},
            "method": spec.method, "rows": rows
        })
        .to_string()
    }

    #[test]
    fn report_merges_torch_rows_and_computes_ratios() {
        let spec = shapes().unwrap();
        let card = "NVIDIA H100 80GB HBM3";
        let ours = vec![
            measured(&spec, 0, "f32", 25.0, true),   // vs 31: 0.806
            measured(&spec, 0, "f16", 100.0, true),  // vs 207: 0.483 -> below
            measured(&spec, 1, "bf16", 300.0, true), // vs 400: 0.75
            measured(&spec, 2, "f16", 300.0, false), // check failed -> not met
            measured(&spec, 3, "bf16", 10.0, true),  // no torch row
        ];
        let mut ours = ours;
        let tile = |name: &str, chosen: bool, tf: f64| TileTiming {
            tile: name.into(),
            chosen,
            ms: stats(1.0),
            tflops: stats(tf),
            discarded: 0,
            check: ours[1].check.clone(),
        };
        ours[1].tiles = vec![
            tile("large 128x128", false, 60.0),
            tile("medium 64x64", false, 90.0),
            tile("small 64x32", true, 100.0),
        ];
        let text = torch_json(
            &spec,
            card,
            &[
                (0, "f32", 31.0),
                (0, "f16", 207.0),
                (1, "bf16", 400.0),
                (2, "f16", 400.0),
                (7, "f16", 500.0),
            ],
        );
        let torch = parse_torch(&text, "t.json").unwrap();
        let r = build_report(card, 132, 5, &spec, ours, Some(torch), 1_795_812_334);
        assert_eq!(r.rows.len(), 5);
        let ratio = |i: usize| r.rows[i].ratio.unwrap();
        assert!((ratio(0) - 25.0 / 31.0).abs() < 1e-12);
        assert!((ratio(1) - 100.0 / 207.0).abs() < 1e-12);
        assert!((ratio(2) - 0.75).abs() < 1e-12);
        assert_eq!(r.rows[0].meets_50pct, Some(true));
        assert_eq!(r.rows[1].meets_50pct, Some(false));
        assert_eq!(r.rows[2].meets_50pct, Some(true));
        assert_eq!(r.rows[3].meets_50pct, Some(false));
        assert_eq!((r.rows[4].ratio, r.rows[4].meets_50pct), (None, None));
        assert!((r.rows[1].cublas.as_ref().unwrap().tflops.median - 207.0).abs() < 1e-12);
        let t = r.torch.as_ref().unwrap();
        assert!(t.same_card && t.same_method);
        assert_eq!(t.meta["torch"], "2.11.0");
        assert!(t.meta.get("rows").is_none());
        assert_eq!((r.summary.rows, r.summary.compared, r.summary.met), (5, 4, 2));
        assert_eq!(r.summary.all_met, Some(false));
        assert!(!r.summary.checks_ok);
        assert_eq!(r.summary.below_target.len(), 2);
        assert!(
            r.summary.below_target[0].starts_with("1024x768x768 f16 (0.48"),
            "{:?}",
            r.summary.below_target
        );
        assert_eq!(r.date_utc, "2026-11-27T20:45:34Z");
        // Serializes (NaN-free here) and the table mentions every row.
        let json = serde_json::to_string_pretty(&r).unwrap();
        assert!(json.contains("\"meets_50pct\": false"));
        let table = format_table(&r);
        assert_eq!(table.lines().filter(|l| l.starts_with("bert-base")).count(), 5);
        assert!(table.contains("< 50%"));
        assert!(table.contains("*small 64x32 100.0 [0.48]"), "{table}");
        assert!(json.contains("\"tiles\"") && r.rows[0].tiles.is_empty());

        // All rows met, same card: all_met true; another card: false.
        let ours = vec![measured(&spec, 0, "f32", 25.0, true)];
        let text = torch_json(&spec, card, &[(0, "f32", 31.0)]);
        let r = build_report(card, 132, 5, &spec, ours.clone(), Some(parse_torch(&text, "t").unwrap()), 0);
        assert_eq!(r.summary.all_met, Some(true));
        let text = torch_json(&spec, "NVIDIA H200", &[(0, "f32", 31.0)]);
        let r = build_report(card, 132, 5, &spec, ours.clone(), Some(parse_torch(&text, "t").unwrap()), 0);
        assert_eq!(r.summary.all_met, Some(false));
        assert!(!r.torch.as_ref().unwrap().same_card);
        assert!(format_table(&r).contains("NOT THE SAME CARD"));
        // A different method in the torch file: not all met.
        let mut v: serde_json::Value = serde_json::from_str(&torch_json(&spec, card, &[(0, "f32", 31.0)])).unwrap();
        v["method"]["launches_per_sample"] = serde_json::json!(1);
        let r = build_report(
            card,
            132,
            5,
            &spec,
            ours.clone(),
            Some(parse_torch(&v.to_string(), "t").unwrap()),
            0,
        );
        assert!(!r.torch.as_ref().unwrap().same_method);
        assert_eq!(r.summary.all_met, Some(false));
        // Without torch results: no ratios.
        let r = build_report(card, 132, 5, &spec, ours, None, 0);
        assert_eq!((r.rows[0].ratio, r.summary.all_met, r.summary.compared), (None, None, 0));
    }

    #[test]
    fn torch_json_errors() {
        let spec = shapes().unwrap();
        assert!(parse_torch("[]", "t").is_err());
        assert!(parse_torch("{\"card\": \"x\"}", "t").is_err());
        assert!(parse_torch("not json", "t").is_err());
        let dup = torch_json(&spec, "c", &[(0, "f32", 31.0), (0, "f32", 30.0)]);
        assert!(parse_torch(&dup, "t").is_err());
        let bad_dtype = torch_json(&spec, "c", &[(0, "f64", 31.0)]);
        assert!(parse_torch(&bad_dtype, "t").is_err());
        let zero = torch_json(&spec, "c", &[(0, "f32", 0.0)]);
        assert!(parse_torch(&zero, "t").is_err());
        // Minimal rows (only the medians) parse; missing spread is NaN.
        let t = parse_torch(
            r#"{"card": "c", "rows": [{"m": 1, "n": 2, "k": 8, "dtype": "f16", "ms": {"median": 0.1}, "tflops": {"median": 1.0}}]}"#,
            "t",
        )
        .unwrap();
        assert!(t.rows[&(1, 2, 8, "f16".to_string())].tflops.p10.is_nan());
    }
}
