//! The expert cache (MoE streaming).
//!
//! Every expert tensor (`*_exps`) has its place in an arena of address space;
//! an expert is a contiguous range of each of its layer's tensors. When the
//! router has picked a layer's experts, the ones not in memory are read
//! (`Empty` → `Loading` → `Loaded`) and stay cached across tokens within the
//! budget; the eviction policy (`policy.rs`: frequency, then recency, by
//! default) picks which loaded expert goes first (never one of the layer's
//! current picks, never one being read).
//!
//! Read-ahead: [`prefetch`](ExpertCache::prefetch) starts the reads of the
//! experts pre-gating (`pregate.rs`) predicts for the next layer; they are
//! `Loading` until that layer's top-k collects every read of the layer.
//! (A co-activation predictor, which experts of layer N followed the picks
//! of layer N−1, did not measurably help on correlated routing and was
//! removed: `docs/performance.md`.)
//!
//! Staged GPU tier: the RAM cache can be pinned memory cut into uniform slots
//! (one expert of a layer each), so copies to the device run at the pinned
//! rate; selected experts already in the layer's device slot need nothing.

use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use hypura_sys as sys;

use crate::engine::device::{Buffer, Device};
use crate::io::{
    slot_len_for, slot_offset_for, FileId, IoError, ReadBackend, ReadRequest, Ticket, ALIGN,
};

use super::memory::{arena_layout, Mapping};
use super::metrics::StreamMetrics;
use super::policy::{self, EvictionPolicy};
use super::recycle::Recycler;
use super::upload::GpuPool;
use super::TensorSpec;

/// One `*_exps` tensor of a layer, its address range in the expert arena.
pub(super) struct ExpertTensor {
    pub file_offset: u64,
    pub expert_bytes: usize,
    /// Where expert 0 starts in memory (same offset mod 4096 as in the file).
    pub base: *mut u8,
    pub tensor: *mut sys::ggml_tensor,
    /// Staged GPU tier: offset in a device slot, and the padding after it.
    pub dev_off: usize,
    pub dev_pad: usize,
    /// Pinned RAM cache: where this tensor's piece of an expert starts in a
    /// cache slot (aligned; the bytes land at + file offset mod 4096).
    pub piece_off: usize,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum ExpertState {
    Empty,
    /// Reads in flight (within `load_selected`); tickets in `pending`.
    Loading,
    Loaded,
}

pub(super) struct ExpertLayer {
    pub tensors: Vec<ExpertTensor>,
    pub state: Vec<ExpertState>,
    /// Per expert × tensor: the ticket of a read in flight.
    pending: Vec<Option<Ticket>>,
    /// Per expert: the pass it was last selected in (eviction spares this
    /// pass's picks).
    last_used: Vec<u64>,
    /// The policy's slot of expert 0 (slots number all layers' experts).
    slot_base: usize,
    /// Memory one expert of this layer takes (all its tensors, aligned).
    expert_mem: u64,
    /// Staged GPU tier: the device slot this layer owns for good, if any.
    pub dedicated_slot: Option<usize>,
    /// Pinned RAM cache: the cache slot of each loaded expert (u32::MAX: none).
    cache_slot: Vec<u32>,
}

impl ExpertLayer {
    pub fn n(&self) -> usize {
        self.state.len()
    }
}

/// The expert layers, the RAM cache they load into, and the predictor.
pub(super) struct ExpertCache {
    pub layers: Vec<Option<ExpertLayer>>,
    budget: u64,
    resident: u64,
    /// Most experts of a layer.
    max_n: usize,
    /// The layer at hand's selected experts (router ids, deduplicated).
    selected: Vec<i32>,
    tickets: Vec<Ticket>,
    /// Selected experts missing from the GPU slot (staged GPU tier).
    dev_missing: Vec<i32>,
    /// The experts of `spare_layer` last read ahead (sorted): eviction
    /// spares them as it spares the layer at hand's picks.
    spare: Vec<i32>,
    spare_layer: usize,
    /// Staged GPU tier: the RAM expert cache as pinned memory cut into
    /// uniform slots (one expert of a layer each), so copies to the GPU run
    /// at the pinned rate; none: the address-space arena (pageable).
    cache: Option<Buffer>,
    cache_slot_bytes: usize,
    cache_free: Vec<u32>,
    /// Address space for every expert tensor; only loaded experts are committed.
    arena: Option<Mapping>,
    /// Which loaded expert to evict first.
    policy: Box<dyn EvictionPolicy>,
    /// Evicted experts' pages, moved to the next missing expert's place
    /// (arena only; `recycle.rs`).
    recycler: Recycler,
}

impl ExpertCache {
    /// No expert streaming.
    pub fn none() -> ExpertCache {
        ExpertCache {
            layers: Vec::new(),
            budget: 0,
            resident: 0,
            max_n: 1,
            selected: Vec::new(),
            tickets: Vec::new(),
            dev_missing: Vec::new(),
            spare: Vec::new(),
            spare_layer: usize::MAX,
            cache: None,
            cache_slot_bytes: 0,
            cache_free: Vec::new(),
            arena: None,
            recycler: Recycler::off(),
            policy: policy::default_policy(0),
        }
    }

    /// The expert layers of `specs` (each tensor's size a multiple of its
    /// expert count), caching up to `budget` bytes of experts. Unless staged
    /// (`staged`: laid out for that device's slots), the tensors now point
    /// into the arena.
    pub fn new(
        specs: &[TensorSpec],
        n_layer: usize,
        budget: u64,
        staged: Option<&Device>,
    ) -> Result<ExpertCache> {
        let align_dev = |dev: &Device, x: usize| x.next_multiple_of(dev.alignment().max(256));
        let mut layers: Vec<Option<ExpertLayer>> = (0..n_layer).map(|_| None).collect();
        // One arena of address space for every expert tensor, each placed so
        // that memory and file offsets agree mod 4096 (aligned reads land in
        // place). Only loaded experts are ever committed.
        let (starts, len) = arena_layout(specs.iter().map(|t| (t.file_offset, t.size)));
        let arena = Mapping::read_write(len, true)?;
        let mut max_n = 1usize;
        for (t, &start) in specs.iter().zip(&starts) {
            let n = t.n_experts;
            let layer = layers[t.layer].get_or_insert_with(|| ExpertLayer {
                tensors: Vec::new(),
                state: vec![ExpertState::Empty; n],
                pending: Vec::new(),
                last_used: vec![0; n],
                slot_base: 0,
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
            // SAFETY: `start` lies inside the arena (`arena_layout`'s accounting).
            let base = unsafe { arena.base().add(start) };
            let expert_bytes = t.size / n;
            layer.expert_mem += slot_len_for(0, expert_bytes) as u64;
            let (dev_off, dev_pad) = match staged {
                Some(dev) => {
                    let off = layer.tensors.last().map_or(0, |d: &ExpertTensor| {
                        align_dev(dev, d.dev_off + d.expert_bytes * n + d.dev_pad)
                    });
                    // SAFETY: a tensor of the live model (the engine's contract).
                    (
                        off,
                        unsafe { dev.alloc_size(t.tensor) }.saturating_sub(t.size),
                    )
                }
                None => (0, 0),
            };
            let piece_off = layer.tensors.last().map_or(0, |d: &ExpertTensor| {
                d.piece_off + slot_len_for(0, d.expert_bytes) + ALIGN
            });
            layer.tensors.push(ExpertTensor {
                file_offset: t.file_offset,
                expert_bytes,
                base,
                tensor: t.tensor,
                dev_off,
                dev_pad,
                piece_off,
            });
            if staged.is_none() {
                // SAFETY: a tensor of the live model; its experts now live in
                // the arena (only loaded ones are valid).
                unsafe { (*t.tensor).data = base.cast() };
            }
            max_n = max_n.max(n);
        }
        let mut n_slots = 0;
        let mut ranges = 0;
        let mut max_tensors = 1;
        for l in layers.iter_mut().flatten() {
            l.pending = vec![None; l.n() * l.tensors.len()];
            l.slot_base = n_slots;
            n_slots += l.n();
            ranges += l.n() * l.tensors.len();
            max_tensors = max_tensors.max(l.tensors.len());
        }
        // Donated ranges at most: a load step's evictions (up to twice the
        // experts of a layer, each a range per tensor), and their splits.
        let recycler = Recycler::new(ranges, 4 * max_n * max_tensors + 16);
        Ok(ExpertCache {
            layers,
            budget,
            max_n,
            selected: Vec::with_capacity(max_n),
            dev_missing: Vec::with_capacity(max_n),
            spare: Vec::with_capacity(max_n),
            tickets: Vec::with_capacity(max_n * 4 + 16),
            arena: Some(arena),
            policy: policy::default_policy(n_slots),
            recycler,
            ..ExpertCache::none()
        })
    }

    /// Replaces the eviction policy (tests; before any pass).
    #[cfg(test)]
    pub fn set_policy(&mut self, k: policy::PolicyKind) {
        let n: usize = self.layers.iter().flatten().map(|l| l.n()).sum();
        self.policy = policy::policy(k, n);
    }

    /// The routing trace header: the budget and, per expert layer, its
    /// index, expert count and memory per expert.
    pub fn trace_header(&self) -> (u64, Vec<(usize, usize, u64)>) {
        let layers = self
            .layers
            .iter()
            .enumerate()
            .filter_map(|(i, l)| l.as_ref().map(|l| (i, l.n(), l.expert_mem)))
            .collect();
        (self.budget, layers)
    }

    pub fn max_n(&self) -> usize {
        self.max_n
    }

    /// Reads in flight the cache holds tickets for (tests: the reader has
    /// no others).
    #[cfg(test)]
    pub fn tickets_held(&self) -> usize {
        let pending: usize = self
            .layers
            .iter()
            .flatten()
            .map(|l| l.pending.iter().flatten().count())
            .sum();
        self.tickets.len() + pending
    }

    /// The arena, for the direct GPU tier to wrap: its pages stay where
    /// they are from now on (no recycling: the device maps them).
    pub fn arena_for_device(&mut self) -> Option<&Mapping> {
        self.recycler.discard();
        self.recycler = Recycler::off();
        self.arena.as_ref()
    }

    /// Whether `layer` streams experts.
    pub fn has_layer(&self, layer: usize) -> bool {
        layer < self.layers.len() && self.layers[layer].is_some()
    }

    /// Experts of `layer`.
    pub fn n_experts(&self, layer: usize) -> Result<usize> {
        Ok(self.layers[layer].as_ref().context("expert layer")?.n())
    }

    /// Starts collecting a layer's router picks.
    pub fn clear_selection(&mut self) {
        self.selected.clear();
    }

    /// Adds the router's pick `id` of `layer` (of `n_exp` experts); picks
    /// repeat across tokens of a batch and count once.
    pub fn select(&mut self, layer: usize, id: i32, n_exp: usize) -> Result<()> {
        if id < 0 || id as usize >= n_exp {
            bail!("layer {layer}: router picked expert {id} of {n_exp}");
        }
        if !self.selected.contains(&id) && self.selected.len() < n_exp {
            self.selected.push(id);
        }
        Ok(())
    }

    /// Staged GPU tier: the RAM cache in pinned memory of `dev`'s backend,
    /// cut into slots of the largest expert (all tensors' pieces), `budget`
    /// bytes of them. Without pinned memory (or if it cannot be had) the
    /// pageable arena stays the cache.
    pub fn use_pinned_cache(&mut self, dev: &Device, budget: u64, io: &mut dyn ReadBackend) {
        let Some(hb) = dev.staging_buft() else { return };
        let slot = self
            .layers
            .iter()
            .flatten()
            .filter_map(|l| {
                l.tensors
                    .last()
                    .map(|t| t.piece_off + slot_len_for(0, t.expert_bytes) + ALIGN)
            })
            .max()
            .unwrap_or(0);
        let n_experts: usize = self.layers.iter().flatten().map(|l| l.n()).sum();
        let n = ((budget as usize) / slot.max(1))
            .min(n_experts)
            .min(u32::MAX as usize);
        if slot == 0 || n == 0 {
            return;
        }
        // SAFETY: a buffer type of a registered device (its own or its host one).
        match unsafe { Buffer::alloc(hb, n * slot + ALIGN, "pinned expert cache") } {
            Ok(buf) => {
                let base = buf.aligned_base(ALIGN);
                let _ = io.register_buffers(&[(base, n * slot)]);
                for l in self.layers.iter_mut().flatten() {
                    // Accounting in cache slots: the budget is n slots.
                    l.expert_mem = slot as u64;
                }
                self.budget = (n * slot) as u64;
                self.cache_slot_bytes = slot;
                self.cache_free = (0..n as u32).rev().collect();
                self.cache = Some(buf);
            }
            Err(e) => tracing::warn!(
                "no pinned expert cache ({e:#}): copies to the GPU from pageable memory"
            ),
        }
    }

    /// Where the bytes of expert `e`, tensor `j` of `layer` are in RAM.
    pub fn expert_addr(&self, layer: usize, e: usize, j: usize) -> *mut u8 {
        let l = self.layers[layer].as_ref().expect("expert layer");
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

    /// Loads the selected experts of `layer` (see [`select`](Self::select))
    /// that are not in memory. Staged GPU tier: only the picks missing from
    /// the layer's device slot are loaded, then copied there.
    pub fn load_selected(
        &mut self,
        layer: usize,
        io: &mut dyn ReadBackend,
        m: &mut StreamMetrics,
        mut gpu: Option<&mut GpuPool>,
    ) -> Result<()> {
        if let Some(g) = gpu.as_deref_mut().filter(|g| g.per_slot()) {
            return self.load_into_slot(layer, io, m, g);
        }
        let pass = m.passes;

        // Staged GPU tier: experts already in this layer's device slot need
        // nothing; the host part below works on the missing ones only.
        let dev_slot = match gpu.as_deref_mut() {
            Some(g) if g.staged() => {
                let el = self.layers[layer].as_ref().context("expert layer")?;
                Some(g.expert_slot_for(layer, el)?)
            }
            _ => None,
        };
        if let Some(slot) = dev_slot {
            let g = gpu.as_deref().context("device pool")?;
            self.dev_missing.clear();
            for &id in &self.selected {
                if g.slot_valid[slot][id as usize] {
                    m.gpu_hits += 1;
                } else {
                    self.dev_missing.push(id);
                }
            }
            std::mem::swap(&mut self.selected, &mut self.dev_missing);
        }

        // Mark this pass's picks in use (eviction spares them), count hits.
        let el = self.layers[layer].as_mut().context("expert layer")?;
        let mut need = 0u64;
        for &id in &self.selected {
            let e = id as usize;
            el.last_used[e] = pass;
            self.policy.touch(el.slot_base + e, pass);
            match el.state[e] {
                ExpertState::Empty => need += el.expert_mem,
                ExpertState::Loaded => m.expert_hits += 1,
                // Read ahead (its reads are collected below with the
                // misses'): not a cache hit, its bytes were read for it.
                ExpertState::Loading => {
                    m.expert_misses += 1;
                    m.prefetch_used += 1;
                }
            }
        }
        self.evict_until(need, layer, pass);

        // Every miss of the layer is submitted before the first wait, in
        // expert order, a run of adjacent missing experts as one request per
        // tensor (expert e + 1 follows expert e in the file and the arena).
        self.selected.sort_unstable();
        let mut i = 0;
        while i < self.selected.len() {
            let e = self.selected[i] as usize;
            let run = self.missing_run(layer, i);
            i += run.max(1);
            if run == 0 {
                continue;
            }
            m.expert_misses += run as u64;
            if let Err(err) = self.submit_experts(layer, e, run, io, m) {
                // What was submitted before is collected before the layer is
                // reset: none of it may land in cache memory given to another
                // expert later, none stays in the reader.
                let _ = self.collect_layer(layer, io);
                self.recycler.discard();
                return Err(err);
            }
        }
        // Evicted pages no miss took are given back while the reads run.
        self.recycler.discard();
        let t0 = Instant::now();
        // Every read is collected, failed or not: none may still be writing
        // into the cache when its slot is reused, no read of this layer stays
        // in flight past its top-k.
        if let Err(e) = self.collect_layer(layer, io) {
            return Err(anyhow::Error::new(e).context(format!("layer {layer}: expert read failed")));
        }
        let waited = t0.elapsed().as_nanos() as u64;
        m.stall_ns += waited;
        m.io_busy_ns += waited;
        debug_assert!(self.layers[layer].as_ref().is_some_and(|l| l
            .pending
            .iter()
            .all(Option::is_none)
            && !l.state.contains(&ExpertState::Loading)));
        if let Some(slot) = dev_slot {
            self.upload_experts(layer, slot, gpu.context("device pool")?, m)?;
            std::mem::swap(&mut self.selected, &mut self.dev_missing);
        }
        Ok(())
    }

    /// The experts the router picked for the layer at hand (deduplicated).
    pub fn selected(&self) -> &[i32] {
        &self.selected
    }

    /// Starts reading the experts `ids` of `layer` that are not in memory
    /// (pre-gating's guess for the next layer), without waiting: they are
    /// `Loading` until `layer`'s top-k collects every read of the layer.
    /// Eviction makes room as for a miss but spares `keep_layer`'s picks of
    /// this pass (about to be computed) and the other guesses; a guess that
    /// does not fit then is not read. RAM arena only (not the pinned cache).
    pub fn prefetch(
        &mut self,
        layer: usize,
        ids: &[i32],
        keep_layer: usize,
        io: &mut dyn ReadBackend,
        m: &mut StreamMetrics,
    ) -> Result<()> {
        let Some(el) = self.layers.get(layer).and_then(Option::as_ref) else {
            return Ok(());
        };
        if self.cache.is_some() {
            return Ok(());
        }
        let n = el.n();
        self.spare.clear();
        self.spare.extend(
            ids.iter()
                .copied()
                .filter(|&id| id >= 0 && (id as usize) < n),
        );
        self.spare.sort_unstable();
        self.spare.dedup();
        self.spare_layer = layer;
        let pass = m.passes;
        let mut i = 0;
        while i < self.spare.len() {
            let el = self.layers[layer].as_ref().context("expert layer")?;
            let first = self.spare[i];
            let run = empty_run(el, &self.spare[i..]);
            let mem = el.expert_mem;
            i += run.max(1);
            if run == 0 {
                continue;
            }
            let need = run as u64 * mem;
            self.evict_until(need, keep_layer, pass);
            if self.resident + need > self.budget {
                break;
            }
            if let Err(e) = self.submit_experts(layer, first as usize, run, io, m) {
                self.recycler.discard();
                return Err(e);
            }
            m.prefetched += run as u64;
        }
        self.recycler.discard();
        Ok(())
    }

    /// Collects every expert read in flight (after an error: no read may
    /// still write into the arena when the engine starts again or goes).
    pub fn collect_all(&mut self, io: &mut dyn ReadBackend) {
        for layer in 0..self.layers.len() {
            let _ = self.collect_layer(layer, io);
        }
    }

    /// Direct expert slots: reads the selected experts missing from the
    /// layer's slot straight into it (all of them submitted before any wait;
    /// every submitted read is collected, failed or not, before returning).
    fn load_into_slot(
        &mut self,
        layer: usize,
        io: &mut dyn ReadBackend,
        m: &mut StreamMetrics,
        g: &mut GpuPool,
    ) -> Result<()> {
        let el = self.layers[layer].as_ref().context("expert layer")?;
        let slot = g.expert_slot_for(layer, el)?;
        self.tickets.clear();
        let mut failed = None;
        'experts: for &id in &self.selected {
            let e = id as usize;
            if g.slot_valid[slot][e] {
                m.expert_hits += 1;
                continue;
            }
            m.expert_misses += 1;
            for t in &el.tensors {
                let off = t.file_offset + (e * t.expert_bytes) as u64;
                let addr = g.expert_host(slot, t).wrapping_add(e * t.expert_bytes);
                let cap = slot_len_for(off, t.expert_bytes);
                let req = ReadRequest {
                    file: FileId(0),
                    file_offset: off,
                    len: t.expert_bytes,
                    // The slot mirrors the file mod 4096 with a page of room
                    // around each tensor (`GpuPool::direct_experts`).
                    dst: addr.wrapping_sub(slot_offset_for(off)),
                    dst_cap: cap,
                };
                // SAFETY: the range lies inside this slot's host memory, which the
                // pool keeps mapped while the engine lives (the reader is dropped
                // first); nothing computes on the slot during the callback, and
                // bytes shared with a neighbour expert get the same file bytes.
                match unsafe { io.submit(req) } {
                    Ok(tk) => {
                        self.tickets.push(tk);
                        m.bytes_read += cap as u64;
                        m.reads += 1;
                    }
                    Err(err) => {
                        failed = Some(
                            anyhow::Error::new(err)
                                .context(format!("layer {layer}: cannot submit expert read")),
                        );
                        break 'experts;
                    }
                }
            }
        }
        let t0 = Instant::now();
        for &tk in &self.tickets {
            if let Err(err) = io.wait(tk) {
                failed.get_or_insert_with(|| {
                    anyhow::Error::new(err).context(format!("layer {layer}: expert read failed"))
                });
            }
        }
        self.tickets.clear();
        let waited = t0.elapsed().as_nanos() as u64;
        m.stall_ns += waited;
        m.io_busy_ns += waited;
        if let Some(err) = failed {
            // Experts of this slot that were being read hold partial bytes:
            // the slot forgets them (read afresh when next picked).
            for &id in &self.selected {
                g.slot_valid[slot][id as usize] = false;
            }
            return Err(err);
        }
        for &id in &self.selected {
            g.slot_valid[slot][id as usize] = true;
        }
        Ok(())
    }

    /// Staged GPU tier: copies the selected experts (loaded in the RAM cache)
    /// into `layer`'s device slot.
    fn upload_experts(
        &self,
        layer: usize,
        slot: usize,
        g: &mut GpuPool,
        m: &mut StreamMetrics,
    ) -> Result<()> {
        let t0 = Instant::now();
        let el = self.layers[layer].as_ref().context("expert layer")?;
        for &id in &self.selected {
            let e = id as usize;
            debug_assert_eq!(el.state[e], ExpertState::Loaded);
            for (j, t) in el.tensors.iter().enumerate() {
                let dst = slot * g.dev_slot_bytes + t.dev_off + e * t.expert_bytes;
                // SAFETY: the expert's reads completed (Loaded): its bytes in the
                // RAM cache are valid for `expert_bytes`; the device range is
                // this layer's slot, which nothing computes on during the callback.
                unsafe {
                    g.buf
                        .upload(dst, self.expert_addr(layer, e, j), t.expert_bytes)
                };
                m.upload_bytes += t.expert_bytes as u64;
            }
        }
        for &id in &self.selected {
            g.slot_valid[slot][id as usize] = true;
        }
        m.stall_ns += t0.elapsed().as_nanos() as u64;
        Ok(())
    }

    /// How many experts from `selected[i]` on are missing from the cache and
    /// adjacent (ids `e, e + 1, ...`; `selected` sorted): read as one run.
    /// Zero when `selected[i]` is not missing. Runs are one expert long with
    /// the pinned cache, whose slots are not adjacent.
    fn missing_run(&self, layer: usize, i: usize) -> usize {
        let Some(el) = self.layers[layer].as_ref() else {
            return 0;
        };
        let run = empty_run(el, &self.selected[i..]);
        if self.cache.is_some() {
            run.min(1)
        } else {
            run
        }
    }

    /// Collects every read of `layer` in flight,
    /// failed or not. On a failure the layer's loading experts hold bytes of
    /// failed reads: they are empty again, read afresh when next picked, and
    /// the first error is returned. Otherwise they are loaded.
    fn collect_layer(&mut self, layer: usize, io: &mut dyn ReadBackend) -> Result<(), IoError> {
        self.tickets.clear();
        if let Some(el) = self.layers[layer].as_mut() {
            self.tickets
                .extend(el.pending.iter_mut().filter_map(Option::take));
        }
        let mut failed = None;
        for &tk in &self.tickets {
            if let Err(e) = io.wait(tk) {
                failed.get_or_insert(e);
            }
        }
        self.tickets.clear();
        let n = self.layers[layer].as_ref().map_or(0, |l| l.n());
        for e in 0..n {
            let loading = self.layers[layer]
                .as_ref()
                .is_some_and(|l| l.state[e] == ExpertState::Loading);
            if !loading {
                continue;
            }
            if failed.is_some() {
                self.evict_expert(layer, e);
            } else if let Some(el) = self.layers[layer].as_mut() {
                el.state[e] = ExpertState::Loaded;
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// Submits the reads of experts `e0 .. e0 + count` of `layer` (adjacent
    /// in every tensor: one request per tensor; `count` is 1 with the pinned
    /// cache). Their tickets sit at `e0`'s place in `pending`. If a
    /// submission fails, the reads submitted before it are collected and the
    /// experts stay empty.
    fn submit_experts(
        &mut self,
        layer: usize,
        e0: usize,
        count: usize,
        io: &mut dyn ReadBackend,
        m: &mut StreamMetrics,
    ) -> Result<()> {
        debug_assert!(count >= 1 && (count == 1 || self.cache.is_none()));
        if self.cache.is_some() {
            let slot = self
                .cache_free
                .pop()
                .with_context(|| format!("layer {layer}: the expert cache has no free slot"))?;
            self.layers[layer]
                .as_mut()
                .context("expert layer")?
                .cache_slot[e0] = slot;
        }
        let nt = self.layers[layer]
            .as_ref()
            .context("expert layer")?
            .tensors
            .len();
        for j in 0..nt {
            let addr = self.expert_addr(layer, e0, j);
            let el = self.layers[layer].as_mut().context("expert layer")?;
            debug_assert!((e0..e0 + count).all(|e| el.state[e] == ExpertState::Empty));
            let t = &el.tensors[j];
            let off = t.file_offset + (e0 * t.expert_bytes) as u64;
            let len = count * t.expert_bytes;
            // SAFETY: `addr` is expert e0's place in the arena (memory ≡ file
            // offset mod 4096) or in its pinned cache slot (piece start +
            // offset mod 4096): the aligned superset starts at the aligned-down
            // address, inside the same range.
            let dst = unsafe { addr.sub(slot_offset_for(off)) };
            let cap = slot_len_for(off, len);
            if self.cache.is_none() {
                // The pages wholly inside these experts' bytes (boundary
                // pages may be a neighbour's).
                let a = (addr as usize).next_multiple_of(ALIGN);
                let b = (addr as usize + len) & !(ALIGN - 1);
                let moved = self.recycler.moved;
                // SAFETY: [a, b) lies inside these experts' place in the
                // arena: they are empty, so nothing computes on it, and no
                // read targets it before the one submitted below. Donated
                // ranges are evicted experts' (see `evict_expert`).
                unsafe { self.recycler.fill(a, b) };
                m.recycled_bytes += self.recycler.moved - moved;
            }
            let req = ReadRequest {
                file: FileId(0),
                file_offset: off,
                len,
                dst,
                dst_cap: cap,
            };
            // SAFETY: the range is these experts' place in the arena (they
            // follow each other there as in the file) or expert e0's cache
            // slot, valid while the engine lives (the reader is dropped
            // first). Boundary pages shared with a neighbour expert get
            // identical file bytes, and nothing computes on the tensor before
            // its layer's top-k has waited for every read of the layer.
            match unsafe { io.submit(req) } {
                Ok(tk) => el.pending[e0 * nt + j] = Some(tk),
                Err(e) => {
                    // Collect what this run submitted; the experts stay
                    // empty, their cache slot free.
                    for tk in el.pending[e0 * nt..e0 * nt + j]
                        .iter_mut()
                        .filter_map(Option::take)
                    {
                        let _ = io.wait(tk);
                    }
                    if self.cache.is_some() {
                        self.cache_free.push(el.cache_slot[e0]);
                        el.cache_slot[e0] = u32::MAX;
                    }
                    return Err(anyhow::Error::new(e)
                        .context(format!("layer {layer}: cannot submit expert read")));
                }
            }
            m.bytes_read += cap as u64;
            m.reads += 1;
        }
        let el = self.layers[layer].as_mut().context("expert layer")?;
        for e in e0..e0 + count {
            el.state[e] = ExpertState::Loading;
        }
        self.resident += count as u64 * el.expert_mem;
        Ok(())
    }

    /// Evicts loaded experts, lowest policy priority first (never those
    /// `keep_layer` selected in this pass, never reads in flight), until
    /// `need` more bytes fit in the budget.
    fn evict_until(&mut self, need: u64, keep_layer: usize, pass: u64) {
        while self.resident + need > self.budget {
            let mut best: Option<(usize, usize, u64)> = None;
            for (li, l) in self.layers.iter().enumerate() {
                let Some(l) = l else { continue };
                for e in 0..l.n() {
                    if l.state[e] != ExpertState::Loaded
                        || (li == keep_layer && l.last_used[e] == pass)
                        || (li == self.spare_layer && self.spare.binary_search(&(e as i32)).is_ok())
                    {
                        continue;
                    }
                    let p = self.policy.priority(l.slot_base + e);
                    if best.is_none_or(|(_, _, u)| p < u) {
                        best = Some((li, e, p));
                    }
                }
            }
            let Some((li, e, _)) = best else { break };
            self.evict_expert(li, e);
        }
    }

    fn evict_expert(&mut self, layer: usize, e: usize) {
        let Some(l) = self.layers[layer].as_mut() else {
            return;
        };
        if self.cache.is_some() {
            // The pinned cache keeps its memory: the slot is free for another.
            debug_assert!(l.cache_slot[e] != u32::MAX);
            self.cache_free.push(l.cache_slot[e]);
            l.cache_slot[e] = u32::MAX;
        }
        for t in l.tensors.iter().filter(|_| self.cache.is_none()) {
            // The pages wholly inside this expert's bytes go to the recycler
            // (moved to the next miss, or given back); boundary pages shared
            // with a neighbour stay.
            let start = t.base as usize + e * t.expert_bytes;
            let end = start + t.expert_bytes;
            let a = start.next_multiple_of(ALIGN);
            let b = end & !(ALIGN - 1);
            if b > a {
                // No donated range overlaps [a, b): an expert's pages are
                // donated once per eviction, and a reload first takes back
                // what of them is still donated (`Recycler::fill`).
                // SAFETY: [a, b) lies inside the arena and inside this expert's
                // bytes, which nothing computes on (eviction runs in the eval
                // callback, between computes; the expert is reloaded before a
                // later selection uses it) and no read targets (state Loaded,
                // or Loading with all its reads collected after one failed).
                unsafe { self.recycler.donate(a, b) };
            }
        }
        l.state[e] = ExpertState::Empty;
        self.resident = self.resident.saturating_sub(l.expert_mem);
    }
}

/// How many of `ids` (sorted) from the first on are empty and adjacent
/// (`e, e + 1, ...`): experts read as one request per tensor.
fn empty_run(el: &ExpertLayer, ids: &[i32]) -> usize {
    let Some(&first) = ids.first() else { return 0 };
    ids.iter()
        .enumerate()
        .take_while(|&(j, &id)| {
            id == first + j as i32 && el.state[id as usize] == ExpertState::Empty
        })
        .count()
}

#[cfg(test)]
mod tests;
