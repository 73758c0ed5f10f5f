//! Shared helpers for the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

pub const SMOLLM2: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const GEMMA3: &str = "gemma-3-270m-q4_k_m.gguf";

/// A real test model from `models/` (fetched by `models/fetch.sh`). Missing
/// models fail the test when `HYPURA_REQUIRE_MODELS=1` (as in CI and the
/// README's test command); otherwise the test is skipped with a notice.
pub fn model(file: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("HYPURA_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models"));
    let p = dir.join(file);
    if p.is_file() {
        return Some(p);
    }
    if std::env::var("HYPURA_REQUIRE_MODELS").as_deref() == Ok("1") {
        panic!("{} is missing: run models/fetch.sh", p.display());
    }
    eprintln!("SKIPPED: {} is missing (run models/fetch.sh)", p.display());
    None
}

pub fn hypura() -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_hypura"));
    c.env_remove("RUST_BACKTRACE").env_remove("HYPURA_LOG").env_remove("RUST_LOG");
    c
}
