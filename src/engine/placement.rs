//! The facts of this machine that a placement plan is made from, gathered
//! here (above the scheduler, which only does the arithmetic): the cached
//! machine profile (disk and memory bandwidth, host→device copy speed), live
//! free memory (RAM and the GPU's), the lookahead `hypura bench --save`
//! stored, and the GPU itself ([`Device`]).

use anyhow::Result;

use super::device::{Device, Upload};
use crate::gguf::GgufFile;
use crate::scheduler::{
    format_bytes, gpu_headroom, parse_size_arg, ram_budget_for, GpuInput, Mode, Plan, PlanInput,
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
    /// Placement mode (default: chosen from the budgets and the model).
    #[arg(long, value_enum)]
    pub mode: Option<Mode>,
    /// Streamed layers read ahead of the one computing (default: adaptive).
    #[arg(long)]
    pub lookahead: Option<usize>,
}

/// Default RAM budget for weights: the memory this process may use now
/// (cgroup-aware, read live) less the scheduler's headroom.
pub fn default_ram_budget() -> u64 {
    ram_budget_for(crate::profiler::memory::usable_now())
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
    let budget = args
        .gpu_budget
        .unwrap_or_else(|| free.saturating_sub(gpu_headroom(gguf, n_ctx, total)));
    if args.gpu_budget.is_some_and(|b| b > free) {
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
        },
    )))
}

/// The plan for `gguf` on this machine: the cached profile (if any) gives
/// the default budget and the bandwidths the estimator uses; the GPU's free
/// memory is read live (the GPU may be shared).
pub fn plan_for_machine(gguf: &GgufFile, args: &PlacementArgs, n_ctx: u32) -> Result<Plan> {
    let profile = crate::profiler::load_cached();
    let ram_budget = args.ram_budget.unwrap_or_else(default_ram_budget);
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
