//! Request bodies and `--max-body`.
//!
//! A body over the limit is answered 413 in the API's own error shape, but
//! only after the rest of it has been read and dropped (up to [`DRAIN_LIMIT`]):
//! a server that answers and closes while the client is still sending makes
//! the client see a broken pipe or a reset instead of the 413 (the `ollama`
//! and `openai` clients, ureq, curl all do).

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::{Api, ApiError};

/// Bytes of an oversized body read and dropped before answering 413; past
/// this the connection is closed without reading on.
pub const DRAIN_LIMIT: usize = 256 << 20;

/// The `--max-body` limit, as the middleware's state.
#[derive(Clone, Copy)]
pub struct MaxBody(pub usize);

/// Middleware: buffers the request body (at most `max` bytes) and passes it
/// on, or drains an oversized one and answers 413.
pub async fn limit(State(MaxBody(max)): State<MaxBody>, req: Request, next: Next) -> Response {
    let api = if req.uri().path().starts_with("/v1/") {
        Api::OpenAi
    } else {
        Api::Ollama
    };
    let (parts, body) = req.into_parts();
    match read_limited(body, max).await {
        Ok(bytes) => {
            next.run(Request::from_parts(parts, Body::from(bytes)))
                .await
        }
        Err(Read::TooLarge) => ApiError::new(
            api,
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is larger than the server's --max-body ({max} bytes)"),
        )
        .into_response(),
        Err(Read::Failed(e)) => {
            ApiError::bad_request(api, format!("cannot read the request body: {e}")).into_response()
        }
    }
}

enum Read {
    TooLarge,
    Failed(axum::Error),
}

/// Reads `body` whole if it is at most `max` bytes; otherwise drops what it
/// reads (up to [`DRAIN_LIMIT`] bytes in all) and says it was too large.
async fn read_limited(mut body: Body, max: usize) -> Result<Bytes, Read> {
    let declared = body.size_hint().exact();
    let mut buf: Vec<u8> = Vec::new();
    let mut total: usize = 0;
    let mut over = declared.is_some_and(|n| n > max as u64);
    loop {
        let frame = std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await;
        let Some(frame) = frame else { break };
        let frame = frame.map_err(Read::Failed)?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        total = total.saturating_add(data.len());
        if total > max {
            over = true;
            buf = Vec::new();
        }
        if over {
            if total > DRAIN_LIMIT {
                break;
            }
        } else {
            buf.extend_from_slice(&data);
        }
    }
    if over {
        Err(Read::TooLarge)
    } else {
        Ok(Bytes::from(buf))
    }
}
