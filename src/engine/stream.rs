//! The streaming engine: streamed tensors live in Hypura's buffer type, their
//! `data` points into pool memory filled by the I/O engine, and llama.cpp's
//! eval callback (`cb_eval`) drives it:
//!
//! - ask=true on `l_out-N` (the last node of layer N) returns true, so the
//!   range of nodes that computes layer N runs on its own. Before returning,
//!   the callback waits until layer N's streamed weights are in the pool.
//! - ask=false on `l_out-N` (layer N is done): its slot is released (tensors
//!   re-pointed at a PROT_NONE guard) and the next `lookahead` streamed layers
//!   are submitted, in cyclic order so the next token's first layers load
//!   while this token's last layers compute.
//! - MoE: ask=true on `ffn_moe_topk-N` returns true as well; at ask=false the
//!   selected expert ids are read and only those experts are loaded (each
//!   expert is a contiguous range of its `*_exps` tensor) before the experts'
//!   matmuls run. Experts stay cached across tokens within the pool budget.
//!
//! Everything the hot path needs is allocated in [`Streamer::new`]; the
//! callback itself never allocates.

use std::ffi::{c_void, CStr};
use std::ptr::NonNull;
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use hypura_sys as sys;
use serde::Serialize;

use crate::io::{slot_len_for, slot_offset_for, FileId, ReadBackend, ReadRequest, Ticket, ALIGN};
use crate::scheduler::{Mode, Plan};

use super::context::EvalCallback;
use super::stream_buft::{ReportedTensor, StreamBufferType};

/// Counters of the streaming engine (totals since start).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct StreamMetrics {
    /// Bytes read from disk (aligned reads, as the drive saw them).
    pub bytes_read: u64,
    /// Read requests submitted.
    pub reads: u64,
    /// Time the compute waited on I/O.
    pub stall_ns: u64,
    /// Time spent inside the callback with the I/O engine busy (for GB/s).
    pub io_busy_ns: u64,
    /// Expert loads avoided because an earlier token had loaded the expert.
    pub expert_hits: u64,
    /// Experts read from disk (speculative reads that were used included).
    pub expert_misses: u64,
    /// Experts read ahead by the co-activation predictor and then used.
    pub expert_prefetch_used: u64,
    /// Experts read ahead and not used by the token they were read for.
    pub expert_prefetch_wasted: u64,
    /// Full passes over the layers (one per decode/ubatch).
    pub passes: u64,
}

impl StreamMetrics {
    pub fn since(&self, earlier: &StreamMetrics) -> StreamMetrics {
        StreamMetrics {
            bytes_read: self.bytes_read - earlier.bytes_read,
            reads: self.reads - earlier.reads,
            stall_ns: self.stall_ns - earlier.stall_ns,
            io_busy_ns: self.io_busy_ns - earlier.io_busy_ns,
            expert_hits: self.expert_hits - earlier.expert_hits,
            expert_misses: self.expert_misses - earlier.expert_misses,
            expert_prefetch_used: self.expert_prefetch_used - earlier.expert_prefetch_used,
            expert_prefetch_wasted: self.expert_prefetch_wasted - earlier.expert_prefetch_wasted,
            passes: self.passes - earlier.passes,
        }
    }
    /// Cross-token expert cache hit rate in [0, 1].
    pub fn hit_rate(&self) -> Option<f64> {
        let n = self.expert_hits + self.expert_misses;
        (n > 0).then(|| self.expert_hits as f64 / n as f64)
    }
}

/// Anonymous memory owned by the engine (pool or guard), unmapped on drop.
struct Mapping {
    ptr: NonNull<c_void>,
    len: usize,
}

impl Mapping {
    fn new(len: usize, prot: nix::sys::mman::ProtFlags, noreserve: bool) -> Result<Mapping> {
        use nix::sys::mman::{mmap_anonymous, MapFlags};
        let len = len.max(ALIGN).next_multiple_of(ALIGN);
        let mut flags = MapFlags::MAP_PRIVATE;
        if noreserve {
            flags |= MapFlags::MAP_NORESERVE;
        }
        let nz = std::num::NonZeroUsize::new(len).context("empty mapping")?;
        // SAFETY: a fresh anonymous private mapping; nothing else refers to it.
        let ptr = unsafe { mmap_anonymous(None, nz, prot, flags) }
            .with_context(|| format!("cannot map {len} bytes for the streaming pool"))?;
        Ok(Mapping { ptr, len })
    }
    fn base(&self) -> *mut u8 {
        self.ptr.as_ptr().cast()
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: we own the mapping; tensors pointing into it are re-pointed
        // at the guard or belong to a model already freed.
        unsafe {
            let _ = nix::sys::mman::munmap(self.ptr, self.len);
        }
    }
}

/// A streamed dense tensor inside a layer's slot.
struct DenseTensor {
    tensor: *mut sys::ggml_tensor,
    /// Where ggml placed it in the reserved (never written) buffer: reads as
    /// zeros. Used after an I/O error so the aborted compute cannot fault.
    zeros: *mut c_void,
    file_offset: u64,
    size: usize,
    /// Offset of its aligned read inside the slot.
    in_slot: usize,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum LayerState {
    Idle,
    Loading,
    Ready,
}

/// A dense layer whose FFN streams.
struct DenseLayer {
    tensors: Vec<DenseTensor>,
    state: LayerState,
    slot: usize,
    tickets: Vec<Ticket>,
}

/// One `*_exps` tensor of a layer, its address range in the expert arena.
struct ExpertTensor {
    file_offset: u64,
    expert_bytes: usize,
    /// Where expert 0 starts in memory (same offset mod 4096 as in the file).
    base: *mut u8,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum ExpertState {
    Empty,
    /// Reads in flight (a speculative prefetch); tickets in `pending`.
    Loading,
    Loaded,
}

struct ExpertLayer {
    tensors: Vec<ExpertTensor>,
    state: Vec<ExpertState>,
    /// Read ahead by the predictor and not used yet.
    speculative: Vec<bool>,
    /// Per expert × tensor: the ticket of a read in flight.
    pending: Vec<Option<Ticket>>,
    /// Per expert: the pass it was last selected in (LRU eviction).
    last_used: Vec<u64>,
    /// Co-activation counts from the previous expert layer: `[e_prev * n + e]`.
    coact: Vec<u32>,
    /// Memory one expert of this layer takes (all its tensors, aligned).
    expert_mem: u64,
}

impl ExpertLayer {
    fn n(&self) -> usize {
        self.state.len()
    }
}

/// The streaming engine; boxed, its address is the callback's user data.
pub struct Streamer {
    reader: Box<dyn ReadBackend>,
    mode: Mode,
    lookahead: usize,
    n_layer: usize,
    // Dense mode.
    dense: Vec<Option<DenseLayer>>,
    order: Vec<u32>,
    pos_of: Vec<usize>,
    free_slots: Vec<usize>,
    slot_bytes: usize,
    pool: Option<Mapping>,
    guard: Mapping,
    // Expert mode.
    experts: Vec<Option<ExpertLayer>>,
    arena: Option<Mapping>,
    expert_budget: u64,
    expert_resident: u64,
    ids_scratch: Vec<i32>,
    /// Router ids copied back from a device buffer.
    ids_bytes: Vec<u8>,
    prev_ids: Vec<i32>,
    prev_layer: usize,
    last_layer_seen: usize,
    scores: Vec<(u32, usize)>,
    /// Recent read-ahead outcomes (decayed): used / wasted.
    spec_recent: (u32, u32),
    tickets_scratch: Vec<Ticket>,
    // State.
    metrics: StreamMetrics,
    error: Option<String>,
}

const L_OUT: &[u8] = b"l_out-";
const TOPK: &[u8] = b"ffn_moe_topk-";

/// Layer index of a node named `PREFIX<digits>` (optionally followed by ` (view)` etc.).
fn node_layer(name: &[u8], prefix: &[u8]) -> Option<usize> {
    let rest = name.strip_prefix(prefix)?;
    let digits = rest.iter().take_while(|c| c.is_ascii_digit()).count();
    if digits == 0 || (digits < rest.len() && rest[digits] != b' ') {
        return None;
    }
    std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()
}

impl Streamer {
    /// Takes over the streamed tensors llama.cpp placed in `buft` (after the
    /// model is loaded and names are restored) and sets up the pool.
    pub fn new(plan: &Plan, buft: &StreamBufferType, reader: Box<dyn ReadBackend>) -> Result<Box<Streamer>> {
        let reported = buft.reported();
        let find = |name: &str| -> Result<&ReportedTensor> {
            reported
                .iter()
                .find(|r| r.name == name)
                .with_context(|| format!("llama.cpp did not place '{name}' in the streaming buffer"))
        };
        let n_layer = plan.streamed.iter().map(|t| t.layer as usize + 1).max().unwrap_or(0);
        let max_tensor = plan.streamed.iter().map(|t| t.size as usize).max().unwrap_or(ALIGN);
        let guard = Mapping::new(max_tensor + ALIGN, nix::sys::mman::ProtFlags::PROT_NONE, true)?;
        let mut s = Streamer {
            reader,
            mode: plan.mode,
            lookahead: plan.lookahead,
            n_layer,
            dense: Vec::new(),
            order: Vec::new(),
            pos_of: vec![usize::MAX; n_layer],
            free_slots: Vec::new(),
            slot_bytes: 0,
            pool: None,
            guard,
            experts: Vec::new(),
            arena: None,
            expert_budget: plan.pool_bytes,
            expert_resident: 0,
            ids_scratch: Vec::new(),
            ids_bytes: Vec::new(),
            prev_ids: Vec::new(),
            prev_layer: usize::MAX,
            last_layer_seen: usize::MAX,
            scores: Vec::new(),
            spec_recent: (0, 0),
            tickets_scratch: Vec::new(),
            metrics: StreamMetrics::default(),
            error: None,
        };
        match plan.mode {
            Mode::Resident => {}
            Mode::Dense => {
                let mut layers: Vec<Option<DenseLayer>> = (0..n_layer).map(|_| None).collect();
                for t in &plan.streamed {
                    let r = find(&t.name)?;
                    if r.nbytes as u64 != t.size {
                        bail!("'{}': llama.cpp has {} bytes, the file {}", t.name, r.nbytes, t.size);
                    }
                    let layer = layers[t.layer as usize].get_or_insert_with(|| DenseLayer {
                        tensors: Vec::new(),
                        state: LayerState::Idle,
                        slot: usize::MAX,
                        tickets: Vec::new(),
                    });
                    let in_slot = layer.tensors.iter().map(|d| slot_len_for(d.file_offset, d.size)).sum();
                    layer.tensors.push(DenseTensor { tensor: r.tensor, zeros: r.data, file_offset: t.file_offset, size: t.size as usize, in_slot });
                }
                for l in layers.iter_mut().flatten() {
                    l.tickets.reserve_exact(l.tensors.len());
                }
                s.order = (0..n_layer as u32).filter(|&l| layers[l as usize].is_some()).collect();
                for (i, &l) in s.order.iter().enumerate() {
                    s.pos_of[l as usize] = i;
                }
                let n_slots = (plan.lookahead + 1).min(s.order.len()).max(1);
                s.slot_bytes = plan.slot_bytes as usize;
                let pool = Mapping::new(n_slots * s.slot_bytes, nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE, false)?;
                let _ = s.reader.register_buffers(&[(pool.base(), pool.len)]);
                s.free_slots = (0..n_slots).rev().collect();
                s.pool = Some(pool);
                s.dense = layers;
            }
            Mode::Experts => {
                let mut layers: Vec<Option<ExpertLayer>> = (0..n_layer).map(|_| None).collect();
                // One arena of address space for every expert tensor, each placed
                // so that memory and file offsets agree mod 4096 (aligned reads
                // land in place). Only loaded experts are ever committed.
                let mut layout = Vec::new();
                let mut cursor = 0usize;
                for t in &plan.streamed {
                    let r = find(&t.name)?;
                    if r.nbytes as u64 != t.size {
                        bail!("'{}': llama.cpp has {} bytes, the file {}", t.name, r.nbytes, t.size);
                    }
                    let n = t.n_experts.unwrap_or(1).max(1) as usize;
                    if !(t.size as usize).is_multiple_of(n) {
                        bail!("'{}': {} bytes do not split into {n} experts", t.name, t.size);
                    }
                    let start = cursor + slot_offset_for(t.file_offset);
                    layout.push((t, r.tensor, start, n));
                    cursor += slot_len_for(t.file_offset, t.size as usize) + ALIGN;
                }
                let arena = Mapping::new(cursor, nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE, true)?;
                let mut max_n = 1usize;
                for (t, tensor, start, n) in layout {
                    let layer = layers[t.layer as usize].get_or_insert_with(|| ExpertLayer {
                        tensors: Vec::new(),
                        state: vec![ExpertState::Empty; n],
                        speculative: vec![false; n],
                        pending: Vec::new(),
                        last_used: vec![0; n],
                        coact: vec![0; n * n],
                        expert_mem: 0,
                    });
                    if layer.n() != n {
                        bail!("layer {}: expert tensors disagree on the expert count", t.layer);
                    }
                    // SAFETY: `start` lies inside the arena (cursor accounting above).
                    let base = unsafe { arena.base().add(start) };
                    let expert_bytes = t.size as usize / n;
                    layer.expert_mem += slot_len_for(0, expert_bytes) as u64;
                    layer.tensors.push(ExpertTensor { file_offset: t.file_offset, expert_bytes, base });
                    // SAFETY: the tensor belongs to the loaded model; experts
                    // now live in the arena (only loaded ones are valid).
                    unsafe { (*tensor).data = base.cast() };
                    max_n = max_n.max(n);
                }
                for l in layers.iter_mut().flatten() {
                    l.pending = vec![None; l.n() * l.tensors.len()];
                }
                s.ids_scratch = Vec::with_capacity(max_n);
                s.prev_ids = Vec::with_capacity(max_n);
                s.scores = Vec::with_capacity(max_n);
                s.tickets_scratch = Vec::with_capacity(max_n * 4 + 16);
                s.arena = Some(arena);
                s.experts = layers;
            }
        }
        s.release_all();
        Ok(Box::new(s))
    }

    /// The callback and user data to put in the context parameters. The
    /// streamer must outlive the context.
    pub fn callback(self: &mut Box<Self>) -> (EvalCallback, *mut c_void) {
        (Some(eval_callback), (&mut **self) as *mut Streamer as *mut c_void)
    }

    /// Puts the eval and abort callbacks into context options.
    pub fn hook(self: &mut Box<Self>, opts: &mut super::ContextOptions) {
        let (cb, user) = self.callback();
        opts.eval_callback = cb;
        opts.eval_user_data = user;
        opts.abort_callback = Some(abort_callback);
    }

    pub fn metrics(&self) -> StreamMetrics {
        self.metrics
    }

    /// The first I/O error the callback met, if any (the decode is aborted).
    pub fn take_error(&mut self) -> Option<String> {
        self.error.take()
    }

    pub fn reader_info(&self) -> &crate::io::ReaderInfo {
        self.reader.info()
    }

    /// Dense tensors start released: pointing at the guard page, so a missed
    /// wait faults instead of computing on stale bytes.
    fn release_all(&mut self) {
        let guard = self.guard.base();
        for l in self.dense.iter_mut().flatten() {
            for t in &l.tensors {
                // SAFETY: tensor of the live model; the guard outlives it.
                unsafe { (*t.tensor).data = guard.cast() };
            }
        }
    }

    fn on_node(&mut self, t: *mut sys::ggml_tensor, ask: bool) -> bool {
        // SAFETY: ggml passes a live node; its name is NUL-terminated.
        let name = unsafe { CStr::from_ptr((*t).name.as_ptr()) }.to_bytes();
        if let Some(layer) = node_layer(name, L_OUT) {
            if layer >= self.n_layer || self.mode != Mode::Dense {
                return false;
            }
            if ask {
                self.note_layer(layer);
                if let Err(e) = self.ensure_ready(layer) {
                    self.fail(e);
                }
                return true;
            }
            self.release(layer);
            self.prefetch_after(layer);
            return self.error.is_none();
        }
        if self.mode == Mode::Experts {
            if let Some(layer) = node_layer(name, TOPK) {
                if ask {
                    return layer < self.experts.len() && self.experts[layer].is_some();
                }
                self.note_layer(layer);
                if let Err(e) = self.load_selected_experts(layer, t) {
                    self.fail(e);
                }
                return self.error.is_none();
            }
        }
        false
    }

    /// Counts passes (one per decode/ubatch): a layer index that does not
    /// grow means a new graph has started.
    fn note_layer(&mut self, layer: usize) {
        if self.last_layer_seen == usize::MAX || layer <= self.last_layer_seen {
            self.metrics.passes += 1;
            self.prev_layer = usize::MAX;
        }
        self.last_layer_seen = layer;
    }

    /// Records the first error; every streamed dense tensor is pointed at
    /// zero pages so the rest of the (aborted) compute reads valid memory.
    fn fail(&mut self, e: anyhow::Error) {
        if self.error.is_none() {
            self.error = Some(format!("{e:#}"));
        }
        for l in self.dense.iter().flatten() {
            for t in &l.tensors {
                // SAFETY: tensor of the live model; `zeros` is its reserved
                // buffer range, readable for its whole size.
                unsafe { (*t.tensor).data = t.zeros };
            }
        }
    }

    /// Whether an error happened: the context's abort callback reads this.
    pub fn failed(&self) -> bool {
        self.error.is_some()
    }

    // ------------------------------------------------------------- dense ---

    fn submit_layer(&mut self, layer: usize) -> Result<()> {
        let Some(l) = self.dense[layer].as_mut() else { return Ok(()) };
        if l.state != LayerState::Idle {
            return Ok(());
        }
        let slot = self.free_slots.pop().context("streaming pool exhausted (no free slot)")?;
        let pool = self.pool.as_ref().context("no pool")?;
        // SAFETY: slot < n_slots, inside the pool mapping.
        let slot_base = unsafe { pool.base().add(slot * self.slot_bytes) };
        l.slot = slot;
        l.tickets.clear();
        for t in &l.tensors {
            let cap = slot_len_for(t.file_offset, t.size);
            debug_assert!(t.in_slot + cap <= self.slot_bytes);
            let req = ReadRequest {
                file: FileId(0),
                file_offset: t.file_offset,
                len: t.size,
                // SAFETY: in_slot + cap <= slot_bytes (plan sizing).
                dst: unsafe { slot_base.add(t.in_slot) },
                dst_cap: cap,
            };
            // SAFETY: the slot is ours until the layer is released, and no
            // tensor points into it until the read has completed.
            let ticket = unsafe { self.reader.submit(req) }.with_context(|| format!("layer {layer}: cannot submit read"))?;
            l.tickets.push(ticket);
            self.metrics.bytes_read += cap as u64;
            self.metrics.reads += 1;
        }
        l.state = LayerState::Loading;
        Ok(())
    }

    fn ensure_ready(&mut self, layer: usize) -> Result<()> {
        let Some(state) = self.dense[layer].as_ref().map(|l| l.state) else { return Ok(()) };
        if state == LayerState::Idle {
            self.submit_layer(layer)?;
        }
        let Some(l) = self.dense[layer].as_mut() else { return Ok(()) };
        if l.state == LayerState::Loading {
            let t0 = Instant::now();
            for &tk in &l.tickets {
                self.reader.wait(tk).with_context(|| format!("layer {layer}: read failed"))?;
            }
            l.tickets.clear();
            let waited = t0.elapsed().as_nanos() as u64;
            self.metrics.stall_ns += waited;
            self.metrics.io_busy_ns += waited;
            let pool = self.pool.as_ref().context("no pool")?;
            for t in &l.tensors {
                // SAFETY: the read into this slot completed; the bytes of the
                // tensor start at its in-slot offset plus file offset mod 4096.
                unsafe {
                    let p = pool.base().add(l.slot * self.slot_bytes + t.in_slot + slot_offset_for(t.file_offset));
                    (*t.tensor).data = p.cast();
                }
            }
            l.state = LayerState::Ready;
        }
        Ok(())
    }

    fn release(&mut self, layer: usize) {
        let guard = self.guard.base();
        let Some(l) = self.dense[layer].as_mut() else { return };
        if l.state != LayerState::Ready {
            return;
        }
        for t in &l.tensors {
            // SAFETY: tensor of the live model; the guard outlives it.
            unsafe { (*t.tensor).data = guard.cast() };
        }
        l.state = LayerState::Idle;
        debug_assert!(!self.free_slots.contains(&l.slot));
        self.free_slots.push(l.slot);
        l.slot = usize::MAX;
    }

    /// Submits the next `lookahead` streamed layers after `layer`, cyclically.
    fn prefetch_after(&mut self, layer: usize) {
        if self.order.is_empty() || self.lookahead == 0 {
            return;
        }
        let n = self.order.len();
        // First streamed layer after `layer` in cyclic order.
        let start = (layer + 1..self.n_layer).find(|&l| self.pos_of[l] != usize::MAX).map_or(0, |l| self.pos_of[l]);
        for i in 0..self.lookahead.min(n) {
            let next = self.order[(start + i) % n] as usize;
            if self.free_slots.is_empty() {
                break;
            }
            if let Err(e) = self.submit_layer(next) {
                self.fail(e);
                return;
            }
        }
    }

    // ----------------------------------------------------------- experts ---

    /// Reads the router's top-k ids (an I32 view: index rows with nb[1]),
    /// loads the selected experts of `layer` that are not in memory, learns
    /// which experts follow which, and reads ahead the next layer's likely
    /// experts (lookahead ≥ 1).
    fn load_selected_experts(&mut self, layer: usize, topk: *mut sys::ggml_tensor) -> Result<()> {
        // SAFETY: the node was just computed (ask=false) and synchronised.
        let (k, n_tok, nb1, mut data) = unsafe {
            let t = &*topk;
            if t.type_ != sys::GGML_TYPE_I32 {
                bail!("layer {layer}: router top-k is not I32");
            }
            (t.ne[0] as usize, t.ne[1] as usize, t.nb[1], t.data as *const u8)
        };
        // On a GPU (attention there, experts on the CPU) the ids are copied
        // back first; the view's strided bytes come along as they are.
        // SAFETY: live node; its buffer pointer is valid or null.
        let on_host = unsafe { (*topk).buffer.is_null() || sys::ggml_backend_buffer_is_host((*topk).buffer) };
        if !on_host {
            // SAFETY: live node.
            let nbytes = unsafe { sys::ggml_nbytes(topk) };
            if self.ids_bytes.len() < nbytes {
                self.ids_bytes.resize(nbytes, 0); // grows once to the largest batch
            }
            // SAFETY: ids_bytes holds nbytes; the backend copies the view's range.
            unsafe { sys::ggml_backend_tensor_get(topk, self.ids_bytes.as_mut_ptr().cast(), 0, nbytes) };
            data = self.ids_bytes.as_ptr();
        }
        let n_exp = self.experts[layer].as_ref().context("expert layer")?.n();
        self.ids_scratch.clear();
        for row in 0..n_tok {
            for j in 0..k {
                // SAFETY: row < ne[1], j < ne[0]; nb[1] is the row stride.
                let id = unsafe { *(data.add(row * nb1 + j * 4) as *const i32) };
                if id < 0 || id as usize >= n_exp {
                    bail!("layer {layer}: router picked expert {id} of {n_exp}");
                }
                if !self.ids_scratch.contains(&id) && self.ids_scratch.len() < n_exp {
                    self.ids_scratch.push(id);
                }
            }
        }
        let pass = self.metrics.passes;
        self.learn_coactivation(layer);

        // Mark this pass's picks in use (eviction spares them), count hits.
        let el = self.experts[layer].as_mut().context("expert layer")?;
        let mut need = 0u64;
        for &id in &self.ids_scratch {
            let e = id as usize;
            el.last_used[e] = pass;
            match (el.state[e], el.speculative[e]) {
                (ExpertState::Empty, _) => need += el.expert_mem,
                (_, true) => {
                    self.metrics.expert_prefetch_used += 1;
                    self.spec_recent.0 += 1;
                }
                (ExpertState::Loaded, false) => self.metrics.expert_hits += 1,
                (ExpertState::Loading, false) => {}
            }
        }
        for e in 0..el.n() {
            if el.speculative[e] && el.last_used[e] != pass {
                self.metrics.expert_prefetch_wasted += 1;
                self.spec_recent.1 += 1;
            }
            el.speculative[e] = false;
        }
        self.evict_until(need, layer);

        self.tickets_scratch.clear();
        for i in 0..self.ids_scratch.len() {
            let e = self.ids_scratch[i] as usize;
            let state = self.experts[layer].as_ref().map_or(ExpertState::Loaded, |l| l.state[e]);
            match state {
                ExpertState::Empty => {
                    self.metrics.expert_misses += 1;
                    self.submit_expert(layer, e)?;
                    self.collect_pending(layer, e);
                }
                ExpertState::Loading => self.collect_pending(layer, e),
                ExpertState::Loaded => {}
            }
        }
        // Read-aheads the router did not pick finish too (they become cache):
        // no read of this layer stays in flight past its top-k.
        for e in 0..n_exp {
            if self.experts[layer].as_ref().is_some_and(|l| l.state[e] == ExpertState::Loading) {
                self.collect_pending(layer, e);
            }
        }
        let t0 = Instant::now();
        for &tk in &self.tickets_scratch {
            self.reader.wait(tk).with_context(|| format!("layer {layer}: expert read failed"))?;
        }
        let waited = t0.elapsed().as_nanos() as u64;
        self.metrics.stall_ns += waited;
        self.metrics.io_busy_ns += waited;
        if let Some(el) = self.experts[layer].as_mut() {
            for st in el.state.iter_mut().filter(|s| **s == ExpertState::Loading) {
                *st = ExpertState::Loaded;
            }
            debug_assert!(el.pending.iter().all(Option::is_none));
        }
        self.prev_ids.clear();
        self.prev_ids.extend_from_slice(&self.ids_scratch);
        self.prev_layer = layer;
        if self.lookahead > 0 {
            self.speculate(layer + 1, k)?;
        }
        Ok(())
    }

    /// Moves expert `e`'s in-flight tickets into the wait list.
    fn collect_pending(&mut self, layer: usize, e: usize) {
        let Some(el) = self.experts[layer].as_mut() else { return };
        let nt = el.tensors.len();
        for slot in &mut el.pending[e * nt..(e + 1) * nt] {
            if let Some(tk) = slot.take() {
                self.tickets_scratch.push(tk);
            }
        }
    }

    /// Submits the reads of expert `e` of `layer` (all its tensors).
    fn submit_expert(&mut self, layer: usize, e: usize) -> Result<()> {
        let el = self.experts[layer].as_mut().context("expert layer")?;
        let nt = el.tensors.len();
        for (j, t) in el.tensors.iter().enumerate() {
            let off = t.file_offset + (e * t.expert_bytes) as u64;
            // SAFETY: base + e*expert_bytes is inside this tensor's arena
            // range; memory ≡ file offset mod 4096, so the aligned superset
            // lands in place when it starts at the aligned-down address.
            let dst = unsafe { t.base.add(e * t.expert_bytes).sub(slot_offset_for(off)) };
            let cap = slot_len_for(off, t.expert_bytes);
            let req = ReadRequest { file: FileId(0), file_offset: off, len: t.expert_bytes, dst, dst_cap: cap };
            // SAFETY: the range belongs to this expert (neighbour bytes in the
            // shared boundary pages are rewritten with identical file bytes);
            // nothing computes on it until its tickets have been waited for.
            let tk = unsafe { self.reader.submit(req) }.with_context(|| format!("layer {layer}: cannot submit expert read"))?;
            el.pending[e * nt + j] = Some(tk);
            self.metrics.bytes_read += cap as u64;
            self.metrics.reads += 1;
        }
        el.state[e] = ExpertState::Loading;
        self.expert_resident += el.expert_mem;
        Ok(())
    }

    /// Counts which experts of `layer` followed the previous layer's picks.
    fn learn_coactivation(&mut self, layer: usize) {
        if self.prev_layer == usize::MAX || self.prev_layer + 1 != layer {
            return;
        }
        let Some(el) = self.experts[layer].as_mut() else { return };
        let n = el.n();
        for &p in &self.prev_ids {
            let p = p as usize;
            if p >= n {
                continue;
            }
            for &e in &self.ids_scratch {
                let c = &mut el.coact[p * n + e as usize];
                *c = c.saturating_add(1);
            }
        }
    }

    /// Reads ahead the `k` experts of `layer` that most often followed the
    /// current picks, if the budget has room without evicting anything in use.
    fn speculate(&mut self, layer: usize, k: usize) -> Result<()> {
        // Read ahead only while it pays: at least half of recent read-aheads
        // used. When it does not, one pass in 32 still probes with one expert,
        // so a model whose routing becomes predictable gets read-ahead back.
        let (used, wasted) = self.spec_recent;
        if used + wasted > 256 {
            self.spec_recent = (used / 2, wasted / 2);
        }
        let total = used + wasted;
        let paying = total < 32 || used * 2 >= total;
        if !paying && !self.metrics.passes.is_multiple_of(32) {
            return Ok(());
        }
        // While it is not paying, a probe reads one expert, not k.
        let k = if paying { k } else { 1 };
        let Some(el) = self.experts.get(layer).and_then(Option::as_ref) else { return Ok(()) };
        let n = el.n();
        self.scores.clear();
        for e in 0..n {
            if el.state[e] != ExpertState::Empty {
                continue;
            }
            let score: u32 = self.prev_ids.iter().filter(|&&p| (p as usize) < n).map(|&p| el.coact[p as usize * n + e]).sum();
            if score > 0 {
                self.scores.push((score, e));
            }
        }
        self.scores.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        let mem = el.expert_mem;
        let take = k.min(self.scores.len());
        for i in 0..take {
            let e = self.scores[i].1;
            self.evict_until(mem, self.prev_layer);
            if self.expert_resident + mem > self.expert_budget {
                break;
            }
            self.submit_expert(layer, e)?;
            if let Some(el) = self.experts[layer].as_mut() {
                el.speculative[e] = true;
            }
        }
        Ok(())
    }

    /// Evicts least-recently-used loaded experts (never those `keep_layer`
    /// selected in this pass, never reads in flight) until `need` more bytes
    /// fit in the expert budget.
    fn evict_until(&mut self, need: u64, keep_layer: usize) {
        let pass = self.metrics.passes;
        while self.expert_resident + need > self.expert_budget {
            let mut best: Option<(usize, usize, u64)> = None;
            for (li, l) in self.experts.iter().enumerate() {
                let Some(l) = l else { continue };
                for e in 0..l.n() {
                    if l.state[e] != ExpertState::Loaded || (li == keep_layer && l.last_used[e] == pass) {
                        continue;
                    }
                    if best.is_none_or(|(_, _, u)| l.last_used[e] < u) {
                        best = Some((li, e, l.last_used[e]));
                    }
                }
            }
            let Some((li, e, _)) = best else { break };
            self.evict_expert(li, e);
        }
    }

    fn evict_expert(&mut self, layer: usize, e: usize) {
        let Some(l) = self.experts[layer].as_mut() else { return };
        for t in &l.tensors {
            // Give back the pages wholly inside this expert's bytes; boundary
            // pages shared with a neighbour stay.
            let start = t.base as usize + e * t.expert_bytes;
            let end = start + t.expert_bytes;
            let a = start.next_multiple_of(ALIGN);
            let b = end & !(ALIGN - 1);
            if b > a {
                // SAFETY: [a, b) lies inside the arena and inside this expert's
                // bytes, which nothing computes on (not selected in this pass)
                // and no read targets (state Loaded, not Loading).
                unsafe {
                    libc::madvise(a as *mut c_void, b - a, libc::MADV_DONTNEED);
                }
            }
        }
        l.state[e] = ExpertState::Empty;
        l.speculative[e] = false;
        self.expert_resident = self.expert_resident.saturating_sub(l.expert_mem);
    }
}

unsafe extern "C" fn eval_callback(t: *mut sys::ggml_tensor, ask: bool, user: *mut c_void) -> bool {
    // SAFETY: `user` is the boxed Streamer registered with the context, alive
    // for the context's lifetime; llama.cpp calls this from the decoding
    // thread only, never concurrently.
    let s = unsafe { &mut *(user as *mut Streamer) };
    if s.error.is_some() {
        // After an I/O error: no more cuts; the abort callback stops compute.
        return false;
    }
    s.on_node(t, ask)
}

/// Abort callback for the context: stops the compute after a streaming error.
///
/// # Safety
/// `user` must be the pointer [`Streamer::hook`] registered, and the streamer
/// must outlive the context.
pub unsafe extern "C" fn abort_callback(user: *mut c_void) -> bool {
    // SAFETY: same pointer and lifetime as the eval callback's user data.
    let s = unsafe { &*(user as *const Streamer) };
    s.failed()
}

#[cfg(test)]
mod tests {
    use super::node_layer;

    #[test]
    fn node_names() {
        assert_eq!(node_layer(b"l_out-0", b"l_out-"), Some(0));
        assert_eq!(node_layer(b"l_out-31", b"l_out-"), Some(31));
        assert_eq!(node_layer(b"l_out-3 (view)", b"l_out-"), Some(3));
        assert_eq!(node_layer(b"l_out-", b"l_out-"), None);
        assert_eq!(node_layer(b"l_out-3x", b"l_out-"), None);
        assert_eq!(node_layer(b"ffn_out-3", b"l_out-"), None);
        assert_eq!(node_layer(b"ffn_moe_topk-12", b"ffn_moe_topk-"), Some(12));
    }
}
