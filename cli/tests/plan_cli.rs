//! `pipeswitch plan` shows the cost model stored with a model (issue 15).

use pipeswitch::cost::StoredCost;
use pipeswitch::planner::Costs;
use pipeswitch::store::{Dtype, LayerSpec, ModelSpec, Store, TensorSpec};

#[test]
fn plan_command_prints_the_stored_cost_model() {
    let shm = tempfile::tempdir().expect("tempdir");
    std::env::set_var(pipeswitch::store::shm::DIR_ENV, shm.path());
    let name = "cost-store-cli";
    let s = Store::create(name, 1 << 20, 4).expect("create");
    let data = vec![7u8; 1024];
    let layers = (0..3)
        .map(|i| LayerSpec {
            name: format!("l{i}"),
            tensors: vec![TensorSpec { name: format!("l{i}.w"), dtype: Dtype::F32, shape: vec![256], data: &data }],
        })
        .collect();
    s.add_model("m", &ModelSpec { attributes: vec![], layers }, &mut |_, _| {}).expect("add");
    s.set_layer_exec_ms("m", &[0.01, 0.02, 0.03]).expect("profile");
    let run = |json: bool| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_pipeswitch"));
        cmd.env(pipeswitch::store::shm::DIR_ENV, shm.path());
        cmd.args(["plan", name, "m", "--bandwidth-gbps", "50", "--transfer-overhead-ms", "0.004"]);
        if json {
            cmd.arg("--json");
        }
        let out = cmd.output().expect("run pipeswitch");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).expect("utf-8")
    };
    assert!(run(false).contains("no fitted cost model stored"));
    let stored = StoredCost {
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
    };
    s.set_cost("m", &stored).expect("set");
    let text = run(false);
    assert!(text.contains("fitted cost model (stored): L = 0.3000 ms, κ = 0.9000"), "{text}");
    assert!(text.contains("3 groups, predicted 8.400 ms, measured 8.500 ms (+1.2%)"), "{text}");
    let v: serde_json::Value = serde_json::from_str(&run(true)).expect("json");
    assert_eq!(v["stored_cost"]["measured_ms"], 8.5);
    assert_eq!(v["costs"]["first_kernel_ms"], 0.3);
    // The plan's makespan is the fitted model's (floor R = 7.5 ms + h per group).
    assert!(v["makespan_ms"].as_f64().expect("number") >= 7.5);
    drop(s);
    Store::destroy(name).expect("destroy");
}
