//! Llama on the CPU: the graph (prefill + decode with a KV cache) through
//! the CPU executor against an independent, straightforward implementation
//! written here (full recompute, no cache, no graph); random weights
//! written straight into a store; a Hugging Face style directory of shards
//! ingested.

mod common;

use std::collections::HashMap;

use pipeswitch::kernels::gemm::{bf16_bits_to_f32, f32_to_bf16_bits};
use pipeswitch::kernels::llama_ref::round_to;
use pipeswitch::model::cpu::{reference_weights, run_graph_cpu_rounded, run_graph_cpu_with_state, HostTensor, HostWeights, TensorCoreRounding};
use pipeswitch::model::llama::{self, LlamaConfig};
use pipeswitch::model::weights::weight_values;
use pipeswitch::store::safetensors::{write_file, WriteTensor};
use pipeswitch::store::{Dtype, Store};

fn bf16(x: f32) -> f32 {
    bf16_bits_to_f32(f32_to_bf16_bits(x))
}

/// The straightforward model: every step recomputes the whole sequence.
/// Same specified numerics as the graph: f32 activations, K and V rounded
/// to bf16 (the cache's dtype), weights as stored.
struct Plain<'a> {
    cfg: LlamaConfig,
    w: &'a HostWeights,
    /// The tensor-core prefill: the inputs of the blocks' linears of the
    /// first `n` tokens (those of the prompt) rounded to the weights' type.
    round_first: usize,
}

impl Plain<'_> {
    fn w(&self, n: &str) -> &[f32] {
        &self.w.get(n).unwrap_or_else(|| panic!("weight {n}")).1
    }
    fn rms(&self, x: &[f32], g: &[f32]) -> Vec<f32> {
        let ms = x.iter().map(|v| (v * v) as f64).sum::<f64>() / x.len() as f64;
        let r = 1.0 / (ms + self.cfg.rms_eps as f64).sqrt();
        x.iter().zip(g).map(|(v, g)| (*v as f64 * r) as f32 * g).collect()
    }
    /// y = W x for W [out, in].
    fn mv(&self, w: &[f32], x: &[f32]) -> Vec<f32> {
        w.chunks(x.len()).map(|row| row.iter().zip(x).map(|(a, b)| (*a as f64) * (*b as f64)).sum::<f64>() as f32).collect()
    }
    fn rope(&self, v: &mut [f32], p: usize) {
        let d = v.len();
        let half = d / 2;
        let theta = self.cfg.rope_theta as f64;
        for i in 0..half {
            // No rope scaling in the tiny config: theta^(-2i/d).
            let a = p as f64 * theta.powf(-(2.0 * i as f64) / d as f64);
            let (c, s) = (a.cos() as f32, a.sin() as f32);
            let (x0, x1) = (v[i], v[half + i]);
            v[i] = x0 * c - x1 * s;
            v[half + i] = x1 * c + x0 * s;
        }
    }
    /// `mv` with x rounded to the weights' type for a token of the prefill.
    fn lin(&self, w: &[f32], x: &[f32], pos: usize) -> Vec<f32> {
        if pos < self.round_first {
            let xr: Vec<f32> = x.iter().map(|&v| round_to(self.cfg.dtype, v)).collect();
            self.mv(w, &xr)
        } else {
            self.mv(w, x)
        }
    }
    /// Logits of the last token of `tokens`.
    fn logits(&self, tokens: &[i32]) -> Vec<f32> {
        let c = self.cfg;
        let (h, d) = (c.hidden, c.head_dim);
        let emb = self.w("model.embed_tokens.weight");
        let mut xs: Vec<Vec<f32>> = tokens.iter().map(|&t| emb[t as usize * h..(t as usize + 1) * h].to_vec()).collect();
        for l in 0..c.layers {
            let p = format!("model.layers.{l}");
            let wn = |n: &str| self.w(&format!("{p}.{n}"));
            let mut qs = vec![];
            let mut ks = vec![];
            let mut vs = vec![];
            for (pos, x) in xs.iter().enumerate() {
                let xn = self.rms(x, wn("input_layernorm.weight"));
                let mut q = self.lin(wn("self_attn.q_proj.weight"), &xn, pos);
                let mut k = self.lin(wn("self_attn.k_proj.weight"), &xn, pos);
                let v = self.lin(wn("self_attn.v_proj.weight"), &xn, pos);
                for hq in q.chunks_mut(d) {
                    self.rope(hq, pos);
                }
                for hk in k.chunks_mut(d) {
                    self.rope(hk, pos);
                }
                qs.push(q);
                ks.push(k.iter().map(|&v| bf16(v)).collect::<Vec<_>>());
                vs.push(v.iter().map(|&v| bf16(v)).collect::<Vec<_>>());
            }
            let group = c.heads / c.kv_heads;
            let mut next = vec![];
            for (i, x) in xs.iter().enumerate() {
                let mut ctx = vec![0f32; c.heads * d];
                for hh in 0..c.heads {
                    let kh = hh / group;
                    let q = &qs[i][hh * d..(hh + 1) * d];
                    let s: Vec<f64> = (0..=i).map(|j| q.iter().zip(&ks[j][kh * d..(kh + 1) * d]).map(|(a, b)| (*a as f64) * (*b as f64)).sum::<f64>() / (d as f64).sqrt()).collect();
                    let m = s.iter().cloned().fold(f64::MIN, f64::max);
                    let e: Vec<f64> = s.iter().map(|v| (v - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for j in 0..=i {
                        for t in 0..d {
                            ctx[hh * d + t] += (e[j] / z * vs[j][kh * d + t] as f64) as f32;
                        }
                    }
                }
                let o = self.lin(wn("self_attn.o_proj.weight"), &ctx, i);
                let h1: Vec<f32> = x.iter().zip(&o).map(|(a, b)| a + b).collect();
                let xn2 = self.rms(&h1, wn("post_attention_layernorm.weight"));
                let g = self.lin(wn("mlp.gate_proj.weight"), &xn2, i);
                let u = self.lin(wn("mlp.up_proj.weight"), &xn2, i);
                let a: Vec<f32> = g.iter().zip(&u).map(|(g, u)| (*g as f64 / (1.0 + (-*g as f64).exp()) * *u as f64) as f32).collect();
                let dn = self.lin(wn("mlp.down_proj.weight"), &a, i);
                next.push(h1.iter().zip(&dn).map(|(a, b)| a + b).collect());
            }
            xs = next;
        }
        let last = self.rms(xs.last().unwrap(), self.w("model.norm.weight"));
        let head = if c.tie_embeddings { "model.embed_tokens.weight" } else { "lm_head.weight" };
        self.mv(self.w(head), &last)
    }
}

fn argmax(v: &[f32]) -> i32 {
    let mut b = 0;
    for i in 0..v.len() {
        if v[i] > v[b] {
            b = i;
        }
    }
    b as i32
}

fn prompt(batch: usize, seq: usize, vocab: usize, salt: usize) -> Vec<i32> {
    (0..batch * seq).map(|i| ((i * 7919 + salt * 104_729 + 13) % vocab) as i32).collect()
}

/// Prefill then greedy decoding through the graphs and the CPU executor.
fn generate_graph(cfg: &LlamaConfig, w: &HostWeights, batch: usize, seq: usize, steps: usize, max_seq: usize) -> (Vec<Vec<i32>>, Vec<Vec<f32>>) {
    generate_graph_rounded(cfg, w, batch, seq, steps, max_seq, None)
}

/// [`generate_graph`] with the executor rounding as the worker's tensor-core path.
fn generate_graph_rounded(
    cfg: &LlamaConfig,
    w: &HostWeights,
    batch: usize,
    seq: usize,
    steps: usize,
    max_seq: usize,
    rounding: Option<&TensorCoreRounding>,
) -> (Vec<Vec<i32>>, Vec<Vec<f32>>) {
    let pre = llama::graph(cfg, batch, seq, max_seq);
    let dec = llama::graph(cfg, batch, 1, max_seq);
    assert_eq!(pre.state, dec.state, "prefill and decode share the cache");
    let mut state = HashMap::new();
    let ids = prompt(batch, seq, cfg.vocab, 0);
    let inputs = HashMap::from([("input_ids".to_string(), HostTensor::I32(ids)), ("pos".to_string(), HostTensor::I32(vec![0]))]);
    let out = run_graph_cpu_rounded(&pre, w, &inputs, &mut state, rounding).unwrap();
    let mut tokens: Vec<Vec<i32>> = vec![vec![]; batch];
    let mut logits: Vec<Vec<f32>> = vec![vec![]; batch];
    let mut next: Vec<i32> = out["next"].iter().map(|&v| v as i32).collect();
    for b in 0..batch {
        logits[b].extend_from_slice(&out["logits"][b * cfg.vocab..(b + 1) * cfg.vocab]);
    }
    for step in 0..steps {
        for b in 0..batch {
            tokens[b].push(next[b]);
        }
        if step + 1 == steps {
            break;
        }
        let inputs = HashMap::from([("input_ids".to_string(), HostTensor::I32(next.clone())), ("pos".to_string(), HostTensor::I32(vec![(seq + step) as i32]))]);
        let out = run_graph_cpu_rounded(&dec, w, &inputs, &mut state, rounding).unwrap();
        next = out["next"].iter().map(|&v| v as i32).collect();
        for b in 0..batch {
            logits[b].extend_from_slice(&out["logits"][b * cfg.vocab..(b + 1) * cfg.vocab]);
        }
    }
    (tokens, logits)
}

fn check_against_plain(cfg: LlamaConfig) {
    check_against_plain_rounded(cfg, None);
}

/// `tc_rows`: the executor rounds as the tensor-core path from that many
/// rows (the prefill's 12 take it, decoding's 2 and the LM head's 2 do not).
/// Returns the logits of the prefill (the first step).
fn check_against_plain_rounded(cfg: LlamaConfig, tc_rows: Option<usize>) -> Vec<f32> {
    let def = llama::model_def(&cfg);
    let w = reference_weights(&def, 11);
    let (batch, seq, steps) = (2, 6, 5);
    let rounding = tc_rows.map(|r| TensorCoreRounding::of_def(&def, r));
    let (tokens, logits) = generate_graph_rounded(&cfg, &w, batch, seq, steps, 16, rounding.as_ref());
    let prefill_rounds = tc_rows.is_some_and(|r| batch * seq >= r);
    assert!(tc_rows.is_none_or(|r| batch < r), "the test's plain model rounds no LM head nor decoding step");
    let plain = Plain { cfg, w: &w, round_first: if prefill_rounds { seq } else { 0 } };
    let ids = prompt(batch, seq, cfg.vocab, 0);
    let mut worst = 0f64;
    for b in 0..batch {
        let mut seqv: Vec<i32> = ids[b * seq..(b + 1) * seq].to_vec();
        for s in 0..steps {
            let want = plain.logits(&seqv);
            let got = &logits[b][s * cfg.vocab..(s + 1) * cfg.vocab];
            let scale = want.iter().map(|v| v.abs()).fold(0f32, f32::max) as f64;
            for (g, e) in got.iter().zip(&want) {
                worst = worst.max((*g as f64 - *e as f64).abs() / scale);
            }
            assert_eq!(tokens[b][s], argmax(&want), "sequence {b}, step {s}");
            seqv.push(argmax(&want));
        }
    }
    assert!(worst < 1e-4, "logits differ by {worst} of their scale");
    // The two sequences of the batch are independent and produce different tokens.
    assert_ne!(tokens[0], tokens[1]);
    logits.iter().flat_map(|l| l[..cfg.vocab].to_vec()).collect()
}

#[test]
fn graph_matches_a_plain_implementation_untied() {
    check_against_plain(LlamaConfig::tiny(false));
}

#[test]
fn graph_matches_a_plain_implementation_tied() {
    check_against_plain(LlamaConfig::tiny(true));
}

#[test]
fn tensor_core_prefill_rounds_the_linears_inputs() {
    for (cfg, tag) in [(LlamaConfig::tiny(false), "bf16 untied"), (LlamaConfig { dtype: Dtype::F16, ..LlamaConfig::tiny(true) }, "f16 tied")] {
        let exact = check_against_plain_rounded(cfg, None);
        // 12 prompt rows reach a threshold of 8 and of 12, not one of 13.
        let rounded = check_against_plain_rounded(cfg, Some(8));
        assert_eq!(check_against_plain_rounded(cfg, Some(12)), rounded, "{tag}");
        assert_eq!(check_against_plain_rounded(cfg, Some(13)), exact, "{tag}");
        // The rounding shows (and so the plain model's check above catches
        // an executor that skips it): more than the 1e-4 it is held to,
        // well within what a bf16 / f16 input may move.
        let scale = exact.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = exact.iter().zip(&rounded).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale;
        eprintln!("{tag}: rounding the prefill's linears' inputs moves the logits by {diff:.2e} of their scale");
        assert!(diff > 2e-4 && diff < 3e-2, "{tag}: {diff}");
    }
}

#[test]
fn tensor_core_rounding_only_for_half_weights_from_the_threshold() {
    let cfg = LlamaConfig::tiny(false);
    let r = TensorCoreRounding::of_def(&llama::model_def(&cfg), 16);
    assert_eq!(r.dtype_for("model.layers.0.self_attn.q_proj.weight", 16), Some(Dtype::Bf16));
    assert_eq!(r.dtype_for("model.layers.0.self_attn.q_proj.weight", 15), None);
    assert_eq!(r.dtype_for("rope", 64), None, "the rotary table is F32");
    assert_eq!(r.dtype_for("no.such.weight", 64), None);
}

#[test]
fn a_batch_of_sequences_gives_what_each_gives_alone() {
    let cfg = LlamaConfig::tiny(false);
    let w = reference_weights(&llama::model_def(&cfg), 5);
    let (both, _) = generate_graph(&cfg, &w, 2, 4, 4, 12);
    let (one, _) = generate_graph(&cfg, &w, 1, 4, 4, 12);
    assert_eq!(both[0], one[0]);
}

#[test]
fn positions_beyond_the_cache_are_errors_and_keep_the_cache() {
    let cfg = LlamaConfig::tiny(false);
    let w = reference_weights(&llama::model_def(&cfg), 5);
    let g = llama::graph(&cfg, 1, 4, 6);
    let mut state = HashMap::new();
    let inputs = |pos: i32| HashMap::from([("input_ids".to_string(), HostTensor::I32(vec![1, 2, 3, 4])), ("pos".to_string(), HostTensor::I32(vec![pos]))]);
    run_graph_cpu_with_state(&g, &w, &inputs(0), &mut state).unwrap();
    let before = state.clone();
    let e = run_graph_cpu_with_state(&g, &w, &inputs(3), &mut state).unwrap_err().to_string();
    assert!(e.contains("exceed the cache"), "{e}");
    assert_eq!(state, before);
    let e = run_graph_cpu_with_state(&g, &w, &inputs(-1), &mut state).unwrap_err().to_string();
    assert!(e.contains("negative"), "{e}");
    let bad = HashMap::from([("input_ids".to_string(), HostTensor::I32(vec![1, 2, 3, cfg.vocab as i32])), ("pos".to_string(), HostTensor::I32(vec![0]))]);
    let e = run_graph_cpu_with_state(&g, &w, &bad, &mut state).unwrap_err().to_string();
    assert!(e.contains("token id"), "{e}");
}

#[test]
fn llama3_8b_has_its_real_size() {
    let cfg = LlamaConfig::LLAMA3_8B;
    let def = llama::model_def(&cfg);
    def.graph.validate(&def.weight_shapes()).unwrap();
    let params: usize = def.layers.iter().flat_map(|(_, ws)| ws.iter()).filter(|w| w.dtype == Dtype::Bf16).map(|w| w.shape.iter().product::<usize>()).sum();
    assert_eq!(params, 8_030_261_248, "Meta-Llama-3-8B has 8,030,261,248 parameters");
    assert_eq!(def.layers.len(), 32 + 4);
    assert_eq!(def.layers.last().unwrap().0, "model.embed_tokens", "the token table crosses last");
    let bytes = cfg.weight_bytes();
    assert!((16_060_000_000..16_070_000_000).contains(&bytes), "{bytes}");
    // The decode graph: 11 ops per block, 4 around them.
    let g = llama::graph(&cfg, 8, 1, 2048);
    g.validate(&def.weight_shapes()).unwrap();
    assert_eq!(g.ops.len(), 32 * 11 + 4);
    assert_eq!(g.state.len(), 64);
    // JSON round trip (the stored graph).
    assert_eq!(pipeswitch::model::Graph::from_json(&g.to_json().unwrap()).unwrap(), g);
}

#[test]
fn llama3_rope_scaling_follows_hf() {
    // HF's _compute_llama3_parameters at theta 500000, d 128: the highest
    // frequency is kept, the lowest divided by the factor (8).
    let cfg = LlamaConfig::LLAMA3_8B;
    let t = pipeswitch::model::weights::rope_table(&cfg.rope(), 2, 128);
    // Row 1 holds cos(inv_freq) | sin(inv_freq).
    assert_eq!((t[0], t[64]), (1.0, 0.0), "position 0: cos 1, sin 0");
    assert!((t[128] as f64 - 1f64.cos()).abs() < 1e-7 && (t[128 + 64] as f64 - 1f64.sin()).abs() < 1e-7);
    let lowest = 500_000f64.powf(-126.0 / 128.0) / 8.0;
    assert!(((t[128 + 127] as f64) - lowest.sin()).abs() < 1e-9, "{} vs {}", t[255], lowest.sin());
}

#[test]
fn hf_config_json_is_read() {
    let text = r#"{"architectures":["LlamaForCausalLM"],"model_type":"llama","hidden_size":4096,"intermediate_size":14336,
      "num_attention_heads":32,"num_hidden_layers":32,"num_key_value_heads":8,"rms_norm_eps":1e-05,"rope_theta":500000.0,
      "rope_scaling":{"factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192,"rope_type":"llama3"},
      "max_position_embeddings":131072,"tie_word_embeddings":false,"torch_dtype":"bfloat16","vocab_size":128256}"#;
    let cfg = LlamaConfig::from_hf_json(text, 2048).unwrap();
    assert_eq!(cfg, LlamaConfig::LLAMA3_8B);
    for (bad, what) in [
        (text.replace("\"llama\"", "\"mistral\""), "model_type"),
        (text.replace("bfloat16", "float32"), "torch_dtype"),
        (text.replace("\"num_key_value_heads\":8", "\"num_key_value_heads\":5"), "multiple"),
        (text.replace("\"hidden_size\":4096,", ""), "hidden_size"),
        (text.replace("llama3", "yarn"), "rope_scaling"),
        (text.replace("\"num_hidden_layers\":32", "\"num_hidden_layers\":4000000000"), "beyond"),
        (text.replace("\"vocab_size\":128256", "\"vocab_size\":18446744073709551615"), "beyond"),
    ] {
        let e = LlamaConfig::from_hf_json(&bad, 2048).unwrap_err().to_string();
        assert!(e.contains(what), "{what}: {e}");
    }
}

/// Found by the hf_llama fuzz target: rope scaling values beyond f32's
/// range became infinities that the stored config wrote as `null`, so an
/// ingested model's config did not read back (`stored_config` failed).
#[test]
fn hf_config_refuses_rope_scaling_out_of_range() {
    let text = r#"{"model_type":"llama","hidden_size":8,"intermediate_size":16,"num_attention_heads":2,"num_hidden_layers":1,"vocab_size":16,
      "rope_scaling":{"factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192,"rope_type":"llama3"}}"#;
    let cfg = LlamaConfig::from_hf_json(text, 16).unwrap();
    assert_eq!(serde_json::from_str::<LlamaConfig>(&serde_json::to_string(&cfg).unwrap()).unwrap(), cfg);
    for (from, to) in [
        ("\"factor\":8.0", "\"factor\":1e39"),
        ("\"factor\":8.0", "\"factor\":-2.0"),
        ("\"low_freq_factor\":1.0", "\"low_freq_factor\":-1e39"),
        ("\"high_freq_factor\":4.0", "\"high_freq_factor\":1e300"),
        ("\"high_freq_factor\":4.0", "\"high_freq_factor\":1.0"),
        ("8192,", "0,"),
        ("8192,", "1e40,"),
    ] {
        let bad = text.replace(from, to);
        assert_ne!(bad, text);
        let e = LlamaConfig::from_hf_json(&bad, 16).unwrap_err().to_string();
        assert!(e.contains("rope_scaling"), "{to}: {e}");
    }
}

fn tensor_bytes(store: &Store, model: &str, name: &str) -> (Dtype, Vec<u64>, Vec<u8>) {
    let lease = store.lease(model).unwrap();
    let m = lease.model().clone();
    let (_, t) = m.tensor(name).unwrap();
    let mut out = vec![0u8; t.bytes as usize];
    store.read(&lease, t.offset, &mut out).unwrap();
    (t.dtype, t.shape.clone(), out)
}

#[test]
fn random_weights_are_written_into_the_store_in_parallel_pieces() {
    common::shm_dir();
    let store = Store::create("llama-random", 96 << 20, 8).unwrap();
    let mut cfg = LlamaConfig::tiny(false);
    cfg.ffn = 1 << 15; // gate/up/down: 8.4 M elements (16.8 MB) each: two pieces each
    cfg.layers = 1;
    let mut calls = 0u32;
    let m = llama::add_random(&store, "tiny", &cfg, 3, 4, &mut |_, _| calls += 1).unwrap();
    assert!(calls >= 2);
    assert_eq!(llama::stored_config(&m).unwrap(), cfg);
    let def = llama::model_def(&cfg);
    assert_eq!(m.layers.iter().map(|l| l.name.clone()).collect::<Vec<_>>(), def.layers.iter().map(|l| l.0.clone()).collect::<Vec<_>>());
    for w in def.layers.iter().flat_map(|l| l.1.iter()) {
        let (dtype, shape, bytes) = tensor_bytes(&store, "tiny", &w.name);
        assert_eq!(dtype, w.dtype);
        assert_eq!(shape, w.shape.iter().map(|&d| d as u64).collect::<Vec<_>>());
        let want = weight_values(w, 3);
        let got: Vec<f32> = match dtype {
            Dtype::Bf16 => bytes.chunks_exact(2).map(|c| bf16_bits_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect(),
            _ => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        };
        assert!(got == want, "{}: stored values differ from weight_values", w.name);
    }
    // Values look like the intended distribution (std 0.02, mean 0).
    let g = weight_values(&def.layers[1].1[6], 3);
    let mean = g.iter().map(|&v| v as f64).sum::<f64>() / g.len() as f64;
    let std = (g.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / g.len() as f64).sqrt();
    assert!(mean.abs() < 1e-4 && (std - 0.02).abs() < 2e-4, "mean {mean} std {std}");
    // A second model with the same name is refused; the store stays sound.
    assert!(llama::add_random(&store, "tiny", &cfg, 3, 4, &mut |_, _| {}).is_err());
    store.check().unwrap();
    drop(store);
    Store::destroy("llama-random").unwrap();
}

fn bf16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| f32_to_bf16_bits(*x).to_le_bytes()).collect()
}

const TINY_CONFIG: &str = r#"{"model_type":"llama","hidden_size":256,"intermediate_size":512,"num_attention_heads":4,"head_dim":128,
  "num_hidden_layers":2,"num_key_value_heads":2,"rms_norm_eps":1e-05,"rope_theta":10000.0,"max_position_embeddings":64,
  "tie_word_embeddings":false,"torch_dtype":"bfloat16","vocab_size":384}"#;

/// Writes the tiny model as HF would: tensors in HF's (alphabetical) order
/// spread over three shards, plus `extra` tensors.
fn write_hf_dir(dir: &std::path::Path, config: &str, drop: Option<&str>, extra: &[(&str, Vec<u64>)]) -> HostWeights {
    let cfg = LlamaConfig::tiny(false);
    let def = llama::model_def(&cfg);
    let w = reference_weights(&def, 21);
    let mut names: Vec<&String> = w.keys().filter(|n| *n != "rope.cos_sin" && Some(n.as_str()) != drop).collect();
    names.sort();
    let data: Vec<(String, Vec<u64>, Vec<u8>)> = names.iter().map(|n| (n.to_string(), w[*n].0.iter().map(|&d| d as u64).collect(), bf16_bytes(&w[*n].1))).collect();
    let extra: Vec<(String, Vec<u64>, Vec<u8>)> = extra.iter().map(|(n, s)| (n.to_string(), s.clone(), vec![0u8; s.iter().product::<u64>() as usize * 2])).collect();
    let all: Vec<&(String, Vec<u64>, Vec<u8>)> = data.iter().chain(&extra).collect();
    for (i, part) in all.chunks(all.len().div_ceil(3)).enumerate() {
        let ts: Vec<WriteTensor> = part.iter().map(|(n, s, d)| WriteTensor { name: n, dtype: Dtype::Bf16, shape: s, data: d }).collect();
        write_file(&dir.join(format!("model-{:05}-of-00003.safetensors", i + 1)), &ts, None).unwrap();
    }
    std::fs::write(dir.join("config.json"), config).unwrap();
    w
}

#[test]
fn a_hugging_face_directory_of_shards_is_ingested() {
    common::shm_dir();
    let store = Store::create("llama-hf", 64 << 20, 8).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let w = write_hf_dir(dir.path(), TINY_CONFIG, None, &[("model.layers.0.self_attn.rotary_emb.inv_freq", vec![64])]);
    let m = llama::add_hf_dir(&store, "hf", dir.path(), 64, &mut |_, _| {}).unwrap();
    let cfg = llama::stored_config(&m).unwrap();
    assert_eq!(cfg, LlamaConfig::tiny(false));
    let names: Vec<&str> = m.layers.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, ["rope", "model.layers.0", "model.layers.1", "model.norm", "lm_head", "model.embed_tokens"]);
    assert_eq!(m.layers[1].n_tensors, 9);
    for (name, (shape, values)) in &w {
        let (dtype, s, bytes) = tensor_bytes(&store, "hf", name);
        assert_eq!(s, shape.iter().map(|&d| d as u64).collect::<Vec<_>>(), "{name}");
        if name == "rope.cos_sin" {
            assert_eq!(dtype, Dtype::F32);
            let got: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            assert_eq!(&got, values);
        } else {
            assert_eq!(bytes, bf16_bytes(values), "{name}");
        }
    }
    // The stored graph is the Llama prefill graph and binds to the stored weights.
    let g = pipeswitch::model::Graph::from_json(m.attribute(pipeswitch::store::GRAPH_ATTRIBUTE).unwrap()).unwrap();
    let shapes = m.tensors.iter().map(|t| (t.name.clone(), t.shape.iter().map(|&d| d as usize).collect())).collect();
    g.validate(&shapes).unwrap();

    // Broken directories: clear errors, and the store is unchanged.
    let before = store.models().unwrap().len();
    type Make = Box<dyn Fn(&std::path::Path)>;
    let cases: Vec<(Make, &str)> = vec![
        (Box::new(|d| { write_hf_dir(d, TINY_CONFIG, Some("model.layers.1.mlp.up_proj.weight"), &[]); }), "model.layers.1.mlp.up_proj.weight is missing"),
        (Box::new(|d| { write_hf_dir(d, TINY_CONFIG, None, &[("model.layers.2.mlp.up_proj.weight", vec![512, 256])]); }), "does not belong"),
        (Box::new(|d| { write_hf_dir(d, TINY_CONFIG, None, &[("vision_tower.weight", vec![4])]); }), "not part of a Llama"),
        (Box::new(|d| { write_hf_dir(d, &TINY_CONFIG.replace("\"intermediate_size\":512", "\"intermediate_size\":640"), None, &[]); }), "where config.json gives"),
        (Box::new(|d| { write_hf_dir(d, TINY_CONFIG, None, &[]); std::fs::remove_file(d.join("config.json")).unwrap(); }), "no config.json"),
        (Box::new(|d| { write_hf_dir(d, TINY_CONFIG, None, &[]); std::fs::write(d.join("model-00002-of-00003.safetensors"), b"garbage!").unwrap(); }), "model-00002"),
        (Box::new(|d| { std::fs::write(d.join("config.json"), TINY_CONFIG).unwrap(); }), "no *.safetensors"),
    ];
    for (i, (make, want)) in cases.iter().enumerate() {
        let d = tempfile::tempdir().unwrap();
        make(d.path());
        let e = llama::add_hf_dir(&store, &format!("bad{i}"), d.path(), 64, &mut |_, _| {}).unwrap_err().to_string();
        assert!(e.contains(want), "case {i}: {e}");
    }
    assert_eq!(store.models().unwrap().len(), before);
    store.check().unwrap();
    drop(store);
    Store::destroy("llama-hf").unwrap();
}

#[test]
fn programs_share_the_cache_and_refuse_what_the_kernels_cannot_run() {
    use pipeswitch::model::Op;
    use pipeswitch::worker::Program;
    common::shm_dir();
    let store = Store::create("llama-prog", 64 << 20, 8).unwrap();
    let cfg = LlamaConfig::tiny(false);
    let m = llama::add_random(&store, "tiny", &cfg, 1, 2, &mut |_, _| {}).unwrap();
    let pre = Program::new(m.clone(), llama::graph(&cfg, 2, 8, 32)).unwrap();
    let dec = Program::new(m.clone(), llama::graph(&cfg, 2, 1, 32)).unwrap();
    for l in 0..cfg.layers {
        let (k, v) = llama::cache_names(l);
        assert_eq!(pre.slot(&k).unwrap(), dec.slot(&k).unwrap());
        assert_eq!(pre.slot(&v).unwrap(), dec.slot(&v).unwrap());
    }
    // The cache is never reused for activations.
    let cache_end = (0..cfg.layers).map(|l| { let s = pre.slot(&llama::cache_names(l).1).unwrap(); s.offset + s.bytes }).max().unwrap();
    for (n, _) in &pre.graph().activations {
        assert!(pre.slot(n).unwrap().offset >= cache_end, "{n} overlaps the cache");
    }
    // Q, K and V (and gate and up) are stored back to back and written to
    // adjacent columns: one GEMV launch each; o_proj, down_proj and the head alone.
    let cols = dec.gemv_columns();
    let g = dec.graph();
    let launched: Vec<(String, usize)> = g.ops.iter().zip(cols).filter_map(|(op, c)| match (op, c) {
        (pipeswitch::model::Op::Linear { weight, .. }, Some(n)) => Some((weight.clone(), *n)),
        _ => None,
    }).collect();
    assert_eq!(launched.len(), 4 * cfg.layers + 1, "{launched:?}");
    assert_eq!(launched[0], ("model.layers.0.self_attn.q_proj.weight".to_string(), cfg.qkv_width()));
    assert_eq!(launched[1], ("model.layers.0.self_attn.o_proj.weight".to_string(), cfg.hidden));
    assert_eq!(launched[2], ("model.layers.0.mlp.gate_proj.weight".to_string(), 2 * cfg.ffn));
    assert_eq!(launched[3], ("model.layers.0.mlp.down_proj.weight".to_string(), cfg.hidden));
    assert_eq!(cols.iter().filter(|c| c.is_none()).count(), 3 * cfg.layers);
    // Out of storage order (V before K): nothing merged there.
    let mut g = llama::graph(&cfg, 2, 1, 32);
    g.ops.swap(3, 4);
    let p = Program::new(m.clone(), g).unwrap();
    let kv = cfg.kv_heads * cfg.head_dim;
    assert_eq!(p.gemv_columns()[2..5], [Some(cfg.heads * cfg.head_dim), Some(kv), Some(kv)]);
    // The token table (stored last) is not waited for: it is read from the host.
    assert_eq!(pre.needed_layers(), m.layers.len() - 1);
    // Head dims other than 128, F32 caches and half linears with a bias are refused.
    let mut g = llama::graph(&cfg, 1, 4, 32);
    g.state[0].1.dtype = "F32".into();
    g.state[1].1.dtype = "F32".into();
    let e = Program::new(m.clone(), g).unwrap_err().to_string();
    assert!(e.contains("BF16 caches"), "{e}");
    let mut g = llama::graph(&cfg, 1, 4, 32);
    if let Some(Op::Linear { trans_b, .. }) = g.ops.iter_mut().find(|o| matches!(o, Op::Linear { .. })) {
        *trans_b = false;
    }
    assert!(Program::new(m.clone(), g).is_err());
    drop(store);
    Store::destroy("llama-prog").unwrap();
}

#[test]
fn programs_plan_the_tensor_core_linears_and_their_scratch() {
    use pipeswitch::model::Op;
    use pipeswitch::worker::Program;
    common::shm_dir();
    let store = Store::create("llama-prog-tc", 64 << 20, 8).unwrap();
    let cfg = LlamaConfig::tiny(false);
    let m = llama::add_random(&store, "tiny", &cfg, 1, 2, &mut |_, _| {}).unwrap();
    let (pre_g, dec_g) = (llama::graph(&cfg, 2, 8, 32), llama::graph(&cfg, 2, 1, 32));
    let pre_gemv = Program::with_tensor_cores(m.clone(), pre_g.clone(), None).unwrap();
    let pre = Program::with_tensor_cores(m.clone(), pre_g.clone(), Some(16)).unwrap();
    let dec = Program::with_tensor_cores(m.clone(), dec_g.clone(), Some(16)).unwrap();
    assert_eq!(pre.tensor_core_rows(), Some(16));
    assert!(pre_gemv.tensor_core_ops().iter().all(|&t| !t));
    // Prefill (16 rows): one launch per merged group (Q|K|V, O, gate|up,
    // down) on the tensor cores; the LM head (2 rows) and decoding on the GEMV.
    let tc: Vec<&str> = pre_g.ops.iter().zip(pre.tensor_core_ops()).filter(|(_, &t)| t).map(|(op, _)| match op {
        Op::Linear { weight, .. } => weight.as_str(),
        _ => panic!("{} on the tensor cores", op.kind()),
    }).collect();
    assert_eq!(tc.len(), 4 * cfg.layers, "{tc:?}");
    assert_eq!(tc[..4], ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight", "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.down_proj.weight"]);
    assert!(dec.tensor_core_ops().iter().all(|&t| !t));
    // The scratch for the rounded input: the widest one, 16 rows of the FFN's
    // width in BF16, after every slot (so the cache stays where it was).
    assert_eq!(pre.activation_bytes(), pre_gemv.activation_bytes() + (16 * cfg.ffn * 2) as u64);
    assert_eq!(dec.activation_bytes(), Program::with_tensor_cores(m.clone(), dec_g, None).unwrap().activation_bytes());
    for (n, _) in &pre_g.state {
        assert_eq!(pre.slot(n).unwrap(), pre_gemv.slot(n).unwrap());
    }
    // Exactly a threshold of 16 rows takes it; 17 does not.
    assert!(Program::with_tensor_cores(m.clone(), pre_g.clone(), Some(17)).unwrap().tensor_core_ops().iter().all(|&t| !t));
    // What the CPU executor must round.
    let r = pre.tensor_core_rounding().unwrap();
    assert_eq!(r.min_rows, 16);
    assert_eq!(r.dtype_for("model.layers.1.mlp.down_proj.weight", 16), Some(Dtype::Bf16));
    assert!(pre_gemv.tensor_core_rounding().is_none());
    let e = Program::with_tensor_cores(m.clone(), pre_g, Some(0)).unwrap_err().to_string();
    assert!(e.contains("at least 1"), "{e}");
    drop(store);
    Store::destroy("llama-prog-tc").unwrap();
}

#[test]
fn malformed_llama_ops_are_refused_by_validation_not_panics() {
    use pipeswitch::model::Op;
    let cfg = LlamaConfig::tiny(false);
    let def = llama::model_def(&cfg);
    let shapes = def.weight_shapes();
    let g0 = llama::graph(&cfg, 1, 4, 16);
    let attn = g0.ops.iter().position(|o| matches!(o, Op::CachedAttention { .. })).unwrap();
    let mutate = |f: &dyn Fn(&mut Op)| {
        let mut g = g0.clone();
        f(&mut g.ops[attn]);
        g.validate(&shapes).unwrap_err().to_string()
    };
    let set = |h: usize, kv: usize, seq: usize| move |o: &mut Op| {
        if let Op::CachedAttention { heads, kv_heads, seq: s, .. } = o {
            *heads = h;
            *kv_heads = kv;
            *s = seq;
        }
    };
    for (h, kv, seq) in [(1usize << 63, 1usize << 62, 4), (0, 2, 4), (4, 0, 4), (4, 3, 4), (4, 2, 0), (4, 2, 3), (2, 1, 4)] {
        let e = mutate(&set(h, kv, seq));
        assert!(e.contains("cached_attention"), "{h} {kv} {seq}: {e}");
    }
    // The cache must be state, and the rope table [max_pos, d].
    let e = mutate(&|o| if let Op::CachedAttention { k_cache, .. } = o { *k_cache = "pos".into() });
    assert!(e.contains("state"), "{e}");
    let mut g = g0.clone();
    g.state.remove(0);
    assert!(g.validate(&shapes).is_err());
    let mut bad = shapes.clone();
    bad.insert("rope.cos_sin".into(), vec![64, 64]);
    assert!(g0.validate(&bad).unwrap_err().to_string().contains("rope"));
    // Only the attention op may touch a cache; argmax writes I32.
    let mut g = g0.clone();
    g.ops.insert(attn + 1, Op::SwiGlu { x: "cache.0.k".into(), out: "model.layers.0.mlp.act".into() });
    assert!(g.validate(&shapes).is_err());
    let mut g = g0.clone();
    g.activations.iter_mut().find(|(n, _)| n == "next").unwrap().1.dtype = "F32".into();
    assert!(g.validate(&shapes).unwrap_err().to_string().contains("I32"));
    // last_of must divide the rows.
    let mut g = g0.clone();
    if let Some(Op::RmsNorm { last_of, .. }) = g.ops.iter_mut().rev().find(|o| matches!(o, Op::RmsNorm { .. })) {
        *last_of = Some(3);
    }
    assert!(g.validate(&shapes).is_err());
}
