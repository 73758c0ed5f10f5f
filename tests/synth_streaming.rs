//! Streaming on the project's synthetic models: dense llama and qwen3moe
//! with 8 experts top-2 and 64 experts top-8 give logits bit-identical to the
//! resident run, and a model 3× its RAM budget runs within budget + overhead.

mod common;

use common::{check_bit_identical, gen, report, run};

#[test]
fn synthetic_dense_streaming_is_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("dense.gguf");
    gen(
        &m,
        &[
            "--arch", "llama", "--layers", "8", "--embd", "512", "--ff", "1536", "--type", "q8_0",
            "--seed", "11",
        ],
    );
    check_bit_identical(&m, "20M", "dense");
}

#[test]
fn synthetic_moe_8x2_streaming_is_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("moe8.gguf");
    gen(
        &m,
        &[
            "--arch",
            "qwen3moe",
            "--layers",
            "6",
            "--embd",
            "256",
            "--experts",
            "8",
            "--experts-used",
            "2",
            "--ff-exp",
            "512",
            "--type",
            "q8_0",
            "--seed",
            "12",
        ],
    );
    check_bit_identical(&m, "8M", "experts");
}

#[test]
fn synthetic_moe_64x8_streaming_is_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("moe64.gguf");
    gen(
        &m,
        &[
            "--arch",
            "qwen3moe",
            "--layers",
            "4",
            "--embd",
            "256",
            "--experts",
            "64",
            "--experts-used",
            "8",
            "--ff-exp",
            "256",
            "--type",
            "q4_0",
            "--seed",
            "13",
        ],
    );
    check_bit_identical(&m, "6M", "experts");
}

#[test]
fn synthetic_mixtral_streaming_is_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("mixtral.gguf");
    gen(
        &m,
        &[
            "--arch",
            "mixtral",
            "--layers",
            "4",
            "--embd",
            "256",
            "--experts",
            "8",
            "--experts-used",
            "2",
            "--ff-exp",
            "512",
            "--type",
            "q4_0",
            "--seed",
            "14",
        ],
    );
    check_bit_identical(&m, "3M", "experts");
}

/// Fixed overhead beyond the weight budget: KV cache (ctx 256), compute
/// buffers (batch 64), llama.cpp's vocabulary and the binary itself.
const OVERHEAD: u64 = 64 << 20;

#[test]
fn model_three_times_the_budget_runs_within_budget_plus_overhead() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("big.gguf");
    gen(
        &m,
        &[
            "--arch",
            "llama",
            "--target-size",
            "300M",
            "--embd",
            "1024",
            "--ff",
            "4096",
            "--type",
            "q8_0",
            "--seed",
            "15",
        ],
    );
    let size = std::fs::metadata(&m).unwrap().len();
    let budget: u64 = 100 << 20;
    assert!(
        size >= 2_800 * budget / 1000,
        "model {size} should be ~3x the budget"
    );
    let out = dir.path().join("big.logits");
    let err = run(
        &m,
        &out,
        &["--ram-budget", "100M", "--ctx", "256", "--batch", "64"],
    );
    let r = report(&err);
    assert_eq!(r["mode"], "dense", "{r}");
    assert_eq!(r["gen_tokens"].as_u64(), Some(32), "ran to completion: {r}");
    let rss = r["peak_rss_bytes"].as_u64().unwrap();
    assert!(
        rss > 0 && rss <= budget + OVERHEAD,
        "peak RSS {rss} over budget {budget} + overhead {OVERHEAD}"
    );
}

/// Start-up reads only the resident tensors: streamed tensors are hidden from
/// llama.cpp's loader, and nothing populates the whole file.
#[test]
fn load_reads_only_resident_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("load.gguf");
    gen(
        &m,
        &[
            "--arch", "llama", "--layers", "8", "--embd", "1024", "--ff", "4096", "--type", "q8_0",
            "--seed", "16",
        ],
    );
    let size = std::fs::metadata(&m).unwrap().len();
    let out = dir.path().join("load.logits");
    let r = report(&run(
        &m,
        &out,
        &["--ram-budget", "48M", "--mode", "dense", "--ctx", "256"],
    ));
    let resident = r["resident_bytes"].as_u64().unwrap();
    let streamed = r["streamed_bytes"].as_u64().unwrap();
    assert!(streamed > size / 2, "most of the model streams: {r}");
    let Some(read) = r["load_read_bytes"].as_u64() else {
        eprintln!("SKIPPED: /proc/self/io is not readable here");
        return;
    };
    // Aligned O_DIRECT reads and metadata add a little over the resident bytes.
    assert!(
        read <= resident + resident / 4 + (4 << 20),
        "load read {read} bytes, resident part is {resident}: {r}"
    );
    assert!(
        read < size - streamed / 2,
        "load read {read} of a {size}-byte file: {r}"
    );
}

#[test]
fn synthetic_moe_128x8_streaming_is_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("moe128.gguf");
    gen(
        &m,
        &[
            "--arch",
            "qwen3moe",
            "--layers",
            "3",
            "--embd",
            "256",
            "--experts",
            "128",
            "--experts-used",
            "8",
            "--ff-exp",
            "128",
            "--type",
            "q8_0",
            "--seed",
            "17",
        ],
    );
    check_bit_identical(&m, "6M", "experts");
}
