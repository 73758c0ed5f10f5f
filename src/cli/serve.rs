//! `hypura serve`: the Ollama- and OpenAI-compatible HTTP server (see
//! [`crate::server`]).

use std::path::PathBuf;

use anyhow::{bail, Result};

use super::run::{default_threads, SamplingArgs};
use crate::engine::placement::PlacementArgs;
use crate::engine::{LoadMode, SessionOptions};
use crate::server::params::Defaults;
use crate::server::ServeConfig;

#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// The GGUF model file.
    pub model: PathBuf,
    /// Address to listen on (the API has no authentication: keep it on loopback).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port; the `listening on` line says which).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Context size in tokens (default: min(4096, the model's training context)).
    #[arg(long)]
    pub ctx: Option<u32>,
    /// Sequences generated at once (only 1: requests queue for the one session).
    #[arg(long, default_value_t = 1)]
    pub parallel: usize,
    /// Requests that may wait for the engine; more are refused with 503.
    #[arg(long, default_value_t = 64)]
    pub queue: usize,
    /// Largest request body (bytes; K, M and G suffixes); larger is a 413.
    #[arg(long, default_value = "16M", value_parser = parse_size)]
    pub max_body: usize,
    /// Serve GET /metrics (Prometheus text format).
    #[arg(long)]
    pub metrics: bool,
    /// Default generation length of a request that names none (default:
    /// until the model stops or the context is full).
    #[arg(short = 'n', long)]
    pub max_tokens: Option<usize>,
    /// Default sampling for requests (each request may override any of it).
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Compute threads (default: all cores this process may use).
    #[arg(short, long)]
    pub threads: Option<usize>,
    /// Prompt-processing batch size.
    #[arg(long, default_value_t = 512)]
    pub batch: u32,
    /// How llama.cpp reads the resident weights.
    #[arg(long, value_enum, default_value_t = LoadMode::Auto)]
    pub load_mode: LoadMode,
    /// Turn off ggml's CPU weight repacking.
    #[arg(long)]
    pub no_repack: bool,
    #[command(flatten)]
    pub placement: PlacementArgs,
    /// I/O backend for streaming.
    #[arg(long, default_value = "auto")]
    pub io_backend: crate::io::Backend,
}

/// "16M" -> bytes.
fn parse_size(s: &str) -> std::result::Result<usize, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.eq_ignore_ascii_case(&'k') => (&t[..i], 1usize << 10),
        Some((i, c)) if c.eq_ignore_ascii_case(&'m') => (&t[..i], 1 << 20),
        Some((i, c)) if c.eq_ignore_ascii_case(&'g') => (&t[..i], 1 << 30),
        _ => (t, 1),
    };
    num.trim()
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("expected a size such as 16M or 65536, got '{s}'"))
}

pub fn run(args: ServeArgs) -> Result<()> {
    if args.parallel != 1 {
        bail!("--parallel {} is not supported: the engine generates one sequence at a time (requests queue)", args.parallel);
    }
    if args.max_tokens == Some(0) {
        bail!("--max-tokens must be at least 1");
    }
    let sampling = args.sampling.params()?;
    let opts = SessionOptions {
        placement: args.placement.clone(),
        n_ctx: args.ctx,
        n_batch: args.batch,
        threads: args.threads.unwrap_or_else(default_threads),
        load_mode: args.load_mode,
        repack: !args.no_repack,
        io_backend: args.io_backend,
        gpu_layers: None,
        reference_cuts: None,
        routing_trace: None,
    };
    let cfg = ServeConfig {
        host: args.host.clone(),
        port: args.port,
        queue: args.queue,
        max_body: args.max_body,
        metrics: args.metrics,
        defaults: Defaults {
            sampling,
            seed: args.sampling.seed,
            max_tokens: args.max_tokens,
        },
    };
    crate::server::serve(&args.model, opts, cfg)
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("16M"), Ok(16 << 20));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert!(parse_size("0").is_err());
        assert!(parse_size("x").is_err());
    }
}
