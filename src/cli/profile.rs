//! `hypura profile`: measure this machine (or show the cached measurement).

use std::path::PathBuf;

use anyhow::Result;

use crate::io::Backend;
use crate::profiler::{self, MeasureOptions, ProfileSource};

#[derive(clap::Args, Debug)]
pub struct ProfileArgs {
    /// Measure again even if this machine's profile is cached.
    #[arg(long)]
    pub force: bool,
    /// Print JSON (for scripts) instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Directory whose filesystem is measured [default: ./models, else $HYPURA_MODELS_DIR, else .]
    #[arg(long, value_name = "DIR")]
    pub path: Option<PathBuf>,
    /// Smaller files and shorter runs: quick, rougher figures (also HYPURA_PROFILE_QUICK=1).
    #[arg(long)]
    pub quick: bool,
    /// I/O backend for the storage measurement: auto, uring, pread.
    #[arg(long, value_name = "BACKEND", default_value = "auto")]
    pub backend: Backend,
    /// Read this existing file for the storage figures (e.g. the file fio reads).
    #[arg(long, value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Also alternate io_uring and the pread pool at queue depth 16, 1 MiB blocks.
    #[arg(long)]
    pub compare_backends: bool,
    /// List ggml's devices as they are now (type, memory, zero-copy import)
    /// and exit, measuring nothing.
    #[arg(long)]
    pub devices: bool,
    /// Measure the network to these ggml RPC servers (HOST:PORT,...): their
    /// devices, free memory, round trip and send bandwidth; then exit.
    #[arg(long, value_name = "HOST:PORT,...")]
    pub rpc: Option<String>,
}

pub fn run(args: ProfileArgs) -> Result<()> {
    if args.devices {
        print!("{}", devices_table());
        return Ok(());
    }
    if let Some(list) = &args.rpc {
        return rpc_table(list, args.json);
    }
    let opts = MeasureOptions {
        path: args.path,
        quick: args.quick || profiler::quick_from_env(),
        backend: args.backend,
        file: args.file,
        compare_backends: args.compare_backends,
        progress: true,
    };
    let (p, source) =
        profiler::load_or_measure_with(args.force, &opts, crate::engine::device::measure_all)?;
    match source {
        ProfileSource::Cached(f) => {
            eprintln!(
                "cached profile {} (use --force to measure again)",
                f.display()
            )
        }
        ProfileSource::Saved(f) => eprintln!("profile saved to {}", f.display()),
        ProfileSource::NotSaved(why) => eprintln!("profile not cached: {why}"),
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&p)?);
    } else {
        print!("{}", profiler::render_table(&p));
    }
    Ok(())
}

/// Every ggml device, live: name, type, free and total memory, and whether
/// the streaming pool can be imported (zero copy) or must be copied to it.
fn devices_table() -> String {
    use crate::engine::device::{Device, Kind};
    use crate::scheduler::format_bytes;
    use std::fmt::Write as _;
    let mut s = String::from("Devices (ggml, now)\n");
    for d in Device::all() {
        let (free, total) = d.memory();
        let _ = writeln!(
            s,
            "  {:<10} {:<5} {}  {} free of {}",
            d.name(),
            d.kind_label(),
            d.description(),
            format_bytes(free),
            format_bytes(total)
        );
        let path = match d.kind() {
            Kind::Cpu => continue,
            _ if d.wraps_host_memory() => "imports host memory: streamed weights are read into memory it computes on (--gpu-upload direct, zero copy)",
            _ => "no host-memory import: streamed weights are copied to it (--gpu-upload staged)",
        };
        let unified = match d.kind() {
            Kind::Igpu => {
                "; one memory with the CPU (integrated): the plan uses one budget for both"
            }
            _ => "",
        };
        let _ = writeln!(s, "  {:<10} {path}{unified}", "");
    }
    s
}

/// `profile --rpc`: each server's devices, free memory, the median round
/// trip (a memory query) and the send bandwidth (64 MiB into its buffer).
fn rpc_table(list: &str, json: bool) -> Result<()> {
    use crate::engine::rpc;
    use crate::scheduler::format_bytes;
    let remotes = rpc::connect(&rpc::parse_endpoints(list)?)?;
    let mut rows = Vec::new();
    for r in &remotes {
        for d in &r.devices {
            let (free, total) = d.memory();
            let rtt = rpc::round_trip(d);
            let gbps = rpc::send_bandwidth(d, 64 << 20)?;
            rows.push(serde_json::json!({
                "endpoint": r.endpoint, "device": d.name(), "free_bytes": free,
                "total_bytes": total, "round_trip_ms": rtt * 1e3, "send_gbps": gbps,
            }));
            if !json {
                println!(
                    "{:<8} {:<22} {} free of {} | round trip {:.3} ms | send {gbps:.2} GB/s",
                    d.name(),
                    r.endpoint,
                    format_bytes(free),
                    format_bytes(total),
                    rtt * 1e3
                );
            }
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    }
    Ok(())
}
