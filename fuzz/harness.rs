//! The bodies of the fuzz targets, shared by the libFuzzer binaries
//! (`fuzz/fuzz_targets/*.rs`) and the stable replay test
//! (`tests/fuzz_corpus.rs`), so that CI replays exactly what was fuzzed.
//!
//! Each function takes the raw input and asserts invariants, not only "no
//! crash": errors must be clean (a typed error with a message, never
//! `Error::Internal`, which means a bug in the library), data that is
//! accepted must read back as it went in, and refused input must leave the
//! store as it was. See docs/fuzzing.md.
//!
//! Stores live in one temporary directory per process (`PIPESWITCH_SHM_DIR`,
//! set once, removed at exit).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use pipeswitch::error::Error;
use pipeswitch::ffi::plan::{plan_stored_model, ps_plan_groups, ps_plan_makespan};
use pipeswitch::ffi::{PS_ERR_BUFFER_TOO_SMALL, PS_ERR_INVALID_ARGUMENT, PS_OK};
use pipeswitch::model::cpu::{self, HostWeights};
use pipeswitch::model::graph::{Graph, WeightShapes};
use pipeswitch::model::reference::ModelDef;
use pipeswitch::planner::{self, Costs, PlanError};
use pipeswitch::store::safetensors as st;
use pipeswitch::store::{layout, Dtype, LayerInfo, LayerSpec, Model, ModelSpec, Store, TensorInfo, TensorSpec, GRAPH_ATTRIBUTE, TENSOR_ALIGN};
use pipeswitch::worker::Program;

// ---------------------------------------------------------------------------
// Environment
// ---------------------------------------------------------------------------

static SHM_DIR: OnceLock<PathBuf> = OnceLock::new();

/// This process's store directory, created and exported once.
pub fn shm_dir() -> &'static Path {
    SHM_DIR.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        let dir = if shm.is_dir() { tempfile::tempdir_in(shm) } else { tempfile::tempdir() };
        let path = dir.expect("tempdir").keep();
        std::env::set_var(pipeswitch::store::shm::DIR_ENV, &path);
        // SAFETY: registers a function that only removes the directory.
        unsafe { libc::atexit(remove_shm_dir) };
        path
    })
}

extern "C" fn remove_shm_dir() {
    if let Some(dir) = SHM_DIR.get() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// A name no other call of this process uses (store names allow 64 bytes).
fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!("fz-{prefix}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// A clean refusal: a typed error with a message. `Internal` means the
/// library hit a state it thought impossible, so hostile input that reaches
/// it is a finding.
#[track_caller]
fn clean(e: &Error) {
    assert!(!matches!(e, Error::Internal(_)), "internal error from hostile input: {e}");
    assert!(!e.to_string().is_empty(), "an error without a message: {e:?}");
}

/// A model's description as text, for comparisons (NaN profiles compare equal).
fn describe(m: &Model) -> String {
    format!("{m:?}")
}

/// Checks what the store promises of every model it hands out: tensors in
/// range and aligned, layers tiling the tensors and the bytes in order.
fn check_model(m: &Model) {
    assert!(m.bytes % TENSOR_ALIGN == 0 && m.bytes > 0, "model bytes {}", m.bytes);
    assert!(!m.layers.is_empty());
    for t in &m.tensors {
        assert!(t.offset % TENSOR_ALIGN == 0 && t.offset + t.bytes <= m.bytes, "tensor {t:?} outside {} bytes", m.bytes);
        assert_eq!(pipeswitch::store::model::tensor_bytes(t.dtype, &t.shape).ok(), Some(t.bytes));
    }
    let (mut first, mut off) = (0usize, 0u64);
    for l in &m.layers {
        assert_eq!((l.first_tensor, l.offset), (first, off), "layer {l:?} does not follow the previous one");
        assert!(l.n_tensors > 0);
        first += l.n_tensors;
        off += l.bytes;
    }
    assert_eq!((first, off), (m.tensors.len(), m.bytes), "layers do not cover the model");
}

// ---------------------------------------------------------------------------
// Target 1: safetensors ingestion
// ---------------------------------------------------------------------------

/// One store for the whole process; every input leaves it empty again.
fn ingest_store() -> &'static Store {
    static STORE: OnceLock<Store> = OnceLock::new();
    STORE.get_or_init(|| {
        shm_dir();
        Store::create(&unique("st"), 16 << 20, 4).expect("creating the ingest store")
    })
}

/// The bytes as a safetensors file added to a small store: refused files
/// change nothing; accepted ones read back tensor by tensor as the parser
/// saw them, in its layer order, with their attributes.
pub fn safetensors_ingest(data: &[u8]) {
    let store = ingest_store();
    let path = shm_dir().join(format!("{}.safetensors", unique("in")));
    std::fs::write(&path, data).expect("writing the input file");
    let parsed = st::parse(data, "input", None);
    let mut last = (0u64, 0u64);
    let added = store.add_safetensors("m", &path, None, &mut |done, total| {
        assert!(done <= total && done >= last.0 && (last.1 == 0 || total == last.1), "progress ({done}, {total}) after {last:?}");
        last = (done, total);
    });
    std::fs::remove_file(&path).expect("removing the input file");
    match (&parsed, added) {
        (Err(e), Ok(_)) => panic!("the store took a file that the parser refuses ({e})"),
        (Err(e), Err(_)) => clean(e),
        (Ok(_), Err(e)) => clean(&e),
        (Ok(spec), Ok(m)) => {
            check_model(&m);
            check_ingested(store, &m, spec);
            // The layer names the parser found, given explicitly, find the same layers.
            let names: Vec<String> = spec.layers.iter().map(|l| l.name.clone()).collect();
            let again = st::parse(data, "input", Some(&names)).expect("parsing with the parser's own layer list");
            assert_eq!(layer_names(&again), layer_names(spec));
            store.remove_model("m").expect("removing the ingested model");
        }
    }
    let u = store.usage().expect("usage");
    assert_eq!((u.models, u.used_bytes), (0, 0), "the ingest left something behind");
    assert!(store.models().expect("models").is_empty());
}

fn layer_names(spec: &ModelSpec<'_>) -> Vec<(String, Vec<String>)> {
    spec.layers.iter().map(|l| (l.name.clone(), l.tensors.iter().map(|t| t.name.clone()).collect())).collect()
}

fn check_ingested(store: &Store, m: &Model, spec: &ModelSpec<'_>) {
    assert_eq!(describe(m), describe(&store.model("m").expect("reading the model back")));
    assert_eq!(m.layers.len(), spec.layers.len());
    assert_eq!(m.attributes, spec.attributes);
    let bytes = store.model_bytes(m).expect("model bytes");
    let tensors = spec.layers.iter().flat_map(|l| l.tensors.iter());
    assert_eq!(m.tensors.len(), spec.n_tensors());
    for (l, ls) in m.layers.iter().zip(&spec.layers) {
        assert_eq!((&l.name, l.n_tensors), (&ls.name, ls.tensors.len()));
        assert!(l.exec_ms.is_nan());
    }
    for (t, ts) in m.tensors.iter().zip(tensors) {
        assert_eq!((&t.name, t.dtype, &t.shape), (&ts.name, ts.dtype, &ts.shape));
        assert_eq!(&bytes[t.offset as usize..(t.offset + t.bytes) as usize], ts.data, "tensor {} reads back different bytes", t.name);
    }
}

// ---------------------------------------------------------------------------
// Target 2: opening a segment
// ---------------------------------------------------------------------------

/// Input byte 0: flags. Bit 0: make the header's size fields and every
/// checksum match (so that mutations get past them); bit 1: set a profile
/// on every readable model; bit 2: add and remove a model. The other bytes
/// are the segment file.
pub const SEG_FIX_CHECKSUMS: u8 = 1;
pub const SEG_SET_PROFILE: u8 = 2;
pub const SEG_ADD_REMOVE: u8 = 4;

fn rd32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
fn rd64(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}
fn wr64(b: &mut [u8], o: usize, v: u64) {
    b[o..o + 8].copy_from_slice(&v.to_le_bytes());
}

/// Recomputes what a writer would have: the header's total and data sizes
/// from the file's length, the header checksum, each Ready entry's metadata
/// checksum and every entry's checksum. Offsets are those of layout.rs
/// (versions 1 and 2).
pub fn fix_checksums(b: &mut [u8]) {
    const ENTRY: usize = layout::ENTRY_BYTES as usize;
    if b.len() < layout::HEADER_BYTES as usize {
        return;
    }
    let len = b.len() as u64;
    wr64(b, 16, len);
    let data_off = rd64(b, 40);
    if data_off <= len {
        wr64(b, 48, len - data_off);
    }
    let sum = layout::fnv1a(&b[..56]);
    wr64(b, 56, sum);
    let (table_off, cap) = (rd64(b, 24), u64::from(rd32(b, 32)));
    for slot in 0..cap {
        let Some(o) = table_off.checked_add(slot * layout::ENTRY_BYTES).filter(|o| o.checked_add(layout::ENTRY_BYTES).is_some_and(|e| e <= len)) else {
            break;
        };
        let o = o as usize;
        if b[o..o + ENTRY].iter().all(|&x| x == 0) {
            continue; // a free slot
        }
        if rd32(b, o) == 2 {
            let (mo, mb) = (rd64(b, o + 40), rd64(b, o + 48));
            if mb >= 48 && mo.checked_add(mb).is_some_and(|e| e <= len) {
                let meta = &b[mo as usize..(mo + mb) as usize];
                let p = rd32(meta, 32) as usize;
                if p <= meta.len() {
                    let sum = layout::fnv1a(&meta[..p]);
                    wr64(b, o + 56, sum);
                }
            }
        }
        // Layout 1 checksums [8, 240) of an entry; layout 2 the whole
        // entry before the checksum, and wants the 8 bytes after it zero.
        let from = if layout::LAYOUT_VERSION >= 2 { 0 } else { 8 };
        if layout::LAYOUT_VERSION >= 2 {
            b[o + ENTRY - 8..o + ENTRY].fill(0);
        }
        let sum = layout::fnv1a(&b[o + from..o + ENTRY - 16]);
        wr64(b, o + ENTRY - 16, sum);
    }
}

/// Opens the bytes as a store segment. A segment that opens must answer
/// every query with Ok or a clean error; models it hands out must be
/// well-formed; adding and removing a model must leave every readable model
/// exactly as it was.
pub fn segment_open(data: &[u8]) {
    let Some((&flags, seg)) = data.split_first() else { return };
    let mut seg = seg.to_vec();
    if flags & SEG_FIX_CHECKSUMS != 0 {
        fix_checksums(&mut seg);
    }
    shm_dir();
    let name = unique("seg");
    let path = Store::segment_path(&name).expect("segment path");
    std::fs::write(&path, &seg).expect("writing the segment");
    match Store::open(&name) {
        Err(e) => clean(&e),
        Ok(store) => query_segment(&store, flags),
    }
    Store::destroy(&name).expect("removing the segment");
}

/// (name, description, bytes) of every model that reads back.
fn readable_models(store: &Store) -> Vec<(String, String, Vec<u8>)> {
    let Ok(list) = store.models() else { return Vec::new() };
    let mut out = Vec::new();
    for s in &list {
        if let Ok(m) = store.model(&s.name) {
            if let Ok(b) = store.model_bytes(&m) {
                out.push((s.name.clone(), describe(&m), b.to_vec()));
            }
        }
    }
    out
}

fn query_segment(store: &Store, flags: u8) {
    let list = match store.models() {
        Ok(l) => l,
        Err(e) => return clean(&e),
    };
    match store.usage() {
        Ok(u) => {
            assert!(u.largest_free_bytes <= u.capacity_bytes, "{u:?}");
            assert!(u.models as usize <= list.len().max(u.max_models as usize));
        }
        Err(e) => clean(&e),
    }
    let _ = store.generation();
    if let Err(e) = store.check() {
        clean(&e);
    }
    for s in &list {
        let m = match store.model(&s.name) {
            Ok(m) => m,
            Err(e) => {
                clean(&e);
                continue;
            }
        };
        assert_eq!(m.name, s.name);
        check_model(&m);
        let bytes = match store.model_bytes(&m) {
            Ok(b) => {
                assert_eq!(b.len() as u64, m.bytes);
                Some(b)
            }
            Err(e) => {
                clean(&e);
                None
            }
        };
        match store.lease(&s.name) {
            Ok(lease) => {
                let n = (m.bytes as usize).min(4096);
                let mut buf = vec![0u8; n];
                match store.read(&lease, 0, &mut buf) {
                    Ok(()) => {
                        if let Some(b) = &bytes {
                            assert_eq!(&b[..n], &buf[..], "a leased read differs from model_bytes");
                        }
                    }
                    Err(e) => clean(&e),
                }
                let e = store.read(&lease, m.bytes, &mut [0u8; 1]).expect_err("a read past the model's end");
                clean(&e);
            }
            Err(e) => clean(&e),
        }
        match store.model_footprint(&s.name) {
            Ok(fp) => assert!(fp >= m.bytes, "footprint {fp} below the model's {} bytes", m.bytes),
            Err(e) => clean(&e),
        }
        if let Err(e) = store.cost(&s.name) {
            clean(&e);
        }
        match store.contains(&m) {
            Ok(c) => assert!(c, "model {:?} read back but is not contained", m.name),
            Err(e) => clean(&e),
        }
        if let Err(e) = Program::from_store(store, &s.name) {
            clean(&e);
        }
        if let Err(e) = plan_stored_model(&m, 12.0, 0.01, 0.02) {
            clean(&e);
        }
        if flags & SEG_SET_PROFILE != 0 {
            let times: Vec<f64> = (0..m.layers.len()).map(|i| i as f64 * 0.5).collect();
            match store.set_layer_exec_ms(&s.name, &times) {
                Ok(()) => {
                    let again = store.model(&s.name).expect("the model after a profile update");
                    let got: Vec<f64> = again.layers.iter().map(|l| l.exec_ms).collect();
                    assert_eq!(got, times);
                    let plan = plan_stored_model(&again, 12.0, 0.01, 0.02).expect("planning a profiled model");
                    check_plan_shape(&plan.group_starts, again.layers.len());
                }
                Err(e) => clean(&e),
            }
        }
    }
    if flags & SEG_ADD_REMOVE != 0 {
        add_and_remove(store);
    }
}

fn add_and_remove(store: &Store) {
    let before = readable_models(store);
    let data: Vec<u8> = (0..96u8).collect();
    let spec = ModelSpec {
        layers: vec![
            LayerSpec { name: "a".into(), tensors: vec![TensorSpec { name: "a.w".into(), dtype: Dtype::F32, shape: vec![4, 4], data: &data[..64] }] },
            LayerSpec { name: "b".into(), tensors: vec![TensorSpec { name: "b.w".into(), dtype: Dtype::U8, shape: vec![32], data: &data[64..] }] },
        ],
        attributes: vec![("k".into(), "v".into())],
    };
    let name = "fuzz-added-model";
    match store.add_model(name, &spec, &mut |_, _| {}) {
        Ok(m) => {
            check_model(&m);
            let b = store.model_bytes(&m).expect("the added model's bytes");
            assert_eq!(&b[m.tensors[0].offset as usize..][..64], &data[..64]);
            assert_eq!(&b[m.tensors[1].offset as usize..][..32], &data[64..]);
            assert_eq!(readable_models(store).iter().filter(|r| r.0 != name).cloned().collect::<Vec<_>>(), before, "adding a model changed another");
            store.remove_model(name).expect("removing the added model");
        }
        Err(e) => clean(&e),
    }
    assert_eq!(readable_models(store), before, "adding and removing a model changed another");
}

// ---------------------------------------------------------------------------
// Target 3: a stored model's graph
// ---------------------------------------------------------------------------

struct Fixture {
    shapes: WeightShapes,
    model: Arc<Model>,
    weights: HostWeights,
    vocab: usize,
}

/// The stored description of a model def, as the store would lay it out.
pub fn model_of(def: &ModelDef) -> Model {
    let (mut tensors, mut layers, mut off) = (Vec::new(), Vec::new(), 0u64);
    for (name, ws) in &def.layers {
        let (first, start) = (tensors.len(), off);
        for w in ws {
            let shape: Vec<u64> = w.shape.iter().map(|&d| d as u64).collect();
            let bytes = 4 * shape.iter().product::<u64>();
            tensors.push(TensorInfo { name: w.name.clone(), dtype: Dtype::F32, shape, offset: off, bytes });
            off = (off + bytes).div_ceil(TENSOR_ALIGN) * TENSOR_ALIGN;
        }
        layers.push(LayerInfo { name: name.clone(), first_tensor: first, n_tensors: ws.len(), offset: start, bytes: off - start, exec_ms: f64::NAN });
    }
    Model {
        name: def.graph.name.clone(),
        id: 1,
        segment_offset: 0,
        bytes: off,
        layers,
        tensors,
        attributes: vec![(GRAPH_ATTRIBUTE.into(), def.graph.to_json().expect("graph json"))],
    }
}

fn fixtures() -> &'static [Fixture] {
    static F: OnceLock<Vec<Fixture>> = OnceLock::new();
    F.get_or_init(|| {
        cpu::tiny_models(1, 8)
            .iter()
            .map(|def| Fixture { shapes: def.weight_shapes(), model: Arc::new(model_of(def)), weights: cpu::reference_weights(def, 7), vocab: def.vocab() })
            .collect()
    })
}

/// Elements of every declared tensor together, None on overflow.
fn declared_elements(g: &Graph) -> Option<usize> {
    g.inputs.iter().chain(&g.activations).try_fold(0usize, |acc, (_, d)| {
        d.shape.iter().try_fold(1usize, |n, &x| n.checked_mul(x)).and_then(|n| acc.checked_add(n))
    })
}

/// The bytes as the `pipeswitch.graph` attribute: parsed, then validated and
/// bound (`Program::new`, no GPU) against each tiny reference model, and run
/// by the CPU executor where small. A graph that parses validates or is
/// refused cleanly; binding agrees with validation; a bound program's slots
/// fit its activation buffer and never overlap an input; the CPU run gives
/// every output with its declared size, or a clean error.
pub fn graph_bind(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let graph = match Graph::from_json(text) {
        Ok(g) => g,
        Err(e) => return clean(&e),
    };
    match graph.to_json().map(|j| Graph::from_json(&j)) {
        Ok(Ok(again)) => assert_eq!(again, graph, "the graph changes in a JSON round trip"),
        Ok(Err(e)) | Err(e) => panic!("a graph that parsed does not serialise back: {e}"),
    }
    for f in fixtures() {
        let valid = graph.validate(&f.shapes);
        if let Err(e) = &valid {
            clean(e);
        }
        match Program::new(f.model.clone(), graph.clone()) {
            Ok(p) => {
                assert!(valid.is_ok(), "bound a graph that does not validate");
                check_program(&p, &graph, &f.model);
            }
            Err(e) => clean(&e),
        }
        if valid.is_err() {
            continue;
        }
        let flops = graph.flops(&f.shapes);
        assert!(flops >= 0.0, "flops {flops}");
        if declared_elements(&graph).is_some_and(|n| n <= 1 << 16) && flops <= 2e7 {
            let inputs = cpu::example_inputs(&graph, 3, f.vocab);
            match cpu::run_graph_cpu(&graph, &f.weights, &inputs) {
                Ok(out) => {
                    let decls: HashMap<&str, usize> = graph.activations.iter().chain(&graph.inputs).map(|(n, d)| (n.as_str(), d.numel())).collect();
                    assert_eq!(out.len(), graph.outputs.iter().collect::<HashSet<_>>().len());
                    for (name, v) in &out {
                        assert_eq!(Some(&v.len()), decls.get(name.as_str()), "output {name}");
                    }
                }
                Err(e) => clean(&e),
            }
        }
    }
}

fn check_program(p: &Program, g: &Graph, m: &Model) {
    assert_eq!(p.op_layers().len(), g.ops.len());
    assert!(p.op_layers().iter().flatten().all(|&l| l < m.layers.len()));
    assert!(p.needed_layers() <= m.layers.len());
    let total = p.activation_bytes();
    let mut slots = Vec::new();
    for (name, d) in g.inputs.iter().chain(&g.activations) {
        if let Ok(s) = p.slot(name) {
            assert_eq!(s.bytes, d.bytes().expect("bytes of a bound tensor") as u64, "slot {name}");
            assert!(s.offset.checked_add(s.bytes).is_some_and(|e| e <= total), "slot {name} {s:?} outside {total} bytes");
            slots.push((name.as_str(), s.offset, s.offset + s.bytes));
        }
    }
    // Inputs live for the whole run: nothing else may share their bytes.
    for (name, _) in &g.inputs {
        let Some(&(_, s, e)) = slots.iter().find(|x| x.0 == name) else { continue };
        for &(other, s2, e2) in &slots {
            assert!(other == name || e2 <= s || e <= s2 || s == e || s2 == e2, "input {name} [{s}, {e}) overlaps {other} [{s2}, {e2})");
        }
    }
}

// ---------------------------------------------------------------------------
// Target 4: the planner's inputs
// ---------------------------------------------------------------------------

/// Most layers a planner input gets: the planner itself has no bound (its
/// memory is O(n·K), O(n²) at worst; see docs/fuzzing.md).
pub const PLANNER_MAX_LAYERS: usize = 4096;

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    /// One value: a tag byte picks a special value, a small number, or the
    /// next 8 bytes as raw f64 bits.
    fn value(&mut self) -> Option<f64> {
        let tag = self.byte()?;
        Some(match tag & 15 {
            0 => 0.0,
            1 => f64::NAN,
            2 => f64::INFINITY,
            3 => -1.0,
            4 => -0.0,
            5 => f64::MIN_POSITIVE,
            6 => f64::MAX,
            7 => 1e-300,
            8 => {
                let mut b = [0u8; 8];
                for x in &mut b {
                    *x = self.byte().unwrap_or(0);
                }
                f64::from_le_bytes(b)
            }
            _ => f64::from(tag >> 4) + f64::from(tag & 7) / 8.0,
        })
    }
}

fn check_plan_shape(starts: &[usize], n: usize) {
    assert!(!starts.is_empty() && starts[0] == 0, "plan {starts:?}");
    assert!(starts.windows(2).all(|w| w[0] < w[1]) && starts.iter().all(|&s| s < n), "plan {starts:?} for {n} layers");
}

fn same(a: f64, b: f64) -> bool {
    a == b || (a.is_nan() && b.is_nan())
}

fn at_most(a: f64, b: f64) -> bool {
    !b.is_finite() || a <= b * (1.0 + 1e-9) + 1e-9
}

/// Input byte 0: flags (bit 0: give exec_ms one entry fewer); then the two
/// per-group overheads and (transfer, exec) pairs, as [`Reader::value`]s.
/// Invalid input must be refused with the matching error; valid input
/// gives a valid plan whose makespan is exactly `planner::makespan` of it,
/// no worse than one group, one group per layer, random plans and (up to 10
/// layers) every plan; the C entry points agree and never panic.
pub fn planner_inputs(data: &[u8]) {
    let mut r = Reader(data);
    let Some(flags) = r.byte() else { return };
    let (Some(a), Some(b)) = (r.value(), r.value()) else { return };
    // Flag 2: the extended cost model, its other five terms next.
    let extended = flags & 2 != 0;
    let costs = if extended {
        let mut v = [0.0; 5];
        for x in &mut v {
            let Some(y) = r.value() else { return };
            *x = y;
        }
        Costs { transfer_overhead_ms: a, exec_overhead_ms: b, first_kernel_ms: v[0], exec_scale: v[1], copy_slowdown: v[2], floor_ms: v[3], floor_per_group_ms: v[4] }
    } else {
        Costs::new(a, b)
    };
    let (mut t, mut x) = (Vec::new(), Vec::new());
    while t.len() < PLANNER_MAX_LAYERS {
        let (Some(ti), Some(xi)) = (r.value(), r.value()) else { break };
        t.push(ti);
        x.push(xi);
    }
    if flags & 1 != 0 {
        x.pop();
    }
    let n = t.len();
    let ok = |v: &f64| v.is_finite() && *v >= 0.0;
    let result = if extended { planner::plan_groups_with(&t, &x, &costs) } else { planner::plan_groups(&t, &x, a, b) };
    let expect_err = if t.len() != x.len() {
        Some("length")
    } else if n == 0 {
        Some("empty")
    } else if !t.iter().chain(&x).all(ok) {
        Some("value")
    } else if !(ok(&a) && ok(&b)) || costs.validate().is_err() {
        Some("overhead")
    } else {
        None
    };
    let plan = match (expect_err, result) {
        (None, Ok(p)) => p,
        // The back-pointer bound (n·K <= MAX_BACKPOINTERS) cannot bind below
        // PLANNER_MAX_LAYERS layers: 4096 · 4097 < 2^26.
        (None, Err(e)) => panic!("valid input refused: {e}"),
        (Some(why), Ok(p)) => panic!("invalid input ({why}) planned: {p:?}"),
        (Some(why), Err(e)) => {
            let kind_ok = match why {
                "length" => matches!(e, PlanError::LengthMismatch { .. }),
                "empty" => matches!(e, PlanError::NoLayers),
                "value" => matches!(e, PlanError::BadValue { .. }),
                _ => matches!(e, PlanError::BadOverhead { .. }),
            };
            assert!(kind_ok, "input with a bad {why} refused as {e:?}");
            // The C call takes one length: mismatched slices go in with the
            // shorter one, and must plan or be refused like that input.
            let m = t.len().min(x.len());
            let prefix_ok = m > 0 && t[..m].iter().chain(&x[..m]).all(ok) && ok(&a) && ok(&b);
            if extended {
                return; // the C call takes the two overheads only
            }
            assert_eq!(ffi_plan(&t, &x, a, b, m.max(1)).0, if prefix_ok { PS_OK } else { PS_ERR_INVALID_ARGUMENT });
            return;
        }
    };
    check_plan_shape(&plan.group_starts, n);
    let ms = |s: &[usize]| planner::makespan_with(&t, &x, &costs, s).expect("makespan of a valid plan");
    assert!(same(plan.makespan_ms, ms(&plan.group_starts)), "reported {} but the plan simulates to {}", plan.makespan_ms, ms(&plan.group_starts));
    if !extended {
        assert!(same(plan.makespan_ms, planner::makespan(&t, &x, a, b, &plan.group_starts).expect("makespan")));
    }
    let tl = planner::timeline_with(&t, &x, &costs, &plan.group_starts).expect("timeline");
    assert_eq!(tl.len(), plan.group_starts.len());
    // The makespan is the last group's end, or the floor R + h·K if later.
    let end = tl.last().expect("a group").exec_end_ms;
    let floor = costs.floor_ms + costs.floor_per_group_ms * tl.len() as f64;
    assert!(same(end.max(floor), plan.makespan_ms) || same(end, plan.makespan_ms), "timeline ends at {end} (floor {floor}), makespan {}", plan.makespan_ms);
    // Optimality holds where no sum can overflow: the planner documents
    // that when sums overflow it returns the single group with an infinite
    // makespan, even where another plan (its sums scaled down by a small
    // exec_scale) would stay finite (regression sum-overflow-single-group-inf).
    let (st, sx) = (t.iter().sum::<f64>(), x.iter().sum::<f64>());
    let nf = n as f64;
    let bound = st + sx + sx * costs.exec_scale * (1.0 + costs.copy_slowdown) + nf * (a + b) + costs.first_kernel_ms + costs.floor_ms + costs.floor_per_group_ms * nf;
    let exact = bound.is_finite();
    for other in [planner::single_group_plan(n), planner::per_layer_plan(n)] {
        assert!(!exact || at_most(plan.makespan_ms, ms(&other)), "plan {} worse than {other:?} at {}", plan.makespan_ms, ms(&other));
    }
    // Random plans, from a seed taken from the input.
    let mut seed = layout::fnv1a(data);
    for _ in 0..if exact { 8 } else { 0 } {
        let starts: Vec<usize> = (0..n).filter(|&i| i == 0 || splitmix(&mut seed) % 3 == 0).collect();
        assert!(at_most(plan.makespan_ms, ms(&starts)), "plan {} worse than {starts:?} at {}", plan.makespan_ms, ms(&starts));
    }
    if exact && n <= 10 {
        for mask in 0..1u32 << (n - 1) {
            let starts: Vec<usize> = (0..n).filter(|&i| i == 0 || mask >> (i - 1) & 1 == 1).collect();
            assert!(at_most(plan.makespan_ms, ms(&starts)), "plan {} worse than {starts:?} at {}", plan.makespan_ms, ms(&starts));
        }
    }
    // Invalid plans are refused.
    let mut bad = plan.group_starts.clone();
    bad.push(n);
    assert!(matches!(planner::makespan_with(&t, &x, &costs, &bad), Err(PlanError::BadValue { what: "group_starts", .. })));
    if extended {
        return; // the C entry points take the two overheads only
    }
    // The C entry points.
    let (status, starts, span) = ffi_plan(&t, &x, a, b, n);
    assert_eq!(status, PS_OK);
    assert_eq!(starts, plan.group_starts);
    assert!(same(span, plan.makespan_ms));
    if plan.group_starts.len() > 1 {
        assert_eq!(ffi_plan(&t, &x, a, b, plan.group_starts.len() - 1).0, PS_ERR_BUFFER_TOO_SMALL);
    }
    let mut span = f64::NAN;
    let s = &plan.group_starts;
    let status = ps_plan_makespan(t.as_ptr(), x.as_ptr(), n, a, b, s.as_ptr(), s.len(), &mut span);
    assert_eq!(status, PS_OK);
    assert!(same(span, plan.makespan_ms));
}

fn ffi_plan(t: &[f64], x: &[f64], a: f64, b: f64, capacity: usize) -> (pipeswitch::ffi::ps_status, Vec<usize>, f64) {
    let n = t.len().min(x.len());
    let mut starts = vec![usize::MAX; capacity];
    let (mut count, mut span) = (usize::MAX, f64::NAN);
    // n readable elements in each input, `capacity` writable outputs.
    let status = ps_plan_groups(t.as_ptr(), x.as_ptr(), n, a, b, starts.as_mut_ptr(), capacity, &mut count, &mut span);
    if status == PS_OK {
        starts.truncate(count);
    } else {
        assert!(count == usize::MAX && span.is_nan() && starts.iter().all(|&s| s == usize::MAX), "outputs written on failure");
        starts.clear();
    }
    (status, starts, span)
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

// ---------------------------------------------------------------------------
// Target 5: the daemon's messages
// ---------------------------------------------------------------------------

/// Bytes of the tensor file that `daemon_message` passes with a frame.
const TENSOR_FILE_BYTES: usize = 4096;

/// The bytes as a frame (`protocol::decode_frame`), and bytes 2.. as the
/// body of the kind in bytes 0..2 (`Message::decode_body`). A message that
/// decodes encodes back to exactly the same bytes (one encoding per
/// message); its tensors unpack against a 4 KiB tensor file to their
/// inline bytes or their range of the file, or are refused cleanly.
pub fn daemon_message(data: &[u8]) {
    use pipeswitch::protocol::{decode_frame, encode_frame, Message};
    match decode_frame(data) {
        Ok((h, m)) => {
            assert_eq!(encode_frame(&m, h.fds).expect("encoding a decoded message"), data, "{m:?} encodes differently");
            unpack(m);
        }
        Err(e) => clean(&e),
    }
    if data.len() >= 2 {
        let kind = u16::from_le_bytes([data[0], data[1]]);
        match Message::decode_body(kind, &data[2..]) {
            Ok(m) => {
                assert_eq!(m.kind(), kind);
                assert_eq!(m.encode_body(), &data[2..], "{m:?} encodes differently");
                unpack(m);
            }
            Err(e) => clean(&e),
        }
    }
}

fn unpack(m: pipeswitch::protocol::Message) {
    use pipeswitch::protocol::{io::unpack_tensors, Message, TensorData};
    let tensors = match m {
        Message::Infer { inputs, .. } => inputs,
        Message::Activate(t) => t.inputs,
        Message::InferResult { outputs, .. } | Message::TaskDone { outputs, .. } => outputs,
        _ => return,
    };
    static FILE: OnceLock<std::os::fd::OwnedFd> = OnceLock::new();
    let file = FILE.get_or_init(|| {
        let f = tempfile::tempfile().expect("tensor file");
        let bytes: Vec<u8> = (0..TENSOR_FILE_BYTES).map(|i| (i * 7 % 251) as u8).collect();
        std::os::unix::fs::FileExt::write_all_at(&f, &bytes, 0).expect("writing the tensor file");
        f.into()
    });
    let expect: Vec<Option<Vec<u8>>> = tensors
        .iter()
        .map(|t| match &t.data {
            TensorData::Inline(b) => Some(b.clone()),
            // Area 1 is the sealed file below, held by the views of
            // `with_areas`; other areas are not held.
            TensorData::Shared { offset, bytes } | TensorData::Area { area: 1, offset, bytes } => offset
                .checked_add(*bytes)
                .filter(|&e| e <= TENSOR_FILE_BYTES as u64)
                .map(|_| (*offset..offset + bytes).map(|i| (i as usize * 7 % 251) as u8).collect()),
            TensorData::Area { .. } => None,
        })
        .collect();
    let without_file = tensors.iter().all(|t| matches!(t.data, TensorData::Inline(_)));
    let in_areas = tensors.iter().any(|t| matches!(t.data, TensorData::Area { .. }));
    match unpack_tensors(tensors.clone(), None) {
        Ok(v) => {
            assert!(without_file, "a shared tensor unpacked without its file");
            assert!(v.iter().zip(&expect).all(|((_, b), e)| Some(b) == e.as_ref()));
        }
        Err(e) => {
            assert!(!without_file, "inline tensors refused: {e}");
            clean(&e);
        }
    }
    match unpack_tensors(tensors.clone(), Some(file)) {
        Ok(v) => {
            assert!(!in_areas, "a tensor in an input area unpacked without areas");
            assert!(v.iter().zip(&expect).all(|((_, b), e)| Some(b) == e.as_ref()), "tensor bytes differ");
        }
        Err(e) => {
            assert!(in_areas || expect.iter().any(Option::is_none), "tensors in range refused: {e}");
            clean(&e);
        }
    }
    // The worker's views: copies of the unsealed file, a mapping of a
    // sealed memfd with the same bytes; the same bytes as unpack_tensors.
    static SEALED: OnceLock<std::os::fd::OwnedFd> = OnceLock::new();
    let sealed = SEALED.get_or_init(|| {
        use std::os::fd::{AsRawFd, FromRawFd};
        // SAFETY: plain calls; the descriptor is checked and owned once.
        let fd = unsafe { libc::memfd_create(c"fuzz-tensors".as_ptr(), libc::MFD_ALLOW_SEALING) };
        assert!(fd >= 0, "memfd_create");
        let f = unsafe { std::fs::File::from_raw_fd(fd) };
        let bytes: Vec<u8> = (0..TENSOR_FILE_BYTES).map(|i| (i * 7 % 251) as u8).collect();
        std::os::unix::fs::FileExt::write_all_at(&f, &bytes, 0).expect("writing the sealed tensor file");
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;
        assert_eq!(unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, seals) }, 0, "sealing");
        f.into()
    });
    for f in [file, sealed] {
        match pipeswitch::protocol::io::TensorViews::new(tensors.clone(), Some(f)) {
            Ok(v) => {
                assert!(!in_areas, "a tensor in an input area viewed without areas");
                assert!(v.iter().count() == expect.len(), "a view per tensor");
                assert!(v.iter().zip(&expect).all(|((_, b), e)| Some(b) == e.as_deref()), "viewed tensor bytes differ");
            }
            Err(e) => {
                assert!(in_areas || expect.iter().any(Option::is_none), "tensors in range refused by TensorViews: {e}");
                clean(&e);
            }
        }
    }
    // A worker's views with its input areas: area 1 is the sealed file.
    static AREAS: OnceLock<pipeswitch::protocol::area::Areas> = OnceLock::new();
    let areas = AREAS.get_or_init(|| {
        let mut a = pipeswitch::protocol::area::Areas::default();
        a.insert(1, pipeswitch::protocol::area::AreaMap::open(sealed, TENSOR_FILE_BYTES as u64).expect("mapping the area"));
        a
    });
    match pipeswitch::protocol::io::TensorViews::with_areas(tensors.clone(), Some(sealed), Some(areas)) {
        Ok(v) => {
            assert!(v.iter().zip(&expect).all(|((_, b), e)| Some(b) == e.as_deref()), "bytes viewed with areas differ");
            let owned = v.into_owned();
            assert!(owned.iter().zip(&expect).all(|((_, b), e)| Some(b) == e.as_ref()), "owned bytes with areas differ");
        }
        Err(e) => {
            assert!(expect.iter().any(Option::is_none), "tensors in range refused by TensorViews::with_areas: {e}");
            clean(&e);
        }
    }
}

// ---------------------------------------------------------------------------
// Target 6: a Hugging Face Llama directory
// ---------------------------------------------------------------------------

/// Rows of the rotary table that `hf_llama` asks for (small: the table is
/// computed for every input).
pub const HF_MAX_POSITIONS: usize = 16;

/// The parts of an `hf_llama` input: `[u32 LE m][m bytes: shard 1]
/// [u32 LE k][k bytes: shard 2, absent when k is 0][the rest: config.json]`.
/// Lengths past the end take what is there. The config comes last so that
/// mutations that grow or shrink it keep the shards intact.
pub fn hf_parts(data: &[u8]) -> (&[u8], Vec<&[u8]>) {
    fn take<'a>(d: &mut &'a [u8]) -> &'a [u8] {
        let (h, rest) = d.split_at(4.min(d.len()));
        let mut n = [0u8; 4];
        n[..h.len()].copy_from_slice(h);
        let n = (u32::from_le_bytes(n) as usize).min(rest.len());
        let (part, rest) = rest.split_at(n);
        *d = rest;
        part
    }
    let mut d = data;
    let mut shards = vec![take(&mut d)];
    let second = take(&mut d);
    if !second.is_empty() {
        shards.push(second);
    }
    (d, shards)
}

/// The input `hf_parts` splits into these parts (one or two shards).
pub fn hf_frame(config: &[u8], shards: &[&[u8]]) -> Vec<u8> {
    let mut v = Vec::new();
    for s in [shards[0], shards.get(1).copied().unwrap_or_default()] {
        v.extend_from_slice(&(s.len() as u32).to_le_bytes());
        v.extend_from_slice(s);
    }
    v.extend_from_slice(config);
    v
}

fn hf_store() -> &'static Store {
    static STORE: OnceLock<Store> = OnceLock::new();
    STORE.get_or_init(|| {
        shm_dir();
        Store::create(&unique("hf"), 16 << 20, 4).expect("creating the hf store")
    })
}

/// The input as a directory (`config.json`, `model-00001.safetensors` and
/// maybe `model-00002.safetensors`) ingested by `llama::add_hf_dir`: Ok or a
/// clean error; a config that `LlamaConfig::from_hf_json` refuses is never
/// ingested; an ingested model is well-formed, reads back its config, lays
/// out exactly the layers and tensors of `llama::model_def`, holds the
/// shards' bytes (and the computed rotary table), and its graph validates
/// against it; afterwards (removed, or refused) the store is empty.
pub fn hf_llama(data: &[u8]) {
    hf_llama_ingests(data);
}

/// `hf_llama`, saying whether the directory was ingested.
pub fn hf_llama_ingests(data: &[u8]) -> bool {
    use pipeswitch::model::llama;
    // One input at a time in the shared store (tests may run in parallel).
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let (config, shards) = hf_parts(data);
    let store = hf_store();
    // A failed check leaves the store empty for the next input (the replay goes on).
    struct Cleanup(&'static Store);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            if std::thread::panicking() {
                let _ = self.0.remove_model("m");
            }
        }
    }
    let _cleanup = Cleanup(store);
    let dir = shm_dir().join(unique("hfdir"));
    std::fs::create_dir(&dir).expect("creating the input directory");
    std::fs::write(dir.join("config.json"), config).expect("writing config.json");
    for (i, s) in shards.iter().enumerate() {
        std::fs::write(dir.join(format!("model-{:05}.safetensors", i + 1)), s).expect("writing a shard");
    }
    let cfg = std::str::from_utf8(config).map(|t| llama::LlamaConfig::from_hf_json(t, HF_MAX_POSITIONS));
    let mut last = (0u64, 0u64);
    let added = llama::add_hf_dir(store, "m", &dir, HF_MAX_POSITIONS, &mut |done, total| {
        assert!(done <= total && done >= last.0 && (last.1 == 0 || total == last.1), "progress ({done}, {total}) after {last:?}");
        last = (done, total);
    });
    std::fs::remove_dir_all(&dir).expect("removing the input directory");
    if let Ok(Err(e)) = &cfg {
        clean(e);
    }
    let ingested = added.is_ok();
    match added {
        Err(e) => clean(&e),
        Ok(m) => {
            let cfg = match cfg {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => panic!("ingested a directory whose config.json from_hf_json refuses: {e}"),
                Err(e) => panic!("ingested a config.json that is not UTF-8: {e}"),
            };
            check_hf_model(store, &m, &cfg, &shards);
            store.remove_model("m").expect("removing the ingested model");
        }
    }
    let u = store.usage().expect("usage");
    assert_eq!((u.models, u.used_bytes), (0, 0), "the ingest left something behind");
    ingested
}

fn check_hf_model(store: &Store, m: &Model, cfg: &pipeswitch::model::llama::LlamaConfig, shards: &[&[u8]]) {
    use pipeswitch::model::{llama, weights::rope_table};
    check_model(m);
    assert_eq!(describe(m), describe(&store.model("m").expect("reading the model back")));
    // Debug text: NaN compares equal to itself.
    let stored = llama::stored_config(m).unwrap_or_else(|e| panic!("the stored config of an ingested model does not read back: {e}"));
    assert_eq!(format!("{stored:?}"), format!("{cfg:?}"), "the stored config differs from config.json's");
    let def = llama::model_def(cfg);
    let layer_names: Vec<&str> = m.layers.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(layer_names, def.layers.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>());
    let decls: Vec<_> = def.layers.iter().flat_map(|(_, ws)| ws.iter()).collect();
    assert_eq!(m.tensors.len(), decls.len());
    let bytes = store.model_bytes(m).expect("model bytes");
    let files: Vec<_> = shards.iter().map(|s| safetensors::SafeTensors::deserialize(s).expect("a shard the ingest took does not parse")).collect();
    for (t, w) in m.tensors.iter().zip(decls) {
        let shape: Vec<u64> = w.shape.iter().map(|&d| d as u64).collect();
        assert_eq!((&t.name, &t.shape), (&w.name, &shape));
        let got = &bytes[t.offset as usize..(t.offset + t.bytes) as usize];
        if t.name == "rope.cos_sin" {
            assert_eq!(t.dtype, Dtype::F32);
            let table: Vec<u8> = rope_table(&cfg.rope(), cfg.max_positions, cfg.head_dim).iter().flat_map(|v| v.to_le_bytes()).collect();
            assert!(got == &table[..], "the rotary table reads back different bytes");
        } else {
            assert_eq!(t.dtype, cfg.dtype, "tensor {}", t.name);
            let found: Vec<_> = files.iter().filter_map(|f| f.tensor(&t.name).ok()).collect();
            assert_eq!(found.len(), 1, "tensor {} is in {} shards", t.name, found.len());
            assert!(got == found[0].data(), "tensor {} reads back different bytes", t.name);
        }
    }
    let g = Graph::from_json(m.attribute(GRAPH_ATTRIBUTE).expect("a graph attribute")).expect("the stored graph parses");
    let shapes = m.tensors.iter().map(|t| (t.name.clone(), t.shape.iter().map(|&d| d as usize).collect())).collect();
    g.validate(&shapes).expect("the stored graph validates against the stored tensors");
}

// ---------------------------------------------------------------------------
// Seeds
// ---------------------------------------------------------------------------

/// Valid inputs for each target (name, bytes): the starting corpus, also
/// replayed by the test so that the accepting paths always run.
pub fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    match target {
        "safetensors_ingest" => seed_safetensors(),
        "segment_open" => seed_segments(),
        "graph_bind" => fixtures_graphs(),
        "planner_inputs" => seed_planner(),
        "daemon_message" => seed_messages(),
        "hf_llama" => seed_hf_llama(),
        _ => panic!("no target {target}"),
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn seed_safetensors() -> Vec<(String, Vec<u8>)> {
    let dir = shm_dir();
    let w = f32_bytes(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let h = [7u8, 0, 8, 0, 9, 0, 10, 0];
    let ids = [1u8, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0];
    let tensors = [
        st::WriteTensor { name: "enc.0.weight", dtype: Dtype::F32, shape: &[2, 3], data: &w },
        st::WriteTensor { name: "enc.0.bias", dtype: Dtype::Bf16, shape: &[4], data: &h },
        st::WriteTensor { name: "head.ids", dtype: Dtype::I64, shape: &[2], data: &ids },
        st::WriteTensor { name: "scalar", dtype: Dtype::U8, shape: &[], data: &[5] },
    ];
    let layers: Vec<String> = vec!["enc".into(), "head".into(), "scalar".into()];
    let graph = r#"{"name":"g","inputs":[],"activations":[],"outputs":[],"ops":[]}"#.to_string();
    let mut out = Vec::new();
    for (i, (layers, extra)) in [(None, vec![]), (Some(&layers[..]), vec![]), (None, vec![(GRAPH_ATTRIBUTE, graph), ("format", "pt".into())])].into_iter().enumerate() {
        let p = dir.join(format!("{}.safetensors", unique("seed")));
        st::write_file_with_metadata(&p, &tensors, layers, &extra).expect("writing a seed file");
        out.push((format!("seed-{i}"), std::fs::read(&p).expect("reading a seed file")));
        std::fs::remove_file(&p).expect("removing a seed file");
    }
    out
}

fn seed_segments() -> Vec<(String, Vec<u8>)> {
    shm_dir();
    let name = unique("seedseg");
    let store = Store::create(&name, 5 * 4096, 4).expect("creating a seed store");
    let data: Vec<u8> = (0..=255u8).collect();
    let small = fixtures_graphs().remove(0).1;
    let a = ModelSpec {
        layers: vec![
            LayerSpec { name: "l0".into(), tensors: vec![TensorSpec { name: "l0.w".into(), dtype: Dtype::F32, shape: vec![2, 2], data: &data[..16] }] },
            LayerSpec {
                name: "l1".into(),
                tensors: vec![
                    TensorSpec { name: "l1.w".into(), dtype: Dtype::F16, shape: vec![3], data: &data[16..22] },
                    TensorSpec { name: "l1.b".into(), dtype: Dtype::I64, shape: vec![1], data: &data[22..30] },
                ],
            },
        ],
        attributes: vec![(GRAPH_ATTRIBUTE.into(), String::from_utf8(small).expect("utf-8 graph"))],
    };
    let b = ModelSpec {
        layers: vec![LayerSpec { name: "only".into(), tensors: vec![TensorSpec { name: "only.t".into(), dtype: Dtype::U8, shape: vec![200], data: &data[..200] }] }],
        attributes: vec![],
    };
    let gone = ModelSpec { layers: vec![LayerSpec { name: "x".into(), tensors: vec![TensorSpec { name: "x.t".into(), dtype: Dtype::U8, shape: vec![8], data: &data[..8] }] }], attributes: vec![] };
    store.add_model("gone", &gone, &mut |_, _| {}).expect("seed model");
    store.add_model("alpha", &a, &mut |_, _| {}).expect("seed model");
    store.add_model("beta", &b, &mut |_, _| {}).expect("seed model");
    store.remove_model("gone").expect("removing a seed model");
    store.set_layer_exec_ms("beta", &[0.25]).expect("seed profile");
    let bytes = std::fs::read(store.path()).expect("reading the seed segment");
    // The fixer writes what the store writes: on a valid segment it changes nothing.
    let mut fixed = bytes.clone();
    fix_checksums(&mut fixed);
    assert!(fixed == bytes, "fix_checksums disagrees with the store's layout");
    drop(store);
    Store::destroy(&name).expect("removing the seed store");
    [0u8, SEG_FIX_CHECKSUMS | SEG_SET_PROFILE | SEG_ADD_REMOVE, SEG_ADD_REMOVE]
        .iter()
        .map(|&f| (format!("seed-flags{f}"), std::iter::once(f).chain(bytes.iter().copied()).collect()))
        .collect()
}

/// The tiny reference models' graphs (JSON), smallest first.
fn fixtures_graphs() -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> =
        cpu::tiny_models(1, 8).iter().map(|d| (format!("seed-{}", d.graph.name), d.graph.to_json().expect("graph json").into_bytes())).collect();
    v.sort_by_key(|s| s.1.len());
    v
}

fn seed_planner() -> Vec<(String, Vec<u8>)> {
    // Tags: 0x10 * k + j gives k + j/8 for j in 9..=15 masked to 1..=7.
    let small = |k: u8| (k << 4) | 9;
    let mut v = Vec::new();
    let mut one = vec![0u8, small(1), small(0)];
    for i in 0..6u8 {
        one.extend([small(i % 4 + 1), small(3 - i % 3)]);
    }
    v.push(("seed-six".to_string(), one));
    let mut raw = vec![0u8, 8];
    raw.extend(0.05f64.to_le_bytes());
    raw.push(8);
    raw.extend(0.01f64.to_le_bytes());
    for i in 0..12u32 {
        raw.push(8);
        raw.extend((f64::from(i) * 0.3 + 0.1).to_le_bytes());
        raw.push(8);
        raw.extend((f64::from(12 - i) * 0.2).to_le_bytes());
    }
    v.push(("seed-raw".to_string(), raw));
    v.push(("seed-zero-overheads".to_string(), vec![0, 0, 0, small(2), small(1), small(1), small(2), small(3), small(3)]));
    // Extended model: a, b, L, κ, σ, R, h, then six layers.
    let mut ext = vec![2u8, small(1), small(0), small(2), small(1), 0x09, small(5), small(0)];
    for i in 0..6u8 {
        ext.extend([small(i % 3 + 1), small(2 - i % 2)]);
    }
    v.push(("seed-extended".to_string(), ext));
    v
}

fn seed_messages() -> Vec<(String, Vec<u8>)> {
    use pipeswitch::protocol::{
        encode_frame, JobState, Message, PreemptMode, Progress, Role, SaveMode, SharePolicy, Stats, StopReason, Task, TaskKind, Tensor,
        TensorData, Timing, TrainJob, TrainTask,
    };
    let job = TrainJob {
        name: "r152".into(),
        entry: "pipeswitch.train:resnet152_job".into(),
        preempt: PreemptMode::Boundary,
        save: SaveMode::Resident,
        policy: SharePolicy::TimeShare,
        share: 0.5,
        period_ms: 1000,
        idle_ms: 100,
        iterations: 0,
        checkpoint_every: 10,
    };
    let tensors = vec![
        Tensor { name: "input_ids".into(), dtype: 9, shape: vec![1, 4], data: TensorData::Inline(vec![1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 4, 0, 0, 0]) },
        Tensor { name: "image".into(), dtype: 11, shape: vec![1, 3, 8, 8], data: TensorData::Shared { offset: 256, bytes: 768 } },
    ];
    let timing = Timing { queued_ms: 0.5, activation_ms: 2.0, worker_ms: 7.25, total_ms: 10.0 };
    let messages = [
        Message::Hello { role: Role::Worker, pid: 42, worker_kind: "builtin".into() },
        Message::Welcome { daemon_pid: 1, device: 0, store: "models".into(), worker_id: 3, arena_handle: vec![9; 128], activation_offset: 1 << 20, activation_bytes: 4096 },
        Message::Error { request_id: 7, status: 200, message: "no model".into() },
        Message::Infer { request_id: 8, model: "bert".into(), inputs: tensors.clone() },
        Message::InferResult { request_id: 8, outputs: tensors.clone(), timing },
        Message::Standby { worker_id: 3 },
        Message::Activate(Task { task_id: 5, kind: TaskKind::Inference, model: "bert".into(), model_id: 2, region_offset: 0, decided_ns: 123_456_789, resident: false, plan: vec![0, 3, 9], inputs: tensors.clone() }),
        Message::TaskDone { task_id: 5, status: 0, message: String::new(), outputs: tensors, timing },
        Message::StatsRequest,
        Message::StatsReply(Stats { requests: 10, failed: 1, hits: 6, misses: 4, evictions: 2, bytes_copied: 1 << 30, workers: 2, standbys: 1, workers_started: 2, workers_lost: 0 }),
        Message::Shutdown,
        Message::TrainSubmit { request_id: 9, job: job.clone() },
        Message::TrainStatus { request_id: 9, job_id: 1, state: JobState::Paused, iteration: 12, checkpoint: 10, preemptions: 2, status: 0, message: String::new() },
        Message::TrainQuery { request_id: 10, job_id: 1, cancel: true },
        Message::TrainStart(TrainTask { task_id: 6, job_id: 1, job, checkpoint_path: "/dev/shm/x".into(), resume_iteration: 10, decided_ns: 5 }),
        Message::Preempt { task_id: 6, mode: PreemptMode::Abandon, save: SaveMode::Host, decided_ns: 7 },
        Message::TrainProgress { task_id: 6, event: Progress::Iteration, iteration: 11, checkpoint: 10, state_bytes: 1 << 20 },
        Message::TrainStopped { task_id: 6, reason: StopReason::Preempted, iteration: 11, checkpoint: 10, status: 0, message: String::new(), stop_ms: 0.5, save_ms: 3.0 },
    ];
    messages
        .iter()
        .map(|m| (format!("seed-kind{}", m.kind()), encode_frame(m, u32::from(matches!(m, Message::Infer { .. }))).expect("encoding a seed")))
        .collect()
}

/// A micro Llama (1 block, hidden 8, 2 query heads and 1 KV head of 4, FFN
/// 16, vocabulary 16): under 2 KB of weights.
pub const HF_MICRO_CONFIG: &str = r#"{"model_type":"llama","hidden_size":8,"intermediate_size":16,"num_attention_heads":2,"head_dim":4,"num_hidden_layers":1,"num_key_value_heads":1,"rms_norm_eps":1e-05,"rope_theta":10000.0,"max_position_embeddings":16,"tie_word_embeddings":false,"torch_dtype":"bfloat16","vocab_size":16}"#;

fn seed_hf_llama() -> Vec<(String, Vec<u8>)> {
    use pipeswitch::model::llama::{model_def, LlamaConfig};
    let dir = shm_dir();
    // Shards of the named tensors (shapes as the config gives them, unless `shapes` says otherwise).
    let shard = |cfg: &LlamaConfig, names: &[&str], extra: &[(&str, Vec<u64>)], dtype: Dtype| -> Vec<u8> {
        let def = model_def(cfg);
        let mut ts: Vec<(String, Vec<u64>)> = def.layers.iter().flat_map(|(_, ws)| ws.iter()).filter(|w| names.contains(&w.name.as_str())).map(|w| (w.name.clone(), w.shape.iter().map(|&d| d as u64).collect())).collect();
        ts.extend(extra.iter().map(|(n, s)| (n.to_string(), s.clone())));
        let data: Vec<Vec<u8>> = ts.iter().enumerate().map(|(i, (_, s))| (0..s.iter().product::<u64>() * 2).map(|b| (b as usize * 13 + i) as u8).collect()).collect();
        let w: Vec<st::WriteTensor> = ts.iter().zip(&data).map(|((n, s), d)| st::WriteTensor { name: n, dtype, shape: s, data: d }).collect();
        let p = dir.join(format!("{}.safetensors", unique("seedhf")));
        st::write_file(&p, &w, None).expect("writing a seed shard");
        let b = std::fs::read(&p).expect("reading a seed shard");
        std::fs::remove_file(&p).expect("removing a seed shard");
        b
    };
    let cfg_of = |json: &str| LlamaConfig::from_hf_json(json, HF_MAX_POSITIONS).expect("a seed config");
    let names_of = |cfg: &LlamaConfig| -> Vec<String> { model_def(cfg).layers.iter().flat_map(|(_, ws)| ws.iter()).map(|w| w.name.clone()).filter(|n| n != "rope.cos_sin").collect() };
    let micro = cfg_of(HF_MICRO_CONFIG);
    let all = names_of(&micro);
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    let (a, b) = all.split_at(all.len() / 2);
    let tied_json = HF_MICRO_CONFIG.replace("\"tie_word_embeddings\":false", "\"tie_word_embeddings\":true");
    let tied = cfg_of(&tied_json);
    let tied_names = names_of(&tied);
    let tied_names: Vec<&str> = tied_names.iter().map(String::as_str).collect();
    let scaled_json = HF_MICRO_CONFIG.replace("\"torch_dtype\":\"bfloat16\"", "\"torch_dtype\":\"float16\",\"rope_scaling\":{\"rope_type\":\"llama3\",\"factor\":8.0,\"low_freq_factor\":1.0,\"high_freq_factor\":4.0,\"original_max_position_embeddings\":8}");
    let scaled = cfg_of(&scaled_json);
    let c = HF_MICRO_CONFIG.as_bytes();
    let one = shard(&micro, &all, &[], Dtype::Bf16);
    vec![
        ("one-shard".into(), hf_frame(c, &[&one])),
        ("two-shards".into(), hf_frame(c, &[&shard(&micro, a, &[], Dtype::Bf16), &shard(&micro, b, &[], Dtype::Bf16)])),
        (
            "tied-with-extras".into(),
            hf_frame(tied_json.as_bytes(), &[&shard(&tied, &tied_names, &[("lm_head.weight", vec![16, 8]), ("model.layers.0.self_attn.rotary_emb.inv_freq", vec![2])], Dtype::Bf16)]),
        ),
        ("rope-scaling-f16".into(), hf_frame(scaled_json.as_bytes(), &[&shard(&scaled, &all, &[], Dtype::F16)])),
        ("missing-tensor".into(), hf_frame(c, &[&shard(&micro, &all[1..], &[], Dtype::Bf16)])),
        ("extra-block".into(), hf_frame(c, &[&shard(&micro, &all, &[("model.layers.1.mlp.up_proj.weight", vec![16, 8])], Dtype::Bf16)])),
        ("wrong-dtype".into(), hf_frame(c, &[&shard(&micro, &all, &[], Dtype::F16)])),
        ("twice".into(), hf_frame(c, &[&one, &one])),
        ("bad-config".into(), hf_frame(br#"{"model_type":"llama","hidden_size":8}"#, &[&one])),
    ]
}
