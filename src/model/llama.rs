//! Llama (Llama 2 / 3 architecture) as a reference model: RMSNorm, rotary
//! embeddings, grouped-query attention with a KV cache, SwiGLU, tied or
//! untied LM head; half-precision (BF16 or F16) weights in HF naming and
//! layout (`nn.Linear` weights `[out, in]`).
//!
//! One graph runs a chunk of `seq` tokens of `batch` sequences that start
//! at position `pos` (an input): the prefill of a prompt (`seq` = its
//! length, `pos` 0) or one step of decoding (`seq` 1, `pos` = tokens so
//! far). The two graphs declare the same state (the KV caches, one pair per
//! layer, `[batch, kv_heads, max_seq, head_dim]` BF16), which the worker
//! lays out first in its buffer: a prefill run leaves the cache that the
//! decode runs extend. Outputs: `logits` `[batch, vocab]` of each
//! sequence's last token and `next` `[batch]` (I32), its argmax.
//!
//! Stored layers, in transfer order: the rotary table (`rope`), one layer
//! per decoder block (`model.layers.<i>`, its 9 tensors), `model.norm`,
//! `lm_head` (untied models), and the token table `model.embed_tokens` last:
//! the embedding reads the few rows it needs from the host's pinned copy
//! while the table is still crossing (as the GPT-2 and BERT references),
//! so the first block waits for nothing but its own weights.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use memmap2::Mmap;
use serde::{Deserialize, Serialize};

use super::graph::{Act, Graph, Op, TensorDecl};
use super::reference::{Init, ModelDef, RopeSpec, WeightDecl};
use super::weights::{fill_weight_bytes, rope_table, CHUNK};
use crate::error::{Error, Result};
use crate::store::{Dtype, LayerSpec, Model, ModelSpec, Store, TensorSpec, GRAPH_ATTRIBUTE};

/// Attribute holding a stored Llama's [`LlamaConfig`] (JSON).
pub const CONFIG_ATTRIBUTE: &str = "pipeswitch.llama";

/// A Llama configuration (the fields of HF's `config.json` that matter).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub rms_eps: f32,
    pub rope_theta: f32,
    /// Llama 3 rope scaling (`factor` 0: none).
    pub rope_factor: f32,
    pub rope_low_freq_factor: f32,
    pub rope_high_freq_factor: f32,
    pub rope_original_max_positions: f32,
    pub tie_embeddings: bool,
    /// Rows of the stored rotary table: the longest sequence (prompt and
    /// generated tokens) a run may reach.
    pub max_positions: usize,
    /// BF16 or F16 (by its safetensors name in JSON).
    #[serde(with = "dtype_name")]
    pub dtype: Dtype,
}

mod dtype_name {
    use crate::store::Dtype;
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(d: &Dtype, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(d.name())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Dtype, D::Error> {
        let n = String::deserialize(d)?;
        Dtype::from_name(&n).ok_or_else(|| serde::de::Error::custom(format!("unknown dtype {n:?}")))
    }
}

impl LlamaConfig {
    /// Meta-Llama-3-8B (and 3.1-8B's shapes): 32 blocks, hidden 4096, 32
    /// query and 8 KV heads of 128, FFN 14336, vocabulary 128256, untied.
    pub const LLAMA3_8B: LlamaConfig = LlamaConfig {
        layers: 32,
        hidden: 4096,
        heads: 32,
        kv_heads: 8,
        head_dim: 128,
        ffn: 14336,
        vocab: 128_256,
        rms_eps: 1e-5,
        rope_theta: 500_000.0,
        rope_factor: 8.0,
        rope_low_freq_factor: 1.0,
        rope_high_freq_factor: 4.0,
        rope_original_max_positions: 8192.0,
        tie_embeddings: false,
        max_positions: 2048,
        dtype: Dtype::Bf16,
    };

    /// A tiny configuration of the same structure for CPU and GPU tests:
    /// 2 blocks, hidden 256, 4 query and 2 KV heads of 128 (so 2 query
    /// heads share a KV head, and heads are wider than hidden / heads, as
    /// HF allows), FFN 512, vocabulary 384, 64 positions.
    pub fn tiny(tied: bool) -> LlamaConfig {
        LlamaConfig {
            layers: 2,
            hidden: 256,
            heads: 4,
            kv_heads: 2,
            head_dim: 128,
            ffn: 512,
            vocab: 384,
            rms_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_factor: 0.0,
            rope_low_freq_factor: 1.0,
            rope_high_freq_factor: 4.0,
            rope_original_max_positions: 8192.0,
            tie_embeddings: tied,
            max_positions: 64,
            dtype: Dtype::Bf16,
        }
    }

    pub fn rope(&self) -> RopeSpec {
        RopeSpec {
            theta: self.rope_theta,
            factor: self.rope_factor,
            low_freq_factor: self.rope_low_freq_factor,
            high_freq_factor: self.rope_high_freq_factor,
            original_max_positions: self.rope_original_max_positions,
        }
    }

    /// Columns of the packed Q | K | V activation.
    pub fn qkv_width(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.head_dim
    }

    /// Checks the shapes make sense (every division exact, sizes nonzero).
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::invalid(format!("llama config: {m}")));
        if self.layers == 0 || self.hidden == 0 || self.heads == 0 || self.kv_heads == 0 || self.ffn == 0 || self.vocab == 0 || self.max_positions == 0 {
            return bad("every size must be positive");
        }
        // Bounds far above any real model, so that every size below is
        // computed without overflow (a hostile config.json gets an error).
        if self.layers > 1024 || self.hidden > 1 << 20 || self.ffn > 1 << 20 || self.heads > 1024 || self.kv_heads > 1024 || self.head_dim > 1024 || self.vocab > 1 << 22 || self.max_positions > 1 << 22 {
            return bad("a size is beyond what this worker takes (layers 1024, hidden and ffn 2^20, heads 1024, head_dim 1024, vocab and positions 2^22)");
        }
        if self.heads % self.kv_heads != 0 {
            return bad("heads must be a multiple of kv_heads");
        }
        if self.head_dim == 0 || self.head_dim % 2 != 0 {
            return bad("head_dim must be even");
        }
        if !matches!(self.dtype, Dtype::Bf16 | Dtype::F16) {
            return bad("weights must be BF16 or F16");
        }
        if !(self.rms_eps.is_finite() && self.rms_eps >= 0.0 && self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return bad("rms_norm_eps and rope_theta must be finite (theta > 1)");
        }
        // Finite (the stored config is JSON, which writes infinities and
        // NaN as null: it would not read back) and ordered as the rotary
        // table's blend needs.
        let (f, lo, hi, orig) = (self.rope_factor, self.rope_low_freq_factor, self.rope_high_freq_factor, self.rope_original_max_positions);
        if !(f.is_finite() && f >= 0.0 && lo.is_finite() && hi.is_finite() && orig.is_finite()) || (f > 0.0 && !(0.0 < lo && lo < hi && orig > 0.0)) {
            return bad("rope_scaling: factor must be 0 (none) or positive, and low_freq_factor, high_freq_factor and original_max_position_embeddings finite with 0 < low < high, original > 0");
        }
        if self.vocab > i32::MAX as usize || self.max_positions > i32::MAX as usize {
            return bad("vocabulary and positions must fit in i32");
        }
        Ok(())
    }

    /// Reads HF's `config.json` (`LlamaForCausalLM`). `max_positions` is the
    /// rotary table's length (at most the model's `max_position_embeddings`).
    pub fn from_hf_json(text: &str, max_positions: usize) -> Result<LlamaConfig> {
        let v: serde_json::Value = serde_json::from_str(text).map_err(|e| Error::invalid(format!("config.json: {e}")))?;
        let num = |k: &str| v.get(k).and_then(serde_json::Value::as_f64);
        let int = |k: &str| -> Result<usize> {
            v.get(k).and_then(serde_json::Value::as_u64).map(|x| x as usize).ok_or_else(|| Error::invalid(format!("config.json: {k} is missing or not a count")))
        };
        if let Some(m) = v.get("model_type").and_then(|m| m.as_str()) {
            if m != "llama" {
                return Err(Error::invalid(format!("config.json: model_type {m:?} is not llama")));
            }
        }
        let heads = int("num_attention_heads")?;
        let hidden = int("hidden_size")?;
        let head_dim = v.get("head_dim").and_then(serde_json::Value::as_u64).map_or(hidden / heads.max(1), |d| d as usize);
        let dtype = match v.get("torch_dtype").and_then(|d| d.as_str()).unwrap_or("bfloat16") {
            "bfloat16" => Dtype::Bf16,
            "float16" => Dtype::F16,
            d => return Err(Error::invalid(format!("config.json: torch_dtype {d:?}: the worker runs bfloat16 or float16 Llamas"))),
        };
        let scaling = v.get("rope_scaling").filter(|s| !s.is_null());
        let (mut factor, mut low, mut high, mut orig) = (0.0, 1.0, 4.0, 8192.0);
        if let Some(s) = scaling {
            let kind = s.get("rope_type").or_else(|| s.get("type")).and_then(|t| t.as_str()).unwrap_or("");
            if kind != "llama3" {
                return Err(Error::invalid(format!("config.json: rope_scaling type {kind:?} is not supported (llama3 only)")));
            }
            let f = |k: &str| s.get(k).and_then(serde_json::Value::as_f64).map(|x| x as f32);
            factor = f("factor").unwrap_or(0.0);
            low = f("low_freq_factor").unwrap_or(1.0);
            high = f("high_freq_factor").unwrap_or(4.0);
            orig = f("original_max_position_embeddings").unwrap_or(8192.0);
        }
        let model_max = v.get("max_position_embeddings").and_then(serde_json::Value::as_u64).map_or(max_positions, |m| m as usize);
        let cfg = LlamaConfig {
            layers: int("num_hidden_layers")?,
            hidden,
            heads,
            kv_heads: v.get("num_key_value_heads").and_then(serde_json::Value::as_u64).map_or(heads, |k| k as usize),
            head_dim,
            ffn: int("intermediate_size")?,
            vocab: int("vocab_size")?,
            rms_eps: num("rms_norm_eps").unwrap_or(1e-6) as f32,
            rope_theta: num("rope_theta").unwrap_or(10_000.0) as f32,
            rope_factor: factor,
            rope_low_freq_factor: low,
            rope_high_freq_factor: high,
            rope_original_max_positions: orig,
            tie_embeddings: v.get("tie_word_embeddings").and_then(serde_json::Value::as_bool).unwrap_or(false),
            max_positions: max_positions.min(model_max),
            dtype,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Bytes of the stored weights (rotary table included).
    pub fn weight_bytes(&self) -> u64 {
        model_def(self).layers.iter().flat_map(|(_, ws)| ws.iter()).map(|w| w.shape.iter().product::<usize>() as u64 * w.dtype.size()).sum()
    }
}

/// Names of the state tensors (K and V caches) of block `l`.
pub fn cache_names(l: usize) -> (String, String) {
    (format!("cache.{l}.k"), format!("cache.{l}.v"))
}

/// The graph running `seq` tokens of each of `batch` sequences, with KV
/// caches of `max_seq` positions (see the module documentation).
pub fn graph(cfg: &LlamaConfig, batch: usize, seq: usize, max_seq: usize) -> Graph {
    let (h, d, t) = (cfg.hidden, cfg.head_dim, batch * seq);
    let mut g = Graph { name: format!("llama-b{batch}-s{seq}"), inputs: vec![], activations: vec![], outputs: vec![], ops: vec![], state: vec![] };
    let act = |g: &mut Graph, name: String, shape: &[usize]| {
        g.activations.push((name.clone(), TensorDecl::f32(shape)));
        name
    };
    g.inputs.push(("input_ids".into(), TensorDecl::i32(&[batch, seq])));
    g.inputs.push(("pos".into(), TensorDecl::i32(&[1])));
    let mut x = act(&mut g, "embeddings".into(), &[t, h]);
    g.ops.push(Op::TokenEmbedding { ids: "input_ids".into(), table: "model.embed_tokens.weight".into(), out: x.clone() });
    let lin = |x: &str, w: String, residual: Option<String>, out: &str, col: usize| Op::Linear {
        x: x.into(),
        weight: w,
        bias: None,
        trans_b: true,
        act: Act::None,
        residual,
        out: out.into(),
        out_col: col,
    };
    for l in 0..cfg.layers {
        let p = format!("model.layers.{l}");
        let (kc, vc) = cache_names(l);
        let cache = TensorDecl { dtype: "BF16".into(), shape: vec![batch, cfg.kv_heads, max_seq, d] };
        g.state.push((kc.clone(), cache.clone()));
        g.state.push((vc.clone(), cache));
        let xn = act(&mut g, format!("{p}.input_layernorm.out"), &[t, h]);
        g.ops.push(Op::RmsNorm { x: x.clone(), weight: format!("{p}.input_layernorm.weight"), eps: cfg.rms_eps, last_of: None, out: xn.clone() });
        let qkv = act(&mut g, format!("{p}.self_attn.qkv"), &[t, cfg.qkv_width()]);
        g.ops.push(lin(&xn, format!("{p}.self_attn.q_proj.weight"), None, &qkv, 0));
        g.ops.push(lin(&xn, format!("{p}.self_attn.k_proj.weight"), None, &qkv, cfg.heads * d));
        g.ops.push(lin(&xn, format!("{p}.self_attn.v_proj.weight"), None, &qkv, (cfg.heads + cfg.kv_heads) * d));
        let ctx = act(&mut g, format!("{p}.self_attn.context"), &[t, cfg.heads * d]);
        g.ops.push(Op::CachedAttention {
            qkv,
            rope: "rope.cos_sin".into(),
            pos: "pos".into(),
            k_cache: kc,
            v_cache: vc,
            heads: cfg.heads,
            kv_heads: cfg.kv_heads,
            seq,
            out: ctx.clone(),
        });
        let h1 = act(&mut g, format!("{p}.self_attn.out"), &[t, h]);
        g.ops.push(lin(&ctx, format!("{p}.self_attn.o_proj.weight"), Some(x.clone()), &h1, 0));
        let xn2 = act(&mut g, format!("{p}.post_attention_layernorm.out"), &[t, h]);
        g.ops.push(Op::RmsNorm { x: h1.clone(), weight: format!("{p}.post_attention_layernorm.weight"), eps: cfg.rms_eps, last_of: None, out: xn2.clone() });
        let gu = act(&mut g, format!("{p}.mlp.gate_up"), &[t, 2 * cfg.ffn]);
        g.ops.push(lin(&xn2, format!("{p}.mlp.gate_proj.weight"), None, &gu, 0));
        g.ops.push(lin(&xn2, format!("{p}.mlp.up_proj.weight"), None, &gu, cfg.ffn));
        let a = act(&mut g, format!("{p}.mlp.act"), &[t, cfg.ffn]);
        g.ops.push(Op::SwiGlu { x: gu, out: a.clone() });
        x = act(&mut g, format!("{p}.out"), &[t, h]);
        g.ops.push(lin(&a, format!("{p}.mlp.down_proj.weight"), Some(h1), &x, 0));
    }
    let xn = act(&mut g, "model.norm.out".into(), &[batch, h]);
    g.ops.push(Op::RmsNorm { x, weight: "model.norm.weight".into(), eps: cfg.rms_eps, last_of: Some(seq), out: xn.clone() });
    let logits = act(&mut g, "logits".into(), &[batch, cfg.vocab]);
    let head = if cfg.tie_embeddings { "model.embed_tokens.weight" } else { "lm_head.weight" };
    g.ops.push(lin(&xn, head.into(), None, &logits, 0));
    g.activations.push(("next".into(), TensorDecl::i32(&[batch])));
    g.ops.push(Op::Argmax { x: logits.clone(), out: "next".into() });
    g.outputs = vec![logits, "next".into()];
    g
}

/// The stored layers (see the module documentation) with deterministic
/// random weights: projections uniform with HF's std 0.02, norm weights
/// uniform in [0.8, 1.2] (so that a wrong norm shows).
pub fn layers(cfg: &LlamaConfig) -> Vec<(String, Vec<WeightDecl>)> {
    let (h, d) = (cfg.hidden, cfg.head_dim);
    let a = 0.02f32 * 3f32.sqrt();
    let proj = Init::Chunked(-a, a);
    let norm = Init::Chunked(0.8, 1.2);
    let wd = |name: String, shape: &[usize], init: Init| WeightDecl { name, shape: shape.to_vec(), init, dtype: cfg.dtype };
    let mut ls = vec![("rope".to_string(), vec![WeightDecl { name: "rope.cos_sin".into(), shape: vec![cfg.max_positions, d], init: Init::Rope(cfg.rope()), dtype: Dtype::F32 }])];
    for l in 0..cfg.layers {
        let p = format!("model.layers.{l}");
        ls.push((
            p.clone(),
            vec![
                wd(format!("{p}.input_layernorm.weight"), &[h], norm),
                wd(format!("{p}.self_attn.q_proj.weight"), &[cfg.heads * d, h], proj),
                wd(format!("{p}.self_attn.k_proj.weight"), &[cfg.kv_heads * d, h], proj),
                wd(format!("{p}.self_attn.v_proj.weight"), &[cfg.kv_heads * d, h], proj),
                wd(format!("{p}.self_attn.o_proj.weight"), &[h, cfg.heads * d], proj),
                wd(format!("{p}.post_attention_layernorm.weight"), &[h], norm),
                wd(format!("{p}.mlp.gate_proj.weight"), &[cfg.ffn, h], proj),
                wd(format!("{p}.mlp.up_proj.weight"), &[cfg.ffn, h], proj),
                wd(format!("{p}.mlp.down_proj.weight"), &[h, cfg.ffn], proj),
            ],
        ));
    }
    ls.push(("model.norm".into(), vec![wd("model.norm.weight".into(), &[h], norm)]));
    if !cfg.tie_embeddings {
        ls.push(("lm_head".into(), vec![wd("lm_head.weight".into(), &[cfg.vocab, h], proj)]));
    }
    ls.push(("model.embed_tokens".into(), vec![wd("model.embed_tokens.weight".into(), &[cfg.vocab, h], proj)]));
    ls
}

/// The model definition with the prefill graph of one 128-token prompt.
pub fn model_def(cfg: &LlamaConfig) -> ModelDef {
    ModelDef { graph: graph(cfg, 1, 128.min(cfg.max_positions), cfg.max_positions), layers: layers(cfg) }
}

/// Adds `cfg`'s model with deterministic random weights (`seed`) to `store`,
/// written straight into the store by `threads` threads: the 16 GB of an
/// 8B model are never built anywhere else. The stored graph is the prefill
/// of one 128-token prompt; the config is stored as [`CONFIG_ATTRIBUTE`].
pub fn add_random(store: &Store, name: &str, cfg: &LlamaConfig, seed: u64, threads: usize, progress: crate::store::Progress<'_>) -> Result<Arc<Model>> {
    cfg.validate()?;
    let def = model_def(cfg);
    let decls: Vec<&WeightDecl> = def.layers.iter().flat_map(|(_, ws)| ws.iter()).collect();
    let mut spec = ModelSpec::default();
    for (lname, ws) in &def.layers {
        spec.layers.push(LayerSpec {
            name: lname.clone(),
            tensors: ws.iter().map(|w| TensorSpec { name: w.name.clone(), dtype: w.dtype, shape: w.shape.iter().map(|&d| d as u64).collect(), data: &[] }).collect(),
        });
    }
    spec.attributes = attributes(cfg, &def)?;
    // Pieces of whole chunks of every dtype (CHUNK elements of 4 bytes divide them).
    let piece = CHUNK * 4 * 64;
    store.add_model_filled(name, &spec, piece, threads, &|i, off, bytes| fill_weight_bytes(decls[i], seed, off, bytes), progress)
}

fn attributes(cfg: &LlamaConfig, def: &ModelDef) -> Result<Vec<(String, String)>> {
    Ok(vec![
        (GRAPH_ATTRIBUTE.to_string(), def.graph.to_json()?),
        (CONFIG_ATTRIBUTE.to_string(), serde_json::to_string(cfg).map_err(|e| Error::Internal(e.to_string()))?),
    ])
}

/// The config stored with a Llama model.
pub fn stored_config(model: &Model) -> Result<LlamaConfig> {
    let text = model.attribute(CONFIG_ATTRIBUTE).ok_or_else(|| Error::NotFound(format!("model {:?} is not a Llama (no {CONFIG_ATTRIBUTE} attribute)", model.name)))?;
    let cfg: LlamaConfig = serde_json::from_str(text).map_err(|e| Error::invalid(format!("model {:?}: {CONFIG_ATTRIBUTE}: {e}", model.name)))?;
    cfg.validate()?;
    Ok(cfg)
}

/// The stored layer a HF tensor name belongs to, or None for a tensor the
/// model does not use (rotary buffers of old checkpoints).
fn hf_layer_of(name: &str) -> Result<Option<String>> {
    if name.ends_with("rotary_emb.inv_freq") {
        return Ok(None);
    }
    if let Some(rest) = name.strip_prefix("model.layers.") {
        let (idx, _) = rest.split_once('.').ok_or_else(|| Error::invalid(format!("tensor {name:?}: no block index")))?;
        let i: usize = idx.parse().map_err(|_| Error::invalid(format!("tensor {name:?}: block index {idx:?} is not a number")))?;
        return Ok(Some(format!("model.layers.{i}")));
    }
    match name {
        "model.norm.weight" => Ok(Some("model.norm".into())),
        "lm_head.weight" => Ok(Some("lm_head".into())),
        "model.embed_tokens.weight" => Ok(Some("model.embed_tokens".into())),
        _ => Err(Error::invalid(format!("tensor {name:?} is not part of a Llama model"))),
    }
}

/// Adds the Llama in a Hugging Face style directory to `store`: its
/// `config.json` and every `*.safetensors` shard in it (tensor names as HF's
/// `LlamaForCausalLM`, spread over the shards in any way). Tensors are
/// mapped to the stored layers by name (see the module documentation) and
/// checked against the config's shapes and dtype; the rotary table
/// (`max_positions` rows) is computed from the config. The shards are
/// mapped, not read: each byte is copied once, into the store.
pub fn add_hf_dir(store: &Store, name: &str, dir: &Path, max_positions: usize, progress: crate::store::Progress<'_>) -> Result<Arc<Model>> {
    let io = |what: String| move |e: std::io::Error| Error::io(what, e);
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::NotFound(format!("{} has no config.json", dir.display())),
        _ => Error::io(format!("reading {}", config_path.display()), e),
    })?;
    let cfg = LlamaConfig::from_hf_json(&text, max_positions)?;
    let mut shards: Vec<_> = std::fs::read_dir(dir)
        .map_err(io(format!("listing {}", dir.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    shards.sort();
    if shards.is_empty() {
        return Err(Error::NotFound(format!("{} has no *.safetensors file", dir.display())));
    }
    let maps: Vec<Mmap> = shards
        .iter()
        .map(|p| {
            let f = File::open(p).map_err(io(format!("opening {}", p.display())))?;
            // SAFETY: only read; a concurrent truncation by another process
            // is the one hazard of mapping files, as for add_safetensors.
            unsafe { Mmap::map(&f) }.map_err(io(format!("mapping {}", p.display())))
        })
        .collect::<Result<_>>()?;
    // Every tensor by name: (dtype, shape, bytes).
    let mut found: HashMap<String, (Dtype, Vec<u64>, &[u8])> = HashMap::new();
    for (path, map) in shards.iter().zip(&maps) {
        let st = safetensors::SafeTensors::deserialize(map).map_err(|e| Error::corrupt(format!("{}: {e}", path.display())))?;
        for (tname, view) in st.tensors() {
            if hf_layer_of(&tname)?.is_none() {
                continue;
            }
            let dtype = crate::store::safetensors::dtype_of(view.dtype()).ok_or_else(|| Error::invalid(format!("{}: tensor {tname}: dtype {:?} is not supported", path.display(), view.dtype())))?;
            let shape = view.shape().iter().map(|&d| d as u64).collect();
            if found.insert(tname.clone(), (dtype, shape, view.data())).is_some() {
                return Err(Error::invalid(format!("tensor {tname} appears in two shards")));
            }
        }
    }
    let def = model_def(&cfg);
    let mut spec = ModelSpec::default();
    let table = rope_table(&cfg.rope(), cfg.max_positions, cfg.head_dim);
    let table_bytes: Vec<u8> = table.iter().flat_map(|v| v.to_le_bytes()).collect();
    for (lname, ws) in &def.layers {
        let mut tensors = Vec::new();
        for w in ws {
            if w.name == "rope.cos_sin" {
                tensors.push(TensorSpec { name: w.name.clone(), dtype: Dtype::F32, shape: w.shape.iter().map(|&d| d as u64).collect(), data: &table_bytes });
                continue;
            }
            let (dtype, shape, data) = found.get(&w.name).ok_or_else(|| Error::invalid(format!("{}: tensor {} is missing", dir.display(), w.name)))?;
            let want: Vec<u64> = w.shape.iter().map(|&d| d as u64).collect();
            if *shape != want || *dtype != cfg.dtype {
                return Err(Error::invalid(format!(
                    "tensor {}: {} {shape:?} where config.json gives {} {want:?}",
                    w.name,
                    dtype.name(),
                    cfg.dtype.name()
                )));
            }
            tensors.push(TensorSpec { name: w.name.clone(), dtype: *dtype, shape: shape.clone(), data });
        }
        spec.layers.push(LayerSpec { name: lname.clone(), tensors });
    }
    // A tied model's checkpoint may still carry lm_head.weight (a copy).
    let known = |n: &str| (cfg.tie_embeddings && n == "lm_head.weight") || def.layers.iter().any(|(_, ws)| ws.iter().any(|w| w.name == n));
    let mut extra: Vec<&String> = found.keys().filter(|n| !known(n)).collect();
    extra.sort();
    if let Some(n) = extra.first() {
        return Err(Error::invalid(format!("tensor {n} does not belong to a Llama of this config.json ({} blocks)", cfg.layers)));
    }
    spec.attributes = attributes(&cfg, &def)?;
    store.add_model(name, &spec, progress)
}
