//! Token embeddings read by rows (CPU streaming plans whose output matrix is
//! a tensor of its own): logits bit-identical to the resident run, the
//! embeddings out of the resident set, and `inspect` says so.

mod common;

use std::path::Path;

use common::{gen, report, run};

/// Resident against streaming at `budget` in `mode`: identical logits, the
/// embeddings read by rows (`embd_rows_bytes`) and bytes read per token.
fn check_rows_identical(model: &Path, budget: &str, mode: &str) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let resident = dir.path().join("resident.logits");
    let r = report(&run(model, &resident, &["--mode", "resident"]));
    assert_eq!(r["mode"], "resident");
    assert!(r["embd_rows_bytes"].is_null(), "{r}");
    let want = std::fs::read(&resident).unwrap();
    let out = dir.path().join("rows.logits");
    let rep = report(&run(model, &out, &["--ram-budget", budget, "--mode", mode]));
    assert_eq!(rep["mode"], mode, "{rep}");
    assert!(
        rep["embd_rows_bytes"].as_u64().unwrap_or(0) > 0,
        "embeddings not read by rows: {rep}"
    );
    assert!(rep["read_bytes_per_token"].as_f64().unwrap() > 0.0, "{rep}");
    let got = std::fs::read(&out).unwrap();
    assert!(
        got.len() > 24 && got == want,
        "{}: logits with embeddings read by rows differ from the resident run",
        model.display()
    );
    rep
}

#[test]
fn synthetic_dense_with_embedding_rows_is_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("dense-vocab.gguf");
    // 65,536 × 512 Q8_0: 35.7 MB of embeddings, an output matrix as large.
    gen(
        &m,
        &[
            "--arch", "llama", "--layers", "6", "--embd", "512", "--ff", "1536", "--vocab",
            "65536", "--type", "q8_0", "--seed", "21",
        ],
    );
    let rep = check_rows_identical(&m, "60M", "dense");
    // Resident, streamed and read by rows: each tensor once, nothing else.
    let parts: u64 = ["resident_bytes", "streamed_bytes", "embd_rows_bytes"]
        .iter()
        .map(|k| rep[*k].as_u64().unwrap())
        .sum();
    let file = std::fs::metadata(&m).unwrap().len();
    assert!(
        parts <= file && parts + (4 << 20) > file,
        "{parts} of {file}: {rep}"
    );
    let o = common::hypura()
        .args(["inspect", m.to_str().unwrap(), "--ram-budget", "60M"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("read by rows from NVMe (row cache"), "{text}");
}

#[test]
fn synthetic_moe_with_embedding_rows_is_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("moe-vocab.gguf");
    gen(
        &m,
        &[
            "--arch",
            "qwen3moe",
            "--layers",
            "4",
            "--embd",
            "512",
            "--experts",
            "16",
            "--experts-used",
            "4",
            "--ff-exp",
            "256",
            "--vocab",
            "65536",
            "--type",
            "q8_0",
            "--seed",
            "22",
            "--routing",
            "zipf:0.5",
        ],
    );
    check_rows_identical(&m, "60M", "experts");
}

#[test]
fn qwen15_with_embedding_rows_is_bit_identical() {
    let Some(m) = common::model(common::QWEN15) else {
        return;
    };
    // Most FFN layers pinned, a few streamed: quick, and the embeddings
    // (125 MiB of Q4_K rows) read by rows.
    check_rows_identical(&m, "900M", "dense");
}
