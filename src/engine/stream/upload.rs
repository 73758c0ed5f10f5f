//! Device upload (the GPU tier): the device buffer streamed tensors compute on.
//!
//! - Direct (Metal, APUs, the CPU device): the host slots or the expert arena
//!   are wrapped as a device buffer; reads land where the device computes and
//!   nothing is copied.
//! - Staged (a discrete GPU): device slots filled by copies from host memory.
//!   Dense layers are copied by the [`Uploader`] thread while the device
//!   computes the layers before them; released dense tensors point at a 0xFF
//!   guard. Expert layers own a slot for good (their experts stay on the
//!   device across tokens) or share the remaining slots round-robin.

use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{anyhow, bail, Context as _, Result};
use hypura_sys as sys;

use crate::engine::device::{Buffer, Device, Upload};
use crate::io::slot_offset_for;
use crate::scheduler::Plan;

use super::dense::DenseSlots;
use super::experts::{ExpertCache, ExpertLayer, ExpertTensor};
use super::memory::Mapping;

/// The streaming engine's device side.
pub(super) struct GpuPool {
    pub upload: Upload,
    /// Staged: device slots (then a guard for released dense tensors).
    /// Direct: the host pool or arena wrapped as a device buffer.
    pub buf: Arc<Buffer>,
    pub dev_slot_bytes: usize,
    /// Staged dense: where released tensors point (filled with 0xFF: a
    /// missed wait computes NaNs, never another layer's weights).
    guard_off: usize,
    uploader: Option<Uploader>,
    /// Staged dense: free device slots (fewer than the host staging slots:
    /// reads run ahead in RAM, the device only needs the layer computing and
    /// the one being copied).
    pub dev_free: Vec<usize>,
    /// Staged dense: the compute-order position copies are handed out from
    /// (copies go in compute order, so a free device slot always serves the
    /// next layer needed).
    pub next_copy: usize,
    /// Staged experts: per slot, the owning layer and which experts it holds.
    slot_owner: Vec<usize>,
    pub slot_valid: Vec<Vec<bool>>,
    /// Staged experts: slots no layer owns for good, used round-robin.
    shared: Vec<usize>,
    next_shared: usize,
    /// Direct slots (a device with addresses of its own, e.g. Vulkan): per
    /// slot, its host memory's first address and that memory imported as a
    /// buffer of the device. `buf` is then the 0xFF guard.
    direct: Vec<(usize, Buffer)>,
    /// Direct expert slots: the host memory imported (after `direct`: the
    /// imports are freed before it is unmapped).
    host: Option<Mapping>,
}

/// The largest expert tensor (the guard's size).
fn max_tensor_of(cache: &ExpertCache) -> usize {
    cache
        .layers
        .iter()
        .flatten()
        .flat_map(|l| l.tensors.iter().map(|t| t.expert_bytes * l.n()))
        .max()
        .unwrap_or(crate::io::ALIGN)
}

impl Drop for GpuPool {
    fn drop(&mut self) {
        // The uploader reads the host slots and writes `buf`: join it before
        // either goes (the engine drops its device pool before its memory).
        self.uploader.take();
    }
}

/// The staged dense path's copy thread: jobs (layer, device slot, address of
/// the layer's host bytes) in, finished layers out.
pub(super) struct Uploader {
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

impl Uploader {
    /// Hands `layer` (its reads complete, its bytes at `src`) to the thread,
    /// to be copied into `dev_slot`. Never blocks: at most one job per device
    /// slot is in flight and the queue holds one more.
    pub fn send(&self, layer: usize, dev_slot: usize, src: usize) -> Result<()> {
        self.jobs
            .as_ref()
            .context("uploader closed")?
            .try_send((layer as u32, dev_slot as u32, src))
            .map_err(|_| anyhow!("layer {layer}: the upload queue is full or closed"))
    }

    /// Waits for the next layer the thread has finished copying.
    pub fn recv(&self) -> Result<usize> {
        let done = self
            .done
            .recv()
            .map_err(|_| anyhow!("the upload thread stopped"))?;
        Ok(done as usize)
    }
}

/// One tensor copy of a dense layer: (offset in the host slot of its first
/// byte, offset in the device slot, bytes, zero padding after it).
type CopyItem = (usize, usize, usize, usize);

impl GpuPool {
    fn new(upload: Upload, buf: Buffer, dev_slot_bytes: usize) -> GpuPool {
        GpuPool {
            upload,
            buf: Arc::new(buf),
            dev_slot_bytes,
            guard_off: 0,
            uploader: None,
            dev_free: Vec::new(),
            next_copy: 0,
            slot_owner: Vec::new(),
            slot_valid: Vec::new(),
            shared: Vec::new(),
            next_shared: 0,
            direct: Vec::new(),
            host: None,
        }
    }

    /// Direct, per slot: `n_slots` ranges of `slot_bytes` from `base` (host
    /// memory the reads land in) each imported as a buffer of `dev` (zero
    /// copies: the device computes where the reads land), and a 0xFF guard
    /// of `guard_len` device bytes for released tensors. One import per slot
    /// keeps each under the device's largest buffer (lavapipe: 128 MiB of
    /// storage-buffer range) and lets tensors name the buffer they are in.
    ///
    /// # Safety
    /// The memory must stay mapped for as long as the pool lives.
    pub unsafe fn direct_slots(
        dev: &Device,
        base: *mut u8,
        n_slots: usize,
        slot_bytes: usize,
        guard_len: usize,
    ) -> Result<GpuPool> {
        let mut direct = Vec::with_capacity(n_slots);
        for s in 0..n_slots {
            let start = base.wrapping_add(s * slot_bytes);
            // SAFETY: the caller keeps [base, base + n_slots * slot_bytes) mapped
            // for the pool's lifetime; this is slot s of it.
            let buf = unsafe { Buffer::from_host(dev, start, slot_bytes, slot_bytes) }
                .with_context(|| format!("slot {s} of {n_slots}"))?;
            direct.push((start as usize, buf));
        }
        // SAFETY: the device's own buffer type (a registered device).
        let guard = unsafe {
            Buffer::alloc(
                dev.buft(),
                guard_len.max(1),
                &format!("{} streaming guard", dev.name()),
            )
        }?;
        guard.fill(0, 0xFF, guard_len);
        let mut pool = GpuPool::new(Upload::Direct, guard, slot_bytes);
        pool.direct = direct;
        Ok(pool)
    }

    /// Direct expert slots (a device with addresses of its own, e.g. Vulkan
    /// on an APU): like the staged expert slots (a slot holds every expert
    /// tensor of one layer; dedicated layers keep theirs, the others share),
    /// but each slot is host memory imported as a buffer and the selected
    /// experts are read from disk straight into it — no RAM cache, no copy.
    /// Each layer is laid out in a slot with every tensor at its file offset
    /// mod 4096 and a page of room on both sides, so an expert's aligned
    /// read lands in place (boundary pages get the same file bytes their
    /// neighbours hold). Points every expert tensor into its slot (a shared
    /// layer: the first shared slot, until it gets its own turn).
    pub fn direct_experts(
        cache: &mut ExpertCache,
        plan: &Plan,
        dev: Device,
        max_n: usize,
    ) -> Result<GpuPool> {
        const PAGE: usize = crate::io::ALIGN;
        let mut dev_slot = 0usize;
        for l in cache.layers.iter_mut().flatten() {
            let n = l.n();
            let mut cursor = PAGE;
            for t in &mut l.tensors {
                t.dev_off = cursor.next_multiple_of(PAGE) + (t.file_offset as usize % PAGE);
                t.dev_pad = 0;
                cursor = t.dev_off + t.expert_bytes * n + PAGE;
            }
            dev_slot = dev_slot.max(cursor.next_multiple_of(PAGE));
        }
        let gp = plan.gpu.as_ref().context("GPU plan")?;
        let n_layers = cache.layers.iter().flatten().count();
        let n_slots = gp.n_slots.clamp(1, n_layers.max(1));
        let host = Mapping::read_write(n_slots * dev_slot, false)?;
        // SAFETY: `host` is owned by the pool, declared after the imports
        // (field order: the imports are freed before it is unmapped).
        let mut pool = unsafe {
            GpuPool::direct_slots(&dev, host.base(), n_slots, dev_slot, max_tensor_of(cache))
        }?;
        pool.host = Some(host);
        pool.slot_owner = vec![usize::MAX; n_slots];
        pool.slot_valid = vec![vec![false; max_n]; n_slots];
        let mut next = 0usize;
        for (li, l) in cache.layers.iter_mut().enumerate() {
            let Some(l) = l else { continue };
            if gp.dedicated_layers.contains(&(li as u32))
                && next < n_slots
                && (n_slots == n_layers || next + 1 < n_slots)
            {
                l.dedicated_slot = Some(next);
                pool.slot_owner[next] = li;
                pool.point_experts(next, l);
                next += 1;
            }
        }
        pool.shared = (next..n_slots).collect();
        let first_shared = pool.shared.first().copied();
        for l in cache.layers.iter().flatten() {
            if l.dedicated_slot.is_some() {
                continue;
            }
            let s = first_shared.context("no shared slot left for the layers without their own")?;
            pool.point_experts(s, l);
        }
        Ok(pool)
    }

    /// Direct expert slots: host memory of slot `slot` where `layer`'s
    /// tensor `t` (laid out in the slot) starts.
    pub fn expert_host(&self, slot: usize, t: &ExpertTensor) -> *mut u8 {
        (self.direct[slot].0 + t.dev_off) as *mut u8
    }

    /// Direct expert slots: points the layer's tensors into slot `slot`.
    fn point_experts(&self, slot: usize, l: &ExpertLayer) {
        for t in &l.tensors {
            let (buf, d) = self.direct_addr(slot, self.expert_host(slot, t));
            // SAFETY: a tensor of the live model (the engine's contract); the
            // address lies inside the slot's import, which lives as long as the
            // pool. The previous owner's compute has completed (ggml syncs
            // each range before the next ask).
            unsafe {
                (*t.tensor).buffer = buf;
                (*t.tensor).data = d.cast();
            }
        }
    }

    /// Direct slots: the pool imports each slot on its own (tensors must be
    /// pointed with [`direct_addr`](Self::direct_addr)).
    pub fn per_slot(&self) -> bool {
        !self.direct.is_empty()
    }

    /// Direct slots: the buffer and device address of host address `host`
    /// in slot `slot`.
    pub fn direct_addr(
        &self,
        slot: usize,
        host: *const u8,
    ) -> (sys::ggml_backend_buffer_t, *mut u8) {
        let (start, b) = &self.direct[slot];
        let off = (host as usize).wrapping_sub(*start);
        assert!(off < b.len(), "address outside slot {slot}");
        (b.raw(), b.base().wrapping_add(off))
    }

    /// Direct: `[base, base + len)` of host memory wrapped as a buffer of `dev`.
    ///
    /// # Safety
    /// The memory must stay mapped for as long as the pool lives.
    pub unsafe fn direct(
        dev: &Device,
        upload: Upload,
        base: *mut u8,
        len: usize,
        max_tensor: usize,
    ) -> Result<GpuPool> {
        // SAFETY: the caller keeps the memory mapped for the pool's lifetime.
        let buf = unsafe { Buffer::from_host(dev, base, len, max_tensor) }?;
        Ok(GpuPool::new(upload, buf, 0))
    }

    pub fn staged(&self) -> bool {
        self.upload == Upload::Staged
    }

    /// Staged dense: the 0xFF guard released tensors point at.
    pub fn guard_ptr(&self) -> *mut u8 {
        self.buf.base().wrapping_add(self.guard_off)
    }

    pub fn uploader(&self) -> Result<&Uploader> {
        self.uploader.as_ref().context("no uploader")
    }

    /// Staged dense: device slots for `n_slots` layers, a 0xFF guard as large
    /// as any tensor (with its padding), and the uploader thread.
    pub fn staged_dense(
        dense: &DenseSlots,
        dev: Device,
        n_slots: usize,
        max_tensor: usize,
    ) -> Result<GpuPool> {
        let align = dev.alignment().max(256);
        let dev_slot = dense
            .layers
            .iter()
            .flatten()
            .filter_map(|l| l.tensors.last().map(|t| t.dev_off + t.size + t.dev_pad))
            .max()
            .unwrap_or(0)
            .next_multiple_of(align);
        let max_dev_tensor = dense
            .layers
            .iter()
            .flatten()
            .flat_map(|l| l.tensors.iter().map(|t| t.size + t.dev_pad))
            .max()
            .unwrap_or(max_tensor);
        let guard_off = n_slots * dev_slot;
        // SAFETY: the device's own buffer type (a registered device).
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
        let mut table: Vec<Vec<CopyItem>> = vec![Vec::new(); dense.layers.len()];
        for (i, l) in dense.layers.iter().enumerate() {
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

        let mut pool = GpuPool::new(Upload::Staged, buf, dev_slot);
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
                        // SAFETY: the layer's reads completed before the job was sent,
                        // its host bytes stay unwritten until its `done` is received;
                        // the device slot is this layer's (its previous layer finished
                        // computing before its release); `dbuf` and the host memory
                        // outlive this thread (joined on drop, before the memory goes).
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

    /// Staged experts: device slots for expert layers, one per dedicated
    /// layer, the rest shared round-robin by the other layers. Points every
    /// expert tensor into its slot (a shared layer: the first shared slot,
    /// until it gets its own turn).
    pub fn staged_experts(
        cache: &mut ExpertCache,
        plan: &Plan,
        dev: Device,
        max_n: usize,
    ) -> Result<GpuPool> {
        let align = dev.alignment().max(256);
        let dev_slot = cache
            .layers
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
        let n_layers = cache.layers.iter().flatten().count();
        let n_slots = gp.n_slots.clamp(1, n_layers.max(1));
        // SAFETY: the device's own buffer type (a registered device).
        let buf = unsafe {
            Buffer::alloc(
                dev.buft(),
                n_slots * dev_slot,
                &format!("{} expert slots", dev.name()),
            )
        }?;
        buf.clear(0);
        let mut pool = GpuPool::new(Upload::Staged, buf, dev_slot);
        pool.slot_owner = vec![usize::MAX; n_slots];
        pool.slot_valid = vec![vec![false; max_n]; n_slots];
        let mut next = 0usize;
        for (li, l) in cache.layers.iter_mut().enumerate() {
            let Some(l) = l else { continue };
            if gp.dedicated_layers.contains(&(li as u32))
                && next < n_slots
                && (n_slots == n_layers || next + 1 < n_slots)
            {
                l.dedicated_slot = Some(next);
                pool.slot_owner[next] = li;
                for t in &l.tensors {
                    // SAFETY: `t.tensor` is a tensor of the live model (the
                    // engine's contract); the address lies inside the device
                    // buffer (slot layout above), where its experts now live.
                    unsafe {
                        (*t.tensor).data = pool.buf.base().add(next * dev_slot + t.dev_off).cast()
                    };
                }
                next += 1;
            }
        }
        pool.shared = (next..n_slots).collect();
        if pool.shared.is_empty()
            && cache
                .layers
                .iter()
                .flatten()
                .any(|l| l.dedicated_slot.is_none())
        {
            bail!("no shared GPU slot left for the layers without their own");
        }
        for l in cache
            .layers
            .iter()
            .flatten()
            .filter(|l| l.dedicated_slot.is_none())
        {
            for t in &l.tensors {
                // SAFETY: a tensor of the live model; a valid device address
                // (inside the first shared slot) until the layer gets its slot.
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

    /// Staged experts: the device slot of `layer`: its own, the shared slot
    /// it already owns, or the next shared slot (forgetting what it held).
    pub fn expert_slot_for(&mut self, layer: usize, el: &ExpertLayer) -> Result<usize> {
        if let Some(s) = el.dedicated_slot {
            return Ok(s);
        }
        if let Some(&s) = self.shared.iter().find(|&&s| self.slot_owner[s] == layer) {
            return Ok(s);
        }
        if self.shared.is_empty() {
            bail!("layer {layer}: no GPU slot");
        }
        let s = self.shared[self.next_shared % self.shared.len()];
        self.next_shared += 1;
        self.slot_owner[s] = layer;
        self.slot_valid[s].fill(false);
        if self.per_slot() {
            self.point_experts(s, el);
            return Ok(s);
        }
        let n = el.n();
        for t in &el.tensors {
            let off = s * self.dev_slot_bytes + t.dev_off;
            // Row padding after the tensor reads as zeros whatever the slot held.
            self.buf.fill(off + t.expert_bytes * n, 0, t.dev_pad);
            // SAFETY: a tensor of the live model; the address lies inside the
            // device buffer (slot layout). The previous owner's compute has
            // completed (ggml synchronises each range before ask=false).
            unsafe { (*t.tensor).data = self.buf.base().add(off).cast() };
        }
        Ok(s)
    }
}
