//! Runs with no flags inside a memory cgroup smaller than the model
//! (scripts/in-cgroup.sh; cgroup v1 or v2, needs root — skipped otherwise):
//! the default budget is derived from the limit and the context, the default
//! context is lowered when the model does not fit at it, and the output is
//! the resident run's. A limit too small for any plan is refused with the
//! numbers, not killed.

mod common;

use std::path::Path;
use std::process::{Command, Output};

/// Whether this process can make memory cgroups.
fn cgroups_usable() -> bool {
    // Root: /proc/self/status's effective uid is 0.
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|u| u.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false);
    let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").is_file();
    let v1 = Path::new("/sys/fs/cgroup/memory").is_dir();
    if !(root && (v2 || v1)) {
        eprintln!("SKIPPED: needs root and a memory cgroup controller");
        return false;
    }
    true
}

fn in_cgroup(limit: &str, args: &[&str]) -> Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/in-cgroup.sh");
    Command::new("bash")
        .arg(script)
        .arg(limit)
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_hypura"))
        .args(args)
        .env("PEAK", "1")
        .output()
        .unwrap()
}

fn text_of(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn a_model_bigger_than_the_cgroup_runs_with_no_flags() {
    let Some(m) = common::model(common::QWEN15) else {
        return;
    };
    if !cgroups_usable() {
        return;
    }
    let m = m.to_str().unwrap();
    let gen = [
        "--prompt",
        "def fib(n):",
        "--max-tokens",
        "12",
        "--temp",
        "0",
    ];
    // 1.0 GiB of weights in 700 MiB: streams, at a lowered context.
    let mut args = vec!["run", m];
    args.extend(gen);
    let o = in_cgroup("700M", &args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("note: context lowered from 4096 to"),
        "expected a lowered context: {err}"
    );
    let peak: u64 = err
        .lines()
        .find_map(|l| l.strip_prefix("cgroup peak: "))
        .and_then(|l| l.strip_suffix(" MiB"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no peak in {err}"));
    assert!(peak <= 700, "{peak}");
    // The same tokens as resident, outside the cgroup.
    let resident = common::hypura()
        .args(["run", m, "--mode", "resident", "--ctx", "2048"])
        .args(gen)
        .output()
        .unwrap();
    assert!(resident.status.success());
    assert_eq!(text_of(&o), text_of(&resident));

    // A budget larger than the limit itself is lowered, not obeyed.
    let mut args = vec!["run", m, "--ram-budget", "64G", "--ctx", "1024"];
    args.extend(gen);
    let o = in_cgroup("700M", &args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("note: --ram-budget 64.0 GiB lowered to"),
        "{err}"
    );
    assert_eq!(text_of(&o), text_of(&resident));
}

#[test]
fn a_limit_too_small_for_any_plan_is_refused_with_the_numbers() {
    let Some(m) = common::model(common::QWEN15) else {
        return;
    };
    if !cgroups_usable() {
        return;
    }
    let o = in_cgroup(
        "400M",
        &[
            "run",
            m.to_str().unwrap(),
            "--prompt",
            "hi",
            "--max-tokens",
            "2",
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("too small for this model")
            && err.contains("this process may use")
            && err.contains("512-token context"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}
