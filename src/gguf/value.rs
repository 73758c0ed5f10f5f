//! GGUF metadata values: the value type ids shared by the reader and writer,
//! scalar values and typed arrays.

use std::fmt;

/// A GGUF metadata value type id (`gguf_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum ValueType {
    /// `uint8`.
    U8 = 0,
    /// `int8`.
    I8 = 1,
    /// `uint16`.
    U16 = 2,
    /// `int16`.
    I16 = 3,
    /// `uint32`.
    U32 = 4,
    /// `int32`.
    I32 = 5,
    /// `float32`.
    F32 = 6,
    /// `bool` (one byte, 0 or 1).
    Bool = 7,
    /// Length-prefixed UTF-8 string.
    String = 8,
    /// Typed array.
    Array = 9,
    /// `uint64`.
    U64 = 10,
    /// `int64`.
    I64 = 11,
    /// `float64`.
    F64 = 12,
}

impl ValueType {
    /// The type with GGUF id `id`, if any.
    pub fn from_u32(id: u32) -> Option<ValueType> {
        use ValueType::*;
        Some(match id {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    /// The id written to files.
    pub fn id(self) -> u32 {
        self as u32
    }

    /// Short lowercase name (`u32`, `string`, `array`, ...).
    pub fn name(self) -> &'static str {
        use ValueType::*;
        match self {
            U8 => "u8",
            I8 => "i8",
            U16 => "u16",
            I16 => "i16",
            U32 => "u32",
            I32 => "i32",
            F32 => "f32",
            Bool => "bool",
            String => "string",
            Array => "array",
            U64 => "u64",
            I64 => "i64",
            F64 => "f64",
        }
    }

    /// The fewest bytes one value of this type occupies in a file (a string's
    /// 8-byte length, an array's 4-byte type and 8-byte count).
    pub fn min_encoded_size(self) -> u64 {
        use ValueType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 | String => 8,
            Array => 12,
        }
    }
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    /// `uint8`.
    U8(u8),
    /// `int8`.
    I8(i8),
    /// `uint16`.
    U16(u16),
    /// `int16`.
    I16(i16),
    /// `uint32`.
    U32(u32),
    /// `int32`.
    I32(i32),
    /// `float32`.
    F32(f32),
    /// `bool`.
    Bool(bool),
    /// UTF-8 string.
    String(String),
    /// Typed array (never nested: llama.cpp rejects arrays of arrays).
    Array(MetaArray),
    /// `uint64`.
    U64(u64),
    /// `int64`.
    I64(i64),
    /// `float64`.
    F64(f64),
}

impl MetaValue {
    /// The value's GGUF type.
    pub fn value_type(&self) -> ValueType {
        match self {
            MetaValue::U8(_) => ValueType::U8,
            MetaValue::I8(_) => ValueType::I8,
            MetaValue::U16(_) => ValueType::U16,
            MetaValue::I16(_) => ValueType::I16,
            MetaValue::U32(_) => ValueType::U32,
            MetaValue::I32(_) => ValueType::I32,
            MetaValue::F32(_) => ValueType::F32,
            MetaValue::Bool(_) => ValueType::Bool,
            MetaValue::String(_) => ValueType::String,
            MetaValue::Array(_) => ValueType::Array,
            MetaValue::U64(_) => ValueType::U64,
            MetaValue::I64(_) => ValueType::I64,
            MetaValue::F64(_) => ValueType::F64,
        }
    }

    /// An integer value as `u64`; `None` for negatives, floats, bools, strings, arrays.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// An integer value as `i64`; `None` if it does not fit or is not an integer.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            MetaValue::I8(v) => Some(v.into()),
            MetaValue::I16(v) => Some(v.into()),
            MetaValue::I32(v) => Some(v.into()),
            MetaValue::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// Any numeric value as `f64` (integers may round); `None` otherwise.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v.into()),
            MetaValue::F64(v) => Some(v),
            // Integers above 2^53 lose precision; that is what a float view means.
            _ => self
                .as_i64()
                .map(|v| v as f64)
                .or_else(|| self.as_u64().map(|v| v as f64)),
        }
    }

    /// A string value.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// A boolean value.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// An array value.
    pub fn as_array(&self) -> Option<&MetaArray> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// An integer scalar, or the largest element of an integer array (per-layer
    /// values such as head counts); `None` if neither or the array is empty.
    pub fn max_u64(&self) -> Option<u64> {
        match self {
            MetaValue::Array(a) => a.max_u64(),
            v => v.as_u64(),
        }
    }
}

/// How many elements [`fmt::Display`] shows before eliding the rest.
const DISPLAY_ELEMS: usize = 8;

impl fmt::Display for MetaValue {
    /// Scalars as themselves, strings quoted, arrays as
    /// `[string; 49152] ["<unk>", "<s>", ...]` with at most 8 elements shown.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetaValue::U8(v) => write!(f, "{v}"),
            MetaValue::I8(v) => write!(f, "{v}"),
            MetaValue::U16(v) => write!(f, "{v}"),
            MetaValue::I16(v) => write!(f, "{v}"),
            MetaValue::U32(v) => write!(f, "{v}"),
            MetaValue::I32(v) => write!(f, "{v}"),
            MetaValue::F32(v) => write!(f, "{v}"),
            MetaValue::Bool(v) => write!(f, "{v}"),
            MetaValue::String(s) => write!(f, "{s:?}"),
            MetaValue::U64(v) => write!(f, "{v}"),
            MetaValue::I64(v) => write!(f, "{v}"),
            MetaValue::F64(v) => write!(f, "{v}"),
            MetaValue::Array(a) => {
                write!(f, "[{}; {}] [", a.elem_type().name(), a.len())?;
                for (i, v) in a.iter().take(DISPLAY_ELEMS).enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{v}")?;
                }
                if a.len() > DISPLAY_ELEMS {
                    f.write_str(", ...")?;
                }
                f.write_str("]")
            }
        }
    }
}

/// A typed metadata array. Elements are stored unboxed, so a 150k-entry
/// tokenizer vocabulary is one `Vec<String>`, not 150k `MetaValue`s.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaArray {
    /// `uint8[]`.
    U8(Vec<u8>),
    /// `int8[]`.
    I8(Vec<i8>),
    /// `uint16[]`.
    U16(Vec<u16>),
    /// `int16[]`.
    I16(Vec<i16>),
    /// `uint32[]`.
    U32(Vec<u32>),
    /// `int32[]`.
    I32(Vec<i32>),
    /// `float32[]`.
    F32(Vec<f32>),
    /// `bool[]`.
    Bool(Vec<bool>),
    /// `string[]`.
    String(Vec<String>),
    /// `uint64[]`.
    U64(Vec<u64>),
    /// `int64[]`.
    I64(Vec<i64>),
    /// `float64[]`.
    F64(Vec<f64>),
}

/// Applies `$body` to the inner vector of any [`MetaArray`] variant.
macro_rules! with_vec {
    ($arr:expr, $v:ident => $body:expr) => {
        match $arr {
            MetaArray::U8($v) => $body,
            MetaArray::I8($v) => $body,
            MetaArray::U16($v) => $body,
            MetaArray::I16($v) => $body,
            MetaArray::U32($v) => $body,
            MetaArray::I32($v) => $body,
            MetaArray::F32($v) => $body,
            MetaArray::Bool($v) => $body,
            MetaArray::String($v) => $body,
            MetaArray::U64($v) => $body,
            MetaArray::I64($v) => $body,
            MetaArray::F64($v) => $body,
        }
    };
}

impl MetaArray {
    /// An empty array of element type `elem`; `None` for `Array` (no nesting).
    pub fn empty(elem: ValueType) -> Option<MetaArray> {
        Some(match elem {
            ValueType::U8 => MetaArray::U8(Vec::new()),
            ValueType::I8 => MetaArray::I8(Vec::new()),
            ValueType::U16 => MetaArray::U16(Vec::new()),
            ValueType::I16 => MetaArray::I16(Vec::new()),
            ValueType::U32 => MetaArray::U32(Vec::new()),
            ValueType::I32 => MetaArray::I32(Vec::new()),
            ValueType::F32 => MetaArray::F32(Vec::new()),
            ValueType::Bool => MetaArray::Bool(Vec::new()),
            ValueType::String => MetaArray::String(Vec::new()),
            ValueType::U64 => MetaArray::U64(Vec::new()),
            ValueType::I64 => MetaArray::I64(Vec::new()),
            ValueType::F64 => MetaArray::F64(Vec::new()),
            ValueType::Array => return None,
        })
    }

    /// The element type.
    pub fn elem_type(&self) -> ValueType {
        match self {
            MetaArray::U8(_) => ValueType::U8,
            MetaArray::I8(_) => ValueType::I8,
            MetaArray::U16(_) => ValueType::U16,
            MetaArray::I16(_) => ValueType::I16,
            MetaArray::U32(_) => ValueType::U32,
            MetaArray::I32(_) => ValueType::I32,
            MetaArray::F32(_) => ValueType::F32,
            MetaArray::Bool(_) => ValueType::Bool,
            MetaArray::String(_) => ValueType::String,
            MetaArray::U64(_) => ValueType::U64,
            MetaArray::I64(_) => ValueType::I64,
            MetaArray::F64(_) => ValueType::F64,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        with_vec!(self, v => v.len())
    }

    /// Whether the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element `i` as a scalar [`MetaValue`] (strings are cloned).
    pub fn get(&self, i: usize) -> Option<MetaValue> {
        match self {
            MetaArray::U8(v) => v.get(i).map(|&x| MetaValue::U8(x)),
            MetaArray::I8(v) => v.get(i).map(|&x| MetaValue::I8(x)),
            MetaArray::U16(v) => v.get(i).map(|&x| MetaValue::U16(x)),
            MetaArray::I16(v) => v.get(i).map(|&x| MetaValue::I16(x)),
            MetaArray::U32(v) => v.get(i).map(|&x| MetaValue::U32(x)),
            MetaArray::I32(v) => v.get(i).map(|&x| MetaValue::I32(x)),
            MetaArray::F32(v) => v.get(i).map(|&x| MetaValue::F32(x)),
            MetaArray::Bool(v) => v.get(i).map(|&x| MetaValue::Bool(x)),
            MetaArray::String(v) => v.get(i).map(|x| MetaValue::String(x.clone())),
            MetaArray::U64(v) => v.get(i).map(|&x| MetaValue::U64(x)),
            MetaArray::I64(v) => v.get(i).map(|&x| MetaValue::I64(x)),
            MetaArray::F64(v) => v.get(i).map(|&x| MetaValue::F64(x)),
        }
    }

    /// The elements as scalar values, in order (strings are cloned lazily).
    pub fn iter(&self) -> impl Iterator<Item = MetaValue> + '_ {
        (0..self.len()).filter_map(move |i| self.get(i))
    }

    /// The string elements, if this is a string array.
    pub fn as_strings(&self) -> Option<&[String]> {
        match self {
            MetaArray::String(v) => Some(v),
            _ => None,
        }
    }

    /// The largest element of an integer array that has no negative elements.
    pub fn max_u64(&self) -> Option<u64> {
        let mut max: Option<u64> = None;
        for v in self.iter() {
            let x = v.as_u64()?;
            max = Some(max.map_or(x, |m| m.max(x)));
        }
        max
    }
}
