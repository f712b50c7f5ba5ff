//! `ps_store_*`: the host model store.

use std::ffi::{c_char, c_void};
use std::path::Path;
use std::sync::Arc;

use super::{boundary, handles, out, ps_status, slice_arg, slice_mut_arg, str_arg, write_str};
use crate::cuda::Device;
use crate::error::{Error, Result};
use crate::store::{model::MAX_DIMS, Dtype, LayerSpec, ModelSpec, Store, TensorSpec};

/// An open host model store (shared memory). Thread-safe.
pub struct ps_store {
    pub(crate) inner: Arc<Store>,
}

/// A tensor to add with `ps_store_add_model`. `data` holds `bytes` bytes,
/// which must equal the element size of `dtype` times the product of `shape`.
#[repr(C)]
pub struct ps_tensor_desc {
    pub name: *const c_char,
    /// One of `PS_DTYPE_*`.
    pub dtype: u32,
    pub ndim: u32,
    pub shape: *const u64,
    pub data: *const c_void,
    pub bytes: u64,
}

/// A layer to add with `ps_store_add_model`: it takes the next `n_tensors`
/// tensors of the tensor array, in order.
#[repr(C)]
pub struct ps_layer_desc {
    pub name: *const c_char,
    pub n_tensors: usize,
}

/// A stored model.
#[repr(C)]
pub struct ps_model_info {
    /// Unique for the store's lifetime.
    pub id: u64,
    /// Total bytes (what an arena region for it must hold).
    pub bytes: u64,
    pub n_layers: usize,
    pub n_tensors: usize,
}

/// A stored layer. Bytes `[offset, offset + bytes)` of the model.
#[repr(C)]
pub struct ps_layer_info {
    pub first_tensor: usize,
    pub n_tensors: usize,
    pub offset: u64,
    pub bytes: u64,
    /// Measured execution time in ms, NaN until measured.
    pub exec_ms: f64,
}

/// A stored tensor. Its device address after a switch is the region's base
/// plus `offset`.
#[repr(C)]
pub struct ps_tensor_info {
    pub dtype: u32,
    pub ndim: u32,
    pub shape: [u64; 8],
    pub offset: u64,
    pub bytes: u64,
    pub layer: usize,
}

/// How full a store is. Bytes count footprints (`ps_store_model_footprint`:
/// weights, metadata, page rounding), not weights alone.
#[repr(C)]
pub struct ps_store_usage {
    pub capacity_bytes: u64,
    /// Footprints of all models, removed ones still in use included.
    pub used_bytes: u64,
    /// The largest footprint an add can place now.
    pub largest_free_bytes: u64,
    /// Models that lookups see.
    pub models: u32,
    pub max_models: u32,
}

pub const PS_DTYPE_BOOL: u32 = 0;
pub const PS_DTYPE_U8: u32 = 1;
pub const PS_DTYPE_I8: u32 = 2;
pub const PS_DTYPE_F8_E4M3: u32 = 3;
pub const PS_DTYPE_F8_E5M2: u32 = 4;
pub const PS_DTYPE_I16: u32 = 5;
pub const PS_DTYPE_U16: u32 = 6;
pub const PS_DTYPE_F16: u32 = 7;
pub const PS_DTYPE_BF16: u32 = 8;
pub const PS_DTYPE_I32: u32 = 9;
pub const PS_DTYPE_U32: u32 = 10;
pub const PS_DTYPE_F32: u32 = 11;
pub const PS_DTYPE_I64: u32 = 12;
pub const PS_DTYPE_U64: u32 = 13;
pub const PS_DTYPE_F64: u32 = 14;
/// Most dimensions of a stored tensor.
pub const PS_MAX_DIMS: u32 = 8;

const _: () = assert!(MAX_DIMS == PS_MAX_DIMS as usize);

/// The store of a live handle, held for one call (a free meanwhile waits for it).
pub(crate) fn store_ref(p: *const ps_store) -> Result<Arc<Store>> {
    Ok(handles::get(p, "store")?.inner.clone())
}

/// Creates the store `name` (a file /dev/shm/pipeswitch-<name>, mode 0600)
/// with room for `capacity_bytes` of model data and `max_models` models
/// (0: 256; at most 65536). Its space is reserved now: a full /dev/shm gives
/// `PS_ERR_STORE_FULL` here. Each model takes its footprint
/// (`ps_store_model_footprint`) of the capacity, more than its weights:
/// size stores with `ps_store_capacity_for`.
#[no_mangle]
pub extern "C" fn ps_store_create(
    name: *const c_char,
    capacity_bytes: u64,
    max_models: u32,
    store_out: *mut *mut ps_store,
) -> ps_status {
    boundary("ps_store_create", || {
        let name = str_arg(name, "name")?;
        let o = out(store_out, "store_out")?;
        let max = if max_models == 0 { crate::store::DEFAULT_MAX_MODELS } else { max_models };
        let s = Store::create(name, capacity_bytes, max)?;
        o.write(handles::register(ps_store { inner: Arc::new(s) }));
        Ok(())
    })
}

/// Opens an existing store by name (from any process of the user that
/// created it: a segment owned by another user, writable by group or
/// others, or a symbolic link is refused with `PS_ERR_OS`). A handle belongs
/// to the process that opened it: after fork(), the child must open the
/// store again; the inherited handle answers `PS_ERR_INVALID_STATE`.
#[no_mangle]
pub extern "C" fn ps_store_open(name: *const c_char, store_out: *mut *mut ps_store) -> ps_status {
    boundary("ps_store_open", || {
        let name = str_arg(name, "name")?;
        let o = out(store_out, "store_out")?;
        let s = Store::open(name)?;
        o.write(handles::register(ps_store { inner: Arc::new(s) }));
        Ok(())
    })
}

/// Closes this process's handle. NULL does nothing. A switch in flight keeps
/// the store mapped until its copies finish.
#[no_mangle]
pub extern "C" fn ps_store_free(store: *mut ps_store) -> ps_status {
    boundary("ps_store_free", || handles::free(store, "store"))
}

/// Removes the store's name from the system; processes that have it open
/// keep using it until they free their handles.
#[no_mangle]
pub extern "C" fn ps_store_unlink(name: *const c_char) -> ps_status {
    boundary("ps_store_unlink", || Store::destroy(str_arg(name, "name")?))
}

/// Adds a model from host buffers. `layers` take consecutive runs of
/// `tensors`, in execution order; every byte is copied into the store during
/// the call. On failure the store is unchanged.
#[no_mangle]
pub extern "C" fn ps_store_add_model(
    store: *const ps_store,
    model: *const c_char,
    layers: *const ps_layer_desc,
    n_layers: usize,
    tensors: *const ps_tensor_desc,
    n_tensors: usize,
) -> ps_status {
    boundary("ps_store_add_model", || {
        let s = store_ref(store)?;
        let name = str_arg(model, "model")?;
        let layers = slice_arg(layers, n_layers, "layers")?;
        let tensors = slice_arg(tensors, n_tensors, "tensors")?;
        let claimed: usize = layers.iter().try_fold(0usize, |acc, l| acc.checked_add(l.n_tensors)).unwrap_or(usize::MAX);
        if claimed != tensors.len() {
            return Err(Error::invalid(format!(
                "the layers take {claimed} tensors but {} were given",
                tensors.len()
            )));
        }
        let mut spec = ModelSpec::default();
        let mut it = tensors.iter();
        for l in layers {
            let lname = str_arg(l.name, "layer name")?.to_string();
            let mut ts = Vec::with_capacity(l.n_tensors);
            for t in it.by_ref().take(l.n_tensors) {
                let tname = str_arg(t.name, "tensor name")?;
                let dtype = Dtype::from_u32(t.dtype)
                    .ok_or_else(|| Error::invalid(format!("tensor {tname:?}: unknown dtype {}", t.dtype)))?;
                if t.ndim as usize > MAX_DIMS {
                    return Err(Error::invalid(format!("tensor {tname:?}: {} dimensions, at most {MAX_DIMS}", t.ndim)));
                }
                let shape = slice_arg(t.shape, t.ndim as usize, "tensor shape")?.to_vec();
                let bytes = usize::try_from(t.bytes).map_err(|_| Error::invalid("tensor too large"))?;
                let data = slice_arg(t.data.cast::<u8>(), bytes, "tensor data")?;
                ts.push(TensorSpec { name: tname.to_string(), dtype, shape, data });
            }
            spec.layers.push(LayerSpec { name: lname, tensors: ts });
        }
        s.add_model(name, &spec, &mut |_, _| {})?;
        Ok(())
    })
}

/// Adds the model in a safetensors file. Layers: `layer_names` (NULL, 0 for
/// none) lists them in execution order, each tensor joining the longest
/// listed dot-separated prefix of its name; without a list, the file's
/// `pipeswitch.layers` metadata, else the tensor-name prefixes in data order.
#[no_mangle]
pub extern "C" fn ps_store_add_safetensors(
    store: *const ps_store,
    model: *const c_char,
    path: *const c_char,
    layer_names: *const *const c_char,
    n_layer_names: usize,
) -> ps_status {
    boundary("ps_store_add_safetensors", || {
        let s = store_ref(store)?;
        let name = str_arg(model, "model")?;
        let path = str_arg(path, "path")?;
        let list = slice_arg(layer_names, n_layer_names, "layer_names")?
            .iter()
            .map(|&p| str_arg(p, "layer name").map(str::to_string))
            .collect::<Result<Vec<_>>>()?;
        let layers = (!list.is_empty()).then_some(list.as_slice());
        s.add_safetensors(name, Path::new(path), layers, &mut |_, _| {})?;
        Ok(())
    })
}

/// Removes a model: it disappears from every lookup at once. Its space is
/// reused by later adds once no process still reads it, switches it or has
/// a program bound to it (a process that dies lets go of it).
#[no_mangle]
pub extern "C" fn ps_store_remove_model(store: *const ps_store, model: *const c_char) -> ps_status {
    boundary("ps_store_remove_model", || store_ref(store)?.remove_model(str_arg(model, "model")?))
}

/// Number of models in the store.
#[no_mangle]
pub extern "C" fn ps_store_model_count(store: *const ps_store, count_out: *mut usize) -> ps_status {
    boundary("ps_store_model_count", || {
        let s = store_ref(store)?;
        let o = out(count_out, "count_out")?;
        o.write(s.models()?.len());
        Ok(())
    })
}

/// Name of the `index`-th model (table order) into `buf` (NUL-terminated).
/// `len_out` (may be NULL) receives the name's length, also when `buf` is
/// too small (`PS_ERR_BUFFER_TOO_SMALL`).
#[no_mangle]
pub extern "C" fn ps_store_model_name(
    store: *const ps_store,
    index: usize,
    buf: *mut c_char,
    capacity: usize,
    len_out: *mut usize,
) -> ps_status {
    boundary("ps_store_model_name", || {
        let models = store_ref(store)?.models()?;
        let m = models.get(index).ok_or_else(|| {
            Error::NotFound(format!("model index {index}: the store has {} models", models.len()))
        })?;
        write_str(&m.name, buf, capacity, len_out)
    })
}

/// A model's size and shape.
#[no_mangle]
pub extern "C" fn ps_store_model_info(
    store: *const ps_store,
    model: *const c_char,
    info_out: *mut ps_model_info,
) -> ps_status {
    boundary("ps_store_model_info", || {
        let m = store_ref(store)?.model(str_arg(model, "model")?)?;
        out(info_out, "info_out")?.write(ps_model_info {
            id: m.id,
            bytes: m.bytes,
            n_layers: m.layers.len(),
            n_tensors: m.tensors.len(),
        });
        Ok(())
    })
}

/// One layer of a model; its name goes to `name_buf` (NULL, 0 to skip it).
#[no_mangle]
pub extern "C" fn ps_store_layer_info(
    store: *const ps_store,
    model: *const c_char,
    layer: usize,
    info_out: *mut ps_layer_info,
    name_buf: *mut c_char,
    name_capacity: usize,
) -> ps_status {
    boundary("ps_store_layer_info", || {
        let m = store_ref(store)?.model(str_arg(model, "model")?)?;
        let l = m.layers.get(layer).ok_or_else(|| {
            Error::NotFound(format!("layer {layer}: model {:?} has {} layers", m.name, m.layers.len()))
        })?;
        let o = out(info_out, "info_out")?;
        if !name_buf.is_null() || name_capacity > 0 {
            write_str(&l.name, name_buf, name_capacity, std::ptr::null_mut())?;
        }
        o.write(ps_layer_info {
            first_tensor: l.first_tensor,
            n_tensors: l.n_tensors,
            offset: l.offset,
            bytes: l.bytes,
            exec_ms: l.exec_ms,
        });
        Ok(())
    })
}

/// One tensor of a model (index in model order); its name goes to
/// `name_buf` (NULL, 0 to skip it).
#[no_mangle]
pub extern "C" fn ps_store_tensor_info(
    store: *const ps_store,
    model: *const c_char,
    tensor: usize,
    info_out: *mut ps_tensor_info,
    name_buf: *mut c_char,
    name_capacity: usize,
) -> ps_status {
    boundary("ps_store_tensor_info", || {
        let m = store_ref(store)?.model(str_arg(model, "model")?)?;
        let t = m.tensors.get(tensor).ok_or_else(|| {
            Error::NotFound(format!("tensor {tensor}: model {:?} has {} tensors", m.name, m.tensors.len()))
        })?;
        let layer = m
            .layers
            .iter()
            .position(|l| tensor < l.first_tensor + l.n_tensors)
            .ok_or_else(|| Error::Internal("tensor outside every layer".into()))?;
        let o = out(info_out, "info_out")?;
        if !name_buf.is_null() || name_capacity > 0 {
            write_str(&t.name, name_buf, name_capacity, std::ptr::null_mut())?;
        }
        let mut shape = [0u64; 8];
        shape[..t.shape.len()].copy_from_slice(&t.shape);
        o.write(ps_tensor_info {
            dtype: t.dtype as u32,
            ndim: t.shape.len() as u32,
            shape,
            offset: t.offset,
            bytes: t.bytes,
            layer,
        });
        Ok(())
    })
}

/// Index of the tensor called `tensor_name` in model order.
#[no_mangle]
pub extern "C" fn ps_store_tensor_index(
    store: *const ps_store,
    model: *const c_char,
    tensor_name: *const c_char,
    index_out: *mut usize,
) -> ps_status {
    boundary("ps_store_tensor_index", || {
        let m = store_ref(store)?.model(str_arg(model, "model")?)?;
        let tname = str_arg(tensor_name, "tensor_name")?;
        let o = out(index_out, "index_out")?;
        let (i, _) = m
            .tensor(tname)
            .ok_or_else(|| Error::NotFound(format!("no tensor {tname:?} in model {:?}", m.name)))?;
        o.write(i);
        Ok(())
    })
}

/// Stores measured per-layer execution times (ms; `n_layers` values) with
/// the model, for `ps_plan_model`.
#[no_mangle]
pub extern "C" fn ps_store_set_layer_exec_ms(
    store: *const ps_store,
    model: *const c_char,
    exec_ms: *const f64,
    n_layers: usize,
) -> ps_status {
    boundary("ps_store_set_layer_exec_ms", || {
        let s = store_ref(store)?;
        let name = str_arg(model, "model")?;
        if n_layers == 0 {
            return Err(Error::invalid("n_layers is 0"));
        }
        s.set_layer_exec_ms(name, slice_arg(exec_ms, n_layers, "exec_ms")?)
    })
}

/// How full the store is.
#[no_mangle]
pub extern "C" fn ps_store_get_usage(store: *const ps_store, usage_out: *mut ps_store_usage) -> ps_status {
    boundary("ps_store_get_usage", || {
        let u = store_ref(store)?.usage()?;
        out(usage_out, "usage_out")?.write(ps_store_usage {
            capacity_bytes: u.capacity_bytes,
            used_bytes: u.used_bytes,
            largest_free_bytes: u.largest_free_bytes,
            models: u.models,
            max_models: u.max_models,
        });
        Ok(())
    })
}

/// Page-locks the store for this process (once; later calls return at
/// once). Switches do it themselves; call it ahead to keep its cost (about
/// 40 ms per GiB) out of the first switch.
#[no_mangle]
pub extern "C" fn ps_store_pin(store: *const ps_store, device: i32) -> ps_status {
    boundary("ps_store_pin", || {
        let s = store_ref(store)?;
        s.pin(Device::get(device)?)
    })
}

/// Copies `bytes` of a stored model's data, from byte `offset` of the model,
/// into `dst` (host memory). For checks, and for CPU-side use of weights.
/// The model is leased during the copy: the bytes are the named model's,
/// even while another thread or process removes it and adds others.
#[no_mangle]
pub extern "C" fn ps_store_read(
    store: *const ps_store,
    model: *const c_char,
    offset: u64,
    dst: *mut c_void,
    bytes: usize,
) -> ps_status {
    boundary("ps_store_read", || {
        let s = store_ref(store)?;
        let m = s.lease(str_arg(model, "model")?)?;
        if offset.checked_add(bytes as u64).is_none_or(|end| end > m.bytes) {
            return Err(Error::invalid(format!(
                "[{offset}, +{bytes}) lies outside model {:?} of {} bytes",
                m.name, m.bytes
            )));
        }
        if bytes == 0 {
            return Ok(());
        }
        if dst.is_null() {
            return Err(Error::NullArgument("dst"));
        }
        s.read_leased(&m, offset, dst.cast::<u8>(), bytes)
    })
}

/// Checks every entry of the store's model table. `PS_ERR_CORRUPT_STORE`
/// if any is damaged; the message names the slots. The space of a damaged
/// entry stays reserved, and adds are refused while any exists (listing and
/// usage report the same status; intact models can still be read by name).
#[no_mangle]
pub extern "C" fn ps_store_check(store: *const ps_store) -> ps_status {
    boundary("ps_store_check", || store_ref(store)?.check())
}

/// Bytes the stored model occupies in the store's capacity (its footprint):
/// its weights (`ps_model_info.bytes`) plus its metadata (names, shapes,
/// attributes, profile), rounded up to 4096. To size a store that holds it,
/// pass footprints to `ps_store_capacity_for`.
#[no_mangle]
pub extern "C" fn ps_store_model_footprint(store: *const ps_store, model: *const c_char, bytes_out: *mut u64) -> ps_status {
    boundary("ps_store_model_footprint", || {
        let f = store_ref(store)?.model_footprint(str_arg(model, "model")?)?;
        out(bytes_out, "bytes_out")?.write(f);
        Ok(())
    })
}

/// The footprint the model in a safetensors file would have in a store
/// (layers as for `ps_store_add_safetensors`), without adding it.
#[no_mangle]
pub extern "C" fn ps_store_safetensors_footprint(
    path: *const c_char,
    layer_names: *const *const c_char,
    n_layer_names: usize,
    bytes_out: *mut u64,
) -> ps_status {
    boundary("ps_store_safetensors_footprint", || {
        let path = str_arg(path, "path")?;
        let list = slice_arg(layer_names, n_layer_names, "layer_names")?
            .iter()
            .map(|&p| str_arg(p, "layer name").map(str::to_string))
            .collect::<Result<Vec<_>>>()?;
        let layers = (!list.is_empty()).then_some(list.as_slice());
        let f = crate::store::safetensors::footprint_of_file(Path::new(path), layers)?;
        out(bytes_out, "bytes_out")?.write(f);
        Ok(())
    })
}

/// The `capacity_bytes` for `ps_store_create` with which a new store holds
/// models of these footprints (`ps_store_model_footprint`,
/// `ps_store_safetensors_footprint`) all at once. A store's capacity counts
/// footprints, not weights: a store created with a model's
/// `ps_model_info.bytes` as its capacity cannot hold it. After removes,
/// free space may be split: `ps_store_usage.largest_free_bytes` tells what
/// fits.
#[no_mangle]
pub extern "C" fn ps_store_capacity_for(footprints: *const u64, n: usize, capacity_out: *mut u64) -> ps_status {
    boundary("ps_store_capacity_for", || {
        let c = crate::store::capacity_for(slice_arg(footprints, n, "footprints")?)?;
        out(capacity_out, "capacity_out")?.write(c);
        Ok(())
    })
}

/// The bytes each layer group of a plan of `model` covers, as
/// `ps_switch_start` copies them: group g (layers `[group_starts[g],
/// group_starts[g+1])`, the last to the model's last layer) is bytes
/// `[starts_out[g], ends_out[g])` relative to the model's first byte; the
/// groups are contiguous and in order (`starts_out[0]` is 0). The plan is
/// checked as `ps_switch_start` checks it (first start 0, increasing, below
/// the model's layer count). `starts_out` and `ends_out` hold `n_groups`
/// values each and are written only on success. For callers that enqueue
/// the switch's copies themselves (e.g. inside a CUDA graph).
#[no_mangle]
pub extern "C" fn ps_store_group_ranges(
    store: *const ps_store,
    model: *const c_char,
    group_starts: *const usize,
    n_groups: usize,
    starts_out: *mut u64,
    ends_out: *mut u64,
) -> ps_status {
    boundary("ps_store_group_ranges", || {
        let m = store_ref(store)?.model(str_arg(model, "model")?)?;
        let starts = slice_arg(group_starts, n_groups, "group_starts")?;
        crate::switch::check_plan(starts, m.layers.len())?;
        let layer_ends = crate::switch::layer_ends(&m)?;
        let (group_ends, _) = crate::switch::group_layout(&layer_ends, starts);
        let so = slice_mut_arg(starts_out, n_groups, "starts_out")?;
        let eo = slice_mut_arg(ends_out, n_groups, "ends_out")?;
        let mut prev = 0u64;
        for (g, &end) in group_ends.iter().enumerate() {
            so[g] = prev;
            eo[g] = end;
            prev = end;
        }
        Ok(())
    })
}

/// The address of `model`'s first byte in this process's mapping of the
/// store (`ps_model_info.bytes` bytes follow; page-locked once
/// `ps_store_pin` ran, so that copies from it run asynchronously). For
/// callers that copy the model themselves, e.g. inside a CUDA graph. The
/// bytes there are the model's only while it stays in the store: the
/// address is not a lease (a removed model's space is reused once no switch
/// holds it), so check `ps_model_info.id` before each use.
#[no_mangle]
pub extern "C" fn ps_store_model_host_ptr(store: *const ps_store, model: *const c_char, ptr_out: *mut u64) -> ps_status {
    boundary("ps_store_model_host_ptr", || {
        let s = store_ref(store)?;
        let m = s.model(str_arg(model, "model")?)?;
        let o = out(ptr_out, "ptr_out")?;
        o.write(s.host_ptr(&m)? as u64);
        Ok(())
    })
}

/// A lease on a stored model (`ps_store_lease`): while it lives, the
/// model's bytes stay where they are and are not reused, in every process,
/// even if the model is removed meanwhile. Thread-safe (it does not change).
pub struct ps_model_lease {
    // Held for its drop: the lease ends with the handle.
    _lease: crate::store::ModelLease,
}

/// Leases `model`: `lease_out` receives the lease, `id_out` the model's id
/// and `host_ptr_out` the address of its first byte in this process's
/// mapping of the store (as `ps_store_model_host_ptr`; page-locked once
/// `ps_store_pin` ran). The bytes at that address are the model's until the
/// lease is freed: for callers that copy the model themselves (e.g. a CUDA
/// graph's copies), take the lease before the copies start and free it
/// after they have completed. `PS_ERR_NOT_FOUND` for an unknown or removed
/// model.
#[no_mangle]
pub extern "C" fn ps_store_lease(
    store: *const ps_store,
    model: *const c_char,
    id_out: *mut u64,
    host_ptr_out: *mut u64,
    lease_out: *mut *mut ps_model_lease,
) -> ps_status {
    boundary("ps_store_lease", || {
        let s = store_ref(store)?;
        let name = str_arg(model, "model")?;
        let (id_o, ptr_o, lease_o) = (out(id_out, "id_out")?, out(host_ptr_out, "host_ptr_out")?, out(lease_out, "lease_out")?);
        let lease = s.lease(name)?;
        let ptr = s.leased_host_ptr(&lease)? as u64;
        id_o.write(lease.id);
        ptr_o.write(ptr);
        lease_o.write(handles::register(ps_model_lease { _lease: lease }));
        Ok(())
    })
}

/// Ends a lease (after the GPU work that reads the leased bytes has
/// completed). NULL does nothing.
#[no_mangle]
pub extern "C" fn ps_model_lease_free(lease: *mut ps_model_lease) -> ps_status {
    boundary("ps_model_lease_free", || handles::free(lease, "model lease"))
}

/// The copies `ps_switch_start` makes for a plan of `model` with chunking
/// `min_chunk`, `max_chunk` (as `ps_switch_set_chunking`; the defaults are
/// 4 MiB and 64 MiB): copy i is bytes `[copy_ranges_out[2i],
/// copy_ranges_out[2i+1])` relative to the model's first byte (consecutive
/// small groups share a copy, large ones are split; a copy may be empty and
/// carry only events), and group g's event follows copy `group_copy_out[g]`
/// (`n_groups` values). `capacity` is the number of copies
/// `copy_ranges_out` has room for (`2 * capacity` values); at most
/// `n_groups + bytes / max_chunk + 1` copies come back. `n_copies_out`
/// receives the number of copies, also with `PS_ERR_BUFFER_TOO_SMALL`;
/// the arrays are written only on success. For callers that enqueue the
/// switch's copies themselves (e.g. inside a CUDA graph).
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub extern "C" fn ps_store_copy_schedule(
    store: *const ps_store,
    model: *const c_char,
    group_starts: *const usize,
    n_groups: usize,
    min_chunk: u64,
    max_chunk: u64,
    copy_ranges_out: *mut u64,
    capacity: usize,
    n_copies_out: *mut usize,
    group_copy_out: *mut usize,
) -> ps_status {
    boundary("ps_store_copy_schedule", || {
        let m = store_ref(store)?.model(str_arg(model, "model")?)?;
        let starts = slice_arg(group_starts, n_groups, "group_starts")?;
        crate::switch::check_plan(starts, m.layers.len())?;
        let (group_ends, _) = crate::switch::group_layout(&crate::switch::layer_ends(&m)?, starts);
        let copies = crate::switch::copy_schedule(&group_ends, crate::switch::Chunking { min_chunk, max_chunk })?;
        let n_out = out(n_copies_out, "n_copies_out")?;
        if copies.len() > capacity {
            n_out.write(copies.len());
            return Err(Error::BufferTooSmall { needed: copies.len(), capacity });
        }
        let ranges = slice_mut_arg(copy_ranges_out, 2 * copies.len(), "copy_ranges_out")?;
        let group_copy = slice_mut_arg(group_copy_out, n_groups, "group_copy_out")?;
        for (i, c) in copies.iter().enumerate() {
            ranges[2 * i] = c.start;
            ranges[2 * i + 1] = c.end;
            for &g in &c.completes_groups {
                group_copy[g] = i;
            }
        }
        n_out.write(copies.len());
        Ok(())
    })
}
