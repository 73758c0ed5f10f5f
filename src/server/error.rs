//! Errors in each API's own shape: Ollama answers `{"error": "..."}`,
//! OpenAI `{"error": {"message", "type", "param", "code"}}`. The status says
//! what kind of error it is (400 bad request, 404 unknown route, 413 body
//! over `--max-body`, 503 queue full with `Retry-After`, 500 engine error).

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde_json::json;

/// Which API's error shape to answer in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Ollama,
    OpenAi,
}

/// An error answered before any of the response was sent.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub api: Api,
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(api: Api, status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            api,
            status,
            message: message.into(),
        }
    }

    pub fn bad_request(api: Api, message: impl Into<String>) -> Self {
        Self::new(api, StatusCode::BAD_REQUEST, message)
    }

    /// The JSON body (also the payload of an error event in a stream).
    pub fn body(&self) -> serde_json::Value {
        error_body(self.api, self.status, &self.message)
    }
}

/// The error object of `api` for `status` and `message`.
pub fn error_body(api: Api, status: StatusCode, message: &str) -> serde_json::Value {
    match api {
        Api::Ollama => json!({ "error": message }),
        Api::OpenAi => {
            let kind = match status.as_u16() {
                400 | 413 | 422 => "invalid_request_error",
                404 => "not_found_error",
                503 => "server_overloaded",
                _ => "server_error",
            };
            json!({ "error": { "message": message, "type": kind, "param": null, "code": null } })
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}

/// Parses a request body as JSON into `T`: a body over `--max-body` is 413,
/// malformed JSON and wrong field types are 400 with serde's message.
pub fn parse_body<T: DeserializeOwned>(
    api: Api,
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let bytes = body.map_err(|e| {
        let status = e.status();
        let msg = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "the request body is larger than the server's --max-body".to_string()
        } else {
            format!("cannot read the request body: {e}")
        };
        ApiError::new(api, status, msg)
    })?;
    serde_json::from_slice(&bytes).map_err(|e| {
        use serde_json::error::Category;
        let what = match e.classify() {
            Category::Syntax | Category::Eof => "malformed JSON",
            Category::Data => "invalid request",
            Category::Io => "cannot read the request",
        };
        ApiError::bad_request(api, format!("{what}: {e}"))
    })
}
