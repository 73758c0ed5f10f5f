//! `hypura inspect`: what a GGUF file holds, by role and by layer.
//!
//! The output is a [`Report`] built once from the parsed file and rendered
//! either as text (one function per section) or as JSON. To add a section
//! (e.g. the placement plan), add a field to [`Report`] and a `render_*`
//! function to [`render_text`].

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

use serde::Serialize;

use crate::engine::placement::{plan_for_machine, CtxRequest, PlacementArgs};
use crate::scheduler::{Mode, Plan, Tier};

use crate::gguf::{ArchParams, GgufFile, MetaValue, TensorInfo, TensorRole};

/// Arguments of `hypura inspect`.
#[derive(clap::Args, Debug)]
pub struct InspectArgs {
    /// The GGUF model file.
    pub model: PathBuf,
    /// Also list every tensor (name, role, layer, type, dims, offset, size).
    #[arg(long)]
    pub tensors: bool,
    /// Print the whole report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// The placement plan is made for these choices (as `hypura run`).
    #[command(flatten)]
    pub placement: PlacementArgs,
}

/// Runs `hypura inspect`.
pub fn run(args: InspectArgs) -> anyhow::Result<()> {
    let file = GgufFile::open(&args.model)?;
    let mut report = Report::build(&file, args.tensors);
    let fitted = plan_for_machine(
        &file,
        &args.placement,
        CtxRequest {
            n_ctx: crate::scheduler::default_ctx(&file),
            n_batch: crate::engine::context::ContextOptions::default().n_batch,
            explicit: false,
        },
    )?;
    report.n_ctx = Some(fitted.n_ctx);
    report.plan = Some(fitted.plan);
    report.rpc = fitted.cluster.map(|c| RpcFacts {
        devices: c
            .remotes
            .iter()
            .flat_map(|r| {
                r.devices.iter().map(|d| {
                    let (free, total) = d.memory();
                    RpcDevice {
                        device: d.name(),
                        endpoint: r.endpoint.clone(),
                        free_bytes: free,
                        total_bytes: total,
                    }
                })
            })
            .collect(),
        round_trip_ms: c.rtt_s * 1e3,
        summary: c.split.describe(),
        split: c.split,
    });
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let result = if args.json {
        serde_json::to_writer_pretty(&mut out, &report)
            .map_err(std::io::Error::from)
            .and_then(|()| writeln!(out))
    } else {
        render_text(&report, &mut out)
    };
    match result.and_then(|()| out.flush()) {
        // `hypura inspect x | head` is not an error.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
    }
}

/// Everything `inspect` shows; serialised as-is for `--json`.
#[derive(Debug, Serialize)]
pub struct Report<'a> {
    /// Container facts.
    pub file: FileFacts,
    /// `general.name`, if present.
    pub name: Option<&'a str>,
    /// Architecture hyper-parameters.
    pub architecture: ArchParams,
    /// Total number of weights.
    pub parameters: u64,
    /// Bytes per tensor role (roles with no tensors omitted).
    pub bytes_by_role: Vec<RoleRow>,
    /// Bytes per layer; the row with `layer: null` holds non-layer tensors.
    pub bytes_by_layer: Vec<LayerRow>,
    /// Metadata, arrays summarised.
    pub metadata: Vec<KvRow<'a>>,
    /// Every tensor, with `--tensors`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tensors: Option<&'a [TensorInfo]>,
    /// The placement plan for this machine and budget.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plan: Option<Plan>,
    /// The context size the plan leaves room for (tokens).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub n_ctx: Option<u32>,
    /// Layers on other machines (`--rpc`); the plan is for the local rest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rpc: Option<RpcFacts>,
}

/// The RPC servers' devices and the layer split.
#[derive(Debug, Serialize)]
pub struct RpcFacts {
    pub devices: Vec<RpcDevice>,
    /// The slowest median round trip to a server (milliseconds).
    pub round_trip_ms: f64,
    pub split: crate::scheduler::split::LayerSplit,
    pub summary: String,
}

#[derive(Debug, Serialize)]
pub struct RpcDevice {
    pub device: String,
    pub endpoint: String,
    pub free_bytes: u64,
    pub total_bytes: u64,
}

/// Container-level facts.
#[derive(Debug, Serialize)]
pub struct FileFacts {
    /// Path as given.
    pub path: String,
    /// File size in bytes.
    pub size: u64,
    /// GGUF version.
    pub version: u32,
    /// Data alignment.
    pub alignment: u64,
    /// Absolute start of tensor data.
    pub data_offset: u64,
    /// Number of tensors.
    pub tensor_count: usize,
    /// Bytes of tensor data (without padding).
    pub tensor_bytes: u64,
    /// Number of metadata pairs.
    pub kv_count: usize,
}

/// One row of the bytes-by-role table.
#[derive(Debug, Serialize)]
pub struct RoleRow {
    /// The role.
    pub role: TensorRole,
    /// Tensors with that role.
    pub tensors: usize,
    /// Their bytes.
    pub bytes: u64,
}

/// One row of the bytes-by-layer table.
#[derive(Debug, Default, Serialize)]
pub struct LayerRow {
    /// Layer index; `None` for tensors outside `blk.N`.
    pub layer: Option<u32>,
    /// Tensors in the layer.
    pub tensors: usize,
    /// Attention weights and norms.
    pub attention: u64,
    /// Dense FFN, FFN norms and shared experts.
    pub ffn: u64,
    /// Routed experts.
    pub experts: u64,
    /// Routers and everything else.
    pub other: u64,
    /// All bytes of the layer.
    pub total: u64,
}

/// One metadata pair, with arrays cut down to a preview.
#[derive(Debug, Serialize)]
pub struct KvRow<'a> {
    /// The key.
    pub key: &'a str,
    /// The GGUF value type (`array` for arrays).
    #[serde(rename = "type")]
    pub value_type: &'static str,
    /// Scalar value, or `{elem_type, len, head}` for arrays.
    pub value: serde_json::Value,
}

/// How many leading array elements `--json` shows.
const ARRAY_PREVIEW: usize = 16;

impl<'a> Report<'a> {
    /// Builds the report; `with_tensors` includes the tensor table.
    pub fn build(file: &'a GgufFile, with_tensors: bool) -> Report<'a> {
        Report {
            file: FileFacts {
                path: file.path.display().to_string(),
                size: file.file_size,
                version: file.version,
                alignment: file.alignment,
                data_offset: file.data_offset,
                tensor_count: file.tensors.len(),
                tensor_bytes: file.tensor_bytes(),
                kv_count: file.metadata.len(),
            },
            name: file.get("general.name").and_then(MetaValue::as_str),
            architecture: file.arch_params(),
            parameters: file.parameter_count(),
            bytes_by_role: bytes_by_role(&file.tensors),
            bytes_by_layer: bytes_by_layer(&file.tensors),
            metadata: file.metadata.iter().map(|(k, v)| kv_row(k, v)).collect(),
            tensors: with_tensors.then_some(file.tensors.as_slice()),
            plan: None,
            n_ctx: None,
            rpc: None,
        }
    }
}

fn bytes_by_role(tensors: &[TensorInfo]) -> Vec<RoleRow> {
    let mut rows: Vec<RoleRow> = TensorRole::ALL
        .iter()
        .map(|&role| RoleRow {
            role,
            tensors: 0,
            bytes: 0,
        })
        .collect();
    for t in tensors {
        if let Some(row) = rows.iter_mut().find(|r| r.role == t.role) {
            row.tensors += 1;
            row.bytes = row.bytes.saturating_add(t.size);
        }
    }
    rows.retain(|r| r.tensors > 0);
    rows
}

fn bytes_by_layer(tensors: &[TensorInfo]) -> Vec<LayerRow> {
    // `None` sorts first: the non-layer row leads.
    let mut rows: BTreeMap<Option<u32>, LayerRow> = BTreeMap::new();
    for t in tensors {
        let row = rows.entry(t.layer).or_insert_with(|| LayerRow {
            layer: t.layer,
            ..LayerRow::default()
        });
        row.tensors += 1;
        row.total = row.total.saturating_add(t.size);
        let column = match t.role {
            TensorRole::Attention | TensorRole::AttnNorm => &mut row.attention,
            r if r.is_dense_ffn() => &mut row.ffn,
            TensorRole::FfnNorm | TensorRole::SharedExpert => &mut row.ffn,
            r if r.is_experts() => &mut row.experts,
            _ => &mut row.other,
        };
        *column = column.saturating_add(t.size);
    }
    rows.into_values().collect()
}

fn kv_row<'a>(key: &'a str, v: &MetaValue) -> KvRow<'a> {
    let value = match v {
        MetaValue::Array(a) => serde_json::json!({
            "elem_type": a.elem_type().name(),
            "len": a.len(),
            "head": a.iter().take(ARRAY_PREVIEW).map(|x| scalar_json(&x)).collect::<Vec<_>>(),
        }),
        scalar => scalar_json(scalar),
    };
    KvRow {
        key,
        value_type: v.value_type().name(),
        value,
    }
}

fn scalar_json(v: &MetaValue) -> serde_json::Value {
    match v {
        MetaValue::String(s) => serde_json::Value::from(s.as_str()),
        MetaValue::Bool(b) => serde_json::Value::from(*b),
        MetaValue::F32(_) | MetaValue::F64(_) => v
            .as_f64()
            .map_or(serde_json::Value::Null, serde_json::Value::from),
        MetaValue::I8(_) | MetaValue::I16(_) | MetaValue::I32(_) | MetaValue::I64(_) => v
            .as_i64()
            .map_or(serde_json::Value::Null, serde_json::Value::from),
        _ => v
            .as_u64()
            .map_or(serde_json::Value::Null, serde_json::Value::from),
    }
}

/// Renders the report as text, section by section.
pub fn render_text(r: &Report, out: &mut dyn Write) -> std::io::Result<()> {
    render_summary(r, out)?;
    render_roles(r, out)?;
    render_layers(r, out)?;
    if let Some(rpc) = &r.rpc {
        writeln!(
            out,
            "\nRPC devices (round trip {:.2} ms)",
            rpc.round_trip_ms
        )?;
        for d in &rpc.devices {
            writeln!(
                out,
                "  {:<8} {:<22} {} free of {}",
                d.device,
                d.endpoint,
                human_bytes(d.free_bytes),
                human_bytes(d.total_bytes)
            )?;
        }
        writeln!(
            out,
            "  layers: {} (the plan below is for the local layers)",
            rpc.summary
        )?;
    }
    if let Some(plan) = &r.plan {
        render_plan(plan, r.n_ctx, out)?;
    }
    if let Some(tensors) = r.tensors {
        render_tensors(tensors, r.plan.as_ref(), out)?;
    }
    Ok(())
}

fn render_summary(r: &Report, out: &mut dyn Write) -> std::io::Result<()> {
    let f = &r.file;
    let a = &r.architecture;
    writeln!(out, "{}", f.path)?;
    writeln!(
        out,
        "  file        {} ({} bytes), GGUF v{}, alignment {}, data at byte {}",
        human_bytes(f.size),
        f.size,
        f.version,
        f.alignment,
        f.data_offset
    )?;
    if let Some(name) = r.name {
        writeln!(out, "  name        {name}")?;
    }
    writeln!(
        out,
        "  arch        {}",
        if a.arch.is_empty() { "(none)" } else { &a.arch }
    )?;
    writeln!(
        out,
        "  shape       layers {}  embd {}  heads {} (kv {})  ff {}  ctx {}  vocab {}",
        opt(a.n_layer),
        opt(a.n_embd),
        opt(a.n_head),
        opt(a.n_head_kv),
        opt(a.n_ff),
        opt(a.n_ctx_train),
        opt(a.vocab_size)
    )?;
    if a.n_expert.is_some_and(|n| n > 0) {
        writeln!(
            out,
            "  experts     {} ({} used per token), expert ff {}",
            opt(a.n_expert),
            opt(a.n_expert_used),
            opt(a.n_ff_exp)
        )?;
    }
    writeln!(
        out,
        "  parameters  {} ({})",
        r.parameters,
        human_count(r.parameters)
    )?;
    writeln!(
        out,
        "  tensors     {} holding {} ({} metadata keys)",
        f.tensor_count,
        human_bytes(f.tensor_bytes),
        f.kv_count
    )
}

fn render_roles(r: &Report, out: &mut dyn Write) -> std::io::Result<()> {
    writeln!(out, "\nbytes by role")?;
    writeln!(
        out,
        "  {:<18} {:>8} {:>12} {:>7}",
        "role", "tensors", "bytes", "share"
    )?;
    for row in &r.bytes_by_role {
        writeln!(
            out,
            "  {:<18} {:>8} {:>12} {:>6.1}%",
            row.role.label(),
            row.tensors,
            human_bytes(row.bytes),
            percent(row.bytes, r.file.tensor_bytes)
        )?;
    }
    Ok(())
}

fn render_layers(r: &Report, out: &mut dyn Write) -> std::io::Result<()> {
    writeln!(out, "\nbytes by layer")?;
    writeln!(
        out,
        "  {:>6} {:>8} {:>11} {:>11} {:>11} {:>11} {:>11}",
        "layer", "tensors", "attention", "ffn", "experts", "other", "total"
    )?;
    for row in &r.bytes_by_layer {
        let layer = row
            .layer
            .map_or_else(|| "global".to_string(), |l| l.to_string());
        writeln!(
            out,
            "  {:>6} {:>8} {:>11} {:>11} {:>11} {:>11} {:>11}",
            layer,
            row.tensors,
            human_bytes(row.attention),
            human_bytes(row.ffn),
            human_bytes(row.experts),
            human_bytes(row.other),
            human_bytes(row.total)
        )?;
    }
    Ok(())
}

fn render_plan(p: &Plan, n_ctx: Option<u32>, out: &mut dyn Write) -> std::io::Result<()> {
    let ctx = n_ctx.map_or(String::new(), |n| format!(", context {n} tokens"));
    writeln!(
        out,
        "\nplacement plan (RAM budget {}{ctx})",
        human_bytes(p.ram_budget)
    )?;
    writeln!(out, "  mode            {}", p.mode.label())?;
    if let Some(g) = &p.gpu {
        writeln!(
            out,
            "  gpu             {} (budget {}{})",
            g.device,
            human_bytes(g.budget),
            match (g.direct, g.unified) {
                (_, true) => ", one memory with the CPU (unified: its share comes out of the RAM budget; no host-to-device copies in the estimate)",
                (true, false) => ", computes on host memory",
                _ => "",
            }
        )?;
        writeln!(out, "  resident (GPU)  {}", human_bytes(g.resident_bytes))?;
        if g.n_slots > 0 {
            let what = if p.mode == Mode::GpuExperts {
                format!(
                    "{} layer slots, {} of them dedicated",
                    g.n_slots,
                    g.dedicated_layers.len()
                )
            } else {
                format!("{} layer slots", g.n_slots)
            };
            writeln!(
                out,
                "  pool (GPU)      {} ({what})",
                human_bytes(g.pool_bytes)
            )?;
        }
    }
    let ram_resident = match &p.gpu {
        Some(g) => p.resident_bytes.saturating_sub(g.resident_bytes),
        None => p.resident_bytes,
    };
    writeln!(out, "  resident (RAM)  {}", human_bytes(ram_resident))?;
    writeln!(
        out,
        "  streamed (NVMe) {} in {} tensors",
        human_bytes(p.streamed_bytes),
        p.streamed.len()
    )?;
    if p.mode != Mode::Resident {
        let pinned_on = match (&p.gpu, p.mode) {
            (Some(_), Mode::GpuDense) => " on the GPU",
            (Some(_), Mode::Dense) => " in RAM (CPU)",
            _ => "",
        };
        writeln!(
            out,
            "  layers          {} pinned{pinned_on}, {} streamed",
            p.pinned_layers.len(),
            p.streamed_layers.len()
        )?;
        if let Some(r) = &p.embd_rows {
            writeln!(
                out,
                "  embeddings      {} read by rows from NVMe (row cache {})",
                human_bytes(r.size),
                human_bytes(r.cache_bytes)
            )?;
        }
        if !p.ram_layers.is_empty() {
            writeln!(out, "  RAM tier        {} of the streamed layers kept in RAM, copied to the GPU each token", p.ram_layers.len())?;
        }
        let pool = if p.mode == Mode::GpuExperts {
            "expert cache (RAM)"
        } else {
            "pool (RAM)"
        };
        writeln!(
            out,
            "  {pool:<15} {} (lookahead {})",
            human_bytes(p.pool_bytes),
            p.lookahead
        )?;
        writeln!(out, "  read per token  {}", human_bytes(p.bytes_per_token))?;
    }
    let link = if p.gpu.as_ref().is_some_and(|g| !g.direct) && p.mode.on_gpu() {
        "min(disk, host->GPU) ceiling"
    } else {
        "disk ceiling"
    };
    match (p.ceiling_tps, p.predicted_tps) {
        (Some(c), Some(t)) => {
            writeln!(out, "  predicted       {t:.2} tok/s ({link} {c:.2} tok/s)")?
        }
        (None, Some(t)) => writeln!(out, "  predicted       {t:.2} tok/s (memory-bound)")?,
        (None, None) if p.mode == Mode::Resident && p.gpu.is_some() => {
            writeln!(out, "  predicted       GPU-bound (everything on the GPU)")?
        }
        _ => writeln!(
            out,
            "  predicted       unknown: run `hypura profile` to measure this machine"
        )?,
    }
    Ok(())
}

fn render_tensors(
    tensors: &[TensorInfo],
    plan: Option<&Plan>,
    out: &mut dyn Write,
) -> std::io::Result<()> {
    writeln!(out, "\ntensors")?;
    writeln!(
        out,
        "  {:<34} {:<16} {:>5} {:<8} {:<26} {:>14} {:>12} {:<5}",
        "name", "role", "layer", "type", "dims", "offset", "size", "tier"
    )?;
    for t in tensors {
        let dims = t
            .dims
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(" x ");
        let tier = match plan.map(|p| p.tier(t)) {
            Some(Tier::Gpu) => "gpu",
            Some(Tier::Nvme) => "nvme",
            Some(Tier::Ram) | None => "ram",
        };
        writeln!(
            out,
            "  {:<34} {:<16} {:>5} {:<8} {:<26} {:>14} {:>12} {:<5}",
            t.name,
            t.role.label(),
            opt(t.layer),
            t.ggml_type.name(),
            dims,
            t.offset,
            t.size,
            tier
        )?;
    }
    Ok(())
}

fn opt(v: Option<u32>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

pub use crate::scheduler::format_bytes as human_bytes;

/// `134515008` → `134.5 M`.
fn human_count(n: u64) -> String {
    const UNITS: [(&str, f64); 4] = [("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)];
    UNITS.iter().find(|(_, s)| n as f64 >= *s).map_or_else(
        || n.to_string(),
        |(u, s)| format!("{:.1} {u}", n as f64 / s),
    )
}
