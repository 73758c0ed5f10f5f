//! `hypura rpc-server`: serves one ggml device of this machine to other
//! machines' `--rpc` (ggml's RPC protocol, as llama.cpp's `rpc-server`).

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};

use crate::engine::device::{Device, Kind};

#[derive(clap::Args, Debug)]
pub struct RpcServerArgs {
    /// Address to listen on. The protocol has no authentication: anything
    /// but loopback must be a trusted network only.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on.
    #[arg(long, default_value_t = 50052)]
    pub port: u16,
    /// The ggml device to serve, by name (default: the first GPU, else the CPU).
    #[arg(long, value_name = "NAME")]
    pub device: Option<String>,
    /// CPU threads for the CPU device (default: the usable cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Directory for ggml's tensor cache (clients then send large tensors
    /// once, by hash).
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
}

pub fn run(args: RpcServerArgs) -> Result<()> {
    if args.port == 0 {
        bail!("--port must be from 1 to 65535");
    }
    let loopback = match args.host.parse::<IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => args.host == "localhost",
    };
    if !loopback {
        eprintln!(
            "warning: listening on {}: ggml's RPC protocol has no authentication or encryption; anyone who reaches this port can run code on this device and read its memory. Use it on a trusted network only.",
            args.host
        );
    }
    let threads = match args.threads {
        Some(0) => bail!("--threads must be at least 1"),
        Some(n) => n,
        None => super::run::default_threads(),
    };
    let dev = match &args.device {
        Some(name) => Device::find(Some(name))?.context("no such device")?,
        None => match Device::find(None)? {
            Some(d) => d,
            None => Device::all()
                .into_iter()
                .find(|d| d.kind() == Kind::Cpu)
                .context("ggml has no CPU device")?,
        },
    };
    if let Some(c) = &args.cache {
        std::fs::create_dir_all(c)
            .with_context(|| format!("--cache {}: cannot create the directory", c.display()))?;
    }
    // The host may be an IPv6 literal: ggml splits host and port at the last ':'.
    let endpoint = format!("{}:{}", args.host, args.port);
    crate::engine::interrupt::install_handlers()?;
    let ep = endpoint.clone();
    let cache = args.cache.clone();
    let server = std::thread::Builder::new()
        .name("rpc-server".into())
        .spawn(move || crate::engine::rpc::serve(&ep, cache.as_deref(), threads, &[dev]))
        .context("cannot start the server thread")?;
    // ggml serves until the process ends; Ctrl-C / SIGTERM end it cleanly.
    loop {
        if server.is_finished() {
            return match server.join() {
                Ok(r) => r,
                Err(_) => bail!("the RPC server thread panicked"),
            };
        }
        if crate::engine::interrupt::requested() {
            eprintln!("rpc-server: stopped ({endpoint})");
            std::process::exit(0);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
