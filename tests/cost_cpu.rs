//! The cost model kept with a model in the store (issue 15): written in
//! place, read back, independent of the per-layer profile; its C ABI.

use pipeswitch::cost::StoredCost;
use pipeswitch::planner::Costs;
use pipeswitch::store::{Dtype, LayerSpec, ModelSpec, Store, TensorSpec};
use pipeswitch::Error;

mod common;
use common::shm_dir;

fn store_with_model(name: &str) -> Store {
    shm_dir();
    let s = Store::create(name, 1 << 20, 4).expect("create");
    let data = vec![7u8; 1024];
    let spec = ModelSpec {
        attributes: vec![],
        layers: (0..3)
            .map(|i| LayerSpec {
                name: format!("l{i}"),
                tensors: vec![TensorSpec { name: format!("l{i}.w"), dtype: Dtype::F32, shape: vec![256], data: &data }],
            })
            .collect(),
    };
    s.add_model("m", &spec, &mut |_, _| {}).expect("add");
    s
}

fn sample() -> StoredCost {
    StoredCost {
        costs: Costs {
            transfer_overhead_ms: 0.004,
            exec_overhead_ms: 0.02,
            first_kernel_ms: 0.3,
            exec_scale: 0.9,
            copy_slowdown: 0.05,
            floor_ms: 7.5,
            floor_per_group_ms: 0.01,
        },
        bandwidth_gbps: 53.5,
        predicted_ms: 8.4,
        measured_ms: 8.5,
        groups: 3,
        rounds: 1,
        fit_rms_rel_error: 0.012,
        unix_s: 1_800_000_000,
    }
}

#[test]
fn cost_is_stored_with_the_model() {
    let name = "cost-store-1";
    let s = store_with_model(name);
    assert_eq!(s.cost("m").expect("read"), None);
    s.set_cost("m", &sample()).expect("set");
    assert_eq!(s.cost("m").expect("read"), Some(sample()));
    // Another handle (another process would do the same) sees it.
    let other = Store::open(name).expect("open");
    assert_eq!(other.cost("m").expect("read"), Some(sample()));
    // The profile and the cost area are independent.
    s.set_layer_exec_ms("m", &[1.0, 2.0, 3.0]).expect("profile");
    assert_eq!(s.cost("m").expect("read"), Some(sample()));
    let second = StoredCost { measured_ms: 9.0, rounds: 2, ..sample() };
    s.set_cost("m", &second).expect("set");
    let m = s.model("m").expect("model");
    assert_eq!(m.layers.iter().map(|l| l.exec_ms).collect::<Vec<_>>(), vec![1.0, 2.0, 3.0]);
    assert_eq!(s.cost("m").expect("read"), Some(second));
    drop((s, other));
    Store::destroy(name).expect("destroy");
}

#[test]
fn bad_costs_are_refused_and_change_nothing() {
    let name = "cost-store-2";
    let s = store_with_model(name);
    s.set_cost("m", &sample()).expect("set");
    for bad in [
        StoredCost { predicted_ms: f64::NAN, ..sample() },
        StoredCost { measured_ms: -1.0, ..sample() },
        StoredCost { costs: Costs { exec_scale: 0.0, ..sample().costs }, ..sample() },
        StoredCost { costs: Costs { first_kernel_ms: f64::INFINITY, ..sample().costs }, ..sample() },
    ] {
        assert!(matches!(s.set_cost("m", &bad), Err(Error::InvalidArgument(_)) | Err(Error::Plan(_))), "{bad:?}");
    }
    assert_eq!(s.cost("m").expect("read"), Some(sample()));
    assert!(matches!(s.set_cost("nope", &sample()), Err(Error::NotFound(_))));
    assert!(matches!(s.cost("nope"), Err(Error::NotFound(_))));
    drop(s);
    Store::destroy(name).expect("destroy");
}
