//! `hypura gen`: write a synthetic GGUF model (random but valid weights) that
//! llama.cpp loads and runs, of any shape or size.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use indicatif::{ProgressBar, ProgressStyle};

use crate::gguf::synth::{self, SynthArch, SynthConfig};
use crate::gguf::GgmlType;
use crate::scheduler::{format_bytes as human_bytes, parse_size_arg};

/// Model family to generate.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArchArg {
    /// Dense llama.
    Llama,
    /// Qwen3 MoE.
    Qwen3moe,
    /// Mixtral-style MoE (llama with experts).
    Mixtral,
}

impl From<ArchArg> for SynthArch {
    fn from(a: ArchArg) -> SynthArch {
        match a {
            ArchArg::Llama => SynthArch::Llama,
            ArchArg::Qwen3moe => SynthArch::Qwen3Moe,
            ArchArg::Mixtral => SynthArch::Mixtral,
        }
    }
}

/// Arguments of `hypura gen`; unset shape options take small defaults.
#[derive(clap::Args, Debug)]
pub struct GenArgs {
    /// Model family.
    #[arg(long, value_enum)]
    pub arch: ArchArg,
    /// Output GGUF file.
    #[arg(short, long)]
    pub out: PathBuf,
    /// Number of layers [default: 4].
    #[arg(long, conflicts_with = "target_size")]
    pub layers: Option<u32>,
    /// Pick the layer count so the file is at most this big (e.g. 8G, 512M).
    #[arg(long, value_parser = parse_nonzero_size)]
    pub target_size: Option<u64>,
    /// Hidden size [default: 256].
    #[arg(long)]
    pub embd: Option<u32>,
    /// Dense FFN width [default: 768].
    #[arg(long)]
    pub ff: Option<u32>,
    /// Attention heads [default: 4].
    #[arg(long)]
    pub heads: Option<u32>,
    /// Key/value heads [default: 2].
    #[arg(long)]
    pub heads_kv: Option<u32>,
    /// Routed experts per layer (MoE) [default: 8].
    #[arg(long)]
    pub experts: Option<u32>,
    /// Experts used per token (MoE) [default: 2].
    #[arg(long)]
    pub experts_used: Option<u32>,
    /// Expert FFN width (MoE) [default: 256].
    #[arg(long)]
    pub ff_exp: Option<u32>,
    /// Vocabulary size [default: 1024].
    #[arg(long)]
    pub vocab: Option<u32>,
    /// Training context length written to the metadata [default: 4096].
    #[arg(long)]
    pub ctx: Option<u32>,
    /// Weight type: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q2_k, q4_k, q5_k, q6_k, iq4_nl.
    #[arg(long = "type", value_parser = parse_type, default_value = "q8_0")]
    pub weight_type: GgmlType,
    /// PRNG seed: the same seed and shape give the same bytes.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Tensor data alignment in bytes (a power of two, e.g. 32 or 4096).
    #[arg(long, default_value_t = 32)]
    pub alignment: u64,
    /// Token-dependent expert routing (MoE): `zipf:S[,corr:C]`, expert
    /// popularity Zipf(S) (0: uniform), each layer repeating the previous
    /// layer's choice with probability C (see docs/synthetic.md).
    #[arg(long, value_name = "zipf:S[,corr:C]", value_parser = synth::Routing::parse)]
    pub routing: Option<synth::Routing>,
    /// Overwrite OUT if it exists.
    #[arg(long)]
    pub force: bool,
}

/// Runs `hypura gen`.
pub fn run(args: GenArgs) -> anyhow::Result<()> {
    if args.out.exists() && !args.force {
        bail!(
            "{}: already exists (pass --force to overwrite)",
            args.out.display()
        );
    }
    let mut cfg = config(&args);
    if let Some(target) = args.target_size {
        cfg.n_layer = synth::layers_for_size(&cfg, target)?;
    }
    let total = synth::planned_size(&cfg)?;
    let partial = partial_path(&args.out);
    let bar = progress_bar(total);
    let result = synth::generate(&cfg, &partial, &mut |done, _| bar.set_position(done));
    bar.finish_and_clear();
    let summary = result.inspect_err(|_| {
        let _ = std::fs::remove_file(&partial);
    })?;
    std::fs::rename(&partial, &args.out).with_context(|| {
        format!(
            "{}: cannot move the finished file into place",
            args.out.display()
        )
    })?;
    println!(
        "wrote {}: {} ({}), {} layer{}, {} tensors, {} ({} bytes), seed {}",
        args.out.display(),
        cfg.arch.gguf_name(),
        describe(&cfg),
        cfg.n_layer,
        if cfg.n_layer == 1 { "" } else { "s" },
        summary.tensors,
        human_bytes(summary.bytes),
        summary.bytes,
        cfg.seed
    );
    Ok(())
}

/// The configuration: defaults for the family, overridden by the flags.
fn config(a: &GenArgs) -> SynthConfig {
    let mut c = SynthConfig::new(a.arch.into());
    let set = |field: &mut u32, v: Option<u32>| {
        if let Some(v) = v {
            *field = v;
        }
    };
    set(&mut c.n_layer, a.layers);
    set(&mut c.n_embd, a.embd);
    set(&mut c.n_ff, a.ff);
    set(&mut c.n_head, a.heads);
    set(&mut c.n_head_kv, a.heads_kv);
    set(&mut c.n_expert, a.experts);
    set(&mut c.n_expert_used, a.experts_used);
    set(&mut c.n_ff_exp, a.ff_exp);
    set(&mut c.n_vocab, a.vocab);
    set(&mut c.n_ctx, a.ctx);
    c.weight_type = a.weight_type;
    c.seed = a.seed;
    c.alignment = a.alignment;
    c.routing = a.routing;
    c
}

/// `8 experts, 2 used, embd 256, q8_0` and the like.
fn describe(c: &SynthConfig) -> String {
    let moe = if c.arch.is_moe() {
        format!("{} experts, {} used, ", c.n_expert, c.n_expert_used)
    } else {
        String::new()
    };
    let routing = c
        .routing
        .map(|r| format!(", routing {}", r.describe()))
        .unwrap_or_default();
    format!("{moe}embd {}, {}{routing}", c.n_embd, c.weight_type)
}

/// `OUT.partial` next to OUT: a crash never leaves a half-written model at OUT.
fn partial_path(out: &Path) -> PathBuf {
    let mut name = out
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".partial");
    out.with_file_name(name)
}

fn progress_bar(total: u64) -> ProgressBar {
    let bar = ProgressBar::new(total);
    if let Ok(style) =
        ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
    {
        bar.set_style(style);
    }
    bar
}

/// A ggml type name, case-insensitive (`q4_k`, `Q8_0`).
fn parse_type(s: &str) -> Result<GgmlType, String> {
    GgmlType::from_name(s).ok_or_else(|| format!("unknown ggml type '{s}'"))
}

/// `123`, `512K`, `8G`, `1.5GiB`: binary units (K = 1024), at least one byte.
fn parse_nonzero_size(s: &str) -> Result<u64, String> {
    match parse_size_arg(s)? {
        0 => Err(format!("'{s}' is out of range (at least 1 byte)")),
        b => Ok(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_nonzero_size("8G"), Ok(8 << 30));
        assert_eq!(parse_nonzero_size("512M"), Ok(512 << 20));
        assert_eq!(parse_nonzero_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_nonzero_size("4096"), Ok(4096));
        assert!(parse_nonzero_size("8Q").is_err());
        assert!(parse_nonzero_size("x").is_err());
        assert!(parse_nonzero_size("0").is_err());
    }
}
