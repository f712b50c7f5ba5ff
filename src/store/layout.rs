//! The store segment's byte layout, version 2. Everything is little-endian
//! at fixed offsets and checked when read: a segment that fails a check is
//! reported as corrupt, never trusted.
//!
//! ```text
//! [0, 4096)                 header: magic, layout version, sizes, checksum
//! [4096, data_offset)       model table: table_capacity entries of 256 bytes
//! [data_offset, total)      data: per model one allocation = weights (tensors
//!                           256-aligned, in execution order) then metadata,
//!                           rounded up to ALLOC_ALIGN (the model's footprint)
//! ```
//!
//! Version 2 checksums whole table entries (state and writer included), has
//! a `Removing` state (hidden, space kept while leased), and bounds the table
//! to [`MAX_MODELS`] entries. A free entry is all zeros.

use super::model::{align_up, Dtype, LayerInfo, Model, ModelSpec, TensorInfo, MAX_DIMS, TENSOR_ALIGN};
use crate::error::{Error, Result};

pub const MAGIC: [u8; 8] = *b"PSSTORE\0";
pub const LAYOUT_VERSION: u32 = 2;
pub const HEADER_BYTES: u64 = 4096;
pub const ENTRY_BYTES: u64 = 256;
pub const MAX_NAME: usize = 160;
/// Model allocations start at multiples of this inside the data region.
pub const ALLOC_ALIGN: u64 = 4096;
/// Most models (table entries) a store may have: bounds what a segment's
/// header can make an opener read.
pub const MAX_MODELS: u32 = 1 << 16;
/// Most bytes of one model's metadata.
pub const MAX_META_BYTES: u64 = u32::MAX as u64;
/// Most bytes of weights a model may lay out: far beyond any store, and
/// far enough below 2^64 that its reservation's arithmetic cannot wrap.
const MAX_MODEL_BYTES: u64 = 1 << 62;

const META_MAGIC: [u8; 8] = *b"PSMODEL\0";
const META_HEADER: usize = 48;
const LAYER_RECORD: usize = 48;
const TENSOR_RECORD: usize = 24 + 8 * MAX_DIMS + 16;

/// FNV-1a, 64 bit: detects torn or overwritten records.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn rd_u32(b: &[u8], o: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[o..o + 4]);
    u32::from_le_bytes(a)
}
fn rd_u64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}
fn wr_u32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_le_bytes());
}
fn wr_u64(b: &mut [u8], o: usize, v: u64) {
    b[o..o + 8].copy_from_slice(&v.to_le_bytes());
}

/// The segment header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub total_bytes: u64,
    pub table_offset: u64,
    pub table_capacity: u32,
    pub data_offset: u64,
    pub data_bytes: u64,
    /// Bumped by every change to the table (add, remove, profile update).
    pub generation: u64,
    pub next_model_id: u64,
}

// Header field offsets.
const H_VERSION: usize = 8;
const H_HEADER_BYTES: usize = 12;
const H_TOTAL: usize = 16;
const H_TABLE_OFF: usize = 24;
const H_TABLE_CAP: usize = 32;
const H_ENTRY_BYTES: usize = 36;
const H_DATA_OFF: usize = 40;
const H_DATA_BYTES: usize = 48;
const H_CHECKSUM: usize = 56; // over [0, 56): the fields fixed at creation
pub const H_GENERATION: usize = 64;
pub const H_NEXT_ID: usize = 72;

impl Header {
    /// The layout of a new segment with room for `capacity_bytes` of model
    /// data and `max_models` models.
    pub fn plan(capacity_bytes: u64, max_models: u32) -> Result<Header> {
        if max_models == 0 || max_models > MAX_MODELS {
            return Err(Error::invalid(format!("a store has room for 1 to {MAX_MODELS} models, not {max_models}")));
        }
        if capacity_bytes < ALLOC_ALIGN {
            return Err(Error::invalid(format!(
                "store capacity {capacity_bytes} bytes is below the minimum of {ALLOC_ALIGN}"
            )));
        }
        let table_offset = HEADER_BYTES;
        let data_offset = align_up(table_offset + u64::from(max_models) * ENTRY_BYTES, ALLOC_ALIGN);
        let total_bytes = capacity_bytes
            .checked_next_multiple_of(ALLOC_ALIGN)
            .and_then(|data_bytes| data_offset.checked_add(data_bytes))
            .ok_or_else(|| Error::invalid("store capacity overflows"))?;
        let data_bytes = total_bytes - data_offset;
        Ok(Header {
            total_bytes,
            table_offset,
            table_capacity: max_models,
            data_offset,
            data_bytes,
            generation: 1,
            next_model_id: 1,
        })
    }

    pub fn encode(&self) -> [u8; 80] {
        let mut b = [0u8; 80];
        b[..8].copy_from_slice(&MAGIC);
        wr_u32(&mut b, H_VERSION, LAYOUT_VERSION);
        wr_u32(&mut b, H_HEADER_BYTES, HEADER_BYTES as u32);
        wr_u64(&mut b, H_TOTAL, self.total_bytes);
        wr_u64(&mut b, H_TABLE_OFF, self.table_offset);
        wr_u32(&mut b, H_TABLE_CAP, self.table_capacity);
        wr_u32(&mut b, H_ENTRY_BYTES, ENTRY_BYTES as u32);
        wr_u64(&mut b, H_DATA_OFF, self.data_offset);
        wr_u64(&mut b, H_DATA_BYTES, self.data_bytes);
        let sum = fnv1a(&b[..H_CHECKSUM]);
        wr_u64(&mut b, H_CHECKSUM, sum);
        wr_u64(&mut b, H_GENERATION, self.generation);
        wr_u64(&mut b, H_NEXT_ID, self.next_model_id);
        b
    }

    /// Checks and decodes a header; `file_bytes` is the segment's real size.
    pub fn decode(b: &[u8], file_bytes: u64) -> Result<Header> {
        if b.len() < 80 || file_bytes < HEADER_BYTES {
            return Err(Error::corrupt(format!(
                "segment of {file_bytes} bytes is too small to hold a store header"
            )));
        }
        if b[..8] != MAGIC {
            return Err(Error::corrupt("not a pipeswitch store (bad magic)"));
        }
        let version = rd_u32(b, H_VERSION);
        if version != LAYOUT_VERSION {
            return Err(Error::StoreVersion { found: version, supported: LAYOUT_VERSION });
        }
        if rd_u64(b, H_CHECKSUM) != fnv1a(&b[..H_CHECKSUM]) {
            return Err(Error::corrupt("header checksum mismatch"));
        }
        let h = Header {
            total_bytes: rd_u64(b, H_TOTAL),
            table_offset: rd_u64(b, H_TABLE_OFF),
            table_capacity: rd_u32(b, H_TABLE_CAP),
            data_offset: rd_u64(b, H_DATA_OFF),
            data_bytes: rd_u64(b, H_DATA_BYTES),
            generation: rd_u64(b, H_GENERATION),
            next_model_id: rd_u64(b, H_NEXT_ID),
        };
        if h.table_capacity > MAX_MODELS {
            return Err(Error::corrupt(format!(
                "header claims a table of {} entries, at most {MAX_MODELS} are allowed",
                h.table_capacity
            )));
        }
        let table_end = u64::from(h.table_capacity)
            .checked_mul(ENTRY_BYTES)
            .and_then(|t| t.checked_add(h.table_offset));
        let consistent = u64::from(rd_u32(b, H_HEADER_BYTES)) == HEADER_BYTES
            && u64::from(rd_u32(b, H_ENTRY_BYTES)) == ENTRY_BYTES
            && h.table_offset == HEADER_BYTES
            && h.table_capacity > 0
            && table_end.is_some_and(|e| e <= h.data_offset)
            && h.data_offset % ALLOC_ALIGN == 0
            && h.data_offset.checked_add(h.data_bytes) == Some(h.total_bytes);
        if !consistent {
            return Err(Error::corrupt("header sizes are inconsistent"));
        }
        if h.total_bytes != file_bytes {
            return Err(Error::corrupt(format!(
                "header says {} bytes but the segment has {file_bytes}",
                h.total_bytes
            )));
        }
        Ok(h)
    }
}

/// State of a table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryState {
    Free = 0,
    /// Space reserved, data being written by the process that holds the
    /// slot's writer lock (`writer_pid` is informational only).
    Writing = 1,
    Ready = 2,
    /// Removed: hidden from lookups, space kept until no lease is held.
    Removing = 3,
}

/// One model-table entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub state: EntryState,
    pub writer_pid: u32,
    pub id: u64,
    /// The model's allocation in the segment: weights then metadata.
    pub alloc_offset: u64,
    pub alloc_bytes: u64,
    pub data_bytes: u64,
    pub meta_offset: u64,
    pub meta_bytes: u64,
    pub meta_checksum: u64,
    pub n_layers: u32,
    pub n_tensors: u32,
    pub name: String,
}

const E_STATE: usize = 0;
const E_PID: usize = 4;
const E_ID: usize = 8;
const E_ALLOC_OFF: usize = 16;
const E_ALLOC_BYTES: usize = 24;
const E_DATA_BYTES: usize = 32;
const E_META_OFF: usize = 40;
const E_META_BYTES: usize = 48;
const E_META_SUM: usize = 56;
const E_LAYERS: usize = 64;
const E_TENSORS: usize = 68;
const E_NAME_LEN: usize = 72;
const E_NAME: usize = 80;
const E_CHECKSUM: usize = E_NAME + MAX_NAME; // over [0, E_CHECKSUM): the whole entry

impl Entry {
    pub fn encode(&self) -> [u8; ENTRY_BYTES as usize] {
        let mut b = [0u8; ENTRY_BYTES as usize];
        wr_u32(&mut b, E_STATE, self.state as u32);
        wr_u32(&mut b, E_PID, self.writer_pid);
        wr_u64(&mut b, E_ID, self.id);
        wr_u64(&mut b, E_ALLOC_OFF, self.alloc_offset);
        wr_u64(&mut b, E_ALLOC_BYTES, self.alloc_bytes);
        wr_u64(&mut b, E_DATA_BYTES, self.data_bytes);
        wr_u64(&mut b, E_META_OFF, self.meta_offset);
        wr_u64(&mut b, E_META_BYTES, self.meta_bytes);
        wr_u64(&mut b, E_META_SUM, self.meta_checksum);
        wr_u32(&mut b, E_LAYERS, self.n_layers);
        wr_u32(&mut b, E_TENSORS, self.n_tensors);
        let name = self.name.as_bytes();
        let n = name.len().min(MAX_NAME);
        wr_u32(&mut b, E_NAME_LEN, n as u32);
        b[E_NAME..E_NAME + n].copy_from_slice(&name[..n]);
        let sum = fnv1a(&b[..E_CHECKSUM]);
        wr_u64(&mut b, E_CHECKSUM, sum);
        b
    }

    /// Decodes an entry; `Ok(None)` for a free slot (all zeros). Checks the
    /// checksum (over every field) and that the allocation lies inside the
    /// data region.
    pub fn decode(b: &[u8], h: &Header) -> Result<Option<Entry>> {
        let b = b.get(..ENTRY_BYTES as usize).ok_or_else(|| Error::corrupt("table entry truncated"))?;
        if b.iter().all(|&x| x == 0) {
            return Ok(None);
        }
        if rd_u64(b, E_CHECKSUM) != fnv1a(&b[..E_CHECKSUM]) || b[E_CHECKSUM + 8..].iter().any(|&x| x != 0) {
            return Err(Error::corrupt("table entry checksum mismatch"));
        }
        let state = match rd_u32(b, E_STATE) {
            1 => EntryState::Writing,
            2 => EntryState::Ready,
            3 => EntryState::Removing,
            s => return Err(Error::corrupt(format!("table entry has unknown state {s}"))),
        };
        let name_len = rd_u32(b, E_NAME_LEN) as usize;
        if name_len == 0 || name_len > MAX_NAME {
            return Err(Error::corrupt("table entry has a bad name length"));
        }
        let name = std::str::from_utf8(&b[E_NAME..E_NAME + name_len])
            .map_err(|_| Error::corrupt("table entry name is not UTF-8"))?
            .to_string();
        let e = Entry {
            state,
            writer_pid: rd_u32(b, E_PID),
            id: rd_u64(b, E_ID),
            alloc_offset: rd_u64(b, E_ALLOC_OFF),
            alloc_bytes: rd_u64(b, E_ALLOC_BYTES),
            data_bytes: rd_u64(b, E_DATA_BYTES),
            meta_offset: rd_u64(b, E_META_OFF),
            meta_bytes: rd_u64(b, E_META_BYTES),
            meta_checksum: rd_u64(b, E_META_SUM),
            n_layers: rd_u32(b, E_LAYERS),
            n_tensors: rd_u32(b, E_TENSORS),
            name,
        };
        let alloc_end = e.alloc_offset.checked_add(e.alloc_bytes);
        let meta_end = e.meta_offset.checked_add(e.meta_bytes);
        let ok = e.alloc_offset >= h.data_offset
            && e.alloc_offset % ALLOC_ALIGN == 0
            && alloc_end.is_some_and(|end| end <= h.total_bytes)
            && e.data_bytes <= e.alloc_bytes
            && e.meta_bytes <= MAX_META_BYTES
            && (state == EntryState::Writing
                || (e.meta_offset >= e.alloc_offset + e.data_bytes
                    && meta_end.is_some_and(|m| Some(m) <= alloc_end)));
        if !ok {
            return Err(Error::corrupt(format!("table entry {:?} lies outside the data region", e.name)));
        }
        Ok(Some(e))
    }
}

/// Where a model's tensors and layers lie, computed before any byte is written.
#[derive(Debug, Clone)]
pub struct ModelLayout {
    pub n_layers: u32,
    pub n_tensors: u32,
    pub data_bytes: u64,
    /// Per tensor in order: offset relative to the model start.
    pub tensor_offsets: Vec<u64>,
    pub meta: Vec<u8>,
    /// Where the profile (exec_ms per layer, not checksummed) starts in `meta`.
    pub profile_offset: usize,
}

/// Validates a spec and lays it out: tensors in order, each 256-aligned;
/// layers tile the bytes; the metadata blob describing it all.
pub fn layout_model(spec: &ModelSpec<'_>) -> Result<ModelLayout> {
    layout_model_checked(spec, true)
}

/// [`layout_model`] for a spec whose tensors carry no data yet (they are
/// written in place after the space is reserved): only the shapes count.
pub fn layout_model_unfilled(spec: &ModelSpec<'_>) -> Result<ModelLayout> {
    layout_model_checked(spec, false)
}

fn layout_model_checked(spec: &ModelSpec<'_>, check_data: bool) -> Result<ModelLayout> {
    if spec.layers.is_empty() {
        return Err(Error::invalid("a model needs at least one layer"));
    }
    let n_tensors = spec.n_tensors();
    if n_tensors > u32::MAX as usize || spec.layers.len() > u32::MAX as usize {
        return Err(Error::invalid("too many tensors"));
    }
    let mut strings: Vec<u8> = Vec::new();
    let mut push_str = |s: &str| -> Result<(u32, u32)> {
        if s.is_empty() || s.len() > 4096 || s.contains('\0') {
            return Err(Error::invalid(format!("bad layer or tensor name {s:?}")));
        }
        let off = strings.len() as u32;
        strings.extend_from_slice(s.as_bytes());
        Ok((off, s.len() as u32))
    };
    let mut seen = std::collections::HashSet::new();
    let mut layer_recs = Vec::with_capacity(spec.layers.len());
    let mut tensor_recs = Vec::with_capacity(n_tensors);
    let mut tensor_offsets = Vec::with_capacity(n_tensors);
    let mut pos: u64 = 0;
    let mut first = 0u32;
    for layer in &spec.layers {
        if layer.tensors.is_empty() {
            return Err(Error::invalid(format!("layer {:?} has no tensors", layer.name)));
        }
        let layer_start = pos;
        let lname = push_str(&layer.name)?;
        for t in &layer.tensors {
            if !seen.insert(t.name.as_str()) {
                return Err(Error::invalid(format!("tensor name {:?} appears twice", t.name)));
            }
            let bytes = super::model::tensor_bytes(t.dtype, &t.shape)?;
            if check_data && bytes != t.data.len() as u64 {
                return Err(Error::invalid(format!(
                    "tensor {:?}: dtype {} and shape {:?} need {bytes} bytes, data has {}",
                    t.name,
                    t.dtype.name(),
                    t.shape,
                    t.data.len()
                )));
            }
            let tname = push_str(&t.name)?;
            tensor_offsets.push(pos);
            tensor_recs.push((tname, t.dtype, t.shape.clone(), pos, bytes));
            // Checked through the alignment: sizes near 2^64 (shapes
            // without data, layout_model_unfilled) must not wrap.
            pos = pos
                .checked_add(bytes)
                .and_then(|end| end.checked_next_multiple_of(TENSOR_ALIGN))
                .filter(|&end| end <= MAX_MODEL_BYTES)
                .ok_or_else(|| Error::invalid("model size overflows"))?;
        }
        layer_recs.push((lname, first, layer.tensors.len() as u32, layer_start));
        first += layer.tensors.len() as u32;
    }
    let data_bytes = pos.max(TENSOR_ALIGN);
    let attributes = encode_attributes(&spec.attributes)?;

    let layers_off = META_HEADER;
    let tensors_off = layers_off + LAYER_RECORD * layer_recs.len();
    let strings_off = tensors_off + TENSOR_RECORD * tensor_recs.len();
    let attrs_off = strings_off + strings.len();
    let profile_off = align_up((attrs_off + attributes.len()) as u64, 8) as usize;
    // The profile, then the cost area (zero: no cost model yet).
    let total = profile_off + 8 * layer_recs.len() + COST_AREA_BYTES;
    if total > u32::MAX as usize {
        return Err(Error::invalid("model metadata too large"));
    }
    let mut m = vec![0u8; total];
    m[..8].copy_from_slice(&META_MAGIC);
    wr_u32(&mut m, 8, layer_recs.len() as u32);
    wr_u32(&mut m, 12, tensor_recs.len() as u32);
    wr_u32(&mut m, 16, layers_off as u32);
    wr_u32(&mut m, 20, tensors_off as u32);
    wr_u32(&mut m, 24, strings_off as u32);
    wr_u32(&mut m, 28, strings.len() as u32);
    wr_u32(&mut m, 32, profile_off as u32);
    wr_u32(&mut m, 36, attributes.len() as u32);
    wr_u64(&mut m, 40, data_bytes);
    for (i, &((no, nl), first, n, off)) in layer_recs.iter().enumerate() {
        let next = layer_recs.get(i + 1).map_or(data_bytes, |l| l.3);
        let r = layers_off + i * LAYER_RECORD;
        wr_u32(&mut m, r, no);
        wr_u32(&mut m, r + 4, nl);
        wr_u32(&mut m, r + 8, first);
        wr_u32(&mut m, r + 12, n);
        wr_u64(&mut m, r + 16, off);
        wr_u64(&mut m, r + 24, next - off);
    }
    for (i, ((no, nl), dtype, shape, off, bytes)) in tensor_recs.iter().enumerate() {
        let r = tensors_off + i * TENSOR_RECORD;
        wr_u32(&mut m, r, *no);
        wr_u32(&mut m, r + 4, *nl);
        wr_u32(&mut m, r + 8, *dtype as u32);
        wr_u32(&mut m, r + 12, shape.len() as u32);
        for (d, &v) in shape.iter().enumerate() {
            wr_u64(&mut m, r + 16 + 8 * d, v);
        }
        wr_u64(&mut m, r + 16 + 8 * MAX_DIMS, *off);
        wr_u64(&mut m, r + 24 + 8 * MAX_DIMS, *bytes);
    }
    m[strings_off..strings_off + strings.len()].copy_from_slice(&strings);
    m[attrs_off..attrs_off + attributes.len()].copy_from_slice(&attributes);
    for i in 0..layer_recs.len() {
        wr_u64(&mut m, profile_off + 8 * i, f64::NAN.to_bits());
    }
    Ok(ModelLayout {
        n_layers: layer_recs.len() as u32,
        n_tensors: tensor_recs.len() as u32,
        data_bytes,
        tensor_offsets,
        meta: m,
        profile_offset: profile_off,
    })
}

/// Attributes as stored: a JSON array of `[key, value]` pairs, or nothing
/// when there are none (the layout of stores written before attributes).
fn encode_attributes(attrs: &[(String, String)]) -> Result<Vec<u8>> {
    let mut seen = std::collections::HashSet::new();
    for (k, _) in attrs {
        if k.is_empty() || k.len() > 256 || !seen.insert(k.as_str()) {
            return Err(Error::invalid(format!("bad or repeated attribute name {k:?}")));
        }
    }
    if attrs.is_empty() {
        return Ok(Vec::new());
    }
    let bytes = serde_json::to_vec(attrs).map_err(|e| Error::Internal(e.to_string()))?;
    if bytes.len() > super::model::MAX_ATTRIBUTE_BYTES {
        return Err(Error::invalid(format!(
            "model attributes take {} bytes, at most {} are allowed",
            bytes.len(),
            super::model::MAX_ATTRIBUTE_BYTES
        )));
    }
    Ok(bytes)
}

/// Checksum of a metadata blob: everything before the profile.
pub fn meta_checksum(meta: &[u8]) -> Result<u64> {
    if meta.len() < META_HEADER {
        return Err(Error::corrupt("model metadata truncated"));
    }
    let p = rd_u32(meta, 32) as usize;
    if p > meta.len() {
        return Err(Error::corrupt("model metadata profile offset out of range"));
    }
    Ok(fnv1a(&meta[..p]))
}

/// Size of the cost area after the profile (`crate::cost::StoredCost`, not
/// checksummed, written in place like the profile). Models added before it
/// existed have none: their metadata ends with the profile.
pub const COST_AREA_BYTES: usize = 128;
const _: () = assert!(crate::cost::StoredCost::BYTES <= COST_AREA_BYTES);

/// Offset of the cost area inside a checked metadata blob of a model of
/// `n_layers` layers, `None` when the blob has none.
pub fn cost_offset(meta: &[u8], n_layers: usize) -> Option<usize> {
    let off = profile_offset(meta).checked_add(8 * n_layers)?;
    (off.checked_add(COST_AREA_BYTES)? <= meta.len()).then_some(off)
}

/// Offset of the profile (exec_ms per layer) inside a checked metadata blob.
pub fn profile_offset(meta: &[u8]) -> usize {
    rd_u32(meta, 32) as usize
}

/// Decodes and checks a model's metadata blob.
pub fn decode_model(e: &Entry, meta: &[u8]) -> Result<Model> {
    let bad = |what: &str| Error::corrupt(format!("model {:?}: {what}", e.name));
    if meta.len() < META_HEADER || meta[..8] != META_MAGIC {
        return Err(bad("metadata has a bad magic"));
    }
    if meta_checksum(meta)? != e.meta_checksum {
        return Err(bad("metadata checksum mismatch"));
    }
    let n_layers = rd_u32(meta, 8) as usize;
    let n_tensors = rd_u32(meta, 12) as usize;
    let layers_off = rd_u32(meta, 16) as usize;
    let tensors_off = rd_u32(meta, 20) as usize;
    let strings_off = rd_u32(meta, 24) as usize;
    let strings_len = rd_u32(meta, 28) as usize;
    let profile_off = rd_u32(meta, 32) as usize;
    let attrs_len = rd_u32(meta, 36) as usize;
    let data_bytes = rd_u64(meta, 40);
    let fits = n_layers == e.n_layers as usize
        && n_tensors == e.n_tensors as usize
        && data_bytes == e.data_bytes
        && layers_off.checked_add(n_layers * LAYER_RECORD) == Some(tensors_off)
        && tensors_off.checked_add(n_tensors * TENSOR_RECORD) == Some(strings_off)
        && strings_off + strings_len + attrs_len <= profile_off
        && profile_off.checked_add(8 * n_layers).is_some_and(|end| end <= meta.len());
    if !fits || n_layers == 0 {
        return Err(bad("metadata sizes are inconsistent"));
    }
    let strings = &meta[strings_off..strings_off + strings_len];
    let get_str = |o: usize| -> Result<String> {
        let (so, sl) = (rd_u32(meta, o) as usize, rd_u32(meta, o + 4) as usize);
        let s = strings.get(so..so.saturating_add(sl)).ok_or_else(|| bad("name out of range"))?;
        Ok(std::str::from_utf8(s).map_err(|_| bad("name is not UTF-8"))?.to_string())
    };
    let mut tensors = Vec::with_capacity(n_tensors);
    for i in 0..n_tensors {
        let r = tensors_off + i * TENSOR_RECORD;
        let dtype = Dtype::from_u32(rd_u32(meta, r + 8)).ok_or_else(|| bad("unknown dtype"))?;
        let ndim = rd_u32(meta, r + 12) as usize;
        if ndim > MAX_DIMS {
            return Err(bad("tensor has too many dimensions"));
        }
        let shape: Vec<u64> = (0..ndim).map(|d| rd_u64(meta, r + 16 + 8 * d)).collect();
        let offset = rd_u64(meta, r + 16 + 8 * MAX_DIMS);
        let bytes = rd_u64(meta, r + 24 + 8 * MAX_DIMS);
        let expect = super::model::tensor_bytes(dtype, &shape).map_err(|_| bad("tensor shape overflows"))?;
        if expect != bytes || offset % TENSOR_ALIGN != 0 || offset.checked_add(bytes).is_none_or(|end| end > data_bytes) {
            return Err(bad("tensor lies outside the model"));
        }
        tensors.push(TensorInfo { name: get_str(r)?, dtype, shape, offset, bytes });
    }
    let mut layers = Vec::with_capacity(n_layers);
    let mut expect_first = 0usize;
    let mut expect_off = 0u64;
    for i in 0..n_layers {
        let r = layers_off + i * LAYER_RECORD;
        let first_tensor = rd_u32(meta, r + 8) as usize;
        let n = rd_u32(meta, r + 12) as usize;
        let offset = rd_u64(meta, r + 16);
        let bytes = rd_u64(meta, r + 24);
        if first_tensor != expect_first || n == 0 || first_tensor + n > n_tensors || offset != expect_off {
            return Err(bad("layers do not tile the tensors"));
        }
        let last = &tensors[first_tensor + n - 1];
        let end = offset.checked_add(bytes).ok_or_else(|| bad("layer size overflows"))?;
        if tensors[first_tensor].offset != offset || last.offset + last.bytes > end || end > data_bytes {
            return Err(bad("layer bytes do not cover its tensors"));
        }
        let exec_ms = f64::from_bits(rd_u64(meta, profile_off + 8 * i));
        layers.push(LayerInfo { name: get_str(r)?, first_tensor, n_tensors: n, offset, bytes, exec_ms });
        expect_first += n;
        expect_off = end;
    }
    if expect_first != n_tensors || expect_off != data_bytes {
        return Err(bad("layers do not cover the model"));
    }
    let attrs_off = strings_off + strings_len;
    let attributes: Vec<(String, String)> = if attrs_len == 0 {
        Vec::new()
    } else {
        serde_json::from_slice(&meta[attrs_off..attrs_off + attrs_len]).map_err(|_| bad("attributes are not valid"))?
    };
    Ok(Model {
        name: e.name.clone(),
        id: e.id,
        segment_offset: e.alloc_offset,
        bytes: data_bytes,
        layers,
        tensors,
        attributes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(state: EntryState) -> Entry {
        Entry {
            state,
            writer_pid: 42,
            id: 7,
            alloc_offset: 8192,
            alloc_bytes: 8192,
            data_bytes: 4096,
            meta_offset: 8192 + 4096,
            meta_bytes: 100,
            meta_checksum: 5,
            n_layers: 1,
            n_tensors: 1,
            name: "m".into(),
        }
    }

    #[test]
    fn the_entry_checksum_covers_every_field() {
        let h = Header::plan(1 << 20, 4).unwrap();
        for state in [EntryState::Writing, EntryState::Ready, EntryState::Removing] {
            let e = entry(state);
            let b = e.encode();
            assert_eq!(Entry::decode(&b, &h).unwrap(), Some(e));
            for i in 0..ENTRY_BYTES as usize {
                let mut bad = b;
                bad[i] ^= 0x01;
                assert!(Entry::decode(&bad, &h).is_err(), "state {state:?}: flipping byte {i} went unnoticed");
            }
        }
        // Free is all zeros; a zero state with anything else set is damage.
        assert_eq!(Entry::decode(&[0u8; ENTRY_BYTES as usize], &h).unwrap(), None);
        let mut b = entry(EntryState::Ready).encode();
        b[E_STATE] = 0;
        assert!(Entry::decode(&b, &h).is_err());
    }

    #[test]
    fn the_table_is_bounded() {
        assert!(Header::plan(1 << 20, MAX_MODELS).is_ok());
        assert!(Header::plan(1 << 20, MAX_MODELS + 1).is_err());
        assert!(Header::plan(1 << 20, 0).is_err());
        let mut h = Header::plan(1 << 20, 4).unwrap();
        h.table_capacity = MAX_MODELS + 1;
        h.data_offset = align_up(HEADER_BYTES + u64::from(h.table_capacity) * ENTRY_BYTES, ALLOC_ALIGN);
        h.total_bytes = h.data_offset + h.data_bytes;
        let e = Header::decode(&h.encode(), h.total_bytes).unwrap_err();
        assert!(e.to_string().contains("entries"), "{e}");
    }
}
