//! Deterministic random weights for the reference models, and the
//! safetensors file that carries a model: its weights in execution order,
//! the layer list (`pipeswitch.layers`) and the graph (`pipeswitch.graph`)
//! in the file's metadata, so that ingesting the file gives the store
//! everything a worker needs to run it.

use std::path::Path;

use super::reference::{Init, ModelDef, RopeSpec, WeightDecl};
use crate::kernels::gemm::{f32_to_bf16_bits, f32_to_f16_bits};
use crate::kernels::llama_ref::round_to;
use crate::error::Result;
use crate::store::safetensors::{write_file_with_metadata, WriteTensor};

/// Metadata key holding the model graph (JSON); ingest keeps it as the
/// model's [`GRAPH_ATTRIBUTE`](crate::store::GRAPH_ATTRIBUTE).
pub const GRAPH_KEY: &str = crate::store::GRAPH_ATTRIBUTE;

struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }
    /// splitmix64
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

fn name_seed(name: &str, seed: u64) -> u64 {
    name.bytes().fold(seed ^ 0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

/// Elements per independently seeded chunk of an [`Init::Chunked`] weight.
pub const CHUNK: usize = 1 << 16;

/// Values `[first, first + out.len())` of a chunked uniform weight; `first`
/// is a multiple of [`CHUNK`].
fn chunked_values(name_hash: u64, lo: f32, hi: f32, first: usize, out: &mut [f32]) {
    for (c, part) in out.chunks_mut(CHUNK).enumerate() {
        let chunk = (first / CHUNK + c) as u64;
        let mut rng = Rng::new(name_hash ^ chunk.wrapping_mul(0xd6e8_feb8_6659_fd93));
        let mut i = 0;
        while i < part.len() {
            let r = rng.next_u64();
            for half in [r >> 40, (r >> 8) & 0xff_ffff] {
                if i < part.len() {
                    part[i] = lo + (hi - lo) * (half as f32 / (1u64 << 24) as f32);
                    i += 1;
                }
            }
        }
    }
}

/// The rotary table `[max_pos, d]` of `spec` (see [`Init::Rope`]).
pub fn rope_table(spec: &RopeSpec, max_pos: usize, d: usize) -> Vec<f32> {
    let half = d / 2;
    let inv: Vec<f64> = (0..half)
        .map(|i| {
            let f = f64::from(spec.theta).powf(-(2.0 * i as f64) / d as f64);
            if spec.factor <= 0.0 {
                return f;
            }
            // Llama 3: long wavelengths scaled down by `factor`, short ones
            // kept, a smooth blend between.
            let (factor, lo, hi, orig) = (f64::from(spec.factor), f64::from(spec.low_freq_factor), f64::from(spec.high_freq_factor), f64::from(spec.original_max_positions));
            let wavelen = 2.0 * std::f64::consts::PI / f;
            if wavelen < orig / hi {
                f
            } else if wavelen > orig / lo {
                f / factor
            } else {
                let smooth = (orig / wavelen - lo) / (hi - lo);
                (1.0 - smooth) * f / factor + smooth * f
            }
        })
        .collect();
    let mut t = vec![0f32; max_pos * d];
    for p in 0..max_pos {
        for i in 0..half {
            let a = p as f64 * inv[i];
            t[p * d + i] = a.cos() as f32;
            t[p * d + half + i] = a.sin() as f32;
        }
    }
    t
}

/// Bytes `[offset, offset + out.len())` of weight `w` as stored (its dtype,
/// little-endian): what [`weight_values`] gives, rounded, without building
/// the whole tensor. For a chunked weight, `offset` must be a multiple of
/// CHUNK elements (and then any piece is generated on its own); other
/// inits build the whole tensor (they are small).
pub fn fill_weight_bytes(w: &WeightDecl, seed: u64, offset: u64, out: &mut [u8]) -> Result<()> {
    let size = w.dtype.size() as usize;
    if !matches!(w.dtype, crate::store::Dtype::F32 | crate::store::Dtype::Bf16 | crate::store::Dtype::F16) || out.len() % size != 0 || offset as usize % size != 0 {
        return Err(crate::error::Error::invalid(format!("weight {}: cannot fill {} bytes at {offset} of a {} tensor", w.name, out.len(), w.dtype.name())));
    }
    let first = offset as usize / size;
    let n = out.len() / size;
    let values: Vec<f32> = match w.init {
        Init::Chunked(lo, hi) => {
            if first % CHUNK != 0 {
                return Err(crate::error::Error::invalid(format!("weight {}: piece at element {first} is not chunk-aligned", w.name)));
            }
            let mut v = vec![0f32; n];
            chunked_values(name_seed(&w.name, seed), lo, hi, first, &mut v);
            v
        }
        _ => weight_values(w, seed).get(first..first + n).map(<[f32]>::to_vec).ok_or_else(|| crate::error::Error::invalid(format!("weight {}: piece outside the tensor", w.name)))?,
    };
    match w.dtype {
        crate::store::Dtype::Bf16 => {
            for (o, v) in out.chunks_exact_mut(2).zip(&values) {
                o.copy_from_slice(&f32_to_bf16_bits(*v).to_le_bytes());
            }
        }
        crate::store::Dtype::F16 => {
            for (o, v) in out.chunks_exact_mut(2).zip(&values) {
                o.copy_from_slice(&f32_to_f16_bits(*v).to_le_bytes());
            }
        }
        _ => {
            for (o, v) in out.chunks_exact_mut(4).zip(&values) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
    }
    Ok(())
}

/// The values of one weight: the same for the same (name, seed), whatever
/// the order in which weights are generated; rounded to the weight's dtype.
pub fn weight_values(w: &WeightDecl, seed: u64) -> Vec<f32> {
    let mut v = raw_values(w, seed);
    if w.dtype != crate::store::Dtype::F32 {
        for x in &mut v {
            *x = round_to(w.dtype, *x);
        }
    }
    v
}

fn raw_values(w: &WeightDecl, seed: u64) -> Vec<f32> {
    let n: usize = w.shape.iter().product();
    let mut rng = Rng::new(name_seed(&w.name, seed));
    match w.init {
        Init::Chunked(lo, hi) => {
            let mut v = vec![0f32; n];
            chunked_values(name_seed(&w.name, seed), lo, hi, 0, &mut v);
            v
        }
        Init::Rope(spec) => rope_table(&spec, w.shape[0], w.shape.get(1).copied().unwrap_or(0)),
        Init::Const(v) => vec![v; n],
        Init::Uniform(lo, hi) => (0..n).map(|_| lo + (hi - lo) * rng.uniform()).collect(),
        Init::Normal(std) => {
            let mut out = Vec::with_capacity(n);
            while out.len() < n {
                // Box-Muller: two normals per pair of uniforms.
                let u1 = rng.uniform().max(1e-7);
                let u2 = rng.uniform();
                let r = (-2.0 * u1.ln()).sqrt() * std;
                let t = std::f32::consts::TAU * u2;
                out.push(r * t.cos());
                if out.len() < n {
                    out.push(r * t.sin());
                }
            }
            out
        }
    }
}

/// Writes `def` as a safetensors file with deterministic weights from
/// `seed`; `progress(done, total)` counts weights generated.
pub fn write_model_file(def: &ModelDef, path: &Path, seed: u64, progress: &mut dyn FnMut(u64, u64)) -> Result<()> {
    let decls: Vec<&WeightDecl> = def.layers.iter().flat_map(|(_, ws)| ws.iter()).collect();
    let total: u64 = decls.iter().map(|w| w.shape.iter().product::<usize>() as u64 * w.dtype.size()).sum();
    let mut done = 0u64;
    let mut values: Vec<Vec<u8>> = Vec::with_capacity(decls.len());
    for w in &decls {
        let mut v = vec![0u8; w.shape.iter().product::<usize>() * w.dtype.size() as usize];
        fill_weight_bytes(w, seed, 0, &mut v)?;
        done += v.len() as u64;
        progress(done, total);
        values.push(v);
    }
    let shapes: Vec<Vec<u64>> = decls.iter().map(|w| w.shape.iter().map(|&d| d as u64).collect()).collect();
    let tensors: Vec<WriteTensor<'_>> = decls
        .iter()
        .zip(&values)
        .zip(&shapes)
        .map(|((w, v), s)| WriteTensor { name: &w.name, dtype: w.dtype, shape: s, data: v })
        .collect();
    let layers: Vec<String> = def.layers.iter().map(|(n, _)| n.clone()).collect();
    write_file_with_metadata(path, &tensors, Some(&layers), &[(GRAPH_KEY, def.graph.to_json()?)])
}
