//! The plan's predicted tokens per second, from the disk's bandwidth and
//! the bytes each token reads (see the sketch in `scheduler/mod.rs`).

use super::*;

impl Plan {
    /// Fills the ceiling and the prediction.
    ///
    /// - Ceiling: the slowest link the streamed bytes cross ÷ bytes per
    ///   token: the disk; for a discrete GPU min(disk, host→device).
    /// - CPU dense: reads overlap compute with lookahead ≥ 1, so a token
    ///   costs max(read, compute), compute = the bytes the CPU computes on ÷
    ///   memory bandwidth (with a GPU only the FFN layers; the GPU's part is
    ///   taken as free next to them).
    /// - GPU dense: max(disk, upload) time of the streamed bytes; a discrete
    ///   GPU's compute is taken as free; one that computes on host memory
    ///   (unified/direct: no upload term) reads every weight from it, so
    ///   its compute is model bytes ÷ memory bandwidth.
    /// - Experts cannot be read before the router picks them: read and
    ///   compute add up. The RAM cache holds a fraction `c` of the experts,
    ///   taken as the fraction of selections it serves (uniform routing,
    ///   a floor: real routing is skewed); GPU-dedicated layers keep their
    ///   experts on the GPU the same way.
    pub(super) fn estimate(&mut self, input: &PlanInput<'_>, model_bytes: u64, ffn: &[u64]) {
        let Some(disk) = input.disk_gbps.filter(|d| *d > 0.0) else {
            return;
        };
        let disk = disk * 1e9;
        let mem = input.mem_gbps.filter(|m| *m > 0.0).map(|m| m * 1e9);
        let h2d = self
            .gpu
            .as_ref()
            .filter(|g| !g.direct)
            .map(|g| g.h2d_gbps * 1e9);
        let link = h2d.map_or(disk, |h| disk.min(h));
        let per_tok = self.bytes_per_token as f64;
        self.ceiling_tps = (per_tok > 0.0).then(|| link / per_tok);
        if let (Mode::GpuDense, Some(h)) = (self.mode, h2d) {
            // Layers kept in RAM skip the disk but still cross the link.
            let t = (per_tok / disk).max(self.streamed_bytes as f64 / h);
            self.ceiling_tps = (t > 0.0).then(|| 1.0 / t);
        }
        let cpu = |bytes: f64| mem.map_or(0.0, |m| bytes / m);
        let token_s = match self.mode {
            Mode::Resident => return,
            Mode::Dense => {
                let cpu_bytes = if self.gpu.is_some() {
                    ffn.iter().sum::<u64>() as f64
                } else {
                    model_bytes as f64
                };
                let read = per_tok / disk;
                if self.lookahead > 0 {
                    read.max(cpu(cpu_bytes))
                } else {
                    read + cpu(cpu_bytes)
                }
            }
            Mode::GpuDense => {
                // Every streamed layer is copied; only those not in RAM are read.
                let up = h2d.map_or(0.0, |h| self.streamed_bytes as f64 / h);
                // A device that computes on host memory (an APU's iGPU, the
                // CPU device) reads every weight from that memory each token:
                // memory bandwidth, not a copy, bounds its compute. A discrete
                // GPU's own memory is taken as free next to the link.
                let compute = if h2d.is_none() {
                    cpu(model_bytes as f64)
                } else {
                    0.0
                };
                let read = per_tok / disk;
                if self.lookahead > 0 {
                    read.max(up).max(compute)
                } else {
                    read + up + compute
                }
            }
            Mode::Experts | Mode::GpuExperts => {
                let c = (self.pool_bytes as f64 / self.streamed_bytes.max(1) as f64).min(1.0);
                let from_disk = per_tok * (1.0 - c) / disk;
                if self.mode == Mode::Experts {
                    let base = if self.gpu.is_some() {
                        0.0
                    } else {
                        self.resident_bytes as f64
                    };
                    from_disk + cpu(base + per_tok)
                } else {
                    // The GPU computes on the active experts at its memory
                    // bandwidth (unknown: taken as 10x the host's; the
                    // host's own for a device that computes on host memory).
                    let gpu_bw = mem.map(|m| if h2d.is_some() { 10.0 * m } else { m });
                    let compute = gpu_bw.map_or(0.0, |b| per_tok / b);
                    let n = self.streamed_layers.len().max(1) as f64;
                    let v = self
                        .gpu
                        .as_ref()
                        .map_or(0.0, |g| g.dedicated_layers.len() as f64 / n);
                    // Dedicated layers keep what they loaded: uniform routing
                    // over a warm cache serves about the RAM-cache fraction too.
                    let miss = 1.0 - v * c.max(0.0);
                    compute + miss * (from_disk + h2d.map_or(0.0, |h| per_tok / h))
                }
            }
        };
        self.predicted_tps = (token_s > 0.0).then(|| 1.0 / token_s);
    }
}
