//! elementwise kernels (kernels/elementwise.ptx): launchers and CPU references.
//!
//! One PTX kernel, `ew_f32`, computes `y[i] = act(a[i] + b[i] + bias[i % cols])`
//! for `i < n` (b and bias optional), fp32, with a 16-byte vector path (when
//! every pointer is 16-byte aligned and, with a bias, `cols % 4 == 0`) and a
//! scalar path for the rest, in grid-stride loops. The launchers below are the
//! operations the reference transformers need: activations (relu, exact erf
//! gelu, GPT-2's tanh gelu), residual add, bias add, and bias + activation.
//! `y` may alias `a` or `b` (in place).
//!
//! Accuracy (fp32): relu/add/bias exact (one rounding per add); gelu within a
//! few ulp for |x| of order 1 (erfc from Numerical Recipes' Chebyshev fit, 1.2e-7
//! relative, times `ex2.approx`); relative error grows to ~1e-5 only where gelu
//! is below ~1e-20 (x < -9). gelu_tanh is evaluated as x / (1 + exp(-2u)).

use std::ffi::c_void;

use crate::cuda::{CUdeviceptr, CUstream, Device, LaunchConfig};
use crate::error::{Error, Result};

/// Module name in the kernel cache.
pub const MODULE: &str = "elementwise";
/// The PTX text.
pub const PTX: &str = include_str!("../../kernels/elementwise.ptx");

/// Looks `entry` up in this module and enqueues it on `stream`. Private: every
/// caller in this file passes exactly one pointer per parameter of `entry`, of
/// its exact type, after validating the dims and pointers the kernel uses.
fn launch(device: &'static Device, stream: CUstream, entry: &str, cfg: LaunchConfig, params: &mut [*mut c_void]) -> Result<()> {
    let f = crate::kernels::function(device, MODULE, PTX, entry)?;
    // SAFETY: see above: the parameter list matches the .entry, and the
    // launcher checked the sizes the kernel indexes with.
    unsafe { f.launch(cfg, stream, params) }
}

/// The activation applied by [`elementwise`] (the kernel's `act` code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Activation {
    /// y = x
    Identity = 0,
    /// y = max(x, 0) (NaN stays NaN)
    Relu = 1,
    /// y = x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2))  (BERT)
    Gelu = 2,
    /// y = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))  (GPT-2 "gelu_new")
    GeluTanh = 3,
}

const THREADS: u32 = 256;
const MAX_BLOCKS: u64 = 1024;

fn check_f32_ptr(name: &str, p: CUdeviceptr, optional: bool) -> Result<()> {
    if p == 0 {
        if optional {
            return Ok(());
        }
        return Err(Error::invalid(format!("{name} is a NULL device pointer")));
    }
    if p % 4 != 0 {
        return Err(Error::invalid(format!("{name} (0x{p:x}) is not 4-byte aligned")));
    }
    Ok(())
}

/// The general kernel: `y[i] = act(a[i] + b[i] + bias[i % cols])` for `i < n`.
/// `b` and `bias` may be 0 (absent); with a bias, `cols >= 1` and
/// `n % cols == 0` (rows of `cols` elements); without, `cols` is ignored.
/// `y` may equal `a` or `b`. Errors: a NULL `y`/`a`, a pointer not 4-byte
/// aligned, `n == 0`, sizes overflowing, a bias that does not tile `n`.
#[allow(clippy::too_many_arguments)]
pub fn elementwise(
    device: &'static Device,
    stream: CUstream,
    y: CUdeviceptr,
    a: CUdeviceptr,
    b: CUdeviceptr,
    bias: CUdeviceptr,
    n: usize,
    cols: usize,
    act: Activation,
) -> Result<()> {
    check_f32_ptr("y", y, false)?;
    check_f32_ptr("a", a, false)?;
    check_f32_ptr("b", b, true)?;
    check_f32_ptr("bias", bias, true)?;
    if n == 0 {
        return Err(Error::invalid("elementwise: n must be at least 1"));
    }
    if n.checked_mul(4).is_none() || n as u64 > (1u64 << 60) {
        return Err(Error::invalid(format!("elementwise: n = {n} is too large")));
    }
    let cols = if bias != 0 {
        if cols == 0 || n % cols != 0 {
            return Err(Error::invalid(format!(
                "elementwise: bias of {cols} columns does not tile {n} elements"
            )));
        }
        cols
    } else {
        1
    };
    let n64 = n as u64;
    let vector = (y | a | b | bias) % 16 == 0 && (bias == 0 || cols % 4 == 0);
    let units = if vector { n64 / 4 + n64 % 4 } else { n64 };
    let blocks = units.div_ceil(u64::from(THREADS)).clamp(1, MAX_BLOCKS) as u32;
    let cfg = LaunchConfig { grid: (blocks, 1, 1), block: (THREADS, 1, 1), shared_mem_bytes: 0 };

    let (mut p_y, mut p_a, mut p_b, mut p_bias) = (y, a, b, bias);
    let (mut p_n, mut p_cols, mut p_act) = (n64, cols as u64, act as u32);
    let mut params: [*mut c_void; 7] = [
        (&mut p_y as *mut u64).cast(),
        (&mut p_a as *mut u64).cast(),
        (&mut p_b as *mut u64).cast(),
        (&mut p_bias as *mut u64).cast(),
        (&mut p_n as *mut u64).cast(),
        (&mut p_cols as *mut u64).cast(),
        (&mut p_act as *mut u32).cast(),
    ];
    // seven parameters of the exact types of ew_f32's .entry; the
    // caller's pointers cover n floats (cols for bias), checked non-NULL above.
    launch(device, stream, "ew_f32", cfg, &mut params)
}

/// `y = relu(x)` on `n` floats (`y == x` allowed).
pub fn relu(device: &'static Device, stream: CUstream, y: CUdeviceptr, x: CUdeviceptr, n: usize) -> Result<()> {
    elementwise(device, stream, y, x, 0, 0, n, 1, Activation::Relu)
}

/// `y = gelu(x)` (exact, erf form) on `n` floats (`y == x` allowed).
pub fn gelu(device: &'static Device, stream: CUstream, y: CUdeviceptr, x: CUdeviceptr, n: usize) -> Result<()> {
    elementwise(device, stream, y, x, 0, 0, n, 1, Activation::Gelu)
}

/// `y = gelu_tanh(x)` (GPT-2's gelu_new) on `n` floats (`y == x` allowed).
pub fn gelu_tanh(device: &'static Device, stream: CUstream, y: CUdeviceptr, x: CUdeviceptr, n: usize) -> Result<()> {
    elementwise(device, stream, y, x, 0, 0, n, 1, Activation::GeluTanh)
}

/// Residual add: `y = a + b` on `n` floats (`y` may equal `a` or `b`).
pub fn add(
    device: &'static Device,
    stream: CUstream,
    y: CUdeviceptr,
    a: CUdeviceptr,
    b: CUdeviceptr,
    n: usize,
) -> Result<()> {
    if b == 0 {
        return Err(Error::invalid("add: b is a NULL device pointer"));
    }
    elementwise(device, stream, y, a, b, 0, n, 1, Activation::Identity)
}

/// Bias add in place over rows: `y[m, c] += bias[c]`, `y` is `[rows, cols]`.
pub fn bias_add(
    device: &'static Device,
    stream: CUstream,
    y: CUdeviceptr,
    bias: CUdeviceptr,
    rows: usize,
    cols: usize,
) -> Result<()> {
    bias_act(device, stream, y, y, bias, rows, cols, Activation::Identity)
}

/// `y[m, c] = act(x[m, c] + bias[c])` over `[rows, cols]` (`y == x` allowed):
/// a linear layer's epilogue.
#[allow(clippy::too_many_arguments)]
pub fn bias_act(
    device: &'static Device,
    stream: CUstream,
    y: CUdeviceptr,
    x: CUdeviceptr,
    bias: CUdeviceptr,
    rows: usize,
    cols: usize,
    act: Activation,
) -> Result<()> {
    if bias == 0 {
        return Err(Error::invalid("bias_act: bias is a NULL device pointer"));
    }
    if rows == 0 || cols == 0 {
        return Err(Error::invalid(format!("bias_act: empty matrix [{rows}, {cols}]")));
    }
    let n = rows
        .checked_mul(cols)
        .ok_or_else(|| Error::invalid(format!("bias_act: [{rows}, {cols}] overflows")))?;
    elementwise(device, stream, y, x, 0, bias, n, cols, act)
}

// ---------------------------------------------------------------------------
// CPU references (f64 inside, rounded to f32 once).

/// erf(x) in f64 from the everywhere-convergent series with positive terms
/// erf(x) = 2/sqrt(pi) exp(-x^2) sum_n 2^n x^(2n+1) / (1*3*...*(2n+1)),
/// (no cancellation); |x| >= 6 gives +-1 (1 - erf(6) < 3e-17).
pub fn erf_ref(x: f64) -> f64 {
    if x.is_nan() {
        return f64::NAN;
    }
    let ax = x.abs();
    if ax >= 6.0 {
        return x.signum();
    }
    let x2 = ax * ax;
    let mut term = ax; // 2^n x^(2n+1) / (2n+1)!!
    let mut sum = ax;
    let mut n = 0.0;
    while term > sum * 1e-18 {
        n += 1.0;
        term *= 2.0 * x2 / (2.0 * n + 1.0);
        sum += term;
    }
    let r = 2.0 / std::f64::consts::PI.sqrt() * (-x2).exp() * sum;
    r.min(1.0).copysign(x)
}

/// The activation of one value, in f64.
pub fn activation_ref(x: f64, act: Activation) -> f64 {
    match act {
        Activation::Identity => x,
        Activation::Relu => {
            if x < 0.0 {
                0.0
            } else {
                x
            }
        }
        Activation::Gelu => 0.5 * x * (1.0 + erf_ref(x / std::f64::consts::SQRT_2)),
        Activation::GeluTanh => {
            let u = (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x);
            0.5 * x * (1.0 + u.tanh())
        }
    }
}

/// Reference of [`elementwise`]: `act(a[i] + b[i] + bias[i % cols])`, where
/// the sums are taken in f32 as the kernel does (one rounding each).
pub fn elementwise_ref(a: &[f32], b: Option<&[f32]>, bias: Option<&[f32]>, act: Activation) -> Vec<f32> {
    (0..a.len())
        .map(|i| {
            let mut v = a[i];
            if let Some(b) = b {
                v += b[i];
            }
            if let Some(bias) = bias {
                v += bias[i % bias.len()];
            }
            activation_ref(f64::from(v), act) as f32
        })
        .collect()
}

/// `relu(x)` elementwise.
pub fn relu_ref(x: &[f32]) -> Vec<f32> {
    elementwise_ref(x, None, None, Activation::Relu)
}

/// `gelu(x)` (erf form) elementwise.
pub fn gelu_ref(x: &[f32]) -> Vec<f32> {
    elementwise_ref(x, None, None, Activation::Gelu)
}

/// `gelu_tanh(x)` elementwise.
pub fn gelu_tanh_ref(x: &[f32]) -> Vec<f32> {
    elementwise_ref(x, None, None, Activation::GeluTanh)
}

/// `a + b` elementwise.
pub fn add_ref(a: &[f32], b: &[f32]) -> Vec<f32> {
    elementwise_ref(a, Some(b), None, Activation::Identity)
}

/// `y[m, c] + bias[c]` over rows of `bias.len()` columns.
pub fn bias_add_ref(y: &[f32], bias: &[f32]) -> Vec<f32> {
    elementwise_ref(y, None, Some(bias), Activation::Identity)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol * b.abs().max(1e-300)
    }

    #[test]
    fn erf_matches_known_values() {
        // values from tables of erf (Abramowitz & Stegun / mpmath)
        let cases = [
            (0.0, 0.0),
            (0.1, 0.1124629160182849),
            (0.5, 0.5204998778130465),
            (1.0, 0.8427007929497149),
            (2.0, 0.9953222650189527),
            (3.0, 0.9999779095030014),
            (-1.0, -0.8427007929497149),
        ];
        for (x, want) in cases {
            let got = erf_ref(x);
            assert!(close(got, want, 1e-14) || (want == 0.0 && got == 0.0), "erf({x}) = {got}, want {want}");
        }
        assert_eq!(erf_ref(7.0), 1.0);
        assert_eq!(erf_ref(-9.0), -1.0);
        assert!(erf_ref(f64::NAN).is_nan());
    }

    #[test]
    fn activations_match_hand_values() {
        assert_eq!(activation_ref(-2.0, Activation::Relu), 0.0);
        assert_eq!(activation_ref(3.5, Activation::Relu), 3.5);
        assert!(activation_ref(f64::NAN, Activation::Relu).is_nan());
        // gelu(1) = Phi(1) = 0.841344746068543
        assert!(close(activation_ref(1.0, Activation::Gelu), 0.8413447460685429, 1e-14));
        // gelu(-1) = -(1 - Phi(1)) = -0.15865525393145707
        assert!(close(activation_ref(-1.0, Activation::Gelu), -0.15865525393145707, 1e-12));
        assert_eq!(activation_ref(0.0, Activation::Gelu), 0.0);
        // gelu_tanh(1) = 0.5 (1 + tanh(0.7978845608 * 1.044715)) = 0.8411919906082768
        assert!(close(activation_ref(1.0, Activation::GeluTanh), 0.8411919906082768, 1e-14));
        assert_eq!(activation_ref(-20.0, Activation::GeluTanh), 0.0);
        assert_eq!(activation_ref(20.0, Activation::Gelu), 20.0);
    }

    #[test]
    fn elementwise_ref_adds_then_activates() {
        let a = [1.0f32, -2.0, 3.0, -4.0, 5.0, -6.0];
        let b = [0.5f32, 0.5, 0.5, 0.5, 0.5, 0.5];
        let bias = [10.0f32, 20.0, 30.0];
        assert_eq!(add_ref(&a, &b), vec![1.5, -1.5, 3.5, -3.5, 5.5, -5.5]);
        assert_eq!(bias_add_ref(&a, &bias), vec![11.0, 18.0, 33.0, 6.0, 25.0, 24.0]);
        assert_eq!(relu_ref(&a), vec![1.0, 0.0, 3.0, 0.0, 5.0, 0.0]);
        let r = elementwise_ref(&a, Some(&b), Some(&[-1.0, 0.0]), Activation::Relu);
        assert_eq!(r, vec![0.5, 0.0, 2.5, 0.0, 4.5, 0.0]);
        let g = gelu_ref(&[1.0]);
        assert!((g[0] - 0.841_344_7).abs() < 1e-7);
        let gt = gelu_tanh_ref(&[1.0]);
        assert!((gt[0] - 0.841_192).abs() < 1e-7);
    }
}
