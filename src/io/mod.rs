//! I/O engine: reads byte ranges of model files into caller-owned memory, bypassing the
//! page cache.
//!
//! The consumer is the streaming scheduler. It owns a pool of page-aligned slots and asks for
//! "bytes `[off, off + len)` of file F into slot S" for the next layers while the current one
//! computes, then waits on single requests (or a group of them) from the ggml eval callback.
//!
//! # Alignment
//! GGUF tensors are 32-byte aligned, O_DIRECT needs 4 KiB alignment of file offset, length and
//! memory. A request therefore reads the aligned superset `[off & !4095, roundup(off + len))`
//! straight into the slot, and the requested bytes begin at `dst + off % 4096`
//! ([`Completion::data`]). There is no second copy. [`slot_len_for`] gives the slot size needed.
//!
//! # Backends
//! [`open_reader`] is the one place a backend is chosen:
//! * io_uring (Linux): batched submission from a driver thread, the file registered as a fixed
//!   file, pool memory registered as fixed buffers ([`ReadBackend::register_buffers`]).
//! * a bounded pool of `pread` threads (Linux fallback, the only backend on macOS).
//!
//! Fallbacks are logged once per process with `tracing::warn!` and listed in
//! [`ReaderInfo::fallbacks`]: io_uring unavailable → pread pool; O_DIRECT refused → buffered
//! reads followed by `posix_fadvise(DONTNEED)`; fixed-buffer registration refused → plain reads.
//!
//! # Requests and completion
//! Every request gets a [`Ticket`]. Large requests are split into chunks of
//! [`IoOptions::chunk_size`]; at most [`IoOptions::queue_depth`] chunks are in flight and a
//! request completes when all of its chunks have. Request slots are pre-allocated
//! ([`IoOptions::max_requests`]); [`ReadBackend::submit`] never allocates and fails with
//! [`IoError::QueueFull`] rather than queueing without bound.
//!
//! See `docs/io.md` for the design sketch and measured numbers.

mod buf;
mod error;
#[doc(hidden)]
pub mod fault;
mod file;
mod pread;
mod table;
#[cfg(target_os = "linux")]
mod uring;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

pub use buf::AlignedBuf;
pub use error::IoError;
pub use file::{drop_cache, open_for_write_nocache};

/// Alignment of file offsets, lengths and memory for direct I/O (covers 512 B and 4 KiB
/// logical blocks).
pub const ALIGN: usize = 4096;

/// Default number of chunk reads in flight.
pub const DEFAULT_QUEUE_DEPTH: usize = 32;
/// Default chunk size large requests are split into.
pub const DEFAULT_CHUNK_SIZE: usize = 1 << 20;
/// Default number of outstanding (submitted, not yet collected) requests.
pub const DEFAULT_MAX_REQUESTS: usize = 1024;
/// Most files one reader can hold.
pub const MAX_FILES: usize = 64;

/// Size a slot needs to receive `[offset, offset + len)`: the 4 KiB-aligned superset.
pub fn slot_len_for(offset: u64, len: usize) -> usize {
    if len == 0 {
        return 0;
    }
    let head = (offset % ALIGN as u64) as usize;
    round_up(head + len, ALIGN)
}

/// Where the requested bytes begin inside their slot: `offset % 4096`.
pub fn slot_offset_for(offset: u64) -> usize {
    (offset % ALIGN as u64) as usize
}

/// The aligned file range `[start, end)` actually read for `[offset, offset + len)`.
pub fn aligned_range(offset: u64, len: usize) -> (u64, u64) {
    let start = offset - offset % ALIGN as u64;
    (start, start + slot_len_for(offset, len) as u64)
}

pub(crate) fn round_up(x: usize, a: usize) -> usize {
    x.div_ceil(a) * a
}

/// Which backend to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// io_uring where available, otherwise the pread pool (with a warning on Linux).
    #[default]
    Auto,
    /// io_uring or an error.
    Uring,
    /// The pread thread pool.
    Pread,
}

impl std::str::FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Backend::Auto),
            "uring" | "io_uring" | "io-uring" => Ok(Backend::Uring),
            "pread" => Ok(Backend::Pread),
            other => Err(format!(
                "unknown I/O backend `{other}` (auto, uring, pread)"
            )),
        }
    }
}

/// The backend actually running.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Uring,
    Pread,
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackendKind::Uring => "io_uring",
            BackendKind::Pread => "pread",
        })
    }
}

/// Options for [`open_reader`].
#[derive(Clone, Debug)]
pub struct IoOptions {
    pub backend: Backend,
    /// Chunk reads in flight at once (io_uring queue depth / pread threads). 1..=1024.
    pub queue_depth: usize,
    /// Large requests are split into chunks of this size (a multiple of [`ALIGN`]).
    pub chunk_size: usize,
    /// Outstanding requests (submitted and not yet collected with `wait`/`try_wait`).
    pub max_requests: usize,
    /// Bypass the page cache (O_DIRECT on Linux, F_NOCACHE on macOS).
    pub direct: bool,
    /// Fault injection for tests: pretend the kernel refused a feature.
    #[doc(hidden)]
    pub simulate: Simulate,
}

impl Default for IoOptions {
    fn default() -> Self {
        IoOptions {
            backend: Backend::Auto,
            queue_depth: DEFAULT_QUEUE_DEPTH,
            chunk_size: DEFAULT_CHUNK_SIZE,
            max_requests: DEFAULT_MAX_REQUESTS,
            direct: true,
            simulate: Simulate::default(),
        }
    }
}

/// Pretend a kernel feature is refused, to test the fallback paths on machines that have it
/// (e.g. tmpfs accepts O_DIRECT since Linux 6.6).
#[doc(hidden)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Simulate {
    /// `io_uring_setup` fails with EPERM (as under a seccomp filter).
    pub uring_unavailable: bool,
    /// `open(O_DIRECT)` fails with EINVAL (as on tmpfs before Linux 6.6).
    pub direct_refused: bool,
    /// Fixed-buffer registration fails with ENOMEM (as under a small RLIMIT_MEMLOCK).
    pub register_buffers_fails: bool,
    /// Starting an I/O thread fails with EAGAIN (as at RLIMIT_NPROC): the
    /// io_uring driver, or the last pread worker.
    pub thread_spawn_fails: bool,
}

/// What a reader is actually doing, after fallbacks.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReaderInfo {
    pub backend: BackendKind,
    /// Page cache bypassed for the first file (O_DIRECT / F_NOCACHE).
    pub direct: bool,
    pub queue_depth: usize,
    pub chunk_size: usize,
    pub max_requests: usize,
    /// io_uring: the files are registered (fixed files).
    pub fixed_files: bool,
    /// io_uring: some memory is registered as fixed buffers.
    pub fixed_buffers: bool,
    /// One line per fallback taken.
    pub fallbacks: Vec<String>,
}

/// A file of a reader; the file passed to [`open_reader`] is `FileId(0)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FileId(pub u16);

/// Read `[file_offset, file_offset + len)` of `file` into `dst`.
///
/// `dst` must be [`ALIGN`]-aligned and `dst_cap >= slot_len_for(file_offset, len)`; the bytes
/// land at `dst + file_offset % ALIGN`, the rest of the slot holds the neighbouring file bytes.
#[derive(Clone, Copy, Debug)]
pub struct ReadRequest {
    pub file: FileId,
    pub file_offset: u64,
    pub len: usize,
    pub dst: *mut u8,
    pub dst_cap: usize,
}

impl ReadRequest {
    /// A request that reads into the whole of `buf`.
    pub fn for_buf(
        file: FileId,
        file_offset: u64,
        len: usize,
        buf: &mut AlignedBuf,
    ) -> ReadRequest {
        ReadRequest {
            file,
            file_offset,
            len,
            dst: buf.as_mut_ptr(),
            dst_cap: buf.len(),
        }
    }
}

/// Handle of a submitted request; collect it exactly once with `wait` or `try_wait`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ticket {
    pub(crate) slot: u32,
    pub(crate) gen: u32,
}

/// A finished request. The requested bytes are `[data, data + len)`.
#[derive(Debug)]
pub struct Completion {
    pub ticket: Ticket,
    pub file: FileId,
    pub file_offset: u64,
    pub len: usize,
    /// Start of the requested bytes: `dst + data_offset`.
    pub data: *mut u8,
    /// `file_offset % ALIGN`: offset of the requested bytes inside the slot.
    pub data_offset: usize,
    pub(crate) buf: Option<AlignedBuf>,
}

impl Completion {
    /// The requested bytes, for requests made with [`ReadBackend::submit_owned`].
    pub fn bytes(&self) -> Option<&[u8]> {
        self.buf
            .as_ref()
            .map(|b| &b.as_slice()[self.data_offset..self.data_offset + self.len])
    }

    /// Gives the buffer of a [`ReadBackend::submit_owned`] request back.
    pub fn into_buf(self) -> Option<AlignedBuf> {
        self.buf
    }
}

/// A reader of one or more files; see the module docs.
///
/// A reader is used from one thread at a time (`&mut self`) but may move between threads.
/// Dropping it waits for reads in flight; requests not yet started are cancelled.
pub trait ReadBackend: Send {
    /// Backend, direct I/O and fallbacks in effect.
    fn info(&self) -> &ReaderInfo;

    /// Opens another file (e.g. a split GGUF's next shard) with the same options.
    fn add_file(&mut self, path: &Path) -> Result<FileId, IoError>;

    /// Size of a file when it was opened.
    fn file_len(&self, file: FileId) -> Option<u64>;

    /// Registers memory the requests will read into (the slot pool) as io_uring fixed
    /// buffers, split in pieces of at most 1 GiB. Returns whether registration is in effect;
    /// a refusal (RLIMIT_MEMLOCK, old kernel) is a warning, never an error: reads then use
    /// plain buffers. Registration pins the pages. Call it while no request is in flight; it
    /// replaces an earlier registration. The pread backend ignores it (`Ok(false)`).
    fn register_buffers(&mut self, regions: &[(*mut u8, usize)]) -> Result<bool, IoError>;

    /// Submits a read; never blocks on I/O and never allocates.
    ///
    /// # Safety
    /// `req.dst .. req.dst + req.dst_cap` must be valid for writes and not be read or written
    /// by anyone else until the ticket has been collected (or the reader dropped).
    unsafe fn submit(&mut self, req: ReadRequest) -> Result<Ticket, IoError>;

    /// Submits a read into an owned buffer, handed back by [`Completion::into_buf`].
    /// The buffer must hold `slot_len_for(file_offset, len)` bytes.
    fn submit_owned(
        &mut self,
        file: FileId,
        file_offset: u64,
        len: usize,
        buf: AlignedBuf,
    ) -> Result<Ticket, IoError>;

    /// Blocks until the request is complete and collects it. A request whose bytes are not all
    /// there is an error, never a `Completion`.
    fn wait(&mut self, ticket: Ticket) -> Result<Completion, IoError>;

    /// Collects the request if it is complete, without blocking.
    fn try_wait(&mut self, ticket: Ticket) -> Result<Option<Completion>, IoError>;

    /// Waits for a group of requests (a layer's tensors, experts); returns the first error
    /// after all of them have finished. Completions are dropped (owned buffers freed).
    fn wait_all(&mut self, tickets: &[Ticket]) -> Result<(), IoError> {
        let mut first = None;
        for &t in tickets {
            if let Err(e) = self.wait(t) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Requests submitted and not yet collected.
    fn outstanding(&self) -> usize;

    /// Reads `[file_offset, file_offset + len)` into `buf` and waits for it; returns the range
    /// of `buf` that holds the requested bytes. Convenience for tests and tools.
    fn read_blocking(
        &mut self,
        file: FileId,
        file_offset: u64,
        len: usize,
        buf: &mut AlignedBuf,
    ) -> Result<std::ops::Range<usize>, IoError> {
        let req = ReadRequest::for_buf(file, file_offset, len, buf);
        // SAFETY: `buf` is mutably borrowed until we return, and we return only after the
        // request is collected (on a submit error nothing was queued).
        let t = unsafe { self.submit(req)? };
        let c = self.wait(t)?;
        Ok(c.data_offset..c.data_offset + c.len)
    }
}

/// Opens `path` for reading with the backend chosen by `opts` (the one place the choice and
/// its fallbacks are made).
pub fn open_reader(path: &Path, opts: &IoOptions) -> Result<Box<dyn ReadBackend>, IoError> {
    validate_options(opts)?;
    let mut fallbacks = Vec::new();
    #[allow(unused_mut)]
    let mut opened = file::open_read(path, opts.direct, &opts.simulate, &mut fallbacks)?;

    #[cfg(target_os = "linux")]
    {
        if opts.backend != Backend::Pread {
            match uring::UringReader::new(opened, opts, &mut fallbacks) {
                Ok(r) => return Ok(Box::new(r)),
                Err(uring::UringError::Spawn(e)) => return Err(e),
                Err(uring::UringError::Unavailable(e, _)) if opts.backend == Backend::Uring => {
                    return Err(IoError::UringUnavailable(e));
                }
                Err(uring::UringError::Unavailable(e, back)) => {
                    opened = back;
                    warn_once(
                        &URING_WARNED,
                        &mut fallbacks,
                        format!("io_uring unavailable ({e}); using the pread thread pool"),
                    );
                }
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        if opts.backend == Backend::Uring {
            return Err(IoError::UringUnavailable(std::io::Error::from(
                std::io::ErrorKind::Unsupported,
            )));
        }
    }
    Ok(Box::new(pread::PreadReader::new(opened, opts, fallbacks)?))
}

fn validate_options(o: &IoOptions) -> Result<(), IoError> {
    let bad = |what: &'static str| Err(IoError::InvalidOptions(what));
    if o.queue_depth == 0 || o.queue_depth > 1024 {
        return bad("queue_depth must be in 1..=1024");
    }
    if o.chunk_size == 0 || !o.chunk_size.is_multiple_of(ALIGN) || o.chunk_size > (1 << 30) {
        return bad("chunk_size must be a non-zero multiple of 4096, at most 1 GiB");
    }
    if o.max_requests == 0 || o.max_requests > (1 << 24) {
        return bad("max_requests must be in 1..=16M");
    }
    Ok(())
}

#[cfg(target_os = "linux")]
static URING_WARNED: AtomicBool = AtomicBool::new(false);
pub(crate) static DIRECT_WARNED: AtomicBool = AtomicBool::new(false);
#[cfg(target_os = "linux")]
pub(crate) static FIXED_BUF_WARNED: AtomicBool = AtomicBool::new(false);
#[cfg(target_os = "linux")]
pub(crate) static FIXED_FILE_WARNED: AtomicBool = AtomicBool::new(false);

/// Records a fallback; the warning is logged once per process (later ones at debug level).
pub(crate) fn warn_once(flag: &AtomicBool, fallbacks: &mut Vec<String>, msg: String) {
    if !flag.swap(true, Ordering::Relaxed) {
        tracing::warn!("{msg}");
    } else {
        tracing::debug!("{msg}");
    }
    fallbacks.push(msg);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignment_math() {
        assert_eq!(slot_len_for(0, 1), 4096);
        assert_eq!(slot_len_for(4095, 1), 4096);
        assert_eq!(slot_len_for(4095, 2), 8192);
        assert_eq!(slot_len_for(32, 4096), 8192);
        assert_eq!(slot_len_for(8192, 4096), 4096);
        assert_eq!(slot_len_for(5, 0), 0);
        assert_eq!(aligned_range(4097, 10), (4096, 8192));
        assert_eq!(slot_offset_for(4097), 1);
    }

    #[test]
    fn errors_name_file_and_offset() {
        let f = std::path::PathBuf::from("/m/model.gguf");
        let e = IoError::from_errno(f.clone(), 8192, libc::EIO);
        assert!(matches!(e, IoError::Eio { offset: 8192, .. }));
        assert!(e.to_string().contains("/m/model.gguf") && e.to_string().contains("8192"));
        assert!(matches!(
            IoError::from_errno(f.clone(), 1, libc::ENOMEM),
            IoError::NoMemory { .. }
        ));
        let e = IoError::from_errno(f, 5, libc::EBADF);
        assert!(matches!(e, IoError::Read { offset: 5, .. }));
    }
}
