//! The ggml tensor type table: ids, block sizes and bytes per block.
//!
//! Values mirror `type_traits[]` in ggml's `ggml.c` and the block structs in
//! `ggml-common.h` of the vendored llama.cpp. Removed ids (4, 5, 31..=33,
//! 36..=38) are not types: [`GgmlType::from_u32`] rejects them.

/// Elements per super-block of the K-quants and most IQ types (`QK_K`).
const QK_K: u64 = 256;

/// A ggml tensor element type; the discriminant is the id stored in GGUF files.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u32)]
pub enum GgmlType {
    /// 32-bit float.
    F32 = 0,
    /// 16-bit IEEE float.
    F16 = 1,
    /// 4-bit, 32 per block, one f16 scale.
    Q4_0 = 2,
    /// 4-bit, 32 per block, f16 scale and min.
    Q4_1 = 3,
    /// 5-bit, 32 per block, one f16 scale.
    Q5_0 = 6,
    /// 5-bit, 32 per block, f16 scale and min.
    Q5_1 = 7,
    /// 8-bit, 32 per block, one f16 scale.
    Q8_0 = 8,
    /// 8-bit, 32 per block, f16 scale and sum (activations).
    Q8_1 = 9,
    /// 2-bit K-quant.
    Q2_K = 10,
    /// 3-bit K-quant.
    Q3_K = 11,
    /// 4-bit K-quant.
    Q4_K = 12,
    /// 5-bit K-quant.
    Q5_K = 13,
    /// 6-bit K-quant.
    Q6_K = 14,
    /// 8-bit K-quant (activations).
    Q8_K = 15,
    /// 2.06 bpw importance quant.
    IQ2_XXS = 16,
    /// 2.31 bpw importance quant.
    IQ2_XS = 17,
    /// 3.06 bpw importance quant.
    IQ3_XXS = 18,
    /// 1.56 bpw importance quant.
    IQ1_S = 19,
    /// 4-bit non-linear, 32 per block.
    IQ4_NL = 20,
    /// 3.44 bpw importance quant.
    IQ3_S = 21,
    /// 2.56 bpw importance quant.
    IQ2_S = 22,
    /// 4.25 bpw non-linear quant.
    IQ4_XS = 23,
    /// 8-bit integer.
    I8 = 24,
    /// 16-bit integer.
    I16 = 25,
    /// 32-bit integer.
    I32 = 26,
    /// 64-bit integer.
    I64 = 27,
    /// 64-bit float.
    F64 = 28,
    /// 1.75 bpw importance quant.
    IQ1_M = 29,
    /// bfloat16.
    BF16 = 30,
    /// Ternary, 1.69 bpw.
    TQ1_0 = 34,
    /// Ternary, 2.06 bpw.
    TQ2_0 = 35,
    /// Microscaling FP4, 32 per block, E8M0 scale.
    MXFP4 = 39,
    /// NVIDIA FP4, 64 per block, four E4M3 scales.
    NVFP4 = 40,
    /// 1-bit, 128 per block, one f16 scale.
    Q1_0 = 41,
    /// 2-bit, 64 per block, one f16 scale.
    Q2_0 = 42,
}

impl GgmlType {
    /// Every type, in id order.
    pub const ALL: [GgmlType; 35] = {
        use GgmlType::*;
        [
            F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K,
            IQ2_XXS, IQ2_XS, IQ3_XXS, IQ1_S, IQ4_NL, IQ3_S, IQ2_S, IQ4_XS, I8, I16, I32, I64, F64,
            IQ1_M, BF16, TQ1_0, TQ2_0, MXFP4, NVFP4, Q1_0, Q2_0,
        ]
    };

    /// The type with ggml id `id`, or `None` for unknown and removed ids.
    pub fn from_u32(id: u32) -> Option<GgmlType> {
        Self::ALL.iter().copied().find(|t| t.id() == id)
    }

    /// The type whose ggml name is `name`, ignoring case (`q4_k`, `Q8_0`, `bf16`).
    pub fn from_name(name: &str) -> Option<GgmlType> {
        Self::ALL
            .iter()
            .copied()
            .find(|t| t.name().eq_ignore_ascii_case(name))
    }

    /// The id stored in GGUF tensor infos.
    pub fn id(self) -> u32 {
        self as u32
    }

    /// ggml's name for the type (`f32`, `q4_K`, `iq2_xxs`, ...).
    pub fn name(self) -> &'static str {
        self.traits().0
    }

    /// Elements per block (1 for plain scalar types).
    pub fn block_size(self) -> u64 {
        self.traits().1
    }

    /// Bytes per block.
    pub fn type_size(self) -> u64 {
        self.traits().2
    }

    /// Whether the type is block-quantized (as opposed to plain scalars).
    pub fn is_quantized(self) -> bool {
        use GgmlType::*;
        !matches!(self, F32 | F16 | BF16 | F64 | I8 | I16 | I32 | I64)
    }

    /// Whether ggml's CPU backend can multiply a matrix of this type (it has
    /// a `vec_dot`); the integer types, F64 and the activation-only Q8_1 and
    /// Q8_K do not, and ggml crashes on them mid-computation.
    pub fn has_cpu_matmul(self) -> bool {
        use GgmlType::*;
        !matches!(self, I8 | I16 | I32 | I64 | F64 | Q8_1 | Q8_K)
    }

    /// Bytes of one row of `ne0` elements; `None` if `ne0` is not a whole
    /// number of blocks or the size overflows.
    pub fn row_size(self, ne0: u64) -> Option<u64> {
        if !ne0.is_multiple_of(self.block_size()) {
            return None;
        }
        (ne0 / self.block_size()).checked_mul(self.type_size())
    }

    /// Bytes of a tensor with shape `dims` (`ne[0..n]`); `None` on a partial
    /// block or overflow.
    pub fn tensor_size(self, dims: &[u64]) -> Option<u64> {
        let (&ne0, rest) = dims.split_first()?;
        rest.iter()
            .try_fold(self.row_size(ne0)?, |acc, &d| acc.checked_mul(d))
    }

    /// (name, block size, bytes per block), from ggml's `type_traits`.
    fn traits(self) -> (&'static str, u64, u64) {
        use GgmlType::*;
        match self {
            F32 => ("f32", 1, 4),
            F16 => ("f16", 1, 2),
            Q4_0 => ("q4_0", 32, 18),
            Q4_1 => ("q4_1", 32, 20),
            Q5_0 => ("q5_0", 32, 22),
            Q5_1 => ("q5_1", 32, 24),
            Q8_0 => ("q8_0", 32, 34),
            Q8_1 => ("q8_1", 32, 36),
            Q2_K => ("q2_K", QK_K, 84),
            Q3_K => ("q3_K", QK_K, 110),
            Q4_K => ("q4_K", QK_K, 144),
            Q5_K => ("q5_K", QK_K, 176),
            Q6_K => ("q6_K", QK_K, 210),
            Q8_K => ("q8_K", QK_K, 292),
            IQ2_XXS => ("iq2_xxs", QK_K, 66),
            IQ2_XS => ("iq2_xs", QK_K, 74),
            IQ3_XXS => ("iq3_xxs", QK_K, 98),
            IQ1_S => ("iq1_s", QK_K, 50),
            IQ4_NL => ("iq4_nl", 32, 18),
            IQ3_S => ("iq3_s", QK_K, 110),
            IQ2_S => ("iq2_s", QK_K, 82),
            IQ4_XS => ("iq4_xs", QK_K, 136),
            I8 => ("i8", 1, 1),
            I16 => ("i16", 1, 2),
            I32 => ("i32", 1, 4),
            I64 => ("i64", 1, 8),
            F64 => ("f64", 1, 8),
            IQ1_M => ("iq1_m", QK_K, 56),
            BF16 => ("bf16", 1, 2),
            TQ1_0 => ("tq1_0", QK_K, 54),
            TQ2_0 => ("tq2_0", QK_K, 66),
            MXFP4 => ("mxfp4", 32, 17),
            NVFP4 => ("nvfp4", 64, 36),
            Q1_0 => ("q1_0", 128, 18),
            Q2_0 => ("q2_0", 64, 18),
        }
    }
}

impl serde::Serialize for GgmlType {
    /// Serialised as ggml's name (`q4_K`), like [`GgmlType::name`].
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_removed_ids_are_unknown() {
        for t in GgmlType::ALL {
            assert_eq!(GgmlType::from_u32(t.id()), Some(t));
            assert_eq!(GgmlType::from_name(t.name()), Some(t));
        }
        for id in [4, 5, 31, 32, 33, 36, 37, 38, 43, u32::MAX] {
            assert_eq!(GgmlType::from_u32(id), None);
        }
    }

    #[test]
    fn sizes_are_checked() {
        assert_eq!(GgmlType::Q4_K.row_size(512), Some(288));
        assert_eq!(GgmlType::Q4_K.row_size(100), None);
        assert_eq!(GgmlType::F32.tensor_size(&[4, 3]), Some(48));
        assert_eq!(GgmlType::F32.tensor_size(&[u64::MAX, 2]), None);
        assert_eq!(GgmlType::F32.tensor_size(&[]), None);
    }
}
