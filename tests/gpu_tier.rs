//! The GPU tier's code paths, run on the CPU device (`--gpu-device CPU`):
//! device slots filled by copies from host staging (`--gpu-upload staged`,
//! the path a discrete GPU takes: uploader thread, device layout with
//! padding, 0xFF guard, per-layer expert slots shared round-robin) and a
//! host pool wrapped as a device buffer (`direct`, Metal's path). The CPU
//! device computes with the same kernels as the resident run, so logits
//! must be byte-identical. The CUDA runs are in scripts/gpu/.

mod common;

use std::path::Path;

use common::{gen, hypura, model, report, run};

const CPU: [&str; 2] = ["--gpu-device", "CPU"];

fn resident(m: &Path, dir: &Path) -> Vec<u8> {
    let out = dir.join("resident.logits");
    let r = report(&run(m, &out, &["--mode", "resident", "--gpu-budget", "0"]));
    assert_eq!(r["mode"], "resident");
    assert!(r["gpu_device"].is_null(), "{r}");
    std::fs::read(out).unwrap()
}

/// Runs with `extra` on the CPU device and checks the logits and the report.
fn same_as(want: &[u8], m: &Path, dir: &Path, tag: &str, extra: &[&str]) -> serde_json::Value {
    let out = dir.join(format!("{tag}.logits"));
    let args: Vec<&str> = CPU.iter().copied().chain(extra.iter().copied()).collect();
    let r = report(&run(m, &out, &args));
    assert_eq!(r["gpu_device"], "CPU", "{tag}: {r}");
    let got = std::fs::read(&out).unwrap();
    assert!(
        got.len() > 24 && got == want,
        "{tag}: logits differ from the resident run ({r})"
    );
    r
}

#[test]
fn gpu_dense_staged_and_direct_match_resident() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("dense.gguf");
    // embd 576: rows not a multiple of 512 (the padding CUDA reserves).
    gen(
        &m,
        &[
            "--arch",
            "llama",
            "--layers",
            "6",
            "--embd",
            "576",
            "--ff",
            "1536",
            "--heads",
            "9",
            "--heads-kv",
            "3",
            "--type",
            "q4_0",
            "--seed",
            "31",
        ],
    );
    let want = resident(&m, dir.path());
    for (up, la) in [("staged", "0"), ("staged", "2"), ("direct", "1")] {
        let r = same_as(
            &want,
            &m,
            dir.path(),
            &format!("{up}{la}"),
            &[
                "--mode",
                "gpu-dense",
                "--gpu-upload",
                up,
                "--gpu-budget",
                "9M",
                "--ram-budget",
                "6M",
                "--lookahead",
                la,
            ],
        );
        assert_eq!(r["mode"], "gpu-dense", "{r}");
        assert!(
            r["streamed_layers"].as_u64().unwrap() > 0,
            "nothing streamed: {r}"
        );
        let read = r["read_bytes_per_token"].as_f64().unwrap();
        assert!(read > 0.0, "{r}");
        let copied = r["upload_bytes_per_token"].as_f64().unwrap();
        if up == "staged" {
            assert!(copied > 0.0, "staged copies to the device: {r}");
        } else {
            assert_eq!(copied, 0.0, "direct copies nothing: {r}");
        }
        let pool = r["gpu_pool_bytes"].as_u64().unwrap();
        assert!(
            r["gpu_resident_bytes"].as_u64().unwrap() + pool <= 9 << 20,
            "over the GPU budget: {r}"
        );
    }
}

#[test]
fn gpu_dense_ram_tier_matches_resident() {
    // Streamed layers kept in RAM after their first read: copied to the
    // device every token, read from disk no more.
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("dense.gguf");
    gen(
        &m,
        &[
            "--arch",
            "llama",
            "--layers",
            "6",
            "--embd",
            "576",
            "--ff",
            "1536",
            "--heads",
            "9",
            "--heads-kv",
            "3",
            "--type",
            "q4_0",
            "--seed",
            "37",
        ],
    );
    let want = resident(&m, dir.path());
    let mut read = Vec::new();
    for rb in ["6M", "9M", "200M"] {
        let r = same_as(
            &want,
            &m,
            dir.path(),
            rb,
            &[
                "--mode",
                "gpu-dense",
                "--gpu-upload",
                "staged",
                "--gpu-budget",
                "9M",
                "--ram-budget",
                rb,
                "--lookahead",
                "1",
            ],
        );
        assert!(r["upload_bytes_per_token"].as_f64().unwrap() > 0.0, "{r}");
        read.push(r["read_bytes_per_token"].as_f64().unwrap());
    }
    assert!(
        read[0] > read[1] && read[2] == 0.0,
        "more RAM, fewer disk reads, none when every layer fits: {read:?}"
    );
}

#[test]
fn gpu_dense_real_model_matches_resident() {
    let Some(m) = model("SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let want = resident(&m, dir.path());
    same_as(
        &want,
        &m,
        dir.path(),
        "staged",
        &[
            "--mode",
            "gpu-dense",
            "--gpu-upload",
            "staged",
            "--gpu-budget",
            "70M",
            "--lookahead",
            "2",
        ],
    );
}

#[test]
fn gpu_experts_slots_match_resident() {
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
            "32",
        ],
    );
    let want = resident(&m, dir.path());
    let plan = |budget: &str| {
        let o = hypura()
            .args([
                "inspect",
                m.to_str().unwrap(),
                "--json",
                "--mode",
                "gpu-experts",
                "--gpu-upload",
                "staged",
                "--gpu-budget",
                budget,
            ])
            .args(CPU)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["plan"]["gpu"].clone()
    };
    // A small budget: one dedicated slot at most, the other layers share.
    let small = plan("5M");
    let n_slots = small["n_slots"].as_u64().unwrap();
    assert!((1..6).contains(&n_slots), "{small}");
    assert_eq!(
        small["dedicated_layers"].as_array().unwrap().len() as u64,
        n_slots - 1,
        "{small}"
    );
    // A large one: every layer has its slot.
    let large = plan("64M");
    assert_eq!(
        large["dedicated_layers"].as_array().unwrap().len(),
        6,
        "{large}"
    );
    for (tag, budget) in [("shared", "5M"), ("dedicated", "64M")] {
        let r = same_as(
            &want,
            &m,
            dir.path(),
            tag,
            &[
                "--mode",
                "gpu-experts",
                "--gpu-upload",
                "staged",
                "--gpu-budget",
                budget,
                "--ram-budget",
                "24M",
            ],
        );
        assert_eq!(r["mode"], "gpu-experts", "{r}");
        let copied = r["upload_bytes_per_token"].as_f64().unwrap();
        let hits = r["gpu_expert_hits_per_token"].as_f64().unwrap();
        if tag == "shared" {
            assert!(copied > 0.0, "{tag}: nothing copied to the device: {r}");
        } else {
            // Experts stay in their layer's slot across tokens.
            assert!(hits > 0.0, "{tag}: no expert reused from its GPU slot: {r}");
        }
    }
    // A RAM cache smaller than the experts: the (pinned on a GPU) cache
    // evicts and re-reads while the shared slot cycles.
    let r = same_as(
        &want,
        &m,
        dir.path(),
        "evicting",
        &[
            "--mode",
            "gpu-experts",
            "--gpu-upload",
            "staged",
            "--gpu-budget",
            "5M",
            "--ram-budget",
            "4M",
        ],
    );
    assert!(
        r["read_bytes_per_token"].as_f64().unwrap() > 0.0,
        "the small cache reads while generating: {r}"
    );
    let r = same_as(
        &want,
        &m,
        dir.path(),
        "direct",
        &[
            "--mode",
            "gpu-experts",
            "--gpu-upload",
            "direct",
            "--gpu-budget",
            "64M",
            "--ram-budget",
            "24M",
        ],
    );
    assert_eq!(r["upload_bytes_per_token"].as_f64().unwrap(), 0.0, "{r}");
}

#[test]
fn cpu_shape_matches_resident() {
    // The CPU shape (FFN or experts in RAM/NVMe, computed on the CPU; the
    // rest on the device) on the CPU device: same kernels, same logits.
    let dir = tempfile::tempdir().unwrap();
    let moe = dir.path().join("mixtral.gguf");
    gen(
        &moe,
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
            "q8_0",
            "--seed",
            "33",
        ],
    );
    let want = resident(&moe, dir.path());
    let r = same_as(
        &want,
        &moe,
        dir.path(),
        "experts",
        &[
            "--mode",
            "experts",
            "--gpu-budget",
            "8M",
            "--ram-budget",
            "12M",
        ],
    );
    assert_eq!(r["mode"], "experts", "{r}");
    let dense = dir.path().join("llama.gguf");
    gen(
        &dense,
        &[
            "--arch", "llama", "--layers", "6", "--embd", "512", "--ff", "1536", "--type", "q8_0",
            "--seed", "34",
        ],
    );
    let want = resident(&dense, dir.path());
    let r = same_as(
        &want,
        &dense,
        dir.path(),
        "dense",
        &[
            "--mode",
            "dense",
            "--gpu-budget",
            "16M",
            "--ram-budget",
            "12M",
            "--lookahead",
            "1",
        ],
    );
    assert_eq!(r["mode"], "dense", "{r}");
    assert!(
        r["pinned_layers"].as_u64().unwrap() > 0 && r["streamed_layers"].as_u64().unwrap() > 0,
        "pinned in RAM and streamed: {r}"
    );
}

#[test]
fn gpu_errors_are_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m.gguf");
    gen(
        &m,
        &[
            "--arch", "llama", "--layers", "4", "--embd", "256", "--ff", "768", "--type", "q8_0",
            "--seed", "35",
        ],
    );
    let m = m.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["--mode", "gpu-dense", "--gpu-budget", "0"], "no GPU"),
        (
            &["--mode", "gpu-dense", "--gpu-device", "NoSuchDevice"],
            "no ggml device named",
        ),
        (
            &[
                "--mode",
                "gpu-dense",
                "--gpu-device",
                "CPU",
                "--gpu-budget",
                "100K",
            ],
            "GPU budget",
        ),
        (
            &[
                "--mode",
                "gpu-experts",
                "--gpu-device",
                "CPU",
                "--gpu-budget",
                "8M",
            ],
            "no MoE expert tensors",
        ),
        (
            &["--gpu-device", "CPU", "--gpu-budget", "100000G"],
            "never takes more",
        ),
    ];
    for (args, want) in cases {
        for cmd in ["inspect", "run"] {
            let mut c = hypura();
            c.args([cmd, m]);
            if cmd == "run" {
                c.args(["--prompt", "hi", "-n", "2"]);
            }
            let o = c.args(*args).output().unwrap();
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(!o.status.success(), "{cmd} {args:?} succeeded");
            assert!(
                err.contains(want),
                "{cmd} {args:?}: expected '{want}' in: {err}"
            );
            assert_eq!(
                err.lines().filter(|l| l.starts_with("error")).count(),
                1,
                "{cmd} {args:?}: {err}"
            );
            assert!(!err.contains("panicked"), "{err}");
        }
    }
}

#[test]
fn inspect_shows_the_gpu_tier() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m.gguf");
    gen(
        &m,
        &[
            "--arch", "llama", "--layers", "6", "--embd", "512", "--ff", "1536", "--type", "q8_0",
            "--seed", "36",
        ],
    );
    let o = hypura()
        .args([
            "inspect",
            m.to_str().unwrap(),
            "--tensors",
            "--gpu-device",
            "CPU",
            "--gpu-upload",
            "staged",
            "--gpu-budget",
            "14M",
            "--ram-budget",
            "8M",
            "--mode",
            "gpu-dense",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(
        s.contains("gpu-dense") && s.contains("resident (GPU)") && s.contains("pool (GPU)"),
        "{s}"
    );
    let tiers = |t: &str| s.lines().filter(|l| l.trim_end().ends_with(t)).count();
    assert!(
        tiers(" gpu") > 0 && tiers(" nvme") > 0 && tiers(" ram") > 0,
        "gpu, nvme and ram tiers: {s}"
    );
    // The embeddings stay in RAM (llama.cpp keeps the input layer on the CPU).
    assert!(
        s.lines()
            .any(|l| l.contains("token_embd") && l.trim_end().ends_with(" ram")),
        "{s}"
    );
}

#[test]
fn a_full_gpu_falls_back_to_the_cpu() {
    // Automatic mode with a GPU budget that holds not even the attention:
    // the plan runs without the GPU instead of refusing.
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m.gguf");
    gen(
        &m,
        &[
            "--arch", "llama", "--layers", "4", "--embd", "256", "--ff", "768", "--type", "q8_0",
            "--seed", "38",
        ],
    );
    let o = hypura()
        .args([
            "inspect",
            m.to_str().unwrap(),
            "--json",
            "--gpu-budget",
            "64K",
        ])
        .args(CPU)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["plan"]["gpu"].is_null(), "{}", v["plan"]);
    let out = dir.path().join("x.logits");
    let r = report(&run(
        &m,
        &out,
        &["--gpu-budget", "64K", "--gpu-device", "CPU"],
    ));
    assert!(r["gpu_device"].is_null(), "{r}");
}

/// `hypura run` on the CPU device with `env` set; (report, stderr).
fn run_env(
    m: &Path,
    out: &Path,
    env: &[(&str, &str)],
    extra: &[&str],
) -> (serde_json::Value, String) {
    let mut c = hypura();
    c.args([
        "run",
        m.to_str().unwrap(),
        "--prompt",
        "The quick brown fox jumps over",
    ])
    .args([
        "--temp",
        "0",
        "--max-tokens",
        "32",
        "--threads",
        "2",
        "--no-repack",
    ])
    .args(["--json", "--logits-out"])
    .arg(out)
    .args(CPU)
    .args(extra);
    for (k, v) in env {
        c.env(k, v);
    }
    let o = c.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        o.status.success(),
        "hypura run {extra:?} {env:?} failed: {err}"
    );
    (report(&err), err)
}

#[test]
fn direct_slots_the_vulkan_path_match_resident() {
    // HYPURA_DIRECT_SLOTS makes the CPU device take the path of a device
    // with addresses of its own (Vulkan): every slot imported as a buffer of
    // its own, tensors pointed at buffer base + offset, expert slots filled
    // by reads straight from disk. Same kernels: byte-identical logits.
    let dir = tempfile::tempdir().unwrap();
    let moe = dir.path().join("moe.gguf");
    gen(
        &moe,
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
            "33",
            "--routing",
            "zipf:0.5",
        ],
    );
    let want = resident(&moe, dir.path());
    let slots = [("HYPURA_DIRECT_SLOTS", "1")];
    for (tag, budget) in [("shared", "5M"), ("dedicated", "64M")] {
        let out = dir.path().join(format!("{tag}.logits"));
        let (r, _) = run_env(
            &moe,
            &out,
            &slots,
            &[
                "--mode",
                "gpu-experts",
                "--gpu-upload",
                "direct",
                "--gpu-budget",
                budget,
            ],
        );
        assert_eq!(
            std::fs::read(&out).unwrap(),
            want,
            "{tag}: logits differ: {r}"
        );
        assert_eq!(r["mode"], "gpu-experts", "{r}");
        assert_eq!(
            r["upload_bytes_per_token"].as_f64().unwrap(),
            0.0,
            "{tag}: {r}"
        );
        assert!(
            r["read_bytes_per_token"].as_f64().unwrap() > 0.0,
            "{tag}: {r}"
        );
    }
    let dense = dir.path().join("dense.gguf");
    gen(
        &dense,
        &[
            "--arch",
            "llama",
            "--layers",
            "6",
            "--embd",
            "576",
            "--ff",
            "1536",
            "--heads",
            "9",
            "--heads-kv",
            "3",
            "--type",
            "q4_0",
            "--seed",
            "34",
        ],
    );
    let want = resident(&dense, dir.path());
    let args = [
        "--mode",
        "gpu-dense",
        "--gpu-upload",
        "direct",
        "--gpu-budget",
        "9M",
        "--ram-budget",
        "6M",
        "--lookahead",
        "1",
    ];
    let out = dir.path().join("dense-direct.logits");
    let (r, _) = run_env(&dense, &out, &slots, &args);
    assert_eq!(std::fs::read(&out).unwrap(), want, "dense direct: {r}");
    assert_eq!(r["upload_bytes_per_token"].as_f64().unwrap(), 0.0, "{r}");
    assert!(r["read_bytes_per_token"].as_f64().unwrap() > 0.0, "{r}");
    // The device refuses the pool's imports (its probe passed): staged
    // copies instead, with a one-line note, the same logits.
    let out = dir.path().join("refused.logits");
    let (r, err) = run_env(&dense, &out, &[("HYPURA_REFUSE_IMPORT", "1")], &args);
    assert_eq!(std::fs::read(&out).unwrap(), want, "fallback: {r}");
    assert!(
        err.lines()
            .any(|l| l.starts_with("note: CPU did not import the streaming pool")),
        "{err}"
    );
    assert!(
        r["upload_bytes_per_token"].as_f64().unwrap() > 0.0,
        "staged copies: {r}"
    );
}
