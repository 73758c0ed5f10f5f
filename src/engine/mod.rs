//! Engine glue: the safe layer over llama.cpp (through `hypura-sys`) that the
//! commands use. All `unsafe` FFI of the main crate lives in this module.
//!
//! - [`backend`]: one-time llama.cpp initialisation and log routing to tracing.
//! - [`model`]: loading a model, its vocabulary, tokenisation, chat templates.
//! - [`context`]: a llama context (KV cache) and decoding.
//! - [`device`]: ggml devices, device buffers and uploads (the GPU tier).
//! - [`placement`]: this machine's facts (profile, free memory, GPU) for the plan.
//! - [`sampler`]: greedy and temperature sampling.
//! - [`stream`]: the streaming engine driven by the eval callback.
//! - [`stream_buft`]: Hypura's custom ggml buffer type (streamed tensors).
//! - [`logits`]: the `--logits-out` file format.
//! - [`generate`]: the token loop shared by prompt mode and chat.

pub mod backend;
pub mod context;
pub mod device;
pub mod generate;
pub mod logits;
pub mod model;
pub mod placement;
pub mod sampler;
pub mod stream;
pub mod stream_buft;

pub use context::{Context, ContextOptions};
pub use model::{LoadMode, LoadOptions, Model};
