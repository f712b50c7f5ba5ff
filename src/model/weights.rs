//! Deterministic random weights for the reference models, and the
//! safetensors file that carries a model: its weights in execution order,
//! the layer list (`pipeswitch.layers`) and the graph (`pipeswitch.graph`)
//! in the file's metadata, so that ingesting the file gives the store
//! everything a worker needs to run it.

use std::path::Path;

use super::reference::{Init, ModelDef, WeightDecl};
use crate::error::Result;
use crate::store::safetensors::{write_file_with_metadata, WriteTensor};
use crate::store::Dtype;

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

/// The values of one weight: the same for the same (name, seed), whatever
/// the order in which weights are generated.
pub fn weight_values(w: &WeightDecl, seed: u64) -> Vec<f32> {
    let n: usize = w.shape.iter().product();
    let mut rng = Rng::new(name_seed(&w.name, seed));
    match w.init {
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

fn as_bytes(v: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and any byte pattern read back is what was written.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// Writes `def` as a safetensors file with deterministic weights from
/// `seed`; `progress(done, total)` counts weights generated.
pub fn write_model_file(def: &ModelDef, path: &Path, seed: u64, progress: &mut dyn FnMut(u64, u64)) -> Result<()> {
    let decls: Vec<&WeightDecl> = def.layers.iter().flat_map(|(_, ws)| ws.iter()).collect();
    let total: u64 = decls.iter().map(|w| w.shape.iter().product::<usize>() as u64 * 4).sum();
    let mut done = 0u64;
    let mut values = Vec::with_capacity(decls.len());
    for w in &decls {
        let v = weight_values(w, seed);
        done += v.len() as u64 * 4;
        progress(done, total);
        values.push(v);
    }
    let shapes: Vec<Vec<u64>> = decls.iter().map(|w| w.shape.iter().map(|&d| d as u64).collect()).collect();
    let tensors: Vec<WriteTensor<'_>> = decls
        .iter()
        .zip(&values)
        .zip(&shapes)
        .map(|((w, v), s)| WriteTensor { name: &w.name, dtype: Dtype::F32, shape: s, data: as_bytes(v) })
        .collect();
    let layers: Vec<String> = def.layers.iter().map(|(n, _)| n.clone()).collect();
    write_file_with_metadata(path, &tensors, Some(&layers), &[(GRAPH_KEY, def.graph.to_json()?)])
}
