//! `hypura run`: generate text from a prompt, or chat (`--interactive`).

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use indicatif::{ProgressBar, ProgressStyle};

use crate::engine::device::Device;
use crate::engine::generate::{generate, GenRequest, GenStats};
use crate::engine::logits::LogitsWriter;
use crate::engine::placement::{plan_for_machine, PlacementArgs};
use crate::engine::sampler::Sampler;
use crate::engine::stream::{StreamMetrics, Streamer};
use crate::engine::stream_buft::StreamBufferType;
use crate::engine::{Context, ContextOptions, LoadMode, LoadOptions, Model};
use crate::gguf::GgufFile;
use crate::report::RunReport;
use crate::scheduler::{Mode, Plan};

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
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

pub fn run(args: RunArgs) -> Result<()> {
    if args.prompt.is_none() && !args.interactive {
        bail!("give a prompt with --prompt TEXT, or chat with --interactive");
    }
    if args.max_tokens == 0 {
        bail!("--max-tokens must be at least 1");
    }
    if args.temp.is_nan() || args.temp < 0.0 || !args.temp.is_finite() {
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

    let n_ctx = args
        .ctx
        .unwrap_or_else(|| crate::scheduler::default_ctx(&gguf));
    if n_ctx == 0 {
        bail!("--ctx must be at least 1");
    }
    let plan = plan_for_machine(&gguf, &args.placement, n_ctx)?;
    tracing::info!(mode = ?plan.mode, streamed = plan.streamed.len(), lookahead = plan.lookahead, gpu = plan.gpu.is_some(), "plan");
    if args.gpu_layers.is_some() && plan.mode != Mode::Resident {
        bail!(
            "--gpu-layers splits a resident model by hand, but the plan streams ({}): drop --gpu-layers (the plan places layers on the GPU by --gpu-budget), or pass --mode resident",
            plan.mode.label()
        );
    }
    // The device the GPU plan is for (found again: the plan keeps its name).
    let gpu_dev = match &plan.gpu {
        Some(_) => {
            let dev =
                Device::find(args.placement.gpu_device.as_deref())?.context("the GPU went away")?;
            let upload = dev.upload_path(args.placement.gpu_upload)?;
            Some((dev, upload))
        }
        None => None,
    };
    let n_gpu_layers = match (&plan.gpu, args.gpu_layers) {
        (_, Some(n)) => n,
        (Some(_), None) => -1,
        (None, None) => 0,
    };

    // Drop order matters: context, then streamer, then model, then buffer type.
    let t_load = Instant::now();
    let io_before = storage_read_bytes();
    let buft = StreamBufferType::new_host()?;
    let model = load_model(&args, &plan, &buft, n_gpu_layers)?;
    let streaming = plan.mode != Mode::Resident && !plan.streamed.is_empty();
    let mut streamer = match streaming {
        false => None,
        true => {
            buft.restore_names()?;
            let io = crate::io::IoOptions {
                backend: args.io_backend,
                ..crate::io::IoOptions::default()
            };
            let reader = crate::io::open_reader(&args.model, &io)
                .with_context(|| format!("{}: cannot open for streaming", args.model.display()))?;
            Some(Streamer::new(&plan, &buft, reader, gpu_dev)?)
        }
    };
    let load_secs = t_load.elapsed().as_secs_f64();
    let load_read_bytes = storage_read_bytes()
        .zip(io_before)
        .map(|(a, b)| a.saturating_sub(b));

    let mut copts = ContextOptions {
        n_ctx,
        n_batch: args.batch,
        n_threads: threads as i32,
        ..ContextOptions::default()
    };
    if n_gpu_layers != 0 {
        copts.cpu_poll = Some(0);
        // Weights in host memory must not be copied to the GPU behind the
        // streaming engine's back (see ContextOptions::op_offload).
        copts.op_offload = !streaming;
    }
    if let Some(st) = streamer.as_mut() {
        st.hook(&mut copts);
    } else if let Some(c) = args.reference_cuts {
        (copts.eval_callback, copts.eval_user_data) = crate::engine::stream::cuts_callback(c);
    }
    let mut ctx = Context::new(&model, copts)?;
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    });
    let mut sampler = Sampler::new(args.temp, seed);
    let mut logits_out = match &args.logits_out {
        Some(p) => Some(LogitsWriter::create(p, model.n_vocab())?),
        None => None,
    };

    let mut at_prefill = StreamMetrics::default();
    let result = if args.interactive {
        chat(
            &model,
            gguf.architecture().unwrap_or(""),
            &mut ctx,
            &mut sampler,
            &args,
            logits_out.as_mut(),
        )
    } else {
        let prompt = args.prompt.as_deref().unwrap_or_default();
        let tokens = model.tokenize(prompt, true, false)?;
        if tokens.is_empty() {
            bail!("the prompt tokenizes to nothing");
        }
        let mut stdout = std::io::stdout().lock();
        let st = streamer.as_deref();
        let mut on_prefill = || at_prefill = st.map(Streamer::metrics).unwrap_or_default();
        generate(
            &mut ctx,
            &mut sampler,
            GenRequest {
                prompt: &tokens,
                max_tokens: args.max_tokens,
                decode_last: false,
                on_prefill: Some(&mut on_prefill),
            },
            &mut |s| {
                stdout.write_all(s.as_bytes())?;
                stdout.flush()?;
                Ok(())
            },
            logits_out.as_mut(),
        )
        .and_then(|(_, stats)| {
            writeln!(stdout)?;
            Ok(stats)
        })
    };
    // A streaming I/O error aborts the decode; report the cause, not "aborted".
    let stats = match (result, streamer.as_mut().and_then(|s| s.take_error())) {
        (_, Some(io_err)) => bail!("streaming failed: {io_err}"),
        (r, None) => r?,
    };
    if let Some(w) = logits_out {
        w.finish()?;
    }
    let gen_metrics = streamer.as_deref().map(|s| s.metrics().since(&at_prefill));
    let mut report = new_report(
        &plan,
        load_secs,
        threads,
        &stats,
        gen_metrics,
        streamer.as_deref(),
    );
    report.load_read_bytes = load_read_bytes;
    report.gpu_layers = n_gpu_layers;
    if args.json {
        eprintln!("{}", serde_json::to_string(&report)?);
    } else {
        eprintln!("{}", report.human());
    }
    Ok(())
}

/// Loads the model: resident tensors through llama.cpp, streamed tensors
/// routed into Hypura's buffer type with their names hidden so the loader
/// never reads them (only resident bytes are read at start-up).
fn load_model(
    args: &RunArgs,
    plan: &Plan,
    buft: &StreamBufferType,
    n_gpu_layers: i32,
) -> Result<Model> {
    let mut overrides: Vec<(String, hypura_sys::ggml_backend_buffer_type_t)> =
        override_patterns(plan)
            .into_iter()
            .map(|p| (p, buft.as_raw()))
            .collect();
    // The CPU shape with a GPU: resident FFN layers stay in RAM, computed on
    // the CPU (the rest of their layer is on the GPU).
    if plan.gpu.is_some() && plan.mode == Mode::Dense && !plan.pinned_layers.is_empty() {
        let layers: Vec<String> = plan.pinned_layers.iter().map(u32::to_string).collect();
        overrides.push((
            format!(
                "^blk\\.(?:{})\\.ffn_(?:gate|up|down)\\.weight$",
                layers.join("|")
            ),
            Device::cpu_buft()?,
        ));
    }
    let load_mode = match (plan.mode, args.load_mode) {
        (Mode::Resident, m) => m,
        // mmap would populate the whole file, streamed tensors included.
        (_, LoadMode::Auto) => LoadMode::Dio,
        (_, m) => m,
    };
    buft.set_hide_names(plan.mode != Mode::Resident);
    load_with_progress(
        &args.model,
        load_mode,
        !args.no_repack,
        &overrides,
        n_gpu_layers,
    )
}

/// Regexes that route the plan's streamed tensors into the buffer type: one
/// per distinct set of tensor suffixes, naming its layers.
fn override_patterns(plan: &Plan) -> Vec<String> {
    use std::collections::BTreeMap;
    let mut by_layer: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for t in &plan.streamed {
        let prefix = format!("blk.{}.", t.layer);
        let suffix = t.name.strip_prefix(&prefix).unwrap_or(&t.name).to_string();
        by_layer.entry(t.layer).or_default().push(suffix);
    }
    let mut groups: BTreeMap<Vec<String>, Vec<u32>> = BTreeMap::new();
    for (layer, mut suffixes) in by_layer {
        suffixes.sort();
        groups.entry(suffixes).or_default().push(layer);
    }
    let esc = |s: &str| s.replace('.', "\\.");
    groups
        .into_iter()
        .map(|(suffixes, layers)| {
            let layers: Vec<String> = layers.iter().map(u32::to_string).collect();
            let suffixes: Vec<String> = suffixes.iter().map(|s| esc(s)).collect();
            format!(
                "^blk\\.(?:{})\\.(?:{})$",
                layers.join("|"),
                suffixes.join("|")
            )
        })
        .collect()
}

/// The report of a finished run.
fn new_report(
    plan: &Plan,
    load_secs: f64,
    threads: usize,
    stats: &GenStats,
    m: Option<StreamMetrics>,
    st: Option<&Streamer>,
) -> RunReport {
    let per_tok = stats.gen_decodes.max(1) as f64;
    let streaming = m.filter(|_| stats.gen_decodes > 0);
    RunReport {
        mode: plan.mode,
        threads,
        load_secs,
        prompt_tokens: stats.prompt_tokens,
        prompt_tps: stats.prompt_tps(),
        gen_tokens: stats.gen_tokens,
        gen_tps: stats.gen_tps(),
        decode_ms_per_token: stats.gen_decode_secs * 1e3 / per_tok,
        ram_budget_bytes: plan.ram_budget,
        resident_bytes: plan.resident_bytes,
        streamed_bytes: plan.streamed_bytes,
        pool_bytes: plan.pool_bytes,
        lookahead: plan.lookahead,
        pinned_layers: plan.pinned_layers.len(),
        streamed_layers: plan.streamed_layers.len(),
        read_bytes_per_token: streaming.map(|m| m.bytes_read as f64 / per_tok),
        stall_ms_per_token: streaming.map(|m| m.stall_ns as f64 / 1e6 / per_tok),
        expert_hit_rate: streaming.and_then(|m| m.hit_rate()),
        disk_gbps: streaming
            .filter(|_| stats.gen_secs > 0.0)
            .map(|m| m.bytes_read as f64 / 1e9 / stats.gen_secs),
        io_backend: st.map(|s| s.reader_info().backend.to_string()),
        predicted_tps: plan.predicted_tps,
        ceiling_tps: plan.ceiling_tps,
        peak_rss_bytes: peak_rss_bytes(),
        load_read_bytes: None,
        gpu_layers: 0,
        gpu_device: plan.gpu.as_ref().map(|g| g.device.clone()),
        gpu_resident_bytes: plan.gpu.as_ref().map(|g| g.resident_bytes),
        gpu_pool_bytes: plan.gpu.as_ref().map(|g| g.pool_bytes),
        upload_bytes_per_token: streaming
            .filter(|_| plan.mode.on_gpu())
            .map(|m| m.upload_bytes as f64 / per_tok),
        gpu_expert_hits_per_token: streaming
            .filter(|_| plan.mode == Mode::GpuExperts)
            .map(|m| m.gpu_hits as f64 / per_tok),
    }
}

/// Bytes this process has read from storage (`read_bytes` of /proc/self/io).
fn storage_read_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/io").ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("read_bytes:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Peak resident set size of this process (getrusage).
pub fn peak_rss_bytes() -> u64 {
    nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)
        .map(|u| u.max_rss().max(0) as u64 * 1024)
        .unwrap_or(0)
}

/// Loads a model with an indicatif progress bar (drawn only on a terminal).
pub fn load_with_progress(
    path: &Path,
    load_mode: LoadMode,
    repack: bool,
    buft_overrides: &[(String, hypura_sys::ggml_backend_buffer_type_t)],
    n_gpu_layers: i32,
) -> Result<Model> {
    let bar = ProgressBar::new(1000);
    bar.set_style(
        ProgressStyle::with_template("loading {bar:40.cyan/blue} {percent:>3}% {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut progress = |p: f32| bar.set_position((p.clamp(0.0, 1.0) * 1000.0) as u64);
    let model = Model::load(
        path,
        LoadOptions {
            load_mode,
            repack,
            buft_overrides,
            progress: Some(&mut progress),
            n_gpu_layers,
        },
    );
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
            GenRequest {
                prompt: &tokens,
                max_tokens: args.max_tokens,
                decode_last: true,
                on_prefill: None,
            },
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
        messages.push((
            "assistant".into(),
            String::from_utf8_lossy(&text).into_owned(),
        ));
        prev_len = model
            .apply_chat_template(&template, &messages, false)?
            .len();
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
            .with_context(|| {
                format!("--chat-template {t:?} is not a template llama.cpp supports")
            })?;
        return Ok(t.to_string());
    }
    if let Some(t) = model.chat_template() {
        return Ok(t);
    }
    // The family is the architecture without its version digits (gemma3 -> gemma).
    let family = arch.trim_end_matches(|c: char| c.is_ascii_digit());
    for cand in [arch, family, "chatml"] {
        if !cand.is_empty() && model.apply_chat_template(cand, &probe, true).is_ok() {
            tracing::warn!(
                "the model has no chat template; using llama.cpp's built-in '{cand}' template"
            );
            return Ok(cand.to_string());
        }
    }
    bail!("this model has no chat template; pass --chat-template NAME or use --prompt")
}
