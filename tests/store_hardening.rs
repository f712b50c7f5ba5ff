//! The store against concurrent removal, forked handles, writers whose pid
//! cannot be checked, hostile or damaged segments, and capacity sizing
//! (issue 9, defects 2 to 6). CPU only.

use std::ffi::CString;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult};
use pipeswitch::ffi::store::*;
use pipeswitch::ffi::PS_OK;
use pipeswitch::store::layout::{Entry, Header, ALLOC_ALIGN, ENTRY_BYTES, HEADER_BYTES};
use pipeswitch::store::{Dtype, LayerSpec, ModelSpec, Store, TensorSpec};
use pipeswitch::Error;

mod common;
use common::{bytes, open, seg_path, shm_dir};

fn create(name: &str, capacity: u64, max_models: u32) -> Store {
    shm_dir();
    Store::create(name, capacity, max_models).unwrap_or_else(|e| panic!("create {name}: {e}"))
}



/// One layer per tensor, one U8 tensor per entry of `sizes`.
fn spec<'a>(data: &'a [Vec<u8>]) -> ModelSpec<'a> {
    ModelSpec {
        attributes: vec![],
        layers: data
            .iter()
            .enumerate()
            .map(|(i, d)| LayerSpec {
                name: format!("layer.{i}"),
                tensors: vec![TensorSpec { name: format!("layer.{i}.w"), dtype: Dtype::U8, shape: vec![d.len() as u64], data: d }],
            })
            .collect(),
    }
}

/// What a stored model of these tensors reads back as: each tensor at a
/// 256-aligned offset, zeros between.
fn stored_bytes(data: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for d in data {
        out.extend_from_slice(d);
        out.resize(out.len().div_ceil(256) * 256, 0);
    }
    if out.is_empty() {
        out.resize(256, 0);
    }
    out
}

fn read_at(path: &std::path::Path, offset: u64, n: usize) -> Vec<u8> {
    let f = std::fs::File::open(path).unwrap();
    let mut b = vec![0u8; n];
    f.read_exact_at(&mut b, offset).unwrap();
    b
}

fn patch(path: &std::path::Path, offset: u64, data: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(data, offset).unwrap();
}

fn header_of(path: &std::path::Path) -> Header {
    let len = std::fs::metadata(path).unwrap().len();
    Header::decode(&read_at(path, 0, 80), len).unwrap()
}

/// The table slot of the entry naming `model` (any state).
fn slot_of(path: &std::path::Path, model: &str) -> u32 {
    let h = header_of(path);
    (0..h.table_capacity)
        .find(|&slot| {
            let e = read_at(path, HEADER_BYTES + u64::from(slot) * ENTRY_BYTES, ENTRY_BYTES as usize);
            e[72..76] == (model.len() as u32).to_le_bytes() && &e[80..80 + model.len()] == model.as_bytes()
        })
        .unwrap_or_else(|| panic!("no table entry for {model}"))
}

/// Runs `f` in a forked child and returns its exit status. The child never
/// returns into the harness.
fn in_child(f: impl FnOnce() -> i32) -> WaitStatus {
    // SAFETY: the child runs `f` and leaves with _exit.
    match unsafe { fork() }.expect("fork") {
        ForkResult::Child => {
            let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or(101);
            // SAFETY: ends the child without running the harness's atexit.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => waitpid(child, None).expect("waitpid"),
    }
}

fn pipe() -> (std::fs::File, std::fs::File) {
    let (r, w) = nix::unistd::pipe().unwrap();
    (std::fs::File::from(r), std::fs::File::from(w))
}

fn wait_byte(f: &mut std::fs::File) {
    use std::io::Read;
    let mut b = [0u8; 1];
    f.read_exact(&mut b).unwrap();
}

fn send_byte(f: &mut std::fs::File) {
    use std::io::Write;
    f.write_all(&[1]).unwrap();
}

// ---------------------------------------------------------------------------
// Defect 2: a read races a remove and an add of the same size
// ---------------------------------------------------------------------------

#[test]
fn reads_never_return_another_models_bytes() {
    let name = "race-read";
    // Room for three models: while "a" is leased and removed, "b" goes elsewhere.
    let a_data = vec![bytes(1, 200 << 10)];
    let b_data = vec![bytes(2, 200 << 10)];
    let a_bytes = stored_bytes(&a_data);
    let s = Arc::new(create(name, 2 << 20, 8));
    s.add_model("a", &spec(&a_data), &mut |_, _| {}).unwrap();
    let handle = {
        let c = CString::new(name).unwrap();
        let mut p = std::ptr::null_mut();
        assert_eq!(ps_store_open(c.as_ptr(), &mut p), PS_OK);
        p as usize
    };
    let stop = Arc::new(AtomicBool::new(false));
    let ok_reads = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = (0..2)
        .map(|r| {
            let (stop, ok_reads, s, want) = (stop.clone(), ok_reads.clone(), s.clone(), a_bytes.clone());
            let other = stored_bytes(&b_data);
            std::thread::spawn(move || {
                let model = CString::new("a").unwrap();
                let mut buf = vec![0u8; want.len()];
                let mut wrong = 0u64;
                // What the wrong reads held, for the failure message.
                let mut seen = Vec::new();
                let mut judge = |got: &[u8], wrong: &mut u64| {
                    if got != want {
                        *wrong += 1;
                        let first = got.iter().zip(&want).position(|(x, y)| x != y).unwrap_or(0);
                        let kind = if got == other {
                            "b's bytes"
                        } else if got.iter().all(|&x| x == 0) {
                            "zeros"
                        } else {
                            "mixed"
                        };
                        seen.push(format!("reader {r}: {kind}, first difference at {first}"));
                    }
                };
                while !stop.load(Ordering::Acquire) {
                    if r == 0 {
                        // The C ABI.
                        let st = ps_store_read(handle as *const ps_store, model.as_ptr(), 0, buf.as_mut_ptr().cast(), buf.len());
                        if st == PS_OK {
                            ok_reads.fetch_add(1, Ordering::Relaxed);
                            judge(&buf, &mut wrong);
                        }
                    } else if let Ok(m) = s.model("a") {
                        // The Rust API.
                        if let Ok(got) = s.model_bytes(&m) {
                            ok_reads.fetch_add(1, Ordering::Relaxed);
                            judge(&got, &mut wrong);
                        }
                    }
                }
                (wrong, seen)
            })
        })
        .collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    let mut rounds = 0;
    while std::time::Instant::now() < deadline || ok_reads.load(Ordering::Relaxed) < 200 {
        s.remove_model("a").unwrap();
        // Retry while a removed "a" still holds its space for a reader.
        while let Err(e) = s.add_model("b", &spec(&b_data), &mut |_, _| {}) {
            assert!(matches!(e, Error::StoreFull(_)), "{e}");
            std::thread::yield_now();
        }
        s.remove_model("b").unwrap();
        while let Err(e) = s.add_model("a", &spec(&a_data), &mut |_, _| {}) {
            assert!(matches!(e, Error::StoreFull(_)), "{e}");
            std::thread::yield_now();
        }
        rounds += 1;
        if rounds > 200_000 {
            break;
        }
    }
    stop.store(true, Ordering::Release);
    let (mut wrong, mut seen) = (0u64, Vec::new());
    for r in readers {
        let (w, s) = r.join().unwrap();
        wrong += w;
        seen.extend(s);
    }
    assert_eq!(ps_store_free(handle as *mut ps_store), PS_OK);
    assert_eq!(wrong, 0, "{wrong} of {} successful reads of \"a\" returned other bytes: {seen:?}", ok_reads.load(Ordering::Relaxed));
    assert!(ok_reads.load(Ordering::Relaxed) > 0);
    drop(s);
    Store::destroy(name).unwrap();
}

// ---------------------------------------------------------------------------
// Defect 3: a handle inherited across fork
// ---------------------------------------------------------------------------

#[test]
fn forked_parent_and_child_adding_lose_nothing() {
    const N: usize = 200;
    let name = "fork-adds";
    let s = create(name, 16 << 20, 2 * N as u32 + 8);
    let data = |who: u64, k: usize| vec![bytes(who * 1000 + k as u64, 3000 + 7 * k)];
    let (mut go_r, mut go_w) = pipe();
    // SAFETY: the child adds models and leaves with _exit.
    let child = match unsafe { fork() }.expect("fork") {
        ForkResult::Child => {
            let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                wait_byte(&mut go_r);
                // The inherited handle must be refused, or must work: either
                // way every model must end up stored with its own bytes.
                let reopened;
                let h = match s.add_model("child-0", &spec(&data(2, 0)), &mut |_, _| {}) {
                    Err(Error::InvalidState(m)) if m.contains("fork") => {
                        reopened = Store::open(name).unwrap();
                        reopened.add_model("child-0", &spec(&data(2, 0)), &mut |_, _| {}).unwrap();
                        &reopened
                    }
                    Err(e) => panic!("inherited handle: {e}"),
                    Ok(_) => &s,
                };
                for k in 1..N {
                    h.add_model(&format!("child-{k}"), &spec(&data(2, k)), &mut |_, _| {}).unwrap();
                }
                0
            }))
            .unwrap_or(101);
            // SAFETY: ends the child without running the harness's atexit.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => child,
    };
    send_byte(&mut go_w);
    for k in 0..N {
        s.add_model(&format!("parent-{k}"), &spec(&data(1, k)), &mut |_, _| {}).unwrap();
    }
    assert_eq!(waitpid(child, None).unwrap(), WaitStatus::Exited(child, 0));
    let mut bad = Vec::new();
    for h in [&s, &open(name)] {
        for (who, prefix) in [(1, "parent"), (2, "child")] {
            for k in 0..N {
                let n = format!("{prefix}-{k}");
                match h.model(&n).and_then(|m| h.model_bytes(&m).map(|b| b.to_vec())) {
                    Ok(b) if b == stored_bytes(&data(who, k)) => {}
                    Ok(_) => bad.push(format!("{n}: wrong bytes")),
                    Err(e) => bad.push(format!("{n}: {e}")),
                }
            }
        }
    }
    assert!(bad.is_empty(), "{} of {} models lost or wrong, e.g. {:?}", bad.len(), 4 * N, &bad[..bad.len().min(5)]);
    drop(s);
    Store::destroy(name).unwrap();
}

/// Every use of a handle inherited across fork is refused with a clear
/// status, and the child's handle going away leaves the parent's leases.
#[test]
fn an_inherited_handle_is_refused_in_the_child() {
    let name = "fork-refused";
    let s = create(name, 1 << 20, 4);
    let a_data = vec![bytes(30, 4000)];
    s.add_model("a", &spec(&a_data), &mut |_, _| {}).unwrap();
    let status = in_child(|| {
        let refused = |r: Result<(), Error>| matches!(r, Err(Error::InvalidState(m)) if m.contains("fork"));
        let checks = [
            refused(s.models().map(drop)),
            refused(s.usage().map(drop)),
            refused(s.model("a").map(drop)),
            refused(s.remove_model("a")),
            refused(s.add_model("x", &spec(&a_data), &mut |_, _| {}).map(drop)),
            refused(s.set_layer_exec_ms("a", &[1.0])),
        ];
        if checks.iter().all(|&c| c) {
            0
        } else {
            eprintln!("{checks:?}");
            1
        }
    });
    assert!(matches!(status, WaitStatus::Exited(_, 0)), "{status:?}");
    assert_eq!(s.models().unwrap().len(), 1);
    drop(s);
    Store::destroy(name).unwrap();
}

// ---------------------------------------------------------------------------
// Defect 4: a live writer whose pid cannot be checked
// ---------------------------------------------------------------------------

/// Rewrites the writer pid of `slot`'s entry (keeping it well-formed), as a
/// writer in another PID namespace would look: `kill(pid, 0)` fails.
fn set_writer_pid(path: &std::path::Path, slot: u32, pid: u32) {
    let h = header_of(path);
    let at = HEADER_BYTES + u64::from(slot) * ENTRY_BYTES;
    let mut e = Entry::decode(&read_at(path, at, ENTRY_BYTES as usize), &h).unwrap().unwrap();
    e.writer_pid = pid;
    patch(path, at, &e.encode());
}

#[test]
fn a_live_writer_is_never_reclaimed() {
    let name = "live-writer";
    let s = create(name, 4 << 20, 8);
    let w_data: Vec<Vec<u8>> = (0..8).map(|i| bytes(40 + i, 64 << 10)).collect();
    let o_data = vec![bytes(50, 300 << 10)];
    let (mut half_r, mut half_w) = pipe();
    let (mut go_r, mut go_w) = pipe();
    // SAFETY: the child adds one model and leaves with _exit.
    let child = match unsafe { fork() }.expect("fork") {
        ForkResult::Child => {
            let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let c = Store::open(name).unwrap();
                let mut paused = false;
                let r = c.add_model("w", &spec(&w_data), &mut |done, total| {
                    if !paused && done * 2 >= total && done < total {
                        paused = true;
                        send_byte(&mut half_w);
                        wait_byte(&mut go_r);
                    }
                });
                match r {
                    Ok(_) => 0,
                    Err(e) => {
                        eprintln!("child add: {e}");
                        2
                    }
                }
            }))
            .unwrap_or(101);
            // SAFETY: ends the child without running the harness's atexit.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => child,
    };
    wait_byte(&mut half_r);
    // The writer is alive and half-way; make its pid look dead.
    set_writer_pid(&seg_path(name), slot_of(&seg_path(name), "w"), 0x7fff_fff0);
    // An add in this process runs the reclaim pass: it must leave "w" alone.
    let o = s.add_model("o", &spec(&o_data), &mut |_, _| {}).unwrap();
    send_byte(&mut go_w);
    assert_eq!(waitpid(child, None).unwrap(), WaitStatus::Exited(child, 0), "the live writer's add failed");
    let w = s.model("w").expect("the live writer's model was lost");
    assert!(s.model_bytes(&w).unwrap().to_vec() == stored_bytes(&w_data), "the live writer's bytes were overwritten");
    assert!(s.model_bytes(&o).unwrap().to_vec() == stored_bytes(&o_data), "o's bytes are wrong");
    let (a, b) = (w.segment_offset, o.segment_offset);
    assert!(a + w.bytes <= b || b + o.bytes <= a, "the two models overlap");
    drop(s);
    Store::destroy(name).unwrap();
}

// ---------------------------------------------------------------------------
// Defect 5: hostile and damaged segments
// ---------------------------------------------------------------------------

/// A segment whose table claims 2^32 - 1 entries (a sparse file of about
/// 1 TiB) must be refused, not abort the process.
#[test]
fn a_table_of_four_billion_entries_is_refused() {
    let name = "huge-table";
    drop(create(name, 64 << 10, 4));
    let path = seg_path(name);
    let cap = u32::MAX;
    let data_offset = (HEADER_BYTES + u64::from(cap) * ENTRY_BYTES).div_ceil(ALLOC_ALIGN) * ALLOC_ALIGN;
    let h = Header {
        total_bytes: data_offset + (64 << 10),
        table_offset: HEADER_BYTES,
        table_capacity: cap,
        data_offset,
        data_bytes: 64 << 10,
        generation: 1,
        next_model_id: 1,
    };
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(h.total_bytes).unwrap();
    patch(&path, 0, &h.encode());
    let status = in_child(|| {
        // A hang (reading a terabyte of table) ends the child too.
        // SAFETY: alarm has no preconditions.
        unsafe { libc::alarm(20) };
        match Store::open(name) {
        Err(Error::CorruptStore(_)) => 0,
        Err(e) => {
            eprintln!("open: {e}");
            2
        }
        Ok(s) => {
            // Whatever it answers, it must not abort.
            let _ = s.models();
            let _ = s.usage();
            3
        }
    }});
    assert_eq!(status, WaitStatus::Exited(status_pid(&status), 0), "the hostile table was not refused at open");
    Store::destroy(name).unwrap();
}

fn status_pid(s: &WaitStatus) -> nix::unistd::Pid {
    s.pid().unwrap()
}

/// A flipped state byte must not make a model vanish without an error, nor
/// let its space be reused.
#[test]
fn a_flipped_state_is_reported_and_its_space_kept() {
    for (i, new_state) in [0u8, 1, 3].into_iter().enumerate() {
        let name = format!("flipped-state-{i}");
        let s = create(&name, 1 << 20, 4);
        let a_data = vec![bytes(10, 5000)];
        let b_data = vec![bytes(11, 7000)];
        s.add_model("a", &spec(&a_data), &mut |_, _| {}).unwrap();
        let b = s.add_model("b", &spec(&b_data), &mut |_, _| {}).unwrap();
        let path = seg_path(&name);
        let slot = slot_of(&path, "b");
        patch(&path, HEADER_BYTES + u64::from(slot) * ENTRY_BYTES, &[new_state]);
        let b_file = read_at(&path, b.segment_offset, b.bytes as usize);
        let s = open(&name);
        // The damage is reported, naming the slot...
        let e = s.models().expect_err("a damaged table must be reported");
        assert!(matches!(&e, Error::CorruptStore(m) if m.contains(&format!("slot {slot}"))), "state {new_state}: {e}");
        // ...and b's space is never given to another model.
        let c_data = vec![bytes(12, 9000)];
        let r = s.add_model("c", &spec(&c_data), &mut |_, _| {});
        assert!(matches!(r, Err(Error::CorruptStore(_))), "state {new_state}: add over a damaged table: {r:?}");
        assert_eq!(read_at(&path, b.segment_offset, b.bytes as usize), b_file);
        // The intact model is still readable.
        assert_eq!(s.model_bytes(&s.model("a").unwrap()).unwrap().to_vec(), stored_bytes(&a_data));
        drop(s);
        Store::destroy(&name).unwrap();
    }
}

#[test]
fn segments_of_another_owner_writable_by_others_or_symlinked_are_refused() {
    let name = "perm-owner";
    drop(create(name, 64 << 10, 4));
    let path = seg_path(name);
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if me == 0 {
        std::os::unix::fs::chown(&path, Some(12345), None).unwrap();
        let r = Store::open(name);
        assert!(r.is_err(), "a segment owned by uid 12345 was opened by uid 0");
        std::os::unix::fs::chown(&path, Some(0), None).unwrap();
    }
    open(name);
    use std::os::unix::fs::PermissionsExt;
    for mode in [0o622, 0o602, 0o666] {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        let r = Store::open(name);
        assert!(r.is_err(), "mode {mode:o} was accepted");
    }
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    open(name);
    let link = seg_path("perm-link");
    std::os::unix::fs::symlink(&path, &link).unwrap();
    let r = Store::open("perm-link");
    assert!(r.is_err(), "a symlink was followed");
    std::fs::remove_file(&link).unwrap();
    Store::destroy(name).unwrap();
}

#[test]
fn a_model_id_counter_at_its_end_is_damage_not_a_panic() {
    // Found by the segment_open fuzz target: the add computed id + 1 and
    // panicked (debug builds) on a header whose next id is u64::MAX.
    let name = "id-overflow";
    let s = create(name, 1 << 20, 4);
    let data = vec![bytes(1, 1000)];
    s.add_model("first", &spec(&data), &mut |_, _| {}).unwrap();
    let file = std::fs::OpenOptions::new().write(true).open(seg_path(name)).unwrap();
    file.write_all_at(&u64::MAX.to_le_bytes(), pipeswitch::store::layout::H_NEXT_ID as u64).unwrap();
    let e = s.add_model("second", &spec(&data), &mut |_, _| {}).unwrap_err();
    assert!(matches!(e, Error::CorruptStore(_)) && e.to_string().contains("next model id"), "{e}");
    // Nothing stored was lost, and the failed add left nothing behind.
    assert_eq!(s.models().unwrap().len(), 1);
    let m = s.model("first").unwrap();
    assert_eq!(s.model_bytes(&m).unwrap(), stored_bytes(&data));
    drop(s);
    Store::destroy(name).unwrap();
}

// ---------------------------------------------------------------------------
// Leases: in this process, across processes, for bound programs
// ---------------------------------------------------------------------------

#[test]
fn a_removed_model_is_hidden_at_once_and_freed_with_its_last_lease() {
    let name = "lease-local";
    let s = create(name, 1 << 20, 4);
    let a_data = vec![bytes(60, 70_000)];
    s.add_model("a", &spec(&a_data), &mut |_, _| {}).unwrap();
    let fa = s.model_footprint("a").unwrap();
    let u0 = s.usage().unwrap();
    let lease = s.lease("a").unwrap();
    let lease2 = lease.clone();
    let other = open(name).lease("a").unwrap();
    s.remove_model("a").unwrap();
    // Hidden everywhere at once...
    assert!(matches!(s.model("a"), Err(Error::NotFound(_))));
    assert!(matches!(s.lease("a"), Err(Error::NotFound(_))));
    assert!(matches!(open(name).model("a"), Err(Error::NotFound(_))));
    assert!(s.models().unwrap().is_empty());
    assert_eq!(s.usage().unwrap().models, 0);
    // ...but its space is kept while leased, and its bytes readable through the lease.
    assert_eq!(s.usage().unwrap().used_bytes, u0.used_bytes);
    let mut back = vec![0u8; lease.bytes as usize];
    s.read(&lease, 0, &mut back).unwrap();
    assert!(back == stored_bytes(&a_data));
    // The name is free again, and the new model goes elsewhere.
    let a2_data = vec![bytes(61, 70_000)];
    let a2 = s.add_model("a", &spec(&a2_data), &mut |_, _| {}).unwrap();
    assert_ne!(a2.segment_offset, lease.segment_offset);
    assert_eq!(s.usage().unwrap().used_bytes, u0.used_bytes + fa);
    s.remove_model("a").unwrap();
    assert_eq!(s.usage().unwrap().used_bytes, u0.used_bytes, "an unleased remove frees at once");
    drop(lease);
    drop(lease2);
    assert_eq!(s.usage().unwrap().used_bytes, u0.used_bytes, "another handle still leases it");
    drop(other);
    assert_eq!(s.usage().unwrap().used_bytes, 0, "the last lease frees the space");
    // A lease is no way into another store.
    let t = create("lease-local-2", 1 << 20, 4);
    t.add_model("a", &spec(&a_data), &mut |_, _| {}).unwrap();
    let foreign = t.lease("a").unwrap();
    let mut b = [0u8; 8];
    assert!(matches!(s.read(&foreign, 0, &mut b), Err(Error::InvalidArgument(_))));
    drop((s, t, foreign));
    Store::destroy(name).unwrap();
    Store::destroy("lease-local-2").unwrap();
}

#[test]
fn a_lease_held_by_another_process_keeps_the_space_until_it_dies() {
    let name = "lease-proc";
    let s = create(name, 1 << 20, 4);
    let a_data = vec![bytes(70, 90_000)];
    let a = s.add_model("a", &spec(&a_data), &mut |_, _| {}).unwrap();
    let fa = s.model_footprint("a").unwrap();
    let (mut held_r, mut held_w) = pipe();
    let (mut end_r, mut end_w) = pipe();
    // SAFETY: the child leases a model and leaves with _exit or dies.
    let child = match unsafe { fork() }.expect("fork") {
        ForkResult::Child => {
            let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let c = Store::open(name).unwrap();
                let l = c.lease("a").unwrap();
                send_byte(&mut held_w);
                wait_byte(&mut end_r);
                // Still the model's bytes, although removed meanwhile.
                let mut b = vec![0u8; l.bytes as usize];
                c.read(&l, 0, &mut b).unwrap();
                i32::from(b != stored_bytes(&[bytes(70, 90_000)]))
            }))
            .unwrap_or(101);
            // SAFETY: ends the child without running the harness's atexit.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => child,
    };
    wait_byte(&mut held_r);
    s.remove_model("a").unwrap();
    assert!(matches!(s.model("a"), Err(Error::NotFound(_))), "hidden at once");
    assert_eq!(s.usage().unwrap().used_bytes, fa, "freed while another process reads it");
    // An add does not take the leased space.
    let b_data = vec![bytes(71, 90_000)];
    let b = s.add_model("b", &spec(&b_data), &mut |_, _| {}).unwrap();
    assert!(b.segment_offset >= a.segment_offset + fa);
    send_byte(&mut end_w);
    assert_eq!(waitpid(child, None).unwrap(), WaitStatus::Exited(child, 0));
    // The child released its lease on exit.
    s.remove_model("b").unwrap();
    assert_eq!(s.usage().unwrap().used_bytes, 0);

    // A holder killed outright: the kernel drops its lock; the next add reclaims.
    s.add_model("a", &spec(&a_data), &mut |_, _| {}).unwrap();
    let (mut held_r, mut held_w) = pipe();
    // SAFETY: as above; this child is killed while it holds the lease.
    let child = match unsafe { fork() }.expect("fork") {
        ForkResult::Child => {
            let c = Store::open(name).unwrap();
            let _l = c.lease("a").unwrap();
            send_byte(&mut held_w);
            loop {
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
        }
        ForkResult::Parent { child } => child,
    };
    wait_byte(&mut held_r);
    s.remove_model("a").unwrap();
    assert_eq!(s.usage().unwrap().used_bytes, fa);
    nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL).unwrap();
    assert!(matches!(waitpid(child, None).unwrap(), WaitStatus::Signaled(..)));
    let c = s.add_model("c", &spec(&b_data), &mut |_, _| {}).unwrap();
    assert_eq!(c.segment_offset, a.segment_offset, "the dead holder's space was not reclaimed");
    assert_eq!(s.usage().unwrap().used_bytes, s.model_footprint("c").unwrap());
    drop(s);
    Store::destroy(name).unwrap();
}

#[test]
fn a_bound_program_keeps_its_model_stored() {
    use pipeswitch::model::cpu::tiny_models;
    use pipeswitch::model::weights::write_model_file;
    use pipeswitch::worker::Program;

    let name = "lease-program";
    let defs = tiny_models(2, 16);
    let d = &defs[2];
    let s = create(name, 16 << 20, 4);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    write_model_file(d, &path, 3, &mut |_, _| {}).unwrap();
    s.add_safetensors("gpt", &path, None, &mut |_, _| {}).unwrap();
    let f = s.model_footprint("gpt").unwrap();
    let p = Program::from_store(&s, "gpt").unwrap();
    s.remove_model("gpt").unwrap();
    assert_eq!(s.usage().unwrap().used_bytes, f, "the program's model was freed");
    drop(p);
    assert_eq!(s.usage().unwrap().used_bytes, 0);
    drop(s);
    Store::destroy(name).unwrap();
}

// ---------------------------------------------------------------------------
// Defect 6: capacity
// ---------------------------------------------------------------------------

#[test]
fn a_store_sized_with_capacity_for_holds_its_models_and_not_more() {
    use pipeswitch::store::{capacity_for, footprint};
    shm_dir();
    let mut sizes: Vec<usize> = vec![1, 255, 256, 257, 1000, 4095, 4096, 4097, 8191, 8192, 12_000, 65_536, 100_003, 1 << 20];
    sizes.extend((0..24).map(|i| 37 + i * 5_003));
    for (i, &n) in sizes.iter().enumerate() {
        for layers in [1usize, 3, 17] {
            let data: Vec<Vec<u8>> = (0..layers).map(|l| bytes((i * 100 + l) as u64, n.div_ceil(layers))).collect();
            let sp = spec(&data);
            let f = footprint(&sp).unwrap();
            let weights = stored_bytes(&data).len() as u64;
            assert!(f > weights && f % ALLOC_ALIGN == 0, "n {n}: footprint {f}, weights {weights}");
            let cap = capacity_for(&[f]).unwrap();
            assert_eq!(cap, f);
            let name = format!("cap-{i}-{layers}");
            // A capacity of the model's weights (rounded up to pages) holds
            // it only if its metadata fits in the last page's slack.
            if weights >= ALLOC_ALIGN {
                let s = create(&name, weights, 1);
                let r = s.add_model("m", &sp, &mut |_, _| {});
                if weights.next_multiple_of(ALLOC_ALIGN) >= f {
                    r.unwrap();
                } else {
                    assert!(matches!(r, Err(Error::StoreFull(_))), "n {n}, {layers} layers: {r:?}");
                }
                drop(s);
                Store::destroy(&name).unwrap();
            }
            // ...its footprint is, exactly.
            let s = create(&name, cap, 1);
            let m = s.add_model("m", &sp, &mut |_, _| {}).unwrap_or_else(|e| panic!("n {n}, {layers} layers: {e}"));
            assert_eq!(m.bytes, weights);
            assert_eq!(s.model_footprint("m").unwrap(), f);
            assert_eq!(s.usage().unwrap().used_bytes, f);
            assert_eq!(s.usage().unwrap().largest_free_bytes, 0);
            drop(s);
            Store::destroy(&name).unwrap();
            if f > ALLOC_ALIGN {
                let s = create(&name, f - ALLOC_ALIGN, 1);
                assert!(matches!(s.add_model("m", &sp, &mut |_, _| {}), Err(Error::StoreFull(_))));
                drop(s);
                Store::destroy(&name).unwrap();
            }
        }
    }
    // A set of models: the sum of their footprints, in any order of adds.
    let set: Vec<Vec<Vec<u8>>> = (0..6).map(|k| vec![bytes(900 + k, 3_000 + 9_999 * k as usize)]).collect();
    let fps: Vec<u64> = set.iter().map(|d| footprint(&spec(d)).unwrap()).collect();
    let cap = capacity_for(&fps).unwrap();
    assert_eq!(cap, fps.iter().sum::<u64>());
    let s = create("cap-set", cap, 8);
    for (k, d) in set.iter().enumerate().rev() {
        s.add_model(&format!("m{k}"), &spec(d), &mut |_, _| {}).unwrap();
    }
    assert_eq!(s.usage().unwrap().used_bytes, cap);
    drop(s);
    Store::destroy("cap-set").unwrap();
    assert_eq!(capacity_for(&[]).unwrap(), ALLOC_ALIGN);
    assert_eq!(capacity_for(&[1, 4097]).unwrap(), 3 * ALLOC_ALIGN);
    assert!(matches!(capacity_for(&[u64::MAX - 10, 8192]), Err(Error::InvalidArgument(_))));
}

#[test]
fn capacity_and_checks_through_the_c_abi() {
    use pipeswitch::ffi::{PS_ERR_CORRUPT_STORE, PS_ERR_INVALID_STATE, PS_ERR_NOT_FOUND, PS_ERR_NULL_ARGUMENT};
    use pipeswitch::store::safetensors::{write_file, WriteTensor};
    shm_dir();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    let w = bytes(80, 40_000);
    let b = bytes(81, 1_000);
    write_file(
        &path,
        &[
            WriteTensor { name: "l0.w", dtype: Dtype::U8, shape: &[40_000], data: &w },
            WriteTensor { name: "l1.b", dtype: Dtype::U8, shape: &[1_000], data: &b },
        ],
        None,
    )
    .unwrap();
    let cpath = CString::new(path.to_str().unwrap()).unwrap();
    let mut fp = 0u64;
    assert_eq!(ps_store_safetensors_footprint(cpath.as_ptr(), std::ptr::null(), 0, &mut fp), PS_OK);
    let mut cap = 0u64;
    assert_eq!(ps_store_capacity_for(&fp, 1, &mut cap), PS_OK);
    assert_eq!(cap, fp);
    assert_eq!(ps_store_capacity_for(std::ptr::null(), 0, &mut cap), PS_OK);
    assert_eq!(cap, ALLOC_ALIGN);
    assert_eq!(ps_store_capacity_for(std::ptr::null(), 1, &mut cap), PS_ERR_NULL_ARGUMENT);
    assert_eq!(ps_store_capacity_for(&fp, 1, std::ptr::null_mut()), PS_ERR_NULL_ARGUMENT);
    let name = CString::new("cap-c").unwrap();
    let model = CString::new("m").unwrap();
    let mut s = std::ptr::null_mut();
    assert_eq!(ps_store_create(name.as_ptr(), fp, 1, &mut s), PS_OK);
    assert_eq!(ps_store_add_safetensors(s, model.as_ptr(), cpath.as_ptr(), std::ptr::null(), 0), PS_OK);
    let mut stored = 0u64;
    assert_eq!(ps_store_model_footprint(s, model.as_ptr(), &mut stored), PS_OK);
    assert_eq!(stored, fp);
    let mut info = ps_model_info { id: 0, bytes: 0, n_layers: 0, n_tensors: 0 };
    assert_eq!(ps_store_model_info(s, model.as_ptr(), &mut info), PS_OK);
    assert!(info.bytes < fp);
    let nope = CString::new("nope").unwrap();
    assert_eq!(ps_store_model_footprint(s, nope.as_ptr(), &mut stored), PS_ERR_NOT_FOUND);
    assert_eq!(ps_store_check(s), PS_OK);
    assert_eq!(ps_store_check(std::ptr::null()), PS_ERR_NULL_ARGUMENT);
    // Damage: a flipped state byte.
    let seg = seg_path("cap-c");
    patch(&seg, HEADER_BYTES + u64::from(slot_of(&seg, "m")) * ENTRY_BYTES, &[1]);
    assert_eq!(ps_store_check(s), PS_ERR_CORRUPT_STORE);
    let mut count = 0usize;
    assert_eq!(ps_store_model_count(s, &mut count), PS_ERR_CORRUPT_STORE);
    // An inherited handle in a forked child.
    let handle = s as usize;
    let status = in_child(|| {
        let mut n = 0usize;
        let st = ps_store_model_count(handle as *const ps_store, &mut n);
        i32::from(st != PS_ERR_INVALID_STATE)
    });
    assert!(matches!(status, WaitStatus::Exited(_, 0)), "{status:?}");
    assert_eq!(ps_store_free(s), PS_OK);
    Store::destroy("cap-c").unwrap();
}

/// A commit whose slot was taken from it while it wrote fails, and writes
/// nothing over whatever the slot holds now.
#[test]
fn a_commit_checks_that_its_slot_is_still_its_own() {
    let name = "commit-check";
    let s = create(name, 1 << 20, 4);
    let data: Vec<Vec<u8>> = (0..4).map(|i| bytes(90 + i, 10_000)).collect();
    let path = seg_path(name);
    let mut stolen = false;
    let r = s.add_model("w", &spec(&data), &mut |done, total| {
        if !stolen && done > 0 && done < total {
            stolen = true;
            // As a mistaken reclaim elsewhere would: the slot is freed.
            let slot = slot_of(&path, "w");
            patch(&path, HEADER_BYTES + u64::from(slot) * ENTRY_BYTES, &[0u8; ENTRY_BYTES as usize]);
        }
    });
    assert!(matches!(&r, Err(Error::InvalidState(m)) if m.contains("taken")), "{r:?}");
    assert!(s.models().unwrap().is_empty());
    assert_eq!(s.usage().unwrap().used_bytes, 0);
    // The writer lock was let go: the slot and the name can be used again.
    s.add_model("w", &spec(&data), &mut |_, _| {}).unwrap();
    assert!(s.model_bytes(&s.model("w").unwrap()).unwrap() == stored_bytes(&data));
    drop(s);
    Store::destroy(name).unwrap();
}
