//! Models from safetensors files: the file is memory-mapped and parsed, its
//! tensors grouped into layers, and the bytes copied straight from the
//! mapping into the store.
//!
//! Layers, in order of precedence:
//! 1. an explicit list of layer names: each tensor joins the longest listed
//!    name that is the tensor's name or a dot-separated prefix of it; layers
//!    execute in the list's order;
//! 2. the file's own metadata key `pipeswitch.layers` (a JSON array of layer
//!    names), as this crate's [`write_file`] records it, read the same way;
//! 3. otherwise the tensor-name prefixes (the name up to its last '.'), in the
//!    order in which the file stores the tensors' data.
//!
//! Within a layer, tensors keep the file's data order.

use memmap2::Mmap;
use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use super::model::{Dtype, LayerSpec, Model, ModelSpec, TensorSpec};
use super::{Progress, Store};
use crate::error::{Error, Result};

/// Metadata key holding the layer order.
pub const LAYERS_KEY: &str = "pipeswitch.layers";

/// The store dtype of a safetensors dtype (None: not storable).
pub fn dtype_of(d: safetensors::Dtype) -> Option<Dtype> {
    use safetensors::Dtype as S;
    Some(match d {
        S::BOOL => Dtype::Bool,
        S::U8 => Dtype::U8,
        S::I8 => Dtype::I8,
        S::F8_E4M3 => Dtype::F8E4M3,
        S::F8_E5M2 => Dtype::F8E5M2,
        S::I16 => Dtype::I16,
        S::U16 => Dtype::U16,
        S::F16 => Dtype::F16,
        S::BF16 => Dtype::Bf16,
        S::I32 => Dtype::I32,
        S::U32 => Dtype::U32,
        S::F32 => Dtype::F32,
        S::I64 => Dtype::I64,
        S::U64 => Dtype::U64,
        S::F64 => Dtype::F64,
        _ => return None,
    })
}

/// The layer a tensor belongs to by default: its name up to the last '.'.
pub fn default_layer_of(tensor: &str) -> &str {
    tensor.rsplit_once('.').map_or(tensor, |(p, _)| p)
}

/// Parses a safetensors image (the whole file) into a model spec borrowing
/// its bytes. `origin` names the file in errors.
pub fn parse<'a>(bytes: &'a [u8], origin: &str, layers: Option<&[String]>) -> Result<ModelSpec<'a>> {
    let bad = |reason: String| Error::Safetensors { path: origin.to_string(), reason };
    let (n, meta) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| bad(format!("{e:?}")))?;
    let data = &bytes[8 + n..];
    let mut tensors: Vec<(String, &safetensors::tensor::TensorInfo)> =
        meta.tensors().into_iter().collect();
    if tensors.is_empty() {
        return Err(bad("the file holds no tensors".into()));
    }
    tensors.sort_by_key(|(name, info)| (info.data_offsets.0, info.data_offsets.1, name.clone()));

    let from_meta: Option<Vec<String>> = match meta.metadata().as_ref().and_then(|m| m.get(LAYERS_KEY)) {
        Some(s) => Some(serde_json::from_str(s).map_err(|e| bad(format!("metadata {LAYERS_KEY}: {e}")))?),
        None => None,
    };
    let explicit: Option<&[String]> = layers.or(from_meta.as_deref());

    // Layer index per tensor.
    let mut order: Vec<String> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    if let Some(list) = explicit {
        for (i, l) in list.iter().enumerate() {
            if index.insert(l.clone(), i).is_some() {
                return Err(Error::invalid(format!("layer {l:?} is listed twice")));
            }
            order.push(l.clone());
        }
    }
    let mut members: Vec<Vec<TensorSpec<'a>>> = vec![Vec::new(); order.len()];
    for (name, info) in &tensors {
        let layer = if explicit.is_some() {
            let mut cand: Option<usize> = None;
            let mut p: &str = name;
            loop {
                if let Some(&i) = index.get(p) {
                    cand = Some(i);
                    break;
                }
                match p.rsplit_once('.') {
                    Some((head, _)) => p = head,
                    None => break,
                }
            }
            cand.ok_or_else(|| {
                Error::invalid(format!("tensor {name:?} belongs to none of the listed layers"))
            })?
        } else {
            let p = default_layer_of(name);
            *index.entry(p.to_string()).or_insert_with(|| {
                order.push(p.to_string());
                members.push(Vec::new());
                order.len() - 1
            })
        };
        let dtype = dtype_of(info.dtype).ok_or_else(|| bad(format!("tensor {name:?}: unsupported dtype {:?}", info.dtype)))?;
        let (s, e) = info.data_offsets;
        let bytes = data.get(s..e).ok_or_else(|| bad(format!("tensor {name:?}: data out of range")))?;
        members[layer].push(TensorSpec {
            name: name.clone(),
            dtype,
            shape: info.shape.iter().map(|&d| d as u64).collect(),
            data: bytes,
        });
    }
    let mut spec = ModelSpec::default();
    // Every other metadata entry (the model graph, "format", ...) is kept
    // with the model as an attribute.
    if let Some(m) = meta.metadata() {
        let mut attrs: Vec<(String, String)> =
            m.iter().filter(|(k, _)| k.as_str() != LAYERS_KEY).map(|(k, v)| (k.clone(), v.clone())).collect();
        attrs.sort();
        spec.attributes = attrs;
    }
    for (name, tensors) in order.into_iter().zip(members) {
        if tensors.is_empty() {
            return Err(Error::invalid(format!("listed layer {name:?} matches no tensor")));
        }
        spec.layers.push(LayerSpec { name, tensors });
    }
    Ok(spec)
}

impl Store {
    /// Adds the model in a safetensors file (see the module docs for how
    /// layers are found). A corrupt or truncated file changes nothing.
    pub fn add_safetensors(
        &self,
        name: &str,
        path: &Path,
        layers: Option<&[String]>,
        progress: Progress<'_>,
    ) -> Result<Arc<Model>> {
        let file = File::open(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::NotFound(format!("no file {}", path.display())),
            _ => Error::io(format!("opening {}", path.display()), e),
        })?;
        // SAFETY: the file is only read; a concurrent truncation by another
        // process is the one hazard of mapping files, accepted as with any
        // mmap-based loader.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(format!("mapping {}", path.display()), e))?;
        let spec = parse(&map, &path.display().to_string(), layers)?;
        self.add_model(name, &spec, progress)
    }
}

/// The footprint ([`super::footprint`]) the model in a safetensors file
/// would have in a store, without adding it.
pub fn footprint_of_file(path: &Path, layers: Option<&[String]>) -> Result<u64> {
    let file = File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::NotFound(format!("no file {}", path.display())),
        _ => Error::io(format!("opening {}", path.display()), e),
    })?;
    // SAFETY: as in add_safetensors: the file is only read.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(format!("mapping {}", path.display()), e))?;
    super::footprint(&parse(&map, &path.display().to_string(), layers)?)
}

/// One tensor to write with [`write_file`].
pub struct WriteTensor<'a> {
    pub name: &'a str,
    pub dtype: Dtype,
    pub shape: &'a [u64],
    pub data: &'a [u8],
}

/// Writes a safetensors file with the tensors in the given order (which is
/// kept as the data order) and the layer list in its metadata, if given.
pub fn write_file(path: &Path, tensors: &[WriteTensor<'_>], layers: Option<&[String]>) -> Result<()> {
    write_file_with_metadata(path, tensors, layers, &[])
}

/// [`write_file`] with more `__metadata__` entries (key, string value).
pub fn write_file_with_metadata(
    path: &Path,
    tensors: &[WriteTensor<'_>],
    layers: Option<&[String]>,
    extra: &[(&str, String)],
) -> Result<()> {
    let mut header = serde_json::Map::new();
    let mut m = serde_json::Map::new();
    if let Some(l) = layers {
        m.insert(
            LAYERS_KEY.into(),
            serde_json::Value::String(serde_json::to_string(l).map_err(|e| Error::Internal(e.to_string()))?),
        );
    }
    for (k, v) in extra {
        m.insert((*k).to_string(), serde_json::Value::String(v.clone()));
    }
    if !m.is_empty() {
        header.insert("__metadata__".into(), serde_json::Value::Object(m));
    }
    let mut pos = 0u64;
    for t in tensors {
        // A repeated (or the reserved) key would silently drop an entry and
        // leave a file that no reader accepts.
        if t.name == "__metadata__" || header.contains_key(t.name) {
            return Err(Error::invalid(format!("tensor name {:?} is reserved or used twice", t.name)));
        }
        let need = super::model::tensor_bytes(t.dtype, t.shape)?;
        if need != t.data.len() as u64 {
            return Err(Error::invalid(format!("tensor {:?}: shape needs {need} bytes, data has {}", t.name, t.data.len())));
        }
        header.insert(
            t.name.to_string(),
            serde_json::json!({"dtype": t.dtype.name(), "shape": t.shape, "data_offsets": [pos, pos + need]}),
        );
        pos += need;
    }
    let mut text = serde_json::to_string(&header).map_err(|e| Error::Internal(e.to_string()))?;
    while (8 + text.len()) % 8 != 0 {
        text.push(' ');
    }
    let io = |e| Error::io(format!("writing {}", path.display()), e);
    let mut f = std::io::BufWriter::new(File::create(path).map_err(io)?);
    f.write_all(&(text.len() as u64).to_le_bytes()).map_err(io)?;
    f.write_all(text.as_bytes()).map_err(io)?;
    for t in tensors {
        f.write_all(t.data).map_err(io)?;
    }
    f.flush().map_err(io)?;
    Ok(())
}
