//! `hypura bench`: a lookahead sweep, optionally against llama.cpp's own
//! loading, with medians over repeated runs, a JSON record, a Markdown table
//! and a PNG chart.
//!
//! Every run is a child process of the same binary running
//! `hypura run ... --json` (see [`runner`]): a fresh process per run, so load
//! time, peak RSS and a cold pool are honest. After `warmup` unrecorded
//! rounds come `repeat` recorded rounds; each round runs every configuration
//! once, starting one configuration later than the round before, so slow
//! drift on a noisy machine hits every configuration alike.

pub mod chart;
pub mod config;
pub mod report;
pub mod runner;
pub mod stats;

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::gguf::GgufFile;
use crate::profiler::MachineProfile;
use crate::scheduler::Mode;
use config::{BenchConfig, Kind, RunSettings};
use report::{BenchDoc, MemoryNow, ModelInfo};
use runner::{Outcome, RunRecord};

/// What to bench and how.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub model: PathBuf,
    /// Lookahead depths, sorted, at least one.
    pub depths: Vec<usize>,
    /// Add llama.cpp's own loading (mmap and O_DIRECT), all resident.
    pub baseline: bool,
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    /// Sampling temperature and seed of every run.
    pub temp: f32,
    pub seed: u32,
    /// Recorded rounds.
    pub repeat: usize,
    /// Unrecorded rounds first.
    pub warmup: usize,
    pub ram_budget: Option<u64>,
    pub threads: usize,
    pub mode: Option<Mode>,
    /// Placement modes to compare (each with every depth); empty: `mode` only.
    pub modes: Vec<Mode>,
    /// `--gpu-budget` and `--gpu-device` of the streaming runs.
    pub gpu_budget: Option<u64>,
    pub gpu_device: Option<String>,
    /// `--rpc` and `--tensor-split` of every run (the baselines included:
    /// llama.cpp's own path over the same servers).
    pub rpc: Option<(String, Option<String>)>,
    pub no_repack: bool,
    pub io_backend: Option<String>,
    /// Per-run time limit.
    pub timeout: Option<Duration>,
    pub out_dir: PathBuf,
    /// The bench's own command line, for the record.
    pub command: Vec<String>,
    /// The `hypura` binary the runs use.
    pub exe: PathBuf,
}

/// What a bench produced.
pub struct BenchOutput {
    pub doc: BenchDoc,
    pub json_path: PathBuf,
    pub chart_path: Option<PathBuf>,
}

/// The memory this process may use now: `MemAvailable`, lowered to the
/// headroom (limit − usage) of the tightest memory cgroup it is in (v2 or v1).
pub fn usable_memory_bytes() -> Option<u64> {
    memory_now().available_bytes
}

/// Memory available now and the tightest cgroup limit, read live (the cached
/// profile may have been measured outside the cgroup the bench runs in).
pub fn memory_now() -> MemoryNow {
    MemoryNow {
        available_bytes: Some(crate::profiler::memory::usable_now()),
        cgroup_limit_bytes: crate::profiler::memory::cgroup_limit_now(),
    }
}

/// The machine profile for the disk ceiling and the runs' predictions: the
/// cached one, else measured now (and cached, so the runs see it too).
pub fn machine_profile(model: &Path) -> Option<MachineProfile> {
    if let Some(p) = crate::profiler::load_cached() {
        return Some(p);
    }
    eprintln!("bench: no machine profile cached; measuring this machine (hypura profile) first");
    let dir = model
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    match crate::profiler::load_or_measure(false, Some(dir), crate::engine::device::measure_all) {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::warn!(
                "no machine profile ({e:#}): the disk ceiling and predictions are left out"
            );
            None
        }
    }
}

fn model_info(path: &Path, gguf: &GgufFile) -> ModelInfo {
    let ap = gguf.arch_params();
    ModelInfo {
        path: path.to_path_buf(),
        canonical_path: std::fs::canonicalize(path).ok(),
        file_name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        size_bytes: gguf.file_size,
        arch: gguf.architecture().map(String::from),
        layers: gguf.layer_count(),
        tensors: gguf.tensors.len(),
        experts: ap.n_expert.filter(|n| *n > 0).map(u64::from),
        experts_used: ap.n_expert_used.filter(|n| *n > 0).map(u64::from),
    }
}

/// Whether the tokenizer puts a BOS token before the prompt (llama.cpp's rule:
/// the metadata key if present, else on for SentencePiece vocabularies).
fn adds_bos(gguf: &GgufFile) -> bool {
    if let Some(b) = gguf
        .get("tokenizer.ggml.add_bos_token")
        .and_then(|v| v.as_bool())
    {
        return b;
    }
    gguf.get("tokenizer.ggml.model").and_then(|v| v.as_str()) == Some("llama")
}

/// File-name-safe model stem.
fn stem(path: &Path) -> String {
    let s = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The configurations: one per depth, then the baselines.
pub fn configs(opts: &BenchOptions) -> Vec<BenchConfig> {
    let mut c: Vec<BenchConfig> = if opts.modes.is_empty() {
        opts.depths
            .iter()
            .map(|&d| BenchConfig::streaming(d, opts.ram_budget, opts.mode))
            .collect()
    } else {
        // Placement modes side by side (e.g. gpu-experts against the CPU shape).
        opts.modes
            .iter()
            .flat_map(|&m| {
                opts.depths.iter().map(move |&d| {
                    let mut b = BenchConfig::streaming(d, opts.ram_budget, Some(m));
                    b.id = format!("{}-{}", m.label(), b.id);
                    b.label = format!("{}, {}", m.label(), b.label);
                    b
                })
            })
            .collect()
    };
    for b in &mut c {
        if let Some(g) = opts.gpu_budget {
            b.args.extend(["--gpu-budget".to_string(), g.to_string()]);
        }
        if let Some(d) = &opts.gpu_device {
            b.args.extend(["--gpu-device".to_string(), d.clone()]);
        }
    }
    if opts.baseline {
        c.push(BenchConfig::baseline("auto"));
        c.push(BenchConfig::baseline("dio"));
    }
    if let Some((rpc, split)) = &opts.rpc {
        for b in &mut c {
            b.args.extend(["--rpc".to_string(), rpc.clone()]);
            if let Some(s) = split {
                b.args.extend(["--tensor-split".to_string(), s.clone()]);
            }
        }
    }
    c
}

/// Round `round` runs the configurations starting at `round % n`.
pub fn round_order(round: usize, n: usize) -> Vec<usize> {
    (0..n).map(|i| (round + i) % n).collect()
}

/// Runs the whole bench and writes the JSON and the chart. Ctrl-C (with the
/// handler installed) stops it early; the document says so and keeps the runs done.
/// The hit rate an LRU expert cache of the run's budget would have had on
/// the run's generated tokens (its routing trace, then removed).
fn lru_sim_hit_rate(trace: &Path) -> Option<f64> {
    let t = crate::engine::stream::trace::Trace::read(trace).ok();
    let _ = std::fs::remove_file(trace);
    let t = t?;
    // Prompt passes have several tokens; the generated ones one each.
    let from = t
        .records
        .iter()
        .filter(|r| r.2 > 0)
        .map(|r| r.0 + 1)
        .max()
        .unwrap_or(0);
    let lru = |n| {
        crate::engine::stream::policy::policy(crate::engine::stream::policy::PolicyKind::Lru, n)
    };
    crate::engine::stream::trace::simulate(&t, lru, from)
        .ok()?
        .hit_rate()
}

pub fn run(
    opts: &BenchOptions,
    gguf: &GgufFile,
    profile: Option<MachineProfile>,
) -> Result<BenchOutput> {
    let words = opts
        .prompt_tokens
        .saturating_sub(usize::from(adds_bos(gguf)))
        .max(1);
    let settings = RunSettings {
        model: opts.model.clone(),
        prompt_tokens: opts.prompt_tokens,
        prompt: config::synthetic_prompt(words),
        gen_tokens: opts.gen_tokens,
        temp: opts.temp,
        seed: opts.seed,
        threads: opts.threads,
        ctx: config::context_for(opts.prompt_tokens, opts.gen_tokens),
        no_repack: opts.no_repack,
        ram_budget_bytes: opts.ram_budget,
        mode: opts.mode,
        io_backend: opts.io_backend.clone(),
    };
    let configs = configs(opts);
    let moe = gguf.arch_params().n_expert.is_some_and(|n| n > 0);
    let n = configs.len();
    let rounds = opts.warmup + opts.repeat;
    let total = rounds * n;

    let tty = std::io::stderr().is_terminal();
    let multi = MultiProgress::with_draw_target(if tty {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    });
    let overall = multi.add(ProgressBar::new(total as u64));
    overall.set_style(
        ProgressStyle::with_template(
            "bench {bar:30.cyan/blue} {pos}/{len} runs  {elapsed_precise}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let run_style =
        ProgressStyle::with_template("  {spinner} {prefix:32} {bar:30.green/white} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar());

    let mut runs: Vec<RunRecord> = Vec::new();
    let mut interrupted = false;
    'rounds: for round in 0..rounds {
        let warmup = round < opts.warmup;
        for ci in round_order(round, n) {
            let c = &configs[ci];
            let phase = if warmup {
                format!("warm-up {}/{}", round + 1, opts.warmup)
            } else {
                format!("round {}/{}", round + 1 - opts.warmup, opts.repeat)
            };
            // Expected length: this configuration's last run, in ms.
            let expect = runs
                .iter()
                .rev()
                .find(|r| r.config == ci)
                .map(|r| (r.wall_secs * 1000.0) as u64);
            let bar = multi.add(match expect {
                Some(ms) => ProgressBar::new(ms.max(1)),
                None => ProgressBar::new_spinner(),
            });
            bar.set_style(run_style.clone());
            bar.set_prefix(format!("{phase} · {}", c.label));
            bar.enable_steady_tick(Duration::from_millis(120));
            // MoE streaming runs trace their routing, for the LRU simulation.
            let trace = (moe && c.kind == Kind::Streaming).then(|| {
                opts.out_dir
                    .join(format!(".routing-{}.trace", std::process::id()))
            });
            let mut args = settings.args(c);
            if let Some(t) = &trace {
                let _ = std::fs::remove_file(t);
                args.extend([
                    "--routing-trace".to_string(),
                    t.to_string_lossy().into_owned(),
                ]);
            }
            let outcome = runner::run_child(&opts.exe, &args, opts.timeout, &bar)?;
            let lru_sim_hit_rate = trace.as_deref().and_then(lru_sim_hit_rate);
            bar.finish_and_clear();
            multi.remove(&bar);
            match outcome {
                Outcome::Interrupted => {
                    interrupted = true;
                    break 'rounds;
                }
                Outcome::Finished {
                    ok,
                    wall_secs,
                    error,
                    report,
                } => {
                    let line = match (&report, &error) {
                        (Some(r), _) => format!(
                            "{phase} · {}: generation {:.2} tok/s, prompt {:.1} tok/s ({wall_secs:.1} s)",
                            c.label,
                            r.gen_tps,
                            r.prompt_tps,
                        ),
                        (None, e) => format!("{phase} · {}: failed: {}", c.label, e.as_deref().unwrap_or("?")),
                    };
                    if tty {
                        let _ = multi.println(line);
                    } else {
                        eprintln!("bench: {line}");
                    }
                    runs.push(RunRecord {
                        config: ci,
                        config_id: c.id.clone(),
                        round,
                        warmup,
                        seq: runs.len(),
                        ok,
                        wall_secs,
                        error,
                        report: report.map(|r| *r),
                        lru_sim_hit_rate,
                    });
                }
            }
            overall.inc(1);
            if runner::interrupted() {
                interrupted = true;
                break 'rounds;
            }
        }
    }
    overall.finish_and_clear();

    let memory = memory_now();
    let disk_ceiling_gbps = profile
        .as_ref()
        .map(|p| p.storage.best_seq_gbps)
        .filter(|g| *g > 0.0);
    let summary = report::summarise(&configs, &runs, disk_ceiling_gbps);
    let best = report::best_lookahead(&summary);
    let now = crate::util::unix_secs();
    let mut doc = BenchDoc {
        hypura_version: env!("CARGO_PKG_VERSION").to_string(),
        created_unix: now,
        command: opts.command.clone(),
        interrupted,
        machine: profile,
        memory_now: memory,
        disk_ceiling_gbps,
        model: model_info(&opts.model, gguf),
        settings,
        warmup_rounds: opts.warmup,
        repeat: opts.repeat,
        configs,
        runs,
        summary,
        best_lookahead: best,
        chart: None,
    };

    std::fs::create_dir_all(&opts.out_dir)
        .with_context(|| format!("cannot create {}", opts.out_dir.display()))?;
    let base = format!("bench-{}-{now}", stem(&opts.model));
    let chart_path = opts.out_dir.join(format!("{base}.png"));
    let chart_path = if chart::ChartData::from_doc(&doc).is_empty() {
        None
    } else {
        match chart::draw(&chart_path, &doc) {
            Ok(()) => Some(chart_path),
            Err(e) => {
                tracing::warn!("no chart: {e:#}");
                None
            }
        }
    };
    doc.chart = chart_path
        .as_ref()
        .and_then(|p| p.file_name())
        .map(|n| n.to_string_lossy().into_owned());
    let json_path = opts.out_dir.join(format!("{base}.json"));
    let text = serde_json::to_string_pretty(&doc).context("serialising the bench results")?;
    std::fs::write(&json_path, text + "\n")
        .with_context(|| format!("cannot write {}", json_path.display()))?;
    Ok(BenchOutput {
        doc,
        json_path,
        chart_path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_rotate() {
        assert_eq!(round_order(0, 3), vec![0, 1, 2]);
        assert_eq!(round_order(1, 3), vec![1, 2, 0]);
        assert_eq!(round_order(5, 3), vec![2, 0, 1]);
    }

    #[test]
    fn stems_are_file_name_safe() {
        assert_eq!(stem(Path::new("/m/Qwen3 30B.Q4_K.gguf")), "Qwen3_30B.Q4_K");
    }
}
