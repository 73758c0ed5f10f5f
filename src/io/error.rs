//! Typed I/O errors; every read error names the file and the offset.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum IoError {
    /// The file ends before the requested range does (truncated or replaced while open).
    #[error(
        "short read from {} at offset {offset}: wanted {expected} bytes, the file ends after {got} \
         (truncated or replaced while open?)",
        file.display()
    )]
    ShortRead {
        file: PathBuf,
        offset: u64,
        expected: usize,
        got: usize,
    },

    /// EIO from the device.
    #[error("I/O error (EIO) reading {} at offset {offset}", file.display())]
    Eio { file: PathBuf, offset: u64 },

    /// ENOMEM from the kernel.
    #[error("out of memory (ENOMEM) reading {} at offset {offset}", file.display())]
    NoMemory { file: PathBuf, offset: u64 },

    /// Any other errno from a read (EINTR and EAGAIN are retried, never reported).
    #[error("reading {} at offset {offset}: {source}", file.display())]
    Read {
        file: PathBuf,
        offset: u64,
        source: std::io::Error,
    },

    #[error("opening {}: {source}", file.display())]
    Open {
        file: PathBuf,
        source: std::io::Error,
    },

    /// A malformed request (alignment, capacity, unknown file); nothing was queued.
    #[error("invalid read request: {0}")]
    InvalidRequest(&'static str),

    #[error("invalid I/O options: {0}")]
    InvalidOptions(&'static str),

    /// All request slots hold outstanding requests; collect some first.
    #[error("I/O request table full ({capacity} outstanding requests); wait on a ticket first")]
    QueueFull { capacity: usize },

    /// Ticket unknown, already collected or from another reader.
    #[error("unknown or already collected I/O ticket")]
    BadTicket,

    /// `Backend::Uring` was asked for and io_uring cannot be used.
    #[error("io_uring unavailable: {0}")]
    UringUnavailable(std::io::Error),

    /// Too many files in one reader.
    #[error("too many files in one reader (at most {0})")]
    TooManyFiles(usize),

    /// The engine's thread failed; the reader is unusable.
    #[error("I/O engine failed: {0}")]
    Engine(String),
}

impl IoError {
    /// The error for errno `errno` reading `file` at `offset`.
    pub(crate) fn from_errno(file: PathBuf, offset: u64, errno: i32) -> IoError {
        match errno {
            libc::EIO => IoError::Eio { file, offset },
            libc::ENOMEM => IoError::NoMemory { file, offset },
            e => IoError::Read {
                file,
                offset,
                source: std::io::Error::from_raw_os_error(e),
            },
        }
    }
}
