//! GPU tests of the GEMM kernels (src/kernels/gemm.rs, kernels/gemm.ptx):
//! `cargo test --test kernels_gemm -- --ignored` on a machine with a CUDA GPU.
//!
//! Every case runs on random inputs (never zeros), poisons the whole output
//! buffer (0xFF bytes = NaN) first, and checks (1) the M x N result of each
//! batch entry against the f64 CPU reference by ‖out − ref‖₂ / ‖ref‖₂
//! (fp32 ≤ 1e-5, fp16 / bf16 ≤ 1e-2) with no NaN, and (2) that every other
//! byte of the buffer (columns beside a column slice, padding between batch
//! entries) still holds exactly what was there before. Half-type inputs are
//! rounded to the half type first and the reference uses the rounded values.
//! Benchmarks live elsewhere (`pipeswitch bench gemm --all-tiles`: the chosen
//! kernel and every block tile at the benchmark shapes); these tests only
//! check correctness.
//!
//! The wgmma (sm_90a) kernels run only on GPUs of compute capability 9.0;
//! elsewhere their tests check that forcing them is refused and stop there.

use pipeswitch::cuda::module::check_launch;
use pipeswitch::cuda::{Device, DeviceAlloc, Stream};
use pipeswitch::kernels::gemm::{self, Activation, GemmArgs, GemmDtype, GemmKernel, GemmTile, WgTile};

fn dev() -> &'static Device {
    Device::get(0).expect("a CUDA device")
}

/// Deterministic xorshift64* generator of values in [-1, 1).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let r = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        ((r >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, len: usize) -> Vec<f32> {
        (0..len).map(|_| self.next()).collect()
    }
}

/// x as the nearest value of `dtype`.
fn round(dtype: GemmDtype, x: f32) -> f32 {
    match dtype {
        GemmDtype::F32 => x,
        _ => gemm::from_half_bits(dtype, gemm::to_half_bits(dtype, x)),
    }
}

fn encode(dtype: GemmDtype, v: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() * dtype.size());
    for &x in v {
        match dtype {
            GemmDtype::F32 => out.extend_from_slice(&x.to_ne_bytes()),
            _ => out.extend_from_slice(&gemm::to_half_bits(dtype, x).to_ne_bytes()),
        }
    }
    out
}

fn decode(dtype: GemmDtype, bytes: &[u8], i: usize) -> f32 {
    match dtype {
        GemmDtype::F32 => f32::from_ne_bytes([bytes[4 * i], bytes[4 * i + 1], bytes[4 * i + 2], bytes[4 * i + 3]]),
        _ => gemm::from_half_bits(dtype, u16::from_ne_bytes([bytes[2 * i], bytes[2 * i + 1]])),
    }
}

fn upload(d: &'static Device, bytes: &[u8]) -> DeviceAlloc {
    DeviceAlloc::from_slice(d, bytes).expect("upload")
}

/// One test case. The C buffer holds `batch` entries of `m` rows of `ldc`
/// elements (or, with `side_by_side`, one `m x ldc` matrix whose column
/// blocks are the batch entries); the kernel writes columns
/// `off_c .. off_c + n` of each entry.
#[derive(Clone, Copy, Debug)]
struct Case {
    dtype: GemmDtype,
    trans_b: bool,
    m: usize,
    n: usize,
    k: usize,
    pad_a: usize,
    pad_b: usize,
    pad_c: usize,
    off_c: usize,
    bias: bool,
    residual: bool,
    in_place: bool,
    act: Activation,
    alpha: f32,
    batch: usize,
    side_by_side: bool,
    shared_b: bool,
    tile: Option<GemmTile>,
    /// Forces a kernel (overrides `tile`).
    kernel: Option<GemmKernel>,
    /// The `_c32` kernels (`gemm_c32`): C, bias and residual fp32.
    c32: bool,
}

impl Case {
    fn new(dtype: GemmDtype, trans_b: bool, m: usize, n: usize, k: usize) -> Case {
        Case {
            dtype,
            trans_b,
            m,
            n,
            k,
            pad_a: 0,
            pad_b: 0,
            pad_c: 0,
            off_c: 0,
            bias: false,
            residual: false,
            in_place: false,
            act: Activation::None,
            alpha: 1.0,
            batch: 1,
            side_by_side: false,
            shared_b: false,
            tile: None,
            kernel: None,
            c32: false,
        }
    }

    /// A `_c32` case: half A and B (B stored [N, K]), fp32 C.
    fn c32(dtype: GemmDtype, m: usize, n: usize, k: usize, kernel: Option<GemmKernel>) -> Case {
        let mut c = Case::new(dtype, true, m, n, k);
        c.kernel = kernel;
        c.c32 = true;
        c
    }

    fn wg(dtype: GemmDtype, m: usize, n: usize, k: usize, t: WgTile) -> Case {
        let mut c = Case::new(dtype, true, m, n, k);
        c.kernel = Some(GemmKernel::Wgmma(t));
        c
    }
}

fn round_up(x: usize, to: usize) -> usize {
    x.div_ceil(to) * to
}

/// Runs `c` and returns (relative error, NaN seen, untouched bytes intact).
fn run(c: &Case, seed: u64) -> (f64, bool, bool) {
    let d = dev();
    let dt = c.dtype;
    let half = dt != GemmDtype::F32;
    // Element type and size of C, bias and residual.
    let cdt = if c.c32 { GemmDtype::F32 } else { dt };
    let es = cdt.size();
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let (b_rows, b_cols) = if c.trans_b { (c.n, c.k) } else { (c.k, c.n) };
    let mut lda = c.k + c.pad_a;
    let mut ldb = b_cols + c.pad_b;
    if half {
        lda = round_up(lda, 8);
        ldb = round_up(ldb, 8);
    }
    let (ldc, stride_c, c_len) = if c.side_by_side {
        let w = c.batch * c.n + c.pad_c;
        (w, c.n, c.m * w)
    } else {
        let w = c.off_c + c.n + c.pad_c;
        (w, c.m * w, c.batch * c.m * w)
    };
    let stride_a = c.m * lda;
    let stride_b = if c.shared_b { 0 } else { b_rows * ldb };
    let a_len = c.batch * stride_a;
    let b_len = if c.shared_b { b_rows * ldb } else { c.batch * stride_b };

    let a_host: Vec<f32> = rng.vec(a_len).into_iter().map(|x| round(dt, x)).collect();
    let b_host: Vec<f32> = rng.vec(b_len).into_iter().map(|x| round(dt, x)).collect();
    let bias_host: Vec<f32> = rng.vec(c.n).into_iter().map(|x| round(cdt, x)).collect();
    let res_host: Vec<f32> = rng.vec(c_len).into_iter().map(|x| round(cdt, x)).collect();

    // Initial bytes of C: poison, or (in place) the residual.
    let c_init: Vec<u8> = if c.in_place { encode(cdt, &res_host) } else { vec![0xFF; c_len * es] };
    let a_dev = upload(d, &encode(dt, &a_host));
    let b_dev = upload(d, &encode(dt, &b_host));
    let bias_dev = upload(d, &encode(cdt, &bias_host));
    let res_dev = upload(d, &encode(cdt, &res_host));
    let c_dev = upload(d, &c_init);

    let off = (c.off_c * es) as u64;
    let args = GemmArgs {
        m: c.m,
        n: c.n,
        k: c.k,
        a: a_dev.ptr(),
        lda,
        b: b_dev.ptr(),
        ldb,
        trans_b: c.trans_b,
        c: c_dev.ptr() + off,
        ldc,
        bias: if c.bias { bias_dev.ptr() } else { 0 },
        residual: match (c.residual, c.in_place) {
            (false, _) => 0,
            (true, true) => c_dev.ptr() + off,
            (true, false) => res_dev.ptr() + off,
        },
        alpha: c.alpha,
        act: c.act,
        batch: c.batch,
        stride_a,
        stride_b,
        stride_c,
    };
    let stream = Stream::new(d).expect("stream");
    match (c.kernel, c.tile) {
        (Some(k), _) if c.c32 => gemm::gemm_c32_with_kernel(d, stream.raw(), dt, &args, k),
        (None, _) if c.c32 => gemm::gemm_c32(d, stream.raw(), dt, &args),
        (Some(k), _) => gemm::gemm_with_kernel(d, stream.raw(), dt, &args, k),
        (None, None) => gemm::gemm(d, stream.raw(), dt, &args),
        (None, Some(t)) => gemm::gemm_with_tile(d, stream.raw(), dt, &args, t),
    }
    .unwrap_or_else(|e| panic!("launch {c:?}: {e}"));
    check_launch(stream.raw()).unwrap_or_else(|e| panic!("kernel fault {c:?}: {e}"));
    let mut out = vec![0u8; c_len * es];
    c_dev.copy_to_slice(&mut out).expect("download");

    // Reference, indexed like the device buffer from the slice origin.
    let mut reference: Vec<f32> = (0..c_len).map(|i| decode(cdt, &c_init, i)).collect();
    gemm::gemm_ref_f32(
        &args,
        &a_host,
        &b_host,
        c.bias.then_some(&bias_host[..]),
        c.residual.then_some(&res_host[c.off_c..]),
        &mut reference[c.off_c..],
    )
    .expect("reference");

    // Which elements the kernel owns.
    let mut written = vec![false; c_len];
    for z in 0..c.batch {
        for i in 0..c.m {
            for j in 0..c.n {
                written[c.off_c + z * stride_c + i * ldc + j] = true;
            }
        }
    }
    let (mut num, mut den, mut nan, mut intact) = (0f64, 0f64, false, true);
    let mut bad = Vec::new();
    for e in 0..c_len {
        if written[e] {
            let o = decode(cdt, &out, e);
            let r = reference[e] as f64;
            nan |= o.is_nan();
            num += (o as f64 - r).powi(2);
            den += r * r;
            // NaN counts as bad too.
            let close = (o as f64 - r).abs() <= 0.05 + 0.02 * r.abs();
            if bad.len() < 8 && !close {
                bad.push((e, o, r));
            }
        } else if out[e * es..(e + 1) * es] != c_init[e * es..(e + 1) * es] {
            intact = false;
        }
    }
    let rel = if nan { f64::INFINITY } else { (num / den.max(1e-300)).sqrt() };
    if !bad.is_empty() {
        // Where it went wrong (batch entry, row, column): a pattern in these
        // names the broken part of a kernel.
        let at = |e: usize| {
            let (z, r) = if c.side_by_side { ((e % ldc) / c.n.max(1), e) } else { (e / stride_c.max(1), e % stride_c.max(1)) };
            let (i, j) = (r / ldc, r % ldc);
            (z, i, if c.side_by_side { j % c.n.max(1) } else { j - c.off_c })
        };
        let list: Vec<String> = bad.iter().map(|&(e, o, r)| format!("{:?}: {o} vs {r:.4}", at(e))).collect();
        eprintln!("{c:?}: first mismatches (batch, row, col): {}", list.join("; "));
    }
    (rel, nan, intact)
}

/// The error allowed: fp32 1e-5; a half-type output 1e-2; an fp32 output
/// of half inputs (`_c32`) 1e-4, below what rounding the output to bf16
/// (about 1e-3) or f16 (about 1.5e-4) would cost, so a kernel that stores
/// halves cannot pass.
fn tolerance(c: &Case) -> f64 {
    match (c.dtype, c.c32) {
        (GemmDtype::F32, _) => 1e-5,
        (_, true) => 1e-4,
        _ => 1e-2,
    }
}

fn check(c: &Case, seed: u64) {
    let (rel, nan, intact) = run(c, seed);
    let tol = tolerance(c);
    eprintln!("{c:?}: rel {rel:.2e}");
    assert!(!nan, "NaN in the result of {c:?}");
    assert!(intact, "bytes outside the result changed: {c:?}");
    assert!(rel <= tol, "relative error {rel:.3e} > {tol:.0e}: {c:?}");
}

const TILES: [Option<GemmTile>; 4] = [None, Some(GemmTile::Large), Some(GemmTile::Medium), Some(GemmTile::Small)];
const FIXED: [GemmTile; 3] = [GemmTile::Large, GemmTile::Medium, GemmTile::Small];
const HALVES: [GemmDtype; 2] = [GemmDtype::F16, GemmDtype::Bf16];

#[test]
#[ignore = "needs a CUDA GPU"]
fn f32_shapes_both_layouts_both_tiles() {
    let mut seed = 1;
    for trans_b in [false, true] {
        for tile in TILES {
            for (m, n, k) in [(1, 1, 1), (7, 13, 5), (33, 65, 24), (129, 257, 136), (67, 131, 517), (2, 300, 9)] {
                let mut c = Case::new(GemmDtype::F32, trans_b, m, n, k);
                c.tile = tile;
                check(&c, seed);
                seed += 1;
            }
        }
        check(&Case::new(GemmDtype::F32, trans_b, 1024, 768, 768), seed);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn half_shapes_both_layouts_both_tiles() {
    let mut seed = 100;
    for dt in HALVES {
        for trans_b in [false, true] {
            for tile in TILES {
                for (m, n, k) in [(1, 1, 8), (7, 13, 8), (33, 65, 24), (129, 257, 136), (67, 131, 520), (2, 300, 16)] {
                    let mut c = Case::new(dt, trans_b, m, n, k);
                    c.tile = tile;
                    check(&c, seed);
                    seed += 1;
                }
                // K not a multiple of 8 (rows still 16-byte aligned through lda).
                let mut c = Case::new(dt, trans_b, 7, 13, 5);
                c.tile = tile;
                check(&c, seed);
                let mut c = Case::new(dt, trans_b, 37, 61, 131);
                c.tile = tile;
                check(&c, seed + 1);
                seed += 2;
            }
            check(&Case::new(dt, trans_b, 1024, 768, 768), seed);
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn epilogue_bias_activations_residual_alpha() {
    let mut seed = 200;
    for dt in [GemmDtype::F32, GemmDtype::F16, GemmDtype::Bf16] {
        for trans_b in [false, true] {
            for tile in FIXED {
                for act in [Activation::None, Activation::Relu, Activation::Gelu, Activation::GeluTanh] {
                    for (bias, residual) in [(true, false), (false, true), (true, true)] {
                        let mut c = Case::new(dt, trans_b, 129, 257, 136);
                        c.tile = Some(tile);
                        c.act = act;
                        c.bias = bias;
                        c.residual = residual;
                        c.alpha = if bias { 0.75 } else { 1.0 };
                        check(&c, seed);
                        seed += 1;
                    }
                }
                // Activation without bias, scaled.
                let mut c = Case::new(dt, trans_b, 64, 96, 40);
                c.tile = Some(tile);
                c.act = Activation::Gelu;
                c.alpha = -2.0;
                check(&c, seed);
                seed += 1;
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn column_slices_and_wide_leading_dimensions() {
    let mut seed = 300;
    for dt in [GemmDtype::F32, GemmDtype::F16, GemmDtype::Bf16] {
        for trans_b in [false, true] {
            for tile in FIXED {
                // (off_c, pad_c): aligned slice (vector stores) and odd offsets
                // (scalar stores); wider lda / ldb as well.
                for (off_c, pad_c, pad_a, pad_b) in [(8, 8, 8, 16), (1, 2, 3, 5), (64, 3, 0, 0), (3, 0, 24, 1)] {
                    let mut c = Case::new(dt, trans_b, 100, 120, 72);
                    c.tile = Some(tile);
                    c.off_c = off_c;
                    c.pad_c = pad_c;
                    c.pad_a = pad_a;
                    c.pad_b = pad_b;
                    c.bias = true;
                    c.residual = true;
                    c.act = Activation::GeluTanh;
                    check(&c, seed);
                    seed += 1;
                }
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn residual_in_place() {
    let mut seed = 400;
    for dt in [GemmDtype::F32, GemmDtype::F16, GemmDtype::Bf16] {
        for trans_b in [false, true] {
            for tile in FIXED {
                let mut c = Case::new(dt, trans_b, 130, 200, 96);
                c.tile = Some(tile);
                c.residual = true;
                c.in_place = true;
                c.bias = true;
                c.off_c = 8;
                c.pad_c = 8;
                c.act = Activation::Gelu;
                check(&c, seed);
                seed += 1;
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn batched_strided() {
    let mut seed = 500;
    for dt in [GemmDtype::F32, GemmDtype::F16, GemmDtype::Bf16] {
        for trans_b in [false, true] {
            for tile in TILES {
                // Attention-like: scaled, stacked batch entries with padding.
                let mut c = Case::new(dt, trans_b, 65, 47, 40);
                c.tile = tile;
                c.batch = 4;
                c.alpha = 0.125;
                c.off_c = 2;
                c.pad_c = 3;
                check(&c, seed);
                // Heads side by side in the columns of one C matrix.
                let mut c = Case::new(dt, trans_b, 128, 64, 64);
                c.tile = tile;
                c.batch = 3;
                c.side_by_side = true;
                c.pad_c = 5;
                check(&c, seed + 1);
                // One B shared by all batch entries (stride_b = 0), with epilogue.
                let mut c = Case::new(dt, trans_b, 33, 70, 48);
                c.tile = tile;
                c.batch = 3;
                c.shared_b = true;
                c.bias = true;
                c.residual = true;
                c.act = Activation::Relu;
                check(&c, seed + 2);
                seed += 3;
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn launcher_rejects_unsupported_arguments_without_launching() {
    let d = dev();
    let stream = Stream::new(d).expect("stream");
    let buf = DeviceAlloc::new(d, 1 << 20).expect("alloc");
    let p = buf.ptr();
    // Half-type A not 16-byte aligned.
    let mut g = GemmArgs::dense(8, 8, 8, p + 2, p + 4096, true, p + 8192);
    assert!(matches!(gemm::gemm(d, stream.raw(), GemmDtype::F16, &g), Err(pipeswitch::error::Error::InvalidArgument(_))));
    // lda not a multiple of 8 for halves.
    g = GemmArgs::dense(8, 8, 12, p, p + 4096, true, p + 8192);
    g.lda = 12;
    g.ldb = 16;
    assert!(matches!(gemm::gemm(d, stream.raw(), GemmDtype::Bf16, &g), Err(pipeswitch::error::Error::InvalidArgument(_))));
    // C overlapping A.
    g = GemmArgs::dense(8, 8, 8, p, p + 4096, false, p + 64);
    assert!(matches!(gemm::gemm(d, stream.raw(), GemmDtype::F32, &g), Err(pipeswitch::error::Error::InvalidArgument(_))));
    // Zero size.
    g = GemmArgs::dense(0, 8, 8, p, p + 4096, false, p + 8192);
    assert!(matches!(gemm::gemm(d, stream.raw(), GemmDtype::F32, &g), Err(pipeswitch::error::Error::InvalidArgument(_))));
    check_launch(stream.raw()).expect("nothing was launched");
}

/// Runs every case, reports each failure, and fails at the end (so that one
/// GPU run shows every broken case, not only the first).
fn check_all(cases: &[Case], seed0: u64) {
    let mut failed = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        let (rel, nan, intact) = run(c, seed0 + i as u64);
        let tol = tolerance(c);
        let ok = !nan && intact && rel <= tol;
        eprintln!("{c:?}: rel {rel:.2e}{}{}", if intact { "" } else { " BYTES OUTSIDE CHANGED" }, if ok { "" } else { " FAILED" });
        if !ok {
            failed.push(format!("{c:?}: rel {rel:.3e}, nan {nan}, intact {intact}"));
        }
    }
    assert!(failed.is_empty(), "{} of {} cases failed:\n{}", failed.len(), cases.len(), failed.join("\n"));
}

/// Whether the GPU runs the wgmma kernels; if not, checks that forcing one
/// is refused before any launch.
fn wgmma_here() -> bool {
    let d = dev();
    if gemm::wgmma_device(d).expect("capability") {
        return true;
    }
    let stream = Stream::new(d).expect("stream");
    let buf = DeviceAlloc::new(d, 1 << 20).expect("alloc");
    let p = buf.ptr();
    let g = GemmArgs::dense(64, 64, 64, p, p + 16384, true, p + 32768);
    let r = gemm::gemm_with_kernel(d, stream.raw(), GemmDtype::F16, &g, GemmKernel::Wgmma(WgTile::M128N128));
    assert!(matches!(r, Err(pipeswitch::error::Error::InvalidArgument(_))));
    eprintln!("no wgmma on this GPU (compute capability {:?}): skipped", d.compute_capability());
    false
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn wgmma_shapes_all_tiles() {
    if !wgmma_here() {
        return;
    }
    let mut cases = Vec::new();
    for dt in HALVES {
        for t in WgTile::ALL {
            // Edges in M, N and K (partial blocks, K not a multiple of 64 or
            // of 8, a single K tile, more K tiles than stages), exact tiles.
            for (m, n, k) in [
                (1, 1, 8),
                (7, 13, 8),
                (33, 65, 24),
                (129, 257, 136),
                (67, 131, 520),
                (2, 300, 16),
                (7, 13, 5),
                (37, 61, 131),
                (200, 390, 200),
                (128, 256, 64),
                (256, 768, 1024),
                (130, 200, 72),
            ] {
                cases.push(Case::wg(dt, m, n, k, t));
            }
        }
        // The BERT shape that needed these kernels, with bias.
        let mut c = Case::wg(dt, 1024, 2304, 768, WgTile::M128N192);
        c.bias = true;
        cases.push(c);
        // gemm's own choice on the benchmark shapes of the half types.
        for (m, n, k) in [(1024, 3072, 768), (512, 1024, 520)] {
            let mut c = Case::new(dt, true, m, n, k);
            c.bias = true;
            cases.push(c);
        }
    }
    check_all(&cases, 600);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn wgmma_epilogue_slices_batches() {
    if !wgmma_here() {
        return;
    }
    let mut cases = Vec::new();
    for dt in HALVES {
        for t in WgTile::ALL {
            for act in [Activation::None, Activation::Relu, Activation::Gelu, Activation::GeluTanh] {
                for (bias, residual) in [(true, false), (false, true), (true, true)] {
                    let mut c = Case::wg(dt, 129, 257, 136, t);
                    c.act = act;
                    c.bias = bias;
                    c.residual = residual;
                    c.alpha = if bias { 0.75 } else { 1.0 };
                    cases.push(c);
                }
            }
            let mut c = Case::wg(dt, 64, 96, 40, t);
            c.act = Activation::Gelu;
            c.alpha = -2.0;
            cases.push(c);
            // Column slices (vector and scalar stores), wide leading dimensions.
            for (off_c, pad_c, pad_a, pad_b) in [(8, 8, 8, 16), (1, 2, 3, 5), (64, 3, 0, 0), (3, 0, 24, 1)] {
                let mut c = Case::wg(dt, 100, 120, 72, t);
                c.off_c = off_c;
                c.pad_c = pad_c;
                c.pad_a = pad_a;
                c.pad_b = pad_b;
                c.bias = true;
                c.residual = true;
                c.act = Activation::GeluTanh;
                cases.push(c);
            }
            // Residual in place.
            let mut c = Case::wg(dt, 130, 200, 96, t);
            c.residual = true;
            c.in_place = true;
            c.bias = true;
            c.off_c = 8;
            c.pad_c = 8;
            c.act = Activation::Gelu;
            cases.push(c);
            // Batches: stacked with padding, side by side, shared B.
            let mut c = Case::wg(dt, 65, 47, 40, t);
            c.batch = 4;
            c.alpha = 0.125;
            c.off_c = 2;
            c.pad_c = 3;
            cases.push(c);
            let mut c = Case::wg(dt, 128, 64, 64, t);
            c.batch = 3;
            c.side_by_side = true;
            c.pad_c = 5;
            cases.push(c);
            let mut c = Case::wg(dt, 150, 300, 48, t);
            c.batch = 3;
            c.shared_b = true;
            c.bias = true;
            c.residual = true;
            c.act = Activation::Relu;
            cases.push(c);
        }
    }
    check_all(&cases, 700);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn wgmma_refused_where_it_does_not_exist() {
    let d = dev();
    let stream = Stream::new(d).expect("stream");
    let buf = DeviceAlloc::new(d, 1 << 20).expect("alloc");
    let p = buf.ptr();
    let k = GemmKernel::Wgmma(WgTile::M128N128);
    // fp32, and B stored [K, N]: no wgmma kernel.
    let g = GemmArgs::dense(64, 64, 64, p, p + 32768, true, p + 65536);
    assert!(matches!(gemm::gemm_with_kernel(d, stream.raw(), GemmDtype::F32, &g, k), Err(pipeswitch::error::Error::InvalidArgument(_))));
    let g = GemmArgs::dense(64, 64, 64, p, p + 32768, false, p + 65536);
    assert!(matches!(gemm::gemm_with_kernel(d, stream.raw(), GemmDtype::F16, &g, k), Err(pipeswitch::error::Error::InvalidArgument(_))));
    check_launch(stream.raw()).expect("nothing was launched");
}

/// The `_c32` twins (half A and B, fp32 C, bias and residual; what the
/// Llama prefill runs): every mma.sync tile and (on compute capability 9.0)
/// every wgmma tile at edge shapes, with bias, residual (separate and in
/// place), column slices and the Llama prefill's shapes with gemm_c32's own
/// choice.
#[test]
#[ignore = "needs a CUDA GPU"]
fn c32_all_kernels_against_the_reference() {
    let mut kernels: Vec<Option<GemmKernel>> = vec![None];
    kernels.extend(FIXED.map(|t| Some(GemmKernel::Sync(t))));
    if wgmma_here() {
        kernels.extend(WgTile::ALL.map(|t| Some(GemmKernel::Wgmma(t))));
    }
    let mut cases = Vec::new();
    for dt in HALVES {
        for &kern in &kernels {
            for (m, n, k) in [(1, 1, 8), (7, 13, 8), (33, 65, 24), (129, 257, 136), (67, 131, 520), (16, 300, 16), (37, 61, 131), (130, 200, 72)] {
                cases.push(Case::c32(dt, m, n, k, kern));
            }
            let mut c = Case::c32(dt, 70, 96, 64, kern);
            c.bias = true;
            c.residual = true;
            cases.push(c);
            let mut c = Case::c32(dt, 45, 40, 40, kern);
            c.residual = true;
            c.in_place = true;
            cases.push(c);
            // A column slice of a wider fp32 output (Q|K|V packing): odd
            // offset, so no 16-byte vectors.
            let mut c = Case::c32(dt, 20, 36, 48, kern);
            c.off_c = 3;
            c.pad_c = 5;
            cases.push(c);
        }
        // The tiny Llama's prefill shapes and the 8B's at M = 128 (K cut
        // down: the f64 reference runs on the CPU), gemm_c32's choice.
        for (m, n, k, res) in [(14, 1024, 256, false), (14, 256, 256, true), (128, 6144, 512, false), (128, 4096, 1024, true), (128, 28672, 256, false)] {
            let mut c = Case::c32(dt, m, n, k, None);
            c.residual = res;
            cases.push(c);
        }
    }
    check_all(&cases, 900);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn c32_refuses_what_it_does_not_take() {
    let d = dev();
    let stream = Stream::new(d).expect("stream");
    let buf = DeviceAlloc::new(d, 1 << 20).expect("alloc");
    let p = buf.ptr();
    let invalid = |r: pipeswitch::error::Result<()>| matches!(r, Err(pipeswitch::error::Error::InvalidArgument(_)));
    let g = GemmArgs::dense(64, 64, 64, p, p + 16384, true, p + 32768);
    assert!(invalid(gemm::gemm_c32(d, stream.raw(), GemmDtype::F32, &g)));
    let g = GemmArgs::dense(64, 64, 64, p, p + 16384, false, p + 32768);
    assert!(invalid(gemm::gemm_c32(d, stream.raw(), GemmDtype::Bf16, &g)));
    // C 2-byte aligned: fine for a half C, not for fp32.
    let g = GemmArgs::dense(64, 64, 64, p, p + 16384, true, p + 32770);
    assert!(invalid(gemm::gemm_c32(d, stream.raw(), GemmDtype::Bf16, &g)));
    stream.synchronize().expect("nothing launched");
}
