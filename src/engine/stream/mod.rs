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
//! callback itself allocates only for an error, and once when router ids of a
//! larger batch than before come back from a device.

//!
//! # Modules
//! - `metrics`: [`StreamMetrics`], the engine's counters.
//! - `memory`: the mappings the engine owns (host slots, expert arena, guard).
//! - `dense`: the dense layer state machine (submit, wait, release, lookahead).
//! - `experts`: the expert cache (LRU) and the co-activation predictor.
//! - `upload`: the GPU tier's device pool and the uploader thread.
//! - `callback`: the eval/abort callbacks, node names, `--reference-cuts`.
//!
//! # Lifetimes
//! The Streamer rewrites the `data` (and on a GPU the `buffer`) of the model's
//! streamed tensors, from [`Streamer::new`] until it is dropped, when it puts
//! back what llama.cpp gave them. So the model must outlive the Streamer, and
//! the Streamer must outlive every context whose callbacks point at it
//! ([`Streamer::hook`]). Dropping in the order context → Streamer → model →
//! buffer type does both. While the Streamer lives, only hooked contexts may
//! compute on the model: elsewhere released tensors point at a PROT_NONE guard.

use std::cell::UnsafeCell;
use std::ffi::c_void;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Context as _, Result};
use hypura_sys as sys;

use crate::io::{ReadBackend, ReaderInfo, ALIGN};
use crate::scheduler::{Mode, Plan};

use super::context::EvalCallback;
use super::device::{Device, Upload};
use super::stream_buft::{ReportedTensor, StreamBufferType};

mod callback;
mod dense;
mod experts;
mod memory;
mod metrics;
pub mod policy;
mod pregate;
mod recycle;
mod rows;
pub mod trace;
mod upload;

#[cfg(test)]
mod fake;
#[cfg(test)]
mod tests;

pub use callback::{abort_callback, cuts_callback, Cuts};
pub use metrics::StreamMetrics;

use dense::DenseSlots;
use experts::ExpertCache;
use pregate::Pregate;
use rows::RowStore;
use upload::GpuPool;

/// A streamed tensor as the engine takes it over: the model's `ggml_tensor`,
/// where llama.cpp placed its data (reserved address space that reads as
/// zeros), and its bytes in the file.
#[derive(Clone, Copy, Debug)]
struct TensorSpec {
    layer: usize,
    tensor: *mut sys::ggml_tensor,
    reserved: *mut c_void,
    file_offset: u64,
    size: usize,
    /// Experts in the tensor (1 for a dense tensor).
    n_experts: usize,
}

/// The streaming engine. Its state lives on the heap at a fixed address, the
/// user data of the callbacks it installs ([`hook`](Streamer::hook)); see the
/// module docs for the lifetime contract.
pub struct Streamer {
    shared: NonNull<Shared>,
    /// What the reader does, as set up (it does not change afterwards).
    info: ReaderInfo,
}

/// What llama.cpp's callbacks reach through their user data. The engine is
/// in an UnsafeCell: the eval callback mutates it through this pointer, so
/// Rust references to the Streamer never cover it.
struct Shared {
    /// An error stopped streaming: the abort callback's answer.
    failed: AtomicBool,
    engine: UnsafeCell<Engine>,
}

/// The engine proper.
///
/// Field order is drop order, and it matters: the reader first (dropping it
/// waits for the reads in flight, which write into the memory below), then
/// the device pool (joins the uploader thread, which reads the host slots,
/// and frees device buffers that wrap host memory), then the memory owners
/// (dense slots, expert cache). [`Drop`] runs before all of them and puts the
/// model's tensors back on their own buffer.
struct Engine {
    reader: Box<dyn ReadBackend>,
    /// The token embeddings read by rows (`plan.embd_rows`).
    rows: Option<RowStore>,
    gpu: Option<GpuPool>,
    dense: DenseSlots,
    experts: ExpertCache,
    /// CPU expert streaming: the next layer's experts guessed and read ahead.
    pregate: Option<Pregate>,
    mode: Mode,
    n_layer: usize,
    last_layer_seen: usize,
    /// Router ids copied back from a device buffer.
    ids_bytes: Vec<u8>,
    /// (streamed dense tensor address, layer), sorted.
    weight_layer: Vec<(usize, usize)>,
    /// Every streamed tensor with the data and buffer llama.cpp gave it.
    restore: Vec<(
        *mut sys::ggml_tensor,
        *mut c_void,
        sys::ggml_backend_buffer_t,
    )>,
    metrics: StreamMetrics,
    error: Option<String>,
    /// `--routing-trace`: every token's experts per layer.
    trace: Option<trace::TraceWriter>,
    /// One token's router ids, for the trace (capacity: the largest k).
    trace_ids: Vec<i32>,
}

impl Streamer {
    /// Takes over the streamed tensors llama.cpp placed in `buft` (after the
    /// model is loaded and names are restored) and sets up the pool; `gpu` is
    /// the device for the GPU modes.
    ///
    /// # Safety
    /// The tensors `buft` reported must belong to a loaded model that outlives
    /// the returned Streamer: it rewrites their data and buffer pointers now,
    /// in its callbacks, and when it is dropped.
    pub unsafe fn new(
        plan: &Plan,
        buft: &StreamBufferType,
        reader: Box<dyn ReadBackend>,
        gpu: Option<(Device, Upload)>,
    ) -> Result<Box<Streamer>> {
        // SAFETY: the reported tensors are the live model's (our contract).
        unsafe { Streamer::from_reported(plan, &buft.reported(), reader, gpu) }
    }

    /// [`new`](Self::new) over the tensors `reported`.
    ///
    /// # Safety
    /// As for `new`: every reported tensor must be a live `ggml_tensor` that
    /// outlives the Streamer.
    unsafe fn from_reported(
        plan: &Plan,
        reported: &[ReportedTensor],
        reader: Box<dyn ReadBackend>,
        gpu: Option<(Device, Upload)>,
    ) -> Result<Box<Streamer>> {
        let engine = Engine::build(plan, reported, reader, gpu)?;
        let info = engine.reader.info().clone();
        let shared = Box::new(Shared {
            failed: AtomicBool::new(false),
            engine: UnsafeCell::new(engine),
        });
        Ok(Box::new(Streamer {
            shared: NonNull::from(Box::leak(shared)),
            info,
        }))
    }

    /// The callback and user data to put in the context parameters.
    ///
    /// # Safety
    /// The pair may only be installed under [`hook`](Self::hook)'s contract.
    pub unsafe fn callback(&self) -> (EvalCallback, *mut c_void) {
        (
            Some(callback::eval_callback),
            self.shared.as_ptr().cast::<c_void>(),
        )
    }

    /// Puts the eval and abort callbacks into context options.
    ///
    /// # Safety
    /// For every context created from `opts` (or a copy of them):
    /// - the context must be dropped before this Streamer (its callbacks
    ///   dereference the Streamer's state);
    /// - its decodes must not run while a method of this Streamer runs (they
    ///   cannot when the context and the Streamer stay on one thread, as their
    ///   types enforce unless something `unsafe impl`s `Send` or `Sync` around
    ///   them).
    pub unsafe fn hook(&self, opts: &mut super::ContextOptions) {
        // SAFETY: our own contract is passed on to the caller: the user data
        // (the Streamer's state) stays valid until the context is dropped.
        unsafe {
            let (cb, user) = self.callback();
            opts.set_callbacks(cb, Some(abort_callback), user);
        }
    }

    fn shared(&self) -> &Shared {
        // SAFETY: allocated in `from_reported`, freed only in `drop`.
        unsafe { self.shared.as_ref() }
    }

    /// The engine, shared.
    fn engine(&self) -> &Engine {
        // SAFETY: the engine is mutated only by the eval callback, which never
        // runs while a method of the Streamer does (`hook`'s contract), and by
        // `&mut self` methods, which exclude this one; no reference into it
        // outlives the method that made it.
        unsafe { &*self.shared().engine.get() }
    }

    /// The engine, exclusive.
    fn engine_mut(&mut self) -> &mut Engine {
        // SAFETY: as in `engine`; `&mut self` excludes every other method call.
        unsafe { &mut *self.shared().engine.get() }
    }

    pub fn metrics(&self) -> StreamMetrics {
        self.engine().metrics
    }

    /// The first I/O error the callback met, if any (the decode is aborted).
    pub fn take_error(&mut self) -> Option<String> {
        let e = self.engine_mut().error.take();
        self.shared().failed.store(false, Ordering::Release);
        e
    }

    /// Writes the router's picks of every token and expert layer to `path`
    /// from now on (see [`trace`]); an error if the model streams no experts.
    pub fn set_routing_trace(&mut self, path: &std::path::Path) -> Result<()> {
        let e = self.engine_mut();
        if !e.mode.streams_experts() {
            bail!("--routing-trace needs expert streaming (an MoE model in --mode experts)");
        }
        let (budget, layers) = e.experts.trace_header();
        e.trace = Some(trace::TraceWriter::create(path, budget, &layers)?);
        e.trace_ids = Vec::with_capacity(e.experts.max_n());
        Ok(())
    }

    /// Whether the router's picks are streamed (expert modes).
    pub fn streams_experts(&self) -> bool {
        self.engine().mode.streams_experts()
    }

    /// Writes out what the routing trace has buffered.
    pub fn flush_routing_trace(&mut self) -> Result<()> {
        match self.engine_mut().trace.as_mut() {
            Some(t) => t.flush(),
            None => Ok(()),
        }
    }

    pub fn reader_info(&self) -> &ReaderInfo {
        &self.info
    }

    /// Whether an error happened: the context's abort callback reads this.
    pub fn failed(&self) -> bool {
        self.shared().failed.load(Ordering::Acquire)
    }
}

impl Drop for Streamer {
    fn drop(&mut self) {
        // SAFETY: allocated by `Box::leak` in `from_reported` and freed only
        // here; no context calls the callbacks any more (`hook`'s contract).
        drop(unsafe { Box::from_raw(self.shared.as_ptr()) });
    }
}

/// The tensor `name` as llama.cpp placed it in the streaming buffer.
fn placed<'a>(reported: &'a [ReportedTensor], name: &str) -> Result<&'a ReportedTensor> {
    reported
        .iter()
        .find(|r| r.name == name)
        .with_context(|| format!("llama.cpp did not place '{name}' in the streaming buffer"))
}

/// The streamed tensors of `plan` as llama.cpp placed them.
fn tensor_specs(plan: &Plan, reported: &[ReportedTensor]) -> Result<Vec<TensorSpec>> {
    let experts = plan.mode.streams_experts();
    plan.streamed
        .iter()
        .map(|t| {
            let r = placed(reported, &t.name)?;
            if r.nbytes as u64 != t.size {
                bail!(
                    "'{}': llama.cpp has {} bytes, the file {}",
                    t.name,
                    r.nbytes,
                    t.size
                );
            }
            let n = match experts {
                true => t.n_experts.unwrap_or(1).max(1) as usize,
                false => 1,
            };
            if !(t.size as usize).is_multiple_of(n) {
                bail!(
                    "'{}': {} bytes do not split into {n} experts",
                    t.name,
                    t.size
                );
            }
            Ok(TensorSpec {
                layer: t.layer as usize,
                tensor: r.tensor,
                reserved: r.data,
                file_offset: t.file_offset,
                size: t.size as usize,
                n_experts: n,
            })
        })
        .collect()
}

impl Engine {
    /// Sets the engine up for `plan` over the `reported` tensors, which must
    /// be live and outlive the engine (`Streamer::new`'s contract).
    fn build(
        plan: &Plan,
        reported: &[ReportedTensor],
        reader: Box<dyn ReadBackend>,
        gpu: Option<(Device, Upload)>,
    ) -> Result<Engine> {
        let gpu = match (plan.mode.on_gpu(), gpu) {
            (true, Some(g)) => Some(g),
            (true, None) => bail!("mode {} needs a GPU device", plan.mode.label()),
            (false, _) => None,
        };
        let staged = gpu
            .as_ref()
            .filter(|(_, u)| *u == Upload::Staged)
            .map(|(d, _)| *d);
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
        let specs = match plan.mode {
            Mode::Resident => Vec::new(),
            _ => tensor_specs(plan, reported)?,
        };
        // From here on an error drops `e`, which puts the tensors back.
        let mut e = Engine {
            reader,
            rows: None,
            gpu: None,
            dense: DenseSlots::none(),
            experts: ExpertCache::none(),
            pregate: None,
            mode: plan.mode,
            n_layer,
            last_layer_seen: usize::MAX,
            ids_bytes: Vec::new(),
            weight_layer: Vec::new(),
            restore: specs
                .iter()
                // SAFETY: tensors of the live model (the caller's contract).
                .map(|t| unsafe { (t.tensor, (*t.tensor).data, (*t.tensor).buffer) })
                .collect(),
            metrics: StreamMetrics::default(),
            error: None,
            trace: None,
            trace_ids: Vec::new(),
        };
        if let Some(r) = plan
            .embd_rows
            .as_ref()
            .filter(|_| plan.mode != Mode::Resident)
        {
            let rep = placed(reported, &r.name)?;
            // SAFETY: a tensor of the live model (the caller's contract); its
            // data and buffer are put back when the engine drops, before the
            // row store's memory is unmapped (field order).
            unsafe {
                e.restore
                    .push((rep.tensor, (*rep.tensor).data, (*rep.tensor).buffer));
                e.rows = Some(RowStore::new(r, rep.tensor, rep.nbytes)?);
            }
        }
        match plan.mode {
            Mode::Resident => {}
            Mode::Dense | Mode::GpuDense => {
                if let Err(err) = e.setup_dense(plan, &specs, n_layer, max_tensor, gpu) {
                    let Some((dev, Upload::Direct)) = gpu else {
                        return Err(err);
                    };
                    // The probe imported, the pool did not (a size limit, the
                    // driver's memory): copies instead, with a note.
                    eprintln!(
                        "note: {} did not import the streaming pool ({err:#}): staged copies instead",
                        dev.name()
                    );
                    e.gpu = None;
                    e.dense = DenseSlots::none();
                    let staged = Some((dev, Upload::Staged));
                    e.setup_dense(plan, &specs, n_layer, max_tensor, staged)?;
                }
            }
            Mode::Experts | Mode::GpuExperts => {
                e.experts = ExpertCache::new(&specs, n_layer, plan.pool_bytes, staged.as_ref())?;
                if plan.mode == Mode::Experts {
                    e.pregate = Some(Pregate::new(n_layer));
                }
                if let Some((dev, upload)) = gpu {
                    let pool = match upload {
                        Upload::Staged => {
                            e.experts
                                .use_pinned_cache(&dev, plan.pool_bytes, &mut *e.reader);
                            let max_n = e.experts.max_n();
                            GpuPool::staged_experts(&mut e.experts, plan, dev, max_n)?
                        }
                        _ if !dev.imports_at_host_addresses() => {
                            let max_n = e.experts.max_n();
                            match GpuPool::direct_experts(&mut e.experts, plan, dev, max_n) {
                                Ok(p) => p,
                                Err(err) => {
                                    // The probe imported, the slots did not: the RAM
                                    // cache and copies instead, with a note.
                                    eprintln!(
                                        "note: {} did not import the expert slots ({err:#}): staged copies instead",
                                        dev.name()
                                    );
                                    e.experts = ExpertCache::new(
                                        &specs,
                                        n_layer,
                                        plan.pool_bytes,
                                        Some(&dev),
                                    )?;
                                    e.experts.use_pinned_cache(
                                        &dev,
                                        plan.pool_bytes,
                                        &mut *e.reader,
                                    );
                                    GpuPool::staged_experts(&mut e.experts, plan, dev, max_n)?
                                }
                            }
                        }
                        _ => {
                            let arena = e.experts.arena_for_device().context("no arena")?;
                            // SAFETY: the arena belongs to `e.experts`, which is
                            // dropped after `e.gpu` (Engine's field order).
                            unsafe {
                                GpuPool::direct(&dev, upload, arena.base(), arena.len(), max_tensor)
                            }?
                        }
                    };
                    if !pool.per_slot() {
                        let raw = pool.buf.raw();
                        for l in e.experts.layers.iter().flatten() {
                            for t in &l.tensors {
                                // SAFETY: a tensor of the live model, set before any
                                // graph is built (put back on drop).
                                unsafe { (*t.tensor).buffer = raw };
                            }
                        }
                    }
                    e.gpu = Some(pool);
                }
            }
        }
        Ok(e)
    }

    /// Dense streaming: host slots, and on a device its pool (staged device
    /// slots, or the host slots imported); every dense tensor starts released.
    fn setup_dense(
        &mut self,
        plan: &Plan,
        specs: &[TensorSpec],
        n_layer: usize,
        max_tensor: usize,
        gpu: Option<(Device, Upload)>,
    ) -> Result<()> {
        let staged = gpu
            .as_ref()
            .filter(|(_, u)| *u == Upload::Staged)
            .map(|(d, _)| *d);
        let e = self;
        e.dense = DenseSlots::new(
            specs,
            n_layer,
            plan.lookahead,
            plan.slot_bytes as usize,
            staged.as_ref(),
        )?;
        e.dense.alloc_host(&mut *e.reader, staged.as_ref())?;
        if let Some((dev, upload)) = gpu {
            if upload == Upload::Staged {
                e.dense
                    .alloc_ram_tier(&dev, &plan.ram_layers, &mut *e.reader);
            }
            let n_slots = e.dense.n_slots();
            let n_dev = plan
                .gpu
                .as_ref()
                .map_or(n_slots, |g| g.n_slots)
                .clamp(1, n_slots);
            let pool = match upload {
                Upload::Staged => GpuPool::staged_dense(&e.dense, dev, n_dev, max_tensor)?,
                _ => {
                    let host = e.dense.host_mapping().context("no pool")?;
                    // SAFETY: the host slots belong to `e.dense`, which is
                    // dropped after `e.gpu` (Engine's field order).
                    unsafe {
                        GpuPool::direct_slots(
                            &dev,
                            host.base(),
                            n_slots,
                            plan.slot_bytes as usize,
                            max_tensor,
                        )
                    }?
                }
            };
            let raw = pool.buf.raw();
            for l in e.dense.layers.iter().flatten() {
                for t in &l.tensors {
                    // SAFETY: a tensor of the live model: from now on its ops
                    // run on the device (set before the context builds any
                    // graph; put back on drop). Direct: the guard's buffer,
                    // where released tensors point.
                    unsafe { (*t.tensor).buffer = raw };
                }
            }
            e.gpu = Some(pool);
        }
        // Dense tensors start released.
        let device_guard = e
            .gpu
            .as_ref()
            .filter(|g| g.staged() || g.per_slot())
            .map(|g| (g.guard_ptr().cast(), g.buf.raw()));
        e.dense.release_all(device_guard);
        // The weights that make a node wait for its layer, sorted for lookup.
        e.weight_layer = e
            .dense
            .layers
            .iter()
            .enumerate()
            .flat_map(|(i, l)| {
                l.iter()
                    .flat_map(move |l| l.tensors.iter().map(move |t| (t.tensor as usize, i)))
            })
            .collect();
        e.weight_layer.sort_unstable();
        Ok(())
    }

    /// Records the first error; every streamed dense tensor is pointed at
    /// zero pages so the rest of the (aborted) compute reads valid memory.
    fn fail(&mut self, e: anyhow::Error) {
        if self.error.is_none() {
            self.error = Some(format!("{e:#}"));
        }
        let on_guard = self
            .gpu
            .as_ref()
            .is_some_and(|g| g.staged() || g.per_slot());
        self.dense.point_at_zeros(on_guard);
        self.dense.reset(&mut *self.reader, self.gpu.as_mut());
        self.experts.collect_all(&mut *self.reader);
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        for &(t, data, buffer) in &self.restore {
            // SAFETY: a tensor of the model, which outlives the engine
            // (`Streamer::new`'s contract); no context computes on it now
            // (`hook`'s contract: they are gone). It gets back the data and
            // buffer llama.cpp gave it, so it no longer points into memory the
            // fields below free.
            unsafe {
                (*t).data = data;
                (*t).buffer = buffer;
            }
        }
    }
}
