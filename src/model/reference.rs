//! The reference models: the layer structure and parameter shapes of
//! ResNet-152 (torchvision), BERT-base and GPT-2 medium (Hugging Face), as
//! graphs plus weight declarations, and smaller configurations of the same
//! structure for tests. Weights are deterministic random values (scaled as
//! the models' own initialisers do, so activations stay finite through the
//! whole depth); ResNet's batch norms are folded into the convolutions, as
//! inference runs them. Layers are stored in execution order, except the
//! transformers' token tables, stored last (see `Builder::layer_last`).

use super::graph::{Act, Graph, Op, TensorDecl};

/// How a weight is initialised.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// Normal with this standard deviation.
    Normal(f32),
    /// Uniform in [lo, hi).
    Uniform(f32, f32),
    /// Every element this value.
    Const(f32),
    /// Uniform in [lo, hi), generated in independent chunks of
    /// [`super::weights::CHUNK`] elements (so that many threads fill one
    /// tensor at once: an 8B model's weights in seconds).
    Chunked(f32, f32),
    /// A rotary table `[max_pos, d]`: cos of position · inverse frequency
    /// in the first d/2 columns, sin in the rest.
    Rope(RopeSpec),
}

/// Rotary frequencies: `theta^(-2i/d)`, with Llama 3's long-context
/// scaling when `factor > 0` (HF `rope_type: "llama3"`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeSpec {
    pub theta: f32,
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_positions: f32,
}

/// One weight tensor (fp32).
#[derive(Debug, Clone, PartialEq)]
pub struct WeightDecl {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
    /// Stored dtype: F32, or BF16/F16 (values rounded to it).
    pub dtype: crate::store::Dtype,
}

/// A reference model: its graph and its layers (name, weights) in execution order.
#[derive(Debug, Clone)]
pub struct ModelDef {
    pub graph: Graph,
    pub layers: Vec<(String, Vec<WeightDecl>)>,
}

impl ModelDef {
    pub fn weight_shapes(&self) -> super::graph::WeightShapes {
        self.layers
            .iter()
            .flat_map(|(_, ws)| ws.iter().map(|w| (w.name.clone(), w.shape.clone())))
            .collect()
    }
    /// Rows of the token table of the model's embedding (0 without one):
    /// token ids must lie below it.
    pub fn vocab(&self) -> usize {
        let shapes = self.weight_shapes();
        self.graph
            .ops
            .iter()
            .find_map(|op| match op {
                Op::Embedding { wte, .. } => shapes.get(wte).map(|s| s[0]),
                _ => None,
            })
            .unwrap_or(0)
    }
    pub fn n_params(&self) -> usize {
        self.layers.iter().flat_map(|(_, ws)| ws.iter()).map(|w| w.shape.iter().product::<usize>()).sum()
    }
}

struct Builder {
    graph: Graph,
    layers: Vec<(String, Vec<WeightDecl>)>,
    /// Layers stored after all the others (see [`Builder::layer_last`]).
    last: Vec<(String, Vec<WeightDecl>)>,
}

impl Builder {
    fn new(name: &str) -> Builder {
        Builder {
            graph: Graph { name: name.into(), inputs: vec![], activations: vec![], outputs: vec![], ops: vec![], state: vec![] },
            layers: vec![],
            last: vec![],
        }
    }
    fn input(&mut self, name: &str, d: TensorDecl) -> String {
        self.graph.inputs.push((name.into(), d));
        name.into()
    }
    fn act(&mut self, name: &str, shape: &[usize]) -> String {
        self.graph.activations.push((name.into(), TensorDecl::f32(shape)));
        name.into()
    }
    fn layer(&mut self, name: &str, weights: &[(&str, &[usize], Init)]) -> Vec<String> {
        let ws: Vec<WeightDecl> = weights
            .iter()
            .map(|(n, s, i)| WeightDecl { name: format!("{name}.{n}"), shape: s.to_vec(), init: *i, dtype: crate::store::Dtype::F32 })
            .collect();
        let names = ws.iter().map(|w| w.name.clone()).collect();
        self.layers.push((name.into(), ws));
        names
    }
    /// A layer stored (and so transferred) after every other: a token
    /// table. The embedding reads the few rows it needs from the host's
    /// pinned copy while the table is still on its way, so a switch does not
    /// hold the first kernel back for the 94-206 MB of the table (direct
    /// host access, as in DeepPlan).
    fn layer_last(&mut self, name: &str, weights: &[(&str, &[usize], Init)]) -> Vec<String> {
        let names = self.layer(name, weights);
        let l = self.layers.pop().expect("just pushed");
        self.last.push(l);
        names
    }
    fn op(&mut self, op: Op) {
        self.graph.ops.push(op);
    }
    fn finish(mut self, outputs: &[String]) -> ModelDef {
        self.graph.outputs = outputs.to_vec();
        self.layers.append(&mut self.last);
        ModelDef { graph: self.graph, layers: self.layers }
    }
}

/// ResNet configuration: bottleneck blocks per stage, and image size.
#[derive(Debug, Clone, Copy)]
pub struct ResNetConfig {
    pub blocks: [usize; 4],
    pub width: usize,
    pub image: usize,
    pub classes: usize,
}

impl ResNetConfig {
    pub const RESNET152: ResNetConfig = ResNetConfig { blocks: [3, 8, 36, 3], width: 64, image: 224, classes: 1000 };
}

/// A bottleneck ResNet (ResNet-152 with [`ResNetConfig::RESNET152`]).
pub fn resnet(name: &str, cfg: ResNetConfig, batch: usize) -> ModelDef {
    let mut b = Builder::new(name);
    let n = batch;
    let mut x = b.input("images", TensorDecl::f32(&[n, 3, cfg.image, cfg.image]));
    let conv_init = |fan_in: usize| Init::Normal((2.0 / fan_in as f32).sqrt());
    let bias_init = Init::Uniform(-0.05, 0.05);
    let conv = |b: &mut Builder, lname: &str, x: &str, cin: usize, cout: usize, k: usize, stride: usize, hw: usize, relu: bool, residual: Option<String>, gain: f32| {
        let pad = k / 2;
        let out_hw = (hw + 2 * pad - k) / stride + 1;
        let w = b.layer(lname, &[("weight", &[cout, cin, k, k], match conv_init(cin * k * k) { Init::Normal(s) => Init::Normal(s * gain), i => i }), ("bias", &[cout], bias_init)]);
        let out = b.act(&format!("{lname}.out"), &[n, cout, out_hw, out_hw]);
        b.op(Op::Conv2d { x: x.into(), weight: w[0].clone(), bias: Some(w[1].clone()), stride, pad, residual, relu, out: out.clone() });
        (out, out_hw)
    };
    let (c1, hw) = conv(&mut b, "conv1", &x, 3, cfg.width, 7, 2, cfg.image, true, None, 1.0);
    let pool_hw = (hw + 2 - 3) / 2 + 1;
    x = b.act("maxpool.out", &[n, cfg.width, pool_hw, pool_hw]);
    b.op(Op::MaxPool { x: c1, kernel: 3, stride: 2, pad: 1, out: x.clone() });
    let mut hw = pool_hw;
    let mut inplanes = cfg.width;
    for (stage, &blocks) in cfg.blocks.iter().enumerate() {
        let planes = cfg.width << stage;
        for blk in 0..blocks {
            let p = format!("layer{}.{blk}", stage + 1);
            let stride = if blk == 0 && stage > 0 { 2 } else { 1 };
            let identity = if blk == 0 {
                let (ds, _) = conv(&mut b, &format!("{p}.downsample"), &x, inplanes, planes * 4, 1, stride, hw, false, None, 1.0);
                ds
            } else {
                x.clone()
            };
            let (t1, _) = conv(&mut b, &format!("{p}.conv1"), &x, inplanes, planes, 1, 1, hw, true, None, 1.0);
            let (t2, hw2) = conv(&mut b, &format!("{p}.conv2"), &t1, planes, planes, 3, stride, hw, true, None, 1.0);
            // The last conv of a block starts small (zero-init-residual style),
            // so activations stay bounded through 50 blocks.
            let (t3, _) = conv(&mut b, &format!("{p}.conv3"), &t2, planes, planes * 4, 1, 1, hw2, true, Some(identity), 0.2);
            x = t3;
            hw = hw2;
            inplanes = planes * 4;
        }
    }
    let pooled = b.act("avgpool.out", &[n, inplanes]);
    b.op(Op::GlobalAvgPool { x: x.clone(), out: pooled.clone() });
    let w = b.layer("fc", &[("weight", &[cfg.classes, inplanes], Init::Normal((1.0 / inplanes as f32).sqrt())), ("bias", &[cfg.classes], bias_init)]);
    let logits = b.act("logits", &[n, cfg.classes]);
    b.op(Op::Linear { x: pooled, weight: w[0].clone(), bias: Some(w[1].clone()), trans_b: true, act: Act::None, residual: None, out: logits.clone(), out_col: 0 });
    b.finish(&[logits])
}

/// Transformer configuration.
#[derive(Debug, Clone, Copy)]
pub struct TransformerConfig {
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub max_positions: usize,
}

impl TransformerConfig {
    pub const BERT_BASE: TransformerConfig =
        TransformerConfig { layers: 12, hidden: 768, heads: 12, ffn: 3072, vocab: 30522, max_positions: 512 };
    pub const GPT2_MEDIUM: TransformerConfig =
        TransformerConfig { layers: 24, hidden: 1024, heads: 16, ffn: 4096, vocab: 50257, max_positions: 1024 };
}

/// BERT (post-LN encoder, Hugging Face naming and nn.Linear [out, in] weights).
/// The pooler is left out: the model's output is the last hidden state.
pub fn bert(name: &str, cfg: TransformerConfig, batch: usize, seq: usize) -> ModelDef {
    let mut b = Builder::new(name);
    let (h, t) = (cfg.hidden, batch * seq);
    let std = Init::Normal(0.02);
    let ids = b.input("input_ids", TensorDecl::i32(&[batch, seq]));
    let tt = b.input("token_type_ids", TensorDecl::i32(&[batch, seq]));
    let wte = b.layer_last("embeddings.word_embeddings", &[("weight", &[cfg.vocab, h], std)]);
    let e = b.layer("embeddings", &[
        ("position_embeddings.weight", &[cfg.max_positions, h], std),
        ("token_type_embeddings.weight", &[2, h], std),
    ]);
    let emb = b.act("embeddings.sum", &[t, h]);
    b.op(Op::Embedding { ids, wte: wte[0].clone(), wpe: e[0].clone(), token_type: Some(e[1].clone()), type_ids: Some(tt), out: emb.clone() });
    let ln = b.layer("embeddings.LayerNorm", &[("weight", &[h], Init::Const(1.0)), ("bias", &[h], Init::Const(0.0))]);
    let mut x = b.act("embeddings.out", &[t, h]);
    b.op(Op::LayerNorm { x: emb, residual: None, gamma: ln[0].clone(), beta: ln[1].clone(), eps: 1e-12, out: x.clone() });
    for l in 0..cfg.layers {
        let p = format!("encoder.layer.{l}");
        let qkv = b.act(&format!("{p}.qkv"), &[t, 3 * h]);
        for (i, part) in ["query", "key", "value"].iter().enumerate() {
            let w = b.layer(&format!("{p}.attention.self.{part}"), &[("weight", &[h, h], std), ("bias", &[h], Init::Const(0.0))]);
            b.op(Op::Linear { x: x.clone(), weight: w[0].clone(), bias: Some(w[1].clone()), trans_b: true, act: Act::None, residual: None, out: qkv.clone(), out_col: i * h });
        }
        let ctx = b.act(&format!("{p}.context"), &[t, h]);
        b.op(Op::Attention { qkv, heads: cfg.heads, seq, causal: false, out: ctx.clone() });
        let w = b.layer(&format!("{p}.attention.output.dense"), &[("weight", &[h, h], std), ("bias", &[h], Init::Const(0.0))]);
        let ao = b.act(&format!("{p}.attention.output.sum"), &[t, h]);
        b.op(Op::Linear { x: ctx, weight: w[0].clone(), bias: Some(w[1].clone()), trans_b: true, act: Act::None, residual: Some(x.clone()), out: ao.clone(), out_col: 0 });
        let ln = b.layer(&format!("{p}.attention.output.LayerNorm"), &[("weight", &[h], Init::Const(1.0)), ("bias", &[h], Init::Const(0.0))]);
        let a = b.act(&format!("{p}.attention.out"), &[t, h]);
        b.op(Op::LayerNorm { x: ao, residual: None, gamma: ln[0].clone(), beta: ln[1].clone(), eps: 1e-12, out: a.clone() });
        let w = b.layer(&format!("{p}.intermediate.dense"), &[("weight", &[cfg.ffn, h], std), ("bias", &[cfg.ffn], Init::Const(0.0))]);
        let inter = b.act(&format!("{p}.intermediate.out"), &[t, cfg.ffn]);
        b.op(Op::Linear { x: a.clone(), weight: w[0].clone(), bias: Some(w[1].clone()), trans_b: true, act: Act::Gelu, residual: None, out: inter.clone(), out_col: 0 });
        let w = b.layer(&format!("{p}.output.dense"), &[("weight", &[h, cfg.ffn], std), ("bias", &[h], Init::Const(0.0))]);
        let o = b.act(&format!("{p}.output.sum"), &[t, h]);
        b.op(Op::Linear { x: inter, weight: w[0].clone(), bias: Some(w[1].clone()), trans_b: true, act: Act::None, residual: Some(a), out: o.clone(), out_col: 0 });
        let ln = b.layer(&format!("{p}.output.LayerNorm"), &[("weight", &[h], Init::Const(1.0)), ("bias", &[h], Init::Const(0.0))]);
        x = b.act(&format!("{p}.out"), &[t, h]);
        b.op(Op::LayerNorm { x: o, residual: None, gamma: ln[0].clone(), beta: ln[1].clone(), eps: 1e-12, out: x.clone() });
    }
    b.finish(&[x])
}

/// GPT-2 (pre-LN decoder, Hugging Face naming, Conv1D [in, out] weights),
/// without the LM head (tied to wte): the output is the last hidden state.
pub fn gpt2(name: &str, cfg: TransformerConfig, batch: usize, seq: usize) -> ModelDef {
    let mut b = Builder::new(name);
    let (h, t) = (cfg.hidden, batch * seq);
    let std = Init::Normal(0.02);
    let proj_std = Init::Normal(0.02 / (2.0 * cfg.layers as f32).sqrt());
    let ids = b.input("input_ids", TensorDecl::i32(&[batch, seq]));
    let wte = b.layer_last("wte", &[("weight", &[cfg.vocab, h], std)]);
    let wpe = b.layer("wpe", &[("weight", &[cfg.max_positions, h], Init::Normal(0.01))]);
    let mut x = b.act("embeddings", &[t, h]);
    b.op(Op::Embedding { ids, wte: wte[0].clone(), wpe: wpe[0].clone(), token_type: None, type_ids: None, out: x.clone() });
    for l in 0..cfg.layers {
        let p = format!("h.{l}");
        let ln = b.layer(&format!("{p}.ln_1"), &[("weight", &[h], Init::Const(1.0)), ("bias", &[h], Init::Const(0.0))]);
        let a = b.act(&format!("{p}.ln_1.out"), &[t, h]);
        b.op(Op::LayerNorm { x: x.clone(), residual: None, gamma: ln[0].clone(), beta: ln[1].clone(), eps: 1e-5, out: a.clone() });
        let w = b.layer(&format!("{p}.attn.c_attn"), &[("weight", &[h, 3 * h], std), ("bias", &[3 * h], Init::Const(0.0))]);
        let qkv = b.act(&format!("{p}.qkv"), &[t, 3 * h]);
        b.op(Op::Linear { x: a, weight: w[0].clone(), bias: Some(w[1].clone()), trans_b: false, act: Act::None, residual: None, out: qkv.clone(), out_col: 0 });
        let ctx = b.act(&format!("{p}.context"), &[t, h]);
        b.op(Op::Attention { qkv, heads: cfg.heads, seq, causal: true, out: ctx.clone() });
        let w = b.layer(&format!("{p}.attn.c_proj"), &[("weight", &[h, h], proj_std), ("bias", &[h], Init::Const(0.0))]);
        let r1 = b.act(&format!("{p}.attn.out"), &[t, h]);
        b.op(Op::Linear { x: ctx, weight: w[0].clone(), bias: Some(w[1].clone()), trans_b: false, act: Act::None, residual: Some(x.clone()), out: r1.clone(), out_col: 0 });
        let ln = b.layer(&format!("{p}.ln_2"), &[("weight", &[h], Init::Const(1.0)), ("bias", &[h], Init::Const(0.0))]);
        let a2 = b.act(&format!("{p}.ln_2.out"), &[t, h]);
        b.op(Op::LayerNorm { x: r1.clone(), residual: None, gamma: ln[0].clone(), beta: ln[1].clone(), eps: 1e-5, out: a2.clone() });
        let w = b.layer(&format!("{p}.mlp.c_fc"), &[("weight", &[h, cfg.ffn], std), ("bias", &[cfg.ffn], Init::Const(0.0))]);
        let f = b.act(&format!("{p}.mlp.fc.out"), &[t, cfg.ffn]);
        b.op(Op::Linear { x: a2, weight: w[0].clone(), bias: Some(w[1].clone()), trans_b: false, act: Act::GeluTanh, residual: None, out: f.clone(), out_col: 0 });
        let w = b.layer(&format!("{p}.mlp.c_proj"), &[("weight", &[cfg.ffn, h], proj_std), ("bias", &[h], Init::Const(0.0))]);
        x = b.act(&format!("{p}.out"), &[t, h]);
        b.op(Op::Linear { x: f, weight: w[0].clone(), bias: Some(w[1].clone()), trans_b: false, act: Act::None, residual: Some(r1), out: x.clone(), out_col: 0 });
    }
    let ln = b.layer("ln_f", &[("weight", &[h], Init::Const(1.0)), ("bias", &[h], Init::Const(0.0))]);
    let out = b.act("ln_f.out", &[t, h]);
    b.op(Op::LayerNorm { x, residual: None, gamma: ln[0].clone(), beta: ln[1].clone(), eps: 1e-5, out: out.clone() });
    b.finish(&[out])
}

/// The three reference models at the demo's size (batch 8; 224x224 images; 128 tokens).
pub fn reference_models(batch: usize, seq: usize) -> Vec<ModelDef> {
    vec![
        resnet("resnet152", ResNetConfig::RESNET152, batch),
        bert("bert-base", TransformerConfig::BERT_BASE, batch, seq),
        gpt2("gpt2-medium", TransformerConfig::GPT2_MEDIUM, batch, seq),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_graphs_validate_and_have_the_real_sizes() {
        let models = reference_models(8, 128);
        let expect = [
            ("resnet152", 60_100_000, 60_300_000),  // torchvision: 60.19M (BN folded: conv bias instead of 4 BN vectors)
            ("bert-base", 108_800_000, 109_600_000), // 109.5M without the 0.6M pooler
            ("gpt2-medium", 354_000_000, 355_000_000),
        ];
        for (m, (name, lo, hi)) in models.iter().zip(expect) {
            assert_eq!(m.graph.name, name);
            m.graph.validate(&m.weight_shapes()).unwrap();
            let p = m.n_params();
            assert!((lo..hi).contains(&p), "{name}: {p} parameters");
            // Layer names are unique; every weight is used by exactly one op.
            let mut used = std::collections::HashMap::new();
            for op in &m.graph.ops {
                for o in op.operands() {
                    *used.entry(o.to_string()).or_insert(0) += 1;
                }
            }
            for (_, ws) in &m.layers {
                for w in ws {
                    assert_eq!(used.get(&w.name), Some(&1), "{name}: {}", w.name);
                }
            }
        }
        assert_eq!(models[0].layers.len(), 156); // 155 convs + fc
    }

    #[test]
    fn graphs_round_trip_through_json_and_catch_shape_errors() {
        let m = gpt2("tiny", TransformerConfig { layers: 2, hidden: 64, heads: 4, ffn: 256, vocab: 100, max_positions: 32 }, 2, 16);
        let g = Graph::from_json(&m.graph.to_json().unwrap()).unwrap();
        assert_eq!(g, m.graph);
        let mut bad = m.weight_shapes();
        bad.insert("h.0.attn.c_attn.weight".into(), vec![64, 100]);
        assert!(m.graph.validate(&bad).is_err());
        let mut g2 = m.graph.clone();
        g2.ops.swap(1, 2);
        assert!(g2.validate(&m.weight_shapes()).is_err(), "read before write");
        // An op writing a graph input, or its own operand; ids that are not I32.
        let mut g3 = m.graph.clone();
        if let Op::LayerNorm { out, .. } = &mut g3.ops[1] {
            *out = "input_ids".into();
        }
        assert!(g3.validate(&m.weight_shapes()).is_err(), "writes an input");
        let mut g4 = m.graph.clone();
        if let Op::LayerNorm { x, out, .. } = &mut g4.ops[1] {
            *out = x.clone();
        }
        assert!(g4.validate(&m.weight_shapes()).is_err(), "in place");
        let mut g5 = m.graph.clone();
        g5.inputs[0].1.dtype = "F32".into();
        assert!(g5.validate(&m.weight_shapes()).is_err(), "F32 ids");
    }
}
