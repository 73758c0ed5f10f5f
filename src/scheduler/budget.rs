//! The default RAM budget for weights: the memory this process may use
//! (available memory, capped by its memory cgroup's limit; the caller reads
//! it live, so that it sees the cgroup this process runs in) minus what the
//! process needs besides the weights — derived from the model and the
//! context, not guessed:
//!
//! - the process itself (code, ggml, threads): [`PROCESS_BASE`];
//! - the vocabulary's tables (llama.cpp keeps token strings, scores and
//!   maps): [`VOCAB_BYTES_PER_TOKEN`] per vocabulary entry;
//! - the KV cache of `n_ctx` tokens ([`super::kv_cache_bytes`], f16 K and V);
//! - the compute buffer's pages that a prompt batch of `n_batch` tokens
//!   touches: the activations of the widest layer, [`ACTIVATION_BYTES`] per
//!   token and element of `n_embd + n_ff` (llama.cpp *reserves* logits for a
//!   whole batch as well, 310 MB at a 151k vocabulary, but only the outputs a
//!   batch asks for are ever written, and the engine asks for the last
//!   position only; untouched pages cost no memory);
//! - the outputs' logits ([`OUTPUT_ROWS`] rows of the vocabulary, f32);
//! - slack for the allocator and page-cache churn: [`slack`].
//!
//! Measured, what the process holds besides its weights: peak RSS minus
//! resident weights (resident runs, 501-token prompt, 2 threads) at ctx 512 —
//! SmolLM2 60 MiB, Gemma 3 270M 114, Qwen2.5 0.5B 147; at ctx 4096 — 139,
//! 183, 189; Qwen2.5 1.5B streaming in a 700 MiB cgroup (`PEAK=1
//! scripts/in-cgroup.sh`, `--ram-budget 450M`, ctx 4096): cgroup peak 660 MiB,
//! so ~210 MiB besides the weights. The estimate: 92/145/135 at ctx 512,
//! 171/185/177 at 4096, 269 for the 1.5B — within [`slack`] below the
//! smallest measurement (Qwen2.5 0.5B, 12 MiB under) and above the rest.

use crate::gguf::GgufFile;

/// The process without weights or context: binary, ggml, thread stacks.
pub const PROCESS_BASE: u64 = 56 << 20;
/// llama.cpp's vocabulary tables, per token of the vocabulary.
pub const VOCAB_BYTES_PER_TOKEN: u64 = 256;
/// Bytes of activations per batch token and element of `n_embd + n_ff`.
pub const ACTIVATION_BYTES: u64 = 12;
/// Rows of logits the outputs hold (one per sequence; a few for safety).
pub const OUTPUT_ROWS: u64 = 4;
/// The smallest context the default plan lowers `--ctx` to when memory is short.
pub const CTX_FLOOR: u32 = 512;

/// What the process needs besides the weights for `n_ctx` tokens of context
/// and prompt batches of `n_batch` tokens (see the module docs). Saturates.
pub fn non_weight_bytes(gguf: &GgufFile, n_ctx: u32, n_batch: u32) -> u64 {
    let p = gguf.arch_params();
    let vocab = u64::from(p.vocab_size.unwrap_or(0));
    let embd = u64::from(p.n_embd.unwrap_or(0));
    // A MoE layer's widest activation is its selected experts' FFN.
    let ff_moe =
        u64::from(p.n_ff_exp.unwrap_or(0)).saturating_mul(u64::from(p.n_expert_used.unwrap_or(0)));
    let ff = u64::from(p.n_ff.unwrap_or(0)).max(ff_moe);
    let batch = u64::from(n_batch.min(n_ctx).max(1));
    let activations = batch
        .saturating_mul(embd.saturating_add(ff))
        .saturating_mul(ACTIVATION_BYTES);
    PROCESS_BASE
        .saturating_add(vocab.saturating_mul(VOCAB_BYTES_PER_TOKEN))
        .saturating_add(vocab.saturating_mul(4 * OUTPUT_ROWS))
        .saturating_add(activations)
        .saturating_add(super::kv_cache_bytes(gguf, n_ctx))
}

/// Memory kept free beyond the estimate: 1/16 of what is usable, at least
/// 16 MiB and at most 512 MiB.
pub fn slack(usable: u64) -> u64 {
    (usable / 16).clamp(16 << 20, 512 << 20)
}

/// Default budget for weights when `usable` bytes of memory are usable and
/// the rest of the process needs `non_weight` bytes.
pub fn ram_budget_for(usable: u64, non_weight: u64) -> u64 {
    usable.saturating_sub(non_weight.saturating_add(slack(usable)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_is_what_is_left_after_the_context_and_slack() {
        assert_eq!(
            ram_budget_for(10 << 30, 300 << 20),
            (10 << 30) - (300 << 20) - (512 << 20)
        );
        assert_eq!(
            ram_budget_for(640 << 20, 200 << 20),
            (640 << 20) - (200 << 20) - (40 << 20)
        );
        assert_eq!(ram_budget_for(100 << 20, 200 << 20), 0);
        assert_eq!(slack(0), 16 << 20);
    }
}
