//! A slow disk (reads throttled to 25 MiB/s by a blkio/io cgroup,
//! scripts/slow-disk.sh; root only, skipped otherwise): a streaming run takes
//! seconds per token but neither fails nor times out, and prints the same
//! text as on the full-speed disk.

mod common;

use std::path::Path;

#[test]
fn a_throttled_disk_is_slow_not_wrong() {
    let Some(m) = common::model(common::SMOLLM2) else {
        return;
    };
    if !common::cgroups_usable("blkio") {
        return;
    }
    let (_dir, model) = common::copy_model(&m);
    let ms = model.to_str().unwrap();
    let args = [
        "run",
        ms,
        "--prompt",
        "Hello there",
        "--max-tokens",
        "3",
        "--temp",
        "0",
        "--ram-budget",
        "60M",
        "--mode",
        "dense",
        "--threads",
        "1",
        "--json",
    ];
    let fast = common::hypura().args(args).output().unwrap();
    assert!(
        fast.status.success(),
        "{}",
        String::from_utf8_lossy(&fast.stderr)
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/slow-disk.sh");
    let slow = std::process::Command::new("bash")
        .arg(script)
        .args(["25M", ms, "--", env!("CARGO_BIN_EXE_hypura")])
        .args(args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&slow.stderr);
    assert!(slow.status.success(), "{err}");
    // The generated text (the --json report goes to stderr).
    let text = |o: &std::process::Output| {
        let s = String::from_utf8_lossy(&o.stdout).into_owned();
        match s.rfind("{\"mode\"") {
            Some(i) => s[..i].to_string(),
            None => s,
        }
    };
    assert_eq!(text(&slow), text(&fast));
    let r = common::json_report(&(String::from_utf8_lossy(&slow.stdout).into_owned() + &err));
    let gbps = r["disk_gbps"].as_f64().unwrap();
    assert!(gbps < 0.035, "the throttle did not hold: {gbps} GB/s");
    assert!(r["read_bytes_per_token"].as_f64().unwrap() > 1e6, "{r}");
}
