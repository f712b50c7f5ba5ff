//! What a model is to the store: dtypes, the description of a model to add
//! ([`ModelSpec`]), and the stored description read back ([`Model`]).

use crate::error::{Error, Result};

/// Element types, numbered as in the C header (`PS_DTYPE_*`). Never renumbered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Dtype {
    Bool = 0,
    U8 = 1,
    I8 = 2,
    F8E4M3 = 3,
    F8E5M2 = 4,
    I16 = 5,
    U16 = 6,
    F16 = 7,
    Bf16 = 8,
    I32 = 9,
    U32 = 10,
    F32 = 11,
    I64 = 12,
    U64 = 13,
    F64 = 14,
}

impl Dtype {
    pub const ALL: [Dtype; 15] = [
        Dtype::Bool,
        Dtype::U8,
        Dtype::I8,
        Dtype::F8E4M3,
        Dtype::F8E5M2,
        Dtype::I16,
        Dtype::U16,
        Dtype::F16,
        Dtype::Bf16,
        Dtype::I32,
        Dtype::U32,
        Dtype::F32,
        Dtype::I64,
        Dtype::U64,
        Dtype::F64,
    ];

    pub fn from_u32(v: u32) -> Option<Dtype> {
        Self::ALL.get(v as usize).copied()
    }

    pub fn size(self) -> u64 {
        match self {
            Dtype::Bool | Dtype::U8 | Dtype::I8 | Dtype::F8E4M3 | Dtype::F8E5M2 => 1,
            Dtype::I16 | Dtype::U16 | Dtype::F16 | Dtype::Bf16 => 2,
            Dtype::I32 | Dtype::U32 | Dtype::F32 => 4,
            Dtype::I64 | Dtype::U64 | Dtype::F64 => 8,
        }
    }

    /// The safetensors spelling ("F32", "BF16", ...).
    pub fn name(self) -> &'static str {
        match self {
            Dtype::Bool => "BOOL",
            Dtype::U8 => "U8",
            Dtype::I8 => "I8",
            Dtype::F8E4M3 => "F8_E4M3",
            Dtype::F8E5M2 => "F8_E5M2",
            Dtype::I16 => "I16",
            Dtype::U16 => "U16",
            Dtype::F16 => "F16",
            Dtype::Bf16 => "BF16",
            Dtype::I32 => "I32",
            Dtype::U32 => "U32",
            Dtype::F32 => "F32",
            Dtype::I64 => "I64",
            Dtype::U64 => "U64",
            Dtype::F64 => "F64",
        }
    }

    pub fn from_name(s: &str) -> Option<Dtype> {
        Self::ALL.iter().copied().find(|d| d.name() == s)
    }
}

/// Most dimensions a stored tensor may have.
pub const MAX_DIMS: usize = 8;

/// Bytes a tensor of this dtype and shape holds, or an error on overflow.
pub fn tensor_bytes(dtype: Dtype, shape: &[u64]) -> Result<u64> {
    if shape.len() > MAX_DIMS {
        return Err(Error::invalid(format!(
            "a tensor has at most {MAX_DIMS} dimensions, got {}",
            shape.len()
        )));
    }
    shape
        .iter()
        .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::invalid(format!("tensor shape {shape:?} overflows")))
}

/// A tensor to add: its bytes are borrowed for the duration of the add.
#[derive(Debug, Clone)]
pub struct TensorSpec<'a> {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<u64>,
    pub data: &'a [u8],
}

/// A layer to add: a name and its tensors, in execution order.
#[derive(Debug, Clone)]
pub struct LayerSpec<'a> {
    pub name: String,
    pub tensors: Vec<TensorSpec<'a>>,
}

/// A model to add: its layers in execution order, and attributes: text
/// stored with the model and checksummed with its description (e.g. the
/// model's graph under [`GRAPH_ATTRIBUTE`]).
#[derive(Debug, Clone, Default)]
pub struct ModelSpec<'a> {
    pub layers: Vec<LayerSpec<'a>>,
    pub attributes: Vec<(String, String)>,
}

/// Attribute holding the model's graph (JSON), which the worker runs.
pub const GRAPH_ATTRIBUTE: &str = "pipeswitch.graph";

/// Most bytes of all attributes of one model together.
pub const MAX_ATTRIBUTE_BYTES: usize = 64 << 20;

impl ModelSpec<'_> {
    pub fn n_tensors(&self) -> usize {
        self.layers.iter().map(|l| l.tensors.len()).sum()
    }
}

/// A stored tensor. `offset` is relative to the model's first byte, in the
/// store and in the arena alike.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<u64>,
    pub offset: u64,
    pub bytes: u64,
}

/// A stored layer: tensors `[first_tensor, first_tensor + n_tensors)`, bytes
/// `[offset, offset + bytes)` of the model. Layers tile the model's bytes, so
/// consecutive layers are one contiguous range.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerInfo {
    pub name: String,
    pub first_tensor: usize,
    pub n_tensors: usize,
    pub offset: u64,
    pub bytes: u64,
    /// Measured execution time, NaN until measured.
    pub exec_ms: f64,
}

/// A stored model, as read back from the store.
#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    pub name: String,
    /// Unique for the store's lifetime: a removed and re-added model gets a new id.
    pub id: u64,
    /// Byte offset of the model's data inside the store segment.
    pub segment_offset: u64,
    /// Total bytes, a multiple of [`TENSOR_ALIGN`].
    pub bytes: u64,
    pub layers: Vec<LayerInfo>,
    pub tensors: Vec<TensorInfo>,
    /// Attributes given when the model was added, in their order.
    pub attributes: Vec<(String, String)>,
}

/// Alignment of every tensor inside a model (and of a model in the arena).
pub const TENSOR_ALIGN: u64 = 256;

impl Model {
    /// Byte range `[start, end)` of layers `[first, end_layer)`.
    pub fn layer_range(&self, first: usize, end_layer: usize) -> Option<(u64, u64)> {
        if first >= end_layer || end_layer > self.layers.len() {
            return None;
        }
        let start = self.layers[first].offset;
        let last = &self.layers[end_layer - 1];
        Some((start, last.offset + last.bytes))
    }

    pub fn tensor(&self, name: &str) -> Option<(usize, &TensorInfo)> {
        self.tensors.iter().enumerate().find(|(_, t)| t.name == name)
    }

    pub fn layer_index(&self, name: &str) -> Option<usize> {
        self.layers.iter().position(|l| l.name == name)
    }

    /// The value of attribute `key`, if the model has it.
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

pub(crate) fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}
