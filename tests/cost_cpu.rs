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

mod c_abi {
    use super::*;
    use pipeswitch::ffi::plan::*;
    use pipeswitch::ffi::store::{ps_store, ps_store_free, ps_store_open};
    use pipeswitch::ffi::*;
    use std::ffi::{c_void, CString};
    use std::ptr::{null, null_mut};

    fn costs() -> ps_cost_model {
        sample().costs.into()
    }

    #[test]
    fn plan_with_a_cost_model_matches_the_library() {
        let t = [0.5, 0.2, 0.9, 0.1, 0.4];
        let x = [0.3, 0.6, 0.2, 0.8, 0.1];
        let model = costs();
        let mut starts = [usize::MAX; 5];
        let (mut n, mut ms) = (0usize, 0.0f64);
        let rc = ps_plan_groups_cost(t.as_ptr(), x.as_ptr(), 5, &model, starts.as_mut_ptr(), 5, &mut n, &mut ms);
        assert_eq!(rc, PS_OK);
        let want = pipeswitch::planner::plan_groups_with(&t, &x, &sample().costs).expect("plan");
        assert_eq!(&starts[..n], &want.group_starts[..]);
        assert_eq!(ms, want.makespan_ms);
        let mut again = 0.0;
        assert_eq!(ps_plan_makespan_cost(t.as_ptr(), x.as_ptr(), 5, &model, starts.as_ptr(), n, &mut again), PS_OK);
        assert_eq!(again, ms);
        // Bad input: NULL model, bad terms; outputs untouched.
        let mut m2 = -1.0;
        assert_eq!(ps_plan_makespan_cost(t.as_ptr(), x.as_ptr(), 5, null(), starts.as_ptr(), n, &mut m2), PS_ERR_NULL_ARGUMENT);
        let bad = ps_cost_model { exec_scale: 0.0, ..model };
        assert_eq!(ps_plan_groups_cost(t.as_ptr(), x.as_ptr(), 5, &bad, starts.as_mut_ptr(), 5, &mut n, &mut m2), PS_ERR_INVALID_ARGUMENT);
        assert_eq!(m2, -1.0);
    }

    /// The "GPU" of the closed-loop test: the extended model with known terms.
    struct Gpu {
        t: Vec<f64>,
        x: Vec<f64>,
        truth: Costs,
        calls: usize,
        fail_at: usize,
    }

    unsafe extern "C" fn measure(user: *mut c_void, starts: *const usize, n: usize, ms_out: *mut f64) -> i32 {
        let gpu = unsafe { &mut *(user as *mut Gpu) };
        gpu.calls += 1;
        if gpu.calls == gpu.fail_at {
            return 7;
        }
        let plan = unsafe { std::slice::from_raw_parts(starts, n) };
        match pipeswitch::planner::makespan_with(&gpu.t, &gpu.x, &gpu.truth, plan) {
            Ok(ms) => {
                unsafe { ms_out.write(ms) };
                0
            }
            Err(_) => 1,
        }
    }

    #[test]
    fn closed_loop_through_the_c_abi() {
        let n = 24;
        let t: Vec<f64> = (0..n).map(|i| 0.1 + 0.05 * ((i * 7) % 5) as f64).collect();
        let x: Vec<f64> = (0..n).map(|i| 0.1 + 0.04 * ((i * 3) % 7) as f64).collect();
        let truth = Costs { exec_overhead_ms: 0.2, first_kernel_ms: 0.3, exec_scale: 0.7, ..Costs::new(0.004, 0.0) };
        let mut gpu = Gpu { t: t.clone(), x: x.clone(), truth, calls: 0, fail_at: 0 };
        let base: ps_cost_model = Costs::new(0.004, 0.005).into();
        let extra = [0usize, 5, 0, 12];
        let counts = [2usize, 2];
        let mut record = std::mem::MaybeUninit::<ps_cost_record>::zeroed();
        let mut starts = vec![0usize; n];
        let mut groups = 0usize;
        let rc = ps_plan_closed_loop(
            t.as_ptr(), x.as_ptr(), n, &base, extra.as_ptr(), counts.as_ptr(), 2, Some(measure),
            &mut gpu as *mut Gpu as *mut c_void, 4, 0.03, record.as_mut_ptr(), starts.as_mut_ptr(), n, &mut groups,
        );
        assert_eq!(rc, PS_OK);
        let record = unsafe { record.assume_init() };
        let optimum = pipeswitch::planner::plan_groups_with(&t, &x, &truth).expect("plan").makespan_ms;
        let truly = pipeswitch::planner::makespan_with(&t, &x, &truth, &starts[..groups]).expect("valid");
        assert_eq!(record.measured_ms, truly);
        assert!(truly <= optimum * 1.01, "{truly} vs {optimum}");
        assert!((record.measured_ms / record.predicted_ms - 1.0).abs() <= 0.03, "{record:?}");
        assert_eq!(record.groups as usize, groups);
        assert!(gpu.calls >= 7);
        // A failing callback fails the call; nothing is written.
        let mut gpu = Gpu { t: t.clone(), x: x.clone(), truth, calls: 0, fail_at: 3 };
        let mut groups2 = 99usize;
        let mut rec2 = std::mem::MaybeUninit::<ps_cost_record>::zeroed();
        let rc = ps_plan_closed_loop(
            t.as_ptr(), x.as_ptr(), n, &base, null(), null(), 0, Some(measure),
            &mut gpu as *mut Gpu as *mut c_void, 4, 0.03, rec2.as_mut_ptr(), starts.as_mut_ptr(), n, &mut groups2,
        );
        assert_eq!(rc, PS_ERR_INVALID_STATE);
        assert_eq!(groups2, 99);
        let rc = ps_plan_closed_loop(
            t.as_ptr(), x.as_ptr(), n, &base, null(), null(), 0, None,
            null_mut(), 4, 0.03, rec2.as_mut_ptr(), starts.as_mut_ptr(), n, &mut groups2,
        );
        assert_eq!(rc, PS_ERR_NULL_ARGUMENT);
    }

    #[test]
    fn store_cost_through_the_c_abi() {
        let name = "cost-store-ffi";
        let s = store_with_model(name);
        let cname = CString::new(name).expect("name");
        let model = CString::new("m").expect("name");
        let mut st: *mut ps_store = null_mut();
        assert_eq!(ps_store_open(cname.as_ptr(), &mut st), PS_OK);
        let mut rec = std::mem::MaybeUninit::<ps_cost_record>::zeroed();
        let mut has = 7u32;
        assert_eq!(ps_store_get_cost(st, model.as_ptr(), rec.as_mut_ptr(), &mut has), PS_OK);
        assert_eq!(has, 0);
        let want: ps_cost_record = sample().into();
        assert_eq!(ps_store_set_cost(st, model.as_ptr(), &want), PS_OK);
        assert_eq!(ps_store_get_cost(st, model.as_ptr(), rec.as_mut_ptr(), &mut has), PS_OK);
        assert_eq!(has, 1);
        assert_eq!(unsafe { rec.assume_init() }, want);
        assert_eq!(s.cost("m").expect("read"), Some(sample()));
        let bad = ps_cost_record { predicted_ms: f64::NAN, ..want };
        assert_eq!(ps_store_set_cost(st, model.as_ptr(), &bad), PS_ERR_INVALID_ARGUMENT);
        assert_eq!(ps_store_set_cost(st, model.as_ptr(), null()), PS_ERR_NULL_ARGUMENT);
        let nope = CString::new("nope").expect("name");
        assert_eq!(ps_store_get_cost(st, nope.as_ptr(), rec.as_mut_ptr(), &mut has), PS_ERR_NOT_FOUND);
        assert_eq!(s.cost("m").expect("read"), Some(sample()));
        ps_store_free(st);
        drop(s);
        Store::destroy(name).expect("destroy");
    }
}
