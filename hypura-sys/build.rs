//! Compiles Hypura's one C file (the buffer-type shim) against the ggml that
//! llama-cpp-sys-2 built, so there is exactly one llama.cpp/ggml in the program.
//!
//! llama-cpp-sys-2 installs only public headers; the buffer-type vtable lives
//! in ggml's private `ggml-backend-impl.h`, found through `ggml_SOURCE_DIR` in
//! the crate's CMake cache (`$DEP_LLAMA_ROOT/build/CMakeCache.txt`).

use std::env;
use std::fs;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=shim/hypura_shim.c");
    println!("cargo:rerun-if-changed=build.rs");

    let root = PathBuf::from(
        env::var("DEP_LLAMA_ROOT")
            .expect("DEP_LLAMA_ROOT is not set: llama-cpp-sys-2 must be a dependency"),
    );
    let cache_path = root.join("build").join("CMakeCache.txt");
    let cache = fs::read_to_string(&cache_path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", cache_path.display()));
    let ggml_src = cache
        .lines()
        .find_map(|l| l.strip_prefix("ggml_SOURCE_DIR:STATIC="))
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("ggml_SOURCE_DIR not found in {}", cache_path.display()));

    let impl_header = ggml_src.join("src").join("ggml-backend-impl.h");
    assert!(
        impl_header.is_file(),
        "{} is missing",
        impl_header.display()
    );
    println!("cargo:rerun-if-changed={}", impl_header.display());

    let mut build = cc::Build::new();
    // GGML_BACKEND_DL: the CPU backend is loaded at run time, so the shim also
    // answers the `ggml_cpu_has_*` queries from its feature list.
    if env::var_os("CARGO_FEATURE_DYNAMIC_BACKENDS").is_some() {
        build.define("HYPURA_CPU_DL", None);
    }
    build
        .file("shim/hypura_shim.c")
        .include(root.join("include"))
        .include(ggml_src.join("include"))
        .include(ggml_src.join("src"))
        .flag_if_supported("-std=gnu11")
        .warnings(true)
        .extra_warnings(true)
        .compile("hypura_shim");

    // Tell dependents where ggml's sources are (the GPU build script uses it).
    println!("cargo:ggml_source_dir={}", ggml_src.display());
}
