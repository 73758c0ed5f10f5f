//! Engine glue: the safe layer over llama.cpp (through `hypura-sys`) that the
//! commands use. All `unsafe` FFI of the main crate lives in this module.
//!
//! - [`backend`]: one-time llama.cpp initialisation and log routing to tracing.
//! - [`model`]: loading a model, its vocabulary, tokenisation, chat templates.
//! - [`context`]: a llama context (KV cache) and decoding.
//! - [`device`]: ggml devices, device buffers and uploads (the GPU tier).
//! - [`session`]: the engine's front door — load once, generate many times
//!   (KV prefix reuse, stop strings, cancellation); every command uses it.
//! - [`grammar`]: JSON schema -> GBNF (llama.cpp's converter) for structured output.
//! - [`sampling`]: llama.cpp's sampler chain (penalties, top-k/p, min-p,
//!   typical, temperature, seed, GBNF grammar) and the greedy argmax.
//! - [`chat`]: chat templates (the model's Jinja one, or llama.cpp's built-ins).
//! - [`stop`]: stop strings over streamed text.
//! - [`interrupt`]: Ctrl-C / SIGTERM as a stop request the engine honours.
//! - [`placement`]: this machine's facts (profile, free memory, GPU) for the plan.
//! - [`rpc`]: ggml RPC: remote devices (`--rpc`) and `hypura rpc-server`.
//! - [`stream`]: the streaming engine driven by the eval callback.
//! - [`stream_buft`]: Hypura's custom ggml buffer type (streamed tensors).
//! - [`logits`]: the `--logits-out` file format.
//! - [`generate`]: generation timings and UTF-8 reassembly of token bytes.

pub mod backend;
pub mod chat;
pub mod context;
pub mod device;
pub mod generate;
pub mod grammar;
pub mod interrupt;
pub mod logits;
pub mod model;
pub mod placement;
pub mod rpc;
pub mod sampling;
pub mod session;
pub mod stop;
pub mod stream;
pub mod stream_buft;

pub use context::{Context, ContextOptions};
pub use model::{LoadMode, LoadOptions, Model};
pub use session::{Finish, GenerateRequest, Generation, Session, SessionOptions};
