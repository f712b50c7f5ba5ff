//! Exports only the `ps_*` symbols from libpipeswitch.so (as NCCL's
//! libnccl.map does), so the Rust runtime's own symbols never clash with a
//! host program's.

fn main() {
    let map = std::path::Path::new(&std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default()).join("pipeswitch.map");
    println!("cargo:rerun-if-changed=pipeswitch.map");
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-cdylib-link-arg=-Wl,--version-script={}", map.display());
    }
}
