//! `pipeswitch demo` on the GPU: `cargo test -p pipeswitch-cli --test demo_gpu -- --ignored`.


/// The demo's closed loop on one model (GPU): calibrated, fitted, planned,
/// measured as a server runs it; the record is stored and the report's
/// figures are consistent.
#[test]
#[ignore = "needs a CUDA GPU"]
fn demo_closed_loop_on_the_gpu() {
    // Stores on tmpfs (page-lockable), removed with the directory.
    let shm = tempfile::tempdir_in("/dev/shm").expect("tempdir in /dev/shm");
    std::env::set_var(pipeswitch::store::shm::DIR_ENV, shm.path());
    let out = tempfile::tempdir().expect("tempdir");
    let opts = pipeswitch_cli::demo::DemoOptions {
        reps: 3,
        calibration_reps: 2,
        models: vec!["resnet152".into()],
        out_dir: out.path().to_path_buf(),
        workdir: out.path().join("models"),
        ..Default::default()
    };
    let report = pipeswitch_cli::demo::run(&opts, &mut |line| println!("{line}")).expect("demo");
    let m = &report.models[0];
    assert!(m.variants.iter().all(|v| v.output_matches_ready), "{:?}", m.variants);
    let r = &m.closed_loop;
    assert!(r.data.len() > pipeswitch::cost::calibration_plans(m.needed_layers).len());
    assert!(r.rounds <= 4);
    assert_eq!(m.stored_cost.groups as usize, r.group_starts.len());
    assert!(m.variants.iter().all(|v| v.predicted_ms.is_finite() && v.predicted_ms > 0.0));
    println!("{}", serde_json::to_string_pretty(&m.closed_loop.fit).expect("json"));
}
