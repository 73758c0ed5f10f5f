//! Counters of the streaming engine.

use serde::Serialize;

/// Counters of the streaming engine (totals since start).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct StreamMetrics {
    /// Bytes read from disk (aligned reads, as the drive saw them).
    pub bytes_read: u64,
    /// Read requests submitted.
    pub reads: u64,
    /// Time the compute waited on I/O.
    pub stall_ns: u64,
    /// Time spent inside the callback with the I/O engine busy (for GB/s).
    pub io_busy_ns: u64,
    /// Expert loads avoided because an earlier token had loaded the expert.
    pub expert_hits: u64,
    /// Experts read from disk.
    pub expert_misses: u64,
    /// Full passes over the layers (one per decode/ubatch).
    pub passes: u64,
    /// Bytes copied host→device (GPU tier, staged).
    pub upload_bytes: u64,
    /// Selected experts already in their GPU slot (no copy, no read).
    pub gpu_hits: u64,
    /// Pre-gating: experts predicted, and how many of them were picked.
    pub predicted: u64,
    pub predicted_used: u64,
    /// Experts read ahead on a prediction, and how many of them were picked.
    pub prefetched: u64,
    pub prefetch_used: u64,
    /// Bytes of evicted experts' pages moved to missing experts (not
    /// faulted in fresh).
    pub recycled_bytes: u64,
}

impl StreamMetrics {
    pub fn since(&self, earlier: &StreamMetrics) -> StreamMetrics {
        StreamMetrics {
            bytes_read: self.bytes_read - earlier.bytes_read,
            reads: self.reads - earlier.reads,
            stall_ns: self.stall_ns - earlier.stall_ns,
            io_busy_ns: self.io_busy_ns - earlier.io_busy_ns,
            expert_hits: self.expert_hits - earlier.expert_hits,
            expert_misses: self.expert_misses - earlier.expert_misses,
            passes: self.passes - earlier.passes,
            upload_bytes: self.upload_bytes - earlier.upload_bytes,
            gpu_hits: self.gpu_hits - earlier.gpu_hits,
            predicted: self.predicted - earlier.predicted,
            predicted_used: self.predicted_used - earlier.predicted_used,
            prefetched: self.prefetched - earlier.prefetched,
            prefetch_used: self.prefetch_used - earlier.prefetch_used,
            recycled_bytes: self.recycled_bytes - earlier.recycled_bytes,
        }
    }

    /// The sum of two phases' counters.
    pub fn plus(&self, o: &StreamMetrics) -> StreamMetrics {
        StreamMetrics {
            bytes_read: self.bytes_read + o.bytes_read,
            reads: self.reads + o.reads,
            stall_ns: self.stall_ns + o.stall_ns,
            io_busy_ns: self.io_busy_ns + o.io_busy_ns,
            expert_hits: self.expert_hits + o.expert_hits,
            expert_misses: self.expert_misses + o.expert_misses,
            passes: self.passes + o.passes,
            upload_bytes: self.upload_bytes + o.upload_bytes,
            gpu_hits: self.gpu_hits + o.gpu_hits,
            predicted: self.predicted + o.predicted,
            predicted_used: self.predicted_used + o.predicted_used,
            prefetched: self.prefetched + o.prefetched,
            prefetch_used: self.prefetch_used + o.prefetch_used,
            recycled_bytes: self.recycled_bytes + o.recycled_bytes,
        }
    }

    /// Fraction of pre-gating's predicted experts the router picked.
    pub fn prediction_precision(&self) -> Option<f64> {
        (self.predicted > 0).then(|| self.predicted_used as f64 / self.predicted as f64)
    }

    /// Fraction of the experts read ahead that were picked.
    pub fn prefetch_used_rate(&self) -> Option<f64> {
        (self.prefetched > 0).then(|| self.prefetch_used as f64 / self.prefetched as f64)
    }
    /// Fraction of the bytes read that landed in recycled pages.
    pub fn recycled_rate(&self) -> Option<f64> {
        (self.recycled_bytes > 0 && self.bytes_read > 0)
            .then(|| self.recycled_bytes as f64 / self.bytes_read as f64)
    }

    /// Cross-token expert cache hit rate in [0, 1]: selections served
    /// without a disk read (from the RAM cache or the GPU slot).
    pub fn hit_rate(&self) -> Option<f64> {
        let hits = self.expert_hits + self.gpu_hits;
        let n = hits + self.expert_misses;
        (n > 0).then(|| hits as f64 / n as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::StreamMetrics;

    #[test]
    fn since_and_hit_rate() {
        let a = StreamMetrics {
            bytes_read: 10,
            expert_hits: 1,
            expert_misses: 3,
            gpu_hits: 0,
            passes: 2,
            ..StreamMetrics::default()
        };
        let b = StreamMetrics {
            bytes_read: 25,
            expert_hits: 4,
            expert_misses: 4,
            gpu_hits: 2,
            passes: 5,
            ..a
        };
        let d = b.since(&a);
        assert_eq!((d.bytes_read, d.passes), (15, 3));
        assert_eq!((d.expert_hits, d.expert_misses, d.gpu_hits), (3, 1, 2));
        // Hits from the RAM cache and the GPU slot both count.
        assert_eq!(d.hit_rate(), Some(5.0 / 6.0));
        assert_eq!(StreamMetrics::default().hit_rate(), None);
    }
}
