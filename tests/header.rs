//! The committed header must be exactly what cbindgen generates from the
//! sources (rustls-ffi's rule). Regenerate with
//! `PIPESWITCH_BLESS=1 cargo test --test header`.

use std::path::Path;

#[test]
fn header_is_up_to_date() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(root.join("cbindgen.toml")).expect("cbindgen.toml");
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        // Only the C ABI's sources: the crate's internal constants stay out.
        .with_src(root.join("src/ffi/mod.rs"))
        .with_config(config)
        .generate()
        .expect("cbindgen failed")
        .write(&mut generated);
    let generated = String::from_utf8(generated).expect("utf-8 header");
    for line in generated.lines() {
        if let Some(rest) = line.strip_prefix("#define ") {
            let name = rest.split_whitespace().next().unwrap_or("");
            assert!(
                name.starts_with("PS_") || name == "PIPESWITCH_H",
                "{name} leaked into the header: only PS_* names belong there (exclude it in cbindgen.toml)"
            );
        }
    }
    let path = root.join("include/pipeswitch.h");
    if std::env::var_os("PIPESWITCH_BLESS").is_some() {
        std::fs::write(&path, &generated).expect("writing the header");
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "include/pipeswitch.h is stale: regenerate it with `PIPESWITCH_BLESS=1 cargo test --test header`"
    );
}
