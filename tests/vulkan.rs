//! The unified-memory tier on a real Vulkan device: Mesa's lavapipe (a CPU
//! Vulkan driver; ggml-vulkan uses it only when `GGML_VK_VISIBLE_DEVICES`
//! names it). The direct path imports the streaming pool (dense) and the
//! expert slots (experts) as Vulkan buffers; reads land in them by O_DIRECT
//! and the device computes on them with no copy. Its logits must be
//! byte-identical to a resident run on the same device cut into the same
//! compute ranges (`--reference-cuts`), with 0 bytes uploaded; an import the
//! device refuses falls back to staged copies with a one-line note.
//!
//! Built only with `--features vulkan` (scripts/test.sh runs it after
//! `scripts/setup.sh --vulkan`). lavapipe computes slowly (about a token a
//! second for SmolLM2 on 2 cores): few tokens per run.
#![cfg(feature = "vulkan")]

mod common;

use std::path::Path;

use common::{gen, hypura, model, report, SMOLLM2};

const DEVICE: &str = "Vulkan0";

/// `hypura run` on lavapipe; returns the report and the logits.
fn run_vk(m: &Path, out: &Path, tokens: &str, extra: &[&str]) -> (serde_json::Value, String) {
    let o = hypura()
        .env("GGML_VK_VISIBLE_DEVICES", "0")
        .args([
            "run",
            m.to_str().unwrap(),
            "--prompt",
            "The quick brown fox",
        ])
        .args(["--temp", "0", "--threads", "2", "--no-repack", "--json"])
        .args(["--max-tokens", tokens, "--gpu-device", DEVICE])
        .arg("--logits-out")
        .arg(out)
        .args(extra)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "hypura run {extra:?} failed: {err}");
    (report(&err), err)
}

/// A lavapipe device must be there: a build with the feature and no device
/// tests nothing, so it fails (scripts/setup.sh --vulkan installs Mesa).
fn check_device() {
    let o = hypura()
        .env("GGML_VK_VISIBLE_DEVICES", "0")
        .args(["profile", "--devices"])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "profile --devices failed: {out}");
    assert!(
        out.contains(DEVICE),
        "no {DEVICE} device (is mesa-vulkan-drivers installed?): {out}"
    );
}

/// Compares a direct run with the resident reference of the same cuts.
fn direct_matches(
    m: &Path,
    dir: &Path,
    cuts: &str,
    tokens: &str,
    direct: &[&str],
) -> serde_json::Value {
    let want = dir.join(format!("ref-{cuts}.logits"));
    if !want.exists() {
        let (r, _) = run_vk(
            m,
            &want,
            tokens,
            &["--mode", "resident", "--reference-cuts", cuts],
        );
        assert_eq!(r["gpu_device"], DEVICE, "{r}");
    }
    let got = dir.join("direct.logits");
    let (r, err) = run_vk(m, &got, tokens, direct);
    assert_eq!(r["gpu_device"], DEVICE, "{r}");
    let (a, b) = (std::fs::read(&want).unwrap(), std::fs::read(&got).unwrap());
    assert!(
        a.len() > 24 && a == b,
        "{direct:?}: logits differ from the resident run with {cuts} cuts ({r}; {err})"
    );
    assert!(
        r["streamed_bytes"].as_u64().unwrap() > 0,
        "nothing streamed: {r}"
    );
    r
}

fn upload(r: &serde_json::Value) -> f64 {
    r["upload_bytes_per_token"].as_f64().unwrap_or(0.0)
}

#[test]
fn dense_streaming_on_lavapipe_is_zero_copy_and_byte_identical() {
    let Some(m) = model(SMOLLM2) else { return };
    check_device();
    let dir = tempfile::tempdir().unwrap();
    let direct = [
        "--mode",
        "gpu-dense",
        "--gpu-upload",
        "direct",
        "--gpu-budget",
        "60M",
    ];
    let r = direct_matches(&m, dir.path(), "dense", "4", &direct);
    assert_eq!(r["mode"], "gpu-dense", "{r}");
    assert_eq!(upload(&r), 0.0, "the direct path copied: {r}");
    assert!(r["read_bytes_per_token"].as_f64().unwrap() > 0.0, "{r}");

    // The device refuses the pool import: staged copies, a note, same logits.
    let got = dir.path().join("refused.logits");
    let o = hypura()
        .env("GGML_VK_VISIBLE_DEVICES", "0")
        .env("HYPURA_REFUSE_IMPORT", "1")
        .args([
            "run",
            m.to_str().unwrap(),
            "--prompt",
            "The quick brown fox",
        ])
        .args(["--temp", "0", "--threads", "2", "--no-repack", "--json"])
        .args(["--max-tokens", "4", "--gpu-device", DEVICE])
        .arg("--logits-out")
        .arg(&got)
        .args(direct)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{err}");
    let notes: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("did not import"))
        .collect();
    assert_eq!(notes.len(), 1, "one note about the refused import: {err}");
    let r = report(&err);
    assert!(upload(&r) > 0.0, "the fallback must copy: {r}");
    assert_eq!(
        std::fs::read(&got).unwrap(),
        std::fs::read(dir.path().join("ref-dense.logits")).unwrap(),
        "the staged fallback's logits differ"
    );
}

#[test]
fn expert_streaming_on_lavapipe_is_zero_copy_and_byte_identical() {
    check_device();
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("moe.gguf");
    gen(
        &m,
        &[
            "--arch",
            "qwen3moe",
            "--layers",
            "6",
            "--embd",
            "320",
            "--experts",
            "16",
            "--experts-used",
            "4",
            "--ff-exp",
            "256",
            "--type",
            "q4_0",
            "--seed",
            "5",
            "--routing",
            "zipf:0.5",
        ],
    );
    // 5M: slots for few experts (misses every token); 64M: most stay.
    for budget in ["5M", "64M"] {
        let direct = [
            "--mode",
            "gpu-experts",
            "--gpu-upload",
            "direct",
            "--gpu-budget",
            budget,
        ];
        let r = direct_matches(&m, dir.path(), "experts", "8", &direct);
        assert_eq!(r["mode"], "gpu-experts", "{budget}: {r}");
        assert_eq!(upload(&r), 0.0, "{budget}: the direct path copied: {r}");
    }
}
