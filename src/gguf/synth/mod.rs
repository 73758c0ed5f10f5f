//! Synthetic models: GGUF files with random but valid weights that llama.cpp
//! loads and runs, in any size, for testing the engine without downloads.
//!
//! Supported: dense `llama`, `qwen3moe`, and mixtral-style MoE (`llama` with
//! experts). Output is streamed tensor by tensor and depends only on the
//! [`SynthConfig`] (a self-written PRNG, no crate-version drift).
//!
//! Weights are scaled to a standard deviation of `1/sqrt(fan_in)`, norms are
//! `1 ± 0.01`, so activations stay finite across any number of layers.
//! MoEs can have token-dependent routing ([`routing`], `--routing`).

mod blocks;
mod routing;
mod vocab;

use std::io::Write;
use std::path::{Path, PathBuf};

pub use crate::util::rng::Rng;
pub use blocks::{f16_to_f32, f32_to_bf16, f32_to_f16, Init, SUPPORTED as SUPPORTED_TYPES};
pub use routing::{Routing, RoutingModel};
pub use vocab::{Vocab, BOS_ID, EOS_ID, MIN_VOCAB, UNK_ID};

use super::{GgmlType, GgufError, GgufWriter};

pub use super::validate::{MAX_EXPERTS, MAX_LAYERS};
/// Half-width of the noise on norm weights.
const NORM_NOISE: f32 = 0.01;

/// Which model family to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SynthArch {
    /// Dense llama (`llama`).
    Llama,
    /// Qwen3 MoE (`qwen3moe`): q/k norms, router, stacked experts.
    Qwen3Moe,
    /// Mixtral-style MoE: `llama` with `expert_count`, router and stacked experts.
    Mixtral,
}

impl SynthArch {
    /// The `general.architecture` value.
    pub fn gguf_name(self) -> &'static str {
        match self {
            SynthArch::Llama | SynthArch::Mixtral => "llama",
            SynthArch::Qwen3Moe => "qwen3moe",
        }
    }

    /// Whether layers have routed experts.
    pub fn is_moe(self) -> bool {
        !matches!(self, SynthArch::Llama)
    }
}

/// Everything that determines a synthetic model's bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthConfig {
    /// Model family.
    pub arch: SynthArch,
    /// Number of blocks.
    pub n_layer: u32,
    /// Hidden size.
    pub n_embd: u32,
    /// Dense FFN width (`llama`); written as `feed_forward_length` for `qwen3moe`.
    pub n_ff: u32,
    /// Attention heads.
    pub n_head: u32,
    /// Key/value heads (GQA).
    pub n_head_kv: u32,
    /// Routed experts per layer (MoE only).
    pub n_expert: u32,
    /// Experts used per token (MoE only).
    pub n_expert_used: u32,
    /// Expert FFN width (MoE only; for mixtral also `feed_forward_length`).
    pub n_ff_exp: u32,
    /// Vocabulary size (at least [`MIN_VOCAB`]).
    pub n_vocab: u32,
    /// Training context length written to the metadata.
    pub n_ctx: u32,
    /// Type of the matrices (norms and routers are always F32).
    pub weight_type: GgmlType,
    /// PRNG seed.
    pub seed: u64,
    /// Data alignment (power of two).
    pub alignment: u64,
    /// Token-dependent expert routing (MoE only; see [`routing`]); none:
    /// plain random weights (routing nearly independent of the token).
    pub routing: Option<Routing>,
}

impl SynthConfig {
    /// A small, fast default model of family `arch`.
    pub fn new(arch: SynthArch) -> SynthConfig {
        let moe = arch.is_moe();
        SynthConfig {
            arch,
            n_layer: 4,
            n_embd: 256,
            n_ff: 768,
            n_head: 4,
            n_head_kv: 2,
            n_expert: if moe { 8 } else { 0 },
            n_expert_used: if moe { 2 } else { 0 },
            n_ff_exp: if moe { 256 } else { 0 },
            n_vocab: 1024,
            n_ctx: 4096,
            weight_type: GgmlType::Q8_0,
            seed: 0,
            alignment: super::DEFAULT_ALIGNMENT,
            routing: None,
        }
    }

    /// Checks the shape is one llama.cpp accepts.
    pub fn validate(&self) -> Result<(), SynthError> {
        let fail = |m: String| Err(SynthError::Config(m));
        if self.n_layer == 0 || self.n_layer > MAX_LAYERS {
            return fail(format!(
                "layer count {} must be 1 to {MAX_LAYERS}",
                self.n_layer
            ));
        }
        if self.n_embd == 0 || self.n_head == 0 || self.n_head_kv == 0 {
            return fail("embedding size and head counts must be at least 1".to_string());
        }
        if !self.n_embd.is_multiple_of(self.n_head) || !self.head_dim().is_multiple_of(2) {
            return fail(format!(
                "embedding size {} must be the head count {} times an even head size",
                self.n_embd, self.n_head
            ));
        }
        if !self.n_head.is_multiple_of(self.n_head_kv) {
            return fail(format!(
                "head count {} must be a multiple of the KV head count {}",
                self.n_head, self.n_head_kv
            ));
        }
        if self.n_vocab < MIN_VOCAB || self.n_vocab > i32::MAX as u32 {
            return fail(format!(
                "vocabulary size {} must be at least {MIN_VOCAB}",
                self.n_vocab
            ));
        }
        if !SUPPORTED_TYPES.contains(&self.weight_type) {
            let names: Vec<&str> = SUPPORTED_TYPES.iter().map(|t| t.name()).collect();
            return fail(format!(
                "cannot generate {} weights (supported: {})",
                self.weight_type,
                names.join(", ")
            ));
        }
        self.validate_ffn()
    }

    fn validate_ffn(&self) -> Result<(), SynthError> {
        let fail = |m: String| Err(SynthError::Config(m));
        if !self.arch.is_moe() {
            if self.routing.is_some() {
                return fail("--routing needs an MoE architecture (mixtral or qwen3moe)".into());
            }
            if self.n_expert != 0 {
                return fail(
                    "dense llama has no experts (use the mixtral or qwen3moe architecture)"
                        .to_string(),
                );
            }
            return if self.n_ff == 0 {
                fail("FFN width must be at least 1".to_string())
            } else {
                Ok(())
            };
        }
        if self.n_expert == 0 || self.n_expert > MAX_EXPERTS {
            return fail(format!(
                "expert count {} must be 1 to {MAX_EXPERTS}",
                self.n_expert
            ));
        }
        if self.n_expert_used == 0 || self.n_expert_used > self.n_expert {
            return fail(format!(
                "experts used {} must be 1 to the expert count {}",
                self.n_expert_used, self.n_expert
            ));
        }
        if self.n_ff_exp == 0 || (self.arch == SynthArch::Qwen3Moe && self.n_ff == 0) {
            return fail("FFN widths must be at least 1".to_string());
        }
        Ok(())
    }

    fn head_dim(&self) -> u32 {
        self.n_embd / self.n_head
    }

    /// The matrix type for rows of `ne0` elements: the requested type if
    /// `ne0` is whole blocks of it, else Q8_0 (32-element blocks), else F16.
    pub fn matrix_type(&self, ne0: u64) -> GgmlType {
        [self.weight_type, GgmlType::Q8_0, GgmlType::F16]
            .into_iter()
            .find(|t| t.row_size(ne0).is_some())
            .unwrap_or(GgmlType::F32)
    }

    /// `general.file_type` (`llama_ftype`) for the weight type.
    fn file_type(&self) -> u32 {
        match self.weight_type {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 8,
            GgmlType::Q5_1 => 9,
            GgmlType::Q2_K => 10,
            GgmlType::Q4_K => 15,
            GgmlType::Q5_K => 17,
            GgmlType::Q6_K => 18,
            GgmlType::IQ4_NL => 25,
            GgmlType::BF16 => 32,
            _ => 7, // Q8_0
        }
    }
}

/// A configuration or output problem.
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    /// The requested shape is invalid.
    #[error("invalid synthetic model: {0}")]
    Config(String),
    /// Writing failed.
    #[error(transparent)]
    Gguf(#[from] GgufError),
}

/// What a tensor is, which fixes its type and initialisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A matrix in the weight type.
    Matrix,
    /// A norm vector (F32, ~1).
    Norm,
    /// A router matrix (F32).
    Router,
    /// The token embedding (a matrix, or built by the routing model).
    Embedding,
    /// A layer's output projection onto the residual stream (a matrix,
    /// scaled down under routing).
    Output,
}

/// One planned tensor.
struct Planned {
    name: String,
    kind: Kind,
    dims: Vec<u64>,
}

fn planned(name: String, kind: Kind, dims: &[u32]) -> Planned {
    Planned {
        name,
        kind,
        dims: dims.iter().map(|&d| u64::from(d)).collect(),
    }
}

/// The tensors llama.cpp's loader expects for `cfg`, in file order.
fn tensor_plan(cfg: &SynthConfig) -> Vec<Planned> {
    let (e, v) = (cfg.n_embd, cfg.n_vocab);
    let mut out = vec![planned(
        "token_embd.weight".into(),
        Kind::Embedding,
        &[e, v],
    )];
    for il in 0..cfg.n_layer {
        out.extend(layer_plan(cfg, il));
    }
    out.push(planned("output_norm.weight".into(), Kind::Norm, &[e]));
    out.push(planned("output.weight".into(), Kind::Matrix, &[e, v]));
    out
}

/// The tensors of block `il`.
fn layer_plan(cfg: &SynthConfig, il: u32) -> Vec<Planned> {
    let (e, hd) = (cfg.n_embd, cfg.head_dim());
    let (q, kv) = (hd * cfg.n_head, hd * cfg.n_head_kv);
    let n = |s: &str| format!("blk.{il}.{s}.weight");
    let mut out = vec![
        planned(n("attn_norm"), Kind::Norm, &[e]),
        planned(n("attn_q"), Kind::Matrix, &[e, q]),
        planned(n("attn_k"), Kind::Matrix, &[e, kv]),
        planned(n("attn_v"), Kind::Matrix, &[e, kv]),
        planned(n("attn_output"), Kind::Output, &[q, e]),
    ];
    if cfg.arch == SynthArch::Qwen3Moe {
        out.push(planned(n("attn_q_norm"), Kind::Norm, &[hd]));
        out.push(planned(n("attn_k_norm"), Kind::Norm, &[hd]));
    }
    out.push(planned(n("ffn_norm"), Kind::Norm, &[e]));
    if cfg.arch.is_moe() {
        let (f, x) = (cfg.n_ff_exp, cfg.n_expert);
        out.push(planned(n("ffn_gate_inp"), Kind::Router, &[e, x]));
        out.push(planned(n("ffn_gate_exps"), Kind::Matrix, &[e, f, x]));
        out.push(planned(n("ffn_up_exps"), Kind::Matrix, &[e, f, x]));
        out.push(planned(n("ffn_down_exps"), Kind::Output, &[f, e, x]));
    } else {
        let f = cfg.n_ff;
        out.push(planned(n("ffn_gate"), Kind::Matrix, &[e, f]));
        out.push(planned(n("ffn_up"), Kind::Matrix, &[e, f]));
        out.push(planned(n("ffn_down"), Kind::Output, &[f, e]));
    }
    out
}

/// How a planned tensor's bytes are made.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fill {
    /// Random values ([`Init`]).
    Random(Init),
    /// The routing model's token embedding.
    Embedding,
    /// The routing model's router of this layer.
    Router(usize),
}

/// The type and content of a planned tensor.
fn type_and_fill(cfg: &SynthConfig, p: &Planned) -> (GgmlType, Fill) {
    let fan_in = p.dims.first().copied().unwrap_or(1).max(1);
    let std = 1.0 / (fan_in as f32).sqrt();
    let random = Fill::Random(Init::Random { std });
    let routed = cfg.routing.is_some();
    match p.kind {
        Kind::Embedding if routed => (routing::embedding_type(cfg), Fill::Embedding),
        Kind::Router if routed => (GgmlType::F32, Fill::Router(layer_of(&p.name))),
        Kind::Output if routed => (
            cfg.matrix_type(fan_in),
            Fill::Random(Init::Random {
                std: std * routing::output_scale(cfg),
            }),
        ),
        Kind::Matrix | Kind::Embedding | Kind::Output => (cfg.matrix_type(fan_in), random),
        Kind::Router => (GgmlType::F32, random),
        Kind::Norm => (
            GgmlType::F32,
            Fill::Random(Init::Ones { noise: NORM_NOISE }),
        ),
    }
}

/// `N` of a `blk.N.…` name (0 otherwise).
fn layer_of(name: &str) -> usize {
    name.strip_prefix("blk.")
        .and_then(|r| r.split('.').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The metadata llama.cpp needs to load the model.
fn add_metadata(cfg: &SynthConfig, w: &mut GgufWriter) -> Result<(), GgufError> {
    let a = cfg.arch.gguf_name();
    let k = |s: &str| format!("{a}.{s}");
    w.add_kv("general.architecture", a)?;
    w.add_kv(
        "general.name",
        format!("hypura synthetic {a} {}L", cfg.n_layer),
    )?;
    w.add_kv("general.file_type", cfg.file_type())?;
    w.add_kv("general.quantization_version", 2u32)?;
    w.add_kv("hypura.synthetic.seed", cfg.seed)?;
    if let Some(r) = cfg.routing {
        w.add_kv("hypura.synthetic.routing", r.describe())?;
    }
    w.add_kv(&k("context_length"), cfg.n_ctx)?;
    w.add_kv(&k("embedding_length"), cfg.n_embd)?;
    w.add_kv(&k("block_count"), cfg.n_layer)?;
    let ff = if cfg.arch == SynthArch::Mixtral {
        cfg.n_ff_exp
    } else {
        cfg.n_ff
    };
    w.add_kv(&k("feed_forward_length"), ff)?;
    w.add_kv(&k("attention.head_count"), cfg.n_head)?;
    w.add_kv(&k("attention.head_count_kv"), cfg.n_head_kv)?;
    w.add_kv(&k("attention.layer_norm_rms_epsilon"), 1e-5f32)?;
    w.add_kv(&k("rope.freq_base"), 10000f32)?;
    w.add_kv(&k("rope.dimension_count"), cfg.head_dim())?;
    if cfg.arch.is_moe() {
        w.add_kv(&k("expert_count"), cfg.n_expert)?;
        w.add_kv(&k("expert_used_count"), cfg.n_expert_used)?;
    }
    if cfg.arch == SynthArch::Qwen3Moe {
        w.add_kv(&k("expert_feed_forward_length"), cfg.n_ff_exp)?;
    }
    Vocab::spm(cfg.n_vocab).add_to(w)
}

/// A writer with all metadata and tensor infos of `cfg`, ready to `write`,
/// and each tensor's initialisation.
fn build(cfg: &SynthConfig, path: &Path) -> Result<(GgufWriter, Vec<Fill>), SynthError> {
    cfg.validate()?;
    let mut w = GgufWriter::new(path);
    if cfg.alignment != super::DEFAULT_ALIGNMENT {
        w.set_alignment(cfg.alignment)?;
    }
    add_metadata(cfg, &mut w)?;
    let mut inits = Vec::new();
    for p in tensor_plan(cfg) {
        let (t, init) = type_and_fill(cfg, &p);
        w.add_tensor(&p.name, t, &p.dims)?;
        inits.push(init);
    }
    Ok((w, inits))
}

/// The exact size in bytes the file for `cfg` will have.
pub fn planned_size(cfg: &SynthConfig) -> Result<u64, SynthError> {
    Ok(build(cfg, Path::new("(planned)"))?.0.file_size()?)
}

/// The largest layer count (at least 1) whose file fits in `target` bytes.
pub fn layers_for_size(cfg: &SynthConfig, target: u64) -> Result<u32, SynthError> {
    let with = |n: u32| {
        planned_size(&SynthConfig {
            n_layer: n,
            ..cfg.clone()
        })
    };
    let (one, two) = (with(1)?, with(2)?);
    let per_layer = two.saturating_sub(one).max(1);
    let fixed = one.saturating_sub(per_layer);
    let guess = (target.saturating_sub(fixed) / per_layer).clamp(1, u64::from(MAX_LAYERS));
    // Names grow a digit at 10 and 100 layers: step down until it fits.
    let mut n = u32::try_from(guess).unwrap_or(MAX_LAYERS);
    while n > 1 && with(n)? > target {
        n -= 1;
    }
    Ok(n)
}

/// What [`generate`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SynthSummary {
    /// The output file.
    pub path: PathBuf,
    /// Its size in bytes.
    pub bytes: u64,
    /// Number of tensors.
    pub tensors: usize,
}

/// Writes the model for `cfg` to `path`, streaming tensor data; `progress`
/// is called with the total bytes written so far (and the final total).
pub fn generate(
    cfg: &SynthConfig,
    path: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<SynthSummary, SynthError> {
    let (w, inits) = build(cfg, path)?;
    let routing = cfg.routing.map(|r| RoutingModel::new(cfg, r));
    let total = w.file_size()?;
    let header = w.data_offset()?;
    let mut done = header;
    progress(done, total);
    let mut index = 0usize;
    let bytes = w.write(|spec, out| {
        let fill = inits
            .get(index)
            .copied()
            .unwrap_or(Fill::Random(Init::Random { std: 0.01 }));
        let mut rng = Rng::for_stream(cfg.seed, index as u64);
        index += 1;
        let mut counting = Progress {
            inner: out,
            done: &mut done,
            total,
            progress: &mut *progress,
        };
        let n_elements = spec.dims.iter().product();
        match (fill, &routing) {
            (Fill::Embedding, Some(r)) => {
                r.write_embedding(spec.ggml_type, cfg.n_vocab, &mut counting)
            }
            (Fill::Router(l), Some(r)) => r.write_router(l, &mut counting),
            (Fill::Random(init), _) => {
                blocks::write_tensor_data(spec.ggml_type, n_elements, init, &mut rng, &mut counting)
            }
            _ => Err(std::io::Error::other(
                "routing fill without a routing model",
            )),
        }
    })?;
    progress(bytes, total);
    Ok(SynthSummary {
        path: path.to_path_buf(),
        bytes,
        tensors: inits.len(),
    })
}

/// Reports bytes as they pass.
struct Progress<'a, 'b> {
    inner: &'a mut dyn Write,
    done: &'a mut u64,
    total: u64,
    progress: &'a mut (dyn FnMut(u64, u64) + 'b),
}

impl Write for Progress<'_, '_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        *self.done += n as u64;
        (self.progress)(*self.done, self.total);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}
