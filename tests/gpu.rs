//! Tests that need a CUDA GPU: `cargo test --test gpu -- --ignored` on the GPU
//! machine. Each creates its own store (unique name) and arena.

use std::process::Command;
use std::sync::Arc;

use pipeswitch::arena::{Arena, ArenaIpcHandle};
use pipeswitch::model::synthetic::{add_synthetic, fill_random, resnet152_shape, Shape};
use pipeswitch::cuda::{memory, Device, DeviceAlloc, Stream};
use pipeswitch::error::Error;
use pipeswitch::store::{Dtype, Store};
use pipeswitch::switch::{Chunking, Switch};
use pipeswitch::{measure, planner};

fn store_name(tag: &str) -> String {
    format!("gputest-{tag}-{}", std::process::id())
}

/// A store holding one model of `shape`, removed again when dropped.
struct TempStore(Arc<Store>, String);
impl Drop for TempStore {
    fn drop(&mut self) {
        let _ = Store::destroy(&self.1);
    }
}

fn temp_store(tag: &str, models: &[(&str, &Shape)]) -> TempStore {
    let name = store_name(tag);
    let _ = Store::destroy(&name);
    let cap: u64 = models
        .iter()
        .map(|(_, s)| pipeswitch::model::synthetic::shape_size(s).unwrap().0 + (4 << 20))
        .sum();
    let store = Store::create(&name, cap, 8).unwrap();
    for (i, (m, s)) in models.iter().enumerate() {
        add_synthetic(&store, m, s, 1000 + i as u64, &mut |_, _| {}).unwrap();
    }
    TempStore(Arc::new(store), name)
}

/// A small transformer-like model with large and tiny layers.
fn small_shape() -> Shape {
    let f = Dtype::F32;
    let mut s: Shape = vec![("embed".into(), vec![("embed.weight".into(), f, vec![4096, 512])])];
    for i in 0..6 {
        s.push((format!("b{i}.ln"), vec![(format!("b{i}.ln.weight"), f, vec![512]), (format!("b{i}.ln.bias"), f, vec![512])]));
        s.push((format!("b{i}.fc"), vec![(format!("b{i}.fc.weight"), f, vec![512, 2048]), (format!("b{i}.fc.bias"), f, vec![2048])]));
    }
    s
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn pipelined_switch_delivers_every_byte_and_address() {
    let shape = resnet152_shape();
    let ts = temp_store("bytes", &[("resnet", &shape)]);
    let store = &ts.0;
    let m = store.model("resnet").unwrap();
    let arena = Arc::new(Arena::create(0, m.bytes + (8 << 20), 2 << 20).unwrap());
    let region = arena.alloc(m.bytes).unwrap();
    let mut sw = Switch::new(0).unwrap();
    let plans = [
        planner::per_layer_plan(m.layers.len()),
        planner::single_group_plan(m.layers.len()),
        vec![0, 10, 100, 300],
    ];
    for (pi, plan) in plans.iter().enumerate() {
        arena.fill(region, m.bytes, 0xA5).unwrap();
        sw.start(store, "resnet", &arena, region, plan).unwrap();
        sw.synchronize().unwrap();
        let mut back = vec![0u8; m.bytes as usize];
        arena.read(region, &mut back).unwrap();
        assert!(back == store.model_bytes(&m).unwrap(), "plan {pi}: arena differs from store");
        assert_eq!(sw.n_groups().unwrap(), plan.len());
        for g in 0..plan.len() {
            assert!(sw.group_ready(g).unwrap());
        }
        for (l, _) in m.layers.iter().enumerate() {
            let g = sw.group_of_layer(l).unwrap();
            assert!(plan[g] <= l && plan.get(g + 1).is_none_or(|&e| l < e));
        }
        for (i, t) in m.tensors.iter().enumerate() {
            let (ptr, info) = sw.tensor_ptr(i).unwrap();
            assert_eq!(ptr, arena.base() + region + t.offset);
            assert_eq!(info.name, t.name);
        }
    }
    // The per-layer plan's ~470 groups are merged into few copies.
    sw.start(store, "resnet", &arena, region, &plans[0]).unwrap();
    assert!(sw.n_copies().unwrap() < 100, "{} copies", sw.n_copies().unwrap());
    // Whole-model transfer.
    arena.fill(region, m.bytes, 0).unwrap();
    sw.start_whole(store, "resnet", &arena, region).unwrap();
    assert_eq!(sw.n_copies().unwrap(), 1);
    sw.synchronize().unwrap();
    let mut back = vec![0u8; m.bytes as usize];
    arena.read(region, &mut back).unwrap();
    assert!(back == store.model_bytes(&m).unwrap());
    assert!(sw.elapsed_ms().unwrap() > 0.0);
    // A resident model attached by another switch: no copy, one group that
    // completes, the same addresses; the bytes stay as they were.
    let mut resident = Switch::new(0).unwrap();
    resident.start_resident(store, "resnet", &arena, region).unwrap();
    assert_eq!((resident.n_copies().unwrap(), resident.n_groups().unwrap()), (0, 1));
    resident.synchronize().unwrap();
    assert!(resident.group_ready(0).unwrap());
    assert_eq!(resident.group_of_layer(m.layers.len() - 1).unwrap(), 0);
    assert_eq!(resident.model_base().unwrap(), arena.base() + region);
    let (ptr, _) = resident.tensor_ptr(m.tensors.len() - 1).unwrap();
    assert_eq!(ptr, arena.base() + region + m.tensors[m.tensors.len() - 1].offset);
    arena.read(region, &mut back).unwrap();
    assert!(back == store.model_bytes(&m).unwrap());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn compute_stream_waits_for_each_group_on_the_gpu() {
    // Large groups (tens of MB) take milliseconds to copy: a device-to-device
    // copy enqueued on a worker stream right after wait_group reads poison
    // unless the wait really orders it after the group's bytes.
    let f = Dtype::F32;
    let shape: Shape = (0..8)
        .map(|i| (format!("l{i}"), vec![(format!("l{i}.w"), f, vec![8 << 20])]))
        .collect();
    let ts = temp_store("wait", &[("big", &shape)]);
    let store = &ts.0;
    let m = store.model("big").unwrap();
    let dev = Device::get(0).unwrap();
    let arena = Arc::new(Arena::create(0, m.bytes + (4 << 20), 2 << 20).unwrap());
    let region = arena.alloc(m.bytes).unwrap();
    let sink = DeviceAlloc::new(dev, m.bytes as usize).unwrap();
    let worker = Stream::new(dev).unwrap();
    let mut sw = Switch::new(0).unwrap();
    sw.set_chunking(Chunking { min_chunk: 1 << 20, max_chunk: 16 << 20 }).unwrap();
    let plan: Vec<usize> = (0..8).collect();
    for round in 0..3 {
        arena.fill(region, m.bytes, 0xEE).unwrap();
        unsafe { memory::memset_d8(sink.ptr(), 0, m.bytes as usize).unwrap() };
        dev.synchronize().unwrap();
        sw.start(store, "big", &arena, region, &plan).unwrap();
        for g in 0..plan.len() {
            sw.wait_group(g, worker.raw()).unwrap();
            let l = &m.layers[g];
            unsafe {
                memory::copy_dtod_async(
                    sink.ptr() + l.offset,
                    arena.base() + region + l.offset,
                    l.bytes as usize,
                    worker.raw(),
                )
                .unwrap()
            };
        }
        worker.synchronize().unwrap();
        let mut back = vec![0u8; m.bytes as usize];
        unsafe { memory::copy_dtoh(back.as_mut_ptr(), sink.ptr(), back.len()).unwrap() };
        assert!(back == store.model_bytes(&m).unwrap(), "round {round}: the worker read bytes before they arrived");
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_error_paths_give_errors_not_crashes() {
    let shape = small_shape();
    let ts = temp_store("errors", &[("small", &shape)]);
    let store = &ts.0;
    let m = store.model("small").unwrap();
    // Device ordinal out of range.
    assert!(matches!(Arena::create(99, 1 << 20, 0), Err(Error::InvalidArgument(_))));
    // More than the device has.
    let total = Device::get(0).unwrap().total_memory().unwrap();
    assert!(matches!(Arena::create(0, total * 2, 0), Err(Error::ArenaFull(_))));
    // A model larger than its region / the arena.
    let arena = Arc::new(Arena::create(0, 4 << 20, 2 << 20).unwrap());
    let small_region = arena.alloc(1 << 20).unwrap();
    let mut sw = Switch::new(0).unwrap();
    assert!(sw.start(store, "small", &arena, small_region, &[0]).is_err());
    assert!(matches!(sw.wait_group(0, std::ptr::null_mut()), Err(Error::InvalidState(_))));
    let big = Arc::new(Arena::create(0, m.bytes + (4 << 20), 2 << 20).unwrap());
    let region = big.alloc(m.bytes).unwrap();
    assert!(sw.start(store, "small", &big, region + 256, &[0]).is_err(), "outside the allocated region");
    assert!(matches!(sw.start(store, "nope", &big, region, &[0]), Err(Error::NotFound(_))));
    assert!(sw.start(store, "small", &big, region, &[1]).is_err());
    assert!(sw.start(store, "small", &big, region, &[0, 0]).is_err());
    assert!(sw.start(store, "small", &big, region, &[0, 99]).is_err());
    big.fill(region, m.bytes, 0xA5).unwrap();
    sw.start(store, "small", &big, region, &[0, 5]).unwrap();
    assert!(sw.wait_group(2, std::ptr::null_mut()).is_err());
    assert!(sw.group_of_layer(1000).is_err());
    assert!(sw.tensor_ptr(100_000).is_err());
    assert!(matches!(sw.tensor_ptr_by_name("zzz"), Err(Error::NotFound(_))));
    // A start with bad arguments enqueues nothing and leaves the last switch as it was.
    assert!(sw.start(store, "small", &big, region, &[0, 99]).is_err());
    assert!(sw.start(store, "small", &arena, small_region, &[0]).is_err());
    assert_eq!(sw.n_groups().unwrap(), 2);
    sw.wait_group(1, std::ptr::null_mut()).unwrap();
    sw.synchronize().unwrap();
    let mut back = vec![0u8; m.bytes as usize];
    big.read(region, &mut back).unwrap();
    assert!(back == store.model_bytes(&m).unwrap(), "the switch's bytes");
    // Export then import in the same process is refused clearly.
    let h = big.export().unwrap();
    assert!(matches!(Arena::import(&h), Err(Error::InvalidState(_))));
    let mut bad = h;
    bad.magic = *b"XXXXXXXX";
    assert!(matches!(Arena::import(&bad), Err(Error::InvalidArgument(_))));
    // An arena whose last handle goes while a switch into it is in flight
    // stays alive (the switch holds it) until its copies are done, then goes.
    big.fill(region, m.bytes, 0xA5).unwrap();
    sw.start(store, "small", &big, region, &[0, 5]).unwrap();
    let weak = Arc::downgrade(&big);
    drop(big);
    sw.synchronize().unwrap();
    let held = weak.upgrade().expect("the switch holds the arena");
    held.read(region, &mut back).unwrap();
    assert!(back == store.model_bytes(&m).unwrap(), "bytes written into an arena the caller had dropped");
    drop(held);
    // The next switch (into another arena) sees those copies done and lets it go.
    let other = Arc::new(Arena::create(0, m.bytes + (4 << 20), 2 << 20).unwrap());
    let r2 = other.alloc(m.bytes).unwrap();
    sw.start(store, "small", &other, r2, &[0]).unwrap();
    assert!(weak.upgrade().is_none(), "the arena outlived its switch");
    sw.synchronize().unwrap();
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn a_switch_from_another_store_does_not_wait_and_holds_the_first() {
    // Two stores, each opened by its own handle; the first handle is dropped
    // while its switch's copies may still be queued behind a second switch.
    let shape = small_shape();
    let ts1 = temp_store("hold1", &[("small", &shape)]);
    // The second store's "small" has other bytes (the seed follows the position).
    let ts2 = temp_store("hold2", &[("pad", &shape), ("small", &shape)]);
    let s1 = Arc::new(Store::open(&ts1.1).unwrap());
    let m = s1.model("small").unwrap();
    let arena = Arc::new(Arena::create(0, 2 * m.bytes + (8 << 20), 2 << 20).unwrap());
    let (r1, r2) = (arena.alloc(m.bytes).unwrap(), arena.alloc(m.bytes).unwrap());
    arena.fill(r1, m.bytes, 0).unwrap();
    arena.fill(r2, m.bytes, 0).unwrap();
    let mut sw = Switch::new(0).unwrap();
    for _ in 0..3 {
        sw.start(&s1, "small", &arena, r1, &[0, 3, 7]).unwrap();
        sw.start(&ts2.0, "small", &arena, r2, &[0, 5]).unwrap();
    }
    let weak = Arc::downgrade(&s1);
    drop(s1);
    sw.synchronize().unwrap();
    for (r, ts) in [(r1, &ts1), (r2, &ts2)] {
        let mut back = vec![0u8; m.bytes as usize];
        arena.read(r, &mut back).unwrap();
        let model = ts.0.model("small").unwrap();
        assert!(back == ts.0.model_bytes(&model).unwrap(), "region {r}");
    }
    let m2 = ts2.0.model("small").unwrap();
    assert!(ts1.0.model_bytes(&m).unwrap() != ts2.0.model_bytes(&m2).unwrap(), "the two models must differ");
    sw.start(&ts2.0, "small", &arena, r2, &[0]).unwrap();
    assert!(weak.upgrade().is_none(), "the first store's handle outlived its copies");
    sw.synchronize().unwrap();
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn measured_h2d_numbers_are_sane() {
    let p = measure::measure_h2d(0, 256 << 20, 5).unwrap();
    println!("{p:?}");
    assert!(p.peak_gbps > 5.0 && p.peak_gbps < 200.0, "{}", p.peak_gbps);
    assert!(p.overhead_ms >= 0.0 && p.overhead_ms < 1.0, "{}", p.overhead_ms);
    assert!(p.fit_gbps > 5.0, "{}", p.fit_gbps);
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

fn handle_bytes(h: &ArenaIpcHandle) -> Vec<u8> {
    h.to_bytes().to_vec()
}

fn handle_from(bytes: &[u8]) -> ArenaIpcHandle {
    ArenaIpcHandle::decode(bytes.try_into().expect("128 bytes")).expect("a valid handle")
}

/// The worker side of the IPC tests, run in a child process (this same test
/// binary, selected with PS_TEST_CHILD). In a normal run it checks the
/// harness itself: an exported handle survives the hex text the parent sends.
#[test]
#[ignore = "needs a CUDA GPU"]
fn ipc_child() {
    let Ok(role) = std::env::var("PS_TEST_CHILD") else {
        let arena = Arena::create(0, 4 << 20, 2 << 20).unwrap();
        let h = arena.export().unwrap();
        assert_eq!(handle_from(&unhex(&hex(&handle_bytes(&h)))), h);
        return;
    };
    let handle = handle_from(&unhex(&std::env::var("PS_TEST_HANDLE").unwrap()));
    if role == "forged" {
        // A handle that claims 64 MiB more than the owner allocated (every
        // field valid on its own): refused against the real mapping.
        let mut forged = handle;
        forged.bytes += 64 << 20;
        forged.workspace_offset += 64 << 20;
        match Arena::import(&forged) {
            Err(Error::InvalidArgument(m)) if m.contains("claims") => println!("CHILD-FORGED-REFUSED: {m}"),
            other => panic!("a forged handle was not refused: {other:?}"),
        }
        // The genuine handle still imports, with the owner's sizes.
        let arena = Arena::import(&handle).unwrap();
        assert_eq!((arena.bytes(), arena.workspace()), (handle.bytes, (handle.workspace_offset, handle.workspace_bytes)));
        println!("CHILD-GENUINE-OK");
        return;
    }
    let arena = Arc::new(Arena::import(&handle).unwrap());
    match role.as_str() {
        "switch" => {
            // A worker: opens the store by name, switches the model into the
            // region the owner allocated, checks every byte.
            let store = Arc::new(Store::open(&std::env::var("PS_TEST_STORE").unwrap()).unwrap());
            let region: u64 = std::env::var("PS_TEST_REGION").unwrap().parse().unwrap();
            let m = store.model("small").unwrap();
            assert!(arena.alloc(1024).is_err(), "an importer must not allocate");
            let mut sw = Switch::new(handle.device).unwrap();
            sw.start(&store, "small", &arena, region, &[0, 3, 7]).unwrap();
            sw.synchronize().unwrap();
            let mut back = vec![0u8; m.bytes as usize];
            arena.read(region, &mut back).unwrap();
            assert!(back == store.model_bytes(&m).unwrap());
            println!("CHILD-SWITCH-OK");
        }
        "die" => {
            // A worker that dies while holding the arena.
            arena.fill(0, 1 << 20, 0x11).unwrap();
            Device::get(handle.device).unwrap().synchronize().unwrap();
            println!("CHILD-DYING");
            std::process::abort();
        }
        r => panic!("unknown role {r}"),
    }
}

fn spawn_child(role: &str, envs: &[(&str, String)]) -> (bool, String) {
    let exe = std::env::current_exe().unwrap();
    let out = Command::new(exe)
        .args(["--ignored", "--exact", "ipc_child", "--nocapture", "--test-threads=1"])
        .env("PS_TEST_CHILD", role)
        .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn a_worker_process_switches_into_the_owners_arena() {
    let shape = small_shape();
    let ts = temp_store("ipc", &[("small", &shape)]);
    let m = ts.0.model("small").unwrap();
    let arena = Arena::create(0, m.bytes + (8 << 20), 2 << 20).unwrap();
    let region = arena.alloc(m.bytes).unwrap();
    arena.fill(region, m.bytes, 0x5A).unwrap();
    let h = arena.export().unwrap();
    let (ok, text) = spawn_child(
        "switch",
        &[("PS_TEST_HANDLE", hex(&handle_bytes(&h))), ("PS_TEST_STORE", ts.1.clone()), ("PS_TEST_REGION", region.to_string())],
    );
    assert!(ok && text.contains("CHILD-SWITCH-OK"), "{text}");
    // The owner sees the bytes the worker's switch wrote.
    let mut back = vec![0u8; m.bytes as usize];
    arena.read(region, &mut back).unwrap();
    assert!(back == ts.0.model_bytes(&m).unwrap());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn a_forged_handle_claiming_more_than_the_mapping_is_refused() {
    let arena = Arena::create(0, 32 << 20, 2 << 20).unwrap();
    let h = arena.export().unwrap();
    assert_eq!(ArenaIpcHandle::decode(&h.to_bytes()).unwrap(), h);
    let (ok, text) = spawn_child("forged", &[("PS_TEST_HANDLE", hex(&handle_bytes(&h)))]);
    assert!(ok && text.contains("CHILD-FORGED-REFUSED") && text.contains("CHILD-GENUINE-OK"), "{text}");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn the_arena_survives_a_worker_that_dies() {
    let shape = small_shape();
    let ts = temp_store("die", &[("small", &shape)]);
    let m = ts.0.model("small").unwrap();
    let arena = Arc::new(Arena::create(0, m.bytes + (8 << 20), 2 << 20).unwrap());
    let h = arena.export().unwrap();
    let (ok, text) = spawn_child("die", &[("PS_TEST_HANDLE", hex(&handle_bytes(&h)))]);
    assert!(!ok && text.contains("CHILD-DYING"), "{text}");
    let mut first = vec![0u8; 16];
    arena.read(0, &mut first).unwrap();
    assert_eq!(first, vec![0x11; 16], "the dead worker's write is visible to the owner");
    // The owner's arena and a switch into it still work.
    let region = arena.alloc(m.bytes).unwrap();
    let mut sw = Switch::new(0).unwrap();
    sw.start(&ts.0, "small", &arena, region, &[0, 4]).unwrap();
    sw.synchronize().unwrap();
    let mut back = vec![0u8; m.bytes as usize];
    arena.read(region, &mut back).unwrap();
    assert!(back == ts.0.model_bytes(&m).unwrap());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn pinned_store_shares_pointers_with_the_primary_context() {
    // The switch's copy stream belongs to the primary context: the legacy
    // default stream (what a runtime-API framework uses) can wait on it.
    let shape = small_shape();
    let ts = temp_store("ctx", &[("small", &shape)]);
    let m = ts.0.model("small").unwrap();
    let arena = Arc::new(Arena::create(0, m.bytes + (4 << 20), 2 << 20).unwrap());
    let region = arena.alloc(m.bytes).unwrap();
    let mut sw = Switch::new(0).unwrap();
    sw.start(&ts.0, "small", &arena, region, &[0, 1, 2]).unwrap();
    for g in 0..3 {
        sw.wait_group(g, std::ptr::null_mut()).unwrap();
    }
    Device::get(0).unwrap().synchronize().unwrap();
    assert!(ts.0.is_pinned());
    let mut data = vec![0u8; 4096];
    fill_random(&mut data, 5);
    arena.write(region, &data).unwrap();
    let mut back = vec![0u8; 4096];
    arena.read(region, &mut back).unwrap();
    assert_eq!(data, back);
}
