//! Dense layer slots: the state machine of the layers whose FFN streams.
//!
//! A layer is `Idle` (its tensors point at the guard) until its reads are
//! submitted into a free host slot (`Loading`); the first node that needs it
//! waits for the reads and points the tensors at the bytes (`Ready`). After
//! the layer has computed it is released (back to the guard, slot free) and
//! the next `lookahead` streamed layers are submitted, in cyclic order, so the
//! next token's first layers load while this token's last layers compute.
//!
//! On a staged device, a layer whose reads completed goes to the uploader
//! thread (`Uploading`), which copies it into a device slot (`Uploaded`, the
//! host slot free again) before it is `Ready`; copies are handed out strictly
//! in compute order. A RAM-tier layer keeps its bytes in pinned RAM after its
//! first read and is only copied afterwards.

use std::ffi::c_void;
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use hypura_sys as sys;

use crate::engine::device::{Buffer, Device};
use crate::io::{slot_len_for, slot_offset_for, FileId, ReadBackend, ReadRequest, Ticket, ALIGN};

use super::memory::{HostMem, Mapping};
use super::metrics::StreamMetrics;
use super::upload::GpuPool;
use super::TensorSpec;

/// A streamed dense tensor inside a layer's slot.
pub(super) struct DenseTensor {
    pub tensor: *mut sys::ggml_tensor,
    /// Where ggml placed it in the reserved (never written) buffer: reads as
    /// zeros. Used after an I/O error so the aborted compute cannot fault.
    pub zeros: *mut c_void,
    pub file_offset: u64,
    pub size: usize,
    /// Offset of its aligned read inside the slot.
    pub in_slot: usize,
    /// Staged GPU tier: offset in the device slot, and the padding after it
    /// the device's kernels read (kept zero).
    pub dev_off: usize,
    pub dev_pad: usize,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum LayerState {
    Idle,
    Loading,
    /// Read; the uploader thread is copying it to the device slot.
    Uploading,
    /// In the device slot, tensors not pointed there yet.
    Uploaded,
    Ready,
}

/// A dense layer whose FFN streams.
pub(super) struct DenseLayer {
    pub tensors: Vec<DenseTensor>,
    pub state: LayerState,
    pub slot: usize,
    tickets: Vec<Ticket>,
    /// Staged GPU tier, RAM-tier layer: offset of its permanent copy in the
    /// RAM tier buffer, and whether that copy has been read.
    ram_off: Option<usize>,
    ram_valid: bool,
    /// Staged GPU tier: the device slot it is copied into (usize::MAX: none).
    /// `slot` is then its host staging slot, given back once copied.
    pub dev_slot: usize,
}

/// The dense layers, their host slots and where released tensors point.
pub(super) struct DenseSlots {
    pub layers: Vec<Option<DenseLayer>>,
    /// The streamed layers in compute order, and each layer's position in it.
    order: Vec<u32>,
    pos_of: Vec<usize>,
    free_slots: Vec<usize>,
    n_slots: usize,
    slot_bytes: usize,
    lookahead: usize,
    host: Option<HostMem>,
    /// Staged GPU dense: pinned RAM holding the plan's RAM-tier layers.
    ram_tier: Option<Buffer>,
    /// The host guard (PROT_NONE: a missed wait faults instead of computing
    /// on stale bytes), owned here; none without dense layers.
    _guard: Option<Mapping>,
    /// Where released tensors point: the host guard, or on a staged device
    /// its 0xFF guard (a missed wait computes NaNs).
    released: *mut c_void,
    /// The device guard's buffer, when released tensors must name it (a
    /// direct pool imported per slot: each tensor names the buffer it is
    /// in); null otherwise.
    released_buf: sys::ggml_backend_buffer_t,
}

impl DenseSlots {
    /// No dense streaming (resident or expert mode).
    pub fn none() -> DenseSlots {
        DenseSlots {
            layers: Vec::new(),
            order: Vec::new(),
            pos_of: Vec::new(),
            free_slots: Vec::new(),
            n_slots: 0,
            slot_bytes: 0,
            lookahead: 0,
            host: None,
            ram_tier: None,
            _guard: None,
            released: std::ptr::null_mut(),
            released_buf: std::ptr::null_mut(),
        }
    }

    /// The layers of `specs` (file order within a layer), with `lookahead`
    /// layers read ahead into host slots of `slot_bytes`; `staged` lays each
    /// layer out for copies to that device. Host memory comes with
    /// [`alloc_host`](Self::alloc_host).
    pub fn new(
        specs: &[TensorSpec],
        n_layer: usize,
        lookahead: usize,
        slot_bytes: usize,
        staged: Option<&Device>,
    ) -> Result<DenseSlots> {
        let align_dev = |dev: &Device, x: usize| x.next_multiple_of(dev.alignment().max(256));
        let mut layers: Vec<Option<DenseLayer>> = (0..n_layer).map(|_| None).collect();
        let mut max_tensor = ALIGN;
        for t in specs {
            max_tensor = max_tensor.max(t.size);
            let layer = layers[t.layer].get_or_insert_with(|| DenseLayer {
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
            // Device layout: each tensor at an aligned offset, with the room
            // (row padding) the device's kernels expect.
            let (dev_off, dev_pad) = match staged {
                Some(dev) => {
                    let off = layer.tensors.last().map_or(0, |d: &DenseTensor| {
                        align_dev(dev, d.dev_off + d.size + d.dev_pad)
                    });
                    // SAFETY: a tensor of the live model (the engine's contract).
                    (
                        off,
                        unsafe { dev.alloc_size(t.tensor) }.saturating_sub(t.size),
                    )
                }
                None => (0, 0),
            };
            layer.tensors.push(DenseTensor {
                tensor: t.tensor,
                zeros: t.reserved,
                file_offset: t.file_offset,
                size: t.size,
                in_slot,
                dev_off,
                dev_pad,
            });
        }
        for l in layers.iter_mut().flatten() {
            l.tickets.reserve_exact(l.tensors.len());
        }
        let order: Vec<u32> = (0..n_layer as u32)
            .filter(|&l| layers[l as usize].is_some())
            .collect();
        let mut pos_of = vec![usize::MAX; n_layer];
        for (i, &l) in order.iter().enumerate() {
            pos_of[l as usize] = i;
        }
        let n_slots = (lookahead + 1).min(order.len()).max(1);
        let guard = Mapping::guard(max_tensor + ALIGN)?;
        Ok(DenseSlots {
            layers,
            order,
            pos_of,
            free_slots: (0..n_slots).rev().collect(),
            n_slots,
            slot_bytes,
            lookahead,
            host: None,
            ram_tier: None,
            released: guard.base().cast(),
            released_buf: std::ptr::null_mut(),
            _guard: Some(guard),
        })
    }

    /// Where released tensors point.
    #[cfg(test)]
    pub fn released(&self) -> *mut c_void {
        self.released
    }

    pub fn n_slots(&self) -> usize {
        self.n_slots
    }

    /// Reads in flight the layers hold tickets for (tests: the reader has
    /// no others).
    #[cfg(test)]
    pub fn tickets_held(&self) -> usize {
        self.layers.iter().flatten().map(|l| l.tickets.len()).sum()
    }

    /// The host slots: pinned staging memory of `pinned_for`'s backend when
    /// it has some (a staged device), else anonymous memory; registered with
    /// the reader.
    pub fn alloc_host(
        &mut self,
        io: &mut dyn ReadBackend,
        pinned_for: Option<&Device>,
    ) -> Result<()> {
        let len = self.n_slots * self.slot_bytes;
        let pinned = pinned_for
            .and_then(|dev| dev.staging_buft())
            .and_then(|hb| {
                // SAFETY: a buffer type of a registered device (its own or its host one).
                unsafe { Buffer::alloc(hb, len + ALIGN, "pinned staging") }
                    .map_err(|e| {
                        tracing::warn!("no pinned staging ({e:#}): staging in pageable memory")
                    })
                    .ok()
            });
        let host = match pinned {
            Some(p) => HostMem::Pinned(p),
            None => HostMem::Mapped(Mapping::read_write(len, false)?),
        };
        let region = match &host {
            HostMem::Pinned(_) => (host.base(), len),
            HostMem::Mapped(m) => (m.base(), m.len()),
        };
        let _ = io.register_buffers(&[region]);
        self.host = Some(host);
        Ok(())
    }

    /// The host slots' mapping, when they are one (the direct GPU tier wraps it).
    pub fn host_mapping(&self) -> Option<&Mapping> {
        match &self.host {
            Some(HostMem::Mapped(m)) => Some(m),
            _ => None,
        }
    }

    /// Staged dense: pinned RAM of `dev`'s backend for the RAM-tier layers
    /// (each laid out as in a staging slot). Without it they are read like
    /// the others.
    pub fn alloc_ram_tier(&mut self, dev: &Device, ram_layers: &[u32], io: &mut dyn ReadBackend) {
        let layers: Vec<usize> = ram_layers
            .iter()
            .map(|&l| l as usize)
            .filter(|&l| self.layers.get(l).is_some_and(Option::is_some))
            .collect();
        if layers.is_empty() {
            return;
        }
        let sizes: Vec<usize> = layers
            .iter()
            .map(|&l| {
                self.layers[l].as_ref().map_or(0, |d| {
                    d.tensors
                        .iter()
                        .map(|t| slot_len_for(t.file_offset, t.size))
                        .sum()
                })
            })
            .collect();
        let total: usize = sizes.iter().sum();
        let Some(hb) = dev.staging_buft() else { return };
        // SAFETY: a buffer type of a registered device (its own or its host one).
        match unsafe { Buffer::alloc(hb, total + ALIGN, "RAM tier") } {
            Ok(buf) => {
                let mut off = 0;
                for (&l, &n) in layers.iter().zip(&sizes) {
                    if let Some(d) = self.layers[l].as_mut() {
                        d.ram_off = Some(off);
                    }
                    off += n;
                }
                let base = buf.aligned_base(ALIGN);
                let _ = io.register_buffers(&[(base, total)]);
                self.ram_tier = Some(buf);
            }
            Err(e) => {
                tracing::warn!("no RAM tier ({e:#}): those layers are read from disk every token")
            }
        }
    }

    /// Sets where released tensors point and releases every layer.
    /// `released`: a device guard and its buffer (staged or per-slot direct).
    pub fn release_all(&mut self, released: Option<(*mut c_void, sys::ggml_backend_buffer_t)>) {
        if let Some((p, buf)) = released {
            self.released = p;
            self.released_buf = buf;
        }
        for l in self.layers.iter().flatten() {
            for t in &l.tensors {
                // SAFETY: a tensor of the live model (the engine's contract);
                // the guard lives as long as the engine.
                unsafe { self.point_at_guard(t.tensor) };
            }
        }
    }

    /// Points `t` at the guard (and, per-slot direct, at the guard's buffer).
    ///
    /// # Safety
    /// `t` must be a tensor of the live model.
    unsafe fn point_at_guard(&self, t: *mut sys::ggml_tensor) {
        // SAFETY: per the caller; the guard lives as long as the engine.
        unsafe {
            (*t).data = self.released;
            if !self.released_buf.is_null() {
                (*t).buffer = self.released_buf;
            }
        }
    }

    /// After an error: every tensor points at readable memory as large as
    /// itself, so the rest of the (aborted) compute cannot fault: its zero
    /// pages in the reserved buffer, or on a staged device the device guard.
    pub fn point_at_zeros(&self, staged: bool) {
        for l in self.layers.iter().flatten() {
            for t in &l.tensors {
                // SAFETY: a tensor of the live model; `zeros` is its range of
                // the model's reserved buffer, readable for its whole size (on
                // a device: the device guard, as large as any tensor).
                unsafe {
                    match staged {
                        true => self.point_at_guard(t.tensor),
                        false => (*t.tensor).data = t.zeros,
                    }
                }
            }
        }
    }

    /// Submits the reads of `layer` if it is idle, into a free host slot (or
    /// its RAM-tier copy).
    pub fn submit_layer(
        &mut self,
        layer: usize,
        io: &mut dyn ReadBackend,
        m: &mut StreamMetrics,
    ) -> Result<()> {
        let host_base = self.host_base()?;
        let ram_base = self.ram_tier.as_ref().map(|b| b.aligned_base(ALIGN));
        let Some(l) = self.layers[layer].as_mut() else {
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
                // SAFETY: in_slot + cap <= slot_bytes (plan sizing), inside the slot.
                dst: unsafe { slot_base.add(t.in_slot) },
                dst_cap: cap,
            };
            // SAFETY: the range is this layer's part of its slot (or RAM-tier
            // copy), valid while the engine lives (the reader is dropped before
            // the memory). Nothing else reads or writes it until the ticket is
            // collected: no tensor points into the slot before `ensure_ready`
            // has waited, the uploader copies only after that, and the slot is
            // not handed to another layer before this one is released.
            match unsafe { io.submit(req) } {
                Ok(ticket) => l.tickets.push(ticket),
                Err(e) => {
                    // The reads submitted before this one are collected
                    // before the slot goes back (see `collect_and_abandon`).
                    self.collect_and_abandon(layer, io);
                    return Err(
                        anyhow::Error::new(e).context(format!("layer {layer}: cannot submit read"))
                    );
                }
            }
            m.bytes_read += cap as u64;
            m.reads += 1;
        }
        l.state = LayerState::Loading;
        Ok(())
    }

    /// Start of the host slots.
    fn host_base(&self) -> Result<*mut u8> {
        Ok(self.host.as_ref().context("no pool")?.base())
    }

    /// Brings `layer` to Ready: submits its reads if nobody did, waits for
    /// them, and on a staged device has it copied and waits for the copy.
    pub fn ensure_ready(
        &mut self,
        layer: usize,
        io: &mut dyn ReadBackend,
        m: &mut StreamMetrics,
        mut gpu: Option<&mut GpuPool>,
    ) -> Result<()> {
        let staged = gpu.as_ref().is_some_and(|g| g.staged());
        loop {
            let Some(state) = self.layers[layer].as_ref().map(|l| l.state) else {
                return Ok(());
            };
            match state {
                LayerState::Ready => return Ok(()),
                LayerState::Idle => self.submit_layer(layer, io, m)?,
                LayerState::Loading => {
                    let t0 = Instant::now();
                    let l = self.layers[layer].as_mut().context("dense layer")?;
                    if let Some(e) = collect(&mut l.tickets, io) {
                        self.abandon(layer);
                        return Err(
                            anyhow::Error::new(e).context(format!("layer {layer}: read failed"))
                        );
                    }
                    let waited = t0.elapsed().as_nanos() as u64;
                    m.stall_ns += waited;
                    m.io_busy_ns += waited;
                    if staged {
                        // Copies go in compute order and every layer before
                        // this one has been released: a device slot is free.
                        let g = gpu.as_deref_mut().context("device pool")?;
                        if !self.dispatch_upload(layer, m, g)? {
                            bail!("layer {layer}: no free device slot");
                        }
                        continue;
                    }
                    let base = self.host_base()?;
                    let direct = gpu.as_deref().filter(|g| g.per_slot());
                    let l = self.layers[layer].as_mut().context("dense layer")?;
                    for t in &l.tensors {
                        // SAFETY: a tensor of the live model. The read into this slot
                        // completed; the tensor's bytes start at its in-slot offset
                        // plus its file offset mod 4096, inside the slot. Direct per
                        // slot: the same bytes at the device address of the slot's
                        // import (its buffer lives as long as the engine).
                        unsafe {
                            let p = base.add(
                                l.slot * self.slot_bytes
                                    + t.in_slot
                                    + slot_offset_for(t.file_offset),
                            );
                            match direct {
                                Some(g) => {
                                    let (buf, d) = g.direct_addr(l.slot, p);
                                    (*t.tensor).buffer = buf;
                                    (*t.tensor).data = d.cast();
                                }
                                None => (*t.tensor).data = p.cast(),
                            }
                        }
                    }
                    l.state = LayerState::Ready;
                }
                LayerState::Uploading => {
                    let t0 = Instant::now();
                    self.wait_upload(layer, gpu.as_deref().context("device pool")?)?;
                    m.stall_ns += t0.elapsed().as_nanos() as u64;
                }
                LayerState::Uploaded => {
                    let g = gpu.as_deref().context("device pool")?;
                    let l = self.layers[layer].as_mut().context("dense layer")?;
                    for t in &l.tensors {
                        // SAFETY: a tensor of the live model; the copy into this device
                        // slot completed (its `done` was received), the address lies
                        // inside the slot.
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
    fn dispatch_upload(
        &mut self,
        layer: usize,
        m: &mut StreamMetrics,
        g: &mut GpuPool,
    ) -> Result<bool> {
        let host_base = self.host_base()? as usize;
        let ram_base = self
            .ram_tier
            .as_ref()
            .map(|b| b.aligned_base(ALIGN) as usize);
        let Some(dev_slot) = g.dev_free.pop() else {
            return Ok(false);
        };
        g.next_copy = (self.pos_of[layer] + 1) % self.order.len().max(1);
        let l = self.layers[layer].as_mut().context("dense layer")?;
        debug_assert!(l.tickets.is_empty());
        l.dev_slot = dev_slot;
        let src = match (l.ram_off, ram_base) {
            (Some(off), Some(base)) => {
                l.ram_valid = true; // its reads have completed
                base + off
            }
            _ => host_base + l.slot * self.slot_bytes,
        };
        g.uploader()?.send(layer, dev_slot, src)?;
        l.state = LayerState::Uploading;
        m.upload_bytes += l.tensors.iter().map(|t| t.size as u64).sum::<u64>();
        Ok(true)
    }

    /// Staged: waits until the uploader has copied `layer` (layers it
    /// finished on the way are marked too).
    fn wait_upload(&mut self, layer: usize, g: &GpuPool) -> Result<()> {
        loop {
            let done = g.uploader()?.recv()?;
            if let Some(l) = self.layers.get_mut(done).and_then(Option::as_mut) {
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
    pub fn poll_uploads(
        &mut self,
        io: &mut dyn ReadBackend,
        m: &mut StreamMetrics,
        gpu: Option<&mut GpuPool>,
    ) -> Result<()> {
        let Some(g) = gpu.filter(|g| g.staged()) else {
            return Ok(());
        };
        let start = g.next_copy;
        let n = self.order.len();
        for i in 0..n {
            let layer = self.order[(start + i) % n] as usize;
            let Some(l) = self.layers[layer].as_mut() else {
                continue;
            };
            match l.state {
                LayerState::Loading => {}
                LayerState::Idle => return Ok(()), // not read yet: later layers wait their turn
                _ => continue,                     // already handed over
            }
            let mut j = 0;
            while j < l.tickets.len() {
                match io.try_wait(l.tickets[j]) {
                    Ok(Some(_)) => {
                        l.tickets.swap_remove(j);
                    }
                    Ok(None) => j += 1,
                    Err(e) => {
                        l.tickets.swap_remove(j);
                        self.collect_and_abandon(layer, io);
                        return Err(
                            anyhow::Error::new(e).context(format!("layer {layer}: read failed"))
                        );
                    }
                }
            }
            if !l.tickets.is_empty() {
                return Ok(());
            }
            if !self.dispatch_upload(layer, m, g)? {
                return Ok(()); // no device slot free until a release
            }
        }
        Ok(())
    }

    /// A read of `layer` failed: its other reads are collected (none may
    /// land in memory another layer gets, none stays in the reader for
    /// good), then it is abandoned.
    fn collect_and_abandon(&mut self, layer: usize, io: &mut dyn ReadBackend) {
        if let Some(l) = self.layers[layer].as_mut() {
            let _ = collect(&mut l.tickets, io);
        }
        self.abandon(layer);
    }

    /// A read of `layer` failed and all of them have been collected: the
    /// layer is idle again (read afresh when next needed), its slot free.
    fn abandon(&mut self, layer: usize) {
        let Some(l) = self.layers[layer].as_mut() else {
            return;
        };
        debug_assert!(l.tickets.is_empty());
        l.state = LayerState::Idle;
        give_back(&mut self.free_slots, &mut l.slot);
    }

    /// After an aborted pass: every read is collected and every copy has
    /// finished, then every layer is idle with its host and device slots
    /// free, so the next pass starts as the first did. Without this, layers
    /// read or copied ahead of the failure would keep device slots that the
    /// first layers of the next pass need (seen as "no free device slot").
    pub fn reset(&mut self, io: &mut dyn ReadBackend, gpu: Option<&mut GpuPool>) {
        let uploading = self
            .layers
            .iter()
            .flatten()
            .filter(|l| l.state == LayerState::Uploading)
            .count();
        let g = gpu.filter(|g| g.staged());
        if let Some(up) = g.as_ref().and_then(|g| g.uploader().ok()) {
            for _ in 0..uploading {
                // The uploader answers once per job; a stopped thread copies
                // nothing more either.
                if up.recv().is_err() {
                    break;
                }
            }
        }
        let mut dev_free = Vec::new();
        for l in self.layers.iter_mut().flatten() {
            let _ = collect(&mut l.tickets, io);
            // A RAM-tier copy stays valid only if its reads all succeeded:
            // `ram_valid` is set when the copy is dispatched, after them.
            l.state = LayerState::Idle;
            give_back(&mut self.free_slots, &mut l.slot);
            give_back(&mut dev_free, &mut l.dev_slot);
        }
        debug_assert!(self.free_slots.len() <= self.n_slots);
        if let Some(g) = g {
            g.dev_free.extend(dev_free);
            g.next_copy = 0;
            debug_assert!({
                let mut d = g.dev_free.clone();
                d.sort_unstable();
                d.windows(2).all(|w| w[0] != w[1])
            });
        }
    }

    /// `layer` has computed: its tensors go back to the guard, its slots free.
    pub fn release(&mut self, layer: usize, gpu: Option<&mut GpuPool>) {
        let Some(l) = self.layers[layer].as_mut() else {
            return;
        };
        if l.state != LayerState::Ready {
            return;
        }
        for t in &l.tensors {
            // SAFETY: a tensor of the live model; the guard lives as long as the engine.
            unsafe {
                (*t.tensor).data = self.released;
                if !self.released_buf.is_null() {
                    (*t.tensor).buffer = self.released_buf;
                }
            }
        }
        l.state = LayerState::Idle;
        if l.dev_slot != usize::MAX {
            if let Some(g) = gpu {
                debug_assert!(!g.dev_free.contains(&l.dev_slot));
                g.dev_free.push(l.dev_slot);
            }
            l.dev_slot = usize::MAX;
        }
        give_back(&mut self.free_slots, &mut l.slot);
    }

    /// Submits the next `lookahead` streamed layers after `layer`, cyclically.
    pub fn prefetch_after(
        &mut self,
        layer: usize,
        io: &mut dyn ReadBackend,
        m: &mut StreamMetrics,
    ) -> Result<()> {
        if self.order.is_empty() || self.lookahead == 0 {
            return Ok(());
        }
        let n = self.order.len();
        // First streamed layer after `layer` in cyclic order.
        let start = (layer + 1..self.pos_of.len())
            .find(|&l| self.pos_of[l] != usize::MAX)
            .map_or(0, |l| self.pos_of[l]);
        for i in 0..self.lookahead.min(n) {
            let next = self.order[(start + i) % n] as usize;
            let needs_slot = self.layers[next]
                .as_ref()
                .is_some_and(|l| l.ram_off.is_none() || self.ram_tier.is_none());
            if self.free_slots.is_empty() && needs_slot {
                break;
            }
            self.submit_layer(next, io, m)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;

/// Puts a held slot (not `usize::MAX`) back on its free list, once.
fn give_back(free: &mut Vec<usize>, slot: &mut usize) {
    if *slot != usize::MAX {
        debug_assert!(!free.contains(slot));
        free.push(*slot);
        *slot = usize::MAX;
    }
}

/// Waits for every ticket, failed or not (none may still be writing into a
/// slot when it goes back to the pool), and empties the list; the first
/// error, if any.
fn collect(tickets: &mut Vec<Ticket>, io: &mut dyn ReadBackend) -> Option<crate::io::IoError> {
    let mut failed = None;
    for &tk in tickets.iter() {
        if let Err(e) = io.wait(tk) {
            failed.get_or_insert(e);
        }
    }
    tickets.clear();
    failed
}
