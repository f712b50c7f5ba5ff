//! The residency manager on the GPU: bytes after misses, hits and moves, and
//! waits per group. `cargo test --test residency_gpu -- --ignored`.

use std::sync::Arc;

use pipeswitch::arena::Arena;
use pipeswitch::model::synthetic::{add_synthetic, shape_size, Shape};
use pipeswitch::cuda::{Device, Stream};
use pipeswitch::error::Error;
use pipeswitch::residency::ResidencyManager;
use pipeswitch::store::{Dtype, Store};

struct TempStore(Arc<Store>, String);
impl Drop for TempStore {
    fn drop(&mut self) {
        let _ = Store::destroy(&self.1);
    }
}

/// A model of `layers` layers of `kib` KiB each.
fn shape(layers: usize, kib: u64) -> Shape {
    (0..layers)
        .map(|i| (format!("l{i}"), vec![(format!("l{i}.w"), Dtype::F32, vec![kib * 256])]))
        .collect()
}

fn temp_store(tag: &str, models: &[(&str, Shape)]) -> TempStore {
    let name = format!("residency-{tag}-{}", std::process::id());
    let _ = Store::destroy(&name);
    let cap: u64 = models.iter().map(|(_, s)| shape_size(s).unwrap().0 + (1 << 20)).sum();
    let store = Store::create(&name, cap, 8).unwrap();
    for (i, (m, s)) in models.iter().enumerate() {
        add_synthetic(&store, m, s, 7 + i as u64, &mut |_, _| {}).unwrap();
    }
    TempStore(Arc::new(store), name)
}

fn assert_bytes(arena: &Arena, store: &Store, model: &str, offset: u64) {
    let m = store.model(model).unwrap();
    let mut back = vec![0u8; m.bytes as usize];
    arena.read(offset, &mut back).unwrap();
    assert!(back == store.model_bytes(&m).unwrap(), "{model}: arena bytes at {offset} differ from the store");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn two_of_three_models_stay_resident_and_hits_copy_nothing() {
    let ts = temp_store("lru", &[("a", shape(8, 1024)), ("b", shape(8, 1024)), ("c", shape(8, 1024))]);
    let store = &ts.0;
    let bytes = store.model("a").unwrap().bytes;
    let arena = Arc::new(Arena::create(0, 3 * bytes, 1 << 20).unwrap());
    let mgr = ResidencyManager::new(&arena, 2 * bytes + 4096).unwrap();
    for (m, hit) in [("a", false), ("b", false), ("a", true), ("c", false), ("a", true), ("b", false)] {
        let u = mgr.acquire(store, m, Some(&[0, 2, 5])).unwrap();
        assert_eq!(u.was_hit(), hit, "{m}");
        u.synchronize().unwrap();
        assert_bytes(&arena, store, m, u.offset());
        drop(u);
        assert!(mgr.is_resident(store, m).unwrap(), "{m} stays resident after its use");
    }
    let s = mgr.stats().unwrap();
    // c evicted b (least recently used), then b evicted c.
    assert_eq!((s.counters.hits, s.counters.misses, s.counters.evictions), (2, 4, 2));
    assert_eq!(s.counters.bytes_loaded, 4 * bytes);
    assert!(s.switch_ms > 0.0);
    assert!(!mgr.is_resident(store, "c").unwrap());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn held_models_are_never_evicted_and_moves_keep_bytes() {
    let ts = temp_store(
        "moves",
        &[("m0", shape(4, 512)), ("m1", shape(4, 512)), ("m2", shape(4, 512)), ("m3", shape(4, 512)), ("big", shape(4, 1024))],
    );
    let store = &ts.0;
    let small = store.model("m0").unwrap().bytes;
    let big = store.model("big").unwrap().bytes;
    assert!(big >= 2 * small - 4096);
    let arena = Arc::new(Arena::create(0, 8 * small, 1 << 20).unwrap());
    let mgr = ResidencyManager::new(&arena, 4 * small).unwrap();
    for m in ["m0", "m1", "m2", "m3"] {
        mgr.acquire(store, m, None).unwrap().synchronize().unwrap();
    }
    // m1 and m3 leave (their store entries stay; only the manager forgets
    // them through eviction). Hold m0 and m2: the big model cannot fit.
    let h0 = mgr.acquire(store, "m0", None).unwrap();
    let h2 = mgr.acquire(store, "m2", None).unwrap();
    let err = mgr.acquire(store, "big", None).unwrap_err();
    assert!(matches!(err, Error::ArenaFull(_)), "{err}");
    assert_bytes(&arena, store, "m0", h0.offset());
    assert_bytes(&arena, store, "m2", h2.offset());
    // Release m2: evicting m3 and m1 is not enough in place, but m2 moves.
    let before = mgr.stats().unwrap().counters;
    drop(h2);
    let u = mgr.acquire(store, "big", None).unwrap();
    u.synchronize().unwrap();
    assert_bytes(&arena, store, "big", u.offset());
    assert_bytes(&arena, store, "m0", h0.offset());
    let after = mgr.stats().unwrap().counters;
    assert!(after.evictions > before.evictions);
    // Whatever stayed resident still holds its own bytes.
    for m in ["m1", "m2", "m3"] {
        if mgr.is_resident(store, m).unwrap() {
            let again = mgr.acquire(store, m, None).unwrap();
            assert!(again.was_hit());
            assert_bytes(&arena, store, m, again.offset());
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn a_second_use_of_a_loading_model_waits_on_the_same_copy() {
    let ts = temp_store("join", &[("m", shape(16, 16 * 1024))]);
    let store = &ts.0;
    let bytes = store.model("m").unwrap().bytes;
    let arena = Arc::new(Arena::create(0, bytes + (8 << 20), 1 << 20).unwrap());
    let mgr = ResidencyManager::new(&arena, bytes + 4096).unwrap();
    let first = mgr.acquire(store, "m", Some(&[0, 4, 8, 12])).unwrap();
    let second = mgr.acquire(store, "m", Some(&[0, 4, 8, 12])).unwrap();
    assert!(!first.was_hit() && second.was_hit());
    assert_eq!(first.offset(), second.offset());
    // A compute stream made to wait for the last group through the second
    // use sees every byte.
    let d = Device::get(0).unwrap();
    let s = Stream::new(d).unwrap();
    second.wait_group(second.group_of_layer(15).unwrap(), s.raw()).unwrap();
    s.synchronize().unwrap();
    assert!(second.switch().unwrap().group_ready(3).unwrap());
    assert_bytes(&arena, store, "m", second.offset());
    drop(first);
    drop(second);
    assert!(mgr.is_resident(store, "m").unwrap());
}
