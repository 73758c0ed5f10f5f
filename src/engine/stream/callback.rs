//! The eval callback glue: llama.cpp's `cb_eval` and abort callback, the
//! node names that cut compute ranges (`l_out-N`, `ffn_moe_topk-N`), the
//! router ids read from a top-k node, and the cuts-only callback of
//! `run --reference-cuts`.

use std::ffi::{c_void, CStr};
use std::sync::atomic::Ordering;

use anyhow::{bail, Context as _, Result};
use hypura_sys as sys;

use crate::engine::context::EvalCallback;

use super::{Engine, Shared};

/// The last node of layer N.
const L_OUT: &[u8] = b"l_out-";
/// The router's top-k ids of layer N.
const TOPK: &[u8] = b"ffn_moe_topk-";
/// The router's logits of layer N (`mul_mat(gate_inp, ffn_norm)`).
const LOGITS: &[u8] = b"ffn_moe_logits-";

/// Layer index of a node named `PREFIX<digits>` (optionally followed by ` (view)` etc.).
fn node_layer(name: &[u8], prefix: &[u8]) -> Option<usize> {
    let rest = name.strip_prefix(prefix)?;
    let digits = rest.iter().take_while(|c| c.is_ascii_digit()).count();
    if digits == 0 || (digits < rest.len() && rest[digits] != b' ') {
        return None;
    }
    std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()
}

/// The `cb_eval` of a hooked context (see [`Streamer::hook`](super::Streamer::hook)).
pub(super) unsafe extern "C" fn eval_callback(
    t: *mut sys::ggml_tensor,
    ask: bool,
    user: *mut c_void,
) -> bool {
    // SAFETY: `user` is the pointer `Streamer::callback` handed out: the
    // Streamer's `Shared`, alive while a context that calls this exists
    // (`hook`'s contract).
    let shared = unsafe { &*(user as *const Shared) };
    // SAFETY: ggml calls this on the decoding thread, one call at a time, and
    // never while a method of the Streamer runs (`hook`'s contract): this is
    // the only reference to the engine. It is in an UnsafeCell, which the
    // `&Shared` of the abort callback does not cover.
    let engine = unsafe { &mut *shared.engine.get() };
    if engine.error.is_some() {
        // After an I/O error: no more cuts; the abort callback stops compute.
        return false;
    }
    let r = engine.on_node(t, ask);
    if engine.error.is_some() {
        shared.failed.store(true, Ordering::Release);
    }
    r
}

/// Abort callback for the context: stops the compute after a streaming error.
///
/// # Safety
/// `user` must be the pointer [`Streamer::hook`](super::Streamer::hook)
/// registered, and the Streamer must still be alive (`hook`'s contract).
pub unsafe extern "C" fn abort_callback(user: *mut c_void) -> bool {
    // SAFETY: a live `Shared` per the contract; only its atomic flag is read
    // (the engine inside is not touched, so a running eval callback is not
    // aliased).
    let shared = unsafe { &*(user as *const Shared) };
    shared.failed.load(Ordering::Acquire) || crate::engine::interrupt::requested()
}

impl Engine {
    /// One call of the eval callback: whether ggml must stop the current
    /// compute range after `t` (ask) or may go on (answer).
    pub(super) fn on_node(&mut self, t: *mut sys::ggml_tensor, ask: bool) -> bool {
        // SAFETY: ggml passes a live node; its name is NUL-terminated.
        let name = unsafe { CStr::from_ptr((*t).name.as_ptr()) }.to_bytes();
        if ask {
            if let Some(rows) = self.rows.as_mut() {
                if let Err(e) = rows.before_node(t, &mut *self.reader, &mut self.metrics) {
                    self.fail(e);
                    return false;
                }
            }
        }
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
                self.dense.release(layer, self.gpu.as_mut());
                let io = &mut *self.reader;
                if let Err(e) = self
                    .dense
                    .poll_uploads(io, &mut self.metrics, self.gpu.as_mut())
                {
                    self.fail(e);
                }
                if let Err(e) =
                    self.dense
                        .prefetch_after(layer, &mut *self.reader, &mut self.metrics)
                {
                    self.fail(e);
                }
                return self.error.is_none();
            }
            // The first node that reads a streamed weight waits for its layer
            // (before the range it belongs to runs, whichever split that is).
            if ask {
                if let Some(layer) = self.layer_of_node(t) {
                    let io = &mut *self.reader;
                    if let Err(e) =
                        self.dense
                            .ensure_ready(layer, io, &mut self.metrics, self.gpu.as_mut())
                    {
                        self.fail(e);
                    }
                }
            }
            return false;
        }
        if self.mode.streams_experts() {
            if ask {
                if let (Some(p), Some(layer)) = (self.pregate.as_mut(), node_layer(name, LOGITS)) {
                    // SAFETY: ggml passes a live node of the graph it computes.
                    unsafe { p.observe(layer, t) };
                }
            }
            if let Some(layer) = node_layer(name, TOPK) {
                if ask {
                    return self.experts.has_layer(layer);
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
        }
        self.last_layer_seen = layer;
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

    /// Reads the router's top-k ids (an I32 view: index rows with nb[1]) and
    /// has the expert cache load them.
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
        let n_exp = self.experts.n_experts(layer).context("expert layer")?;
        self.experts.clear_selection();
        for row in 0..n_tok {
            self.trace_ids.clear();
            for j in 0..k {
                // SAFETY: row < ne[1], j < ne[0]; nb[1] is the row stride of the
                // node's data (or of its copy in ids_bytes).
                let id = unsafe { *(data.add(row * nb1 + j * 4) as *const i32) };
                self.experts.select(layer, id, n_exp)?;
                if self.trace.is_some() && self.trace_ids.len() < self.trace_ids.capacity() {
                    self.trace_ids.push(id);
                }
            }
            if let Some(t) = self.trace.as_mut() {
                t.record(self.metrics.passes, layer, row, &self.trace_ids)?;
            }
        }
        if let Some(p) = self.pregate.as_mut() {
            p.score(layer, self.experts.selected(), &mut self.metrics);
        }
        let io = &mut *self.reader;
        self.experts
            .load_selected(layer, io, &mut self.metrics, self.gpu.as_mut())?;
        // Decode (one token): guess the next layer's picks from this one's
        // residual stream and start reading them while this layer's experts
        // and the next attention compute.
        if let Some(p) = self.pregate.as_mut().filter(|_| n_tok == 1) {
            // SAFETY: the top-k of `layer` was computed and synchronised in
            // the range that held its observed logits node, whose sources
            // the layer's expert matmuls and residual add still read.
            let reads = p.reads();
            if let Some(ids) = unsafe { p.predict(layer, k) }.filter(|_| reads) {
                self.experts.prefetch(
                    layer + 1,
                    ids,
                    layer,
                    &mut *self.reader,
                    &mut self.metrics,
                )?;
            }
        }
        Ok(())
    }
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

/// The eval callback and user data that cut ranges like `cuts`. The user data
/// points at a static, so the pair may be given to any context.
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
    // SAFETY: `user` is one of the statics above (only read); `t` a live node
    // with a NUL-terminated name.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::stream::fake::FakeTensors;

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

    #[test]
    fn reference_cuts_cut_at_their_nodes_only() {
        let mut nodes = FakeTensors::new();
        let l_out = nodes.add("l_out-4", 1);
        let topk = nodes.add("ffn_moe_topk-4", 1);
        let other = nodes.add("ffn_out-4", 1);
        for (cuts, cut) in [(Cuts::Dense, l_out), (Cuts::Experts, topk)] {
            let (cb, user) = cuts_callback(cuts);
            let cb = cb.unwrap();
            for n in [l_out, topk, other] {
                // SAFETY: live fake nodes and the callback's own user data.
                let (asked, answered) = unsafe { (cb(n, true, user), cb(n, false, user)) };
                assert_eq!(asked, n == cut, "{cuts:?}");
                assert!(answered, "a cut never stops the compute");
            }
        }
    }
}
