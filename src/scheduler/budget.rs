//! The default RAM budget for weights: the memory this process may use
//! (available memory, capped by the cgroup limit) minus headroom for the KV
//! cache, compute buffers and the rest of the system.

use crate::profiler::MachineProfile;

/// Headroom kept out of the budget: a fixed part plus a tenth of the memory.
pub const HEADROOM_FIXED: u64 = 512 << 20;

/// Default budget from the cached profile if there is one, else read live.
pub fn default_ram_budget(profile: Option<&MachineProfile>) -> u64 {
    let usable = match profile {
        Some(p) => p.memory.available_bytes.min(p.memory.effective_limit_bytes),
        None => live_usable_bytes(),
    };
    usable.saturating_sub(HEADROOM_FIXED + usable / 10)
}

/// `MemAvailable`, capped by a cgroup v2 `memory.max` minus current usage.
fn live_usable_bytes() -> u64 {
    let avail = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(u64::MAX, |kb| kb * 1024);
    let read = |p: &str| std::fs::read_to_string(p).ok().and_then(|s| s.trim().parse::<u64>().ok());
    let cg = match (read("/sys/fs/cgroup/memory.max"), read("/sys/fs/cgroup/memory.current")) {
        (Some(max), cur) => max.saturating_sub(cur.unwrap_or(0)),
        _ => match read("/sys/fs/cgroup/memory/memory.limit_in_bytes") {
            Some(max) => max.saturating_sub(read("/sys/fs/cgroup/memory/memory.usage_in_bytes").unwrap_or(0)),
            None => u64::MAX,
        },
    };
    avail.min(cg)
}
