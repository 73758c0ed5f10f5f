//! `hypura gen --routing`: token-dependent expert routing. At temperature 1
//! over 128 generated tokens, uniform routing (S = 0) uses ≥ 90% of each
//! layer's experts (read from `run --routing-trace`); routed models stream
//! bit-identically; pre-gating guesses routed experts and reads them ahead
//! without changing the output; evicted experts' pages recycled for misses
//! change nothing either; bad specs fail cleanly.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::{check_bit_identical, gen, gen_output, hypura};

const EXPERTS: usize = 32;
const LAYERS: usize = 4;

fn moe(out: &Path, routing: Option<&str>) {
    moe_sized(out, routing, "256", "128");
}

/// `moe` with another width and expert width.
fn moe_sized(out: &Path, routing: Option<&str>, embd: &str, ff_exp: &str) {
    let mut args = vec![
        "--arch",
        "qwen3moe",
        "--layers",
        "4",
        "--embd",
        embd,
        "--experts",
        "32",
        "--experts-used",
        "4",
        "--ff-exp",
        ff_exp,
        "--type",
        "q8_0",
        "--seed",
        "21",
    ];
    if let Some(r) = routing {
        args.extend(["--routing", r]);
    }
    gen(out, &args);
}

/// `run MODEL` with expert streaming at temperature 1 in `budget`: `tokens`
/// tokens, seed `seed`, then `extra`, with the environment `env`.
fn sampled(
    model: &Path,
    budget: &str,
    (seed, tokens): (&str, &str),
    extra: &[&std::ffi::OsStr],
    env: &[(&str, &str)],
) -> std::process::Output {
    hypura()
        .args([
            "run",
            model.to_str().unwrap(),
            "--prompt",
            "The quick brown fox jumps over",
            "--temp",
            "1",
            "--seed",
            seed,
            "--max-tokens",
            tokens,
            "--threads",
            "2",
            "--mode",
            "experts",
            "--ram-budget",
            budget,
            "--json",
        ])
        .args(extra)
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

/// Distinct experts per layer over the generated tokens (passes of one
/// token after the prompt's) of a 128-token run at temperature 1.
fn experts_used(model: &Path, trace: &Path) -> Vec<usize> {
    let o = sampled(
        model,
        "4M",
        ("5", "128"),
        &["--routing-trace".as_ref(), trace.as_os_str()],
        &[],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "run failed: {err}");
    let text = std::fs::read_to_string(trace).unwrap();
    assert!(
        text.starts_with("# hypura routing trace v1\n"),
        "{text:.200}"
    );
    let rows: Vec<Vec<usize>> = text
        .lines()
        .filter_map(|l| l.strip_prefix("t "))
        .map(|l| l.split(' ').map(|x| x.parse().unwrap()).collect())
        .collect();
    let prompt_end = rows
        .iter()
        .filter(|r| r[2] > 0)
        .map(|r| r[0])
        .max()
        .unwrap();
    let mut used = vec![BTreeSet::new(); LAYERS];
    let mut gen_passes = BTreeSet::new();
    for r in rows.iter().filter(|r| r[0] > prompt_end) {
        assert_eq!(r.len(), 3 + 4, "{r:?}");
        gen_passes.insert(r[0]);
        used[r[1]].extend(r[3..].iter().copied());
    }
    // The last generated token is sampled, not decoded.
    assert!(gen_passes.len() >= 126, "{} passes", gen_passes.len());
    used.iter().map(|s| s.len()).collect()
}

#[test]
fn uniform_routing_uses_nearly_every_expert_at_temperature_1() {
    let dir = tempfile::tempdir().unwrap();
    let (routed, plain) = (dir.path().join("zipf0.gguf"), dir.path().join("plain.gguf"));
    moe(&routed, Some("zipf:0"));
    moe(&plain, None);
    let with = experts_used(&routed, &dir.path().join("zipf0.trace"));
    let without = experts_used(&plain, &dir.path().join("plain.trace"));
    eprintln!("experts used per layer of {EXPERTS}: routed {with:?}, plain {without:?}");
    for (l, &n) in with.iter().enumerate() {
        assert!(
            n * 10 >= EXPERTS * 9,
            "layer {l}: {n} of {EXPERTS} experts: {with:?}"
        );
    }
    // Skewed routing concentrates on the popular experts.
    let skewed = dir.path().join("zipf2.gguf");
    moe(&skewed, Some("zipf:2"));
    let few = experts_used(&skewed, &dir.path().join("zipf2.trace"));
    eprintln!("zipf:2 {few:?}");
    assert!(
        few.iter().sum::<usize>() < with.iter().sum::<usize>(),
        "{few:?} vs {with:?}"
    );
}

/// Routed models stream with misses every token (the cache, frequency
/// policy, evicts): logits still equal the resident run's.
#[test]
fn routed_moe_streaming_is_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("zipf.gguf");
    moe(&m, Some("zipf:0.8,corr:0.5"));
    check_bit_identical(&m, "4M", "experts");
}

/// A 48-token run at temperature 1 with expert streaming in `budget`:
/// (stdout, report).
fn sampled_run(model: &Path, budget: &str, env: &[(&str, &str)]) -> (String, serde_json::Value) {
    let o = sampled(model, budget, ("9", "48"), &[], env);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "run failed: {err}");
    let line = err.lines().rfind(|l| l.starts_with('{')).expect("report");
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        serde_json::from_str(line).unwrap(),
    )
}

/// On routed synthetic models the residual stream stays close to the token
/// embedding, so layer N+1's router on layer N's residual picks what it
/// will pick: the guesses are mostly right and read ahead, and the text is
/// the same as without the read-ahead.
#[test]
fn pregating_reads_the_next_layers_experts_ahead_without_changing_the_output() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("zipf0.gguf");
    moe(&m, Some("zipf:0"));
    let (text, rep) = sampled_run(&m, "4M", &[]);
    let (text_off, rep_off) = sampled_run(&m, "4M", &[("HYPURA_NO_PREGATE", "1")]);
    eprintln!("with: {rep}\nwithout: {rep_off}");
    let precision = rep["expert_prediction_precision"].as_f64().unwrap();
    let used = rep["expert_readahead_used"].as_f64().unwrap();
    assert!(precision >= 0.7, "precision {precision}");
    assert!(used >= 0.7, "read-ahead used {used}");
    // Off: still predicted and scored, nothing read ahead.
    assert!(rep_off["expert_prediction_precision"].as_f64().unwrap() >= 0.7);
    assert!(rep_off["expert_readahead_used"].is_null(), "{rep_off}");
    assert!(
        text.len() > 20 && text == text_off,
        "{text:?} vs {text_off:?}"
    );
}

/// Experts of 34 pages (width 512, expert width 256, Q8_0), a few MiB of
/// cache for 52 MiB of them: every token evicts, and the evicted experts' pages
/// are moved to the missing ones (`recycle.rs`). Logits equal the resident
/// run's, and the sampled text is the one without recycling.
#[test]
fn recycled_pages_for_missing_experts_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("wide.gguf");
    moe_sized(&m, Some("zipf:0.8,corr:0.5"), "512", "256");
    let rep = check_bit_identical(&m, "8M", "experts");
    let recycled = rep["expert_pages_recycled"].as_f64().unwrap_or(0.0);
    assert!(recycled > 0.5, "pages recycled {recycled}: {rep}");
    let (text, rep) = sampled_run(&m, "8M", &[]);
    let (text_off, rep_off) = sampled_run(&m, "8M", &[("HYPURA_NO_RECYCLE", "1")]);
    eprintln!("with: {rep}\nwithout: {rep_off}");
    assert!(
        rep["expert_pages_recycled"].as_f64().unwrap_or(0.0) > 0.5,
        "{rep}"
    );
    assert!(rep_off["expert_pages_recycled"].is_null(), "{rep_off}");
    assert!(
        text.len() > 20 && text == text_off,
        "{text:?} vs {text_off:?}"
    );
}

#[test]
fn bad_routing_specs_fail_with_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.gguf");
    for (spec, arch, needle) in [
        ("zipf:x", "qwen3moe", "zipf:S[,corr:C]"),
        ("zipf:1,corr:1.5", "mixtral", "from 0 to 1"),
        ("zipf:1", "llama", "needs an MoE"),
    ] {
        let o = gen_output(&out, &["--arch", arch, "--routing", spec]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{spec}: {err}");
        let first = err.lines().next().unwrap_or_default();
        assert!(
            first.starts_with("error:") && first.contains(needle),
            "{spec}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
        assert!(!out.exists());
    }
}
