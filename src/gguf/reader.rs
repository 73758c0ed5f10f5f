//! The GGUF parser: header, metadata, tensor infos, then layout validation.
//!
//! Every read is bounds-checked against the file size before it happens and
//! nothing is allocated from an unchecked count, so a hostile file yields a
//! [`GgufError`], never a panic or a huge allocation: what is allocated is
//! bounded by a small multiple of the bytes actually read. Tensor data is
//! never read. Error messages quote file content through [`quoted`] (at most
//! 100 characters, escaped), so they stay one short line.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use super::error::{quoted, GgufError, Section};
use super::roles::classify;
use super::tensor::TensorInfo;
use super::types::GgmlType;
use super::value::{MetaArray, MetaValue, ValueType};
use super::GgufFile;

/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Data alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// The metadata key that overrides the alignment (must be a `u32`).
pub const ALIGNMENT_KEY: &str = "general.alignment";
/// Most tensors a file may declare.
pub const MAX_TENSORS: u64 = 1_000_000;
/// Most metadata pairs a file may declare.
pub const MAX_KVS: u64 = 1_000_000;
/// Longest string (key, value or tensor name) accepted, in bytes.
pub const MAX_STRING_LEN: u64 = 64 << 20;
/// Longest metadata key accepted, in bytes (the GGUF specification's limit).
pub const MAX_KEY_LEN: u64 = 65535;
/// Most elements one metadata array may have.
pub const MAX_ARRAY_LEN: u64 = 1 << 32;
/// Longest tensor name llama.cpp accepts (`GGML_MAX_NAME - 1`).
pub const MAX_TENSOR_NAME_LEN: usize = 63;
/// Most dimensions a tensor may have (`GGML_MAX_DIMS`).
pub const MAX_DIMS: u32 = 4;

/// Fewest bytes one tensor info takes: name length, n_dims, one dim, type, offset.
const MIN_TENSOR_INFO_SIZE: u64 = 8 + 4 + 8 + 4 + 8;
/// Fewest bytes one metadata pair takes: key length, type, a one-byte value.
const MIN_KV_SIZE: u64 = 8 + 4 + 1;
/// Cap on up-front `Vec` capacity; vectors grow past it only as bytes are actually read.
const MAX_PREALLOC: usize = 1 << 16;

/// A bounds-checked little-endian reader over a file of known size.
struct Reader<R> {
    inner: R,
    path: PathBuf,
    pos: u64,
    file_size: u64,
    /// Bytes that can be read: the file size, or fewer when only a prefix of
    /// the file is in memory ([`parse_prefix`]).
    avail: u64,
    section: Section,
}

impl<R: Read> Reader<R> {
    /// Bytes left after the current position.
    fn remaining(&self) -> u64 {
        self.avail.saturating_sub(self.pos)
    }

    /// A truncation error at the current position.
    fn truncated(&self) -> GgufError {
        GgufError::Truncated {
            path: self.path.clone(),
            section: self.section,
            offset: self.pos,
            file_size: self.file_size,
        }
    }

    /// Fails with a truncation error unless `n` more bytes exist.
    fn need(&self, n: u64) -> Result<(), GgufError> {
        if n > self.remaining() {
            Err(self.truncated())
        } else {
            Ok(())
        }
    }

    /// Fills `buf` from the file after checking the bytes exist.
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), GgufError> {
        let n = buf.len() as u64;
        self.need(n)?;
        self.inner.read_exact(buf).map_err(|e| match e.kind() {
            // The file shrank while we read it.
            std::io::ErrorKind::UnexpectedEof => self.truncated(),
            _ => GgufError::io(&self.path, "read", e),
        })?;
        self.pos += n;
        Ok(())
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], GgufError> {
        let mut b = [0u8; N];
        self.fill(&mut b)?;
        Ok(b)
    }

    fn u8(&mut self) -> Result<u8, GgufError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, GgufError> {
        self.array().map(u16::from_le_bytes)
    }

    fn u32(&mut self) -> Result<u32, GgufError> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, GgufError> {
        self.array().map(u64::from_le_bytes)
    }

    /// A length-prefixed string of at most `max` bytes; `what` names it in
    /// errors. Invalid UTF-8 is replaced, not rejected (llama.cpp does not
    /// validate it either).
    fn string(&mut self, max: u64, what: &dyn Fn() -> String) -> Result<String, GgufError> {
        let start = self.pos;
        let len = self.u64()?;
        if len > max {
            return Err(GgufError::Absurd {
                path: self.path.clone(),
                what: format!("length of {} at byte {start}:", what()),
                value: len,
                max,
            });
        }
        self.need(len)?;
        // `len` is at most `max` and present in the file: safe to allocate.
        let mut buf = vec![0u8; len as usize];
        self.fill(&mut buf)?;
        Ok(String::from_utf8(buf)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()))
    }

    /// Fails unless `count` items of at least `min_size` bytes each can fit in
    /// the rest of the file (checked before looping over a declared count).
    fn need_items(&self, count: u64, min_size: u64) -> Result<(), GgufError> {
        match count.checked_mul(min_size) {
            Some(n) => self.need(n),
            None => Err(self.truncated()),
        }
    }
}

/// Parses and validates the GGUF file at `path`.
pub(crate) fn open(path: &Path) -> Result<GgufFile, GgufError> {
    let file_size = check_path(path)?;
    let file = File::open(path).map_err(|e| GgufError::io(path, "open", e))?;
    // Never more buffer than the file has bytes.
    let buf = usize::try_from(file_size.min(1 << 20)).unwrap_or(1 << 20);
    let reader = BufReader::with_capacity(buf, file);
    parse(path, reader, file_size, file_size)
}

/// Parses the first `prefix.len()` bytes of a GGUF file of `file_size`
/// bytes, held in memory (the header, metadata and tensor infos: tensor data
/// need not be there), and validates it as [`open`] does; errors name `path`.
/// For tests and fuzzing: no file is touched.
pub(crate) fn parse_prefix(
    path: &Path,
    prefix: &[u8],
    file_size: u64,
) -> Result<GgufFile, GgufError> {
    if file_size == 0 {
        return Err(GgufError::Empty {
            path: path.to_path_buf(),
        });
    }
    let avail = (prefix.len() as u64).min(file_size);
    parse(path, prefix, file_size, avail)
}

/// Parses from `inner`, of which `avail` bytes can be read.
fn parse<R: Read>(
    path: &Path,
    inner: R,
    file_size: u64,
    avail: u64,
) -> Result<GgufFile, GgufError> {
    let mut r = Reader {
        inner,
        path: path.to_path_buf(),
        pos: 0,
        file_size,
        avail,
        section: Section::Header,
    };
    let (version, n_tensors, n_kv) = read_header(&mut r)?;
    r.section = Section::Metadata;
    let metadata = read_metadata(&mut r, n_kv)?;
    let alignment = alignment_of(path, &metadata)?;
    r.section = Section::TensorInfos;
    let raw = read_tensor_infos(&mut r, n_tensors, alignment)?;
    let data_offset = align_up(r.pos, alignment)
        .ok_or_else(|| GgufError::invalid(path, "data section offset overflows"))?;
    let tensors = place_tensors(path, raw, data_offset, file_size)?;
    let file = GgufFile {
        path: path.to_path_buf(),
        version,
        alignment,
        data_offset,
        file_size,
        metadata,
        tensors,
    };
    super::validate::check(&file)?;
    Ok(file)
}

/// The file's size, after rejecting missing paths, directories and empty files.
fn check_path(path: &Path) -> Result<u64, GgufError> {
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => GgufError::NotFound {
            path: path.to_path_buf(),
        },
        _ => GgufError::io(path, "stat", e),
    })?;
    if meta.is_dir() {
        return Err(GgufError::IsDirectory {
            path: path.to_path_buf(),
        });
    }
    if meta.len() == 0 {
        return Err(GgufError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(meta.len())
}

/// Magic, version, tensor count and KV count.
fn read_header<R: Read>(r: &mut Reader<R>) -> Result<(u32, u64, u64), GgufError> {
    read_magic(r)?;
    let version = r.u32()?;
    if version != 2 && version != 3 {
        return Err(GgufError::UnsupportedVersion {
            path: r.path.clone(),
            version,
        });
    }
    let n_tensors = r.u64()?;
    check_count(r, "tensor count", n_tensors, MAX_TENSORS)?;
    let n_kv = r.u64()?;
    check_count(r, "metadata key/value count", n_kv, MAX_KVS)?;
    Ok((version, n_tensors, n_kv))
}

/// Checks the magic; a short file whose bytes do start like `GGUF` is truncated.
fn read_magic<R: Read>(r: &mut Reader<R>) -> Result<(), GgufError> {
    let avail = r.remaining().min(4) as usize;
    let mut magic = [0u8; 4];
    r.fill(&mut magic[..avail])?;
    if magic[..avail] != GGUF_MAGIC[..avail] {
        return Err(GgufError::NotGguf {
            path: r.path.clone(),
            magic: u32::from_le_bytes(magic),
        });
    }
    if avail < 4 {
        return Err(r.truncated());
    }
    Ok(())
}

fn check_count<R: Read>(r: &Reader<R>, what: &str, value: u64, max: u64) -> Result<(), GgufError> {
    if value > max {
        return Err(GgufError::Absurd {
            path: r.path.clone(),
            what: what.to_string(),
            value,
            max,
        });
    }
    Ok(())
}

/// All metadata pairs, rejecting empty and duplicate keys.
fn read_metadata<R: Read>(
    r: &mut Reader<R>,
    n_kv: u64,
) -> Result<Vec<(String, MetaValue)>, GgufError> {
    r.need_items(n_kv, MIN_KV_SIZE)?;
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity((n_kv as usize).min(MAX_PREALLOC));
    for i in 0..n_kv {
        let key = r.string(MAX_KEY_LEN, &|| format!("metadata key #{i}"))?;
        if key.is_empty() {
            return Err(GgufError::invalid(
                &r.path,
                format!("metadata key #{i} is empty"),
            ));
        }
        if !seen.insert(key.clone()) {
            return Err(GgufError::invalid(
                &r.path,
                format!("duplicate metadata key {}", quoted(&key)),
            ));
        }
        let value = read_value(r, &key)?;
        out.push((key, value));
    }
    Ok(out)
}

/// The value type id at the current position, for key `key`.
fn read_value_type<R: Read>(r: &mut Reader<R>, key: &str) -> Result<ValueType, GgufError> {
    let id = r.u32()?;
    ValueType::from_u32(id).ok_or_else(|| {
        GgufError::invalid(
            &r.path,
            format!("metadata key {} has unknown value type {id}", quoted(key)),
        )
    })
}

/// One value (scalar or array) of key `key`.
fn read_value<R: Read>(r: &mut Reader<R>, key: &str) -> Result<MetaValue, GgufError> {
    match read_value_type(r, key)? {
        ValueType::Array => read_array(r, key).map(MetaValue::Array),
        t => read_scalar(r, t, key),
    }
}

/// A scalar of type `t` (never `Array`).
fn read_scalar<R: Read>(
    r: &mut Reader<R>,
    t: ValueType,
    key: &str,
) -> Result<MetaValue, GgufError> {
    Ok(match t {
        ValueType::U8 => MetaValue::U8(r.u8()?),
        ValueType::I8 => MetaValue::I8(i8::from_le_bytes(r.array()?)),
        ValueType::U16 => MetaValue::U16(r.u16()?),
        ValueType::I16 => MetaValue::I16(i16::from_le_bytes(r.array()?)),
        ValueType::U32 => MetaValue::U32(r.u32()?),
        ValueType::I32 => MetaValue::I32(i32::from_le_bytes(r.array()?)),
        ValueType::F32 => MetaValue::F32(f32::from_le_bytes(r.array()?)),
        ValueType::Bool => MetaValue::Bool(r.u8()? != 0),
        ValueType::String => MetaValue::String(r.string(MAX_STRING_LEN, &|| {
            format!("string value of key {}", quoted(key))
        })?),
        ValueType::U64 => MetaValue::U64(r.u64()?),
        ValueType::I64 => MetaValue::I64(i64::from_le_bytes(r.array()?)),
        ValueType::F64 => MetaValue::F64(f64::from_le_bytes(r.array()?)),
        ValueType::Array => {
            return Err(GgufError::invalid(
                &r.path,
                format!("metadata key {} is a nested array", quoted(key)),
            ))
        }
    })
}

/// An array: element type, length, then the elements.
fn read_array<R: Read>(r: &mut Reader<R>, key: &str) -> Result<MetaArray, GgufError> {
    let elem = read_value_type(r, key)?;
    let mut arr = MetaArray::empty(elem).ok_or_else(|| {
        GgufError::invalid(
            &r.path,
            format!("metadata key {} is an array of arrays", quoted(key)),
        )
    })?;
    let n = r.u64()?;
    check_count(
        r,
        &format!("array length of key {}:", quoted(key)),
        n,
        MAX_ARRAY_LEN,
    )?;
    r.need_items(n, elem.min_encoded_size())?;
    for _ in 0..n {
        push_elem(r, &mut arr, key)?;
    }
    Ok(arr)
}

/// Reads one element into `arr`, whose variant fixes the element type.
fn push_elem<R: Read>(r: &mut Reader<R>, arr: &mut MetaArray, key: &str) -> Result<(), GgufError> {
    let v = read_scalar(r, arr.elem_type(), key)?;
    match (arr, v) {
        (MetaArray::U8(a), MetaValue::U8(x)) => a.push(x),
        (MetaArray::I8(a), MetaValue::I8(x)) => a.push(x),
        (MetaArray::U16(a), MetaValue::U16(x)) => a.push(x),
        (MetaArray::I16(a), MetaValue::I16(x)) => a.push(x),
        (MetaArray::U32(a), MetaValue::U32(x)) => a.push(x),
        (MetaArray::I32(a), MetaValue::I32(x)) => a.push(x),
        (MetaArray::F32(a), MetaValue::F32(x)) => a.push(x),
        (MetaArray::Bool(a), MetaValue::Bool(x)) => a.push(x),
        (MetaArray::String(a), MetaValue::String(x)) => a.push(x),
        (MetaArray::U64(a), MetaValue::U64(x)) => a.push(x),
        (MetaArray::I64(a), MetaValue::I64(x)) => a.push(x),
        (MetaArray::F64(a), MetaValue::F64(x)) => a.push(x),
        // read_scalar returns the variant of arr.elem_type(), so this is unreachable.
        _ => {
            return Err(GgufError::invalid(
                &r.path,
                format!("metadata key {}: array element type mismatch", quoted(key)),
            ))
        }
    }
    Ok(())
}

/// `general.alignment`, or the default; must be a `u32` power of two.
fn alignment_of(path: &Path, metadata: &[(String, MetaValue)]) -> Result<u64, GgufError> {
    let Some((_, v)) = metadata.iter().find(|(k, _)| k == ALIGNMENT_KEY) else {
        return Ok(DEFAULT_ALIGNMENT);
    };
    let MetaValue::U32(a) = *v else {
        return Err(GgufError::invalid(
            path,
            format!(
                "{ALIGNMENT_KEY} must be a u32, found {}",
                v.value_type().name()
            ),
        ));
    };
    if !a.is_power_of_two() {
        return Err(GgufError::invalid(
            path,
            format!("{ALIGNMENT_KEY} {a} is not a power of two"),
        ));
    }
    Ok(a.into())
}

/// A tensor info as stored: offset still relative to the data section.
struct RawTensor {
    name: String,
    ggml_type: GgmlType,
    dims: Vec<u64>,
    rel_offset: u64,
    size: u64,
}

/// All tensor infos, each validated on its own (name, shape, type, size, alignment).
fn read_tensor_infos<R: Read>(
    r: &mut Reader<R>,
    n_tensors: u64,
    alignment: u64,
) -> Result<Vec<RawTensor>, GgufError> {
    r.need_items(n_tensors, MIN_TENSOR_INFO_SIZE)?;
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity((n_tensors as usize).min(MAX_PREALLOC));
    for i in 0..n_tensors {
        let t = read_tensor_info(r, i, alignment)?;
        if !seen.insert(t.name.clone()) {
            return Err(GgufError::invalid(
                &r.path,
                format!("duplicate tensor name {}", quoted(&t.name)),
            ));
        }
        out.push(t);
    }
    Ok(out)
}

fn read_tensor_info<R: Read>(
    r: &mut Reader<R>,
    index: u64,
    alignment: u64,
) -> Result<RawTensor, GgufError> {
    let name = r.string(MAX_STRING_LEN, &|| format!("tensor #{index} name"))?;
    check_tensor_name(&r.path, &name, index)?;
    let dims = read_dims(r, &name)?;
    let type_id = r.u32()?;
    let ggml_type = GgmlType::from_u32(type_id).ok_or_else(|| GgufError::UnknownGgmlType {
        path: r.path.clone(),
        tensor: name.clone(),
        type_id,
    })?;
    let size = tensor_size(&r.path, &name, ggml_type, &dims)?;
    let rel_offset = r.u64()?;
    if !rel_offset.is_multiple_of(alignment) {
        return Err(GgufError::invalid(
            &r.path,
            format!(
                "tensor {} offset {rel_offset} is not a multiple of the alignment {alignment}",
                quoted(&name)
            ),
        ));
    }
    Ok(RawTensor {
        name,
        ggml_type,
        dims,
        rel_offset,
        size,
    })
}

fn check_tensor_name(path: &Path, name: &str, index: u64) -> Result<(), GgufError> {
    if name.is_empty() {
        return Err(GgufError::invalid(
            path,
            format!("tensor #{index} has an empty name"),
        ));
    }
    if name.len() > MAX_TENSOR_NAME_LEN {
        let shown: String = name.chars().take(MAX_TENSOR_NAME_LEN).collect();
        return Err(GgufError::invalid(
            path,
            format!(
                "tensor name {}... is too long ({} bytes, max {MAX_TENSOR_NAME_LEN})",
                quoted(&shown),
                name.len()
            ),
        ));
    }
    Ok(())
}

/// `n_dims` then the dims; each at least 1, at most `i64::MAX` in product.
fn read_dims<R: Read>(r: &mut Reader<R>, name: &str) -> Result<Vec<u64>, GgufError> {
    let n_dims = r.u32()?;
    if n_dims == 0 || n_dims > MAX_DIMS {
        return Err(GgufError::BadDimensionCount {
            path: r.path.clone(),
            tensor: name.to_string(),
            n_dims,
        });
    }
    let mut dims = Vec::with_capacity(n_dims as usize);
    let mut elems: u64 = 1;
    for j in 0..n_dims {
        let d = r.u64()?;
        if d == 0 {
            return Err(GgufError::invalid(
                &r.path,
                format!("tensor {} dimension {j} is 0", quoted(name)),
            ));
        }
        elems = elems
            .checked_mul(d)
            .filter(|&e| e <= i64::MAX as u64)
            .ok_or_else(|| {
                GgufError::invalid(
                    &r.path,
                    format!(
                        "tensor {} has too many elements (shape overflows)",
                        quoted(name)
                    ),
                )
            })?;
        dims.push(d);
    }
    Ok(dims)
}

/// Bytes of the tensor's data, or why its shape does not fit its type.
fn tensor_size(path: &Path, name: &str, t: GgmlType, dims: &[u64]) -> Result<u64, GgufError> {
    let ne0 = dims.first().copied().unwrap_or(0);
    if !ne0.is_multiple_of(t.block_size()) {
        return Err(GgufError::invalid(
            path,
            format!(
                "tensor {} of type {t} has {ne0} elements per row, not a multiple of its block size {}",
                quoted(name),
                t.block_size()
            ),
        ));
    }
    t.tensor_size(dims).ok_or_else(|| {
        GgufError::invalid(
            path,
            format!("tensor {} size in bytes overflows", quoted(name)),
        )
    })
}

/// `x` rounded up to a multiple of `align` (a power of two); `None` on overflow.
pub(crate) fn align_up(x: u64, align: u64) -> Option<u64> {
    let mask = align.checked_sub(1)?;
    x.checked_add(mask).map(|v| v & !mask)
}

/// Makes offsets absolute, classifies roles and checks the data layout.
fn place_tensors(
    path: &Path,
    raw: Vec<RawTensor>,
    data_offset: u64,
    file_size: u64,
) -> Result<Vec<TensorInfo>, GgufError> {
    let mut tensors = Vec::with_capacity(raw.len());
    for t in raw {
        let offset =
            data_offset
                .checked_add(t.rel_offset)
                .ok_or_else(|| GgufError::TensorPastEnd {
                    path: path.to_path_buf(),
                    tensor: t.name.clone(),
                    start: u64::MAX,
                    end: u64::MAX,
                    file_size,
                })?;
        let (role, layer) = classify(&t.name);
        tensors.push(TensorInfo {
            name: t.name,
            ggml_type: t.ggml_type,
            dims: t.dims,
            offset,
            size: t.size,
            role,
            layer,
        });
    }
    check_layout(path, &tensors, file_size)?;
    Ok(tensors)
}

/// Every tensor lies inside the file and no two overlap.
fn check_layout(path: &Path, tensors: &[TensorInfo], file_size: u64) -> Result<(), GgufError> {
    let mut by_offset: Vec<&TensorInfo> = tensors.iter().collect();
    by_offset.sort_by_key(|t| t.offset);
    let outside: Vec<&&TensorInfo> = by_offset
        .iter()
        .filter(|t| t.offset.checked_add(t.size).is_none_or(|e| e > file_size))
        .collect();
    if let Some(first) = outside.first() {
        return Err(outside_error(path, first, outside.len(), file_size));
    }
    for pair in by_offset.windows(2) {
        if let [a, b] = pair {
            if a.end() > b.offset {
                return Err(GgufError::invalid(
                    path,
                    format!(
                        "tensors {} and {} overlap",
                        quoted(&a.name),
                        quoted(&b.name)
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// A lone tensor that starts past the end has a bad offset; anything else means
/// the file stops in the middle of the data.
fn outside_error(path: &Path, t: &TensorInfo, n_outside: usize, file_size: u64) -> GgufError {
    let (start, end) = (t.offset, t.offset.saturating_add(t.size));
    let tensor = t.name.clone();
    let path = path.to_path_buf();
    if n_outside == 1 && start >= file_size {
        GgufError::TensorPastEnd {
            path,
            tensor,
            start,
            end,
            file_size,
        }
    } else {
        GgufError::TensorDataTruncated {
            path,
            tensor,
            start,
            end,
            file_size,
        }
    }
}
