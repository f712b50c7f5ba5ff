//! The C ABI called from Rust, on the CPU only: NULL and dead handles,
//! outputs left alone on failure, a full store round trip, the planner,
//! the no-driver answers, and the status strings.
//!
//! Stores live in one temporary directory per test binary
//! (`PIPESWITCH_SHM_DIR`, set once), each test with its own store names.

use std::ffi::{c_char, c_void, CStr, CString};
use std::ptr::{null, null_mut};

use pipeswitch::ffi::arena::*;
use pipeswitch::ffi::plan::*;
use pipeswitch::ffi::store::*;
use pipeswitch::ffi::switch::*;
use pipeswitch::ffi::version::*;
use pipeswitch::ffi::*;
use pipeswitch::store::safetensors::{write_file, WriteTensor};
use pipeswitch::store::{Dtype, Store};

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

mod common;
use common::{seg_path, shm_dir};

fn cstr(s: &str) -> CString {
    CString::new(s).unwrap()
}

fn last_error() -> String {
    // SAFETY: a NUL-terminated string owned by this thread, valid until the
    // thread's next failing call.
    unsafe { CStr::from_ptr(ps_last_error_message()) }
        .to_str()
        .expect("utf-8 message")
        .to_owned()
}

fn status_name(s: ps_status) -> String {
    // SAFETY: static NUL-terminated strings.
    unsafe { CStr::from_ptr(ps_status_str(s)) }
        .to_str()
        .unwrap()
        .to_owned()
}

/// Leaves a known message behind, so that a check never reads a stale one.
fn reset_last_error(avoid: &str) {
    if avoid == "ps_plan_makespan" {
        assert_eq!(ps_store_unlink(null()), PS_ERR_NULL_ARGUMENT);
        assert!(last_error().starts_with("ps_store_unlink: "));
    } else {
        let s = ps_plan_makespan(null(), null(), 0, 0.0, 0.0, null(), 0, null_mut());
        assert_eq!(s, PS_ERR_INVALID_ARGUMENT);
        assert!(last_error().starts_with("ps_plan_makespan: "));
    }
}

/// Runs one call and checks its status; for a failure also that the
/// message names the call. Returns the message.
#[track_caller]
fn check(want: ps_status, call: &str, f: impl FnOnce() -> ps_status) -> String {
    reset_last_error(call);
    let got = f();
    let msg = last_error();
    assert_eq!(
        got,
        want,
        "{call}: status {got} ({}) but {want} ({}) expected; message {msg:?}",
        status_name(got),
        status_name(want)
    );
    if want != PS_OK {
        assert!(
            msg.starts_with(&format!("{call}: ")),
            "message {msg:?} does not name {call}"
        );
        match want {
            PS_ERR_NULL_ARGUMENT => assert!(msg.contains("is NULL"), "{msg:?}"),
            PS_ERR_INVALID_HANDLE => assert!(msg.contains("not a live handle"), "{msg:?}"),
            _ => {}
        }
    }
    msg
}

#[track_caller]
fn null_arg(call: &str, f: impl FnOnce() -> ps_status) -> String {
    check(PS_ERR_NULL_ARGUMENT, call, f)
}

#[track_caller]
fn dead_handle(call: &str, f: impl FnOnce() -> ps_status) {
    check(PS_ERR_INVALID_HANDLE, call, f);
}

fn create_store(name: &str, capacity: u64, max_models: u32) -> *mut ps_store {
    shm_dir();
    let mut s: *mut ps_store = null_mut();
    let n = cstr(name);
    check(PS_OK, "ps_store_create", || {
        ps_store_create(n.as_ptr(), capacity, max_models, &mut s)
    });
    assert!(!s.is_null());
    s
}

fn bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 24) as u8
        })
        .collect()
}

/// A model as C would describe it; owns everything the descriptors point at.
struct CModel {
    layer_names: Vec<CString>,
    layer_sizes: Vec<usize>,
    tensor_names: Vec<CString>,
    dtypes: Vec<u32>,
    shapes: Vec<Vec<u64>>,
    data: Vec<Vec<u8>>,
}

/// A layer as (name, [(tensor, dtype, shape)]).
type LayerDef<'a> = (&'a str, &'a [(&'a str, u32, &'a [u64])]);

impl CModel {
    fn new(seed: u64, layers: &[LayerDef<'_>]) -> CModel {
        let mut m = CModel {
            layer_names: vec![],
            layer_sizes: vec![],
            tensor_names: vec![],
            dtypes: vec![],
            shapes: vec![],
            data: vec![],
        };
        for (li, (lname, tensors)) in layers.iter().enumerate() {
            m.layer_names.push(cstr(lname));
            m.layer_sizes.push(tensors.len());
            for (ti, (tname, dtype, shape)) in tensors.iter().enumerate() {
                let size = Dtype::from_u32(*dtype).unwrap().size() * shape.iter().product::<u64>();
                m.tensor_names.push(cstr(tname));
                m.dtypes.push(*dtype);
                m.shapes.push(shape.to_vec());
                m.data
                    .push(bytes(seed + 100 * li as u64 + ti as u64, size as usize));
            }
        }
        m
    }

    fn layers(&self) -> Vec<ps_layer_desc> {
        self.layer_names
            .iter()
            .zip(&self.layer_sizes)
            .map(|(n, &k)| ps_layer_desc {
                name: n.as_ptr(),
                n_tensors: k,
            })
            .collect()
    }

    fn tensors(&self) -> Vec<ps_tensor_desc> {
        (0..self.tensor_names.len())
            .map(|i| ps_tensor_desc {
                name: self.tensor_names[i].as_ptr(),
                dtype: self.dtypes[i],
                ndim: self.shapes[i].len() as u32,
                shape: if self.shapes[i].is_empty() {
                    null()
                } else {
                    self.shapes[i].as_ptr()
                },
                data: self.data[i].as_ptr().cast::<c_void>(),
                bytes: self.data[i].len() as u64,
            })
            .collect()
    }

    fn add(&self, store: *const ps_store, name: &str) -> ps_status {
        let (l, t) = (self.layers(), self.tensors());
        let n = cstr(name);
        ps_store_add_model(store, n.as_ptr(), l.as_ptr(), l.len(), t.as_ptr(), t.len())
    }
}

fn small_model(seed: u64) -> CModel {
    CModel::new(
        seed,
        &[
            ("embed", &[("embed.weight", PS_DTYPE_F32, &[4, 8])]),
            (
                "block",
                &[
                    ("block.w", PS_DTYPE_F16, &[8, 8]),
                    ("block.b", PS_DTYPE_F16, &[8]),
                ],
            ),
            (
                "head",
                &[
                    ("head.w", PS_DTYPE_BF16, &[8, 3]),
                    ("head.s", PS_DTYPE_I8, &[]),
                ],
            ),
        ],
    )
}

fn model_count(s: *const ps_store) -> usize {
    let mut n = usize::MAX;
    check(PS_OK, "ps_store_model_count", || {
        ps_store_model_count(s, &mut n)
    });
    n
}

const SENTINEL: u64 = 0x5e47_1ee1_5e47_1ee1;

fn sentinel_ptr<T>() -> *mut T {
    0x5e47_1ee0usize as *mut T
}

fn model_info_sentinel() -> ps_model_info {
    ps_model_info {
        id: SENTINEL,
        bytes: SENTINEL,
        n_layers: 77,
        n_tensors: 78,
    }
}

#[track_caller]
fn assert_model_info_untouched(i: &ps_model_info) {
    assert_eq!(
        (i.id, i.bytes, i.n_layers, i.n_tensors),
        (SENTINEL, SENTINEL, 77, 78)
    );
}

fn layer_info_sentinel() -> ps_layer_info {
    ps_layer_info {
        first_tensor: 77,
        n_tensors: 78,
        offset: SENTINEL,
        bytes: SENTINEL,
        exec_ms: -7.5,
    }
}

#[track_caller]
fn assert_layer_info_untouched(i: &ps_layer_info) {
    assert_eq!(
        (i.first_tensor, i.n_tensors, i.offset, i.bytes, i.exec_ms),
        (77, 78, SENTINEL, SENTINEL, -7.5)
    );
}

fn tensor_info_sentinel() -> ps_tensor_info {
    ps_tensor_info {
        dtype: 99,
        ndim: 99,
        shape: [SENTINEL; 8],
        offset: SENTINEL,
        bytes: SENTINEL,
        layer: 77,
    }
}

#[track_caller]
fn assert_tensor_info_untouched(i: &ps_tensor_info) {
    assert_eq!(
        (i.dtype, i.ndim, i.shape, i.offset, i.bytes, i.layer),
        (99, 99, [SENTINEL; 8], SENTINEL, SENTINEL, 77)
    );
}

fn usage_sentinel() -> ps_store_usage {
    ps_store_usage {
        capacity_bytes: SENTINEL,
        used_bytes: SENTINEL,
        largest_free_bytes: SENTINEL,
        models: 77,
        max_models: 78,
    }
}

#[track_caller]
fn assert_usage_untouched(u: &ps_store_usage) {
    assert_eq!(
        (
            u.capacity_bytes,
            u.used_bytes,
            u.largest_free_bytes,
            u.models,
            u.max_models
        ),
        (SENTINEL, SENTINEL, SENTINEL, 77, 78)
    );
}

// ---------------------------------------------------------------------------
// 1. NULL arguments, outputs untouched
// ---------------------------------------------------------------------------

#[test]
fn null_arguments_store_calls() {
    let store_name = "ffi-null";
    let st = create_store(store_name, 1 << 20, 8);
    let m = small_model(1);
    check(PS_OK, "ps_store_add_model", || m.add(st, "m"));
    let name = cstr(store_name);
    let model = c"m".as_ptr();

    // create / open / unlink
    let mut out: *mut ps_store = sentinel_ptr();
    null_arg("ps_store_create", || {
        ps_store_create(null(), 1 << 20, 4, &mut out)
    });
    assert_eq!(out, sentinel_ptr());
    let fresh = cstr("ffi-null-never");
    null_arg("ps_store_create", || {
        ps_store_create(fresh.as_ptr(), 1 << 20, 4, null_mut())
    });
    assert!(
        !seg_path("ffi-null-never").exists(),
        "a failed create left a segment behind"
    );
    null_arg("ps_store_open", || ps_store_open(null(), &mut out));
    null_arg("ps_store_open", || ps_store_open(name.as_ptr(), null_mut()));
    assert_eq!(out, sentinel_ptr());
    null_arg("ps_store_unlink", || ps_store_unlink(null()));
    assert!(seg_path(store_name).exists());
    check(PS_OK, "ps_store_free", || ps_store_free(null_mut()));

    // add_model: every pointer, including those inside the descriptors.
    let n = model_count(st);
    let (layers, tensors) = (m.layers(), m.tensors());
    let new = c"new".as_ptr();
    null_arg("ps_store_add_model", || {
        ps_store_add_model(null(), new, layers.as_ptr(), 3, tensors.as_ptr(), 5)
    });
    null_arg("ps_store_add_model", || {
        ps_store_add_model(st, null(), layers.as_ptr(), 3, tensors.as_ptr(), 5)
    });
    null_arg("ps_store_add_model", || {
        ps_store_add_model(st, new, null(), 3, tensors.as_ptr(), 5)
    });
    null_arg("ps_store_add_model", || {
        ps_store_add_model(st, new, layers.as_ptr(), 3, null(), 5)
    });
    let mut bad_layers = m.layers();
    bad_layers[2].name = null();
    null_arg("ps_store_add_model", || {
        ps_store_add_model(st, new, bad_layers.as_ptr(), 3, tensors.as_ptr(), 5)
    });
    for field in 0..3 {
        let mut bad = m.tensors();
        match field {
            0 => bad[4].name = null(),
            1 => bad[1].shape = null(),
            _ => bad[3].data = null(),
        }
        null_arg("ps_store_add_model", || {
            ps_store_add_model(st, new, layers.as_ptr(), 3, bad.as_ptr(), 5)
        });
    }
    assert_eq!(model_count(st), n, "a failed add changed the store");

    // add_safetensors
    let path = c"/nonexistent/x.safetensors".as_ptr();
    let list = [c"a".as_ptr(), null()];
    null_arg("ps_store_add_safetensors", || {
        ps_store_add_safetensors(null(), new, path, null(), 0)
    });
    null_arg("ps_store_add_safetensors", || {
        ps_store_add_safetensors(st, null(), path, null(), 0)
    });
    null_arg("ps_store_add_safetensors", || {
        ps_store_add_safetensors(st, new, null(), null(), 0)
    });
    null_arg("ps_store_add_safetensors", || {
        ps_store_add_safetensors(st, new, path, null(), 2)
    });
    null_arg("ps_store_add_safetensors", || {
        ps_store_add_safetensors(st, new, path, list.as_ptr(), 2)
    });

    // remove / count / name
    null_arg("ps_store_remove_model", || {
        ps_store_remove_model(null(), model)
    });
    null_arg("ps_store_remove_model", || {
        ps_store_remove_model(st, null())
    });
    let mut count = 4242usize;
    null_arg("ps_store_model_count", || {
        ps_store_model_count(null(), &mut count)
    });
    null_arg("ps_store_model_count", || {
        ps_store_model_count(st, null_mut())
    });
    assert_eq!(count, 4242);
    let mut buf = [b'#' as c_char; 16];
    let mut len = 4242usize;
    null_arg("ps_store_model_name", || {
        ps_store_model_name(null(), 0, buf.as_mut_ptr(), 16, &mut len)
    });
    null_arg("ps_store_model_name", || {
        ps_store_model_name(st, 0, null_mut(), 16, &mut len)
    });
    assert_eq!(len, 4242, "len_out written by a failed call");
    assert!(buf.iter().all(|&c| c == b'#' as c_char));

    // info calls
    let mut mi = model_info_sentinel();
    null_arg("ps_store_model_info", || {
        ps_store_model_info(null(), model, &mut mi)
    });
    null_arg("ps_store_model_info", || {
        ps_store_model_info(st, null(), &mut mi)
    });
    null_arg("ps_store_model_info", || {
        ps_store_model_info(st, model, null_mut())
    });
    assert_model_info_untouched(&mi);
    let mut li = layer_info_sentinel();
    null_arg("ps_store_layer_info", || {
        ps_store_layer_info(null(), model, 0, &mut li, null_mut(), 0)
    });
    null_arg("ps_store_layer_info", || {
        ps_store_layer_info(st, null(), 0, &mut li, null_mut(), 0)
    });
    null_arg("ps_store_layer_info", || {
        ps_store_layer_info(st, model, 0, null_mut(), buf.as_mut_ptr(), 16)
    });
    null_arg("ps_store_layer_info", || {
        ps_store_layer_info(st, model, 0, &mut li, null_mut(), 16)
    });
    assert_layer_info_untouched(&li);
    let mut ti = tensor_info_sentinel();
    null_arg("ps_store_tensor_info", || {
        ps_store_tensor_info(null(), model, 0, &mut ti, null_mut(), 0)
    });
    null_arg("ps_store_tensor_info", || {
        ps_store_tensor_info(st, null(), 0, &mut ti, null_mut(), 0)
    });
    null_arg("ps_store_tensor_info", || {
        ps_store_tensor_info(st, model, 0, null_mut(), buf.as_mut_ptr(), 16)
    });
    null_arg("ps_store_tensor_info", || {
        ps_store_tensor_info(st, model, 0, &mut ti, null_mut(), 16)
    });
    assert_tensor_info_untouched(&ti);
    assert!(buf.iter().all(|&c| c == b'#' as c_char));
    let mut index = 4242usize;
    let tname = c"block.b".as_ptr();
    null_arg("ps_store_tensor_index", || {
        ps_store_tensor_index(null(), model, tname, &mut index)
    });
    null_arg("ps_store_tensor_index", || {
        ps_store_tensor_index(st, null(), tname, &mut index)
    });
    null_arg("ps_store_tensor_index", || {
        ps_store_tensor_index(st, model, null(), &mut index)
    });
    null_arg("ps_store_tensor_index", || {
        ps_store_tensor_index(st, model, tname, null_mut())
    });
    assert_eq!(index, 4242);

    // profile, usage, pin, read
    let times = [1.0, 2.0, 3.0];
    null_arg("ps_store_set_layer_exec_ms", || {
        ps_store_set_layer_exec_ms(null(), model, times.as_ptr(), 3)
    });
    null_arg("ps_store_set_layer_exec_ms", || {
        ps_store_set_layer_exec_ms(st, null(), times.as_ptr(), 3)
    });
    null_arg("ps_store_set_layer_exec_ms", || {
        ps_store_set_layer_exec_ms(st, model, null(), 3)
    });
    let mut li = layer_info_sentinel();
    check(PS_OK, "ps_store_layer_info", || {
        ps_store_layer_info(st, model, 0, &mut li, null_mut(), 0)
    });
    assert!(
        li.exec_ms.is_nan(),
        "a failed profile update stored something"
    );
    let mut u = usage_sentinel();
    null_arg("ps_store_get_usage", || ps_store_get_usage(null(), &mut u));
    null_arg("ps_store_get_usage", || ps_store_get_usage(st, null_mut()));
    assert_usage_untouched(&u);
    null_arg("ps_store_pin", || ps_store_pin(null(), 0));
    let mut dst = [0xabu8; 32];
    null_arg("ps_store_read", || {
        ps_store_read(null(), model, 0, dst.as_mut_ptr().cast(), 32)
    });
    null_arg("ps_store_read", || {
        ps_store_read(st, null(), 0, dst.as_mut_ptr().cast(), 32)
    });
    null_arg("ps_store_read", || {
        ps_store_read(st, model, 0, null_mut(), 32)
    });
    assert!(dst.iter().all(|&b| b == 0xab));

    // The store still holds exactly what it did.
    assert_eq!(model_count(st), 1);
    check(PS_OK, "ps_store_free", || ps_store_free(st));
    check(PS_OK, "ps_store_unlink", || ps_store_unlink(name.as_ptr()));
}

#[test]
fn null_arguments_plan_calls() {
    let t = [1.0, 2.0, 3.0];
    let x = [2.0, 1.0, 0.5];
    let mut starts = [usize::MAX; 3];
    let mut n = 4242usize;
    let mut ms = -1.0f64;
    null_arg("ps_plan_groups", || {
        ps_plan_groups(
            null(),
            x.as_ptr(),
            3,
            0.1,
            0.1,
            starts.as_mut_ptr(),
            3,
            &mut n,
            &mut ms,
        )
    });
    null_arg("ps_plan_groups", || {
        ps_plan_groups(
            t.as_ptr(),
            null(),
            3,
            0.1,
            0.1,
            starts.as_mut_ptr(),
            3,
            &mut n,
            &mut ms,
        )
    });
    null_arg("ps_plan_groups", || {
        ps_plan_groups(
            t.as_ptr(),
            x.as_ptr(),
            3,
            0.1,
            0.1,
            null_mut(),
            3,
            &mut n,
            &mut ms,
        )
    });
    null_arg("ps_plan_groups", || {
        ps_plan_groups(
            t.as_ptr(),
            x.as_ptr(),
            3,
            0.1,
            0.1,
            starts.as_mut_ptr(),
            3,
            null_mut(),
            &mut ms,
        )
    });
    null_arg("ps_plan_groups", || {
        ps_plan_groups(
            t.as_ptr(),
            x.as_ptr(),
            3,
            0.1,
            0.1,
            starts.as_mut_ptr(),
            3,
            &mut n,
            null_mut(),
        )
    });
    assert_eq!((starts, n, ms), ([usize::MAX; 3], 4242, -1.0));

    let plan = [0usize, 2];
    null_arg("ps_plan_makespan", || {
        ps_plan_makespan(null(), x.as_ptr(), 3, 0.1, 0.1, plan.as_ptr(), 2, &mut ms)
    });
    null_arg("ps_plan_makespan", || {
        ps_plan_makespan(t.as_ptr(), null(), 3, 0.1, 0.1, plan.as_ptr(), 2, &mut ms)
    });
    null_arg("ps_plan_makespan", || {
        ps_plan_makespan(t.as_ptr(), x.as_ptr(), 3, 0.1, 0.1, null(), 2, &mut ms)
    });
    null_arg("ps_plan_makespan", || {
        ps_plan_makespan(
            t.as_ptr(),
            x.as_ptr(),
            3,
            0.1,
            0.1,
            plan.as_ptr(),
            2,
            null_mut(),
        )
    });
    assert_eq!(ms, -1.0);

    let model = c"m".as_ptr();
    null_arg("ps_plan_model", || {
        ps_plan_model(
            null(),
            model,
            1.0,
            0.1,
            0.1,
            starts.as_mut_ptr(),
            3,
            &mut n,
            &mut ms,
        )
    });
    let st = create_store("ffi-null-plan", 1 << 20, 4);
    check(PS_OK, "ps_store_add_model", || small_model(2).add(st, "m"));
    let times = [1.0, 2.0, 3.0];
    check(PS_OK, "ps_store_set_layer_exec_ms", || {
        ps_store_set_layer_exec_ms(st, model, times.as_ptr(), 3)
    });
    null_arg("ps_plan_model", || {
        ps_plan_model(
            st,
            null(),
            1.0,
            0.1,
            0.1,
            starts.as_mut_ptr(),
            3,
            &mut n,
            &mut ms,
        )
    });
    null_arg("ps_plan_model", || {
        ps_plan_model(st, model, 1.0, 0.1, 0.1, null_mut(), 3, &mut n, &mut ms)
    });
    null_arg("ps_plan_model", || {
        ps_plan_model(
            st,
            model,
            1.0,
            0.1,
            0.1,
            starts.as_mut_ptr(),
            3,
            null_mut(),
            &mut ms,
        )
    });
    null_arg("ps_plan_model", || {
        ps_plan_model(
            st,
            model,
            1.0,
            0.1,
            0.1,
            starts.as_mut_ptr(),
            3,
            &mut n,
            null_mut(),
        )
    });
    assert_eq!((starts, n, ms), ([usize::MAX; 3], 4242, -1.0));
    // The same call with every pointer works.
    check(PS_OK, "ps_plan_model", || {
        ps_plan_model(
            st,
            model,
            1.0,
            0.1,
            0.1,
            starts.as_mut_ptr(),
            3,
            &mut n,
            &mut ms,
        )
    });
    assert!(n >= 1 && starts[0] == 0 && ms > 0.0);

    let (mut bw, mut oh) = (-1.0f64, -1.0f64);
    null_arg("ps_measure_h2d", || {
        ps_measure_h2d(0, 64 << 20, null_mut(), &mut oh)
    });
    null_arg("ps_measure_h2d", || {
        ps_measure_h2d(0, 64 << 20, &mut bw, null_mut())
    });
    assert_eq!((bw, oh), (-1.0, -1.0));
    null_arg("ps_device_count", || ps_device_count(null_mut()));

    check(PS_OK, "ps_store_free", || ps_store_free(st));
    check(PS_OK, "ps_store_unlink", || {
        ps_store_unlink(c"ffi-null-plan".as_ptr())
    });
}

#[test]
fn null_and_foreign_handles_arena_and_switch() {
    // No arena or switch can be made without a GPU: check the handle
    // checks with NULL and with a live handle of another type (a store),
    // which must be refused, not reinterpreted.
    let st = create_store("ffi-foreign", 1 << 20, 4);
    check(PS_OK, "ps_store_add_model", || small_model(3).add(st, "m"));
    let fa = st.cast::<ps_arena>();
    let fs = st.cast::<ps_switch>();
    let model = c"m".as_ptr();

    let mut arena_out: *mut ps_arena = sentinel_ptr();
    null_arg("ps_arena_create", || {
        ps_arena_create(0, 1 << 20, 0, null_mut())
    });
    let mut h = ps_arena_ipc_handle { bytes: [0x11; 128] };
    null_arg("ps_arena_import", || {
        ps_arena_import(null(), &mut arena_out)
    });
    null_arg("ps_arena_import", || ps_arena_import(&h, null_mut()));
    // Bytes that are no exported handle: refused before any driver call.
    check(PS_ERR_INVALID_ARGUMENT, "ps_arena_import", || {
        ps_arena_import(&h, &mut arena_out)
    });
    assert_eq!(arena_out, sentinel_ptr());
    check(PS_OK, "ps_arena_free", || ps_arena_free(null_mut()));

    let mut off = SENTINEL;
    let (mut a, mut b) = (SENTINEL, SENTINEL);
    let mut buf = [0x5au8; 8];
    for (arena, code) in [
        (null(), PS_ERR_NULL_ARGUMENT),
        (fa as *const ps_arena, PS_ERR_INVALID_HANDLE),
    ] {
        check(code, "ps_arena_alloc", || {
            ps_arena_alloc(arena, 256, &mut off)
        });
        check(code, "ps_arena_release", || ps_arena_release(arena, 0));
        check(code, "ps_arena_base", || {
            ps_arena_base(arena, &mut a, &mut b)
        });
        check(code, "ps_arena_workspace", || {
            ps_arena_workspace(arena, &mut a, &mut b)
        });
        check(code, "ps_arena_export", || ps_arena_export(arena, &mut h));
        check(code, "ps_arena_read", || {
            ps_arena_read(arena, 0, buf.as_mut_ptr().cast(), 8)
        });
        check(code, "ps_arena_write", || {
            ps_arena_write(arena, 0, buf.as_ptr().cast(), 8)
        });
    }
    dead_handle("ps_arena_free", || ps_arena_free(fa));
    assert_eq!((off, a, b), (SENTINEL, SENTINEL, SENTINEL));
    assert_eq!(h.bytes, [0x11; 128]);
    assert_eq!(buf, [0x5a; 8]);

    null_arg("ps_switch_new", || ps_switch_new(0, null_mut()));
    check(PS_OK, "ps_switch_free", || ps_switch_free(null_mut()));
    let (mut g, mut ready, mut ptr, mut ms) = (4242usize, -3i32, SENTINEL, -1.0f64);
    let mut stream: *mut c_void = sentinel_ptr();
    let starts = [0usize];
    for (sw, code) in [
        (null_mut(), PS_ERR_NULL_ARGUMENT),
        (fs, PS_ERR_INVALID_HANDLE),
    ] {
        check(code, "ps_switch_set_chunking", || {
            ps_switch_set_chunking(sw, 1 << 20, 4 << 20)
        });
        check(code, "ps_switch_start", || {
            ps_switch_start(sw, st, model, fa, 0, starts.as_ptr(), 1)
        });
        check(code, "ps_switch_start_whole", || {
            ps_switch_start_whole(sw, st, model, fa, 0)
        });
        check(code, "ps_switch_wait_group", || {
            ps_switch_wait_group(sw, 0, null_mut())
        });
        check(code, "ps_switch_group_of_layer", || {
            ps_switch_group_of_layer(sw, 0, &mut g)
        });
        check(code, "ps_switch_n_groups", || {
            ps_switch_n_groups(sw, &mut g)
        });
        check(code, "ps_switch_group_ready", || {
            ps_switch_group_ready(sw, 0, &mut ready)
        });
        check(code, "ps_switch_tensor_ptr", || {
            ps_switch_tensor_ptr(sw, 0, &mut ptr)
        });
        check(code, "ps_switch_tensor_ptr_by_name", || {
            ps_switch_tensor_ptr_by_name(sw, c"block.w".as_ptr(), &mut ptr)
        });
        check(code, "ps_switch_synchronize", || ps_switch_synchronize(sw));
        check(code, "ps_switch_elapsed_ms", || {
            ps_switch_elapsed_ms(sw, &mut ms)
        });
        check(code, "ps_switch_copy_stream", || {
            ps_switch_copy_stream(sw, &mut stream)
        });
    }
    dead_handle("ps_switch_free", || ps_switch_free(fs));
    assert_eq!((g, ready, ptr, ms), (4242, -3, SENTINEL, -1.0));
    assert_eq!(stream, sentinel_ptr());

    // Handles of the wrong type for the store calls too.
    let mut n = 4242usize;
    let local = 0u64;
    let bogus = (&local as *const u64).cast::<ps_store>();
    dead_handle("ps_store_model_count", || {
        ps_store_model_count(bogus, &mut n)
    });
    dead_handle("ps_store_free", || ps_store_free(bogus.cast_mut()));
    assert_eq!(n, 4242);

    // The store whose address was passed around is unharmed.
    assert_eq!(model_count(st), 1);
    check(PS_OK, "ps_store_free", || ps_store_free(st));
    check(PS_OK, "ps_store_unlink", || {
        ps_store_unlink(c"ffi-foreign".as_ptr())
    });
}

// ---------------------------------------------------------------------------
// 2. Double free, dead handles
// ---------------------------------------------------------------------------

#[test]
fn double_free_and_dead_handles() {
    let name = cstr("ffi-double-free");
    let st = create_store("ffi-double-free", 1 << 20, 4);
    let mut other: *mut ps_store = null_mut();
    check(PS_OK, "ps_store_open", || {
        ps_store_open(name.as_ptr(), &mut other)
    });
    assert!(!other.is_null() && other != st);
    let m = small_model(4);
    check(PS_OK, "ps_store_add_model", || m.add(st, "m"));

    check(PS_OK, "ps_store_free", || ps_store_free(st));
    dead_handle("ps_store_free", || ps_store_free(st));
    check(PS_OK, "ps_store_free", || ps_store_free(null_mut()));

    // Every call refuses the freed handle and leaves outputs alone.
    let mut n = 4242usize;
    dead_handle("ps_store_model_count", || ps_store_model_count(st, &mut n));
    assert_eq!(n, 4242);
    let mut mi = model_info_sentinel();
    dead_handle("ps_store_model_info", || {
        ps_store_model_info(st, c"m".as_ptr(), &mut mi)
    });
    assert_model_info_untouched(&mi);
    let mut u = usage_sentinel();
    dead_handle("ps_store_get_usage", || ps_store_get_usage(st, &mut u));
    assert_usage_untouched(&u);
    dead_handle("ps_store_add_model", || m.add(st, "m2"));
    dead_handle("ps_store_remove_model", || {
        ps_store_remove_model(st, c"m".as_ptr())
    });
    dead_handle("ps_store_pin", || ps_store_pin(st, 0));
    let (mut starts, mut g, mut ms) = ([9usize; 3], 9usize, -1.0);
    dead_handle("ps_plan_model", || {
        ps_plan_model(
            st,
            c"m".as_ptr(),
            1.0,
            0.0,
            0.0,
            starts.as_mut_ptr(),
            3,
            &mut g,
            &mut ms,
        )
    });
    assert_eq!((starts, g, ms), ([9; 3], 9, -1.0));

    // The other handle of the same store is unaffected: the model is there.
    assert_eq!(model_count(other), 1);
    check(PS_OK, "ps_store_free", || ps_store_free(other));
    dead_handle("ps_store_free", || ps_store_free(other));
    check(PS_OK, "ps_store_unlink", || ps_store_unlink(name.as_ptr()));
}

// ---------------------------------------------------------------------------
// 3. Round trip
// ---------------------------------------------------------------------------

fn layer_info(st: *const ps_store, model: &CStr, i: usize) -> (ps_layer_info, String) {
    let mut li = layer_info_sentinel();
    let mut buf = [0 as c_char; 64];
    check(PS_OK, "ps_store_layer_info", || {
        ps_store_layer_info(st, model.as_ptr(), i, &mut li, buf.as_mut_ptr(), 64)
    });
    // SAFETY: NUL-terminated by the call.
    let name = unsafe { CStr::from_ptr(buf.as_ptr()) }
        .to_str()
        .unwrap()
        .to_owned();
    (li, name)
}

fn tensor_info(st: *const ps_store, model: &CStr, i: usize) -> (ps_tensor_info, String) {
    let mut ti = tensor_info_sentinel();
    let mut buf = [0 as c_char; 64];
    check(PS_OK, "ps_store_tensor_info", || {
        ps_store_tensor_info(st, model.as_ptr(), i, &mut ti, buf.as_mut_ptr(), 64)
    });
    // SAFETY: NUL-terminated by the call.
    let name = unsafe { CStr::from_ptr(buf.as_ptr()) }
        .to_str()
        .unwrap()
        .to_owned();
    (ti, name)
}

fn model_info(st: *const ps_store, model: &CStr) -> ps_model_info {
    let mut mi = model_info_sentinel();
    check(PS_OK, "ps_store_model_info", || {
        ps_store_model_info(st, model.as_ptr(), &mut mi)
    });
    mi
}

fn usage(st: *const ps_store) -> ps_store_usage {
    let mut u = usage_sentinel();
    check(PS_OK, "ps_store_get_usage", || {
        ps_store_get_usage(st, &mut u)
    });
    u
}

#[test]
fn c_api_round_trip() {
    let store_name = "ffi-round-trip";
    let cname = cstr(store_name);
    let st = create_store(store_name, 1 << 20, 0);
    let u0 = usage(st);
    assert_eq!(
        (u0.models, u0.max_models, u0.used_bytes),
        (0, 256, 0),
        "max_models 0 means 256"
    );
    assert!(u0.capacity_bytes >= 1 << 20);
    assert_eq!(u0.largest_free_bytes, u0.capacity_bytes);

    // Creating it again, or with a bad name, fails and leaves store_out alone.
    let mut out: *mut ps_store = sentinel_ptr();
    check(PS_ERR_ALREADY_EXISTS, "ps_store_create", || {
        ps_store_create(cname.as_ptr(), 1 << 20, 4, &mut out)
    });
    check(PS_ERR_INVALID_ARGUMENT, "ps_store_create", || {
        ps_store_create(c"../x".as_ptr(), 1 << 20, 4, &mut out)
    });
    check(PS_ERR_INVALID_ARGUMENT, "ps_store_create", || {
        ps_store_create(c"tiny".as_ptr(), 100, 4, &mut out)
    });
    check(PS_ERR_NOT_FOUND, "ps_store_open", || {
        ps_store_open(c"ffi-no-such-store".as_ptr(), &mut out)
    });
    assert_eq!(out, sentinel_ptr());

    // Add a model.
    let m = small_model(5);
    let model = c"gpt-tiny";
    check(PS_OK, "ps_store_add_model", || m.add(st, "gpt-tiny"));
    check(PS_ERR_ALREADY_EXISTS, "ps_store_add_model", || {
        m.add(st, "gpt-tiny")
    });
    assert_eq!(model_count(st), 1);

    // Its name, with the buffer-size protocol.
    let mut len = 0usize;
    check(PS_ERR_BUFFER_TOO_SMALL, "ps_store_model_name", || {
        ps_store_model_name(st, 0, null_mut(), 0, &mut len)
    });
    assert_eq!(len, "gpt-tiny".len());
    let mut buf = [b'#' as c_char; 32];
    len = 0;
    check(PS_ERR_BUFFER_TOO_SMALL, "ps_store_model_name", || {
        ps_store_model_name(st, 0, buf.as_mut_ptr(), 8, &mut len)
    });
    assert_eq!(
        len, 8,
        "the length is reported when the buffer lacks room for the NUL"
    );
    assert!(
        buf.iter().all(|&c| c == b'#' as c_char),
        "a too-small buffer was written"
    );
    check(PS_OK, "ps_store_model_name", || {
        ps_store_model_name(st, 0, buf.as_mut_ptr(), 9, null_mut())
    });
    // SAFETY: NUL-terminated by the call.
    assert_eq!(unsafe { CStr::from_ptr(buf.as_ptr()) }, model);
    assert_eq!(buf[9], b'#' as c_char, "wrote past the NUL");
    len = 4242;
    check(PS_ERR_NOT_FOUND, "ps_store_model_name", || {
        ps_store_model_name(st, 1, buf.as_mut_ptr(), 32, &mut len)
    });
    assert_eq!(len, 4242);

    // Info, compared with the Rust view of the same store.
    let rust = Store::open(store_name).unwrap();
    let rm = rust.model("gpt-tiny").unwrap();
    let mi = model_info(st, model);
    assert_eq!(
        (mi.id, mi.bytes, mi.n_layers, mi.n_tensors),
        (rm.id, rm.bytes, 3, 5)
    );
    let mut pos = 0u64;
    let mut first = 0usize;
    for (i, (want_name, &k)) in m.layer_names.iter().zip(&m.layer_sizes).enumerate() {
        let (li, name) = layer_info(st, model, i);
        assert_eq!(name.as_str(), want_name.to_str().unwrap());
        assert_eq!((li.first_tensor, li.n_tensors, li.offset), (first, k, pos));
        assert_eq!(
            (li.offset, li.bytes),
            (rm.layers[i].offset, rm.layers[i].bytes)
        );
        assert!(li.exec_ms.is_nan());
        pos += li.bytes;
        first += k;
    }
    assert_eq!(pos, mi.bytes, "layers tile the model");
    let mut li = layer_info_sentinel();
    check(PS_ERR_NOT_FOUND, "ps_store_layer_info", || {
        ps_store_layer_info(st, model.as_ptr(), 3, &mut li, null_mut(), 0)
    });
    let mut small = [b'#' as c_char; 4];
    check(PS_ERR_BUFFER_TOO_SMALL, "ps_store_layer_info", || {
        ps_store_layer_info(st, model.as_ptr(), 0, &mut li, small.as_mut_ptr(), 4)
    });
    assert_layer_info_untouched(&li);
    assert_eq!(small, [b'#' as c_char; 4]);

    for (i, layer) in [0usize, 1, 1, 2, 2].into_iter().enumerate() {
        let (ti, name) = tensor_info(st, model, i);
        assert_eq!(name.as_str(), m.tensor_names[i].to_str().unwrap());
        assert_eq!(ti.dtype, m.dtypes[i]);
        assert_eq!(ti.ndim as usize, m.shapes[i].len());
        assert_eq!(&ti.shape[..m.shapes[i].len()], &m.shapes[i][..]);
        assert!(ti.shape[m.shapes[i].len()..].iter().all(|&d| d == 0));
        assert_eq!(
            (ti.offset, ti.bytes),
            (rm.tensors[i].offset, m.data[i].len() as u64)
        );
        assert_eq!(ti.offset % 256, 0);
        assert_eq!(ti.layer, layer);
        // Name skipped with (NULL, 0).
        let mut t2 = tensor_info_sentinel();
        check(PS_OK, "ps_store_tensor_info", || {
            ps_store_tensor_info(st, model.as_ptr(), i, &mut t2, null_mut(), 0)
        });
        assert_eq!((t2.offset, t2.layer), (ti.offset, ti.layer));
        let mut idx = 4242usize;
        let tn = &m.tensor_names[i];
        check(PS_OK, "ps_store_tensor_index", || {
            ps_store_tensor_index(st, model.as_ptr(), tn.as_ptr(), &mut idx)
        });
        assert_eq!(idx, i);
        // The bytes, through ps_store_read.
        let mut got = vec![0u8; m.data[i].len()];
        check(PS_OK, "ps_store_read", || {
            ps_store_read(
                st,
                model.as_ptr(),
                ti.offset,
                got.as_mut_ptr().cast(),
                got.len(),
            )
        });
        assert_eq!(got, m.data[i], "bytes of {name}");
    }
    let mut ti = tensor_info_sentinel();
    check(PS_ERR_NOT_FOUND, "ps_store_tensor_info", || {
        ps_store_tensor_info(st, model.as_ptr(), 5, &mut ti, null_mut(), 0)
    });
    assert_tensor_info_untouched(&ti);
    let mut idx = 4242usize;
    check(PS_ERR_NOT_FOUND, "ps_store_tensor_index", || {
        ps_store_tensor_index(st, model.as_ptr(), c"nope".as_ptr(), &mut idx)
    });
    assert_eq!(idx, 4242);
    check(PS_ERR_NOT_FOUND, "ps_store_model_info", || {
        ps_store_model_info(st, c"nope".as_ptr(), &mut model_info_sentinel())
    });
    let mut dst = [0xabu8; 16];
    check(PS_ERR_INVALID_ARGUMENT, "ps_store_read", || {
        ps_store_read(
            st,
            model.as_ptr(),
            mi.bytes - 8,
            dst.as_mut_ptr().cast(),
            16,
        )
    });
    check(PS_ERR_INVALID_ARGUMENT, "ps_store_read", || {
        ps_store_read(st, model.as_ptr(), u64::MAX, dst.as_mut_ptr().cast(), 16)
    });
    assert_eq!(dst, [0xab; 16]);

    // Profiles and the planner.
    let mut starts = [usize::MAX; 3];
    let (mut n, mut ms) = (4242usize, -1.0f64);
    check(PS_ERR_INVALID_STATE, "ps_plan_model", || {
        ps_plan_model(
            st,
            model.as_ptr(),
            1.0,
            0.01,
            0.02,
            starts.as_mut_ptr(),
            3,
            &mut n,
            &mut ms,
        )
    });
    let bad: [&[f64]; 4] = [
        &[1.0, 2.0],
        &[1.0, f64::NAN, 2.0],
        &[1.0, -2.0, 2.0],
        &[f64::INFINITY, 1.0, 1.0],
    ];
    for v in bad {
        check(
            PS_ERR_INVALID_ARGUMENT,
            "ps_store_set_layer_exec_ms",
            || ps_store_set_layer_exec_ms(st, model.as_ptr(), v.as_ptr(), v.len()),
        );
    }
    check(
        PS_ERR_INVALID_ARGUMENT,
        "ps_store_set_layer_exec_ms",
        || ps_store_set_layer_exec_ms(st, model.as_ptr(), null(), 0),
    );
    check(PS_ERR_NOT_FOUND, "ps_store_set_layer_exec_ms", || {
        ps_store_set_layer_exec_ms(st, c"nope".as_ptr(), [1.0].as_ptr(), 1)
    });
    assert!(layer_info(st, model, 1).0.exec_ms.is_nan());
    let exec = [0.05, 0.4, 0.02];
    check(PS_OK, "ps_store_set_layer_exec_ms", || {
        ps_store_set_layer_exec_ms(st, model.as_ptr(), exec.as_ptr(), 3)
    });
    for (i, &e) in exec.iter().enumerate() {
        assert_eq!(layer_info(st, model, i).0.exec_ms, e);
    }
    // Through another handle as well.
    let mut st2: *mut ps_store = null_mut();
    check(PS_OK, "ps_store_open", || {
        ps_store_open(cname.as_ptr(), &mut st2)
    });
    assert_eq!(layer_info(st2, model, 1).0.exec_ms, 0.4);

    // ps_plan_model equals ps_plan_groups on the same numbers.
    let bw = 0.001; // GB/s: 1 byte per microsecond, so layer sizes matter
    let (a, b) = (0.01, 0.02);
    for bad_bw in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        check(PS_ERR_INVALID_ARGUMENT, "ps_plan_model", || {
            ps_plan_model(
                st,
                model.as_ptr(),
                bad_bw,
                a,
                b,
                starts.as_mut_ptr(),
                3,
                &mut n,
                &mut ms,
            )
        });
    }
    check(PS_ERR_INVALID_ARGUMENT, "ps_plan_model", || {
        ps_plan_model(
            st,
            model.as_ptr(),
            bw,
            -a,
            b,
            starts.as_mut_ptr(),
            3,
            &mut n,
            &mut ms,
        )
    });
    assert_eq!((starts, n, ms), ([usize::MAX; 3], 4242, -1.0));
    check(PS_OK, "ps_plan_model", || {
        ps_plan_model(
            st2,
            model.as_ptr(),
            bw,
            a,
            b,
            starts.as_mut_ptr(),
            3,
            &mut n,
            &mut ms,
        )
    });
    let transfer: Vec<f64> = (0..3)
        .map(|i| layer_info(st, model, i).0.bytes as f64 / (bw * 1e6))
        .collect();
    let mut starts2 = [usize::MAX; 3];
    let (mut n2, mut ms2) = (0usize, 0.0f64);
    check(PS_OK, "ps_plan_groups", || {
        ps_plan_groups(
            transfer.as_ptr(),
            exec.as_ptr(),
            3,
            a,
            b,
            starts2.as_mut_ptr(),
            3,
            &mut n2,
            &mut ms2,
        )
    });
    assert_eq!((n, &starts[..n]), (n2, &starts2[..n2]));
    assert!(
        (ms - ms2).abs() <= 1e-12 * ms2.abs(),
        "makespans {ms} and {ms2}"
    );
    let mut ms3 = 0.0;
    check(PS_OK, "ps_plan_makespan", || {
        ps_plan_makespan(
            transfer.as_ptr(),
            exec.as_ptr(),
            3,
            a,
            b,
            starts.as_ptr(),
            n,
            &mut ms3,
        )
    });
    assert!((ms3 - ms).abs() <= 1e-12 * ms.abs());
    // The layers really matter at this bandwidth: a plan of one group is slower.
    let one = [0usize];
    let mut ms_one = 0.0;
    check(PS_OK, "ps_plan_makespan", || {
        ps_plan_makespan(
            transfer.as_ptr(),
            exec.as_ptr(),
            3,
            a,
            b,
            one.as_ptr(),
            1,
            &mut ms_one,
        )
    });
    assert!(ms <= ms_one);

    // safetensors, with and without a layer list.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("st.safetensors");
    let w_data: Vec<Vec<u8>> = (0..4).map(|i| bytes(900 + i, 64)).collect();
    let wt = [
        WriteTensor {
            name: "wte.weight",
            dtype: Dtype::F32,
            shape: &[4, 4],
            data: &w_data[0],
        },
        WriteTensor {
            name: "h.0.attn.c_attn.weight",
            dtype: Dtype::F16,
            shape: &[32],
            data: &w_data[1],
        },
        WriteTensor {
            name: "h.0.attn.c_attn.bias",
            dtype: Dtype::U8,
            shape: &[64],
            data: &w_data[2],
        },
        WriteTensor {
            name: "h.0.ln_1.weight",
            dtype: Dtype::F64,
            shape: &[8],
            data: &w_data[3],
        },
    ];
    write_file(&path, &wt, None).unwrap();
    let cpath = cstr(path.to_str().unwrap());
    let list = [c"h.0".as_ptr(), c"wte".as_ptr()];
    check(PS_OK, "ps_store_add_safetensors", || {
        ps_store_add_safetensors(st, c"st-listed".as_ptr(), cpath.as_ptr(), list.as_ptr(), 2)
    });
    check(PS_OK, "ps_store_add_safetensors", || {
        ps_store_add_safetensors(st, c"st-default".as_ptr(), cpath.as_ptr(), null(), 0)
    });
    let listed = c"st-listed";
    assert_eq!(model_info(st, listed).n_layers, 2);
    assert_eq!(layer_info(st, listed, 0).1, "h.0");
    assert_eq!(layer_info(st, listed, 0).0.n_tensors, 3);
    assert_eq!(layer_info(st, listed, 1).1, "wte");
    let default = c"st-default";
    let names: Vec<String> = (0..model_info(st, default).n_layers)
        .map(|i| layer_info(st, default, i).1)
        .collect();
    assert_eq!(names, ["wte", "h.0.attn.c_attn", "h.0.ln_1"]);
    for (i, wt) in wt.iter().enumerate() {
        let mut idx = 0usize;
        let tn = cstr(wt.name);
        check(PS_OK, "ps_store_tensor_index", || {
            ps_store_tensor_index(st, default.as_ptr(), tn.as_ptr(), &mut idx)
        });
        let (ti, _) = tensor_info(st, default, idx);
        let mut got = vec![0u8; 64];
        check(PS_OK, "ps_store_read", || {
            ps_store_read(st, default.as_ptr(), ti.offset, got.as_mut_ptr().cast(), 64)
        });
        assert_eq!(got, w_data[i]);
    }
    let missing = cstr(dir.path().join("missing.safetensors").to_str().unwrap());
    check(PS_ERR_NOT_FOUND, "ps_store_add_safetensors", || {
        ps_store_add_safetensors(st, c"x".as_ptr(), missing.as_ptr(), null(), 0)
    });
    let garbage = dir.path().join("garbage.safetensors");
    std::fs::write(&garbage, b"\x10\0\0\0\0\0\0\0not json at all!").unwrap();
    let cgarbage = cstr(garbage.to_str().unwrap());
    check(PS_ERR_SAFETENSORS, "ps_store_add_safetensors", || {
        ps_store_add_safetensors(st, c"x".as_ptr(), cgarbage.as_ptr(), null(), 0)
    });
    let nomatch = [c"h.0".as_ptr()];
    check(PS_ERR_INVALID_ARGUMENT, "ps_store_add_safetensors", || {
        ps_store_add_safetensors(st, c"x".as_ptr(), cpath.as_ptr(), nomatch.as_ptr(), 1)
    });
    assert_eq!(model_count(st), 3);

    // Usage agrees with the Rust view; remove gives the space back.
    let u = usage(st);
    let ru = rust.usage().unwrap();
    assert_eq!(
        (
            u.capacity_bytes,
            u.used_bytes,
            u.largest_free_bytes,
            u.models,
            u.max_models
        ),
        (
            ru.capacity_bytes,
            ru.used_bytes,
            ru.largest_free_bytes,
            3,
            256
        )
    );
    check(PS_OK, "ps_store_remove_model", || {
        ps_store_remove_model(st, listed.as_ptr())
    });
    check(PS_ERR_NOT_FOUND, "ps_store_remove_model", || {
        ps_store_remove_model(st, listed.as_ptr())
    });
    assert_eq!(model_count(st2), 2);
    let u2 = usage(st2);
    assert!(u2.used_bytes < u.used_bytes && u2.models == 2);
    let mut nm = [0 as c_char; 32];
    let names: Vec<String> = (0..2)
        .map(|i| {
            check(PS_OK, "ps_store_model_name", || {
                ps_store_model_name(st2, i, nm.as_mut_ptr(), 32, null_mut())
            });
            // SAFETY: NUL-terminated by the call.
            unsafe { CStr::from_ptr(nm.as_ptr()) }
                .to_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(names, ["gpt-tiny", "st-default"]);

    // Unlink: the name goes, open handles keep working.
    check(PS_OK, "ps_store_unlink", || ps_store_unlink(cname.as_ptr()));
    assert!(!seg_path(store_name).exists());
    check(PS_ERR_NOT_FOUND, "ps_store_open", || {
        ps_store_open(cname.as_ptr(), &mut out)
    });
    check(PS_ERR_NOT_FOUND, "ps_store_unlink", || {
        ps_store_unlink(cname.as_ptr())
    });
    assert_eq!(model_count(st), 2);
    assert_eq!(model_info(st, model).bytes, mi.bytes);
    check(PS_OK, "ps_store_free", || ps_store_free(st));
    check(PS_OK, "ps_store_free", || ps_store_free(st2));
}

#[test]
fn c_api_add_model_rejects_bad_descriptors() {
    let st = create_store("ffi-bad-desc", 1 << 20, 4);
    let m = small_model(6);
    check(PS_OK, "ps_store_add_model", || m.add(st, "good"));
    let before = usage(st);
    let new = c"new".as_ptr();
    let layers = m.layers();

    // Layers claiming more or fewer tensors than given.
    let tensors = m.tensors();
    check(PS_ERR_INVALID_ARGUMENT, "ps_store_add_model", || {
        ps_store_add_model(st, new, layers.as_ptr(), 3, tensors.as_ptr(), 4)
    });
    let mut over = m.layers();
    over[0].n_tensors = usize::MAX;
    check(PS_ERR_INVALID_ARGUMENT, "ps_store_add_model", || {
        ps_store_add_model(st, new, over.as_ptr(), 3, tensors.as_ptr(), 5)
    });
    // No layers at all.
    check(PS_ERR_INVALID_ARGUMENT, "ps_store_add_model", || {
        ps_store_add_model(st, new, null(), 0, null(), 0)
    });
    // Unknown dtype, too many dimensions, bytes not matching the shape,
    // a name that is not UTF-8, a layer without tensors.
    let nine = [1u64; 9];
    let bad_utf8 = [0xffu8 as c_char, 0];
    for case in 0..5 {
        let mut t = m.tensors();
        let mut l = m.layers();
        match case {
            0 => t[2].dtype = 15,
            1 => {
                t[1].ndim = 9;
                t[1].shape = nine.as_ptr();
            }
            2 => t[3].bytes -= 1,
            3 => t[0].name = bad_utf8.as_ptr(),
            _ => {
                l[1].n_tensors = 0;
                l[2].n_tensors = 4;
            }
        }
        check(PS_ERR_INVALID_ARGUMENT, "ps_store_add_model", || {
            ps_store_add_model(st, new, l.as_ptr(), 3, t.as_ptr(), 5)
        });
    }
    // Too big for the store.
    let big = vec![0u8; 2 << 20];
    let shape = [big.len() as u64];
    let t = [ps_tensor_desc {
        name: c"big.w".as_ptr(),
        dtype: PS_DTYPE_U8,
        ndim: 1,
        shape: shape.as_ptr(),
        data: big.as_ptr().cast(),
        bytes: big.len() as u64,
    }];
    let l = [ps_layer_desc {
        name: c"big".as_ptr(),
        n_tensors: 1,
    }];
    check(PS_ERR_STORE_FULL, "ps_store_add_model", || {
        ps_store_add_model(st, new, l.as_ptr(), 1, t.as_ptr(), 1)
    });

    let after = usage(st);
    assert_eq!(
        (after.used_bytes, after.models),
        (before.used_bytes, before.models)
    );
    assert_eq!(model_count(st), 1);
    check(PS_OK, "ps_store_free", || ps_store_free(st));
    check(PS_OK, "ps_store_unlink", || {
        ps_store_unlink(c"ffi-bad-desc".as_ptr())
    });
}

#[test]
fn c_api_reports_corrupt_and_versioned_stores() {
    let name = "ffi-corrupt";
    let cname = cstr(name);
    let st = create_store(name, 64 << 10, 4);
    check(PS_OK, "ps_store_add_model", || small_model(7).add(st, "m"));
    check(PS_OK, "ps_store_free", || ps_store_free(st));
    let path = seg_path(name);
    let orig = std::fs::read(&path).unwrap();
    let mut out: *mut ps_store = sentinel_ptr();

    let mut f = orig.clone();
    f[..8].copy_from_slice(b"BADMAGIC");
    std::fs::write(&path, &f).unwrap();
    check(PS_ERR_CORRUPT_STORE, "ps_store_open", || {
        ps_store_open(cname.as_ptr(), &mut out)
    });

    let mut f = orig.clone();
    f[8..12].copy_from_slice(&7u32.to_le_bytes());
    std::fs::write(&path, &f).unwrap();
    let msg = check(PS_ERR_STORE_VERSION, "ps_store_open", || {
        ps_store_open(cname.as_ptr(), &mut out)
    });
    assert!(msg.contains('7'), "{msg:?}");

    std::fs::write(&path, &orig[..orig.len() / 2]).unwrap();
    check(PS_ERR_CORRUPT_STORE, "ps_store_open", || {
        ps_store_open(cname.as_ptr(), &mut out)
    });
    assert_eq!(out, sentinel_ptr());

    std::fs::write(&path, &orig).unwrap();
    check(PS_OK, "ps_store_open", || {
        ps_store_open(cname.as_ptr(), &mut out)
    });
    assert_eq!(model_count(out), 1);
    check(PS_OK, "ps_store_free", || ps_store_free(out));
    check(PS_OK, "ps_store_unlink", || ps_store_unlink(cname.as_ptr()));
}

// ---------------------------------------------------------------------------
// 4. ps_plan_groups
// ---------------------------------------------------------------------------

#[test]
fn plan_groups_valid_and_invalid() {
    let t = [4.0, 1.0, 3.0, 0.5, 2.0, 2.0];
    let x = [1.0, 2.0, 0.5, 3.0, 1.0, 0.25];
    let (a, b) = (0.3, 0.2);
    let mut starts = [usize::MAX; 6];
    let (mut n, mut ms) = (0usize, 0.0f64);
    check(PS_OK, "ps_plan_groups", || {
        ps_plan_groups(
            t.as_ptr(),
            x.as_ptr(),
            6,
            a,
            b,
            starts.as_mut_ptr(),
            6,
            &mut n,
            &mut ms,
        )
    });
    let want = pipeswitch::planner::plan_groups(&t, &x, a, b).unwrap();
    assert_eq!(&starts[..n], &want.group_starts[..]);
    assert_eq!(ms, want.makespan_ms);
    assert!(n >= 1 && starts[0] == 0);
    assert!(starts[..n].windows(2).all(|w| w[0] < w[1]) && starts[n - 1] < 6);
    assert!(
        starts[n..].iter().all(|&s| s == usize::MAX),
        "wrote past the groups"
    );
    // The optimum is no worse than one group or one group per layer.
    let mut m1 = 0.0;
    check(PS_OK, "ps_plan_makespan", || {
        ps_plan_makespan(
            t.as_ptr(),
            x.as_ptr(),
            6,
            a,
            b,
            [0usize].as_ptr(),
            1,
            &mut m1,
        )
    });
    let each: Vec<usize> = (0..6).collect();
    let mut m6 = 0.0;
    check(PS_OK, "ps_plan_makespan", || {
        ps_plan_makespan(t.as_ptr(), x.as_ptr(), 6, a, b, each.as_ptr(), 6, &mut m6)
    });
    assert!(ms <= m1 && ms <= m6, "{ms} vs {m1}, {m6}");
    // One group costs exactly: a + sum(t) then b + sum(x).
    assert!((m1 - (a + t.iter().sum::<f64>() + b + x.iter().sum::<f64>())).abs() < 1e-12);

    // Without overheads and with transfer-bound layers, pipelining pays: the
    // plan has more than one group (makespan 21, against 24 for one group),
    // so a shorter buffer is too small.
    let t2 = [5.0, 5.0, 5.0, 5.0];
    let x2 = [1.0, 1.0, 1.0, 1.0];
    let mut s2 = [usize::MAX; 4];
    let (mut n2, mut ms2) = (0usize, 0.0);
    check(PS_OK, "ps_plan_groups", || {
        ps_plan_groups(
            t2.as_ptr(),
            x2.as_ptr(),
            4,
            0.0,
            0.0,
            s2.as_mut_ptr(),
            4,
            &mut n2,
            &mut ms2,
        )
    });
    assert!(n2 > 1, "expected a pipelined plan, got {n2} group(s)");
    assert!((ms2 - 21.0).abs() < 1e-12, "makespan {ms2}");
    let mut short = [usize::MAX; 4];
    let (mut n3, mut ms3) = (4242usize, -1.0);
    let msg = check(PS_ERR_BUFFER_TOO_SMALL, "ps_plan_groups", || {
        ps_plan_groups(
            t2.as_ptr(),
            x2.as_ptr(),
            4,
            0.0,
            0.0,
            short.as_mut_ptr(),
            n2 - 1,
            &mut n3,
            &mut ms3,
        )
    });
    assert!(
        msg.contains(&n2.to_string()),
        "the needed size is reported: {msg:?}"
    );
    assert_eq!((short, n3, ms3), ([usize::MAX; 4], 4242, -1.0));
    check(PS_ERR_BUFFER_TOO_SMALL, "ps_plan_groups", || {
        ps_plan_groups(
            t2.as_ptr(),
            x2.as_ptr(),
            4,
            0.0,
            0.0,
            short.as_mut_ptr(),
            0,
            &mut n3,
            &mut ms3,
        )
    });
    assert_eq!((short, n3, ms3), ([usize::MAX; 4], 4242, -1.0));

    // Bad numbers, anywhere.
    let bad = [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -1.0];
    for &v in &bad {
        for pos in 0..4 {
            let (mut tb, mut xb) = (t2, x2);
            if pos < 2 {
                tb[pos * 3] = v;
            } else {
                xb[(pos - 2) * 3] = v;
            }
            check(PS_ERR_INVALID_ARGUMENT, "ps_plan_groups", || {
                ps_plan_groups(
                    tb.as_ptr(),
                    xb.as_ptr(),
                    4,
                    0.1,
                    0.1,
                    short.as_mut_ptr(),
                    4,
                    &mut n3,
                    &mut ms3,
                )
            });
        }
        check(PS_ERR_INVALID_ARGUMENT, "ps_plan_groups", || {
            ps_plan_groups(
                t2.as_ptr(),
                x2.as_ptr(),
                4,
                v,
                0.1,
                short.as_mut_ptr(),
                4,
                &mut n3,
                &mut ms3,
            )
        });
        check(PS_ERR_INVALID_ARGUMENT, "ps_plan_groups", || {
            ps_plan_groups(
                t2.as_ptr(),
                x2.as_ptr(),
                4,
                0.1,
                v,
                short.as_mut_ptr(),
                4,
                &mut n3,
                &mut ms3,
            )
        });
    }
    check(PS_ERR_INVALID_ARGUMENT, "ps_plan_groups", || {
        ps_plan_groups(
            t2.as_ptr(),
            x2.as_ptr(),
            0,
            0.1,
            0.1,
            short.as_mut_ptr(),
            4,
            &mut n3,
            &mut ms3,
        )
    });
    check(PS_ERR_INVALID_ARGUMENT, "ps_plan_groups", || {
        ps_plan_groups(
            null(),
            null(),
            0,
            0.1,
            0.1,
            short.as_mut_ptr(),
            4,
            &mut n3,
            &mut ms3,
        )
    });
    assert_eq!((short, n3, ms3), ([usize::MAX; 4], 4242, -1.0));

    // ps_plan_makespan refuses bad plans.
    let mut m = -1.0;
    for plan in [&[1usize][..], &[0, 0], &[0, 2, 1], &[0, 4]] {
        check(PS_ERR_INVALID_ARGUMENT, "ps_plan_makespan", || {
            ps_plan_makespan(
                t2.as_ptr(),
                x2.as_ptr(),
                4,
                0.0,
                0.0,
                plan.as_ptr(),
                plan.len(),
                &mut m,
            )
        });
    }
    check(PS_ERR_INVALID_ARGUMENT, "ps_plan_makespan", || {
        ps_plan_makespan(
            t2.as_ptr(),
            x2.as_ptr(),
            4,
            0.0,
            0.0,
            [0usize].as_ptr(),
            0,
            &mut m,
        )
    });
    assert_eq!(m, -1.0);
}

// ---------------------------------------------------------------------------
// 5. No driver
// ---------------------------------------------------------------------------

#[test]
fn no_driver_answers() {
    let available = pipeswitch::cuda::driver_available();
    assert_eq!(ps_driver_available(), i32::from(available));
    assert_eq!(
        ps_driver_available(),
        i32::from(available),
        "the probe is stable"
    );
    if available {
        // On a GPU machine these calls succeed; the GPU suite covers them.
        return;
    }
    #[track_caller]
    fn no_driver(call: &str, f: impl FnOnce() -> ps_status) {
        let msg = check(PS_ERR_NO_DRIVER, call, f);
        assert!(msg.contains("no CUDA driver"), "{msg:?}");
    }
    let mut count = -5i32;
    no_driver("ps_device_count", || ps_device_count(&mut count));
    assert_eq!(count, -5);
    let mut arena: *mut ps_arena = sentinel_ptr();
    no_driver("ps_arena_create", || {
        ps_arena_create(0, 1 << 20, 0, &mut arena)
    });
    assert_eq!(arena, sentinel_ptr());
    let mut sw: *mut ps_switch = sentinel_ptr();
    no_driver("ps_switch_new", || ps_switch_new(0, &mut sw));
    assert_eq!(sw, sentinel_ptr());
    let (mut bw, mut oh) = (-1.0, -1.0);
    no_driver("ps_measure_h2d", || {
        ps_measure_h2d(0, 64 << 20, &mut bw, &mut oh)
    });
    assert_eq!((bw, oh), (-1.0, -1.0));

    let st = create_store("ffi-no-driver", 1 << 20, 4);
    no_driver("ps_store_pin", || ps_store_pin(st, 0));
    // The store works without a driver all the same.
    check(PS_OK, "ps_store_add_model", || small_model(8).add(st, "m"));
    assert_eq!(model_count(st), 1);
    check(PS_OK, "ps_store_free", || ps_store_free(st));
    check(PS_OK, "ps_store_unlink", || {
        ps_store_unlink(c"ffi-no-driver".as_ptr())
    });
}

// ---------------------------------------------------------------------------
// 6. Status strings, versions, the message
// ---------------------------------------------------------------------------

#[test]
fn status_strings() {
    let codes = [
        PS_OK,
        PS_ERR_NULL_ARGUMENT,
        PS_ERR_INVALID_ARGUMENT,
        PS_ERR_BUFFER_TOO_SMALL,
        PS_ERR_INVALID_HANDLE,
        PS_ERR_NOT_FOUND,
        PS_ERR_ALREADY_EXISTS,
        PS_ERR_STORE_FULL,
        PS_ERR_ARENA_FULL,
        PS_ERR_INVALID_STATE,
        PS_ERR_NO_DRIVER,
        PS_ERR_NO_DEVICE,
        PS_ERR_CUDA,
        PS_ERR_CUDA_OUT_OF_MEMORY,
        PS_ERR_IO,
        PS_ERR_OS,
        PS_ERR_CORRUPT_STORE,
        PS_ERR_STORE_VERSION,
        PS_ERR_SAFETENSORS,
        PS_ERR_PTX,
        PS_ERR_PROTOCOL,
        PS_ERR_DISCONNECTED,
        PS_ERR_REFUSED,
        PS_ERR_PANIC,
        PS_ERR_INTERNAL,
    ];
    let distinct: std::collections::BTreeSet<_> = codes.iter().collect();
    assert_eq!(distinct.len(), codes.len(), "status codes collide");
    assert_eq!(PS_OK, 0);
    let mut texts = std::collections::BTreeSet::new();
    for &c in &codes {
        let p = ps_status_str(c);
        assert!(!p.is_null());
        assert_eq!(p, ps_status_str(c), "not a static string");
        let s = status_name(c);
        assert!(!s.is_empty(), "code {c}");
        assert_ne!(s, "unknown status code", "code {c}");
        assert!(texts.insert(s), "code {c} shares its text");
    }
    for c in [
        1,
        99,
        104,
        199,
        205,
        304,
        402,
        503,
        601,
        899,
        902,
        1000,
        u32::MAX,
    ] {
        assert_eq!(status_name(c), "unknown status code", "code {c}");
    }
}

#[test]
fn versions_and_last_error_message() {
    assert_eq!(
        ps_version_number(),
        PS_VERSION_MAJOR * 1_000_000 + PS_VERSION_MINOR * 1000 + PS_VERSION_PATCH
    );
    // SAFETY: static string.
    let v = unsafe { CStr::from_ptr(ps_version_string()) }
        .to_str()
        .unwrap();
    assert_eq!(v, pipeswitch::VERSION);
    // A new thread has no message; messages are per thread.
    std::thread::spawn(|| {
        assert_eq!(last_error(), "");
        assert_eq!(ps_store_unlink(null()), PS_ERR_NULL_ARGUMENT);
        assert_eq!(last_error(), "ps_store_unlink: name is NULL");
    })
    .join()
    .unwrap();
    reset_last_error("");
    let here = last_error();
    std::thread::spawn(|| assert_eq!(ps_store_unlink(null()), PS_ERR_NULL_ARGUMENT))
        .join()
        .unwrap();
    assert_eq!(
        last_error(),
        here,
        "another thread's failure changed this thread's message"
    );
    // A success does not clear it.
    let t = [1.0];
    let mut s = [0usize; 1];
    let (mut n, mut ms) = (0, 0.0);
    assert_eq!(
        ps_plan_groups(
            t.as_ptr(),
            t.as_ptr(),
            1,
            0.0,
            0.0,
            s.as_mut_ptr(),
            1,
            &mut n,
            &mut ms
        ),
        PS_OK
    );
    assert_eq!(last_error(), here);
}

// ---------------------------------------------------------------------------
// 7. Programs and workers (the built-in worker's calls)
// ---------------------------------------------------------------------------

use pipeswitch::ffi::worker::*;
use pipeswitch::model::cpu::tiny_models;
use pipeswitch::model::reference::ModelDef;
use pipeswitch::model::weights::{weight_values, GRAPH_KEY};
use pipeswitch::store::safetensors::write_file_with_metadata;

fn tiny(name: &str) -> ModelDef {
    tiny_models(2, 16)
        .into_iter()
        .find(|d| d.graph.name == name)
        .unwrap()
}

/// A tensor of a safetensors file to write.
struct FileTensor {
    name: String,
    dtype: Dtype,
    shape: Vec<u64>,
    data: Vec<u8>,
}

/// `def`'s weights with their deterministic values, in execution order.
fn def_tensors(def: &ModelDef) -> Vec<FileTensor> {
    def.layers
        .iter()
        .flat_map(|(_, ws)| ws.iter())
        .map(|w| FileTensor {
            name: w.name.clone(),
            dtype: Dtype::F32,
            shape: w.shape.iter().map(|&d| d as u64).collect(),
            data: weight_values(w, 5)
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        })
        .collect()
}

/// Writes `tensors` with `def`'s layer list and `graph` (if any) as the
/// `pipeswitch.graph` metadata, then adds the file to `st` as `model`.
fn add_file(
    st: *const ps_store,
    dir: &std::path::Path,
    model: &str,
    def: &ModelDef,
    tensors: &[FileTensor],
    graph: Option<String>,
) {
    let path = dir.join(format!("{model}.safetensors"));
    let layers: Vec<String> = def.layers.iter().map(|(n, _)| n.clone()).collect();
    let wt: Vec<WriteTensor<'_>> = tensors
        .iter()
        .map(|t| WriteTensor {
            name: &t.name,
            dtype: t.dtype,
            shape: &t.shape,
            data: &t.data,
        })
        .collect();
    let meta: Vec<(&str, String)> = graph.into_iter().map(|g| (GRAPH_KEY, g)).collect();
    write_file_with_metadata(&path, &wt, Some(&layers), &meta).unwrap();
    let (m, p) = (cstr(model), cstr(path.to_str().unwrap()));
    check(PS_OK, "ps_store_add_safetensors", || {
        ps_store_add_safetensors(st, m.as_ptr(), p.as_ptr(), null(), 0)
    });
}

fn graph_json(def: &ModelDef) -> String {
    def.graph.to_json().unwrap()
}

fn program_of(st: *const ps_store, model: &str) -> *mut ps_program {
    let m = cstr(model);
    let mut p: *mut ps_program = sentinel_ptr();
    check(PS_OK, "ps_program_from_store", || {
        ps_program_from_store(st, m.as_ptr(), &mut p)
    });
    assert!(!p.is_null() && p != sentinel_ptr());
    p
}

fn tensor_bytes(p: *const ps_program, name: &str) -> u64 {
    let n = cstr(name);
    let mut b = SENTINEL;
    check(PS_OK, "ps_program_tensor_bytes", || {
        ps_program_tensor_bytes(p, n.as_ptr(), &mut b)
    });
    b
}

#[test]
fn program_from_store_errors() {
    let dir = tempfile::tempdir().unwrap();
    let st = create_store("ffi-program-errors", 16 << 20, 16);
    let gpt2 = tiny("tiny-gpt2");
    add_file(
        st,
        dir.path(),
        "gpt2",
        &gpt2,
        &def_tensors(&gpt2),
        Some(graph_json(&gpt2)),
    );
    // No graph: a model from host buffers, and a file without the metadata.
    check(PS_OK, "ps_store_add_model", || {
        small_model(9).add(st, "plain")
    });
    add_file(st, dir.path(), "nograph", &gpt2, &def_tensors(&gpt2), None);
    // A graph that does not fit the weights: a transposed weight.
    let mut t = def_tensors(&gpt2);
    let fc = t
        .iter_mut()
        .find(|t| t.name == "h.0.mlp.c_fc.weight")
        .unwrap();
    assert_eq!(fc.shape, [128, 256]);
    fc.shape = vec![256, 128];
    add_file(
        st,
        dir.path(),
        "transposed",
        &gpt2,
        &t,
        Some(graph_json(&gpt2)),
    );
    // ... a weight the graph reads is missing.
    let mut t = def_tensors(&gpt2);
    t.retain(|t| t.name != "ln_f.bias");
    add_file(
        st,
        dir.path(),
        "missing",
        &gpt2,
        &t,
        Some(graph_json(&gpt2)),
    );
    // ... right shapes, but fp16 (the worker runs fp32 models).
    let mut t = def_tensors(&gpt2);
    let w = t
        .iter_mut()
        .find(|t| t.name == "h.1.attn.c_proj.weight")
        .unwrap();
    w.dtype = Dtype::F16;
    w.data.truncate(w.data.len() / 2);
    add_file(st, dir.path(), "fp16", &gpt2, &t, Some(graph_json(&gpt2)));
    // ... another model's graph (tiny-bert's weights are not there).
    let bert = tiny("tiny-bert");
    add_file(
        st,
        dir.path(),
        "othergraph",
        &gpt2,
        &def_tensors(&gpt2),
        Some(graph_json(&bert)),
    );
    // ... a graph that is not JSON of a graph.
    add_file(
        st,
        dir.path(),
        "badjson",
        &gpt2,
        &def_tensors(&gpt2),
        Some("{\"ops\": 3".into()),
    );

    let mut p: *mut ps_program = sentinel_ptr();
    let model = c"gpt2".as_ptr();
    // NULL arguments and dead or foreign handles; program_out stays alone.
    let msg = null_arg("ps_program_from_store", || {
        ps_program_from_store(null(), model, &mut p)
    });
    assert!(msg.contains("store is NULL"), "{msg}");
    let msg = null_arg("ps_program_from_store", || {
        ps_program_from_store(st, null(), &mut p)
    });
    assert!(msg.contains("model is NULL"), "{msg}");
    let msg = null_arg("ps_program_from_store", || {
        ps_program_from_store(st, model, null_mut())
    });
    assert!(msg.contains("program_out is NULL"), "{msg}");
    let local = 0u64;
    dead_handle("ps_program_from_store", || {
        ps_program_from_store((&local as *const u64).cast(), model, &mut p)
    });
    assert_eq!(p, sentinel_ptr());

    let expect = |name: &str, want: ps_status, needles: &[&str]| {
        let m = cstr(name);
        let mut p: *mut ps_program = sentinel_ptr();
        let msg = check(want, "ps_program_from_store", || {
            ps_program_from_store(st, m.as_ptr(), &mut p)
        });
        assert_eq!(p, sentinel_ptr(), "{name}: program_out written on failure");
        for n in needles {
            assert!(msg.contains(n), "{name}: no {n:?} in {msg:?}");
        }
    };
    expect("nope", PS_ERR_NOT_FOUND, &["nope"]);
    expect("plain", PS_ERR_NOT_FOUND, &["\"plain\" has no graph"]);
    expect("nograph", PS_ERR_NOT_FOUND, &["\"nograph\" has no graph"]);
    expect(
        "transposed",
        PS_ERR_INVALID_ARGUMENT,
        &["h.0.mlp.fc.out", "does not fit"],
    );
    expect(
        "missing",
        PS_ERR_INVALID_ARGUMENT,
        &["ln_f.bias is not a stored tensor"],
    );
    expect(
        "fp16",
        PS_ERR_INVALID_ARGUMENT,
        &["h.1.attn.c_proj.weight", "F16"],
    );
    expect(
        "othergraph",
        PS_ERR_INVALID_ARGUMENT,
        &["is not a stored tensor"],
    );
    expect("badjson", PS_ERR_INVALID_ARGUMENT, &["model graph"]);

    // The model with its own graph binds, and a freed store is refused.
    let good = program_of(st, "gpt2");
    check(PS_OK, "ps_program_free", || ps_program_free(good));
    check(PS_OK, "ps_store_free", || ps_store_free(st));
    dead_handle("ps_program_from_store", || {
        ps_program_from_store(st, model, &mut p)
    });
    assert_eq!(p, sentinel_ptr());
    check(PS_OK, "ps_store_unlink", || {
        ps_store_unlink(c"ffi-program-errors".as_ptr())
    });
}

#[test]
fn program_sizes_and_their_errors() {
    let dir = tempfile::tempdir().unwrap();
    let st = create_store("ffi-program-sizes", 16 << 20, 8);
    let (gpt2, resnet) = (tiny("tiny-gpt2"), tiny("tiny-resnet"));
    add_file(
        st,
        dir.path(),
        "gpt2",
        &gpt2,
        &def_tensors(&gpt2),
        Some(graph_json(&gpt2)),
    );
    add_file(
        st,
        dir.path(),
        "resnet",
        &resnet,
        &def_tensors(&resnet),
        Some(graph_json(&resnet)),
    );

    for (model, def) in [("gpt2", &gpt2), ("resnet", &resnet)] {
        let p = program_of(st, model);
        let mut act = SENTINEL;
        check(PS_OK, "ps_program_activation_bytes", || {
            ps_program_activation_bytes(p, &mut act)
        });
        // Every input and output with its declared size; an activation too.
        let mut io = 0u64;
        for (name, decl) in &def.graph.inputs {
            let want = decl.bytes().unwrap() as u64;
            assert_eq!(tensor_bytes(p, name), want, "{model}: input {name}");
            io += want;
        }
        for name in &def.graph.outputs {
            let (_, decl) = def
                .graph
                .activations
                .iter()
                .find(|(n, _)| n == name)
                .unwrap();
            let want = decl.bytes().unwrap() as u64;
            assert_eq!(tensor_bytes(p, name), want, "{model}: output {name}");
            io += want;
        }
        let (aname, adecl) = &def.graph.activations[1];
        assert_eq!(tensor_bytes(p, aname), adecl.bytes().unwrap() as u64);
        // Inputs and outputs live through the whole run: all in the buffer.
        assert!(
            act != SENTINEL && act >= io && act > 0,
            "{model}: {act} < {io}"
        );
        // The same layout as the Rust API's.
        let store = Store::open("ffi-program-sizes").unwrap();
        let rust = pipeswitch::worker::Program::from_store(&store, model).unwrap();
        assert_eq!(act, rust.activation_bytes(), "{model}");

        // Unknown names (a weight is no input or output) leave bytes_out alone.
        for bad in ["nope", "ln_f.weight", "conv1.weight", ""] {
            let n = cstr(bad);
            let mut b = SENTINEL;
            let msg = check(PS_ERR_NOT_FOUND, "ps_program_tensor_bytes", || {
                ps_program_tensor_bytes(p, n.as_ptr(), &mut b)
            });
            assert!(msg.contains(&format!("{bad:?}")), "{msg}");
            assert_eq!(b, SENTINEL);
        }
        let mut b = SENTINEL;
        let msg = null_arg("ps_program_tensor_bytes", || {
            ps_program_tensor_bytes(p, null(), &mut b)
        });
        assert!(msg.contains("name is NULL"), "{msg}");
        let name = cstr(&def.graph.outputs[0]);
        let msg = null_arg("ps_program_tensor_bytes", || {
            ps_program_tensor_bytes(p, name.as_ptr(), null_mut())
        });
        assert!(msg.contains("bytes_out is NULL"), "{msg}");
        let msg = null_arg("ps_program_activation_bytes", || {
            ps_program_activation_bytes(p, null_mut())
        });
        assert!(msg.contains("bytes_out is NULL"), "{msg}");
        assert_eq!(b, SENTINEL);

        // NULL, foreign (a live store) and freed programs.
        let fp = st.cast::<ps_program>().cast_const();
        for (prog, code) in [(null(), PS_ERR_NULL_ARGUMENT), (fp, PS_ERR_INVALID_HANDLE)] {
            check(code, "ps_program_activation_bytes", || {
                ps_program_activation_bytes(prog, &mut b)
            });
            check(code, "ps_program_tensor_bytes", || {
                ps_program_tensor_bytes(prog, name.as_ptr(), &mut b)
            });
        }
        dead_handle("ps_program_free", || ps_program_free(st.cast()));
        check(PS_OK, "ps_program_free", || ps_program_free(p));
        dead_handle("ps_program_free", || ps_program_free(p));
        dead_handle("ps_program_activation_bytes", || {
            ps_program_activation_bytes(p, &mut b)
        });
        dead_handle("ps_program_tensor_bytes", || {
            ps_program_tensor_bytes(p, name.as_ptr(), &mut b)
        });
        assert_eq!(b, SENTINEL);
    }
    check(PS_OK, "ps_program_free", || ps_program_free(null_mut()));
    // The store survived being passed as a program.
    assert_eq!(model_count(st), 2);
    check(PS_OK, "ps_store_free", || ps_store_free(st));
    check(PS_OK, "ps_store_unlink", || {
        ps_store_unlink(c"ffi-program-sizes".as_ptr())
    });
}

#[test]
fn worker_calls_refuse_null_and_foreign_handles() {
    // No worker can be made without a GPU: check the handle and pointer
    // checks with NULL and with live handles of other types, which must be
    // refused, not reinterpreted. Pointer arguments checked before the
    // worker give PS_ERR_NULL_ARGUMENT whatever the worker.
    let dir = tempfile::tempdir().unwrap();
    let st = create_store("ffi-worker-handles", 16 << 20, 8);
    let gpt2 = tiny("tiny-gpt2");
    add_file(
        st,
        dir.path(),
        "gpt2",
        &gpt2,
        &def_tensors(&gpt2),
        Some(graph_json(&gpt2)),
    );
    let p = program_of(st, "gpt2");
    let fw = p.cast::<ps_worker>(); // a live program, not a worker
    let fa = p.cast::<ps_arena>().cast_const();
    let fs = st.cast::<ps_switch>().cast_const();
    let (ids, out) = (c"input_ids".as_ptr(), c"ln_f.out".as_ptr());
    let input = [0u8; 128];
    let mut buf = [0x5au8; 16384];
    let mut ms = [-2.0f64; 15];

    let mut w: *mut ps_worker = sentinel_ptr();
    let msg = null_arg("ps_worker_new", || ps_worker_new(null(), &mut w));
    assert!(msg.contains("arena is NULL"), "{msg}");
    dead_handle("ps_worker_new", || ps_worker_new(fa, &mut w));
    let msg = null_arg("ps_worker_new", || ps_worker_new(fa, null_mut()));
    assert!(msg.contains("worker_out is NULL"), "{msg}");
    assert_eq!(w, sentinel_ptr());
    check(PS_OK, "ps_worker_free", || ps_worker_free(null_mut()));
    dead_handle("ps_worker_free", || ps_worker_free(fw));

    for (wk, code) in [
        (null_mut(), PS_ERR_NULL_ARGUMENT),
        (fw, PS_ERR_INVALID_HANDLE),
    ] {
        let msg = check(code, "ps_worker_prepare", || ps_worker_prepare(wk, p));
        assert!(msg.contains("worker"), "{msg}");
        check(code, "ps_worker_set_input", || {
            ps_worker_set_input(wk, p, ids, input.as_ptr().cast(), input.len())
        });
        check(code, "ps_worker_synchronize", || ps_worker_synchronize(wk));
        check(code, "ps_worker_read", || {
            ps_worker_read(wk, p, out, buf.as_mut_ptr().cast(), buf.len())
        });
        check(code, "ps_worker_layer_ms", || {
            ps_worker_layer_ms(wk, p, ms.as_mut_ptr(), ms.len())
        });
        // The switch is checked first: a foreign one is refused.
        dead_handle("ps_worker_run", || ps_worker_run(wk, p, fs, 0));
        // NULL pointers checked before the worker.
        let msg = null_arg("ps_worker_run", || ps_worker_run(wk, p, null(), 1));
        assert!(msg.contains("switch is NULL"), "{msg}");
        let msg = null_arg("ps_worker_set_input", || {
            ps_worker_set_input(wk, p, ids, null(), 128)
        });
        assert!(msg.contains("data is NULL"), "{msg}");
        let msg = null_arg("ps_worker_read", || {
            ps_worker_read(wk, p, out, null_mut(), buf.len())
        });
        assert!(msg.contains("out is NULL"), "{msg}");
        let msg = null_arg("ps_worker_layer_ms", || {
            ps_worker_layer_ms(wk, p, null_mut(), 15)
        });
        assert!(msg.contains("ms_out is NULL"), "{msg}");
    }
    // A NULL program with a foreign worker: one of the two is refused.
    let s = ps_worker_prepare(fw, null());
    assert!(
        s == PS_ERR_NULL_ARGUMENT || s == PS_ERR_INVALID_HANDLE,
        "{s}"
    );
    assert_eq!(buf, [0x5a; 16384], "read wrote on failure");
    assert_eq!(ms, [-2.0; 15], "layer_ms wrote on failure");

    // The program passed around as a worker and an arena is unharmed.
    assert_eq!(tensor_bytes(p, "ln_f.out"), 16384);
    check(PS_OK, "ps_program_free", || ps_program_free(p));
    check(PS_OK, "ps_store_free", || ps_store_free(st));
    check(PS_OK, "ps_store_unlink", || {
        ps_store_unlink(c"ffi-worker-handles".as_ptr())
    });
}

/// `ps_store_group_ranges` against the layer table, and
/// `ps_store_model_host_ptr` against `ps_store_read`; bad arguments give a
/// status and a message and leave the outputs alone.
#[test]
fn group_ranges_and_host_ptr() {
    let st = create_store("ffi-group-ranges", 1 << 20, 4);
    let m = small_model(11);
    check(PS_OK, "ps_store_add_model", || m.add(st, "m"));
    let model = c"m";
    let info = model_info(st, model);
    let layers: Vec<ps_layer_info> = (0..info.n_layers).map(|i| layer_info(st, model, i).0).collect();
    let layer_end = |l: usize| layers[l].offset + layers[l].bytes;
    let ranges = |plan: &[usize]| -> (Vec<u64>, Vec<u64>) {
        let (mut s, mut e) = (vec![SENTINEL; plan.len()], vec![SENTINEL; plan.len()]);
        check(PS_OK, "ps_store_group_ranges", || {
            ps_store_group_ranges(st, model.as_ptr(), plan.as_ptr(), plan.len(), s.as_mut_ptr(), e.as_mut_ptr())
        });
        (s, e)
    };
    // Every plan of the three layers: each group runs from the previous
    // group's end (0 first) to the end of its last layer's bytes.
    for plan in [vec![0], vec![0, 1], vec![0, 2], vec![0, 1, 2]] {
        let (s, e) = ranges(&plan);
        for g in 0..plan.len() {
            let last = plan.get(g + 1).map_or(layers.len(), |&n| n) - 1;
            assert_eq!(e[g], layer_end(last), "plan {plan:?} group {g}");
            assert_eq!(s[g], if g == 0 { 0 } else { e[g - 1] }, "plan {plan:?} group {g}");
            assert!(s[g] <= layers[plan[g]].offset && e[g] > s[g], "plan {plan:?} group {g}");
        }
        assert!(*e.last().unwrap() <= info.bytes);
    }

    // Bad plans and arguments: a status, a message, untouched outputs.
    let (mut s, mut e) = ([SENTINEL; 4], [SENTINEL; 4]);
    for (plan, why) in [
        (&[][..], "first group"),
        (&[1][..], "first group"),
        (&[0, 2, 1][..], "not increasing"),
        (&[0, 0][..], "not increasing"),
        (&[0, 3][..], "3 layers"),
    ] {
        let msg = check(PS_ERR_INVALID_ARGUMENT, "ps_store_group_ranges", || {
            ps_store_group_ranges(st, model.as_ptr(), plan.as_ptr(), plan.len(), s.as_mut_ptr(), e.as_mut_ptr())
        });
        assert!(msg.contains(why), "plan {plan:?}: {msg:?}");
    }
    let plan = [0usize, 1];
    check(PS_ERR_NOT_FOUND, "ps_store_group_ranges", || {
        ps_store_group_ranges(st, c"nope".as_ptr(), plan.as_ptr(), 2, s.as_mut_ptr(), e.as_mut_ptr())
    });
    null_arg("ps_store_group_ranges", || {
        ps_store_group_ranges(st, null(), plan.as_ptr(), 2, s.as_mut_ptr(), e.as_mut_ptr())
    });
    null_arg("ps_store_group_ranges", || {
        ps_store_group_ranges(st, model.as_ptr(), null(), 2, s.as_mut_ptr(), e.as_mut_ptr())
    });
    null_arg("ps_store_group_ranges", || {
        ps_store_group_ranges(st, model.as_ptr(), plan.as_ptr(), 2, null_mut(), e.as_mut_ptr())
    });
    null_arg("ps_store_group_ranges", || {
        ps_store_group_ranges(st, model.as_ptr(), plan.as_ptr(), 2, s.as_mut_ptr(), null_mut())
    });
    null_arg("ps_store_group_ranges", || {
        ps_store_group_ranges(null(), model.as_ptr(), plan.as_ptr(), 2, s.as_mut_ptr(), e.as_mut_ptr())
    });
    assert!(s.iter().chain(&e).all(|&v| v == SENTINEL), "outputs written on failure");

    // The host address holds the model's bytes, as ps_store_read reads them.
    let mut ptr = SENTINEL;
    check(PS_ERR_NOT_FOUND, "ps_store_model_host_ptr", || {
        ps_store_model_host_ptr(st, c"nope".as_ptr(), &mut ptr)
    });
    null_arg("ps_store_model_host_ptr", || ps_store_model_host_ptr(st, model.as_ptr(), null_mut()));
    null_arg("ps_store_model_host_ptr", || ps_store_model_host_ptr(st, null(), &mut ptr));
    null_arg("ps_store_model_host_ptr", || ps_store_model_host_ptr(null(), model.as_ptr(), &mut ptr));
    assert_eq!(ptr, SENTINEL);
    check(PS_OK, "ps_store_model_host_ptr", || ps_store_model_host_ptr(st, model.as_ptr(), &mut ptr));
    assert!(ptr != 0 && ptr != SENTINEL);
    let mut want = vec![0u8; info.bytes as usize];
    check(PS_OK, "ps_store_read", || {
        ps_store_read(st, model.as_ptr(), 0, want.as_mut_ptr().cast(), want.len())
    });
    // SAFETY: the store maps the model's bytes at ptr while it is stored
    // and the store open (this test removes nothing).
    let got = unsafe { std::slice::from_raw_parts(ptr as *const u8, info.bytes as usize) };
    assert_eq!(got, &want[..]);
    assert!(want.iter().any(|&b| b != 0));

    // A lease: the same address and the model's id; bad arguments write
    // nothing; a freed lease is no longer a handle.
    let (mut id, mut lptr, mut lease) = (SENTINEL, SENTINEL, null_mut::<ps_model_lease>());
    check(PS_ERR_NOT_FOUND, "ps_store_lease", || ps_store_lease(st, c"nope".as_ptr(), &mut id, &mut lptr, &mut lease));
    null_arg("ps_store_lease", || ps_store_lease(null(), model.as_ptr(), &mut id, &mut lptr, &mut lease));
    null_arg("ps_store_lease", || ps_store_lease(st, null(), &mut id, &mut lptr, &mut lease));
    null_arg("ps_store_lease", || ps_store_lease(st, model.as_ptr(), null_mut(), &mut lptr, &mut lease));
    null_arg("ps_store_lease", || ps_store_lease(st, model.as_ptr(), &mut id, null_mut(), &mut lease));
    null_arg("ps_store_lease", || ps_store_lease(st, model.as_ptr(), &mut id, &mut lptr, null_mut()));
    assert!(id == SENTINEL && lptr == SENTINEL && lease.is_null(), "outputs written on failure");
    check(PS_OK, "ps_store_lease", || ps_store_lease(st, model.as_ptr(), &mut id, &mut lptr, &mut lease));
    assert_eq!((id, lptr), (info.id, ptr));
    check(PS_OK, "ps_model_lease_free", || ps_model_lease_free(lease));
    check(PS_ERR_INVALID_HANDLE, "ps_model_lease_free", || ps_model_lease_free(lease));
    check(PS_OK, "ps_model_lease_free", || ps_model_lease_free(null_mut()));

    check(PS_OK, "ps_store_free", || ps_store_free(st));
    check(PS_OK, "ps_store_unlink", || ps_store_unlink(c"ffi-group-ranges".as_ptr()));
}

/// `ps_store_copy_schedule`: the copies cover the groups' bytes in order,
/// none past `max_chunk`, each group's event after the copy that completes
/// it; the buffer-size protocol; bad arguments leave the outputs alone.
#[test]
fn copy_schedule_of_a_plan() {
    let st = create_store("ffi-copy-schedule", 1 << 20, 4);
    let m = small_model(12);
    check(PS_OK, "ps_store_add_model", || m.add(st, "m"));
    let model = c"m";
    let schedule = |plan: &[usize], min: u64, max: u64| -> (Vec<(u64, u64)>, Vec<usize>) {
        let mut n = usize::MAX;
        check(PS_ERR_BUFFER_TOO_SMALL, "ps_store_copy_schedule", || {
            ps_store_copy_schedule(st, model.as_ptr(), plan.as_ptr(), plan.len(), min, max, null_mut(), 0, &mut n, null_mut())
        });
        assert!((1..1000).contains(&n), "{n}");
        let mut ranges = vec![SENTINEL; 2 * n];
        let mut group_copy = vec![usize::MAX; plan.len()];
        let mut n2 = 0usize;
        check(PS_OK, "ps_store_copy_schedule", || {
            ps_store_copy_schedule(st, model.as_ptr(), plan.as_ptr(), plan.len(), min, max, ranges.as_mut_ptr(), n,
                                   &mut n2, group_copy.as_mut_ptr())
        });
        assert_eq!(n2, n);
        (ranges.chunks(2).map(|r| (r[0], r[1])).collect(), group_copy)
    };
    for plan in [vec![0], vec![0, 1], vec![0, 2], vec![0, 1, 2]] {
        let mut ends = vec![0u64; plan.len()];
        let mut s = vec![0u64; plan.len()];
        check(PS_OK, "ps_store_group_ranges", || {
            ps_store_group_ranges(st, model.as_ptr(), plan.as_ptr(), plan.len(), s.as_mut_ptr(), ends.as_mut_ptr())
        });
        for (min, max) in [(4 << 20, 64 << 20), (1, 1 << 20), (1, 100), (200, 300)] {
            let (copies, group_copy) = schedule(&plan, min, max);
            assert_eq!(copies[0].0, 0);
            assert!(copies.windows(2).all(|w| w[0].1 == w[1].0), "{copies:?}");
            assert_eq!(copies.last().unwrap().1, *ends.last().unwrap());
            assert!(copies.iter().all(|c| c.1 - c.0 <= max), "{copies:?}");
            for (g, &c) in group_copy.iter().enumerate() {
                assert!(copies[c].1 >= ends[g], "plan {plan:?} ({min}, {max}): group {g} before its bytes");
                assert!(c == 0 || copies[c - 1].1 < ends[g], "plan {plan:?} ({min}, {max}): group {g} late");
            }
            if min == 1 {
                // No merging: every group's event follows a copy that ends at its end.
                assert!(group_copy.iter().enumerate().all(|(g, &c)| copies[c].1 == ends[g]));
            }
        }
        // The default chunking: the tiny model is one copy after the first
        // group's own (a plan of one group: one copy).
        let (copies, _) = schedule(&plan, 4 << 20, 64 << 20);
        assert_eq!(copies.len(), plan.len().min(2), "{plan:?}: {copies:?}");
        assert_eq!(copies[0].1, ends[0], "the first group's own copy");
    }

    let plan = [0usize, 1, 2];
    let mut ranges = [SENTINEL; 8];
    let mut group_copy = [77usize; 3];
    let mut n = 55usize;
    for (p, min, max) in [(&[0usize, 0][..], 1, 10), (&[1][..], 1, 10), (&plan[..], 0, 10), (&plan[..], 10, 1)] {
        check(PS_ERR_INVALID_ARGUMENT, "ps_store_copy_schedule", || {
            ps_store_copy_schedule(st, model.as_ptr(), p.as_ptr(), p.len(), min, max, ranges.as_mut_ptr(), 4, &mut n,
                                   group_copy.as_mut_ptr())
        });
    }
    check(PS_ERR_NOT_FOUND, "ps_store_copy_schedule", || {
        ps_store_copy_schedule(st, c"nope".as_ptr(), plan.as_ptr(), 3, 1, 10, ranges.as_mut_ptr(), 4, &mut n,
                               group_copy.as_mut_ptr())
    });
    null_arg("ps_store_copy_schedule", || {
        ps_store_copy_schedule(st, model.as_ptr(), plan.as_ptr(), 3, 4 << 20, 64 << 20, ranges.as_mut_ptr(), 4,
                               null_mut(), group_copy.as_mut_ptr())
    });
    null_arg("ps_store_copy_schedule", || {
        ps_store_copy_schedule(st, model.as_ptr(), plan.as_ptr(), 3, 4 << 20, 64 << 20, ranges.as_mut_ptr(), 4, &mut n,
                               null_mut())
    });
    null_arg("ps_store_copy_schedule", || {
        ps_store_copy_schedule(st, model.as_ptr(), plan.as_ptr(), 3, 4 << 20, 64 << 20, null_mut(), 4, &mut n,
                               group_copy.as_mut_ptr())
    });
    null_arg("ps_store_copy_schedule", || {
        ps_store_copy_schedule(st, model.as_ptr(), null(), 3, 4 << 20, 64 << 20, ranges.as_mut_ptr(), 4, &mut n,
                               group_copy.as_mut_ptr())
    });
    assert_eq!(n, 55);
    assert!(ranges.iter().all(|&v| v == SENTINEL) && group_copy.iter().all(|&v| v == 77));

    check(PS_OK, "ps_store_free", || ps_store_free(st));
    check(PS_OK, "ps_store_unlink", || ps_store_unlink(c"ffi-copy-schedule".as_ptr()));
}
