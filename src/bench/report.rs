//! The bench's results: per-configuration summaries over the recorded runs,
//! the JSON document written under `--out`, and the Markdown table.

use std::fmt::Write as _;
use std::path::PathBuf;

use serde::Serialize;

use super::config::{BenchConfig, Kind, RunSettings};
use super::runner::RunRecord;
use super::stats::{median, Spread};
use crate::profiler::MachineProfile;
use crate::report::RunReport;
use crate::scheduler::format_bytes;

/// The model benchmarked.
#[derive(Clone, Debug, Serialize)]
pub struct ModelInfo {
    /// As given on the command line.
    pub path: PathBuf,
    pub canonical_path: Option<PathBuf>,
    pub file_name: String,
    pub size_bytes: u64,
    pub arch: Option<String>,
    pub layers: u32,
    pub tensors: usize,
    /// Experts per MoE layer (absent for dense models).
    pub experts: Option<u64>,
    pub experts_used: Option<u64>,
}

/// Memory as the bench found it, read live (cgroup-aware).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct MemoryNow {
    /// What this process may still use: `MemAvailable`, capped by the cgroup's headroom.
    pub available_bytes: Option<u64>,
    /// The tightest memory cgroup limit, if any.
    pub cgroup_limit_bytes: Option<u64>,
}

/// Medians (and spreads for the speeds) of one configuration's recorded runs.
#[derive(Clone, Debug, Serialize)]
pub struct ConfigSummary {
    pub config: String,
    pub label: String,
    pub kind: Kind,
    /// Requested depth (streaming configurations).
    pub lookahead: Option<usize>,
    /// Depth the plan used (it may cap the request to what the budget allows).
    pub effective_lookahead: Option<usize>,
    /// Recorded (not warm-up) runs, failed ones included.
    pub runs: usize,
    pub failed: usize,
    /// Distinct failure reasons.
    pub errors: Vec<String>,
    /// Placement mode the runs used (resident, dense, experts).
    pub mode: Option<String>,
    pub prompt_tokens: Option<f64>,
    pub gen_tokens: Option<f64>,
    pub prompt_tps: Option<Spread>,
    pub gen_tps: Option<Spread>,
    pub load_secs: Option<f64>,
    /// Bytes read from disk per generated token.
    pub read_bytes_per_token: Option<f64>,
    pub stall_ms_per_token: Option<f64>,
    /// Cross-token expert cache hit rate (MoE streaming).
    pub expert_hit_rate: Option<f64>,
    /// What an LRU cache of the same budget would have hit on the same
    /// routing (simulated from the runs' routing traces).
    pub lru_sim_hit_rate: Option<f64>,
    /// Achieved disk throughput during generation, GB/s.
    pub disk_gbps: Option<f64>,
    /// `disk_gbps` / the profiled sequential ceiling (`storage.best_seq_gbps`).
    pub disk_ratio: Option<f64>,
    /// The estimator's prediction for this configuration.
    pub predicted_tps: Option<f64>,
    /// The estimator's disk-bound ceiling.
    pub ceiling_tps: Option<f64>,
    /// Profiled disk bandwidth / measured bytes per token: the most a disk-bound run could do.
    pub disk_ceiling_tps: Option<f64>,
    pub peak_rss_bytes: Option<f64>,
    pub io_backend: Option<String>,
}

/// Everything `hypura bench` measured: written as JSON under `--out`.
#[derive(Clone, Debug, Serialize)]
pub struct BenchDoc {
    pub hypura_version: String,
    pub created_unix: u64,
    /// The bench's own command line.
    pub command: Vec<String>,
    /// Ctrl-C stopped the bench; `runs` holds those done.
    pub interrupted: bool,
    /// The cached machine profile (absent when none could be had).
    pub machine: Option<MachineProfile>,
    /// Memory when the runs started.
    pub memory_now: MemoryNow,
    /// The profiled sequential disk ceiling, GB/s.
    pub disk_ceiling_gbps: Option<f64>,
    pub model: ModelInfo,
    pub settings: RunSettings,
    pub warmup_rounds: usize,
    pub repeat: usize,
    pub configs: Vec<BenchConfig>,
    /// Every run in the order it ran, warm-up runs included.
    pub runs: Vec<RunRecord>,
    pub summary: Vec<ConfigSummary>,
    /// Streaming depth with the best median generation speed.
    pub best_lookahead: Option<usize>,
    /// The chart's file name (next to the JSON), if it was drawn.
    pub chart: Option<String>,
}

/// Summarises each configuration's recorded runs.
pub fn summarise(
    configs: &[BenchConfig],
    runs: &[RunRecord],
    disk_ceiling_gbps: Option<f64>,
) -> Vec<ConfigSummary> {
    configs
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let mine: Vec<&RunRecord> =
                runs.iter().filter(|r| r.config == i && !r.warmup).collect();
            let reports: Vec<&RunReport> = mine.iter().filter_map(|r| r.report.as_ref()).collect();
            let all = |field: fn(&RunReport) -> Option<f64>| -> Vec<f64> {
                reports.iter().filter_map(|r| field(r)).collect()
            };
            let med = |field: fn(&RunReport) -> Option<f64>| median(&all(field));
            let mut errors: Vec<String> = mine.iter().filter_map(|r| r.error.clone()).collect();
            errors.dedup();
            let read = med(|r| r.read_bytes_per_token);
            let disk = med(|r| r.disk_gbps);
            let ceiling_gbps = disk_ceiling_gbps.filter(|g| *g > 0.0);
            ConfigSummary {
                config: c.id.clone(),
                label: c.label.clone(),
                kind: c.kind,
                lookahead: c.lookahead,
                effective_lookahead: match c.kind {
                    Kind::Streaming => {
                        med(|r| Some(r.lookahead as f64)).map(|x| x.round() as usize)
                    }
                    Kind::Baseline => None,
                },
                runs: mine.len(),
                failed: mine.iter().filter(|r| !r.ok).count(),
                errors,
                mode: reports.first().map(|r| r.mode.label().to_string()),
                prompt_tokens: med(|r| Some(r.prompt_tokens as f64)),
                gen_tokens: med(|r| Some(r.gen_tokens as f64)),
                prompt_tps: Spread::of(&all(|r| Some(r.prompt_tps))),
                gen_tps: Spread::of(&all(|r| Some(r.gen_tps))),
                load_secs: med(|r| Some(r.load_secs)),
                read_bytes_per_token: read,
                stall_ms_per_token: med(|r| r.stall_ms_per_token),
                expert_hit_rate: med(|r| r.expert_hit_rate),
                lru_sim_hit_rate: median(
                    &mine
                        .iter()
                        .filter_map(|r| r.lru_sim_hit_rate)
                        .collect::<Vec<_>>(),
                ),
                disk_gbps: disk,
                disk_ratio: disk.zip(ceiling_gbps).map(|(d, c)| d / c),
                predicted_tps: med(|r| r.predicted_tps),
                ceiling_tps: med(|r| r.ceiling_tps),
                disk_ceiling_tps: read
                    .filter(|b| *b > 0.0)
                    .zip(ceiling_gbps)
                    .map(|(b, g)| g * 1e9 / b),
                peak_rss_bytes: med(|r| Some(r.peak_rss_bytes as f64)),
                io_backend: reports.iter().find_map(|r| r.io_backend.clone()),
            }
        })
        .collect()
}

/// The streaming depth with the best median generation speed that actually
/// streamed (ties go to the smaller depth: less pool memory).
pub fn best_lookahead(summary: &[ConfigSummary]) -> Option<usize> {
    summary
        .iter()
        .filter(|s| s.kind == Kind::Streaming && s.mode.as_deref().is_some_and(|m| m != "resident"))
        .filter_map(|s| Some((s.lookahead?, s.gen_tps?.median)))
        .fold(None, |best: Option<(usize, f64)>, (d, t)| match best {
            Some((_, bt)) if bt >= t => best,
            _ => Some((d, t)),
        })
        .map(|(d, _)| d)
}

fn opt(v: Option<f64>, fmt: impl Fn(f64) -> String) -> String {
    v.map_or_else(|| "–".to_string(), fmt)
}

fn tps(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn spread(s: Option<Spread>) -> String {
    match s {
        Some(s) if s.n > 1 => format!("{} ({}–{})", tps(s.median), tps(s.min), tps(s.max)),
        Some(s) => tps(s.median),
        None => "–".to_string(),
    }
}

/// The Markdown report: a short header, then one row per configuration.
pub fn markdown(doc: &BenchDoc) -> String {
    let mut out = String::new();
    let m = &doc.model;
    let _ = writeln!(
        out,
        "## hypura bench: {} ({}, {}{})\n",
        m.file_name,
        m.arch.as_deref().unwrap_or("unknown arch"),
        format_bytes(m.size_bytes),
        match (m.experts, m.experts_used) {
            (Some(n), Some(k)) => format!(", {n} experts top-{k}"),
            _ => String::new(),
        }
    );
    let s = &doc.settings;
    let mut facts = vec![
        format!("threads {}", s.threads),
        format!("prompt {} tokens", s.prompt_tokens),
        format!("generate {} tokens", s.gen_tokens),
        format!(
            "{} warm-up + {} recorded round(s)",
            doc.warmup_rounds, doc.repeat
        ),
        format!(
            "RAM budget {}",
            s.ram_budget_bytes
                .map_or("run's default".to_string(), format_bytes)
        ),
    ];
    match (
        doc.memory_now.available_bytes,
        doc.memory_now.cgroup_limit_bytes,
    ) {
        (Some(a), Some(l)) => facts.push(format!(
            "memory cgroup limit {} ({} available)",
            format_bytes(l),
            format_bytes(a)
        )),
        (Some(a), None) => facts.push(format!("memory {} available", format_bytes(a))),
        _ => {}
    }
    if let Some(p) = &doc.machine {
        facts.push(format!(
            "disk ceiling {:.2} GB/s ({})",
            p.storage.best_seq_gbps, p.storage.backend
        ));
    } else {
        facts.push("no machine profile: no disk ceiling".to_string());
    }
    let _ = writeln!(out, "{}\n", facts.join(" · "));
    if doc.interrupted {
        let _ = writeln!(out, "**Interrupted**: {} run(s) kept.\n", doc.runs.len());
    }
    let _ = writeln!(
        out,
        "| config | mode | runs | gen tok/s (median, min–max) | predicted tok/s | prompt tok/s | read/token | stall ms/token | expert hits | LRU sim hits | disk GB/s | disk/ceiling | peak RSS |"
    );
    let _ = writeln!(out, "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    for c in &doc.summary {
        let mut label = c.label.clone();
        if let (Some(req), Some(eff)) = (c.lookahead, c.effective_lookahead) {
            if req != eff {
                label += &format!(" (plan: {eff})");
            }
        }
        let runs = if c.failed > 0 {
            format!("{}/{} ok", c.runs - c.failed, c.runs)
        } else {
            c.runs.to_string()
        };
        let _ = writeln!(
            out,
            "| {label} | {} | {runs} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            c.mode.as_deref().unwrap_or("–"),
            spread(c.gen_tps),
            opt(c.predicted_tps, tps),
            spread(c.prompt_tps),
            opt(c.read_bytes_per_token, |b| format_bytes(b as u64)),
            opt(c.stall_ms_per_token, |v| format!("{v:.1}")),
            opt(c.expert_hit_rate, |v| format!("{:.1}%", v * 100.0)),
            opt(c.lru_sim_hit_rate, |v| format!("{:.1}%", v * 100.0)),
            opt(c.disk_gbps, |v| format!("{v:.2}")),
            opt(c.disk_ratio, |v| format!("{:.0}%", v * 100.0)),
            opt(c.peak_rss_bytes, |b| format_bytes(b as u64)),
        );
    }
    for c in doc.summary.iter().filter(|c| !c.errors.is_empty()) {
        let _ = writeln!(out, "\n{}: {}", c.label, c.errors.join("; "));
    }
    if let Some(d) = doc.best_lookahead {
        let _ = writeln!(out, "\nBest lookahead: {d}");
    } else if doc
        .summary
        .iter()
        .any(|c| c.kind == Kind::Streaming && c.mode.as_deref() == Some("resident"))
    {
        let _ = writeln!(out, "\nThe model fits the RAM budget (runs were resident): lookahead has no effect; lower --ram-budget to stream.");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::config::BenchConfig;
    use crate::scheduler::Mode;

    fn rec(config: usize, warmup: bool, report: RunReport) -> RunRecord {
        RunRecord {
            config,
            config_id: String::new(),
            round: 0,
            warmup,
            seq: 0,
            ok: true,
            wall_secs: 1.0,
            error: None,
            report: Some(report),
            lru_sim_hit_rate: Some(0.5),
        }
    }

    #[test]
    fn summaries_skip_warmup_and_pick_the_best_depth() {
        let configs = vec![
            BenchConfig::streaming(0, None, None),
            BenchConfig::streaming(2, None, None),
            BenchConfig::baseline("auto"),
        ];
        let r = |tps: f64, depth: usize| RunReport {
            gen_tps: tps,
            prompt_tps: 10.0,
            lookahead: depth,
            read_bytes_per_token: Some(2e6),
            disk_gbps: Some(1.0),
            ..RunReport::zeroed(Mode::Experts)
        };
        let runs = vec![
            rec(0, true, r(100.0, 0)),
            rec(0, false, r(5.0, 0)),
            rec(0, false, r(7.0, 0)),
            rec(1, false, r(6.0, 2)),
            rec(1, false, r(9.0, 2)),
            rec(
                2,
                false,
                RunReport {
                    gen_tps: 20.0,
                    prompt_tps: 30.0,
                    ..RunReport::zeroed(Mode::Resident)
                },
            ),
        ];
        let s = summarise(&configs, &runs, Some(2.0));
        assert_eq!(s[0].runs, 2);
        assert_eq!(s[0].gen_tps.unwrap().median, 6.0);
        assert_eq!(s[0].disk_ratio, Some(0.5));
        assert_eq!(s[0].disk_ceiling_tps, Some(1000.0));
        assert_eq!(s[1].effective_lookahead, Some(2));
        assert_eq!(s[2].effective_lookahead, None);
        assert_eq!(s[2].read_bytes_per_token, None);
        assert_eq!(best_lookahead(&s), Some(2));
    }
}
