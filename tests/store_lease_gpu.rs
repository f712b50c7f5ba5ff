//! The switch's hold on its model (issue 9, defect 2): a model removed while
//! its copies are in flight keeps its bytes until they are done. Needs a
//! CUDA GPU: `cargo test --test store_lease_gpu -- --ignored`.

use std::sync::Arc;

use pipeswitch::arena::Arena;
use pipeswitch::model::synthetic::{add_synthetic, resnet152_shape, shape_size};
use pipeswitch::error::Error;
use pipeswitch::store::Store;
use pipeswitch::switch::Switch;

#[test]
#[ignore = "needs a CUDA GPU"]
fn a_switch_keeps_its_model_stored_until_its_copies_are_done() {
    let name = format!("gputest-lease-{}", std::process::id());
    let _ = Store::destroy(&name);
    let shape = resnet152_shape();
    let bytes = shape_size(&shape).unwrap().0;
    let store = Arc::new(Store::create(&name, 3 * (bytes + (4 << 20)), 8).unwrap());
    add_synthetic(&store, "a", &shape, 1, &mut |_, _| {}).unwrap();
    let a = store.model("a").unwrap();
    let want_a = store.model_bytes(&a).unwrap();
    let fa = store.model_footprint("a").unwrap();
    let arena = Arc::new(Arena::create(0, a.bytes + (8 << 20), 2 << 20).unwrap());
    let region = arena.alloc(a.bytes).unwrap();
    let mut sw = Switch::new(0).unwrap();
    arena.fill(region, a.bytes, 0).unwrap();
    // About 5 ms of copies over PCIe: the remove and the add below happen
    // while they run, and must not touch the bytes they read.
    sw.start_whole(&store, "a", &arena, region).unwrap();
    store.remove_model("a").unwrap();
    assert!(matches!(store.model("a"), Err(Error::NotFound(_))), "a removed model is hidden at once");
    assert_eq!(store.usage().unwrap().used_bytes, fa, "the switch's model was freed under its copies");
    add_synthetic(&store, "b", &shape, 2, &mut |_, _| {}).unwrap();
    let b = store.model("b").unwrap();
    assert!(b.segment_offset >= a.segment_offset + fa || b.segment_offset + b.bytes <= a.segment_offset);
    sw.synchronize().unwrap();
    let mut back = vec![0u8; a.bytes as usize];
    arena.read(region, &mut back).unwrap();
    assert!(back == want_a, "the arena holds other bytes than the switched model's");
    // The next switch starts after the first one's copies are done: the
    // removed model's space comes back.
    sw.start_whole(&store, "b", &arena, region).unwrap();
    sw.synchronize().unwrap();
    assert_eq!(store.usage().unwrap().used_bytes, store.model_footprint("b").unwrap());
    arena.read(region, &mut back).unwrap();
    assert!(back == store.model_bytes(&b).unwrap());
    drop(sw);
    drop(store);
    Store::destroy(&name).unwrap();
}
