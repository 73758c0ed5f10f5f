//! A streaming GGUF writer: declare metadata and tensor shapes up front, then
//! write each tensor's bytes in order from a callback, so a model of any size
//! goes to disk without being held in memory.
//!
//! ```no_run
//! use hypura::gguf::{GgmlType, GgufWriter};
//! # fn main() -> Result<(), hypura::gguf::GgufError> {
//! let mut w = GgufWriter::new("/tmp/tiny.gguf");
//! w.add_kv("general.architecture", "llama")?;
//! w.add_tensor("output_norm.weight", GgmlType::F32, &[64])?;
//! w.write(|_spec, out| out.write_all(&[0u8; 256]))?;
//! # Ok(()) }
//! ```

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use super::error::GgufError;
use super::reader::{
    align_up, ALIGNMENT_KEY, DEFAULT_ALIGNMENT, GGUF_MAGIC, MAX_DIMS, MAX_TENSOR_NAME_LEN,
};
use super::types::GgmlType;
use super::value::{MetaArray, MetaValue};

/// The GGUF version written.
pub const WRITE_VERSION: u32 = 3;

/// A tensor declared to a [`GgufWriter`], with its place in the data section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// Name as written.
    pub name: String,
    /// Element type.
    pub ggml_type: GgmlType,
    /// Shape `ne[0..n]`.
    pub dims: Vec<u64>,
    /// Bytes of data the fill callback must write.
    pub size: u64,
    /// Offset relative to the start of the data section (aligned).
    pub rel_offset: u64,
}

/// Builds a GGUF file: metadata and tensor infos first, data streamed last.
#[derive(Debug, Clone)]
pub struct GgufWriter {
    path: PathBuf,
    alignment: u64,
    metadata: Vec<(String, MetaValue)>,
    keys: HashSet<String>,
    tensors: Vec<TensorSpec>,
    names: HashSet<String>,
    data_size: u64,
}

impl GgufWriter {
    /// A writer for the file at `path` (created by [`GgufWriter::write`]),
    /// with the default alignment of 32.
    pub fn new(path: impl Into<PathBuf>) -> GgufWriter {
        GgufWriter {
            path: path.into(),
            alignment: DEFAULT_ALIGNMENT,
            metadata: Vec::new(),
            keys: HashSet::new(),
            tensors: Vec::new(),
            names: HashSet::new(),
            data_size: 0,
        }
    }

    /// The output path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sets the data alignment (a power of two that fits a `u32`, e.g. 4096)
    /// and records it as `general.alignment`. Call before adding tensors.
    pub fn set_alignment(&mut self, alignment: u64) -> Result<(), GgufError> {
        let a = u32::try_from(alignment)
            .ok()
            .filter(|a| a.is_power_of_two())
            .ok_or_else(|| {
                self.err(format!(
                    "alignment {alignment} is not a power of two that fits in a u32"
                ))
            })?;
        if !self.tensors.is_empty() {
            return Err(self.err("set the alignment before adding tensors".to_string()));
        }
        self.alignment = alignment;
        match self.metadata.iter_mut().find(|(k, _)| k == ALIGNMENT_KEY) {
            Some((_, v)) => *v = MetaValue::U32(a),
            None => {
                self.keys.insert(ALIGNMENT_KEY.to_string());
                self.metadata
                    .push((ALIGNMENT_KEY.to_string(), MetaValue::U32(a)));
            }
        }
        Ok(())
    }

    /// The data alignment in bytes.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Adds a metadata pair; keys must be non-empty and unique. Adding
    /// `general.alignment` (a `u32`) is the same as [`GgufWriter::set_alignment`].
    pub fn add_kv(&mut self, key: &str, value: impl Into<MetaValue>) -> Result<(), GgufError> {
        let value = value.into();
        if key == ALIGNMENT_KEY {
            return match value {
                MetaValue::U32(a) => self.set_alignment(a.into()),
                v => Err(self.err(format!(
                    "{ALIGNMENT_KEY} must be a u32, not {}",
                    v.value_type().name()
                ))),
            };
        }
        if key.is_empty() {
            return Err(self.err("metadata keys must not be empty".to_string()));
        }
        if !self.keys.insert(key.to_string()) {
            return Err(self.err(format!("duplicate metadata key '{key}'")));
        }
        self.metadata.push((key.to_string(), value));
        Ok(())
    }

    /// Declares the next tensor; its data is written by the fill callback of
    /// [`GgufWriter::write`], in declaration order.
    pub fn add_tensor(
        &mut self,
        name: &str,
        ggml_type: GgmlType,
        dims: &[u64],
    ) -> Result<&TensorSpec, GgufError> {
        self.check_tensor(name, ggml_type, dims)?;
        let size = ggml_type.tensor_size(dims).ok_or_else(|| {
            self.err(format!(
                "tensor '{name}' {dims:?} is not whole {ggml_type} blocks or overflows"
            ))
        })?;
        let rel_offset = self.data_size;
        self.data_size = align_up(size, self.alignment)
            .and_then(|s| rel_offset.checked_add(s))
            .ok_or_else(|| self.err("tensor data size overflows".to_string()))?;
        self.names.insert(name.to_string());
        self.tensors.push(TensorSpec {
            name: name.to_string(),
            ggml_type,
            dims: dims.to_vec(),
            size,
            rel_offset,
        });
        Ok(&self.tensors[self.tensors.len() - 1])
    }

    fn check_tensor(&self, name: &str, ggml_type: GgmlType, dims: &[u64]) -> Result<(), GgufError> {
        if name.is_empty() || name.len() > MAX_TENSOR_NAME_LEN {
            return Err(self.err(format!(
                "tensor name '{name}' must be 1 to {MAX_TENSOR_NAME_LEN} bytes"
            )));
        }
        if self.names.contains(name) {
            return Err(self.err(format!("duplicate tensor name '{name}'")));
        }
        if dims.is_empty() || dims.len() > MAX_DIMS as usize || dims.contains(&0) {
            return Err(self.err(format!(
                "tensor '{name}' shape {dims:?} must have 1 to 4 non-zero dims"
            )));
        }
        if ggml_type.row_size(dims[0]).is_none() {
            return Err(self.err(format!(
                "tensor '{name}' row of {} elements is not a multiple of the {ggml_type} block size {}",
                dims[0],
                ggml_type.block_size()
            )));
        }
        Ok(())
    }

    /// The tensors declared so far, with their sizes and relative offsets.
    pub fn tensors(&self) -> &[TensorSpec] {
        &self.tensors
    }

    /// The metadata pairs added so far.
    pub fn metadata(&self) -> &[(String, MetaValue)] {
        &self.metadata
    }

    /// Absolute offset where tensor data will start (header size rounded up).
    pub fn data_offset(&self) -> Result<u64, GgufError> {
        let header = self.header_bytes();
        align_up(header.len() as u64, self.alignment)
            .ok_or_else(|| self.err("header size overflows".to_string()))
    }

    /// The size the finished file will have.
    pub fn file_size(&self) -> Result<u64, GgufError> {
        self.data_offset()?
            .checked_add(self.data_size)
            .ok_or_else(|| self.err("file size overflows".to_string()))
    }

    /// Creates the file and writes everything; `fill` is called once per
    /// tensor, in order, and must write exactly `spec.size` bytes. Returns the
    /// number of bytes written.
    pub fn write<F>(&self, fill: F) -> Result<u64, GgufError>
    where
        F: FnMut(&TensorSpec, &mut dyn Write) -> std::io::Result<()>,
    {
        let file = File::create(&self.path).map_err(|e| GgufError::io(&self.path, "create", e))?;
        let mut out = BufWriter::with_capacity(8 << 20, file);
        let n = self.write_to(&mut out, fill)?;
        let file = out
            .into_inner()
            .map_err(|e| GgufError::io(&self.path, "write", e.into_error()))?;
        file.sync_all()
            .map_err(|e| GgufError::io(&self.path, "sync", e))?;
        Ok(n)
    }

    /// Writes the whole file to `out` (errors still name this writer's path).
    pub fn write_to<W: Write, F>(&self, out: &mut W, mut fill: F) -> Result<u64, GgufError>
    where
        F: FnMut(&TensorSpec, &mut dyn Write) -> std::io::Result<()>,
    {
        let header = self.header_bytes();
        let mut sink = Counter {
            inner: out,
            written: 0,
        };
        sink.write_all(&header).map_err(|e| self.io_err(e))?;
        self.pad(&mut sink)?;
        for spec in &self.tensors {
            self.write_tensor(&mut sink, spec, &mut fill)?;
            self.pad(&mut sink)?;
        }
        sink.flush().map_err(|e| self.io_err(e))?;
        Ok(sink.written)
    }

    fn write_tensor<W: Write, F>(
        &self,
        sink: &mut Counter<W>,
        spec: &TensorSpec,
        fill: &mut F,
    ) -> Result<(), GgufError>
    where
        F: FnMut(&TensorSpec, &mut dyn Write) -> std::io::Result<()>,
    {
        let mut limited = Limited {
            inner: sink,
            left: spec.size,
        };
        fill(spec, &mut limited).map_err(|e| {
            GgufError::io(
                &self.path,
                "write",
                std::io::Error::new(e.kind(), format!("tensor '{}': {e}", spec.name)),
            )
        })?;
        if limited.left != 0 {
            return Err(self.err(format!(
                "fill wrote {} of the {} bytes of tensor '{}'",
                spec.size - limited.left,
                spec.size,
                spec.name
            )));
        }
        Ok(())
    }

    /// Zero bytes up to the next multiple of the alignment.
    fn pad<W: Write>(&self, sink: &mut Counter<W>) -> Result<(), GgufError> {
        let target = align_up(sink.written, self.alignment)
            .ok_or_else(|| self.err("offset overflows".to_string()))?;
        let zeros = [0u8; 4096];
        while sink.written < target {
            let n = (target - sink.written).min(zeros.len() as u64) as usize;
            sink.write_all(&zeros[..n]).map_err(|e| self.io_err(e))?;
        }
        Ok(())
    }

    /// Magic, version, counts, metadata and tensor infos, unpadded.
    fn header_bytes(&self) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend_from_slice(&GGUF_MAGIC);
        h.extend_from_slice(&WRITE_VERSION.to_le_bytes());
        h.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        h.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            encode_str(&mut h, k);
            h.extend_from_slice(&v.value_type().id().to_le_bytes());
            encode_value(&mut h, v);
        }
        for t in &self.tensors {
            encode_str(&mut h, &t.name);
            h.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                h.extend_from_slice(&d.to_le_bytes());
            }
            h.extend_from_slice(&t.ggml_type.id().to_le_bytes());
            h.extend_from_slice(&t.rel_offset.to_le_bytes());
        }
        h
    }

    fn err(&self, what: String) -> GgufError {
        GgufError::invalid(&self.path, what)
    }

    fn io_err(&self, e: std::io::Error) -> GgufError {
        GgufError::io(&self.path, "write", e)
    }
}

/// Appends a length-prefixed string.
fn encode_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Appends a value's payload (its type id is written by the caller).
fn encode_value(out: &mut Vec<u8>, v: &MetaValue) {
    match v {
        MetaValue::U8(x) => out.push(*x),
        MetaValue::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::Bool(x) => out.push(u8::from(*x)),
        MetaValue::String(s) => encode_str(out, s),
        MetaValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        MetaValue::Array(a) => encode_array(out, a),
    }
}

/// Appends element type, length and elements.
fn encode_array(out: &mut Vec<u8>, a: &MetaArray) {
    out.extend_from_slice(&a.elem_type().id().to_le_bytes());
    out.extend_from_slice(&(a.len() as u64).to_le_bytes());
    if let MetaArray::String(v) = a {
        v.iter().for_each(|s| encode_str(out, s));
        return;
    }
    a.iter().for_each(|x| encode_value(out, &x));
}

/// Counts bytes passed through to the output.
struct Counter<'a, W: Write> {
    inner: &'a mut W,
    written: u64,
}

impl<W: Write> Write for Counter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Refuses to pass more than `left` bytes: a fill callback cannot overrun its tensor.
struct Limited<'a, 'b, W: Write> {
    inner: &'a mut Counter<'b, W>,
    left: u64,
}

impl<W: Write> Write for Limited<'_, '_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.len() as u64 > self.left {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "{} bytes written past the end of the tensor",
                    buf.len() as u64 - self.left
                ),
            ));
        }
        let n = self.inner.write(buf)?;
        self.left -= n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

macro_rules! from_scalar {
    ($($t:ty => $v:ident),* $(,)?) => {$(
        impl From<$t> for MetaValue {
            fn from(x: $t) -> MetaValue { MetaValue::$v(x) }
        }
        impl From<Vec<$t>> for MetaValue {
            fn from(x: Vec<$t>) -> MetaValue { MetaValue::Array(MetaArray::$v(x)) }
        }
    )*};
}

from_scalar!(u8 => U8, i8 => I8, u16 => U16, i16 => I16, u32 => U32, i32 => I32, f32 => F32,
             bool => Bool, String => String, u64 => U64, i64 => I64, f64 => F64);

impl From<&str> for MetaValue {
    fn from(s: &str) -> MetaValue {
        MetaValue::String(s.to_string())
    }
}

impl From<MetaArray> for MetaValue {
    fn from(a: MetaArray) -> MetaValue {
        MetaValue::Array(a)
    }
}

impl From<Vec<&str>> for MetaValue {
    fn from(v: Vec<&str>) -> MetaValue {
        MetaValue::Array(MetaArray::String(
            v.into_iter().map(str::to_string).collect(),
        ))
    }
}
