//! Model definitions as data: a graph of ops over named tensors, read by the
//! worker (no code per model). Weights are named as in the store; the
//! worker finds each op's layer (and so its group) from its weights' names.
//! Activations are declared with their shapes and live in the workspace.

use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};

use crate::error::{Error, Result};
use crate::store::Dtype;

/// Activation function fused into an op's epilogue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Act {
    #[default]
    None,
    Relu,
    Gelu,
    GeluTanh,
}

/// One op. Tensor operands are names: weights (stored tensors) or
/// activations (declared in [`Graph::activations`] or [`Graph::inputs`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// out[t] = wte[ids[t]] + wpe[t % seq] (+ token_type[type_ids[t]]).
    Embedding {
        ids: String,
        wte: String,
        wpe: String,
        #[serde(default)]
        token_type: Option<String>,
        #[serde(default)]
        type_ids: Option<String>,
        out: String,
    },
    /// out = LN(x (+ residual)) over the last dim.
    LayerNorm {
        x: String,
        #[serde(default)]
        residual: Option<String>,
        gamma: String,
        beta: String,
        eps: f32,
        out: String,
    },
    /// out[:, col..col+N] = act(x · op(weight) + bias) (+ residual); x is
    /// [M, K]; weight is [K, N] (`trans_b` false) or [N, K] (true).
    Linear {
        x: String,
        weight: String,
        #[serde(default)]
        bias: Option<String>,
        trans_b: bool,
        #[serde(default)]
        act: Act,
        #[serde(default)]
        residual: Option<String>,
        out: String,
        /// First column of `out` written (packed outputs such as Q|K|V).
        #[serde(default)]
        out_col: usize,
    },
    /// Multi-head self-attention over a packed [B*S, 3H] Q|K|V buffer.
    Attention { qkv: String, heads: usize, seq: usize, causal: bool, out: String },
    /// NCHW convolution with folded batch norm (bias), optional residual and ReLU.
    Conv2d {
        x: String,
        weight: String,
        #[serde(default)]
        bias: Option<String>,
        stride: usize,
        pad: usize,
        #[serde(default)]
        residual: Option<String>,
        relu: bool,
        out: String,
    },
    MaxPool { x: String, kernel: usize, stride: usize, pad: usize, out: String },
    GlobalAvgPool { x: String, out: String },
    /// out[t] = table[ids[t]] in f32 (a token table without positions, as
    /// Llama's; the table may be BF16, F16 or F32).
    TokenEmbedding { ids: String, table: String, out: String },
    /// out = x / sqrt(mean(x^2) + eps) * weight over the last dim, statistics
    /// in f32. With `last_of: Some(s)`, only the last row of every `s` rows
    /// (the last token of each sequence): out has rows / s rows.
    RmsNorm {
        x: String,
        weight: String,
        eps: f32,
        #[serde(default)]
        last_of: Option<usize>,
        out: String,
    },
    /// Llama attention with a KV cache (grouped-query, rotary). `qkv` is
    /// `[T, (heads + 2 kv_heads) d]` (Q | K | V, heads of `d` columns),
    /// `T = B * seq`; token `t` is at position `pos[0] + t % seq` of sequence
    /// `t / seq`. Rotary embeddings (HF's rotate-half convention, cos and sin
    /// from `rope`, a `[max_pos, d]` table: cos in the first d/2 columns,
    /// sin in the rest) are applied to Q and K; K and V are written, rounded
    /// to the cache's dtype, into the state tensors `k_cache` / `v_cache`
    /// (`[B, kv_heads, max_seq, d]`) at their positions; every query
    /// attends causally to the cached keys `0..=position`. out is `[T, heads d]`.
    CachedAttention {
        qkv: String,
        rope: String,
        pos: String,
        k_cache: String,
        v_cache: String,
        heads: usize,
        kv_heads: usize,
        seq: usize,
        out: String,
    },
    /// out = silu(x[:, :F]) * x[:, F:] for x `[T, 2F]` (SwiGLU).
    SwiGlu { x: String, out: String },
    /// out[r] = the index of the largest value of row r (I32; the first on
    /// ties).
    Argmax { x: String, out: String },
}

/// Most bytes of one declared input or activation (1 TiB): larger shapes,
/// and shapes whose size overflows, are refused by [`Graph::validate`].
pub const MAX_TENSOR_BYTES: u64 = 1 << 40;

/// A declared activation or input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorDecl {
    pub dtype: String,
    pub shape: Vec<usize>,
}

impl TensorDecl {
    pub fn f32(shape: &[usize]) -> TensorDecl {
        TensorDecl { dtype: "F32".into(), shape: shape.to_vec() }
    }
    pub fn i32(shape: &[usize]) -> TensorDecl {
        TensorDecl { dtype: "I32".into(), shape: shape.to_vec() }
    }
    /// Elements; saturates at `usize::MAX` where the shape overflows (which
    /// [`Graph::validate`] refuses).
    pub fn numel(&self) -> usize {
        self.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d)).unwrap_or(usize::MAX)
    }
    pub fn dtype(&self) -> Result<Dtype> {
        Dtype::from_name(&self.dtype).ok_or_else(|| Error::invalid(format!("unknown dtype {}", self.dtype)))
    }
    /// Bytes, or an error for an unknown dtype or a size beyond [`MAX_TENSOR_BYTES`].
    pub fn bytes(&self) -> Result<usize> {
        let size = self.dtype()?.size() as usize;
        self.shape
            .iter()
            .try_fold(size, |n, &d| n.checked_mul(d))
            .filter(|&b| b as u64 <= MAX_TENSOR_BYTES)
            .ok_or_else(|| Error::invalid(format!("a {} tensor of shape {:?} exceeds {MAX_TENSOR_BYTES} bytes", self.dtype, self.shape)))
    }
}

/// A model definition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Graph {
    pub name: String,
    /// Inputs, filled by the caller before a run.
    pub inputs: Vec<(String, TensorDecl)>,
    /// Intermediate tensors, in the workspace.
    pub activations: Vec<(String, TensorDecl)>,
    /// The model's outputs (activations).
    pub outputs: Vec<String>,
    pub ops: Vec<Op>,
    /// Tensors kept from one run to the next (a KV cache): zero when the
    /// worker's buffer is prepared, laid out first in the buffer in this
    /// order (so graphs declaring the same state, as a model's prefill and
    /// decode graphs, share it), written only by the ops that say so.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub state: Vec<(String, TensorDecl)>,
}

impl Op {
    /// Stored tensors the op reads, among its operands (given the set of
    /// activation and input names).
    pub fn operands(&self) -> Vec<&str> {
        fn opt(o: &Option<String>) -> Option<&str> {
            o.as_deref()
        }
        let v: Vec<Option<&str>> = match self {
            Op::Embedding { ids, wte, wpe, token_type, type_ids, .. } => {
                vec![Some(ids), Some(wte), Some(wpe), opt(token_type), opt(type_ids)]
            }
            Op::LayerNorm { x, residual, gamma, beta, .. } => vec![Some(x), opt(residual), Some(gamma), Some(beta)],
            Op::Linear { x, weight, bias, residual, .. } | Op::Conv2d { x, weight, bias, residual, .. } => {
                vec![Some(x), Some(weight), opt(bias), opt(residual)]
            }
            Op::Attention { qkv, .. } => vec![Some(qkv)],
            Op::MaxPool { x, .. } | Op::GlobalAvgPool { x, .. } => vec![Some(x)],
            Op::TokenEmbedding { ids, table, .. } => vec![Some(ids), Some(table)],
            Op::RmsNorm { x, weight, .. } => vec![Some(x), Some(weight)],
            Op::CachedAttention { qkv, rope, pos, k_cache, v_cache, .. } => vec![Some(qkv), Some(rope), Some(pos), Some(k_cache), Some(v_cache)],
            Op::SwiGlu { x, .. } | Op::Argmax { x, .. } => vec![Some(x)],
        };
        v.into_iter().flatten().collect()
    }

    pub fn output(&self) -> &str {
        match self {
            Op::Embedding { out, .. }
            | Op::LayerNorm { out, .. }
            | Op::Linear { out, .. }
            | Op::Attention { out, .. }
            | Op::Conv2d { out, .. }
            | Op::MaxPool { out, .. }
            | Op::GlobalAvgPool { out, .. }
            | Op::TokenEmbedding { out, .. }
            | Op::RmsNorm { out, .. }
            | Op::CachedAttention { out, .. }
            | Op::SwiGlu { out, .. }
            | Op::Argmax { out, .. } => out,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Op::Embedding { .. } => "embedding",
            Op::LayerNorm { .. } => "layer_norm",
            Op::Linear { .. } => "linear",
            Op::Attention { .. } => "attention",
            Op::Conv2d { .. } => "conv2d",
            Op::MaxPool { .. } => "max_pool",
            Op::GlobalAvgPool { .. } => "global_avg_pool",
            Op::TokenEmbedding { .. } => "token_embedding",
            Op::RmsNorm { .. } => "rms_norm",
            Op::CachedAttention { .. } => "cached_attention",
            Op::SwiGlu { .. } => "swiglu",
            Op::Argmax { .. } => "argmax",
        }
    }
}

/// `d + 2 * pad`, None on overflow.
fn padded(d: usize, pad: usize) -> Option<usize> {
    pad.checked_mul(2).and_then(|p| p.checked_add(d))
}

/// Shapes of stored tensors, by name (from the store's model description).
pub type WeightShapes = HashMap<String, Vec<usize>>;

impl Graph {
    /// The graph as JSON; an error for a value JSON cannot hold (a
    /// non-finite `eps` would be written as `null`, which no reader takes).
    pub fn to_json(&self) -> Result<String> {
        self.check_numbers()?;
        serde_json::to_string(self).map_err(|e| Error::Internal(e.to_string()))
    }

    pub fn from_json(s: &str) -> Result<Graph> {
        let g: Graph = serde_json::from_str(s).map_err(|e| Error::invalid(format!("model graph: {e}")))?;
        g.check_numbers()?;
        Ok(g)
    }

    /// Every `eps` is finite and non-negative (JSON numbers beyond f32's
    /// range parse as infinity).
    fn check_numbers(&self) -> Result<()> {
        for op in &self.ops {
            if let Op::LayerNorm { eps, .. } | Op::RmsNorm { eps, .. } = op {
                if !(eps.is_finite() && *eps >= 0.0) {
                    return Err(Error::invalid(format!(
                        "graph {}: {} op -> {}: eps {eps} is not a finite non-negative number",
                        self.name,
                        op.kind(),
                        op.output()
                    )));
                }
            }
        }
        Ok(())
    }

    fn decls(&self) -> HashMap<&str, &TensorDecl> {
        self.inputs.iter().chain(&self.activations).chain(&self.state).map(|(n, d)| (n.as_str(), d)).collect()
    }

    /// Whether `name` is a state tensor.
    pub fn is_state(&self, name: &str) -> bool {
        self.state.iter().any(|(n, _)| n == name)
    }

    /// Checks every operand exists with a consistent shape, every op's
    /// output is an activation, and activations are written before read.
    pub fn validate(&self, weights: &WeightShapes) -> Result<()> {
        self.check_numbers()?;
        let decls = self.decls();
        if decls.len() != self.inputs.len() + self.activations.len() + self.state.len() {
            return Err(Error::invalid(format!("graph {}: a tensor is declared twice", self.name)));
        }
        for (name, d) in self.inputs.iter().chain(&self.activations).chain(&self.state) {
            d.bytes().map_err(|e| Error::invalid(format!("graph {}: tensor {name}: {e}", self.name)))?;
        }
        let mut written: HashSet<&str> = self.inputs.iter().chain(&self.state).map(|(n, _)| n.as_str()).collect();
        let bad = |op: &Op, msg: String| Error::invalid(format!("graph {}: {} op -> {}: {msg}", self.name, op.kind(), op.output()));
        let act = |op: &Op, name: &str| -> Result<&TensorDecl> {
            decls.get(name).copied().ok_or_else(|| bad(op, format!("{name} is not an activation or input")))
        };
        let w = |op: &Op, name: &str| -> Result<&Vec<usize>> {
            weights.get(name).ok_or_else(|| bad(op, format!("{name} is not a stored tensor")))
        };
        for op in &self.ops {
            for o in op.operands() {
                if decls.contains_key(o) && !written.contains(o) {
                    return Err(bad(op, format!("{o} is read before it is written")));
                }
            }
            let out = act(op, op.output())?;
            if self.inputs.iter().chain(&self.state).any(|(n, _)| n == op.output()) {
                return Err(bad(op, "an op may not write a graph input or state tensor".into()));
            }
            for o in op.operands() {
                if self.is_state(o) && !matches!(op, Op::CachedAttention { k_cache, v_cache, .. } if o == k_cache || o == v_cache) {
                    return Err(bad(op, format!("state tensor {o} is read only by the op that owns it")));
                }
            }
            if op.operands().contains(&op.output()) {
                return Err(bad(op, "the output may not also be an operand".into()));
            }
            let out_dtype = if matches!(op, Op::Argmax { .. }) { "I32" } else { "F32" };
            if out.dtype != out_dtype {
                return Err(bad(op, format!("the output is {out_dtype}, not {}", out.dtype)));
            }
            match op {
                Op::Embedding { ids, wte, wpe, token_type, type_ids, .. } => {
                    for i in [Some(ids), type_ids.as_ref()].into_iter().flatten() {
                        if act(op, i)?.dtype != "I32" {
                            return Err(bad(op, format!("{i} must be I32")));
                        }
                    }
                    let ids = act(op, ids)?;
                    let (wte, wpe) = (w(op, wte)?, w(op, wpe)?);
                    let t = ids.numel();
                    let h = *wte.last().unwrap_or(&0);
                    if wte.len() != 2 || wpe.len() != 2 || wpe[1] != h || out.shape != [t, h] {
                        return Err(bad(op, "shapes disagree".into()));
                    }
                    if let (Some(tt), Some(ti)) = (token_type, type_ids) {
                        if w(op, tt)?.get(1) != Some(&h) || act(op, ti)?.numel() != t {
                            return Err(bad(op, "token type shapes disagree".into()));
                        }
                    }
                }
                Op::LayerNorm { x, residual, gamma, beta, .. } => {
                    let x = act(op, x)?;
                    let h = *x.shape.last().unwrap_or(&0);
                    if w(op, gamma)? != &vec![h] || w(op, beta)? != &vec![h] || out.shape != x.shape {
                        return Err(bad(op, "shapes disagree".into()));
                    }
                    if let Some(r) = residual {
                        if act(op, r)?.shape != x.shape {
                            return Err(bad(op, "residual shape disagrees".into()));
                        }
                    }
                }
                Op::Linear { x, weight, bias, trans_b, residual, out_col, .. } => {
                    let x = act(op, x)?;
                    let wt = w(op, weight)?;
                    if x.shape.len() != 2 || wt.len() != 2 || out.shape.len() != 2 {
                        return Err(bad(op, "linear operands must be 2-D".into()));
                    }
                    let (k, n) = if *trans_b { (wt[1], wt[0]) } else { (wt[0], wt[1]) };
                    if x.shape[1] != k || out.shape[0] != x.shape[0] || out_col.checked_add(n).is_none_or(|end| end > out.shape[1]) {
                        return Err(bad(op, format!("x {:?} · w {wt:?} does not fit out {:?} at column {out_col}", x.shape, out.shape)));
                    }
                    if let Some(b) = bias {
                        if w(op, b)? != &vec![n] {
                            return Err(bad(op, "bias shape disagrees".into()));
                        }
                    }
                    if let Some(r) = residual {
                        if act(op, r)?.shape != out.shape || *out_col != 0 || n != out.shape[1] {
                            return Err(bad(op, "residual needs the whole output".into()));
                        }
                    }
                }
                Op::Attention { qkv, heads, seq, .. } => {
                    let q = act(op, qkv)?;
                    // Heads of at least one column each (so heads <= H).
                    let packed = heads.checked_mul(3).filter(|&p| p > 0 && p <= q.shape.get(1).copied().unwrap_or(0));
                    if q.shape.len() != 2 || *seq == 0 || q.shape[0] % seq != 0 || packed.is_none_or(|p| q.shape[1] % p != 0) || out.shape != [q.shape[0], q.shape[1] / 3] {
                        return Err(bad(op, "qkv must be [T, 3H] with H a positive multiple of heads".into()));
                    }
                }
                Op::Conv2d { x, weight, bias, stride, pad, residual, .. } => {
                    let x = act(op, x)?;
                    let wt = w(op, weight)?;
                    if x.shape.len() != 4 || wt.len() != 4 || wt[1] != x.shape[1] || *stride == 0 {
                        return Err(bad(op, "conv operands must be NCHW / KCRS with matching C".into()));
                    }
                    let p = padded(x.shape[2], *pad).and_then(|d| d.checked_sub(wt[2])).map(|v| v / stride + 1);
                    let q = padded(x.shape[3], *pad).and_then(|d| d.checked_sub(wt[3])).map(|v| v / stride + 1);
                    if p.is_none() || q.is_none() || out.shape != [x.shape[0], wt[0], p.unwrap_or(0), q.unwrap_or(0)] {
                        return Err(bad(op, format!("output {:?} does not match", out.shape)));
                    }
                    if let Some(b) = bias {
                        if w(op, b)? != &vec![wt[0]] {
                            return Err(bad(op, "bias shape disagrees".into()));
                        }
                    }
                    if let Some(r) = residual {
                        if act(op, r)?.shape != out.shape {
                            return Err(bad(op, "residual shape disagrees".into()));
                        }
                    }
                }
                Op::MaxPool { x, kernel, stride, pad, .. } => {
                    let x = act(op, x)?;
                    let dim = |d: usize| padded(d, *pad).and_then(|d| d.checked_sub(*kernel)).map(|v| v / stride + 1);
                    if x.shape.len() != 4 || *stride == 0 || out.shape.len() != 4 || Some(out.shape[2]) != dim(x.shape[2]) || Some(out.shape[3]) != dim(x.shape[3]) || out.shape[..2] != x.shape[..2] {
                        return Err(bad(op, "pool shapes disagree".into()));
                    }
                }
                Op::GlobalAvgPool { x, .. } => {
                    let x = act(op, x)?;
                    if x.shape.len() != 4 || out.shape != [x.shape[0], x.shape[1]] {
                        return Err(bad(op, "pool shapes disagree".into()));
                    }
                }
                Op::TokenEmbedding { ids, table, .. } => {
                    let ids = act(op, ids)?;
                    if ids.dtype != "I32" {
                        return Err(bad(op, "ids must be I32".into()));
                    }
                    let t = w(op, table)?;
                    if t.len() != 2 || t[0] == 0 || out.shape != [ids.numel(), t[1]] {
                        return Err(bad(op, format!("table {t:?} and ids {:?} do not give out {:?}", ids.shape, out.shape)));
                    }
                }
                Op::RmsNorm { x, weight, last_of, .. } => {
                    let x = act(op, x)?;
                    let h = *x.shape.last().unwrap_or(&0);
                    let rows = x.numel() / h.max(1);
                    let want_rows = match last_of {
                        Some(0) => return Err(bad(op, "last_of must be positive".into())),
                        Some(s) if rows % s != 0 => return Err(bad(op, format!("{rows} rows are not sequences of {s}"))),
                        Some(s) => rows / s,
                        None => rows,
                    };
                    if x.shape.len() != 2 || h == 0 || w(op, weight)? != &vec![h] || out.shape != [want_rows, h] {
                        return Err(bad(op, "shapes disagree".into()));
                    }
                }
                Op::CachedAttention { qkv, rope, pos, k_cache, v_cache, heads, kv_heads, seq, .. } => {
                    let q = act(op, qkv)?;
                    let groups = heads.checked_add(kv_heads.saturating_mul(2)).unwrap_or(0);
                    // groups is 0 where heads + 2 kv_heads overflows.
                    if q.shape.len() != 2 || groups == 0 || *heads == 0 || *kv_heads == 0 || heads % kv_heads != 0 || *seq == 0 || q.shape[0] % seq != 0 || q.shape[1] == 0 || q.shape[1] % groups != 0 || q.shape[1] / groups % 2 != 0 {
                        return Err(bad(op, "qkv must be [B*seq, (heads + 2 kv_heads) d] with d even and heads a multiple of kv_heads".into()));
                    }
                    let d = q.shape[1] / groups;
                    let b = q.shape[0] / seq;
                    if out.shape != [q.shape[0], heads * d] {
                        return Err(bad(op, format!("out must be [{}, {}]", q.shape[0], heads * d)));
                    }
                    let p = act(op, pos)?;
                    if p.dtype != "I32" || p.numel() != 1 {
                        return Err(bad(op, "pos must be one I32".into()));
                    }
                    let r = w(op, rope)?;
                    if r.len() != 2 || r[1] != d {
                        return Err(bad(op, format!("rope table {r:?} must be [max_pos, {d}]")));
                    }
                    for c in [k_cache, v_cache] {
                        if !self.is_state(c) {
                            return Err(bad(op, format!("{c} must be a state tensor")));
                        }
                        let cd = act(op, c)?;
                        if cd.shape.len() != 4 || cd.shape[0] != b || cd.shape[1] != *kv_heads || cd.shape[2] == 0 || cd.shape[3] != d || !matches!(cd.dtype.as_str(), "F32" | "BF16" | "F16") {
                            return Err(bad(op, format!("cache {c} must be [{b}, {kv_heads}, max_seq, {d}] of F32, BF16 or F16")));
                        }
                    }
                    if act(op, k_cache)?.shape != act(op, v_cache)?.shape {
                        return Err(bad(op, "the K and V caches differ".into()));
                    }
                }
                Op::SwiGlu { x, .. } => {
                    let x = act(op, x)?;
                    if x.shape.len() != 2 || x.shape[1] % 2 != 0 || out.shape != [x.shape[0], x.shape[1] / 2] {
                        return Err(bad(op, "x must be [T, 2F] and out [T, F]".into()));
                    }
                }
                Op::Argmax { x, .. } => {
                    let x = act(op, x)?;
                    if x.shape.len() != 2 || x.shape[1] == 0 || out.shape != [x.shape[0]] {
                        return Err(bad(op, "x must be [R, C] and out [R]".into()));
                    }
                }
            }
            written.insert(op.output());
        }
        for o in &self.outputs {
            if !written.contains(o.as_str()) {
                return Err(Error::invalid(format!("graph {}: output {o} is never written", self.name)));
            }
        }
        Ok(())
    }

    /// Floating-point operations of one run (multiply-adds count 2).
    pub fn flops(&self, weights: &WeightShapes) -> f64 {
        let decls = self.decls();
        let numel = |n: &str| decls.get(n).map_or(0, |d| d.numel()) as f64;
        self.ops
            .iter()
            .map(|op| match op {
                Op::Linear { x, weight, trans_b, .. } => {
                    let m = decls.get(x.as_str()).map_or(0, |d| d.shape[0]) as f64;
                    let w = weights.get(weight).cloned().unwrap_or_default();
                    let n = if *trans_b { w.first() } else { w.get(1) }.copied().unwrap_or(0) as f64;
                    2.0 * m * n * w.iter().product::<usize>() as f64 / n.max(1.0)
                }
                Op::Conv2d { weight, out, .. } => {
                    let w = weights.get(weight).cloned().unwrap_or_default();
                    2.0 * numel(out) * w.iter().skip(1).product::<usize>() as f64
                }
                Op::Attention { qkv, seq, out, .. } => {
                    // QK^T and PV over each sequence: 4 * T * S * H.
                    let t = decls.get(qkv.as_str()).map_or(0, |d| d.shape[0]) as f64;
                    let h = decls.get(out.as_str()).map_or(0, |d| d.shape[1]) as f64;
                    4.0 * t * *seq as f64 * h
                }
                Op::CachedAttention { qkv, out, .. } => {
                    // Scores and values over the cached positions: counted as
                    // the chunk's own length (the prefill's cost).
                    let t = decls.get(qkv.as_str()).map_or(0, |d| d.shape[0]) as f64;
                    let h = decls.get(out.as_str()).map_or(0, |d| d.shape[1]) as f64;
                    2.0 * t * t * h
                }
                _ => numel(op.output()),
            })
            .sum()
    }
}
