//! The engine's one front door: a [`Session`] loads a model once (plan,
//! resident weights, streaming engine, context) and serves any number of
//! generations on it. `run`, `run --interactive` and `serve` all use it.
//!
//! - Ownership: the session owns the context, the streamer, the model and
//!   Hypura's buffer type, declared in that order, which is the order Rust
//!   drops them: the context calls into the streamer (its eval callback) and
//!   reads the model; the streamer re-points the model's streamed tensors into
//!   its pool; the model's streamed tensors live in buffers of the buffer
//!   type. No caller can reorder them.
//! - KV prefix reuse: the session remembers the tokens its KV cache holds.
//!   A generation whose prompt starts with some of them keeps that prefix
//!   (`llama_memory_seq_rm` from the first differing position) and prefills
//!   only the rest; a chat's next turn prefills just the new message.
//! - A generation streams text as it is produced, stops at end-of-generation
//!   tokens, at stop strings (never returned) and at a cancel flag checked
//!   every token.

use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{bail, Context as _, Result};

use super::chat::{ChatMessage, ChatTemplate};
use super::context::{Context, ContextOptions};
use super::device::Device;
use super::generate::{GenStats, Utf8Stream};
use super::logits::LogitsWriter;
use super::model::{LoadMode, LoadOptions, Model};
use super::placement::{plan_for_machine, CtxRequest, PlacementArgs};
use super::sampling::{Sampler, SamplingParams};
use super::stop::StopText;
use super::stream::{Cuts, StreamMetrics, Streamer};
use super::stream_buft::StreamBufferType;
use crate::gguf::GgufFile;
use crate::report::RunReport;
use crate::scheduler::{Mode, Plan};

/// How to load a model into a session.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    pub placement: PlacementArgs,
    /// Context size in tokens (default: min(4096, the training context)).
    pub n_ctx: Option<u32>,
    pub n_batch: u32,
    pub threads: usize,
    pub load_mode: LoadMode,
    /// ggml's CPU weight repacking (off for same-kernel comparisons).
    pub repack: bool,
    pub io_backend: crate::io::Backend,
    /// A manual split of a resident model (llama.cpp's n_gpu_layers).
    pub gpu_layers: Option<i32>,
    /// A resident run cut into the compute ranges of a streaming one.
    pub reference_cuts: Option<Cuts>,
    /// Write the router's picks per token and layer here (expert streaming).
    pub routing_trace: Option<std::path::PathBuf>,
}

impl SessionOptions {
    pub fn new(threads: usize) -> Self {
        SessionOptions {
            placement: PlacementArgs::default(),
            n_ctx: None,
            n_batch: 512,
            threads,
            load_mode: LoadMode::Auto,
            repack: true,
            io_backend: crate::io::Backend::Auto,
            gpu_layers: None,
            reference_cuts: None,
            routing_trace: None,
        }
    }
}

/// What one generation is asked to do.
pub struct GenerateRequest<'a> {
    pub max_tokens: usize,
    pub sampling: &'a SamplingParams,
    /// Generation ends before the first of these (the text is not returned).
    pub stop: &'a [String],
    /// Set from anywhere to stop at the next token.
    pub cancel: Option<&'a AtomicBool>,
    /// Receives the logits row every token is sampled from.
    pub logits_out: Option<&'a mut LogitsWriter>,
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Finish {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `max_tokens`, or the context is full.
    Length,
    /// The cancel flag was set.
    Cancelled,
}

/// A finished generation.
#[derive(Debug, Clone)]
pub struct Generation {
    pub tokens: Vec<i32>,
    /// The text handed out (stop strings cut).
    pub text: String,
    pub finish: Finish,
    /// Prompt tokens, and how many of them came from the KV cache.
    pub prompt_tokens: usize,
    pub reused_tokens: usize,
    pub stats: GenStats,
    /// Streaming counters of the generation phase (after the prefill).
    pub gen_metrics: Option<StreamMetrics>,
}

/// A loaded model ready to generate. Not `Send`: it lives on one thread.
pub struct Session {
    // Field order is drop order (see the module docs); do not reorder.
    ctx: Context,
    streamer: Option<Box<Streamer>>,
    model: Rc<Model>,
    _buft: Box<StreamBufferType>,
    gguf: GgufFile,
    plan: Plan,
    path: PathBuf,
    /// Tokens in the KV cache, position by position.
    cached: Vec<i32>,
    threads: usize,
    gpu_layers: i32,
    load_secs: f64,
    load_read_bytes: Option<u64>,
    /// Layers on other machines (`--rpc`).
    rpc_split: Option<crate::scheduler::split::LayerSplit>,
}

impl Session {
    /// Validates the file, plans placement for this machine, loads the
    /// resident weights (reporting progress in [0, 1]) and sets up streaming.
    pub fn load(
        path: &Path,
        opts: &SessionOptions,
        progress: Option<&mut dyn FnMut(f32)>,
    ) -> Result<Session> {
        if opts.n_batch == 0 {
            bail!("--batch must be at least 1");
        }
        let threads = thread_count(opts.threads)?;
        // Our own parser validates the file first: its errors are precise, and
        // llama.cpp is never handed a malformed file.
        let gguf = GgufFile::open(path)?;
        tracing::info!(arch = ?gguf.architecture(), tensors = gguf.tensors.len(), "model validated");
        let asked_ctx = opts
            .n_ctx
            .unwrap_or_else(|| crate::scheduler::default_ctx(&gguf));
        check_ctx(&gguf, asked_ctx)?;
        let fitted = plan_for_machine(
            &gguf,
            &opts.placement,
            CtxRequest {
                n_ctx: asked_ctx,
                n_batch: opts.n_batch,
                explicit: opts.n_ctx.is_some(),
            },
        )?;
        let (plan, n_ctx, cluster) = (fitted.plan, fitted.n_ctx, fitted.cluster);
        // The mmap fallback: pages of the file, not allocated copies.
        let fallback_opts;
        let opts = if fitted.mmap_fallback {
            fallback_opts = SessionOptions {
                load_mode: LoadMode::Mmap,
                repack: false,
                ..opts.clone()
            };
            &fallback_opts
        } else {
            opts
        };
        tracing::info!(mode = ?plan.mode, streamed = plan.streamed.len(), lookahead = plan.lookahead, gpu = plan.gpu.is_some(), "plan");
        if opts.gpu_layers.is_some() && plan.mode != Mode::Resident {
            bail!(
                "--gpu-layers splits a resident model by hand, but the plan streams ({}): drop --gpu-layers (the plan places layers on the GPU by --gpu-budget), or pass --mode resident",
                plan.mode.label()
            );
        }
        // The device the GPU plan is for (found again: the plan keeps its name).
        let gpu_dev = match &plan.gpu {
            Some(_) => {
                let dev = Device::find(opts.placement.gpu_device.as_deref())?
                    .context("the GPU went away")?;
                let upload = dev.upload_path(opts.placement.gpu_upload)?;
                Some((dev, upload))
            }
            None => None,
        };
        if opts.gpu_layers.is_some() && cluster.is_some() {
            bail!("--gpu-layers and --rpc: the split over the RPC devices is the plan's (--tensor-split to choose it)");
        }
        let gpu_layers = match (&plan.gpu, opts.gpu_layers, &cluster) {
            (_, _, Some(c)) => c.split.n_remote() as i32,
            (_, Some(n), None) => n,
            (Some(_), None, None) => -1,
            (None, None, None) => 0,
        };

        let t_load = Instant::now();
        let io_before = storage_read_bytes();
        let buft = StreamBufferType::new_host()?;
        let model = Rc::new(load_model(
            path,
            opts,
            &plan,
            &buft,
            (gpu_layers, cluster.as_ref()),
            progress,
        )?);
        let streaming = plan.mode != Mode::Resident && !plan.streamed.is_empty();
        let mut streamer = match streaming {
            false => None,
            true => {
                buft.restore_names()?;
                let io = crate::io::IoOptions {
                    backend: opts.io_backend,
                    ..crate::io::IoOptions::default()
                };
                let mut reader = crate::io::open_reader(path, &io)
                    .with_context(|| format!("{}: cannot open for streaming", path.display()))?;
                // Hidden, for fault-injection tests (see `io::fault`).
                if let Some(faults) =
                    crate::io::fault::FaultPlan::from_env().map_err(anyhow::Error::msg)?
                {
                    tracing::warn!("HYPURA_FAULT: injecting read faults: {faults:?}");
                    reader = Box::new(crate::io::fault::FaultReader::new(reader, path, faults));
                }
                // SAFETY: the model that owns the tensors `buft` reported is a
                // field of the session declared after the streamer, so it is
                // dropped after it (module docs); the context holds it too.
                Some(unsafe { Streamer::new(&plan, &buft, reader, gpu_dev) }?)
            }
        };
        // A run that streams no experts has nothing to trace: no file (the
        // bench traces every MoE run and some of them fit the budget).
        if let Some(p) = &opts.routing_trace {
            match streamer.as_mut() {
                Some(st) if st.streams_experts() => st.set_routing_trace(p)?,
                _ => tracing::warn!(
                    "--routing-trace: this run streams no experts, nothing is traced"
                ),
            }
        }
        let load_secs = t_load.elapsed().as_secs_f64();
        let load_read_bytes = storage_read_bytes()
            .zip(io_before)
            .map(|(a, b)| a.saturating_sub(b));

        let mut copts = ContextOptions::default();
        // A batch longer than the context is the context (as llama.cpp does).
        let n_batch = opts.n_batch.min(n_ctx);
        (copts.n_ctx, copts.n_batch, copts.n_threads) = (n_ctx, n_batch, threads);
        if streaming && plan.mode == Mode::Experts {
            // Expert reads fault their pages in on the I/O thread (the cache
            // gives evicted experts' pages back): a worker spinning for the
            // next compute range while the decoding thread waits for them
            // takes a core from it. Measured on the 12 GiB MoE in 4 GiB
            // (docs/performance.md); dense streaming, whose slots keep their
            // pages, measured no better without the spin.
            copts.cpu_poll = Some(0);
        }
        if gpu_layers != 0 {
            copts.cpu_poll = Some(0);
            // Weights in host memory must not be copied to the GPU behind the
            // streaming engine's back (see ContextOptions::op_offload).
            // Nor sent to another machine for every prompt batch (--rpc).
            copts.op_offload = !streaming && cluster.is_none();
        }
        if let Some(st) = streamer.as_mut() {
            // SAFETY: the streamer is a field of the session declared after
            // the context, so it is dropped after it (module docs).
            unsafe { st.hook(&mut copts) };
        } else {
            let (cb, user) = match opts.reference_cuts {
                Some(c) => super::stream::cuts_callback(c),
                None => (None, std::ptr::null_mut()),
            };
            // SAFETY: the cuts callback's user data is a `'static`; the abort
            // callback reads none.
            unsafe { copts.set_callbacks(cb, Some(super::interrupt::abort_when_requested), user) };
        }
        let ctx = Context::new(Rc::clone(&model), copts)?;
        Ok(Session {
            ctx,
            streamer,
            model,
            _buft: buft,
            gguf,
            plan,
            path: path.to_owned(),
            cached: Vec::with_capacity(n_ctx as usize),
            threads: threads as usize,
            gpu_layers,
            load_secs,
            load_read_bytes,
            rpc_split: cluster.as_ref().map(|c| c.split.clone()),
        })
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    pub fn gguf(&self) -> &GgufFile {
        &self.gguf
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn n_ctx(&self) -> u32 {
        self.ctx.n_ctx()
    }

    pub fn load_secs(&self) -> f64 {
        self.load_secs
    }

    /// Tokens the KV cache holds.
    pub fn cached_tokens(&self) -> &[i32] {
        &self.cached
    }

    /// The streaming engine's counters since load (None when resident).
    pub fn metrics(&self) -> Option<StreamMetrics> {
        self.streamer.as_deref().map(Streamer::metrics)
    }

    /// Tokenises text for this model (`add_special`: BOS if the model wants
    /// one; `parse_special`: chat markup becomes special tokens).
    pub fn tokenize(&self, text: &str, add_special: bool, parse_special: bool) -> Result<Vec<i32>> {
        self.model.tokenize(text, add_special, parse_special)
    }

    /// The chat template: `user`'s if given, else the model's own, else
    /// llama.cpp's built-in one for the family.
    pub fn chat_template(&self, user: Option<&str>) -> Result<ChatTemplate> {
        ChatTemplate::for_model(&self.model, user, self.gguf.architecture().unwrap_or(""))
    }

    /// A conversation rendered with `template` and tokenised, ready for
    /// [`Session::generate`]; also returns the text that was tokenised. A
    /// template that writes the BOS token itself does not get a second one.
    pub fn chat_prompt(
        &self,
        template: &ChatTemplate,
        messages: &[ChatMessage],
    ) -> Result<(Vec<i32>, String)> {
        let text = template.render(&self.model, messages, true)?;
        let (bos, _) = self.model.bos_eos_text();
        let text = match text.strip_prefix(bos.as_str()) {
            Some(rest) if !bos.is_empty() && self.model.adds_bos() => rest.to_string(),
            _ => text,
        };
        let tokens = self.model.tokenize(&text, true, true)?;
        Ok((tokens, text))
    }

    /// Forgets the KV cache.
    pub fn clear_cache(&mut self) {
        self.ctx.clear();
        self.cached.clear();
    }

    /// Generates after `prompt`, reusing the longest prefix of it that the
    /// KV cache already holds. `on_text` receives valid UTF-8 as soon as it
    /// is final (an error from it ends the generation with that error).
    pub fn generate(
        &mut self,
        prompt: &[i32],
        mut req: GenerateRequest<'_>,
        on_text: &mut dyn FnMut(&str) -> Result<()>,
    ) -> Result<Generation> {
        let n_ctx = self.ctx.n_ctx() as usize;
        if prompt.is_empty() {
            bail!("the prompt is empty (it tokenizes to nothing)");
        }
        if prompt.len() >= n_ctx {
            bail!("the prompt has {} tokens, the context holds {n_ctx}: shorten the prompt or raise --ctx", prompt.len());
        }
        if req.max_tokens == 0 {
            bail!("the number of tokens to generate must be at least 1");
        }
        let mut sampler = Sampler::new(req.sampling, &self.model, self.ctx.n_ctx())?;
        let reused = self.keep_prefix(prompt);
        let mut stats = GenStats {
            prompt_tokens: prompt.len() - reused,
            prompt_reused: reused,
            ..GenStats::default()
        };
        let t0 = Instant::now();
        self.decode(&prompt[reused..])?;
        stats.prompt_secs = t0.elapsed().as_secs_f64();
        sampler.accept_prompt(prompt);
        let at_prefill = self.metrics();

        let max_tokens = req.max_tokens.min(n_ctx - prompt.len());
        let mut out = Vec::with_capacity(max_tokens);
        let mut utf8 = Utf8Stream::default();
        let mut stop = StopText::new(req.stop);
        let mut text = String::new();
        let mut released = String::with_capacity(256);
        let mut piece = Vec::with_capacity(64);
        let mut finish = Finish::Length;
        let t1 = Instant::now();
        for i in 0..max_tokens {
            if req.cancel.is_some_and(|c| c.load(Ordering::Relaxed))
                || super::interrupt::requested()
            {
                finish = Finish::Cancelled;
                break;
            }
            let logits = self.ctx.logits();
            if let Some(w) = req.logits_out.as_deref_mut() {
                w.push(logits)?;
            }
            let tok = sampler.sample(logits);
            if self.model.is_eog(tok) {
                finish = Finish::Stop;
                break;
            }
            out.push(tok);
            piece.clear();
            self.model.token_bytes(tok, &mut piece);
            released.clear();
            let stopped = match utf8.push(&piece) {
                Some(s) => stop.push(&s, &mut released),
                None => false,
            };
            if !released.is_empty() {
                text.push_str(&released);
                on_text(&released)?;
            }
            if stopped {
                finish = Finish::Stop;
                break;
            }
            if i + 1 < max_tokens {
                let td = Instant::now();
                if let Err(e) = self.decode(&[tok]) {
                    // A stop request aborts the compute: the generation ends
                    // as cancelled, with what it produced so far.
                    if !super::interrupt::requested() {
                        return Err(e);
                    }
                    finish = Finish::Cancelled;
                    break;
                }
                stats.gen_decode_secs += td.elapsed().as_secs_f64();
                stats.gen_decodes += 1;
            }
        }
        if finish != Finish::Stop {
            released.clear();
            if let Some(s) = utf8.flush() {
                stop.push(&s, &mut released);
            }
            stop.finish(&mut released);
            if !released.is_empty() {
                text.push_str(&released);
                on_text(&released)?;
            }
        }
        stats.gen_tokens = out.len();
        stats.gen_secs = t1.elapsed().as_secs_f64();
        let gen_metrics = self
            .metrics()
            .zip(at_prefill)
            .map(|(now, then)| now.since(&then));
        Ok(Generation {
            tokens: out,
            text,
            finish,
            prompt_tokens: prompt.len(),
            reused_tokens: reused,
            stats,
            gen_metrics,
        })
    }

    /// Drops what the KV cache holds past the longest common prefix with
    /// `prompt` (keeping at least one prompt token to decode, for logits);
    /// returns the number of prompt tokens kept.
    fn keep_prefix(&mut self, prompt: &[i32]) -> usize {
        let common = self
            .cached
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count();
        let mut keep = common.min(prompt.len() - 1);
        // A sliding-window cache has dropped positions older than its window:
        // decoding after `keep` needs the window before it.
        let swa = self.model.n_swa() as usize;
        if keep > 0
            && swa > 0
            && self
                .ctx
                .min_cached_pos()
                .is_some_and(|p| p as usize > keep.saturating_sub(swa))
        {
            keep = 0;
        }
        if keep < self.cached.len() {
            if keep == 0 || !self.ctx.truncate(keep as u32) {
                self.ctx.clear();
                keep = 0;
            }
            self.cached.truncate(keep);
        }
        keep
    }

    /// Decodes tokens after the cache; a failure (a streaming I/O error
    /// above all) leaves the cache empty, since its state is unknown.
    fn decode(&mut self, tokens: &[i32]) -> Result<()> {
        let r = self.ctx.decode(tokens);
        let io_err = self.streamer.as_mut().and_then(|s| s.take_error());
        match (r, io_err) {
            (_, Some(e)) => {
                self.clear_cache();
                bail!("streaming from {} failed: {e}", self.path.display())
            }
            (Err(e), None) => {
                self.clear_cache();
                if super::interrupt::requested() {
                    bail!("interrupted");
                }
                Err(e)
            }
            (Ok(()), None) => {
                self.cached.extend_from_slice(tokens);
                debug_assert_eq!(self.cached.len() as u32, self.ctx.n_past());
                Ok(())
            }
        }
    }

    /// The statistics of generations made on this session (`stats` and the
    /// streaming counters of their generation phases, summed by the caller).
    /// Writes out the routing trace's buffered records (`routing_trace`).
    pub fn flush_routing_trace(&mut self) -> Result<()> {
        match self.streamer.as_mut() {
            Some(st) => st.flush_routing_trace(),
            None => Ok(()),
        }
    }

    pub fn report(&self, stats: &GenStats, gen_metrics: Option<StreamMetrics>) -> RunReport {
        let plan = &self.plan;
        let per_tok = stats.gen_decodes.max(1) as f64;
        let streaming = gen_metrics.filter(|_| stats.gen_decodes > 0);
        RunReport {
            mode: plan.mode,
            threads: self.threads,
            load_secs: self.load_secs,
            prompt_tokens: stats.prompt_tokens,
            prompt_reused_tokens: stats.prompt_reused,
            prompt_tps: stats.prompt_tps(),
            gen_tokens: stats.gen_tokens,
            gen_tps: stats.gen_tps(),
            decode_ms_per_token: stats.gen_decode_secs * 1e3 / per_tok,
            ram_budget_bytes: plan.ram_budget,
            resident_bytes: plan.resident_bytes,
            streamed_bytes: plan.streamed_bytes,
            pool_bytes: plan.pool_bytes,
            embd_rows_bytes: plan.embd_rows.as_ref().map(|r| r.size),
            lookahead: plan.lookahead,
            pinned_layers: plan.pinned_layers.len(),
            streamed_layers: plan.streamed_layers.len(),
            read_bytes_per_token: streaming.map(|m| m.bytes_read as f64 / per_tok),
            stall_ms_per_token: streaming.map(|m| m.stall_ns as f64 / 1e6 / per_tok),
            expert_hit_rate: streaming.and_then(|m| m.hit_rate()),
            expert_prediction_precision: streaming.and_then(|m| m.prediction_precision()),
            expert_readahead_used: streaming.and_then(|m| m.prefetch_used_rate()),
            expert_pages_recycled: streaming.and_then(|m| m.recycled_rate()),
            disk_gbps: streaming
                .filter(|_| stats.gen_secs > 0.0)
                .map(|m| m.bytes_read as f64 / 1e9 / stats.gen_secs),
            io_backend: self
                .streamer
                .as_deref()
                .map(|s| s.reader_info().backend.to_string()),
            predicted_tps: plan.predicted_tps,
            ceiling_tps: plan.ceiling_tps,
            peak_rss_bytes: peak_rss_bytes(),
            load_read_bytes: self.load_read_bytes,
            gpu_layers: self.gpu_layers,
            gpu_device: plan.gpu.as_ref().map(|g| g.device.clone()),
            gpu_resident_bytes: plan.gpu.as_ref().map(|g| g.resident_bytes),
            gpu_pool_bytes: plan.gpu.as_ref().map(|g| g.pool_bytes),
            upload_bytes_per_token: streaming
                .filter(|_| plan.mode.on_gpu())
                .map(|m| m.upload_bytes as f64 / per_tok),
            gpu_expert_hits_per_token: streaming
                .filter(|_| plan.mode == Mode::GpuExperts)
                .map(|m| m.gpu_hits as f64 / per_tok),
            remote_layers: self.rpc_split.as_ref().map(|s| s.n_remote()),
            rpc_split: self.rpc_split.as_ref().map(|s| s.describe()),
        }
    }
}

/// Most compute threads ggml runs (`GGML_MAX_N_THREADS`).
pub const MAX_THREADS: usize = 512;
/// Most tokens a context may hold (llama.cpp pads the size to 256 in a u32).
pub const MAX_CTX: u32 = 1 << 30;

/// `--threads` as llama.cpp takes it: 1 to [`MAX_THREADS`], and no more than
/// the CPUs this process may use (ggml's workers spin at each barrier, so
/// more threads than CPUs starve each other: 4 on 2 CPUs run 25x slower,
/// 512 never finish). Above the CPUs it is lowered, with a warning.
pub fn thread_count(asked: usize) -> Result<i32> {
    if asked == 0 {
        bail!("--threads must be at least 1");
    }
    if asked > MAX_THREADS {
        bail!("--threads {asked} is too large (at most {MAX_THREADS}, ggml's limit)");
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if asked > cpus {
        tracing::warn!(
            "--threads {asked} is more than the {cpus} CPUs this process may use: using {cpus}"
        );
    }
    // At most MAX_THREADS: fits an i32.
    Ok(asked.min(cpus) as i32)
}

/// A context size the model and this machine can hold: 1 to [`MAX_CTX`]
/// tokens, and a KV cache (estimated) no larger than the memory this
/// process may use, so that llama.cpp is never asked to allocate it (a
/// 2-billion-token context took it a minute and 8 GiB before it failed).
fn check_ctx(gguf: &GgufFile, n_ctx: u32) -> Result<()> {
    if n_ctx == 0 {
        bail!("--ctx must be at least 1");
    }
    if n_ctx > MAX_CTX {
        bail!("--ctx {n_ctx} is too large (at most {MAX_CTX})");
    }
    let kv = crate::scheduler::kv_cache_bytes(gguf, n_ctx);
    let usable = crate::profiler::memory::usable_now();
    if usable > 0 && kv > usable {
        bail!(
            "--ctx {n_ctx} needs a KV cache of about {}, more than the {} of memory this process may use: lower --ctx",
            crate::scheduler::format_bytes(kv),
            crate::scheduler::format_bytes(usable)
        );
    }
    Ok(())
}

/// Sums streaming counters of several generation phases.
pub fn add_metrics(a: Option<StreamMetrics>, b: Option<StreamMetrics>) -> Option<StreamMetrics> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.plus(&b)),
        (a, None) => a,
        (None, b) => b,
    }
}

/// Loads the model: resident tensors through llama.cpp, streamed tensors
/// routed into Hypura's buffer type with their names hidden so the loader
/// never reads them (only resident bytes are read at start-up).
fn load_model(
    path: &Path,
    opts: &SessionOptions,
    plan: &Plan,
    buft: &StreamBufferType,
    (n_gpu_layers, cluster): (i32, Option<&super::placement::Cluster>),
    progress: Option<&mut dyn FnMut(f32)>,
) -> Result<Model> {
    let devices: Vec<hypura_sys::ggml_backend_dev_t> = cluster
        .map(|c| c.devices().iter().map(Device::raw).collect())
        .unwrap_or_default();
    let tensor_split = cluster.map(|c| c.split.tensor_split()).unwrap_or_default();
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
    let load_mode = match (plan.mode, opts.load_mode) {
        (Mode::Resident, m) => m,
        // mmap would populate the whole file, streamed tensors included.
        (_, LoadMode::Auto) => LoadMode::Dio,
        (_, m) => m,
    };
    buft.set_hide_names(plan.mode != Mode::Resident);
    let mut progress = progress;
    let progress = progress.as_mut().map(|f| &mut **f as &mut dyn FnMut(f32));
    Model::load(
        path,
        LoadOptions {
            load_mode,
            repack: opts.repack,
            buft_overrides: &overrides,
            progress,
            n_gpu_layers,
            devices: &devices,
            tensor_split: &tensor_split,
        },
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
    let rows = plan.embd_rows.iter().map(|r| format!("^{}$", esc(&r.name)));
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
        .chain(rows)
        .collect()
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
