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
pub use plan::{Mode, Plan, PlanInput, StreamedTensor};
pub use size::{format_bytes, parse_size};
