//! What a bench compares: one configuration per lookahead depth, plus
//! llama.cpp's own loading (mmap and O_DIRECT) as baselines, all run as
//! `hypura run ... --json` with the same prompt, tokens and threads.

use std::path::PathBuf;

use anyhow::{bail, Result};
use serde::Serialize;

use crate::scheduler::Mode;

/// Streaming with a lookahead, or llama.cpp loading everything.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Streaming,
    Baseline,
}

/// One configuration under test.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BenchConfig {
    /// Short stable name: `lookahead-2`, `llama.cpp-mmap`, `llama.cpp-dio`.
    pub id: String,
    /// Row label for the table and the chart.
    pub label: String,
    pub kind: Kind,
    /// Requested depth (streaming configurations).
    pub lookahead: Option<usize>,
    /// `--load-mode` passed to `run` (baselines); streaming uses run's default.
    pub load_mode: Option<String>,
    /// Arguments added to the common ones for this configuration.
    pub args: Vec<String>,
}

impl BenchConfig {
    pub fn streaming(depth: usize, ram_budget: Option<u64>, mode: Option<Mode>) -> BenchConfig {
        let mut args = Vec::new();
        if let Some(b) = ram_budget {
            args.extend(["--ram-budget".to_string(), b.to_string()]);
        }
        if let Some(m) = mode {
            args.extend(["--mode".to_string(), mode_name(m).to_string()]);
        }
        args.extend(["--lookahead".to_string(), depth.to_string()]);
        BenchConfig {
            id: format!("lookahead-{depth}"),
            label: format!("lookahead {depth}"),
            kind: Kind::Streaming,
            lookahead: Some(depth),
            load_mode: None,
            args,
        }
    }

    /// llama.cpp's own loading: every tensor resident, read by mmap (`auto`) or O_DIRECT (`dio`).
    pub fn baseline(load_mode: &str) -> BenchConfig {
        let name = if load_mode == "auto" {
            "mmap"
        } else {
            load_mode
        };
        BenchConfig {
            id: format!("llama.cpp-{name}"),
            label: format!("llama.cpp {name}"),
            kind: Kind::Baseline,
            lookahead: None,
            load_mode: Some(load_mode.to_string()),
            args: ["--mode", "resident", "--load-mode", load_mode]
                .map(String::from)
                .to_vec(),
        }
    }
}

pub fn mode_name(m: Mode) -> &'static str {
    m.label()
}

/// Parses `0,1,2,4,8`: non-negative integers, at least one; sorted, duplicates dropped.
pub fn parse_depths(s: &str) -> Result<Vec<usize>> {
    let mut out = Vec::new();
    for part in s.split(',') {
        let p = part.trim();
        if p.is_empty() {
            if s.trim().is_empty() {
                bail!("--lookahead needs at least one depth, e.g. --lookahead 0,1,2,4,8");
            }
            bail!("--lookahead {s:?} has an empty entry; give depths like 0,1,2,4,8");
        }
        if p.starts_with('-') && p[1..].parse::<u64>().is_ok() {
            bail!("--lookahead depth {p} is negative; depths are 0 or more");
        }
        match p.parse::<usize>() {
            Ok(d) if d <= 1024 => out.push(d),
            Ok(d) => bail!("--lookahead depth {d} is too large (at most 1024)"),
            Err(_) => {
                bail!("--lookahead depth {p:?} is not a whole number; give depths like 0,1,2,4,8")
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// What every run shares.
#[derive(Clone, Debug, Serialize)]
pub struct RunSettings {
    pub model: PathBuf,
    /// Tokens asked for; `prompt` is built to tokenize to about this many.
    pub prompt_tokens: usize,
    pub prompt: String,
    pub gen_tokens: usize,
    /// Sampling temperature and seed of every run.
    pub temp: f32,
    pub seed: u32,
    pub threads: usize,
    pub ctx: u32,
    pub no_repack: bool,
    /// `--ram-budget` for the streaming configurations (none: run's default).
    pub ram_budget_bytes: Option<u64>,
    pub mode: Option<Mode>,
    pub io_backend: Option<String>,
}

impl RunSettings {
    /// The full argument list of `hypura run` for `config`.
    pub fn args(&self, config: &BenchConfig) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "run".into(),
            self.model.to_string_lossy().into_owned(),
            "--prompt".into(),
            self.prompt.clone(),
            "--temp".into(),
            self.temp.to_string(),
            "--seed".into(),
            self.seed.to_string(),
            "--max-tokens".into(),
            self.gen_tokens.to_string(),
            "--threads".into(),
            self.threads.to_string(),
            "--ctx".into(),
            self.ctx.to_string(),
            "--json".into(),
        ];
        if self.no_repack {
            a.push("--no-repack".into());
        }
        if let (Some(b), Kind::Streaming) = (&self.io_backend, config.kind) {
            a.extend(["--io-backend".to_string(), b.clone()]);
        }
        a.extend(config.args.iter().cloned());
        a
    }
}

/// A deterministic prompt of `words` single-letter words (`a b c ... z a b ...`):
/// one token each in SentencePiece and byte-level BPE vocabularies.
pub fn synthetic_prompt(words: usize) -> String {
    let mut s = String::with_capacity(words * 2);
    for i in 0..words.max(1) {
        if i > 0 {
            s.push(' ');
        }
        s.push(char::from(b'a' + (i % 26) as u8));
    }
    s
}

/// Context for the runs: the prompt, the generated tokens and a margin, in steps of 256.
pub fn context_for(prompt_tokens: usize, gen_tokens: usize) -> u32 {
    let need = prompt_tokens + gen_tokens + 16;
    need.div_ceil(256)
        .saturating_mul(256)
        .min(u32::MAX as usize) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depths_parse_sort_and_reject_bad_input() {
        assert_eq!(parse_depths("8,0, 2,2,1").unwrap(), vec![0, 1, 2, 8]);
        assert_eq!(parse_depths("3").unwrap(), vec![3]);
        for bad in ["", " ", "1,,2", "-1", "0,-2", "1.5", "x", "99999"] {
            let e = parse_depths(bad).unwrap_err().to_string();
            assert!(e.starts_with("--lookahead"), "{bad:?}: {e}");
        }
        assert!(parse_depths("-1")
            .unwrap_err()
            .to_string()
            .contains("negative"));
    }

    #[test]
    fn prompt_and_context() {
        assert_eq!(synthetic_prompt(3), "a b c");
        assert_eq!(synthetic_prompt(28).split(' ').nth(27), Some("b"));
        assert_eq!(context_for(16, 8), 256);
        assert_eq!(context_for(500, 8), 768);
    }

    #[test]
    fn args_per_config() {
        let s = RunSettings {
            model: "m.gguf".into(),
            prompt_tokens: 4,
            prompt: "a b c d".into(),
            gen_tokens: 8,
            temp: 0.7,
            seed: 3,
            threads: 2,
            ctx: 256,
            no_repack: false,
            ram_budget_bytes: Some(1 << 20),
            mode: None,
            io_backend: None,
        };
        let c = BenchConfig::streaming(2, s.ram_budget_bytes, None);
        let a = s.args(&c).join(" ");
        assert!(
            a.starts_with("run m.gguf --prompt a b c d --temp 0.7 --seed 3 "),
            "{a}"
        );
        assert!(
            a.ends_with("--json --ram-budget 1048576 --lookahead 2"),
            "{a}"
        );
        let b = BenchConfig::baseline("dio");
        assert_eq!(b.id, "llama.cpp-dio");
        assert!(s
            .args(&b)
            .join(" ")
            .ends_with("--mode resident --load-mode dio"));
        assert_eq!(BenchConfig::baseline("auto").label, "llama.cpp mmap");
    }
}
