//! Llama on the GPU with the built-in worker: tiny configurations (BF16
//! untied, F16 tied) switched in whole and layer by layer, prefill of two
//! prompts then greedy decoding with the KV cache, compared step by step
//! with the CPU executor on the same weights; the same with the prefill's
//! linears on the tensor cores (inputs rounded to the weights' type, the
//! executor rounding them alike). `cargo test --test llama_gpu --
//! --ignored`; the plain tests follow `PIPESWITCH_LLM_TENSOR_CORES` (run
//! them with it on and off).

use std::collections::HashMap;
use std::sync::Arc;

use pipeswitch::arena::Arena;
use pipeswitch::model::cpu::{reference_weights, run_graph_cpu_rounded, HostTensor, HostWeights};
use pipeswitch::model::llama::{self, LlamaConfig};
use pipeswitch::planner;
use pipeswitch::store::{Dtype, Store};
use pipeswitch::switch::Switch;
use pipeswitch::worker::{Program, RunOptions, Worker};

const SEED: u64 = 9;

struct TempStore(Arc<Store>, String);
impl Drop for TempStore {
    fn drop(&mut self) {
        let _ = Store::destroy(&self.1);
    }
}

fn le_i32(v: &[i32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// max |a - b| / max(1e-3, max |b|)
fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let scale = b.iter().fold(1e-3f64, |m, v| m.max(f64::from(v.abs())));
    a.iter().zip(b).map(|(x, y)| f64::from((x - y).abs())).fold(0.0, f64::max) / scale
}

/// The largest value's index and its margin over the second largest.
fn top2(row: &[f32]) -> (i32, f32) {
    let mut idx: Vec<usize> = (0..row.len()).collect();
    idx.sort_by(|&a, &b| row[b].partial_cmp(&row[a]).unwrap().then(a.cmp(&b)));
    (idx[0] as i32, row[idx[0]] - row[idx[1]])
}

/// `tc`: the programs' tensor-core threshold (None: the environment's).
fn run_model(cfg: LlamaConfig, tag: &str, batch: usize, tc: Option<Option<usize>>) {
    let name = format!("llamagpu-{tag}-{}", std::process::id());
    let _ = Store::destroy(&name);
    let store = TempStore(Arc::new(Store::create(&name, cfg.weight_bytes() + (16 << 20), 4).unwrap()), name);
    let model = llama::add_random(&store.0, "tiny", &cfg, SEED, 4, &mut |_, _| {}).unwrap();
    let weights: HostWeights = reference_weights(&llama::model_def(&cfg), SEED);
    let (seq, max_seq, steps) = (7usize, 24usize, 12usize);
    let pre_g = llama::graph(&cfg, batch, seq, max_seq);
    let dec_g = llama::graph(&cfg, batch, 1, max_seq);
    let program = |g: &pipeswitch::model::Graph| match tc {
        Some(rows) => Program::with_tensor_cores(model.clone(), g.clone(), rows),
        None => Program::new(model.clone(), g.clone()),
    };
    let pre = program(&pre_g).unwrap();
    let dec = program(&dec_g).unwrap();
    let tc_prefill = pre.tensor_core_ops().iter().any(|&t| t);
    eprintln!("{tag}: tensor cores from {:?} rows; prefill ({} rows) on them: {tc_prefill}", pre.tensor_core_rows(), batch * seq);
    assert!(!dec.tensor_core_ops().iter().any(|&t| t) || dec.tensor_core_rows().is_some_and(|r| r <= batch));
    for (n, _) in &pre_g.state {
        assert_eq!(pre.slot(n).unwrap(), dec.slot(n).unwrap(), "{n}: prefill and decode share the cache");
    }
    let act = pre.activation_bytes().max(dec.activation_bytes());
    let arena = Arc::new(Arena::create(0, model.bytes + act + (32 << 20), 8 << 20).unwrap());
    let region = arena.alloc(model.bytes).unwrap();
    let mut worker = Worker::new(&arena).unwrap();
    worker.prepare(&dec).unwrap();
    worker.prepare(&pre).unwrap();
    let mut switch = Switch::new(0).unwrap();
    let n_layers = model.layers.len();
    for plan in [None, Some(planner::per_layer_plan(n_layers))] {
        match &plan {
            None => switch.start_whole(&store.0, "tiny", &arena, region).unwrap(),
            Some(p) => switch.start(&store.0, "tiny", &arena, region, p).unwrap(),
        }
        let prompt: Vec<i32> = (0..batch * seq).map(|i| ((i * 131 + 7) % cfg.vocab) as i32).collect();
        let mut state = HashMap::new();
        let mut ids = prompt.clone();
        let mut pos = 0usize;
        let mut graph_cpu = &pre_g;
        let mut program = &pre;
        let mut worst = 0f64;
        for step in 0..steps {
            worker.set_input(program, "input_ids", &le_i32(&ids)).unwrap();
            worker.set_input(program, "pos", &le_i32(&[pos as i32])).unwrap();
            worker.run(program, &switch, RunOptions::default()).unwrap();
            let logits = worker.read_f32(program, "logits").unwrap();
            let next = worker.read_i32(program, "next").unwrap();
            let inputs = HashMap::from([("input_ids".to_string(), HostTensor::I32(ids.clone())), ("pos".to_string(), HostTensor::I32(vec![pos as i32]))]);
            let rounding = program.tensor_core_rounding();
            if step == 0 && tc_prefill {
                // The GPU rounds: it is nearer the executor that rounds alike
                // than the one that does not.
                let exact = run_graph_cpu_rounded(graph_cpu, &weights, &inputs, &mut state.clone(), None).unwrap();
                let (e_exact, e_rounded) = (rel_err(&logits, &exact["logits"]), {
                    let r = run_graph_cpu_rounded(graph_cpu, &weights, &inputs, &mut state.clone(), rounding.as_ref()).unwrap();
                    rel_err(&logits, &r["logits"])
                });
                eprintln!("{tag}: prefill logits vs the rounding executor {e_rounded:.2e}, vs the exact one {e_exact:.2e}");
                assert!(e_rounded < e_exact, "{tag}: the tensor-core prefill does not round as specified");
            }
            let out = run_graph_cpu_rounded(graph_cpu, &weights, &inputs, &mut state, rounding.as_ref()).unwrap();
            let err = rel_err(&logits, &out["logits"]);
            worst = worst.max(err);
            // K and V round to bf16 from sums in another order: an odd last-bit
            // difference in the cache; a wrong kernel is off by O(1).
            assert!(err < 5e-3, "{tag} step {step}: logits differ by {err:e} of their scale");
            let mut feed = vec![];
            for b in 0..batch {
                let row = &out["logits"][b * cfg.vocab..(b + 1) * cfg.vocab];
                let (best, margin) = top2(row);
                assert_eq!(out["next"][b] as i32, best);
                // Where the CPU's choice is clear, the GPU makes it too.
                if margin > 1e-3 * row.iter().fold(0f32, |m, v| m.max(v.abs())) {
                    assert_eq!(next[b], best, "{tag} step {step} sequence {b}");
                }
                feed.push(best);
            }
            pos += if step == 0 { seq } else { 1 };
            ids = feed;
            graph_cpu = &dec_g;
            program = &dec;
        }
        eprintln!("{tag} plan {:?}: {steps} steps, worst logits error {worst:.2e}", plan.as_ref().map(|p| p.len()));
        // A position beyond the cache: an error, and nothing written.
        worker.set_input(&dec, "pos", &le_i32(&[max_seq as i32])).unwrap();
        worker.run(&dec, &switch, RunOptions::default()).unwrap();
        let e = worker.read_f32(&dec, "logits").unwrap_err().to_string();
        assert!(e.contains("out of range"), "{e}");
        // A token id beyond the vocabulary: an error too.
        worker.set_input(&dec, "pos", &le_i32(&[pos as i32])).unwrap();
        let mut bad = vec![0; batch];
        bad[batch - 1] = cfg.vocab as i32;
        worker.set_input(&dec, "input_ids", &le_i32(&bad)).unwrap();
        worker.run(&dec, &switch, RunOptions::default()).unwrap();
        assert!(worker.read_f32(&dec, "logits").is_err());
    }
    // The decoding step captured once as a CUDA graph gives the eager
    // steps' bits, step after step (the position and the token are inputs
    // the graph reads where set_input puts them).
    let prompt: Vec<i32> = (0..batch * seq).map(|i| ((i * 17 + 3) % cfg.vocab) as i32).collect();
    let mut runs: Vec<Vec<(Vec<f32>, Vec<i32>)>> = vec![];
    for captured in [false, true] {
        worker.set_input(&pre, "input_ids", &le_i32(&prompt)).unwrap();
        worker.set_input(&pre, "pos", &le_i32(&[0])).unwrap();
        worker.run(&pre, &switch, RunOptions::default()).unwrap();
        let mut next = worker.read_i32(&pre, "next").unwrap();
        let graph = captured.then(|| worker.capture_run(&dec, &switch).unwrap());
        if let Some(g) = &graph {
            let e = worker.run_graph(&pre, &switch, g).unwrap_err().to_string();
            assert!(e.contains("not of"), "{e}");
        }
        let mut seen = vec![];
        for step in 0..5 {
            worker.set_input(&dec, "input_ids", &le_i32(&next)).unwrap();
            worker.set_input(&dec, "pos", &le_i32(&[(seq + step) as i32])).unwrap();
            match &graph {
                Some(g) => worker.run_graph(&dec, &switch, g).unwrap(),
                None => worker.run(&dec, &switch, RunOptions::default()).unwrap(),
            }
            let logits = worker.read_f32(&dec, "logits").unwrap();
            next = worker.read_i32(&dec, "next").unwrap();
            seen.push((logits, next.clone()));
        }
        runs.push(seen);
    }
    assert!(runs[1] == runs[0], "{tag}: the captured decoding step differs from the eager one");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn tiny_bf16_llama_matches_the_cpu_executor() {
    // Batch 1 decodes with the one-row GEMV; batch 2 with the 8-row one.
    run_model(LlamaConfig::tiny(false), "bf16-b1", 1, None);
    run_model(LlamaConfig::tiny(false), "bf16-b2", 2, None);
}

/// The tiny F16 model of the test below: wider, deeper, odd sizes.
fn tiny_f16_odd() -> LlamaConfig {
    let mut cfg = LlamaConfig::tiny(true);
    cfg.dtype = Dtype::F16;
    cfg.hidden = 264;
    cfg.ffn = 712;
    cfg.vocab = 389;
    cfg.layers = 3;
    cfg
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn tiny_llamas_with_the_tensor_core_prefill_match_the_cpu_executor() {
    // Prompts of 7 tokens: a threshold of 4 rows sends every prefill linear
    // of the blocks to the tensor cores (7, 14 and 21 rows; the LM head's
    // 1-3 rows and decoding stay on the GEMV), one of 16 only batch 3's.
    run_model(LlamaConfig::tiny(false), "bf16-b1-tc4", 1, Some(Some(4)));
    run_model(LlamaConfig::tiny(false), "bf16-b2-tc4", 2, Some(Some(4)));
    run_model(tiny_f16_odd(), "f16-b3-tc4", 3, Some(Some(4)));
    run_model(tiny_f16_odd(), "f16-b3-tc16", 3, Some(Some(16)));
    // And with the path off whatever the environment says.
    run_model(LlamaConfig::tiny(false), "bf16-b2-gemv", 2, Some(None));
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn tiny_f16_tied_llama_matches_the_cpu_executor() {
    // Wider and deeper than the default tiny model: GEMV tails (K not a
    // multiple of 512) and a vocabulary not a multiple of the block's rows.
    run_model(tiny_f16_odd(), "f16-b3", 3, None);
}

// ---- Kernels one by one against their CPU references (llama_ref) --------

use pipeswitch::cuda::memory::DeviceAlloc;
use pipeswitch::cuda::{Device, Stream};
use pipeswitch::kernels::gemm::{f32_to_bf16_bits, f32_to_f16_bits};
use pipeswitch::kernels::llama as lk;
use pipeswitch::kernels::llama_ref;

fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Rounds `v` to `dtype` and returns (values, bits).
fn halves(v: &[f32], dtype: Dtype) -> (Vec<f32>, Vec<u16>) {
    let bits: Vec<u16> = v.iter().map(|&x| if dtype == Dtype::Bf16 { f32_to_bf16_bits(x) } else { f32_to_f16_bits(x) }).collect();
    (v.iter().map(|&x| llama_ref::round_to(dtype, x)).collect(), bits)
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gemv_matches_its_reference_at_every_shape() {
    let dev = Device::get(0).unwrap();
    let stream = Stream::new(dev).unwrap();
    lk::preload(dev).unwrap();
    let mut seed = 1;
    for dtype in [Dtype::Bf16, Dtype::F16] {
        for &(m, n, k) in &[(1, 1, 8), (1, 7, 264), (1, 333, 520), (2, 64, 4096), (3, 9, 16), (8, 40, 776), (9, 17, 512), (13, 64, 264), (128, 24, 1024)] {
            for residual in [false, true] {
                seed += 1;
                let x = rand_vec(m * k, seed);
                let (wv, wb) = halves(&rand_vec(n * k, seed + 100), dtype);
                let r = rand_vec(m * (n + 3), seed + 200);
                // out has 3 more columns than n, written from column 2.
                let ldo = n + 3;
                let rr: Vec<f32> = (0..m).flat_map(|i| r[i * ldo + 2..i * ldo + 2 + n].to_vec()).collect();
                let expect = llama_ref::linear_nk_ref(&x, &wv, k, residual.then_some(&rr[..]));
                let dx = DeviceAlloc::from_slice(dev, &x).unwrap();
                let dw = DeviceAlloc::from_slice(dev, &wb).unwrap();
                let dout = DeviceAlloc::from_slice(dev, &vec![f32::NAN; m * ldo]).unwrap();
                let dr = DeviceAlloc::from_slice(dev, &r).unwrap();
                let res = if residual { dr.ptr() + 8 } else { 0 };
                lk::gemv(dev, stream.raw(), dtype, m, n, k, dx.ptr(), k, dw.ptr(), dout.ptr() + 8, ldo, res, ldo).unwrap();
                stream.synchronize().unwrap();
                let mut got = vec![0f32; m * ldo];
                dout.copy_to_slice(&mut got).unwrap();
                for i in 0..m {
                    assert!(got[i * ldo].is_nan() && got[i * ldo + 1].is_nan() && got[i * ldo + n + 2].is_nan(), "{dtype:?} {m}x{n}x{k}: wrote outside its columns");
                    for j in 0..n {
                        let (g, e) = (got[i * ldo + 2 + j], expect[i * n + j]);
                        assert!((g - e).abs() <= 1e-4 * (1.0 + e.abs()) * (k as f32).sqrt(), "{dtype:?} {m}x{n}x{k} res {residual}: [{i},{j}] {g} vs {e}");
                    }
                }
            }
        }
    }
    // Shapes the kernel cannot take are refused before any launch.
    assert!(lk::gemv(dev, stream.raw(), Dtype::Bf16, 1, 8, 12, 256, 12, 256, 256, 8, 0, 8).is_err(), "k % 8");
    assert!(lk::gemv(dev, stream.raw(), Dtype::F32, 1, 8, 16, 256, 16, 256, 256, 8, 0, 8).is_err(), "f32 weights");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn round_matches_its_reference_bit_for_bit() {
    let dev = Device::get(0).unwrap();
    let stream = Stream::new(dev).unwrap();
    lk::preload(dev).unwrap();
    for dtype in [Dtype::Bf16, Dtype::F16] {
        for &(rows, k, ldx) in &[(1, 8, 8), (3, 16, 20), (7, 264, 264), (130, 712, 716), (2, 4096, 4096)] {
            let mut x: Vec<f32> = rand_vec(rows * ldx, (rows * k) as u64).iter().map(|v| v * 3.0).collect();
            // Ties, the edges of the half types, and what they cannot hold.
            let special = [0.0, -0.0, 1.0 + 2f32.powi(-8), 1.0 + 3.0 * 2f32.powi(-8), 65504.0, 65520.0, 1e6, -1e-7, 3e-8, f32::INFINITY, f32::NEG_INFINITY, f32::MAX];
            for (i, v) in special.iter().enumerate().take(k) {
                x[i] = *v;
            }
            let expect: Vec<u16> = (0..rows).flat_map(|r| halves(&x[r * ldx..r * ldx + k], dtype).1).collect();
            let dx = DeviceAlloc::from_slice(dev, &x).unwrap();
            let dy = DeviceAlloc::from_slice(dev, &vec![0xFFFFu16; rows * k + 8]).unwrap();
            lk::round_half(dev, stream.raw(), dtype, dx.ptr(), ldx, dy.ptr(), rows, k).unwrap();
            stream.synchronize().unwrap();
            let mut got = vec![0u16; rows * k + 8];
            dy.copy_to_slice(&mut got).unwrap();
            assert_eq!(got[..rows * k], expect[..], "{dtype:?} {rows}x{k} (ldx {ldx})");
            assert!(got[rows * k..].iter().all(|&b| b == 0xFFFF), "{dtype:?} {rows}x{k}: wrote past its rows");
        }
    }
    // Shapes the kernel cannot take are refused before any launch.
    let buf = DeviceAlloc::new(dev, 4096).unwrap();
    let p = buf.ptr();
    assert!(lk::round_half(dev, stream.raw(), Dtype::Bf16, p, 12, p + 2048, 2, 12).is_err(), "k % 8");
    assert!(lk::round_half(dev, stream.raw(), Dtype::Bf16, p, 6, p + 2048, 2, 8).is_err(), "ldx < k");
    assert!(lk::round_half(dev, stream.raw(), Dtype::F32, p, 8, p + 2048, 2, 8).is_err(), "f32");
    assert!(lk::round_half(dev, stream.raw(), Dtype::Bf16, p + 4, 8, p + 2048, 2, 8).is_err(), "misaligned x");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn small_kernels_match_their_references() {
    let dev = Device::get(0).unwrap();
    let stream = Stream::new(dev).unwrap();
    lk::preload(dev).unwrap();
    // RMSNorm, every row and the last of each sequence of 3.
    let (rows, h) = (6, 520);
    let x = rand_vec(rows * h, 5);
    let (gv, gb) = halves(&rand_vec(h, 6).iter().map(|v| 1.0 + 0.2 * v).collect::<Vec<_>>(), Dtype::Bf16);
    let dx = DeviceAlloc::from_slice(dev, &x).unwrap();
    let dg = DeviceAlloc::from_slice(dev, &gb).unwrap();
    for step in [1, 3] {
        let dout = DeviceAlloc::new(dev, rows * h * 4).unwrap();
        lk::rmsnorm(dev, stream.raw(), Dtype::Bf16, dx.ptr(), dg.ptr(), dout.ptr(), rows, h, step, 1e-5).unwrap();
        stream.synchronize().unwrap();
        let expect = llama_ref::rmsnorm_ref(&x, &gv, 1e-5, Some(step)).unwrap();
        let mut got = vec![0f32; expect.len()];
        dout.copy_to_slice(&mut got).unwrap();
        assert!(rel_err(&got, &expect) < 1e-5, "rmsnorm step {step}");
    }
    // SwiGLU.
    let (t, f) = (5, 300);
    let x = rand_vec(t * 2 * f, 7).iter().map(|v| v * 6.0).collect::<Vec<_>>();
    let dx = DeviceAlloc::from_slice(dev, &x).unwrap();
    let dout = DeviceAlloc::new(dev, t * f * 4).unwrap();
    lk::swiglu(dev, stream.raw(), dx.ptr(), dout.ptr(), t, f).unwrap();
    stream.synchronize().unwrap();
    let mut got = vec![0f32; t * f];
    dout.copy_to_slice(&mut got).unwrap();
    assert!(rel_err(&got, &llama_ref::swiglu_ref(&x, 2 * f).unwrap()) < 1e-5, "swiglu");
    // Argmax: ties go to the first index, -inf rows to 0.
    let cols = 1000;
    let mut x = rand_vec(4 * cols, 8);
    x[3] = 5.0;
    x[700] = 5.0;
    x[cols + 999] = 7.0;
    for v in &mut x[2 * cols..3 * cols] {
        *v = f32::NEG_INFINITY;
    }
    x[3 * cols + 500] = 2.0;
    x[3 * cols + 257] = 2.0;
    let dx = DeviceAlloc::from_slice(dev, &x).unwrap();
    let dout = DeviceAlloc::new(dev, 16).unwrap();
    lk::argmax(dev, stream.raw(), dx.ptr(), dout.ptr(), 4, cols).unwrap();
    stream.synchronize().unwrap();
    let mut got = vec![0i32; 4];
    dout.copy_to_slice(&mut got).unwrap();
    assert_eq!(got, llama_ref::argmax_ref(&x, cols).unwrap());
    assert_eq!(got, [3, 999, 0, 257]);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn cached_attention_and_embedding_match_their_references() {
    use pipeswitch::kernels::gemm::bf16_bits_to_f32;
    let dev = Device::get(0).unwrap();
    let stream = Stream::new(dev).unwrap();
    lk::preload(dev).unwrap();
    let sh = llama_ref::AttentionShape { batch: 2, seq: 3, heads: 4, kv_heads: 2, head_dim: 128, max_seq: 16, max_pos: 20 };
    let (b, s, h, kv, d) = (sh.batch, sh.seq, sh.heads, sh.kv_heads, sh.head_dim);
    let width = (h + 2 * kv) * d;
    let cfg = LlamaConfig::tiny(false);
    let rope = pipeswitch::model::weights::rope_table(&cfg.rope(), sh.max_pos, d);
    for pos in [0i32, 5, 13] {
        let qkv = rand_vec(b * s * width, 40 + pos as u64);
        // Earlier positions already cached (bf16 values), the rest garbage.
        let n_cache = b * kv * sh.max_seq * d;
        let (kc0, kb) = halves(&rand_vec(n_cache, 50), Dtype::Bf16);
        let (vc0, vb) = halves(&rand_vec(n_cache, 51), Dtype::Bf16);
        let (mut kc, mut vc) = (kc0.clone(), vc0.clone());
        let expect = llama_ref::cached_attention_ref(&qkv, &rope, pos, &mut kc, &mut vc, Dtype::Bf16, sh).unwrap();
        let dq = DeviceAlloc::from_slice(dev, &qkv).unwrap();
        let dr = DeviceAlloc::from_slice(dev, &rope).unwrap();
        let dp = DeviceAlloc::from_slice(dev, &[pos]).unwrap();
        let dk = DeviceAlloc::from_slice(dev, &kb).unwrap();
        let dv = DeviceAlloc::from_slice(dev, &vb).unwrap();
        let dout = DeviceAlloc::new(dev, b * s * h * d * 4).unwrap();
        let dflag = DeviceAlloc::from_slice(dev, &[0i32]).unwrap();
        let ptrs = lk::AttentionPtrs { qkv: dq.ptr(), rope: dr.ptr(), pos: dp.ptr(), k_cache: dk.ptr(), v_cache: dv.ptr(), out: dout.ptr(), flag: dflag.ptr() };
        let ash = lk::AttentionShape { batch: b, seq: s, heads: h, kv_heads: kv, head_dim: d, max_seq: sh.max_seq, max_pos: sh.max_pos };
        lk::cached_attention(dev, stream.raw(), &ptrs, &ash).unwrap();
        stream.synchronize().unwrap();
        let mut got = vec![0f32; b * s * h * d];
        dout.copy_to_slice(&mut got).unwrap();
        assert!(rel_err(&got, &expect) < 1e-4, "pos {pos}: attention differs by {:e}", rel_err(&got, &expect));
        let mut kbits = vec![0u16; n_cache];
        dk.copy_to_slice(&mut kbits).unwrap();
        let kgot: Vec<f32> = kbits.iter().map(|&x| bf16_bits_to_f32(x)).collect();
        // The rotation rounds as the reference does: the same bits.
        assert_eq!(kgot, kc, "pos {pos}: the key cache");
        let mut vbits = vec![0u16; n_cache];
        dv.copy_to_slice(&mut vbits).unwrap();
        let vgot: Vec<f32> = vbits.iter().map(|&x| bf16_bits_to_f32(x)).collect();
        assert_eq!(vgot, vc, "pos {pos}: the value cache");
        let mut flag = [0i32];
        dflag.copy_to_slice(&mut flag).unwrap();
        assert_eq!(flag[0], 0);
    }
    // A chunk running past the cache raises the flag.
    let dp = DeviceAlloc::from_slice(dev, &[14i32]).unwrap();
    let qkv = DeviceAlloc::from_slice(dev, &rand_vec(b * s * width, 1)).unwrap();
    let dr = DeviceAlloc::from_slice(dev, &rope).unwrap();
    let dk = DeviceAlloc::new(dev, b * kv * sh.max_seq * d * 2).unwrap();
    let dv = DeviceAlloc::new(dev, b * kv * sh.max_seq * d * 2).unwrap();
    let dout = DeviceAlloc::new(dev, b * s * h * d * 4).unwrap();
    let dflag = DeviceAlloc::from_slice(dev, &[0i32]).unwrap();
    let ptrs = lk::AttentionPtrs { qkv: qkv.ptr(), rope: dr.ptr(), pos: dp.ptr(), k_cache: dk.ptr(), v_cache: dv.ptr(), out: dout.ptr(), flag: dflag.ptr() };
    let ash = lk::AttentionShape { batch: b, seq: s, heads: h, kv_heads: kv, head_dim: d, max_seq: sh.max_seq, max_pos: sh.max_pos };
    lk::cached_attention(dev, stream.raw(), &ptrs, &ash).unwrap();
    stream.synchronize().unwrap();
    let mut flag = [0i32];
    dflag.copy_to_slice(&mut flag).unwrap();
    assert_eq!(flag[0], lk::BAD_POSITION);

    // Token embedding: rows of a bf16 table; a bad id flags and zeroes its row.
    let (vocab, hd) = (50, 72);
    let (tv, tb) = halves(&rand_vec(vocab * hd, 60), Dtype::Bf16);
    let ids = [3i32, 49, 0, 50, -1, 7];
    let dt = DeviceAlloc::from_slice(dev, &tb).unwrap();
    let di = DeviceAlloc::from_slice(dev, &ids).unwrap();
    let dout = DeviceAlloc::new(dev, ids.len() * hd * 4).unwrap();
    let dflag = DeviceAlloc::from_slice(dev, &[0i32]).unwrap();
    lk::embed(dev, stream.raw(), Dtype::Bf16, dout.ptr(), di.ptr(), dt.ptr(), dflag.ptr(), ids.len(), vocab, hd).unwrap();
    stream.synchronize().unwrap();
    let mut got = vec![0f32; ids.len() * hd];
    dout.copy_to_slice(&mut got).unwrap();
    for (t, &id) in ids.iter().enumerate() {
        let row = &got[t * hd..(t + 1) * hd];
        if (0..vocab as i32).contains(&id) {
            assert_eq!(row, &tv[id as usize * hd..(id as usize + 1) * hd], "token {t}");
        } else {
            assert!(row.iter().all(|&v| v == 0.0), "token {t}: a bad id's row is zeros");
        }
    }
    let mut flag = [0i32];
    dflag.copy_to_slice(&mut flag).unwrap();
    assert_eq!(flag[0], 1);
}
