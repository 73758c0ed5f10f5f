//! `hypura bench`: sweep lookahead depths (and llama.cpp's own loading with
//! `--baseline`), report medians as a Markdown table, write JSON and a PNG chart.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};

use crate::bench::{self, config::parse_depths, BenchOptions};
use crate::gguf::GgufFile;
use crate::scheduler::{format_bytes, parse_size_arg, Mode};

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// The GGUF model file.
    pub model: PathBuf,
    /// Lookahead depths to compare, comma-separated.
    #[arg(
        long,
        default_value = "0,1,2,4,8",
        allow_hyphen_values = true,
        value_name = "LIST"
    )]
    pub lookahead: String,
    /// Also run llama.cpp's own loading (every tensor resident): mmap and --load-mode dio.
    #[arg(long)]
    pub baseline: bool,
    /// Sampling temperature of every run (0: greedy). With a synthetic
    /// MoE made with `gen --routing`, > 0 gives diverse routing.
    #[arg(long, default_value_t = 0.0, value_name = "T")]
    pub temp: f32,
    /// Sampling seed of every run.
    #[arg(long, default_value_t = 0, value_name = "S")]
    pub seed: u32,
    /// Prompt length in tokens (a fixed synthetic prompt).
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub prompt_tokens: usize,
    /// Tokens to generate per run.
    #[arg(long, default_value_t = 32, value_name = "N")]
    pub gen_tokens: usize,
    /// Recorded rounds; each runs every configuration once.
    #[arg(long, default_value_t = 3, value_name = "R")]
    pub repeat: usize,
    /// Unrecorded warm-up rounds before them.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub warmup: usize,
    /// RAM budget of the streaming runs, e.g. 256M (default: run's default).
    #[arg(long, value_parser = parse_size_arg, value_name = "SIZE")]
    pub ram_budget: Option<u64>,
    /// Compute threads, the same for every run (default: all usable cores).
    #[arg(short, long)]
    pub threads: Option<usize>,
    /// Force the streaming runs' placement mode (default: chosen by the plan).
    #[arg(long, value_enum, conflicts_with = "modes")]
    pub mode: Option<Mode>,
    /// Compare placement modes, comma-separated (e.g. gpu-experts,experts:
    /// streaming into the GPU against the CPU shape), each at every depth.
    #[arg(long, value_delimiter = ',', value_enum, value_name = "LIST")]
    pub modes: Vec<Mode>,
    /// GPU budget of the streaming runs, e.g. 6G (default: run's default).
    #[arg(long, value_parser = parse_size_arg, value_name = "SIZE")]
    pub gpu_budget: Option<u64>,
    /// GPU device of the streaming runs, by ggml name (default: the first GPU).
    #[arg(long, value_name = "NAME")]
    pub gpu_device: Option<String>,
    /// ggml RPC servers for every run (HOST:PORT,...; see `run --rpc`).
    #[arg(long, value_name = "HOST:PORT,...")]
    pub rpc: Option<String>,
    /// Layer shares with --rpc (this machine first).
    #[arg(long, value_name = "L,R1,...", requires = "rpc")]
    pub tensor_split: Option<String>,
    /// Turn off ggml's CPU weight repacking in every run.
    #[arg(long)]
    pub no_repack: bool,
    /// I/O backend of the streaming runs (auto, uring, pread).
    #[arg(long, value_name = "BACKEND")]
    pub io_backend: Option<String>,
    /// Stop a run that takes longer than this many seconds (recorded as failed).
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
    /// Print the JSON document on stdout instead of the Markdown table.
    #[arg(long)]
    pub json: bool,
    /// Directory for the JSON file and the PNG chart.
    #[arg(long, default_value = "bench-out", value_name = "DIR")]
    pub out: PathBuf,
    /// Save the best lookahead for this model and machine to the settings file `run` reads.
    #[arg(long)]
    pub save: bool,
}

/// Most recorded (or warm-up) rounds.
const MAX_ROUNDS: usize = 10_000;
/// Longest synthetic prompt, in tokens.
const MAX_PROMPT_TOKENS: usize = 32_768;
/// Most tokens generated per run.
const MAX_GEN_TOKENS: usize = 1 << 20;

pub fn run(args: BenchArgs) -> Result<()> {
    let depths = parse_depths(&args.lookahead)?;
    // Counts are bounded so that no arithmetic on them overflows; the prompt
    // goes to each run on its command line (2 bytes a token, and Linux takes
    // at most 128 KiB in one argument).
    let bounded = |flag: &str, v: usize, max: usize| {
        if v == 0 {
            bail!("--{flag} must be at least 1");
        }
        if v > max {
            bail!("--{flag} {v} is too large (at most {max})");
        }
        Ok(())
    };
    bounded("repeat", args.repeat, MAX_ROUNDS)?;
    bounded("prompt-tokens", args.prompt_tokens, MAX_PROMPT_TOKENS)?;
    bounded("gen-tokens", args.gen_tokens, MAX_GEN_TOKENS)?;
    if args.warmup > MAX_ROUNDS {
        bail!(
            "--warmup {} is too large (at most {MAX_ROUNDS})",
            args.warmup
        );
    }
    if args.ram_budget == Some(0) {
        bail!("--ram-budget must be more than 0");
    }
    if !args.temp.is_finite() || args.temp < 0.0 {
        bail!("--temp must be a number ≥ 0 (0 is greedy)");
    }
    if args.timeout == Some(0) {
        bail!("--timeout must be at least 1 second");
    }
    if let Some(b) = &args.io_backend {
        b.parse::<crate::io::Backend>()
            .map_err(|e| anyhow::anyhow!("--io-backend {b:?}: {e}"))?;
    }
    let threads = args
        .threads
        .unwrap_or_else(crate::cli::run::default_threads);
    if threads == 0 {
        bail!("--threads must be at least 1");
    }
    let gguf = GgufFile::open(&args.model)?;
    if let (true, Some(budget), Some(usable)) =
        (args.baseline, args.ram_budget, bench::usable_memory_bytes())
    {
        if budget > usable {
            bail!(
                "--ram-budget {} is more than the memory available ({}): the streaming runs could not keep to it \
                 and the comparison with the llama.cpp baseline would mean nothing; give a budget under {}",
                format_bytes(budget),
                format_bytes(usable),
                format_bytes(usable)
            );
        }
    }
    // Fail now rather than after the runs.
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create --out {}", args.out.display()))?;
    let exe = std::env::current_exe().context("cannot find the hypura binary to run")?;
    let profile = bench::machine_profile(&args.model);
    let opts = BenchOptions {
        model: args.model.clone(),
        depths,
        baseline: args.baseline,
        prompt_tokens: args.prompt_tokens,
        gen_tokens: args.gen_tokens,
        temp: args.temp,
        seed: args.seed,
        repeat: args.repeat,
        warmup: args.warmup,
        ram_budget: args.ram_budget,
        threads,
        mode: args.mode,
        modes: args.modes.clone(),
        gpu_budget: args.gpu_budget,
        gpu_device: args.gpu_device.clone(),
        rpc: args.rpc.clone().map(|r| (r, args.tensor_split.clone())),
        no_repack: args.no_repack,
        io_backend: args.io_backend.clone(),
        timeout: args.timeout.map(Duration::from_secs),
        out_dir: args.out.clone(),
        command: std::env::args().collect(),
        exe,
    };
    bench::runner::install_interrupt_handler()?;
    let out = bench::run(&opts, &gguf, profile)?;
    let doc = &out.doc;

    let mut stdout = std::io::stdout().lock();
    if args.json {
        writeln!(stdout, "{}", serde_json::to_string_pretty(doc)?)?;
    } else {
        write!(stdout, "{}", bench::report::markdown(doc))?;
    }
    stdout.flush()?;
    eprintln!("bench: results in {}", out.json_path.display());
    if let Some(p) = &out.chart_path {
        eprintln!("bench: chart in {}", p.display());
    }

    let recorded = doc.runs.iter().filter(|r| !r.warmup).count();
    if doc.interrupted {
        bail!(
            "interrupted: {} runs kept ({recorded} recorded) in {}",
            doc.runs.len(),
            out.json_path.display()
        );
    }
    if doc.runs.iter().all(|r| !r.ok) {
        let first = doc
            .runs
            .iter()
            .find_map(|r| r.error.clone())
            .unwrap_or_default();
        bail!("every run failed: {first}");
    }
    if args.save {
        match doc.best_lookahead {
            Some(d) => {
                let path = crate::config::save_lookahead(&args.model, d)?;
                eprintln!("bench: saved lookahead {d} for {} to {}", args.model.display(), path.display());
            }
            None => bail!("nothing to save: no lookahead configuration streamed (lower --ram-budget so the model streams)"),
        }
    }
    Ok(())
}
