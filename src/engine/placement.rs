//! The facts of this machine that a placement plan is made from, gathered
//! here (above the scheduler, which only does the arithmetic): the cached
//! machine profile (disk and memory bandwidth, host→device copy speed), live
//! free memory (RAM and the GPU's), the lookahead `hypura bench --save`
//! stored, and the GPU itself ([`Device`]).

use anyhow::Result;

use super::device::{Device, Upload};
use crate::gguf::GgufFile;
use crate::scheduler::budget::{non_weight_bytes, ram_budget_for, CTX_FLOOR};
use crate::scheduler::plan::RamTooSmall;
use crate::scheduler::split::{
    local_view, remote_secs_per_token, split_layers, LayerSplit, RemoteInput,
};
use crate::scheduler::{
    format_bytes, gpu_headroom, parse_size_arg, GpuInput, Mode, Plan, PlanInput,
};

/// Placement choices a user can make on the command line (`run`, `inspect`, `bench`).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct PlacementArgs {
    /// RAM for weights (resident tensors + streaming pool), e.g. 96M or 4G.
    /// Default: available memory (cgroup-aware) minus headroom.
    #[arg(long, value_parser = parse_size_arg)]
    pub ram_budget: Option<u64>,
    /// GPU memory for weights (resident tensors + device pool), e.g. 6G; 0
    /// runs on the CPU only. Default: the GPU's free memory minus room for
    /// the KV cache and compute buffers.
    #[arg(long, value_parser = parse_size_arg)]
    pub gpu_budget: Option<u64>,
    /// The ggml device to use as the GPU, by name (e.g. CUDA0); default: the
    /// first GPU. Naming the CPU device runs the GPU-tier code paths on the
    /// CPU (for tests).
    #[arg(long, value_name = "NAME")]
    pub gpu_device: Option<String>,
    /// How streamed tensors reach the GPU: staged (pinned host buffers, then
    /// a copy into device memory) or direct (the device computes on the host
    /// pool: Metal, APUs); auto picks by the device.
    #[arg(long, value_enum, default_value_t = Upload::Auto)]
    pub gpu_upload: Upload,
    /// The GPU shares one memory with the CPU (an APU), whatever type its
    /// driver reports (integrated GPUs are so by default): the plan uses the
    /// RAM budget for both, with no host-to-device copy term.
    #[arg(long)]
    pub gpu_unified: bool,
    /// Placement mode (default: chosen from the budgets and the model).
    #[arg(long, value_enum)]
    pub mode: Option<Mode>,
    /// Streamed layers read ahead of the one computing (default: adaptive).
    #[arg(long)]
    pub lookahead: Option<usize>,
    /// ggml RPC servers (`hypura rpc-server`) whose devices hold whole
    /// layers: HOST:PORT[,HOST:PORT...]. Used even when the model fits here;
    /// this machine keeps the first layers and streams what its RAM lacks.
    #[arg(long, value_name = "HOST:PORT,...")]
    pub rpc: Option<String>,
    /// Layer shares with --rpc, this machine first, then each remote device
    /// in order (e.g. 2,1,1); default: in proportion to the local RAM
    /// budget and each device's free memory.
    #[arg(long, value_name = "L,R1,...", requires = "rpc")]
    pub tensor_split: Option<String>,
}

/// Remote devices (ggml RPC) and the layers they hold.
#[derive(Debug, Clone)]
pub struct Cluster {
    pub remotes: Vec<super::rpc::Remote>,
    pub split: LayerSplit,
    /// The slowest median round trip to a remote device (seconds).
    pub rtt_s: f64,
}

impl Cluster {
    /// The remote devices in split order.
    pub fn devices(&self) -> Vec<Device> {
        self.remotes
            .iter()
            .flat_map(|r| r.devices.iter().copied())
            .collect()
    }
}

fn parse_split(s: &str) -> Result<Vec<f64>> {
    s.split(',')
        .map(|x| {
            x.trim()
                .parse::<f64>()
                .map_err(|_| anyhow::anyhow!("--tensor-split {s}: '{}' is not a number", x.trim()))
        })
        .collect()
}

/// Connects to `--rpc`'s servers and splits the layers between this
/// machine (`local_capacity` bytes of weights) and their devices.
fn cluster(gguf: &GgufFile, args: &PlacementArgs, local_capacity: u64) -> Result<Option<Cluster>> {
    let Some(list) = &args.rpc else {
        return Ok(None);
    };
    let endpoints = super::rpc::connect(&super::rpc::parse_endpoints(list)?)?;
    let weights = args.tensor_split.as_deref().map(parse_split).transpose()?;
    let inputs: Vec<RemoteInput> = endpoints
        .iter()
        .flat_map(|r| {
            r.devices.iter().map(|d| RemoteInput {
                device: d.name(),
                endpoint: r.endpoint.clone(),
                free: d.memory().0,
            })
        })
        .collect();
    let split = split_layers(gguf, local_capacity, &inputs, weights.as_deref())?;
    let rtt_s = endpoints
        .iter()
        .flat_map(|r| r.devices.first())
        .map(super::rpc::round_trip)
        .fold(0.0, f64::max);
    Ok(Some(Cluster {
        remotes: endpoints,
        split,
        rtt_s,
    }))
}

/// The context a plan is made for.
#[derive(Debug, Clone, Copy)]
pub struct CtxRequest {
    /// Tokens of context.
    pub n_ctx: u32,
    /// Prompt batch size.
    pub n_batch: u32,
    /// The user chose `n_ctx` (`--ctx`): never lowered.
    pub explicit: bool,
}

/// A plan and the context it leaves room for.
#[derive(Debug)]
pub struct Fitted {
    pub plan: Plan,
    /// The context size to create (lower than asked when memory is short).
    pub n_ctx: u32,
    /// No streaming plan fits: the model runs resident on llama.cpp's mmap
    /// path (no repacking), its pages read on demand and evicted by the
    /// kernel — slow, but it runs (see [`plan_for_machine`]).
    pub mmap_fallback: bool,
    /// Layers on other machines (`--rpc`); the plan covers the local rest.
    pub cluster: Option<Cluster>,
}

/// The smallest default budget with which the mmap fallback is tried: below
/// it the page cache could not hold even a layer's worth of the model.
pub const MMAP_FALLBACK_MIN: u64 = 32 << 20;

/// The RAM budget for weights: the user's, or else the memory this process
/// may use now (cgroup-aware, read live) less what the context and the rest
/// of the process need (scheduler::budget). A budget the user gave that is
/// more than the usable memory itself cannot be held: it is lowered to the
/// default, with a note; one above the default but within the usable memory
/// is honoured, with a note that it leaves the context little room.
fn ram_budget(gguf: &GgufFile, asked: Option<u64>, n_ctx: u32, n_batch: u32) -> u64 {
    let usable = crate::profiler::memory::usable_now();
    let default = ram_budget_for(usable, non_weight_bytes(gguf, n_ctx, n_batch));
    match asked {
        None => default,
        Some(b) if usable > 0 && b >= usable => {
            eprintln!(
                "note: --ram-budget {} lowered to {}: this process may use only {} of memory (MemAvailable, or its memory cgroup's limit), and the {n_ctx}-token context with the rest of the process needs about {} of it",
                format_bytes(b),
                format_bytes(default),
                format_bytes(usable),
                format_bytes(usable - default.min(usable))
            );
            default
        }
        Some(b) if usable > 0 && b > default => {
            eprintln!(
                "note: --ram-budget {} leaves {} of the {} this process may use for the {n_ctx}-token context and the rest of the process, which need about {}: it may run out of memory",
                format_bytes(b),
                format_bytes(usable - b),
                format_bytes(usable),
                format_bytes(non_weight_bytes(gguf, n_ctx, n_batch))
            );
            b
        }
        Some(b) => b,
    }
}

/// The GPU the plan may use: `None` with `--gpu-budget 0` or without a GPU.
pub fn gpu_for_machine(
    gguf: &GgufFile,
    args: &PlacementArgs,
    n_ctx: u32,
) -> Result<Option<(Device, GpuInput)>> {
    if args.gpu_budget == Some(0) {
        return Ok(None);
    }
    let Some(dev) = Device::find(args.gpu_device.as_deref())? else {
        return Ok(None);
    };
    let upload = dev.upload_path(args.gpu_upload)?;
    let (free, total) = dev.memory();
    let unified = args.gpu_unified || dev.kind() == super::device::Kind::Igpu;
    // One memory: the plan carves the device's share out of the RAM budget
    // (what the device reports free may be a small carve-out or all of RAM).
    let budget = match (args.gpu_budget, unified) {
        (Some(b), _) => b,
        (None, true) => u64::MAX,
        (None, false) => free.saturating_sub(gpu_headroom(gguf, n_ctx, total)),
    };
    if !unified && args.gpu_budget.is_some_and(|b| b > free) {
        anyhow::bail!(
            "--gpu-budget {} is more than {} has free ({}): the GPU is shared, Hypura never takes more",
            format_bytes(budget),
            dev.name(),
            format_bytes(free)
        );
    }
    let name = dev.name();
    let h2d = crate::profiler::load_cached().and_then(|p| {
        p.gpus
            .iter()
            .find(|g| g.name == name)
            .and_then(|g| g.h2d_pinned_gbps.or(g.h2d_pageable_gbps))
    });
    Ok(Some((
        dev,
        GpuInput {
            device: name,
            budget,
            h2d_gbps: h2d,
            direct: upload == Upload::Direct,
            direct_slots: upload == Upload::Direct && !dev.imports_at_host_addresses(),
            unified,
        },
    )))
}

/// The plan for `gguf` on this machine: the cached profile (if any) gives
/// the bandwidths the estimator uses; the budget is the memory usable now
/// less the context's needs; the GPU's free memory is read live (the GPU may
/// be shared). When the default budget is too small for the model at the
/// asked context and the user did not choose `--ctx`, the context is halved
/// (down to [`CTX_FLOOR`]) to make room, with a note; then, on the CPU, the
/// model runs resident on llama.cpp's mmap path (`Fitted::mmap_fallback`,
/// with a note); only when not even that leaves [`MMAP_FALLBACK_MIN`] for
/// the page cache is the plan refused, with the numbers.
pub fn plan_for_machine(gguf: &GgufFile, args: &PlacementArgs, ctx: CtxRequest) -> Result<Fitted> {
    let whole = gguf;
    let capacity = ram_budget(whole, args.ram_budget, ctx.n_ctx, ctx.n_batch);
    let cluster = cluster(whole, args, capacity)?;
    let local_gguf;
    let gguf = match &cluster {
        None => whole,
        Some(c) => {
            if args.gpu_budget != Some(0) && Device::find(args.gpu_device.as_deref())?.is_some() {
                anyhow::bail!("--rpc with a local GPU is not supported yet: pass --gpu-budget 0 (this machine then streams on the CPU)");
            }
            local_gguf = local_view(whole, &c.split);
            &local_gguf
        }
    };
    let mut fitted = fit(gguf, args, ctx)?;
    if let Some(c) = &cluster {
        let mem = crate::profiler::load_cached()
            .map(|p| p.memory.read_gbps)
            .filter(|g| *g > 0.0)
            .unwrap_or(10.0);
        let act = whole.arch_params().n_embd.unwrap_or(0) as u64 * 4;
        let extra = remote_secs_per_token(&c.split, mem, c.rtt_s, None, act);
        fitted.plan.predicted_tps = fitted
            .plan
            .predicted_tps
            .map(|t| 1.0 / (1.0 / t.max(1e-9) + extra));
    }
    fitted.cluster = cluster;
    Ok(fitted)
}

fn fit(gguf: &GgufFile, args: &PlacementArgs, ctx: CtxRequest) -> Result<Fitted> {
    let mut n_ctx = ctx.n_ctx;
    loop {
        let ram_budget = ram_budget(gguf, args.ram_budget, n_ctx, ctx.n_batch);
        match plan_with_budget(gguf, args, n_ctx, ram_budget) {
            Ok(plan) => {
                if n_ctx < ctx.n_ctx {
                    eprintln!(
                        "note: context lowered from {} to {n_ctx} tokens so that the model fits in the memory this process may use (pass --ctx to choose, --ram-budget to override)",
                        ctx.n_ctx
                    );
                }
                return Ok(Fitted {
                    plan,
                    n_ctx,
                    mmap_fallback: false,
                    cluster: None,
                });
            }
            Err(e) => {
                let Some(small) = e.downcast_ref::<RamTooSmall>() else {
                    return Err(e);
                };
                let lowerable = args.ram_budget.is_none() && !ctx.explicit && n_ctx > CTX_FLOOR;
                if lowerable {
                    n_ctx = (n_ctx / 2).max(CTX_FLOOR);
                    continue;
                }
                if args.ram_budget.is_some() {
                    return Err(e);
                }
                // The tensors a streaming plan keeps resident do not fit (a
                // large tied output matrix, say): on the CPU with no mode
                // forced, fall back to llama.cpp's mmap path rather than refuse.
                let cpu_only = gpu_for_machine(gguf, args, n_ctx)?.is_none();
                if cpu_only && args.mode.is_none() && ram_budget >= MMAP_FALLBACK_MIN {
                    let resident = PlacementArgs {
                        mode: Some(Mode::Resident),
                        ..args.clone()
                    };
                    let plan = plan_with_budget(gguf, &resident, n_ctx, ram_budget)?;
                    eprintln!(
                        "note: {}; running on llama.cpp's mmap path instead (weights paged in from disk on demand: slow); a {n_ctx}-token context",
                        small.message
                    );
                    return Ok(Fitted {
                        plan,
                        n_ctx,
                        mmap_fallback: true,
                        cluster: None,
                    });
                }
                let usable = crate::profiler::memory::usable_now();
                anyhow::bail!(
                    "{}; this process may use {} of memory (MemAvailable, or its memory cgroup's limit) and a {n_ctx}-token context with the rest of the process needs {} of it, leaving {} for weights: free memory, run with a smaller --ctx, or give --ram-budget",
                    small.message,
                    format_bytes(usable),
                    format_bytes(non_weight_bytes(gguf, n_ctx, ctx.n_batch)),
                    format_bytes(ram_budget)
                );
            }
        }
    }
}

fn plan_with_budget(
    gguf: &GgufFile,
    args: &PlacementArgs,
    n_ctx: u32,
    ram_budget: u64,
) -> Result<Plan> {
    let profile = crate::profiler::load_cached();
    let gpu = gpu_for_machine(gguf, args, n_ctx)?.map(|(_, g)| g);
    Plan::new(&PlanInput {
        gguf,
        ram_budget,
        mode: args.mode,
        // An explicit --lookahead wins (the plan refuses one deeper than the
        // model); else what `hypura bench --save` chose, capped at the layers
        // (the settings file may be for another model of the same name).
        lookahead: args.lookahead.or_else(|| {
            let layers = gguf
                .arch_params()
                .n_layer
                .unwrap_or(0)
                .max(gguf.layer_count());
            crate::config::saved_lookahead(&gguf.path).map(|l| l.min(layers as usize))
        }),
        disk_gbps: profile
            .as_ref()
            .map(|p| p.storage.best_seq_gbps)
            .filter(|g| *g > 0.0),
        mem_gbps: profile
            .as_ref()
            .map(|p| p.memory.read_gbps)
            .filter(|g| *g > 0.0),
        gpu,
    })
}
