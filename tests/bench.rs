//! `hypura bench`: on SmolLM2 and a small synthetic MoE, two depths plus the
//! llama.cpp baselines give a table row per configuration, a JSON document
//! with every field and a PNG that decodes; `--save` writes the settings file;
//! Ctrl-C keeps the runs done; bad arguments give one-line errors. Speeds are
//! never asserted (the machine is noisy).

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::{gen, hypura};

/// `hypura bench` with the settings, profile cache and output under `home`.
fn bench_cmd(home: &Path) -> Command {
    let mut c = hypura();
    c.arg("bench")
        .env("XDG_CONFIG_HOME", home.join("config"))
        .env("XDG_CACHE_HOME", home.join("cache"))
        .env("HYPURA_PROFILE_QUICK", "1");
    c
}

/// Quick settings: one thread (two would fight the other tests for two cores).
const QUICK: &[&str] = &[
    "--lookahead",
    "0,2",
    "--baseline",
    "--prompt-tokens",
    "16",
    "--gen-tokens",
    "8",
    "--repeat",
    "1",
    "--threads",
    "1",
];

fn files_with_ext(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    v.sort();
    v
}

const RUN_FIELDS: &[&str] = &[
    "mode",
    "threads",
    "load_secs",
    "prompt_tokens",
    "prompt_tps",
    "gen_tokens",
    "gen_tps",
    "ram_budget_bytes",
    "resident_bytes",
    "streamed_bytes",
    "pool_bytes",
    "lookahead",
    "pinned_layers",
    "streamed_layers",
    "read_bytes_per_token",
    "stall_ms_per_token",
    "expert_hit_rate",
    "disk_gbps",
    "io_backend",
    "predicted_tps",
    "ceiling_tps",
    "peak_rss_bytes",
];

const SUMMARY_FIELDS: &[&str] = &[
    "config",
    "label",
    "kind",
    "runs",
    "failed",
    "mode",
    "prompt_tps",
    "gen_tps",
    "read_bytes_per_token",
    "stall_ms_per_token",
    "expert_hit_rate",
    "disk_gbps",
    "disk_ratio",
    "predicted_tps",
    "disk_ceiling_tps",
    "peak_rss_bytes",
];

/// Runs the quick bench on `model` with `budget` and checks table, JSON and PNG.
fn check_bench(model: &Path, budget: &str, moe: bool) {
    let home = tempfile::tempdir().unwrap();
    let out_dir = home.path().join("out");
    let o = bench_cmd(home.path())
        .arg(model)
        .args(QUICK)
        .args(["--ram-budget", budget, "--out"])
        .arg(&out_dir)
        .arg("--save")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "bench failed:\n{stdout}\n{stderr}");

    // The table: a header and one row per configuration.
    assert!(
        stdout.contains("| config | mode | runs | gen tok/s"),
        "{stdout}"
    );
    for row in [
        "| lookahead 0",
        "| lookahead 2",
        "| llama.cpp mmap |",
        "| llama.cpp dio |",
    ] {
        assert_eq!(
            stdout.lines().filter(|l| l.starts_with(row)).count(),
            1,
            "row {row:?} in:\n{stdout}"
        );
    }

    // The JSON: profile, model, configs, every run, summaries with every field.
    let json = files_with_ext(&out_dir, "json");
    assert_eq!(json.len(), 1, "one JSON file in {}", out_dir.display());
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json[0]).unwrap()).unwrap();
    assert!(
        doc["machine"]["storage"]["best_seq_gbps"].as_f64().unwrap() > 0.0,
        "machine profile: {}",
        doc["machine"]
    );
    assert_eq!(
        doc["model"]["size_bytes"].as_u64(),
        Some(std::fs::metadata(model).unwrap().len())
    );
    assert!(doc["model"]["arch"].is_string());
    assert_eq!(doc["interrupted"], false);
    let configs = doc["configs"].as_array().unwrap();
    let ids: Vec<&str> = configs.iter().map(|c| c["id"].as_str().unwrap()).collect();
    assert_eq!(
        ids,
        [
            "lookahead-0",
            "lookahead-2",
            "llama.cpp-mmap",
            "llama.cpp-dio"
        ]
    );
    let runs = doc["runs"].as_array().unwrap();
    assert_eq!(
        runs.len(),
        8,
        "one warm-up and one recorded run per configuration"
    );
    assert_eq!(runs.iter().filter(|r| r["warmup"] == true).count(), 4);
    for r in runs {
        assert_eq!(r["ok"], true, "{r}");
        for f in RUN_FIELDS {
            assert!(r["report"].get(*f).is_some(), "run report lacks {f}: {r}");
        }
    }
    // Rounds rotate: the recorded round starts at the second configuration.
    let recorded: Vec<u64> = runs
        .iter()
        .filter(|r| r["warmup"] == false)
        .map(|r| r["config"].as_u64().unwrap())
        .collect();
    assert_eq!(recorded, [1, 2, 3, 0]);
    let summary = doc["summary"].as_array().unwrap();
    assert_eq!(summary.len(), 4);
    for s in summary {
        for f in SUMMARY_FIELDS {
            assert!(s.get(*f).is_some(), "summary lacks {f}: {s}");
        }
        for f in ["gen_tps", "prompt_tps"] {
            for k in ["median", "min", "max"] {
                assert!(s[f][k].as_f64().unwrap() > 0.0, "{f}.{k}: {s}");
            }
        }
        assert!(
            s["predicted_tps"].as_f64().unwrap() > 0.0,
            "a profile gives predictions: {s}"
        );
        if s["kind"] == "streaming" {
            assert_ne!(s["mode"], "resident", "the budget streams: {s}");
            assert!(s["read_bytes_per_token"].as_f64().unwrap() > 0.0, "{s}");
            assert!(s["stall_ms_per_token"].as_f64().unwrap() >= 0.0, "{s}");
            assert!(s["disk_gbps"].as_f64().unwrap() > 0.0, "{s}");
            assert!(s["disk_ratio"].as_f64().unwrap() > 0.0, "{s}");
            assert_eq!(s["expert_hit_rate"].is_number(), moe, "{s}");
            // MoE runs trace their routing: an LRU cache simulated on it.
            assert_eq!(s["lru_sim_hit_rate"].is_number(), moe, "{s}");
        } else {
            assert_eq!(s["mode"], "resident", "{s}");
            assert!(s["read_bytes_per_token"].is_null(), "{s}");
        }
    }
    let best = doc["best_lookahead"].as_u64().expect("a best lookahead");
    assert!(best == 0 || best == 2);

    // The PNG decodes, at the size drawn.
    let png_files = files_with_ext(&out_dir, "png");
    assert_eq!(png_files.len(), 1);
    assert_eq!(
        doc["chart"].as_str(),
        png_files[0].file_name().unwrap().to_str()
    );
    let decoder = png::Decoder::new(std::fs::File::open(&png_files[0]).unwrap());
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let frame = reader.next_frame(&mut buf).unwrap();
    assert_eq!((frame.width, frame.height), (1000, 620));
    assert!(buf.iter().any(|&b| b != 255), "the chart is not blank");

    // --save: the best depth, keyed by machine and model, where `run` reads it.
    let cfg = std::fs::read_to_string(home.path().join("config/hypura/config.toml")).unwrap();
    let canon = std::fs::canonicalize(model).unwrap();
    assert!(cfg.contains(canon.to_str().unwrap()), "{cfg}");
    assert!(cfg.contains(&format!("lookahead = {best}")), "{cfg}");
    assert!(stderr.contains("saved lookahead"), "{stderr}");
}

#[test]
fn bench_smollm2_two_depths_with_baseline() {
    let Some(model) = common::model(common::SMOLLM2) else {
        return;
    };
    check_bench(&model, "60M", false);
}

#[test]
fn bench_synthetic_moe_two_depths_with_baseline() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("moe.gguf");
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
            "8",
            "--experts-used",
            "2",
            "--ff-exp",
            "512",
            "--type",
            "q8_0",
            "--seed",
            "21",
        ],
    );
    check_bench(&m, "8M", true);
}

#[test]
fn json_flag_prints_the_document() {
    let home = tempfile::tempdir().unwrap();
    let m = home.path().join("tiny.gguf");
    gen(
        &m,
        &[
            "--arch", "llama", "--layers", "2", "--embd", "128", "--type", "q8_0", "--seed", "22",
        ],
    );
    let o = bench_cmd(home.path())
        .arg(&m)
        .args([
            "--lookahead",
            "1",
            "--prompt-tokens",
            "8",
            "--gen-tokens",
            "4",
            "--repeat",
            "2",
            "--warmup",
            "0",
            "--threads",
            "1",
            "--json",
            "--out",
        ])
        .arg(home.path().join("out"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let doc: serde_json::Value =
        serde_json::from_slice(&o.stdout).expect("stdout is the JSON document");
    assert_eq!(doc["runs"].as_array().unwrap().len(), 2);
    assert_eq!(doc["summary"][0]["gen_tps"]["n"], 2);
    // No --save: no settings file.
    assert!(!home.path().join("config/hypura/config.toml").exists());
}

#[test]
fn ctrl_c_keeps_the_runs_done() {
    let home = tempfile::tempdir().unwrap();
    let m = home.path().join("tiny.gguf");
    gen(
        &m,
        &[
            "--arch", "llama", "--layers", "2", "--embd", "128", "--type", "q8_0", "--seed", "23",
        ],
    );
    let out_dir = home.path().join("out");
    let mut child = bench_cmd(home.path())
        .arg(&m)
        .args([
            "--lookahead",
            "0,1",
            "--prompt-tokens",
            "8",
            "--gen-tokens",
            "4",
            "--repeat",
            "50",
            "--threads",
            "1",
            "--out",
        ])
        .arg(&out_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    let mut runs_seen = 0;
    let mut line = String::new();
    while runs_seen < 3 {
        line.clear();
        assert!(
            err.read_line(&mut line).unwrap() > 0,
            "bench ended early: {seen}"
        );
        if line.starts_with("bench: ") && line.contains("tok/s") {
            runs_seen += 1;
        }
        seen += &line;
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err, &mut rest).unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success(), "an interrupted bench fails");
    let last = rest.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: interrupted: ") && last.contains("runs kept"),
        "{rest}"
    );
    let json = files_with_ext(&out_dir, "json");
    assert_eq!(json.len(), 1);
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json[0]).unwrap()).unwrap();
    assert_eq!(doc["interrupted"], true);
    let kept = doc["runs"].as_array().unwrap().len();
    assert!((3..20).contains(&kept), "{kept} runs kept");
    assert!(
        last.contains(&format!("interrupted: {kept} runs kept")),
        "{last}"
    );
}

/// Runs `hypura bench ARGS` and expects a one-line error containing `want`.
fn bad(home: &Path, args: &[&str], want: &str) -> Output {
    let o = bench_cmd(home).args(args).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{args:?} should fail");
    assert_eq!(err.lines().count(), 1, "{args:?}: one line, got:\n{err}");
    assert!(err.starts_with("error: "), "{args:?}: {err}");
    assert!(
        err.contains(want),
        "{args:?}: {err:?} should mention {want:?}"
    );
    o
}

#[test]
fn bad_arguments_give_one_line_errors() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let m = h.join("tiny.gguf");
    gen(
        &m,
        &[
            "--arch", "llama", "--layers", "2", "--embd", "128", "--type", "q8_0", "--seed", "24",
        ],
    );
    let ms = m.to_str().unwrap();
    bad(h, &[ms, "--lookahead", ""], "at least one depth");
    bad(h, &[ms, "--lookahead", "-1"], "negative");
    bad(h, &[ms, "--lookahead=0,-2"], "negative");
    bad(h, &[ms, "--lookahead", "1,x"], "not a whole number");
    bad(h, &[ms, "--lookahead", "1,,2"], "empty entry");
    bad(h, &[ms, "--repeat", "0"], "--repeat");
    bad(h, &[ms, "--gen-tokens", "0"], "--gen-tokens");
    bad(
        h,
        &[h.join("missing.gguf").to_str().unwrap()],
        "missing.gguf",
    );
    bad(
        h,
        &[ms, "--baseline", "--ram-budget", "64T"],
        "more than the memory available",
    );
    assert!(
        !h.join("cache").exists(),
        "errors come before any profiling"
    );
}
