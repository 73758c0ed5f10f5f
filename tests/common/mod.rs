//! Shared helpers for the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

pub const SMOLLM2: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const GEMMA3: &str = "gemma-3-270m-q4_k_m.gguf";
pub const QWEN05: &str = "qwen2.5-coder-0.5b-q4_k_m.gguf";
pub const QWEN15: &str = "qwen2.5-coder-1.5b-q4_k_m.gguf";

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
    c.env_remove("RUST_BACKTRACE")
        .env_remove("HYPURA_LOG")
        .env_remove("RUST_LOG");
    c
}

pub fn run(model: &Path, out: &Path, extra: &[&str]) -> String {
    let o = hypura()
        .args([
            "run",
            model.to_str().unwrap(),
            "--prompt",
            "The quick brown fox jumps over",
            "--temp",
            "0",
        ])
        .args([
            "--max-tokens",
            "32",
            "--threads",
            "2",
            "--no-repack",
            "--json",
            "--logits-out",
        ])
        .arg(out)
        .args(extra)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "hypura run {extra:?} failed: {err}");
    err
}

pub fn report(stderr: &str) -> serde_json::Value {
    let line = stderr
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .expect("a JSON report line");
    serde_json::from_str(line).unwrap()
}

/// Streams with `budget` at lookahead 0 and 3 and compares with resident.
pub fn check_bit_identical(model: &Path, budget: &str, mode: &str) {
    let dir = tempfile::tempdir().unwrap();
    let resident = dir.path().join("resident.logits");
    let r = report(&run(model, &resident, &["--mode", "resident"]));
    assert_eq!(r["mode"], "resident");
    let want = std::fs::read(&resident).unwrap();
    for lookahead in ["0", "3"] {
        let out = dir.path().join(format!("stream{lookahead}.logits"));
        let rep = report(&run(
            model,
            &out,
            &[
                "--ram-budget",
                budget,
                "--mode",
                mode,
                "--lookahead",
                lookahead,
            ],
        ));
        assert_eq!(rep["mode"], mode, "{rep}");
        assert!(
            rep["streamed_bytes"].as_u64().unwrap() > 0,
            "nothing streamed: {rep}"
        );
        assert!(
            rep["read_bytes_per_token"].as_f64().unwrap() > 0.0,
            "no bytes read while generating: {rep}"
        );
        let got = std::fs::read(&out).unwrap();
        assert!(
            got.len() > 24 && got == want,
            "{}: lookahead {lookahead}: logits differ from the resident run",
            model.display()
        );
    }
}

/// Writes a synthetic model with `hypura gen` (deterministic per seed).
pub fn gen(out: &Path, args: &[&str]) {
    let o = hypura()
        .args(["gen", "--force", "--out", out.to_str().unwrap()])
        .args(args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "hypura gen failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}
