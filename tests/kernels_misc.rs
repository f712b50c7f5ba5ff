//! GPU tests of the elementwise, norm and attention kernels against their CPU
//! references: `cargo test --test kernels_misc -- --ignored` on a CUDA machine.
//!
//! Every output buffer is poisoned (0xFF bytes = NaN) before the launch, so an
//! element the kernel fails to write shows up as NaN; outputs are compared by
//! relative error ||out - ref||_2 / ||ref||_2 (fp32: <= 1e-5) and must hold no
//! NaN. Buffers are allocated to their exact size, so that compute-sanitizer
//! memcheck sees any out-of-bounds access.

use pipeswitch::cuda::module::check_launch;
use pipeswitch::cuda::{CUdeviceptr, Device, DeviceAlloc, Stream};
use pipeswitch::error::Error;
use pipeswitch::kernels::attention::{attention, attention_ref};
use pipeswitch::kernels::elementwise::{self as ew, Activation};
use pipeswitch::kernels::norm::{self, EmbeddingTables};

const TOL: f64 = 1e-5;

/// splitmix64: small deterministic PRNG.
struct Rng(u64);
impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [lo, hi).
    fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        let u = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        lo + (hi - lo) * u
    }
    fn vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform(lo, hi)).collect()
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

fn device() -> &'static Device {
    Device::get(0).expect("a CUDA device")
}

fn upload<T: Copy>(d: &'static Device, v: &[T]) -> DeviceAlloc {
    DeviceAlloc::from_slice(d, v).expect("upload")
}

/// A buffer of `n` floats filled with 0xFF bytes (NaN).
fn poisoned(d: &'static Device, n: usize) -> DeviceAlloc {
    let a = DeviceAlloc::new(d, n * 4).expect("alloc");
    a.fill(0xFF).expect("fill");
    a
}

fn download(a: &DeviceAlloc, n: usize) -> Vec<f32> {
    let mut v = vec![0f32; n];
    a.copy_to_slice(&mut v).expect("download");
    v
}

/// Downloads `n` floats starting `offset` floats into `a`.
fn download_at(a: &DeviceAlloc, offset: usize, n: usize) -> Vec<f32> {
    let mut v = download(a, offset + n);
    v.drain(..offset);
    v
}

fn rel_err(out: &[f32], want: &[f32]) -> f64 {
    assert_eq!(out.len(), want.len());
    let (mut num, mut den) = (0f64, 0f64);
    for (&o, &w) in out.iter().zip(want) {
        num += (f64::from(o) - f64::from(w)).powi(2);
        den += f64::from(w).powi(2);
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

#[track_caller]
fn check(what: &str, out: &[f32], want: &[f32], tol: f64) {
    let nan = out.iter().position(|v| v.is_nan());
    assert!(nan.is_none(), "{what}: NaN at {} (unwritten element?)", nan.unwrap_or(0));
    let e = rel_err(out, want);
    assert!(e <= tol, "{what}: relative error {e:.3e} > {tol:.0e}");
    println!("{what}: rel err {e:.2e}");
}

fn sync(stream: &Stream) {
    check_launch(stream.raw()).expect("kernel ran without fault");
}

// ---------------------------------------------------------------- elementwise

#[test]
#[ignore = "needs a CUDA GPU"]
fn activations_at_awkward_sizes_vector_and_scalar_paths() {
    let d = device();
    let s = Stream::new(d).unwrap();
    let mut rng = Rng(1);
    for n in [1usize, 3, 4, 5, 1000, 1_000_003] {
        let x = rng.vec(n, -6.0, 6.0);
        // aligned: offset 0 (vector path); misaligned: offset 1 float (scalar path)
        for offset in [0usize, 1] {
            let mut xs = vec![0.5f32; offset];
            xs.extend_from_slice(&x);
            let xa = upload(d, &xs);
            let y = poisoned(d, n + offset);
            let (xp, yp) = (xa.ptr() + 4 * offset as u64, y.ptr() + 4 * offset as u64);
            for act in [Activation::Identity, Activation::Relu, Activation::Gelu, Activation::GeluTanh] {
                y.fill(0xFF).unwrap();
                ew::elementwise(d, s.raw(), yp, xp, 0, 0, n, 1, act).unwrap();
                sync(&s);
                let want = ew::elementwise_ref(&x, None, None, act);
                check(&format!("{act:?} n={n} offset={offset}"), &download_at(&y, offset, n), &want, TOL);
            }
        }
        // the named launchers, in place
        let xa = upload(d, &x);
        ew::gelu(d, s.raw(), xa.ptr(), xa.ptr(), n).unwrap();
        sync(&s);
        check(&format!("gelu in place n={n}"), &download(&xa, n), &ew::gelu_ref(&x), TOL);
        let xa = upload(d, &x);
        ew::gelu_tanh(d, s.raw(), xa.ptr(), xa.ptr(), n).unwrap();
        sync(&s);
        check(&format!("gelu_tanh in place n={n}"), &download(&xa, n), &ew::gelu_tanh_ref(&x), TOL);
        let xa = upload(d, &x);
        ew::relu(d, s.raw(), xa.ptr(), xa.ptr(), n).unwrap();
        sync(&s);
        check(&format!("relu in place n={n}"), &download(&xa, n), &ew::relu_ref(&x), 0.0);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gelu_over_a_wide_range_including_tails() {
    let d = device();
    let s = Stream::new(d).unwrap();
    // a sweep of -12 .. 12, then extreme values: tails must be finite and right
    let sweep = 240_001;
    let mut x: Vec<f32> = (0..sweep).map(|i| -12.0 + i as f32 * 1e-4).collect();
    x.extend_from_slice(&[-1e30, -100.0, -30.0, 30.0, 100.0, 1e30, 0.0, -0.0]);
    let n = x.len();
    let xa = upload(d, &x);
    let y = poisoned(d, n);
    for act in [Activation::Gelu, Activation::GeluTanh] {
        y.fill(0xFF).unwrap();
        ew::elementwise(d, s.raw(), y.ptr(), xa.ptr(), 0, 0, n, 1, act).unwrap();
        sync(&s);
        let out = download(&y, n);
        let want = ew::elementwise_ref(&x, None, None, act);
        check(&format!("{act:?} sweep"), &out[..sweep], &want[..sweep], 1e-6);
        // extremes: gelu(-x) -> -0, gelu(x) -> x, gelu(0) = 0, no NaN
        assert_eq!(&out[sweep..], &[-0.0, -0.0, -0.0, 30.0, 100.0, 1e30, 0.0, -0.0], "{act:?} extremes");
        assert!(out[sweep..sweep + 3].iter().all(|v| *v == 0.0), "{act:?} negative tail");
        // elementwise relative error where the value is not tiny
        for i in 0..n {
            if want[i].abs() > 1e-3 {
                let r = ((out[i] - want[i]) / want[i]).abs();
                assert!(r < 2e-6, "{act:?}({}) = {} want {} (rel {r:.2e})", x[i], out[i], want[i]);
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn residual_add_and_bias_add() {
    let d = device();
    let s = Stream::new(d).unwrap();
    let mut rng = Rng(2);
    for n in [1usize, 3, 1_000_003] {
        let a = rng.vec(n, -3.0, 3.0);
        let b = rng.vec(n, -3.0, 3.0);
        let (aa, ba) = (upload(d, &a), upload(d, &b));
        let y = poisoned(d, n);
        ew::add(d, s.raw(), y.ptr(), aa.ptr(), ba.ptr(), n).unwrap();
        sync(&s);
        check(&format!("add n={n}"), &download(&y, n), &ew::add_ref(&a, &b), 0.0);
        // in place into b
        ew::add(d, s.raw(), ba.ptr(), aa.ptr(), ba.ptr(), n).unwrap();
        sync(&s);
        check(&format!("add in place n={n}"), &download(&ba, n), &ew::add_ref(&a, &b), 0.0);
    }
    for (rows, cols) in [(1usize, 1usize), (5, 7), (3, 768), (257, 1024), (3, 4095), (1024, 3072)] {
        let n = rows * cols;
        let x = rng.vec(n, -4.0, 4.0);
        let bias = rng.vec(cols, -1.0, 1.0);
        let (xa, biasa) = (upload(d, &x), upload(d, &bias));
        ew::bias_add(d, s.raw(), xa.ptr(), biasa.ptr(), rows, cols).unwrap();
        sync(&s);
        check(&format!("bias_add [{rows}, {cols}]"), &download(&xa, n), &ew::bias_add_ref(&x, &bias), 0.0);
        let xa = upload(d, &x);
        let y = poisoned(d, n);
        for act in [Activation::Gelu, Activation::GeluTanh, Activation::Relu] {
            y.fill(0xFF).unwrap();
            ew::bias_act(d, s.raw(), y.ptr(), xa.ptr(), biasa.ptr(), rows, cols, act).unwrap();
            sync(&s);
            let want = ew::elementwise_ref(&x, None, Some(&bias), act);
            check(&format!("bias_act {act:?} [{rows}, {cols}]"), &download(&y, n), &want, TOL);
        }
    }
    // all three operands with a misaligned bias (scalar path with column wrap)
    let (rows, cols) = (33usize, 96usize);
    let n = rows * cols;
    let (a, b, bias) = (rng.vec(n, -2.0, 2.0), rng.vec(n, -2.0, 2.0), rng.vec(cols + 1, -1.0, 1.0));
    let (aa, ba, biasa) = (upload(d, &a), upload(d, &b), upload(d, &bias));
    let y = poisoned(d, n);
    ew::elementwise(d, s.raw(), y.ptr(), aa.ptr(), ba.ptr(), biasa.ptr() + 4, n, cols, Activation::Gelu).unwrap();
    sync(&s);
    let want = ew::elementwise_ref(&a, Some(&b), Some(&bias[1..]), Activation::Gelu);
    check("a + b + misaligned bias, gelu", &download(&y, n), &want, TOL);
}

// ----------------------------------------------------------------------- norm

#[test]
#[ignore = "needs a CUDA GPU"]
fn layernorm_shapes_with_and_without_residual() {
    let d = device();
    let s = Stream::new(d).unwrap();
    let mut rng = Rng(3);
    for cols in [1usize, 7, 768, 1024, 4095] {
        for rows in [1usize, 37] {
            let n = rows * cols;
            let x = rng.vec(n, -2.0, 3.0);
            let r = rng.vec(n, -1.0, 1.0);
            let gamma = rng.vec(cols, 0.5, 1.5);
            let beta = rng.vec(cols, -0.5, 0.5);
            let (xa, ra, ga, ba) = (upload(d, &x), upload(d, &r), upload(d, &gamma), upload(d, &beta));
            for eps in [1e-5f32, 1e-12] {
                let y = poisoned(d, n);
                norm::layernorm(d, s.raw(), y.ptr(), xa.ptr(), ga.ptr(), ba.ptr(), rows, cols, eps).unwrap();
                sync(&s);
                let (want, _) = norm::layernorm_ref(&x, None, &gamma, &beta, eps);
                check(&format!("layernorm [{rows}, {cols}] eps {eps:e}"), &download(&y, n), &want, TOL);

                let sum = poisoned(d, n);
                y.fill(0xFF).unwrap();
                norm::add_layernorm(d, s.raw(), y.ptr(), sum.ptr(), xa.ptr(), ra.ptr(), ga.ptr(), ba.ptr(), rows, cols, eps)
                    .unwrap();
                sync(&s);
                let (want, want_sum) = norm::layernorm_ref(&x, Some(&r), &gamma, &beta, eps);
                check(&format!("add_layernorm [{rows}, {cols}] eps {eps:e}"), &download(&y, n), &want, TOL);
                check(&format!("add_layernorm sum [{rows}, {cols}]"), &download(&sum, n), &want_sum, 0.0);
            }
            // in place, BERT style: sum over x, y over r
            let (xa2, ra2) = (upload(d, &x), upload(d, &r));
            norm::add_layernorm(d, s.raw(), ra2.ptr(), xa2.ptr(), xa2.ptr(), ra2.ptr(), ga.ptr(), ba.ptr(), rows, cols, 1e-12)
                .unwrap();
            sync(&s);
            let (want, want_sum) = norm::layernorm_ref(&x, Some(&r), &gamma, &beta, 1e-12);
            check(&format!("add_layernorm in place [{rows}, {cols}]"), &download(&ra2, n), &want, TOL);
            check(&format!("add_layernorm in place sum [{rows}, {cols}]"), &download(&xa2, n), &want_sum, 0.0);
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn layernorm_keeps_accuracy_with_a_large_offset() {
    let d = device();
    let s = Stream::new(d).unwrap();
    let mut rng = Rng(4);
    let (rows, cols) = (16usize, 4095usize);
    let x: Vec<f32> = (0..rows * cols).map(|_| 1000.0 + rng.uniform(-1.0, 1.0)).collect();
    let gamma = rng.vec(cols, 0.5, 1.5);
    let beta = rng.vec(cols, -0.5, 0.5);
    let (xa, ga, ba) = (upload(d, &x), upload(d, &gamma), upload(d, &beta));
    let y = poisoned(d, rows * cols);
    norm::layernorm(d, s.raw(), y.ptr(), xa.ptr(), ga.ptr(), ba.ptr(), rows, cols, 1e-5).unwrap();
    sync(&s);
    let (want, _) = norm::layernorm_ref(&x, None, &gamma, &beta, 1e-5);
    check("layernorm offset 1000", &download(&y, rows * cols), &want, TOL);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn softmax_shapes_and_scales() {
    let d = device();
    let s = Stream::new(d).unwrap();
    let mut rng = Rng(5);
    for cols in [1usize, 7, 128, 768, 1024, 4095] {
        for rows in [1usize, 5] {
            let n = rows * cols;
            let x = rng.vec(n, -10.0, 10.0);
            let xa = upload(d, &x);
            for scale in [1.0f32, 0.125] {
                let y = poisoned(d, n);
                norm::softmax(d, s.raw(), y.ptr(), xa.ptr(), rows, cols, scale, 0).unwrap();
                sync(&s);
                let want = norm::softmax_ref(&x, cols, scale, 0);
                check(&format!("softmax [{rows}, {cols}] scale {scale}"), &download(&y, n), &want, TOL);
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn softmax_causal_blocks() {
    let d = device();
    let s = Stream::new(d).unwrap();
    let mut rng = Rng(6);
    // (blocks = batch * heads, seq)
    for (blocks, seq) in [(2 * 3usize, 128usize), (1, 77), (4, 1), (2, 33)] {
        let (rows, cols) = (blocks * seq, seq);
        let n = rows * cols;
        let x = rng.vec(n, -8.0, 8.0);
        let xa = upload(d, &x);
        let y = poisoned(d, n);
        norm::softmax(d, s.raw(), y.ptr(), xa.ptr(), rows, cols, 0.125, seq).unwrap();
        sync(&s);
        let want = norm::softmax_ref(&x, cols, 0.125, seq);
        let out = download(&y, n);
        check(&format!("causal softmax {blocks} x [{seq}, {seq}]"), &out, &want, TOL);
        for r in 0..rows {
            for j in (r % seq + 1)..cols {
                assert_eq!(out[r * cols + j], 0.0, "row {r} col {j} must be masked");
            }
        }
        // in place
        norm::softmax(d, s.raw(), xa.ptr(), xa.ptr(), rows, cols, 0.125, seq).unwrap();
        sync(&s);
        check(&format!("causal softmax in place {blocks} x [{seq}, {seq}]"), &download(&xa, n), &want, TOL);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn embedding_gpt2_and_bert_with_token_types() {
    let d = device();
    let s = Stream::new(d).unwrap();
    let mut rng = Rng(7);

    // GPT-2-like: 2 sequences of 40 tokens, positions t % 40, no token types
    let (vocab, max_pos, hidden, seq) = (5000usize, 64usize, 1024usize, 40usize);
    let tokens = 2 * seq;
    let wte = rng.vec(vocab * hidden, -0.1, 0.1);
    let wpe = rng.vec(max_pos * hidden, -0.1, 0.1);
    let ids: Vec<i32> = (0..tokens).map(|_| rng.below(vocab as u64) as i32).collect();
    let (wtea, wpea, idsa) = (upload(d, &wte), upload(d, &wpe), upload(d, &ids));
    let err = upload(d, &[0i32]);
    let out = poisoned(d, tokens * hidden);
    let tables = EmbeddingTables { wte: wtea.ptr(), wpe: wpea.ptr(), wtt: 0, vocab, max_pos, n_types: 0, hidden };
    norm::embedding(d, s.raw(), out.ptr(), idsa.ptr(), 0, 0, &tables, tokens, seq, err.ptr()).unwrap();
    sync(&s);
    let (want, want_err) = norm::embedding_ref(&ids, None, None, &wte, &wpe, None, hidden, seq);
    check("embedding gpt2", &download(&out, tokens * hidden), &want, 0.0);
    let mut e = [0i32];
    err.copy_to_slice(&mut e).unwrap();
    assert_eq!((e[0], want_err), (0, 0));

    // BERT-like: explicit positions and token types, with bad indices
    let (vocab, max_pos, n_types, hidden, tokens) = (3001usize, 512usize, 2usize, 768usize, 37usize);
    let wte = rng.vec(vocab * hidden, -0.1, 0.1);
    let wpe = rng.vec(max_pos * hidden, -0.1, 0.1);
    let wtt = rng.vec(n_types * hidden, -0.1, 0.1);
    let mut ids: Vec<i32> = (0..tokens).map(|_| rng.below(vocab as u64) as i32).collect();
    let mut pos: Vec<i32> = (0..tokens).map(|t| (t % 20) as i32).collect();
    let mut tt: Vec<i32> = (0..tokens).map(|t| i32::from(t >= 20)).collect();
    let (wtea, wpea, wtta) = (upload(d, &wte), upload(d, &wpe), upload(d, &wtt));
    let tables = EmbeddingTables { wte: wtea.ptr(), wpe: wpea.ptr(), wtt: wtta.ptr(), vocab, max_pos, n_types, hidden };
    for bad in [false, true] {
        if bad {
            ids[3] = vocab as i32;
            ids[4] = -1;
            pos[10] = max_pos as i32;
            tt[30] = 2;
        }
        let (idsa, posa, tta) = (upload(d, &ids), upload(d, &pos), upload(d, &tt));
        let err = upload(d, &[0i32]);
        let out = poisoned(d, tokens * hidden);
        norm::embedding(d, s.raw(), out.ptr(), idsa.ptr(), posa.ptr(), tta.ptr(), &tables, tokens, 0, err.ptr()).unwrap();
        sync(&s);
        let (want, want_err) = norm::embedding_ref(&ids, Some(&pos), Some(&tt), &wte, &wpe, Some(&wtt), hidden, 0);
        let got = download(&out, tokens * hidden);
        check(&format!("embedding bert bad={bad}"), &got, &want, 0.0);
        let mut e = [0i32];
        err.copy_to_slice(&mut e).unwrap();
        assert_eq!(e[0], want_err);
        if bad {
            assert_eq!(want_err, norm::EMBEDDING_BAD_ID | norm::EMBEDDING_BAD_POS | norm::EMBEDDING_BAD_TYPE);
            for t in [3usize, 4, 10, 30] {
                assert!(got[t * hidden..(t + 1) * hidden].iter().all(|&v| v == 0.0), "token {t} must be zero");
            }
        }
    }
    // token types table without tt: every token is type 0
    let (idsa, posa) = (upload(d, &ids[..5]), upload(d, &pos[..5]));
    let out = poisoned(d, 5 * hidden);
    norm::embedding(d, s.raw(), out.ptr(), idsa.ptr(), posa.ptr(), 0, &tables, 5, 0, 0).unwrap();
    sync(&s);
    let (want, _) = norm::embedding_ref(&ids[..5], Some(&pos[..5]), None, &wte, &wpe, Some(&wtt), hidden, 0);
    let got = download(&out, 5 * hidden);
    // tokens 3 and 4 have bad ids (zero rows); the rest must match
    check("embedding type 0 default", &got, &want, 0.0);
}

// ------------------------------------------------------------------ attention

struct AttnCase {
    batch: usize,
    seq: usize,
    heads: usize,
    causal: bool,
    /// None, or the number of padded (masked) keys at the end of each sequence
    /// but the first, with this mask value
    pad: Option<(usize, f32)>,
    range: f32,
}

fn run_attention(d: &'static Device, s: &Stream, rng: &mut Rng, c: &AttnCase) {
    let h_all = c.heads * 64;
    let tokens = c.batch * c.seq;
    let qkv = rng.vec(tokens * 3 * h_all, -c.range, c.range);
    let mask: Option<Vec<f32>> = c.pad.map(|(pad, val)| {
        let mut m = vec![0f32; tokens];
        for b in 1..c.batch {
            for j in c.seq.saturating_sub(pad)..c.seq {
                m[b * c.seq + j] = val;
            }
        }
        m
    });
    let qkva = upload(d, &qkv);
    let maska = mask.as_ref().map(|m| upload(d, m));
    let out = poisoned(d, tokens * h_all);
    attention(
        d,
        s.raw(),
        out.ptr(),
        qkva.ptr(),
        maska.as_ref().map_or(0, |m| m.ptr()),
        c.batch,
        c.seq,
        c.heads,
        64,
        c.causal,
    )
    .unwrap();
    sync(s);
    let want = attention_ref(&qkv, mask.as_deref(), c.batch, c.seq, c.heads, 64, c.causal);
    let what = format!(
        "attention B={} S={} heads={} causal={} pad={:?} range={}",
        c.batch, c.seq, c.heads, c.causal, c.pad, c.range
    );
    check(&what, &download(&out, tokens * h_all), &want, TOL);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn attention_bert_like_shapes() {
    let d = device();
    let s = Stream::new(d).unwrap();
    let mut rng = Rng(8);
    for pad in [None, Some((37usize, -10000.0f32))] {
        let c = AttnCase { batch: 2, seq: 128, heads: 12, causal: false, pad, range: 1.0 };
        run_attention(d, &s, &mut rng, &c);
    }
    // sharper softmax (larger scores)
    let c = AttnCase { batch: 2, seq: 128, heads: 12, causal: false, pad: Some((5, -10000.0)), range: 2.5 };
    run_attention(d, &s, &mut rng, &c);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn attention_gpt2_like_shapes() {
    let d = device();
    let s = Stream::new(d).unwrap();
    let mut rng = Rng(9);
    for causal in [true, false] {
        let c = AttnCase { batch: 1, seq: 77, heads: 16, causal, pad: None, range: 1.0 };
        run_attention(d, &s, &mut rng, &c);
    }
    let c = AttnCase { batch: 2, seq: 77, heads: 16, causal: true, pad: Some((10, -10000.0)), range: 1.5 };
    run_attention(d, &s, &mut rng, &c);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn attention_awkward_shapes() {
    let d = device();
    let s = Stream::new(d).unwrap();
    let mut rng = Rng(10);
    let cases = [
        AttnCase { batch: 3, seq: 1, heads: 4, causal: false, pad: None, range: 1.0 },
        AttnCase { batch: 3, seq: 1, heads: 4, causal: true, pad: None, range: 1.0 },
        AttnCase { batch: 2, seq: 33, heads: 2, causal: true, pad: None, range: 1.0 },
        AttnCase { batch: 2, seq: 31, heads: 3, causal: false, pad: Some((3, -10000.0)), range: 1.0 },
        AttnCase { batch: 1, seq: 300, heads: 2, causal: true, pad: None, range: 2.0 },
        AttnCase { batch: 1, seq: 512, heads: 1, causal: false, pad: None, range: 1.0 },
        // masks at -FLT_MAX (HF's finfo.min); the second sequence fully masked
        AttnCase { batch: 2, seq: 40, heads: 2, causal: false, pad: Some((40, f32::MIN)), range: 1.0 },
        AttnCase { batch: 2, seq: 40, heads: 2, causal: true, pad: Some((7, f32::NEG_INFINITY)), range: 1.0 },
    ];
    for c in &cases {
        run_attention(d, &s, &mut rng, c);
    }
}

// ------------------------------------------------------------ argument checks

#[test]
#[ignore = "needs a CUDA GPU"]
fn launchers_reject_bad_arguments() {
    let d = device();
    let s = Stream::new(d).unwrap();
    let buf = DeviceAlloc::new(d, 1 << 20).unwrap();
    let p: CUdeviceptr = buf.ptr();
    let inv = |r: pipeswitch::Result<()>| matches!(r, Err(Error::InvalidArgument(_)));
    assert!(inv(ew::relu(d, s.raw(), p, p, 0)));
    assert!(inv(ew::relu(d, s.raw(), 0, p, 4)));
    assert!(inv(ew::relu(d, s.raw(), p + 2, p, 4)));
    assert!(inv(ew::bias_add(d, s.raw(), p, 0, 2, 3)));
    assert!(inv(ew::elementwise(d, s.raw(), p, p, 0, p, 10, 3, Activation::Relu)));
    assert!(inv(norm::layernorm(d, s.raw(), p, p, p, p, 4, 0, 1e-5)));
    assert!(inv(norm::layernorm(d, s.raw(), p, p, p, p, 4, norm::MAX_COLS + 1, 1e-5)));
    assert!(inv(norm::layernorm(d, s.raw(), p, p, p, p, 0, 8, 1e-5)));
    assert!(inv(norm::layernorm(d, s.raw(), p, p, p, p, 4, 8, f32::NAN)));
    assert!(inv(norm::softmax(d, s.raw(), p, p, 10, 8, 1.0, 4)));
    assert!(inv(norm::softmax(d, s.raw(), p, p, 12, 4, 1.0, 8)));
    let t = EmbeddingTables { wte: p, wpe: p, wtt: 0, vocab: 10, max_pos: 10, n_types: 0, hidden: 8 };
    assert!(inv(norm::embedding(d, s.raw(), p, p, 0, 0, &t, 4, 0, 0)));
    assert!(inv(norm::embedding(d, s.raw(), p, p, 0, p, &t, 4, 4, 0)));
    assert!(inv(attention(d, s.raw(), p, p, 0, 1, 8, 2, 32, false)));
    assert!(inv(attention(d, s.raw(), p + 4, p, 0, 1, 8, 2, 64, false)));
    assert!(inv(attention(d, s.raw(), p, p, 0, 0, 8, 2, 64, false)));
    sync(&s);
}
