//! Fault injection, for tests: a [`ReadBackend`] wrapper that makes chosen reads of any
//! backend (the real pread and io_uring readers, or a test double) fail with EIO, end short,
//! complete late, or be refused at submission.
//!
//! Test support only: nothing in Hypura wraps a reader unless a test does, or the hidden
//! `HYPURA_FAULT` variable is set (read once, by the session that opens the model; see
//! [`FaultPlan::from_env`]).
//!
//! The inner read always runs and is always collected before the injected outcome is
//! reported, so no read is still writing into a destination its submitter has got back.
//! Injected failures look like the real ones: [`IoError::Eio`] and [`IoError::ShortRead`]
//! naming the file and the offset, reported when the ticket is collected; the bytes the
//! failed read did not deliver are overwritten with [`POISON`], so a consumer that uses them
//! anyway computes on garbage a test can see. A refused submission ([`Fault::Refuse`]) never
//! reaches the inner reader: `submit` fails at once, nothing is queued, as when the real
//! request table is full or the io_uring driver has failed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{
    AlignedBuf, Completion, FileId, IoError, ReadBackend, ReadRequest, ReaderInfo, Ticket,
};

/// What the bytes a failed read did not deliver are overwritten with.
pub const POISON: u8 = 0xEE;

/// Which reads a rule hits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// The n-th submitted read, counting from 1 (over `submit` and `submit_owned`).
    Nth(u64),
    /// Every read whose requested range holds this file offset (of any file).
    Offset(u64),
    /// Every read.
    All,
}

/// What happens to a read a rule hits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// EIO from the device, at the request's offset ([`Trigger::Offset`]: that offset).
    Eio,
    /// The read ends this many bytes early (at least one, at most the whole request), as
    /// when the file was truncated: [`IoError::ShortRead`].
    Short { missing: usize },
    /// The completion is not reported before this long after the submission; the bytes
    /// stay exact.
    Slow(Duration),
    /// `submit` fails (EBUSY, as `io_uring_enter` with a full completion queue) and queues
    /// nothing; the reads submitted before it stay in flight.
    Refuse,
}

/// The faults to inject: the first rule whose trigger matches a read decides its fate.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FaultPlan {
    pub rules: Vec<(Trigger, Fault)>,
}

impl FaultPlan {
    pub fn new() -> FaultPlan {
        FaultPlan::default()
    }

    pub fn with(mut self, trigger: Trigger, fault: Fault) -> FaultPlan {
        self.rules.push((trigger, fault));
        self
    }

    /// Parses `rule[,rule...]`, a rule being `FAULT@TRIGGER`: FAULT is `eio`, `short`
    /// (half the request missing), `short=BYTES`, `slow=MILLISECONDS` or `refuse` (the
    /// submission fails); TRIGGER is `N`
    /// (the N-th read, from 1), `off=OFFSET` or `all`. Example: `eio@40`, `slow=1500@all`.
    pub fn parse(s: &str) -> Result<FaultPlan, String> {
        let mut plan = FaultPlan::new();
        for rule in s.split(',').map(str::trim).filter(|r| !r.is_empty()) {
            let bad = || format!("bad fault rule `{rule}` (FAULT@TRIGGER, e.g. eio@40)");
            let (f, t) = rule.split_once('@').ok_or_else(bad)?;
            let num = |v: &str| v.trim().parse::<u64>().map_err(|_| bad());
            let fault = match f.trim().split_once('=') {
                None if f.trim() == "eio" => Fault::Eio,
                None if f.trim() == "short" => Fault::Short { missing: 0 },
                None if f.trim() == "refuse" => Fault::Refuse,
                Some(("short", v)) => Fault::Short {
                    missing: num(v)?.max(1) as usize,
                },
                Some(("slow", v)) => Fault::Slow(Duration::from_millis(num(v)?)),
                _ => return Err(bad()),
            };
            let trigger = match t.trim() {
                "all" => Trigger::All,
                t => match t.strip_prefix("off=") {
                    Some(o) => Trigger::Offset(num(o)?),
                    None => Trigger::Nth(num(t)?.max(1)),
                },
            };
            plan.rules.push((trigger, fault));
        }
        if plan.rules.is_empty() {
            return Err(format!("empty fault plan `{s}`"));
        }
        Ok(plan)
    }

    /// The plan in the hidden `HYPURA_FAULT` variable, if set (see [`parse`](Self::parse)).
    pub fn from_env() -> Result<Option<FaultPlan>, String> {
        match std::env::var("HYPURA_FAULT") {
            Ok(s) if !s.trim().is_empty() => FaultPlan::parse(&s)
                .map(Some)
                .map_err(|e| format!("HYPURA_FAULT: {e}")),
            _ => Ok(None),
        }
    }

    fn fault_for(&self, nth: u64, offset: u64, len: usize) -> Option<(Fault, u64)> {
        self.rules.iter().find_map(|&(t, f)| match t {
            Trigger::Nth(n) if n == nth => Some((f, offset)),
            Trigger::Offset(o) if (offset..offset + len as u64).contains(&o) => Some((f, o)),
            Trigger::All => Some((f, offset)),
            _ => None,
        })
    }
}

/// A read that a rule hit.
struct Pending {
    fault: Fault,
    file: FileId,
    /// The offset an EIO names.
    at: u64,
    /// When the completion may be reported (slow reads).
    due: Instant,
}

/// A reader that injects the faults of a [`FaultPlan`] into the reads of another.
pub struct FaultReader {
    inner: Box<dyn ReadBackend>,
    files: Vec<PathBuf>,
    plan: FaultPlan,
    submitted: u64,
    pending: HashMap<Ticket, Pending>,
    injected: Arc<AtomicUsize>,
}

impl FaultReader {
    /// Wraps `inner`, a reader of `path` (the name its errors give for `FileId(0)`).
    pub fn new(inner: Box<dyn ReadBackend>, path: &Path, plan: FaultPlan) -> FaultReader {
        FaultReader {
            inner,
            files: vec![path.to_path_buf()],
            plan,
            submitted: 0,
            pending: HashMap::new(),
            injected: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Counts the faults reported so far (slow completions included); stays readable after
    /// the reader has moved into the engine.
    pub fn injected(&self) -> Arc<AtomicUsize> {
        self.injected.clone()
    }

    fn path(&self, file: FileId) -> PathBuf {
        self.files
            .get(file.0 as usize)
            .cloned()
            .unwrap_or_else(|| PathBuf::from(format!("<file {}>", file.0)))
    }

    /// The error of a submission a [`Fault::Refuse`] rule hits (it counts as the next
    /// submitted read), or `None` to pass it on.
    fn refusal(&mut self, req: &ReadRequest) -> Option<IoError> {
        let nth = self.submitted + 1;
        let (_, at) = self
            .plan
            .fault_for(nth, req.file_offset, req.len)
            .filter(|(f, _)| *f == Fault::Refuse)?;
        self.submitted = nth;
        self.injected.fetch_add(1, Ordering::Relaxed);
        Some(IoError::Read {
            file: self.path(req.file),
            offset: at,
            source: std::io::Error::from_raw_os_error(libc::EBUSY),
        })
    }

    fn note(&mut self, t: Ticket, req: &ReadRequest) {
        self.submitted += 1;
        if let Some((fault, at)) = self
            .plan
            .fault_for(self.submitted, req.file_offset, req.len)
        {
            let delay = match fault {
                Fault::Slow(d) => d,
                _ => Duration::ZERO,
            };
            let p = Pending {
                fault,
                file: req.file,
                at,
                due: Instant::now() + delay,
            };
            self.pending.insert(t, p);
        }
    }

    /// Applies the fault (if any) of `t` to its collected inner completion.
    fn finish(&mut self, t: Ticket, c: Completion) -> Result<Completion, IoError> {
        let Some(p) = self.pending.remove(&t) else {
            return Ok(c);
        };
        self.injected.fetch_add(1, Ordering::Relaxed);
        let (keep, err) = match p.fault {
            Fault::Slow(_) | Fault::Refuse => return Ok(c),
            Fault::Eio => (
                0,
                IoError::Eio {
                    file: self.path(p.file),
                    offset: p.at,
                },
            ),
            Fault::Short { missing } => {
                let missing = if missing == 0 {
                    c.len.div_ceil(2)
                } else {
                    missing
                };
                let got = c.len.saturating_sub(missing);
                let e = IoError::ShortRead {
                    file: self.path(p.file),
                    offset: c.file_offset,
                    expected: c.len,
                    got,
                };
                (got, e)
            }
        };
        if keep < c.len {
            // SAFETY: `c.data .. c.data + c.len` are the requested bytes inside the request's
            // destination, which its submitter keeps valid and untouched until the ticket is
            // collected (the `submit` contract) — it is not yet, we report it below — and
            // whose read the inner reader has finished (`c` was collected from it).
            unsafe { std::ptr::write_bytes(c.data.add(keep), POISON, c.len - keep) };
        }
        Err(err)
    }
}

impl ReadBackend for FaultReader {
    fn info(&self) -> &ReaderInfo {
        self.inner.info()
    }

    fn add_file(&mut self, path: &Path) -> Result<FileId, IoError> {
        let id = self.inner.add_file(path)?;
        let i = id.0 as usize;
        if self.files.len() <= i {
            self.files.resize(i + 1, PathBuf::new());
        }
        self.files[i] = path.to_path_buf();
        Ok(id)
    }

    fn file_len(&self, file: FileId) -> Option<u64> {
        self.inner.file_len(file)
    }

    fn register_buffers(&mut self, regions: &[(*mut u8, usize)]) -> Result<bool, IoError> {
        self.inner.register_buffers(regions)
    }

    unsafe fn submit(&mut self, req: ReadRequest) -> Result<Ticket, IoError> {
        if let Some(e) = self.refusal(&req) {
            return Err(e);
        }
        // SAFETY: the caller's contract is passed on unchanged.
        let t = unsafe { self.inner.submit(req)? };
        self.note(t, &req);
        Ok(t)
    }

    fn submit_owned(
        &mut self,
        file: FileId,
        file_offset: u64,
        len: usize,
        buf: AlignedBuf,
    ) -> Result<Ticket, IoError> {
        let req = ReadRequest {
            file,
            file_offset,
            len,
            dst: std::ptr::null_mut(),
            dst_cap: 0,
        };
        if let Some(e) = self.refusal(&req) {
            return Err(e);
        }
        let t = self.inner.submit_owned(file, file_offset, len, buf)?;
        self.note(t, &req);
        Ok(t)
    }

    fn wait(&mut self, ticket: Ticket) -> Result<Completion, IoError> {
        if let Some(p) = self.pending.get(&ticket) {
            let now = Instant::now();
            if p.due > now {
                std::thread::sleep(p.due - now);
            }
        }
        match self.inner.wait(ticket) {
            Ok(c) => self.finish(ticket, c),
            Err(e) => {
                self.pending.remove(&ticket);
                Err(e)
            }
        }
    }

    fn try_wait(&mut self, ticket: Ticket) -> Result<Option<Completion>, IoError> {
        if self
            .pending
            .get(&ticket)
            .is_some_and(|p| p.due > Instant::now())
        {
            return Ok(None);
        }
        match self.inner.try_wait(ticket) {
            Ok(Some(c)) => self.finish(ticket, c).map(Some),
            Ok(None) => Ok(None),
            Err(e) => {
                self.pending.remove(&ticket);
                Err(e)
            }
        }
    }

    fn outstanding(&self) -> usize {
        self.inner.outstanding()
    }
}

#[cfg(test)]
mod tests;
