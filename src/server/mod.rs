//! `hypura serve`: an HTTP server speaking Ollama's and OpenAI's APIs on one
//! port, over one engine [`Session`](crate::engine::Session).
//!
//! - [`engine`]: the worker thread that owns the session, its FIFO queue,
//!   per-job event channels, cancellation and shutdown.
//! - [`ollama`]: `/api/*` (NDJSON streaming).
//! - [`openai`]: `/v1/*` (server-sent events).
//! - [`params`]: request settings -> the engine's sampling settings.
//! - [`error`]: each API's error shape and status.
//! - [`body`]: `--max-body` (an oversized body is drained, then 413).
//! - [`metrics`]: counters and `GET /metrics` (Prometheus text).
//! - [`info`]: what the server reports about its model.
//!
//! Any model name in a request is accepted and served by the loaded model
//! (clients often insist on their own names); `/api/tags` and `/v1/models`
//! list the model under its file stem.

pub mod body;
pub mod engine;
pub mod error;
pub mod info;
pub mod metrics;
pub mod ollama;
pub mod openai;
pub mod params;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::sync::mpsc;

use engine::{Engine, Event, Job, ModelInfo, Prompt, SubmitError};
use error::{Api, ApiError};
use metrics::Metrics;
use params::Defaults;

/// How to serve (from the command line).
pub struct ServeConfig {
    pub host: String,
    pub port: u16,
    pub queue: usize,
    pub max_body: usize,
    pub metrics: bool,
    pub defaults: Defaults,
}

/// Shared by every handler.
pub struct AppState {
    pub engine: Engine,
    pub info: ModelInfo,
    pub defaults: Defaults,
    pub metrics: Arc<Metrics>,
}

/// A request's generation, as the engine worker needs it.
pub struct JobSpec {
    pub prompt: Prompt,
    pub max_tokens: Option<usize>,
    pub n_ctx: Option<u32>,
    pub sampling: crate::engine::sampling::SamplingParams,
    pub stop: Vec<String>,
    pub want_context: bool,
}

/// Sets the job's cancel flag when dropped: when the handler or its
/// response body goes away (the client disconnected), the engine stops.
pub struct CancelGuard(Arc<AtomicBool>);

impl Drop for CancelGuard {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// An accepted job: its events after `Accepted`.
pub struct Running {
    pub rx: mpsc::Receiver<Event>,
    pub prompt_tokens: usize,
    pub received: Instant,
    _guard: CancelGuard,
}

/// Queues a job and waits for the worker to accept it (the prompt fits,
/// the template renders) or refuse it with a status.
pub async fn submit(st: &AppState, api: Api, spec: JobSpec) -> Result<Running, ApiError> {
    let received = Instant::now();
    let (tx, mut rx) = mpsc::channel(engine::EVENT_CAPACITY);
    let cancel = Arc::new(AtomicBool::new(false));
    let guard = CancelGuard(Arc::clone(&cancel));
    let job = Job {
        prompt: spec.prompt,
        max_tokens: spec.max_tokens,
        n_ctx: spec.n_ctx,
        sampling: spec.sampling,
        stop: spec.stop,
        want_context: spec.want_context,
        cancel,
        events: tx,
    };
    match st.engine.submit(job) {
        Ok(()) => {}
        Err(SubmitError::Full) => {
            st.metrics.rejected_full.fetch_add(1, Ordering::Relaxed);
            return Err(ApiError::new(
                api,
                StatusCode::SERVICE_UNAVAILABLE,
                "the server is busy: the request queue is full (--queue); retry later",
            ));
        }
        Err(SubmitError::Closed) => {
            return Err(ApiError::new(
                api,
                StatusCode::SERVICE_UNAVAILABLE,
                "the server is shutting down",
            ))
        }
    }
    match rx.recv().await {
        Some(Event::Accepted { prompt_tokens }) => Ok(Running {
            rx,
            prompt_tokens,
            received,
            _guard: guard,
        }),
        Some(Event::Rejected(status, msg)) => Err(ApiError::new(api, status, msg)),
        Some(Event::Failed(msg)) => Err(ApiError::new(api, StatusCode::INTERNAL_SERVER_ERROR, msg)),
        Some(_) | None => Err(ApiError::new(
            api,
            StatusCode::INTERNAL_SERVER_ERROR,
            "the engine stopped before answering",
        )),
    }
}

/// Collects a whole generation (the non-streaming responses).
pub async fn collect(
    mut run: Running,
    api: Api,
) -> Result<(String, engine::Done, Running), ApiError> {
    let mut text = String::new();
    loop {
        match run.rx.recv().await {
            Some(Event::Text(t)) => text.push_str(&t),
            Some(Event::Done(d)) => return Ok((text, d, run)),
            Some(Event::Failed(msg)) => {
                return Err(ApiError::new(api, StatusCode::INTERNAL_SERVER_ERROR, msg))
            }
            Some(_) | None => {
                return Err(ApiError::new(
                    api,
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the engine stopped during the generation",
                ))
            }
        }
    }
}

/// A streaming response body: `f` turns each event into bytes and says
/// whether it was the last. A worker that goes away without a last event
/// is reported to `f` as a failure.
pub fn event_body<S, F>(run: Running, state: S, f: F) -> Body
where
    S: Send + 'static,
    F: FnMut(&mut S, &Running, Event) -> (Bytes, bool) + Send + 'static,
{
    let stream = futures_util::stream::unfold(
        (run, state, f, false),
        |(mut run, mut state, mut f, finished)| async move {
            if finished {
                return None;
            }
            let ev = run.rx.recv().await.unwrap_or_else(|| {
                Event::Failed("the engine stopped during the generation".into())
            });
            let (bytes, last) = f(&mut state, &run, ev);
            Some((Ok::<_, Infallible>(bytes), (run, state, f, last)))
        },
    );
    Body::from_stream(stream)
}

/// Counts an error response and answers it.
pub fn fail(st: &AppState, e: ApiError) -> Response {
    st.metrics.errors.fetch_add(1, Ordering::Relaxed);
    e.into_response()
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn health() -> Response {
    axum::Json(serde_json::json!({ "status": "ok" })).into_response()
}

async fn root() -> &'static str {
    "Hypura is running (Ollama- and OpenAI-compatible API)\n"
}

async fn metrics_text(State(st): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.metrics.render(),
    )
        .into_response()
}

async fn not_found(State(st): State<Arc<AppState>>, uri: Uri) -> Response {
    let api = match uri.path().starts_with("/v1") {
        true => Api::OpenAi,
        false => Api::Ollama,
    };
    fail(
        &st,
        ApiError::new(
            api,
            StatusCode::NOT_FOUND,
            format!("no route {}", uri.path()),
        ),
    )
}

pub fn router(state: Arc<AppState>, with_metrics: bool, max_body: usize) -> Router {
    let mut r = Router::new()
        .route("/", get(root))
        .route("/health", get(health))
        .merge(ollama::routes())
        .merge(openai::routes());
    if with_metrics {
        r = r.route("/metrics", get(metrics_text));
    }
    r.fallback(not_found)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn_with_state(
            body::MaxBody(max_body),
            body::limit,
        ))
        .with_state(state)
}

/// Loads the model, serves until SIGINT or SIGTERM, then shuts down: the
/// running generation ends with an error event, the worker thread ends.
pub fn serve(
    model: &std::path::Path,
    opts: crate::engine::SessionOptions,
    cfg: ServeConfig,
) -> Result<()> {
    let metrics = Arc::new(Metrics::default());
    let (engine, info, worker) = engine::start(model, opts, cfg.queue, Arc::clone(&metrics))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let state = Arc::new(AppState {
        engine,
        info,
        defaults: cfg.defaults.clone(),
        metrics,
    });
    let app = router(Arc::clone(&state), cfg.metrics, cfg.max_body);
    let result = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind((cfg.host.as_str(), cfg.port))
            .await
            .with_context(|| format!("cannot listen on {}:{}", cfg.host, cfg.port))?;
        let addr: SocketAddr = listener.local_addr()?;
        if !addr.ip().is_loopback() {
            eprintln!(
                "warning: listening on {} (not loopback): the API has no authentication, anyone who can reach this address can use it",
                addr.ip()
            );
        }
        let host = match addr {
            SocketAddr::V6(a) => format!("[{}]", a.ip()),
            SocketAddr::V4(a) => a.ip().to_string(),
        };
        println!("listening on http://{host}:{}", addr.port());
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
        let signalled = Arc::new(tokio::sync::Notify::new());
        let st = Arc::clone(&state);
        let sig = Arc::clone(&signalled);
        let shutdown = async move {
            wait_for_signal().await;
            eprintln!("shutting down");
            st.engine.shutdown();
            sig.notify_one();
        };
        let server = axum::serve(listener, app).with_graceful_shutdown(shutdown);
        // Connections that do not close within 10 s of the signal are dropped.
        let deadline = async {
            signalled.notified().await;
            tokio::time::sleep(Duration::from_secs(10)).await;
        };
        tokio::select! {
            r = server => r.context("the HTTP server failed"),
            _ = deadline => Ok(()),
        }
    });
    state.engine.shutdown();
    drop(rt);
    let _ = worker.join();
    result
}

async fn wait_for_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
