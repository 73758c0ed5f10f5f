//! Command-line front end: one module per subcommand, each with its own args struct.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub mod bench;
pub mod gen;
pub mod inspect;
pub mod profile;
pub mod rpc_server;
pub mod run;
pub mod serve;

#[derive(Parser, Debug)]
#[command(
    name = "hypura",
    version,
    about = "Run GGUF models bigger than RAM by streaming weights from NVMe"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Show a model's architecture, tensor roles and bytes by role and layer.
    Inspect(inspect::InspectArgs),
    /// Generate text from a prompt, or chat interactively.
    Run(run::RunArgs),
    /// Measure this machine (CPU, memory, disk, GPUs) and cache the result.
    Profile(profile::ProfileArgs),
    /// Write a synthetic GGUF model with random weights (llama, qwen3moe, mixtral).
    Gen(gen::GenArgs),
    /// Compare lookahead depths (and llama.cpp's own loading): table, JSON, chart.
    Bench(bench::BenchArgs),
    /// Serve the model over HTTP: Ollama- and OpenAI-compatible API.
    Serve(serve::ServeArgs),
    /// Serve a ggml device of this machine to other machines' `--rpc`.
    RpcServer(rpc_server::RpcServerArgs),
}

/// Logs go to stderr through tracing; the level comes from `HYPURA_LOG` (or `RUST_LOG`).
fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("HYPURA_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "warn,llama=error".to_string());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Entry point: errors a user can cause are printed as one line, exit code 1.
pub fn main() -> ExitCode {
    init_logging();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Inspect(a) => inspect::run(a),
        Command::Run(a) => run::run(a),
        Command::Profile(a) => profile::run(a),
        Command::Gen(a) => gen::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Serve(a) => serve::run(a),
        Command::RpcServer(a) => rpc_server::run(a),
    };
    // A run stopped by Ctrl-C / SIGTERM exits with 128 + the signal, after
    // its partial output and statistics.
    let interrupted = crate::engine::interrupt::exit_code().map(ExitCode::from);
    match result {
        Ok(()) => interrupted.unwrap_or(ExitCode::SUCCESS),
        Err(e) => {
            // `{:#}` prints the whole context chain on one line, never a backtrace.
            eprintln!("error: {e:#}");
            interrupted.unwrap_or(ExitCode::FAILURE)
        }
    }
}
