//! `hypura run`: generate text from a prompt, or chat (`--interactive`),
//! through an engine [`Session`].

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use indicatif::{ProgressBar, ProgressStyle};

use crate::engine::chat::ChatMessage;
use crate::engine::generate::GenStats;
use crate::engine::logits::LogitsWriter;
use crate::engine::placement::PlacementArgs;
use crate::engine::sampling::SamplingParams;
use crate::engine::session::add_metrics;
use crate::engine::stream::StreamMetrics;
use crate::engine::{GenerateRequest, LoadMode, Session, SessionOptions};

/// Sampling settings (llama.cpp's sampler chain; defaults as its CLI).
#[derive(clap::Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.8)]
    pub temp: f32,
    /// Keep the K most likely tokens (0: all; 1: greedy).
    #[arg(long, default_value_t = 40)]
    pub top_k: i32,
    /// Nucleus sampling: the smallest set of tokens whose probability reaches P (1: off).
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    /// Drop tokens less likely than P times the most likely one (0: off).
    #[arg(long, default_value_t = 0.05)]
    pub min_p: f32,
    /// Locally typical sampling (1: off).
    #[arg(long, default_value_t = 1.0)]
    pub typical_p: f32,
    /// Penalise repeating any of the last --repeat-last-n tokens (1: off).
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    /// Tokens the penalties look back over (0: off, -1: the whole context).
    #[arg(long, default_value_t = 64, allow_hyphen_values = true)]
    pub repeat_last_n: i32,
    /// Penalty for a token that appeared at all (0: off).
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    pub presence_penalty: f32,
    /// Penalty growing with how often a token appeared (0: off).
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
    pub frequency_penalty: f32,
    /// Sampling seed, 0 to 4294967295 (default: from the clock).
    #[arg(long)]
    pub seed: Option<u32>,
    /// A GBNF grammar file (root rule `root`) the output must follow.
    #[arg(long, value_name = "FILE")]
    pub grammar_file: Option<PathBuf>,
}

impl SamplingArgs {
    /// The engine's sampling settings (the grammar file read, the seed chosen).
    pub fn params(&self) -> Result<SamplingParams> {
        let grammar = match &self.grammar_file {
            Some(p) => Some(
                std::fs::read_to_string(p)
                    .with_context(|| format!("{}: cannot read the grammar file", p.display()))?,
            ),
            None => None,
        };
        let seed = self.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos() ^ d.as_secs() as u32)
                .unwrap_or(0)
        });
        let p = SamplingParams {
            temp: self.temp,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            typical_p: self.typical_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            seed,
            grammar,
        };
        p.validate()
            .map_err(|e| anyhow::anyhow!("--{}", e.to_string().replacen('_', "-", 1)))?;
        Ok(p)
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// The GGUF model file.
    pub model: PathBuf,
    /// Prompt to complete (plain text, no chat template).
    #[arg(short, long, conflicts_with = "interactive")]
    pub prompt: Option<String>,
    /// Chat with the model using its chat template; Ctrl-D or /exit to leave.
    #[arg(short, long)]
    pub interactive: bool,
    /// System message for --interactive.
    #[arg(long, requires = "interactive")]
    pub system: Option<String>,
    /// Chat template for --interactive instead of the model's own: a name
    /// llama.cpp knows (chatml, llama3, gemma, phi3, ...) or Jinja source.
    #[arg(long, requires = "interactive")]
    pub chat_template: Option<String>,
    /// Tokens to generate (per chat turn with --interactive).
    #[arg(short = 'n', long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Print, for each chat turn, the exact text fed to the model (after the
    /// template, before tokenization) to stderr.
    #[arg(long, requires = "interactive")]
    pub verbose_prompt: bool,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Compute threads (default: all cores this process may use).
    #[arg(short, long)]
    pub threads: Option<usize>,
    /// Context size in tokens (default: min(4096, the model's training context)).
    #[arg(long)]
    pub ctx: Option<u32>,
    /// Prompt-processing batch size.
    #[arg(long, default_value_t = 512)]
    pub batch: u32,
    /// Write the f32 logits of every generated position to FILE.
    #[arg(long, value_name = "FILE")]
    pub logits_out: Option<PathBuf>,
    /// How llama.cpp reads the resident weights.
    #[arg(long, value_enum, default_value_t = LoadMode::Auto)]
    pub load_mode: LoadMode,
    /// Turn off ggml's CPU weight repacking (same kernels as streamed tensors).
    #[arg(long)]
    pub no_repack: bool,
    #[command(flatten)]
    pub placement: PlacementArgs,
    /// I/O backend for streaming.
    #[arg(long, default_value = "auto")]
    pub io_backend: crate::io::Backend,
    /// Print the final statistics as one JSON object on stderr.
    #[arg(long)]
    pub json: bool,
    /// Manual split of a resident model (llama.cpp's n_gpu_layers): the last
    /// N layers on the GPU, `all`, or 0 for none. By default the plan decides
    /// (everything on the GPU when it fits --gpu-budget).
    #[arg(long, value_name = "N|all", value_parser = parse_gpu_layers)]
    pub gpu_layers: Option<i32>,
    /// For comparisons: a resident run whose compute is cut into the same
    /// ranges as a dense or expert streaming run (same kernel fusion).
    #[arg(long, value_enum, hide = true)]
    pub reference_cuts: Option<crate::engine::stream::Cuts>,
    /// Write the experts the router picks, per token and layer, to FILE
    /// (expert streaming; format in src/engine/stream/trace.rs).
    #[arg(long, value_name = "FILE", hide = true)]
    pub routing_trace: Option<PathBuf>,
}

/// `--gpu-layers`: a count, or `all` (llama.cpp's -1).
fn parse_gpu_layers(s: &str) -> std::result::Result<i32, String> {
    if s.eq_ignore_ascii_case("all") {
        return Ok(-1);
    }
    s.parse::<u32>()
        .ok()
        .and_then(|n| i32::try_from(n).ok())
        .ok_or_else(|| format!("expected a number of layers or 'all', got '{s}'"))
}

/// Threads to use when the user does not say: the CPUs this process may run on.
/// Threads to use when the user does not say: the CPUs this process may run on.
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

impl RunArgs {
    /// The session these arguments ask for.
    pub fn session_options(&self) -> SessionOptions {
        SessionOptions {
            placement: self.placement.clone(),
            n_ctx: self.ctx,
            n_batch: self.batch,
            threads: self.threads.unwrap_or_else(default_threads),
            load_mode: self.load_mode,
            repack: !self.no_repack,
            io_backend: self.io_backend,
            gpu_layers: self.gpu_layers,
            reference_cuts: self.reference_cuts,
            routing_trace: self.routing_trace.clone(),
        }
    }
}

pub fn run(args: RunArgs) -> Result<()> {
    if args.prompt.is_none() && !args.interactive {
        bail!("give a prompt with --prompt TEXT, or chat with --interactive");
    }
    if args.max_tokens == 0 {
        bail!("--max-tokens must be at least 1");
    }
    let sampling = args.sampling.params()?;
    crate::engine::interrupt::install_handlers()?;
    crate::engine::interrupt::loading();
    let mut session = load_with_progress(&args.model, &args.session_options())?;
    crate::engine::interrupt::loaded();
    let mut logits_out = match &args.logits_out {
        Some(p) => Some(LogitsWriter::create(p, session.model().n_vocab())?),
        None => None,
    };
    let (stats, metrics) = if args.interactive {
        chat(&mut session, &sampling, &args, logits_out.as_mut())?
    } else {
        let prompt = args.prompt.as_deref().unwrap_or_default();
        let tokens = session.tokenize(prompt, true, false)?;
        let mut stdout = std::io::stdout().lock();
        let req = GenerateRequest {
            max_tokens: args.max_tokens,
            sampling: &sampling,
            stop: &[],
            cancel: None,
            logits_out: logits_out.as_mut(),
        };
        let g = session.generate(&tokens, req, &mut |s| {
            stdout.write_all(s.as_bytes())?;
            stdout.flush()?;
            Ok(())
        })?;
        writeln!(stdout)?;
        (g.stats, g.gen_metrics)
    };
    if let Some(w) = logits_out {
        w.finish()?;
    }
    session.flush_routing_trace()?;
    let report = session.report(&stats, metrics);
    if args.json {
        eprintln!("{}", serde_json::to_string(&report)?);
    } else {
        eprintln!("{}", report.human());
    }
    Ok(())
}

/// Loads a session with an indicatif progress bar (drawn only on a terminal).
pub fn load_with_progress(path: &Path, opts: &SessionOptions) -> Result<Session> {
    let bar = ProgressBar::new(1000);
    bar.set_style(
        ProgressStyle::with_template("loading {bar:40.cyan/blue} {percent:>3}% {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut progress = |p: f32| bar.set_position((p.clamp(0.0, 1.0) * 1000.0) as u64);
    let session = Session::load(path, opts, Some(&mut progress));
    bar.finish_and_clear();
    session
}

/// Interactive chat: the template renders the whole conversation each turn;
/// the session's prefix reuse prefills only what the KV cache lacks.
fn chat(
    session: &mut Session,
    sampling: &SamplingParams,
    args: &RunArgs,
    mut logits_out: Option<&mut LogitsWriter>,
) -> Result<(GenStats, Option<StreamMetrics>)> {
    let template = session.chat_template(args.chat_template.as_deref())?;
    tracing::info!(template = %template.describe(), "chat template");
    let mut messages: Vec<ChatMessage> = Vec::new();
    if let Some(sys) = &args.system {
        messages.push(ChatMessage::new("system", sys));
    }
    let mut total = GenStats::default();
    let mut metrics = None;
    let stdin = std::io::stdin();
    let tty = stdin.is_terminal();
    let mut lines = stdin.lock().lines();
    let mut stdout = std::io::stdout();
    loop {
        if tty {
            eprint!("> ");
        }
        let Some(line) = lines.next() else { break };
        let line = line.context("cannot read standard input")?;
        let line = line.trim_end_matches(['\r', '\n']);
        if line.trim() == "/exit" {
            break;
        }
        if line.trim().is_empty() {
            continue;
        }
        messages.push(ChatMessage::new("user", line));
        let (tokens, text) = session.chat_prompt(&template, &messages)?;
        if args.verbose_prompt {
            eprintln!("--- prompt ---\n{text}\n--- end prompt ---");
        }
        let req = GenerateRequest {
            max_tokens: args.max_tokens,
            sampling,
            stop: &[],
            cancel: None,
            logits_out: logits_out.as_deref_mut(),
        };
        let g = session.generate(&tokens, req, &mut |s| {
            stdout.write_all(s.as_bytes())?;
            stdout.flush()?;
            Ok(())
        })?;
        writeln!(stdout)?;
        tracing::info!(prompt = g.prompt_tokens, reused = g.reused_tokens, "turn");
        total.add(&g.stats);
        metrics = add_metrics(metrics, g.gen_metrics);
        messages.push(ChatMessage::new("assistant", &g.text));
        if crate::engine::interrupt::requested() {
            break;
        }
    }
    Ok((total, metrics))
}
