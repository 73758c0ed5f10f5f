//! Placement: which tensors stay resident and which stream from NVMe, the
//! pool that streamed tensors are read into, the prefetch depth, and the
//! predicted speed.
//!
//! # Sketch (bytes per token, bandwidth, lookahead)
//! A dense model streams, per token, the FFN bytes of every layer that is not
//! pinned: `S = Σ_streamed ffn_bytes(layer)`. The disk ceiling is
//! `tok/s ≤ disk_bw / S`. Compute reads every weight once per token, so a
//! layer computes in about `layer_bytes / mem_bw`; a streamed layer takes
//! `ffn_bytes / disk_bw` to read. The pool is only as deep as the disk needs
//! (`depth.rs`: depth 1 or 2 from the profiled disk against the compute per
//! layer, each depth judged with the layers its pool leaves room to pin);
//! every other byte of the budget pins layers, which cuts `S`.
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
//!
//! The scheduler only computes: the machine's facts (budgets, bandwidths,
//! the GPU's free memory, a saved lookahead) come in as numbers in
//! [`PlanInput`]; `engine::placement` gathers them.

pub mod budget;
pub mod depth;
pub mod plan;
pub mod size;
pub mod split;

use crate::gguf::GgufFile;

pub use budget::ram_budget_for;
pub use plan::{EmbdRows, GpuInput, GpuPlan, Mode, Plan, PlanInput, StreamedTensor, Tier};
pub use size::{format_bytes, parse_size, parse_size_arg};

/// GPU memory kept free for what is not weights: the KV cache of `n_ctx`
/// tokens (f16 K and V), compute buffers (a fixed part plus the logits of a
/// 512-token batch), and 5% of the card.
pub fn gpu_headroom(gguf: &GgufFile, n_ctx: u32, total: u64) -> u64 {
    let p = gguf.arch_params();
    let logits = 512 * p.vocab_size.unwrap_or(0) as u64 * 4;
    kv_cache_bytes(gguf, n_ctx)
        .saturating_add(logits)
        .saturating_add(512 << 20)
        .saturating_add(total / 20)
}

/// The KV cache of `n_ctx` tokens, f16 K and V on every layer (an estimate:
/// heads of `embedding_length / head_count`, no sliding windows). Saturates.
pub fn kv_cache_bytes(gguf: &GgufFile, n_ctx: u32) -> u64 {
    let p = gguf.arch_params();
    let n_layer = p.n_layer.unwrap_or(0) as u64;
    let embd = p.n_embd.unwrap_or(0) as u64;
    let heads = p.n_head.unwrap_or(1).max(1) as u64;
    let kv_heads = p.n_head_kv.unwrap_or(heads as u32) as u64;
    [n_layer, u64::from(n_ctx), embd / heads, kv_heads, 2]
        .iter()
        .fold(2u64, |acc, &x| acc.saturating_mul(x))
}

/// The default context size: min(4096, the model's training context).
pub fn default_ctx(gguf: &GgufFile) -> u32 {
    4096.min(gguf.arch_params().n_ctx_train.unwrap_or(4096).max(1))
}
