//! CPU references of the Llama kernels (`kernels/llama.ptx`): what each
//! kernel is specified to compute, used by the CPU executor
//! ([`crate::model::cpu`]) and by the GPU tests that compare against it.

use crate::error::{Error, Result};
use crate::kernels::gemm::{bf16_bits_to_f32, f16_bits_to_f32, f32_to_bf16_bits, f32_to_f16_bits};
use crate::store::Dtype;

/// `x` rounded to `dtype` (BF16 or F16, round to nearest even) and back;
/// F32 and every other dtype: unchanged.
pub fn round_to(dtype: Dtype, x: f32) -> f32 {
    match dtype {
        Dtype::Bf16 => bf16_bits_to_f32(f32_to_bf16_bits(x)),
        Dtype::F16 => f16_bits_to_f32(f32_to_f16_bits(x)),
        _ => x,
    }
}

/// RMSNorm over rows of `h`: `x / sqrt(mean(x^2) + eps) * w`; with
/// `last_of = Some(s)` only rows `s-1, 2s-1, ...`.
pub fn rmsnorm_ref(x: &[f32], w: &[f32], eps: f32, last_of: Option<usize>) -> Result<Vec<f32>> {
    let h = w.len();
    if h == 0 || x.len() % h != 0 {
        return Err(Error::invalid(format!("rms norm: {} values are not rows of {h}", x.len())));
    }
    let rows = x.len() / h;
    let step = last_of.unwrap_or(1);
    if step == 0 || rows % step != 0 {
        return Err(Error::invalid(format!("rms norm: {rows} rows are not sequences of {step}")));
    }
    let mut out = Vec::with_capacity(rows / step * h);
    for r in (step - 1..rows).step_by(step) {
        let row = &x[r * h..(r + 1) * h];
        let ss: f64 = row.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
        let inv = 1.0 / (ss / h as f64 + f64::from(eps)).sqrt();
        out.extend(row.iter().zip(w).map(|(&v, &g)| (f64::from(v) * inv) as f32 * g));
    }
    Ok(out)
}

/// `silu(x[:, :F]) * x[:, F:]` for rows of `2F` values.
pub fn swiglu_ref(x: &[f32], two_f: usize) -> Result<Vec<f32>> {
    if two_f == 0 || two_f % 2 != 0 || x.len() % two_f != 0 {
        return Err(Error::invalid(format!("swiglu: rows of {two_f} values (an even number) do not tile {}", x.len())));
    }
    let f = two_f / 2;
    let mut out = Vec::with_capacity(x.len() / 2);
    for row in x.chunks_exact(two_f) {
        for i in 0..f {
            let g = f64::from(row[i]);
            out.push((g / (1.0 + (-g).exp()) * f64::from(row[f + i])) as f32);
        }
    }
    Ok(out)
}

/// The index of the largest value of each row of `cols` (the first on
/// ties; NaN is never the largest unless the row is all NaN: then 0).
pub fn argmax_ref(x: &[f32], cols: usize) -> Result<Vec<i32>> {
    if cols == 0 || x.len() % cols != 0 || cols > i32::MAX as usize {
        return Err(Error::invalid(format!("argmax: rows of {cols} do not tile {}", x.len())));
    }
    Ok(x.chunks_exact(cols)
        .map(|row| {
            let mut best = 0usize;
            for (i, &v) in row.iter().enumerate() {
                if v > row[best] || (row[best].is_nan() && !v.is_nan()) {
                    best = i;
                }
            }
            best as i32
        })
        .collect())
}

/// Rotary embedding of one head's `d` values at a position whose table row
/// is `cs` (cos in `[0, d/2)`, sin in `[d/2, d)`), HF's rotate-half form.
pub fn rope_ref(v: &[f32], cs: &[f32]) -> Vec<f32> {
    let half = v.len() / 2;
    let mut out = vec![0f32; v.len()];
    for i in 0..half {
        let (c, s) = (cs[i], cs[half + i]);
        out[i] = v[i] * c - v[half + i] * s;
        out[half + i] = v[half + i] * c + v[i] * s;
    }
    out
}

/// Shape of a cached attention: [`cached_attention_ref`] and the kernel
/// (`kernels::llama::cached_attention`).
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub max_seq: usize,
    /// Rows of the rope table.
    pub max_pos: usize,
}

/// Llama attention with a KV cache (see `Op::CachedAttention`): writes the
/// rotated K and V of the chunk (rounded to `cache_dtype`) into the caches
/// (`[batch, kv_heads, max_seq, d]`) and returns `[batch * seq, heads * d]`.
pub fn cached_attention_ref(
    qkv: &[f32],
    rope: &[f32],
    pos: i32,
    k_cache: &mut [f32],
    v_cache: &mut [f32],
    cache_dtype: Dtype,
    sh: AttentionShape,
) -> Result<Vec<f32>> {
    let AttentionShape { batch, seq, heads, kv_heads, head_dim: d, max_seq, max_pos } = sh;
    let width = (heads + 2 * kv_heads) * d;
    let t_all = batch * seq;
    if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 || d == 0 || d % 2 != 0 || qkv.len() != t_all * width {
        return Err(Error::invalid("cached attention: shapes disagree"));
    }
    if rope.len() != max_pos * d || k_cache.len() != batch * kv_heads * max_seq * d || v_cache.len() != k_cache.len() {
        return Err(Error::invalid("cached attention: rope table or cache shapes disagree"));
    }
    let pos = usize::try_from(pos).map_err(|_| Error::invalid(format!("position {pos} is negative")))?;
    let end = pos + seq;
    if end > max_seq || end > max_pos {
        return Err(Error::invalid(format!(
            "positions {pos}..{end} exceed the cache ({max_seq}) or the rotary table ({max_pos})"
        )));
    }
    let group = heads / kv_heads;
    let cidx = |b: usize, kh: usize, p: usize| ((b * kv_heads + kh) * max_seq + p) * d;
    // Rotate and store K and V of every token first.
    for t in 0..t_all {
        let (b, p) = (t / seq, pos + t % seq);
        let row = &qkv[t * width..(t + 1) * width];
        let cs = &rope[p * d..(p + 1) * d];
        for kh in 0..kv_heads {
            let k = rope_ref(&row[(heads + kh) * d..(heads + kh + 1) * d], cs);
            let v = &row[(heads + kv_heads + kh) * d..(heads + kv_heads + kh + 1) * d];
            let at = cidx(b, kh, p);
            for i in 0..d {
                k_cache[at + i] = round_to(cache_dtype, k[i]);
                v_cache[at + i] = round_to(cache_dtype, v[i]);
            }
        }
    }
    let scale = 1.0 / (d as f64).sqrt();
    let mut out = vec![0f32; t_all * heads * d];
    for t in 0..t_all {
        let (b, p) = (t / seq, pos + t % seq);
        let row = &qkv[t * width..(t + 1) * width];
        let cs = &rope[p * d..(p + 1) * d];
        for h in 0..heads {
            let q = rope_ref(&row[h * d..(h + 1) * d], cs);
            let kh = h / group;
            let scores: Vec<f64> = (0..=p)
                .map(|j| {
                    let k = &k_cache[cidx(b, kh, j)..cidx(b, kh, j) + d];
                    q.iter().zip(k).map(|(&a, &c)| f64::from(a) * f64::from(c)).sum::<f64>() * scale
                })
                .collect();
            let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
            let sum: f64 = e.iter().sum();
            let o = &mut out[(t * heads + h) * d..(t * heads + h + 1) * d];
            for (j, &w) in e.iter().enumerate() {
                let v = &v_cache[cidx(b, kh, j)..cidx(b, kh, j) + d];
                for i in 0..d {
                    o[i] += (w / sum * f64::from(v[i])) as f32;
                }
            }
        }
    }
    Ok(out)
}

/// `out[m, n] = sum_k x[m, k] w[n, k] (+ residual[m, n])`: the GEMV kernel
/// (weights `[N, K]`, values already those of the stored half type).
pub fn linear_nk_ref(x: &[f32], w: &[f32], k: usize, residual: Option<&[f32]>) -> Vec<f32> {
    let (m, n) = (x.len() / k, w.len() / k);
    let mut out = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let s: f64 = x[i * k..(i + 1) * k].iter().zip(&w[j * k..(j + 1) * k]).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum();
            out[i * n + j] = s as f32 + residual.map_or(0.0, |r| r[i * n + j]);
        }
    }
    out
}
