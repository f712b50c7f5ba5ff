//! A CPU reference executor for model graphs: runs a [`Graph`] op by op on
//! host vectors with the kernels' own CPU references (`*_ref` in
//! [`crate::kernels`]), so that it computes exactly what the GPU worker's
//! kernels are specified to compute. GPU model tests compare against it.
//!
//! Semantics of each op (those of the kernel that runs it on the GPU):
//!
//! - `Embedding`: `out[t] = (wte[ids[t]] + wpe[t % seq]) + token_type[type_ids[t]]`
//!   in f32, where `seq` is the last dimension of the `ids` input (`[batch,
//!   seq]`); without `token_type` no type row is added; with `token_type`
//!   but no `type_ids`, type 0. An id, position or type out of range is an
//!   error (the kernel zeroes the row and raises a flag).
//! - `LayerNorm`: `LN(x (+ residual))` over the last dim, statistics in f64,
//!   `eps` from the op.
//! - `Linear`: `out[:, out_col..out_col+N] = act(x · op(W) + bias) + residual`
//!   (activation before the residual add, as the GEMM epilogue); columns of
//!   `out` outside that range keep what earlier ops wrote (0 before any).
//!   With a [`TensorCoreRounding`] (the worker's tensor-core path of
//!   half-precision linears), x is first rounded to the weight's type where
//!   the weight is BF16 or F16 and x has at least `min_rows` rows; the sum,
//!   bias and residual stay f32.
//! - `Attention`: per sequence of `seq` tokens and head, softmax(q·k/√d) v
//!   over the packed `[T, 3H]` Q|K|V buffer, `d = H / heads`, keys `j <= i`
//!   when causal; heads concatenated in the output `[T, H]`.
//! - `Conv2d`: `relu?(conv(x) + bias + residual)` (residual added before
//!   the ReLU, as the conv epilogue), NCHW, zero padding.
//! - `MaxPool`: padding counts as -inf; `GlobalAvgPool`: mean of each plane.
//!
//! Unlike the GPU attention kernel (head dim 64 only) the reference takes
//! any head dim.

use std::collections::HashMap;

use super::graph::{Act, Graph, Op, TensorDecl, WeightShapes};
use super::reference::{bert, gpt2, resnet, ModelDef, ResNetConfig, TransformerConfig};
use super::weights::weight_values;
use crate::error::{Error, Result};
use crate::kernels::conv::{conv2d_ref, global_avg_pool_ref, max_pool2d_ref, random_f32, Conv2dArgs, Pool2dArgs};
use crate::kernels::gemm::{gemm_ref_f32, Activation, GemmArgs};
use crate::kernels::llama_ref::{argmax_ref, cached_attention_ref, rmsnorm_ref, round_to, swiglu_ref, AttentionShape};
use crate::kernels::norm::{embedding_ref, layernorm_ref, EMBEDDING_BAD_ID, EMBEDDING_BAD_POS, EMBEDDING_BAD_TYPE};
use crate::store::Dtype;

/// A host tensor: a graph input's (or an activation's) values.
#[derive(Debug, Clone, PartialEq)]
pub enum HostTensor {
    F32(Vec<f32>),
    I32(Vec<i32>),
}

impl HostTensor {
    pub fn len(&self) -> usize {
        match self {
            HostTensor::F32(v) => v.len(),
            HostTensor::I32(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The values as little-endian bytes (what a worker's input takes).
    pub fn to_le_bytes(&self) -> Vec<u8> {
        match self {
            HostTensor::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            HostTensor::I32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }
    /// The dtype's name as in [`TensorDecl::dtype`] ("F32", "I32").
    pub fn dtype_name(&self) -> &'static str {
        match self {
            HostTensor::F32(_) => "F32",
            HostTensor::I32(_) => "I32",
        }
    }
}

/// Weights by name: (shape, values).
pub type HostWeights = HashMap<String, (Vec<usize>, Vec<f32>)>;

/// Where the worker rounds a linear's input to the weight's half type (its
/// tensor-core path, `worker::Program::tensor_core_rounding`): linears whose
/// weight is listed here as BF16 or F16 and whose input has at least
/// `min_rows` rows. The executor mirrors it exactly.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TensorCoreRounding {
    pub min_rows: usize,
    /// Stored dtype of each weight (those absent, or F32, are never rounded for).
    pub dtypes: HashMap<String, Dtype>,
}

impl TensorCoreRounding {
    /// The rounding of a reference model's linears from `min_rows` rows.
    pub fn of_def(def: &ModelDef, min_rows: usize) -> TensorCoreRounding {
        let dtypes = def.layers.iter().flat_map(|(_, ws)| ws.iter()).map(|w| (w.name.clone(), w.dtype)).collect();
        TensorCoreRounding { min_rows, dtypes }
    }

    /// The half type x of a linear with `rows` rows and weight `weight` is
    /// rounded to, if any.
    pub fn dtype_for(&self, weight: &str, rows: usize) -> Option<Dtype> {
        self.dtypes.get(weight).copied().filter(|d| matches!(d, Dtype::Bf16 | Dtype::F16) && rows >= self.min_rows)
    }
}

fn gemm_act(a: Act) -> Activation {
    match a {
        Act::None => Activation::None,
        Act::Relu => Activation::Relu,
        Act::Gelu => Activation::Gelu,
        Act::GeluTanh => Activation::GeluTanh,
    }
}

/// State of one run: declarations, weights and the tensors written so far.
struct Run<'a> {
    graph: &'a Graph,
    decls: HashMap<&'a str, &'a TensorDecl>,
    weights: &'a HostWeights,
    env: HashMap<String, HostTensor>,
    rounding: Option<&'a TensorCoreRounding>,
}

impl<'a> Run<'a> {
    fn decl(&self, name: &str) -> Result<&'a TensorDecl> {
        self.decls
            .get(name)
            .copied()
            .ok_or_else(|| Error::invalid(format!("graph {}: {name} is not an activation or input", self.graph.name)))
    }

    fn shape(&self, name: &str) -> Result<&'a [usize]> {
        Ok(&self.decl(name)?.shape)
    }

    fn f32(&self, name: &str) -> Result<&[f32]> {
        match self.env.get(name) {
            Some(HostTensor::F32(v)) => Ok(v),
            Some(HostTensor::I32(_)) => Err(Error::invalid(format!("graph {}: {name} is I32 where F32 is needed", self.graph.name))),
            None => Err(Error::invalid(format!("graph {}: {name} is read before it is written", self.graph.name))),
        }
    }

    fn i32(&self, name: &str) -> Result<&[i32]> {
        match self.env.get(name) {
            Some(HostTensor::I32(v)) => Ok(v),
            Some(HostTensor::F32(_)) => Err(Error::invalid(format!("graph {}: {name} is F32 where I32 is needed", self.graph.name))),
            None => Err(Error::invalid(format!("graph {}: {name} is read before it is written", self.graph.name))),
        }
    }

    /// A weight's values, checked against its declared shape.
    fn weight(&self, name: &str) -> Result<(&'a [usize], &'a [f32])> {
        let (shape, v) = self
            .weights
            .get(name)
            .ok_or_else(|| Error::invalid(format!("graph {}: weight {name} is missing", self.graph.name)))?;
        let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        if n != Some(v.len()) {
            return Err(Error::invalid(format!(
                "graph {}: weight {name} has {} values for shape {shape:?}",
                self.graph.name,
                v.len()
            )));
        }
        Ok((shape, v))
    }

    fn opt_weight(&self, name: &Option<String>) -> Result<Option<&'a [f32]>> {
        name.as_deref().map(|n| self.weight(n).map(|w| w.1)).transpose()
    }

    fn opt_f32(&self, name: &Option<String>) -> Result<Option<&[f32]>> {
        name.as_deref().map(|n| self.f32(n)).transpose()
    }

    /// Runs one op, returning its output's new value.
    fn op(&self, op: &Op) -> Result<Vec<f32>> {
        let out_decl = self.decl(op.output())?;
        if out_decl.dtype != "F32" {
            return Err(Error::invalid(format!("{} is {}, ops write F32", op.output(), out_decl.dtype)));
        }
        match op {
            Op::Embedding { ids, wte, wpe, token_type, type_ids, .. } => {
                let id_vals = self.i32(ids)?;
                let (wte_shape, wte_v) = self.weight(wte)?;
                let (_, wpe_v) = self.weight(wpe)?;
                let hidden = wte_shape.get(1).copied().unwrap_or(0);
                if hidden == 0 {
                    return Err(Error::invalid(format!("{wte} has hidden size 0")));
                }
                let wtt = match token_type {
                    Some(tt) => {
                        let (s, v) = self.weight(tt)?;
                        if s.len() != 2 || s[1] != hidden {
                            return Err(Error::invalid(format!("{tt} has shape {s:?}, not [types, {hidden}]")));
                        }
                        Some(v)
                    }
                    None => None,
                };
                let tt_vals = match type_ids {
                    Some(ti) if wtt.is_some() => Some(self.i32(ti)?),
                    _ => None,
                };
                // Position t % seq, seq = the last dim of ids ([batch, seq]).
                let seq = self.shape(ids)?.last().copied().unwrap_or(1);
                let (out, err) = embedding_ref(id_vals, None, tt_vals, wte_v, wpe_v, wtt, hidden, seq);
                if err & EMBEDDING_BAD_ID != 0 {
                    return Err(Error::invalid(format!("{ids} holds a token id outside [0, {})", wte_v.len() / hidden)));
                }
                if err & EMBEDDING_BAD_POS != 0 {
                    return Err(Error::invalid(format!("sequence length {seq} exceeds the {} rows of {wpe}", wpe_v.len() / hidden)));
                }
                if err & EMBEDDING_BAD_TYPE != 0 {
                    let ti = type_ids.as_deref().unwrap_or("token type 0");
                    return Err(Error::invalid(format!("{ti} holds a type outside the rows of {}", token_type.as_deref().unwrap_or(""))));
                }
                Ok(out)
            }
            Op::LayerNorm { x, residual, gamma, beta, eps, .. } => {
                let xv = self.f32(x)?;
                let r = self.opt_f32(residual)?;
                let (g, b) = (self.weight(gamma)?.1, self.weight(beta)?.1);
                if g.is_empty() {
                    return Err(Error::invalid(format!("layer norm over an empty last dim of {x}")));
                }
                if !eps.is_finite() || *eps < 0.0 {
                    return Err(Error::invalid(format!("layer norm eps {eps} must be finite and >= 0")));
                }
                Ok(layernorm_ref(xv, r, g, b, *eps).0)
            }
            Op::Linear { x, weight, bias, trans_b, act, residual, out, out_col } => {
                if x == out {
                    return Err(Error::invalid(format!("linear: x and out are the same tensor {out}")));
                }
                let xs = self.shape(x)?;
                let (ws, wv) = self.weight(weight)?;
                let (m, k) = (xs[0], xs[1]);
                let rounded: Vec<f32>;
                let xv = match self.rounding.and_then(|r| r.dtype_for(weight, m)) {
                    Some(dt) => {
                        rounded = self.f32(x)?.iter().map(|&v| round_to(dt, v)).collect();
                        &rounded
                    }
                    None => self.f32(x)?,
                };
                let n = if *trans_b { ws[0] } else { ws[1] };
                if m == 0 || n == 0 || k == 0 {
                    return Err(Error::invalid(format!("linear: empty problem ({x} {xs:?} times {weight} {ws:?})")));
                }
                let ldc = out_decl.shape[1];
                let mut c = match self.env.get(out.as_str()) {
                    Some(HostTensor::F32(v)) => v.clone(),
                    _ => vec![0f32; out_decl.numel()],
                };
                let mut g = GemmArgs::dense(m, n, k, 0, 0, *trans_b, 0);
                g.ldc = ldc;
                g.act = gemm_act(*act);
                // A residual covers the whole output (out_col 0; Graph::validate).
                gemm_ref_f32(&g, xv, wv, self.opt_weight(bias)?, self.opt_f32(residual)?, &mut c[*out_col..])?;
                Ok(c)
            }
            Op::Attention { qkv, heads, seq, causal, .. } => {
                let q = self.f32(qkv)?;
                let qs = self.shape(qkv)?;
                let hidden = qs[1] / 3;
                let head_dim = hidden / heads;
                if head_dim == 0 {
                    return Err(Error::invalid(format!("attention over {qkv}: head dim 0")));
                }
                Ok(crate::kernels::attention::attention_ref(q, None, qs[0] / seq, *seq, *heads, head_dim, *causal))
            }
            Op::Conv2d { x, weight, bias, stride, pad, residual, relu, out } => {
                if x == out {
                    return Err(Error::invalid(format!("conv2d: x and out are the same tensor {out}")));
                }
                let xs = self.shape(x)?;
                let (ws, wv) = self.weight(weight)?;
                let mut a = Conv2dArgs::shape(xs[0], xs[1], xs[2], xs[3], ws[0], ws[2], ws[3], *stride, *pad);
                a.relu = *relu;
                conv2d_ref(&a, self.f32(x)?, wv, self.opt_weight(bias)?, self.opt_f32(residual)?)
            }
            Op::MaxPool { x, kernel, stride, pad, .. } => {
                let xs = self.shape(x)?;
                max_pool2d_ref(&Pool2dArgs::square(xs[0], xs[1], xs[2], xs[3], *kernel, *stride, *pad), self.f32(x)?)
            }
            Op::GlobalAvgPool { x, .. } => {
                let xs = self.shape(x)?;
                global_avg_pool_ref(self.f32(x)?, xs[0], xs[1], xs[2], xs[3])
            }
            Op::TokenEmbedding { .. } | Op::RmsNorm { .. } | Op::CachedAttention { .. } | Op::SwiGlu { .. } | Op::Argmax { .. } => {
                Err(Error::Internal(format!("{} is run by llama_op", op.kind())))
            }
        }
    }

    /// Runs one of the Llama ops (those that may write state or an I32
    /// output); None for any other op.
    fn llama_op(&mut self, op: &Op) -> Result<Option<HostTensor>> {
        Ok(Some(match op {
            Op::TokenEmbedding { ids, table, .. } => {
                let (ts, tv) = self.weight(table)?;
                let h = ts[1];
                let mut out = Vec::with_capacity(self.i32(ids)?.len() * h);
                for &id in self.i32(ids)? {
                    if id < 0 || id as usize >= ts[0] {
                        return Err(Error::invalid(format!("{ids} holds a token id {id} outside [0, {})", ts[0])));
                    }
                    out.extend_from_slice(&tv[id as usize * h..(id as usize + 1) * h]);
                }
                HostTensor::F32(out)
            }
            Op::RmsNorm { x, weight, eps, last_of, .. } => HostTensor::F32(rmsnorm_ref(self.f32(x)?, self.weight(weight)?.1, *eps, *last_of)?),
            Op::SwiGlu { x, .. } => HostTensor::F32(swiglu_ref(self.f32(x)?, self.shape(x)?[1])?),
            Op::Argmax { x, .. } => HostTensor::I32(argmax_ref(self.f32(x)?, self.shape(x)?[1])?),
            Op::CachedAttention { qkv, rope, pos, k_cache, v_cache, heads, kv_heads, seq, .. } => {
                let qs = self.shape(qkv)?;
                let cs = self.shape(k_cache)?;
                let (rs, rv) = self.weight(rope)?;
                let cache_dtype = self.decl(k_cache)?.dtype()?;
                let sh = AttentionShape { batch: qs[0] / seq, seq: *seq, heads: *heads, kv_heads: *kv_heads, head_dim: cs[3], max_seq: cs[2], max_pos: rs[0] };
                let p = self.i32(pos)?[0];
                let mut kc = match self.env.remove(k_cache.as_str()) {
                    Some(HostTensor::F32(v)) => v,
                    _ => return Err(Error::invalid(format!("state {k_cache} is missing"))),
                };
                let mut vc = match self.env.remove(v_cache.as_str()) {
                    Some(HostTensor::F32(v)) => v,
                    _ => return Err(Error::invalid(format!("state {v_cache} is missing"))),
                };
                let r = cached_attention_ref(self.f32(qkv)?, rv, p, &mut kc, &mut vc, cache_dtype, sh);
                self.env.insert(k_cache.clone(), HostTensor::F32(kc));
                self.env.insert(v_cache.clone(), HostTensor::F32(vc));
                HostTensor::F32(r?)
            }
            _ => return Ok(None),
        }))
    }
}

/// Runs `graph` on the CPU with the kernels' references and returns every
/// tensor named in `graph.outputs`. `weights` maps each stored tensor's
/// name to (shape, values); `inputs` holds every graph input with its
/// declared dtype and element count. Errors (never panics) on a graph that
/// does not validate against the weights' shapes, a missing or mis-sized
/// input or weight, an out-of-range token id, and anything a kernel
/// reference rejects; messages name the tensor.
pub fn run_graph_cpu(graph: &Graph, weights: &HostWeights, inputs: &HashMap<String, HostTensor>) -> Result<HashMap<String, Vec<f32>>> {
    let mut state = HashMap::new();
    run_graph_cpu_with_state(graph, weights, inputs, &mut state)
}

/// [`run_graph_cpu`] with the graph's state tensors (a KV cache) kept in
/// `state` from one call to the next: a missing state tensor starts as
/// zeros (as the worker's buffer), stored as f32 values (rounded to the
/// declared dtype by the ops that write them). I32 outputs (argmax) come
/// back as f32 values (exact below 2^24).
pub fn run_graph_cpu_with_state(
    graph: &Graph,
    weights: &HostWeights,
    inputs: &HashMap<String, HostTensor>,
    state: &mut HashMap<String, Vec<f32>>,
) -> Result<HashMap<String, Vec<f32>>> {
    run_graph_cpu_rounded(graph, weights, inputs, state, None)
}

/// [`run_graph_cpu_with_state`] with the inputs of half-precision linears
/// rounded as the worker's tensor-core path rounds them (`rounding`; None:
/// never, as the GEMV path).
pub fn run_graph_cpu_rounded(
    graph: &Graph,
    weights: &HostWeights,
    inputs: &HashMap<String, HostTensor>,
    state: &mut HashMap<String, Vec<f32>>,
    rounding: Option<&TensorCoreRounding>,
) -> Result<HashMap<String, Vec<f32>>> {
    let shapes: WeightShapes = weights.iter().map(|(n, (s, _))| (n.clone(), s.clone())).collect();
    graph.validate(&shapes)?;
    let mut run = Run {
        graph,
        decls: graph.inputs.iter().chain(&graph.activations).chain(&graph.state).map(|(n, d)| (n.as_str(), d)).collect(),
        weights,
        env: HashMap::new(),
        rounding,
    };
    for (name, decl) in &graph.state {
        let v = state.remove(name).unwrap_or_else(|| vec![0f32; decl.numel()]);
        if v.len() != decl.numel() {
            return Err(Error::invalid(format!("graph {}: state {name} has {} values, its shape {:?} needs {}", graph.name, v.len(), decl.shape, decl.numel())));
        }
        run.env.insert(name.clone(), HostTensor::F32(v));
    }
    for (name, decl) in &graph.inputs {
        let t = inputs.get(name).ok_or_else(|| Error::invalid(format!("graph {}: input {name} is missing", graph.name)))?;
        if t.dtype_name() != decl.dtype {
            return Err(Error::invalid(format!("graph {}: input {name} is {}, declared {}", graph.name, t.dtype_name(), decl.dtype)));
        }
        if t.len() != decl.numel() {
            return Err(Error::invalid(format!(
                "graph {}: input {name} has {} values, its shape {:?} needs {}",
                graph.name,
                t.len(),
                decl.shape,
                decl.numel()
            )));
        }
        run.env.insert(name.clone(), t.clone());
    }
    for op in &graph.ops {
        let v = run
            .llama_op(op)
            .and_then(|v| match v {
                Some(v) => Ok(v),
                None => run.op(op).map(HostTensor::F32),
            })
            .map_err(|e| {
                let msg = match e {
                    Error::InvalidArgument(m) => m,
                    e => e.to_string(),
                };
                Error::invalid(format!("graph {}: {} op -> {}: {msg}", graph.name, op.kind(), op.output()))
            });
        let v = match v {
            Ok(v) => v,
            Err(e) => {
                // Keep the state the failed run had (as the GPU's buffer).
                for (name, _) in &graph.state {
                    if let Some(HostTensor::F32(v)) = run.env.remove(name) {
                        state.insert(name.clone(), v);
                    }
                }
                return Err(e);
            }
        };
        run.env.insert(op.output().to_string(), v);
    }
    for (name, _) in &graph.state {
        if let Some(HostTensor::F32(v)) = run.env.remove(name) {
            state.insert(name.clone(), v);
        }
    }
    graph
        .outputs
        .iter()
        .map(|o| match run.env.get(o) {
            Some(HostTensor::F32(v)) => Ok((o.clone(), v.clone())),
            Some(HostTensor::I32(v)) => Ok((o.clone(), v.iter().map(|&i| i as f32).collect())),
            _ => Err(Error::invalid(format!("graph {}: output {o} was not written", graph.name))),
        })
        .collect()
}

/// Every weight of `def` with its deterministic values ([`weight_values`]).
pub fn reference_weights(def: &ModelDef, seed: u64) -> HostWeights {
    def.layers.iter().flat_map(|(_, ws)| ws.iter()).map(|w| (w.name.clone(), (w.shape.clone(), weight_values(w, seed)))).collect()
}

fn name_seed(name: &str, seed: u64) -> u64 {
    name.bytes().fold(seed ^ 0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Deterministic values for every input of `graph` (the same for the same
/// graph, seed and vocab). Convention, by declared dtype and name:
///
/// - `I32` named `token_type_ids` (or ending in it): segment ids, 0 in the
///   first half of each sequence and 1 in the second (position `p` of a
///   sequence of `seq` = the last dim gets 1 when `2p >= seq`);
/// - other `I32` inputs whose name ends in `ids`: token ids uniform in
///   `[0, vocab)` (all 0 when `vocab` is 0);
/// - any other `I32` input: zeros;
/// - every other dtype: `F32` values uniform in `[-1, 1)` (images).
pub fn example_inputs(graph: &Graph, seed: u64, vocab: usize) -> HashMap<String, HostTensor> {
    graph
        .inputs
        .iter()
        .map(|(name, decl)| {
            let n = decl.numel();
            let mut s = name_seed(name, seed);
            let t = if decl.dtype == "I32" {
                if name.ends_with("token_type_ids") {
                    let seq = decl.shape.last().copied().unwrap_or(1).max(1);
                    HostTensor::I32((0..n).map(|t| i32::from(2 * (t % seq) >= seq)).collect())
                } else if name.ends_with("ids") && vocab > 0 {
                    HostTensor::I32((0..n).map(|_| (splitmix(&mut s) % vocab as u64) as i32).collect())
                } else {
                    HostTensor::I32(vec![0; n])
                }
            } else {
                HostTensor::F32(random_f32(n, s))
            };
            (name.clone(), t)
        })
        .collect()
}

/// Small models of the reference structures, for tests (CPU reference and
/// GPU): "tiny-resnet" (bottleneck blocks [1,1,1,1], width 8, 32x32 images,
/// 10 classes), "tiny-bert" and "tiny-gpt2" (2 layers, hidden 128, 2 heads of
/// 64, ffn 256, vocab 100, 64 positions), all at `batch` and `seq`; and two
/// with sizes that are multiples of no tile, at a fixed batch 3 and seq 7
/// whatever the arguments: "odd-gpt2" (hidden 192 = 3 heads of 64, ffn 200,
/// vocab 97) and "odd-resnet" (width 12, 30x30 images, 7 classes). Head dims
/// are 64, the only one the GPU attention kernel runs. Position tables have
/// `max(64, seq)` rows.
pub fn tiny_models(batch: usize, seq: usize) -> Vec<ModelDef> {
    let pos = seq.max(64);
    let tiny = TransformerConfig { layers: 2, hidden: 128, heads: 2, ffn: 256, vocab: 100, max_positions: pos };
    let odd = TransformerConfig { layers: 2, hidden: 192, heads: 3, ffn: 200, vocab: 97, max_positions: 64 };
    vec![
        resnet("tiny-resnet", ResNetConfig { blocks: [1, 1, 1, 1], width: 8, image: 32, classes: 10 }, batch),
        bert("tiny-bert", tiny, batch, seq),
        gpt2("tiny-gpt2", tiny, batch, seq),
        gpt2("odd-gpt2", odd, 3, 7),
        resnet("odd-resnet", ResNetConfig { blocks: [1, 1, 1, 1], width: 12, image: 30, classes: 7 }, 3),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(name: &str, batch: usize, seq: usize) -> ModelDef {
        tiny_models(batch, seq).into_iter().find(|m| m.graph.name == name).unwrap()
    }

    fn vocab(m: &ModelDef) -> usize {
        m.vocab()
    }

    fn run1(m: &ModelDef, w: &HostWeights, inp: &HashMap<String, HostTensor>) -> Vec<f32> {
        run_graph_cpu(&m.graph, w, inp).unwrap().remove(&m.graph.outputs[0]).unwrap()
    }

    fn close(a: f32, b: f64, tol: f64) -> bool {
        (f64::from(a) - b).abs() <= tol * (1.0 + b.abs())
    }

    fn wmap(ws: &[(&str, &[usize], Vec<f32>)]) -> HostWeights {
        ws.iter().map(|(n, s, v)| (n.to_string(), (s.to_vec(), v.clone()))).collect()
    }

    fn gelu_tanh(x: f64) -> f64 {
        0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh())
    }

    #[test]
    fn linear_packed_columns_and_residual_after_activation() {
        let (m, k) = (3, 5);
        let x = random_f32(m * k, 1);
        let r = random_f32(m * 4, 2);
        let wa = random_f32(2 * k, 3); // [2, 5], trans_b
        let ba = random_f32(2, 4);
        let wb = random_f32(k * 4, 5); // [5, 4]
        let wc = random_f32(4 * 6, 6); // [4, 6], trans_b
        let bc = random_f32(4, 7);
        let lin = |x: &str, w: &str, bias: Option<&str>, trans_b, act, residual: Option<&str>, out: &str, out_col| Op::Linear {
            x: x.into(),
            weight: w.into(),
            bias: bias.map(Into::into),
            trans_b,
            act,
            residual: residual.map(Into::into),
            out: out.into(),
            out_col,
        };
        let g = Graph {
            name: "lin".into(),
            inputs: vec![("x".into(), TensorDecl::f32(&[m, k])), ("r".into(), TensorDecl::f32(&[m, 4]))],
            activations: vec![("packed".into(), TensorDecl::f32(&[m, 6])), ("y".into(), TensorDecl::f32(&[m, 4]))],
            outputs: vec!["packed".into(), "y".into()],
            state: vec![],
            ops: vec![
                lin("x", "wa", Some("ba"), true, Act::GeluTanh, None, "packed", 4),
                lin("x", "wb", None, false, Act::None, None, "packed", 0),
                lin("packed", "wc", Some("bc"), true, Act::Relu, Some("r"), "y", 0),
            ],
        };
        let w = wmap(&[
            ("wa", &[2, k], wa.clone()),
            ("ba", &[2], ba.clone()),
            ("wb", &[k, 4], wb.clone()),
            ("wc", &[4, 6], wc.clone()),
            ("bc", &[4], bc.clone()),
        ]);
        let inp = HashMap::from([("x".to_string(), HostTensor::F32(x.clone())), ("r".to_string(), HostTensor::F32(r.clone()))]);
        let out = run_graph_cpu(&g, &w, &inp).unwrap();
        let (packed, y) = (&out["packed"], &out["y"]);
        let f = |v: f32| f64::from(v);
        let mut want_p = vec![0f64; m * 6];
        for i in 0..m {
            for j in 0..4 {
                want_p[i * 6 + j] = (0..k).map(|q| f(x[i * k + q]) * f(wb[q * 4 + j])).sum();
            }
            for j in 0..2 {
                want_p[i * 6 + 4 + j] = gelu_tanh((0..k).map(|q| f(x[i * k + q]) * f(wa[j * k + q])).sum::<f64>() + f(ba[j]));
            }
        }
        for (i, (&got, &want)) in packed.iter().zip(&want_p).enumerate() {
            assert!(close(got, want, 1e-6), "packed[{i}] = {got}, want {want}");
        }
        let mut order_matters = false;
        for i in 0..m {
            for j in 0..4 {
                let pre: f64 = (0..6).map(|q| want_p[i * 6 + q] * f(wc[j * 6 + q])).sum::<f64>() + f(bc[j]);
                let want = pre.max(0.0) + f(r[i * 4 + j]);
                let got = y[i * 4 + j];
                assert!(close(got, want, 1e-5), "y[{i},{j}] = {got}, want {want}");
                order_matters |= ((pre + f(r[i * 4 + j])).max(0.0) - want).abs() > 1e-3;
            }
        }
        assert!(order_matters, "the test data cannot tell act(x)+r from act(x+r)");
    }

    #[test]
    fn conv2d_adds_residual_before_relu() {
        let (n, c, h, wd, k, rs, stride, pad) = (2, 3, 5, 5, 4, 3, 2, 1);
        let (p, q) = ((h + 2 * pad - rs) / stride + 1, (wd + 2 * pad - rs) / stride + 1);
        let x = random_f32(n * c * h * wd, 11);
        let wt = random_f32(k * c * rs * rs, 12);
        let b = random_f32(k, 13);
        let res = random_f32(n * k * p * q, 14);
        let g = Graph {
            name: "conv".into(),
            inputs: vec![("x".into(), TensorDecl::f32(&[n, c, h, wd])), ("res".into(), TensorDecl::f32(&[n, k, p, q]))],
            activations: vec![("y".into(), TensorDecl::f32(&[n, k, p, q]))],
            outputs: vec!["y".into()],
            state: vec![],
            ops: vec![Op::Conv2d {
                x: "x".into(),
                weight: "w".into(),
                bias: Some("b".into()),
                stride,
                pad,
                residual: Some("res".into()),
                relu: true,
                out: "y".into(),
            }],
        };
        let w = wmap(&[("w", &[k, c, rs, rs], wt.clone()), ("b", &[k], b.clone())]);
        let inp = HashMap::from([("x".to_string(), HostTensor::F32(x.clone())), ("res".to_string(), HostTensor::F32(res.clone()))]);
        let y = &run_graph_cpu(&g, &w, &inp).unwrap()["y"];
        assert_eq!(y.len(), n * k * p * q);
        let mut order_matters = false;
        for ni in 0..n {
            for ki in 0..k {
                for pi in 0..p {
                    for qi in 0..q {
                        let mut acc = f64::from(b[ki]);
                        for ci in 0..c {
                            for ri in 0..rs {
                                for si in 0..rs {
                                    let (ih, iw) = ((pi * stride + ri) as isize - pad as isize, (qi * stride + si) as isize - pad as isize);
                                    if ih >= 0 && iw >= 0 && (ih as usize) < h && (iw as usize) < wd {
                                        acc += f64::from(x[((ni * c + ci) * h + ih as usize) * wd + iw as usize]) * f64::from(wt[((ki * c + ci) * rs + ri) * rs + si]);
                                    }
                                }
                            }
                        }
                        let o = ((ni * k + ki) * p + pi) * q + qi;
                        let want = (acc + f64::from(res[o])).max(0.0);
                        assert!(close(y[o], want, 1e-6), "y[{o}] = {}, want {want}", y[o]);
                        order_matters |= (acc.max(0.0) + f64::from(res[o]) - want).abs() > 1e-3;
                    }
                }
            }
        }
        assert!(order_matters);
    }

    #[test]
    fn embedding_uses_position_modulo_seq_and_token_types() {
        let (batch, seq, hidden) = (2, 3, 4);
        let (wte, wpe, wtt) = (random_f32(5 * hidden, 21), random_f32(4 * hidden, 22), random_f32(2 * hidden, 23));
        let ids = vec![4, 0, 2, 1, 3, 4];
        let types = vec![0, 1, 1, 0, 0, 1];
        let g = Graph {
            name: "emb".into(),
            inputs: vec![("ids".into(), TensorDecl::i32(&[batch, seq])), ("tt".into(), TensorDecl::i32(&[batch, seq]))],
            activations: vec![("e".into(), TensorDecl::f32(&[batch * seq, hidden]))],
            outputs: vec!["e".into()],
            state: vec![],
            ops: vec![Op::Embedding {
                ids: "ids".into(),
                wte: "wte".into(),
                wpe: "wpe".into(),
                token_type: Some("wtt".into()),
                type_ids: Some("tt".into()),
                out: "e".into(),
            }],
        };
        let w = wmap(&[("wte", &[5, hidden], wte.clone()), ("wpe", &[4, hidden], wpe.clone()), ("wtt", &[2, hidden], wtt.clone())]);
        let mut inp = HashMap::from([("ids".to_string(), HostTensor::I32(ids.clone())), ("tt".to_string(), HostTensor::I32(types.clone()))]);
        let e = &run_graph_cpu(&g, &w, &inp).unwrap()["e"];
        for t in 0..batch * seq {
            for j in 0..hidden {
                let want = wte[ids[t] as usize * hidden + j] + wpe[(t % seq) * hidden + j] + wtt[types[t] as usize * hidden + j];
                assert_eq!(e[t * hidden + j], want, "token {t}, column {j}");
            }
        }
        inp.insert("tt".into(), HostTensor::I32(vec![0, 0, 2, 0, 0, 0]));
        let err = run_graph_cpu(&g, &w, &inp).unwrap_err().to_string();
        assert!(err.contains("tt"), "{err}");
    }

    #[test]
    fn gpt2_is_causal() {
        let (batch, seq) = (2, 8);
        let m = model("tiny-gpt2", batch, seq);
        let w = reference_weights(&m, 1);
        let mut inp = example_inputs(&m.graph, 2, vocab(&m));
        let base = run1(&m, &w, &inp);
        let h = base.len() / (batch * seq);
        assert_eq!(h, 128);
        let HostTensor::I32(ids) = inp.get_mut("input_ids").unwrap() else { panic!("ids are I32") };
        ids[seq - 1] = (ids[seq - 1] + 1) % 100; // the last token of sequence 0
        let changed = run1(&m, &w, &inp);
        let row = |v: &[f32], t: usize| v[t * h..(t + 1) * h].to_vec();
        for t in 0..seq - 1 {
            assert_eq!(row(&base, t), row(&changed, t), "position {t} saw a later token");
        }
        assert_ne!(row(&base, seq - 1), row(&changed, seq - 1), "the changed token's own output");
        assert_eq!(base[seq * h..], changed[seq * h..], "sequence 1 saw sequence 0");
    }

    #[test]
    fn bert_is_bidirectional() {
        let (batch, seq) = (2, 8);
        let m = model("tiny-bert", batch, seq);
        let w = reference_weights(&m, 1);
        let mut inp = example_inputs(&m.graph, 2, vocab(&m));
        let base = run1(&m, &w, &inp);
        let h = base.len() / (batch * seq);
        let HostTensor::I32(ids) = inp.get_mut("input_ids").unwrap() else { panic!("ids are I32") };
        ids[seq - 1] = (ids[seq - 1] + 1) % 100;
        let changed = run1(&m, &w, &inp);
        assert!(base[..h].iter().zip(&changed[..h]).any(|(a, b)| (a - b).abs() > 1e-6), "position 0 did not see the last token");
        assert_eq!(base[seq * h..], changed[seq * h..], "sequence 1 saw sequence 0");
    }

    /// The last op of each transformer is a LayerNorm with gamma 1, beta 0:
    /// every output row has mean 0 and variance v / (v + eps), v the
    /// variance of the row going in (~1 for BERT's eps 1e-12).
    #[test]
    fn final_layer_norm_rows_are_normalized() {
        for name in ["tiny-bert", "tiny-gpt2", "odd-gpt2"] {
            let mut m = model(name, 2, 5);
            let Some(Op::LayerNorm { x, eps, .. }) = m.graph.ops.last().cloned() else { panic!("{name}: last op is not a LayerNorm") };
            m.graph.outputs.push(x.clone());
            let w = reference_weights(&m, 3);
            let out = run_graph_cpu(&m.graph, &w, &example_inputs(&m.graph, 4, vocab(&m))).unwrap();
            let (y, pre) = (&out[&m.graph.outputs[0]], &out[&x]);
            let h = m.graph.activations.iter().find(|(n, _)| n == &x).unwrap().1.shape[1];
            let stats = |r: &[f32]| {
                let mean = r.iter().map(|&v| f64::from(v)).sum::<f64>() / h as f64;
                (mean, r.iter().map(|&v| (f64::from(v) - mean).powi(2)).sum::<f64>() / h as f64)
            };
            for (t, (yr, xr)) in y.chunks(h).zip(pre.chunks(h)).enumerate() {
                let (mean, var) = stats(yr);
                let v_in = stats(xr).1;
                let want = v_in / (v_in + f64::from(eps));
                assert!(mean.abs() < 1e-5, "{name} row {t}: mean {mean}");
                assert!((var - want).abs() < 1e-4 && (var - 1.0).abs() < 0.05, "{name} row {t}: var {var}, want {want}");
            }
        }
    }

    #[test]
    fn resnet_logits_have_the_right_shape_and_batch_items_are_independent() {
        let m = model("tiny-resnet", 2, 1);
        let w = reference_weights(&m, 5);
        let mut inp = example_inputs(&m.graph, 6, 0);
        let base = run1(&m, &w, &inp);
        let decl = &m.graph.activations.iter().find(|(n, _)| n == &m.graph.outputs[0]).unwrap().1;
        assert_eq!(decl.shape, [2, 10]);
        assert_eq!(base.len(), 20);
        assert!(base.iter().all(|v| v.is_finite()));
        let HostTensor::F32(img) = inp.get_mut("images").unwrap() else { panic!("images are F32") };
        let per = img.len() / 2;
        img[per..].copy_from_slice(&random_f32(per, 99));
        let changed = run1(&m, &w, &inp);
        assert_eq!(base[..10], changed[..10], "image 0's logits depend on image 1");
        assert_ne!(base[10..], changed[10..], "image 1's logits did not change");
    }

    #[test]
    fn every_tiny_model_validates_and_runs_to_finite_outputs() {
        let models = tiny_models(2, 4);
        let names: Vec<&str> = models.iter().map(|m| m.graph.name.as_str()).collect();
        assert_eq!(names, ["tiny-resnet", "tiny-bert", "tiny-gpt2", "odd-gpt2", "odd-resnet"]);
        for m in &models {
            m.graph.validate(&m.weight_shapes()).unwrap();
            let out = run_graph_cpu(&m.graph, &reference_weights(m, 7), &example_inputs(&m.graph, 8, vocab(m))).unwrap();
            let o = &out[&m.graph.outputs[0]];
            let decl = &m.graph.activations.iter().find(|(n, _)| n == &m.graph.outputs[0]).unwrap().1;
            assert_eq!(o.len(), decl.numel(), "{}", m.graph.name);
            assert!(o.iter().all(|v| v.is_finite()) && o.iter().any(|&v| v != 0.0), "{}", m.graph.name);
        }
        assert_eq!(models[3].graph.inputs[0].1.shape, [3, 7]);
        assert_eq!(models[4].graph.activations.iter().find(|(n, _)| n == "logits").unwrap().1.shape, [3, 7]);
    }

    #[test]
    fn example_inputs_follow_the_convention_and_are_deterministic() {
        let m = model("tiny-bert", 2, 5);
        let a = example_inputs(&m.graph, 9, 100);
        assert_eq!(a, example_inputs(&m.graph, 9, 100));
        assert_ne!(a, example_inputs(&m.graph, 10, 100));
        assert_eq!(a["token_type_ids"], HostTensor::I32(vec![0, 0, 0, 1, 1, 0, 0, 0, 1, 1]));
        let even = model("tiny-bert", 1, 4);
        assert_eq!(example_inputs(&even.graph, 9, 100)["token_type_ids"], HostTensor::I32(vec![0, 0, 1, 1]));
        let HostTensor::I32(ids) = &a["input_ids"] else { panic!("ids are I32") };
        assert!(ids.len() == 10 && ids.iter().all(|&i| (0..100).contains(&i)) && ids.iter().any(|&i| i != ids[0]));
        let r = model("odd-resnet", 1, 1);
        let HostTensor::F32(img) = &example_inputs(&r.graph, 1, 0)["images"] else { panic!("images are F32") };
        assert_eq!(img.len(), 3 * 3 * 30 * 30);
        assert!(img.iter().all(|v| (-1.0..1.0).contains(v)) && img.iter().any(|&v| v < -0.5) && img.iter().any(|&v| v > 0.5));
        let w = reference_weights(&m, 1);
        assert_eq!(w.len(), m.weight_shapes().len());
        assert_eq!(w["embeddings.LayerNorm.weight"], (vec![128], vec![1.0; 128]));
    }

    #[test]
    fn errors_name_the_tensor() {
        let m = model("tiny-gpt2", 1, 4);
        let w = reference_weights(&m, 1);
        let inp = example_inputs(&m.graph, 1, 100);
        let err = |w: &HostWeights, i: &HashMap<String, HostTensor>| run_graph_cpu(&m.graph, w, i).unwrap_err().to_string();

        let mut missing = inp.clone();
        missing.remove("input_ids");
        let e = err(&w, &missing);
        assert!(e.contains("input_ids") && e.contains("missing"), "{e}");

        let mut long = inp.clone();
        long.insert("input_ids".into(), HostTensor::I32(vec![1; 5]));
        let e = err(&w, &long);
        assert!(e.contains("input_ids") && e.contains("5 values"), "{e}");

        let mut dtype = inp.clone();
        dtype.insert("input_ids".into(), HostTensor::F32(vec![1.0; 4]));
        assert!(err(&w, &dtype).contains("input_ids"));

        let mut bad_id = inp.clone();
        bad_id.insert("input_ids".into(), HostTensor::I32(vec![1, 2, 100, 3]));
        assert!(err(&w, &bad_id).contains("input_ids"));

        let mut no_w = w.clone();
        no_w.remove("h.1.mlp.c_fc.weight");
        let e = err(&no_w, &inp);
        assert!(e.contains("h.1.mlp.c_fc.weight"), "{e}");

        let mut short_w = w.clone();
        short_w.get_mut("h.0.attn.c_attn.bias").unwrap().1.pop();
        let e = err(&short_w, &inp);
        assert!(e.contains("h.0.attn.c_attn.bias"), "{e}");

        run_graph_cpu(&m.graph, &w, &inp).unwrap();
    }

    /// Shapes that Graph::validate lets through but the references cannot
    /// run give errors, not panics.
    #[test]
    fn degenerate_shapes_are_errors_not_panics() {
        let one = |input: TensorDecl, out: TensorDecl, op: Op, w: HostWeights, v: HostTensor| {
            let g = Graph {
                name: "degenerate".into(),
                inputs: vec![("x".into(), input)],
                activations: vec![("y".into(), out)],
                outputs: vec!["y".into()],
                state: vec![],
                ops: vec![op],
            };
            run_graph_cpu(&g, &w, &HashMap::from([("x".to_string(), v)])).unwrap_err().to_string()
        };
        let linear = Op::Linear { x: "x".into(), weight: "w".into(), bias: None, trans_b: false, act: Act::None, residual: None, out: "y".into(), out_col: 1 };
        let e = one(TensorDecl::f32(&[0, 3]), TensorDecl::f32(&[0, 4]), linear, wmap(&[("w", &[3, 3], vec![0.0; 9])]), HostTensor::F32(vec![]));
        assert!(e.contains("empty"), "{e}");
        let ln = Op::LayerNorm { x: "x".into(), residual: None, gamma: "g".into(), beta: "b".into(), eps: 1e-5, out: "y".into() };
        let e = one(TensorDecl::f32(&[2, 0]), TensorDecl::f32(&[2, 0]), ln, wmap(&[("g", &[0], vec![]), ("b", &[0], vec![])]), HostTensor::F32(vec![]));
        assert!(e.contains("empty last dim"), "{e}");
        let emb = Op::Embedding { ids: "x".into(), wte: "wte".into(), wpe: "wpe".into(), token_type: None, type_ids: None, out: "y".into() };
        let e = one(TensorDecl::i32(&[1, 2]), TensorDecl::f32(&[2, 0]), emb, wmap(&[("wte", &[5, 0], vec![]), ("wpe", &[3, 0], vec![])]), HostTensor::I32(vec![0, 1]));
        assert!(e.contains("hidden size 0"), "{e}");
    }
}
