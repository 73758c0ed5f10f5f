//! OpenAI's API: `/v1/models`, `/v1/chat/completions` and `/v1/completions`,
//! whole responses or server-sent events (`data: {...}`, then
//! `data: [DONE]`). `usage.prompt_tokens_details.cached_tokens` counts the
//! prompt tokens served from the KV cache.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::engine::{Done, Event, Prompt};
use super::error::{error_body, parse_body, Api, ApiError};
use super::params::{self, JsonOutput, Overrides, Stop};
use super::{collect, event_body, fail, submit, unix_now, AppState, JobSpec};
use crate::engine::chat::ChatMessage;
use crate::engine::Finish;

const API: Api = Api::OpenAi;

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
}

/// The parameters both endpoints share (llama.cpp's extensions `top_k`,
/// `min_p`, `typical_p`, `repeat_penalty` and `repeat_last_n` included).
#[derive(Debug, Deserialize)]
struct Common {
    #[serde(default)]
    model: String,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i32>,
    min_p: Option<f32>,
    typical_p: Option<f32>,
    repeat_penalty: Option<f32>,
    repeat_last_n: Option<i32>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    seed: Option<i64>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    stop: Option<Stop>,
    n: Option<i64>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    response_format: Option<ResponseFormat>,
    logprobs: Option<Value>,
    logit_bias: Option<serde_json::Map<String, Value>>,
    tools: Option<Vec<Value>>,
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Debug, Deserialize)]
struct ResponseFormat {
    #[serde(rename = "type")]
    kind: String,
    /// For `json_schema`: `{"name", "schema", "strict"}`.
    json_schema: Option<JsonSchemaFormat>,
}

#[derive(Debug, Deserialize)]
struct JsonSchemaFormat {
    schema: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    messages: Vec<Message>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Debug, Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

/// A message's content: a string, or a list of parts of which only text is
/// supported.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    prompt: PromptField,
    #[serde(flatten)]
    common: Common,
    suffix: Option<String>,
    #[serde(default)]
    echo: bool,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum PromptField {
    One(String),
    Many(Vec<String>),
}

async fn models(State(st): State<Arc<AppState>>) -> Response {
    Json(json!({ "object": "list", "data": [model_object(&st, &st.info.name)] })).into_response()
}

/// Any id names the loaded model.
async fn model(State(st): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    Json(model_object(&st, &id)).into_response()
}

fn model_object(st: &AppState, id: &str) -> Value {
    let created = st
        .info
        .modified
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    json!({ "id": id, "object": "model", "created": created, "owned_by": "hypura" })
}

fn new_id(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}-{:x}{:06x}",
        unix_now(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// What a request's shared parameters ask the engine for, checked.
fn settings(
    st: &AppState,
    c: &Common,
) -> Result<
    (
        crate::engine::sampling::SamplingParams,
        Option<usize>,
        Vec<String>,
    ),
    ApiError,
> {
    if let Some(n) = c.n.filter(|&n| n != 1) {
        return Err(ApiError::bad_request(
            API,
            format!("n must be 1: this server makes one choice per request (got {n})"),
        ));
    }
    if c.logprobs
        .as_ref()
        .is_some_and(|v| !matches!(v, Value::Null | Value::Bool(false)))
    {
        return Err(ApiError::bad_request(
            API,
            "logprobs are not supported by this server",
        ));
    }
    if c.logit_bias.as_ref().is_some_and(|m| !m.is_empty()) {
        return Err(ApiError::bad_request(
            API,
            "logit_bias is not supported by this server",
        ));
    }
    if c.tools.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(ApiError::bad_request(
            API,
            "tools are not supported by this server",
        ));
    }
    let json = match &c.response_format {
        None => JsonOutput::Off,
        Some(f) => match f.kind.as_str() {
            "text" => JsonOutput::Off,
            "json_object" => JsonOutput::Any,
            "json_schema" => match f.json_schema.as_ref().and_then(|j| j.schema.as_ref()) {
                Some(schema @ Value::Object(_)) => JsonOutput::Schema(schema.to_string()),
                Some(Value::Null) | None => JsonOutput::Any,
                Some(other) => {
                    return Err(ApiError::bad_request(
                        API,
                        format!(
                            "response_format.json_schema.schema must be an object (got {other})"
                        ),
                    ))
                }
            },
            other => {
                return Err(ApiError::bad_request(
                    API,
                    format!(
                    "response_format type must be text, json_object or json_schema (got {other:?})"
                ),
                ))
            }
        },
    };
    let ov = Overrides {
        temp: c.temperature,
        top_k: c.top_k,
        top_p: c.top_p,
        min_p: c.min_p,
        typical_p: c.typical_p,
        repeat_penalty: c.repeat_penalty,
        repeat_last_n: c.repeat_last_n,
        presence_penalty: c.presence_penalty,
        frequency_penalty: c.frequency_penalty,
        seed: c.seed,
        json,
    };
    let sampling = params::sampling(&st.defaults, &ov, API)?;
    let (v, name) = match c.max_completion_tokens {
        Some(v) => (Some(v), "max_completion_tokens"),
        None => (c.max_tokens, "max_tokens"),
    };
    if v.is_some_and(|v| v < 0) {
        return Err(ApiError::bad_request(
            API,
            format!("{name} must be at least 1"),
        ));
    }
    let max_tokens = params::max_tokens(&st.defaults, v, name, API)?;
    let stop = c.stop.clone().map(Stop::strings).unwrap_or_default();
    Ok((sampling, max_tokens, stop))
}

fn finish_reason(f: Finish) -> &'static str {
    match f {
        Finish::Length => "length",
        _ => "stop",
    }
}

fn usage(d: &Done) -> Value {
    json!({
        "prompt_tokens": d.prompt_tokens,
        "completion_tokens": d.completion_tokens,
        "total_tokens": d.prompt_tokens + d.completion_tokens,
        "prompt_tokens_details": { "cached_tokens": d.reused_tokens },
    })
}

fn sse(v: &Value) -> Vec<u8> {
    let mut s = b"data: ".to_vec();
    s.extend(serde_json::to_vec(v).unwrap_or_default());
    s.extend(b"\n\n");
    s
}

/// The two endpoints' differences.
#[derive(Clone, Copy)]
enum Kind {
    Chat,
    Completion,
}

impl Kind {
    fn object(self, stream: bool) -> &'static str {
        match (self, stream) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Completion, _) => "text_completion",
        }
    }

    /// One choice: a whole message, a delta, or completion text.
    fn choice(self, stream: bool, text: Option<&str>, finish: Option<&str>) -> Value {
        match (self, stream) {
            (Kind::Chat, false) => json!({
                "index": 0,
                "message": { "role": "assistant", "content": text.unwrap_or("") },
                "logprobs": null,
                "finish_reason": finish,
            }),
            (Kind::Chat, true) => {
                let delta = match text {
                    Some(t) => json!({ "content": t }),
                    None => json!({}),
                };
                json!({ "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish })
            }
            (Kind::Completion, _) => json!({
                "index": 0,
                "text": text.unwrap_or(""),
                "logprobs": null,
                "finish_reason": finish,
            }),
        }
    }
}

struct StreamState {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
}

impl StreamState {
    fn chunk(&self, choices: Value) -> Value {
        let mut v = json!({
            "id": self.id,
            "object": self.kind.object(true),
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "hypura",
            "choices": choices,
        });
        if self.include_usage {
            v["usage"] = Value::Null;
        }
        v
    }

    fn event(&mut self, ev: Event) -> (Bytes, bool) {
        match ev {
            Event::Text(t) => (
                sse(&self.chunk(json!([self.kind.choice(true, Some(&t), None)]))).into(),
                false,
            ),
            Event::Done(d) => {
                let mut out = sse(&self.chunk(json!([self.kind.choice(
                    true,
                    None,
                    Some(finish_reason(d.finish))
                )])));
                if self.include_usage {
                    let mut u = self.chunk(json!([]));
                    u["usage"] = usage(&d);
                    out.extend(sse(&u));
                }
                out.extend(b"data: [DONE]\n\n");
                (out.into(), true)
            }
            Event::Failed(msg) | Event::Rejected(_, msg) => {
                let e = error_body(API, axum::http::StatusCode::INTERNAL_SERVER_ERROR, &msg);
                (sse(&e).into(), true)
            }
            Event::Accepted { .. } => (Bytes::new(), false),
        }
    }
}

async fn respond(st: &AppState, kind: Kind, c: &Common, spec: JobSpec) -> Response {
    let model = match c.model.is_empty() {
        true => st.info.name.clone(),
        false => c.model.clone(),
    };
    let id = new_id(match kind {
        Kind::Chat => "chatcmpl",
        Kind::Completion => "cmpl",
    });
    let created = unix_now();
    let run = match submit(st, API, spec).await {
        Ok(r) => r,
        Err(e) => return fail(st, e),
    };
    if !c.stream {
        return match collect(run, API).await {
            Ok((text, d, _)) => Json(json!({
                "id": id,
                "object": kind.object(false),
                "created": created,
                "model": model,
                "system_fingerprint": "hypura",
                "choices": [kind.choice(false, Some(&text), Some(finish_reason(d.finish)))],
                "usage": usage(&d),
            }))
            .into_response(),
            Err(e) => fail(st, e),
        };
    }
    let mut state = StreamState {
        kind,
        id,
        created,
        model,
        include_usage: c.stream_options.as_ref().is_some_and(|o| o.include_usage),
    };
    // The chat stream opens with the assistant's role.
    let first: Bytes = match kind {
        Kind::Chat => {
            let choice = json!([{ "index": 0, "delta": { "role": "assistant", "content": "" }, "logprobs": null, "finish_reason": null }]);
            sse(&state.chunk(choice)).into()
        }
        Kind::Completion => Bytes::new(),
    };
    let mut first = Some(first);
    let body = event_body(run, (), move |_, _, ev| {
        let (b, last) = state.event(ev);
        match first.take() {
            Some(f) if !f.is_empty() => {
                let mut v = f.to_vec();
                v.extend_from_slice(&b);
                (v.into(), last)
            }
            _ => (b, last),
        }
    });
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

async fn chat(State(st): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    st.metrics.request("openai_chat");
    let req: ChatRequest = match parse_body(API, body) {
        Ok(r) => r,
        Err(e) => return fail(&st, e),
    };
    let check = || -> Result<JobSpec, ApiError> {
        let (sampling, max_tokens, stop) = settings(&st, &req.common)?;
        if req.messages.is_empty() {
            return Err(ApiError::bad_request(API, "messages must not be empty"));
        }
        let mut messages = Vec::with_capacity(req.messages.len());
        for m in &req.messages {
            let content = match &m.content {
                None => String::new(),
                Some(Content::Text(t)) => t.clone(),
                Some(Content::Parts(parts)) => {
                    let mut s = String::new();
                    for p in parts {
                        match (p.kind.as_str(), &p.text) {
                            ("text", Some(t)) => s.push_str(t),
                            (k, _) => {
                                return Err(ApiError::bad_request(
                                    API,
                                    format!(
                                        "content parts of type {k:?} are not supported (text only)"
                                    ),
                                ))
                            }
                        }
                    }
                    s
                }
            };
            // OpenAI's "developer" role is the system prompt of newer models.
            let role = match m.role.as_str() {
                "developer" => "system",
                r => r,
            };
            messages.push(ChatMessage::new(role, &content));
        }
        Ok(JobSpec {
            prompt: Prompt::Chat {
                messages,
                context: Vec::new(),
            },
            max_tokens,
            n_ctx: None,
            sampling,
            stop,
            want_context: false,
        })
    };
    match check() {
        Ok(spec) => respond(&st, Kind::Chat, &req.common, spec).await,
        Err(e) => fail(&st, e),
    }
}

async fn completions(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    st.metrics.request("openai_completions");
    let req: CompletionRequest = match parse_body(API, body) {
        Ok(r) => r,
        Err(e) => return fail(&st, e),
    };
    let check = || -> Result<JobSpec, ApiError> {
        let (sampling, max_tokens, stop) = settings(&st, &req.common)?;
        if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::bad_request(
                API,
                "suffix (fill-in-the-middle) is not supported",
            ));
        }
        if req.echo {
            return Err(ApiError::bad_request(API, "echo is not supported"));
        }
        let text = match &req.prompt {
            PromptField::One(s) => s.clone(),
            PromptField::Many(v) if v.len() == 1 => v[0].clone(),
            PromptField::Many(v) => {
                return Err(ApiError::bad_request(
                    API,
                    format!("prompt must be one string (got a list of {})", v.len()),
                ))
            }
        };
        Ok(JobSpec {
            prompt: Prompt::Raw {
                text,
                context: Vec::new(),
            },
            max_tokens,
            n_ctx: None,
            sampling,
            stop,
            want_context: false,
        })
    };
    match check() {
        Ok(spec) => respond(&st, Kind::Completion, &req.common, spec).await,
        Err(e) => fail(&st, e),
    }
}
