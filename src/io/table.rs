//! The request table shared by both backends: fixed-size request slots, the FIFO of requests
//! with chunks left to issue, and per-request completion tracking. Everything is allocated up
//! front; nothing here allocates once the reader is open (owned buffers are moved, not copied).

use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::sync::{Condvar, Mutex, MutexGuard};

use super::file::OpenedFile;
use super::{slot_len_for, AlignedBuf, Completion, FileId, IoError, ReadRequest, Ticket, ALIGN};

/// A destination pointer stored in the shared table.
#[derive(Clone, Copy, Debug)]
pub(crate) struct DstPtr(pub *mut u8);

// SAFETY: the pointer is only dereferenced by the kernel / the thread running a chunk's read;
// the submitter promised exclusive access to the memory until the request is collected.
unsafe impl Send for DstPtr {}

/// One read of at most `chunk_size` bytes, aligned when the file is opened O_DIRECT.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Chunk {
    pub slot: u32,
    pub gen: u32,
    pub fd: RawFd,
    /// Index in the io_uring fixed-file table, if registered.
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    pub fixed_file: Option<u32>,
    pub direct: bool,
    pub off: u64,
    pub dst: *mut u8,
    pub len: usize,
}

/// How a chunk ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ChunkResult {
    /// All bytes read.
    Full,
    /// End of file at this offset (the chunk got `at - off` bytes).
    Eof(u64),
    /// A read failed with `errno` at `offset` (EINTR/EAGAIN already retried).
    Err { errno: i32, offset: u64 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Free,
    Active,
    Done,
}

#[derive(Debug)]
struct Slot {
    gen: u32,
    state: State,
    file: u16,
    offset: u64,
    len: usize,
    dst: DstPtr,
    /// Aligned range being read: `[astart, aend)`.
    astart: u64,
    aend: u64,
    /// Next chunk start; `>= aend` when every chunk has been issued (or issuing stopped).
    next: u64,
    inflight: u32,
    /// Lowest end-of-file offset seen (u64::MAX: none).
    eof: u64,
    err: Option<(i32, u64)>,
    cancelled: bool,
    owned: Option<AlignedBuf>,
}

impl Slot {
    fn empty() -> Slot {
        Slot {
            gen: 0,
            state: State::Free,
            file: 0,
            offset: 0,
            len: 0,
            dst: DstPtr(std::ptr::null_mut()),
            astart: 0,
            aend: 0,
            next: 0,
            inflight: 0,
            eof: u64::MAX,
            err: None,
            cancelled: false,
            owned: None,
        }
    }
}

/// A file of the reader, with its io_uring fixed-file index.
#[derive(Debug)]
pub(crate) struct FileEntry {
    pub opened: OpenedFile,
    pub fixed: Option<u32>,
}

pub(crate) struct Table {
    slots: Vec<Slot>,
    /// Free slot indices (a stack; capacity = slots).
    free: Vec<u32>,
    /// Active slots with chunks left to issue, in submission order; each at most once.
    pending: VecDeque<u32>,
    chunk_size: u64,
    pub files: Vec<FileEntry>,
    outstanding: usize,
    chunks_inflight: usize,
}

impl Table {
    pub fn new(max_requests: usize, chunk_size: usize, first: FileEntry) -> Table {
        assert!(max_requests > 0 && max_requests <= u32::MAX as usize);
        assert!(chunk_size > 0 && chunk_size.is_multiple_of(ALIGN));
        let mut slots = Vec::with_capacity(max_requests);
        slots.resize_with(max_requests, Slot::empty);
        let free = (0..max_requests as u32).rev().collect();
        let mut files = Vec::with_capacity(super::MAX_FILES);
        files.push(first);
        Table {
            slots,
            free,
            pending: VecDeque::with_capacity(max_requests),
            chunk_size: chunk_size as u64,
            files,
            outstanding: 0,
            chunks_inflight: 0,
        }
    }

    pub fn outstanding(&self) -> usize {
        self.outstanding
    }

    pub fn chunk_size(&self) -> usize {
        self.chunk_size as usize
    }

    fn validate(&self, req: &ReadRequest) -> Result<(), IoError> {
        if req.file.0 as usize >= self.files.len() {
            return Err(IoError::InvalidRequest("unknown file id"));
        }
        if req
            .file_offset
            .checked_add(req.len as u64 + ALIGN as u64)
            .is_none()
        {
            return Err(IoError::InvalidRequest("offset + len overflows"));
        }
        if req.len == 0 {
            return Ok(());
        }
        if req.dst.is_null() {
            return Err(IoError::InvalidRequest("null destination"));
        }
        if !(req.dst as usize).is_multiple_of(ALIGN) {
            return Err(IoError::InvalidRequest("destination not 4096-aligned"));
        }
        if req.dst_cap < slot_len_for(req.file_offset, req.len) {
            return Err(IoError::InvalidRequest(
                "destination smaller than slot_len_for(offset, len)",
            ));
        }
        Ok(())
    }

    /// Queues a request. On error the owned buffer is dropped and nothing is queued.
    pub fn insert(
        &mut self,
        req: &ReadRequest,
        owned: Option<AlignedBuf>,
    ) -> Result<Ticket, IoError> {
        self.validate(req)?;
        let Some(idx) = self.free.pop() else {
            return Err(IoError::QueueFull {
                capacity: self.slots.len(),
            });
        };
        let s = &mut self.slots[idx as usize];
        debug_assert_eq!(s.state, State::Free);
        debug_assert_eq!(s.inflight, 0);
        let (astart, aend) = super::aligned_range(req.file_offset, req.len);
        s.state = State::Active;
        s.file = req.file.0;
        s.offset = req.file_offset;
        s.len = req.len;
        s.dst = DstPtr(req.dst);
        s.astart = astart;
        s.aend = aend;
        s.next = astart;
        s.inflight = 0;
        s.eof = u64::MAX;
        s.err = None;
        s.cancelled = false;
        s.owned = owned;
        self.outstanding += 1;
        if aend > astart {
            debug_assert!(self.pending.len() < self.pending.capacity());
            self.pending.push_back(idx);
        } else {
            s.state = State::Done;
        }
        Ok(Ticket {
            slot: idx,
            gen: s.gen,
        })
    }

    /// The next chunk to read, in submission order.
    pub fn next_chunk(&mut self) -> Option<Chunk> {
        let &idx = self.pending.front()?;
        let s = &mut self.slots[idx as usize];
        debug_assert_eq!(s.state, State::Active);
        debug_assert!(s.next < s.aend);
        let off = s.next;
        let end = (off + self.chunk_size).min(s.aend);
        s.next = end;
        s.inflight += 1;
        if end >= s.aend {
            self.pending.pop_front();
        }
        self.chunks_inflight += 1;
        let f = &self.files[s.file as usize];
        Some(Chunk {
            slot: idx,
            gen: s.gen,
            fd: f.opened.fd(),
            fixed_file: f.fixed,
            direct: f.opened.direct,
            off,
            dst: s.dst.0.wrapping_add((off - s.astart) as usize),
            len: (end - off) as usize,
        })
    }

    fn unqueue(&mut self, idx: u32) {
        if let Some(pos) = self.pending.iter().position(|&x| x == idx) {
            self.pending.remove(pos);
        }
    }

    /// Records a chunk's outcome; true when its request is now complete.
    pub fn complete(&mut self, ch: &Chunk, r: ChunkResult) -> bool {
        debug_assert!(self.chunks_inflight > 0);
        self.chunks_inflight -= 1;
        let s = &mut self.slots[ch.slot as usize];
        assert!(
            s.gen == ch.gen && s.state == State::Active && s.inflight > 0,
            "chunk of a dead request"
        );
        s.inflight -= 1;
        let stop = match r {
            ChunkResult::Full => false,
            ChunkResult::Eof(at) => {
                s.eof = s.eof.min(at);
                at < s.offset + s.len as u64
            }
            ChunkResult::Err { errno, offset } => {
                if s.err.is_none() {
                    s.err = Some((errno, offset));
                }
                true
            }
        };
        if stop && s.next < s.aend {
            // Nothing more to read for this request: the rest is past EOF or it failed.
            s.next = s.aend;
            self.unqueue(ch.slot);
        }
        let s = &mut self.slots[ch.slot as usize];
        if s.inflight == 0 && s.next >= s.aend {
            s.state = State::Done;
            return true;
        }
        false
    }

    /// Stops issuing chunks (shutdown / engine failure): requests with nothing in flight
    /// complete as cancelled.
    pub fn cancel_pending(&mut self) {
        while let Some(idx) = self.pending.pop_front() {
            let s = &mut self.slots[idx as usize];
            s.next = s.aend;
            s.cancelled = true;
            if s.inflight == 0 {
                s.state = State::Done;
            }
        }
    }

    /// Collects `t` if complete: `Ok(None)` while in flight.
    pub fn take(&mut self, t: Ticket) -> Result<Option<Result<Completion, IoError>>, IoError> {
        let s = self
            .slots
            .get_mut(t.slot as usize)
            .ok_or(IoError::BadTicket)?;
        if s.gen != t.gen || s.state == State::Free {
            return Err(IoError::BadTicket);
        }
        if s.state != State::Done {
            return Ok(None);
        }
        debug_assert_eq!(s.inflight, 0);
        let path = || self.files[s.file as usize].opened.path.clone();
        let required_end = s.offset + s.len as u64;
        let result = if let Some((errno, offset)) = s.err {
            Err(IoError::from_errno(path(), offset, errno))
        } else if s.cancelled {
            Err(IoError::Engine(
                "request cancelled: the reader is shutting down".into(),
            ))
        } else if s.eof < required_end {
            Err(IoError::ShortRead {
                file: path(),
                offset: s.offset,
                expected: s.len,
                got: s.eof.saturating_sub(s.offset) as usize,
            })
        } else {
            let data_offset = super::slot_offset_for(s.offset);
            Ok(Completion {
                ticket: t,
                file: FileId(s.file),
                file_offset: s.offset,
                len: s.len,
                data: s.dst.0.wrapping_add(data_offset),
                data_offset,
                buf: None,
            })
        };
        let owned = s.owned.take();
        s.state = State::Free;
        s.gen = s.gen.wrapping_add(1);
        s.dst = DstPtr(std::ptr::null_mut());
        self.free.push(t.slot);
        self.outstanding -= 1;
        Ok(Some(result.map(|mut c| {
            c.buf = owned;
            c
        })))
    }
}

/// Requests to the io_uring driver thread, run while the ring is idle.
#[derive(Debug)]
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
pub(crate) enum Control {
    /// (address, length) pieces of at most 1 GiB.
    RegisterBuffers(Vec<(usize, usize)>),
    /// Put `fd` at `index` of the fixed-file table.
    RegisterFile { index: u32, fd: RawFd },
}

#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
pub(crate) struct Core {
    pub table: Table,
    pub shutdown: bool,
    /// The engine died; every wait fails with this.
    pub fatal: Option<String>,
    /// io_uring: the driver is (about to be) blocked in io_uring_enter with free ring slots.
    pub driver_sleeping: bool,
    pub control: Option<Control>,
    pub control_result: Option<std::io::Result<bool>>,
}

pub(crate) struct Shared {
    pub core: Mutex<Core>,
    /// Signalled when a request completes (and on control results / engine failure).
    pub done: Condvar,
    /// Signalled when chunks are queued (pread workers) or on shutdown.
    pub work: Condvar,
}

impl Shared {
    pub fn new(table: Table) -> Shared {
        Shared {
            core: Mutex::new(Core {
                table,
                shutdown: false,
                fatal: None,
                driver_sleeping: false,
                control: None,
                control_result: None,
            }),
            done: Condvar::new(),
            work: Condvar::new(),
        }
    }

    pub fn lock(&self) -> Result<MutexGuard<'_, Core>, IoError> {
        self.core
            .lock()
            .map_err(|_| IoError::Engine("an I/O thread panicked".into()))
    }

    /// Locks even if a thread panicked while holding the lock (for shutdown paths).
    pub fn lock_always(&self) -> MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn wait_ticket(&self, t: Ticket) -> Result<Completion, IoError> {
        let mut g = self.lock()?;
        loop {
            if let Some(r) = g.table.take(t)? {
                return r;
            }
            if let Some(f) = &g.fatal {
                return Err(IoError::Engine(f.clone()));
            }
            g = self
                .done
                .wait(g)
                .map_err(|_| IoError::Engine("an I/O thread panicked".into()))?;
        }
    }

    pub fn try_ticket(&self, t: Ticket) -> Result<Option<Completion>, IoError> {
        let mut g = self.lock()?;
        match g.table.take(t)? {
            Some(r) => r.map(Some),
            None => match &g.fatal {
                Some(f) => Err(IoError::Engine(f.clone())),
                None => Ok(None),
            },
        }
    }
}
