//! The placement plan: a tier for every tensor, the mode, the pool and the
//! lookahead. See the module sketch in `scheduler/mod.rs`.

use anyhow::{bail, Result};
use serde::Serialize;

use crate::gguf::{GgufFile, TensorInfo, TensorRole};
use crate::io::slot_len_for;

use super::depth;
use super::size::format_bytes;

mod estimate;
mod rows;

pub use rows::EmbdRows;

/// The plan's error when the RAM budget cannot hold the smallest placement
/// (the caller may free memory elsewhere, e.g. a smaller context, and retry).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct RamTooSmall {
    /// The smallest RAM budget this model's placement needs.
    pub needed: u64,
    pub message: String,
}

/// How a model runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Every tensor in RAM.
    Resident,
    /// Dense FFN layers stream from disk; a fixed set of layers is pinned.
    Dense,
    /// MoE experts stream from disk, only those the router selects.
    Experts,
    /// Dense FFN layers stream into a pool on the GPU and compute there
    /// (as many FFN layers as fit stay on the GPU).
    GpuDense,
    /// Selected experts stream into per-layer slots on the GPU and compute
    /// there; host RAM caches experts between the disk and the GPU.
    GpuExperts,
}

impl Mode {
    /// Streamed tensors compute on the GPU (out of a device pool).
    pub fn on_gpu(self) -> bool {
        matches!(self, Mode::GpuDense | Mode::GpuExperts)
    }
    /// Dense FFN layers stream (on either side).
    pub fn streams_dense(self) -> bool {
        matches!(self, Mode::Dense | Mode::GpuDense)
    }
    /// Experts stream (on either side).
    pub fn streams_experts(self) -> bool {
        matches!(self, Mode::Experts | Mode::GpuExperts)
    }
    pub fn label(self) -> &'static str {
        match self {
            Mode::Resident => "resident",
            Mode::Dense => "dense",
            Mode::Experts => "experts",
            Mode::GpuDense => "gpu-dense",
            Mode::GpuExperts => "gpu-experts",
        }
    }
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
    /// The GPU to place on, if any.
    pub gpu: Option<GpuInput>,
}

/// What the plan knows about the GPU.
#[derive(Clone, Debug)]
pub struct GpuInput {
    pub device: String,
    /// Bytes of weights the GPU may hold (resident tensors + device pool).
    pub budget: u64,
    /// Host→device copy bandwidth (GB/s), if profiled.
    pub h2d_gbps: Option<f64>,
    /// The device computes on host memory (Metal, an APU, the CPU device):
    /// no upload, the pool is host memory.
    pub direct: bool,
    /// Direct through per-layer device slots (a device with addresses of
    /// its own, e.g. Vulkan): experts are read into imported slots of the
    /// device budget (like the staged slots), not into the RAM cache.
    pub direct_slots: bool,
    /// An integrated GPU (one memory with the CPU: an APU, `--gpu-unified`):
    /// the RAM budget is the only budget — what the device holds comes out
    /// of it — and there is no host→device copy term.
    pub unified: bool,
}

/// GPU placement.
#[derive(Clone, Debug, Serialize)]
pub struct GpuPlan {
    pub device: String,
    pub budget: u64,
    /// Weights resident on the GPU.
    pub resident_bytes: u64,
    /// Device pool for streamed tensors (slots and guard), estimated.
    pub pool_bytes: u64,
    /// Device slots: dense layers in flight, or expert layers.
    pub n_slots: usize,
    /// Experts: layers with a slot of their own (their experts stay cached on
    /// the GPU across tokens); the others share the remaining slots.
    pub dedicated_layers: Vec<u32>,
    /// Host→device bandwidth the estimate used (GB/s).
    pub h2d_gbps: f64,
    pub direct: bool,
    /// One memory with the CPU (the GPU budget is carved out of the RAM budget).
    pub unified: bool,
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
            n_experts: if t.role.is_experts() {
                t.n_experts()
            } else {
                None
            },
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
    /// GpuDense: streamed layers whose FFN is kept in (pinned) RAM after its
    /// first read and copied to the GPU each token: no disk read.
    pub ram_layers: Vec<u32>,
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
    /// GPU placement (`None`: CPU only).
    pub gpu: Option<GpuPlan>,
    /// CPU streaming: the token embeddings, read by rows on demand instead
    /// of resident (not in `resident_bytes`; their row cache is in the
    /// budget). See `plan/rows.rs`.
    pub embd_rows: Option<EmbdRows>,
}

/// Host→device bandwidth assumed when the profile has none (GB/s): a PCIe
/// 4.0 x16 link from pageable memory.
pub const DEFAULT_H2D_GBPS: f64 = 12.0;

/// Device memory a streamed tensor may need beyond its bytes (row padding,
/// alignment), for estimates; the engine sizes slots exactly.
const DEVICE_SLACK: u64 = 16 << 10;

/// Model bytes by where they go with a GPU.
struct Split {
    /// Token embeddings: llama.cpp keeps the input layer on the CPU.
    embd: u64,
    /// Everything else that is not FFN or experts (attention, norms, router,
    /// shared experts, output; a tied output counts twice: llama.cpp copies it).
    base_gpu: u64,
}

fn split(g: &GgufFile) -> Split {
    let embd: u64 = g
        .tensors
        .iter()
        .filter(|t| t.role == TensorRole::TokenEmbedding)
        .map(|t| t.size)
        .sum();
    let tied = !g.tensors.iter().any(|t| t.role == TensorRole::Output);
    let rest: u64 = g
        .tensors
        .iter()
        .filter(|t| {
            t.role != TensorRole::TokenEmbedding && !t.role.is_dense_ffn() && !t.role.is_experts()
        })
        .map(|t| t.size)
        .sum();
    Split {
        embd,
        base_gpu: rest + if tied { embd } else { 0 },
    }
}

impl Plan {
    /// The tier of a tensor by name.
    pub fn tier(&self, t: &TensorInfo) -> Tier {
        if self.streamed.iter().any(|s| s.name == t.name) {
            return if t.layer.is_some_and(|l| self.ram_layers.contains(&l)) {
                Tier::Ram
            } else {
                Tier::Nvme
            };
        }
        if self.gpu.is_none() || t.role == TensorRole::TokenEmbedding {
            return Tier::Ram;
        }
        let ffn = t.role.is_dense_ffn() || t.role.is_experts();
        match self.mode {
            // The CPU shape: FFN/experts resident in RAM, computed on the CPU.
            Mode::Dense | Mode::Experts if ffn => Tier::Ram,
            _ => Tier::Gpu,
        }
    }

    /// Whether dense FFN layer `l` is computed on the CPU from RAM (the
    /// pinned layers of the CPU shape when a GPU holds the rest).
    pub fn ffn_on_cpu(&self, l: u32) -> bool {
        self.gpu.is_some() && self.mode == Mode::Dense && self.pinned_layers.contains(&l)
    }

    /// Builds the plan. Without a GPU: resident if the model fits the RAM
    /// budget, else stream dense FFN layers or experts. With a GPU: resident
    /// on it if the model fits its budget, else the better (by the estimate)
    /// of streaming into the GPU's memory and the CPU shape (attention on the
    /// GPU, FFN or experts on the CPU from RAM and disk).
    pub fn new(input: &PlanInput<'_>) -> Result<Plan> {
        // One memory (an integrated GPU): the device's share is carved out of
        // the RAM budget, which keeps what only the host holds (the token
        // embeddings llama.cpp leaves on the CPU) — never both in full.
        if let Some(gi) = input.gpu.as_ref().filter(|g| g.unified) {
            let host_only = split(input.gguf).embd;
            let mut gi = gi.clone();
            gi.budget = gi.budget.min(input.ram_budget.saturating_sub(host_only));
            let one = PlanInput {
                gguf: input.gguf,
                ram_budget: input.ram_budget,
                mode: input.mode,
                lookahead: input.lookahead,
                disk_gbps: input.disk_gbps,
                mem_gbps: input.mem_gbps,
                gpu: Some(GpuInput {
                    unified: false,
                    ..gi
                }),
            };
            let mut plan = Plan::new(&one)?;
            if let Some(gp) = plan.gpu.as_mut() {
                gp.unified = true;
            }
            return Ok(plan);
        }
        let g = input.gguf;
        let model_bytes: u64 = g.tensors.iter().map(|t| t.size).sum();
        let has_experts = g.tensors.iter().any(|t| t.role.is_experts());
        let has_dense_ffn = g.tensors.iter().any(|t| t.role.is_dense_ffn());
        // Deeper than the model has layers means nothing (and the pool
        // arithmetic below multiplies by it).
        let n_layers = g.arch_params().n_layer.unwrap_or(0).max(g.layer_count());
        if let Some(l) = input.lookahead.filter(|&l| l > n_layers as usize) {
            bail!(
                "--lookahead {l} is more than the model's {n_layers} layers (at most {n_layers})"
            );
        }
        if let Some(m) = input.mode {
            if m.on_gpu() && input.gpu.is_none() {
                bail!(
                    "--mode {}: no GPU to stream to (none found, or --gpu-budget 0)",
                    m.label()
                );
            }
            if m.streams_dense() && !has_dense_ffn {
                bail!(
                    "--mode {}: this model has no dense FFN tensors to stream (try --mode experts)",
                    m.label()
                );
            }
            if m.streams_experts() && !has_experts {
                bail!(
                    "--mode {}: this model has no MoE expert tensors (try --mode dense)",
                    m.label()
                );
            }
            return Self::build(input, m, model_bytes);
        }
        if let Some(gpu) = &input.gpu {
            let sp = split(g);
            if sp.base_gpu + model_bytes - sp.embd <= gpu.budget && sp.embd <= input.ram_budget {
                return Self::build(input, Mode::Resident, model_bytes);
            }
            let (a, b) = if has_experts {
                (Mode::GpuExperts, Mode::Experts)
            } else {
                (Mode::GpuDense, Mode::Dense)
            };
            return match (
                Self::build(input, a, model_bytes),
                Self::build(input, b, model_bytes),
            ) {
                (Ok(pa), Ok(pb)) => Ok(
                    if pb.predicted_tps.unwrap_or(0.0) > pa.predicted_tps.unwrap_or(0.0) {
                        pb
                    } else {
                        pa
                    },
                ),
                (Ok(p), Err(_)) | (Err(_), Ok(p)) => Ok(p),
                (Err(e), Err(_)) => {
                    // Not even attention fits the GPU (a busy, shared card):
                    // run as if there were none rather than refuse.
                    tracing::warn!("not using the GPU: {e:#}");
                    let cpu = PlanInput {
                        gpu: None,
                        ..*input
                    };
                    Self::new(&cpu)
                }
            };
        }
        let mode = if model_bytes <= input.ram_budget {
            Mode::Resident
        } else if has_experts {
            Mode::Experts
        } else {
            Mode::Dense
        };
        Self::build(input, mode, model_bytes)
    }

    fn build(input: &PlanInput<'_>, mode: Mode, model_bytes: u64) -> Result<Plan> {
        match mode {
            Mode::Resident => Self::resident(input, model_bytes),
            Mode::Dense | Mode::GpuDense => Self::dense(input, model_bytes, mode),
            Mode::Experts | Mode::GpuExperts => Self::experts(input, model_bytes, mode),
        }
    }

    fn gpu_plan(gpu: &GpuInput, resident: u64) -> GpuPlan {
        GpuPlan {
            device: gpu.device.clone(),
            budget: gpu.budget,
            resident_bytes: resident,
            pool_bytes: 0,
            n_slots: 0,
            dedicated_layers: Vec::new(),
            h2d_gbps: gpu.h2d_gbps.unwrap_or(DEFAULT_H2D_GBPS),
            direct: gpu.direct,
            unified: gpu.unified,
        }
    }

    fn resident(input: &PlanInput<'_>, model_bytes: u64) -> Result<Plan> {
        let sp = split(input.gguf);
        // With a GPU, resident means resident on it (when it fits); a model
        // that fits only RAM runs on the CPU (or with --gpu-layers N).
        let gpu = input
            .gpu
            .as_ref()
            .filter(|g| sp.base_gpu + model_bytes - sp.embd <= g.budget);
        let gpu_plan = gpu.map(|g| Self::gpu_plan(g, sp.base_gpu + model_bytes - sp.embd));
        Ok(Plan {
            mode: Mode::Resident,
            ram_budget: input.ram_budget,
            model_bytes,
            resident_bytes: model_bytes,
            streamed_bytes: 0,
            streamed: Vec::new(),
            pinned_layers: Vec::new(),
            ram_layers: Vec::new(),
            streamed_layers: Vec::new(),
            lookahead: 0,
            slot_bytes: 0,
            pool_bytes: 0,
            bytes_per_token: 0,
            ceiling_tps: None,
            predicted_tps: if gpu_plan.is_some() {
                None
            } else {
                input.mem_gbps.map(|m| m * 1e9 / model_bytes.max(1) as f64)
            },
            gpu: gpu_plan,
            embd_rows: None,
        })
    }

    /// Dense FFN streaming. `Dense`: FFN layers pinned in RAM or streamed
    /// through a host pool, computed on the CPU (with a GPU, the rest of each
    /// layer is on it). `GpuDense`: FFN layers pinned on the GPU, the rest
    /// streamed through device slots.
    fn dense(input: &PlanInput<'_>, model_bytes: u64, mode: Mode) -> Result<Plan> {
        let g = input.gguf;
        let n_layer = g
            .tensors
            .iter()
            .filter_map(|t| t.layer)
            .max()
            .map_or(0, |l| l as usize + 1);
        // Per layer: FFN bytes, the host slot its aligned reads need, and the
        // device slot it needs.
        let mut ffn = vec![0u64; n_layer];
        let mut slot = vec![0u64; n_layer];
        let mut dslot = vec![0u64; n_layer];
        let mut max_tensor = 0u64;
        for t in g.tensors.iter().filter(|t| t.role.is_dense_ffn()) {
            let Some(l) = t.layer else { continue };
            ffn[l as usize] += t.size;
            slot[l as usize] += slot_len_for(t.offset, t.size as usize) as u64;
            dslot[l as usize] += t.size + DEVICE_SLACK;
            max_tensor = max_tensor.max(t.size + DEVICE_SLACK);
        }
        let ffn_layers: Vec<u32> = (0..n_layer as u32)
            .filter(|&l| ffn[l as usize] > 0)
            .collect();
        let slot_bytes = ffn_layers
            .iter()
            .map(|&l| slot[l as usize])
            .max()
            .unwrap_or(0);
        let dslot_bytes = ffn_layers
            .iter()
            .map(|&l| dslot[l as usize])
            .max()
            .unwrap_or(0);
        let sp = split(g);
        let gpu = input.gpu.as_ref();
        // RAM and GPU needs of what is not FFN.
        let embd_rows = gpu.is_none().then(|| rows::embd_rows(g)).flatten();
        let (ram_base, gpu_base) = match gpu {
            Some(_) => (sp.embd, sp.base_gpu),
            None => (
                rows::ram_without(model_bytes - ffn.iter().sum::<u64>(), embd_rows.as_ref()),
                0,
            ),
        };
        if let Some(gi) = gpu {
            if gpu_base > gi.budget {
                bail!(
                    "GPU budget {} is too small: attention, norms and output need {} on the GPU (try --gpu-budget, or --gpu-budget 0 for the CPU)",
                    format_bytes(gi.budget),
                    format_bytes(gpu_base)
                );
            }
        }
        let on_gpu = mode == Mode::GpuDense;
        let direct = gpu.is_some_and(|g| g.direct);
        // Where the pool lives: device slots (+ a guard the size of the
        // largest tensor) on the GPU, and host staging slots in RAM (none
        // when the device computes on host memory: the slots are that memory).
        // Staged: reads run ahead in host slots; the device needs only the
        // layer computing and the one being copied (two slots).
        // Saturating: a slot count comes from a lookahead.
        let gpu_pool = |n_slots: u64| {
            if on_gpu {
                if direct {
                    n_slots.saturating_mul(slot_bytes)
                } else {
                    (n_slots.min(2) * dslot_bytes).saturating_add(max_tensor)
                }
            } else {
                0
            }
        };
        let ram_pool = |n_slots: u64| {
            if on_gpu && direct {
                0
            } else {
                n_slots.saturating_mul(slot_bytes)
            }
        };
        let gpu_left = gpu.map_or(0, |g| g.budget - gpu_base);

        // Adaptive: 3 on the GPU; on the CPU at most 2, then the depth the
        // disk needs against the compute (below, `depth.rs`).
        let default_l = if on_gpu { 3 } else { 2 };
        let mut lookahead = input.lookahead.unwrap_or(default_l);
        let fits = |l: usize| {
            let n = (l as u64).saturating_add(1);
            ram_base.saturating_add(ram_pool(n)) <= input.ram_budget && gpu_pool(n) <= gpu_left
        };
        if !fits(0) {
            if on_gpu && gpu_pool(1) > gpu_left {
                bail!(
                    "GPU budget {} is too small to stream: the GPU needs {} resident and {} for one streamed layer",
                    format_bytes(gpu.map_or(0, |g| g.budget)),
                    format_bytes(gpu_base),
                    format_bytes(gpu_pool(1))
                );
            }
            let what = if gpu.is_some() {
                "its token embeddings"
            } else {
                "its non-FFN tensors"
            };
            return Err(RamTooSmall {
                needed: ram_base + ram_pool(1),
                message: format!(
                    "RAM budget {} is too small for this model: {what} need {} and one streamed layer {} (at least {} in all)",
                    format_bytes(input.ram_budget),
                    format_bytes(ram_base),
                    format_bytes(ram_pool(1)),
                    format_bytes(ram_base + ram_pool(1))
                ),
            }
            .into());
        }
        // Lookahead costs pool memory; with an adaptive depth shrink it to fit.
        if !fits(lookahead) {
            if input.lookahead.is_some() {
                bail!(
                    "the budget cannot hold lookahead {lookahead}: {} slots of {} (RAM budget {}, GPU budget {})",
                    lookahead.saturating_add(1),
                    format_bytes(if on_gpu { dslot_bytes } else { slot_bytes }),
                    format_bytes(input.ram_budget),
                    format_bytes(gpu.map_or(0, |g| g.budget))
                );
            }
            while lookahead > 0 && !fits(lookahead) {
                lookahead -= 1;
            }
        }

        // Pin as many layers as the rest of the budget holds (on the GPU for
        // GpuDense, in RAM otherwise), spread evenly so that the disk keeps
        // reading while pinned layers compute. With a GPU every layer may be
        // pinned (nothing streams); without one, the model did not fit RAM.
        let pin = |lookahead: usize| {
            let n_slots_max = (lookahead as u64).saturating_add(1);
            let mut m = ffn_layers.len();
            loop {
                let cand = spread(&ffn_layers, m);
                let n_streamed = (ffn_layers.len() - cand.len()) as u64;
                let n = n_slots_max.min(n_streamed);
                let pinned_bytes: u64 = cand.iter().map(|&l| ffn[l as usize]).sum();
                let ok = if on_gpu {
                    (gpu_base + pinned_bytes).saturating_add(gpu_pool(n))
                        <= gpu.map_or(0, |g| g.budget)
                        && ram_base.saturating_add(ram_pool(n)) <= input.ram_budget
                } else {
                    (ram_base + pinned_bytes).saturating_add(ram_pool(n)) <= input.ram_budget
                };
                if ok && (n_streamed > 0 || gpu.is_some()) {
                    break cand;
                }
                if m == 0 {
                    break Vec::new();
                }
                m -= 1;
            }
        };
        // CPU, adaptive: only as deep as the disk needs; every slot that
        // saves pins a layer (the sketch in `depth.rs`).
        if !on_gpu && input.lookahead.is_none() {
            let cpu_bytes = if gpu.is_some() {
                ffn.iter().sum::<u64>()
            } else {
                model_bytes
            };
            let layer_ffn = ffn.iter().copied().max().unwrap_or(0);
            let timing = depth::Timing::from_profile(
                input.disk_gbps,
                input.mem_gbps,
                slot_bytes,
                layer_ffn,
                cpu_bytes,
                n_layer,
            );
            lookahead = depth::choose(timing.as_ref(), lookahead, |l| {
                let p = pin(l).len();
                (ffn_layers.len() - p, p)
            });
        }
        let pinned = pin(lookahead);
        let streamed_layers: Vec<u32> = ffn_layers
            .iter()
            .copied()
            .filter(|l| !pinned.contains(l))
            .collect();
        let n_slots = lookahead.saturating_add(1).min(streamed_layers.len());
        let streamed: Vec<StreamedTensor> = g
            .tensors
            .iter()
            .filter(|t| {
                t.role.is_dense_ffn() && t.layer.is_some_and(|l| streamed_layers.contains(&l))
            })
            .map(StreamedTensor::from_info)
            .collect();
        let streamed_bytes: u64 = streamed.iter().map(|t| t.size).sum();
        let pinned_bytes: u64 = pinned.iter().map(|&l| ffn[l as usize]).sum();
        // GpuDense: the RAM the staging slots leave holds streamed layers
        // (spread evenly), copied to the GPU from there instead of read.
        let ram_layers: Vec<u32> = if on_gpu && !direct {
            let left = input
                .ram_budget
                .saturating_sub(ram_base.saturating_add(ram_pool(n_slots as u64)));
            let mut m = streamed_layers.len();
            loop {
                let cand = spread(&streamed_layers, m);
                if cand.iter().map(|&l| slot[l as usize]).sum::<u64>() <= left || m == 0 {
                    break cand;
                }
                m -= 1;
            }
        } else {
            Vec::new()
        };
        let ram_tier_bytes: u64 = ram_layers.iter().map(|&l| slot[l as usize]).sum();
        let disk_bytes: u64 = streamed_layers
            .iter()
            .filter(|l| !ram_layers.contains(l))
            .map(|&l| ffn[l as usize])
            .sum();
        let gpu_plan = gpu.map(|gi| {
            let mut gp = Self::gpu_plan(gi, gpu_base + if on_gpu { pinned_bytes } else { 0 });
            if on_gpu && n_slots > 0 {
                gp.pool_bytes = gpu_pool(n_slots as u64);
                gp.n_slots = if direct { n_slots } else { n_slots.min(2) };
            }
            gp
        });
        let mut plan = Plan {
            mode,
            ram_budget: input.ram_budget,
            model_bytes,
            resident_bytes: model_bytes - streamed_bytes - embd_rows.as_ref().map_or(0, |r| r.size),
            streamed_bytes,
            streamed,
            pinned_layers: pinned,
            ram_layers,
            streamed_layers,
            lookahead,
            slot_bytes,
            pool_bytes: ram_pool(n_slots as u64) + ram_tier_bytes,
            bytes_per_token: disk_bytes,
            ceiling_tps: None,
            predicted_tps: None,
            gpu: gpu_plan,
            embd_rows,
        };
        plan.estimate(input, model_bytes, &ffn);
        Ok(plan)
    }

    /// Expert streaming. `Experts`: experts computed on the CPU from a RAM
    /// cache filled from disk (with a GPU, attention is on it: llama.cpp's
    /// `--n-cpu-moe` shape). `GpuExperts`: selected experts are copied from
    /// the RAM cache (filled from disk) into per-layer slots on the GPU.
    fn experts(input: &PlanInput<'_>, model_bytes: u64, mode: Mode) -> Result<Plan> {
        let g = input.gguf;
        let params = g.arch_params();
        let streamed: Vec<StreamedTensor> = g
            .tensors
            .iter()
            .filter(|t| t.role.is_experts())
            .map(StreamedTensor::from_info)
            .collect();
        let streamed_bytes: u64 = streamed.iter().map(|t| t.size).sum();
        let sp = split(g);
        let gpu = input.gpu.as_ref();
        let embd_rows = gpu.is_none().then(|| rows::embd_rows(g)).flatten();
        let (ram_base, gpu_base) = match gpu {
            // Dense FFN layers of a MoE (if any) stay with the rest on the GPU.
            Some(_) => (
                sp.embd,
                sp.base_gpu
                    + g.tensors
                        .iter()
                        .filter(|t| t.role.is_dense_ffn())
                        .map(|t| t.size)
                        .sum::<u64>(),
            ),
            None => (
                rows::ram_without(model_bytes - streamed_bytes, embd_rows.as_ref()),
                0,
            ),
        };
        if let Some(gi) = gpu {
            if gpu_base > gi.budget {
                bail!(
                    "GPU budget {} is too small: attention, norms, router and output need {} on the GPU (try --gpu-budget, or --gpu-budget 0 for the CPU)",
                    format_bytes(gi.budget),
                    format_bytes(gpu_base)
                );
            }
        }
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
        let max_layer_expert = layers
            .iter()
            .map(|&l| layer_expert_bytes(l))
            .max()
            .unwrap_or(0);
        // Experts are not read ahead (they are known only once the router
        // has picked them): the lookahead means nothing here, and the RAM
        // pool must hold one layer's selected experts; everything else of the
        // budget is expert cache.
        let lookahead = input.lookahead.unwrap_or(0);
        let min_pool = k.saturating_mul(max_layer_expert);
        if input.ram_budget < ram_base.saturating_add(min_pool) {
            return Err(RamTooSmall {
                needed: ram_base.saturating_add(min_pool),
                message: format!(
                    "RAM budget {} is too small for this model: its non-expert tensors need {} and the expert pool at least {}",
                    format_bytes(input.ram_budget),
                    format_bytes(ram_base),
                    format_bytes(min_pool)
                ),
            }
            .into());
        }
        let pool_bytes = (input.ram_budget - ram_base)
            .min(streamed_bytes + streamed.len() as u64 * 2 * crate::io::ALIGN as u64);
        let per_token: u64 = layers
            .iter()
            .map(|&l| k.saturating_mul(layer_expert_bytes(l)))
            .fold(0, u64::saturating_add);
        let mut gpu_plan = gpu.map(|gi| Self::gpu_plan(gi, gpu_base));
        // A device that computes on host memory at host addresses uses the
        // RAM cache itself; staged copies and direct slots use device slots.
        let slots = gpu.is_some_and(|g| !g.direct || g.direct_slots);
        if let (Some(gp), Mode::GpuExperts, true) = (gpu_plan.as_mut(), mode, slots) {
            // A device slot holds every expert tensor of one layer (only the
            // selected experts are ever copied in).
            let layer_slot = |l: u32| -> u64 {
                streamed
                    .iter()
                    .filter(|t| t.layer == l)
                    .map(|t| t.size + DEVICE_SLACK)
                    .sum()
            };
            let dslot = layers.iter().map(|&l| layer_slot(l)).max().unwrap_or(0);
            let left = gp.budget - gpu_base;
            let n_fit = left.checked_div(dslot).unwrap_or(0) as usize;
            if n_fit == 0 {
                bail!(
                    "GPU budget {} is too small to stream experts: {} resident and {} for one layer's expert slot",
                    format_bytes(gp.budget),
                    format_bytes(gpu_base),
                    format_bytes(dslot)
                );
            }
            // Every layer its own slot if they fit; else all but one slot
            // dedicated (spread evenly) and one shared by the other layers.
            gp.dedicated_layers = if n_fit >= layers.len() {
                layers.clone()
            } else {
                spread(&layers, n_fit - 1)
            };
            gp.n_slots = n_fit.min(layers.len());
            gp.pool_bytes = gp.n_slots as u64 * dslot;
        }
        let mut plan = Plan {
            mode,
            ram_budget: input.ram_budget,
            model_bytes,
            resident_bytes: model_bytes - streamed_bytes - embd_rows.as_ref().map_or(0, |r| r.size),
            streamed_bytes,
            streamed,
            pinned_layers: Vec::new(),
            ram_layers: Vec::new(),
            streamed_layers: layers,
            lookahead,
            slot_bytes: max_layer_expert,
            pool_bytes,
            bytes_per_token: per_token,
            ceiling_tps: None,
            predicted_tps: None,
            gpu: gpu_plan,
            embd_rows,
        };
        plan.estimate(input, model_bytes, &[]);
        Ok(plan)
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
