//! `pipeswitch bench llm` (and `pipeswitch demo --models llama3-8b`): an
//! 8B Llama switched in at the PCIe limit and served by the built-in worker.
//!
//! On one GPU, in one run: the card's pinned H2D peak and device-to-device
//! bandwidth; Llama-3-8B shapes with deterministic random BF16 weights
//! written straight into a fresh store (or a Hugging Face directory
//! ingested); then, for a 128-token prompt at batch 1, the time from a
//! request to its first token (host clock, until the token id is in host
//! memory) with:
//!
//! - `pipelined`: the pipelined switch (one group per stored layer: the
//!   rotary table, 32 blocks, the final norm, the LM head, the token table
//!   last) with the first block running while the rest is in flight;
//! - `ready`: the model already resident;
//! - `ready_gemv`, `ready_tensor_cores`, `pipelined_gemv`,
//!   `pipelined_tensor_cores`: the same with the prefill's linears on the
//!   GEMV kernels or on the tensor cores (`Program::with_tensor_cores`);
//!   `pipelined` and `ready` (and decoding, and the logits for the PyTorch
//!   reference) use the default path (`PIPESWITCH_LLM_TENSOR_CORES`), the
//!   report's `tensor_core_rows`;
//! - `plain_load`: one synchronous copy of the whole model from the pinned
//!   store, then the run;
//! - `sleep_wake`: tensor by tensor synchronous copies from the pinned store
//!   (as vLLM's sleep mode wakes a model), then the run; and
//!   `sleep_wake_pageable`: the same from a pageable copy of the weights;
//!
//! against the floor: the model's bytes over the H2D peak. Then greedy
//! decoding at batch 1 and 8 against the HBM roofline (bytes of the weights
//! read per step over the measured device-to-device bandwidth), and with
//! two or three models: alternating requests with both resident, and three
//! models over two regions (least recently used evicted: every request is
//! a switch). Writes the JSON report and the batch-1 tokens and logits for
//! the PyTorch reference (`scripts/llm_torch_ref.py`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::bench::{card_slug, Stats};
use pipeswitch::arena::Arena;
use pipeswitch::cuda::memory::{self, DeviceAlloc};
use pipeswitch::cuda::{Device, Event, Stream};
use pipeswitch::error::{Error, Result};
use pipeswitch::model::llama::{self, LlamaConfig};
use pipeswitch::planner;
use pipeswitch::store::Store;
use pipeswitch::switch::Switch;
use pipeswitch::worker::{Program, RunOptions, Worker};

/// What the LLM benchmark does.
#[derive(Debug, Clone)]
pub struct LlmOptions {
    pub device: i32,
    /// "llama3-8b" or "tiny".
    pub config: String,
    /// A Hugging Face directory with real weights (instead of random ones).
    pub hf_dir: Option<PathBuf>,
    /// Models in the store (1 to 3): 2 and 3 add the multi-model runs.
    pub models: usize,
    pub reps: usize,
    pub prompt: usize,
    pub decode_steps: usize,
    pub threads: usize,
    pub seed: u64,
    pub out_dir: PathBuf,
    /// Keep the store (for the PyTorch reference) instead of destroying it.
    pub keep_store: bool,
    pub store_name: String,
}

impl Default for LlmOptions {
    fn default() -> Self {
        LlmOptions {
            device: 0,
            config: "llama3-8b".into(),
            hf_dir: None,
            models: 1,
            reps: 5,
            prompt: 128,
            decode_steps: 32,
            threads: std::thread::available_parallelism().map_or(4, |n| n.get()),
            seed: 1,
            out_dir: PathBuf::from("bench/results"),
            keep_store: false,
            store_name: format!("pipeswitch-llm-{}", std::process::id()),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct DecodeResult {
    pub batch: usize,
    pub steps: usize,
    pub step_ms: Stats,
    pub tokens_per_s: f64,
    pub roofline_tokens_per_s: f64,
    pub fraction_of_roofline: f64,
    /// The same steps, each one launch of a CUDA graph of the decoding
    /// step captured once (`Worker::capture_run`): step time, tokens/s and
    /// fraction of the roofline, and whether its tokens equal the eager
    /// steps'; or why it could not run.
    pub graph_step_ms: Option<Stats>,
    pub graph_tokens_per_s: Option<f64>,
    pub graph_fraction_of_roofline: Option<f64>,
    pub graph_same_tokens: Option<bool>,
    pub graph_error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PrefillGemm {
    pub weight: String,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub kernel: String,
    pub us: f64,
    pub tflops: f64,
    /// Weight bytes over the kernel's time, GB/s.
    pub weight_gbps: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LlmReport {
    pub card: String,
    pub config: String,
    pub weights: String,
    pub model_bytes: u64,
    pub bytes_read_per_decode_step: u64,
    pub generate_s: f64,
    pub h2d_peak_gbps: f64,
    /// Read + write traffic of a device-to-device copy, GB/s.
    pub d2d_gbps: f64,
    pub floor_ms: f64,
    /// Bytes the first token waits for: all but an untied token table,
    /// whose rows the prefill reads from the pinned store while it is in
    /// flight (it crosses last).
    pub first_token_bytes: u64,
    /// `first_token_bytes` over the H2D peak, ms.
    pub first_token_floor_ms: f64,
    pub ttft_ms: HashMap<String, Stats>,
    /// The tensor-core threshold of the default path (None: GEMV), which
    /// `pipelined`, `ready`, decoding and the batch-1 logits use (the
    /// PyTorch reference rounds as it says), and the threshold of the
    /// `*_tensor_cores` runs.
    pub tensor_core_rows: Option<usize>,
    pub tensor_core_rows_compared: usize,
    /// The batch-1 prompt's logits with the other prefill path: the file
    /// (beside the default path's) and its tensor-core threshold (None:
    /// GEMV), for the PyTorch reference.
    pub other_prefill_logits: String,
    pub other_prefill_tensor_core_rows: Option<usize>,
    pub ttft_over_floor: f64,
    pub ttft_over_first_token_floor: f64,
    pub sleep_wake_over_pipelined: f64,
    pub decode: Vec<DecodeResult>,
    /// The GEMV alone on one down_proj-sized weight ([4096, 14336]), by
    /// rows of x (1 and 8): weight bytes over kernel time, GB/s.
    pub gemv_gbps: Vec<(usize, f64)>,
    /// The tensor-core prefill's GEMMs alone (`gemm_c32`, the prompt's rows
    /// times each merged weight of block 0): shape, kernel, microseconds.
    pub prefill_gemms: Vec<PrefillGemm>,
    pub two_resident_ttft_ms: Option<Stats>,
    pub three_over_two_regions_ttft_ms: Option<Stats>,
    pub tokens_batch1: Vec<i32>,
    pub notes: Vec<String>,
}

fn cfg_of(name: &str) -> Result<LlamaConfig> {
    match name {
        "llama3-8b" => Ok(LlamaConfig::LLAMA3_8B),
        "tiny" => Ok(LlamaConfig::tiny(false)),
        _ => Err(Error::invalid(format!("unknown LLM config {name:?} (llama3-8b, tiny)"))),
    }
}

fn le_i32(v: &[i32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The prompt: `len` deterministic token ids per sequence.
pub fn prompt_ids(batch: usize, len: usize, vocab: usize) -> Vec<i32> {
    (0..batch * len).map(|i| ((i * 7919 + 13) % vocab) as i32).collect()
}

/// Device-to-device bandwidth (read + write traffic), GB/s.
fn measure_d2d(device: &'static Device, bytes: usize) -> Result<f64> {
    let a = DeviceAlloc::new(device, bytes)?;
    let b = DeviceAlloc::new(device, bytes)?;
    let s = Stream::new(device)?;
    let (e0, e1) = (Event::new(device, true)?, Event::new(device, true)?);
    let mut t = vec![];
    for _ in 0..5 {
        e0.record(s.raw())?;
        // SAFETY: both allocations hold `bytes`.
        unsafe { memory::copy_dtod_async(b.ptr(), a.ptr(), bytes, s.raw())? };
        e1.record(s.raw())?;
        e1.synchronize()?;
        t.push(f64::from(Event::elapsed_ms(&e0, &e1)?));
    }
    let ms = pipeswitch::measure::median(&mut t);
    Ok(2.0 * bytes as f64 / (ms * 1e-3) / 1e9)
}

struct Bench {
    store: Arc<Store>,
    arena: Arc<Arena>,
    worker: Worker,
    names: Vec<String>,
    regions: Vec<u64>,
    prompt: usize,
}

impl Bench {
    /// Runs the prefill of `ids` (batch 1 or more) on the model `switch`
    /// holds; returns the first tokens (host memory).
    fn first_token(&mut self, p: &Program, switch: &Switch, ids: &[i32]) -> Result<Vec<i32>> {
        self.worker.set_input(p, "input_ids", &le_i32(ids))?;
        self.worker.set_input(p, "pos", &le_i32(&[0]))?;
        self.worker.run(p, switch, RunOptions::default())?;
        self.worker.read_i32(p, "next")
    }
}

/// Runs the benchmark; `log` gets progress lines.
pub fn run(opts: &LlmOptions, log: &mut dyn FnMut(&str)) -> Result<LlmReport> {
    // Arguments first: a bad one is refused before any GPU work.
    cfg_of(&opts.config)?;
    if opts.prompt == 0 || opts.decode_steps == 0 || opts.reps == 0 {
        return Err(Error::invalid("prompt, decode steps and reps must be positive"));
    }
    if let Some(d) = &opts.hf_dir {
        if !d.join("config.json").is_file() {
            return Err(Error::NotFound(format!("{} has no config.json", d.display())));
        }
    }
    let device = Device::get(opts.device)?;
    device.bind()?;
    let card = device.name()?;
    let mut notes = vec![];
    let cfg = cfg_of(&opts.config)?;
    let n_models = opts.models.clamp(1, 3);
    let max_seq = (opts.prompt + opts.decode_steps + 8).min(cfg.max_positions);
    if opts.prompt == 0 || opts.prompt + opts.decode_steps > max_seq {
        return Err(Error::invalid(format!("prompt {} + {} steps exceed the {} positions", opts.prompt, opts.decode_steps, cfg.max_positions)));
    }

    log(&format!("card: {card}"));
    let h2d = pipeswitch::measure::measure_h2d(opts.device, 1 << 30, 5)?;
    let d2d = measure_d2d(device, 1 << 30)?;
    log(&format!("H2D peak (pinned, 1 GiB copies) {:.1} GB/s; device-to-device {:.0} GB/s (read + write)", h2d.peak_gbps, d2d));

    // The store: one model per request stream.
    let model_bytes = cfg.weight_bytes();
    let _ = Store::destroy(&opts.store_name);
    let store = Arc::new(Store::create(&opts.store_name, (model_bytes + (64 << 20)) * n_models as u64, 8)?);
    let t0 = Instant::now();
    let mut names = vec![];
    let weights_kind;
    if let Some(dir) = &opts.hf_dir {
        let m = llama::add_hf_dir(&store, "llm-0", dir, max_seq.max(cfg.max_positions), &mut |_, _| {})?;
        names.push(m.name.clone());
        weights_kind = format!("Hugging Face directory {}", dir.display());
        if n_models > 1 {
            notes.push("multi-model runs need random weights (one HF directory given): skipped".into());
        }
    } else {
        for i in 0..n_models {
            let name = format!("llm-{i}");
            llama::add_random(&store, &name, &cfg, opts.seed + i as u64, opts.threads, &mut |_, _| {})?;
            names.push(name);
        }
        weights_kind = format!("deterministic random BF16 (seed {})", opts.seed);
    }
    let generate_s = t0.elapsed().as_secs_f64();
    log(&format!("{} model(s) of {:.2} GB written into the store in {generate_s:.1} s ({} threads)", names.len(), model_bytes as f64 / 1e9, opts.threads));
    let t1 = Instant::now();
    store.pin(device)?;
    log(&format!("store pinned in {:.2} s", t1.elapsed().as_secs_f64()));

    let model = store.model(&names[0])?;
    let model_bytes = model.bytes;
    let pre1 = Program::new(model.clone(), llama::graph(&cfg, 1, opts.prompt, max_seq))?;
    let dec1 = Program::new(model.clone(), llama::graph(&cfg, 1, 1, max_seq))?;
    let pre8 = Program::new(model.clone(), llama::graph(&cfg, 8, opts.prompt, max_seq))?;
    let dec8 = Program::new(model.clone(), llama::graph(&cfg, 8, 1, max_seq))?;
    // The prefill both ways, whatever the default.
    let tc_default = pre1.tensor_core_rows();
    let tc_rows = tc_default.unwrap_or(pipeswitch::kernels::llama::TENSOR_CORE_MIN_ROWS);
    let pre1_gemv = Program::with_tensor_cores(model.clone(), llama::graph(&cfg, 1, opts.prompt, max_seq), None)?;
    let pre1_tc = Program::with_tensor_cores(model.clone(), llama::graph(&cfg, 1, opts.prompt, max_seq), Some(tc_rows))?;
    let other = if tc_default.is_some() { (&pre1_gemv, "gemv") } else { (&pre1_tc, "tensor_cores") };
    let default_path = if tc_default.is_some() { "tensor_cores" } else { "gemv" };
    log(&format!(
        "prefill of {} tokens: default path {default_path} ({}; {} of its {} linear launches on the tensor cores)",
        opts.prompt,
        match tc_default {
            Some(r) => format!("tensor cores from {r} rows"),
            None => "GEMV only".into(),
        },
        pre1.tensor_core_ops().iter().filter(|&&t| t).count(),
        pre1.gemv_columns().iter().zip(&pre1.graph().ops).filter(|(c, op)| c.is_some() && matches!(op, pipeswitch::model::Op::Linear { .. })).count()
    ));
    let act = [&pre1, &dec1, &pre8, &dec8, &pre1_gemv, &pre1_tc].iter().map(|p| p.activation_bytes()).max().unwrap_or(0);
    let n_regions = names.len().min(2);
    let region_bytes = model_bytes.div_ceil(1 << 21) << 21;
    let arena = Arc::new(Arena::create(opts.device, region_bytes * n_regions as u64 + act + (64 << 20), 32 << 20)?);
    let regions: Vec<u64> = (0..n_regions).map(|_| arena.alloc(region_bytes)).collect::<Result<_>>()?;
    let mut worker = Worker::new(&arena)?;
    for p in [&pre8, &dec8, &pre1, &dec1, &pre1_gemv, &pre1_tc] {
        worker.prepare(p)?;
    }
    let mut b = Bench { store: store.clone(), arena: arena.clone(), worker, names: names.clone(), regions, prompt: opts.prompt };
    let ids1 = prompt_ids(1, opts.prompt, cfg.vocab);
    let plan = planner::per_layer_plan(model.layers.len());
    let mut sw = Switch::new(opts.device)?;
    let floor_ms = model_bytes as f64 / (h2d.peak_gbps * 1e9) * 1e3;
    let table_bytes: u64 = if cfg.tie_embeddings {
        0
    } else {
        model.layers.iter().filter(|l| l.name == "model.embed_tokens").map(|l| l.bytes).sum()
    };
    let first_token_bytes = model_bytes - table_bytes;
    let first_token_floor_ms = first_token_bytes as f64 / (h2d.peak_gbps * 1e9) * 1e3;
    let mut ttft: HashMap<String, Vec<f64>> = HashMap::new();
    let mut first_tokens = None;
    let lease = store.lease(&names[0])?;
    let host = store.leased_host_ptr(&lease)?;
    // A pageable copy of the weights (as a process's own heap holds them).
    let mut pageable = vec![0u8; model_bytes as usize];
    store.read(&lease, 0, &mut pageable)?;
    for rep in 0..opts.reps + 1 {
        // Pipelined switch from the host store.
        let t = Instant::now();
        sw.start(&b.store, &b.names[0], &b.arena, b.regions[0], &plan)?;
        let tok = b.first_token(&pre1, &sw, &ids1)?;
        let pipelined = t.elapsed().as_secs_f64() * 1e3;
        sw.synchronize()?;
        if let Some(f) = &first_tokens {
            if f != &tok {
                notes.push(format!("rep {rep}: the first token changed ({f:?} -> {tok:?})"));
            }
        }
        first_tokens = Some(tok);
        // The pipelined switch with the other prefill path.
        let t = Instant::now();
        sw.start(&b.store, &b.names[0], &b.arena, b.regions[0], &plan)?;
        let tok_other = b.first_token(other.0, &sw, &ids1)?;
        let pipelined_other = t.elapsed().as_secs_f64() * 1e3;
        sw.synchronize()?;
        // Ready: resident; the default path, then each path.
        let t = Instant::now();
        b.first_token(&pre1, &sw, &ids1)?;
        let ready = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        let tok_gemv = b.first_token(&pre1_gemv, &sw, &ids1)?;
        let ready_gemv = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        let tok_tc = b.first_token(&pre1_tc, &sw, &ids1)?;
        let ready_tc = t.elapsed().as_secs_f64() * 1e3;
        if tok_gemv != tok_tc || tok_other != tok_tc && other.1 == "tensor_cores" || tok_other != tok_gemv && other.1 == "gemv" {
            notes.push(format!("rep {rep}: first tokens: GEMV prefill {tok_gemv:?}, tensor-core prefill {tok_tc:?} (pipelined {tok_other:?})"));
        }
        // Plain load: one synchronous copy of everything, then the run.
        let dst = b.arena.base() + b.regions[0];
        // SAFETY (both blocks): the region holds the model's bytes; the host
        // range is the leased model's bytes in the pinned store.
        unsafe { memory::memset_d8(dst, 0, model_bytes as usize)? };
        let t = Instant::now();
        unsafe { memory::copy_htod(dst, host, model_bytes as usize)? };
        let tok_plain = b.first_token(&pre1, &sw, &ids1)?;
        let plain = t.elapsed().as_secs_f64() * 1e3;
        // Sleep-mode-like wake: tensor by tensor, synchronous.
        unsafe { memory::memset_d8(dst, 0, model_bytes as usize)? };
        let t = Instant::now();
        for tensor in &model.tensors {
            // SAFETY: each tensor lies inside the model's bytes on both sides.
            unsafe { memory::copy_htod(dst + tensor.offset, host.add(tensor.offset as usize), tensor.bytes as usize)? };
        }
        let tok_wake = b.first_token(&pre1, &sw, &ids1)?;
        let wake = t.elapsed().as_secs_f64() * 1e3;
        // The same from pageable memory.
        unsafe { memory::memset_d8(dst, 0, model_bytes as usize)? };
        let t = Instant::now();
        for tensor in &model.tensors {
            // SAFETY: each tensor lies inside the model's bytes on both sides.
            unsafe { memory::copy_htod(dst + tensor.offset, pageable.as_ptr().add(tensor.offset as usize), tensor.bytes as usize)? };
        }
        let tok_wake_pageable = b.first_token(&pre1, &sw, &ids1)?;
        let wake_pageable = t.elapsed().as_secs_f64() * 1e3;
        if tok_wake_pageable != tok_wake {
            notes.push(format!("rep {rep}: the pageable wake's first token {tok_wake_pageable:?} differs"));
        }
        if Some(&tok_plain) != first_tokens.as_ref() || Some(&tok_wake) != first_tokens.as_ref() {
            notes.push(format!("rep {rep}: plain/wake first tokens {tok_plain:?}/{tok_wake:?} differ from the pipelined {first_tokens:?}"));
        }
        if rep == 0 {
            continue; // warm-up
        }
        log(&format!("rep {rep}: time to first token: pipelined {pipelined:.1} ms, ready {ready:.1}, plain load {plain:.1}, sleep-mode wake {wake:.1} (pageable {wake_pageable:.1}) (floor {floor_ms:.1})"));
        log(&format!(
            "rep {rep}: prefill paths: ready {ready_gemv:.1} ms (GEMV) / {ready_tc:.1} ms (tensor cores from {tc_rows} rows); pipelined with the {} path {pipelined_other:.1} ms",
            other.1
        ));
        let pipelined_path = format!("pipelined_{default_path}");
        let pipelined_other_path = format!("pipelined_{}", other.1);
        for (k, v) in [
            ("pipelined", pipelined),
            ("ready", ready),
            ("plain_load", plain),
            ("sleep_wake", wake),
            ("sleep_wake_pageable", wake_pageable),
            ("ready_gemv", ready_gemv),
            ("ready_tensor_cores", ready_tc),
            (pipelined_path.as_str(), pipelined),
            (pipelined_other_path.as_str(), pipelined_other),
        ] {
            ttft.entry(k.into()).or_default().push(v);
        }
    }
    let ttft: HashMap<String, Stats> = ttft.into_iter().map(|(k, v)| (k, Stats::of(&v))).collect();
    let pipelined = ttft.get("pipelined").map_or(f64::NAN, |s| s.median);
    let wake = ttft.get("sleep_wake").map_or(f64::NAN, |s| s.median);
    let med = |k: &str| ttft.get(k).map_or(f64::NAN, |s| s.median);
    log(&format!(
        "prefill paths (medians): ready {:.1} ms with the GEMV, {:.1} ms on the tensor cores; pipelined {:.1} / {:.1} ms",
        med("ready_gemv"),
        med("ready_tensor_cores"),
        med("pipelined_gemv"),
        med("pipelined_tensor_cores")
    ));

    // The prompt's logits with the other prefill path (checked by the
    // PyTorch reference as well).
    b.worker.set_input(other.0, "input_ids", &le_i32(&ids1))?;
    b.worker.set_input(other.0, "pos", &le_i32(&[0]))?;
    b.worker.run(other.0, &sw, RunOptions::default())?;
    let logits_other = b.worker.read_f32(other.0, "logits")?;

    // Decoding: the model is resident (the last rep's copies).
    let per_step_bytes: u64 = model.layers.iter().filter(|l| l.name != "model.embed_tokens" || cfg.tie_embeddings).filter(|l| l.name != "rope").map(|l| l.bytes).sum();
    let mut decode = vec![];
    let mut tokens_batch1 = vec![];
    let mut logits1: Vec<f32> = vec![];
    for (batch, pre, dec) in [(1usize, &pre1, &dec1), (8, &pre8, &dec8)] {
        let ids = prompt_ids(batch, opts.prompt, cfg.vocab);
        b.worker.set_input(pre, "input_ids", &le_i32(&ids))?;
        b.worker.set_input(pre, "pos", &le_i32(&[0]))?;
        b.worker.run(pre, &sw, RunOptions::default())?;
        let mut next = b.worker.read_i32(pre, "next")?;
        if batch == 1 {
            logits1 = b.worker.read_f32(pre, "logits")?;
            tokens_batch1.push(next[0]);
        }
        let first = next.clone();
        let mut eager_tokens = vec![];
        let mut steps = vec![];
        for step in 0..opts.decode_steps.saturating_sub(1) {
            let t = Instant::now();
            b.worker.set_input(dec, "input_ids", &le_i32(&next))?;
            b.worker.set_input(dec, "pos", &le_i32(&[(b.prompt + step) as i32]))?;
            b.worker.run(dec, &sw, RunOptions::default())?;
            next = b.worker.read_i32(dec, "next")?;
            steps.push(t.elapsed().as_secs_f64() * 1e3);
            eager_tokens.push(next.clone());
            if batch == 1 {
                tokens_batch1.push(next[0]);
            }
        }
        let st = Stats::of(&steps[1.min(steps.len())..]);
        let tps = batch as f64 / (st.median * 1e-3);
        let roof = batch as f64 / (per_step_bytes as f64 / (d2d * 1e9));
        log(&format!("decode batch {batch}: {:.2} ms per step, {tps:.1} tokens/s; roofline {roof:.1} tokens/s ({:.0}%)", st.median, 100.0 * tps / roof));
        // The same steps again from the same prompt's cache (the prefill
        // wrote it; the steps overwrite the same positions), each step one
        // launch of a graph captured once.
        let mut graph_steps = vec![];
        let graphed = (|| -> Result<bool> {
            let g = b.worker.capture_run(dec, &sw)?;
            let mut next = first.clone();
            let mut same = true;
            for (step, want) in eager_tokens.iter().enumerate() {
                let t = Instant::now();
                b.worker.set_input(dec, "input_ids", &le_i32(&next))?;
                b.worker.set_input(dec, "pos", &le_i32(&[(b.prompt + step) as i32]))?;
                b.worker.run_graph(dec, &sw, &g)?;
                next = b.worker.read_i32(dec, "next")?;
                graph_steps.push(t.elapsed().as_secs_f64() * 1e3);
                same &= &next == want;
            }
            Ok(same)
        })();
        let mut r = DecodeResult {
            batch,
            steps: steps.len(),
            step_ms: st,
            tokens_per_s: tps,
            roofline_tokens_per_s: roof,
            fraction_of_roofline: tps / roof,
            graph_step_ms: None,
            graph_tokens_per_s: None,
            graph_fraction_of_roofline: None,
            graph_same_tokens: None,
            graph_error: None,
        };
        match graphed {
            Ok(same) => {
                let gs = Stats::of(&graph_steps[1.min(graph_steps.len())..]);
                let gtps = batch as f64 / (gs.median * 1e-3);
                log(&format!(
                    "decode batch {batch}, one CUDA graph per step: {:.2} ms per step, {gtps:.1} tokens/s ({:.0}% of the roofline); tokens {}",
                    gs.median,
                    100.0 * gtps / roof,
                    if same { "the same as the eager steps'" } else { "DIFFER from the eager steps'" }
                ));
                r.graph_step_ms = Some(gs);
                r.graph_tokens_per_s = Some(gtps);
                r.graph_fraction_of_roofline = Some(gtps / roof);
                r.graph_same_tokens = Some(same);
            }
            Err(e) => {
                log(&format!("decode batch {batch}, one CUDA graph per step: FAILED: {e}"));
                r.graph_error = Some(e.to_string());
            }
        }
        decode.push(r);
    }

    // What the PyTorch reference needs (the report with the batch-1 tokens,
    // the logits, the manifest) is written now, and the report again at the
    // end: a failure or a timeout in the parts below still leaves the
    // correctness check its inputs.
    std::fs::create_dir_all(&opts.out_dir).map_err(|e| Error::io(format!("creating {}", opts.out_dir.display()), e))?;
    let slug = card_slug(&card);
    let path = opts.out_dir.join(format!("llm-{}-{slug}.json", opts.config));
    let write_report = |r: &LlmReport| -> Result<()> {
        let json = serde_json::to_string_pretty(r).map_err(|e| Error::Internal(e.to_string()))?;
        std::fs::write(&path, json).map_err(|e| Error::io(format!("writing {}", path.display()), e))
    };
    let lpath = opts.out_dir.join(format!("llm-{}-{slug}-logits.f32", opts.config));
    let bytes: Vec<u8> = logits1.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(&lpath, bytes).map_err(|e| Error::io(format!("writing {}", lpath.display()), e))?;
    let other_name = format!("llm-{}-{slug}-logits-{}.f32", opts.config, other.1);
    let opath = opts.out_dir.join(&other_name);
    let bytes: Vec<u8> = logits_other.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(&opath, bytes).map_err(|e| Error::io(format!("writing {}", opath.display()), e))?;
    if opts.keep_store {
        // A manifest for the PyTorch reference: where each tensor lies in
        // the store's segment file.
        let m = store.model(&names[0])?;
        let tensors: Vec<serde_json::Value> = m
            .tensors
            .iter()
            .map(|t| serde_json::json!({"name": t.name, "dtype": t.dtype.name(), "shape": t.shape, "offset": m.segment_offset + t.offset, "bytes": t.bytes}))
            .collect();
        let manifest = serde_json::json!({
            "segment": Store::segment_path(&opts.store_name)?.display().to_string(),
            "config": llama::stored_config(&m)?,
            "prompt": prompt_ids(1, opts.prompt, cfg.vocab),
            "tensors": tensors,
        });
        let mpath = opts.out_dir.join("llm-manifest.json");
        std::fs::write(&mpath, manifest.to_string()).map_err(|e| Error::io(format!("writing {}", mpath.display()), e))?;
        log(&format!("kept store {:?}; manifest {}", opts.store_name, mpath.display()));
    }
    let mut report = LlmReport {
        card: card.clone(),
        config: opts.config.clone(),
        weights: weights_kind,
        model_bytes,
        bytes_read_per_decode_step: per_step_bytes,
        generate_s,
        h2d_peak_gbps: h2d.peak_gbps,
        d2d_gbps: d2d,
        floor_ms,
        first_token_bytes,
        first_token_floor_ms,
        ttft_over_floor: pipelined / floor_ms,
        ttft_over_first_token_floor: pipelined / first_token_floor_ms,
        sleep_wake_over_pipelined: wake / pipelined,
        ttft_ms: ttft,
        tensor_core_rows: tc_default,
        tensor_core_rows_compared: tc_rows,
        other_prefill_logits: other_name,
        other_prefill_tensor_core_rows: other.0.tensor_core_rows(),
        decode,
        gemv_gbps: vec![],
        prefill_gemms: vec![],
        two_resident_ttft_ms: None,
        three_over_two_regions_ttft_ms: None,
        tokens_batch1,
        notes: notes.iter().cloned().chain(["partial report: written before the GEMV and multi-model runs (rewritten when they finish)".to_string()]).collect(),
    };
    write_report(&report)?;
    log(&format!("wrote {} (partial) and {}", path.display(), lpath.display()));

    // The GEMV alone: the biggest matrices of a block, from the arena.
    let mut gemv_gbps = vec![];
    {
        let (_, t) = model.tensor("model.layers.0.mlp.down_proj.weight").ok_or_else(|| Error::Internal("no down_proj".into()))?;
        let (n, k) = (t.shape[0] as usize, t.shape[1] as usize);
        let w = sw.model_base()? + t.offset;
        let x = DeviceAlloc::new(device, 8 * k * 4)?;
        x.fill(0)?;
        let out = DeviceAlloc::new(device, 8 * n * 4)?;
        let s = Stream::new(device)?;
        let (e0, e1) = (Event::new(device, true)?, Event::new(device, true)?);
        for m in [1usize, 8] {
            let mut ts = vec![];
            for _ in 0..20 {
                e0.record(s.raw())?;
                pipeswitch::kernels::llama::gemv(device, s.raw(), t.dtype, m, n, k, x.ptr(), k, w, out.ptr(), n, 0, n)?;
                e1.record(s.raw())?;
                e1.synchronize()?;
                ts.push(f64::from(Event::elapsed_ms(&e0, &e1)?));
            }
            let ms = pipeswitch::measure::median(&mut ts[2..].to_vec());
            let gbps = t.bytes as f64 / (ms * 1e-3) / 1e9;
            log(&format!("GEMV alone, {m} row(s) of x times [{n}, {k}]: {ms:.3} ms, {gbps:.0} GB/s of weights ({:.0}% of the device-to-device bandwidth)", 100.0 * gbps / d2d));
            gemv_gbps.push((m, gbps));
        }
    }

    // The tensor-core prefill's GEMMs alone: the prompt's rows (rounded
    // activations, zeros) times block 0's merged weights, fp32 out.
    let mut prefill_gemms = vec![];
    {
        use pipeswitch::kernels::gemm::{self, GemmArgs, GemmDtype};
        let m = opts.prompt;
        let merged = [("self_attn.q_proj", 3usize), ("self_attn.o_proj", 1), ("mlp.gate_proj", 2), ("mlp.down_proj", 1)];
        let kmax = cfg.hidden.max(cfg.ffn);
        let x = DeviceAlloc::new(device, m * kmax * 2)?;
        x.fill(0)?;
        let out = DeviceAlloc::new(device, m * (cfg.qkv_width().max(2 * cfg.ffn)) * 4)?;
        let s = Stream::new(device)?;
        let (e0, e1) = (Event::new(device, true)?, Event::new(device, true)?);
        for (name, parts) in merged {
            let wname = format!("model.layers.0.{name}.weight");
            let (_, t) = model.tensor(&wname).ok_or_else(|| Error::Internal(format!("no {wname}")))?;
            let k = t.shape[1] as usize;
            // Q|K|V and gate|up are stored back to back: one GEMM each.
            let n: usize = match parts {
                3 => cfg.qkv_width(),
                2 => 2 * cfg.ffn,
                _ => t.shape[0] as usize,
            };
            let dt = if t.dtype == pipeswitch::store::Dtype::F16 { GemmDtype::F16 } else { GemmDtype::Bf16 };
            let g = GemmArgs::dense(m, n, k, x.ptr(), sw.model_base()? + t.offset, true, out.ptr());
            let mut ts = vec![];
            for _ in 0..20 {
                e0.record(s.raw())?;
                gemm::gemm_c32(device, s.raw(), dt, &g)?;
                e1.record(s.raw())?;
                e1.synchronize()?;
                ts.push(f64::from(Event::elapsed_ms(&e0, &e1)?));
            }
            let us = pipeswitch::measure::median(&mut ts[2..].to_vec()) * 1e3;
            let kernel = gemm::kernel_name_on(device, dt, &g)?;
            let tflops = 2.0 * (m * n * k) as f64 / (us * 1e-6) / 1e12;
            let weight_gbps = (n * k * 2) as f64 / (us * 1e-6) / 1e9;
            log(&format!("tensor-core prefill GEMM alone: {m} x {n} x {k} ({name}{}): {kernel}_c32 {us:.1} us, {tflops:.0} TFLOP/s, weights read at {weight_gbps:.0} GB/s", if parts > 1 { ", merged" } else { "" }));
            prefill_gemms.push(PrefillGemm { weight: name.to_string(), m, n, k, kernel: format!("{kernel}_c32"), us, tflops, weight_gbps });
        }
    }

    // Several models.
    let mut two = None;
    let mut three = None;
    if b.names.len() >= 2 {
        let mut sws = [sw, Switch::new(opts.device)?];
        let programs: Vec<Program> = b.names.iter().map(|n| Program::new(store.model(n)?, llama::graph(&cfg, 1, opts.prompt, max_seq))).collect::<Result<_>>()?;
        for p in &programs {
            b.worker.prepare(p)?;
        }
        // Both resident: alternate.
        for (i, s) in sws.iter_mut().enumerate() {
            s.start_whole(&b.store, &b.names[i], &b.arena, b.regions[i])?;
            s.synchronize()?;
        }
        let mut t2 = vec![];
        for r in 0..2 * opts.reps {
            let i = r % 2;
            let t = Instant::now();
            b.first_token(&programs[i], &sws[i], &ids1)?;
            t2.push(t.elapsed().as_secs_f64() * 1e3);
        }
        log(&format!("two models resident, alternating: time to first token {:.1} ms (median)", Stats::of(&t2).median));
        two = Some(Stats::of(&t2));
        if b.names.len() >= 3 {
            // Three models over two regions, least recently used evicted:
            // A B C A B C ... every request switches its model in.
            let mut holder: Vec<usize> = vec![0, 1];
            let mut last_use = [0usize, 1];
            let mut t3 = vec![];
            for r in 0..3 * opts.reps {
                let m = (r + 2) % 3;
                let t = Instant::now();
                let slot = match holder.iter().position(|&h| h == m) {
                    Some(s) => s,
                    None => {
                        let s = if last_use[0] <= last_use[1] { 0 } else { 1 };
                        sws[s].start(&b.store, &b.names[m], &b.arena, b.regions[s], &plan)?;
                        holder[s] = m;
                        s
                    }
                };
                last_use[slot] = r + 2;
                b.first_token(&programs[m], &sws[slot], &ids1)?;
                t3.push(t.elapsed().as_secs_f64() * 1e3);
                sws[slot].synchronize()?;
            }
            log(&format!("three models over two regions (LRU): time to first token {:.1} ms (median; every request a switch)", Stats::of(&t3).median));
            three = Some(Stats::of(&t3));
        }
    }

    drop(pageable);
    report.gemv_gbps = gemv_gbps;
    report.prefill_gemms = prefill_gemms;
    report.two_resident_ttft_ms = two;
    report.three_over_two_regions_ttft_ms = three;
    report.notes = notes;
    log(&format!(
        "time to first token: pipelined {:.1} ms = {:.3} x the floor ({floor_ms:.1} ms: all bytes), {:.3} x the bytes the first token waits for ({first_token_floor_ms:.1} ms: the token table crosses last, its rows read from the host); sleep-mode-like wake {:.1} ms = {:.1} x the pipelined switch",
        pipelined, report.ttft_over_floor, report.ttft_over_first_token_floor, wake, report.sleep_wake_over_pipelined
    ));
    write_report(&report)?;
    log(&format!("wrote {}", path.display()));
    drop(lease);
    drop(b);
    if !opts.keep_store {
        drop(store);
        let _ = Store::destroy(&opts.store_name);
    }
    Ok(report)
}
