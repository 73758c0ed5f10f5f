//! Hypura: run GGUF models bigger than RAM by streaming weights from NVMe.
//!
//! The data path is the architecture:
//! GGUF ([`gguf`]) → plan ([`scheduler`]) → pool → I/O ([`io`]) → ggml callback ([`engine`]).
//! [`profiler`] measures the machine the plan is made for; [`cli`] is the front end.

pub mod bench;
pub mod cli;
pub mod config;
pub mod engine;
pub mod gguf;
pub mod io;
pub mod profiler;
pub mod report;
pub mod scheduler;
pub mod server;
