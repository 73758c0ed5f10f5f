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

/// Streams with `budget` at lookahead 0 and 3 and compares with resident;
/// returns the last streaming run's report.
pub fn check_bit_identical(model: &Path, budget: &str, mode: &str) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let resident = dir.path().join("resident.logits");
    let r = report(&run(model, &resident, &["--mode", "resident"]));
    assert_eq!(r["mode"], "resident");
    let want = std::fs::read(&resident).unwrap();
    let mut last = serde_json::Value::Null;
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
        last = rep;
    }
    last
}

/// Writes a synthetic model with `hypura gen` (deterministic per seed).
pub fn gen(out: &Path, args: &[&str]) {
    let o = gen_output(out, args);
    assert!(
        o.status.success(),
        "hypura gen failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `hypura gen --force --out OUT ARGS...`, whatever its outcome.
pub fn gen_output(out: &Path, args: &[&str]) -> std::process::Output {
    hypura()
        .args(["gen", "--force", "--out", out.to_str().unwrap()])
        .args(args)
        .output()
        .unwrap()
}

/// A copy of `src` as `model.gguf` in a new temp dir (tests that truncate,
/// replace or watch the file work on it, never on `models/`).
pub fn copy_model(src: &Path) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model.gguf");
    std::fs::copy(src, &model).unwrap();
    (dir, model)
}

/// The report line `run --json` prints (the last `{"mode"...}` object),
/// wherever it is in `out` (stdout and stderr together).
pub fn json_report(out: &str) -> serde_json::Value {
    let j = &out[out.rfind("{\"mode\"").expect("no report")..];
    serde_json::from_str(&j[..=j.find('}').unwrap()]).unwrap()
}

/// Whether this process runs as root (effective uid 0).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|u| u.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// Whether this process can make cgroups of the cgroup v1 `controller`
/// (`memory`, `blkio`) or, on cgroup v2, of the unified hierarchy: root,
/// the controller present, and a probe cgroup that can be made (a
/// read-only /sys/fs/cgroup in a container answers EROFS or EPERM).
/// Prints the SKIPPED notice when not.
pub fn cgroups_usable(controller: &str) -> bool {
    let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").is_file();
    let v1 = Path::new("/sys/fs/cgroup").join(controller);
    let probe = if v2 {
        PathBuf::from(format!(
            "/sys/fs/cgroup/hypura-probe-{}",
            std::process::id()
        ))
    } else {
        v1.join(format!("hypura-probe-{}", std::process::id()))
    };
    let can = is_root() && (v2 || v1.is_dir()) && std::fs::create_dir(&probe).is_ok();
    let _ = std::fs::remove_dir(&probe);
    if !can {
        eprintln!("SKIPPED: needs root and a {controller} cgroup controller it may use");
    }
    can
}
