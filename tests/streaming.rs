//! Forced streaming (tiny RAM budget, lookahead 0 and 3) gives logits
//! bit-identical to the resident run: same threads, same kernels (--no-repack
//! on both sides, since streamed tensors are never repacked).

mod common;

use std::path::Path;

fn run(model: &Path, out: &Path, extra: &[&str]) -> String {
    let o = common::hypura()
        .args(["run", model.to_str().unwrap(), "--prompt", "The quick brown fox jumps over", "--temp", "0"])
        .args(["--max-tokens", "32", "--threads", "2", "--no-repack", "--json", "--logits-out"])
        .arg(out)
        .args(extra)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "hypura run {extra:?} failed: {err}");
    err
}

fn report(stderr: &str) -> serde_json::Value {
    let line = stderr.lines().rev().find(|l| l.starts_with('{')).expect("a JSON report line");
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
        let rep = report(&run(model, &out, &["--ram-budget", budget, "--mode", mode, "--lookahead", lookahead]));
        assert_eq!(rep["mode"], mode, "{rep}");
        assert!(rep["streamed_bytes"].as_u64().unwrap() > 0, "nothing streamed: {rep}");
        assert!(rep["read_bytes_per_token"].as_f64().unwrap() > 0.0, "no bytes read while generating: {rep}");
        let got = std::fs::read(&out).unwrap();
        assert!(got.len() > 24 && got == want, "{}: lookahead {lookahead}: logits differ from the resident run", model.display());
    }
}

#[test]
fn smollm2_dense_streaming_is_bit_identical() {
    let Some(m) = common::model(common::SMOLLM2) else { return };
    check_bit_identical(&m, "60M", "dense");
}

#[test]
fn gemma3_dense_streaming_is_bit_identical() {
    let Some(m) = common::model(common::GEMMA3) else { return };
    check_bit_identical(&m, "200M", "dense");
}

#[test]
fn budget_too_small_is_a_clear_error() {
    let Some(m) = common::model(common::SMOLLM2) else { return };
    let o = common::hypura()
        .args(["run", m.to_str().unwrap(), "--prompt", "hi", "--ram-budget", "1M"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.starts_with("error: RAM budget") && err.contains("too small"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}
