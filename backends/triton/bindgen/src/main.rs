//! Writes the Rust bindings of Triton's backend API.
//! Usage: triton-bindgen <core checkout's include dir> <output file> [clang args...]

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(include), Some(out)) = (args.next(), args.next()) else {
        eprintln!("usage: triton-bindgen <include dir> <output file> [clang args...]");
        std::process::exit(2);
    };
    let extra: Vec<String> = args.collect();
    let header = format!("{include}/triton/core/tritonbackend.h");
    let bindings = bindgen::Builder::default()
        .header(header)
        // The headers are C++ only (they use `extern "C"` blocks and C++ enums).
        .clang_args(["-x", "c++", "-std=c++11"])
        .clang_arg(format!("-I{include}"))
        .clang_args(extra)
        .allowlist_function("TRITON(SERVER|BACKEND)_.*")
        .allowlist_type("TRITON(SERVER|BACKEND)_.*")
        .allowlist_var("TRITON(SERVER|BACKEND)_.*")
        .default_enum_style(bindgen::EnumVariation::Consts)
        .prepend_enum_name(false)
        .layout_tests(false)
        .generate_comments(false)
        .derive_debug(true)
        .generate()
        .unwrap_or_else(|e| {
            eprintln!("triton-bindgen: {e}");
            std::process::exit(1);
        });
    bindings.write_to_file(&out).unwrap_or_else(|e| {
        eprintln!("triton-bindgen: writing {out}: {e}");
        std::process::exit(1);
    });
}
