//! The built-in worker: runs a model's graph (see [`crate::model::graph`])
//! from the model's arena region on a compute stream, with no framework.
//!
//! A [`Program`] binds a graph to a stored model once: every op's weights
//! become offsets into the model's bytes, every op gets the layer (and so
//! the group) it must wait for, and activations get offsets in one
//! activation buffer, reused as soon as a tensor is dead (first fit in op
//! order). A [`Worker`] owns a compute stream and that buffer (taken from
//! the arena, so running a model never calls `cuMemAlloc`), and runs a
//! program against the model a [`Switch`] has started copying: before the
//! first op that reads a group's weights it makes the compute stream wait
//! for the group's event, on the GPU; the host never blocks. A profiled run
//! records an event before every op, which gives per-layer execution times
//! (stored with the model for the planner) and a timeline of the switch.

use std::collections::HashMap;
use std::sync::Arc;

use crate::arena::{self, Arena};
use crate::cuda::memory;
use crate::cuda::{CUdeviceptr, CUstream};
use crate::cuda::{Device, Event, Stream};
use crate::error::{Error, Result};
use crate::kernels::{attention, conv, gemm, llama, norm};
use crate::model::cpu::TensorCoreRounding;
use crate::model::graph::{Act, Graph, Op, WeightShapes};
use crate::store::{Dtype, Model, ModelLease, Store, GRAPH_ATTRIBUTE};
use crate::switch::Switch;

/// Alignment of every activation in the buffer.
const ACT_ALIGN: u64 = 256;
/// The embedding kernel's error flag lives at the start of the buffer.
const FLAG_BYTES: u64 = ACT_ALIGN;

/// Where one activation or input lives in the activation buffer.
#[derive(Debug, Clone, PartialEq)]
pub struct Slot {
    pub offset: u64,
    pub bytes: u64,
    pub shape: Vec<usize>,
    pub dtype: Dtype,
}

/// A graph bound to a stored model.
#[derive(Debug, Clone)]
pub struct Program {
    model: Arc<Model>,
    graph: Graph,
    /// Per op: the layer whose group it waits for (the latest layer among
    /// its weights), or None for ops that read no weights.
    op_layer: Vec<Option<usize>>,
    /// Per op: the layer its execution time is charged to.
    op_charge: Vec<usize>,
    /// Per op: the layer of a table it may read from pinned host memory
    /// while that layer's group has not arrived (an embedding's token table:
    /// a few rows of it are needed, not all of it).
    op_host_table: Vec<Option<usize>>,
    slots: HashMap<String, Slot>,
    /// Index in the model's tensors of every weight, by name (so a run does
    /// not search the tensor list).
    weights: HashMap<String, usize>,
    /// Bytes of activation buffer the program needs (error flag included).
    act_bytes: u64,
    /// A program bound to a stored model keeps it stored (its bytes are
    /// neither freed nor reused) while the program lives.
    lease: Option<ModelLease>,
    /// Whether it runs Llama kernels (whose module is loaded by `prepare`).
    uses_llama: bool,
    /// Per op: the columns one GEMV launch computes for it and the ops
    /// merged into it (see [`fuse_linears`]): Some(n) for an op whose
    /// launch covers `n` output columns, None for an op merged into an
    /// earlier one (nothing to launch).
    gemv_cols: Vec<Option<usize>>,
    /// The tensor-core path of half-precision linears: the row threshold
    /// (None: GEMV always), and per op whether its launch takes it.
    tc_rows: Option<usize>,
    op_tc: Vec<bool>,
    /// Where in the buffer a tensor-core linear's input is rounded to the
    /// weights' type (after every slot; one scratch for all, ops run in
    /// order on one stream).
    round_offset: u64,
}

/// Half-precision linears that read the same input and write adjacent
/// columns of the same output with weights stored back to back (Q, K and V;
/// gate and up) are one matrix in memory: one GEMV launch computes them all,
/// the same per-column sums as separate launches. Returns, per op, the
/// columns of its launch (None: merged into the op before it).
fn fuse_linears<'a>(model: &Model, graph: &'a Graph, weights: &HashMap<String, usize>, op_layer: &[Option<usize>]) -> Vec<Option<usize>> {
    // A mergeable linear: its input, output, first column, K, weight offset, dtype.
    struct Lin<'a> {
        x: &'a str,
        out: &'a str,
        col: usize,
        k: u64,
        offset: u64,
        dtype: Dtype,
    }
    let lin = |op: &'a Op| -> Option<Lin<'a>> {
        match op {
            Op::Linear { x, weight, bias: None, trans_b: true, act: Act::None, residual: None, out, out_col } => {
                let t = &model.tensors[*weights.get(weight)?];
                if t.dtype == Dtype::F32 || t.shape.len() != 2 {
                    return None;
                }
                Some(Lin { x, out, col: *out_col, k: t.shape[1], offset: t.offset, dtype: t.dtype })
            }
            _ => None,
        }
    };
    let mut cols: Vec<Option<usize>> = graph
        .ops
        .iter()
        .map(|op| match op {
            Op::Linear { weight, .. } => Some(weights.get(weight).map_or(0, |&i| model.tensors[i].shape.first().copied().unwrap_or(0) as usize)),
            _ => Some(0),
        })
        .collect();
    let mut head = 0;
    for i in 1..graph.ops.len() {
        let merged = match (lin(&graph.ops[head]), lin(&graph.ops[i])) {
            (Some(h), Some(c)) if cols[head].is_some() => {
                let n = cols[head].unwrap_or(0);
                let end_byte = h.offset + n as u64 * h.k * h.dtype.size();
                h.x == c.x && h.out == c.out && c.col == h.col + n && h.k == c.k && h.dtype == c.dtype && c.offset == end_byte && op_layer[head] == op_layer[i]
            }
            _ => false,
        };
        if merged {
            let n = cols[i].unwrap_or(0);
            cols[head] = cols[head].map(|c| c + n);
            cols[i] = None;
        } else {
            head = i;
        }
    }
    cols
}

/// The dtypes an op's weight operand may have in the worker, or an error.
fn check_weight_dtype(op: &Op, name: &str, dtype: Dtype) -> Result<()> {
    let half = matches!(dtype, Dtype::Bf16 | Dtype::F16);
    let ok = match op {
        Op::Linear { bias, trans_b, act, .. } if half => {
            if !*trans_b || bias.is_some() || *act != Act::None {
                return Err(Error::invalid(format!(
                    "weight {name} is {}: half-precision linears take weights [N, K] (trans_b), no bias and no activation",
                    dtype.name()
                )));
            }
            true
        }
        Op::TokenEmbedding { .. } | Op::RmsNorm { .. } => half,
        Op::CachedAttention { .. } => dtype == Dtype::F32,
        _ => dtype == Dtype::F32,
    };
    if !ok {
        return Err(Error::invalid(format!("weight {name} is {}: the worker's {} kernel does not take it", dtype.name(), op.kind())));
    }
    Ok(())
}

/// Offsets for tensors with lifetimes `[first, last]` (op indices), first
/// fit in order of definition: a tensor's bytes are reused once every op
/// reading it has been enqueued before the op that writes the new one
/// (ops run in order on one stream). Returns the offsets and the total.
pub fn assign_offsets(lifetimes: &[(usize, usize, u64)], base: u64) -> (Vec<u64>, u64) {
    let mut order: Vec<usize> = (0..lifetimes.len()).collect();
    order.sort_by_key(|&i| (lifetimes[i].0, i));
    // Live blocks: (offset, end, last use), kept sorted by offset.
    let mut live: Vec<(u64, u64, usize)> = Vec::new();
    let mut offsets = vec![0u64; lifetimes.len()];
    let mut total = base;
    for i in order {
        let (first, last, bytes) = lifetimes[i];
        live.retain(|b| b.2 >= first);
        let need = bytes.div_ceil(ACT_ALIGN) * ACT_ALIGN;
        let mut at = base;
        for b in &live {
            if at + need <= b.0 {
                break;
            }
            at = at.max(b.1);
        }
        let pos = live.partition_point(|b| b.0 < at);
        live.insert(pos, (at, at + need, last));
        offsets[i] = at;
        total = total.max(at + need);
    }
    (offsets, total)
}

impl Program {
    /// Binds `graph` to `model`: checks that every weight exists with the
    /// graph's shapes and a dtype its op takes, and lays out the
    /// activations. Half-precision linears take the tensor-core path from
    /// [`llama::tensor_core_rows`] rows (the environment's switch; see
    /// [`Program::with_tensor_cores`]).
    pub fn new(model: Arc<Model>, graph: Graph) -> Result<Program> {
        Program::with_tensor_cores(model, graph, llama::tensor_core_rows())
    }

    /// [`Program::new`] with the tensor-core path of half-precision linears
    /// chosen here: a linear whose weight is BF16 or F16 and whose input has
    /// at least `min_rows` rows (a prefill) runs as its input rounded to the
    /// weight's type (`llama_round_*`) times the weight on the tensor cores
    /// (`gemm::gemm_c32`: fp32 accumulation, output and residual); the
    /// others, and every one with `None`, run on the GEMV kernels with f32
    /// inputs. [`Program::tensor_core_rounding`] tells the CPU executor.
    pub fn with_tensor_cores(model: Arc<Model>, graph: Graph, min_rows: Option<usize>) -> Result<Program> {
        if min_rows == Some(0) {
            return Err(Error::invalid("the tensor-core path needs a row threshold of at least 1"));
        }
        let mut shapes: WeightShapes = HashMap::new();
        for t in &model.tensors {
            shapes.insert(t.name.clone(), t.shape.iter().map(|&d| d as usize).collect());
        }
        graph.validate(&shapes)?;
        for op in &graph.ops {
            if let Op::Attention { qkv, heads, .. } = op {
                let d = graph.inputs.iter().chain(&graph.activations).find(|(n, _)| n == qkv).map(|(_, d)| d);
                let hidden = d.map_or(0, |d| d.shape[1] / 3);
                if hidden != heads * 64 {
                    return Err(Error::invalid(format!(
                        "graph {}: attention -> {}: the worker's attention kernel needs heads of 64 (hidden {hidden}, {heads} heads)",
                        graph.name,
                        op.output()
                    )));
                }
            }
        }
        let weights: HashMap<String, usize> = model.tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        let mut tensor_layer = HashMap::new();
        for (li, l) in model.layers.iter().enumerate() {
            for t in &model.tensors[l.first_tensor..l.first_tensor + l.n_tensors] {
                tensor_layer.insert(t.name.as_str(), li);
            }
        }
        let decls: HashMap<&str, _> = graph.inputs.iter().chain(&graph.activations).chain(&graph.state).map(|(n, d)| (n.as_str(), d)).collect();
        for op in &graph.ops {
            if let Op::CachedAttention { k_cache, .. } = op {
                let d = decls.get(k_cache.as_str()).map(|d| (d.dtype.as_str(), d.shape.get(3).copied()));
                if d != Some(("BF16", Some(128))) {
                    return Err(Error::invalid(format!("graph {}: cached attention -> {}: the worker's kernel takes BF16 caches of heads of 128", graph.name, op.output())));
                }
            }
        }
        let uses_llama = graph.ops.iter().any(|op| {
            matches!(op, Op::TokenEmbedding { .. } | Op::RmsNorm { .. } | Op::CachedAttention { .. } | Op::SwiGlu { .. } | Op::Argmax { .. })
                || matches!(op, Op::Linear { weight, .. } if weights.get(weight).is_some_and(|&i| model.tensors[i].dtype != Dtype::F32))
        });
        let mut op_layer = Vec::with_capacity(graph.ops.len());
        let mut op_charge = Vec::with_capacity(graph.ops.len());
        let mut op_host_table = Vec::with_capacity(graph.ops.len());
        let mut last_layer = 0usize;
        for op in &graph.ops {
            let mut layer: Option<usize> = None;
            let table = match op {
                Op::Embedding { wte, .. } => Some(wte.as_str()),
                Op::TokenEmbedding { table, .. } => Some(table.as_str()),
                _ => None,
            };
            op_host_table.push(table.and_then(|t| tensor_layer.get(t).copied()));
            for o in op.operands() {
                if decls.contains_key(o) {
                    continue;
                }
                let t = weights.get(o).map(|&i| &model.tensors[i]).ok_or_else(|| Error::invalid(format!("weight {o} is not in the model")))?;
                check_weight_dtype(op, o, t.dtype)?;
                if Some(o) == table {
                    continue;
                }
                let l = tensor_layer[o];
                layer = Some(layer.map_or(l, |m: usize| m.max(l)));
            }
            if let Some(l) = layer {
                last_layer = l;
            }
            op_layer.push(layer);
            op_charge.push(last_layer);
        }

        // Lifetimes: state, inputs and outputs live for the whole run;
        // activations from their first writer to their last reader. State
        // comes first (so it lies at the start of the buffer, in declaration
        // order, the same in every graph declaring it).
        let n_ops = graph.ops.len();
        let mut life: HashMap<&str, (usize, usize)> = HashMap::new();
        for (n, _) in graph.state.iter().chain(&graph.inputs) {
            life.insert(n, (0, n_ops));
        }
        for (i, op) in graph.ops.iter().enumerate() {
            for o in op.operands().into_iter().chain([op.output()]) {
                if let Some(e) = life.get_mut(o) {
                    e.1 = e.1.max(i);
                } else if decls.contains_key(o) {
                    life.insert(o, (i, i));
                }
            }
        }
        for o in &graph.outputs {
            if let Some(e) = life.get_mut(o.as_str()) {
                e.1 = n_ops;
            }
        }
        let mut names: Vec<&str> = Vec::new();
        let mut lifetimes = Vec::new();
        for (n, d) in graph.state.iter().chain(&graph.inputs).chain(&graph.activations) {
            if let Some(&(a, b)) = life.get(n.as_str()) {
                names.push(n);
                lifetimes.push((a, b, d.bytes()? as u64));
            }
        }
        let (offsets, mut act_bytes) = assign_offsets(&lifetimes, FLAG_BYTES);
        let mut slots = HashMap::new();
        for ((n, off), (_, _, bytes)) in names.iter().zip(offsets).zip(&lifetimes) {
            let d = decls[n];
            slots.insert(n.to_string(), Slot { offset: off, bytes: *bytes, shape: d.shape.clone(), dtype: d.dtype()? });
        }
        let gemv_cols = fuse_linears(&model, &graph, &weights, &op_layer);
        // The tensor-core linears and the scratch their inputs are rounded into.
        let mut op_tc = vec![false; n_ops];
        let mut round_bytes = 0u64;
        for (i, op) in graph.ops.iter().enumerate() {
            if let (Some(rows), Op::Linear { x, weight, .. }) = (min_rows, op) {
                let (Some(&wi), Some(xd)) = (weights.get(weight.as_str()), decls.get(x.as_str())) else { continue };
                let t = &model.tensors[wi];
                let launched_half = t.dtype != Dtype::F32 && gemv_cols[i].is_some();
                if let (true, &[m, k]) = (launched_half, xd.shape.as_slice()) {
                    if m >= rows {
                        op_tc[i] = true;
                        round_bytes = round_bytes.max((m * k) as u64 * t.dtype.size());
                    }
                }
            }
        }
        let round_offset = act_bytes;
        act_bytes += round_bytes.div_ceil(ACT_ALIGN) * ACT_ALIGN;
        Ok(Program {
            model,
            graph,
            op_layer,
            op_charge,
            op_host_table,
            slots,
            weights,
            act_bytes,
            lease: None,
            uses_llama,
            gemv_cols,
            tc_rows: min_rows,
            op_tc,
            round_offset,
        })
    }

    /// The program of a stored model whose graph was stored with it (the
    /// [`GRAPH_ATTRIBUTE`] attribute, e.g. from a safetensors file's metadata).
    pub fn from_store(store: &Store, model: &str) -> Result<Program> {
        let lease = store.lease(model)?;
        let json = lease.attribute(GRAPH_ATTRIBUTE).ok_or_else(|| {
            Error::NotFound(format!("model {model:?} has no graph (attribute {GRAPH_ATTRIBUTE:?}) to run"))
        })?;
        let graph = Graph::from_json(json)?;
        let mut program = Program::new(lease.model().clone(), graph)?;
        program.lease = Some(lease);
        Ok(program)
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }
    pub fn graph(&self) -> &Graph {
        &self.graph
    }
    /// Bytes of activation buffer this program needs.
    pub fn activation_bytes(&self) -> u64 {
        self.act_bytes
    }
    /// Where an input or activation lives.
    pub fn slot(&self, name: &str) -> Result<&Slot> {
        self.slots.get(name).ok_or_else(|| Error::NotFound(format!("model {:?} has no tensor {name:?} to read or write", self.model.name)))
    }
    /// Per op, the output columns of its GEMV launch where half-precision
    /// linears are merged (see `fuse_linears`): None for an op merged into
    /// the one before it.
    pub fn gemv_columns(&self) -> &[Option<usize>] {
        &self.gemv_cols
    }
    /// The row threshold of the tensor-core path of half-precision linears
    /// (None: GEMV always); see [`Program::with_tensor_cores`].
    pub fn tensor_core_rows(&self) -> Option<usize> {
        self.tc_rows
    }
    /// Per op: whether it runs on the tensor-core path.
    pub fn tensor_core_ops(&self) -> &[bool] {
        &self.op_tc
    }
    /// What the CPU executor must round to compute what this program
    /// computes (`cpu::run_graph_cpu_rounded`); None without the path.
    pub fn tensor_core_rounding(&self) -> Option<TensorCoreRounding> {
        let min_rows = self.tc_rows?;
        let dtypes = self.model.tensors.iter().map(|t| (t.name.clone(), t.dtype)).collect();
        Some(TensorCoreRounding { min_rows, dtypes })
    }
    /// The layer each op waits for (None: reads no weights).
    pub fn op_layers(&self) -> &[Option<usize>] {
        &self.op_layer
    }

    /// Layers a run waits for: `[0, needed_layers())`. The layers after them
    /// (an embedding table stored last) are read from host memory until
    /// they arrive, so the first run does not wait for them.
    pub fn needed_layers(&self) -> usize {
        self.op_layer.iter().flatten().max().map_or(0, |l| l + 1)
    }
}

/// Options of one run.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// Record an event before every op (per-layer times, timeline).
    pub profile: bool,
}

/// Timeline of a profiled run, in ms after the switch's start event.
#[derive(Debug, Clone, PartialEq)]
pub struct OpTimes {
    /// Start of op i (the last entry: end of the last op).
    pub op_start_ms: Vec<f64>,
}

/// Activation memory of a worker.
enum Buffer {
    None,
    /// A region of an arena this process owns.
    Region { arena: Arc<Arena>, offset: u64, bytes: u64 },
    /// From the arena workspace attached to this process.
    Workspace { ptr: CUdeviceptr, bytes: u64 },
    /// A region the daemon gave this worker: used, never grown or freed.
    Given { offset: u64, bytes: u64 },
}

/// Runs programs on one device's compute stream.
pub struct Worker {
    device: &'static Device,
    stream: Stream,
    arena: Arc<Arena>,
    buffer: Buffer,
    events: Vec<Event>,
    /// Ops of the last profiled run (0 when the last run was not profiled).
    profiled_ops: usize,
    /// Model id of the last run.
    last_model: Option<u64>,
    /// Pinned staging for inputs ([`Worker::set_input`]): bytes from
    /// pageable memory are copied here on the host and then DMA'd
    /// asynchronously on the compute stream, instead of a synchronous
    /// pageable copy (a third of the bandwidth, and a wait for the previous
    /// run).
    staging: Option<memory::PinnedHost>,
    /// Bytes of `staging` handed to copies that may still be in flight
    /// (reset, after a wait for the stream, when the next input does not fit
    /// after them).
    staged: usize,
}

/// Inputs at least this large are copied into the staging buffer by several
/// threads.
const PARALLEL_STAGE_BYTES: usize = 1 << 20;
/// Staging is allocated in multiples of this.
const STAGING_GRANULE: usize = 1 << 20;

/// One run of a program captured as a CUDA graph ([`Worker::capture_run`]).
#[derive(Debug)]
pub struct RunGraph {
    graph: crate::cuda::Graph,
    model_id: u64,
    /// The name of the program's graph.
    program: String,
    /// Where the model's bytes and the worker's buffer were when captured.
    weights: CUdeviceptr,
    buffer: CUdeviceptr,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker").field("device", &self.device.ordinal()).field("activation_bytes", &self.buffer_bytes()).finish()
    }
}

fn act_kind(a: Act) -> gemm::Activation {
    match a {
        Act::None => gemm::Activation::None,
        Act::Relu => gemm::Activation::Relu,
        Act::Gelu => gemm::Activation::Gelu,
        Act::GeluTanh => gemm::Activation::GeluTanh,
    }
}

impl Worker {
    /// A worker running models that are switched into `arena`. Its
    /// activations come from a region of the arena (when this process owns
    /// it) or from the arena's workspace attached to this process. Loads
    /// every kernel module now (JIT, once per process), so that no switch
    /// ever waits for a compilation.
    pub fn new(arena: &Arc<Arena>) -> Result<Worker> {
        let device = arena.device();
        device.bind()?;
        crate::kernels::preload(device)?;
        Ok(Worker {
            device,
            stream: Stream::new(device)?,
            arena: arena.clone(),
            buffer: Buffer::None,
            events: Vec::new(),
            profiled_ops: 0,
            last_model: None,
            staging: None,
            staged: 0,
        })
    }

    /// Allocates the pinned staging for inputs now (at least `bytes`), so
    /// that the first request does not pay for it: a standby calls this
    /// with its largest expected input.
    pub fn reserve_input_staging(&mut self, bytes: usize) -> Result<()> {
        if self.staging.as_ref().is_some_and(|s| s.len() >= bytes) {
            return Ok(());
        }
        self.stream.synchronize()?;
        self.staging = None;
        self.staged = 0;
        let bytes = bytes.max(1).div_ceil(STAGING_GRANULE) * STAGING_GRANULE;
        self.staging = Some(memory::PinnedHost::new(self.device, bytes)?);
        Ok(())
    }

    /// A worker whose activations live in `[offset, offset + bytes)` of
    /// `arena`, a region that someone else (the daemon) reserved for it.
    /// `prepare` fails for a program whose activations do not fit.
    pub fn with_region(arena: &Arc<Arena>, offset: u64, bytes: u64) -> Result<Worker> {
        arena.check_region(offset, bytes)?;
        let mut w = Worker::new(arena)?;
        w.buffer = Buffer::Given { offset, bytes };
        Ok(w)
    }

    pub fn device(&self) -> &'static Device {
        self.device
    }

    /// The compute stream (raw).
    pub fn stream(&self) -> CUstream {
        self.stream.raw()
    }

    fn buffer_bytes(&self) -> u64 {
        match &self.buffer {
            Buffer::None => 0,
            Buffer::Region { bytes, .. } | Buffer::Workspace { bytes, .. } | Buffer::Given { bytes, .. } => *bytes,
        }
    }

    fn buffer_ptr(&self) -> CUdeviceptr {
        match &self.buffer {
            Buffer::None => 0,
            Buffer::Region { arena, offset, .. } => arena.base() + offset,
            Buffer::Workspace { ptr, .. } => *ptr,
            Buffer::Given { offset, .. } => self.arena.base() + offset,
        }
    }

    fn free_buffer(&mut self) -> Result<()> {
        self.stream.synchronize()?;
        match std::mem::replace(&mut self.buffer, Buffer::None) {
            Buffer::None => Ok(()),
            Buffer::Region { arena, offset, .. } => arena.release(offset),
            Buffer::Workspace { ptr, .. } => arena::workspace::free(ptr),
            Buffer::Given { .. } => Ok(()),
        }
    }

    /// Makes sure the activation buffer fits `program` (and the programs
    /// prepared before): grows it if needed, zeroing the new one. Call it
    /// before switching, not during a switch.
    pub fn prepare(&mut self, program: &Program) -> Result<()> {
        if program.uses_llama {
            llama::preload(self.device)?;
        }
        let need = program.act_bytes;
        if need <= self.buffer_bytes() {
            return Ok(());
        }
        if let Buffer::Given { bytes, .. } = self.buffer {
            return Err(Error::ArenaFull(format!(
                "model {:?} needs {need} bytes of activations; this worker's region has {bytes}",
                program.model.name
            )));
        }
        self.free_buffer()?;
        self.device.bind()?;
        self.buffer = if self.arena.is_owner() {
            let offset = self.arena.alloc(need)?;
            Buffer::Region { arena: self.arena.clone(), offset, bytes: need }
        } else {
            let ptr = arena::workspace::malloc(need, self.device.ordinal())?;
            Buffer::Workspace { ptr, bytes: need }
        };
        // SAFETY: the buffer was just reserved for this worker, `need` bytes.
        unsafe { memory::memset_d8(self.buffer_ptr(), 0, need as usize)? };
        Ok(())
    }

    fn check_prepared(&self, program: &Program) -> Result<()> {
        if program.act_bytes > self.buffer_bytes() {
            return Err(Error::InvalidState(format!(
                "model {:?} needs {} bytes of activations: call prepare first",
                program.model.name, program.act_bytes
            )));
        }
        Ok(())
    }

    /// Writes an input (its bytes, in the declared dtype and shape): copied
    /// into pinned staging now and to the device on the compute stream, so
    /// after the worker's previous run and before its next one; `data` may
    /// be reused as soon as this returns.
    pub fn set_input(&mut self, program: &Program, name: &str, data: &[u8]) -> Result<()> {
        let Some(_) = self.input_slot(program, name, data.len())? else { return Ok(()) };
        let slot = program.slot(name)?;
        let at = self.stage(data)?;
        let staging = self.staging.as_ref().expect("stage allocated it");
        // SAFETY: the slot lies inside the buffer (checked by check_prepared,
        // slots end before act_bytes); `at..at + len` lies inside the pinned
        // staging, which is not written again before this copy completes
        // (`stage` waits for the stream before reusing bytes).
        unsafe { memory::copy_htod_async(self.buffer_ptr() + slot.offset, staging.as_ptr().add(at), data.len(), self.stream.raw()) }
    }

    /// As [`Worker::set_input`], from page-locked host memory (a client's
    /// input area registered with CUDA): one asynchronous DMA on the
    /// compute stream, no host copy.
    ///
    /// # Safety
    /// `data` must be page-locked for this process (e.g. by
    /// [`memory::HostRegistration::new_read_only`]), and stay mapped,
    /// registered and unchanged until the next run that reads it completes
    /// (`read`, `synchronize`).
    pub unsafe fn set_input_pinned(&mut self, program: &Program, name: &str, data: &[u8]) -> Result<()> {
        let Some(offset) = self.input_slot(program, name, data.len())? else { return Ok(()) };
        // SAFETY: the slot lies inside the buffer (input_slot); the source
        // is page-locked and stays valid until the copy completes (the
        // caller's contract).
        unsafe { memory::copy_htod_async(self.buffer_ptr() + offset, data.as_ptr(), data.len(), self.stream.raw()) }
    }

    /// Checks that `program` is prepared and has input `name` of `len`
    /// bytes; its slot's offset in the buffer (None: an empty input).
    fn input_slot(&self, program: &Program, name: &str, len: usize) -> Result<Option<u64>> {
        self.check_prepared(program)?;
        if !program.graph.inputs.iter().any(|(n, _)| n == name) {
            return Err(Error::NotFound(format!("model {:?} has no input {name:?}", program.model.name)));
        }
        let slot = program.slot(name)?;
        if len as u64 != slot.bytes {
            return Err(Error::invalid(format!(
                "input {name:?} is {} {:?}: {} bytes, got {len}",
                slot.dtype.name(),
                slot.shape,
                slot.bytes,
            )));
        }
        Ok((len > 0).then_some(slot.offset))
    }

    /// Copies `data` into pinned staging and returns its offset there:
    /// after the bytes handed out since the stream's last wait, or at 0
    /// after waiting for the stream when they do not fit (growing the
    /// staging when `data` alone does not).
    fn stage(&mut self, data: &[u8]) -> Result<usize> {
        let cap = self.staging.as_ref().map_or(0, |s| s.len());
        let at = self.staged.next_multiple_of(256);
        let at = if at.checked_add(data.len()).is_some_and(|end| end <= cap) {
            at
        } else {
            self.stream.synchronize()?;
            self.staged = 0;
            if data.len() > cap {
                self.reserve_input_staging(data.len().max(cap * 2))?;
            }
            0
        };
        let staging = self.staging.as_mut().expect("reserved above");
        let dst = &mut staging.as_mut_slice()[at..at + data.len()];
        if data.len() >= PARALLEL_STAGE_BYTES {
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(4);
            let chunk = data.len().div_ceil(threads).next_multiple_of(4096);
            std::thread::scope(|s| {
                for (d, src) in dst.chunks_mut(chunk).zip(data.chunks(chunk)) {
                    s.spawn(move || d.copy_from_slice(src));
                }
            });
        } else {
            dst.copy_from_slice(data);
        }
        self.staged = at + data.len();
        Ok(at)
    }

    /// Reads an output or any activation of the last run (waits for it).
    /// Fails if an embedding saw a token id or position out of range.
    pub fn read(&mut self, program: &Program, name: &str, out: &mut [u8]) -> Result<()> {
        self.check_prepared(program)?;
        let slot = program.slot(name)?;
        if out.len() as u64 != slot.bytes {
            return Err(Error::invalid(format!("{name:?} has {} bytes, the buffer {}", slot.bytes, out.len())));
        }
        self.stream.synchronize()?;
        self.staged = 0; // every staged copy is done
        let mut flag = [0u8; 4];
        // SAFETY: both ranges lie inside the buffer; the stream is idle.
        unsafe {
            memory::copy_dtoh(flag.as_mut_ptr(), self.buffer_ptr(), 4)?;
            memory::copy_dtoh(out.as_mut_ptr(), self.buffer_ptr() + slot.offset, out.len())?;
        }
        let flag = i32::from_le_bytes(flag);
        if flag != 0 {
            // SAFETY: the flag's 4 bytes at the buffer's start.
            unsafe { memory::memset_d8(self.buffer_ptr(), 0, 4)? };
            return Err(Error::invalid(format!(
                "model {:?}: an input token id, position or type was out of range (flags {flag:#x}); its rows are zeros",
                program.model.name
            )));
        }
        Ok(())
    }

    /// Reads an i32 tensor of the last run (token ids).
    pub fn read_i32(&mut self, program: &Program, name: &str) -> Result<Vec<i32>> {
        let slot = program.slot(name)?;
        let mut bytes = vec![0u8; slot.bytes as usize];
        self.read(program, name, &mut bytes)?;
        Ok(bytes.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }

    /// Reads an fp32 tensor of the last run.
    pub fn read_f32(&mut self, program: &Program, name: &str) -> Result<Vec<f32>> {
        let slot = program.slot(name)?;
        let mut bytes = vec![0u8; slot.bytes as usize];
        self.read(program, name, &mut bytes)?;
        Ok(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }

    /// Enqueues one run of `program` on the model `switch` has started (or
    /// finished) copying: each op waits for its group's event on the GPU.
    /// Returns once everything is enqueued.
    pub fn run(&mut self, program: &Program, switch: &Switch, opts: RunOptions) -> Result<()> {
        self.check_prepared(program)?;
        let model = switch.model()?;
        if model.id != program.model.id {
            return Err(Error::InvalidState(format!(
                "the switch holds model {:?} (id {}) but the program runs {:?} (id {})",
                model.name, model.id, program.model.name, program.model.id
            )));
        }
        if switch.device().ordinal() != self.device.ordinal() {
            return Err(Error::invalid("the switch and the worker are on different devices"));
        }
        self.device.bind()?;
        let n_ops = program.graph.ops.len();
        if opts.profile {
            while self.events.len() < n_ops + 1 {
                self.events.push(Event::new(self.device, true)?);
            }
        }
        let wbase = switch.model_base()?;
        let mut hbase: Option<CUdeviceptr> = None;
        let abase = self.buffer_ptr();
        let s = self.stream.raw();
        let mut waited: Option<usize> = None;
        for (i, op) in program.graph.ops.iter().enumerate() {
            if let Some(l) = program.op_layer[i] {
                let g = switch.group_of_layer(l)?;
                if waited.is_none_or(|w| g > w) {
                    switch.wait_group(g, s)?;
                    waited = Some(g);
                }
            }
            // A table whose group has not arrived is read from the store's
            // pinned pages (the kernel reads only the rows it needs).
            let mut tbase = wbase;
            if let Some(l) = program.op_host_table[i] {
                let g = switch.group_of_layer(l)?;
                if waited.is_none_or(|w| g > w) && !switch.group_ready(g)? {
                    tbase = match hbase {
                        Some(h) => h,
                        None => *hbase.insert(switch.host_model_base()?),
                    };
                }
            }
            if opts.profile {
                self.events[i].record(s)?;
            }
            if program.gemv_cols[i].is_some() {
                self.launch(program, i, op, wbase, tbase, abase)?;
            }
        }
        if opts.profile {
            self.events[n_ops].record(s)?;
        }
        self.profiled_ops = if opts.profile { n_ops } else { 0 };
        self.last_model = Some(program.model.id);
        Ok(())
    }

    /// Captures one run of `program` on the model `switch` holds as a CUDA
    /// graph, for runs repeated on the same bytes (an LLM's decoding steps):
    /// one launch instead of a launch per kernel. The model must have
    /// arrived (every group ready) and stay where it is; the inputs are read
    /// from the worker's buffer when the graph runs, so set them with
    /// [`Worker::set_input`] before each [`Worker::run_graph`]. Nothing runs
    /// now.
    pub fn capture_run(&mut self, program: &Program, switch: &Switch) -> Result<RunGraph> {
        let last = switch.n_groups()?.saturating_sub(1);
        if !switch.group_ready(last)? {
            return Err(Error::InvalidState(format!(
                "model {:?} is still arriving: capture a run of it once it is complete",
                program.model.name
            )));
        }
        let weights = switch.model_base()?;
        let buffer = self.buffer_ptr();
        let stream = self.stream.raw();
        let device = self.device;
        let graph = crate::cuda::Graph::capture(device, stream, || self.run(program, switch, RunOptions::default()))?;
        Ok(RunGraph { graph, model_id: program.model.id, program: program.graph.name.clone(), weights, buffer })
    }

    /// Enqueues one run of a captured graph of `program` on the compute
    /// stream (as [`Worker::run`]; read its outputs with [`Worker::read`]).
    /// Fails if the graph is of another model, or if the model or this
    /// worker's buffer moved since the capture.
    pub fn run_graph(&mut self, program: &Program, switch: &Switch, graph: &RunGraph) -> Result<()> {
        if graph.model_id != program.model.id || graph.program != program.graph.name {
            return Err(Error::invalid(format!(
                "the graph is a run of {:?}, not of {:?} on model {:?}",
                graph.program, program.graph.name, program.model.name
            )));
        }
        if switch.model_base()? != graph.weights || self.buffer_ptr() != graph.buffer {
            return Err(Error::InvalidState(format!(
                "model {:?} or the worker's buffer moved since the run was captured: capture it again",
                program.model.name
            )));
        }
        graph.graph.launch(self.stream.raw())?;
        self.profiled_ops = 0;
        self.last_model = Some(program.model.id);
        Ok(())
    }

    /// Waits for the last run.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize()
    }

    /// Start of every op of the last (profiled) run, and the end of the
    /// last op, in ms after `origin` (e.g. [`Switch::start_event`]).
    pub fn op_times(&self, program: &Program, origin: &Event) -> Result<OpTimes> {
        let n = program.graph.ops.len();
        if self.profiled_ops != n || self.last_model != Some(program.model.id) {
            return Err(Error::InvalidState(format!("the last run was not a profiled run of {:?}", program.model.name)));
        }
        self.stream.synchronize()?;
        let op_start_ms = (0..=n).map(|i| Ok(f64::from(Event::elapsed_ms(origin, &self.events[i])?))).collect::<Result<_>>()?;
        Ok(OpTimes { op_start_ms })
    }

    /// Execution time of every layer of the model in the last profiled run
    /// (ops that read no weights count towards the layer before them).
    pub fn layer_ms(&self, program: &Program) -> Result<Vec<f64>> {
        let origin = self.events.first().filter(|_| self.profiled_ops > 0).ok_or_else(|| {
            Error::InvalidState(format!("the last run was not a profiled run of {:?}", program.model.name))
        })?;
        let t = self.op_times(program, origin)?;
        let mut ms = vec![0.0; program.model.layers.len()];
        for (i, &l) in program.op_charge.iter().enumerate() {
            ms[l] += (t.op_start_ms[i + 1] - t.op_start_ms[i]).max(0.0);
        }
        Ok(ms)
    }

    /// Enqueues one op; weights are read at `wbase`, an embedding's token
    /// table at `tbase` (the arena, or the store's pinned pages).
    fn launch(&self, p: &Program, index: usize, op: &Op, wbase: CUdeviceptr, tbase: CUdeviceptr, abase: CUdeviceptr) -> Result<()> {
        let dev = self.device;
        let s = self.stream.raw();
        // Address of a weight or activation; shape of an activation.
        let w = |name: &str| -> Result<(CUdeviceptr, Vec<usize>)> {
            let t = p.weights.get(name).map(|&i| &p.model.tensors[i]).ok_or_else(|| Error::invalid(format!("weight {name} is not in the model")))?;
            Ok((wbase + t.offset, t.shape.iter().map(|&d| d as usize).collect()))
        };
        let a = |name: &str| -> Result<(CUdeviceptr, &[usize])> {
            let sl = p.slot(name)?;
            Ok((abase + sl.offset, &sl.shape))
        };
        let wdtype = |name: &str| -> Result<Dtype> {
            p.weights.get(name).map(|&i| p.model.tensors[i].dtype).ok_or_else(|| Error::invalid(format!("weight {name} is not in the model")))
        };
        let wo = |name: &Option<String>| -> Result<CUdeviceptr> { name.as_deref().map_or(Ok(0), |n| w(n).map(|x| x.0)) };
        let ao = |name: &Option<String>| -> Result<CUdeviceptr> { name.as_deref().map_or(Ok(0), |n| a(n).map(|x| x.0)) };
        match op {
            Op::Embedding { ids, wte, wpe, token_type, type_ids, out } => {
                let (ids_p, ids_shape) = a(ids)?;
                let (wte_p, wte_s) = w(wte)?;
                let wte_p = wte_p - wbase + tbase;
                let (wpe_p, wpe_s) = w(wpe)?;
                let (wtt, n_types) = match token_type {
                    Some(t) => {
                        let (p, s) = w(t)?;
                        (p, s[0])
                    }
                    None => (0, 0),
                };
                let tables = norm::EmbeddingTables { wte: wte_p, wpe: wpe_p, wtt, vocab: wte_s[0], max_pos: wpe_s[0], n_types, hidden: wte_s[1] };
                let tokens: usize = ids_shape.iter().product();
                let seq = *ids_shape.last().unwrap_or(&1);
                norm::embedding(dev, s, a(out)?.0, ids_p, 0, ao(type_ids)?, &tables, tokens, seq, abase)
            }
            Op::LayerNorm { x, residual, gamma, beta, eps, out } => {
                let (xp, xs) = a(x)?;
                let cols = *xs.last().unwrap_or(&0);
                let rows = xs.iter().product::<usize>() / cols.max(1);
                norm::add_layernorm(dev, s, a(out)?.0, 0, xp, ao(residual)?, w(gamma)?.0, w(beta)?.0, rows, cols, *eps)
            }
            Op::Linear { x, weight, residual, out, out_col, .. } if wdtype(weight)? != Dtype::F32 => {
                let (xp, xs) = a(x)?;
                let (wp, ws) = w(weight)?;
                let (op_, os) = a(out)?;
                let ldo = os[1];
                // Ops merged into this one (fuse_linears) add their columns.
                let n = p.gemv_cols[index].unwrap_or(ws[0]);
                let dt = wdtype(weight)?;
                if !p.op_tc[index] {
                    return llama::gemv(dev, s, dt, xs[0], n, ws[1], xp, xs[1], wp, op_ + (*out_col * 4) as u64, ldo, ao(residual)?, ldo);
                }
                // Tensor cores: x rounded to the weights' type, fp32 out and residual.
                let xr = abase + p.round_offset;
                llama::round_half(dev, s, dt, xp, xs[1], xr, xs[0], ws[1])?;
                let gdt = if dt == Dtype::Bf16 { gemm::GemmDtype::Bf16 } else { gemm::GemmDtype::F16 };
                let mut g = gemm::GemmArgs::dense(xs[0], n, ws[1], xr, wp, true, op_ + (*out_col * 4) as u64);
                g.ldc = ldo;
                g.residual = ao(residual)?;
                gemm::gemm_c32(dev, s, gdt, &g)
            }
            Op::Linear { x, weight, bias, trans_b, act, residual, out, out_col } => {
                let (xp, xs) = a(x)?;
                let (wp, ws) = w(weight)?;
                let (op_, os) = a(out)?;
                let (k, n) = if *trans_b { (ws[1], ws[0]) } else { (ws[0], ws[1]) };
                let mut g = gemm::GemmArgs::dense(xs[0], n, k, xp, wp, *trans_b, op_ + (*out_col * 4) as u64);
                g.ldc = os[1];
                g.bias = wo(bias)?;
                g.residual = ao(residual)?;
                g.act = act_kind(*act);
                gemm::gemm(dev, s, gemm::GemmDtype::F32, &g)
            }
            Op::Attention { qkv, heads, seq, causal, out } => {
                let (qp, qs) = a(qkv)?;
                let hidden = qs[1] / 3;
                attention::attention(dev, s, a(out)?.0, qp, 0, qs[0] / seq, *seq, *heads, hidden / heads, *causal)
            }
            Op::Conv2d { x, weight, bias, stride, pad, residual, relu, out } => {
                let (xp, xs) = a(x)?;
                let (wp, ws) = w(weight)?;
                let mut c = conv::Conv2dArgs::shape(xs[0], xs[1], xs[2], xs[3], ws[0], ws[2], ws[3], *stride, *pad);
                c.x = xp;
                c.weight = wp;
                c.bias = wo(bias)?;
                c.residual = ao(residual)?;
                c.y = a(out)?.0;
                c.relu = *relu;
                conv::conv2d(dev, s, &c)
            }
            Op::MaxPool { x, kernel, stride, pad, out } => {
                let (xp, xs) = a(x)?;
                let pa = conv::Pool2dArgs::square(xs[0], xs[1], xs[2], xs[3], *kernel, *stride, *pad);
                conv::max_pool2d(dev, s, xp, a(out)?.0, &pa)
            }
            Op::GlobalAvgPool { x, out } => {
                let (xp, xs) = a(x)?;
                conv::global_avg_pool(dev, s, xp, a(out)?.0, xs[0], xs[1], xs[2], xs[3])
            }
            Op::TokenEmbedding { ids, table, out } => {
                let (ids_p, ids_shape) = a(ids)?;
                let (tp, ts) = w(table)?;
                let tp = tp - wbase + tbase;
                llama::embed(dev, s, wdtype(table)?, a(out)?.0, ids_p, tp, abase, ids_shape.iter().product(), ts[0], ts[1])
            }
            Op::RmsNorm { x, weight, eps, last_of, out } => {
                let (xp, xs) = a(x)?;
                llama::rmsnorm(dev, s, wdtype(weight)?, xp, w(weight)?.0, a(out)?.0, xs[0], xs[1], last_of.unwrap_or(1), *eps)
            }
            Op::CachedAttention { qkv, rope, pos, k_cache, v_cache, heads, kv_heads, seq, out } => {
                let (qp, qs) = a(qkv)?;
                let (kp, ks) = a(k_cache)?;
                let (rp, rs) = w(rope)?;
                let sh = llama::AttentionShape { batch: qs[0] / seq, seq: *seq, heads: *heads, kv_heads: *kv_heads, head_dim: ks[3], max_seq: ks[2], max_pos: rs[0] };
                let ptrs = llama::AttentionPtrs { qkv: qp, rope: rp, pos: a(pos)?.0, k_cache: kp, v_cache: a(v_cache)?.0, out: a(out)?.0, flag: abase };
                llama::cached_attention(dev, s, &ptrs, &sh)
            }
            Op::SwiGlu { x, out } => {
                let (xp, xs) = a(x)?;
                llama::swiglu(dev, s, xp, a(out)?.0, xs[0], xs[1] / 2)
            }
            Op::Argmax { x, out } => {
                let (xp, xs) = a(x)?;
                llama::argmax(dev, s, xp, a(out)?.0, xs[0], xs[1])
            }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Err(e) = self.free_buffer() {
            tracing::warn!("worker: freeing the activation buffer: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_reuse_dead_tensors_and_never_overlap_live_ones() {
        // a: ops 0..=1, b: 1..=2, c: 2..=3 (a is dead at op 2), d: 3..=3.
        let life = [(0, 1, 1000), (1, 2, 300), (2, 3, 900), (3, 3, 100)];
        let (off, total) = assign_offsets(&life, 256);
        assert_eq!(off[0], 256);
        assert_eq!(off[1], 256 + 1024);
        assert_eq!(off[2], 256, "c reuses a's bytes");
        assert_eq!(off[3], 256 + 1024, "d reuses b's bytes");
        assert_eq!(total, 256 + 1024 + 512);
        // Brute force: tensors alive at the same op never share a byte.
        let life: Vec<(usize, usize, u64)> = (0..200).map(|i| {
            let a = (i * 7919) % 50;
            (a, a + (i * 31) % 9, 1 + ((i * 104_729) % 5000) as u64)
        }).collect();
        let (off, total) = assign_offsets(&life, 0);
        for i in 0..life.len() {
            assert!(off[i] % ACT_ALIGN == 0 && off[i] + life[i].2 <= total);
            for j in 0..i {
                let overlap_t = life[i].0 <= life[j].1 && life[j].0 <= life[i].1;
                let overlap_b = off[i] < off[j] + life[j].2 && off[j] < off[i] + life[i].2;
                assert!(!(overlap_t && overlap_b), "{i} and {j} overlap");
            }
        }
        let sum: u64 = life.iter().map(|l| l.2.div_ceil(256) * 256).sum();
        assert!(total < sum / 2, "reuse saves memory: {total} of {sum}");
    }
}
