//! One tensor's entry in a parsed GGUF file.

use serde::Serialize;

use super::roles::TensorRole;
use super::types::GgmlType;

/// A tensor's name, shape, type and where its bytes are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TensorInfo {
    /// Name as stored (`blk.0.ffn_up.weight`).
    pub name: String,
    /// Element type.
    pub ggml_type: GgmlType,
    /// Shape `ne[0..n]`, innermost (contiguous) dimension first.
    pub dims: Vec<u64>,
    /// ABSOLUTE file offset of the first byte (data section start + relative offset).
    pub offset: u64,
    /// Bytes of data (no padding).
    pub size: u64,
    /// What the tensor is for.
    pub role: TensorRole,
    /// Block index from a `blk.N.` prefix.
    pub layer: Option<u32>,
}

impl TensorInfo {
    /// Number of elements (product of `dims`; checked when the file was parsed).
    pub fn n_elements(&self) -> u64 {
        self.dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .unwrap_or(u64::MAX)
    }

    /// Number of stacked experts (`dims[2]`) for a 3-D routed-expert tensor.
    pub fn n_experts(&self) -> Option<u64> {
        if self.role.is_experts() && self.dims.len() == 3 {
            self.dims.get(2).copied()
        } else {
            None
        }
    }

    /// `(absolute offset, length)` of expert `e`'s bytes: experts are contiguous
    /// slices along the last dimension. `None` if this is not a stacked-expert
    /// tensor or `e` is out of range.
    pub fn expert_range(&self, e: u64) -> Option<(u64, u64)> {
        let n = self.n_experts()?;
        if e >= n || n == 0 {
            return None;
        }
        let len = self.size / n;
        let start = self.offset.checked_add(e.checked_mul(len)?)?;
        Some((start, len))
    }

    /// One past the last byte (absolute).
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.size)
    }
}
