//! Ollama's API: `/api/version`, `/api/tags`, `/api/show`, `/api/ps`,
//! `/api/generate` and `/api/chat`, NDJSON streaming by default.
//!
//! Durations are nanoseconds. `prompt_eval_count` is the prompt tokens
//! actually evaluated (a prefix found in the KV cache is not counted, as in
//! Ollama); `load_duration` is the time before the prompt evaluation began
//! (queue wait and tokenisation: the model is loaded once at start-up).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::engine::{Done, Event, Prompt};
use super::error::{parse_body, Api, ApiError};
use super::info::details;
use super::params::{self, JsonOutput, Overrides, Stop};
use super::{collect, event_body, fail, submit, AppState, JobSpec, Running};
use crate::engine::chat::ChatMessage;
use crate::engine::Finish;

const API: Api = Api::Ollama;

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/api/version", get(version))
        .route("/api/tags", get(tags))
        .route("/api/show", post(show))
        .route("/api/ps", get(ps))
        .route("/api/generate", post(generate))
        .route("/api/chat", post(chat))
}

/// `options`: the sampling and length settings Hypura uses (others, such as
/// `num_gpu` or `num_thread`, are accepted and ignored: placement is the
/// server's).
#[derive(Debug, Clone, Default, Deserialize)]
struct Options {
    temperature: Option<f32>,
    top_k: Option<i32>,
    top_p: Option<f32>,
    min_p: Option<f32>,
    typical_p: Option<f32>,
    repeat_penalty: Option<f32>,
    repeat_last_n: Option<i32>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    seed: Option<i64>,
    num_predict: Option<i64>,
    num_ctx: Option<i64>,
    stop: Option<Stop>,
}

#[derive(Debug, Deserialize)]
struct GenerateRequest {
    #[serde(default)]
    model: String,
    #[serde(default)]
    prompt: String,
    suffix: Option<String>,
    system: Option<String>,
    template: Option<String>,
    context: Option<Vec<i64>>,
    stream: Option<bool>,
    #[serde(default)]
    raw: bool,
    format: Option<Value>,
    options: Option<Options>,
    images: Option<Vec<Value>>,
}

#[derive(Debug, Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: String,
    images: Option<Vec<Value>>,
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    #[serde(default)]
    model: String,
    messages: Vec<Message>,
    stream: Option<bool>,
    format: Option<Value>,
    options: Option<Options>,
    tools: Option<Vec<Value>>,
}

#[derive(Debug, Deserialize)]
struct ShowRequest {
    model: Option<String>,
    name: Option<String>,
}

fn created_at() -> String {
    humantime::format_rfc3339_nanos(std::time::SystemTime::now()).to_string()
}

fn model_name(st: &AppState, requested: &str) -> String {
    match requested.is_empty() {
        true => st.info.name.clone(),
        false => requested.to_string(),
    }
}

async fn version() -> Response {
    Json(json!({ "version": env!("CARGO_PKG_VERSION") })).into_response()
}

fn model_entry(st: &AppState) -> Value {
    let m = &st.info;
    json!({
        "name": m.name,
        "model": m.name,
        "modified_at": humantime::format_rfc3339_seconds(m.modified).to_string(),
        "size": m.size,
        "digest": m.digest,
        "details": details(m),
    })
}

async fn tags(State(st): State<Arc<AppState>>) -> Response {
    Json(json!({ "models": [model_entry(&st)] })).into_response()
}

async fn ps(State(st): State<Arc<AppState>>) -> Response {
    let mut e = model_entry(&st);
    e["expires_at"] = json!("2999-12-31T23:59:59Z");
    e["size_vram"] = json!(0);
    e["context_length"] = json!(st.info.n_ctx);
    Json(json!({ "models": [e] })).into_response()
}

async fn show(State(st): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    let req: ShowRequest = match parse_body(API, body) {
        Ok(r) => r,
        Err(e) => return fail(&st, e),
    };
    let m = &st.info;
    let asked = req.model.or(req.name).unwrap_or_default();
    let mut info = m.meta.clone();
    info.insert(
        "hypura.model_names".into(),
        json!("any model name is accepted: every request is served by this one model"),
    );
    info.insert("hypura.context_length".into(), json!(m.n_ctx));
    info.insert("hypura.mode".into(), json!(m.mode));
    info.insert("hypura.resident_bytes".into(), json!(m.resident_bytes));
    info.insert("hypura.streamed_bytes".into(), json!(m.streamed_bytes));
    let modelfile = format!(
        "# Served by hypura {}. Any model name is accepted: requests for \"{asked}\" or any other name are served by this model.\nFROM {}\n",
        env!("CARGO_PKG_VERSION"),
        m.path
    );
    let parameters = format!("num_ctx {}", m.n_ctx);
    Json(json!({
        "license": "",
        "modelfile": modelfile,
        "parameters": parameters,
        "template": m.template,
        "details": details(m),
        "model_info": info,
        "capabilities": ["completion"],
        "modified_at": humantime::format_rfc3339_seconds(m.modified).to_string(),
    }))
    .into_response()
}

/// `format`: "json" (any JSON value), a JSON schema object (documents that
/// follow it, through llama.cpp's schema -> grammar converter), nothing, or an
/// error.
fn wants_json(format: &Option<Value>) -> Result<JsonOutput, ApiError> {
    match format {
        None | Some(Value::Null) => Ok(JsonOutput::Off),
        Some(Value::String(s)) if s.is_empty() => Ok(JsonOutput::Off),
        Some(Value::String(s)) if s == "json" => Ok(JsonOutput::Any),
        Some(v @ Value::Object(_)) => Ok(JsonOutput::Schema(v.to_string())),
        Some(other) => Err(ApiError::bad_request(
            API,
            format!("format must be \"json\" or a JSON schema object (got {other})"),
        )),
    }
}

/// Sampling, generation length, context and stop strings of a request.
type Settings = (
    crate::engine::sampling::SamplingParams,
    Option<usize>,
    Option<u32>,
    Vec<String>,
);

/// The settings of a request's `options` and `format`.
fn job_settings(
    st: &AppState,
    options: Option<Options>,
    format: &Option<Value>,
) -> Result<Settings, ApiError> {
    let o = options.unwrap_or_default();
    let ov = Overrides {
        temp: o.temperature,
        top_k: o.top_k,
        top_p: o.top_p,
        min_p: o.min_p,
        typical_p: o.typical_p,
        repeat_penalty: o.repeat_penalty,
        repeat_last_n: o.repeat_last_n,
        presence_penalty: o.presence_penalty,
        frequency_penalty: o.frequency_penalty,
        seed: o.seed,
        json: wants_json(format)?,
    };
    let sampling = params::sampling(&st.defaults, &ov, API)?;
    let max_tokens = params::max_tokens(&st.defaults, o.num_predict, "num_predict", API)?;
    // A larger num_ctx than the server's --ctx is capped to it.
    let n_ctx = match o.num_ctx {
        None => None,
        Some(n) if n <= 0 => {
            return Err(ApiError::bad_request(
                API,
                format!("num_ctx must be at least 1 (got {n})"),
            ))
        }
        Some(n) => Some(u32::try_from(n).unwrap_or(u32::MAX)),
    };
    let stop = o.stop.map(Stop::strings).unwrap_or_default();
    Ok((sampling, max_tokens, n_ctx, stop))
}

fn no_images(images: &Option<Vec<Value>>) -> Result<(), ApiError> {
    match images {
        Some(v) if !v.is_empty() => Err(ApiError::bad_request(
            API,
            "images are not supported by this server",
        )),
        _ => Ok(()),
    }
}

/// The final object's fields.
fn final_fields(obj: &mut Value, run: &Running, d: &Done) {
    let ns = |s: f64| (s * 1e9) as u64;
    let total = run.received.elapsed().as_secs_f64();
    obj["done"] = json!(true);
    obj["done_reason"] = json!(match d.finish {
        Finish::Length => "length",
        _ => "stop",
    });
    obj["total_duration"] = json!(ns(total));
    obj["load_duration"] = json!(ns((total - d.prompt_secs - d.gen_secs).max(0.0)));
    obj["prompt_eval_count"] = json!(d.prompt_tokens - d.reused_tokens);
    obj["prompt_eval_duration"] = json!(ns(d.prompt_secs));
    obj["eval_count"] = json!(d.completion_tokens);
    obj["eval_duration"] = json!(ns(d.gen_secs));
}

fn line(v: &Value) -> Bytes {
    let mut s = serde_json::to_vec(v).unwrap_or_default();
    s.push(b'\n');
    Bytes::from(s)
}

fn ndjson(body: axum::body::Body) -> Response {
    ([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response()
}

/// Streams or collects a job. `chunk` makes the object of a text chunk;
/// `context` adds the generate API's `context` to the final object.
async fn respond(
    st: &AppState,
    spec: JobSpec,
    stream: bool,
    chunk: fn(&str, &str) -> Value,
    model: String,
) -> Response {
    let want_context = spec.want_context;
    let run = match submit(st, API, spec).await {
        Ok(r) => r,
        Err(e) => return fail(st, e),
    };
    if !stream {
        return match collect(run, API).await {
            Ok((text, d, run)) => {
                let mut obj = chunk(&model, &text);
                final_fields(&mut obj, &run, &d);
                if want_context {
                    obj["context"] = json!(d.context);
                }
                Json(obj).into_response()
            }
            Err(e) => fail(st, e),
        };
    }
    let body = event_body(run, model, move |model, run, ev| match ev {
        Event::Text(t) => (line(&chunk(model, &t)), false),
        Event::Done(d) => {
            let mut obj = chunk(model, "");
            final_fields(&mut obj, run, &d);
            if want_context {
                obj["context"] = json!(d.context);
            }
            (line(&obj), true)
        }
        Event::Failed(msg) | Event::Rejected(_, msg) => (line(&json!({ "error": msg })), true),
        Event::Accepted { .. } => (Bytes::new(), false),
    });
    ndjson(body)
}

fn generate_chunk(model: &str, text: &str) -> Value {
    json!({ "model": model, "created_at": created_at(), "response": text, "done": false })
}

fn chat_chunk(model: &str, text: &str) -> Value {
    json!({
        "model": model,
        "created_at": created_at(),
        "message": { "role": "assistant", "content": text },
        "done": false,
    })
}

async fn generate(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    st.metrics.request("ollama_generate");
    let req: GenerateRequest = match parse_body(API, body) {
        Ok(r) => r,
        Err(e) => return fail(&st, e),
    };
    let model = model_name(&st, &req.model);
    let check = || -> Result<JobSpec, ApiError> {
        no_images(&req.images)?;
        if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::bad_request(
                API,
                "suffix (fill-in-the-middle) is not supported",
            ));
        }
        if req.template.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::bad_request(
                API,
                "template overrides (Go templates) are not supported: the model's own chat template is used, or send raw: true",
            ));
        }
        let context: Vec<i32> = req
            .context
            .clone()
            .unwrap_or_default()
            .into_iter()
            .map(|t| {
                i32::try_from(t).map_err(|_| {
                    ApiError::bad_request(API, format!("context holds {t}, not a token id"))
                })
            })
            .collect::<Result<_, _>>()?;
        let (sampling, max_tokens, n_ctx, stop) =
            job_settings(&st, req.options.clone(), &req.format)?;
        let prompt = match req.raw {
            true => Prompt::Raw {
                text: req.prompt.clone(),
                context,
            },
            false => {
                let mut messages = Vec::new();
                if let Some(s) = req.system.as_deref().filter(|s| !s.is_empty()) {
                    messages.push(ChatMessage::new("system", s));
                }
                messages.push(ChatMessage::new("user", &req.prompt));
                Prompt::Chat { messages, context }
            }
        };
        Ok(JobSpec {
            prompt,
            max_tokens,
            n_ctx,
            sampling,
            stop,
            want_context: true,
        })
    };
    let spec = match check() {
        Ok(s) => s,
        Err(e) => return fail(&st, e),
    };
    // An empty prompt loads the model (Ollama's preload): it is loaded.
    if req.prompt.is_empty() && req.context.as_ref().is_none_or(Vec::is_empty) {
        let mut obj = generate_chunk(&model, "");
        obj["done"] = json!(true);
        obj["done_reason"] = json!("load");
        return Json(obj).into_response();
    }
    respond(&st, spec, req.stream.unwrap_or(true), generate_chunk, model).await
}

async fn chat(State(st): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    st.metrics.request("ollama_chat");
    let req: ChatRequest = match parse_body(API, body) {
        Ok(r) => r,
        Err(e) => return fail(&st, e),
    };
    let model = model_name(&st, &req.model);
    let check = || -> Result<JobSpec, ApiError> {
        if req.tools.as_ref().is_some_and(|t| !t.is_empty()) {
            return Err(ApiError::bad_request(
                API,
                "tools are not supported by this server",
            ));
        }
        for m in &req.messages {
            no_images(&m.images)?;
        }
        if req.messages.is_empty() {
            return Err(ApiError::bad_request(API, "messages must not be empty"));
        }
        let (sampling, max_tokens, n_ctx, stop) =
            job_settings(&st, req.options.clone(), &req.format)?;
        let messages = req
            .messages
            .iter()
            .map(|m| ChatMessage::new(&m.role, &m.content))
            .collect();
        Ok(JobSpec {
            prompt: Prompt::Chat {
                messages,
                context: Vec::new(),
            },
            max_tokens,
            n_ctx,
            sampling,
            stop,
            want_context: false,
        })
    };
    let spec = match check() {
        Ok(s) => s,
        Err(e) => return fail(&st, e),
    };
    respond(&st, spec, req.stream.unwrap_or(true), chat_chunk, model).await
}
