//! The default RAM budget for weights: the memory this process may use
//! (available memory, capped by its memory cgroup's limit; the caller reads
//! it live, so that it sees the cgroup this process runs in) minus headroom
//! for the KV cache, compute buffers and the rest of the system.

/// Headroom kept out of the budget: a fixed part plus a tenth of the memory.
pub const HEADROOM_FIXED: u64 = 512 << 20;

/// Default budget for weights when `usable` bytes of memory are usable.
pub fn ram_budget_for(usable: u64) -> u64 {
    usable.saturating_sub(HEADROOM_FIXED + usable / 10)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headroom_is_fixed_plus_a_tenth() {
        assert_eq!(
            ram_budget_for(10 << 30),
            (10 << 30) - (512 << 20) - (1 << 30)
        );
        assert_eq!(ram_budget_for(100 << 20), 0);
    }
}
