//! The GGUF model layer: our own parser (no llama.cpp calls), tensor roles,
//! architecture parameters, and a streaming writer.
//!
//! [`GgufFile::open`] reads only the header, metadata and tensor infos, and
//! validates the layout against the file size; tensor data is never read, so
//! opening a 100 GB model costs a few megabytes of I/O. It then validates the
//! model (`validate.rs`): layer indices against the block count, and every
//! hyper-parameter llama.cpp would abort the process on (`GGML_ASSERT`), so
//! llama.cpp is only ever handed a file it fails on with an error, if at all.

mod arch;
mod error;
mod reader;
mod roles;
pub mod synth;
mod tensor;
mod types;
mod validate;
mod value;
mod writer;

use std::path::{Path, PathBuf};

pub use arch::ArchParams;
pub use error::{quoted, GgufError, Section, MAX_QUOTED_CHARS};
pub use reader::{
    ALIGNMENT_KEY, DEFAULT_ALIGNMENT, MAX_ARRAY_LEN, MAX_DIMS, MAX_KEY_LEN, MAX_KVS,
    MAX_STRING_LEN, MAX_TENSORS, MAX_TENSOR_NAME_LEN,
};
pub use roles::{classify, TensorRole};
pub use tensor::TensorInfo;
pub use types::GgmlType;
pub use validate::{MAX_EXPERTS, MAX_LAYERS};
pub use value::{MetaArray, MetaValue, ValueType};
pub use writer::{GgufWriter, TensorSpec, WRITE_VERSION};

/// A parsed, validated GGUF file: metadata and tensor layout, no tensor data.
#[derive(Debug, Clone)]
pub struct GgufFile {
    /// The path it was opened from.
    pub path: PathBuf,
    /// GGUF version (2 or 3).
    pub version: u32,
    /// Data alignment in bytes (`general.alignment`, default 32).
    pub alignment: u64,
    /// Absolute offset where the tensor data section starts.
    pub data_offset: u64,
    /// The file's size in bytes.
    pub file_size: u64,
    /// Metadata pairs in file order.
    pub metadata: Vec<(String, MetaValue)>,
    /// Tensors in file (info) order, with absolute offsets.
    pub tensors: Vec<TensorInfo>,
}

impl GgufFile {
    /// Parses and validates `path`. Fails with a one-line [`GgufError`] for a
    /// missing path, a directory, an empty or non-GGUF file, truncation
    /// anywhere, absurd counts or lengths, bad shapes or types, and tensors
    /// that lie outside the file.
    pub fn open(path: &Path) -> Result<GgufFile, GgufError> {
        reader::open(path)
    }

    /// Parses and validates a GGUF file held in memory: `prefix` is its first
    /// bytes (at least the header, metadata and tensor infos; the tensor data
    /// need not be there) and `file_size` its full size. Errors name `path`
    /// as [`GgufFile::open`]'s would; no file is touched (tests, fuzzing).
    pub fn parse_prefix(path: &Path, prefix: &[u8], file_size: u64) -> Result<GgufFile, GgufError> {
        reader::parse_prefix(path, prefix, file_size)
    }

    /// The value of metadata key `key`.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// `general.architecture` (`llama`, `qwen3moe`, `gemma3`, ...).
    pub fn architecture(&self) -> Option<&str> {
        self.get("general.architecture").and_then(MetaValue::as_str)
    }

    /// The architecture's hyper-parameters; fields are `None` where keys are absent.
    pub fn arch_params(&self) -> ArchParams {
        ArchParams::from_lookup(self.architecture().unwrap_or_default(), |k| self.get(k))
    }

    /// The tensor called `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Total number of weights (sum of all tensors' elements).
    pub fn parameter_count(&self) -> u64 {
        self.tensors
            .iter()
            .fold(0u64, |acc, t| acc.saturating_add(t.n_elements()))
    }

    /// Total bytes of tensor data, without padding.
    pub fn tensor_bytes(&self) -> u64 {
        self.tensors
            .iter()
            .fold(0u64, |acc, t| acc.saturating_add(t.size))
    }

    /// Number of `blk.N` layers seen in tensor names (max N + 1), or 0.
    pub fn layer_count(&self) -> u32 {
        self.tensors
            .iter()
            .filter_map(|t| t.layer)
            .max()
            .map_or(0, |m| m.saturating_add(1))
    }
}
