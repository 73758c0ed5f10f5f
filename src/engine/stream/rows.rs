//! Token embeddings read by rows (the plan's `embd_rows`, see
//! `scheduler/plan/rows.rs`): the tensor's data points into address space
//! laid out like its file range (memory ≡ file offset mod 4096, so an
//! aligned read lands in place), and before a `get_rows` node runs, the
//! pages of the rows its token ids select are read if they are not there.
//! A bitmap marks the pages read; when a batch would take the cache past its
//! capacity, its pages are dropped (`MADV_DONTNEED`) and the map cleared.
//!
//! A node that reads the embeddings other than by rows (no architecture
//! Hypura plans for does) gets the whole tensor read once, and the rows stay
//! from then on: the output is right, the RAM is the resident one's.

use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use hypura_sys as sys;

use super::memory::Mapping;
use super::metrics::StreamMetrics;
use crate::io::{slot_len_for, slot_offset_for, FileId, ReadBackend, ReadRequest, Ticket, ALIGN};
use crate::scheduler::EmbdRows;

/// Requests in flight at once while reading a batch's rows.
const MAX_IN_FLIGHT: usize = 256;

pub(super) struct RowStore {
    tensor: *mut sys::ggml_tensor,
    mem: Mapping,
    /// File offset of the mapping's first byte (the tensor's, rounded down).
    file_base: u64,
    /// The tensor's bytes in the file.
    file_start: u64,
    file_end: u64,
    n_rows: u64,
    row_bytes: u64,
    /// One bit per page of `mem`: read.
    loaded: Vec<u64>,
    loaded_pages: usize,
    cap_pages: usize,
    /// All rows are read (a node read the tensor whole): never dropped.
    whole: bool,
    /// Scratch: pages to read for the current batch (grows once to the
    /// largest batch), and the tickets of one round of reads.
    want: Vec<u32>,
    tickets: Vec<Ticket>,
}

impl RowStore {
    /// Takes over `tensor` (the plan's `rows`, as llama.cpp placed it in the
    /// streaming buffer): from now on its data points into the row store.
    ///
    /// # Safety
    /// `tensor` must be a live `ggml_tensor` of `rows.size` bytes that
    /// outlives the store, and the caller must put its data back before the
    /// store is dropped (the engine's `restore`).
    pub unsafe fn new(
        rows: &EmbdRows,
        tensor: *mut sys::ggml_tensor,
        nbytes: usize,
    ) -> Result<RowStore> {
        if nbytes as u64 != rows.size {
            bail!(
                "'{}': llama.cpp has {nbytes} bytes, the file {}",
                rows.name,
                rows.size
            );
        }
        // SAFETY: a live tensor (the caller's contract).
        let (nb1, ne1) = unsafe { ((*tensor).nb[1] as u64, (*tensor).ne[1] as u64) };
        if nb1 != rows.row_bytes || ne1 != rows.n_rows {
            bail!(
                "'{}': llama.cpp has {ne1} rows of {nb1} bytes, the plan {} of {}",
                rows.name,
                rows.n_rows,
                rows.row_bytes
            );
        }
        let size = usize::try_from(rows.size).context("embeddings too large")?;
        let len = slot_len_for(rows.file_offset, size);
        let mem = Mapping::read_write(len, true)?;
        let pages = mem.len() / ALIGN;
        let cap_pages = (rows.cache_bytes as usize / ALIGN).max(1);
        // SAFETY: the mapping holds `len` ≥ offset + size bytes; the tensor is
        // live and nothing computes on it yet (set before any graph runs).
        unsafe {
            (*tensor).data = mem.base().add(slot_offset_for(rows.file_offset)).cast();
        }
        Ok(RowStore {
            tensor,
            mem,
            file_base: rows.file_offset - slot_offset_for(rows.file_offset) as u64,
            file_start: rows.file_offset,
            file_end: rows.file_offset + rows.size,
            n_rows: rows.n_rows,
            row_bytes: rows.row_bytes,
            loaded: vec![0; pages.div_ceil(64)],
            loaded_pages: 0,
            cap_pages,
            whole: false,
            want: Vec::new(),
            tickets: Vec::with_capacity(MAX_IN_FLIGHT),
        })
    }

    /// Before node `t` runs (ask=true): reads the rows it needs if it reads
    /// the embeddings. Cheap for every other node.
    pub fn before_node(
        &mut self,
        t: *mut sys::ggml_tensor,
        io: &mut dyn ReadBackend,
        m: &mut StreamMetrics,
    ) -> Result<()> {
        // SAFETY: ggml passes a live node; its sources are live or null.
        let (op, srcs, flags) = unsafe { ((*t).op, (*t).src, (*t).flags) };
        // A branch the graph does not compute (llama.cpp builds the token,
        // embedding and mixed inputs and selects one): its ids are not set.
        let computed = flags & sys::GGML_TENSOR_FLAG_COMPUTE as i32 != 0;
        if !computed || !srcs.contains(&self.tensor) || self.whole {
            return Ok(());
        }
        if op == sys::GGML_OP_GET_ROWS && srcs[0] == self.tensor && !srcs[1].is_null() {
            if let Err(e) = self.want_rows(srcs[1]) {
                // Some pages were marked and will not be read: start over.
                self.drop_all();
                return Err(e);
            }
        } else {
            self.want_all();
        }
        self.read_wanted(io, m)
    }

    /// Pages of the rows `ids` selects (an I32 tensor on the host) that are
    /// not read yet, into `want`; empties the cache first if they would not
    /// fit in it.
    fn want_rows(&mut self, ids: *mut sys::ggml_tensor) -> Result<()> {
        // SAFETY: a live source tensor of the node; its buffer is valid or null.
        let (ty, ne, nb, data, host) = unsafe {
            let i = &*ids;
            (
                i.type_,
                i.ne,
                i.nb,
                i.data as *const u8,
                i.buffer.is_null() || sys::ggml_backend_buffer_is_host(i.buffer),
            )
        };
        if ty != sys::GGML_TYPE_I32 || !host || data.is_null() {
            // Not ids this store can read: read the tensor whole.
            self.want_all();
            return Ok(());
        }
        let (n0, n1) = (ne[0].max(0) as usize, ne[1].max(0) as usize);
        let worst = n0.saturating_mul(n1).saturating_mul(self.pages_per_row());
        if self.loaded_pages.saturating_add(worst) > self.cap_pages {
            self.drop_all();
        }
        self.want.clear();
        for j in 0..n1 {
            for i in 0..n0 {
                // SAFETY: i < ne[0], j < ne[1]: inside the ids tensor, whose
                // rows are nb[1] apart and elements nb[0] apart.
                let id = unsafe { *(data.add(j * nb[1] + i * nb[0]) as *const i32) };
                if id < 0 || id as u64 >= self.n_rows {
                    bail!(
                        "token id {id} is outside the vocabulary (0..{})",
                        self.n_rows
                    );
                }
                let start = self.file_start + id as u64 * self.row_bytes - self.file_base;
                let end = start + self.row_bytes;
                let (p0, p1) = (start as usize / ALIGN, (end as usize - 1) / ALIGN);
                for p in p0..=p1 {
                    if !self.is_loaded(p) {
                        self.mark(p);
                        self.want.push(p as u32);
                    }
                }
            }
        }
        Ok(())
    }

    /// Every page not read yet, into `want` (and the store keeps them).
    fn want_all(&mut self) {
        self.whole = true;
        self.want.clear();
        for p in 0..self.mem.len() / ALIGN {
            if !self.is_loaded(p) {
                self.mark(p);
                self.want.push(p as u32);
            }
        }
    }

    /// Reads the pages in `want`, adjacent ones in one request, at most
    /// [`MAX_IN_FLIGHT`] requests at a time.
    fn read_wanted(&mut self, io: &mut dyn ReadBackend, m: &mut StreamMetrics) -> Result<()> {
        if self.want.is_empty() {
            return Ok(());
        }
        let t0 = Instant::now();
        self.want.sort_unstable();
        let mut i = 0;
        let mut result = Ok(());
        while i < self.want.len() && result.is_ok() {
            self.tickets.clear();
            while i < self.want.len() && self.tickets.len() < MAX_IN_FLIGHT {
                let first = self.want[i] as usize;
                let mut last = first;
                while i + 1 < self.want.len() && self.want[i + 1] as usize == last + 1 {
                    i += 1;
                    last += 1;
                }
                i += 1;
                // The pages' bytes that belong to the tensor (its first and
                // last pages are shared with its neighbours in the file).
                let from = (self.file_base + (first * ALIGN) as u64).max(self.file_start);
                let to = (self.file_base + ((last + 1) * ALIGN) as u64).min(self.file_end);
                let len = (to - from) as usize;
                let req = ReadRequest {
                    file: FileId(0),
                    file_offset: from,
                    len,
                    // SAFETY (in bounds): page `first` lies in the mapping.
                    dst: unsafe { self.mem.base().add(first * ALIGN) },
                    dst_cap: slot_len_for(from, len),
                };
                // SAFETY: pages first..=last of the mapping, which no other
                // request targets (each page is wanted once) and nothing
                // reads until the ticket is collected below.
                match unsafe { io.submit(req) } {
                    Ok(t) => {
                        self.tickets.push(t);
                        m.reads += 1;
                        m.bytes_read += req.dst_cap as u64;
                    }
                    Err(e) => {
                        result = Err(e).context("reading token embedding rows");
                        break;
                    }
                }
            }
            if let Err(e) = io.wait_all(&self.tickets) {
                result = Err(e).context("reading token embedding rows");
            }
        }
        self.tickets.clear();
        let waited = t0.elapsed().as_nanos() as u64;
        m.stall_ns += waited;
        m.io_busy_ns += waited;
        if result.is_err() {
            // Pages of a failed batch are not trusted: start over.
            self.whole = false;
            self.drop_all();
        }
        self.want.clear();
        result
    }

    fn pages_per_row(&self) -> usize {
        (self.row_bytes as usize).div_ceil(ALIGN) + 1
    }

    fn is_loaded(&self, p: usize) -> bool {
        self.loaded[p / 64] & (1 << (p % 64)) != 0
    }

    fn mark(&mut self, p: usize) {
        self.loaded[p / 64] |= 1 << (p % 64);
        self.loaded_pages += 1;
    }

    /// Gives every page back to the kernel and forgets them.
    fn drop_all(&mut self) {
        self.mem.discard();
        self.loaded.iter_mut().for_each(|w| *w = 0);
        self.loaded_pages = 0;
    }

    /// Pages held now (for tests).
    #[cfg(test)]
    pub fn loaded_pages(&self) -> usize {
        self.loaded_pages
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::stream::fake::{file_bytes, Complete, FakeReader, FakeTensors};

    /// Rows of 1000 bytes (they straddle pages) from an unaligned offset.
    const ROW: u64 = 1000;
    const N_ROWS: u64 = 300;
    const OFF: u64 = 3 * 4096 + 32;

    struct Case {
        nodes: FakeTensors,
        embd: *mut sys::ggml_tensor,
        store: RowStore,
        io: FakeReader,
        file: Vec<u8>,
    }

    fn case(cache_bytes: u64) -> Case {
        let mut nodes = FakeTensors::new();
        let size = (ROW * N_ROWS) as usize;
        let embd = nodes.add("token_embd.weight", size);
        // SAFETY: a fake tensor of ours: rows of ROW bytes.
        unsafe {
            (*embd).ne = [ROW as i64, N_ROWS as i64, 1, 1];
            (*embd).nb = [1, ROW as usize, size, size];
        }
        let rows = EmbdRows {
            name: "token_embd.weight".into(),
            file_offset: OFF,
            size: size as u64,
            n_rows: N_ROWS,
            row_bytes: ROW,
            cache_bytes,
        };
        let file = file_bytes(OFF as usize + size + 4096);
        // SAFETY: the fake tensor lives as long as the case; the store never
        // touches it when dropped (nothing computes on it afterwards).
        let store = unsafe { RowStore::new(&rows, embd, size) }.unwrap();
        let io = FakeReader::new(file.clone(), Complete::WhenCollected { polls: 0 });
        Case {
            nodes,
            embd,
            store,
            io,
            file,
        }
    }

    impl Case {
        fn get_rows(&mut self, ids: &[i32]) -> *mut sys::ggml_tensor {
            let ids = self.nodes.topk("inp_tokens", ids.len(), ids);
            let n = self.nodes.node("inp_embd", &[self.embd, ids]);
            // SAFETY: a fake node of ours.
            unsafe {
                (*n).op = sys::GGML_OP_GET_ROWS;
                (*n).flags = sys::GGML_TENSOR_FLAG_COMPUTE as i32;
            }
            n
        }

        fn run(&mut self, node: *mut sys::ggml_tensor) -> Result<StreamMetrics> {
            let mut m = StreamMetrics::default();
            self.store.before_node(node, &mut self.io, &mut m)?;
            Ok(m)
        }

        /// Row `id` as the tensor holds it now, and as the file does.
        fn row(&self, id: u64) -> (&[u8], &[u8]) {
            // SAFETY: the tensor's data points at the store's mapping, which
            // holds all N_ROWS rows.
            let got = unsafe {
                std::slice::from_raw_parts(
                    ((*self.embd).data as *const u8).add((id * ROW) as usize),
                    ROW as usize,
                )
            };
            let at = (OFF + id * ROW) as usize;
            (got, &self.file[at..at + ROW as usize])
        }
    }

    #[test]
    fn a_batch_reads_the_pages_of_its_rows_once_and_together() {
        let mut c = case(1 << 20);
        let n = c.get_rows(&[0, 5, 5, 299, 6]);
        let m = c.run(n).unwrap();
        for id in [0, 5, 6, 299] {
            let (got, want) = c.row(id);
            assert_eq!(got, want, "row {id}");
        }
        // Rows start at byte 32 of the mapping: row 0 is in page 0, rows 5
        // and 6 in page 1 (adjacent: one read for pages 0-1), row 299 in
        // page 73.
        assert_eq!(m.reads, 2, "{:?}", FakeReader::submitted(&c.io.log));
        assert_eq!(c.store.loaded_pages(), 3);
        // The same rows again: nothing to read.
        let n = c.get_rows(&[6, 0]);
        assert_eq!(c.run(n).unwrap().reads, 0);
        // A branch the graph does not compute (its ids are not set): skipped.
        let n = c.get_rows(&[-7, 1_000_000]);
        // SAFETY: a fake node of ours.
        unsafe { (*n).flags = 0 };
        assert_eq!(c.run(n).unwrap().reads, 0);
        // A node that does not read the embeddings reads nothing.
        let other = c.nodes.node("attn_norm-0", &[n]);
        assert_eq!(c.run(other).unwrap().reads, 0);
    }

    #[test]
    fn a_batch_that_would_overflow_the_cache_empties_it_first() {
        // Room for 8 pages; a row may take two.
        let mut c = case(8 * 4096);
        let n = c.get_rows(&[0]);
        c.run(n).unwrap();
        assert_eq!(c.store.loaded_pages(), 1);
        let n = c.get_rows(&[100, 101, 102, 103]);
        c.run(n).unwrap();
        // 1 + 4 × 2 > 8: emptied, then the four rows (two pages' worth).
        assert_eq!(c.store.loaded_pages(), 2);
        for id in 100..104 {
            let (got, want) = c.row(id);
            assert_eq!(got, want, "row {id}");
        }
        let (got, _) = c.row(0);
        assert!(got.iter().all(|&b| b == 0), "row 0 was given back");
        // Asked again, row 0 is read again.
        let n = c.get_rows(&[0]);
        assert_eq!(c.run(n).unwrap().reads, 1);
        let (got, want) = c.row(0);
        assert_eq!(got, want);
    }

    #[test]
    fn an_id_outside_the_vocabulary_is_an_error_and_leaves_nothing_marked() {
        let mut c = case(1 << 20);
        let n = c.get_rows(&[3, 300]);
        let e = c.run(n).unwrap_err();
        assert!(format!("{e:#}").contains("token id 300"), "{e:#}");
        assert_eq!(c.store.loaded_pages(), 0);
        let n = c.get_rows(&[3]);
        c.run(n).unwrap();
        let (got, want) = c.row(3);
        assert_eq!(got, want);
    }

    #[test]
    fn a_node_that_reads_the_tensor_otherwise_gets_it_whole() {
        let mut c = case(8 * 4096);
        let n = c.nodes.node("result_output", &[c.embd]);
        // SAFETY: a fake node of ours.
        unsafe {
            (*n).op = sys::GGML_OP_MUL_MAT;
            (*n).flags = sys::GGML_TENSOR_FLAG_COMPUTE as i32;
        }
        c.run(n).unwrap();
        for id in 0..N_ROWS {
            let (got, want) = c.row(id);
            assert_eq!(got, want, "row {id}");
        }
        // Whole from then on: a batch of rows neither reads nor drops.
        let n = c.get_rows(&[1, 2, 3, 4, 5, 6, 7, 8, 9]);
        assert_eq!(c.run(n).unwrap().reads, 0);
        let (got, want) = c.row(299);
        assert_eq!(got, want);
    }

    #[test]
    fn a_failed_read_is_an_error_and_the_rows_are_read_again_next_time() {
        let mut c = case(1 << 20);
        // Row 7 is in page 1 of the mapping: file bytes from 4 × 4096.
        c.io.fail_offset = Some(4 * 4096);
        let n = c.get_rows(&[7]);
        assert!(c.run(n).is_err());
        assert_eq!(c.store.loaded_pages(), 0);
        c.io.fail_offset = None;
        let n = c.get_rows(&[7]);
        c.run(n).unwrap();
        let (got, want) = c.row(7);
        assert_eq!(got, want);
    }
}
