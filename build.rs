//! Exports only the `ps_*` symbols from libpipeswitch.so (as NCCL's
//! libnccl.map does), so the Rust runtime's own symbols never clash with a
//! host program's, and gives it the SONAME `libpipeswitch.so.<major>`, so a
//! program linked with `-lpipeswitch` records that name and keeps working
//! when a compatible `libpipeswitch.so.<major>.<minor>.<patch>` replaces the
//! library (`scripts/install.sh` makes the symlinks).

fn main() {
    let map = std::path::Path::new(&std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default()).join("pipeswitch.map");
    println!("cargo:rerun-if-changed=pipeswitch.map");
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-cdylib-link-arg=-Wl,--version-script={}", map.display());
        let major = std::env::var("CARGO_PKG_VERSION_MAJOR").unwrap_or_else(|_| "0".into());
        println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libpipeswitch.so.{major}");
    }
}
