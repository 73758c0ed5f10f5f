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

pub mod budget;
pub mod plan;
pub mod size;

pub use budget::default_ram_budget;
pub use plan::{Mode, Plan, PlanInput, StreamedTensor, Tier};
pub use size::{format_bytes, parse_size};

/// Placement choices a user can make on the command line (`run`, `inspect`, `bench`).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct PlacementArgs {
    /// RAM for weights (resident tensors + streaming pool), e.g. 96M or 4G.
    /// Default: available memory (cgroup-aware) minus headroom.
    #[arg(long, value_parser = parse_size_arg)]
    pub ram_budget: Option<u64>,
    /// Placement mode (default: chosen from the budget and the model).
    #[arg(long, value_enum)]
    pub mode: Option<Mode>,
    /// Streamed layers read ahead of the one computing (default: adaptive).
    #[arg(long)]
    pub lookahead: Option<usize>,
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

/// The plan for `gguf` on this machine: the cached profile (if any) gives
/// the default budget and the bandwidths the estimator uses.
pub fn plan_for_machine(gguf: &crate::gguf::GgufFile, args: &PlacementArgs) -> anyhow::Result<Plan> {
    let profile = crate::profiler::load_cached();
    let ram_budget = args.ram_budget.unwrap_or_else(default_ram_budget);
    Plan::new(&PlanInput {
        gguf,
        ram_budget,
        mode: args.mode,
        // An explicit --lookahead wins; else what `hypura bench --save` chose.
        lookahead: args.lookahead.or_else(|| crate::config::saved_lookahead(&gguf.path)),
        disk_gbps: profile.as_ref().map(|p| p.storage.best_seq_gbps).filter(|g| *g > 0.0),
        mem_gbps: profile.as_ref().map(|p| p.memory.read_gbps).filter(|g| *g > 0.0),
    })
}
