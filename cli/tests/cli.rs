//! The command-line tool as a user meets it on a machine without a GPU.

use std::path::PathBuf;
use std::process::Command;

/// The CLI: cargo's build, or on a GPU machine that got the test binaries
/// without the target dir, `$PIPESWITCH_ROOT/.gpu/pipeswitch`.
fn cli() -> Option<PathBuf> {
    let built = PathBuf::from(env!("CARGO_BIN_EXE_pipeswitch"));
    if built.exists() {
        return Some(built);
    }
    let bundled = PathBuf::from(std::env::var_os("PIPESWITCH_ROOT")?).join(".gpu/pipeswitch");
    bundled.exists().then_some(bundled)
}

#[test]
fn demo_without_a_gpu_says_so_in_one_line_and_fails() {
    if pipeswitch::cuda::driver_available() {
        eprintln!("a CUDA driver is present: the demo would run; skipped");
        return;
    }
    let out = Command::new(cli().expect("the pipeswitch binary")).arg("demo").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("no CUDA driver") && err.contains("GPU"), "{err}");
    assert!(out.stdout.is_empty());
}

#[test]
fn demo_rejects_bad_arguments_before_touching_the_gpu() {
    let Some(exe) = cli() else {
        eprintln!("no pipeswitch binary next to this test: skipped");
        return;
    };
    let out = Command::new(exe).args(["demo", "--reps", "many"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "clap usage error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--reps"));
}

#[test]
fn serve_without_a_gpu_says_so_in_one_line_and_fails() {
    if pipeswitch::cuda::driver_available() {
        eprintln!("a CUDA driver is present: the daemon would start; skipped");
        return;
    }
    let out = Command::new(cli().expect("the pipeswitch binary")).args(["serve", "--store", "nope"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("no CUDA driver") && err.contains("GPU"), "{err}");
    let help = Command::new(cli().expect("the pipeswitch binary")).args(["serve", "--help"]).output().unwrap();
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(text.contains("--store") && text.contains("SIGTERM") && text.contains("pipeswitch store create"), "{text}");
}

#[test]
fn the_llm_run_refuses_bad_arguments_before_touching_the_gpu() {
    let Some(exe) = cli() else {
        eprintln!("no pipeswitch binary next to this test: skipped");
        return;
    };
    let run = |args: &[&str]| {
        let out = Command::new(&exe).args(args).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).to_string())
    };
    let (code, err) = run(&["demo", "--models", "llama3-8b,resnet152"]);
    assert_ne!(code, Some(0));
    assert!(err.contains("runs alone"), "{err}");
    let (code, err) = run(&["bench", "llm", "--config", "llama-70b"]);
    assert_ne!(code, Some(0));
    assert!(err.contains("unknown LLM config"), "{err}");
    let (code, err) = run(&["bench", "llm", "--hf-dir", "/nonexistent-hf-dir"]);
    assert_ne!(code, Some(0));
    assert!(err.contains("no config.json"), "{err}");
}

#[test]
fn store_add_llama_writes_random_weights_and_refuses_bad_sources() {
    let Some(exe) = cli() else {
        eprintln!("no pipeswitch binary next to this test: skipped");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(&exe).args(args).env("PIPESWITCH_SHM_DIR", dir.path()).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr))
    };
    let (code, text) = run(&["store", "create", "llm", "--size", "64M"]);
    assert_eq!(code, Some(0), "{text}");
    let (code, text) = run(&["store", "add-llama", "llm", "tiny", "--random", "tiny", "--max-positions", "64"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("Llama, 2 blocks") && text.contains("BF16") && text.contains("6 layers"), "{text}");
    let (code, text) = run(&["store", "show", "llm", "tiny"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("model.layers.1") && text.contains("model.embed_tokens"), "{text}");
    for (args, want) in [
        (vec!["store", "add-llama", "llm", "x", "--random", "gpt-5"], "unknown Llama configuration"),
        (vec!["store", "add-llama", "llm", "x", "--hf-dir", "/nonexistent-hf"], "config.json"),
        (vec!["store", "add-llama", "llm", "tiny", "--random", "tiny"], "already"),
    ] {
        let (code, text) = run(&args);
        assert_ne!(code, Some(0), "{args:?}");
        assert!(text.contains(want), "{args:?}: {text}");
    }
    let (code, _) = run(&["store", "destroy", "llm"]);
    assert_eq!(code, Some(0));
}
