//! Handles used from several threads at once, through the C ABI as a C
//! caller would: a handle used while another thread frees it, freed twice
//! from two threads, kept after it was freed while new objects are made
//! (once the registry held raw addresses, a freed address could come back
//! for a new object and the stale handle worked again), and a handle of one
//! type passed as another. The GPU tests at the end (ignored without a GPU)
//! share switches and workers between threads.
//!
//! Stores live in this binary's temporary directory (`PIPESWITCH_SHM_DIR`).

use std::ffi::{CStr, CString};
use std::ptr::{null, null_mut};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;

use pipeswitch::ffi::arena::*;
use pipeswitch::ffi::store::*;
use pipeswitch::ffi::switch::*;
use pipeswitch::ffi::worker::*;
use pipeswitch::ffi::*;

mod common;
use common::shm_dir;

fn cstr(s: &str) -> CString {
    CString::new(s).unwrap()
}

fn last_error() -> String {
    // SAFETY: the calling thread's message, NUL-terminated.
    unsafe { CStr::from_ptr(ps_last_error_message()) }.to_string_lossy().into_owned()
}

/// A raw handle that crosses threads as C code would pass it around.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Raw(usize);

impl Raw {
    fn of<T>(p: *mut T) -> Raw {
        Raw(p as usize)
    }
    fn get<T>(self) -> *mut T {
        self.0 as *mut T
    }
}

/// The bytes of the one tensor of the model "m" (64 f32 values).
const M_BYTES: u64 = 256;

/// Creates the store `name` holding the model "m", and returns its handle.
fn store_with_model(name: &str) -> *mut ps_store {
    shm_dir();
    let n = cstr(name);
    let _ = ps_store_unlink(n.as_ptr());
    let mut st: *mut ps_store = null_mut();
    assert_eq!(ps_store_create(n.as_ptr(), 1 << 20, 8, &mut st), PS_OK, "{}", last_error());
    let data: Vec<u8> = (0..M_BYTES).map(|i| i as u8).collect();
    let shape = [M_BYTES / 4];
    let tensor = ps_tensor_desc {
        name: c"block.w".as_ptr(),
        dtype: PS_DTYPE_F32,
        ndim: 1,
        shape: shape.as_ptr(),
        data: data.as_ptr().cast(),
        bytes: M_BYTES,
    };
    let layer = ps_layer_desc { name: c"block".as_ptr(), n_tensors: 1 };
    assert_eq!(ps_store_add_model(st, c"m".as_ptr(), &layer, 1, &tensor, 1), PS_OK, "{}", last_error());
    st
}

fn open(name: &str) -> *mut ps_store {
    let n = cstr(name);
    let mut h: *mut ps_store = null_mut();
    assert_eq!(ps_store_open(n.as_ptr(), &mut h), PS_OK, "{}", last_error());
    assert!(!h.is_null());
    h
}

fn unlink(name: &str) {
    let n = cstr(name);
    assert_eq!(ps_store_unlink(n.as_ptr()), PS_OK, "{}", last_error());
}

/// One use of a store handle that may be freed meanwhile: true when the
/// handle was live (and then the answers are right), false when it was
/// refused as dead. Anything else fails the test.
fn use_store(h: *const ps_store) -> bool {
    let mut n = 4242usize;
    let st = ps_store_model_count(h, &mut n);
    let live = match st {
        PS_OK => {
            assert_eq!(n, 1, "model count of a live handle");
            true
        }
        PS_ERR_INVALID_HANDLE => {
            assert_eq!(n, 4242, "a refused call wrote its output");
            assert!(last_error().starts_with("ps_store_model_count: "), "{}", last_error());
            false
        }
        other => panic!("ps_store_model_count: status {other}: {}", last_error()),
    };
    let mut info = ps_model_info { id: 77, bytes: 77, n_layers: 77, n_tensors: 77 };
    let info_live = match ps_store_model_info(h, c"m".as_ptr(), &mut info) {
        PS_OK => {
            assert_eq!((info.bytes, info.n_layers, info.n_tensors), (M_BYTES, 1, 1));
            true
        }
        PS_ERR_INVALID_HANDLE => {
            assert_eq!((info.id, info.bytes, info.n_layers, info.n_tensors), (77, 77, 77, 77));
            false
        }
        other => panic!("ps_store_model_info: status {other}: {}", last_error()),
    };
    assert!(live || !info_live, "a refused handle worked again");
    info_live
}

// ---------------------------------------------------------------------------
// Use during free
// ---------------------------------------------------------------------------

/// Readers hammer a store handle while the main thread frees it. Each open
/// handle maps the segment itself, so a reader that goes on using a freed
/// one reads unmapped memory: the process would die. Every call must answer
/// PS_OK or PS_ERR_INVALID_HANDLE, and once refused a handle stays refused
/// (the main thread makes new handles meanwhile, which must not revive it).
#[test]
fn store_used_while_another_thread_frees_it() {
    const NAME: &str = "thr-use-free";
    const ROUNDS: usize = 150;
    const READERS: usize = 3;
    let st = store_with_model(NAME);
    for round in 0..ROUNDS {
        let h = Raw::of(open(NAME));
        let calls = Arc::new(AtomicUsize::new(0));
        let readers: Vec<_> = (0..READERS)
            .map(|_| {
                let calls = calls.clone();
                thread::spawn(move || {
                    let mut refused = 0;
                    let mut live = 0usize;
                    while refused < 20 {
                        if use_store(h.get()) {
                            assert_eq!(refused, 0, "round {round}: a freed handle worked again");
                            live += 1;
                        } else {
                            refused += 1;
                        }
                        calls.fetch_add(1, Ordering::Relaxed);
                    }
                    live
                })
            })
            .collect();
        // Free mid-stream: after the readers got going (a few rounds free at once).
        let wait = round % 4 * 8;
        while calls.load(Ordering::Relaxed) < wait && !readers.iter().any(|r| r.is_finished()) {
            std::hint::spin_loop();
        }
        assert_eq!(ps_store_free(h.get()), PS_OK, "round {round}: {}", last_error());
        // New objects of the same type while the readers go on.
        let fresh: Vec<Raw> = (0..4).map(|_| Raw::of(open(NAME))).collect();
        for r in readers {
            r.join().expect("a reader failed");
        }
        for f in fresh {
            assert_ne!(f, h, "a handle value was reused");
            assert!(use_store(f.get()), "a new handle was broken by the stale one");
            assert_eq!(ps_store_free(f.get()), PS_OK);
        }
        assert_eq!(ps_store_free(h.get()), PS_ERR_INVALID_HANDLE);
    }
    assert!(use_store(st));
    assert_eq!(ps_store_free(st), PS_OK);
    unlink(NAME);
}

/// Programs (created without a GPU) are used while another thread frees them.
#[test]
fn program_used_while_another_thread_frees_it() {
    const NAME: &str = "thr-program";
    let st = store_with_graph_model(NAME);
    for round in 0..100 {
        let p = Raw::of(program_of(st, "tiny-gpt2"));
        let calls = Arc::new(AtomicUsize::new(0));
        let reader = {
            let calls = calls.clone();
            thread::spawn(move || {
                let mut refused = 0;
                while refused < 20 {
                    let (mut a, mut b, mut n) = (u64::MAX, u64::MAX, usize::MAX);
                    let s1 = ps_program_activation_bytes(p.get(), &mut a);
                    let s2 = ps_program_tensor_bytes(p.get(), c"input_ids".as_ptr(), &mut b);
                    let s3 = ps_program_n_inputs(p.get(), &mut n);
                    for (s, v) in [(s1, a), (s2, b), (s3, n as u64)] {
                        match s {
                            PS_OK => {
                                assert_eq!(refused, 0, "round {round}: a freed program worked again");
                                assert!(v != u64::MAX && v > 0);
                            }
                            PS_ERR_INVALID_HANDLE => {
                                assert_eq!(v, u64::MAX);
                                refused += 1;
                            }
                            other => panic!("status {other}: {}", last_error()),
                        }
                    }
                    calls.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        while calls.load(Ordering::Relaxed) < round % 3 * 4 && !reader.is_finished() {
            std::hint::spin_loop();
        }
        assert_eq!(ps_program_free(p.get()), PS_OK, "{}", last_error());
        let fresh = program_of(st, "tiny-gpt2");
        reader.join().expect("the reader failed");
        assert_ne!(Raw::of(fresh), p);
        let mut n = 0usize;
        assert_eq!(ps_program_n_inputs(fresh, &mut n), PS_OK);
        assert_eq!(ps_program_free(fresh), PS_OK);
    }
    assert_eq!(ps_store_free(st), PS_OK);
    unlink(NAME);
}

// ---------------------------------------------------------------------------
// Double free
// ---------------------------------------------------------------------------

/// Two threads free the same handle at once: exactly one gets PS_OK. Each
/// makes a new handle right after its free (where an allocator hands the
/// freed memory back), and a third thread makes handles all along: none of
/// them may be freed by the losing free.
#[test]
fn double_free_from_two_threads() {
    const NAME: &str = "thr-double-free";
    let st = store_with_model(NAME);
    let stop = Arc::new(AtomicBool::new(false));
    let maker = {
        let stop = stop.clone();
        thread::spawn(move || {
            let mut made = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                made.push(Raw::of(open(NAME)));
                if made.len() > 64 {
                    let old = made.remove(0);
                    assert!(use_store(old.get()), "a handle nobody freed was freed");
                    assert_eq!(ps_store_free(old.get()), PS_OK, "{}", last_error());
                }
            }
            for h in made {
                assert!(use_store(h.get()), "a handle nobody freed was freed");
                assert_eq!(ps_store_free(h.get()), PS_OK, "{}", last_error());
            }
        })
    };
    for round in 0..200 {
        let h = Raw::of(open(NAME));
        let go = Arc::new(Barrier::new(2));
        let frees: Vec<_> = (0..2)
            .map(|_| {
                let go = go.clone();
                thread::spawn(move || {
                    go.wait();
                    let st = ps_store_free(h.get());
                    (st, Raw::of(open(NAME)))
                })
            })
            .collect();
        let got: Vec<(ps_status, Raw)> = frees.into_iter().map(|t| t.join().unwrap()).collect();
        let mut codes: Vec<ps_status> = got.iter().map(|g| g.0).collect();
        codes.sort_unstable();
        assert_eq!(codes, vec![PS_OK, PS_ERR_INVALID_HANDLE], "round {round}");
        for (_, new) in got {
            assert!(use_store(new.get()), "round {round}: a new handle was freed by the losing free");
            assert_eq!(ps_store_free(new.get()), PS_OK);
        }
    }
    stop.store(true, Ordering::Relaxed);
    maker.join().expect("the maker thread failed");
    assert_eq!(ps_store_free(st), PS_OK);
    unlink(NAME);
}

// ---------------------------------------------------------------------------
// Address reuse
// ---------------------------------------------------------------------------

/// Freed handles stay dead however many objects are made after them: they
/// are refused, and freeing one again frees none of the new objects. (Once
/// handles were addresses: the allocator gave a freed one to a new object,
/// and the stale handle then named that object.)
#[test]
fn stale_handles_stay_invalid_when_new_objects_are_made() {
    const NAME: &str = "thr-reuse";
    let st = store_with_model(NAME);
    let stale: Vec<*mut ps_store> = (0..64).map(|_| open(NAME)).collect();
    for &h in &stale {
        assert_eq!(ps_store_free(h), PS_OK);
    }
    let fresh: Vec<*mut ps_store> = (0..256).map(|_| open(NAME)).collect();
    for (i, &h) in stale.iter().enumerate() {
        let mut n = 4242usize;
        assert_eq!(ps_store_model_count(h, &mut n), PS_ERR_INVALID_HANDLE, "stale handle {i} works again");
        assert_eq!(n, 4242);
        assert_eq!(ps_store_free(h), PS_ERR_INVALID_HANDLE, "stale handle {i} was freed again");
        assert!(last_error().contains("not a live handle"), "{}", last_error());
    }
    for (i, &f) in fresh.iter().enumerate() {
        assert!(use_store(f), "new handle {i} was freed through a stale one");
        assert_eq!(ps_store_free(f), PS_OK, "new handle {i}: {}", last_error());
    }
    assert!(!fresh.iter().any(|f| stale.contains(f)), "a handle value was given out twice");

    // Across types too: a freed store handle never names a new program.
    let s2 = store_with_graph_model("thr-reuse-graph");
    let dead = open("thr-reuse-graph");
    assert_eq!(ps_store_free(dead), PS_OK);
    let progs: Vec<*mut ps_program> = (0..16).map(|_| program_of(s2, "tiny-gpt2")).collect();
    assert_eq!(ps_program_free(dead.cast()), PS_ERR_INVALID_HANDLE);
    for p in progs {
        assert_ne!(p as usize, dead as usize);
        assert_eq!(ps_program_free(p), PS_OK);
    }
    assert_eq!(ps_store_free(s2), PS_OK);
    unlink("thr-reuse-graph");

    assert_eq!(ps_store_free(st), PS_OK);
    unlink(NAME);
}

// ---------------------------------------------------------------------------
// Wrong types and forged values
// ---------------------------------------------------------------------------

/// A live handle of one type passed as another is refused, and the object
/// it names is unharmed (not reinterpreted, not freed).
#[test]
fn handle_of_one_type_passed_as_another() {
    const NAME: &str = "thr-types";
    let st = store_with_graph_model(NAME);
    let prog = program_of(st, "tiny-gpt2");
    let mut n = 4242usize;
    let mut bytes = u64::MAX;

    // A program as a store, an arena, a switch, a worker.
    assert_eq!(ps_store_model_count(prog.cast(), &mut n), PS_ERR_INVALID_HANDLE);
    assert_eq!(last_error(), "ps_store_model_count: store is not a live handle: it is a program handle");
    assert_eq!(ps_store_free(prog.cast()), PS_ERR_INVALID_HANDLE);
    assert_eq!(ps_arena_free(prog.cast()), PS_ERR_INVALID_HANDLE);
    assert_eq!(ps_switch_free(prog.cast()), PS_ERR_INVALID_HANDLE);
    assert_eq!(ps_worker_free(prog.cast()), PS_ERR_INVALID_HANDLE);
    let mut g = 0usize;
    assert_eq!(ps_switch_n_groups(prog.cast(), &mut g), PS_ERR_INVALID_HANDLE);
    assert_eq!(ps_worker_synchronize(prog.cast()), PS_ERR_INVALID_HANDLE);
    let mut w: *mut ps_worker = null_mut();
    assert_eq!(ps_worker_new(prog.cast(), &mut w), PS_ERR_INVALID_HANDLE);
    assert!(w.is_null());
    // A store as a program.
    assert_eq!(ps_program_activation_bytes(st.cast(), &mut bytes), PS_ERR_INVALID_HANDLE);
    assert_eq!(last_error(), "ps_program_activation_bytes: program is not a live handle: it is a store handle");
    assert_eq!(ps_program_free(st.cast()), PS_ERR_INVALID_HANDLE);
    let mut p2: *mut ps_program = null_mut();
    assert_eq!(ps_program_from_store(prog.cast(), c"tiny-gpt2".as_ptr(), &mut p2), PS_ERR_INVALID_HANDLE);
    assert!(p2.is_null());
    assert_eq!((n, bytes), (4242, u64::MAX));

    // Forged values near and far from real ones (but none that another
    // thread of this process may hold): refused, nothing touched.
    let local = 0u64;
    for forged in [
        prog as usize + 1,
        prog as usize ^ (1 << 40),
        st as usize + (1 << 46),
        1,
        2,
        usize::MAX,
        &local as *const u64 as usize,
    ] {
        assert_eq!(ps_store_model_count(forged as *const ps_store, &mut n), PS_ERR_INVALID_HANDLE, "{forged:#x}");
        assert_eq!(ps_program_free(forged as *mut ps_program), PS_ERR_INVALID_HANDLE, "{forged:#x}");
        assert_eq!(ps_store_free(forged as *mut ps_store), PS_ERR_INVALID_HANDLE, "{forged:#x}");
    }

    // Both objects are unharmed.
    assert_eq!(ps_program_activation_bytes(prog, &mut bytes), PS_OK);
    assert!(bytes > 0 && bytes != u64::MAX);
    assert_eq!(ps_store_model_count(st, &mut n), PS_OK);
    assert_eq!(n, 1);
    assert_eq!(ps_program_free(prog), PS_OK);
    assert_eq!(ps_store_free(st), PS_OK);
    unlink(NAME);
}

// ---------------------------------------------------------------------------
// Switches and workers without a GPU
// ---------------------------------------------------------------------------

/// Without a driver no switch, worker or arena can be made; threads asking
/// at once all get a status (PS_ERR_NO_DRIVER) and no handle, while other
/// threads use and free programs of the same store.
#[test]
fn switch_and_worker_calls_from_threads_without_a_gpu() {
    if pipeswitch::cuda::driver_available() {
        return; // the GPU tests below cover it
    }
    const NAME: &str = "thr-nodriver";
    let st = Raw::of(store_with_graph_model(NAME));
    let go = Arc::new(Barrier::new(4));
    let threads: Vec<_> = (0..4)
        .map(|i| {
            let go = go.clone();
            thread::spawn(move || {
                go.wait();
                for _ in 0..50 {
                    if i % 2 == 0 {
                        let mut sw: *mut ps_switch = null_mut();
                        assert_eq!(ps_switch_new(0, &mut sw), PS_ERR_NO_DRIVER);
                        assert!(sw.is_null());
                        let mut ar: *mut ps_arena = null_mut();
                        assert_eq!(ps_arena_create(0, 1 << 20, 0, &mut ar), PS_ERR_NO_DRIVER);
                        assert!(ar.is_null());
                    } else {
                        let p = program_of(st.get(), "tiny-gpt2");
                        // Worker calls check their handles first.
                        assert_eq!(ps_worker_run(null_mut(), p, null(), 0), PS_ERR_NULL_ARGUMENT);
                        assert_eq!(ps_worker_prepare(p.cast(), p), PS_ERR_INVALID_HANDLE);
                        assert_eq!(ps_program_free(p), PS_OK);
                        assert_eq!(ps_program_free(p), PS_ERR_INVALID_HANDLE);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a thread failed");
    }
    assert_eq!(ps_store_free(st.get()), PS_OK);
    unlink(NAME);
}

// ---------------------------------------------------------------------------
// A model with a graph (for programs)
// ---------------------------------------------------------------------------

use pipeswitch::model::cpu::tiny_models;
use pipeswitch::model::reference::ModelDef;
use pipeswitch::model::weights::write_model_file;

const SEED: u64 = 7;

fn tiny(name: &str) -> ModelDef {
    tiny_models(2, 16).into_iter().find(|d| d.graph.name == name).unwrap()
}

/// A store holding the tiny GPT-2 with its graph, through the C calls.
fn store_with_graph_model(name: &str) -> *mut ps_store {
    shm_dir();
    let n = cstr(name);
    let _ = ps_store_unlink(n.as_ptr());
    let def = tiny("tiny-gpt2");
    let cap = def.n_params() as u64 * 4 + (4 << 20);
    let mut st: *mut ps_store = null_mut();
    assert_eq!(ps_store_create(n.as_ptr(), cap, 8, &mut st), PS_OK, "{}", last_error());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny-gpt2.safetensors");
    write_model_file(&def, &path, SEED, &mut |_, _| {}).unwrap();
    let p = cstr(path.to_str().unwrap());
    assert_eq!(ps_store_add_safetensors(st, c"tiny-gpt2".as_ptr(), p.as_ptr(), null(), 0), PS_OK, "{}", last_error());
    st
}

fn program_of(st: *const ps_store, model: &str) -> *mut ps_program {
    let m = cstr(model);
    let mut p: *mut ps_program = null_mut();
    assert_eq!(ps_program_from_store(st, m.as_ptr(), &mut p), PS_OK, "{}", last_error());
    assert!(!p.is_null());
    p
}

// ---------------------------------------------------------------------------
// Switches and workers on a GPU
// ---------------------------------------------------------------------------

use pipeswitch::model::cpu::{example_inputs, reference_weights, run_graph_cpu};

/// The tiny GPT-2 ready to run through the C calls: its store, an arena
/// with a region for it, a switch, a worker prepared for its program with
/// the example inputs set.
struct Gpu {
    name: String,
    st: Raw,
    arena: Raw,
    region: u64,
    sw: Raw,
    worker: Raw,
    prog: Raw,
    starts: Vec<usize>,
    out: CString,
    out_bytes: usize,
    def: ModelDef,
}

#[track_caller]
fn ok(st: ps_status) {
    assert_eq!(st, PS_OK, "{}", last_error());
}

/// Prepares `worker` for `prog` and sets the example inputs.
fn set_inputs(worker: *mut ps_worker, prog: *const ps_program, def: &ModelDef) {
    ok(ps_worker_prepare(worker, prog));
    for (k, v) in example_inputs(&def.graph, SEED, def.vocab()) {
        let (k, v) = (cstr(&k), v.to_le_bytes());
        ok(ps_worker_set_input(worker, prog, k.as_ptr(), v.as_ptr().cast(), v.len()));
    }
}

impl Gpu {
    fn new(tag: &str) -> Gpu {
        let name = format!("thr-gpu-{tag}");
        let st = store_with_graph_model(&name);
        let def = tiny("tiny-gpt2");
        let mut info = ps_model_info { id: 0, bytes: 0, n_layers: 0, n_tensors: 0 };
        ok(ps_store_model_info(st, c"tiny-gpt2".as_ptr(), &mut info));
        let prog = program_of(st, "tiny-gpt2");
        let mut act = 0u64;
        ok(ps_program_activation_bytes(prog, &mut act));
        let mut arena: *mut ps_arena = null_mut();
        ok(ps_arena_create(0, info.bytes + act + (16 << 20), 8 << 20, &mut arena));
        let mut region = 0u64;
        ok(ps_arena_alloc(arena, info.bytes, &mut region));
        let mut sw: *mut ps_switch = null_mut();
        ok(ps_switch_new(0, &mut sw));
        let mut worker: *mut ps_worker = null_mut();
        ok(ps_worker_new(arena, &mut worker));
        set_inputs(worker, prog, &def);
        let out = cstr(&def.graph.outputs[0]);
        let mut out_bytes = 0u64;
        ok(ps_program_tensor_bytes(prog, out.as_ptr(), &mut out_bytes));
        Gpu {
            name,
            st: Raw::of(st),
            arena: Raw::of(arena),
            region,
            sw: Raw::of(sw),
            worker: Raw::of(worker),
            prog: Raw::of(prog),
            starts: (0..info.n_layers).collect(),
            out,
            out_bytes: out_bytes as usize,
            def,
        }
    }

    fn start(&self) -> ps_status {
        ps_switch_start(
            self.sw.get(),
            self.st.get(),
            c"tiny-gpt2".as_ptr(),
            self.arena.get(),
            self.region,
            self.starts.as_ptr(),
            self.starts.len(),
        )
    }

    /// One run on the last switch, and its output.
    fn run(&self) -> Vec<f32> {
        ok(ps_worker_run(self.worker.get(), self.prog.get(), self.sw.get(), 0));
        let mut out = vec![0f32; self.out_bytes / 4];
        ok(ps_worker_read(self.worker.get(), self.prog.get(), self.out.as_ptr(), out.as_mut_ptr().cast(), self.out_bytes));
        out
    }

    fn free(self) {
        ok(ps_worker_free(self.worker.get()));
        ok(ps_switch_free(self.sw.get()));
        ok(ps_program_free(self.prog.get()));
        ok(ps_arena_free(self.arena.get()));
        ok(ps_store_free(self.st.get()));
        unlink(&self.name);
    }
}

/// A worker runs the model over and over while a second thread starts the
/// next switch of the same model on the same switch, and a third asks the
/// switch about its groups. Each run waits for the switch it read (a start
/// waits until the run is enqueued), so every output equals the first, and
/// the first equals the CPU reference.
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_worker_runs_while_another_thread_restarts_its_switch() {
    let g = Arc::new(Gpu::new("restart"));
    ok(g.start());
    let first = g.run();
    let weights = reference_weights(&g.def, SEED);
    let inputs = example_inputs(&g.def.graph, SEED, g.def.vocab());
    let reference = run_graph_cpu(&g.def.graph, &weights, &inputs).unwrap().remove(&g.def.graph.outputs[0]).unwrap();
    let scale = reference.iter().fold(1f32, |m, v| m.max(v.abs()));
    let err = first.iter().zip(&reference).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max) / scale;
    assert!(err < 1e-3, "the first run is off the CPU reference by {err}");

    let stop = Arc::new(AtomicBool::new(false));
    let runner = {
        let (g, first) = (g.clone(), first.clone());
        thread::spawn(move || {
            for i in 0..100 {
                assert!(g.run() == first, "run {i} differs from the first");
            }
        })
    };
    let starter = {
        let (g, stop) = (g.clone(), stop.clone());
        thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                ok(g.start());
                n += 1;
            }
            ok(ps_switch_synchronize(g.sw.get()));
            n
        })
    };
    let asker = {
        let (g, stop) = (g.clone(), stop.clone());
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let (mut n, mut ready, mut ptr) = (0usize, -1i32, 0u64);
                ok(ps_switch_n_groups(g.sw.get(), &mut n));
                assert_eq!(n, g.starts.len());
                ok(ps_switch_group_ready(g.sw.get(), n - 1, &mut ready));
                assert!(ready == 0 || ready == 1);
                ok(ps_switch_tensor_ptr(g.sw.get(), 0, &mut ptr));
                assert_ne!(ptr, 0);
                ok(ps_switch_wait_group(g.sw.get(), n - 1, null_mut()));
            }
        })
    };
    runner.join().expect("the runner failed");
    stop.store(true, Ordering::Relaxed);
    let starts = starter.join().expect("the starter failed");
    asker.join().expect("the asker failed");
    assert!(starts > 0);
    ok(ps_worker_synchronize(g.worker.get()));
    Arc::try_unwrap(g).ok().expect("threads hold no Gpu").free();
}

/// A switch and a worker are freed while other threads use them: every
/// call answers PS_OK or PS_ERR_INVALID_HANDLE, and the objects go when the
/// last call on them returns (the worker's drop waits for its run).
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_switch_and_worker_freed_while_in_use() {
    let g = Gpu::new("free");
    for round in 0..20 {
        let mut sw: *mut ps_switch = null_mut();
        ok(ps_switch_new(0, &mut sw));
        let mut worker: *mut ps_worker = null_mut();
        ok(ps_worker_new(g.arena.get(), &mut worker));
        set_inputs(worker, g.prog.get(), &g.def);
        let (sw, worker) = (Raw::of(sw), Raw::of(worker));
        ok(ps_switch_start(sw.get(), g.st.get(), c"tiny-gpt2".as_ptr(), g.arena.get(), g.region, g.starts.as_ptr(), g.starts.len()));
        let calls = Arc::new(AtomicUsize::new(0));
        let user = {
            let (calls, prog) = (calls.clone(), g.prog);
            thread::spawn(move || {
                // Once refused, a handle stays refused.
                let (mut sw_dead, mut worker_dead, mut after) = (false, false, 0);
                while after < 10 {
                    let mut n = 0usize;
                    for st in [ps_switch_n_groups(sw.get(), &mut n), ps_switch_synchronize(sw.get())] {
                        match st {
                            PS_OK => assert!(!sw_dead, "round {round}: a freed switch worked again"),
                            PS_ERR_INVALID_HANDLE => sw_dead = true,
                            other => panic!("round {round}: status {other}: {}", last_error()),
                        }
                    }
                    match ps_worker_synchronize(worker.get()) {
                        PS_OK => assert!(!worker_dead, "round {round}: a freed worker worked again"),
                        PS_ERR_INVALID_HANDLE => worker_dead = true,
                        other => panic!("round {round}: status {other}: {}", last_error()),
                    }
                    match ps_worker_run(worker.get(), prog.get(), sw.get(), 0) {
                        PS_OK => assert!(!sw_dead && !worker_dead, "round {round}: a run on a freed handle"),
                        PS_ERR_INVALID_HANDLE => {}
                        other => panic!("round {round}: status {other}: {}", last_error()),
                    }
                    if sw_dead && worker_dead {
                        after += 1;
                    }
                    calls.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        while calls.load(Ordering::Relaxed) < round % 4 && !user.is_finished() {
            std::hint::spin_loop();
        }
        ok(ps_switch_free(sw.get()));
        ok(ps_worker_free(worker.get()));
        user.join().expect("the user thread failed");
        assert_eq!(ps_switch_free(sw.get()), PS_ERR_INVALID_HANDLE);
        assert_eq!(ps_worker_free(worker.get()), PS_ERR_INVALID_HANDLE);
    }
    g.free();
}
