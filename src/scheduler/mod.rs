//! Placement: which tensors stay resident and which stream from NVMe, the
//! pool that streamed tensors are read into, the prefetch depth, and the
//! predicted speed.
//!
//! # Sketch (bytes per token, bandwidth, lookahead)
//! A dense model streams, per token, the FFN bytes of every layer that is not
//! pinned: `S = Σ_streamed ffn_bytes(layer)`. The disk ceiling is
//! `tok/s ≤ disk_bw / S`. Compute reads every weight once per token, so a
//! layer computes in about `layer_bytes / mem_bw`; a streamed layer takes
//! `ffn_bytes / disk_bw` to read. Lookahead `L` hides reads behind compute when
//! `L ≥ ceil(read_time / compute_time)` of the layers between two streamed
//! ones; on NVMe (2–7 GB/s) against DRAM (20–100 GB/s) reads are 5–20× slower
//! than compute, so the disk is the limit and L only needs to keep the queue
//! full (2–4). Each extra lookahead slot costs one layer of pool memory that
//! could have pinned a layer instead, so L is capped at what the budget allows.
//!
//! Residency is scan-resistant: a fixed set of layers is pinned (never
//! evicted) and the rest streams every token; an LRU over a cyclic scan of
//! layers would hit ~0%.
//!
//! MoE models stream only the experts the router picks: per token and layer
//! `k` of `n` experts, so `S = Σ_layers k × expert_bytes × (1 − hit rate)`.
//!
//! With a GPU (sketch, numbers from the lent H200: disk 2 GB/s, pinned
//! host→device `P` 55 GB/s, pageable 7–9, RAM 140 GB/s): streamed bytes cross
//! the disk and then PCIe, so the ceiling is `min(D, P) / S`; PCIe is ~25×
//! the disk, so RAM-held layers (read once, copied every token at `P`) cost
//! ~4% of a disk read, and the device needs only two slots (computing,
//! copying) while reads run `L` layers ahead in host staging. The CPU shape
//! (FFN/experts on the CPU) instead costs `bytes / M` of CPU compute per
//! token; the plan estimates both and keeps the faster (see `plan.rs`).

pub mod budget;
pub mod plan;
pub mod size;

pub use budget::default_ram_budget;
pub use plan::{GpuInput, GpuPlan, Mode, Plan, PlanInput, StreamedTensor, Tier};
pub use size::{format_bytes, parse_size};

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
    #[arg(long, value_enum, default_value_t = crate::engine::device::Upload::Auto)]
    pub gpu_upload: crate::engine::device::Upload,
    /// Placement mode (default: chosen from the budgets and the model).
    #[arg(long, value_enum)]
    pub mode: Option<Mode>,
    /// Streamed layers read ahead of the one computing (default: adaptive).
    #[arg(long)]
    pub lookahead: Option<usize>,
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

/// GPU memory kept free for what is not weights: the KV cache of `n_ctx`
/// tokens (f16 K and V), compute buffers (a fixed part plus the logits of a
/// 512-token batch), and 5% of the card.
pub fn gpu_headroom(gguf: &crate::gguf::GgufFile, n_ctx: u32, total: u64) -> u64 {
    let p = gguf.arch_params();
    let n_layer = p.n_layer.unwrap_or(0) as u64;
    let embd = p.n_embd.unwrap_or(0) as u64;
    let heads = p.n_head.unwrap_or(1).max(1) as u64;
    let kv_heads = p.n_head_kv.unwrap_or(heads as u32) as u64;
    let kv = 2 * n_layer * n_ctx as u64 * (embd / heads) * kv_heads * 2;
    let logits = 512 * p.vocab_size.unwrap_or(0) as u64 * 4;
    kv + logits + (512 << 20) + total / 20
}

/// The GPU the plan may use: `None` with `--gpu-budget 0` or without a GPU.
pub fn gpu_for_machine(
    gguf: &crate::gguf::GgufFile,
    args: &PlacementArgs,
    n_ctx: u32,
) -> anyhow::Result<Option<(crate::engine::device::Device, GpuInput)>> {
    if args.gpu_budget == Some(0) {
        return Ok(None);
    }
    let Some(dev) = crate::engine::device::Device::find(args.gpu_device.as_deref())? else {
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
            direct: upload == crate::engine::device::Upload::Direct,
        },
    )))
}

/// The plan for `gguf` on this machine: the cached profile (if any) gives
/// the default budget and the bandwidths the estimator uses; the GPU's free
/// memory is read live (the GPU may be shared).
pub fn plan_for_machine(
    gguf: &crate::gguf::GgufFile,
    args: &PlacementArgs,
    n_ctx: u32,
) -> anyhow::Result<Plan> {
    let profile = crate::profiler::load_cached();
    let ram_budget = args.ram_budget.unwrap_or_else(default_ram_budget);
    let gpu = gpu_for_machine(gguf, args, n_ctx)?.map(|(_, g)| g);
    Plan::new(&PlanInput {
        gguf,
        ram_budget,
        mode: args.mode,
        // An explicit --lookahead wins; else what `hypura bench --save` chose.
        lookahead: args
            .lookahead
            .or_else(|| crate::config::saved_lookahead(&gguf.path)),
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

/// The default context size: min(4096, the model's training context).
pub fn default_ctx(gguf: &crate::gguf::GgufFile) -> u32 {
    4096.min(gguf.arch_params().n_ctx_train.unwrap_or(4096).max(1))
}
