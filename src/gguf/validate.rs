//! Model validation of a parsed file, before llama.cpp is ever handed it.
//!
//! llama.cpp throws (and Hypura reports) on most bad metadata, but on some it
//! aborts the whole process with `GGML_ASSERT`, and some values only fail in
//! the middle of a computation. This module checks, on every open:
//!
//! - layer indices: a tensor `blk.N.*` needs `N < {arch}.block_count`
//!   (`N < 512` without a block count), so no count from a tensor name can
//!   drive an allocation or an index later;
//! - what `llama_model_base::load_hparams` asserts for every architecture:
//!   the block count (1 to 512), the next-token-prediction layers, the expert
//!   counts (`expert_used_count <= expert_count <= 1024`, groups), the RoPE
//!   scaling type, norm epsilons (finite, not negative);
//! - head counts: `head_count_kv` in 1..=`head_count` and dividing it;
//! - the vocabulary: no two tokens alike (llama.cpp asserts on it), score and
//!   type arrays as long as the token list, and the token embedding's rows;
//! - for the architectures Hypura supports (llama and Mixtral as llama,
//!   qwen2, qwen3, qwen3moe, gemma3): embedding and head sizes, the RoPE
//!   dimension, every tensor shape the graph depends on (attention, dense
//!   FFN, experts, router, norms) against the metadata, and tensor types
//!   ggml can compute with (f32 norms and biases, matrices with a dot
//!   product).
//!
//! A check runs only when its keys are present: a file with no
//! `general.architecture` (a bare tensor container) is checked for layer
//! indices only. Every message names the key or tensor, quoting at most 100
//! characters of the file.

use super::error::{quoted, GgufError};
use super::value::MetaValue;
use super::{GgmlType, GgufFile, TensorInfo, TensorRole};

/// llama.cpp's `LLAMA_MAX_LAYERS`: the most blocks a model may have.
pub const MAX_LAYERS: u32 = 512;
/// llama.cpp's `LLAMA_MAX_EXPERTS`.
pub const MAX_EXPERTS: u32 = 1024;

/// `rope.scaling.type` values llama.cpp knows (it asserts on any other).
const ROPE_SCALING_TYPES: [&str; 4] = ["none", "linear", "yarn", "longrope"];
/// Architectures whose tensor shapes are checked against their metadata.
const SUPPORTED: [&str; 5] = ["llama", "qwen2", "qwen3", "qwen3moe", "gemma3"];

/// Checks `f`; the first problem found is the error.
pub(crate) fn check(f: &GgufFile) -> Result<(), GgufError> {
    let arch = match f.get("general.architecture") {
        None => None,
        Some(MetaValue::String(s)) => Some(s.as_str()),
        Some(v) => {
            return Err(f.bad(format!(
                "general.architecture must be a string, found {}",
                v.value_type().name()
            )))
        }
    };
    let v = Check { f, arch };
    let n_layer = v.block_count()?;
    v.layer_indices(n_layer)?;
    let n_vocab = v.vocab()?;
    if arch.is_some() {
        v.experts(n_layer)?;
        v.heads(n_layer)?;
        v.misc(n_layer)?;
    }
    if arch.is_some_and(|a| SUPPORTED.contains(&a)) {
        v.types()?;
        v.shapes(n_layer, n_vocab)?;
    }
    Ok(())
}

impl GgufFile {
    /// A validation error naming this file.
    fn bad(&self, what: impl Into<String>) -> GgufError {
        GgufError::invalid(&self.path, what)
    }
}

struct Check<'a> {
    f: &'a GgufFile,
    arch: Option<&'a str>,
}

/// What a per-layer hyper-parameter holds.
enum PerLayer<'a> {
    Absent,
    Scalar(u64),
    Array(&'a MetaValue),
}

impl<'a> Check<'a> {
    /// `{arch}.suffix`.
    fn key(&self, suffix: &str) -> String {
        format!("{}.{suffix}", self.arch.unwrap_or_default())
    }

    fn get(&self, suffix: &str) -> Option<&'a MetaValue> {
        self.arch.and_then(|_| self.f.get(&self.key(suffix)))
    }

    /// An integer hyper-parameter; an error if present but not a
    /// non-negative integer.
    fn uint(&self, suffix: &str) -> Result<Option<u64>, GgufError> {
        match self.get(suffix) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                self.f.bad(format!(
                    "{} must be a non-negative integer, found {} {}",
                    self.key(suffix),
                    v.value_type().name(),
                    shown(v)
                ))
            }),
        }
    }

    /// A hyper-parameter that is one integer or one per layer.
    fn per_layer(&self, suffix: &str, n_layer: u32) -> Result<PerLayer<'a>, GgufError> {
        let Some(v) = self.get(suffix) else {
            return Ok(PerLayer::Absent);
        };
        let Some(a) = v.as_array() else {
            return self
                .uint(suffix)
                .map(|x| x.map_or(PerLayer::Absent, PerLayer::Scalar));
        };
        if a.len() != n_layer as usize {
            return Err(self.f.bad(format!(
                "{} has {} entries, one per layer needs {n_layer}",
                self.key(suffix),
                a.len()
            )));
        }
        if a.iter().any(|x| x.as_u64().is_none()) {
            return Err(self.f.bad(format!(
                "{} must hold non-negative integers, found {}",
                self.key(suffix),
                shown(v)
            )));
        }
        Ok(PerLayer::Array(v))
    }

    /// `{arch}.block_count`: 1 to 512 when present.
    fn block_count(&self) -> Result<Option<u32>, GgufError> {
        let Some(n) = self.uint("block_count")? else {
            return Ok(None);
        };
        if n == 0 || n > u64::from(MAX_LAYERS) {
            return Err(self.f.bad(format!(
                "{} {n} is out of range (1 to {MAX_LAYERS})",
                self.key("block_count")
            )));
        }
        Ok(Some(n as u32))
    }

    /// Every `blk.N.*` tensor has `N` below the block count (or 512).
    fn layer_indices(&self, n_layer: Option<u32>) -> Result<(), GgufError> {
        let limit = n_layer.unwrap_or(MAX_LAYERS);
        let Some(t) = self
            .f
            .tensors
            .iter()
            .find(|t| t.layer.is_some_and(|l| l >= limit))
        else {
            return Ok(());
        };
        let l = t.layer.unwrap_or_default();
        Err(self.f.bad(match n_layer {
            Some(n) => format!(
                "tensor {} is in layer {l}, but {} is {n} (layers 0 to {})",
                quoted(&t.name),
                self.key("block_count"),
                n - 1
            ),
            None => format!(
                "tensor {} is in layer {l}; a model has at most {MAX_LAYERS} layers",
                quoted(&t.name)
            ),
        }))
    }

    /// The token list: unique tokens, long-enough score and type arrays.
    /// Returns the number of tokens.
    fn vocab(&self) -> Result<Option<u64>, GgufError> {
        let Some(v) = self.f.get("tokenizer.ggml.tokens") else {
            return Ok(None);
        };
        let Some(tokens) = v.as_array().and_then(|a| a.as_strings()) else {
            return Err(self.f.bad(format!(
                "tokenizer.ggml.tokens must be an array of strings, found {}",
                shown(v)
            )));
        };
        let n = tokens.len() as u64;
        if n == 0 || n > i32::MAX as u64 {
            return Err(self.f.bad(format!(
                "tokenizer.ggml.tokens has {n} tokens (must be 1 to {})",
                i32::MAX
            )));
        }
        for key in ["tokenizer.ggml.scores", "tokenizer.ggml.token_type"] {
            if let Some(a) = self.f.get(key).and_then(MetaValue::as_array) {
                if (a.len() as u64) < n {
                    return Err(self.f.bad(format!(
                        "{key} has {} entries, fewer than the {n} tokens",
                        a.len()
                    )));
                }
            }
        }
        // llama.cpp renames an empty token to `[EMPTY_i]` and then asserts
        // that no two are alike. Tokens that were not valid UTF-8 were
        // replaced lossily, so they may differ in the file: not compared.
        let twice = |t: &str, i: usize| {
            let first = tokens.iter().position(|x| x == t).unwrap_or(i);
            Err(self.f.bad(format!(
                "tokenizer.ggml.tokens has token {} twice (ids {first} and {i})",
                quoted(t)
            )))
        };
        let mut seen = std::collections::HashSet::with_capacity(tokens.len());
        for (i, t) in tokens.iter().enumerate() {
            if !t.is_empty() && !t.contains(char::REPLACEMENT_CHARACTER) && !seen.insert(t.as_str())
            {
                return twice(t, i);
            }
        }
        for (i, _) in tokens.iter().enumerate().filter(|(_, t)| t.is_empty()) {
            let renamed = format!("[EMPTY_{i}]");
            if seen.contains(renamed.as_str()) {
                return twice(&renamed, i);
            }
        }
        Ok(Some(n))
    }

    /// What `load_hparams` asserts on experts (Hunyuan models excepted:
    /// llama.cpp rewrites their counts first).
    fn experts(&self, n_layer: Option<u32>) -> Result<(), GgufError> {
        if self.arch.is_some_and(|a| a.starts_with("hunyuan")) {
            return Ok(());
        }
        let n_expert = self.uint("expert_count")?.unwrap_or(0);
        let used = match self.per_layer("expert_used_count", n_layer.unwrap_or(0)) {
            // Without a block count llama.cpp fails on its own.
            Err(_) if n_layer.is_none() => return Ok(()),
            r => max_of(&r?),
        };
        let groups = self.uint("expert_group_count")?.unwrap_or(0);
        let group_used = self.uint("expert_group_used_count")?.unwrap_or(0);
        let (kc, ku) = (self.key("expert_count"), self.key("expert_used_count"));
        let (kg, kgu) = (
            self.key("expert_group_count"),
            self.key("expert_group_used_count"),
        );
        let fail = |m: String| Err(self.f.bad(m));
        if n_expert > u64::from(MAX_EXPERTS) {
            return fail(format!("{kc} {n_expert} is more than {MAX_EXPERTS}"));
        }
        if used > n_expert {
            return fail(format!("{ku} {used} is more than {kc} {n_expert}"));
        }
        if n_expert == 0 {
            if groups != 0 {
                return fail(format!("{kg} {groups} without experts ({kc} is 0)"));
            }
            // Stacked experts need a count to route over (the scheduler
            // streams them by it).
            let supported = self.arch.is_some_and(|a| SUPPORTED.contains(&a));
            if let Some(t) = self.f.tensors.iter().find(|t| t.n_experts().is_some()) {
                if supported {
                    return fail(format!(
                        "tensor {} holds routed experts, but {kc} is 0 or absent",
                        quoted(&t.name)
                    ));
                }
            }
            return Ok(());
        }
        if used == 0 {
            return fail(format!("{ku} is 0, but {kc} is {n_expert}"));
        }
        if groups >= n_expert {
            return fail(format!("{kg} {groups} must be less than {kc} {n_expert}"));
        }
        if groups > 1 {
            if n_expert % groups != 0 {
                return fail(format!(
                    "{kc} {n_expert} is not a multiple of {kg} {groups}"
                ));
            }
            if group_used == 0 || group_used >= groups {
                return fail(format!(
                    "{kgu} {group_used} must be 1 to {} ({kg} is {groups})",
                    groups - 1
                ));
            }
        }
        Ok(())
    }

    /// Per layer: `head_count_kv` in 1..=`head_count` and dividing it.
    fn heads(&self, n_layer: Option<u32>) -> Result<(), GgufError> {
        let Some(n) = n_layer else { return Ok(()) };
        let heads = self.per_layer("attention.head_count", n)?;
        let kv = self.per_layer("attention.head_count_kv", n)?;
        let supported = self.arch.is_some_and(|a| SUPPORTED.contains(&a));
        for il in 0..n {
            let Some(h) = at(&heads, il) else { continue };
            let k = at(&kv, il).unwrap_or(h);
            if h == 0 {
                if supported {
                    return Err(self.f.bad(format!(
                        "{} is 0{}: the model needs attention heads",
                        self.key("attention.head_count"),
                        layer_note(&heads, &heads, il)
                    )));
                }
                continue;
            }
            if k == 0 || k > h || h % k != 0 {
                return Err(self.f.bad(format!(
                    "{} {k} must divide {} {h}{}",
                    self.key("attention.head_count_kv"),
                    self.key("attention.head_count"),
                    layer_note(&heads, &kv, il)
                )));
            }
        }
        Ok(())
    }

    /// RoPE scaling type, norm epsilons, next-token-prediction layers.
    fn misc(&self, n_layer: Option<u32>) -> Result<(), GgufError> {
        if let Some(MetaValue::String(s)) = self.get("rope.scaling.type") {
            if !ROPE_SCALING_TYPES.contains(&s.as_str()) {
                return Err(self.f.bad(format!(
                    "{} {} is not one of {}",
                    self.key("rope.scaling.type"),
                    quoted(s),
                    ROPE_SCALING_TYPES.join(", ")
                )));
            }
        }
        for k in [
            "attention.layer_norm_rms_epsilon",
            "attention.layer_norm_epsilon",
        ] {
            if let Some(e) = self.get(k).and_then(MetaValue::as_f64) {
                if !e.is_finite() || e < 0.0 {
                    return Err(self.f.bad(format!(
                        "{} {e} must be a finite number, at least 0",
                        self.key(k)
                    )));
                }
            }
        }
        if let (Some(m), Some(n)) = (self.uint("nextn_predict_layers")?, n_layer) {
            if m > u64::from(n) {
                return Err(self.f.bad(format!(
                    "{} {m} is more than {} {n}",
                    self.key("nextn_predict_layers"),
                    self.key("block_count")
                )));
            }
        }
        Ok(())
    }
}

/// A value for a message: scalars as themselves, arrays and strings cut short.
fn shown(v: &MetaValue) -> String {
    match v {
        MetaValue::String(s) => quoted(s),
        MetaValue::Array(a) => format!("an array of {} {}", a.len(), a.elem_type().name()),
        v => v.to_string(),
    }
}

/// The value at layer `il`.
fn at(p: &PerLayer<'_>, il: u32) -> Option<u64> {
    match p {
        PerLayer::Absent => None,
        PerLayer::Scalar(v) => Some(*v),
        PerLayer::Array(v) => v
            .as_array()
            .and_then(|a| a.get(il as usize))
            .and_then(|x| x.as_u64()),
    }
}

/// The largest value over the layers (0 when absent).
fn max_of(p: &PerLayer<'_>) -> u64 {
    match p {
        PerLayer::Absent => 0,
        PerLayer::Scalar(v) => *v,
        PerLayer::Array(v) => v.max_u64().unwrap_or(0),
    }
}

/// ` (layer N)` when either value is a per-layer array, nothing for scalars.
fn layer_note(a: &PerLayer<'_>, b: &PerLayer<'_>, il: u32) -> String {
    match (a, b) {
        (PerLayer::Array(_), _) | (_, PerLayer::Array(_)) => format!(" (layer {il})"),
        _ => String::new(),
    }
}

/// `[a, b, c]`.
fn dims_str(d: &[u64]) -> String {
    let parts: Vec<String> = d.iter().map(u64::to_string).collect();
    format!("[{}]", parts.join(", "))
}

/// The sizes a supported architecture's tensors are checked against.
struct Sizes<'a> {
    n_embd: u64,
    n_vocab: Option<u64>,
    heads: PerLayer<'a>,
    kv: PerLayer<'a>,
    ff: PerLayer<'a>,
    ff_exp: PerLayer<'a>,
    n_expert: Option<u64>,
    head_k: Option<u64>,
    head_v: Option<u64>,
}

impl Check<'_> {
    /// Tensors in types the graph can compute with: vectors (norms, biases)
    /// in F32 (ggml asserts on others mid-computation, an i32 bias included:
    /// it is as large as an f32 one), matrices in a type with a CPU dot
    /// product.
    fn types(&self) -> Result<(), GgufError> {
        for t in &self.f.tensors {
            if t.dims.len() == 1 && t.ggml_type != GgmlType::F32 {
                return Err(self.f.bad(format!(
                    "tensor {} is a vector (a norm or a bias) of type {}; vectors must be f32",
                    quoted(&t.name),
                    t.ggml_type
                )));
            }
            if t.dims.len() >= 2 && !t.ggml_type.has_cpu_matmul() {
                return Err(self.f.bad(format!(
                    "tensor {} has type {}, which ggml cannot compute with as a weight",
                    quoted(&t.name),
                    t.ggml_type
                )));
            }
        }
        Ok(())
    }

    /// Embedding, head and RoPE sizes, then every tensor's shape.
    fn shapes(&self, n_layer: Option<u32>, n_vocab: Option<u64>) -> Result<(), GgufError> {
        let (Some(n), Some(n_embd)) = (n_layer, self.uint("embedding_length")?) else {
            return Ok(());
        };
        let ke = self.key("embedding_length");
        if n_embd == 0 || n_embd > i32::MAX as u64 {
            return Err(self
                .f
                .bad(format!("{ke} {n_embd} is out of range (1 to {})", i32::MAX)));
        }
        let heads = self.per_layer("attention.head_count", n)?;
        let h0 = at(&heads, 0).unwrap_or(0);
        let head_k = match self.uint("attention.key_length")? {
            Some(k) => Some(k),
            None if h0 > 0 => {
                if n_embd % h0 != 0 {
                    return Err(self.f.bad(format!(
                        "{ke} {n_embd} is not a multiple of {} {h0} (and {} is absent)",
                        self.key("attention.head_count"),
                        self.key("attention.key_length")
                    )));
                }
                Some(n_embd / h0)
            }
            None => None,
        };
        let head_v = self.uint("attention.value_length")?.or(head_k);
        let ff_exp = match self.per_layer("expert_feed_forward_length", n)? {
            PerLayer::Absent if self.arch == Some("llama") => {
                self.per_layer("feed_forward_length", n)?
            }
            p => p,
        };
        let s = Sizes {
            n_embd,
            n_vocab,
            heads,
            kv: match self.per_layer("attention.head_count_kv", n)? {
                PerLayer::Absent => self.per_layer("attention.head_count", n)?,
                p => p,
            },
            ff: self.per_layer("feed_forward_length", n)?,
            ff_exp,
            n_expert: self.uint("expert_count")?.filter(|&e| e > 0),
            head_k,
            head_v,
        };
        for t in &self.f.tensors {
            if let Some(want) = self.expected(t, &s) {
                if want.len() != t.dims.len()
                    || want
                        .iter()
                        .zip(&t.dims)
                        .any(|(w, d)| w.is_some_and(|w| w != *d))
                {
                    let want: Vec<String> = want
                        .iter()
                        .map(|w| w.map_or("*".to_string(), |w| w.to_string()))
                        .collect();
                    return Err(self.f.bad(format!(
                        "tensor {} has shape {}, but the metadata ({} architecture) needs [{}]",
                        quoted(&t.name),
                        dims_str(&t.dims),
                        self.arch.unwrap_or_default(),
                        want.join(", ")
                    )));
                }
            }
        }
        // ggml's RoPE asserts on an odd or too wide rotation mid-computation.
        if let (Some(r), Some(hk)) = (self.uint("rope.dimension_count")?, head_k) {
            if r > hk || r % 2 != 0 {
                return Err(self.f.bad(format!(
                    "{} {r} must be even and at most the head size {hk}",
                    self.key("rope.dimension_count")
                )));
            }
        }
        Ok(())
    }

    /// The shape `t` must have (`None` entries: any size), if it is checked.
    fn expected(&self, t: &TensorInfo, s: &Sizes<'_>) -> Option<Vec<Option<u64>>> {
        let base = t.name.strip_suffix(".weight")?;
        let e = Some(s.n_embd);
        let layer = t.layer;
        let il = layer.unwrap_or(0);
        let mul = |a: Option<u64>, b: Option<u64>| a.zip(b).and_then(|(a, b)| a.checked_mul(b));
        let q = mul(at(&s.heads, il), s.head_k);
        let q_v = mul(at(&s.heads, il), s.head_v);
        let k = mul(at(&s.kv, il), s.head_k);
        let v = mul(at(&s.kv, il), s.head_v);
        let ff = at(&s.ff, il);
        let fx = at(&s.ff_exp, il);
        let x = s.n_expert;
        let name = match layer {
            Some(l) => base.strip_prefix(&format!("blk.{l}."))?,
            None => base,
        };
        Some(match (layer.is_some(), name) {
            (false, "token_embd") | (false, "output") => vec![e, s.n_vocab],
            (false, "output_norm") => vec![e],
            (true, "attn_norm") | (true, "ffn_norm") => vec![e],
            (true, "attn_q") => vec![e, q],
            (true, "attn_k") => vec![e, k],
            (true, "attn_v") => vec![e, v],
            (true, "attn_output") => vec![q_v, e],
            (true, "ffn_gate") | (true, "ffn_up") if t.role.is_dense_ffn() => vec![e, ff],
            (true, "ffn_down") if t.role == TensorRole::FfnDown => vec![ff, e],
            (true, "ffn_gate_inp") => vec![e, x],
            (true, "ffn_gate_exps") | (true, "ffn_up_exps") => vec![e, fx, x],
            (true, "ffn_down_exps") => vec![fx, e, x],
            _ => return None,
        })
    }
}
