//! A slow disk (reads throttled to 25 MiB/s by a blkio/io cgroup,
//! scripts/slow-disk.sh; root only, skipped otherwise): a streaming run takes
//! seconds per token but neither fails nor times out, and prints the same
//! text as on the full-speed disk.

mod common;

use std::path::Path;

fn report(out: &str) -> serde_json::Value {
    let j = &out[out.rfind("{\"mode\"").expect("no report")..];
    serde_json::from_str(&j[..=j.find('}').unwrap()]).unwrap()
}

#[test]
fn a_throttled_disk_is_slow_not_wrong() {
    let Some(m) = common::model(common::SMOLLM2) else {
        return;
    };
    let blkio = Path::new("/sys/fs/cgroup/blkio").is_dir()
        || Path::new("/sys/fs/cgroup/cgroup.controllers").is_file();
    let root = std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false);
    let probe = if Path::new("/sys/fs/cgroup/cgroup.controllers").is_file() {
        format!("/sys/fs/cgroup/hypura-probe-{}", std::process::id())
    } else {
        format!("/sys/fs/cgroup/blkio/hypura-probe-{}", std::process::id())
    };
    let can = blkio && root && std::fs::create_dir(&probe).is_ok();
    let _ = std::fs::remove_dir(&probe);
    if !can {
        eprintln!("SKIPPED: needs root and a blkio/io cgroup controller");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model.gguf");
    std::fs::copy(&m, &model).unwrap();
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
    let r = report(&(String::from_utf8_lossy(&slow.stdout).into_owned() + &err));
    let gbps = r["disk_gbps"].as_f64().unwrap();
    assert!(gbps < 0.035, "the throttle did not hold: {gbps} GB/s");
    assert!(r["read_bytes_per_token"].as_f64().unwrap() > 1e6, "{r}");
}
