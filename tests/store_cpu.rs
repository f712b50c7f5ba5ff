//! The host model store through its Rust API, on the CPU only (no CUDA
//! driver needed): round trips, bad input, corruption, a writer that dies
//! half-way, profiles, safetensors files and concurrent use.
//!
//! Every store lives in one temporary directory per test binary
//! (`PIPESWITCH_SHM_DIR`, set once before any store is touched), and every
//! test uses its own store names.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use pipeswitch::store::layout::{
    self, ALLOC_ALIGN, ENTRY_BYTES, HEADER_BYTES, LAYOUT_VERSION, MAX_NAME,
};
use pipeswitch::store::safetensors::{self as st, WriteTensor};
use pipeswitch::store::{
    Dtype, LayerSpec, Model, ModelSpec, ModelSummary, Store, TensorSpec, Usage, TENSOR_ALIGN,
};
use pipeswitch::Error;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

mod common;
use common::{bytes, open, seg_path, shm_dir};

/// Creates a store, first making sure the environment points at our directory.
fn create(name: &str, capacity: u64, max_models: u32) -> Store {
    shm_dir();
    let s =
        Store::create(name, capacity, max_models).unwrap_or_else(|e| panic!("create {name}: {e}"));
    assert_eq!(s.path(), seg_path(name));
    assert_eq!(Store::segment_path(name).unwrap(), seg_path(name));
    s
}



#[derive(Debug, Clone)]
struct T {
    name: String,
    dtype: Dtype,
    shape: Vec<u64>,
    data: Vec<u8>,
}

#[derive(Debug, Clone)]
struct L {
    name: String,
    tensors: Vec<T>,
}

/// A model whose bytes the test owns.
#[derive(Debug, Clone)]
struct M {
    layers: Vec<L>,
}

fn t(name: &str, dtype: Dtype, shape: &[u64], seed: u64) -> T {
    let n = shape.iter().product::<u64>() * dtype.size();
    T {
        name: name.into(),
        dtype,
        shape: shape.to_vec(),
        data: bytes(seed, n as usize),
    }
}

fn l(name: &str, tensors: Vec<T>) -> L {
    L {
        name: name.into(),
        tensors,
    }
}

impl M {
    fn spec(&self) -> ModelSpec<'_> {
        ModelSpec {
            attributes: vec![],
            layers: self
                .layers
                .iter()
                .map(|l| LayerSpec {
                    name: l.name.clone(),
                    tensors: l
                        .tensors
                        .iter()
                        .map(|t| TensorSpec {
                            name: t.name.clone(),
                            dtype: t.dtype,
                            shape: t.shape.clone(),
                            data: &t.data,
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    fn tensors(&self) -> Vec<&T> {
        self.layers.iter().flat_map(|l| &l.tensors).collect()
    }

    /// Bytes the store reserves for this model (weights and metadata, page-aligned).
    fn alloc_bytes(&self) -> u64 {
        let lay = layout::layout_model(&self.spec()).expect("layout");
        (lay.data_bytes + lay.meta.len() as u64).div_ceil(ALLOC_ALIGN) * ALLOC_ALIGN
    }
}

/// Three layers, seven tensors, seven dtypes, sizes that are not multiples of 256.
fn model_a(seed: u64) -> M {
    M {
        layers: vec![
            l(
                "embed",
                vec![
                    t("embed.weight", Dtype::F32, &[10, 6], seed),
                    t("embed.pos", Dtype::F16, &[7], seed + 1),
                ],
            ),
            l(
                "block.0",
                vec![
                    t("block.0.w", Dtype::Bf16, &[3, 5, 2], seed + 2),
                    t("block.0.b", Dtype::I8, &[33], seed + 3),
                    t("block.0.s", Dtype::U8, &[], seed + 4),
                    t("block.0.i", Dtype::I64, &[4], seed + 5),
                ],
            ),
            l(
                "head",
                vec![
                    t("head.w", Dtype::F64, &[5, 5], seed + 6),
                    t("head.mask", Dtype::Bool, &[300], seed + 7),
                ],
            ),
        ],
    }
}

/// One layer with one U8 tensor of `n` bytes.
fn model_bytes(n: u64, seed: u64) -> M {
    M {
        layers: vec![l("only", vec![t("only.w", Dtype::U8, &[n], seed)])],
    }
}

/// `n_layers` layers of one F32 tensor of `elems` elements each.
fn model_layers(n_layers: usize, elems: u64, seed: u64) -> M {
    M {
        layers: (0..n_layers)
            .map(|i| {
                l(
                    &format!("layer.{i}"),
                    vec![t(
                        &format!("layer.{i}.w"),
                        Dtype::F32,
                        &[elems],
                        seed + i as u64,
                    )],
                )
            })
            .collect(),
    }
}

fn add(s: &Store, name: &str, m: &M) -> Arc<Model> {
    s.add_model(name, &m.spec(), &mut |_, _| {})
        .unwrap_or_else(|e| panic!("add {name}: {e}"))
}

/// Checks a stored model against what was added: names, dtypes, shapes,
/// alignment, tiling, and the bytes in the segment file itself.
fn check_model(path: &Path, m: &Model, want: &M) {
    let want_tensors = want.tensors();
    assert_eq!(
        m.layers.len(),
        want.layers.len(),
        "layer count of {}",
        m.name
    );
    assert_eq!(
        m.tensors.len(),
        want_tensors.len(),
        "tensor count of {}",
        m.name
    );
    assert!(
        m.bytes > 0 && m.bytes % TENSOR_ALIGN == 0,
        "model bytes {} not 256-aligned",
        m.bytes
    );
    let file = std::fs::read(path).expect("reading the segment file");
    assert!(m.segment_offset + m.bytes <= file.len() as u64);
    let mut prev_end = 0u64;
    for (i, (got, want)) in m.tensors.iter().zip(&want_tensors).enumerate() {
        assert_eq!(got.name, want.name);
        assert_eq!(got.dtype, want.dtype, "dtype of {}", got.name);
        assert_eq!(got.shape, want.shape, "shape of {}", got.name);
        assert_eq!(got.bytes, want.data.len() as u64, "bytes of {}", got.name);
        assert_eq!(
            got.offset % TENSOR_ALIGN,
            0,
            "offset of {} not 256-aligned",
            got.name
        );
        if i > 0 {
            assert!(
                got.offset > m.tensors[i - 1].offset,
                "offsets not increasing at {}",
                got.name
            );
        }
        assert!(
            got.offset >= prev_end,
            "{} overlaps the tensor before it",
            got.name
        );
        prev_end = got.offset + got.bytes;
        assert!(prev_end <= m.bytes, "{} runs past the model", got.name);
        let start = (m.segment_offset + got.offset) as usize;
        assert!(
            file[start..start + got.bytes as usize] == want.data[..],
            "stored bytes of {} differ",
            got.name
        );
        assert_eq!(m.tensor(&want.name).map(|(j, _)| j), Some(i));
    }
    let (mut pos, mut first) = (0u64, 0usize);
    for (li, (got, want)) in m.layers.iter().zip(&want.layers).enumerate() {
        assert_eq!(got.name, want.name);
        assert_eq!(m.layer_index(&want.name), Some(li));
        assert_eq!(
            got.first_tensor, first,
            "first tensor of layer {}",
            got.name
        );
        assert_eq!(
            got.n_tensors,
            want.tensors.len(),
            "tensor count of layer {}",
            got.name
        );
        assert_eq!(
            got.offset, pos,
            "layer {} does not start where the previous one ended",
            got.name
        );
        assert_eq!(
            got.offset, m.tensors[first].offset,
            "layer {} starts before its first tensor",
            got.name
        );
        for tensor in &m.tensors[first..first + got.n_tensors] {
            assert!(
                tensor.offset >= got.offset
                    && tensor.offset + tensor.bytes <= got.offset + got.bytes
            );
        }
        pos = got.offset + got.bytes;
        first += got.n_tensors;
    }
    assert_eq!(pos, m.bytes, "layers do not tile [0, bytes)");
    assert_eq!(first, m.tensors.len());
    assert_eq!(m.layer_range(0, m.layers.len()), Some((0, m.bytes)));
}

/// Everything observable about a store, read through a fresh handle (no
/// cache). Models are compared through their Debug text (NaN profiles).
#[derive(Debug, PartialEq)]
struct Snapshot {
    models: Vec<ModelSummary>,
    details: Vec<String>,
    data: Vec<Vec<u8>>,
    usage: Usage,
    generation: u64,
}

fn snapshot(name: &str) -> Snapshot {
    let s = open(name);
    let models = s.models().unwrap();
    let file = std::fs::read(s.path()).unwrap();
    let mut details = Vec::new();
    let mut data = Vec::new();
    for m in &models {
        let d = s
            .model(&m.name)
            .unwrap_or_else(|e| panic!("model {}: {e}", m.name));
        let (a, b) = (
            d.segment_offset as usize,
            (d.segment_offset + d.bytes) as usize,
        );
        data.push(file[a..b].to_vec());
        assert!(s.model_bytes(&d).unwrap() == file[a..b]);
        details.push(format!("{d:?}"));
    }
    Snapshot {
        models,
        details,
        data,
        usage: s.usage().unwrap(),
        generation: s.generation(),
    }
}

#[track_caller]
fn assert_unchanged(name: &str, before: &Snapshot) {
    let now = snapshot(name);
    assert!(
        now == *before,
        "store {name} changed:\nbefore {before:?}\nnow {now:?}"
    );
}

fn names(s: &Store) -> Vec<String> {
    s.models().unwrap().into_iter().map(|m| m.name).collect()
}

fn patch(path: &Path, offset: u64, data: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(data, offset).unwrap();
}

fn read_at(path: &Path, offset: u64, n: usize) -> Vec<u8> {
    let f = std::fs::File::open(path).unwrap();
    let mut b = vec![0u8; n];
    f.read_exact_at(&mut b, offset).unwrap();
    b
}

/// The table slot whose entry holds `model`'s name (the name starts at byte 80).
fn slot_of(path: &Path, max_models: u32, model: &str) -> u64 {
    (0..u64::from(max_models))
        .find(|&slot| {
            let e = read_at(
                path,
                HEADER_BYTES + slot * ENTRY_BYTES,
                ENTRY_BYTES as usize,
            );
            e[72..76] == (model.len() as u32).to_le_bytes()
                && &e[80..80 + model.len()] == model.as_bytes()
        })
        .unwrap_or_else(|| panic!("no table entry for {model}"))
}

// ---------------------------------------------------------------------------
// 1. Round trip
// ---------------------------------------------------------------------------

#[test]
fn create_open_list_remove_round_trip() {
    let name = "roundtrip";
    let a = model_a(1);
    let b = model_layers(4, 100, 50);
    let s = create(name, 1 << 20, 8);
    assert!(s.capacity() >= 1 << 20);
    assert_eq!(s.models().unwrap(), vec![]);
    let u0 = s.usage().unwrap();
    assert_eq!(
        u0,
        Usage {
            capacity_bytes: s.capacity(),
            used_bytes: 0,
            largest_free_bytes: s.capacity(),
            models: 0,
            max_models: 8
        }
    );
    let g0 = s.generation();

    let ma = add(&s, "model-a", &a);
    let mb = add(&s, "model-b", &b);
    assert!(s.generation() > g0, "adds must bump the generation");
    assert_ne!(ma.id, mb.id);
    assert_eq!(ma.name, "model-a");
    assert!(
        mb.segment_offset >= ma.segment_offset + ma.bytes,
        "models overlap"
    );

    // A second handle sees both, with the same descriptions.
    let s2 = open(name);
    assert_eq!(s2.capacity(), s.capacity());
    let listed = s2.models().unwrap();
    assert_eq!(
        listed,
        vec![
            ModelSummary {
                name: "model-a".into(),
                id: ma.id,
                bytes: ma.bytes,
                n_layers: 3,
                n_tensors: 8
            },
            ModelSummary {
                name: "model-b".into(),
                id: mb.id,
                bytes: mb.bytes,
                n_layers: 4,
                n_tensors: 4
            },
        ]
    );
    let ra = s2.model("model-a").unwrap();
    let rb = s2.model("model-b").unwrap();
    assert_eq!(format!("{ra:?}"), format!("{ma:?}"));
    check_model(&seg_path(name), &ra, &a);
    check_model(&seg_path(name), &rb, &b);
    for layer in &ra.layers {
        assert!(layer.exec_ms.is_nan(), "no profile stored yet");
    }
    assert!(s2.contains(&ra).unwrap());

    let u = s2.usage().unwrap();
    assert_eq!(u.models, 2);
    assert_eq!(u.used_bytes, a.alloc_bytes() + b.alloc_bytes());
    assert_eq!(u.largest_free_bytes, u.capacity_bytes - u.used_bytes);
    assert!(matches!(s2.model("model-c"), Err(Error::NotFound(_))));

    // Remove through the second handle; the first one sees it at once.
    let a_offset = ra.segment_offset;
    s2.remove_model("model-a").unwrap();
    assert_eq!(names(&s), vec!["model-b"]);
    assert!(matches!(s.model("model-a"), Err(Error::NotFound(_))));
    assert!(!s.contains(&ma).unwrap());
    assert!(matches!(s.remove_model("model-a"), Err(Error::NotFound(_))));
    assert_eq!(s.usage().unwrap().used_bytes, b.alloc_bytes());
    check_model(&seg_path(name), &s.model("model-b").unwrap(), &b);

    // The freed space is reused: the next add lands there (or lower).
    let c = model_a(99);
    let mc = add(&s, "model-c", &c);
    assert!(
        mc.segment_offset <= a_offset,
        "freed space not reused: {} > {a_offset}",
        mc.segment_offset
    );
    assert!(mc.id > mb.id, "ids are never reused");
    check_model(&seg_path(name), &mc, &c);
    check_model(&seg_path(name), &s2.model("model-b").unwrap(), &b);
    // Re-adding the removed name works and gets a fresh id.
    let ma2 = add(&s2, "model-a", &a);
    assert!(ma2.id > mc.id);
    assert!(
        !s.contains(&ma).unwrap(),
        "the old id must not count as the re-added model"
    );
    assert!(s.contains(&ma2).unwrap());
    check_model(&seg_path(name), &s.model("model-a").unwrap(), &a);
    assert_eq!(names(&s2), vec!["model-c", "model-b", "model-a"]);

    drop((s, s2));
    Store::destroy(name).unwrap();
    assert!(!seg_path(name).exists());
    assert!(matches!(Store::open(name), Err(Error::NotFound(_))));
    assert!(matches!(Store::destroy(name), Err(Error::NotFound(_))));
}

#[test]
fn zero_sized_and_scalar_tensors() {
    let name = "zero-sized";
    let s = create(name, 64 << 10, 4);
    let m = M {
        layers: vec![
            l("empty", vec![t("empty.w", Dtype::F32, &[0, 7], 1)]),
            l(
                "scalar",
                vec![
                    t("scalar.w", Dtype::F64, &[], 2),
                    t("scalar.z", Dtype::U8, &[3, 0], 3),
                ],
            ),
        ],
    };
    let got = add(&s, "z", &m);
    assert_eq!(got.tensors[0].bytes, 0);
    assert_eq!(got.tensors[1].bytes, 8);
    assert_eq!(
        got.layers[0].bytes, 0,
        "a layer of empty tensors holds no bytes"
    );
    assert_eq!(got.bytes, TENSOR_ALIGN);
    let again = open(name).model("z").unwrap();
    assert_eq!(format!("{again:?}"), format!("{got:?}"));
    let file = std::fs::read(seg_path(name)).unwrap();
    let o = (got.segment_offset + got.tensors[1].offset) as usize;
    assert_eq!(file[o..o + 8], m.layers[1].tensors[0].data[..]);
    drop(s);
    Store::destroy(name).unwrap();
}

// ---------------------------------------------------------------------------
// 2. Bad input leaves the store unchanged
// ---------------------------------------------------------------------------

#[test]
fn bad_input_leaves_the_store_unchanged() {
    let name = "bad-input";
    let s = create(name, 64 << 10, 4);
    let a = model_bytes(1000, 1);
    let b = model_a(2);
    add(&s, "a", &a);
    add(&s, "b", &b);
    let snap = snapshot(name);
    let intact = |snap: &Snapshot| {
        assert_unchanged(name, snap);
        let s = open(name);
        check_model(&seg_path(name), &s.model("a").unwrap(), &a);
        check_model(&seg_path(name), &s.model("b").unwrap(), &b);
    };

    // Duplicate model name.
    let r = s.add_model("a", &model_bytes(10, 3).spec(), &mut |_, _| {});
    assert!(matches!(r, Err(Error::AlreadyExists(_))), "{r:?}");
    intact(&snap);

    // Bad model names.
    for bad in [String::new(), "x".repeat(MAX_NAME + 1), "a\0b".to_string()] {
        let r = s.add_model(&bad, &model_bytes(10, 3).spec(), &mut |_, _| {});
        assert!(
            matches!(r, Err(Error::InvalidArgument(_))),
            "name {bad:?}: {r:?}"
        );
    }
    intact(&snap);

    // Empty model, a layer without tensors.
    let r = s.add_model("c", &ModelSpec::default(), &mut |_, _| {});
    assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
    let mut no_tensors = model_a(4);
    no_tensors.layers.insert(1, l("hollow", vec![]));
    let r = s.add_model("c", &no_tensors.spec(), &mut |_, _| {});
    assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
    intact(&snap);

    // Data length not matching dtype * shape (in the last layer, after
    // valid ones), too short and too long.
    for delta in [-1i64, 1] {
        let mut wrong = model_a(5);
        let last = wrong
            .layers
            .last_mut()
            .unwrap()
            .tensors
            .first_mut()
            .unwrap();
        let n = (last.data.len() as i64 + delta) as usize;
        last.data.resize(n, 0);
        let r = s.add_model("c", &wrong.spec(), &mut |_, _| {});
        assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
    }
    intact(&snap);

    // Duplicate tensor names, within a layer and across layers.
    let mut dup = model_a(6);
    dup.layers[2].tensors[1].name = "embed.weight".into();
    let r = s.add_model("c", &dup.spec(), &mut |_, _| {});
    assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
    let mut dup = model_a(6);
    dup.layers[1].tensors[1].name = dup.layers[1].tensors[0].name.clone();
    let r = s.add_model("c", &dup.spec(), &mut |_, _| {});
    assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
    // Empty tensor and layer names, too many dimensions.
    let mut unnamed = model_a(7);
    unnamed.layers[0].tensors[0].name.clear();
    assert!(matches!(
        s.add_model("c", &unnamed.spec(), &mut |_, _| {}),
        Err(Error::InvalidArgument(_))
    ));
    let mut unnamed = model_a(7);
    unnamed.layers[2].name.clear();
    assert!(matches!(
        s.add_model("c", &unnamed.spec(), &mut |_, _| {}),
        Err(Error::InvalidArgument(_))
    ));
    let nine = M {
        layers: vec![l("x", vec![t("x.w", Dtype::U8, &[1; 9], 8)])],
    };
    assert!(matches!(
        s.add_model("c", &nine.spec(), &mut |_, _| {}),
        Err(Error::InvalidArgument(_))
    ));
    intact(&snap);

    // A model bigger than the whole store.
    let huge = model_bytes(100 << 10, 9);
    let mut called = false;
    let r = s.add_model("huge", &huge.spec(), &mut |_, _| called = true);
    assert!(matches!(r, Err(Error::StoreFull(_))), "{r:?}");
    assert!(
        !called,
        "no byte may be written for a model that does not fit"
    );
    intact(&snap);

    // Fill the store by bytes: 64 KiB, a and b take 4 KiB each.
    assert_eq!(a.alloc_bytes() + b.alloc_bytes(), 8 << 10);
    let c = model_bytes(40 << 10, 10);
    assert_eq!(c.alloc_bytes(), 44 << 10);
    add(&s, "c", &c);
    let snap = snapshot(name);
    assert_eq!(snap.usage.largest_free_bytes, 12 << 10);
    let r = s.add_model("d", &model_bytes(16 << 10, 11).spec(), &mut |_, _| {});
    assert!(matches!(r, Err(Error::StoreFull(_))), "{r:?}");
    intact(&snap);
    check_model(&seg_path(name), &s.model("c").unwrap(), &c);

    // Fill the table: four slots.
    let d = model_bytes(100, 12);
    add(&s, "d", &d);
    let snap = snapshot(name);
    assert_eq!((snap.usage.models, snap.usage.max_models), (4, 4));
    assert!(
        snap.usage.largest_free_bytes >= model_bytes(100, 13).alloc_bytes(),
        "bytes would fit"
    );
    let r = s.add_model("e", &model_bytes(100, 13).spec(), &mut |_, _| {});
    assert!(matches!(r, Err(Error::StoreFull(_))), "{r:?}");
    intact(&snap);
    check_model(&seg_path(name), &s.model("c").unwrap(), &c);
    check_model(&seg_path(name), &s.model("d").unwrap(), &d);

    // Removing one frees a slot again.
    s.remove_model("c").unwrap();
    add(&s, "e", &model_bytes(100, 13));
    assert_eq!(names(&s), vec!["a", "b", "e", "d"]);

    drop(s);
    Store::destroy(name).unwrap();
}

#[test]
fn store_names_and_existence() {
    shm_dir();
    let too_long = "n".repeat(65);
    for bad in [
        "",
        "../x",
        "a/b",
        ".hidden",
        too_long.as_str(),
        "sp ace",
        "nul\0",
    ] {
        assert!(
            matches!(
                Store::create(bad, 1 << 20, 4),
                Err(Error::InvalidArgument(_))
            ),
            "create {bad:?}"
        );
        assert!(
            matches!(Store::open(bad), Err(Error::InvalidArgument(_))),
            "open {bad:?}"
        );
        assert!(
            matches!(Store::destroy(bad), Err(Error::InvalidArgument(_))),
            "destroy {bad:?}"
        );
    }
    // Nothing was created outside (or inside) the directory.
    assert!(!shm_dir().join("pipeswitch-").exists());

    // The longest legal name, and all legal characters.
    let longest = "L".repeat(64);
    for good in [longest.as_str(), "a.b-c_D9"] {
        let s = create(good, 4096, 1);
        drop(s);
        Store::destroy(good).unwrap();
    }

    // Bad capacities.
    assert!(matches!(
        Store::create("bad-capacity", 100, 4),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        Store::create("bad-capacity", 1 << 20, 0),
        Err(Error::InvalidArgument(_))
    ));
    assert!(!seg_path("bad-capacity").exists());

    // Capacities that cannot be had: rejected, and no file is left behind.
    for cap in [u64::MAX, u64::MAX - 100, u64::MAX - 5000, 1 << 63] {
        let r = Store::create("huge-capacity", cap, 4);
        assert!(
            matches!(r, Err(Error::InvalidArgument(_))),
            "capacity {cap}: {r:?}"
        );
        assert!(!seg_path("huge-capacity").exists());
    }
    // Representable but far beyond any file system (checked before any
    // block is reserved): fails cleanly too.
    let r = Store::create("huge-capacity", 1 << 50, 4);
    assert!(
        matches!(r, Err(Error::StoreFull(_) | Error::Os { .. })),
        "{r:?}"
    );
    assert!(!seg_path("huge-capacity").exists());

    assert!(matches!(
        Store::open("never-created"),
        Err(Error::NotFound(_))
    ));

    let name = "exists";
    let s = create(name, 64 << 10, 4);
    let a = model_a(3);
    add(&s, "a", &a);
    let snap = snapshot(name);
    let r = Store::create(name, 1 << 20, 4);
    assert!(matches!(r, Err(Error::AlreadyExists(_))), "{r:?}");
    // The existing store is untouched, through the old handle and a new one.
    assert_unchanged(name, &snap);
    check_model(&seg_path(name), &s.model("a").unwrap(), &a);
    drop(s);
    Store::destroy(name).unwrap();
}

// ---------------------------------------------------------------------------
// 3. Corruption
// ---------------------------------------------------------------------------

/// A store holding model_a(seed) as "a", all handles closed.
fn store_with_a(name: &str, seed: u64) -> M {
    let s = create(name, 64 << 10, 4);
    let a = model_a(seed);
    add(&s, "a", &a);
    a
}

#[test]
fn corrupt_header_magic() {
    let name = "corrupt-magic";
    let a = store_with_a(name, 1);
    let path = seg_path(name);
    let good = read_at(&path, 0, 8);
    assert_eq!(good, b"PSSTORE\0");
    patch(&path, 0, b"NOTASTOR");
    let r = Store::open(name);
    assert!(matches!(r, Err(Error::CorruptStore(_))), "{r:?}");
    // The magic was the only problem.
    patch(&path, 0, &good);
    check_model(&path, &open(name).model("a").unwrap(), &a);
    Store::destroy(name).unwrap();
}

#[test]
fn corrupt_header_version() {
    let name = "corrupt-version";
    let a = store_with_a(name, 2);
    let path = seg_path(name);
    assert_eq!(read_at(&path, 8, 4), LAYOUT_VERSION.to_le_bytes());
    patch(&path, 8, &(LAYOUT_VERSION + 1).to_le_bytes());
    match Store::open(name) {
        Err(Error::StoreVersion { found, supported }) => {
            assert_eq!((found, supported), (LAYOUT_VERSION + 1, LAYOUT_VERSION));
        }
        other => panic!("expected StoreVersion, got {other:?}"),
    }
    patch(&path, 8, &LAYOUT_VERSION.to_le_bytes());
    check_model(&path, &open(name).model("a").unwrap(), &a);
    Store::destroy(name).unwrap();
}

#[test]
fn corrupt_header_fields() {
    let name = "corrupt-header";
    store_with_a(name, 3);
    let path = seg_path(name);
    // The data size (checksummed): a flipped bit is caught.
    let orig = read_at(&path, 48, 1);
    patch(&path, 48, &[orig[0] ^ 0x10]);
    let r = Store::open(name);
    assert!(matches!(r, Err(Error::CorruptStore(_))), "{r:?}");
    patch(&path, 48, &orig);
    open(name);
    Store::destroy(name).unwrap();
}

#[test]
fn truncated_segment() {
    let name = "truncated";
    store_with_a(name, 4);
    let path = seg_path(name);
    let len = std::fs::metadata(&path).unwrap().len();
    for new_len in [len - 4096, len - 1, 4096, 100, 0] {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(new_len)
            .unwrap();
        let r = Store::open(name);
        assert!(
            matches!(r, Err(Error::CorruptStore(_))),
            "length {new_len}: {r:?}"
        );
    }
    Store::destroy(name).unwrap();
}

#[test]
fn corrupt_model_metadata() {
    let name = "corrupt-meta";
    let s = create(name, 64 << 10, 4);
    let (a, b) = (model_a(5), model_layers(3, 50, 6));
    let ma = add(&s, "a", &a);
    add(&s, "b", &b);
    drop(s);
    let path = seg_path(name);
    // The metadata follows the weights; byte 50 lies in the first layer record.
    let at = ma.segment_offset + ma.bytes + 50;
    let orig = read_at(&path, at, 1)[0];
    patch(&path, at, &[orig ^ 0x01]);

    let s = open(name);
    let r = s.model("a");
    assert!(matches!(r, Err(Error::CorruptStore(_))), "{r:?}");
    assert!(matches!(
        s.set_layer_exec_ms("a", &[1.0, 2.0, 3.0]),
        Err(Error::CorruptStore(_))
    ));
    // The other model still loads, and the listing still names both.
    check_model(&path, &s.model("b").unwrap(), &b);
    assert_eq!(names(&s), vec!["a", "b"]);
    assert_eq!(s.usage().unwrap().models, 2);

    // A flipped letter of a name: structurally fine, only the checksum
    // catches it. The strings start at the offset stored at byte 24.
    patch(&path, at, &[orig]);
    check_model(&path, &open(name).model("a").unwrap(), &a);
    let meta = ma.segment_offset + ma.bytes;
    let strings = u32::from_le_bytes(read_at(&path, meta + 24, 4).try_into().unwrap()) as u64;
    assert_eq!(read_at(&path, meta + strings, 5), b"embed");
    patch(&path, meta + strings, b"d");
    let r = open(name).model("a");
    assert!(matches!(r, Err(Error::CorruptStore(_))), "{r:?}");
    check_model(&path, &open(name).model("b").unwrap(), &b);
    patch(&path, meta + strings, b"e");
    check_model(&path, &open(name).model("a").unwrap(), &a);

    // Also the magic of the metadata.
    patch(&path, ma.segment_offset + ma.bytes, b"XXXX");
    assert!(matches!(open(name).model("a"), Err(Error::CorruptStore(_))));
    check_model(&path, &open(name).model("b").unwrap(), &b);
    // A corrupt model can still be removed.
    s.remove_model("a").unwrap();
    assert_eq!(names(&s), vec!["b"]);
    drop(s);
    Store::destroy(name).unwrap();
}

#[test]
fn corrupt_table_entry() {
    let name = "corrupt-entry";
    let s = create(name, 64 << 10, 4);
    let (a, b, c) = (model_a(7), model_layers(2, 10, 8), model_bytes(700, 9));
    add(&s, "a", &a);
    add(&s, "bb", &b);
    add(&s, "ccc", &c);
    drop(s);
    let path = seg_path(name);

    // A flipped byte in b's name (covered by the entry checksum): reported
    // as damage naming the slot, never skipped; intact models stay readable.
    let corrupt_naming = |r: Result<(), Error>, slots: &[u64]| match r {
        Err(Error::CorruptStore(m)) => slots.iter().all(|s| m.contains(&format!("slot {s}"))),
        _ => false,
    };
    let slot_b = slot_of(&path, 4, "bb");
    let at = HEADER_BYTES + slot_b * ENTRY_BYTES + 81;
    let orig = read_at(&path, at, 1)[0];
    patch(&path, at, &[orig ^ 0x20]);
    let s = open(name);
    assert!(corrupt_naming(s.models().map(drop), &[slot_b]));
    assert!(corrupt_naming(s.usage().map(drop), &[slot_b]));
    assert!(corrupt_naming(s.check(), &[slot_b]));
    check_model(&path, &s.model("a").unwrap(), &a);
    check_model(&path, &s.model("ccc").unwrap(), &c);
    // A name not among the intact entries may be the damaged one.
    assert!(corrupt_naming(s.model("bb").map(drop), &[slot_b]));
    assert!(corrupt_naming(s.model("bB").map(drop), &[slot_b]));
    // No add while the damaged entry's extent is unknown.
    let r = s.add_model("d", &model_bytes(10, 3).spec(), &mut |_, _| {});
    assert!(corrupt_naming(r.map(drop), &[slot_b]));

    // An unknown state in c's entry.
    let slot_c = slot_of(&path, 4, "ccc");
    patch(
        &path,
        HEADER_BYTES + slot_c * ENTRY_BYTES,
        &7u32.to_le_bytes(),
    );
    assert!(corrupt_naming(open(name).models().map(drop), &[slot_b, slot_c]));
    assert!(corrupt_naming(s.check(), &[slot_b, slot_c]));

    // A flipped byte in a's allocation offset.
    let slot_a = slot_of(&path, 4, "a");
    check_model(&path, &s.model("a").unwrap(), &a);
    patch(&path, HEADER_BYTES + slot_a * ENTRY_BYTES + 17, &[0xff]);
    assert!(corrupt_naming(open(name).check(), &[slot_a, slot_b, slot_c]));
    assert!(corrupt_naming(open(name).model("a").map(drop), &[slot_a]));
    drop(s);
    Store::destroy(name).unwrap();
}

// ---------------------------------------------------------------------------
// 4. A writer that dies mid-add
// ---------------------------------------------------------------------------

#[test]
fn writer_dying_mid_add_is_reclaimed() {
    use nix::sys::wait::{waitpid, WaitStatus};
    use nix::unistd::{fork, ForkResult};

    let name = "dying-writer";
    let s = create(name, 4 << 20, 8);
    let a = model_a(11);
    add(&s, "a", &a);
    let u0 = s.usage().unwrap();
    let gen0 = s.generation();
    // Eight tensors of 64 KiB: the child dies after the fourth.
    let half = model_layers(8, 16 << 10, 12);
    let spec = half.spec();

    // SAFETY: the child only opens the store, adds and _exits; it never
    // returns into the test harness.
    match unsafe { fork() }.expect("fork") {
        ForkResult::Child => {
            let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let Ok(c) = Store::open(name) else { return 3 };
                let mut die = |done: u64, total: u64| {
                    if done * 2 >= total && done < total {
                        // SAFETY: ends the child at once, as a crash would.
                        unsafe { libc::_exit(0) }
                    }
                };
                match c.add_model("half", &spec, &mut die) {
                    Ok(_) => 4,
                    Err(_) => 5,
                }
            }))
            .unwrap_or(6);
            // SAFETY: as above.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => {
            let status = waitpid(child, None).expect("waitpid");
            assert_eq!(
                status,
                WaitStatus::Exited(child, 0),
                "the child did not die mid-add"
            );
        }
    }

    // The half-written model is invisible, but its space is still reserved.
    let s2 = open(name);
    for h in [&s, &s2] {
        assert_eq!(names(h), vec!["a"]);
        assert!(matches!(h.model("half"), Err(Error::NotFound(_))));
        let u = h.usage().unwrap();
        assert_eq!(u.models, 1);
        assert_eq!(
            u.used_bytes,
            u0.used_bytes + half.alloc_bytes(),
            "the child reserved no space?"
        );
    }
    assert_eq!(
        s.generation(),
        gen0,
        "an uncommitted add must not bump the generation"
    );
    check_model(&seg_path(name), &s.model("a").unwrap(), &a);

    // The next add reclaims it.
    let fresh = model_layers(3, 1000, 13);
    let mf = add(&s2, "fresh", &fresh);
    let u = s.usage().unwrap();
    assert_eq!(
        u.used_bytes,
        u0.used_bytes + fresh.alloc_bytes(),
        "the dead writer's space was not reclaimed"
    );
    assert_eq!(u.models, 2);
    assert_eq!(
        mf.segment_offset,
        s.model("a").unwrap().segment_offset + a.alloc_bytes(),
        "first fit reuses the gap"
    );
    check_model(&seg_path(name), &s.model("a").unwrap(), &a);
    check_model(&seg_path(name), &s.model("fresh").unwrap(), &fresh);
    // The dead writer's name is free again.
    add(&s, "half", &half);
    assert_eq!(
        s.usage().unwrap().used_bytes,
        u0.used_bytes + fresh.alloc_bytes() + half.alloc_bytes()
    );
    check_model(&seg_path(name), &s2.model("half").unwrap(), &half);
    check_model(&seg_path(name), &s2.model("a").unwrap(), &a);
    assert_eq!(names(&s2), vec!["a", "fresh", "half"]);
    drop((s, s2));
    Store::destroy(name).unwrap();
}

#[test]
fn failing_add_in_this_process_releases_its_reservation() {
    // A progress callback that panics unwinds out of add_model while the
    // entry is `Writing`; the same process's later adds must still work.
    let name = "panicking-add";
    let s = create(name, 1 << 20, 4);
    let a = model_a(21);
    add(&s, "a", &a);
    let u0 = s.usage().unwrap();
    let m = model_layers(4, 1000, 22);
    let spec = m.spec();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        s.add_model("boom", &spec, &mut |done, total| {
            if done > 0 && done < total {
                panic!("progress callback fails");
            }
        })
    }));
    assert!(r.is_err());
    assert_eq!(names(&s), vec!["a"]);
    check_model(&seg_path(name), &s.model("a").unwrap(), &a);
    // Retrying the same name must not fail with AlreadyExists forever, and
    // the space of the abandoned write must come back.
    let again = s.add_model("boom", &spec, &mut |_, _| {});
    assert!(again.is_ok(), "retry after a failed add: {again:?}");
    assert_eq!(
        s.usage().unwrap().used_bytes,
        u0.used_bytes + m.alloc_bytes()
    );
    drop(s);
    Store::destroy(name).unwrap();
}

/// Fills a model from `m`'s bytes with `add_model_filled` (pieces of
/// `piece` bytes, `threads` threads), the way the LLM code writes weights.
fn add_filled(s: &Store, name: &str, m: &M, piece: usize, threads: usize) -> pipeswitch::Result<Arc<Model>> {
    let tensors = m.tensors();
    let empty: Vec<T> = tensors.iter().map(|t| T { data: vec![], ..(*t).clone() }).collect();
    let hollow = M {
        layers: m.layers.iter().map(|l| L { name: l.name.clone(), tensors: l.tensors.iter().map(|t| empty.iter().find(|e| e.name == t.name).unwrap().clone()).collect() }).collect(),
    };
    s.add_model_filled(name, &hollow.spec(), piece, threads, &|i, off, out| {
        let src = &tensors[i].data;
        out.copy_from_slice(&src[off as usize..off as usize + out.len()]);
        Ok(())
    }, &mut |_, _| {})
}

#[test]
fn add_model_filled_round_trip_and_failing_fills() {
    let name = "filled";
    let s = create(name, 1 << 20, 4);
    // A model whose bytes are all 0xff first takes the space, so gaps the
    // filled model leaves unwritten would show.
    let mut ff = model_layers(3, 3000, 40);
    for l in &mut ff.layers {
        for t in &mut l.tensors {
            t.data.iter_mut().for_each(|b| *b = 0xff);
        }
    }
    add(&s, "ff", &ff);
    s.remove_model("ff").unwrap();
    let a = model_a(41);
    let got = add_filled(&s, "a", &a, 256, 3).unwrap();
    check_model(&seg_path(name), &got, &a);
    check_model(&seg_path(name), &open(name).model("a").unwrap(), &a);
    let file = std::fs::read(seg_path(name)).unwrap();
    let mut pos = 0u64;
    for t in &got.tensors {
        let gap = &file[(got.segment_offset + pos) as usize..(got.segment_offset + t.offset) as usize];
        assert!(gap.iter().all(|&b| b == 0), "bytes before {} are not zero", t.name);
        pos = t.offset + t.bytes;
    }
    let big = model_layers(4, 5000, 42);
    let big_filled = add_filled(&s, "big", &big, 1024, 4).unwrap();
    check_model(&seg_path(name), &big_filled, &big);
    s.remove_model("big").unwrap();
    let u0 = s.usage().unwrap();
    let before = snapshot(name);

    // Bad piece sizes, and a fill that fails half-way: nothing changes.
    for piece in [0, 100, 257] {
        assert!(matches!(add_filled(&s, "b", &big, piece, 2), Err(Error::InvalidArgument(_))), "piece {piece}");
    }
    let hollow = big.spec();
    let calls = std::sync::atomic::AtomicUsize::new(0);
    let r = s.add_model_filled("b", &hollow, 256, 3, &|_, _, _| {
        if calls.fetch_add(1, Ordering::SeqCst) == 20 {
            Err(Error::invalid("the fill fails"))
        } else {
            Ok(())
        }
    }, &mut |_, _| {});
    assert!(matches!(r, Err(Error::InvalidArgument(ref m)) if m.contains("the fill fails")), "{r:?}");
    assert_eq!(names(&s), vec!["a"]);
    assert_eq!(s.usage().unwrap().used_bytes, u0.used_bytes);

    // A fill that panics unwinds out of the add; the reservation is freed.
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        s.add_model_filled("b", &hollow, 256, 3, &|_, off, _| {
            if off == 1024 {
                panic!("fill panics");
            }
            Ok(())
        }, &mut |_, _| {})
    }));
    assert!(r.is_err());
    assert_eq!(names(&s), vec!["a"]);
    assert_eq!(s.usage().unwrap().used_bytes, u0.used_bytes);
    let mut after = snapshot(name);
    after.generation = before.generation;
    assert_eq!(after.models, before.models);
    assert_eq!(after.usage, before.usage);

    // The same name then adds, and a model too large for the store is refused.
    check_model(&seg_path(name), &add_filled(&s, "b", &big, 512, 2).unwrap(), &big);
    let huge = model_bytes(2 << 20, 43);
    assert!(matches!(add_filled(&s, "huge", &huge, 256, 2), Err(Error::StoreFull(_))));
    assert_eq!(names(&s), vec!["a", "b"]);
    drop(s);
    Store::destroy(name).unwrap();
}

#[test]
fn adds_while_a_filled_add_is_written_keep_apart() {
    // A long filled add (an LLM's weights) is mid-write while other adds go
    // on through the same handle and another one: nobody reclaims or reuses
    // its reservation, and every model reads back its own bytes.
    let name = "filled-concurrent";
    let s = Arc::new(create(name, 1 << 20, 8));
    let big = model_layers(4, 8000, 50);
    let (a, b) = (model_a(51), model_layers(2, 3000, 52));
    let started = Arc::new(std::sync::Barrier::new(2));
    let go_on = Arc::new(AtomicBool::new(false));
    let writer = {
        let (s, big, started, go_on) = (s.clone(), big.clone(), started.clone(), go_on.clone());
        std::thread::spawn(move || {
            let tensors = big.tensors().into_iter().cloned().collect::<Vec<T>>();
            let first = AtomicBool::new(true);
            s.add_model_filled("big", &big.spec(), 1024, 2, &|i, off, out| {
                if first.swap(false, Ordering::SeqCst) {
                    started.wait();
                    while !go_on.load(Ordering::SeqCst) {
                        std::thread::yield_now();
                    }
                }
                out.copy_from_slice(&tensors[i].data[off as usize..off as usize + out.len()]);
                Ok(())
            }, &mut |_, _| {})
            .map(|m| m.id)
        })
    };
    started.wait();
    add(&s, "a", &a);
    add(&open(name), "b", &b);
    assert!(matches!(s.add_model("big", &b.spec(), &mut |_, _| {}), Err(Error::AlreadyExists(_))));
    go_on.store(true, Ordering::SeqCst);
    writer.join().unwrap().unwrap();
    for (n, m) in [("big", &big), ("a", &a), ("b", &b)] {
        check_model(&seg_path(name), &open(name).model(n).unwrap(), m);
    }
    drop(s);
    Store::destroy(name).unwrap();
}

#[test]
fn add_model_filled_refuses_sizes_that_overflow() {
    // Shapes whose bytes come near 2^64 (the data is never given, so only
    // the layout's arithmetic stands between them and the fill's writes).
    let name = "filled-overflow";
    let s = create(name, 1 << 20, 4);
    let a = model_a(60);
    add(&s, "a", &a);
    let before = snapshot(name);
    for shape in [vec![u64::MAX - 100], vec![(u64::MAX >> 1) + 1, 1], vec![u64::MAX >> 8]] {
        let m = M { layers: vec![l("huge", vec![T { name: "huge.w".into(), dtype: Dtype::U8, shape: shape.clone(), data: vec![] }])] };
        let calls = std::sync::atomic::AtomicUsize::new(0);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            s.add_model_filled("huge", &m.spec(), 1 << 30, 1, &|_, _, _| {
                calls.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }, &mut |_, _| {})
            .map(|_| ())
        }));
        match r {
            Ok(Err(Error::InvalidArgument(_) | Error::StoreFull(_))) => {}
            Ok(other) => panic!("shape {shape:?}: {other:?}"),
            Err(_) => panic!("shape {shape:?}: add_model_filled panicked"),
        }
        assert_eq!(calls.load(Ordering::SeqCst), 0, "shape {shape:?}: the fill ran");
    }
    assert_unchanged(name, &before);
    check_model(&seg_path(name), &s.model("a").unwrap(), &a);
    drop(s);
    Store::destroy(name).unwrap();
}

// ---------------------------------------------------------------------------
// 5. Profiles
// ---------------------------------------------------------------------------

#[test]
fn set_layer_exec_ms_round_trip() {
    let name = "profiles";
    let s = create(name, 1 << 20, 4);
    let a = model_a(31);
    let b = model_layers(2, 10, 32);
    add(&s, "a", &a);
    add(&s, "b", &b);
    let s2 = open(name);
    // Fill s2's cache before the update.
    let before = s2.model("a").unwrap();
    assert!(before.layers.iter().all(|l| l.exec_ms.is_nan()));
    let gen = s.generation();

    let times = [1.5, 0.0, 2.25];
    s.set_layer_exec_ms("a", &times).unwrap();
    assert!(s.generation() > gen);
    for h in [&s, &s2, &open(name)] {
        let m = h.model("a").unwrap();
        let got: Vec<f64> = m.layers.iter().map(|l| l.exec_ms).collect();
        assert_eq!(got, times);
        // Nothing else changed.
        check_model(&seg_path(name), &m, &a);
        assert_eq!(m.id, before.id);
        assert!(
            h.model("b")
                .unwrap()
                .layers
                .iter()
                .all(|l| l.exec_ms.is_nan()),
            "b untouched"
        );
    }

    // Overwrite, then reject bad input without changing the stored values.
    let times2 = [3.0, 4.0, 1e-3];
    s2.set_layer_exec_ms("a", &times2).unwrap();
    let snap = snapshot(name);
    let bad: [&[f64]; 7] = [
        &[1.0, 2.0],
        &[1.0, 2.0, 3.0, 4.0],
        &[],
        &[1.0, f64::NAN, 3.0],
        &[1.0, 2.0, -0.5],
        &[f64::INFINITY, 2.0, 3.0],
        &[1.0, f64::NEG_INFINITY, 3.0],
    ];
    for v in bad {
        let r = s.set_layer_exec_ms("a", v);
        assert!(matches!(r, Err(Error::InvalidArgument(_))), "{v:?}: {r:?}");
    }
    assert!(matches!(
        s.set_layer_exec_ms("missing", &[1.0]),
        Err(Error::NotFound(_))
    ));
    assert_unchanged(name, &snap);
    let got: Vec<f64> = s
        .model("a")
        .unwrap()
        .layers
        .iter()
        .map(|l| l.exec_ms)
        .collect();
    assert_eq!(got, times2);
    drop((s, s2));
    Store::destroy(name).unwrap();
}

// ---------------------------------------------------------------------------
// 6. safetensors
// ---------------------------------------------------------------------------

/// GPT-2-like tensors, in data order.
fn gpt2_tensors() -> Vec<T> {
    vec![
        t("wte.weight", Dtype::F32, &[6, 4], 100),
        t("wpe.weight", Dtype::F32, &[5, 4], 101),
        t("h.0.ln_1.weight", Dtype::F32, &[4], 102),
        t("h.0.ln_1.bias", Dtype::F32, &[4], 103),
        t("h.0.attn.c_attn.weight", Dtype::F16, &[4, 12], 104),
        t("h.0.attn.c_attn.bias", Dtype::F16, &[12], 105),
        t("h.0.mlp.c_fc.weight", Dtype::Bf16, &[4, 16], 106),
        t("h.1.ln_1.weight", Dtype::F32, &[4], 107),
        t("h.1.attn.c_attn.weight", Dtype::F16, &[4, 12], 108),
        t("ln_f.weight", Dtype::F32, &[4], 109),
    ]
}

fn write_st(path: &Path, tensors: &[T], layers: Option<&[String]>) {
    let w: Vec<WriteTensor<'_>> = tensors
        .iter()
        .map(|t| WriteTensor {
            name: &t.name,
            dtype: t.dtype,
            shape: &t.shape,
            data: &t.data,
        })
        .collect();
    st::write_file(path, &w, layers).unwrap();
}

/// The expected model: `layers` lists (layer, tensor names in order).
fn expect(tensors: &[T], layers: &[(&str, &[&str])]) -> M {
    let by_name: BTreeMap<&str, &T> = tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    M {
        layers: layers
            .iter()
            .map(|(name, ts)| {
                l(
                    name,
                    ts.iter()
                        .map(|n| (*by_name.get(n).expect("tensor")).clone())
                        .collect(),
                )
            })
            .collect(),
    }
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// The header of a safetensors file, parsed.
fn st_header(path: &Path) -> serde_json::Value {
    let b = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    assert_eq!((8 + n) % 8, 0, "header not padded to 8 bytes");
    serde_json::from_slice(&b[8..8 + n]).unwrap()
}

/// A file from a raw header text and data.
fn raw_st(path: &Path, header: &str, data: &[u8]) {
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header.as_bytes());
    b.extend_from_slice(data);
    std::fs::write(path, b).unwrap();
}

#[test]
fn safetensors_default_layering() {
    let name = "st-default";
    let dir = tempfile::tempdir().unwrap();
    let s = create(name, 1 << 20, 8);
    let ts = gpt2_tensors();
    let path = dir.path().join("gpt2.safetensors");
    write_st(&path, &ts, None);
    assert!(
        st_header(&path).get("__metadata__").is_none(),
        "no layer list was given"
    );

    let m = s
        .add_safetensors("gpt2", &path, None, &mut |_, _| {})
        .unwrap();
    let want = expect(
        &ts,
        &[
            ("wte", &["wte.weight"]),
            ("wpe", &["wpe.weight"]),
            ("h.0.ln_1", &["h.0.ln_1.weight", "h.0.ln_1.bias"]),
            (
                "h.0.attn.c_attn",
                &["h.0.attn.c_attn.weight", "h.0.attn.c_attn.bias"],
            ),
            ("h.0.mlp.c_fc", &["h.0.mlp.c_fc.weight"]),
            ("h.1.ln_1", &["h.1.ln_1.weight"]),
            ("h.1.attn.c_attn", &["h.1.attn.c_attn.weight"]),
            ("ln_f", &["ln_f.weight"]),
        ],
    );
    check_model(&seg_path(name), &m, &want);
    check_model(&seg_path(name), &open(name).model("gpt2").unwrap(), &want);

    // By hand: the JSON lists the tensors in another order than their data,
    // one prefix comes back after another one, other metadata is ignored,
    // and a name without a dot is its own layer.
    let hand = vec![
        t("h.0.attn.w", Dtype::F32, &[2, 3], 200),
        t("h.0.mlp.w", Dtype::I32, &[5], 201),
        t("h.0.attn.b", Dtype::F32, &[3], 202),
        t("scale", Dtype::F64, &[], 203),
    ];
    let mut data = Vec::new();
    let mut offs = Vec::new();
    for x in &hand {
        offs.push((data.len(), data.len() + x.data.len()));
        data.extend_from_slice(&x.data);
    }
    let header = format!(
        r#"{{"scale":{{"dtype":"F64","shape":[],"data_offsets":[{},{}]}},"__metadata__":{{"format":"pt"}},"h.0.attn.b":{{"dtype":"F32","shape":[3],"data_offsets":[{},{}]}},"h.0.mlp.w":{{"dtype":"I32","shape":[5],"data_offsets":[{},{}]}},"h.0.attn.w":{{"dtype":"F32","shape":[2,3],"data_offsets":[{},{}]}}}}"#,
        offs[3].0, offs[3].1, offs[2].0, offs[2].1, offs[1].0, offs[1].1, offs[0].0, offs[0].1
    );
    let hpath = dir.path().join("hand.safetensors");
    raw_st(&hpath, &header, &data);
    let m = s
        .add_safetensors("hand", &hpath, None, &mut |_, _| {})
        .unwrap();
    let want = expect(
        &hand,
        &[
            ("h.0.attn", &["h.0.attn.w", "h.0.attn.b"]),
            ("h.0.mlp", &["h.0.mlp.w"]),
            ("scale", &["scale"]),
        ],
    );
    check_model(&seg_path(name), &m, &want);
    drop(s);
    Store::destroy(name).unwrap();
}

#[test]
fn safetensors_layer_lists() {
    let name = "st-layers";
    let dir = tempfile::tempdir().unwrap();
    let s = create(name, 1 << 20, 8);
    let ts = gpt2_tensors();
    let list = strings(&["wte", "wpe", "h.0", "h.1", "ln_f"]);
    let path = dir.path().join("meta.safetensors");
    write_st(&path, &ts, Some(&list));
    // The list is recorded as a JSON string under pipeswitch.layers.
    let header = st_header(&path);
    let recorded = header["__metadata__"][st::LAYERS_KEY]
        .as_str()
        .expect("pipeswitch.layers is a string");
    assert_eq!(serde_json::from_str::<Vec<String>>(recorded).unwrap(), list);

    // Without an explicit list, the file's list is used.
    let m = s
        .add_safetensors("from-meta", &path, None, &mut |_, _| {})
        .unwrap();
    let want = expect(
        &ts,
        &[
            ("wte", &["wte.weight"]),
            ("wpe", &["wpe.weight"]),
            (
                "h.0",
                &[
                    "h.0.ln_1.weight",
                    "h.0.ln_1.bias",
                    "h.0.attn.c_attn.weight",
                    "h.0.attn.c_attn.bias",
                    "h.0.mlp.c_fc.weight",
                ],
            ),
            ("h.1", &["h.1.ln_1.weight", "h.1.attn.c_attn.weight"]),
            ("ln_f", &["ln_f.weight"]),
        ],
    );
    check_model(&seg_path(name), &m, &want);

    // An explicit list wins over the file's, in its own order; the longest
    // listed prefix takes a tensor.
    let explicit = strings(&["h.0.attn", "h.0", "wte", "wpe", "h.1", "ln_f"]);
    let m = s
        .add_safetensors("explicit", &path, Some(&explicit), &mut |_, _| {})
        .unwrap();
    let want = expect(
        &ts,
        &[
            (
                "h.0.attn",
                &["h.0.attn.c_attn.weight", "h.0.attn.c_attn.bias"],
            ),
            (
                "h.0",
                &["h.0.ln_1.weight", "h.0.ln_1.bias", "h.0.mlp.c_fc.weight"],
            ),
            ("wte", &["wte.weight"]),
            ("wpe", &["wpe.weight"]),
            ("h.1", &["h.1.ln_1.weight", "h.1.attn.c_attn.weight"]),
            ("ln_f", &["ln_f.weight"]),
        ],
    );
    check_model(&seg_path(name), &m, &want);

    // Prefixes end at dots: "h.1" does not take "h.10.w"; a full tensor
    // name may be a layer of its own.
    let dotted = vec![
        t("h.1.w", Dtype::U8, &[3], 300),
        t("h.10.w", Dtype::U8, &[5], 301),
        t("h.w", Dtype::U8, &[7], 302),
        t("h.1x", Dtype::U8, &[2], 303),
    ];
    let dpath = dir.path().join("dotted.safetensors");
    write_st(&dpath, &dotted, None);
    let m = s
        .add_safetensors(
            "dotted",
            &dpath,
            Some(&strings(&["h.1", "h", "h.w"])),
            &mut |_, _| {},
        )
        .unwrap();
    let want = expect(
        &dotted,
        &[
            ("h.1", &["h.1.w"]),
            ("h", &["h.10.w", "h.1x"]),
            ("h.w", &["h.w"]),
        ],
    );
    check_model(&seg_path(name), &m, &want);

    // Errors, each leaving the store unchanged.
    let snap = snapshot(name);
    let bad_lists = [
        strings(&["wte", "wpe", "h.0", "h.1"]), // ln_f.weight matches no layer
        strings(&["wte", "wpe", "h.0", "h.1", "ln_f", "h.2"]), // h.2 matches nothing
        strings(&["wte", "wpe", "h.0", "h.1", "ln_f", "h.0"]), // listed twice
        strings(&["wte", "wpe", "h", "ln_f", "h.0.attn.c"]), // "h.0.attn.c" is no dot-prefix of c_attn
    ];
    for list in &bad_lists {
        let r = s.add_safetensors("bad", &path, Some(list), &mut |_, _| {});
        assert!(
            matches!(r, Err(Error::InvalidArgument(_))),
            "{list:?}: {r:?}"
        );
    }
    // A file whose own list misses a tensor.
    let short = dir.path().join("short-list.safetensors");
    write_st(&short, &ts, Some(&strings(&["wte", "wpe", "h.0", "h.1"])));
    let r = s.add_safetensors("bad", &short, None, &mut |_, _| {});
    assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
    // A name that exists already.
    let r = s.add_safetensors("explicit", &path, None, &mut |_, _| {});
    assert!(matches!(r, Err(Error::AlreadyExists(_))), "{r:?}");
    assert_unchanged(name, &snap);
    drop(s);
    Store::destroy(name).unwrap();
}

#[test]
fn safetensors_bad_files() {
    let name = "st-bad";
    let dir = tempfile::tempdir().unwrap();
    let s = create(name, 1 << 20, 8);
    let a = model_a(41);
    add(&s, "a", &a);
    let ts = gpt2_tensors();
    let good = dir.path().join("good.safetensors");
    write_st(&good, &ts, None);
    let good_bytes = std::fs::read(&good).unwrap();
    let snap = snapshot(name);

    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("three bytes", vec![1, 2, 3]),
        (
            "truncated data",
            good_bytes[..good_bytes.len() - 5].to_vec(),
        ),
    ];
    cases.push(("truncated header", good_bytes[..40].to_vec()));
    let mut longer = good_bytes.clone();
    longer.extend_from_slice(&[0; 8]);
    cases.push(("trailing bytes", longer));
    let mut garbage = 16u64.to_le_bytes().to_vec();
    garbage.extend_from_slice(b"not json at all!");
    garbage.extend_from_slice(&[0; 32]);
    cases.push(("garbage header", garbage));
    let mut beyond = (1u64 << 20).to_le_bytes().to_vec();
    beyond.extend_from_slice(br#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}"#);
    cases.push(("header length beyond the file", beyond));
    let mut huge = u64::MAX.to_le_bytes().to_vec();
    huge.extend_from_slice(&[b' '; 64]);
    cases.push(("header length u64::MAX", huge));
    let mut out_of_range = Vec::new();
    {
        let h = r#"{"a.w":{"dtype":"U8","shape":[1000],"data_offsets":[0,1000]}}"#;
        out_of_range.extend_from_slice(&(h.len() as u64).to_le_bytes());
        out_of_range.extend_from_slice(h.as_bytes());
        out_of_range.extend_from_slice(&[7; 16]);
    }
    cases.push(("offsets out of range", out_of_range));
    let mut gap = Vec::new();
    {
        let h = r#"{"a.w":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b.w":{"dtype":"U8","shape":[4],"data_offsets":[8,12]}}"#;
        gap.extend_from_slice(&(h.len() as u64).to_le_bytes());
        gap.extend_from_slice(h.as_bytes());
        gap.extend_from_slice(&[7; 12]);
    }
    cases.push(("offsets with a hole", gap));
    let mut wrong_size = Vec::new();
    {
        let h = r#"{"a.w":{"dtype":"F32","shape":[4],"data_offsets":[0,12]}}"#;
        wrong_size.extend_from_slice(&(h.len() as u64).to_le_bytes());
        wrong_size.extend_from_slice(h.as_bytes());
        wrong_size.extend_from_slice(&[7; 12]);
    }
    cases.push(("offsets not matching the shape", wrong_size));
    let mut no_tensors = Vec::new();
    {
        let h = r#"{"__metadata__":{"format":"pt"}}"#;
        no_tensors.extend_from_slice(&(h.len() as u64).to_le_bytes());
        no_tensors.extend_from_slice(h.as_bytes());
    }
    cases.push(("no tensors", no_tensors));
    let mut bad_list = Vec::new();
    {
        let h = r#"{"__metadata__":{"pipeswitch.layers":"[not json"},"a.w":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}"#;
        bad_list.extend_from_slice(&(h.len() as u64).to_le_bytes());
        bad_list.extend_from_slice(h.as_bytes());
        bad_list.extend_from_slice(&[7; 4]);
    }
    cases.push(("bad pipeswitch.layers", bad_list));

    for (i, (what, bytes)) in cases.iter().enumerate() {
        let p = dir.path().join(format!("bad-{i}.safetensors"));
        std::fs::write(&p, bytes).unwrap();
        let mut called = false;
        let r = s.add_safetensors("bad", &p, None, &mut |_, _| called = true);
        match &r {
            Err(Error::Safetensors { path, .. }) => {
                assert!(path.contains(&format!("bad-{i}")), "{what}: {r:?}")
            }
            _ => panic!("{what}: expected a safetensors error, got {r:?}"),
        }
        assert!(!called, "{what}: bytes were written");
        assert_unchanged(name, &snap);
    }

    let r = s.add_safetensors(
        "bad",
        &dir.path().join("missing.safetensors"),
        None,
        &mut |_, _| {},
    );
    assert!(matches!(r, Err(Error::NotFound(_))), "{r:?}");
    assert_unchanged(name, &snap);

    // The good file still goes in afterwards.
    let m = s
        .add_safetensors("good", &good, None, &mut |_, _| {})
        .unwrap();
    assert_eq!(m.tensors.len(), ts.len());
    check_model(&seg_path(name), &s.model("a").unwrap(), &a);
    drop(s);
    Store::destroy(name).unwrap();
}

#[test]
fn safetensors_parse_without_a_store() {
    // parse() borrows the bytes it is given; default_layer_of is the rule.
    assert_eq!(
        st::default_layer_of("h.0.attn.c_attn.weight"),
        "h.0.attn.c_attn"
    );
    assert_eq!(st::default_layer_of("wte"), "wte");
    let dir = tempfile::tempdir().unwrap();
    let ts = gpt2_tensors();
    let p = dir.path().join("p.safetensors");
    write_st(&p, &ts, None);
    let bytes = std::fs::read(&p).unwrap();
    let spec = st::parse(&bytes, "p", None).unwrap();
    assert_eq!(spec.n_tensors(), ts.len());
    let flat: Vec<&TensorSpec<'_>> = spec.layers.iter().flat_map(|l| &l.tensors).collect();
    for (got, want) in flat.iter().zip(&ts) {
        assert_eq!(got.name, want.name);
        assert_eq!(got.data, &want.data[..]);
        // Borrowed from the buffer, not copied.
        let range = bytes.as_ptr_range();
        assert!(range.contains(&got.data.as_ptr()));
    }
    // write_file refuses data that does not match the shape, and names that
    // a safetensors header cannot hold twice (or at all): it must never
    // write a file that parse() then rejects.
    let w = [WriteTensor {
        name: "x",
        dtype: Dtype::F32,
        shape: &[3],
        data: &[0; 11],
    }];
    assert!(matches!(
        st::write_file(&dir.path().join("w"), &w, None),
        Err(Error::InvalidArgument(_))
    ));
    let four = [1u8, 2, 3, 4];
    let dup = [
        WriteTensor {
            name: "a.w",
            dtype: Dtype::U8,
            shape: &[4],
            data: &four,
        },
        WriteTensor {
            name: "a.w",
            dtype: Dtype::U8,
            shape: &[4],
            data: &four,
        },
    ];
    let reserved = [WriteTensor {
        name: "__metadata__",
        dtype: Dtype::U8,
        shape: &[4],
        data: &four,
    }];
    for (what, w) in [
        ("duplicate names", &dup[..]),
        ("reserved name", &reserved[..]),
    ] {
        let p = dir.path().join("dup.safetensors");
        let r = st::write_file(&p, w, None);
        assert!(matches!(r, Err(Error::InvalidArgument(_))), "{what}: {r:?}");
        let r = st::write_file(&p, w, Some(&strings(&["a"])));
        assert!(
            matches!(r, Err(Error::InvalidArgument(_))),
            "{what} with a layer list: {r:?}"
        );
    }
}

// ---------------------------------------------------------------------------
// 7. Concurrency
// ---------------------------------------------------------------------------

#[test]
fn concurrent_adds_removes_and_listing() {
    const THREADS: u64 = 4;
    const ROUNDS: u64 = 20;
    let name = "concurrent";
    let store = Arc::new(create(name, 4 << 20, 40));
    let base = model_a(51);
    add(&store, "base", &base);
    let done = Arc::new(AtomicBool::new(false));

    let reader = {
        let done = done.clone();
        std::thread::spawn(move || {
            let s2 = open(name);
            let mut rounds = 0u64;
            loop {
                let finished = done.load(Ordering::Acquire);
                let listed = s2.models().unwrap();
                assert!(listed.iter().any(|m| m.name == "base"));
                for m in &listed {
                    match s2.model(&m.name) {
                        // Names are never reused, so a loaded model is the listed one.
                        Ok(full) => {
                            assert_eq!((full.id, full.bytes), (m.id, m.bytes));
                            assert_eq!(full.layers.len() as u32, m.n_layers);
                        }
                        Err(Error::NotFound(_)) => {}
                        Err(e) => panic!("reader: model {}: {e}", m.name),
                    }
                }
                let u = s2.usage().unwrap();
                assert!(u.used_bytes <= u.capacity_bytes && u.models <= u.max_models);
                rounds += 1;
                if finished {
                    break rounds;
                }
                std::thread::yield_now();
            }
        })
    };

    let writers: Vec<_> = (0..THREADS)
        .map(|i| {
            let store = store.clone();
            std::thread::spawn(move || {
                let file = std::fs::File::open(seg_path(name)).unwrap();
                let mut kept = Vec::new();
                for k in 0..ROUNDS {
                    let model_name = format!("t{i}-{k}");
                    let m = model_layers(
                        1 + (k % 3) as usize,
                        50 + 37 * (i * ROUNDS + k),
                        1000 * i + 10 * k,
                    );
                    let stored = add(&store, &model_name, &m);
                    // While it is stored, its bytes are ours alone.
                    for (got, want) in stored.tensors.iter().zip(m.tensors()) {
                        let mut b = vec![0u8; got.bytes as usize];
                        file.read_exact_at(&mut b, stored.segment_offset + got.offset)
                            .unwrap();
                        assert!(b == want.data, "{model_name}: bytes overwritten");
                    }
                    if k % 5 == 0 {
                        kept.push((model_name, m));
                    } else {
                        store.remove_model(&model_name).unwrap();
                    }
                }
                kept
            })
        })
        .collect();
    let kept: Vec<(String, M)> = writers
        .into_iter()
        .flat_map(|w| w.join().expect("writer panicked"))
        .collect();
    done.store(true, Ordering::Release);
    let rounds = reader.join().expect("reader panicked");
    assert!(rounds >= 1);

    assert_eq!(kept.len() as u64, THREADS * ROUNDS / 5);
    let expected: BTreeSet<String> = kept
        .iter()
        .map(|(n, _)| n.clone())
        .chain(["base".to_string()])
        .collect();
    for h in [&*store, &open(name)] {
        let listed: BTreeSet<String> = names(h).into_iter().collect();
        assert_eq!(listed, expected);
        let u = h.usage().unwrap();
        assert_eq!(u.models as usize, expected.len());
        let want_used: u64 =
            kept.iter().map(|(_, m)| m.alloc_bytes()).sum::<u64>() + base.alloc_bytes();
        assert_eq!(u.used_bytes, want_used);
        assert!(u.largest_free_bytes <= u.capacity_bytes - u.used_bytes);
        for (n, m) in &kept {
            check_model(&seg_path(name), &h.model(n).unwrap(), m);
        }
        check_model(&seg_path(name), &h.model("base").unwrap(), &base);
    }
    drop(store);
    Store::destroy(name).unwrap();
}

#[test]
fn a_model_file_brings_its_graph_and_the_worker_binds_it() {
    use pipeswitch::model::cpu::tiny_models;
    use pipeswitch::model::weights::write_model_file;
    use pipeswitch::store::GRAPH_ATTRIBUTE;
    use pipeswitch::worker::Program;

    let defs = tiny_models(2, 16);
    let d = &defs[2]; // tiny-gpt2
    let s = create("graphs", 16 << 20, 4);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    write_model_file(d, &path, 3, &mut |_, _| {}).unwrap();
    s.add_safetensors("gpt", &path, None, &mut |_, _| {}).unwrap();
    // Stored with the model, checksummed, visible to another handle.
    let m = open("graphs").model("gpt").unwrap();
    let graph = pipeswitch::model::graph::Graph::from_json(m.attribute(GRAPH_ATTRIBUTE).unwrap()).unwrap();
    assert_eq!(graph, d.graph);
    let p = Program::from_store(&s, "gpt").unwrap();
    // Activations reuse dead tensors' bytes: far less than all of them.
    let all: u64 = d.graph.activations.iter().map(|(_, t)| t.bytes().unwrap() as u64).sum();
    assert!(p.activation_bytes() < all / 2, "{} of {all}", p.activation_bytes());
    // Every op that reads weights waits for its own layer.
    let layers = p.op_layers();
    assert_eq!(layers[0], Some(m.layer_index("wpe").unwrap()), "embedding reads wte and wpe");
    assert!(layers.iter().flatten().zip(layers.iter().flatten().skip(1)).all(|(a, b)| a <= b));

    // A model stored without a graph cannot be bound; a graph that does not
    // fit the weights is refused.
    let t = gpt2_tensors();
    write_st(&dir.path().join("plain.safetensors"), &t, None);
    s.add_safetensors("plain", &dir.path().join("plain.safetensors"), None, &mut |_, _| {}).unwrap();
    assert!(matches!(Program::from_store(&s, "plain"), Err(Error::NotFound(_))));
    let mut wrong = d.graph.clone();
    if let pipeswitch::model::graph::Op::Linear { trans_b, .. } = &mut wrong.ops[2] {
        *trans_b = !*trans_b;
    }
    assert!(matches!(Program::new(m.clone(), wrong), Err(Error::InvalidArgument(_))));
    // Heads of 32: a valid graph, but not one the worker's attention kernel runs.
    let mut heads32 = d.graph.clone();
    for op in &mut heads32.ops {
        if let pipeswitch::model::graph::Op::Attention { heads, .. } = op {
            *heads = 4;
        }
    }
    heads32.validate(&d.weight_shapes()).unwrap();
    let e = Program::new(m.clone(), heads32).unwrap_err();
    assert!(e.to_string().contains("heads of 64"), "{e}");
    assert!(matches!(Program::from_store(&s, "nope"), Err(Error::NotFound(_))));
}
