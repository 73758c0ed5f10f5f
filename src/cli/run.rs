//! `hypura run`: generate text from a prompt, or chat (`--interactive`).

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use indicatif::{ProgressBar, ProgressStyle};

use crate::engine::generate::{generate, GenRequest, GenStats};
use crate::engine::logits::LogitsWriter;
use crate::engine::sampler::Sampler;
use crate::engine::{Context, ContextOptions, LoadMode, LoadOptions, Model};
use crate::gguf::GgufFile;

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
    /// Chat template for --interactive when the model has none: a name
    /// llama.cpp knows (chatml, llama3, gemma, phi3, ...) or a Jinja-like string.
    #[arg(long, requires = "interactive")]
    pub chat_template: Option<String>,
    /// Tokens to generate (per chat turn with --interactive).
    #[arg(short = 'n', long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.8)]
    pub temp: f32,
    /// Sampling seed (default: from the clock).
    #[arg(long)]
    pub seed: Option<u64>,
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
}

/// Threads to use when the user does not say: the CPUs this process may run on.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

pub fn run(args: RunArgs) -> Result<()> {
    if args.prompt.is_none() && !args.interactive {
        bail!("give a prompt with --prompt TEXT, or chat with --interactive");
    }
    if args.max_tokens == 0 {
        bail!("--max-tokens must be at least 1");
    }
    if !(args.temp >= 0.0) || !args.temp.is_finite() {
        bail!("--temp must be a finite number >= 0 (got {})", args.temp);
    }
    if args.batch == 0 {
        bail!("--batch must be at least 1");
    }
    let threads = args.threads.unwrap_or_else(default_threads);
    if threads == 0 {
        bail!("--threads must be at least 1");
    }
    // Our own parser validates the file first: its errors are precise, and
    // llama.cpp is never handed a malformed file.
    let gguf = GgufFile::open(&args.model)?;
    tracing::info!(arch = ?gguf.architecture(), tensors = gguf.tensors.len(), "model validated");

    let t_load = Instant::now();
    let model = load_with_progress(&args.model, args.load_mode, !args.no_repack)?;
    let load_secs = t_load.elapsed().as_secs_f64();

    let n_ctx = args.ctx.unwrap_or_else(|| 4096.min(model.n_ctx_train().max(1)));
    if n_ctx == 0 {
        bail!("--ctx must be at least 1");
    }
    let mut ctx = Context::new(
        &model,
        ContextOptions { n_ctx, n_batch: args.batch, n_threads: threads as i32, ..ContextOptions::default() },
    )?;
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
    });
    let mut sampler = Sampler::new(args.temp, seed);
    let mut logits_out = match &args.logits_out {
        Some(p) => Some(LogitsWriter::create(p, model.n_vocab())?),
        None => None,
    };

    let stats = if args.interactive {
        chat(&model, gguf.architecture().unwrap_or(""), &mut ctx, &mut sampler, &args, logits_out.as_mut())?
    } else {
        let prompt = args.prompt.as_deref().unwrap_or_default();
        let tokens = model.tokenize(prompt, true, false)?;
        if tokens.is_empty() {
            bail!("the prompt tokenizes to nothing");
        }
        let mut stdout = std::io::stdout().lock();
        let (_, stats) = generate(
            &mut ctx,
            &mut sampler,
            GenRequest { prompt: &tokens, max_tokens: args.max_tokens, decode_last: false },
            &mut |s| {
                stdout.write_all(s.as_bytes())?;
                stdout.flush()?;
                Ok(())
            },
            logits_out.as_mut(),
        )?;
        writeln!(stdout)?;
        stats
    };
    if let Some(w) = logits_out {
        w.finish()?;
    }
    eprintln!(
        "load: {:.2} s | prompt: {} tokens, {:.1} tok/s | generation: {} tokens, {:.2} tok/s | threads: {}",
        load_secs,
        stats.prompt_tokens,
        stats.prompt_tps(),
        stats.gen_tokens,
        stats.gen_tps(),
        threads
    );
    Ok(())
}

/// Loads a model with an indicatif progress bar (drawn only on a terminal).
pub fn load_with_progress(path: &Path, load_mode: LoadMode, repack: bool) -> Result<Model> {
    let bar = ProgressBar::new(1000);
    bar.set_style(
        ProgressStyle::with_template("loading {bar:40.cyan/blue} {percent:>3}% {elapsed}").unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut progress = |p: f32| bar.set_position((p.clamp(0.0, 1.0) * 1000.0) as u64);
    let model = Model::load(path, LoadOptions { load_mode, repack, buft_overrides: &[], progress: Some(&mut progress) });
    bar.finish_and_clear();
    model
}

/// Interactive chat: the template formats the whole conversation; only the
/// part not yet in the KV cache is prefilled each turn.
fn chat(
    model: &Model,
    arch: &str,
    ctx: &mut Context<'_>,
    sampler: &mut Sampler,
    args: &RunArgs,
    mut logits_out: Option<&mut LogitsWriter>,
) -> Result<GenStats> {
    let template = pick_chat_template(model, args.chat_template.as_deref(), arch)?;
    let mut messages: Vec<(String, String)> = Vec::new();
    if let Some(sys) = &args.system {
        messages.push(("system".into(), sys.clone()));
    }
    let mut prev_len = 0usize; // formatted conversation already in the cache
    let mut total = GenStats::default();
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
        messages.push(("user".into(), line.to_string()));
        let formatted = model.apply_chat_template(&template, &messages, true)?;
        let new_part = formatted.get(prev_len..).unwrap_or(&formatted);
        let tokens = model.tokenize(new_part, ctx.n_past() == 0, true)?;
        let (reply, stats) = generate(
            ctx,
            sampler,
            GenRequest { prompt: &tokens, max_tokens: args.max_tokens, decode_last: true },
            &mut |s| {
                stdout.write_all(s.as_bytes())?;
                stdout.flush()?;
                Ok(())
            },
            logits_out.as_deref_mut(),
        )?;
        writeln!(stdout)?;
        total.add(&stats);
        let mut text = Vec::new();
        for t in &reply {
            model.token_bytes(*t, &mut text);
        }
        messages.push(("assistant".into(), String::from_utf8_lossy(&text).into_owned()));
        prev_len = model.apply_chat_template(&template, &messages, false)?.len();
    }
    Ok(total)
}

/// The template to chat with: the user's, else the model's own, else the
/// built-in template llama.cpp has for the architecture's family.
fn pick_chat_template(model: &Model, user: Option<&str>, arch: &str) -> Result<String> {
    let probe = [("user".to_string(), "hi".to_string())];
    if let Some(t) = user {
        model
            .apply_chat_template(t, &probe, true)
            .with_context(|| format!("--chat-template {t:?} is not a template llama.cpp supports"))?;
        return Ok(t.to_string());
    }
    if let Some(t) = model.chat_template() {
        return Ok(t);
    }
    // The family is the architecture without its version digits (gemma3 -> gemma).
    let family = arch.trim_end_matches(|c: char| c.is_ascii_digit());
    for cand in [arch, family, "chatml"] {
        if !cand.is_empty() && model.apply_chat_template(cand, &probe, true).is_ok() {
            tracing::warn!("the model has no chat template; using llama.cpp's built-in '{cand}' template");
            return Ok(cand.to_string());
        }
    }
    bail!("this model has no chat template; pass --chat-template NAME or use --prompt")
}
