//! Test doubles for the streaming engine: a [`ReadBackend`] that serves reads
//! from an in-memory "file" (completing them at once, only when collected, or
//! out of order), and `ggml_tensor`s that stand in for a model's.

use std::ffi::c_void;
use std::path::Path;
use std::sync::{Arc, Mutex};

use hypura_sys as sys;

use super::TensorSpec;
use crate::engine::stream_buft::ReportedTensor;
use crate::gguf::TensorRole;
use crate::io::{
    aligned_range, slot_len_for, slot_offset_for, AlignedBuf, BackendKind, Completion, FileId,
    IoError, ReadBackend, ReadRequest, ReaderInfo, Ticket, ALIGN,
};
use crate::scheduler::StreamedTensor;

/// Byte `i` of the fake file: varied enough that a read of the wrong range,
/// or a copy off by a few bytes, never matches.
pub fn file_byte(i: u64) -> u8 {
    let x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (x >> 56) as u8 ^ (i as u8)
}

pub fn file_bytes(len: usize) -> Vec<u8> {
    (0..len as u64).map(file_byte).collect()
}

/// When the fake writes a request's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Complete {
    /// At once, in `submit`.
    AtSubmit,
    /// Only when the ticket is collected; `try_wait` first answers "not yet"
    /// this many times per ticket.
    WhenCollected { polls: u32 },
    /// When any ticket is collected, every request in flight completes,
    /// newest first (out of submission order); `try_wait` answers "not yet"
    /// once per ticket.
    Reversed,
}

struct InFlight {
    ticket: Ticket,
    req: ReadRequest,
    written: bool,
    polls: u32,
    owned: Option<AlignedBuf>,
}

/// A reader of an in-memory file; `log` records every submission
/// `(file offset, len)` and stays readable after the reader has moved into
/// the engine.
pub struct FakeReader {
    file: Vec<u8>,
    info: ReaderInfo,
    complete: Complete,
    next_gen: u32,
    in_flight: Vec<InFlight>,
    pub log: Arc<Mutex<Vec<(u64, usize)>>>,
    /// Reads of this file offset fail with EIO when collected.
    pub fail_offset: Option<u64>,
    /// Most requests in flight at once so far.
    pub peak_in_flight: usize,
}

// SAFETY: the raw destinations in `in_flight` are written only from the
// thread that owns the reader (`&mut self` methods), like a real backend's
// requests; nothing else is shared.
unsafe impl Send for FakeReader {}

impl FakeReader {
    pub fn new(file: Vec<u8>, complete: Complete) -> FakeReader {
        FakeReader {
            file,
            info: ReaderInfo {
                backend: BackendKind::Pread,
                direct: false,
                queue_depth: 1,
                chunk_size: 1 << 20,
                max_requests: 1 << 16,
                fixed_files: false,
                fixed_buffers: false,
                fallbacks: Vec::new(),
            },
            complete,
            next_gen: 0,
            in_flight: Vec::new(),
            log: Arc::new(Mutex::new(Vec::new())),
            fail_offset: None,
            peak_in_flight: 0,
        }
    }

    /// Submissions so far.
    pub fn submitted(log: &Arc<Mutex<Vec<(u64, usize)>>>) -> Vec<(u64, usize)> {
        log.lock().unwrap().clone()
    }

    /// Writes the aligned superset of request `i`, as a direct read does.
    fn write(&mut self, i: usize) {
        let f = &mut self.in_flight[i];
        if f.written {
            return;
        }
        let (start, end) = aligned_range(f.req.file_offset, f.req.len);
        for (k, pos) in (start..end).enumerate() {
            let b = self.file.get(pos as usize).copied().unwrap_or(0);
            // SAFETY: `submit` checked dst_cap >= the aligned length, and the
            // submitter keeps the range valid until the ticket is collected.
            unsafe { *f.req.dst.add(k) = b };
        }
        f.written = true;
    }

    fn collect(&mut self, i: usize) -> Result<Completion, IoError> {
        if self.complete == Complete::Reversed {
            for j in (0..self.in_flight.len()).rev() {
                self.write(j);
            }
        }
        self.write(i);
        let f = self.in_flight.remove(i);
        if self.fail_offset == Some(f.req.file_offset) {
            return Err(IoError::Eio {
                file: "fake.gguf".into(),
                offset: f.req.file_offset,
            });
        }
        let data_offset = slot_offset_for(f.req.file_offset);
        Ok(Completion {
            ticket: f.ticket,
            file: f.req.file,
            file_offset: f.req.file_offset,
            len: f.req.len,
            data: f.req.dst.wrapping_add(data_offset),
            data_offset,
            buf: f.owned,
        })
    }

    fn find(&self, t: Ticket) -> Result<usize, IoError> {
        self.in_flight
            .iter()
            .position(|f| f.ticket == t)
            .ok_or(IoError::BadTicket)
    }
}

impl ReadBackend for FakeReader {
    fn info(&self) -> &ReaderInfo {
        &self.info
    }

    fn add_file(&mut self, _path: &Path) -> Result<FileId, IoError> {
        Err(IoError::InvalidRequest("the fake reader has one file"))
    }

    fn file_len(&self, file: FileId) -> Option<u64> {
        (file == FileId(0)).then_some(self.file.len() as u64)
    }

    fn register_buffers(&mut self, _regions: &[(*mut u8, usize)]) -> Result<bool, IoError> {
        Ok(false)
    }

    unsafe fn submit(&mut self, req: ReadRequest) -> Result<Ticket, IoError> {
        if req.file != FileId(0) {
            return Err(IoError::InvalidRequest("unknown file"));
        }
        if !(req.dst as usize).is_multiple_of(ALIGN) {
            return Err(IoError::InvalidRequest("destination not 4096-aligned"));
        }
        if req.dst_cap < slot_len_for(req.file_offset, req.len) {
            return Err(IoError::InvalidRequest("destination too small"));
        }
        self.next_gen += 1;
        let ticket = Ticket {
            slot: self.in_flight.len() as u32,
            gen: self.next_gen,
        };
        self.log.lock().unwrap().push((req.file_offset, req.len));
        let polls = match self.complete {
            Complete::AtSubmit => 0,
            Complete::WhenCollected { polls } => polls,
            Complete::Reversed => 1,
        };
        self.in_flight.push(InFlight {
            ticket,
            req,
            written: false,
            polls,
            owned: None,
        });
        self.peak_in_flight = self.peak_in_flight.max(self.in_flight.len());
        if self.complete == Complete::AtSubmit {
            self.write(self.in_flight.len() - 1);
        }
        Ok(ticket)
    }

    fn submit_owned(
        &mut self,
        file: FileId,
        file_offset: u64,
        len: usize,
        mut buf: AlignedBuf,
    ) -> Result<Ticket, IoError> {
        let req = ReadRequest::for_buf(file, file_offset, len, &mut buf);
        // SAFETY: the buffer's mapping stays put when `buf` moves; it is kept
        // with the request and handed back in its completion.
        let t = unsafe { self.submit(req)? };
        let i = self.find(t)?;
        self.in_flight[i].owned = Some(buf);
        Ok(t)
    }

    fn wait(&mut self, ticket: Ticket) -> Result<Completion, IoError> {
        let i = self.find(ticket)?;
        self.collect(i)
    }

    fn try_wait(&mut self, ticket: Ticket) -> Result<Option<Completion>, IoError> {
        let i = self.find(ticket)?;
        let f = &mut self.in_flight[i];
        if f.polls > 0 {
            f.polls -= 1;
            return Ok(None);
        }
        self.collect(i).map(Some)
    }

    fn outstanding(&self) -> usize {
        self.in_flight.len()
    }
}

/// Fake `ggml_tensor`s at stable addresses, each with its own zeroed
/// "reserved" memory as `data` (as the Hypura buffer type places them). All
/// of it is reached through raw pointers only (the engine writes the tensors
/// behind our back), and freed on drop.
pub struct FakeTensors {
    tensors: Vec<*mut sys::ggml_tensor>,
    memory: Vec<*mut [u8]>,
    ids: Vec<*mut [i32]>,
}

impl Drop for FakeTensors {
    fn drop(&mut self) {
        // SAFETY: each pointer came from `Box::into_raw` and is freed once.
        unsafe {
            for &t in &self.tensors {
                drop(Box::from_raw(t));
            }
            for &m in &self.memory {
                drop(Box::from_raw(m));
            }
            for &v in &self.ids {
                drop(Box::from_raw(v));
            }
        }
    }
}

impl FakeTensors {
    pub fn new() -> FakeTensors {
        FakeTensors {
            tensors: Vec::new(),
            memory: Vec::new(),
            ids: Vec::new(),
        }
    }

    fn push(&mut self, name: &str) -> *mut sys::ggml_tensor {
        // SAFETY: ggml_tensor is plain data; all-zero is a valid empty tensor.
        let t = Box::into_raw(Box::new(unsafe { std::mem::zeroed::<sys::ggml_tensor>() }));
        self.tensors.push(t);
        assert!(name.len() < 64);
        for (i, &b) in name.as_bytes().iter().enumerate() {
            // SAFETY: just made; i < 63 (the name stays NUL-terminated).
            unsafe { (*t).name[i] = b as std::os::raw::c_char };
        }
        t
    }

    /// A 1-D I8 tensor of `size` bytes.
    pub fn add(&mut self, name: &str, size: usize) -> *mut sys::ggml_tensor {
        let mem = Box::into_raw(vec![0u8; size.max(1)].into_boxed_slice());
        self.memory.push(mem);
        let t = self.push(name);
        // SAFETY: just made.
        unsafe {
            (*t).type_ = sys::GGML_TYPE_I8;
            (*t).ne = [size as i64, 1, 1, 1];
            (*t).nb = [1, size, size, size];
            (*t).data = mem.cast::<c_void>();
        }
        t
    }

    /// A node named `name` that reads `srcs`.
    pub fn node(&mut self, name: &str, srcs: &[*mut sys::ggml_tensor]) -> *mut sys::ggml_tensor {
        let t = self.add(name, 4);
        for (i, &src) in srcs.iter().enumerate() {
            // SAFETY: just made; a node has up to 10 sources.
            unsafe { (*t).src[i] = src };
        }
        t
    }

    /// A router top-k node: `k` I32 ids per token, rows of `ids`.
    pub fn topk(&mut self, name: &str, k: usize, ids: &[i32]) -> *mut sys::ggml_tensor {
        assert_eq!(ids.len() % k, 0);
        let v = Box::into_raw(Box::<[i32]>::from(ids));
        self.ids.push(v);
        let t = self.push(name);
        // SAFETY: just made.
        unsafe {
            (*t).type_ = sys::GGML_TYPE_I32;
            (*t).ne = [k as i64, (ids.len() / k) as i64, 1, 1];
            (*t).nb = [4, 4 * k, ids.len() * 4, ids.len() * 4];
            (*t).data = v.cast::<c_void>();
        }
        t
    }

    /// Replaces the ids of a top-k node made by [`topk`](Self::topk) (same count).
    pub fn set_ids(&mut self, t: *mut sys::ggml_tensor, ids: &[i32]) {
        // SAFETY: a tensor of ours; its data is one of `self.ids`.
        let data = unsafe { (*t).data }.cast::<i32>();
        let v = *self
            .ids
            .iter()
            .find(|v| v.cast::<i32>() == data)
            .expect("a top-k node of ours");
        assert_eq!(v.len(), ids.len());
        // SAFETY: `v` is live and holds ids.len() values.
        unsafe { std::ptr::copy_nonoverlapping(ids.as_ptr(), v.cast::<i32>(), ids.len()) };
    }
}

/// The bytes a tensor's data points at.
///
/// # Safety
/// `t` must be live and its data readable for `len` bytes.
pub unsafe fn bytes_at<'a>(t: *const sys::ggml_tensor, off: usize, len: usize) -> &'a [u8] {
    // SAFETY: per the caller.
    unsafe { std::slice::from_raw_parts((*t).data.cast::<u8>().add(off), len) }
}

/// A fake model's streamed tensors and its file.
pub struct FakeModel {
    pub tensors: FakeTensors,
    pub specs: Vec<TensorSpec>,
    pub names: Vec<String>,
    pub file: Vec<u8>,
    pub n_layer: usize,
}

impl FakeModel {
    /// `layers[i]`: the tensor sizes of layer i (none: the layer does not
    /// stream); with `n_experts` > 1 the sizes are per expert. Tensors are
    /// 32-byte aligned in the file, at varied offsets mod 4096.
    pub fn new(layers: &[&[usize]], n_experts: usize) -> FakeModel {
        let mut tensors = FakeTensors::new();
        let mut specs = Vec::new();
        let mut names = Vec::new();
        let mut cursor = 3 * ALIGN as u64 + 160;
        for (layer, sizes) in layers.iter().enumerate() {
            for (j, &size) in sizes.iter().enumerate() {
                let size = size * n_experts;
                let name = format!("blk.{layer}.t{j}");
                let tensor = tensors.add(&name, size);
                specs.push(TensorSpec {
                    layer,
                    tensor,
                    // SAFETY: just made.
                    reserved: unsafe { (*tensor).data },
                    file_offset: cursor,
                    size,
                    n_experts,
                });
                names.push(name);
                cursor = (cursor + size as u64 + 1000 + 96 * j as u64).next_multiple_of(32);
            }
        }
        FakeModel {
            tensors,
            specs,
            names,
            file: file_bytes(cursor as usize + ALIGN),
            n_layer: layers.len(),
        }
    }

    /// The host slot size the plan would give: the largest layer's aligned reads.
    pub fn slot_bytes(&self) -> usize {
        (0..self.n_layer)
            .map(|l| {
                self.specs
                    .iter()
                    .filter(|t| t.layer == l)
                    .map(|t| slot_len_for(t.file_offset, t.size))
                    .sum::<usize>()
            })
            .max()
            .unwrap_or(0)
    }

    pub fn reader(&self, complete: Complete) -> FakeReader {
        FakeReader::new(self.file.clone(), complete)
    }

    /// The file's bytes of `[off, off + len)`.
    pub fn bytes(&self, off: u64, len: usize) -> &[u8] {
        &self.file[off as usize..off as usize + len]
    }

    /// The spec a file offset belongs to (a tensor's start, or inside it).
    pub fn spec_at(&self, off: u64) -> &TensorSpec {
        self.specs
            .iter()
            .find(|t| (t.file_offset..t.file_offset + t.size as u64).contains(&off))
            .expect("an offset inside a tensor")
    }

    /// The tensors as the Hypura buffer type reports them.
    pub fn reported(&self) -> Vec<ReportedTensor> {
        self.specs
            .iter()
            .zip(&self.names)
            .map(|(t, name)| ReportedTensor {
                name: name.clone(),
                tensor: t.tensor,
                data: t.reserved,
                nbytes: t.size,
            })
            .collect()
    }

    /// The tensors as the plan lists them.
    pub fn streamed(&self) -> Vec<StreamedTensor> {
        self.specs
            .iter()
            .zip(&self.names)
            .map(|(t, name)| StreamedTensor {
                name: name.clone(),
                layer: t.layer as u32,
                role: if t.n_experts > 1 {
                    TensorRole::FfnUpExps
                } else {
                    TensorRole::FfnUp
                },
                file_offset: t.file_offset,
                size: t.size as u64,
                n_experts: (t.n_experts > 1).then_some(t.n_experts as u64),
            })
            .collect()
    }
}
