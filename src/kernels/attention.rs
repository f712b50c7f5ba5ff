//! attention kernels (kernels/attention.ptx): launchers and CPU references.
//!
//! `attention_f32`: fused multi-head self-attention for inference, exact fp32,
//! head dim 64. Input is the packed QKV activation `[B*S, 3H]` (row = token;
//! columns Q heads | K heads | V heads, head h at columns `h*64 .. h*64+64` of
//! each part, GPT-2's `c_attn` layout; BERT writes its three projections into
//! the same layout), output `[B*S, H]` with the heads concatenated. Scores are
//! `q.k / sqrt(64) + mask[b, j]`, with an optional causal mask (GPT-2) and an
//! optional additive per-key mask `[B, S]` (BERT padding: 0 or -10000).
//! Online (flash-style) softmax over key tiles of 32: one CTA of 128 threads
//! per (32 query rows, head, sequence), 29184 bytes of static shared memory.

use std::ffi::c_void;

use crate::cuda::{CUdeviceptr, CUstream, Device, LaunchConfig};
use crate::error::{Error, Result};

/// Module name in the kernel cache.
pub const MODULE: &str = "attention";
/// The PTX text.
pub const PTX: &str = include_str!("../../kernels/attention.ptx");

/// Looks `entry` up in this module and enqueues it on `stream`. Private: every
/// caller in this file passes exactly one pointer per parameter of `entry`, of
/// its exact type, after validating the dims and pointers the kernel uses.
fn launch(device: &'static Device, stream: CUstream, entry: &str, cfg: LaunchConfig, params: &mut [*mut c_void]) -> Result<()> {
    let f = crate::kernels::function(device, MODULE, PTX, entry)?;
    // SAFETY: see above: the parameter list matches the .entry, and the
    // launcher checked the sizes the kernel indexes with.
    unsafe { f.launch(cfg, stream, params) }
}

/// The only head dimension the kernel supports.
pub const HEAD_DIM: usize = 64;
/// Query rows per CTA (and keys per tile).
const BLOCK_ROWS: usize = 32;

/// `out = MHA(qkv)`: `qkv` is `[batch*seq, 3*heads*64]`, `out` is
/// `[batch*seq, heads*64]` (both 16-byte aligned, fp32), `mask` is 0 or an
/// additive fp32 mask `[batch, seq]` applied to every query's score of key j
/// (values below -1e30 act as -1e30). `causal`: query i sees keys j <= i.
/// Errors: `head_dim != 64`, zero sizes, misaligned or NULL pointers, sizes
/// overflowing.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    device: &'static Device,
    stream: CUstream,
    out: CUdeviceptr,
    qkv: CUdeviceptr,
    mask: CUdeviceptr,
    batch: usize,
    seq: usize,
    heads: usize,
    head_dim: usize,
    causal: bool,
) -> Result<()> {
    if head_dim != HEAD_DIM {
        return Err(Error::invalid(format!("attention: head_dim {head_dim} unsupported (only {HEAD_DIM})")));
    }
    if out == 0 || qkv == 0 {
        return Err(Error::invalid("attention: out and qkv must be non-NULL device pointers"));
    }
    if out % 16 != 0 || qkv % 16 != 0 || mask % 4 != 0 {
        return Err(Error::invalid(format!(
            "attention: out (0x{out:x}) and qkv (0x{qkv:x}) need 16-byte, mask (0x{mask:x}) 4-byte alignment"
        )));
    }
    if batch == 0 || seq == 0 || heads == 0 {
        return Err(Error::invalid(format!("attention: empty shape batch {batch}, seq {seq}, heads {heads}")));
    }
    if batch > 65535 || heads > 65535 {
        return Err(Error::invalid(format!("attention: batch {batch} / heads {heads} above 65535")));
    }
    // every index the kernel forms must fit: tokens * 3H floats in bytes,
    // tokens in u32
    let tokens = batch
        .checked_mul(seq)
        .filter(|&t| t <= u32::MAX as usize && seq <= (u32::MAX as usize) - BLOCK_ROWS)
        .ok_or_else(|| Error::invalid(format!("attention: batch {batch} x seq {seq} too large")))?;
    tokens
        .checked_mul(3 * heads * HEAD_DIM * 4)
        .ok_or_else(|| Error::invalid(format!("attention: {tokens} tokens x {heads} heads overflows")))?;
    let cfg = LaunchConfig {
        grid: (seq.div_ceil(BLOCK_ROWS) as u32, heads as u32, batch as u32),
        block: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    let (mut p_out, mut p_qkv, mut p_mask) = (out, qkv, mask);
    let (mut p_seq, mut p_heads) = (seq as u32, heads as u32);
    let mut p_scale = 1.0f32 / (HEAD_DIM as f32).sqrt();
    let mut p_causal = u32::from(causal);
    let mut params: [*mut c_void; 7] = [
        (&mut p_out as *mut u64).cast(),
        (&mut p_qkv as *mut u64).cast(),
        (&mut p_mask as *mut u64).cast(),
        (&mut p_seq as *mut u32).cast(),
        (&mut p_heads as *mut u32).cast(),
        (&mut p_scale as *mut f32).cast(),
        (&mut p_causal as *mut u32).cast(),
    ];
    // seven parameters of the exact types of attention_f32's .entry;
    // the kernel reads only rows < batch*seq of qkv and writes rows < batch*seq
    // of out.
    launch(device, stream, "attention_f32", cfg, &mut params)
}

/// Reference of [`attention`] in f64: for each sequence b, head h, query i,
/// `out[b*S+i, h*D..] = sum_j softmax_j(q_i.k_j / sqrt(D) + mask[b*S+j]) v_j`
/// over `j < S` (and `j <= i` when causal). Any `head_dim` (the kernel: 64).
pub fn attention_ref(
    qkv: &[f32],
    mask: Option<&[f32]>,
    batch: usize,
    seq: usize,
    heads: usize,
    head_dim: usize,
    causal: bool,
) -> Vec<f32> {
    let h_all = heads * head_dim;
    let rs = 3 * h_all;
    let scale = 1.0 / (head_dim as f64).sqrt();
    let mut out = vec![0f32; batch * seq * h_all];
    let at = |t: usize, c: usize| f64::from(qkv[t * rs + c]);
    for b in 0..batch {
        for h in 0..heads {
            let (qc, kc, vc) = (h * head_dim, h_all + h * head_dim, 2 * h_all + h * head_dim);
            for i in 0..seq {
                let ti = b * seq + i;
                let keys = if causal { i + 1 } else { seq };
                let mut w: Vec<f64> = (0..keys)
                    .map(|j| {
                        let tj = b * seq + j;
                        let dot: f64 = (0..head_dim).map(|d| at(ti, qc + d) * at(tj, kc + d)).sum();
                        dot * scale + mask.map_or(0.0, |m| f64::from(m[tj]))
                    })
                    .collect();
                let mx = w.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                w.iter_mut().for_each(|v| *v = (*v - mx).exp());
                let sum: f64 = w.iter().sum();
                for d in 0..head_dim {
                    let acc: f64 = (0..keys).map(|j| w[j] * at(b * seq + j, vc + d)).sum();
                    out[ti * h_all + h * head_dim + d] = (acc / sum) as f32;
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::norm::softmax_ref;

    fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// C = A B with A [m, k], B [k, n], row-major.
    fn matmul(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| f64::from(a[i * k + p]) * f64::from(b[p * n + j])).sum::<f64>() as f32;
            }
        }
        c
    }

    #[test]
    fn attention_ref_equals_matmul_softmax_matmul() {
        let (batch, seq, heads, d) = (2, 5, 3, 4);
        let h_all = heads * d;
        let qkv = rand_vec(batch * seq * 3 * h_all, 7);
        let mut mask = vec![0f32; batch * seq];
        mask[seq + 3] = -10000.0; // sequence 1: key 3 is padding
        for causal in [false, true] {
            for m in [None, Some(&mask[..])] {
                let got = attention_ref(&qkv, m, batch, seq, heads, d, causal);
                for b in 0..batch {
                    for h in 0..heads {
                        // Q [seq, d], K^T [d, seq], V [seq, d] of head h
                        let col = |part: usize, t: usize, x: usize| qkv[(b * seq + t) * 3 * h_all + part * h_all + h * d + x];
                        let q: Vec<f32> = (0..seq * d).map(|i| col(0, i / d, i % d)).collect();
                        let kt: Vec<f32> = (0..d * seq).map(|i| col(1, i % seq, i / seq)).collect();
                        let v: Vec<f32> = (0..seq * d).map(|i| col(2, i / d, i % d)).collect();
                        let mut s = matmul(&q, &kt, seq, d, seq);
                        let scale = 1.0 / (d as f32).sqrt();
                        for i in 0..seq {
                            for j in 0..seq {
                                s[i * seq + j] = s[i * seq + j] * scale + m.map_or(0.0, |m| m[b * seq + j]);
                            }
                        }
                        let p = softmax_ref(&s, seq, 1.0, if causal { seq } else { 0 });
                        let o = matmul(&p, &v, seq, seq, d);
                        for i in 0..seq {
                            for x in 0..d {
                                let g = got[(b * seq + i) * h_all + h * d + x];
                                let w = o[i * d + x];
                                assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "b{b} h{h} i{i} d{x}: {g} vs {w}");
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn attention_ref_single_key_returns_v() {
        // S = 1: softmax over one key is 1, out = v
        let (heads, d) = (2, 3);
        let qkv: Vec<f32> = (0..3 * heads * d).map(|i| i as f32 * 0.5 - 2.0).collect();
        let out = attention_ref(&qkv, None, 1, 1, heads, d, true);
        assert_eq!(out, qkv[2 * heads * d..].to_vec());
    }

    #[test]
    fn attention_ref_causal_first_row_is_v0() {
        let (seq, heads, d) = (3, 1, 2);
        let qkv = rand_vec(seq * 3 * heads * d, 3);
        let out = attention_ref(&qkv, None, 1, seq, heads, d, true);
        // row 0 sees only key 0: out = v_0
        assert_eq!(&out[0..2], &qkv[4..6]);
    }
}
