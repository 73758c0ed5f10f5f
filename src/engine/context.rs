//! A llama.cpp context (KV cache, compute buffers) over a [`Model`].

use std::ffi::c_void;
use std::ptr::NonNull;
use std::rc::Rc;

use anyhow::{anyhow, bail, Result};
use hypura_sys as sys;

use super::backend;
use super::model::Model;

/// The eval callback type llama.cpp calls per graph node (`cb_eval`).
pub type EvalCallback = sys::ggml_backend_sched_eval_callback;

/// Options for [`Context::new`].
#[derive(Clone, Copy)]
pub struct ContextOptions {
    pub n_ctx: u32,
    pub n_batch: u32,
    pub n_threads: i32,
    /// `cb_eval` and its user data (the streaming engine's hook), or none:
    /// set only through the unsafe [`ContextOptions::set_callbacks`].
    eval_callback: EvalCallback,
    eval_user_data: *mut c_void,
    /// Abort callback (gets `eval_user_data`): true stops the compute.
    abort_callback: sys::ggml_abort_callback,
    /// The CPU threadpool's polling level (`ggml_threadpool_params::poll`),
    /// None for ggml's default. 0 (sleep at once between computes) when the
    /// layers are on a GPU: spinning workers then only take CPU time from the
    /// thread that drives the GPU.
    pub cpu_poll: Option<u32>,
    /// ggml's op offload: with a large batch, ops on weights in host memory
    /// run on the GPU after copying the weights over. The copy happens when a
    /// split starts, before the eval callback can wait for streamed weights,
    /// so streaming turns it off.
    pub op_offload: bool,
}

impl Default for ContextOptions {
    fn default() -> Self {
        ContextOptions {
            n_ctx: 4096,
            n_batch: 512,
            n_threads: 1,
            eval_callback: None,
            eval_user_data: std::ptr::null_mut(),
            abort_callback: None,
            cpu_poll: None,
            op_offload: true,
        }
    }
}

impl ContextOptions {
    /// Installs llama.cpp's eval callback (`cb_eval`) and abort callback,
    /// both called with `user` during every decode of the context.
    ///
    /// # Safety
    /// `user` must stay valid, and usable by the callbacks, until the
    /// [`Context`] made from these options is dropped; the callbacks must be
    /// sound for any node llama.cpp hands them.
    pub unsafe fn set_callbacks(
        &mut self,
        eval: EvalCallback,
        abort: sys::ggml_abort_callback,
        user: *mut c_void,
    ) {
        self.eval_callback = eval;
        self.abort_callback = abort;
        self.eval_user_data = user;
    }
}

/// An owned `llama_context`; it keeps its model alive (an `Rc`, so neither
/// is `Send`). Positions advance with every decoded token.
pub struct Context {
    ptr: NonNull<sys::llama_context>,
    /// A persistent CPU threadpool. Without one, ggml's CPU backend creates and
    /// joins threads on every graph compute, and streaming splits a token
    /// into one compute per layer.
    threadpool: *mut sys::ggml_threadpool,
    model: Rc<Model>,
    n_ctx: u32,
    n_batch: u32,
    n_past: u32,
    /// Reused token batch (`llama_batch_get_one` wants a mutable pointer).
    batch: Vec<i32>,
}

impl Context {
    pub fn new(model: Rc<Model>, opts: ContextOptions) -> Result<Self> {
        backend::init();
        // SAFETY: plain constructor returning a struct by value.
        let mut p = unsafe { sys::llama_context_default_params() };
        p.n_ctx = opts.n_ctx;
        p.n_batch = opts.n_batch;
        p.n_ubatch = opts.n_batch;
        p.n_seq_max = 1;
        p.n_threads = opts.n_threads;
        p.n_threads_batch = opts.n_threads;
        p.cb_eval = opts.eval_callback;
        p.cb_eval_user_data = opts.eval_user_data;
        p.abort_callback = opts.abort_callback;
        p.abort_callback_data = opts.eval_user_data;
        p.no_perf = true;
        p.op_offload = opts.op_offload;
        // SAFETY: the model is kept alive by `model` (dropped after the
        // context, Drop), params fully initialised; callback user data is the
        // caller's promise (ContextOptions::set_callbacks).
        let raw = unsafe { sys::llama_init_from_model(model.as_ptr(), p) };
        let ptr = NonNull::new(raw).ok_or_else(|| {
            anyhow!(
                "could not create a context of {} tokens: {}",
                opts.n_ctx,
                backend::take_last_error().unwrap_or_else(|| "out of memory?".into())
            )
        })?;
        // SAFETY: live context.
        let n_ctx = unsafe { sys::llama_n_ctx(ptr.as_ptr()) };
        // SAFETY: plain constructors; the pool is attached to the context,
        // which is freed before the pool (Drop). Same thread count as the
        // context, so the work split (and the numerics) do not change.
        let threadpool = match cpu_threadpool_fns() {
            Some((new_fn, _)) => unsafe {
                let mut tpp = sys::ggml_threadpool_params_default(opts.n_threads.max(1));
                if let Some(poll) = opts.cpu_poll {
                    tpp.poll = poll;
                }
                let tp = new_fn(&mut tpp);
                if !tp.is_null() {
                    sys::llama_attach_threadpool(ptr.as_ptr(), tp, tp);
                }
                tp
            },
            None => std::ptr::null_mut(),
        };
        let n_batch = opts.n_batch.max(1);
        Ok(Context {
            ptr,
            threadpool,
            model,
            n_ctx,
            n_batch,
            n_past: 0,
            batch: Vec::with_capacity(n_batch as usize),
        })
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Context size in tokens.
    pub fn n_ctx(&self) -> u32 {
        self.n_ctx
    }

    /// Tokens in the KV cache.
    pub fn n_past(&self) -> u32 {
        self.n_past
    }

    /// Decodes `tokens` after what is already in the KV cache, in batches of
    /// at most `n_batch`; afterwards [`Context::logits`] holds the logits of
    /// the last token.
    pub fn decode(&mut self, tokens: &[i32]) -> Result<()> {
        if tokens.is_empty() {
            bail!("nothing to decode");
        }
        let room = self.n_ctx.saturating_sub(self.n_past) as usize;
        if tokens.len() > room {
            bail!(
                "context full: {} tokens in the cache, {} more do not fit in --ctx {}",
                self.n_past,
                tokens.len(),
                self.n_ctx
            );
        }
        for chunk in tokens.chunks(self.n_batch as usize) {
            // llama_batch_get_one takes a mutable pointer but does not write.
            self.batch.clear();
            self.batch.extend_from_slice(chunk);
            // SAFETY: `self.batch` outlives the decode call; the batch only
            // references it. Positions come from the context's memory.
            let rc = unsafe {
                let batch =
                    sys::llama_batch_get_one(self.batch.as_mut_ptr(), self.batch.len() as i32);
                sys::llama_decode(self.ptr.as_ptr(), batch)
            };
            match rc {
                0 => {}
                1 => bail!(
                    "decode failed: no KV cache slot for {} tokens (raise --ctx)",
                    chunk.len()
                ),
                2 => bail!("decode aborted"),
                _ => bail!(
                    "decode failed ({rc}): {}",
                    backend::take_last_error().unwrap_or_else(|| "see HYPURA_LOG=debug".into())
                ),
            }
            self.n_past += chunk.len() as u32;
        }
        Ok(())
    }

    /// Logits of the last decoded token (length = vocabulary size).
    pub fn logits(&self) -> &[f32] {
        let n = self.model.n_vocab();
        // SAFETY: after a successful decode, index -1 is the last output row of
        // n_vocab floats, valid until the next decode (which needs &mut self).
        unsafe {
            let p = sys::llama_get_logits_ith(self.ptr.as_ptr(), -1);
            if p.is_null() {
                return &[];
            }
            std::slice::from_raw_parts(p, n)
        }
    }

    /// Keeps the first `n` positions of the KV cache and forgets the rest
    /// (`llama_memory_seq_rm`); false when the memory cannot drop a suffix
    /// (then nothing was changed: call [`Context::clear`]).
    pub fn truncate(&mut self, n: u32) -> bool {
        if n >= self.n_past {
            return true;
        }
        // SAFETY: live context; sequence 0 is the only one.
        let ok = unsafe {
            sys::llama_memory_seq_rm(sys::llama_get_memory(self.ptr.as_ptr()), 0, n as i32, -1)
        };
        if ok {
            self.n_past = n;
        }
        ok
    }

    /// The lowest position the KV cache still holds for the sequence (a
    /// sliding-window cache drops old ones), or None when it is empty.
    pub fn min_cached_pos(&self) -> Option<u32> {
        // SAFETY: live context; sequence 0.
        let p =
            unsafe { sys::llama_memory_seq_pos_min(sys::llama_get_memory(self.ptr.as_ptr()), 0) };
        (p >= 0).then_some(p as u32)
    }

    /// Forgets everything in the KV cache.
    pub fn clear(&mut self) {
        // SAFETY: live context.
        unsafe { sys::llama_memory_clear(sys::llama_get_memory(self.ptr.as_ptr()), true) };
        self.n_past = 0;
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: we own the context and the threadpool; the context goes
        // first since it references the pool.
        unsafe {
            sys::llama_free(self.ptr.as_ptr());
            if !self.threadpool.is_null() {
                if let Some((_, free_fn)) = cpu_threadpool_fns() {
                    free_fn(self.threadpool);
                }
            }
        }
    }
}

type ThreadpoolNewFn =
    unsafe extern "C" fn(*mut sys::ggml_threadpool_params) -> *mut sys::ggml_threadpool;
type ThreadpoolFreeFn = unsafe extern "C" fn(*mut sys::ggml_threadpool);

/// `ggml_threadpool_new` / `ggml_threadpool_free`, looked up through the CPU
/// backend's registry (`get_proc_address`) rather than linked: with
/// `GGML_BACKEND_DL` the CPU backend is a library loaded at run time, so its
/// symbols cannot be linked; in a static build the registry hands back the
/// very same functions. None when there is no CPU backend or it exports no
/// threadpool (then llama.cpp makes its own threads per compute).
fn cpu_threadpool_fns() -> Option<(ThreadpoolNewFn, ThreadpoolFreeFn)> {
    use std::sync::OnceLock;
    static FNS: OnceLock<Option<(usize, usize)>> = OnceLock::new();
    let (n, f) = (*FNS.get_or_init(|| {
        backend::init();
        // SAFETY: registry queries on initialised backends; names are
        // NUL-terminated literals; a non-null result is the named function.
        unsafe {
            let dev = sys::ggml_backend_dev_by_type(sys::GGML_BACKEND_DEVICE_TYPE_CPU);
            if dev.is_null() {
                return None;
            }
            let reg = sys::ggml_backend_dev_backend_reg(dev);
            if reg.is_null() {
                return None;
            }
            let n = sys::ggml_backend_reg_get_proc_address(reg, c"ggml_threadpool_new".as_ptr());
            let f = sys::ggml_backend_reg_get_proc_address(reg, c"ggml_threadpool_free".as_ptr());
            (!n.is_null() && !f.is_null()).then_some((n as usize, f as usize))
        }
    }))?;
    // SAFETY: the addresses are ggml_threadpool_new / ggml_threadpool_free of
    // the CPU backend, whose signatures these types spell out; backends stay
    // loaded for the life of the process.
    unsafe {
        Some((
            std::mem::transmute::<usize, ThreadpoolNewFn>(n),
            std::mem::transmute::<usize, ThreadpoolFreeFn>(f),
        ))
    }
}
