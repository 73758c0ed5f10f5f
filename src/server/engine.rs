//! The engine worker: one thread owns the [`Session`] (it is not `Send`)
//! and runs jobs one at a time, first come first served, from a bounded
//! queue (`--queue`; a full queue is a 503 for the caller).
//!
//! Each job carries its own bounded event channel. The worker answers
//! [`Event::Accepted`] or [`Event::Rejected`] first (so the HTTP handler can
//! pick the status before it streams), then [`Event::Text`] chunks, then
//! [`Event::Done`] or [`Event::Failed`]. A send that fails means the client
//! went away: the worker sets the job's cancel flag and the session stops
//! before the next token. At shutdown the running job is cancelled and ends
//! with `Failed("the server is shutting down")`; queued jobs are refused.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use anyhow::Result;
use axum::http::StatusCode;
use tokio::sync::mpsc;

use super::metrics::Metrics;
use crate::engine::chat::{ChatMessage, ChatTemplate};
use crate::engine::sampling::SamplingParams;
use crate::engine::{Finish, GenerateRequest, Session, SessionOptions};

/// Events a job may buffer before the worker waits for its client.
pub const EVENT_CAPACITY: usize = 256;

/// What to generate after.
pub enum Prompt {
    /// Text used as is (special tokens parsed, BOS added if the model wants
    /// one), after `context` (token ids of an earlier Ollama generation,
    /// which then replace the BOS).
    Raw { text: String, context: Vec<i32> },
    /// A conversation rendered with the model's chat template, after
    /// `context` as for `Raw`.
    Chat {
        messages: Vec<ChatMessage>,
        context: Vec<i32>,
    },
}

pub struct Job {
    pub prompt: Prompt,
    /// None: until the model stops or the context is full.
    pub max_tokens: Option<usize>,
    /// A smaller context for this request (Ollama's `num_ctx`).
    pub n_ctx: Option<u32>,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// Return the prompt and generated tokens in `Done::context`.
    pub want_context: bool,
    pub cancel: Arc<AtomicBool>,
    pub events: mpsc::Sender<Event>,
}

/// The end of a finished generation.
#[derive(Debug, Clone)]
pub struct Done {
    pub finish: Finish,
    pub prompt_tokens: usize,
    /// Prompt tokens served from the KV cache (not evaluated).
    pub reused_tokens: usize,
    pub completion_tokens: usize,
    /// Seconds from the job reaching the worker to the start of the prefill.
    pub setup_secs: f64,
    pub prompt_secs: f64,
    pub gen_secs: f64,
    /// Prompt then generated tokens (when `want_context`).
    pub context: Vec<i32>,
}

pub enum Event {
    Accepted { prompt_tokens: usize },
    Rejected(StatusCode, String),
    Text(String),
    Done(Done),
    Failed(String),
}

/// What the HTTP side knows about the loaded model (gathered once on the
/// worker thread).
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// The file stem: the name the server lists.
    pub name: String,
    pub path: String,
    pub size: u64,
    pub modified: SystemTime,
    pub digest: String,
    pub arch: String,
    pub parameter_count: u64,
    pub quantization: String,
    pub n_ctx: u32,
    pub n_ctx_train: u32,
    /// The chat template's Jinja source, or the built-in's name.
    pub template: String,
    /// GGUF metadata (arrays over 64 entries left out), as Ollama's `model_info`.
    pub meta: serde_json::Map<String, serde_json::Value>,
    pub mode: String,
    pub resident_bytes: u64,
    pub streamed_bytes: u64,
    pub load_secs: f64,
}

#[derive(Debug)]
pub enum SubmitError {
    Full,
    Closed,
}

/// The HTTP side's handle on the worker.
pub struct Engine {
    tx: Mutex<Option<std_mpsc::SyncSender<Job>>>,
    current: Arc<Mutex<Option<Arc<AtomicBool>>>>,
    shutting_down: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
}

impl Engine {
    /// Queues a job (never blocks).
    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        let guard = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        let Some(tx) = guard.as_ref() else {
            return Err(SubmitError::Closed);
        };
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(SubmitError::Closed);
        }
        self.metrics.queue_depth.fetch_add(1, Ordering::SeqCst);
        match tx.try_send(job) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.metrics.queue_depth.fetch_sub(1, Ordering::SeqCst);
                Err(match e {
                    std_mpsc::TrySendError::Full(_) => SubmitError::Full,
                    std_mpsc::TrySendError::Disconnected(_) => SubmitError::Closed,
                })
            }
        }
    }

    /// Starts shutting down: the running job is cancelled (its stream ends
    /// with an error event), queued ones are refused, and the worker ends.
    pub fn shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        if let Some(c) = self
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            c.store(true, Ordering::SeqCst);
        }
        self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

/// Loads the model on a new worker thread; returns once it is loaded (or
/// failed to load) with the handle, the model's description and the thread.
pub fn start(
    path: &Path,
    opts: SessionOptions,
    queue: usize,
    metrics: Arc<Metrics>,
) -> Result<(Engine, ModelInfo, std::thread::JoinHandle<()>)> {
    let (tx, rx) = std_mpsc::sync_channel::<Job>(queue);
    let (ready_tx, ready_rx) = std_mpsc::channel::<Result<ModelInfo>>();
    let current: Arc<Mutex<Option<Arc<AtomicBool>>>> = Arc::default();
    let shutting_down = Arc::new(AtomicBool::new(false));
    let path = path.to_owned();
    let worker = Worker {
        current: Arc::clone(&current),
        shutting_down: Arc::clone(&shutting_down),
        metrics: Arc::clone(&metrics),
    };
    let thread = std::thread::Builder::new()
        .name("hypura-engine".into())
        .spawn(move || {
            let session = match crate::cli::run::load_with_progress(&path, &opts) {
                Ok(s) => s,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let template = session.chat_template(None);
            let info = super::info::describe(&session, &template);
            if ready_tx.send(Ok(info)).is_err() {
                return;
            }
            worker.run(session, template, rx, &path, &opts);
        })?;
    let info = match ready_rx.recv() {
        Ok(r) => r?,
        Err(_) => anyhow::bail!("the engine thread ended while loading the model"),
    };
    let engine = Engine {
        tx: Mutex::new(Some(tx)),
        current,
        shutting_down,
        metrics,
    };
    Ok((engine, info, thread))
}

struct Worker {
    current: Arc<Mutex<Option<Arc<AtomicBool>>>>,
    shutting_down: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
}

impl Worker {
    fn run(
        &self,
        session: Session,
        template: Result<ChatTemplate>,
        rx: std_mpsc::Receiver<Job>,
        path: &Path,
        opts: &SessionOptions,
    ) {
        // None after a storage error while streaming: the streaming engine's
        // state is unknown, so the session is loaded again for the next job.
        let mut loaded = Some((session, template));
        while let Ok(job) = rx.recv() {
            self.metrics.queue_depth.fetch_sub(1, Ordering::SeqCst);
            // Registered before the shutdown check: a shutdown either sees
            // this job's flag or this check sees the shutdown (SeqCst).
            *self.current.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::clone(&job.cancel));
            if self.shutting_down.load(Ordering::SeqCst) {
                let _ = job.events.blocking_send(Event::Rejected(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the server is shutting down".into(),
                ));
            } else if job.cancel.load(Ordering::SeqCst) || job.events.is_closed() {
                self.metrics.cancelled.fetch_add(1, Ordering::Relaxed);
            } else {
                if loaded.is_none() {
                    tracing::warn!("loading the model again after a storage error");
                    match Session::load(path, opts, None) {
                        Ok(s) => {
                            let t = s.chat_template(None);
                            loaded = Some((s, t));
                        }
                        Err(e) => {
                            let _ = job.events.blocking_send(Event::Rejected(
                                StatusCode::SERVICE_UNAVAILABLE,
                                format!("the model could not be loaded again after a storage error: {e:#}"),
                            ));
                        }
                    }
                }
                if let Some((session, template)) = loaded.as_mut() {
                    self.metrics.busy.store(1, Ordering::Relaxed);
                    let storage_failed = self.job(session, template, job);
                    self.metrics.busy.store(0, Ordering::Relaxed);
                    *self
                        .metrics
                        .stream
                        .lock()
                        .unwrap_or_else(|e| e.into_inner()) = session.metrics();
                    if storage_failed {
                        loaded = None;
                    }
                }
            }
            *self.current.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
    }

    /// Runs one job; true when it failed reading the model from storage.
    fn job(&self, session: &mut Session, template: &Result<ChatTemplate>, job: Job) -> bool {
        let t0 = Instant::now();
        let events = &job.events;
        let reject = |status: StatusCode, msg: String| {
            let _ = events.blocking_send(Event::Rejected(status, msg));
            false
        };
        let tokens = match prompt_tokens(session, template, &job.prompt) {
            Ok(t) => t,
            Err(e) => return reject(StatusCode::BAD_REQUEST, format!("{e:#}")),
        };
        if tokens.is_empty() {
            return reject(
                StatusCode::BAD_REQUEST,
                "the prompt is empty (it tokenizes to nothing)".into(),
            );
        }
        let n_ctx = job
            .n_ctx
            .map_or(session.n_ctx(), |n| n.min(session.n_ctx())) as usize;
        if tokens.len() >= n_ctx {
            return reject(
                StatusCode::BAD_REQUEST,
                format!(
                    "the prompt has {} tokens, the context holds {n_ctx}: shorten the prompt (or start the server with a larger --ctx)",
                    tokens.len()
                ),
            );
        }
        let max_tokens = job
            .max_tokens
            .unwrap_or(usize::MAX)
            .min(n_ctx - tokens.len());
        if events
            .blocking_send(Event::Accepted {
                prompt_tokens: tokens.len(),
            })
            .is_err()
        {
            self.metrics.cancelled.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let setup_secs = t0.elapsed().as_secs_f64();
        let cancel = &*job.cancel;
        let req = GenerateRequest {
            max_tokens,
            sampling: &job.sampling,
            stop: &job.stop,
            cancel: Some(cancel),
            logits_out: None,
        };
        let r = session.generate(&tokens, req, &mut |s| {
            if events.blocking_send(Event::Text(s.to_string())).is_err() {
                // The client went away: stop before the next token.
                cancel.store(true, Ordering::SeqCst);
            }
            Ok(())
        });
        let mut storage_failed = false;
        match r {
            Ok(g) if g.finish == Finish::Cancelled => {
                if self.shutting_down.load(Ordering::SeqCst) {
                    let _ =
                        events.blocking_send(Event::Failed("the server is shutting down".into()));
                } else {
                    self.metrics.cancelled.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(g) => {
                self.metrics.generation(
                    g.prompt_tokens,
                    g.reused_tokens,
                    g.tokens.len(),
                    g.stats.prompt_secs,
                    g.stats.gen_secs,
                );
                let context = match job.want_context {
                    true => tokens.iter().chain(&g.tokens).copied().collect(),
                    false => Vec::new(),
                };
                let _ = events.blocking_send(Event::Done(Done {
                    finish: g.finish,
                    prompt_tokens: g.prompt_tokens,
                    reused_tokens: g.reused_tokens,
                    completion_tokens: g.tokens.len(),
                    setup_secs,
                    prompt_secs: g.stats.prompt_secs,
                    gen_secs: g.stats.gen_secs,
                    context,
                }));
            }
            Err(e) => {
                self.metrics.failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!("generation failed: {e:#}");
                let msg = format!("{e:#}");
                storage_failed = msg.starts_with("streaming from");
                let _ = events.blocking_send(Event::Failed(msg));
            }
        }
        storage_failed
    }
}

/// The prompt's tokens.
fn prompt_tokens(
    session: &Session,
    template: &Result<ChatTemplate>,
    p: &Prompt,
) -> Result<Vec<i32>> {
    let (context, text) = match p {
        Prompt::Chat { messages, context } => {
            let t = template
                .as_ref()
                .map_err(|e| anyhow::anyhow!("this model cannot chat: {e:#}"))?;
            if context.is_empty() {
                return Ok(session.chat_prompt(t, messages)?.0);
            }
            let text = t.render(session.model(), messages, true)?;
            let (bos, _) = session.model().bos_eos_text();
            let text = match text.strip_prefix(bos.as_str()) {
                Some(rest) if !bos.is_empty() => rest.to_string(),
                _ => text,
            };
            (context, std::borrow::Cow::Owned(text))
        }
        Prompt::Raw { text, context } if context.is_empty() => {
            return session.tokenize(text, true, true)
        }
        Prompt::Raw { text, context } => (context, std::borrow::Cow::Borrowed(text.as_str())),
    };
    let n_vocab = session.model().n_vocab();
    if let Some(bad) = context.iter().find(|&&t| t < 0 || t as usize >= n_vocab) {
        anyhow::bail!("context holds {bad}, which is not a token of this model (0..{n_vocab})");
    }
    let mut tokens = context.clone();
    tokens.extend(session.tokenize(&text, false, true)?);
    Ok(tokens)
}
