//! Forced streaming (tiny RAM budget, lookahead 0 and 3) gives logits
//! bit-identical to the resident run: same threads, same kernels (--no-repack
//! on both sides, since streamed tensors are never repacked).

mod common;

#[test]
fn smollm2_dense_streaming_is_bit_identical() {
    let Some(m) = common::model(common::SMOLLM2) else {
        return;
    };
    common::check_bit_identical(&m, "60M", "dense");
}

#[test]
fn gemma3_dense_streaming_is_bit_identical() {
    let Some(m) = common::model(common::GEMMA3) else {
        return;
    };
    common::check_bit_identical(&m, "200M", "dense");
}

#[test]
fn budget_too_small_is_a_clear_error() {
    let Some(m) = common::model(common::SMOLLM2) else {
        return;
    };
    let o = common::hypura()
        .args([
            "run",
            m.to_str().unwrap(),
            "--prompt",
            "hi",
            "--ram-budget",
            "1M",
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.starts_with("error: RAM budget") && err.contains("too small"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}
