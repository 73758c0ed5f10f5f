//! Errors of the GGUF layer. Every message names the file and the problem on
//! one line, so the CLI can print it as-is after `error: `.

use std::path::PathBuf;

/// Which part of a GGUF file a read was in, for truncation messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    /// Magic, version and the two counts.
    Header,
    /// The key/value metadata pairs.
    Metadata,
    /// The tensor infos (name, shape, type, offset).
    TensorInfos,
    /// The tensor data blob.
    TensorData,
}

impl std::fmt::Display for Section {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Section::Header => "the header",
            Section::Metadata => "the metadata key/value pairs",
            Section::TensorInfos => "tensor infos",
            Section::TensorData => "tensor data",
        })
    }
}

/// A GGUF file that cannot be opened, parsed or written.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The path does not exist.
    #[error("{}: file does not exist", path.display())]
    NotFound {
        /// The path given.
        path: PathBuf,
    },

    /// The path is a directory.
    #[error("{}: is a directory, not a GGUF file", path.display())]
    IsDirectory {
        /// The path given.
        path: PathBuf,
    },

    /// The file has no bytes at all.
    #[error("{}: file is empty (0 bytes), not a GGUF file", path.display())]
    Empty {
        /// The path given.
        path: PathBuf,
    },

    /// An I/O error other than running out of bytes.
    #[error("{}: {op} failed: {err}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done (`open`, `read`, `write`, ...).
        op: &'static str,
        /// The underlying error (shown in the message, so not a `source`:
        /// `{:#}` would print it twice).
        err: std::io::Error,
    },

    /// The first four bytes are not `GGUF`.
    #[error("{}: not a GGUF file (magic 0x{magic:08x}, expected 'GGUF')", path.display())]
    NotGguf {
        /// The file.
        path: PathBuf,
        /// The first four bytes, little-endian.
        magic: u32,
    },

    /// The file ends before a structure it declares.
    #[error("{}: truncated in {section} at byte {offset} (file is {file_size} bytes)", path.display())]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Where the missing bytes belong.
        section: Section,
        /// The first byte that is missing or the start of the read that runs past the end.
        offset: u64,
        /// The file's size.
        file_size: u64,
    },

    /// A GGUF version other than 2 or 3.
    #[error("{}: unsupported GGUF version {version} (supported: 2 and 3){}", path.display(), endian_hint(*version))]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// The version found.
        version: u32,
    },

    /// A count or length far beyond any sane value.
    #[error("{}: {what} {value} is absurd (max {max})", path.display())]
    Absurd {
        /// The file.
        path: PathBuf,
        /// What was counted (`tensor count`, `string length at byte 40`, ...).
        what: String,
        /// The value found.
        value: u64,
        /// The largest value accepted.
        max: u64,
    },

    /// A metadata value or tensor info that is structurally invalid.
    #[error("{}: {what}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the key or tensor.
        what: String,
    },

    /// A tensor whose element type id is not a ggml type.
    #[error("{}: tensor {} has unknown ggml type {type_id}", path.display(), quoted(tensor))]
    UnknownGgmlType {
        /// The file.
        path: PathBuf,
        /// The tensor's name.
        tensor: String,
        /// The id found.
        type_id: u32,
    },

    /// A tensor with fewer than 1 or more than 4 dimensions.
    #[error("{}: tensor {} has {n_dims} dimensions (must be 1 to 4)", path.display(), quoted(tensor))]
    BadDimensionCount {
        /// The file.
        path: PathBuf,
        /// The tensor's name.
        tensor: String,
        /// The count found.
        n_dims: u32,
    },

    /// A tensor's data starts at or past the end of the file.
    #[error(
        "{}: tensor {} data [{start}, {end}) lies past the end of the file ({file_size} bytes)",
        path.display(), quoted(tensor)
    )]
    TensorPastEnd {
        /// The file.
        path: PathBuf,
        /// The tensor's name.
        tensor: String,
        /// Absolute start offset.
        start: u64,
        /// Absolute end offset (exclusive).
        end: u64,
        /// The file's size.
        file_size: u64,
    },

    /// A tensor's data starts inside the file but runs past its end.
    #[error(
        "{}: truncated in tensor data: tensor {} data [{start}, {end}) runs past the end of the file ({file_size} bytes)",
        path.display(), quoted(tensor)
    )]
    TensorDataTruncated {
        /// The file.
        path: PathBuf,
        /// The tensor's name.
        tensor: String,
        /// Absolute start offset.
        start: u64,
        /// Absolute end offset (exclusive).
        end: u64,
        /// The file's size.
        file_size: u64,
    },
}

/// Most characters of file content one error message quotes (escapes
/// included).
pub const MAX_QUOTED_CHARS: usize = 100;

/// File content (a key, a tensor name, a string value) as an error message
/// quotes it: in single quotes, control characters and quotes escaped (so the
/// message stays one line), cut after [`MAX_QUOTED_CHARS`] characters with its
/// length in bytes after it. A hostile file cannot make an error echo itself.
pub fn quoted(s: &str) -> String {
    let mut out = String::with_capacity(MAX_QUOTED_CHARS + 32);
    out.push('\'');
    let mut shown = 0;
    for (i, c) in s.char_indices() {
        let esc = c.escape_debug();
        if shown + esc.len() > MAX_QUOTED_CHARS {
            out.push_str(&format!("...' ({} bytes, {i} shown)", s.len()));
            return out;
        }
        shown += esc.len();
        out.extend(esc);
    }
    out.push('\'');
    out
}

/// A hint when a version looks like 2 or 3 written big-endian.
fn endian_hint(version: u32) -> &'static str {
    if matches!(version.swap_bytes(), 2 | 3) {
        "; the file looks big-endian"
    } else {
        ""
    }
}

impl GgufError {
    /// Shorthand for [`GgufError::Invalid`].
    pub(crate) fn invalid(path: &std::path::Path, what: impl Into<String>) -> GgufError {
        GgufError::Invalid {
            path: path.to_path_buf(),
            what: what.into(),
        }
    }

    /// Shorthand for [`GgufError::Io`].
    pub(crate) fn io(path: &std::path::Path, op: &'static str, err: std::io::Error) -> GgufError {
        GgufError::Io {
            path: path.to_path_buf(),
            op,
            err,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_content_is_escaped_and_cut() {
        assert_eq!(quoted("blk.0.ffn_up.weight"), "'blk.0.ffn_up.weight'");
        assert_eq!(quoted("a\nb'"), "'a\\nb\\''");
        let long = "x".repeat(500_000);
        let q = quoted(&long);
        assert!(q.len() < MAX_QUOTED_CHARS + 40, "{q}");
        assert!(q.ends_with("...' (500000 bytes, 100 shown)"), "{q}");
        // Escapes count: control bytes cannot stretch the quote.
        let ctl = "\u{1b}".repeat(1000);
        assert!(quoted(&ctl).len() < MAX_QUOTED_CHARS + 40);
        assert!(!quoted(&ctl).contains('\u{1b}'));
    }
}
