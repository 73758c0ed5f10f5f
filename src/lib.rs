//! Hypura: run GGUF models bigger than RAM by streaming weights from NVMe.
//!
//! The data path is the architecture:
//! GGUF ([`gguf`]) → plan ([`scheduler`]) → pool → I/O ([`io`]) → ggml callback ([`engine`]).
//! [`profiler`] measures the machine the plan is made for; [`cli`] is the front end.
//!
//! Layers, from the bottom (a module imports only from layers below it; a
//! unit test in `layering.rs` checks the lower ones): [`util`]; [`gguf`], [`io`];
//! [`scheduler`] (pure planning: the machine's facts come in as numbers);
//! [`profiler`]; [`config`]; [`engine`] (which gathers the facts in
//! `engine::placement`) and [`report`]; [`bench`] and [`cli`].

pub mod bench;
pub mod cli;
pub mod config;
pub mod engine;
pub mod gguf;
pub mod io;
#[cfg(test)]
mod layering;
pub mod profiler;
pub mod report;
pub mod scheduler;
pub mod server;
pub mod util;
