//! The pread backend: `queue_depth` threads, each taking the next chunk from the shared table
//! and reading it with blocking `pread`.

use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;

use super::file::{drop_cache_fd, open_read, OpenedFile};
use super::table::{Chunk, ChunkResult, FileEntry, Shared, Table};
use super::{
    AlignedBuf, BackendKind, Completion, FileId, IoError, IoOptions, ReadBackend, ReadRequest,
    ReaderInfo, Ticket, ALIGN, MAX_FILES,
};

pub(crate) struct PreadReader {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    info: ReaderInfo,
    opts: IoOptions,
}

impl PreadReader {
    pub fn new(
        first: OpenedFile,
        opts: &IoOptions,
        fallbacks: Vec<String>,
    ) -> Result<PreadReader, IoError> {
        let info = ReaderInfo {
            backend: BackendKind::Pread,
            direct: first.direct,
            queue_depth: opts.queue_depth,
            chunk_size: opts.chunk_size,
            max_requests: opts.max_requests,
            fixed_files: false,
            fixed_buffers: false,
            fallbacks,
        };
        let table = Table::new(
            opts.max_requests,
            opts.chunk_size,
            FileEntry {
                opened: first,
                fixed: None,
            },
        );
        let shared = Arc::new(Shared::new(table));
        let mut reader = PreadReader {
            shared,
            workers: Vec::with_capacity(opts.queue_depth),
            info,
            opts: opts.clone(),
        };
        for i in 0..opts.queue_depth {
            let sh = reader.shared.clone();
            let h = if opts.simulate.thread_spawn_fails && i + 1 == opts.queue_depth {
                Err(std::io::Error::from_raw_os_error(libc::EAGAIN))
            } else {
                std::thread::Builder::new()
                    .name(format!("hypura-pread-{i}"))
                    .spawn(move || worker(&sh))
            };
            // On failure the workers already started are stopped and joined
            // when `reader` drops.
            let h =
                h.map_err(|e| IoError::Engine(format!("cannot start pread worker {i}: {e}")))?;
            reader.workers.push(h);
        }
        Ok(reader)
    }
}

fn worker(sh: &Shared) {
    let mut g = sh.lock_always();
    loop {
        if g.shutdown {
            return;
        }
        if let Some(ch) = g.table.next_chunk() {
            drop(g);
            let r = read_chunk(&ch);
            g = sh.lock_always();
            if g.table.complete(&ch, r) {
                sh.done.notify_all();
            }
            continue;
        }
        g = sh.work.wait(g).unwrap_or_else(|p| p.into_inner());
    }
}

/// Reads a whole chunk with pread, retrying EINTR/EAGAIN and continuing after short reads.
pub(crate) fn read_chunk(ch: &Chunk) -> ChunkResult {
    let mut done = 0usize;
    let mut retries = 0;
    let r = loop {
        if done == ch.len {
            break ChunkResult::Full;
        }
        // A direct read that ended off a block boundary hit EOF; reading on would be EINVAL.
        if ch.direct && !done.is_multiple_of(ALIGN) {
            break ChunkResult::Eof(ch.off + done as u64);
        }
        let want = ch.len - done;
        // SAFETY: `ch.dst .. ch.dst + ch.len` lies inside the request's destination, which the
        // submitter keeps valid and untouched until the request is collected; this thread is
        // the only writer of this chunk.
        let n = unsafe {
            libc::pread(
                ch.fd,
                ch.dst.add(done).cast(),
                want,
                (ch.off + done as u64) as libc::off_t,
            )
        };
        if n > 0 {
            done += n as usize;
            retries = 0;
        } else if n == 0 {
            break ChunkResult::Eof(ch.off + done as u64);
        } else {
            let errno = std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO);
            if (errno == libc::EINTR || errno == libc::EAGAIN) && retries < 1000 {
                retries += 1;
                continue;
            }
            break ChunkResult::Err {
                errno,
                offset: ch.off + done as u64,
            };
        }
    };
    if !ch.direct {
        drop_cache_fd(ch.fd, ch.off, ch.len as u64);
    }
    r
}

impl ReadBackend for PreadReader {
    fn info(&self) -> &ReaderInfo {
        &self.info
    }

    fn add_file(&mut self, path: &Path) -> Result<FileId, IoError> {
        let mut fallbacks = Vec::new();
        let opened = open_read(path, self.opts.direct, &self.opts.simulate, &mut fallbacks)?;
        self.info.fallbacks.extend(fallbacks);
        let mut g = self.shared.lock()?;
        if g.table.files.len() >= MAX_FILES {
            return Err(IoError::TooManyFiles(MAX_FILES));
        }
        g.table.files.push(FileEntry {
            opened,
            fixed: None,
        });
        Ok(FileId((g.table.files.len() - 1) as u16))
    }

    fn file_len(&self, file: FileId) -> Option<u64> {
        let g = self.shared.lock_always();
        g.table.files.get(file.0 as usize).map(|f| f.opened.len)
    }

    fn register_buffers(&mut self, _regions: &[(*mut u8, usize)]) -> Result<bool, IoError> {
        Ok(false)
    }

    unsafe fn submit(&mut self, req: ReadRequest) -> Result<Ticket, IoError> {
        submit_inner(&self.shared, &req, None, self.opts.queue_depth)
    }

    fn submit_owned(
        &mut self,
        file: FileId,
        file_offset: u64,
        len: usize,
        mut buf: AlignedBuf,
    ) -> Result<Ticket, IoError> {
        let req = ReadRequest::for_buf(file, file_offset, len, &mut buf);
        submit_inner(&self.shared, &req, Some(buf), self.opts.queue_depth)
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

fn submit_inner(
    sh: &Shared,
    req: &ReadRequest,
    owned: Option<AlignedBuf>,
    threads: usize,
) -> Result<Ticket, IoError> {
    let mut g = sh.lock()?;
    let t = g.table.insert(req, owned)?;
    let chunks = super::slot_len_for(req.file_offset, req.len).div_ceil(g.table.chunk_size());
    drop(g);
    if chunks >= threads {
        sh.work.notify_all();
    } else {
        for _ in 0..chunks {
            sh.work.notify_one();
        }
    }
    Ok(t)
}

impl Drop for PreadReader {
    fn drop(&mut self) {
        {
            let mut g = self.shared.lock_always();
            g.shutdown = true;
            g.table.cancel_pending();
        }
        self.shared.work.notify_all();
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
    }
}
