//! norm kernels (kernels/norm.ptx): launchers and CPU references.
//!
//! - `layernorm_f32`: layer norm over the last dim, optionally of `x + r` and
//!   optionally writing that sum too (BERT's post-LN "add & norm");
//!   shifted two-pass mean/variance in fp32 (no cancellation).
//! - `softmax_f32`: numerically stable softmax over the last dim of
//!   `scale * x`, optional causal mask.
//! - `embedding_f32`: token + position (+ token type) embedding lookup.
//!
//! All three run one CTA per row (token) with 32..256 threads; layernorm and
//! softmax cache the row in `cols * 4` bytes of dynamic shared memory, hence
//! `cols <= MAX_COLS`.

use std::ffi::c_void;

use crate::cuda::{CUdeviceptr, CUstream, Device, LaunchConfig};
use crate::error::{Error, Result};

/// Module name in the kernel cache.
pub const MODULE: &str = "norm";
/// The PTX text.
pub const PTX: &str = include_str!("../../kernels/norm.ptx");

/// Looks `entry` up in this module and enqueues it on `stream`. Private: every
/// caller in this file passes exactly one pointer per parameter of `entry`, of
/// its exact type, after validating the dims and pointers the kernel uses.
fn launch(device: &'static Device, stream: CUstream, entry: &str, cfg: LaunchConfig, params: &mut [*mut c_void]) -> Result<()> {
    let f = crate::kernels::function(device, MODULE, PTX, entry)?;
    // SAFETY: see above: the parameter list matches the .entry, and the
    // launcher checked the sizes the kernel indexes with.
    unsafe { f.launch(cfg, stream, params) }
}

/// Largest row length of [`layernorm`] and [`softmax`] (32 KiB of shared memory).
pub const MAX_COLS: usize = 8192;

/// Error flags that [`embedding`] ORs into its `err` word.
pub const EMBEDDING_BAD_ID: i32 = 1;
/// A position outside `[0, max_pos)`.
pub const EMBEDDING_BAD_POS: i32 = 2;
/// A token type outside `[0, n_types)`.
pub const EMBEDDING_BAD_TYPE: i32 = 4;

fn check_ptr(name: &str, p: CUdeviceptr, optional: bool) -> Result<()> {
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

/// One CTA per row: threads = a multiple of 32 near cols / 4, in [32, 256].
fn row_config(rows: usize, cols: usize, shared: usize) -> Result<LaunchConfig> {
    if rows == 0 || rows > i32::MAX as usize {
        return Err(Error::invalid(format!("{rows} rows: need 1 ..= {}", i32::MAX)));
    }
    let threads = (cols.div_ceil(4).div_ceil(32) * 32).clamp(32, 256) as u32;
    Ok(LaunchConfig { grid: (rows as u32, 1, 1), block: (threads, 1, 1), shared_mem_bytes: shared as u32 })
}

fn check_matrix(what: &str, rows: usize, cols: usize) -> Result<()> {
    if cols == 0 || cols > MAX_COLS {
        return Err(Error::invalid(format!("{what}: cols = {cols}, need 1 ..= {MAX_COLS}")));
    }
    rows.checked_mul(cols)
        .and_then(|n| n.checked_mul(4))
        .ok_or_else(|| Error::invalid(format!("{what}: [{rows}, {cols}] overflows")))?;
    Ok(())
}

/// `y = LN(x) * gamma + beta` over rows of `cols` (`[rows, cols]`, fp32).
/// `y == x` allowed.
#[allow(clippy::too_many_arguments)]
pub fn layernorm(
    device: &'static Device,
    stream: CUstream,
    y: CUdeviceptr,
    x: CUdeviceptr,
    gamma: CUdeviceptr,
    beta: CUdeviceptr,
    rows: usize,
    cols: usize,
    eps: f32,
) -> Result<()> {
    add_layernorm(device, stream, y, 0, x, 0, gamma, beta, rows, cols, eps)
}

/// Fused residual + layer norm: `s = x + r`, `y = LN(s) * gamma + beta`, and
/// `s` written to `sum` unless `sum == 0`. `r == 0` means no residual. Any of
/// `y`, `sum` may alias `x` or `r` (in place). Errors: NULL `y`, `x`, `gamma`,
/// `beta`; misaligned pointers; `rows == 0`; `cols` outside `1 ..= MAX_COLS`;
/// `eps` negative or not finite.
#[allow(clippy::too_many_arguments)]
pub fn add_layernorm(
    device: &'static Device,
    stream: CUstream,
    y: CUdeviceptr,
    sum: CUdeviceptr,
    x: CUdeviceptr,
    r: CUdeviceptr,
    gamma: CUdeviceptr,
    beta: CUdeviceptr,
    rows: usize,
    cols: usize,
    eps: f32,
) -> Result<()> {
    check_ptr("y", y, false)?;
    check_ptr("sum", sum, true)?;
    check_ptr("x", x, false)?;
    check_ptr("r", r, true)?;
    check_ptr("gamma", gamma, false)?;
    check_ptr("beta", beta, false)?;
    check_matrix("layernorm", rows, cols)?;
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(Error::invalid(format!("layernorm: eps = {eps}")));
    }
    let cfg = row_config(rows, cols, cols * 4)?;
    let (mut p_y, mut p_sum, mut p_x, mut p_r, mut p_g, mut p_b) = (y, sum, x, r, gamma, beta);
    let (mut p_rows, mut p_cols, mut p_eps) = (rows as u32, cols as u32, eps);
    let mut params: [*mut c_void; 9] = [
        (&mut p_y as *mut u64).cast(),
        (&mut p_sum as *mut u64).cast(),
        (&mut p_x as *mut u64).cast(),
        (&mut p_r as *mut u64).cast(),
        (&mut p_g as *mut u64).cast(),
        (&mut p_b as *mut u64).cast(),
        (&mut p_rows as *mut u32).cast(),
        (&mut p_cols as *mut u32).cast(),
        (&mut p_eps as *mut f32).cast(),
    ];
    // nine parameters of the exact types of layernorm_f32's .entry;
    // cols * 4 bytes of dynamic shared memory (<= 32 KiB) as the kernel needs.
    launch(device, stream, "layernorm_f32", cfg, &mut params)
}

/// `y = softmax(scale * x)` over rows of `cols`. With `causal_seq > 0` the
/// rows form `[.., causal_seq, causal_seq]` blocks (e.g. batch * heads * seq
/// rows of seq scores) and row `i` of a block sees only columns `j <= i`
/// (masked outputs are 0); then `cols == causal_seq` and `rows % causal_seq ==
/// 0` are required. `y == x` allowed.
#[allow(clippy::too_many_arguments)]
pub fn softmax(
    device: &'static Device,
    stream: CUstream,
    y: CUdeviceptr,
    x: CUdeviceptr,
    rows: usize,
    cols: usize,
    scale: f32,
    causal_seq: usize,
) -> Result<()> {
    check_ptr("y", y, false)?;
    check_ptr("x", x, false)?;
    check_matrix("softmax", rows, cols)?;
    if !scale.is_finite() {
        return Err(Error::invalid(format!("softmax: scale = {scale}")));
    }
    if causal_seq != 0 && (cols != causal_seq || rows % causal_seq != 0) {
        return Err(Error::invalid(format!(
            "softmax: causal blocks of {causal_seq} need cols == {causal_seq} and rows a multiple of it \
             (got [{rows}, {cols}])"
        )));
    }
    let cfg = row_config(rows, cols, cols * 4)?;
    let (mut p_y, mut p_x) = (y, x);
    let (mut p_rows, mut p_cols, mut p_scale, mut p_cseq) = (rows as u32, cols as u32, scale, causal_seq as u32);
    let mut params: [*mut c_void; 6] = [
        (&mut p_y as *mut u64).cast(),
        (&mut p_x as *mut u64).cast(),
        (&mut p_rows as *mut u32).cast(),
        (&mut p_cols as *mut u32).cast(),
        (&mut p_scale as *mut f32).cast(),
        (&mut p_cseq as *mut u32).cast(),
    ];
    // six parameters of the exact types of softmax_f32's .entry.
    launch(device, stream, "softmax_f32", cfg, &mut params)
}

/// Embedding tables of [`embedding`] (device pointers, fp32, row-major).
#[derive(Debug, Clone, Copy)]
pub struct EmbeddingTables {
    /// token embeddings `[vocab, hidden]`
    pub wte: CUdeviceptr,
    /// position embeddings `[max_pos, hidden]`
    pub wpe: CUdeviceptr,
    /// token type embeddings `[n_types, hidden]`, or 0 = none (GPT-2)
    pub wtt: CUdeviceptr,
    pub vocab: usize,
    pub max_pos: usize,
    /// rows of `wtt` (ignored when `wtt == 0`)
    pub n_types: usize,
    pub hidden: usize,
}

/// `out[t, :] = wte[ids[t], :] + wpe[p, :] (+ wtt[ty, :])` for `t < tokens`,
/// with `p = pos[t]`, or `t % seq` when `pos == 0`, and `ty = tt[t]`, or 0
/// when `tt == 0` (only with `tables.wtt != 0`). ids, pos and tt are **int32**.
/// An index out of range makes the token's row all zeros and, if `err != 0`,
/// ORs [`EMBEDDING_BAD_ID`] / [`EMBEDDING_BAD_POS`] / [`EMBEDDING_BAD_TYPE`]
/// into the int32 at `err` (the caller zeroes it beforehand and reads it
/// after).
#[allow(clippy::too_many_arguments)]
pub fn embedding(
    device: &'static Device,
    stream: CUstream,
    out: CUdeviceptr,
    ids: CUdeviceptr,
    pos: CUdeviceptr,
    tt: CUdeviceptr,
    tables: &EmbeddingTables,
    tokens: usize,
    seq: usize,
    err: CUdeviceptr,
) -> Result<()> {
    check_ptr("out", out, false)?;
    check_ptr("ids", ids, false)?;
    check_ptr("pos", pos, true)?;
    check_ptr("tt", tt, true)?;
    check_ptr("wte", tables.wte, false)?;
    check_ptr("wpe", tables.wpe, false)?;
    check_ptr("wtt", tables.wtt, true)?;
    check_ptr("err", err, true)?;
    let lim = i32::MAX as usize;
    let t = tables;
    if tokens == 0 || tokens > lim || t.hidden == 0 || t.hidden > lim || t.vocab == 0 || t.vocab > lim {
        return Err(Error::invalid(format!(
            "embedding: tokens {tokens}, hidden {}, vocab {}: need 1 ..= {lim}",
            t.hidden, t.vocab
        )));
    }
    if t.max_pos == 0 || t.max_pos > lim || (t.wtt != 0 && (t.n_types == 0 || t.n_types > lim)) {
        return Err(Error::invalid(format!(
            "embedding: max_pos {}, n_types {}: need 1 ..= {lim}",
            t.max_pos, t.n_types
        )));
    }
    if pos == 0 && (seq == 0 || seq > lim) {
        return Err(Error::invalid(format!("embedding: positions t % seq need seq >= 1 (got {seq})")));
    }
    for rows in [tokens, t.vocab, t.max_pos, t.n_types] {
        rows.checked_mul(t.hidden)
            .and_then(|n| n.checked_mul(4))
            .ok_or_else(|| Error::invalid(format!("embedding: [{rows}, {}] overflows", t.hidden)))?;
    }
    if tt != 0 && t.wtt == 0 {
        return Err(Error::invalid("embedding: token types given without a token type table"));
    }
    let cfg = row_config(tokens, t.hidden, 0)?;
    let (mut p_out, mut p_ids, mut p_pos, mut p_tt) = (out, ids, pos, tt);
    let (mut p_wte, mut p_wpe, mut p_wtt, mut p_err) = (t.wte, t.wpe, t.wtt, err);
    let mut p_tokens = tokens as u32;
    let mut p_hidden = t.hidden as u32;
    let mut p_vocab = t.vocab as u32;
    let mut p_max_pos = t.max_pos as u32;
    let mut p_n_types = if t.wtt != 0 { t.n_types as u32 } else { 0 };
    let mut p_seq = seq.clamp(1, lim) as u32;
    let mut params: [*mut c_void; 14] = [
        (&mut p_out as *mut u64).cast(),
        (&mut p_ids as *mut u64).cast(),
        (&mut p_pos as *mut u64).cast(),
        (&mut p_tt as *mut u64).cast(),
        (&mut p_wte as *mut u64).cast(),
        (&mut p_wpe as *mut u64).cast(),
        (&mut p_wtt as *mut u64).cast(),
        (&mut p_err as *mut u64).cast(),
        (&mut p_tokens as *mut u32).cast(),
        (&mut p_hidden as *mut u32).cast(),
        (&mut p_vocab as *mut u32).cast(),
        (&mut p_max_pos as *mut u32).cast(),
        (&mut p_n_types as *mut u32).cast(),
        (&mut p_seq as *mut u32).cast(),
    ];
    // fourteen parameters of the exact types of embedding_f32's .entry;
    // the kernel bounds-checks every index against the table sizes.
    launch(device, stream, "embedding_f32", cfg, &mut params)
}

// ---------------------------------------------------------------------------
// CPU references.

/// Reference of [`add_layernorm`]: returns `(y, s)` with `s = x + r` (f32 add,
/// as the kernel) and `y = (s - mean) / sqrt(var + eps) * gamma + beta`, the
/// statistics in f64 (two-pass). `r = None`: `s = x`.
pub fn layernorm_ref(
    x: &[f32],
    r: Option<&[f32]>,
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
) -> (Vec<f32>, Vec<f32>) {
    let cols = gamma.len();
    let s: Vec<f32> = match r {
        Some(r) => x.iter().zip(r).map(|(a, b)| a + b).collect(),
        None => x.to_vec(),
    };
    let mut y = vec![0f32; s.len()];
    for (row, out) in s.chunks(cols).zip(y.chunks_mut(cols)) {
        let n = cols as f64;
        let mean = row.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let var = row.iter().map(|&v| (f64::from(v) - mean).powi(2)).sum::<f64>() / n;
        let rstd = 1.0 / (var + f64::from(eps)).sqrt();
        for j in 0..cols {
            out[j] = ((f64::from(row[j]) - mean) * rstd * f64::from(gamma[j]) + f64::from(beta[j])) as f32;
        }
    }
    (y, s)
}

/// Reference of [`softmax`] (f64 inside): rows of `cols`, `softmax(scale * x)`;
/// with `causal_seq > 0`, row `r` sees columns `j <= r % causal_seq` only and
/// the others are 0.
pub fn softmax_ref(x: &[f32], cols: usize, scale: f32, causal_seq: usize) -> Vec<f32> {
    let mut y = vec![0f32; x.len()];
    for (r, (row, out)) in x.chunks(cols).zip(y.chunks_mut(cols)).enumerate() {
        let lim = if causal_seq > 0 { (r % causal_seq + 1).min(cols) } else { cols };
        let w: Vec<f64> = row[..lim].iter().map(|&v| f64::from(scale) * f64::from(v)).collect();
        let m = w.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = w.iter().map(|&v| (v - m).exp()).collect();
        let s: f64 = e.iter().sum();
        for j in 0..cols {
            out[j] = if j < lim { (e[j] / s) as f32 } else { 0.0 };
        }
    }
    y
}

/// Reference of [`embedding`]: returns `(out, err flags)`. `wtt = None`: no
/// token types; `tt = None`: type 0; `pos = None`: `t % seq`. Sums in f32 in
/// the kernel's order `(wte + wpe) + wtt`.
#[allow(clippy::too_many_arguments)]
pub fn embedding_ref(
    ids: &[i32],
    pos: Option<&[i32]>,
    tt: Option<&[i32]>,
    wte: &[f32],
    wpe: &[f32],
    wtt: Option<&[f32]>,
    hidden: usize,
    seq: usize,
) -> (Vec<f32>, i32) {
    let (vocab, max_pos) = (wte.len() / hidden, wpe.len() / hidden);
    let n_types = wtt.map_or(0, |w| w.len() / hidden);
    let mut out = vec![0f32; ids.len() * hidden];
    let mut err = 0;
    for (t, row) in out.chunks_mut(hidden).enumerate() {
        let id = ids[t];
        let p = pos.map_or((t % seq.max(1)) as i64, |p| i64::from(p[t]));
        let ty = tt.map_or(0, |tt| tt[t]);
        let mut flag = 0;
        if id < 0 || id as usize >= vocab {
            flag |= EMBEDDING_BAD_ID;
        }
        if p < 0 || p as usize >= max_pos {
            flag |= EMBEDDING_BAD_POS;
        }
        if wtt.is_some() && (ty < 0 || ty as usize >= n_types) {
            flag |= EMBEDDING_BAD_TYPE;
        }
        err |= flag;
        if flag != 0 {
            continue; // row stays zero
        }
        let (id, p, ty) = (id as usize, p as usize, ty as usize);
        for j in 0..hidden {
            let mut v = wte[id * hidden + j] + wpe[p * hidden + j];
            if let Some(w) = wtt {
                v += w[ty * hidden + j];
            }
            row[j] = v;
        }
    }
    (out, err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layernorm_ref_hand_case() {
        // row [1, 2, 3]: mean 2, var 2/3; row [5, 5, 5]: var 0 -> beta
        let x = [1.0f32, 2.0, 3.0, 5.0, 5.0, 5.0];
        let gamma = [1.0f32, 2.0, 1.0];
        let beta = [0.0f32, 0.0, 10.0];
        let (y, s) = layernorm_ref(&x, None, &gamma, &beta, 1e-5);
        let k = (1.0 / (2.0f64 / 3.0 + 1e-5).sqrt()) as f32; // 1 / sqrt(2/3 + eps)
        let want = [-k, 0.0, k + 10.0, 0.0, 0.0, 10.0];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{y:?}");
        }
        assert_eq!(s, x.to_vec());
        // with a residual: x + r = [1, 2, 3]
        let (y2, s2) = layernorm_ref(&[0.5, 1.0, 1.5], Some(&[0.5, 1.0, 1.5]), &gamma, &beta, 1e-5);
        assert_eq!(s2, vec![1.0, 2.0, 3.0]);
        assert!((y2[0] + k).abs() < 1e-6 && (y2[2] - k - 10.0).abs() < 1e-5);
    }

    #[test]
    fn softmax_ref_hand_case() {
        let ln2 = std::f32::consts::LN_2;
        let y = softmax_ref(&[0.0, ln2, 7.0, 7.0], 2, 1.0, 0);
        let want = [1.0 / 3.0, 2.0 / 3.0, 0.5, 0.5];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-7, "{y:?}");
        }
        // scale 2: [0, ln2] -> exp [1, 4] -> [0.2, 0.8]
        let y = softmax_ref(&[0.0, ln2], 2, 2.0, 0);
        assert!((y[0] - 0.2).abs() < 1e-7 && (y[1] - 0.8).abs() < 1e-7);
        // causal 2x2 blocks: row 0 sees col 0 only; row 1 both
        let y = softmax_ref(&[3.0, 100.0, 0.0, 0.0, 1.0, 2.0, 5.0, 5.0], 2, 1.0, 2);
        assert_eq!(&y[0..2], &[1.0, 0.0]);
        assert_eq!(&y[2..4], &[0.5, 0.5]);
        assert_eq!(&y[4..6], &[1.0, 0.0]);
        assert_eq!(&y[6..8], &[0.5, 0.5]);
    }

    #[test]
    fn embedding_ref_hand_case() {
        let hidden = 2;
        let wte = [1.0f32, 2.0, 10.0, 20.0, 100.0, 200.0]; // vocab 3
        let wpe = [0.5f32, 0.5, 0.25, 0.25]; // max_pos 2
        let wtt = [0.0f32, 0.0, 1000.0, 1000.0]; // 2 types
        let (out, err) = embedding_ref(&[2, 0, 1], None, None, &wte, &wpe, None, hidden, 2);
        assert_eq!(out, vec![100.5, 200.5, 1.25, 2.25, 10.5, 20.5]);
        assert_eq!(err, 0);
        let (out, err) = embedding_ref(&[1, 1], Some(&[1, 0]), Some(&[1, 0]), &wte, &wpe, Some(&wtt), hidden, 0);
        assert_eq!(out, vec![1010.25, 1020.25, 10.5, 20.5]);
        assert_eq!(err, 0);
        let (out, err) = embedding_ref(&[3, -1, 0, 0], Some(&[0, 0, 2, 0]), Some(&[0, 0, 0, 5]), &wte, &wpe, Some(&wtt), hidden, 0);
        assert_eq!(out, vec![0.0; 8]);
        assert_eq!(err, EMBEDDING_BAD_ID | EMBEDDING_BAD_POS | EMBEDDING_BAD_TYPE);
    }
}
