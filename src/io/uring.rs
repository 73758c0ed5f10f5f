//! The io_uring backend.
//!
//! One driver thread owns the ring. It takes chunks from the shared request table (FIFO),
//! pushes up to `queue_depth` reads as one batch, blocks in `io_uring_enter`, reaps the
//! completions and marks requests done. The front end (the reader handle) only touches the
//! table under its lock and wakes the driver through an eventfd whose read is always armed in
//! the ring, so a new request is picked up at once even while other reads are in flight.
//! Registration (fixed buffers, fixed files) runs on the driver while no read is in flight.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;

use io_uring::{opcode, types, IoUring, Probe};

use super::file::{drop_cache_fd, open_read, OpenedFile};
use super::table::{Chunk, ChunkResult, Control, FileEntry, Shared, Table};
use super::{
    warn_once, AlignedBuf, BackendKind, Completion, FileId, IoError, IoOptions, ReadBackend,
    ReadRequest, ReaderInfo, Ticket, ALIGN, FIXED_BUF_WARNED, FIXED_FILE_WARNED, MAX_FILES,
};

/// user_data of the eventfd read.
const WAKE_TOKEN: u64 = u64::MAX;
/// Largest fixed buffer the kernel accepts.
const MAX_FIXED_BUF: usize = 1 << 30;
/// Most fixed buffers per ring (UIO_MAXIOV on older kernels).
const MAX_FIXED_BUFS: usize = 1024;

pub(crate) struct UringReader {
    shared: Arc<Shared>,
    driver: Option<JoinHandle<()>>,
    /// The eventfd the driver's armed read waits on (written to wake it).
    wake: File,
    info: ReaderInfo,
    opts: IoOptions,
}

/// Why an io_uring reader could not be made.
pub(crate) enum UringError {
    /// The kernel refused io_uring: the file is handed back for the fallback.
    Unavailable(std::io::Error, OpenedFile),
    /// The driver thread could not be started (a thread limit): an error to
    /// report, not a reason to fall back (the pread pool needs threads too).
    Spawn(IoError),
}

impl UringReader {
    /// Sets up the ring and starts its driver thread.
    pub fn new(
        first: OpenedFile,
        opts: &IoOptions,
        fallbacks: &mut Vec<String>,
    ) -> Result<UringReader, UringError> {
        match setup(&first, opts) {
            Ok((ring, wake)) => Self::start(ring, wake, first, opts, fallbacks),
            Err(e) => Err(UringError::Unavailable(e, first)),
        }
    }

    fn start(
        ring: IoUring,
        wake: File,
        first: OpenedFile,
        opts: &IoOptions,
        fallbacks: &mut Vec<String>,
    ) -> Result<UringReader, UringError> {
        // Fixed files: a sparse table so later shards can be added; else just this file.
        let mut fds = [-1 as RawFd; MAX_FILES];
        fds[0] = first.fd();
        let fixed_files = match ring.submitter().register_files(&fds) {
            Ok(()) => true,
            Err(_) => match ring.submitter().register_files(&fds[..1]) {
                Ok(()) => true,
                Err(e) => {
                    warn_once(
                        &FIXED_FILE_WARNED,
                        fallbacks,
                        format!("io_uring fixed files refused ({e}); using plain file descriptors"),
                    );
                    false
                }
            },
        };
        let info = ReaderInfo {
            backend: BackendKind::Uring,
            direct: first.direct,
            queue_depth: opts.queue_depth,
            chunk_size: opts.chunk_size,
            max_requests: opts.max_requests,
            fixed_files,
            fixed_buffers: false,
            fallbacks: std::mem::take(fallbacks),
        };
        let entry = FileEntry {
            opened: first,
            fixed: fixed_files.then_some(0),
        };
        let table = Table::new(opts.max_requests, opts.chunk_size, entry);
        let shared = Arc::new(Shared::new(table));
        let sh = shared.clone();
        let wake_fd = wake.as_raw_fd();
        let qd = opts.queue_depth;
        let simulate_reg_fail = opts.simulate.register_buffers_fails;
        let driver = if opts.simulate.thread_spawn_fails {
            Err(std::io::Error::from_raw_os_error(libc::EAGAIN))
        } else {
            std::thread::Builder::new()
                .name("hypura-uring".into())
                .spawn(move || Driver::new(ring, sh, wake_fd, qd, simulate_reg_fail).run())
        };
        // On failure the closure (ring, table, file) has been dropped.
        let driver = driver.map_err(|e| {
            UringError::Spawn(IoError::Engine(format!(
                "cannot start the io_uring driver thread: {e}"
            )))
        })?;
        Ok(UringReader {
            shared,
            driver: Some(driver),
            wake,
            info,
            opts: opts.clone(),
        })
    }

    fn kick(&self) {
        // An eventfd write of 1 only fails if the counter would overflow (it cannot here).
        let _ = (&self.wake).write(&1u64.to_ne_bytes());
    }

    /// Runs a control request on the driver and waits for its result.
    fn control(&self, c: Control) -> Result<std::io::Result<bool>, IoError> {
        let mut g = self.shared.lock()?;
        debug_assert!(g.control.is_none() && g.control_result.is_none());
        g.control = Some(c);
        drop(g);
        self.kick();
        let mut g = self.shared.lock()?;
        loop {
            if let Some(r) = g.control_result.take() {
                return Ok(r);
            }
            if let Some(f) = &g.fatal {
                return Err(IoError::Engine(f.clone()));
            }
            g = self
                .shared
                .done
                .wait(g)
                .map_err(|_| IoError::Engine("io_uring driver panicked".into()))?;
        }
    }

    fn submit_inner(
        &mut self,
        req: &ReadRequest,
        owned: Option<AlignedBuf>,
    ) -> Result<Ticket, IoError> {
        let mut g = self.shared.lock()?;
        if let Some(f) = &g.fatal {
            return Err(IoError::Engine(f.clone()));
        }
        let t = g.table.insert(req, owned)?;
        let kick = std::mem::take(&mut g.driver_sleeping);
        drop(g);
        if kick {
            self.kick();
        }
        Ok(t)
    }
}

fn setup(first: &OpenedFile, opts: &IoOptions) -> std::io::Result<(IoUring, File)> {
    if opts.simulate.uring_unavailable {
        return Err(std::io::Error::from_raw_os_error(libc::EPERM));
    }
    let entries = (opts.queue_depth + 1).next_power_of_two() as u32;
    let ring = IoUring::new(entries)?;
    let mut probe = Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    if !probe.is_supported(opcode::Read::CODE) || !probe.is_supported(opcode::ReadFixed::CODE) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "kernel lacks IORING_OP_READ",
        ));
    }
    // SAFETY: plain syscall; the result is checked before use.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let wake = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let _ = first;
    Ok((ring, wake))
}

impl ReadBackend for UringReader {
    fn info(&self) -> &ReaderInfo {
        &self.info
    }

    fn add_file(&mut self, path: &Path) -> Result<FileId, IoError> {
        let mut fallbacks = Vec::new();
        let opened = open_read(path, self.opts.direct, &self.opts.simulate, &mut fallbacks)?;
        self.info.fallbacks.extend(fallbacks);
        let fd = opened.fd();
        let index = {
            let mut g = self.shared.lock()?;
            if g.table.files.len() >= MAX_FILES {
                return Err(IoError::TooManyFiles(MAX_FILES));
            }
            g.table.files.push(FileEntry {
                opened,
                fixed: None,
            });
            g.table.files.len() - 1
        };
        if self.info.fixed_files {
            if let Ok(Ok(_)) = self.control(Control::RegisterFile {
                index: index as u32,
                fd,
            }) {
                self.shared.lock()?.table.files[index].fixed = Some(index as u32);
            }
        }
        Ok(FileId(index as u16))
    }

    fn file_len(&self, file: FileId) -> Option<u64> {
        let g = self.shared.lock_always();
        g.table.files.get(file.0 as usize).map(|f| f.opened.len)
    }

    fn register_buffers(&mut self, regions: &[(*mut u8, usize)]) -> Result<bool, IoError> {
        let mut pieces = Vec::new();
        for &(ptr, len) in regions {
            if ptr.is_null() || len == 0 {
                continue;
            }
            let mut off = 0;
            while off < len {
                let n = (len - off).min(MAX_FIXED_BUF);
                pieces.push((ptr as usize + off, n));
                off += n;
            }
        }
        let result = if pieces.len() > MAX_FIXED_BUFS {
            Err(std::io::Error::new(
                std::io::ErrorKind::OutOfMemory,
                "more than 1024 GiB of buffers",
            ))
        } else {
            self.control(Control::RegisterBuffers(pieces))?
        };
        match result {
            Ok(on) => {
                self.info.fixed_buffers = on;
                Ok(on)
            }
            Err(e) => {
                self.info.fixed_buffers = false;
                warn_once(
                    &FIXED_BUF_WARNED,
                    &mut self.info.fallbacks,
                    format!("io_uring fixed buffers refused ({e}); using plain reads"),
                );
                Ok(false)
            }
        }
    }

    unsafe fn submit(&mut self, req: ReadRequest) -> Result<Ticket, IoError> {
        self.submit_inner(&req, None)
    }

    fn submit_owned(
        &mut self,
        file: FileId,
        file_offset: u64,
        len: usize,
        mut buf: AlignedBuf,
    ) -> Result<Ticket, IoError> {
        let req = ReadRequest::for_buf(file, file_offset, len, &mut buf);
        self.submit_inner(&req, Some(buf))
    }

    fn wait(&mut self, ticket: Ticket) -> Result<Completion, IoError> {
        self.shared.wait_ticket(ticket)
    }

    fn try_wait(&mut self, ticket: Ticket) -> Result<Option<Completion>, IoError> {
        self.shared.try_ticket(ticket)
    }

    fn outstanding(&self) -> usize {
        self.shared.lock_always().table.outstanding()
    }
}

impl Drop for UringReader {
    fn drop(&mut self) {
        self.shared.lock_always().shutdown = true;
        self.kick();
        if let Some(h) = self.driver.take() {
            let _ = h.join();
        }
    }
}

/// A read in the ring.
struct Op {
    chunk: Chunk,
    /// Bytes of the chunk read so far (short reads are continued).
    done: usize,
    retries: u32,
    fixed_buf: Option<u16>,
}

struct Driver {
    ring: IoUring,
    shared: Arc<Shared>,
    wake_fd: RawFd,
    wake_buf: Box<u64>,
    armed: bool,
    ops: Vec<Option<Op>>,
    free_ops: Vec<u32>,
    inflight: usize,
    /// Registered fixed buffers, sorted by address.
    regions: Vec<(usize, usize)>,
    cqes: Vec<(u64, i32)>,
    simulate_reg_fail: bool,
}

impl Driver {
    fn new(
        ring: IoUring,
        shared: Arc<Shared>,
        wake_fd: RawFd,
        qd: usize,
        simulate_reg_fail: bool,
    ) -> Driver {
        let mut ops = Vec::with_capacity(qd);
        ops.resize_with(qd, || None);
        let cq_cap = ring.params().cq_entries() as usize;
        Driver {
            ring,
            shared,
            wake_fd,
            wake_buf: Box::new(0),
            armed: false,
            ops,
            free_ops: (0..qd as u32).rev().collect(),
            inflight: 0,
            regions: Vec::new(),
            cqes: Vec::with_capacity(cq_cap),
            simulate_reg_fail,
        }
    }

    fn run(mut self) {
        let mut enter_failures = 0u32;
        let shared = self.shared.clone();
        loop {
            let mut g = shared.lock_always();
            let quiesce = g.shutdown || g.control.is_some() || g.fatal.is_some();
            if g.shutdown {
                g.table.cancel_pending();
            }
            if !quiesce {
                while let Some(&opi) = self.free_ops.last() {
                    let Some(ch) = g.table.next_chunk() else {
                        break;
                    };
                    self.free_ops.pop();
                    let fixed_buf = self.lookup_fixed(ch.dst as usize, ch.len);
                    self.ops[opi as usize] = Some(Op {
                        chunk: ch,
                        done: 0,
                        retries: 0,
                        fixed_buf,
                    });
                    self.push_op(opi);
                    self.inflight += 1;
                }
                if !self.armed {
                    self.push_wake();
                }
            } else if self.inflight == 0 && !self.armed {
                if g.shutdown || g.fatal.is_some() {
                    drop(g);
                    self.shared.done.notify_all();
                    return;
                }
                let c = g.control.take().expect("quiescing for a control request");
                drop(g);
                let r = self.run_control(c);
                self.shared.lock_always().control_result = Some(r);
                self.shared.done.notify_all();
                continue;
            }
            g.driver_sleeping = !quiesce && !self.free_ops.is_empty();
            drop(g);

            match self.ring.submit_and_wait(1) {
                Ok(_) => enter_failures = 0,
                Err(e) => match e.raw_os_error() {
                    Some(libc::EINTR) => {}
                    Some(libc::EAGAIN) | Some(libc::EBUSY) => std::thread::yield_now(),
                    _ => {
                        enter_failures += 1;
                        tracing::error!("io_uring_enter failed: {e}");
                        std::thread::sleep(std::time::Duration::from_millis(10));
                        if enter_failures >= 100 {
                            let mut g = self.shared.lock_always();
                            g.fatal = Some(format!("io_uring_enter keeps failing: {e}"));
                            g.table.cancel_pending();
                            drop(g);
                            // Complete our own armed eventfd read so the loop can wind down.
                            // SAFETY: writing 8 bytes from a local to our eventfd.
                            unsafe { libc::write(self.wake_fd, (&1u64 as *const u64).cast(), 8) };
                            self.shared.done.notify_all();
                        }
                    }
                },
            }
            self.reap();
        }
    }

    fn reap(&mut self) {
        self.cqes.clear();
        for cqe in self.ring.completion() {
            debug_assert!(self.cqes.len() < self.cqes.capacity());
            self.cqes.push((cqe.user_data(), cqe.result()));
        }
        if self.cqes.is_empty() {
            return;
        }
        let shared = self.shared.clone();
        let mut g = shared.lock_always();
        g.driver_sleeping = false;
        let mut any_done = false;
        for i in 0..self.cqes.len() {
            let (ud, res) = self.cqes[i];
            if ud == WAKE_TOKEN {
                self.armed = false;
                continue;
            }
            let opi = ud as u32;
            let op = self.ops[opi as usize]
                .as_mut()
                .expect("completion of an idle op");
            let outcome = if res >= 0 {
                let n = res as usize;
                op.done += n;
                debug_assert!(op.done <= op.chunk.len);
                if op.done >= op.chunk.len {
                    Some(ChunkResult::Full)
                } else if n == 0 || (op.chunk.direct && !op.done.is_multiple_of(ALIGN)) {
                    Some(ChunkResult::Eof(op.chunk.off + op.done as u64))
                } else {
                    None // short read: continue with the rest
                }
            } else {
                let errno = -res;
                if (errno == libc::EINTR || errno == libc::EAGAIN) && op.retries < 1000 {
                    op.retries += 1;
                    None
                } else {
                    Some(ChunkResult::Err {
                        errno,
                        offset: op.chunk.off + op.done as u64,
                    })
                }
            };
            match outcome {
                None => self.push_op(opi),
                Some(r) => {
                    let op = self.ops[opi as usize].take().expect("op");
                    if !op.chunk.direct {
                        drop_cache_fd(op.chunk.fd, op.chunk.off, op.chunk.len as u64);
                    }
                    any_done |= g.table.complete(&op.chunk, r);
                    self.free_ops.push(opi);
                    self.inflight -= 1;
                }
            }
        }
        drop(g);
        if any_done {
            self.shared.done.notify_all();
        }
    }

    /// Index of the fixed buffer holding `[addr, addr + len)`, if any.
    fn lookup_fixed(&self, addr: usize, len: usize) -> Option<u16> {
        let i = self.regions.partition_point(|&(start, _)| start <= addr);
        if i == 0 {
            return None;
        }
        let (start, rlen) = self.regions[i - 1];
        (addr + len <= start + rlen).then_some((i - 1) as u16)
    }

    fn push_op(&mut self, opi: u32) {
        let op = self.ops[opi as usize].as_ref().expect("op");
        let c = &op.chunk;
        let buf = c.dst.wrapping_add(op.done);
        let len = (c.len - op.done) as u32;
        let off = c.off + op.done as u64;
        let entry = match (op.fixed_buf, c.fixed_file) {
            (Some(bi), Some(ff)) => opcode::ReadFixed::new(types::Fixed(ff), buf, len, bi)
                .offset(off)
                .build(),
            (Some(bi), None) => opcode::ReadFixed::new(types::Fd(c.fd), buf, len, bi)
                .offset(off)
                .build(),
            (None, Some(ff)) => opcode::Read::new(types::Fixed(ff), buf, len)
                .offset(off)
                .build(),
            (None, None) => opcode::Read::new(types::Fd(c.fd), buf, len)
                .offset(off)
                .build(),
        };
        let entry = entry.user_data(opi as u64);
        // SAFETY: the destination stays valid until this op's completion is reaped (submit
        // contract; owned buffers live in the table until collected), and the op's record is
        // kept in `self.ops` until then. The SQ holds queue_depth + 1 entries and at most that
        // many operations exist, so the push cannot fail.
        unsafe { self.ring.submission().push(&entry) }
            .expect("submission queue sized for the queue depth");
    }

    fn push_wake(&mut self) {
        let buf: *mut u64 = &mut *self.wake_buf;
        let entry = opcode::Read::new(types::Fd(self.wake_fd), buf.cast(), 8)
            .build()
            .user_data(WAKE_TOKEN);
        // SAFETY: `wake_buf` is boxed and lives as long as the driver, which outlives the ring's
        // use of it (the driver only exits with nothing armed); the eventfd stays open until the
        // reader has joined this thread.
        unsafe { self.ring.submission().push(&entry) }
            .expect("submission queue sized for the queue depth");
        self.armed = true;
    }

    fn run_control(&mut self, c: Control) -> std::io::Result<bool> {
        debug_assert_eq!(self.inflight, 0);
        match c {
            Control::RegisterBuffers(mut pieces) => {
                if !self.regions.is_empty() {
                    self.ring.submitter().unregister_buffers()?;
                    self.regions.clear();
                }
                if pieces.is_empty() {
                    return Ok(false);
                }
                if self.simulate_reg_fail {
                    return Err(std::io::Error::from_raw_os_error(libc::ENOMEM));
                }
                pieces.sort_unstable();
                let iovecs: Vec<libc::iovec> = pieces
                    .iter()
                    .map(|&(a, l)| libc::iovec {
                        iov_base: a as *mut libc::c_void,
                        iov_len: l,
                    })
                    .collect();
                // SAFETY: the regions are the caller's memory, mapped now (the kernel pins them
                // and fails otherwise). Reads use a fixed buffer only for chunks that lie inside
                // it, and the kernel checks that range again.
                unsafe { self.ring.submitter().register_buffers(&iovecs)? };
                self.regions = pieces;
                Ok(true)
            }
            Control::RegisterFile { index, fd } => {
                self.ring.submitter().register_files_update(index, &[fd])?;
                Ok(true)
            }
        }
    }
}
