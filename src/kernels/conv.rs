//! conv kernels (kernels/conv.ptx): launchers and CPU references.
//!
//! What a no-framework ResNet (torchvision layout, inference, fp32, NCHW)
//! needs besides GEMM and elementwise work:
//!
//! - [`conv2d`]: implicit-GEMM convolution (any stride and padding, dilation
//!   1, groups 1) with a fused epilogue `relu?(conv(x) + bias + residual)`.
//!   Four tile shapes of one kernel design (see the PTX's comments): 128x128,
//!   128x64, 64x64, and 64x64 with the reduction sliced 4 ways inside the
//!   block for layers too small to fill the GPU. The launcher picks one with
//!   a small cost model ([`choose_tile`]); [`conv2d_with`] forces one
//!   (tests, benchmarks).
//! - [`fold_batch_norm`]: folds an inference batch norm into the preceding
//!   convolution's weight and bias, on the CPU.
//! - [`max_pool2d`], [`avg_pool2d`] (count_include_pad, as PyTorch's
//!   default), [`global_avg_pool`].
//!
//! Every launcher checks its arguments on the CPU first ([`validate`],
//! [`validate_pool`]) and returns [`Error::InvalidArgument`] rather than
//! launching something that could read or write out of bounds. Every kernel
//! has a CPU reference (`*_ref`, computed in f64) that the GPU tests in
//! `tests/kernels_conv.rs` compare against.

use std::ffi::c_void;

use cudarc::driver::sys::CUdevice_attribute;

use crate::cuda::{CUdeviceptr, CUstream, Device, DeviceAlloc, Event, LaunchConfig, Stream};
use crate::error::{Error, Result};

/// Module name in the kernel cache.
pub const MODULE: &str = "conv";
/// The PTX text.
pub const PTX: &str = include_str!("../../kernels/conv.ptx");

/// Largest element count of any one tensor: the kernels use 32-bit offsets.
const MAX_ELEMS: usize = (1 << 31) - 1;
/// Bound on padded spatial extents, filter sizes and strides: keeps the
/// kernels' signed window coordinates (and their "always outside" sentinel,
/// -2^29) far from overflow.
const MAX_EXTENT: usize = 1 << 28;
/// Largest grid.y of a launch.
const MAX_GRID_Y: usize = 65535;

/// A 2-D convolution: shapes, device pointers and the fused epilogue.
///
/// `y[n][k][p][q] = relu?( sum_{c,r,s} x[n][c][p*stride_h - pad_h + r][q*stride_w - pad_w + s]
/// * weight[k][c][r][s] + bias[k] + residual[n][k][p][q] )`, with input
/// positions outside `[0,h) x [0,w)` reading as 0. `bias` and `residual` are
/// optional: 0 means none. All tensors are fp32, NCHW (weight OIHW),
/// contiguous. `residual` may be `y` itself (in-place residual add); `y`
/// must not overlap `x` or `weight`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Conv2dArgs {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    /// Output channels.
    pub k: usize,
    /// Filter height.
    pub r: usize,
    /// Filter width.
    pub s: usize,
    pub stride_h: usize,
    pub stride_w: usize,
    pub pad_h: usize,
    pub pad_w: usize,
    /// Input [n][c][h][w].
    pub x: CUdeviceptr,
    /// Weight [k][c][r][s].
    pub weight: CUdeviceptr,
    /// Bias [k], or 0 for none.
    pub bias: CUdeviceptr,
    /// Residual [n][k][p][q], or 0 for none.
    pub residual: CUdeviceptr,
    /// Output [n][k][p][q].
    pub y: CUdeviceptr,
    /// Apply ReLU last.
    pub relu: bool,
}

impl Conv2dArgs {
    /// A shape with square stride and padding and no pointers yet (all 0),
    /// no ReLU.
    #[allow(clippy::too_many_arguments)]
    pub fn shape(n: usize, c: usize, h: usize, w: usize, k: usize, r: usize, s: usize, stride: usize, pad: usize) -> Self {
        Conv2dArgs { n, c, h, w, k, r, s, stride_h: stride, stride_w: stride, pad_h: pad, pad_w: pad, ..Default::default() }
    }

    /// Output height and width, `(h + 2*pad_h - r) / stride_h + 1` and the
    /// same for w; (0, 0) where the filter does not fit or a stride is 0.
    pub fn out_dims(&self) -> (usize, usize) {
        let dim = |i: usize, pad: usize, f: usize, st: usize| -> usize {
            let padded = match pad.checked_mul(2).and_then(|p| p.checked_add(i)) {
                Some(v) => v,
                None => return 0,
            };
            if st == 0 || f == 0 || i == 0 || padded < f {
                return 0;
            }
            (padded - f) / st + 1
        };
        let p = dim(self.h, self.pad_h, self.r, self.stride_h);
        let q = dim(self.w, self.pad_w, self.s, self.stride_w);
        if p == 0 || q == 0 {
            (0, 0)
        } else {
            (p, q)
        }
    }

    /// Floating-point operations of the convolution proper (2 per
    /// multiply-add), as benchmarks count them.
    pub fn flops(&self) -> f64 {
        let (p, q) = self.out_dims();
        2.0 * (self.n * p * q) as f64 * self.k as f64 * (self.c * self.r * self.s) as f64
    }

    /// Elements of x, weight and y.
    pub fn x_len(&self) -> usize {
        self.n * self.c * self.h * self.w
    }
    pub fn weight_len(&self) -> usize {
        self.k * self.c * self.r * self.s
    }
    pub fn y_len(&self) -> usize {
        let (p, q) = self.out_dims();
        self.n * self.k * p * q
    }
}

/// The derived sizes of a valid convolution (see [`validate_shape`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvDims {
    pub p: usize,
    pub q: usize,
    /// GEMM rows: n*p*q output pixels.
    pub m: usize,
    /// GEMM reduction: c*r*s.
    pub crs: usize,
}

fn checked_product(dims: &[usize], what: &str) -> Result<usize> {
    let mut acc: usize = 1;
    for &d in dims {
        acc = acc
            .checked_mul(d)
            .filter(|&v| v <= MAX_ELEMS)
            .ok_or_else(|| Error::invalid(format!("{what} has more than 2^31 - 1 elements")))?;
    }
    Ok(acc)
}

/// Checks a convolution's shape alone (no pointers): nonzero sizes, a filter
/// that fits the padded input, every tensor under 2^31 elements, extents
/// under 2^28. Used by [`validate`] and by the CPU reference.
pub fn validate_shape(a: &Conv2dArgs) -> Result<ConvDims> {
    let named = [
        ("n", a.n),
        ("c", a.c),
        ("h", a.h),
        ("w", a.w),
        ("k", a.k),
        ("r", a.r),
        ("s", a.s),
        ("stride_h", a.stride_h),
        ("stride_w", a.stride_w),
    ];
    for (name, v) in named {
        if v == 0 {
            return Err(Error::invalid(format!("conv2d: {name} is 0")));
        }
    }
    for (name, v) in [("h + 2*pad_h", a.h.checked_add(a.pad_h.saturating_mul(2))), ("w + 2*pad_w", a.w.checked_add(a.pad_w.saturating_mul(2)))] {
        if v.is_none_or(|v| v >= MAX_EXTENT) {
            return Err(Error::invalid(format!("conv2d: {name} must be below 2^28")));
        }
    }
    if a.r >= MAX_EXTENT || a.s >= MAX_EXTENT || a.stride_h >= MAX_EXTENT || a.stride_w >= MAX_EXTENT {
        return Err(Error::invalid("conv2d: filter sizes and strides must be below 2^28"));
    }
    if a.r > a.h + 2 * a.pad_h || a.s > a.w + 2 * a.pad_w {
        return Err(Error::invalid(format!(
            "conv2d: a {}x{} filter does not fit a {}x{} input padded by ({}, {})",
            a.r, a.s, a.h, a.w, a.pad_h, a.pad_w
        )));
    }
    let (p, q) = a.out_dims();
    checked_product(&[a.n, a.c, a.h, a.w], "conv2d input")?;
    let crs = checked_product(&[a.c, a.r, a.s], "conv2d filter row")?;
    if crs > MAX_ELEMS - 64 {
        return Err(Error::invalid("conv2d: c*r*s is too large"));
    }
    checked_product(&[a.k, crs], "conv2d weight")?;
    let m = checked_product(&[a.n, p, q], "conv2d output")?;
    checked_product(&[m, a.k], "conv2d output")?;
    Ok(ConvDims { p, q, m, crs })
}

fn check_aligned(ptr: CUdeviceptr, align: u64, what: &str) -> Result<()> {
    if ptr % align != 0 {
        return Err(Error::invalid(format!("{what} (0x{ptr:x}) is not {align}-byte aligned")));
    }
    Ok(())
}

fn overlaps(a: CUdeviceptr, a_elems: usize, b: CUdeviceptr, b_elems: usize) -> bool {
    let a_end = a.saturating_add(4 * a_elems as u64);
    let b_end = b.saturating_add(4 * b_elems as u64);
    a < b_end && b < a_end
}

/// Checks a convolution launch on the CPU: [`validate_shape`], non-null
/// 4-byte-aligned x, weight and y (and bias, residual where given), y not
/// overlapping x, weight or bias, residual either exactly y or disjoint from
/// it. Nothing here touches the GPU.
pub fn validate(a: &Conv2dArgs) -> Result<ConvDims> {
    let d = validate_shape(a)?;
    for (what, ptr) in [("conv2d x", a.x), ("conv2d weight", a.weight), ("conv2d y", a.y)] {
        if ptr == 0 {
            return Err(Error::invalid(format!("{what} is a null device pointer")));
        }
        check_aligned(ptr, 4, what)?;
    }
    if a.bias != 0 {
        check_aligned(a.bias, 4, "conv2d bias")?;
    }
    if a.residual != 0 {
        check_aligned(a.residual, 4, "conv2d residual")?;
    }
    let y_len = d.m * a.k;
    if overlaps(a.y, y_len, a.x, a.x_len()) {
        return Err(Error::invalid("conv2d: y overlaps x"));
    }
    if overlaps(a.y, y_len, a.weight, a.weight_len()) {
        return Err(Error::invalid("conv2d: y overlaps weight"));
    }
    if a.bias != 0 && overlaps(a.y, y_len, a.bias, a.k) {
        return Err(Error::invalid("conv2d: y overlaps bias"));
    }
    if a.residual != 0 && a.residual != a.y && overlaps(a.y, y_len, a.residual, y_len) {
        return Err(Error::invalid("conv2d: residual partly overlaps y (it may only be y itself)"));
    }
    Ok(d)
}

/// Magic numbers for dividing by `d` (1 <= d < 2^31) with a multiply-high:
/// `n / d == (mul_hi(n, mul) + n) >> shr` for every `n < 2^31`
/// (Granlund and Montgomery 1994, fig. 4.1). Returns `(mul, shr)`.
pub fn magic_div(d: u32) -> (u32, u32) {
    let d = d.max(1);
    let shr = 32 - (d - 1).leading_zeros(); // ceil(log2 d)
    let mul = ((1u64 << 32) * ((1u64 << shr) - u64::from(d)) / u64::from(d) + 1) as u32;
    (mul, shr)
}

/// What the kernel computes with [`magic_div`]'s numbers (for tests).
pub fn magic_div_apply(n: u32, mul: u32, shr: u32) -> u32 {
    let hi = ((u64::from(n) * u64::from(mul)) >> 32) as u32;
    hi.wrapping_add(n) >> shr
}

/// The block tile of a convolution launch: output pixels x output channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConvTile {
    /// 128 x 128, 8x8 per thread: the most work per byte, fewest blocks.
    T128x128,
    /// 128 x 64, 8x4 per thread: layers with 64 or few output channels.
    T128x64,
    /// 64 x 64, 4x4 per thread: small layers, where larger tiles leave SMs idle.
    T64x64,
    /// 64 x 64 with the reduction sliced 4 ways inside the block (4 groups
    /// of 64 threads, 8x8 each, partial sums added at the end): small
    /// layers, with the large micro-tiles' efficiency.
    T64x64K4,
}

impl ConvTile {
    pub const ALL: [ConvTile; 4] = [ConvTile::T128x128, ConvTile::T128x64, ConvTile::T64x64, ConvTile::T64x64K4];

    /// The PTX entry.
    pub fn entry(self) -> &'static str {
        match self {
            ConvTile::T128x128 => "conv2d_f32_128x128",
            ConvTile::T128x64 => "conv2d_f32_128x64",
            ConvTile::T64x64 => "conv2d_f32_64x64",
            ConvTile::T64x64K4 => "conv2d_f32_64x64_k4",
        }
    }

    /// (pixels, channels) per block.
    pub fn dims(self) -> (usize, usize) {
        match self {
            ConvTile::T128x128 => (128, 128),
            ConvTile::T128x64 => (128, 64),
            ConvTile::T64x64 | ConvTile::T64x64K4 => (64, 64),
        }
    }

    /// Blocks each SM runs at once (the PTX's `.minnctapersm`).
    fn blocks_per_sm(self) -> usize {
        match self {
            ConvTile::T128x128 | ConvTile::T128x64 | ConvTile::T64x64K4 => 2,
            ConvTile::T64x64 => 3,
        }
    }

    /// Relative multiply-add rate of one SM kept busy by this tile (larger
    /// micro-tiles reuse each shared-memory value more). Fitted, with
    /// [`Self::fixed_rows`], to the measured throughput of every ResNet-152
    /// convolution at batch 8 on an H200 (132 SMs): the choice then costs
    /// 1% over always taking the fastest tile.
    fn rate(self) -> f64 {
        match self {
            ConvTile::T128x128 => 1.0,
            ConvTile::T128x64 => 0.8,
            ConvTile::T64x64 => 0.6,
            ConvTile::T64x64K4 => 0.9,
        }
    }

    /// Fixed cost of a block, in reduction rows: the sliced tile fills a
    /// deeper ring and sums its slices at the end.
    fn fixed_rows(self) -> usize {
        match self {
            ConvTile::T64x64K4 => 32,
            _ => 0,
        }
    }

    /// Dynamic shared memory of a launch (the PTX's ring of 3 stages of 32
    /// reduction rows: 3 * (32*64 + 32*68) floats), 0 for static.
    fn dynamic_smem(self) -> u32 {
        match self {
            ConvTile::T64x64K4 => 3 * (32 * 64 + 32 * 68) * 4,
            _ => 0,
        }
    }

    /// The launch grid for m pixels and k channels.
    fn grid(self, m: usize, k: usize) -> (usize, usize) {
        let (bm, bn) = self.dims();
        (m.div_ceil(bm), k.div_ceil(bn))
    }
}

/// Picks the tile with the lowest estimated time for an m x k output with a
/// reduction of `crs` on a GPU of `sms` multiprocessors: the work of the
/// busiest SM (whole blocks, including the unused part of edge tiles) over
/// the tile's rate, where an SM that holds fewer blocks than it could runs
/// slower (less latency hidden).
pub fn choose_tile(m: usize, k: usize, crs: usize, sms: usize) -> ConvTile {
    let sms = sms.max(1);
    let mut best = (f64::INFINITY, ConvTile::T128x128);
    for t in ConvTile::ALL {
        let (gx, gy) = t.grid(m, k);
        let blocks = gx * gy;
        let (bm, bn) = t.dims();
        let per_sm = blocks.div_ceil(sms); // blocks on the busiest SM
        let resident = per_sm.min(t.blocks_per_sm()) as f64 / t.blocks_per_sm() as f64;
        // Occupancy below the full complement costs latency hiding; model it
        // as a rate that halves from full to one block.
        let occ_rate = 0.5 + 0.5 * resident;
        let cost = (per_sm * bm * bn) as f64 * (crs + t.fixed_rows()) as f64 / (t.rate() * occ_rate);
        if cost < best.0 {
            best = (cost, t);
        }
    }
    best.1
}

fn sm_count(device: &'static Device) -> Result<usize> {
    let n = device.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
    Ok(n.max(1) as usize)
}

/// Enqueues `y = relu?(conv2d(x, weight) + bias + residual)` on `stream`,
/// with the tile [`choose_tile`] picks for this device.
pub fn conv2d(device: &'static Device, stream: CUstream, a: &Conv2dArgs) -> Result<()> {
    let d = validate(a)?;
    let tile = choose_tile(d.m, a.k, d.crs, sm_count(device)?);
    launch_conv(device, stream, a, &d, tile)
}

/// [`conv2d`] with a given tile.
pub fn conv2d_with(device: &'static Device, stream: CUstream, a: &Conv2dArgs, tile: ConvTile) -> Result<()> {
    let d = validate(a)?;
    launch_conv(device, stream, a, &d, tile)
}

fn launch_conv(device: &'static Device, stream: CUstream, a: &Conv2dArgs, d: &ConvDims, tile: ConvTile) -> Result<()> {
    let (gx, gy) = tile.grid(d.m, a.k);
    if gy > MAX_GRID_Y {
        return Err(Error::invalid(format!("conv2d: k = {} needs more than {MAX_GRID_Y} blocks in y", a.k)));
    }
    // Every quantity below is < 2^31 (validate_shape).
    let u = |v: usize| v as u32;
    let pq = d.p * d.q;
    let (rs_mul, rs_shr) = magic_div(u(a.r * a.s));
    let (s_mul, s_shr) = magic_div(u(a.s));
    let vec4 = pq % 4 == 0 && a.y % 16 == 0 && (a.residual == 0 || a.residual % 16 == 0);
    let mut x = a.x;
    let mut wt = a.weight;
    let mut bias = a.bias;
    let mut res = a.residual;
    let mut y = a.y;
    let mut m = u(d.m);
    let mut k = u(a.k);
    let mut crs = u(d.crs);
    let mut pq_ = u(pq);
    let mut q = u(d.q);
    let mut h = u(a.h);
    let mut w = u(a.w);
    let mut hw = u(a.h * a.w);
    let mut chw = u(a.c * a.h * a.w);
    let mut sh = u(a.stride_h);
    let mut sw = u(a.stride_w);
    let mut ph = u(a.pad_h);
    let mut pw = u(a.pad_w);
    let mut rs = u(a.r * a.s);
    let mut rs_mul = rs_mul;
    let mut rs_shr = rs_shr;
    let mut s = u(a.s);
    let mut s_mul = s_mul;
    let mut s_shr = s_shr;
    let mut kpq = u(a.k * pq);
    let mut flags: u32 = u32::from(a.relu) | (u32::from(vec4) << 1);
    let mut params: [*mut c_void; 26] = [
        (&mut x as *mut u64).cast(),
        (&mut wt as *mut u64).cast(),
        (&mut bias as *mut u64).cast(),
        (&mut res as *mut u64).cast(),
        (&mut y as *mut u64).cast(),
        (&mut m as *mut u32).cast(),
        (&mut k as *mut u32).cast(),
        (&mut crs as *mut u32).cast(),
        (&mut pq_ as *mut u32).cast(),
        (&mut q as *mut u32).cast(),
        (&mut h as *mut u32).cast(),
        (&mut w as *mut u32).cast(),
        (&mut hw as *mut u32).cast(),
        (&mut chw as *mut u32).cast(),
        (&mut sh as *mut u32).cast(),
        (&mut sw as *mut u32).cast(),
        (&mut ph as *mut u32).cast(),
        (&mut pw as *mut u32).cast(),
        (&mut rs as *mut u32).cast(),
        (&mut rs_mul as *mut u32).cast(),
        (&mut rs_shr as *mut u32).cast(),
        (&mut s as *mut u32).cast(),
        (&mut s_mul as *mut u32).cast(),
        (&mut s_shr as *mut u32).cast(),
        (&mut kpq as *mut u32).cast(),
        (&mut flags as *mut u32).cast(),
    ];
    let f = crate::kernels::function(device, MODULE, PTX, tile.entry())?;
    let smem = tile.dynamic_smem();
    if smem > 48 * 1024 {
        f.set_max_dynamic_shared(smem)?;
    }
    let cfg = LaunchConfig { grid: (gx as u32, gy as u32, 1), block: (256, 1, 1), shared_mem_bytes: smem };
    // SAFETY: params match the entry's 26 parameters (5 u64, 21 u32) in
    // order and type; validate() checked the pointers' alignment and overlap
    // and that every offset the kernel forms fits its 32-bit arithmetic; the
    // caller guarantees the allocations hold the tensors the shape describes.
    unsafe { f.launch(cfg, stream, &mut params) }
}

/// CPU reference of [`conv2d`], accumulated in f64: `a`'s shape and `relu`
/// (its pointers are ignored), the tensors as slices.
pub fn conv2d_ref(a: &Conv2dArgs, x: &[f32], weight: &[f32], bias: Option<&[f32]>, residual: Option<&[f32]>) -> Result<Vec<f32>> {
    let d = validate_shape(a)?;
    let (p_, q_) = (d.p, d.q);
    let y_len = d.m * a.k;
    if x.len() != a.x_len() || weight.len() != a.weight_len() {
        return Err(Error::invalid("conv2d_ref: x or weight has the wrong length"));
    }
    if bias.is_some_and(|b| b.len() != a.k) || residual.is_some_and(|r| r.len() != y_len) {
        return Err(Error::invalid("conv2d_ref: bias or residual has the wrong length"));
    }
    let mut y = vec![0f32; y_len];
    for n in 0..a.n {
        for k in 0..a.k {
            for p in 0..p_ {
                for q in 0..q_ {
                    let mut acc = 0f64;
                    for c in 0..a.c {
                        for r in 0..a.r {
                            let ih = (p * a.stride_h + r) as isize - a.pad_h as isize;
                            if ih < 0 || ih >= a.h as isize {
                                continue;
                            }
                            for s in 0..a.s {
                                let iw = (q * a.stride_w + s) as isize - a.pad_w as isize;
                                if iw < 0 || iw >= a.w as isize {
                                    continue;
                                }
                                let xv = x[((n * a.c + c) * a.h + ih as usize) * a.w + iw as usize];
                                let wv = weight[((k * a.c + c) * a.r + r) * a.s + s];
                                acc += f64::from(xv) * f64::from(wv);
                            }
                        }
                    }
                    let o = ((n * a.k + k) * p_ + p) * q_ + q;
                    if let Some(b) = bias {
                        acc += f64::from(b[k]);
                    }
                    if let Some(res) = residual {
                        acc += f64::from(res[o]);
                    }
                    if a.relu && acc < 0.0 {
                        acc = 0.0;
                    }
                    y[o] = acc as f32;
                }
            }
        }
    }
    Ok(y)
}

/// Folds an inference batch norm that follows a convolution into the
/// convolution: with `g = gamma / sqrt(running_var + eps)`, the folded
/// weight is `weight[k] * g[k]` and the folded bias `(bias[k] - mean[k]) *
/// g[k] + beta[k]` (bias 0 when the convolution has none), so that
/// `conv'(x) = gamma * (conv(x) + bias - mean) / sqrt(var + eps) + beta`.
/// Computed in f64. `weight` is [k][c][r][s] (any trailing size); the five
/// per-channel slices have `k` elements. Mismatched lengths give two empty
/// vectors (see [`try_fold_batch_norm`] for an error instead).
#[allow(clippy::too_many_arguments)]
pub fn fold_batch_norm(
    weight: &[f32],
    bias: Option<&[f32]>,
    gamma: &[f32],
    beta: &[f32],
    running_mean: &[f32],
    running_var: &[f32],
    eps: f32,
    k: usize,
) -> (Vec<f32>, Vec<f32>) {
    try_fold_batch_norm(weight, bias, gamma, beta, running_mean, running_var, eps, k).unwrap_or_default()
}

/// [`fold_batch_norm`], returning an error on mismatched lengths or a
/// negative `running_var + eps`.
#[allow(clippy::too_many_arguments)]
pub fn try_fold_batch_norm(
    weight: &[f32],
    bias: Option<&[f32]>,
    gamma: &[f32],
    beta: &[f32],
    running_mean: &[f32],
    running_var: &[f32],
    eps: f32,
    k: usize,
) -> Result<(Vec<f32>, Vec<f32>)> {
    if k == 0 || weight.is_empty() || weight.len() % k != 0 {
        return Err(Error::invalid(format!("fold_batch_norm: weight of {} elements is not k = {k} rows", weight.len())));
    }
    if [gamma.len(), beta.len(), running_mean.len(), running_var.len()].iter().any(|&l| l != k)
        || bias.is_some_and(|b| b.len() != k)
    {
        return Err(Error::invalid(format!("fold_batch_norm: per-channel vectors must have k = {k} elements")));
    }
    let row = weight.len() / k;
    let mut w = Vec::with_capacity(weight.len());
    let mut b = Vec::with_capacity(k);
    for ch in 0..k {
        let var = f64::from(running_var[ch]) + f64::from(eps);
        if var.is_nan() || var <= 0.0 {
            return Err(Error::invalid(format!("fold_batch_norm: running_var + eps is not positive for channel {ch}")));
        }
        let g = f64::from(gamma[ch]) / var.sqrt();
        w.extend(weight[ch * row..(ch + 1) * row].iter().map(|&v| (f64::from(v) * g) as f32));
        let b0 = bias.map_or(0.0, |b| f64::from(b[ch]));
        b.push(((b0 - f64::from(running_mean[ch])) * g + f64::from(beta[ch])) as f32);
    }
    Ok((w, b))
}

/// A 2-D pooling window over an NCHW tensor. Output sizes are floor-rounded
/// (PyTorch's `ceil_mode=False`), padding is at most half the window
/// (as PyTorch requires), dilation 1.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pool2dArgs {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub kernel_h: usize,
    pub kernel_w: usize,
    pub stride_h: usize,
    pub stride_w: usize,
    pub pad_h: usize,
    pub pad_w: usize,
}

impl Pool2dArgs {
    /// Square window, stride and padding.
    pub fn square(n: usize, c: usize, h: usize, w: usize, kernel: usize, stride: usize, pad: usize) -> Self {
        Pool2dArgs { n, c, h, w, kernel_h: kernel, kernel_w: kernel, stride_h: stride, stride_w: stride, pad_h: pad, pad_w: pad }
    }

    /// Output height and width; (0, 0) where the window does not fit.
    pub fn out_dims(&self) -> (usize, usize) {
        let as_conv = Conv2dArgs {
            n: self.n,
            c: self.c,
            h: self.h,
            w: self.w,
            k: 1,
            r: self.kernel_h,
            s: self.kernel_w,
            stride_h: self.stride_h,
            stride_w: self.stride_w,
            pad_h: self.pad_h,
            pad_w: self.pad_w,
            ..Default::default()
        };
        as_conv.out_dims()
    }
}

/// Checks a pooling shape on the CPU; returns the output (p, q).
pub fn validate_pool(a: &Pool2dArgs) -> Result<(usize, usize)> {
    for (name, v) in [
        ("n", a.n),
        ("c", a.c),
        ("h", a.h),
        ("w", a.w),
        ("kernel_h", a.kernel_h),
        ("kernel_w", a.kernel_w),
        ("stride_h", a.stride_h),
        ("stride_w", a.stride_w),
    ] {
        if v == 0 {
            return Err(Error::invalid(format!("pool2d: {name} is 0")));
        }
    }
    if a.pad_h > a.kernel_h / 2 || a.pad_w > a.kernel_w / 2 {
        return Err(Error::invalid("pool2d: padding must be at most half the window"));
    }
    let hp = a.h.checked_add(2 * a.pad_h).filter(|&v| v < MAX_EXTENT);
    let wp = a.w.checked_add(2 * a.pad_w).filter(|&v| v < MAX_EXTENT);
    if hp.is_none() || wp.is_none() || a.kernel_h >= MAX_EXTENT || a.kernel_w >= MAX_EXTENT || a.stride_h >= MAX_EXTENT || a.stride_w >= MAX_EXTENT {
        return Err(Error::invalid("pool2d: extents, windows and strides must be below 2^28"));
    }
    let (p, q) = a.out_dims();
    if p == 0 {
        return Err(Error::invalid("pool2d: the window does not fit the padded input"));
    }
    checked_product(&[a.n, a.c, a.h, a.w], "pool2d input")?;
    checked_product(&[a.n, a.c, p, q], "pool2d output")?;
    Ok((p, q))
}

fn check_io(x: CUdeviceptr, x_len: usize, y: CUdeviceptr, y_len: usize, what: &str) -> Result<()> {
    if x == 0 || y == 0 {
        return Err(Error::invalid(format!("{what}: x or y is a null device pointer")));
    }
    check_aligned(x, 4, what)?;
    check_aligned(y, 4, what)?;
    if overlaps(x, x_len, y, y_len) {
        return Err(Error::invalid(format!("{what}: y overlaps x")));
    }
    Ok(())
}

fn launch_pool(device: &'static Device, stream: CUstream, entry: &str, x: CUdeviceptr, y: CUdeviceptr, a: &Pool2dArgs) -> Result<()> {
    let (p, q) = validate_pool(a)?;
    let total = a.n * a.c * p * q;
    check_io(x, a.n * a.c * a.h * a.w, y, total, entry)?;
    let u = |v: usize| v as u32; // all < 2^31 (validate_pool)
    let (mut xp, mut yp) = (x, y);
    let mut vals = [
        u(total),
        u(a.h),
        u(a.w),
        u(p),
        u(q),
        u(a.kernel_h),
        u(a.kernel_w),
        u(a.stride_h),
        u(a.stride_w),
        u(a.pad_h),
        u(a.pad_w),
    ];
    let [v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, v10] = &mut vals;
    let mut params: [*mut c_void; 13] = [
        (&mut xp as *mut u64).cast(),
        (&mut yp as *mut u64).cast(),
        (v0 as *mut u32).cast(),
        (v1 as *mut u32).cast(),
        (v2 as *mut u32).cast(),
        (v3 as *mut u32).cast(),
        (v4 as *mut u32).cast(),
        (v5 as *mut u32).cast(),
        (v6 as *mut u32).cast(),
        (v7 as *mut u32).cast(),
        (v8 as *mut u32).cast(),
        (v9 as *mut u32).cast(),
        (v10 as *mut u32).cast(),
    ];
    let f = crate::kernels::function(device, MODULE, PTX, entry)?;
    let blocks = (total as u64).div_ceil(256).min(1 << 20) as u32; // grid-stride beyond
    let cfg = LaunchConfig { grid: (blocks, 1, 1), block: (256, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: params match the entry's 13 parameters (2 u64, 11 u32) in
    // order and type; validate_pool() bounds every offset below 2^31; the
    // kernel reads x only inside [0, n*c*h*w) and writes y inside [0, total).
    unsafe { f.launch(cfg, stream, &mut params) }
}

/// Enqueues a max pool: `y [n][c][p][q]` = the maximum of each window of
/// `x [n][c][h][w]`, padding counting as -inf (NaN propagates).
pub fn max_pool2d(device: &'static Device, stream: CUstream, x: CUdeviceptr, y: CUdeviceptr, a: &Pool2dArgs) -> Result<()> {
    launch_pool(device, stream, "max_pool2d_f32", x, y, a)
}

/// Enqueues an average pool with `count_include_pad = true` (PyTorch's
/// default): each window's sum over the input, divided by kernel_h*kernel_w.
pub fn avg_pool2d(device: &'static Device, stream: CUstream, x: CUdeviceptr, y: CUdeviceptr, a: &Pool2dArgs) -> Result<()> {
    launch_pool(device, stream, "avg_pool2d_f32", x, y, a)
}

fn pool_ref(a: &Pool2dArgs, x: &[f32], max: bool) -> Result<Vec<f32>> {
    let (p_, q_) = validate_pool(a)?;
    if x.len() != a.n * a.c * a.h * a.w {
        return Err(Error::invalid("pool2d_ref: x has the wrong length"));
    }
    let mut y = Vec::with_capacity(a.n * a.c * p_ * q_);
    for plane in x.chunks_exact(a.h * a.w) {
        for p in 0..p_ {
            for q in 0..q_ {
                let mut best = f32::NEG_INFINITY;
                let mut sum = 0f64;
                for i in 0..a.kernel_h {
                    for j in 0..a.kernel_w {
                        let ih = (p * a.stride_h + i) as isize - a.pad_h as isize;
                        let iw = (q * a.stride_w + j) as isize - a.pad_w as isize;
                        if ih < 0 || iw < 0 || ih >= a.h as isize || iw >= a.w as isize {
                            continue;
                        }
                        let v = plane[ih as usize * a.w + iw as usize];
                        if v > best || v.is_nan() {
                            best = v;
                        }
                        sum += f64::from(v);
                    }
                }
                y.push(if max { best } else { (sum / (a.kernel_h * a.kernel_w) as f64) as f32 });
            }
        }
    }
    Ok(y)
}

/// CPU reference of [`max_pool2d`].
pub fn max_pool2d_ref(a: &Pool2dArgs, x: &[f32]) -> Result<Vec<f32>> {
    pool_ref(a, x, true)
}

/// CPU reference of [`avg_pool2d`] (f64 sums).
pub fn avg_pool2d_ref(a: &Pool2dArgs, x: &[f32]) -> Result<Vec<f32>> {
    pool_ref(a, x, false)
}

/// Enqueues a global average pool: `y [n][c]` = the mean of each `h x w`
/// plane of `x [n][c][h][w]`. One warp per plane.
#[allow(clippy::too_many_arguments)]
pub fn global_avg_pool(device: &'static Device, stream: CUstream, x: CUdeviceptr, y: CUdeviceptr, n: usize, c: usize, h: usize, w: usize) -> Result<()> {
    launch_global_avg_pool(device, stream, x, y, n, c, h, w)
}

#[allow(clippy::too_many_arguments)]
fn launch_global_avg_pool(device: &'static Device, stream: CUstream, x: CUdeviceptr, y: CUdeviceptr, n: usize, c: usize, h: usize, w: usize) -> Result<()> {
    for (name, v) in [("n", n), ("c", c), ("h", h), ("w", w)] {
        if v == 0 {
            return Err(Error::invalid(format!("global_avg_pool: {name} is 0")));
        }
    }
    let x_len = checked_product(&[n, c, h, w], "global_avg_pool input")?;
    let nc = n * c;
    check_io(x, x_len, y, nc, "global_avg_pool")?;
    let (mut xp, mut yp) = (x, y);
    let mut nc_ = nc as u32;
    let mut hw = (h * w) as u32;
    let mut params: [*mut c_void; 4] = [
        (&mut xp as *mut u64).cast(),
        (&mut yp as *mut u64).cast(),
        (&mut nc_ as *mut u32).cast(),
        (&mut hw as *mut u32).cast(),
    ];
    let f = crate::kernels::function(device, MODULE, PTX, "global_avg_pool_f32")?;
    let cfg = LaunchConfig { grid: (nc.div_ceil(8) as u32, 1, 1), block: (256, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: params match the entry's (u64, u64, u32, u32); warp g < nc
    // reads x[g*hw .. (g+1)*hw) and writes y[g], all below 2^31 elements.
    unsafe { f.launch(cfg, stream, &mut params) }
}

/// CPU reference of [`global_avg_pool`] (f64 sums).
pub fn global_avg_pool_ref(x: &[f32], n: usize, c: usize, h: usize, w: usize) -> Result<Vec<f32>> {
    let hw = h * w;
    if hw == 0 || n * c == 0 || x.len() != n * c * hw {
        return Err(Error::invalid("global_avg_pool_ref: x has the wrong length or a size is 0"));
    }
    Ok(x.chunks_exact(hw).map(|pl| (pl.iter().map(|&v| f64::from(v)).sum::<f64>() / hw as f64) as f32).collect())
}

/// Deterministic pseudo-random values in [-1, 1) (xorshift64*), for tests
/// and benchmarks.
pub fn random_f32(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            let v = s.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40; // 24 bits
            (v as f32 / (1u32 << 23) as f32) - 1.0
        })
        .collect()
}

/// Median throughput (TFLOP/s, 2 per multiply-add) of [`conv2d`] on a
/// problem of `shape`'s sizes: its pointers are ignored; bias and residual
/// are included where `shape` has nonzero ones, and `relu` as given.
/// Random inputs, `reps` timed launches (events around each) after three
/// warm-ups. `tile` forces a tile; None lets [`choose_tile`] pick.
pub fn bench_conv_with(device: &'static Device, shape: &Conv2dArgs, tile: Option<ConvTile>, reps: usize) -> Result<f64> {
    let d = validate_shape(shape)?;
    let stream = Stream::new(device)?;
    let x = DeviceAlloc::from_slice(device, &random_f32(shape.x_len(), 1))?;
    let w = DeviceAlloc::from_slice(device, &random_f32(shape.weight_len(), 2))?;
    let b = DeviceAlloc::from_slice(device, &random_f32(shape.k, 3))?;
    let r = DeviceAlloc::from_slice(device, &random_f32(d.m * shape.k, 4))?;
    let y = DeviceAlloc::new(device, 4 * d.m * shape.k)?;
    let a = Conv2dArgs {
        x: x.ptr(),
        weight: w.ptr(),
        bias: if shape.bias != 0 { b.ptr() } else { 0 },
        residual: if shape.residual != 0 { r.ptr() } else { 0 },
        y: y.ptr(),
        ..*shape
    };
    let tile = match tile {
        Some(t) => t,
        None => choose_tile(d.m, shape.k, d.crs, sm_count(device)?),
    };
    let (start, end) = (Event::new(device, true)?, Event::new(device, true)?);
    for _ in 0..3 {
        conv2d_with(device, stream.raw(), &a, tile)?;
    }
    stream.synchronize()?;
    let mut ms = Vec::with_capacity(reps.max(1));
    for _ in 0..reps.max(1) {
        start.record(stream.raw())?;
        conv2d_with(device, stream.raw(), &a, tile)?;
        end.record(stream.raw())?;
        end.synchronize()?;
        ms.push(f64::from(Event::elapsed_ms(&start, &end)?));
    }
    ms.sort_by(f64::total_cmp);
    let median = ms[ms.len() / 2];
    Ok(shape.flops() / (median * 1e-3) / 1e12)
}

/// [`bench_conv_with`] with the tile [`conv2d`] would pick.
pub fn bench_conv(device: &'static Device, shape: &Conv2dArgs, reps: usize) -> Result<f64> {
    bench_conv_with(device, shape, None, reps)
}

/// The convolutions of torchvision's ResNet-152 at batch `n`, 224x224
/// input, as (name, shape, how many times the shape occurs). Shapes only:
/// bias and residual pointers are 1 where that layer has them after batch
/// norm folding (every conv gets a bias; each block's last conv adds the
/// residual), relu as in the network.
pub fn resnet152_convs(n: usize) -> Vec<(String, Conv2dArgs, usize)> {
    let mut out = Vec::new();
    let mut stem = Conv2dArgs::shape(n, 3, 224, 224, 64, 7, 7, 2, 3);
    stem.bias = 1;
    stem.relu = true;
    out.push(("stem 7x7 3->64 s2".to_string(), stem, 1));
    let stages = [(64usize, 3usize, 56usize), (128, 8, 28), (256, 36, 14), (512, 3, 7)];
    let mut in_ch = 64;
    let mut in_hw = 56;
    for (si, &(width, blocks, hw)) in stages.iter().enumerate() {
        let out_ch = width * 4;
        let stride = if si == 0 { 1 } else { 2 };
        let mk = |c: usize, h: usize, k: usize, r: usize, st: usize, pad: usize, res: bool, relu: bool| {
            let mut a = Conv2dArgs::shape(n, c, h, h, k, r, r, st, pad);
            a.bias = 1;
            a.residual = u64::from(res);
            a.relu = relu;
            a
        };
        let l = si + 1;
        // First block: conv1 at the input size, strided 3x3, downsample.
        out.push((format!("layer{l}.0 1x1 {in_ch}->{width}"), mk(in_ch, in_hw, width, 1, 1, 0, false, true), 1));
        out.push((format!("layer{l}.0 3x3 {width} s{stride}"), mk(width, in_hw, width, 3, stride, 1, false, true), 1));
        out.push((format!("layer{l}.0 1x1 {width}->{out_ch} +res"), mk(width, hw, out_ch, 1, 1, 0, true, true), 1));
        out.push((format!("layer{l}.0 downsample 1x1 {in_ch}->{out_ch} s{stride}"), mk(in_ch, in_hw, out_ch, 1, stride, 0, false, false), 1));
        if blocks > 1 {
            out.push((format!("layer{l}.x 1x1 {out_ch}->{width}"), mk(out_ch, hw, width, 1, 1, 0, false, true), blocks - 1));
            out.push((format!("layer{l}.x 3x3 {width}"), mk(width, hw, width, 3, 1, 1, false, true), blocks - 1));
            out.push((format!("layer{l}.x 1x1 {width}->{out_ch} +res"), mk(width, hw, out_ch, 1, 1, 0, true, true), blocks - 1));
        }
        in_ch = out_ch;
        in_hw = hw;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn max_rel(a: &[f32], b: &[f32]) -> f64 {
        let num: f64 = a.iter().zip(b).map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2)).sum();
        let den: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
        (num / den.max(1e-300)).sqrt()
    }

    #[test]
    fn magic_division_is_exact() {
        let mut divisors: Vec<u32> = (1..=300).collect();
        divisors.extend([511, 512, 513, 4608, 9 * 2048, 65535, 65536, 65537, 1 << 20, (1 << 20) + 1, 0x7fff_ffff, 1 << 30, (1 << 30) + 7, 0x4000_0001]);
        let mut numerators: Vec<u32> = (0..2000).collect();
        numerators.extend([0x7fff_ffff, 0x7fff_fffe, 1 << 30, (1 << 30) - 1, 123_456_789, 2_000_000_000]);
        let mut s = 0x1234_5678_9abc_def0u64;
        for _ in 0..2000 {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            numerators.push((s >> 33) as u32); // < 2^31
        }
        for &d in &divisors {
            let (mul, shr) = magic_div(d);
            for &n in &numerators {
                assert_eq!(magic_div_apply(n, mul, shr), n / d, "{n} / {d}");
            }
            // Around multiples of d.
            for q in [1u32, 2, 3, 1000, 0x7fff_ffff / d] {
                for delta in [-1i64, 0, 1] {
                    let n = i64::from(q) * i64::from(d) + delta;
                    if (0..=0x7fff_ffff).contains(&n) {
                        let n = n as u32;
                        assert_eq!(magic_div_apply(n, mul, shr), n / d, "{n} / {d}");
                    }
                }
            }
        }
    }

    #[test]
    fn out_dims_match_pytorch_formula() {
        let a = Conv2dArgs::shape(1, 3, 224, 224, 64, 7, 7, 2, 3);
        assert_eq!(a.out_dims(), (112, 112));
        let a = Conv2dArgs::shape(1, 3, 37, 29, 64, 7, 7, 2, 3);
        assert_eq!(a.out_dims(), (19, 15));
        let a = Conv2dArgs::shape(1, 64, 56, 56, 64, 3, 3, 2, 1);
        assert_eq!(a.out_dims(), (28, 28));
        let a = Conv2dArgs::shape(1, 64, 5, 5, 64, 7, 7, 1, 0);
        assert_eq!(a.out_dims(), (0, 0));
        assert!(validate_shape(&a).is_err());
        let p = Pool2dArgs::square(1, 1, 112, 112, 3, 2, 1);
        assert_eq!(p.out_dims(), (56, 56));
    }

    #[test]
    fn conv_ref_hand_computed() {
        // x: 1x1x3x3 = 1..9, w: 1x1x2x2 = [1, 0; 0, -1], stride 1, no pad:
        // y[p][q] = x[p][q] - x[p+1][q+1] = -4 everywhere.
        let a = Conv2dArgs::shape(1, 1, 3, 3, 1, 2, 2, 1, 0);
        let x: Vec<f32> = (1..=9).map(|v| v as f32).collect();
        let w = [1.0, 0.0, 0.0, -1.0];
        let y = conv2d_ref(&a, &x, &w, None, None).unwrap();
        assert_eq!(y, vec![-4.0; 4]);
        // Pad 1, stride 2, 3x3 ones filter, bias 0.5, two output channels
        // (second = -ones): output 2x2 of window sums.
        let mut a = Conv2dArgs::shape(1, 1, 3, 3, 2, 3, 3, 2, 1);
        let mut w = vec![1.0f32; 9];
        w.extend([-1.0f32; 9]);
        let y = conv2d_ref(&a, &x, &w, Some(&[0.5, 0.5]), None).unwrap();
        // windows: top-left {1,2,4,5}=12, top-right {2,3,5,6}=16,
        // bottom-left {4,5,7,8}=24, bottom-right {5,6,8,9}=28
        assert_eq!(y, vec![12.5, 16.5, 24.5, 28.5, -11.5, -15.5, -23.5, -27.5]);
        // + residual, then relu.
        a.relu = true;
        let res = [1.0f32, -20.0, 0.0, 0.0, 20.0, 0.0, 0.0, 30.0];
        let y = conv2d_ref(&a, &x, &w, Some(&[0.5, 0.5]), Some(&res)).unwrap();
        assert_eq!(y, vec![13.5, 0.0, 24.5, 28.5, 8.5, 0.0, 0.0, 2.5]);
        // Two input channels, 1x1: a weighted channel sum.
        let a = Conv2dArgs::shape(1, 2, 1, 2, 1, 1, 1, 1, 0);
        let y = conv2d_ref(&a, &[1.0, 2.0, 10.0, 20.0], &[3.0, -1.0], None, None).unwrap();
        assert_eq!(y, vec![-7.0, -14.0]);
        // Wrong lengths are errors.
        assert!(conv2d_ref(&a, &[1.0], &[3.0, -1.0], None, None).is_err());
    }

    #[test]
    fn fold_batch_norm_matches_conv_then_bn() {
        let a = Conv2dArgs::shape(2, 3, 6, 5, 4, 3, 3, 1, 1);
        let x = random_f32(a.x_len(), 11);
        let w = random_f32(a.weight_len(), 12);
        let bias = random_f32(4, 13);
        let gamma: Vec<f32> = random_f32(4, 14).iter().map(|v| v + 1.5).collect();
        let beta = random_f32(4, 15);
        let mean = random_f32(4, 16);
        let var: Vec<f32> = random_f32(4, 17).iter().map(|v| v * v + 0.1).collect();
        let eps = 1e-5f32;
        for with_bias in [false, true] {
            let b = with_bias.then_some(bias.as_slice());
            let conv = conv2d_ref(&a, &x, &w, b, None).unwrap();
            let (p, q) = a.out_dims();
            let mut expect = conv.clone();
            for (i, v) in expect.iter_mut().enumerate() {
                let k = (i / (p * q)) % 4;
                let den = (f64::from(var[k]) + f64::from(eps)).sqrt();
                *v = (f64::from(gamma[k]) * (f64::from(*v) - f64::from(mean[k])) / den + f64::from(beta[k])) as f32;
            }
            let (fw, fb) = fold_batch_norm(&w, b, &gamma, &beta, &mean, &var, eps, 4);
            assert_eq!(fw.len(), w.len());
            let folded = conv2d_ref(&a, &x, &fw, Some(&fb), None).unwrap();
            let err = max_rel(&folded, &expect);
            assert!(err < 1e-6, "rel err {err}");
        }
        // Mismatched lengths: empty, or an error.
        let (fw, fb) = fold_batch_norm(&w, None, &gamma[..3], &beta, &mean, &var, eps, 4);
        assert!(fw.is_empty() && fb.is_empty());
        assert!(try_fold_batch_norm(&w, None, &gamma, &beta, &mean, &var, eps, 5).is_err());
        assert!(try_fold_batch_norm(&w, None, &gamma, &beta, &mean, &[-1.0; 4], 0.0, 4).is_err());
    }

    #[test]
    fn pool_refs_hand_computed() {
        // 1x1x3x3 = 1..9 (with a negative), 2x2 window, stride 1.
        let x = [1.0, -2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, -9.0];
        let a = Pool2dArgs::square(1, 1, 3, 3, 2, 1, 0);
        assert_eq!(max_pool2d_ref(&a, &x).unwrap(), vec![5.0, 6.0, 8.0, 8.0]);
        assert_eq!(avg_pool2d_ref(&a, &x).unwrap(), vec![2.0, 3.0, 6.0, 2.5]);
        // 3x3 window, stride 2, pad 1: padding is -inf for max, counted as
        // zeros in the divisor (9) for avg.
        let a = Pool2dArgs::square(1, 1, 3, 3, 3, 2, 1);
        assert_eq!(max_pool2d_ref(&a, &x).unwrap(), vec![5.0, 6.0, 8.0, 8.0]);
        let avg = avg_pool2d_ref(&a, &x).unwrap();
        let expect = [8.0 / 9.0, 12.0 / 9.0, 24.0 / 9.0, 10.0 / 9.0];
        for (g, e) in avg.iter().zip(expect) {
            assert!((g - e).abs() < 1e-6, "{g} vs {e}");
        }
        // All-negative input with padding: padding never wins a max.
        let a = Pool2dArgs::square(1, 1, 2, 2, 3, 1, 1);
        assert_eq!(max_pool2d_ref(&a, &[-4.0, -3.0, -2.0, -1.0]).unwrap(), vec![-1.0; 4]);
        // NaN propagates through max.
        let a = Pool2dArgs::square(1, 1, 2, 2, 2, 1, 0);
        assert!(max_pool2d_ref(&a, &[1.0, f32::NAN, 2.0, 3.0]).unwrap()[0].is_nan());
        // Global average.
        assert_eq!(global_avg_pool_ref(&[1.0, 2.0, 3.0, 6.0, -1.0, 1.0, 0.0, 4.0], 1, 2, 2, 2).unwrap(), vec![3.0, 1.0]);
        // Invalid shapes.
        assert!(validate_pool(&Pool2dArgs::square(1, 1, 3, 3, 2, 1, 2)).is_err());
        assert!(validate_pool(&Pool2dArgs::square(1, 1, 3, 3, 0, 1, 0)).is_err());
        assert!(validate_pool(&Pool2dArgs::square(1, 1, 2, 2, 5, 1, 1)).is_err());
    }

    #[test]
    fn validate_rejects_bad_launches() {
        let mut a = Conv2dArgs::shape(2, 3, 8, 8, 4, 3, 3, 1, 1);
        a.x = 0x1000;
        a.weight = 0x10_0000;
        a.y = 0x20_0000;
        assert!(validate(&a).is_ok());
        for f in [
            |a: &mut Conv2dArgs| a.n = 0,
            |a: &mut Conv2dArgs| a.k = 0,
            |a: &mut Conv2dArgs| a.stride_w = 0,
            |a: &mut Conv2dArgs| a.x = 0,
            |a: &mut Conv2dArgs| a.y = 0x20_0002,
            |a: &mut Conv2dArgs| a.bias = 0x30_0001,
            |a: &mut Conv2dArgs| a.y = 0x1004,                // overlaps x
            |a: &mut Conv2dArgs| a.residual = 0x20_0004,      // partly overlaps y
            |a: &mut Conv2dArgs| a.r = 11,                    // does not fit 8 + 2
            |a: &mut Conv2dArgs| a.pad_h = 1 << 28,
            |a: &mut Conv2dArgs| { a.c = 1 << 16; a.h = 1 << 8; a.w = 1 << 8; a.pad_h = 0; a.pad_w = 0 }, // 2^33 inputs
        ] {
            let mut b = a;
            f(&mut b);
            assert!(validate(&b).is_err(), "{b:?}");
        }
        let mut b = a;
        b.residual = b.y; // in place is allowed
        assert!(validate(&b).is_ok());
    }

    #[test]
    fn tile_choice_is_sane() {
        // A large layer takes the big tile, one with 64 channels the narrow
        // one, and one whose big-tile grid is far below the SM count the
        // sliced small tile (as measured best on an H200).
        assert_eq!(choose_tile(8 * 56 * 56, 256, 64, 132), ConvTile::T128x128);
        assert_eq!(choose_tile(8 * 112 * 112, 64, 147, 132), ConvTile::T128x64);
        assert_eq!(choose_tile(8 * 7 * 7, 512, 4608, 132), ConvTile::T64x64K4);
        assert_eq!(choose_tile(8 * 14 * 14, 256, 2304, 132), ConvTile::T64x64K4);
        for t in ConvTile::ALL {
            assert!(PTX.contains(&format!(".entry {}(", t.entry())));
            if t.dynamic_smem() > 0 {
                // The kernel's comment states the ring size it was generated with.
                assert!(PTX.contains(&format!("dynamic shared memory ({} bytes", t.dynamic_smem())), "{t:?}");
            }
        }
    }

    #[test]
    fn resnet152_shapes_add_up() {
        let convs = resnet152_convs(1);
        let layers: usize = convs.iter().map(|c| c.2).sum();
        assert_eq!(layers, 1 + 3 * 50 + 4); // stem, 3 per bottleneck, 4 downsamples
        let gflop: f64 = convs.iter().map(|(_, a, n)| a.flops() * *n as f64).sum::<f64>() / 1e9;
        // torchvision quotes 11.51 GMAC per image for the whole network; the
        // convolutions are nearly all of it.
        assert!((gflop / 2.0 - 11.5).abs() < 0.2, "{gflop} GFLOP");
        for (name, a, _) in &convs {
            assert!(validate_shape(a).is_ok(), "{name}");
        }
    }
}
