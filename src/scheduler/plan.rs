//! The placement plan: a tier for every tensor, the mode, the pool and the
//! lookahead. See the module sketch in `scheduler/mod.rs`.

use anyhow::{bail, Result};
use serde::Serialize;

use crate::gguf::{GgufFile, TensorInfo, TensorRole};
use crate::io::slot_len_for;

use super::size::format_bytes;

/// How a model runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Every tensor in RAM.
    Resident,
    /// Dense FFN layers stream from disk; a fixed set of layers is pinned.
    Dense,
    /// MoE experts stream from disk, only those the router selects.
    Experts,
}

/// Where a tensor lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    Gpu,
    Ram,
    Nvme,
}

/// What the plan is made from.
pub struct PlanInput<'a> {
    pub gguf: &'a GgufFile,
    /// Bytes for weights: resident tensors plus the streaming pool.
    pub ram_budget: u64,
    /// Forced mode; `None` picks automatically.
    pub mode: Option<Mode>,
    /// Forced lookahead; `None` adapts to the profile.
    pub lookahead: Option<usize>,
    /// Profiled sequential disk bandwidth (GB/s), if known.
    pub disk_gbps: Option<f64>,
    /// Profiled memory read bandwidth (GB/s), if known.
    pub mem_gbps: Option<f64>,
}

/// A tensor that streams from disk.
#[derive(Clone, Debug, Serialize)]
pub struct StreamedTensor {
    pub name: String,
    pub layer: u32,
    pub role: TensorRole,
    /// Absolute offset of the tensor's data in the file.
    pub file_offset: u64,
    pub size: u64,
    /// Experts in the tensor (`*_exps`), each a contiguous `size / n` range.
    pub n_experts: Option<u64>,
}

impl StreamedTensor {
    fn from_info(t: &TensorInfo) -> StreamedTensor {
        StreamedTensor {
            name: t.name.clone(),
            layer: t.layer.unwrap_or(0),
            role: t.role,
            file_offset: t.offset,
            size: t.size,
            n_experts: if t.role.is_experts() { t.n_experts() } else { None },
        }
    }
}

/// The placement plan.
#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    pub mode: Mode,
    pub ram_budget: u64,
    pub model_bytes: u64,
    pub resident_bytes: u64,
    /// Bytes of all streamed tensors (as stored on disk).
    pub streamed_bytes: u64,
    pub streamed: Vec<StreamedTensor>,
    /// Layers whose FFN stays resident (dense mode).
    pub pinned_layers: Vec<u32>,
    /// Layers whose FFN (or experts) stream.
    pub streamed_layers: Vec<u32>,
    pub lookahead: usize,
    /// Dense mode: bytes of one pool slot (the largest streamed layer, aligned).
    pub slot_bytes: u64,
    /// Pool memory for streamed tensors (slots, or the expert cache).
    pub pool_bytes: u64,
    /// Bytes read from disk per generated token (no cache hits).
    pub bytes_per_token: u64,
    /// Disk ceiling: disk bandwidth ÷ bytes per token.
    pub ceiling_tps: Option<f64>,
    /// Predicted generation speed.
    pub predicted_tps: Option<f64>,
}

impl Plan {
    /// The tier of a tensor by name.
    pub fn tier(&self, name: &str) -> Tier {
        if self.streamed.iter().any(|t| t.name == name) { Tier::Nvme } else { Tier::Ram }
    }

    /// Builds the plan.
    pub fn new(input: &PlanInput<'_>) -> Result<Plan> {
        let g = input.gguf;
        let model_bytes: u64 = g.tensors.iter().map(|t| t.size).sum();
        let has_experts = g.tensors.iter().any(|t| t.role.is_experts());
        let has_dense_ffn = g.tensors.iter().any(|t| t.role.is_dense_ffn());
        let mode = match input.mode {
            Some(m) => m,
            None if model_bytes <= input.ram_budget => Mode::Resident,
            None if has_experts => Mode::Experts,
            None => Mode::Dense,
        };
        match mode {
            Mode::Resident => Ok(Self::resident(input, model_bytes)),
            Mode::Dense => {
                if !has_dense_ffn {
                    bail!("--mode dense: this model has no dense FFN tensors to stream (try --mode experts)");
                }
                Self::dense(input, model_bytes)
            }
            Mode::Experts => {
                if !has_experts {
                    bail!("--mode experts: this model has no MoE expert tensors (try --mode dense)");
                }
                Self::experts(input, model_bytes)
            }
        }
    }

    fn resident(input: &PlanInput<'_>, model_bytes: u64) -> Plan {
        Plan {
            mode: Mode::Resident,
            ram_budget: input.ram_budget,
            model_bytes,
            resident_bytes: model_bytes,
            streamed_bytes: 0,
            streamed: Vec::new(),
            pinned_layers: Vec::new(),
            streamed_layers: Vec::new(),
            lookahead: 0,
            slot_bytes: 0,
            pool_bytes: 0,
            bytes_per_token: 0,
            ceiling_tps: None,
            predicted_tps: input.mem_gbps.map(|m| m * 1e9 / model_bytes.max(1) as f64),
        }
    }

    fn dense(input: &PlanInput<'_>, model_bytes: u64) -> Result<Plan> {
        let g = input.gguf;
        let n_layer = g.tensors.iter().filter_map(|t| t.layer).max().map_or(0, |l| l + 1) as usize;
        // Per layer: FFN bytes and the slot size its aligned reads need.
        let mut ffn = vec![0u64; n_layer];
        let mut slot = vec![0u64; n_layer];
        for t in g.tensors.iter().filter(|t| t.role.is_dense_ffn()) {
            let Some(l) = t.layer else { continue };
            ffn[l as usize] += t.size;
            slot[l as usize] += slot_len_for(t.offset, t.size as usize) as u64;
        }
        let ffn_layers: Vec<u32> = (0..n_layer as u32).filter(|&l| ffn[l as usize] > 0).collect();
        let base = model_bytes - ffn.iter().sum::<u64>();
        let slot_bytes = ffn_layers.iter().map(|&l| slot[l as usize]).max().unwrap_or(0);

        let mut lookahead = input.lookahead.unwrap_or_else(|| adaptive_lookahead(input, &ffn, model_bytes, n_layer));
        let min_need = base + slot_bytes;
        if input.ram_budget < min_need {
            bail!(
                "RAM budget {} is too small for this model: its non-FFN tensors need {} and one streamed layer {} (at least {} in all)",
                format_bytes(input.ram_budget),
                format_bytes(base),
                format_bytes(slot_bytes),
                format_bytes(min_need)
            );
        }
        // Lookahead costs pool memory; with an adaptive depth shrink it to fit.
        let fits = |l: usize| base + (l as u64 + 1) * slot_bytes <= input.ram_budget;
        if !fits(lookahead) {
            if input.lookahead.is_some() {
                bail!(
                    "RAM budget {} cannot hold lookahead {lookahead}: {} resident + {} × {} pool",
                    format_bytes(input.ram_budget),
                    format_bytes(base),
                    lookahead + 1,
                    format_bytes(slot_bytes)
                );
            }
            while lookahead > 0 && !fits(lookahead) {
                lookahead -= 1;
            }
        }

        // Pin as many layers as the rest of the budget holds, spread evenly so
        // that the disk keeps reading while pinned layers compute.
        let n_slots_max = (lookahead + 1) as u64;
        let mut m = ffn_layers.len();
        let pinned = loop {
            let cand = spread(&ffn_layers, m);
            let n_streamed = (ffn_layers.len() - cand.len()) as u64;
            let pool = n_slots_max.min(n_streamed) * slot_bytes;
            let pinned_bytes: u64 = cand.iter().map(|&l| ffn[l as usize]).sum();
            if n_streamed > 0 && base + pinned_bytes + pool <= input.ram_budget {
                break cand;
            }
            if m == 0 {
                break Vec::new();
            }
            m -= 1;
        };
        let streamed_layers: Vec<u32> = ffn_layers.iter().copied().filter(|l| !pinned.contains(l)).collect();
        let n_slots = (lookahead + 1).min(streamed_layers.len());
        let streamed: Vec<StreamedTensor> = g
            .tensors
            .iter()
            .filter(|t| t.role.is_dense_ffn() && t.layer.is_some_and(|l| streamed_layers.contains(&l)))
            .map(StreamedTensor::from_info)
            .collect();
        let streamed_bytes: u64 = streamed.iter().map(|t| t.size).sum();
        let pool_bytes = n_slots as u64 * slot_bytes;
        let mut plan = Plan {
            mode: Mode::Dense,
            ram_budget: input.ram_budget,
            model_bytes,
            resident_bytes: model_bytes - streamed_bytes,
            streamed_bytes,
            streamed,
            pinned_layers: pinned,
            streamed_layers,
            lookahead,
            slot_bytes,
            pool_bytes,
            bytes_per_token: streamed_bytes,
            ceiling_tps: None,
            predicted_tps: None,
        };
        plan.estimate(input, model_bytes);
        Ok(plan)
    }

    fn experts(input: &PlanInput<'_>, model_bytes: u64) -> Result<Plan> {
        let g = input.gguf;
        let params = g.arch_params();
        let streamed: Vec<StreamedTensor> = g
            .tensors
            .iter()
            .filter(|t| t.role.is_experts())
            .map(StreamedTensor::from_info)
            .collect();
        let streamed_bytes: u64 = streamed.iter().map(|t| t.size).sum();
        let base = model_bytes - streamed_bytes;
        let mut layers: Vec<u32> = streamed.iter().map(|t| t.layer).collect();
        layers.dedup();
        let k = params.n_expert_used.unwrap_or(1).max(1) as u64;
        // One expert of every streamed tensor of a layer, as read (aligned).
        let layer_expert_bytes = |l: u32| -> u64 {
            streamed
                .iter()
                .filter(|t| t.layer == l)
                .map(|t| t.size / t.n_experts.unwrap_or(1).max(1) + 2 * crate::io::ALIGN as u64)
                .sum()
        };
        let max_layer_expert = layers.iter().map(|&l| layer_expert_bytes(l)).max().unwrap_or(0);
        let lookahead = input.lookahead.unwrap_or(1);
        // The pool must hold one layer's selected experts plus the prefetched
        // layers'; everything else of the budget is expert cache.
        let min_pool = k * max_layer_expert * (lookahead as u64 + 1);
        if input.ram_budget < base + min_pool {
            bail!(
                "RAM budget {} is too small for this model: its non-expert tensors need {} and the expert pool at least {}",
                format_bytes(input.ram_budget),
                format_bytes(base),
                format_bytes(min_pool)
            );
        }
        let pool_bytes = (input.ram_budget - base).min(streamed_bytes + streamed.len() as u64 * 2 * crate::io::ALIGN as u64);
        let per_token: u64 = layers.iter().map(|&l| k * layer_expert_bytes(l)).sum();
        let mut plan = Plan {
            mode: Mode::Experts,
            ram_budget: input.ram_budget,
            model_bytes,
            resident_bytes: base,
            streamed_bytes,
            streamed,
            pinned_layers: Vec::new(),
            streamed_layers: layers,
            lookahead,
            slot_bytes: max_layer_expert,
            pool_bytes,
            bytes_per_token: per_token,
            ceiling_tps: None,
            predicted_tps: None,
        };
        plan.estimate(input, model_bytes);
        Ok(plan)
    }

    /// Fills the ceiling (disk ÷ bytes per token) and the prediction: with
    /// lookahead the read of one layer overlaps the compute of others, so a
    /// token costs max(read time, compute time), plus a stall per token that
    /// lookahead 0 cannot hide.
    fn estimate(&mut self, input: &PlanInput<'_>, model_bytes: u64) {
        let Some(disk) = input.disk_gbps.filter(|d| *d > 0.0) else { return };
        let read_s = self.bytes_per_token as f64 / (disk * 1e9);
        self.ceiling_tps = (read_s > 0.0).then(|| 1.0 / read_s);
        let compute_bytes = match self.mode {
            Mode::Experts => self.resident_bytes as f64 + self.bytes_per_token as f64,
            _ => model_bytes as f64,
        };
        let compute_s = input.mem_gbps.filter(|m| *m > 0.0).map_or(0.0, |m| compute_bytes / (m * 1e9));
        // Dense layers are read ahead, so reads overlap compute when L ≥ 1.
        // Experts cannot be read before the router picks them: serial.
        let overlap = self.lookahead > 0 && self.mode == Mode::Dense;
        let token_s = if overlap { read_s.max(compute_s) } else { read_s + compute_s };
        self.predicted_tps = (token_s > 0.0).then(|| 1.0 / token_s);
    }
}

/// `m` of `layers`, evenly spread.
fn spread(layers: &[u32], m: usize) -> Vec<u32> {
    let n = layers.len();
    if m == 0 || n == 0 {
        return Vec::new();
    }
    let m = m.min(n);
    let mut out: Vec<u32> = (0..m).map(|i| layers[i * n / m]).collect();
    out.dedup();
    out
}

/// Enough layers in flight to cover a layer's read time with compute time,
/// from the profile; 2 when the machine has not been profiled.
fn adaptive_lookahead(input: &PlanInput<'_>, ffn: &[u64], model_bytes: u64, n_layer: usize) -> usize {
    let (Some(disk), Some(mem)) = (input.disk_gbps, input.mem_gbps) else { return 2 };
    if disk <= 0.0 || mem <= 0.0 || n_layer == 0 {
        return 2;
    }
    let layer_ffn = ffn.iter().copied().max().unwrap_or(0) as f64;
    let read_s = layer_ffn / (disk * 1e9);
    let compute_s = (model_bytes as f64 / n_layer as f64) / (mem * 1e9);
    let l = if compute_s > 0.0 { (read_s / compute_s).ceil() as usize } else { 2 };
    l.clamp(1, 8)
}

#[cfg(test)]
mod tests {
    use super::spread;

    #[test]
    fn spread_is_even_and_unique() {
        let layers: Vec<u32> = (0..10).collect();
        assert_eq!(spread(&layers, 0), Vec::<u32>::new());
        assert_eq!(spread(&layers, 2), vec![0, 5]);
        assert_eq!(spread(&layers, 5), vec![0, 2, 4, 6, 8]);
        assert_eq!(spread(&layers, 10), layers);
    }
}
