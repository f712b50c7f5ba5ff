//! GEMM kernels (kernels/gemm.ptx): launchers, argument validation, CPU
//! references, half-precision bit conversions and a benchmark helper.
//!
//! Every launch computes, for each batch `z < batch` (row-major throughout):
//!
//! ```text
//! C[m, n] = act(alpha * sum_k A[m, k] * op(B)[k, n] + bias[n]) + residual[m, n]
//! ```
//!
//! with `A` = `a + z*stride_a` (`[M, K]`, leading dimension `lda`), `op(B)` =
//! `B` stored `[K, N]` (`trans_b = false`, GPT-2 Conv1D layout) or the
//! transpose of `B` stored `[N, K]` (`trans_b = true`, nn.Linear layout), at
//! `b + z*stride_b` with leading dimension `ldb`; `C` at `c + z*stride_c`
//! with leading dimension `ldc`; `residual` laid out like `C` (same `ldc` and
//! `stride_c`, and it may be `C` itself); `bias` shared by all batches.
//! Strides and leading dimensions count elements, so a caller can write into
//! a column slice of a wider buffer (Q, K and V into one `[M, 3H]` buffer) or
//! run one attention head per batch entry.
//!
//! Element types ([`GemmDtype`]): exact fp32 (FFMA, no TF32), or fp16 / bf16
//! on the tensor cores (fp32 accumulation and epilogue; A, B, C, bias and
//! residual all in the half type): `mma.sync.m16n8k16` kernels on every GPU,
//! and on GPUs of compute capability 9.0 (H100, H200) also Hopper `wgmma`
//! kernels (sm_90a module; B stored `[N, K]` only), which [`gemm`] takes
//! where its cost model expects them to be faster ([`choose_kernel`]).
//!
//! Speed (H100 SXM, 2026-11-27, M = 1024, B stored `[N, K]`, with bias; GPU
//! time of back-to-back launches on rotating random inputs, `pipeswitch bench
//! gemm`; TFLOP/s, ours / cuBLAS through PyTorch 2.11):
//!
//! | N x K | fp32 (no TF32) | fp16 | bf16 | half-type kernel |
//! | --- | --- | --- | --- | --- |
//! | 768 x 768 | 25 / 26 | 117 / 173 | 117 / 175 | mma.sync 64x32 |
//! | 2304 x 768 | 26 / 33 | 252 / 347 | 253 / 366 | wgmma 128x192 |
//! | 3072 x 768 | 35 / 37 | 324 / 418 | 323 / 421 | wgmma 128x192 |
//! | 768 x 3072 | 27 / 28 | 213 / 359 | 211 / 361 | mma.sync 64x32 |
//! | 3072 x 1024 | 34 / 37 | 379 / 482 | 381 / 485 | wgmma 128x192 |
//! | 1024 x 1024 | 33 / 34 | 183 / 270 | 181 / 285 | wgmma 64x128 |
//! | 4096 x 1024 | 39 / 48 | 445 / 512 | 450 / 537 | wgmma 128x256 |
//! | 1024 x 4096 | 35 / 36 | 284 / 498 | 287 / 527 | mma.sync 64x64 |
//!
//! (With B stored `[K, N]`, and on other GPUs, the half types run the
//! mma.sync kernels: on the H100 at the shapes above 117, 142-160, 208, 211,
//! 233, 168-172, 310 and 280-285 TFLOP/s.)

use std::collections::{HashMap, HashSet};
use std::ffi::c_void;
use std::sync::{Mutex, OnceLock};

use cudarc::driver::sys::CUdevice_attribute;

use crate::cuda::{CUdeviceptr, CUstream, Device, DeviceAlloc, Event, LaunchConfig, Stream};
use crate::error::{Error, Result};

/// Module name of [`PTX`] in the kernel cache.
pub const MODULE: &str = "gemm";
/// The sm_90 module: every kernel of kernels/gemm.ptx except the wgmma ones,
/// loadable on any GPU of compute capability 9.0 or later. It is the byte
/// range of the file that the file's first line names (see the header of
/// kernels/gemm.ptx), sliced out at compile time.
pub const PTX: &str = sm90_module(PTX_SM90A);
/// Module name of [`PTX_SM90A`] in the kernel cache.
pub const MODULE_SM90A: &str = "gemm_sm90a";
/// The whole of kernels/gemm.ptx: the sm_90a module (`.target sm_90a`), with
/// the wgmma kernels; loaded only on GPUs of compute capability 9.0 exactly.
pub const PTX_SM90A: &str = include_str!("../../kernels/gemm.ptx");

/// The sm_90 module inside `file` (kernels/gemm.ptx): its first line is
/// `// gemm kernels; sm_90 module = bytes [S, E) of this file.` with S and E
/// ten-digit byte offsets; the range must start with the sm_90 header and end
/// at the "sm_90a only" marker. Any mismatch (the file edited by hand without
/// re-running kernels/gen/gemm.py) stops the build.
const fn sm90_module(file: &'static str) -> &'static str {
    const HEAD: &[u8] = b"// gemm kernels; sm_90 module = bytes [";
    const START: &[u8] = b".version 8.0\n.target sm_90\n";
    const END: &[u8] = b"// ==== sm_90a only";
    const fn starts_with(b: &[u8], at: usize, pat: &[u8]) -> bool {
        if at + pat.len() > b.len() {
            return false;
        }
        let mut i = 0;
        while i < pat.len() {
            if b[at + i] != pat[i] {
                return false;
            }
            i += 1;
        }
        true
    }
    const fn number(b: &[u8], at: usize) -> usize {
        let mut v = 0;
        let mut i = 0;
        while i < 10 {
            let d = b[at + i];
            if !d.is_ascii_digit() {
                panic!("kernels/gemm.ptx: malformed sm_90 byte range on the first line");
            }
            v = v * 10 + (d - b'0') as usize;
            i += 1;
        }
        v
    }
    let b = file.as_bytes();
    if !starts_with(b, 0, HEAD) || !starts_with(b, HEAD.len() + 10, b", ") || !starts_with(b, HEAD.len() + 22, b")") {
        panic!("kernels/gemm.ptx: the first line does not name the sm_90 byte range");
    }
    let start = number(b, HEAD.len());
    let end = number(b, HEAD.len() + 12);
    if !(start < end && end <= b.len() && starts_with(b, start, START) && starts_with(b, end, END)) {
        panic!("kernels/gemm.ptx: stale sm_90 byte range on the first line (re-run kernels/gen/gemm.py)");
    }
    let (_, rest) = b.split_at(start);
    let (module, _) = rest.split_at(end - start);
    // SAFETY: `module` is a sub-slice of a str whose two ends were checked to
    // be ASCII bytes ('.' and '/'), i.e. char boundaries, so it is valid UTF-8.
    unsafe { std::str::from_utf8_unchecked(module) }
}

/// Activation applied after bias (and before the residual add).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(u32)]
pub enum Activation {
    #[default]
    None = 0,
    Relu = 1,
    /// `0.5 x (1 + erf(x / sqrt 2))`.
    Gelu = 2,
    /// `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))` (GPT-2 "gelu_new").
    GeluTanh = 3,
}

/// Element type of A, B, C, bias and residual.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemmDtype {
    F32,
    F16,
    Bf16,
}

impl GemmDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            GemmDtype::F32 => 4,
            GemmDtype::F16 | GemmDtype::Bf16 => 2,
        }
    }
    fn name(self) -> &'static str {
        match self {
            GemmDtype::F32 => "f32",
            GemmDtype::F16 => "f16",
            GemmDtype::Bf16 => "bf16",
        }
    }
}

/// One (possibly strided-batched) GEMM; see the module documentation.
/// Device pointers of 0 mean "none" for `bias` and `residual`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GemmArgs {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: CUdeviceptr,
    pub lda: usize,
    pub b: CUdeviceptr,
    pub ldb: usize,
    pub trans_b: bool,
    pub c: CUdeviceptr,
    pub ldc: usize,
    /// `[N]`, or 0 for none.
    pub bias: CUdeviceptr,
    /// Laid out like C (`ldc`, `stride_c`), or 0 for none. May equal `c`.
    pub residual: CUdeviceptr,
    pub alpha: f32,
    pub act: Activation,
    /// Number of batch entries (1 for a plain GEMM).
    pub batch: usize,
    /// Element strides between batch entries (ignored when `batch == 1`;
    /// `stride_a` or `stride_b` may be 0 to share one operand).
    pub stride_a: usize,
    pub stride_b: usize,
    pub stride_c: usize,
}

impl GemmArgs {
    /// A dense GEMM: tight leading dimensions, alpha 1, no bias, residual or
    /// activation, one batch entry.
    pub fn dense(m: usize, n: usize, k: usize, a: CUdeviceptr, b: CUdeviceptr, trans_b: bool, c: CUdeviceptr) -> GemmArgs {
        GemmArgs {
            m,
            n,
            k,
            a,
            lda: k,
            b,
            ldb: if trans_b { k } else { n },
            trans_b,
            c,
            ldc: n,
            bias: 0,
            residual: 0,
            alpha: 1.0,
            act: Activation::None,
            batch: 1,
            stride_a: 0,
            stride_b: 0,
            stride_c: 0,
        }
    }

    fn b_rows(&self) -> usize {
        if self.trans_b {
            self.n
        } else {
            self.k
        }
    }
    fn b_cols(&self) -> usize {
        if self.trans_b {
            self.k
        } else {
            self.n
        }
    }
}

/// Block tile choice. [`gemm`] picks one; [`gemm_with_tile`] forces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemmTile {
    /// 128 x 128 block tiles: for problems with enough tiles to fill the GPU.
    Large,
    /// fp32: 128 x 64; half types: 64 x 64. K is split inside the block
    /// (2 or 4 groups of threads): more blocks and warps for small M x N.
    Medium,
    /// fp32: same kernel as Medium; half types: 64 x 32, K split in 4 groups.
    Small,
}

/// Geometry of one kernel: (entry, BM, BN, threads, dynamic shared bytes).
/// Must match kernels/gemm.ptx (see its header).
fn kernel(dtype: GemmDtype, trans_b: bool, tile: GemmTile) -> (&'static str, usize, usize, u32, u32) {
    use GemmDtype::*;
    use GemmTile::*;
    match (dtype, trans_b, tile) {
        (F32, false, Large) => ("gemm_f32_bkn_128x128", 128, 128, 256, 67584),
        (F32, true, Large) => ("gemm_f32_bnk_128x128", 128, 128, 256, 67584),
        (F32, false, Medium | Small) => ("gemm_f32_bkn_128x64", 128, 64, 256, 69632),
        (F32, true, Medium | Small) => ("gemm_f32_bnk_128x64", 128, 64, 256, 69632),
        (F16, false, Large) => ("gemm_f16_bkn_128x128", 128, 128, 128, 69632),
        (F16, true, Large) => ("gemm_f16_bnk_128x128", 128, 128, 128, 69632),
        (F16, false, Medium) => ("gemm_f16_bkn_64x64", 64, 64, 128, 73728),
        (F16, true, Medium) => ("gemm_f16_bnk_64x64", 64, 64, 128, 73728),
        (F16, false, Small) => ("gemm_f16_bkn_64x32", 64, 32, 128, 49152),
        (F16, true, Small) => ("gemm_f16_bnk_64x32", 64, 32, 128, 49152),
        (Bf16, false, Large) => ("gemm_bf16_bkn_128x128", 128, 128, 128, 69632),
        (Bf16, true, Large) => ("gemm_bf16_bnk_128x128", 128, 128, 128, 69632),
        (Bf16, false, Medium) => ("gemm_bf16_bkn_64x64", 64, 64, 128, 73728),
        (Bf16, true, Medium) => ("gemm_bf16_bnk_64x64", 64, 64, 128, 73728),
        (Bf16, false, Small) => ("gemm_bf16_bkn_64x32", 64, 32, 128, 49152),
        (Bf16, true, Small) => ("gemm_bf16_bnk_64x32", 64, 32, 128, 49152),
    }
}

/// Block tiles of the Hopper kernels (`wgmma`, sm_90a; half types, B stored
/// `[N, K]` only): `BM x BN`, BM/64 warpgroups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WgTile {
    /// 128 x 128, 256 threads.
    M128N128,
    /// 128 x 192, 256 threads.
    M128N192,
    /// 128 x 256, 256 threads.
    M128N256,
    /// 64 x 128, 128 threads (one warpgroup).
    M64N128,
}

impl WgTile {
    /// Every Hopper tile.
    pub const ALL: [WgTile; 4] = [WgTile::M128N128, WgTile::M128N192, WgTile::M128N256, WgTile::M64N128];
    /// (BM, BN).
    pub fn dims(self) -> (usize, usize) {
        match self {
            WgTile::M128N128 => (128, 128),
            WgTile::M128N192 => (128, 192),
            WgTile::M128N256 => (128, 256),
            WgTile::M64N128 => (64, 128),
        }
    }
}

/// One concrete kernel: an mma.sync / FFMA tile of the sm_90 module (any
/// GPU), or a wgmma tile of the sm_90a module (compute capability 9.0 only;
/// half types with `trans_b`). [`gemm`] picks one ([`choose_kernel`]);
/// [`gemm_with_kernel`] forces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemmKernel {
    Sync(GemmTile),
    Wgmma(WgTile),
}

/// Geometry of a wgmma kernel: (entry, BM, BN, threads, dynamic shared
/// bytes). Must match kernels/gemm.ptx (see its header); None for fp32.
fn wg_kernel(dtype: GemmDtype, tile: WgTile) -> Option<(&'static str, usize, usize, u32, u32)> {
    use GemmDtype::*;
    use WgTile::*;
    Some(match (dtype, tile) {
        (F32, _) => return None,
        (F16, M128N128) => ("gemm_f16_bnk_wg128x128", 128, 128, 256, 132096),
        (F16, M128N192) => ("gemm_f16_bnk_wg128x192", 128, 192, 256, 164864),
        (F16, M128N256) => ("gemm_f16_bnk_wg128x256", 128, 256, 256, 197632),
        (F16, M64N128) => ("gemm_f16_bnk_wg64x128", 64, 128, 128, 99328),
        (Bf16, M128N128) => ("gemm_bf16_bnk_wg128x128", 128, 128, 256, 132096),
        (Bf16, M128N192) => ("gemm_bf16_bnk_wg128x192", 128, 192, 256, 164864),
        (Bf16, M128N256) => ("gemm_bf16_bnk_wg128x256", 128, 256, 256, 197632),
        (Bf16, M64N128) => ("gemm_bf16_bnk_wg64x128", 64, 128, 128, 99328),
    })
}

/// Elements spanned by a (batched) row-major matrix, or None on overflow.
fn extent(batch: usize, stride: usize, rows: usize, ld: usize, cols: usize) -> Option<usize> {
    let per = (rows - 1).checked_mul(ld)?.checked_add(cols)?;
    if batch <= 1 {
        return Some(per);
    }
    (batch - 1).checked_mul(stride)?.checked_add(per)
}

/// Byte range `[ptr, ptr + elems * size)`, or an error on overflow.
fn byte_range(what: &str, ptr: CUdeviceptr, elems: usize, size: usize) -> Result<(u64, u64)> {
    let bytes = elems
        .checked_mul(size)
        .and_then(|b| u64::try_from(b).ok())
        .ok_or_else(|| Error::invalid(format!("gemm: {what} spans more bytes than fit in 64 bits")))?;
    let end = ptr
        .checked_add(bytes)
        .ok_or_else(|| Error::invalid(format!("gemm: {what} extends past the end of the address space")))?;
    Ok((ptr, end))
}

fn overlaps(x: (u64, u64), y: (u64, u64)) -> bool {
    x.0 < y.1 && y.0 < x.1
}

/// Checks everything [`gemm`] needs before it launches anything: sizes,
/// leading dimensions, strides, alignment, overflow and aliasing. Pure: runs
/// without a GPU.
///
/// Rules: m, n, k, batch >= 1; m, n, k and the leading dimensions below 2^31;
/// `lda >= k`, `ldb >= (trans_b ? k : n)`, `ldc >= n`; a, b, c non-null; for
/// `batch > 1` the outputs of different batch entries must not overlap
/// (`stride_c >= (m-1)*ldc + n`, or the entries side by side in columns:
/// `stride_c >= n` and `(batch-1)*stride_c + n <= ldc`); C must not overlap A,
/// B or bias; residual is either exactly C or disjoint from it. Alignment:
/// fp32 pointers 4 bytes; half types: A and B 16 bytes with lda, ldb (and for
/// batch > 1 stride_a, stride_b) multiples of 8 elements, C, bias and
/// residual 2 bytes.
pub fn validate(args: &GemmArgs, dtype: GemmDtype) -> Result<()> {
    validate_as(args, dtype, false)
}

/// [`validate`] for [`gemm_c32`]: A and B in the half type `dtype`, C, bias
/// and residual fp32 (4-byte aligned); B stored `[N, K]` only.
pub fn validate_c32(args: &GemmArgs, dtype: GemmDtype) -> Result<()> {
    if dtype == GemmDtype::F32 || !args.trans_b {
        return Err(Error::invalid(format!("gemm: the fp32-output kernels take half-type A and B with B stored [N, K] (dtype {}, trans_b {})", dtype.name(), args.trans_b)));
    }
    validate_as(args, dtype, true)
}

fn validate_as(args: &GemmArgs, dtype: GemmDtype, c32: bool) -> Result<()> {
    let e = |msg: String| Err(Error::invalid(format!("gemm: {msg}")));
    let a = args;
    if a.m == 0 || a.n == 0 || a.k == 0 || a.batch == 0 {
        return e(format!("empty problem (m {}, n {}, k {}, batch {})", a.m, a.n, a.k, a.batch));
    }
    const LIM: usize = i32::MAX as usize;
    for (name, v) in [("m", a.m), ("n", a.n), ("k", a.k), ("lda", a.lda), ("ldb", a.ldb), ("ldc", a.ldc)] {
        if v > LIM {
            return e(format!("{name} = {v} exceeds 2^31 - 1"));
        }
    }
    if a.batch > 65535 {
        return e(format!("batch {} exceeds 65535", a.batch));
    }
    if a.m.div_ceil(64) > 65535 {
        return e(format!("m = {} needs more than 65535 row blocks", a.m));
    }
    if a.a == 0 || a.b == 0 || a.c == 0 {
        return Err(Error::NullArgument(if a.a == 0 {
            "gemm A"
        } else if a.b == 0 {
            "gemm B"
        } else {
            "gemm C"
        }));
    }
    if a.lda < a.k {
        return e(format!("lda {} < k {}", a.lda, a.k));
    }
    if a.ldb < a.b_cols() {
        return e(format!("ldb {} < {} (trans_b = {})", a.ldb, a.b_cols(), a.trans_b));
    }
    if a.ldc < a.n {
        return e(format!("ldc {} < n {}", a.ldc, a.n));
    }
    if !a.alpha.is_finite() {
        return e(format!("alpha {} is not finite", a.alpha));
    }
    let (sa, sb, sc) = if a.batch > 1 { (a.stride_a, a.stride_b, a.stride_c) } else { (0, 0, 0) };
    if a.batch > 1 {
        let c_elems = (a.m - 1).checked_mul(a.ldc).and_then(|x| x.checked_add(a.n));
        let stacked = c_elems.is_some_and(|ce| sc >= ce);
        let side_by_side = sc >= a.n && (a.batch - 1).checked_mul(sc).and_then(|x| x.checked_add(a.n)).is_some_and(|x| x <= a.ldc);
        if !stacked && !side_by_side {
            return e(format!(
                "batch entries of C overlap (stride_c {}, m {}, n {}, ldc {}, batch {})",
                sc, a.m, a.n, a.ldc, a.batch
            ));
        }
    }
    let size = dtype.size();
    // Bytes per element of C, bias and residual.
    let csize = if c32 { 4 } else { size };
    let ovf = || Error::invalid("gemm: matrix extent overflows usize");
    let ra = byte_range("A", a.a, extent(a.batch, sa, a.m, a.lda, a.k).ok_or_else(ovf)?, size)?;
    let rb = byte_range("B", a.b, extent(a.batch, sb, a.b_rows(), a.ldb, a.b_cols()).ok_or_else(ovf)?, size)?;
    let rc = byte_range("C", a.c, extent(a.batch, sc, a.m, a.ldc, a.n).ok_or_else(ovf)?, csize)?;
    if overlaps(rc, ra) || overlaps(rc, rb) {
        return e("C overlaps A or B".into());
    }
    if a.bias != 0 {
        let rbias = byte_range("bias", a.bias, a.n, csize)?;
        if overlaps(rc, rbias) {
            return e("C overlaps bias".into());
        }
    }
    if a.residual != 0 && a.residual != a.c {
        let rr = byte_range("residual", a.residual, extent(a.batch, sc, a.m, a.ldc, a.n).ok_or_else(ovf)?, csize)?;
        if overlaps(rc, rr) {
            return e("residual partly overlaps C (it must be C itself or disjoint)".into());
        }
    }
    // Every kernel index fits in u32, and element offsets in u64 (checked above).
    for (name, p, align) in [("A", a.a, size), ("B", a.b, size), ("C", a.c, csize), ("bias", a.bias, csize), ("residual", a.residual, csize)] {
        let align = align as u64;
        if p % align != 0 {
            return e(format!("{name} pointer {p:#x} is not {align}-byte aligned"));
        }
    }
    if dtype != GemmDtype::F32 {
        if a.a % 16 != 0 || a.b % 16 != 0 {
            return e("half-type A and B must be 16-byte aligned".into());
        }
        if a.lda % 8 != 0 || a.ldb % 8 != 0 {
            return e(format!("half-type lda ({}) and ldb ({}) must be multiples of 8", a.lda, a.ldb));
        }
        if sa % 8 != 0 || sb % 8 != 0 {
            return e(format!("half-type stride_a ({sa}) and stride_b ({sb}) must be multiples of 8"));
        }
    }
    Ok(())
}

/// The kernel's `flags`: bit 0 A, bit 1 B, bit 2 C/bias/residual may use
/// 16-byte vector accesses.
fn flags(args: &GemmArgs, dtype: GemmDtype, c32: bool) -> u32 {
    let batched = args.batch > 1;
    let okp = |per: u64, p: u64, ld: usize, stride: usize| p % 16 == 0 && (ld as u64) % per == 0 && (!batched || (stride as u64) % per == 0);
    let ok = |p: u64, ld: usize, stride: usize| okp((16 / dtype.size()) as u64, p, ld, stride);
    let mut f = 0;
    if ok(args.a, args.lda, args.stride_a) {
        f |= 1;
    }
    if ok(args.b, args.ldb, args.stride_b) {
        f |= 2;
    }
    let c_per = if c32 { 4 } else { (16 / dtype.size()) as u64 };
    if okp(c_per, args.c, args.ldc, args.stride_c) && args.bias % 16 == 0 && args.residual % 16 == 0 {
        f |= 4;
    }
    f
}

/// The tile [`gemm`] uses on a GPU with `sms` multiprocessors.
pub fn choose_tile(dtype: GemmDtype, args: &GemmArgs, sms: usize) -> GemmTile {
    let blocks = |bm: usize, bn: usize| args.m.div_ceil(bm) * args.n.div_ceil(bn) * args.batch;
    // Measured on H100 and H200 at BERT / GPT-2 linear shapes (M = 1024):
    // 128x128 tiles win from about 1.9 (fp32) or 1.4 (half) blocks per
    // multiprocessor up; below that the half types take 64x64 tiles from
    // about 1.75 blocks per multiprocessor, else 64x32.
    match dtype {
        GemmDtype::F32 if blocks(128, 128) * 10 >= sms * 19 => GemmTile::Large,
        GemmDtype::F32 => GemmTile::Medium,
        _ if blocks(128, 128) * 10 >= sms * 14 => GemmTile::Large,
        _ if blocks(64, 64) * 100 >= sms * 175 => GemmTile::Medium,
        _ => GemmTile::Small,
    }
}

/// Cost-model constants of one kernel: block tile, blocks a multiprocessor
/// holds at once, and the time of one block alone on a multiprocessor,
/// `k * us_per_k + fixed_us` (the fixed part: launch, pipeline fill,
/// epilogue); `share`: how much each further co-resident block adds to the
/// time of a round (0: perfect overlap, 1: none).
struct Cost {
    bm: usize,
    bn: usize,
    per_sm: usize,
    us_per_k: f64,
    fixed_us: f64,
    share: f64,
}

fn cost_of(kernel: GemmKernel) -> Cost {
    let c = |bm, bn, per_sm, us_per_k, fixed_us, share| Cost { bm, bn, per_sm, us_per_k, fixed_us, share };
    // Least-squares fits to every kernel's median time at the eight
    // benchmark shapes (M = 1024, bench/gemm_shapes.json) on an H100 SXM
    // (132 multiprocessors), f16 and bf16 alike; each fit is within 4 %
    // (Large, Medium), 6 % (wg128x256), 10 % (wg128x128, wg64x128) or 21 %
    // (Small, wg128x192: these also depend on how many blocks share the L2)
    // of the measured times. Half-type numbers; fp32 never compares kernels.
    match kernel {
        GemmKernel::Sync(GemmTile::Large) => c(128, 128, 2, 0.01338, 7.06, 0.28),
        GemmKernel::Sync(GemmTile::Medium) => c(64, 64, 3, 0.00419, 4.90, 0.33),
        GemmKernel::Sync(GemmTile::Small) => c(64, 32, 4, 0.00490, 2.23, 0.19),
        GemmKernel::Wgmma(WgTile::M128N128) => c(128, 128, 1, 0.00668, 4.51, 0.0),
        GemmKernel::Wgmma(WgTile::M128N192) => c(128, 192, 1, 0.00983, 5.85, 0.0),
        GemmKernel::Wgmma(WgTile::M128N256) => c(128, 256, 1, 0.00937, 8.20, 0.0),
        GemmKernel::Wgmma(WgTile::M64N128) => c(64, 128, 2, 0.00642, 3.95, 0.18),
    }
}

/// Estimated time in microseconds of `kernel` for `args` on `sms`
/// multiprocessors (an H100-calibrated model, used only to rank kernels):
/// the busiest multiprocessor gets q = ceil(blocks / sms) blocks and runs
/// them in rounds of up to `per_sm` co-resident blocks; a round of j blocks
/// takes a lone block's time times 1 + (j - 1) * share.
fn estimate(kernel: GemmKernel, args: &GemmArgs, sms: usize) -> f64 {
    let c = cost_of(kernel);
    let blocks = args.m.div_ceil(c.bm) * args.n.div_ceil(c.bn) * args.batch;
    let q = blocks.div_ceil(sms.max(1));
    let round = |j: usize| 1.0 + (j as f64 - 1.0) * c.share;
    let rounds = (q / c.per_sm) as f64 * round(c.per_sm) + if q % c.per_sm > 0 { round(q % c.per_sm) } else { 0.0 };
    rounds * (args.k as f64 * c.us_per_k + c.fixed_us)
}

/// The kernel [`gemm`] uses on a GPU with `sms` multiprocessors; `wgmma`:
/// whether the GPU runs the sm_90a kernels (compute capability 9.0). Without
/// them, or for fp32 or B stored `[K, N]`, the [`choose_tile`] tile;
/// otherwise the wgmma tile with the lowest estimated time (a model of wave
/// quantization x per-block speed, fitted to H100 timings) where that is at
/// least 5 % under the estimate of the [`choose_tile`] tile (which stays
/// where the two are close: its thresholds were tuned on measurements).
///
/// Measured on an H100 (f16 / bf16, TFLOP/s, M = 1024, B stored [N, K],
/// with bias; the chosen kernel marked): N x K = 768 x 768: *Small 121,
/// wg64x128 122; 2304 x 768: Large 160, *wg128x192 256-263; 3072 x 768:
/// Large 215, *wg128x192 334-337; 768 x 3072: *Small 218-222, wg64x128 204;
/// 3072 x 1024: Large 244, *wg128x192 395-398; 1024 x 1024: Medium 176,
/// *wg64x128 185-186; 4096 x 1024: Large 325, *wg128x256 456-459; 1024 x
/// 4096: *Medium 289-291, wg64x128 285.
pub fn choose_kernel(dtype: GemmDtype, args: &GemmArgs, sms: usize, wgmma: bool) -> GemmKernel {
    let sync = GemmKernel::Sync(choose_tile(dtype, args, sms));
    if !wgmma || dtype == GemmDtype::F32 || !args.trans_b {
        return sync;
    }
    let mut best = (f64::INFINITY, sync);
    for t in WgTile::ALL {
        let k = GemmKernel::Wgmma(t);
        let e = estimate(k, args, sms);
        if e < best.0 {
            best = (e, k);
        }
    }
    if best.0 < 0.95 * estimate(sync, args, sms) {
        best.1
    } else {
        sync
    }
}

/// Whether `device` runs the sm_90a (wgmma) kernels: compute capability 9.0
/// exactly (sm_90a code runs on no other). Cached per device.
pub fn wgmma_device(device: &'static Device) -> Result<bool> {
    static CACHE: OnceLock<Mutex<HashMap<i32, bool>>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(&w) = cache.lock().unwrap_or_else(|p| p.into_inner()).get(&device.ordinal()) {
        return Ok(w);
    }
    let w = device.compute_capability()? == (9, 0);
    cache.lock().unwrap_or_else(|p| p.into_inner()).insert(device.ordinal(), w);
    Ok(w)
}

fn sm_count(device: &'static Device) -> Result<usize> {
    static CACHE: OnceLock<Mutex<HashMap<i32, usize>>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(&n) = cache.lock().unwrap_or_else(|p| p.into_inner()).get(&device.ordinal()) {
        return Ok(n);
    }
    let n = device.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
    let n = usize::try_from(n).unwrap_or(1).max(1);
    cache.lock().unwrap_or_else(|p| p.into_inner()).insert(device.ordinal(), n);
    Ok(n)
}

/// JIT-compiles the sm_90a module ([`PTX_SM90A`]) on `device` now if the
/// device runs it (compute capability 9.0), so that no GEMM waits for it
/// later; [`crate::kernels::preload`] loads the sm_90 module only.
pub fn preload_sm90a(device: &'static Device) -> Result<()> {
    if wgmma_device(device)? {
        crate::kernels::module(device, MODULE_SM90A, PTX_SM90A)?;
    }
    Ok(())
}

/// Enqueues one GEMM on `stream` (see the module documentation), choosing
/// the kernel from the problem size and the GPU ([`choose_kernel`]). Returns
/// `InvalidArgument` (before any driver call) for anything [`validate`]
/// rejects.
pub fn gemm(device: &'static Device, stream: CUstream, dtype: GemmDtype, args: &GemmArgs) -> Result<()> {
    validate(args, dtype)?;
    let kernel = choose_kernel(dtype, args, sm_count(device)?, wgmma_device(device)?);
    launch(device, stream, dtype, args, kernel, false)
}

/// [`gemm`] with C, bias and residual in fp32 while A and B are in the half
/// type `dtype` (B stored `[N, K]`): the `_c32` kernels, chosen as [`gemm`]
/// chooses (the same tiles). For half-precision weights times activations
/// rounded to their type, with an fp32 output and residual (the Llama
/// prefill). `InvalidArgument` for anything [`validate_c32`] rejects.
pub fn gemm_c32(device: &'static Device, stream: CUstream, dtype: GemmDtype, args: &GemmArgs) -> Result<()> {
    validate_c32(args, dtype)?;
    let kernel = choose_kernel(dtype, args, sm_count(device)?, wgmma_device(device)?);
    launch(device, stream, dtype, args, kernel, true)
}

/// [`gemm_c32`] with the kernel forced (tests and benchmarks); a wgmma
/// kernel needs a GPU of compute capability 9.0.
pub fn gemm_c32_with_kernel(device: &'static Device, stream: CUstream, dtype: GemmDtype, args: &GemmArgs, kernel: GemmKernel) -> Result<()> {
    validate_c32(args, dtype)?;
    if matches!(kernel, GemmKernel::Wgmma(_)) && !wgmma_device(device)? {
        return Err(Error::invalid("gemm: the wgmma kernels need a GPU of compute capability 9.0"));
    }
    launch(device, stream, dtype, args, kernel, true)
}

/// [`gemm`] with the mma.sync / FFMA block tile forced (tests and
/// benchmarks); never a wgmma kernel.
pub fn gemm_with_tile(device: &'static Device, stream: CUstream, dtype: GemmDtype, args: &GemmArgs, tile: GemmTile) -> Result<()> {
    validate(args, dtype)?;
    launch(device, stream, dtype, args, GemmKernel::Sync(tile), false)
}

/// [`gemm`] with the kernel forced (tests and benchmarks). A wgmma kernel
/// needs a half type, `trans_b` and a GPU of compute capability 9.0
/// (`InvalidArgument` otherwise, before any launch).
pub fn gemm_with_kernel(device: &'static Device, stream: CUstream, dtype: GemmDtype, args: &GemmArgs, kernel: GemmKernel) -> Result<()> {
    validate(args, dtype)?;
    if let GemmKernel::Wgmma(t) = kernel {
        if dtype == GemmDtype::F32 || !args.trans_b {
            return Err(Error::invalid(format!("gemm: the wgmma kernels ({t:?}) take half types with B stored [N, K]")));
        }
        if !wgmma_device(device)? {
            return Err(Error::invalid("gemm: the wgmma kernels need a GPU of compute capability 9.0"));
        }
    }
    launch(device, stream, dtype, args, kernel, false)
}

/// Entry of the `_c32` twin of a half-type bnk kernel (same geometry).
fn c32_entry(dtype: GemmDtype, kernel: GemmKernel) -> Option<&'static str> {
    use GemmDtype::*;
    use GemmTile::*;
    use WgTile::*;
    Some(match (dtype, kernel) {
        (F32, _) => return None,
        (F16, GemmKernel::Sync(Large)) => "gemm_f16_bnk_128x128_c32",
        (F16, GemmKernel::Sync(Medium)) => "gemm_f16_bnk_64x64_c32",
        (F16, GemmKernel::Sync(Small)) => "gemm_f16_bnk_64x32_c32",
        (Bf16, GemmKernel::Sync(Large)) => "gemm_bf16_bnk_128x128_c32",
        (Bf16, GemmKernel::Sync(Medium)) => "gemm_bf16_bnk_64x64_c32",
        (Bf16, GemmKernel::Sync(Small)) => "gemm_bf16_bnk_64x32_c32",
        (F16, GemmKernel::Wgmma(M128N128)) => "gemm_f16_bnk_wg128x128_c32",
        (F16, GemmKernel::Wgmma(M128N192)) => "gemm_f16_bnk_wg128x192_c32",
        (F16, GemmKernel::Wgmma(M128N256)) => "gemm_f16_bnk_wg128x256_c32",
        (F16, GemmKernel::Wgmma(M64N128)) => "gemm_f16_bnk_wg64x128_c32",
        (Bf16, GemmKernel::Wgmma(M128N128)) => "gemm_bf16_bnk_wg128x128_c32",
        (Bf16, GemmKernel::Wgmma(M128N192)) => "gemm_bf16_bnk_wg128x192_c32",
        (Bf16, GemmKernel::Wgmma(M128N256)) => "gemm_bf16_bnk_wg128x256_c32",
        (Bf16, GemmKernel::Wgmma(M64N128)) => "gemm_bf16_bnk_wg64x128_c32",
    })
}

/// c32: the `_c32` twin of `kernel` (C, bias and residual fp32).
fn launch(device: &'static Device, stream: CUstream, dtype: GemmDtype, args: &GemmArgs, kernel: GemmKernel, c32: bool) -> Result<()> {
    let ((mut entry, bm, bn, threads, smem), module, ptx) = match kernel {
        GemmKernel::Sync(tile) => (self::kernel(dtype, args.trans_b, tile), MODULE, PTX),
        GemmKernel::Wgmma(tile) => (
            wg_kernel(dtype, tile).ok_or_else(|| Error::invalid("gemm: no fp32 wgmma kernel"))?,
            MODULE_SM90A,
            PTX_SM90A,
        ),
    };
    if c32 {
        entry = c32_entry(dtype, kernel).ok_or_else(|| Error::invalid("gemm: no fp32-output kernel for fp32 inputs"))?;
    }
    let grid_x = u32::try_from(args.n.div_ceil(bn)).map_err(|_| Error::invalid("gemm: n too large"))?;
    let grid_y = u32::try_from(args.m.div_ceil(bm)).map_err(|_| Error::invalid("gemm: m too large"))?;
    let grid_z = args.batch as u32; // validated <= 65535
    device.bind()?;
    let f = crate::kernels::function(device, module, ptx, entry)?;
    // Raise the dynamic shared-memory limit once per (device, kernel).
    static RAISED: OnceLock<Mutex<HashSet<(i32, &'static str)>>> = OnceLock::new();
    let raised = RAISED.get_or_init(|| Mutex::new(HashSet::new()));
    let key = (device.ordinal(), entry);
    if smem > 48 * 1024 && !raised.lock().unwrap_or_else(|p| p.into_inner()).contains(&key) {
        f.set_max_dynamic_shared(smem)?;
        raised.lock().unwrap_or_else(|p| p.into_inner()).insert(key);
    }
    let batched = args.batch > 1;
    let mut p_a: u64 = args.a;
    let mut p_b: u64 = args.b;
    let mut p_c: u64 = args.c;
    let mut p_bias: u64 = args.bias;
    let mut p_res: u64 = args.residual;
    // Validated: all below 2^31.
    let mut p_m = args.m as u32;
    let mut p_n = args.n as u32;
    let mut p_k = args.k as u32;
    let mut p_lda = args.lda as u32;
    let mut p_ldb = args.ldb as u32;
    let mut p_ldc = args.ldc as u32;
    let mut p_sa: u64 = if batched { args.stride_a as u64 } else { 0 };
    let mut p_sb: u64 = if batched { args.stride_b as u64 } else { 0 };
    let mut p_sc: u64 = if batched { args.stride_c as u64 } else { 0 };
    let mut p_alpha: f32 = args.alpha;
    let mut p_act: u32 = args.act as u32;
    let mut p_flags: u32 = flags(args, dtype, c32);
    let mut params: [*mut c_void; 17] = [
        (&mut p_a as *mut u64).cast(),
        (&mut p_b as *mut u64).cast(),
        (&mut p_c as *mut u64).cast(),
        (&mut p_bias as *mut u64).cast(),
        (&mut p_res as *mut u64).cast(),
        (&mut p_m as *mut u32).cast(),
        (&mut p_n as *mut u32).cast(),
        (&mut p_k as *mut u32).cast(),
        (&mut p_lda as *mut u32).cast(),
        (&mut p_ldb as *mut u32).cast(),
        (&mut p_ldc as *mut u32).cast(),
        (&mut p_sa as *mut u64).cast(),
        (&mut p_sb as *mut u64).cast(),
        (&mut p_sc as *mut u64).cast(),
        (&mut p_alpha as *mut f32).cast(),
        (&mut p_act as *mut u32).cast(),
        (&mut p_flags as *mut u32).cast(),
    ];
    let cfg = LaunchConfig { grid: (grid_x, grid_y, grid_z), block: (threads, 1, 1), shared_mem_bytes: smem };
    // SAFETY: 17 parameters of the exact types of the PTX entry (u64 x5,
    // u32 x6, u64 x3, f32, u32 x2); validate() checked that every access the
    // kernel makes (bounded by m, n, k, the leading dimensions and strides)
    // lies in the caller's ranges, which the caller guarantees are allocated.
    unsafe { f.launch(cfg, stream, &mut params) }
}

// ---------------------------------------------------------------------------
// CPU references
// ---------------------------------------------------------------------------

/// erf in f64: Maclaurin series below 2.5, the classic continued fraction of
/// erfc above (both accurate to ~1e-15 there).
pub fn erf_f64(x: f64) -> f64 {
    let ax = x.abs();
    let r = if ax < 2.5 {
        // erf(x) = 2/sqrt(pi) * sum_n (-1)^n x^(2n+1) / (n! (2n+1))
        let x2 = ax * ax;
        let mut term = ax; // (-1)^n x^(2n+1) / n!
        let mut sum = ax;
        for n in 1..200 {
            term *= -x2 / n as f64;
            let t = term / (2 * n + 1) as f64;
            sum += t;
            if t.abs() < 1e-17 * sum.abs() {
                break;
            }
        }
        sum * std::f64::consts::FRAC_2_SQRT_PI
    } else {
        // erfc(x) = exp(-x^2)/sqrt(pi) / (x + (1/2)/(x + (2/2)/(x + (3/2)/(x + ...))))
        let mut f = ax;
        for i in (1..=80).rev() {
            f = ax + (i as f64 / 2.0) / f;
        }
        1.0 - (-ax * ax).exp() / (std::f64::consts::PI.sqrt() * f)
    };
    if x < 0.0 {
        -r
    } else {
        r
    }
}

/// The activation in f64.
pub fn act_ref(x: f64, act: Activation) -> f64 {
    match act {
        Activation::None => x,
        Activation::Relu => x.max(0.0),
        Activation::Gelu => 0.5 * x * (1.0 + erf_f64(x / std::f64::consts::SQRT_2)),
        Activation::GeluTanh => {
            let c = (2.0 / std::f64::consts::PI).sqrt();
            0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())
        }
    }
}

/// CPU reference of [`gemm`] on host slices, computed in f64 and rounded to
/// f32: `args` gives the shape, leading dimensions, strides, alpha, act and
/// trans_b (its device pointers are ignored; `bias` / `residual` are used
/// when `Some`). Slices are indexed exactly like the device buffers (element
/// offsets `z*stride + row*ld + col`); only the M x N region of each batch
/// entry of `c` is written. Half-type results: convert the inputs to f32
/// (exactly) and compare the converted output.
pub fn gemm_ref_f32(
    args: &GemmArgs,
    a: &[f32],
    b: &[f32],
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    c: &mut [f32],
) -> Result<()> {
    let g = args;
    if g.m == 0 || g.n == 0 || g.k == 0 || g.batch == 0 {
        return Err(Error::invalid("gemm_ref_f32: empty problem"));
    }
    if g.lda < g.k || g.ldb < g.b_cols() || g.ldc < g.n {
        return Err(Error::invalid("gemm_ref_f32: leading dimension too small"));
    }
    let (sa, sb, sc) = if g.batch > 1 { (g.stride_a, g.stride_b, g.stride_c) } else { (0, 0, 0) };
    let need = |len: usize, stride: usize, rows: usize, ld: usize, cols: usize, what: &str| -> Result<()> {
        match extent(g.batch, stride, rows, ld, cols) {
            Some(x) if x <= len => Ok(()),
            _ => Err(Error::invalid(format!("gemm_ref_f32: {what} slice too short"))),
        }
    };
    need(a.len(), sa, g.m, g.lda, g.k, "a")?;
    need(b.len(), sb, g.b_rows(), g.ldb, g.b_cols(), "b")?;
    need(c.len(), sc, g.m, g.ldc, g.n, "c")?;
    if let Some(r) = residual {
        need(r.len(), sc, g.m, g.ldc, g.n, "residual")?;
    }
    if bias.is_some_and(|bs| bs.len() < g.n) {
        return Err(Error::invalid("gemm_ref_f32: bias slice too short"));
    }
    for z in 0..g.batch {
        for i in 0..g.m {
            for j in 0..g.n {
                let mut acc = 0f64;
                for kk in 0..g.k {
                    let av = a[z * sa + i * g.lda + kk] as f64;
                    let bv = if g.trans_b { b[z * sb + j * g.ldb + kk] } else { b[z * sb + kk * g.ldb + j] } as f64;
                    acc += av * bv;
                }
                let mut v = acc * g.alpha as f64;
                if let Some(bs) = bias {
                    v += bs[j] as f64;
                }
                v = act_ref(v, g.act);
                let ci = z * sc + i * g.ldc + j;
                if let Some(r) = residual {
                    v += r[ci] as f64;
                }
                c[ci] = v as f32;
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Half-precision bit conversions (round to nearest even)
// ---------------------------------------------------------------------------

/// f32 -> IEEE binary16 bits, round to nearest even (overflow gives inf,
/// NaN stays NaN, subnormals handled).
pub fn f32_to_f16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xff) as i32;
    let man = b & 0x7f_ffff;
    if exp == 0xff {
        return sign | 0x7c00 | if man != 0 { 0x200 | (man >> 13) as u16 } else { 0 };
    }
    let e = exp - 127 + 15;
    if e >= 0x1f {
        return sign | 0x7c00;
    }
    if e <= 0 {
        // Result is subnormal (or zero) in half: units of 2^-24.
        if e < -10 {
            return sign;
        }
        let m = man | 0x80_0000;
        let shift = (14 - e) as u32; // 14..=24
        let q = m >> shift;
        let rem = m & ((1 << shift) - 1);
        let halfway = 1 << (shift - 1);
        let r = if rem > halfway || (rem == halfway && q & 1 == 1) { q + 1 } else { q };
        return sign | r as u16;
    }
    let q = ((e as u32) << 10) | (man >> 13);
    let rem = man & 0x1fff;
    let r = if rem > 0x1000 || (rem == 0x1000 && q & 1 == 1) { q + 1 } else { q };
    sign | r as u16
}

/// IEEE binary16 bits -> f32 (exact).
pub fn f16_bits_to_f32(h: u16) -> f32 {
    let sign = ((h & 0x8000) as u32) << 16;
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    if exp == 0 {
        let v = man as f32 * f32::from_bits(0x3380_0000); // man * 2^-24, exact
        return if sign != 0 { -v } else { v };
    }
    let bits = if exp == 0x1f {
        sign | 0x7f80_0000 | (man << 13)
    } else {
        sign | ((exp + 112) << 23) | (man << 13)
    };
    f32::from_bits(bits)
}

/// f32 -> bfloat16 bits, round to nearest even (NaN stays NaN).
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    let round = 0x7fff + ((b >> 16) & 1);
    (b.wrapping_add(round) >> 16) as u16
}

/// bfloat16 bits -> f32 (exact).
pub fn bf16_bits_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// f32 -> bits of `dtype`'s half type: bf16 for Bf16, f16 otherwise.
pub fn to_half_bits(dtype: GemmDtype, x: f32) -> u16 {
    match dtype {
        GemmDtype::Bf16 => f32_to_bf16_bits(x),
        _ => f32_to_f16_bits(x),
    }
}

/// Bits of `dtype`'s half type -> f32: bf16 for Bf16, f16 otherwise.
pub fn from_half_bits(dtype: GemmDtype, h: u16) -> f32 {
    match dtype {
        GemmDtype::Bf16 => bf16_bits_to_f32(h),
        _ => f16_bits_to_f32(h),
    }
}

// ---------------------------------------------------------------------------
// Benchmark helper
// ---------------------------------------------------------------------------

/// Name of the mma.sync / FFMA kernel ([`choose_tile`]) for these arguments
/// on a GPU with `sms` multiprocessors: what [`gemm`] launches on a GPU
/// without the wgmma kernels. [`kernel_name_on`] names what it launches on a
/// given device.
pub fn kernel_name(dtype: GemmDtype, args: &GemmArgs, sms: usize) -> String {
    let (entry, ..) = kernel(dtype, args.trans_b, choose_tile(dtype, args, sms));
    debug_assert!(entry.contains(dtype.name()));
    entry.to_string()
}

/// Entry name of `kernel` for `dtype` and layout `trans_b` (None where that
/// kernel does not exist: wgmma for fp32 or B stored `[K, N]`).
pub fn entry_name(dtype: GemmDtype, trans_b: bool, kernel: GemmKernel) -> Option<&'static str> {
    match kernel {
        GemmKernel::Sync(t) => Some(self::kernel(dtype, trans_b, t).0),
        GemmKernel::Wgmma(t) if trans_b => wg_kernel(dtype, t).map(|k| k.0),
        GemmKernel::Wgmma(_) => None,
    }
}

/// Name of the kernel [`gemm`] launches for these arguments on `device`.
pub fn kernel_name_on(device: &'static Device, dtype: GemmDtype, args: &GemmArgs) -> Result<String> {
    let k = choose_kernel(dtype, args, sm_count(device)?, wgmma_device(device)?);
    Ok(entry_name(dtype, args.trans_b, k).unwrap_or("?").to_string())
}

/// Median TFLOP/s of each of `kernels` for `C[m,n] = A[m,k] B^T` (B stored
/// `[n,k]`; bias, no activation) on random data: rotating input sets larger
/// than the L2 cache, 20 back-to-back launches per sample between two
/// events, `reps` samples after a warm-up, one allocation for all the
/// kernels. `None` forces nothing ([`gemm`]'s
/// choice).
pub fn bench_gemm_kernels(
    device: &'static Device,
    dtype: GemmDtype,
    m: usize,
    n: usize,
    k: usize,
    kernels: &[Option<GemmKernel>],
    reps: usize,
) -> Result<Vec<f64>> {
    if reps == 0 {
        return Err(Error::invalid("bench_gemm_kernels: reps must be at least 1"));
    }
    let size = dtype.size();
    let set_bytes = (m * k + n * k + n + m * n) * size;
    let sets = (256usize << 20).div_ceil(set_bytes.max(1)).clamp(2, 16);
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut rand = |len: usize| -> Vec<u8> {
        let mut out = Vec::with_capacity(len * size);
        for _ in 0..len {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let v = ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
            match dtype {
                GemmDtype::F32 => out.extend_from_slice(&v.to_ne_bytes()),
                _ => out.extend_from_slice(&to_half_bits(dtype, v).to_ne_bytes()),
            }
        }
        out
    };
    // The same random values in every set, at different addresses.
    let (xa, wb, bb) = (rand(m * k), rand(n * k), rand(n));
    let mut bufs = Vec::with_capacity(sets);
    for _ in 0..sets {
        bufs.push((
            DeviceAlloc::from_slice(device, &xa)?,
            DeviceAlloc::from_slice(device, &wb)?,
            DeviceAlloc::from_slice(device, &bb)?,
            DeviceAlloc::new(device, m * n * size)?,
        ));
    }
    let stream = Stream::new(device)?;
    let args: Vec<GemmArgs> = bufs
        .iter()
        .map(|(a, b, bias, c)| {
            let mut g = GemmArgs::dense(m, n, k, a.ptr(), b.ptr(), true, c.ptr());
            g.bias = bias.ptr();
            g
        })
        .collect();
    let launch = |g: &GemmArgs, kern: Option<GemmKernel>| match kern {
        None => gemm(device, stream.raw(), dtype, g),
        Some(kk) => gemm_with_kernel(device, stream.raw(), dtype, g, kk),
    };
    let (start, end) = (Event::new(device, true)?, Event::new(device, true)?);
    const PER: usize = 20;
    let mut out = Vec::with_capacity(kernels.len());
    let mut next = 0usize;
    for &kern in kernels {
        for g in &args {
            launch(g, kern)?;
        }
        stream.synchronize()?;
        let mut samples = Vec::with_capacity(reps);
        for _ in 0..reps {
            start.record(stream.raw())?;
            for _ in 0..PER {
                launch(&args[next % sets], kern)?;
                next += 1;
            }
            end.record(stream.raw())?;
            end.synchronize()?;
            samples.push(Event::elapsed_ms(&start, &end)? as f64 / PER as f64);
        }
        samples.sort_by(|x, y| x.total_cmp(y));
        let ms = samples[samples.len() / 2];
        if ms <= 0.0 {
            return Err(Error::Internal("bench_gemm_kernels: zero elapsed time".into()));
        }
        out.push(2.0 * m as f64 * n as f64 * k as f64 / (ms * 1e-3) / 1e12);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(m: usize, n: usize, k: usize, trans_b: bool) -> GemmArgs {
        GemmArgs::dense(m, n, k, 0x1000_0000, 0x2000_0000, trans_b, 0x3000_0000)
    }

    fn invalid(r: Result<()>) -> bool {
        matches!(r, Err(Error::InvalidArgument(_)))
    }

    #[test]
    fn erf_matches_known_values() {
        for (x, want) in [
            (0.0, 0.0),
            (0.5, 0.520_499_877_813_046_5),
            (1.0, 0.842_700_792_949_714_9),
            (2.0, 0.995_322_265_018_952_7),
            (2.5, 0.999_593_047_982_555),
            (3.0, 0.999_977_909_503_001_4),
            (-1.0, -0.842_700_792_949_714_9),
            (6.0, 1.0),
        ] {
            assert!((erf_f64(x) - want).abs() < 1e-14, "erf({x}) = {} want {want}", erf_f64(x));
        }
    }

    #[test]
    fn activations_match_hand_values() {
        assert_eq!(act_ref(-2.0, Activation::Relu), 0.0);
        assert_eq!(act_ref(3.0, Activation::Relu), 3.0);
        assert_eq!(act_ref(1.5, Activation::None), 1.5);
        // gelu(1) = 0.5 (1 + erf(1/sqrt 2)) = 0.8413447460685429
        assert!((act_ref(1.0, Activation::Gelu) - 0.841_344_746_068_542_9).abs() < 1e-14);
        assert!((act_ref(-1.0, Activation::Gelu) + 0.158_655_253_931_457_05).abs() < 1e-14);
        // gelu_tanh(1) = 0.5 (1 + tanh(0.7978845608 * 1.044715)) = 0.8411919906082768
        assert!((act_ref(1.0, Activation::GeluTanh) - 0.841_191_990_608_276_8).abs() < 1e-12);
        assert_eq!(act_ref(0.0, Activation::GeluTanh), 0.0);
    }

    #[test]
    fn reference_gemm_small_cases() {
        // A = [[1,2],[3,4]], B [K,N] = [[5,6],[7,8]] -> [[19,22],[43,50]]
        let a = [1.0, 2.0, 3.0, 4.0];
        let b = [5.0, 6.0, 7.0, 8.0];
        let mut c = [0f32; 4];
        gemm_ref_f32(&args(2, 2, 2, false), &a, &b, None, None, &mut c).unwrap();
        assert_eq!(c, [19.0, 22.0, 43.0, 50.0]);
        // B stored [N,K] = [[5,7],[6,8]] is the same op(B).
        let bt = [5.0, 7.0, 6.0, 8.0];
        gemm_ref_f32(&args(2, 2, 2, true), &a, &bt, None, None, &mut c).unwrap();
        assert_eq!(c, [19.0, 22.0, 43.0, 50.0]);
        // alpha, bias, relu, residual; ldc 3 leaves column 2 untouched.
        let mut g = args(2, 2, 2, false);
        g.alpha = 0.5;
        g.act = Activation::Relu;
        g.ldc = 3;
        let bias = [-20.0, 1.0];
        let res = [1.0, 1.0, 7.0, 1.0, 1.0, 7.0];
        let mut c = [9f32; 6];
        gemm_ref_f32(&g, &a, &b, Some(&bias), Some(&res), &mut c).unwrap();
        // 0.5*[[19,22],[43,50]] + [-20,1] = [[-10.5,12],[1.5,26]] -> relu -> +1
        assert_eq!(c, [1.0, 13.0, 9.0, 2.5, 27.0, 9.0]);
        // Batched: two 1x1x2 products with strides.
        let mut g = args(1, 1, 2, true);
        g.batch = 2;
        g.stride_a = 2;
        g.stride_b = 2;
        g.stride_c = 1;
        g.ldc = 2;
        let mut c = [0f32; 2];
        gemm_ref_f32(&g, &[1.0, 2.0, 3.0, 4.0], &[1.0, 1.0, 2.0, 0.5], None, None, &mut c).unwrap();
        assert_eq!(c, [3.0, 8.0]);
        // Too short a slice is an error, not a panic.
        assert!(gemm_ref_f32(&args(2, 2, 2, false), &a[..3], &b, None, None, &mut [0f32; 4]).is_err());
    }

    #[test]
    fn f16_conversions() {
        assert_eq!(f32_to_f16_bits(1.0), 0x3c00);
        assert_eq!(f32_to_f16_bits(-2.0), 0xc000);
        assert_eq!(f32_to_f16_bits(0.0), 0x0000);
        assert_eq!(f32_to_f16_bits(-0.0), 0x8000);
        assert_eq!(f32_to_f16_bits(65504.0), 0x7bff);
        assert_eq!(f32_to_f16_bits(65520.0), 0x7c00); // rounds up to inf
        assert_eq!(f32_to_f16_bits(65519.0), 0x7bff);
        assert_eq!(f32_to_f16_bits(f32::INFINITY), 0x7c00);
        assert_eq!(f32_to_f16_bits(f32::NEG_INFINITY), 0xfc00);
        assert!(f16_bits_to_f32(f32_to_f16_bits(f32::NAN)).is_nan());
        // Ties to even: 1 + 2^-11 -> 1.0; 1 + 3*2^-11 -> 1 + 2^-9 (0x3c02).
        assert_eq!(f32_to_f16_bits(1.0 + 2f32.powi(-11)), 0x3c00);
        assert_eq!(f32_to_f16_bits(1.0 + 3.0 * 2f32.powi(-11)), 0x3c02);
        assert_eq!(f32_to_f16_bits(1.0 + 2f32.powi(-11) + 2f32.powi(-20)), 0x3c01);
        // Subnormals: 2^-24 is the smallest; 2^-25 ties to 0; just above rounds up.
        assert_eq!(f32_to_f16_bits(2f32.powi(-24)), 0x0001);
        assert_eq!(f32_to_f16_bits(2f32.powi(-25)), 0x0000);
        assert_eq!(f32_to_f16_bits(2f32.powi(-25) * 1.5), 0x0001);
        assert_eq!(f32_to_f16_bits(3.0 * 2f32.powi(-25)), 0x0002); // 1.5 units ties to 2
        assert_eq!(f32_to_f16_bits(2f32.powi(-14)), 0x0400); // smallest normal
        assert_eq!(f32_to_f16_bits(2f32.powi(-14) - 2f32.powi(-26)), 0x0400); // rounds up into normal
        assert_eq!(f16_bits_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_bits_to_f32(0x8001), -(2f32.powi(-24)));
        assert_eq!(f16_bits_to_f32(0x7bff), 65504.0);
        assert_eq!(f16_bits_to_f32(0x3555), 0.333_251_95);
        assert_eq!(f16_bits_to_f32(0xfc00), f32::NEG_INFINITY);
        // Every finite half survives the round trip.
        for h in 0..=0xffffu16 {
            let f = f16_bits_to_f32(h);
            if f.is_finite() {
                assert_eq!(f32_to_f16_bits(f), h, "{h:#x}");
            }
        }
    }

    #[test]
    fn bf16_conversions() {
        assert_eq!(f32_to_bf16_bits(1.0), 0x3f80);
        assert_eq!(f32_to_bf16_bits(-2.0), 0xc000);
        assert_eq!(bf16_bits_to_f32(0x3f80), 1.0);
        // 1 + 2^-8 ties to even (1.0); 1 + 3*2^-8 ties up to 1 + 2^-6.
        assert_eq!(f32_to_bf16_bits(1.0 + 2f32.powi(-8)), 0x3f80);
        assert_eq!(f32_to_bf16_bits(1.0 + 3.0 * 2f32.powi(-8)), 0x3f82);
        assert_eq!(f32_to_bf16_bits(f32::MAX), 0x7f80); // overflows to inf
        assert!(bf16_bits_to_f32(f32_to_bf16_bits(f32::NAN)).is_nan());
        for h in 0..=0xffffu16 {
            let f = bf16_bits_to_f32(h);
            if !f.is_nan() {
                assert_eq!(f32_to_bf16_bits(f), h);
            }
        }
    }

    #[test]
    fn validate_accepts_usual_shapes() {
        for dt in [GemmDtype::F32, GemmDtype::F16, GemmDtype::Bf16] {
            for tb in [false, true] {
                validate(&args(1024, 768, 768, tb), dt).unwrap();
            }
        }
        validate(&args(1, 1, 1, false), GemmDtype::F32).unwrap();
        // Half types with K not a multiple of 8 are fine when rows are aligned.
        let mut g = args(7, 13, 5, true);
        g.lda = 8;
        g.ldb = 8;
        validate(&g, GemmDtype::F16).unwrap();
        // Column slice of a packed QKV buffer with in-place residual.
        let mut g = args(128, 64, 64, true);
        g.ldc = 192;
        g.residual = g.c;
        g.bias = 0x4000_0000;
        validate(&g, GemmDtype::Bf16).unwrap();
        // Heads side by side in the columns of C.
        let mut g = args(128, 64, 64, false);
        g.batch = 12;
        g.stride_a = 64;
        g.lda = 768;
        g.stride_b = 64;
        g.ldb = 768;
        g.stride_c = 64;
        g.ldc = 768;
        validate(&g, GemmDtype::F16).unwrap();
    }

    #[test]
    fn validate_rejects_bad_arguments() {
        let f32t = GemmDtype::F32;
        let h = GemmDtype::F16;
        for (m, n, k) in [(0, 1, 1), (1, 0, 1), (1, 1, 0)] {
            assert!(invalid(validate(&args(m, n, k, false), f32t)));
        }
        let mut g = args(4, 4, 4, false);
        g.batch = 0;
        assert!(invalid(validate(&g, f32t)));
        let mut g = args(4, 4, 4, false);
        g.lda = 3;
        assert!(invalid(validate(&g, f32t)));
        let mut g = args(4, 8, 4, false);
        g.ldb = 4; // needs >= n for [K, N]
        assert!(invalid(validate(&g, f32t)));
        let mut g = args(4, 8, 4, true);
        g.ldb = 4; // [N, K] needs >= k: fine
        validate(&g, f32t).unwrap();
        let mut g = args(4, 4, 4, false);
        g.ldc = 3;
        assert!(invalid(validate(&g, f32t)));
        let mut g = args(4, 4, 4, false);
        g.a = 0;
        assert!(matches!(validate(&g, f32t), Err(Error::NullArgument(_))));
        let mut g = args(4, 4, 4, false);
        g.alpha = f32::NAN;
        assert!(invalid(validate(&g, f32t)));
        // Sizes beyond the kernel's u32 arithmetic.
        assert!(invalid(validate(&args(1 << 31, 1, 1, false), f32t)));
        let mut g = args(4, 4, 4, false);
        g.batch = 70000;
        g.stride_a = 16;
        g.stride_b = 16;
        g.stride_c = 16;
        assert!(invalid(validate(&g, f32t)));
        // Misalignment.
        let mut g = args(8, 8, 8, false);
        g.c += 2;
        assert!(invalid(validate(&g, f32t)));
        validate(&g, h).unwrap(); // 2-byte aligned C is fine for halves
        let mut g = args(8, 8, 8, false);
        g.a += 8;
        assert!(invalid(validate(&g, h)));
        let mut g = args(8, 8, 12, true);
        g.lda = 12;
        g.ldb = 16;
        assert!(invalid(validate(&g, h)));
        let mut g = args(8, 8, 8, true);
        g.batch = 2;
        g.stride_a = 68;
        g.stride_b = 64;
        g.stride_c = 64;
        assert!(invalid(validate(&g, h)));
        // Overlapping batch outputs.
        let mut g = args(4, 4, 4, false);
        g.batch = 2;
        g.stride_a = 16;
        g.stride_b = 16;
        g.stride_c = 8;
        assert!(invalid(validate(&g, f32t)));
        // Aliasing: C over A, C over bias, residual partly over C.
        let mut g = args(4, 4, 4, false);
        g.c = g.a + 16;
        assert!(invalid(validate(&g, f32t)));
        let mut g = args(4, 4, 4, false);
        g.bias = g.c + 8;
        assert!(invalid(validate(&g, f32t)));
        let mut g = args(4, 4, 4, false);
        g.residual = g.c + 4;
        assert!(invalid(validate(&g, f32t)));
        // Address-space overflow.
        let mut g = args(4, 4, 4, false);
        g.c = u64::MAX - 8;
        assert!(invalid(validate(&g, f32t)));
    }

    #[test]
    fn tile_choice_and_flags() {
        let big = args(1024, 4096, 1024, true);
        let small = args(1024, 768, 3072, true);
        assert_eq!(choose_tile(GemmDtype::F16, &big, 132), GemmTile::Large);
        assert_eq!(choose_tile(GemmDtype::F16, &small, 132), GemmTile::Small);
        assert_eq!(choose_tile(GemmDtype::F16, &args(1024, 1024, 4096, false), 132), GemmTile::Medium);
        assert_eq!(choose_tile(GemmDtype::F32, &big, 132), GemmTile::Large);
        assert_eq!(choose_tile(GemmDtype::F32, &args(1024, 3072, 768, true), 132), GemmTile::Medium);
        assert_eq!(kernel_name(GemmDtype::Bf16, &small, 132), "gemm_bf16_bnk_64x32");
        assert_eq!(kernel_name(GemmDtype::F32, &small, 132), "gemm_f32_bnk_128x64");
        assert_eq!(flags(&args(8, 8, 8, false), GemmDtype::F32, false), 7);
        let mut g = args(8, 8, 8, false);
        g.lda = 9;
        g.ldc = 10;
        assert_eq!(flags(&g, GemmDtype::F32, false), 2);
        assert_eq!(flags(&args(8, 8, 8, false), GemmDtype::F16, false), 7);
        let mut g = args(8, 12, 8, false);
        g.bias = 0x4000_0002;
        assert_eq!(flags(&g, GemmDtype::F16, false), 1);
    }

    #[test]
    fn kernel_table_matches_ptx() {
        for dt in [GemmDtype::F32, GemmDtype::F16, GemmDtype::Bf16] {
            for tb in [false, true] {
                for tile in [GemmTile::Large, GemmTile::Medium, GemmTile::Small] {
                    let (entry, bm, bn, _, _) = kernel(dt, tb, tile);
                    assert!(PTX.contains(&format!(".visible .entry {entry}(")), "{entry}");
                    assert!(entry.ends_with(&format!("_{bm}x{bn}")));
                    assert!(entry.contains(if tb { "_bnk_" } else { "_bkn_" }));
                }
            }
            for t in WgTile::ALL {
                let Some((entry, bm, bn, threads, smem)) = wg_kernel(dt, t) else {
                    assert_eq!(dt, GemmDtype::F32);
                    continue;
                };
                assert_eq!((bm, bn), t.dims());
                assert!(entry.ends_with(&format!("_bnk_wg{bm}x{bn}")) && entry.contains(dt.name()), "{entry}");
                assert_eq!(threads as usize, bm * 2, "{entry}: a warpgroup per 64 rows");
                // 4 stages of A and B K tiles (64 halves) + 1 KiB for the alignment.
                assert_eq!(smem as usize, 4 * (bm + bn) * 128 + 1024, "{entry}");
                let decl = format!(".visible .entry {entry}(");
                assert!(PTX_SM90A.contains(&decl), "{entry}");
                assert!(!PTX.contains(&decl), "{entry} must not be in the sm_90 module");
                let body = &PTX_SM90A[PTX_SM90A.find(&decl).unwrap()..];
                assert!(body[decl.len()..].contains(&format!(".maxntid {threads}, 1, 1")));
                assert!(body.contains(&format!("wgmma.mma_async.sync.aligned.m64n{bn}k16.f32.{0}.{0}", dt.name())));
            }
        }
    }

    #[test]
    fn c32_kernels_twin_the_half_bnk_kernels() {
        use GemmKernel::*;
        for dt in [GemmDtype::F16, GemmDtype::Bf16] {
            let kernels = [GemmTile::Large, GemmTile::Medium, GemmTile::Small].map(Sync).into_iter().chain(WgTile::ALL.map(Wgmma));
            for k in kernels {
                let twin = entry_name(dt, true, k).unwrap();
                let entry = c32_entry(dt, k).unwrap();
                assert_eq!(entry, format!("{twin}_c32"));
                let (module, other) = if matches!(k, Wgmma(_)) { (PTX_SM90A, Some(PTX)) } else { (PTX, None) };
                let decl = format!(".visible .entry {entry}(");
                assert!(module.contains(&decl), "{entry}");
                assert!(other.is_none_or(|o| !o.contains(&decl)), "{entry} must not be in the sm_90 module");
                // fp32 stores of C (the half kernels store b32 pairs or b16).
                let body = &module[module.find(&decl).unwrap()..];
                let body = &body[..body[1..].find(".visible .entry ").map_or(body.len(), |e| e + 1)];
                assert!(body.contains("st.global.v4.f32 [%rd2]") && !body.contains("st.global.b16"), "{entry}");
            }
        }
        assert!(c32_entry(GemmDtype::F32, Sync(GemmTile::Large)).is_none());
    }

    #[test]
    fn validate_c32_rules() {
        let h = GemmDtype::Bf16;
        let g = args(16, 64, 64, true);
        validate_c32(&g, h).unwrap();
        validate_c32(&g, GemmDtype::F16).unwrap();
        assert!(invalid(validate_c32(&g, GemmDtype::F32)));
        assert!(invalid(validate_c32(&args(16, 64, 64, false), h)), "B stored [K, N]");
        // C, bias and residual are fp32: 4-byte alignment, 4-byte extents.
        let mut g = args(16, 64, 64, true);
        g.c += 2;
        assert!(invalid(validate_c32(&g, h)));
        validate(&g, h).unwrap();
        let mut g = args(16, 64, 64, true);
        g.residual = g.c + 2 * 16 * 64; // disjoint at 2 bytes an element, not at 4
        assert!(invalid(validate_c32(&g, h)));
        g.residual = g.c + 4 * 16 * 64;
        validate_c32(&g, h).unwrap();
        // Vector flags for C count fp32 elements: ldc 4 is 16 bytes.
        let mut g = args(16, 4, 64, true);
        g.ldc = 4;
        assert_eq!(flags(&g, h, true) & 4, 4);
        assert_eq!(flags(&g, h, false) & 4, 0);
    }

    #[test]
    fn ptx_modules() {
        // The sm_90 module: its own header, no sm_90a instruction, every
        // non-wgmma kernel; the sm_90a module is the whole file.
        assert!(PTX.starts_with(".version 8.0\n.target sm_90\n.address_size 64\n//*/\n"));
        assert!(!PTX.contains("wgmma."));
        assert!(!PTX.contains(".target sm_90a"));
        assert!(PTX_SM90A.contains("\n.version 8.0\n.target sm_90a\n.address_size 64\n/*\n"));
        assert!(PTX_SM90A.contains(PTX));
        assert_eq!(PTX.matches(".visible .entry ").count(), 22);
        assert_eq!(PTX_SM90A.matches(".visible .entry ").count(), 38);
        // Every kernel's shared memory fits an H100 / H200 block (227 KiB).
        for t in WgTile::ALL {
            assert!(wg_kernel(GemmDtype::F16, t).unwrap().4 <= 227 * 1024);
        }
    }

    #[test]
    fn kernel_choice_with_and_without_wgmma() {
        use GemmKernel::*;
        let a = |m, n, k| args(m, n, k, true);
        // Without wgmma (or fp32, or B stored [K, N]): choose_tile's tile.
        for (m, n, k) in [(1024, 2304, 768), (1024, 768, 768), (1024, 4096, 1024)] {
            for dt in [GemmDtype::F32, GemmDtype::F16, GemmDtype::Bf16] {
                assert_eq!(choose_kernel(dt, &a(m, n, k), 132, false), Sync(choose_tile(dt, &a(m, n, k), 132)));
            }
            assert_eq!(choose_kernel(GemmDtype::F32, &a(m, n, k), 132, true), Sync(choose_tile(GemmDtype::F32, &a(m, n, k), 132)));
            let bkn = args(m, n, k, false);
            assert_eq!(choose_kernel(GemmDtype::F16, &bkn, 132, true), Sync(choose_tile(GemmDtype::F16, &bkn, 132)));
        }
        // With wgmma, the benchmark shapes take the kernels that measured
        // fastest on an H100 (see choose_kernel): the 128x192 tile fills the
        // GPU in one round where 128x128 tiles leave it unevenly loaded.
        for (dt, n, k, want) in [
            (GemmDtype::F16, 768, 768, Sync(GemmTile::Small)),
            (GemmDtype::F16, 2304, 768, Wgmma(WgTile::M128N192)),
            (GemmDtype::Bf16, 3072, 768, Wgmma(WgTile::M128N192)),
            (GemmDtype::Bf16, 768, 3072, Sync(GemmTile::Small)),
            (GemmDtype::F16, 3072, 1024, Wgmma(WgTile::M128N192)),
            (GemmDtype::Bf16, 1024, 1024, Wgmma(WgTile::M64N128)),
            (GemmDtype::F16, 4096, 1024, Wgmma(WgTile::M128N256)),
            (GemmDtype::Bf16, 1024, 4096, Sync(GemmTile::Medium)),
        ] {
            assert_eq!(choose_kernel(dt, &a(1024, n, k), 132, true), want, "1024 x {n} x {k}");
        }
        // Tiny problems stay on the small mma.sync tiles; many of them in a
        // batch fill the GPU with wgmma tiles.
        assert_eq!(choose_kernel(GemmDtype::F16, &a(16, 64, 64), 132, true), Sync(GemmTile::Small));
        let mut heads = a(128, 128, 64);
        heads.batch = 96;
        assert!(matches!(choose_kernel(GemmDtype::F16, &heads, 132, true), Wgmma(_)));
        // The model: a block alone vs rounds of co-resident blocks.
        let one = estimate(Sync(GemmTile::Large), &a(128, 128, 1000), 132);
        assert!((one - (1000.0 * 0.01338 + 7.06)).abs() < 1e-9);
        let three = estimate(Sync(GemmTile::Large), &a(128 * 3, 128 * 132, 1000), 132);
        assert!((three - one * (1.28 + 1.0)).abs() < 1e-9, "2 co-resident + 1: {three} vs {one}");
        // entry names
        assert_eq!(entry_name(GemmDtype::Bf16, true, Wgmma(WgTile::M128N192)), Some("gemm_bf16_bnk_wg128x192"));
        assert_eq!(entry_name(GemmDtype::Bf16, false, Wgmma(WgTile::M128N192)), None);
        assert_eq!(entry_name(GemmDtype::F32, true, Wgmma(WgTile::M64N128)), None);
        assert_eq!(entry_name(GemmDtype::F16, false, Sync(GemmTile::Large)), Some("gemm_f16_bkn_128x128"));
    }
}
