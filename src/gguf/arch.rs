//! Architecture hyper-parameters read from `{arch}.*` metadata keys.

use serde::Serialize;

use super::value::MetaValue;

/// The shape of a model as its metadata declares it; absent keys are `None`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ArchParams {
    /// `general.architecture` (empty if absent).
    pub arch: String,
    /// `{arch}.block_count`.
    pub n_layer: Option<u32>,
    /// `{arch}.embedding_length`.
    pub n_embd: Option<u32>,
    /// `{arch}.attention.head_count` (max over layers if per-layer).
    pub n_head: Option<u32>,
    /// `{arch}.attention.head_count_kv` (max over layers if per-layer).
    pub n_head_kv: Option<u32>,
    /// `{arch}.feed_forward_length` (max over layers if per-layer).
    pub n_ff: Option<u32>,
    /// `{arch}.expert_count`.
    pub n_expert: Option<u32>,
    /// `{arch}.expert_used_count`.
    pub n_expert_used: Option<u32>,
    /// `{arch}.expert_feed_forward_length`.
    pub n_ff_exp: Option<u32>,
    /// `{arch}.context_length`.
    pub n_ctx_train: Option<u32>,
    /// Length of `tokenizer.ggml.tokens`, else `{arch}.vocab_size`.
    pub vocab_size: Option<u32>,
}

impl ArchParams {
    /// Reads the parameters through `get`, a metadata lookup by key.
    pub(crate) fn from_lookup<'a>(
        arch: &str,
        get: impl Fn(&str) -> Option<&'a MetaValue>,
    ) -> ArchParams {
        let u32_of = |suffix: &str| -> Option<u32> {
            get(&format!("{arch}.{suffix}"))
                .and_then(MetaValue::max_u64)
                .and_then(|v| u32::try_from(v).ok())
        };
        let vocab_from_tokens = get("tokenizer.ggml.tokens")
            .and_then(MetaValue::as_array)
            .and_then(|a| u32::try_from(a.len()).ok());
        ArchParams {
            arch: arch.to_string(),
            n_layer: u32_of("block_count"),
            n_embd: u32_of("embedding_length"),
            n_head: u32_of("attention.head_count"),
            n_head_kv: u32_of("attention.head_count_kv"),
            n_ff: u32_of("feed_forward_length"),
            n_expert: u32_of("expert_count"),
            n_expert_used: u32_of("expert_used_count"),
            n_ff_exp: u32_of("expert_feed_forward_length"),
            n_ctx_train: u32_of("context_length"),
            vocab_size: vocab_from_tokens.or_else(|| u32_of("vocab_size")),
        }
    }
}
