//! Runs with no flags inside a memory cgroup smaller than the model
//! (scripts/in-cgroup.sh; cgroup v1 or v2, needs root — skipped otherwise):
//! the default budget is derived from the limit and the context, the default
//! context is lowered when the model does not fit at it, and the output is
//! the resident run's. When no streaming plan fits, the model runs on
//! llama.cpp's mmap path; a limit too small even for that is refused with the
//! numbers, not killed.

mod common;

use std::path::Path;
use std::process::{Command, Output};

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

/// The cgroup's peak use that in-cgroup.sh (PEAK=1) printed, in MiB.
fn peak_mib(stderr: &str) -> u64 {
    stderr
        .lines()
        .find_map(|l| l.strip_prefix("cgroup peak: "))
        .and_then(|l| l.strip_suffix(" MiB"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no peak in {stderr}"))
}

/// `hypura run MODEL` with no placement flags in a `limit` cgroup: it must
/// succeed, stream (`mode` in `modes`) and stay under the limit.
fn runs_with_no_flags(model: &Path, limit: &str, limit_mib: u64, modes: &[&str]) {
    let o = in_cgroup(
        limit,
        &[
            "run",
            model.to_str().unwrap(),
            "--prompt",
            "Once upon a time",
            "--max-tokens",
            "4",
            "--temp",
            "1",
            "--seed",
            "3",
            "--json",
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{} in {limit}: {err}", model.display());
    let peak = peak_mib(&err);
    assert!(peak <= limit_mib, "peak {peak} MiB over {limit}");
    let v = common::json_report(&(text_of(&o) + &err));
    let mode = v["mode"].as_str().unwrap();
    assert!(modes.contains(&mode), "{}: mode {mode}", model.display());
    eprintln!(
        "{} in {limit}: mode {mode}, peak {peak} MiB, {:.2} tok/s",
        model.display(),
        v["gen_tps"].as_f64().unwrap()
    );
}

#[test]
fn small_models_in_small_cgroups() {
    let Some(m) = common::model(common::SMOLLM2) else {
        return;
    };
    if !common::cgroups_usable("memory") {
        return;
    }
    runs_with_no_flags(&m, "160M", 160, &["resident", "dense"]);
}

#[test]
fn synthetic_models_twice_and_three_times_the_cgroup() {
    if !common::cgroups_usable("memory") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let dense = dir.path().join("dense2g.gguf");
    let moe = dir.path().join("moe3g.gguf");
    for (path, args) in [
        (
            &dense,
            &[
                "--arch",
                "llama",
                "--embd",
                "2048",
                "--ff",
                "5632",
                "--target-size",
                "2G",
            ][..],
        ),
        (
            &moe,
            &[
                "--arch",
                "qwen3moe",
                "--embd",
                "1024",
                "--experts",
                "64",
                "--experts-used",
                "8",
                "--ff-exp",
                "768",
                "--target-size",
                "3G",
                "--routing",
                "zipf:0.8,corr:0.5",
            ][..],
        ),
    ] {
        let mut args = args.to_vec();
        args.extend(["--type", "q8_0"]);
        common::gen(path, &args);
    }
    runs_with_no_flags(&dense, "1G", 1024, &["dense"]);
    runs_with_no_flags(&moe, "1G", 1024, &["experts"]);
}

/// Gemma 3 270M ties its output matrix to the 262k-token embedding (189 MiB
/// of its 235 MiB): every token reads all of it, and a streaming plan keeps
/// it resident, so 220 MiB cannot hold it with a context. The default falls
/// back to llama.cpp's mmap path (with a note): slow, but it runs, under the
/// limit, and prints the resident run's text.
#[test]
fn gemma_in_220m_runs_on_the_mmap_fallback() {
    let Some(m) = common::model(common::GEMMA3) else {
        return;
    };
    if !common::cgroups_usable("memory") {
        return;
    }
    let m = m.to_str().unwrap();
    let gen = [
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "6",
        "--temp",
        "0",
    ];
    let mut args = vec!["run", m];
    args.extend(gen);
    let o = in_cgroup("220M", &args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("running on llama.cpp's mmap path"), "{err}");
    assert!(peak_mib(&err) <= 220, "{err}");
    // The fallback does not repack (repacked copies would be anonymous
    // memory), so the reference does not either: same kernels, same text.
    let resident = common::hypura()
        .args([
            "run",
            m,
            "--mode",
            "resident",
            "--ctx",
            "512",
            "--no-repack",
        ])
        .args(gen)
        .output()
        .unwrap();
    assert!(resident.status.success());
    assert_eq!(text_of(&o), text_of(&resident));
}

fn text_of(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn a_model_bigger_than_the_cgroup_runs_with_no_flags() {
    let Some(m) = common::model(common::QWEN15) else {
        return;
    };
    if !common::cgroups_usable("memory") {
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
    // 1.0 GiB of weights in 700 MiB: streams (its embeddings read by rows,
    // at the default context or a lowered one, with a note).
    let mut args = vec!["run", m];
    args.extend(gen);
    let o = in_cgroup("700M", &args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("mode: Dense"), "expected streaming: {err}");
    let ctx = err
        .split("note: context lowered from 4096 to ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or("4096")
        .to_string();
    assert!(peak_mib(&err) <= 700, "{err}");
    // The same tokens as resident, outside the cgroup.
    let resident = common::hypura()
        .args(["run", m, "--mode", "resident", "--ctx", &ctx])
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
    if !common::cgroups_usable("memory") {
        return;
    }
    // 180 MiB: the context and the process alone leave nothing for weights.
    let o = in_cgroup(
        "180M",
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
