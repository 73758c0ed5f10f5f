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
//! - GPU tier (`GpuDense`, `GpuExperts`): the streamed tensors' `buffer` is a
//!   device buffer (so ggml's scheduler runs their ops on the GPU) and their
//!   `data` points into it. Staged (discrete GPU): dense layers are read into
//!   pinned host staging slots and an uploader thread copies each finished
//!   layer into its device slot while the GPU computes; the callback waits
//!   for the copy, not just the read. Selected experts are read into the RAM
//!   cache (the arena) and copied into their layer's device slot, which keeps
//!   them across tokens when the layer has a slot of its own. Direct (Metal,
//!   APUs, the CPU device): the host pool is wrapped as a device buffer, reads
//!   land where the device computes, nothing is copied.
//! - The wait for a streamed layer happens on the callback's ask for the
//!   layer's first node, which works whatever splits the scheduler made (with
//!   a GPU, attention and FFN may sit in different splits).
//!
//! Everything the hot path needs is allocated in [`Streamer::new`]; the
//! callback itself never allocates.

use std::ffi::{c_void, CStr};
use std::ptr::NonNull;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use hypura_sys as sys;
use serde::Serialize;

use crate::io::{slot_len_for, slot_offset_for, FileId, ReadBackend, ReadRequest, Ticket, ALIGN};
use crate::scheduler::{Mode, Plan};

use super::context::EvalCallback;
use super::device::{Buffer, Device, Upload};
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
    /// Bytes copied host→device (GPU tier, staged).
    pub upload_bytes: u64,
    /// Selected experts already in their GPU slot (no copy, no read).
    pub gpu_hits: u64,
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
            upload_bytes: self.upload_bytes - earlier.upload_bytes,
            gpu_hits: self.gpu_hits - earlier.gpu_hits,
        }
    }
    /// Cross-token expert cache hit rate in [0, 1]: selections served
    /// without a disk read (from the RAM cache or the GPU slot).
    pub fn hit_rate(&self) -> Option<f64> {
        let hits = self.expert_hits + self.gpu_hits;
        let n = hits + self.expert_misses;
        (n > 0).then(|| hits as f64 / n as f64)
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
    /// Staged GPU tier: offset in the device slot, and the padding after it
    /// the device's kernels read (kept zero).
    dev_off: usize,
    dev_pad: usize,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum LayerState {
    Idle,
    Loading,
    /// Read; the uploader thread is copying it to the device slot.
    Uploading,
    /// In the device slot, tensors not pointed there yet.
    Uploaded,
    Ready,
}

/// A dense layer whose FFN streams.
struct DenseLayer {
    tensors: Vec<DenseTensor>,
    state: LayerState,
    slot: usize,
    tickets: Vec<Ticket>,
    /// Staged GPU tier, RAM-tier layer: offset of its permanent copy in the
    /// RAM tier buffer, and whether that copy has been read.
    ram_off: Option<usize>,
    ram_valid: bool,
    /// Staged GPU tier: the device slot it is copied into (usize::MAX: none).
    /// `slot` is then its host staging slot, given back once copied.
    dev_slot: usize,
}

/// One `*_exps` tensor of a layer, its address range in the expert arena.
struct ExpertTensor {
    file_offset: u64,
    expert_bytes: usize,
    /// Where expert 0 starts in memory (same offset mod 4096 as in the file).
    base: *mut u8,
    tensor: *mut sys::ggml_tensor,
    /// Staged GPU tier: offset in a device slot, and the padding after it.
    dev_off: usize,
    dev_pad: usize,
    /// Pinned RAM cache: where this tensor's piece of an expert starts in a
    /// cache slot (aligned; the bytes land at + file offset mod 4096).
    piece_off: usize,
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
    /// Staged GPU tier: the device slot this layer owns for good, if any.
    dedicated_slot: Option<usize>,
    /// Pinned RAM cache: the cache slot of each loaded expert (u32::MAX: none).
    cache_slot: Vec<u32>,
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
    /// Selected experts missing from the GPU slot (staged GPU tier).
    dev_missing: Vec<i32>,
    /// Staged GPU tier: the RAM expert cache as pinned memory cut into
    /// uniform slots (one expert of a layer each), so copies to the GPU run
    /// at the pinned rate; none: the address-space arena (pageable).
    cache: Option<Buffer>,
    cache_slot_bytes: usize,
    /// Staged GPU dense: pinned RAM holding the plan's RAM-tier layers.
    ram_tier: Option<Buffer>,
    cache_free: Vec<u32>,
    // GPU tier.
    gpu: Option<GpuPool>,
    /// (streamed dense tensor address, layer), sorted.
    weight_layer: Vec<(usize, usize)>,
    // State.
    metrics: StreamMetrics,
    error: Option<String>,
}

/// The streaming engine's device side.
struct GpuPool {
    upload: Upload,
    /// Staged: device slots (then a guard for released dense tensors).
    /// Direct: the host pool or arena wrapped as a device buffer.
    buf: Arc<Buffer>,
    /// Staged: pinned host staging (dense); none when the backend has no
    /// pinned memory (the plain pool mapping stages then).
    pinned: Option<Buffer>,
    dev_slot_bytes: usize,
    /// Staged dense: where released tensors point (filled with 0xFF: a
    /// missed wait computes NaNs, never another layer's weights).
    guard_off: usize,
    uploader: Option<Uploader>,
    /// Staged dense: free device slots (fewer than the host staging slots:
    /// reads run ahead in RAM, the device only needs the layer computing and
    /// the one being copied).
    dev_free: Vec<usize>,
    /// Staged dense: the compute-order position copies are handed out from
    /// (copies go in compute order, so a free device slot always serves the
    /// next layer needed).
    next_copy: usize,
    /// Staged experts: per slot, the owning layer and which experts it holds.
    slot_owner: Vec<usize>,
    slot_valid: Vec<Vec<bool>>,
    /// Staged experts: slots no layer owns for good, used round-robin.
    shared: Vec<usize>,
    next_shared: usize,
}

impl Drop for GpuPool {
    fn drop(&mut self) {
        // The uploader reads the pinned staging: join it before that goes.
        self.uploader.take();
    }
}

/// The staged dense path's copy thread: jobs (layer, slot) in, layers out.
struct Uploader {
    jobs: Option<SyncSender<(u32, u32, usize)>>,
    done: Receiver<u32>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Uploader {
    fn drop(&mut self) {
        self.jobs.take(); // closes the queue: the thread ends after its job
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One tensor copy of a dense layer: (offset in the host slot of its first
/// byte, offset in the device slot, bytes, zero padding after it).
type CopyItem = (usize, usize, usize, usize);

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
    /// model is loaded and names are restored) and sets up the pool; `gpu` is
    /// the device for the GPU modes.
    pub fn new(
        plan: &Plan,
        buft: &StreamBufferType,
        reader: Box<dyn ReadBackend>,
        gpu: Option<(Device, Upload)>,
    ) -> Result<Box<Streamer>> {
        let reported = buft.reported();
        let find = |name: &str| -> Result<&ReportedTensor> {
            reported.iter().find(|r| r.name == name).with_context(|| {
                format!("llama.cpp did not place '{name}' in the streaming buffer")
            })
        };
        let gpu = match (plan.mode.on_gpu(), gpu) {
            (true, Some(g)) => Some(g),
            (true, None) => bail!("mode {} needs a GPU device", plan.mode.label()),
            (false, _) => None,
        };
        let staged = gpu.as_ref().is_some_and(|(_, u)| *u == Upload::Staged);
        let n_layer = plan
            .streamed
            .iter()
            .map(|t| t.layer as usize + 1)
            .max()
            .unwrap_or(0);
        let max_tensor = plan
            .streamed
            .iter()
            .map(|t| t.size as usize)
            .max()
            .unwrap_or(ALIGN);
        let guard = Mapping::new(
            max_tensor + ALIGN,
            nix::sys::mman::ProtFlags::PROT_NONE,
            true,
        )?;
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
            dev_missing: Vec::new(),
            cache: None,
            cache_slot_bytes: 0,
            ram_tier: None,
            cache_free: Vec::new(),
            gpu: None,
            weight_layer: Vec::new(),
            metrics: StreamMetrics::default(),
            error: None,
        };
        let align_dev = |dev: &Device, x: usize| x.next_multiple_of(dev.alignment().max(256));
        match plan.mode {
            Mode::Resident => {}
            Mode::Dense | Mode::GpuDense => {
                let mut layers: Vec<Option<DenseLayer>> = (0..n_layer).map(|_| None).collect();
                for t in &plan.streamed {
                    let r = find(&t.name)?;
                    if r.nbytes as u64 != t.size {
                        bail!(
                            "'{}': llama.cpp has {} bytes, the file {}",
                            t.name,
                            r.nbytes,
                            t.size
                        );
                    }
                    let layer = layers[t.layer as usize].get_or_insert_with(|| DenseLayer {
                        tensors: Vec::new(),
                        state: LayerState::Idle,
                        slot: usize::MAX,
                        tickets: Vec::new(),
                        ram_off: None,
                        ram_valid: false,
                        dev_slot: usize::MAX,
                    });
                    let in_slot = layer
                        .tensors
                        .iter()
                        .map(|d| slot_len_for(d.file_offset, d.size))
                        .sum();
                    // Device layout: each tensor at an aligned offset, with
                    // the room (row padding) the device's kernels expect.
                    let (dev_off, dev_pad) = match &gpu {
                        Some((dev, Upload::Staged)) => {
                            let off = layer.tensors.last().map_or(0, |d: &DenseTensor| {
                                align_dev(dev, d.dev_off + d.size + d.dev_pad)
                            });
                            // SAFETY: a tensor of the loaded model (reported by the buffer type).
                            (
                                off,
                                unsafe { dev.alloc_size(r.tensor) }.saturating_sub(r.nbytes),
                            )
                        }
                        _ => (0, 0),
                    };
                    layer.tensors.push(DenseTensor {
                        tensor: r.tensor,
                        zeros: r.data,
                        file_offset: t.file_offset,
                        size: t.size as usize,
                        in_slot,
                        dev_off,
                        dev_pad,
                    });
                }
                for l in layers.iter_mut().flatten() {
                    l.tickets.reserve_exact(l.tensors.len());
                }
                s.order = (0..n_layer as u32)
                    .filter(|&l| layers[l as usize].is_some())
                    .collect();
                for (i, &l) in s.order.iter().enumerate() {
                    s.pos_of[l as usize] = i;
                }
                let n_slots = (plan.lookahead + 1).min(s.order.len()).max(1);
                s.slot_bytes = plan.slot_bytes as usize;
                // Host slots: pinned staging memory when staging to a GPU
                // whose backend has it, else anonymous memory.
                let pinned = match &gpu {
                    Some((dev, Upload::Staged)) => dev.staging_buft().and_then(|hb| {
                        // SAFETY: a buffer type of the registered device (its own or its host one).
                        unsafe {
                            Buffer::alloc(hb, n_slots * s.slot_bytes + ALIGN, "pinned staging")
                        }
                        .map_err(|e| {
                            tracing::warn!("no pinned staging ({e:#}): staging in pageable memory")
                        })
                        .ok()
                    }),
                    _ => None,
                };
                if let Some(p) = &pinned {
                    let base = p.aligned_base(ALIGN);
                    let _ = s.reader.register_buffers(&[(base, n_slots * s.slot_bytes)]);
                } else {
                    let pool = Mapping::new(
                        n_slots * s.slot_bytes,
                        nix::sys::mman::ProtFlags::PROT_READ
                            | nix::sys::mman::ProtFlags::PROT_WRITE,
                        false,
                    )?;
                    let _ = s.reader.register_buffers(&[(pool.base(), pool.len)]);
                    s.pool = Some(pool);
                }
                s.free_slots = (0..n_slots).rev().collect();
                s.dense = layers;
                if let Some((dev, upload)) = gpu {
                    if upload == Upload::Staged {
                        s.ram_tier_for(&dev, plan);
                    }
                    let n_dev = plan
                        .gpu
                        .as_ref()
                        .map_or(n_slots, |g| g.n_slots)
                        .clamp(1, n_slots);
                    s.gpu = Some(match upload {
                        Upload::Staged => {
                            Self::staged_dense_pool(&s, dev, pinned, n_dev, max_tensor)?
                        }
                        _ => {
                            let pool = s.pool.as_ref().context("no pool")?;
                            // SAFETY: the pool mapping lives as long as the streamer (the
                            // buffer is dropped first: field order of GpuPool inside Streamer).
                            let buf = unsafe {
                                Buffer::from_host(&dev, pool.base(), pool.len, max_tensor)
                            }?;
                            Self::pool_of(upload, buf, None, 0)
                        }
                    });
                    let raw = s
                        .gpu
                        .as_ref()
                        .map(|g| g.buf.raw())
                        .unwrap_or(std::ptr::null_mut());
                    for l in s.dense.iter().flatten() {
                        for t in &l.tensors {
                            // SAFETY: tensor of the live model: from now on its ops run on
                            // the device (set before the context builds any graph).
                            unsafe { (*t.tensor).buffer = raw };
                        }
                    }
                }
            }
            Mode::Experts | Mode::GpuExperts => {
                let mut layers: Vec<Option<ExpertLayer>> = (0..n_layer).map(|_| None).collect();
                // One arena of address space for every expert tensor, each placed
                // so that memory and file offsets agree mod 4096 (aligned reads
                // land in place). Only loaded experts are ever committed.
                let mut layout = Vec::new();
                let mut cursor = 0usize;
                for t in &plan.streamed {
                    let r = find(&t.name)?;
                    if r.nbytes as u64 != t.size {
                        bail!(
                            "'{}': llama.cpp has {} bytes, the file {}",
                            t.name,
                            r.nbytes,
                            t.size
                        );
                    }
                    let n = t.n_experts.unwrap_or(1).max(1) as usize;
                    if !(t.size as usize).is_multiple_of(n) {
                        bail!(
                            "'{}': {} bytes do not split into {n} experts",
                            t.name,
                            t.size
                        );
                    }
                    let start = cursor + slot_offset_for(t.file_offset);
                    layout.push((t, r.tensor, start, n));
                    cursor += slot_len_for(t.file_offset, t.size as usize) + ALIGN;
                }
                let arena = Mapping::new(
                    cursor,
                    nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE,
                    true,
                )?;
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
                        dedicated_slot: None,
                        cache_slot: vec![u32::MAX; n],
                    });
                    if layer.n() != n {
                        bail!(
                            "layer {}: expert tensors disagree on the expert count",
                            t.layer
                        );
                    }
                    // SAFETY: `start` lies inside the arena (cursor accounting above).
                    let base = unsafe { arena.base().add(start) };
                    let expert_bytes = t.size as usize / n;
                    layer.expert_mem += slot_len_for(0, expert_bytes) as u64;
                    let (dev_off, dev_pad) = match &gpu {
                        Some((dev, Upload::Staged)) => {
                            let off = layer.tensors.last().map_or(0, |d: &ExpertTensor| {
                                align_dev(dev, d.dev_off + d.expert_bytes * n + d.dev_pad)
                            });
                            // SAFETY: a tensor of the loaded model (reported by the buffer type).
                            (
                                off,
                                unsafe { dev.alloc_size(tensor) }.saturating_sub(t.size as usize),
                            )
                        }
                        _ => (0, 0),
                    };
                    let piece_off = layer.tensors.last().map_or(0, |d: &ExpertTensor| {
                        d.piece_off + slot_len_for(0, d.expert_bytes) + ALIGN
                    });
                    layer.tensors.push(ExpertTensor {
                        file_offset: t.file_offset,
                        expert_bytes,
                        base,
                        tensor,
                        dev_off,
                        dev_pad,
                        piece_off,
                    });
                    if !staged {
                        // SAFETY: the tensor belongs to the loaded model; experts
                        // now live in the arena (only loaded ones are valid).
                        unsafe { (*tensor).data = base.cast() };
                    }
                    max_n = max_n.max(n);
                }
                for l in layers.iter_mut().flatten() {
                    l.pending = vec![None; l.n() * l.tensors.len()];
                }
                s.ids_scratch = Vec::with_capacity(max_n);
                s.dev_missing = Vec::with_capacity(max_n);
                s.prev_ids = Vec::with_capacity(max_n);
                s.scores = Vec::with_capacity(max_n);
                s.tickets_scratch = Vec::with_capacity(max_n * 4 + 16);
                s.experts = layers;
                if let Some((dev, upload)) = gpu {
                    let pool = match upload {
                        Upload::Staged => {
                            s.pinned_expert_cache(&dev, plan);
                            Self::staged_expert_pool(&mut s, plan, dev, max_n)?
                        }
                        _ => {
                            // SAFETY: the arena lives as long as the streamer.
                            let buf = unsafe {
                                Buffer::from_host(&dev, arena.base(), arena.len, max_tensor)
                            }?;
                            Self::pool_of(upload, buf, None, 0)
                        }
                    };
                    let raw = pool.buf.raw();
                    for l in s.experts.iter().flatten() {
                        for t in &l.tensors {
                            // SAFETY: tensor of the live model, set before any graph is built.
                            unsafe { (*t.tensor).buffer = raw };
                        }
                    }
                    s.gpu = Some(pool);
                }
                s.arena = Some(arena);
            }
        }
        s.release_all();
        Ok(Box::new(s))
    }

    /// Staged experts: the RAM cache in pinned memory, cut into slots of the
    /// largest expert (all tensors' pieces). Without pinned memory (or if it
    /// cannot be had) the pageable arena stays the cache.
    fn pinned_expert_cache(&mut self, dev: &Device, plan: &Plan) {
        let Some(hb) = dev.staging_buft() else { return };
        let slot = self
            .experts
            .iter()
            .flatten()
            .filter_map(|l| {
                l.tensors
                    .last()
                    .map(|t| t.piece_off + slot_len_for(0, t.expert_bytes) + ALIGN)
            })
            .max()
            .unwrap_or(0);
        let n_experts: usize = self.experts.iter().flatten().map(|l| l.n()).sum();
        let n = ((plan.pool_bytes as usize) / slot.max(1))
            .min(n_experts)
            .min(u32::MAX as usize);
        if slot == 0 || n == 0 {
            return;
        }
        // SAFETY: a buffer type of the registered device (its own or its host one).
        match unsafe { Buffer::alloc(hb, n * slot + ALIGN, "pinned expert cache") } {
            Ok(buf) => {
                let base = buf.aligned_base(ALIGN);
                let _ = self.reader.register_buffers(&[(base, n * slot)]);
                for l in self.experts.iter_mut().flatten() {
                    // Accounting in cache slots: the budget is n slots.
                    l.expert_mem = slot as u64;
                }
                self.expert_budget = (n * slot) as u64;
                self.cache_slot_bytes = slot;
                self.cache_free = (0..n as u32).rev().collect();
                self.cache = Some(buf);
            }
            Err(e) => tracing::warn!(
                "no pinned expert cache ({e:#}): copies to the GPU from pageable memory"
            ),
        }
    }

    /// Staged dense: pinned RAM for the plan's RAM-tier layers (each laid
    /// out as in a staging slot). Without it they are read like the others.
    fn ram_tier_for(&mut self, dev: &Device, plan: &Plan) {
        let layers: Vec<usize> = plan
            .ram_layers
            .iter()
            .map(|&l| l as usize)
            .filter(|&l| self.dense.get(l).is_some_and(Option::is_some))
            .collect();
        if layers.is_empty() {
            return;
        }
        let sizes: Vec<usize> = layers
            .iter()
            .map(|&l| {
                self.dense[l].as_ref().map_or(0, |d| {
                    d.tensors
                        .iter()
                        .map(|t| slot_len_for(t.file_offset, t.size))
                        .sum()
                })
            })
            .collect();
        let total: usize = sizes.iter().sum();
        let Some(hb) = dev.staging_buft() else { return };
        // SAFETY: a buffer type of the registered device (its own or its host one).
        match unsafe { Buffer::alloc(hb, total + ALIGN, "RAM tier") } {
            Ok(buf) => {
                let mut off = 0;
                for (&l, &n) in layers.iter().zip(&sizes) {
                    if let Some(d) = self.dense[l].as_mut() {
                        d.ram_off = Some(off);
                    }
                    off += n;
                }
                let base = buf.aligned_base(ALIGN);
                let _ = self.reader.register_buffers(&[(base, total)]);
                self.ram_tier = Some(buf);
            }
            Err(e) => {
                tracing::warn!("no RAM tier ({e:#}): those layers are read from disk every token")
            }
        }
    }

    /// Where the bytes of expert `e`, tensor `j` of `layer` are in RAM.
    fn expert_addr(&self, layer: usize, e: usize, j: usize) -> *mut u8 {
        let l = self.experts[layer].as_ref().expect("expert layer");
        let t = &l.tensors[j];
        match &self.cache {
            Some(c) => {
                let slot = l.cache_slot[e] as usize;
                debug_assert!(slot != u32::MAX as usize);
                let base = c.aligned_base(ALIGN);
                let off = t.file_offset + (e * t.expert_bytes) as u64;
                base.wrapping_add(slot * self.cache_slot_bytes + t.piece_off + slot_offset_for(off))
            }
            None => t.base.wrapping_add(e * t.expert_bytes),
        }
    }

    fn pool_of(
        upload: Upload,
        buf: Buffer,
        pinned: Option<Buffer>,
        dev_slot_bytes: usize,
    ) -> GpuPool {
        GpuPool {
            upload,
            buf: Arc::new(buf),
            pinned,
            dev_slot_bytes,
            guard_off: 0,
            uploader: None,
            dev_free: Vec::new(),
            next_copy: 0,
            slot_owner: Vec::new(),
            slot_valid: Vec::new(),
            shared: Vec::new(),
            next_shared: 0,
        }
    }

    /// Device slots for dense layers (paired with the host staging slots),
    /// a 0xFF guard, and the uploader thread.
    fn staged_dense_pool(
        s: &Streamer,
        dev: Device,
        pinned: Option<Buffer>,
        n_slots: usize,
        max_tensor: usize,
    ) -> Result<GpuPool> {
        let align = dev.alignment().max(256);
        let dev_slot = s
            .dense
            .iter()
            .flatten()
            .filter_map(|l| l.tensors.last().map(|t| t.dev_off + t.size + t.dev_pad))
            .max()
            .unwrap_or(0)
            .next_multiple_of(align);
        let max_dev_tensor = s
            .dense
            .iter()
            .flatten()
            .flat_map(|l| l.tensors.iter().map(|t| t.size + t.dev_pad))
            .max()
            .unwrap_or(max_tensor);
        let guard_off = n_slots * dev_slot;
        // SAFETY: a buffer type of the registered device (its own or its host one).
        let buf = unsafe {
            Buffer::alloc(
                dev.buft(),
                guard_off + max_dev_tensor,
                &format!("{} streaming slots", dev.name()),
            )
        }?;
        buf.clear(0);
        buf.fill(guard_off, 0xFF, max_dev_tensor);
        // The copy list of every layer, for the uploader thread.
        let mut table: Vec<Vec<CopyItem>> = vec![Vec::new(); s.dense.len()];
        for (i, l) in s.dense.iter().enumerate() {
            let Some(l) = l else { continue };
            table[i] = l
                .tensors
                .iter()
                .map(|t| {
                    (
                        t.in_slot + slot_offset_for(t.file_offset),
                        t.dev_off,
                        t.size,
                        t.dev_pad,
                    )
                })
                .collect();
        }

        let mut pool = Self::pool_of(Upload::Staged, buf, pinned, dev_slot);
        pool.guard_off = guard_off;
        pool.dev_free = (0..n_slots).rev().collect();
        let (job_tx, job_rx) = sync_channel::<(u32, u32, usize)>(n_slots + 1);
        let (done_tx, done_rx) = sync_channel::<u32>(n_slots + 1);
        let dbuf = Arc::clone(&pool.buf);
        let thread = std::thread::Builder::new()
            .name("hypura-upload".into())
            .spawn(move || {
                while let Ok((layer, slot, region)) = job_rx.recv() {
                    let (layer, slot) = (layer as usize, slot as usize);
                    for &(src, dst, len, pad) in &table[layer] {
                        let src = region + src;
                        // SAFETY: the slot's reads completed before the job was sent, and
                        // nothing writes the host slot or computes on the device slot
                        // until this layer's `done` has been received.
                        unsafe { dbuf.upload(slot * dev_slot + dst, src as *const u8, len) };
                        dbuf.fill(slot * dev_slot + dst + len, 0, pad);
                    }
                    if done_tx.send(layer as u32).is_err() {
                        break;
                    }
                }
            })
            .context("cannot start the upload thread")?;
        pool.uploader = Some(Uploader {
            jobs: Some(job_tx),
            done: done_rx,
            thread: Some(thread),
        });
        Ok(pool)
    }

    /// Device slots for expert layers: one per dedicated layer, the rest
    /// shared round-robin by the other layers.
    fn staged_expert_pool(
        s: &mut Streamer,
        plan: &Plan,
        dev: Device,
        max_n: usize,
    ) -> Result<GpuPool> {
        let align = dev.alignment().max(256);
        let dev_slot = s
            .experts
            .iter()
            .flatten()
            .filter_map(|l| {
                l.tensors
                    .last()
                    .map(|t| t.dev_off + t.expert_bytes * l.n() + t.dev_pad)
            })
            .max()
            .unwrap_or(0)
            .next_multiple_of(align);
        let gp = plan.gpu.as_ref().context("GPU plan")?;
        let n_layers = s.experts.iter().flatten().count();
        let n_slots = gp.n_slots.clamp(1, n_layers.max(1));
        // SAFETY: a buffer type of the registered device (its own or its host one).
        let buf = unsafe {
            Buffer::alloc(
                dev.buft(),
                n_slots * dev_slot,
                &format!("{} expert slots", dev.name()),
            )
        }?;
        buf.clear(0);
        let mut pool = Self::pool_of(Upload::Staged, buf, None, dev_slot);
        pool.slot_owner = vec![usize::MAX; n_slots];
        pool.slot_valid = vec![vec![false; max_n]; n_slots];
        let mut next = 0usize;
        for (li, l) in s.experts.iter_mut().enumerate() {
            let Some(l) = l else { continue };
            if gp.dedicated_layers.contains(&(li as u32))
                && next < n_slots
                && (n_slots == n_layers || next + 1 < n_slots)
            {
                l.dedicated_slot = Some(next);
                pool.slot_owner[next] = li;
                for t in &l.tensors {
                    // SAFETY: inside the device buffer (slot layout above); the tensor
                    // is the model's, its experts now live in this slot.
                    unsafe {
                        (*t.tensor).data = pool.buf.base().add(next * dev_slot + t.dev_off).cast()
                    };
                }
                next += 1;
            }
        }
        pool.shared = (next..n_slots).collect();
        if pool.shared.is_empty()
            && s.experts
                .iter()
                .flatten()
                .any(|l| l.dedicated_slot.is_none())
        {
            bail!("no shared GPU slot left for the layers without their own");
        }
        for l in s
            .experts
            .iter()
            .flatten()
            .filter(|l| l.dedicated_slot.is_none())
        {
            for t in &l.tensors {
                // SAFETY: a valid device address until the layer gets its slot.
                unsafe {
                    (*t.tensor).data = pool
                        .buf
                        .base()
                        .add(pool.shared[0] * dev_slot + t.dev_off)
                        .cast()
                };
            }
        }
        Ok(pool)
    }

    /// The callback and user data to put in the context parameters. The
    /// streamer must outlive the context.
    pub fn callback(self: &mut Box<Self>) -> (EvalCallback, *mut c_void) {
        (
            Some(eval_callback),
            (&mut **self) as *mut Streamer as *mut c_void,
        )
    }

    /// Puts the eval and abort callbacks into context options.
    ///
    /// # Safety
    /// The streamer must outlive the context made from `opts` (the callbacks
    /// dereference it on every decode).
    pub unsafe fn hook(self: &mut Box<Self>, opts: &mut super::ContextOptions) {
        let (cb, user) = self.callback();
        // SAFETY: the caller keeps the streamer alive for the context's life.
        unsafe { opts.set_callbacks(cb, Some(abort_callback), user) };
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

    /// Where released dense tensors point: the host guard (PROT_NONE: a
    /// missed wait faults instead of computing on stale bytes), or on a
    /// staged device the 0xFF guard (a missed wait computes NaNs).
    fn guard_ptr(&self) -> *mut c_void {
        match &self.gpu {
            // SAFETY: guard_off + the largest tensor lies inside the buffer.
            Some(g) if g.upload == Upload::Staged => {
                unsafe { g.buf.base().add(g.guard_off) }.cast()
            }
            _ => self.guard.base().cast(),
        }
    }

    /// Dense tensors start released.
    fn release_all(&mut self) {
        let guard = self.guard_ptr();
        for l in self.dense.iter_mut().flatten() {
            for t in &l.tensors {
                // SAFETY: tensor of the live model; the guard outlives it.
                unsafe { (*t.tensor).data = guard };
            }
        }
        // The weights that make a node wait for its layer, sorted for lookup.
        self.weight_layer = self
            .dense
            .iter()
            .enumerate()
            .flat_map(|(i, l)| {
                l.iter()
                    .flat_map(move |l| l.tensors.iter().map(move |t| (t.tensor as usize, i)))
            })
            .collect();
        self.weight_layer.sort_unstable();
    }

    /// The streamed layer whose weights node `t` reads, if any.
    fn layer_of_node(&self, t: *mut sys::ggml_tensor) -> Option<usize> {
        if self.weight_layer.is_empty() {
            return None;
        }
        // SAFETY: ggml passes a live node; its sources are live or null.
        let srcs = unsafe { (*t).src };
        srcs.iter().filter(|p| !p.is_null()).find_map(|&p| {
            self.weight_layer
                .binary_search_by_key(&(p as usize), |&(k, _)| k)
                .ok()
                .map(|i| self.weight_layer[i].1)
        })
    }

    fn on_node(&mut self, t: *mut sys::ggml_tensor, ask: bool) -> bool {
        // SAFETY: ggml passes a live node; its name is NUL-terminated.
        let name = unsafe { CStr::from_ptr((*t).name.as_ptr()) }.to_bytes();
        if self.mode.streams_dense() {
            if let Some(layer) = node_layer(name, L_OUT) {
                if layer >= self.n_layer {
                    return false;
                }
                if ask {
                    // Layer N's range ends here: released when it has run.
                    self.note_layer(layer);
                    return true;
                }
                self.release(layer);
                self.poll_uploads();
                self.prefetch_after(layer);
                return self.error.is_none();
            }
            // The first node that reads a streamed weight waits for its layer
            // (before the range it belongs to runs, whichever split that is).
            if ask {
                if let Some(layer) = self.layer_of_node(t) {
                    if let Err(e) = self.ensure_ready(layer) {
                        self.fail(e);
                    }
                }
            }
            return false;
        }
        if self.mode.streams_experts() {
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
        let staged = self
            .gpu
            .as_ref()
            .is_some_and(|g| g.upload == Upload::Staged);
        let guard = self.guard_ptr();
        for l in self.dense.iter().flatten() {
            for t in &l.tensors {
                // SAFETY: tensor of the live model; `zeros` is its reserved
                // buffer range, readable for its whole size (on a staged
                // device: the device guard, as large as any tensor).
                unsafe { (*t.tensor).data = if staged { guard } else { t.zeros } };
            }
        }
    }

    /// Whether an error happened: the context's abort callback reads this.
    pub fn failed(&self) -> bool {
        self.error.is_some()
    }

    // ------------------------------------------------------------- dense ---

    fn submit_layer(&mut self, layer: usize) -> Result<()> {
        let host_base = self.host_pool_base()?;
        let ram_base = self.ram_tier.as_ref().map(|b| b.aligned_base(ALIGN));
        let Some(l) = self.dense[layer].as_mut() else {
            return Ok(());
        };
        if l.state != LayerState::Idle {
            return Ok(());
        }
        l.tickets.clear();
        // A RAM-tier layer reads into its permanent copy (once) and needs no
        // staging slot; the others read into a host slot.
        let slot_base = match (l.ram_off, ram_base) {
            (Some(off), Some(base)) => base.wrapping_add(off),
            _ => {
                let slot = self
                    .free_slots
                    .pop()
                    .context("streaming pool exhausted (no free slot)")?;
                l.slot = slot;
                // SAFETY: slot < n_slots, inside the host pool.
                unsafe { host_base.add(slot * self.slot_bytes) }
            }
        };
        if l.ram_valid {
            l.state = LayerState::Loading; // nothing to read: straight to the copy
            return Ok(());
        }
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
            let ticket = unsafe { self.reader.submit(req) }
                .with_context(|| format!("layer {layer}: cannot submit read"))?;
            l.tickets.push(ticket);
            self.metrics.bytes_read += cap as u64;
            self.metrics.reads += 1;
        }
        l.state = LayerState::Loading;
        Ok(())
    }

    /// Start of the host slots: pinned staging, or the pool mapping.
    fn host_pool_base(&self) -> Result<*mut u8> {
        if let Some(p) = self.gpu.as_ref().and_then(|g| g.pinned.as_ref()) {
            return Ok(p.aligned_base(ALIGN));
        }
        Ok(self.pool.as_ref().context("no pool")?.base())
    }

    /// Brings `layer` to Ready: submits its reads if nobody did, waits for
    /// them, and on a staged device has it copied and waits for the copy.
    fn ensure_ready(&mut self, layer: usize) -> Result<()> {
        let staged = self
            .gpu
            .as_ref()
            .is_some_and(|g| g.upload == Upload::Staged);
        loop {
            let Some(state) = self.dense[layer].as_ref().map(|l| l.state) else {
                return Ok(());
            };
            match state {
                LayerState::Ready => return Ok(()),
                LayerState::Idle => self.submit_layer(layer)?,
                LayerState::Loading => {
                    let t0 = Instant::now();
                    let l = self.dense[layer].as_mut().context("dense layer")?;
                    for &tk in &l.tickets {
                        self.reader
                            .wait(tk)
                            .with_context(|| format!("layer {layer}: read failed"))?;
                    }
                    l.tickets.clear();
                    let waited = t0.elapsed().as_nanos() as u64;
                    self.metrics.stall_ns += waited;
                    self.metrics.io_busy_ns += waited;
                    if staged {
                        // Copies go in compute order and every layer before
                        // this one has been released: a device slot is free.
                        if !self.dispatch_upload(layer)? {
                            bail!("layer {layer}: no free device slot");
                        }
                        continue;
                    }
                    let base = self.host_pool_base()?;
                    let l = self.dense[layer].as_mut().context("dense layer")?;
                    for t in &l.tensors {
                        // SAFETY: the read into this slot completed; the bytes of the
                        // tensor start at its in-slot offset plus file offset mod 4096.
                        unsafe {
                            let p = base.add(
                                l.slot * self.slot_bytes
                                    + t.in_slot
                                    + slot_offset_for(t.file_offset),
                            );
                            (*t.tensor).data = p.cast();
                        }
                    }
                    l.state = LayerState::Ready;
                }
                LayerState::Uploading => {
                    let t0 = Instant::now();
                    self.wait_upload(layer)?;
                    self.metrics.stall_ns += t0.elapsed().as_nanos() as u64;
                }
                LayerState::Uploaded => {
                    let g = self.gpu.as_ref().context("device pool")?;
                    let l = self.dense[layer].as_mut().context("dense layer")?;
                    for t in &l.tensors {
                        // SAFETY: the copy into this device slot completed (done received).
                        unsafe {
                            (*t.tensor).data = g
                                .buf
                                .base()
                                .add(l.dev_slot * g.dev_slot_bytes + t.dev_off)
                                .cast()
                        };
                    }
                    l.state = LayerState::Ready;
                }
            }
        }
    }

    /// Staged: hands a layer whose reads completed to the uploader thread,
    /// into a free device slot; false when none is free (yet).
    fn dispatch_upload(&mut self, layer: usize) -> Result<bool> {
        let host_base = self.host_pool_base()? as usize;
        let ram_base = self
            .ram_tier
            .as_ref()
            .map(|b| b.aligned_base(ALIGN) as usize);
        let g = self.gpu.as_mut().context("device pool")?;
        let Some(dev_slot) = g.dev_free.pop() else {
            return Ok(false);
        };
        g.next_copy = (self.pos_of[layer] + 1) % self.order.len().max(1);
        let l = self.dense[layer].as_mut().context("dense layer")?;
        debug_assert!(l.tickets.is_empty());
        l.dev_slot = dev_slot;
        let src = match (l.ram_off, ram_base) {
            (Some(off), Some(base)) => {
                l.ram_valid = true; // its reads have completed
                base + off
            }
            _ => host_base + l.slot * self.slot_bytes,
        };
        let up = self
            .gpu
            .as_ref()
            .and_then(|g| g.uploader.as_ref())
            .context("no uploader")?;
        // Never blocks: at most n_slots layers are in flight and the queue holds n_slots + 1.
        up.jobs
            .as_ref()
            .context("uploader closed")?
            .try_send((layer as u32, dev_slot as u32, src))
            .map_err(|_| anyhow::anyhow!("layer {layer}: the upload queue is full or closed"))?;
        l.state = LayerState::Uploading;
        self.metrics.upload_bytes += l.tensors.iter().map(|t| t.size as u64).sum::<u64>();
        Ok(true)
    }

    /// Staged: waits until the uploader has copied `layer` (layers it
    /// finished on the way are marked too).
    fn wait_upload(&mut self, layer: usize) -> Result<()> {
        loop {
            let up = self
                .gpu
                .as_ref()
                .and_then(|g| g.uploader.as_ref())
                .context("no uploader")?;
            let done = up
                .done
                .recv()
                .map_err(|_| anyhow::anyhow!("the upload thread stopped"))?
                as usize;
            if let Some(l) = self.dense.get_mut(done).and_then(Option::as_mut) {
                debug_assert_eq!(l.state, LayerState::Uploading);
                l.state = LayerState::Uploaded;
                // Copied: the staging slot can take the next read.
                if l.slot != usize::MAX {
                    self.free_slots.push(l.slot);
                    l.slot = usize::MAX;
                }
            }
            if done == layer {
                return Ok(());
            }
        }
    }

    /// Staged: layers whose reads have completed go to the uploader now, so
    /// their copy overlaps the GPU's compute of the layers before them;
    /// strictly in compute order, while device slots are free.
    fn poll_uploads(&mut self) {
        let Some(start) = self
            .gpu
            .as_ref()
            .filter(|g| g.upload == Upload::Staged)
            .map(|g| g.next_copy)
        else {
            return;
        };
        let n = self.order.len();
        for i in 0..n {
            let layer = self.order[(start + i) % n] as usize;
            let Some(l) = self.dense[layer].as_mut() else {
                continue;
            };
            match l.state {
                LayerState::Loading => {}
                LayerState::Idle => return, // not read yet: later layers wait their turn
                _ => continue,              // already handed over
            }
            let mut j = 0;
            while j < l.tickets.len() {
                match self.reader.try_wait(l.tickets[j]) {
                    Ok(Some(_)) => {
                        l.tickets.swap_remove(j);
                    }
                    Ok(None) => j += 1,
                    Err(e) => {
                        let e =
                            anyhow::Error::new(e).context(format!("layer {layer}: read failed"));
                        self.fail(e);
                        return;
                    }
                }
            }
            if !l.tickets.is_empty() {
                return;
            }
            match self.dispatch_upload(layer) {
                Ok(true) => {}
                Ok(false) => return, // no device slot free until a release
                Err(e) => {
                    self.fail(e);
                    return;
                }
            }
        }
    }

    fn release(&mut self, layer: usize) {
        let guard = self.guard_ptr();
        let Some(l) = self.dense[layer].as_mut() else {
            return;
        };
        if l.state != LayerState::Ready {
            return;
        }
        for t in &l.tensors {
            // SAFETY: tensor of the live model; the guard outlives it.
            unsafe { (*t.tensor).data = guard };
        }
        l.state = LayerState::Idle;
        if l.dev_slot != usize::MAX {
            if let Some(g) = self.gpu.as_mut() {
                debug_assert!(!g.dev_free.contains(&l.dev_slot));
                g.dev_free.push(l.dev_slot);
            }
            l.dev_slot = usize::MAX;
        }
        if l.slot != usize::MAX {
            debug_assert!(!self.free_slots.contains(&l.slot));
            self.free_slots.push(l.slot);
            l.slot = usize::MAX;
        }
    }

    /// Submits the next `lookahead` streamed layers after `layer`, cyclically.
    fn prefetch_after(&mut self, layer: usize) {
        if self.order.is_empty() || self.lookahead == 0 {
            return;
        }
        let n = self.order.len();
        // First streamed layer after `layer` in cyclic order.
        let start = (layer + 1..self.n_layer)
            .find(|&l| self.pos_of[l] != usize::MAX)
            .map_or(0, |l| self.pos_of[l]);
        for i in 0..self.lookahead.min(n) {
            let next = self.order[(start + i) % n] as usize;
            let needs_slot = self.dense[next]
                .as_ref()
                .is_some_and(|l| l.ram_off.is_none() || self.ram_tier.is_none());
            if self.free_slots.is_empty() && needs_slot {
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
            (
                t.ne[0] as usize,
                t.ne[1] as usize,
                t.nb[1],
                t.data as *const u8,
            )
        };
        // On a GPU (attention there, experts on the CPU) the ids are copied
        // back first; the view's strided bytes come along as they are.
        // SAFETY: live node; its buffer pointer is valid or null.
        let on_host =
            unsafe { (*topk).buffer.is_null() || sys::ggml_backend_buffer_is_host((*topk).buffer) };
        if !on_host {
            // SAFETY: live node.
            let nbytes = unsafe { sys::ggml_nbytes(topk) };
            if self.ids_bytes.len() < nbytes {
                self.ids_bytes.resize(nbytes, 0); // grows once to the largest batch
            }
            // SAFETY: ids_bytes holds nbytes; the backend copies the view's range.
            unsafe {
                sys::ggml_backend_tensor_get(topk, self.ids_bytes.as_mut_ptr().cast(), 0, nbytes)
            };
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

        // Staged GPU tier: experts already in this layer's device slot need
        // nothing; the host part below works on the missing ones only.
        let dev_slot = match self.gpu.as_ref().map(|g| g.upload) {
            Some(Upload::Staged) => Some(self.gpu_slot_for(layer)?),
            _ => None,
        };
        if let Some(slot) = dev_slot {
            let g = self.gpu.as_ref().context("device pool")?;
            self.dev_missing.clear();
            for &id in &self.ids_scratch {
                if g.slot_valid[slot][id as usize] {
                    self.metrics.gpu_hits += 1;
                } else {
                    self.dev_missing.push(id);
                }
            }
            std::mem::swap(&mut self.ids_scratch, &mut self.dev_missing);
        }

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
            let state = self.experts[layer]
                .as_ref()
                .map_or(ExpertState::Loaded, |l| l.state[e]);
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
            if self.experts[layer]
                .as_ref()
                .is_some_and(|l| l.state[e] == ExpertState::Loading)
            {
                self.collect_pending(layer, e);
            }
        }
        let t0 = Instant::now();
        for &tk in &self.tickets_scratch {
            self.reader
                .wait(tk)
                .with_context(|| format!("layer {layer}: expert read failed"))?;
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
        if let Some(slot) = dev_slot {
            self.upload_experts(layer, slot)?;
            std::mem::swap(&mut self.ids_scratch, &mut self.dev_missing);
        }
        self.prev_ids.clear();
        self.prev_ids.extend_from_slice(&self.ids_scratch);
        self.prev_layer = layer;
        if self.lookahead > 0 {
            self.speculate(layer + 1, k)?;
        }
        Ok(())
    }

    /// Staged GPU tier: the device slot of `layer`: its own, the shared slot
    /// it already owns, or the next shared slot (forgetting what it held).
    fn gpu_slot_for(&mut self, layer: usize) -> Result<usize> {
        let el = self.experts[layer].as_ref().context("expert layer")?;
        if let Some(s) = el.dedicated_slot {
            return Ok(s);
        }
        let g = self.gpu.as_mut().context("device pool")?;
        if let Some(&s) = g.shared.iter().find(|&&s| g.slot_owner[s] == layer) {
            return Ok(s);
        }
        if g.shared.is_empty() {
            bail!("layer {layer}: no GPU slot");
        }
        let s = g.shared[g.next_shared % g.shared.len()];
        g.next_shared += 1;
        g.slot_owner[s] = layer;
        g.slot_valid[s].fill(false);
        let n = el.n();
        for t in &el.tensors {
            let off = s * g.dev_slot_bytes + t.dev_off;
            // Row padding after the tensor reads as zeros whatever the slot held.
            g.buf.fill(off + t.expert_bytes * n, 0, t.dev_pad);
            // SAFETY: inside the device buffer (slot layout); the previous
            // owner's compute has completed (computes are synchronous per range).
            unsafe { (*t.tensor).data = g.buf.base().add(off).cast() };
        }
        Ok(s)
    }

    /// Staged GPU tier: copies the experts in `ids_scratch` (loaded in the
    /// RAM cache) into `layer`'s device slot.
    fn upload_experts(&mut self, layer: usize, slot: usize) -> Result<()> {
        let t0 = Instant::now();
        let el = self.experts[layer].as_ref().context("expert layer")?;
        let g = self.gpu.as_ref().context("device pool")?;
        for &id in &self.ids_scratch {
            let e = id as usize;
            debug_assert_eq!(el.state[e], ExpertState::Loaded);
            for (j, t) in el.tensors.iter().enumerate() {
                let dst = slot * g.dev_slot_bytes + t.dev_off + e * t.expert_bytes;
                // SAFETY: the expert's reads completed (Loaded): its bytes in the
                // RAM cache are valid; the device range is this layer's, idle.
                unsafe {
                    g.buf
                        .upload(dst, self.expert_addr(layer, e, j), t.expert_bytes)
                };
                self.metrics.upload_bytes += t.expert_bytes as u64;
            }
        }
        let g = self.gpu.as_mut().context("device pool")?;
        for &id in &self.ids_scratch {
            g.slot_valid[slot][id as usize] = true;
        }
        self.metrics.stall_ns += t0.elapsed().as_nanos() as u64;
        Ok(())
    }

    /// Moves expert `e`'s in-flight tickets into the wait list.
    fn collect_pending(&mut self, layer: usize, e: usize) {
        let Some(el) = self.experts[layer].as_mut() else {
            return;
        };
        let nt = el.tensors.len();
        for slot in &mut el.pending[e * nt..(e + 1) * nt] {
            if let Some(tk) = slot.take() {
                self.tickets_scratch.push(tk);
            }
        }
    }

    /// Submits the reads of expert `e` of `layer` (all its tensors).
    fn submit_expert(&mut self, layer: usize, e: usize) -> Result<()> {
        if self.cache.is_some() {
            let slot = self
                .cache_free
                .pop()
                .with_context(|| format!("layer {layer}: the expert cache has no free slot"))?;
            self.experts[layer]
                .as_mut()
                .context("expert layer")?
                .cache_slot[e] = slot;
        }
        let nt = self.experts[layer]
            .as_ref()
            .context("expert layer")?
            .tensors
            .len();
        for j in 0..nt {
            let addr = self.expert_addr(layer, e, j);
            let el = self.experts[layer].as_mut().context("expert layer")?;
            let t = &el.tensors[j];
            let off = t.file_offset + (e * t.expert_bytes) as u64;
            // SAFETY: `addr` is the expert's place in the arena (memory ≡ file
            // offset mod 4096) or in its pinned cache slot (piece start +
            // offset mod 4096): the aligned superset lands in place when it
            // starts at the aligned-down address, inside the same range.
            let dst = unsafe { addr.sub(slot_offset_for(off)) };
            let cap = slot_len_for(off, t.expert_bytes);
            let req = ReadRequest {
                file: FileId(0),
                file_offset: off,
                len: t.expert_bytes,
                dst,
                dst_cap: cap,
            };
            // SAFETY: the range belongs to this expert (neighbour bytes in the
            // shared boundary pages are rewritten with identical file bytes);
            // nothing computes on it until its tickets have been waited for.
            let tk = unsafe { self.reader.submit(req) }
                .with_context(|| format!("layer {layer}: cannot submit expert read"))?;
            el.pending[e * nt + j] = Some(tk);
            self.metrics.bytes_read += cap as u64;
            self.metrics.reads += 1;
        }
        let el = self.experts[layer].as_mut().context("expert layer")?;
        el.state[e] = ExpertState::Loading;
        self.expert_resident += el.expert_mem;
        Ok(())
    }

    /// Counts which experts of `layer` followed the previous layer's picks.
    fn learn_coactivation(&mut self, layer: usize) {
        if self.prev_layer == usize::MAX || self.prev_layer + 1 != layer {
            return;
        }
        let Some(el) = self.experts[layer].as_mut() else {
            return;
        };
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
        let Some(el) = self.experts.get(layer).and_then(Option::as_ref) else {
            return Ok(());
        };
        let n = el.n();
        self.scores.clear();
        for e in 0..n {
            if el.state[e] != ExpertState::Empty {
                continue;
            }
            let score: u32 = self
                .prev_ids
                .iter()
                .filter(|&&p| (p as usize) < n)
                .map(|&p| el.coact[p as usize * n + e])
                .sum();
            if score > 0 {
                self.scores.push((score, e));
            }
        }
        self.scores
            .sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
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
                    if l.state[e] != ExpertState::Loaded
                        || (li == keep_layer && l.last_used[e] == pass)
                    {
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
        let Some(l) = self.experts[layer].as_mut() else {
            return;
        };
        if self.cache.is_some() {
            // The pinned cache keeps its memory: the slot is free for another.
            debug_assert!(l.cache_slot[e] != u32::MAX);
            self.cache_free.push(l.cache_slot[e]);
            l.cache_slot[e] = u32::MAX;
        }
        for t in l.tensors.iter().filter(|_| self.cache.is_none()) {
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

impl Drop for Streamer {
    fn drop(&mut self) {
        // The uploader thread reads the host slots: stop it before they go.
        self.gpu = None;
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

/// Which nodes end a compute range, for a resident run that is to compute
/// exactly as a streaming run does (`run --reference-cuts`): ggml fuses ops
/// within a range (on CUDA, e.g. the router's softmax/top-k/weights), so
/// cutting changes kernels, not the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Cuts {
    /// At `l_out-N`, as dense streaming.
    Dense,
    /// At `ffn_moe_topk-N`, as expert streaming.
    Experts,
}

static CUTS_DENSE: Cuts = Cuts::Dense;
static CUTS_EXPERTS: Cuts = Cuts::Experts;

/// The eval callback and user data that cut ranges like `cuts`.
pub fn cuts_callback(cuts: Cuts) -> (EvalCallback, *mut c_void) {
    let p: &'static Cuts = if cuts == Cuts::Dense {
        &CUTS_DENSE
    } else {
        &CUTS_EXPERTS
    };
    (Some(cuts_eval), p as *const Cuts as *mut c_void)
}

unsafe extern "C" fn cuts_eval(t: *mut sys::ggml_tensor, ask: bool, user: *mut c_void) -> bool {
    if !ask {
        return true;
    }
    // SAFETY: `user` is one of the statics above; `t` a live node with a
    // NUL-terminated name.
    let (cuts, name) = unsafe {
        (
            *(user as *const Cuts),
            CStr::from_ptr((*t).name.as_ptr()).to_bytes(),
        )
    };
    match cuts {
        Cuts::Dense => node_layer(name, L_OUT).is_some(),
        Cuts::Experts => node_layer(name, TOPK).is_some(),
    }
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
