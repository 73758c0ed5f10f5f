//! What the server says about its model: gathered once from the session
//! ([`describe`]) and shaped into Ollama's `details` and `model_info`.

use std::time::SystemTime;

use anyhow::Result;
use serde_json::{json, Map, Value};

use super::engine::ModelInfo;
use crate::engine::chat::ChatTemplate;
use crate::engine::Session;
use crate::gguf::{MetaArray, MetaValue};

/// Arrays longer than this (vocabularies, merges) are left out of `model_info`.
const MAX_ARRAY: usize = 64;

pub fn describe(session: &Session, template: &Result<ChatTemplate>) -> ModelInfo {
    let path = session.path();
    let gguf = session.gguf();
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let fmeta = std::fs::metadata(path).ok();
    let size = fmeta.as_ref().map_or(gguf.file_size, |m| m.len());
    let modified = fmeta
        .and_then(|m| m.modified().ok())
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let mut meta = Map::new();
    for (k, v) in &gguf.metadata {
        if let Some(j) = meta_json(v) {
            meta.insert(k.clone(), j);
        }
    }
    meta.insert(
        "general.parameter_count".into(),
        json!(gguf.parameter_count()),
    );
    let template_src = match template {
        Ok(ChatTemplate::Builtin(n)) => n.clone(),
        Ok(ChatTemplate::Jinja { .. }) => session.model().chat_template().unwrap_or_default(),
        Err(_) => String::new(),
    };
    let plan = session.plan();
    ModelInfo {
        digest: digest(&path.to_string_lossy(), size, modified),
        name,
        path: path.to_string_lossy().into_owned(),
        size,
        modified,
        arch: gguf.architecture().unwrap_or("unknown").to_string(),
        parameter_count: gguf.parameter_count(),
        quantization: gguf
            .get("general.file_type")
            .and_then(MetaValue::as_u64)
            .map_or_else(|| "unknown".into(), |t| ftype_name(t).to_string()),
        n_ctx: session.n_ctx(),
        n_ctx_train: session.model().n_ctx_train(),
        template: template_src,
        meta,
        mode: plan.mode.label().to_string(),
        resident_bytes: plan.resident_bytes,
        streamed_bytes: plan.streamed_bytes,
        load_secs: session.load_secs(),
    }
}

/// A stable identifier for the file (its path, size and modification time
/// hashed; not a hash of its contents, which would read the whole model).
fn digest(path: &str, size: u64, modified: SystemTime) -> String {
    let secs = modified
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    // FNV-1a, four lanes with different offsets: 64 hex digits like Ollama's.
    let mut out = String::with_capacity(64);
    for lane in 0u64..4 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ lane.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let bytes = path
            .bytes()
            .chain(size.to_le_bytes())
            .chain(secs.to_le_bytes());
        for b in bytes {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        out.push_str(&format!("{h:016x}"));
    }
    out
}

fn meta_json(v: &MetaValue) -> Option<Value> {
    Some(match v {
        MetaValue::U8(x) => json!(x),
        MetaValue::I8(x) => json!(x),
        MetaValue::U16(x) => json!(x),
        MetaValue::I16(x) => json!(x),
        MetaValue::U32(x) => json!(x),
        MetaValue::I32(x) => json!(x),
        MetaValue::F32(x) => json!(x),
        MetaValue::Bool(x) => json!(x),
        MetaValue::String(x) => json!(x),
        MetaValue::U64(x) => json!(x),
        MetaValue::I64(x) => json!(x),
        MetaValue::F64(x) => json!(x),
        MetaValue::Array(a) if a.len() > MAX_ARRAY => return None,
        MetaValue::Array(MetaArray::String(v)) => json!(v),
        MetaValue::Array(a) => Value::Array(a.iter().filter_map(|e| meta_json(&e)).collect()),
    })
}

/// `general.file_type` (llama.cpp's `llama_ftype`) as Ollama names it.
fn ftype_name(t: u64) -> &'static str {
    match t {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        19 => "IQ2_XXS",
        20 => "IQ2_XS",
        21 => "Q2_K_S",
        22 => "IQ3_XS",
        23 => "IQ3_XXS",
        24 => "IQ1_S",
        25 => "IQ4_NL",
        26 => "IQ3_S",
        27 => "IQ3_M",
        28 => "IQ2_S",
        29 => "IQ2_M",
        30 => "IQ4_XS",
        31 => "IQ1_M",
        32 => "BF16",
        36 => "TQ1_0",
        37 => "TQ2_0",
        _ => "unknown",
    }
}

/// "135M", "1.5B": Ollama's `parameter_size`.
pub fn parameter_size(n: u64) -> String {
    let (v, unit) = match n {
        n if n >= 1_000_000_000 => (n as f64 / 1e9, "B"),
        n if n >= 1_000_000 => (n as f64 / 1e6, "M"),
        n => (n as f64 / 1e3, "K"),
    };
    if v >= 100.0 || (v - v.round()).abs() < 0.05 {
        format!("{}{unit}", v.round())
    } else {
        format!("{v:.1}{unit}")
    }
}

/// Ollama's `details` object.
pub fn details(m: &ModelInfo) -> Value {
    let family = m.arch.clone();
    json!({
        "parent_model": "",
        "format": "gguf",
        "family": family,
        "families": [family],
        "parameter_size": parameter_size(m.parameter_count),
        "quantization_level": m.quantization,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_digest() {
        assert_eq!(parameter_size(134_515_008), "135M");
        assert_eq!(parameter_size(1_543_714_304), "1.5B");
        assert_eq!(parameter_size(7_000_000_000), "7B");
        let t = SystemTime::UNIX_EPOCH;
        let d = digest("/m.gguf", 10, t);
        assert_eq!(d.len(), 64);
        assert_eq!(d, digest("/m.gguf", 10, t));
        assert_ne!(d, digest("/m.gguf", 11, t));
        assert_eq!(ftype_name(15), "Q4_K_M");
    }
}
