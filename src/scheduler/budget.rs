//! The default RAM budget for weights: the memory this process may use
//! (available memory, capped by its memory cgroup's limit, read live so that
//! it sees the cgroup this process runs in) minus headroom for the KV cache,
//! compute buffers and the rest of the system.

/// Headroom kept out of the budget: a fixed part plus a tenth of the memory.
pub const HEADROOM_FIXED: u64 = 512 << 20;

/// Default budget for weights.
pub fn default_ram_budget() -> u64 {
    let usable = crate::profiler::memory::usable_now();
    usable.saturating_sub(HEADROOM_FIXED + usable / 10)
}
