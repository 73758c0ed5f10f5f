//! Pre-gating: layer N+1's experts predicted from layer N's residual stream,
//! so their reads can start while layer N's experts and layer N+1's
//! attention compute.
//!
//! Sketch (qwen3moe 12 GiB, 64 experts top-8, 38 layers, 4 GiB budget, this
//! 2-core machine, `docs/performance.md`): a token misses ~870 MiB of
//! experts (40% hits), 0.69 s at 1.32 GB/s, and computes for ~0.38 s. Read
//! only when the router has picked, the two add up (1.35 s a token, 0.46× of
//! the disk ceiling); overlapped, a token takes max(read, compute) plus the
//! reads of wrong guesses, which only a good predictor keeps small.
//!
//! The residual stream changes little from one layer to the next (each layer
//! adds a small update to it), so layer N+1's router applied to layer N's
//! FFN input picks most of what it will pick one layer later (the idea of
//! pre-gated MoE, MoE-Infinity, ProMoE). The router is linear and its
//! softmax (or sigmoid) keeps the order, so the prediction is the top-k of
//! `G_{N+1} · (rms_norm(h_N) ⊙ w_{N+1})`, `h_N` = layer N's `ffn_inp`
//! (the input of its RMS norm, found from the `ffn_moe_logits-N` node's
//! sources), `w_{N+1}` = layer N+1's norm weight and `G_{N+1}` its router
//! (both learnt from the first pass's graph). Biases and grouped selection
//! (DeepSeek) are left out: a prediction only has to be mostly right.
//!
//! How right it is, is measured: every prediction is scored against the
//! router's real picks (precision, decayed), and the reads are issued only
//! while that stays at or above [`MIN_PRECISION`]; predictions go on being
//! made and scored when reads stop, so they resume when routing becomes
//! predictable again. Decode only (one token a pass), CPU tensors only.
//! `HYPURA_NO_PREGATE=1` (hidden) turns the reads off, for A/B runs.

use hypura_sys as sys;

use super::metrics::StreamMetrics;

/// Reads ahead only while at least this fraction of predicted experts
/// turned out to be picked (decayed average).
pub const MIN_PRECISION: f64 = 0.5;
/// Weight of the newest prediction in the decayed precision.
const DECAY: f64 = 0.1;

/// What pre-gating needs of a layer, learnt from its router node.
#[derive(Clone, Copy)]
struct LayerGate {
    /// The router weight `[n_embd, n_expert]`, host memory, rows of
    /// `nb[1]` bytes, a type with a `to_float` (or F32).
    gate: *const sys::ggml_tensor,
    /// The FFN norm's weight `[n_embd]` F32; null: the router's input is not
    /// `rms_norm(h) ⊙ w` (the prediction then uses layer N's normed input).
    norm: *const sys::ggml_tensor,
}

pub(super) struct Pregate {
    layers: Vec<Option<LayerGate>>,
    /// The `ffn_moe_logits` node of the range at hand and its layer.
    logits_node: *mut sys::ggml_tensor,
    logits_layer: usize,
    /// Scratch, grown once to the model's width and expert count.
    x: Vec<f32>,
    row: Vec<f32>,
    scores: Vec<f32>,
    /// The last prediction and the layer it is for (usize::MAX: none).
    picks: Vec<i32>,
    picks_layer: usize,
    precision: f64,
    reads_off: bool,
}

impl Pregate {
    pub fn new(n_layer: usize) -> Pregate {
        Pregate {
            layers: vec![None; n_layer],
            logits_node: std::ptr::null_mut(),
            logits_layer: usize::MAX,
            x: Vec::new(),
            row: Vec::new(),
            scores: Vec::new(),
            picks: Vec::new(),
            picks_layer: usize::MAX,
            precision: 1.0,
            reads_off: std::env::var_os("HYPURA_NO_PREGATE").is_some_and(|v| v == "1"),
        }
    }

    /// Whether predictions are to be read ahead now.
    pub fn reads(&self) -> bool {
        !self.reads_off && self.precision >= MIN_PRECISION
    }

    /// The decayed precision of recent predictions.
    #[cfg(test)]
    pub fn precision(&self) -> f64 {
        self.precision
    }

    /// Node `t` is layer `layer`'s `ffn_moe_logits` (seen before it runs):
    /// remembered for [`predict`](Self::predict), and the layer's router and
    /// norm weight learnt the first time.
    ///
    /// # Safety
    /// `t` is a live node of the graph being computed whose sources are live
    /// or null.
    pub unsafe fn observe(&mut self, layer: usize, t: *mut sys::ggml_tensor) {
        if layer >= self.layers.len() {
            return;
        }
        self.logits_node = t;
        self.logits_layer = layer;
        if self.layers[layer].is_none() {
            // SAFETY: our contract.
            self.layers[layer] = unsafe { learn(t) };
        }
    }

    /// Scores the last prediction against layer `layer`'s real picks
    /// (counted in `m`).
    pub fn score(&mut self, layer: usize, picked: &[i32], m: &mut StreamMetrics) {
        if self.picks_layer != layer || self.picks.is_empty() {
            return;
        }
        let hit = self.picks.iter().filter(|p| picked.contains(p)).count();
        m.predicted += self.picks.len() as u64;
        m.predicted_used += hit as u64;
        let p = hit as f64 / self.picks.len() as f64;
        self.precision = (1.0 - DECAY) * self.precision + DECAY * p;
        self.picks.clear();
        self.picks_layer = usize::MAX;
    }

    /// Predicts the `k` experts layer `layer + 1` will pick, from layer
    /// `layer`'s router node (computed, one token). None when that layer's
    /// router is not known yet, the node is not a one-token host tensor of
    /// the expected shape, or there is no next expert layer.
    ///
    /// # Safety
    /// Called when layer `layer`'s top-k has been computed and synchronised,
    /// in the same compute range as its `ffn_moe_logits` node was observed:
    /// that node and its sources are live, and their data (still read by the
    /// layer's expert matmuls and residual add, which come after) is valid.
    pub unsafe fn predict(&mut self, layer: usize, k: usize) -> Option<&[i32]> {
        self.picks.clear();
        self.picks_layer = usize::MAX;
        // A node is used once: the next guess needs the next range's node.
        let node = std::mem::replace(&mut self.logits_node, std::ptr::null_mut());
        if self.logits_layer != layer || node.is_null() {
            return None;
        }
        let next = (*self.layers.get(layer + 1)?)?;
        // SAFETY: our contract (live node and sources, valid host data is
        // checked per tensor by `host_f32_vector`).
        let (input, normed) = unsafe {
            let cur = (*node).src[1];
            match pre_norm_input(cur) {
                Some(h) if !next.norm.is_null() => (h, false),
                _ => (cur, true),
            }
        };
        // SAFETY: live tensors (our contract); the learnt weights are the
        // model's, alive while it is.
        let (h, w, n_exp, n_embd) = unsafe {
            let h = host_f32_vector(input)?;
            let g = &*next.gate;
            let n_embd = g.ne[0] as usize;
            if h.len() != n_embd {
                return None;
            }
            let w = if normed {
                None
            } else {
                Some(host_f32_vector(next.norm.cast_mut())?)
            };
            (h, w, g.ne[1] as usize, n_embd)
        };
        if w.is_some_and(|w| w.len() != n_embd) || k == 0 || k > n_exp {
            return None;
        }
        self.x.resize(n_embd, 0.0); // grows once
        self.row.resize(n_embd, 0.0);
        self.scores.resize(n_exp, 0.0);
        match w {
            Some(w) => {
                let ms = h.iter().map(|&v| v * v).sum::<f32>() / n_embd as f32;
                let inv = 1.0 / (ms + 1e-6).sqrt();
                for ((x, &v), &wi) in self.x.iter_mut().zip(h).zip(w) {
                    *x = v * inv * wi;
                }
            }
            None => self.x.copy_from_slice(h),
        }
        // SAFETY: `next.gate` passed `learn`'s checks: a host tensor of n_exp
        // rows of nb[1] bytes, each n_embd values of a type with a to_float.
        unsafe {
            let g = &*next.gate;
            let traits = &*sys::ggml_get_type_traits(g.type_);
            for e in 0..n_exp {
                let row = (g.data as *const u8).add(e * g.nb[1]);
                let s = if g.type_ == sys::GGML_TYPE_F32 {
                    let r = std::slice::from_raw_parts(row as *const f32, n_embd);
                    dot(r, &self.x)
                } else {
                    let f = traits.to_float?;
                    f(row.cast(), self.row.as_mut_ptr(), n_embd as i64);
                    dot(&self.row, &self.x)
                };
                self.scores[e] = s;
            }
        }
        top_k(&self.scores, k, &mut self.picks);
        self.picks_layer = layer + 1;
        Some(&self.picks)
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The indices of the `k` largest `scores` (ties: lower index), into `out`.
fn top_k(scores: &[f32], k: usize, out: &mut Vec<i32>) {
    out.clear();
    for _ in 0..k.min(scores.len()) {
        let mut best: Option<usize> = None;
        for (i, &s) in scores.iter().enumerate() {
            if out.contains(&(i as i32)) || s.is_nan() {
                continue;
            }
            if best.is_none_or(|b| s > scores[b]) {
                best = Some(i);
            }
        }
        match best {
            Some(b) => out.push(b as i32),
            None => break,
        }
    }
}

/// `h` when `cur` is `rms_norm(h) ⊙ w` (ggml's MUL of an RMS_NORM).
///
/// # Safety
/// `cur` is a live node or null; its sources are live or null.
unsafe fn pre_norm_input(cur: *mut sys::ggml_tensor) -> Option<*mut sys::ggml_tensor> {
    // SAFETY: our contract.
    unsafe {
        if cur.is_null() || (*cur).op != sys::GGML_OP_MUL {
            return None;
        }
        let n = (*cur).src[0];
        if n.is_null() || (*n).op != sys::GGML_OP_RMS_NORM || (*n).src[0].is_null() {
            return None;
        }
        Some((*n).src[0])
    }
}

/// The values of a one-row contiguous F32 tensor in host memory.
///
/// # Safety
/// `t` is a live tensor or null; if its data is set it holds `ggml_nbytes`
/// bytes, valid for as long as the returned slice is used.
unsafe fn host_f32_vector<'a>(t: *mut sys::ggml_tensor) -> Option<&'a [f32]> {
    // SAFETY: our contract.
    unsafe {
        if t.is_null() || (*t).type_ != sys::GGML_TYPE_F32 || (*t).data.is_null() {
            return None;
        }
        let b = (*t).buffer;
        if !b.is_null() && !sys::ggml_backend_buffer_is_host(b) {
            return None;
        }
        let ne = (*t).ne;
        if !sys::ggml_is_contiguous(t) || ne[1..].iter().any(|&n| n != 1) {
            return None;
        }
        Some(std::slice::from_raw_parts(
            (*t).data as *const f32,
            (*t).ne[0] as usize,
        ))
    }
}

/// A layer's router and norm weight from its `ffn_moe_logits` node
/// (`mul_mat(gate, cur)`), if the router can be read on the host in ggml's
/// plain layout (not a repacked CPU buffer, not a device's).
///
/// # Safety
/// `t` is a live node; its sources are live or null.
unsafe fn learn(t: *mut sys::ggml_tensor) -> Option<LayerGate> {
    // SAFETY: our contract; the router is a weight of the live model.
    unsafe {
        if (*t).op != sys::GGML_OP_MUL_MAT {
            return None;
        }
        let gate = (*t).src[0];
        if gate.is_null() || (*gate).data.is_null() {
            return None;
        }
        // No buffer: memory of a ggml context (tests); otherwise the CPU's
        // plain or mapped buffer.
        if !(*gate).buffer.is_null() {
            let buft = sys::ggml_backend_buffer_get_type((*gate).buffer);
            let name = std::ffi::CStr::from_ptr(sys::ggml_backend_buft_name(buft)).to_bytes();
            if !(name == b"CPU" || name == b"CPU_Mapped") {
                return None;
            }
        }
        let g = &*gate;
        let traits = sys::ggml_get_type_traits(g.type_);
        if traits.is_null()
            || (g.type_ != sys::GGML_TYPE_F32 && (*traits).to_float.is_none())
            || g.ne[0] <= 0
            || g.ne[1] <= 0
            || g.ne[2] != 1
            || g.ne[3] != 1
            || (g.ne[0] % (*traits).blck_size.max(1)) != 0
            || g.nb[1] < sys::ggml_row_size(g.type_, g.ne[0])
        {
            return None;
        }
        let cur = (*t).src[1];
        let norm = match pre_norm_input(cur) {
            Some(_) => {
                let w = (*cur).src[1];
                let ok =
                    !w.is_null() && host_f32_vector(w).is_some_and(|v| v.len() == g.ne[0] as usize);
                if ok {
                    w as *const _
                } else {
                    std::ptr::null()
                }
            }
            None => std::ptr::null(),
        };
        Some(LayerGate {
            gate: gate as *const _,
            norm,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_takes_the_largest_lower_index_first() {
        let mut out = Vec::new();
        top_k(&[0.1, 3.0, 2.0, 3.0, f32::NAN, -1.0], 3, &mut out);
        assert_eq!(out, vec![1, 3, 2]);
        top_k(&[1.0, 2.0], 5, &mut out);
        assert_eq!(out, vec![1, 0]);
    }

    #[test]
    fn precision_gates_the_reads_and_recovers() {
        let mut p = Pregate::new(4);
        let mut m = StreamMetrics::default();
        p.reads_off = false;
        assert!(p.reads());
        // Wrong every time: reads stop once the decayed precision < 0.5.
        for _ in 0..8 {
            p.picks = vec![0, 1];
            p.picks_layer = 2;
            p.score(2, &[5, 6], &mut m);
        }
        assert!(!p.reads(), "precision {}", p.precision());
        assert_eq!((m.predicted, m.predicted_used), (16, 0));
        // A score for another layer than predicted counts nothing.
        p.picks = vec![0, 1];
        p.picks_layer = 2;
        p.score(3, &[0, 1], &mut m);
        assert_eq!(m.predicted, 16);
        // Right again: the reads resume.
        for _ in 0..20 {
            p.picks = vec![0, 1];
            p.picks_layer = 2;
            p.score(2, &[1, 0], &mut m);
        }
        assert!(p.reads(), "precision {}", p.precision());
    }

    /// A ggml context holding two layers' router graphs (the ops built, not
    /// run: the prediction reads `ffn_inp`, the weights and the shapes).
    struct Graph {
        ctx: *mut sys::ggml_context,
        /// Per layer: (ffn_inp, logits node).
        layers: Vec<(*mut sys::ggml_tensor, *mut sys::ggml_tensor)>,
        gates: Vec<*mut sys::ggml_tensor>,
        norms: Vec<*mut sys::ggml_tensor>,
    }

    impl Drop for Graph {
        fn drop(&mut self) {
            // SAFETY: the context this test made; nothing uses its tensors now.
            unsafe { sys::ggml_free(self.ctx) };
        }
    }

    const EMBD: usize = 64;
    const EXPERTS: usize = 16;

    fn fill(t: *mut sys::ggml_tensor, v: &[f32]) {
        // SAFETY: an F32 tensor of the test's context with v.len() values.
        unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), (*t).data as *mut f32, v.len()) };
    }

    /// `n_tok` tokens a layer, routers of type `ty` (F32 or Q8_0) from the
    /// seeded values `gate_f32[layer]`.
    fn graph(
        n_tok: i64,
        ty: sys::ggml_type,
        gate_f32: &[Vec<f32>],
        h: &[f32],
        w: &[Vec<f32>],
    ) -> Graph {
        // SAFETY: plain ggml constructors on a context of our own; sizes fit.
        unsafe {
            let ctx = sys::ggml_init(sys::ggml_init_params {
                mem_size: 8 << 20,
                mem_buffer: std::ptr::null_mut(),
                no_alloc: false,
            });
            assert!(!ctx.is_null());
            let mut g = Graph {
                ctx,
                layers: Vec::new(),
                gates: Vec::new(),
                norms: Vec::new(),
            };
            for (l, gv) in gate_f32.iter().enumerate() {
                let gate = sys::ggml_new_tensor_2d(ctx, ty, EMBD as i64, EXPERTS as i64);
                if ty == sys::GGML_TYPE_F32 {
                    fill(gate, gv);
                } else {
                    sys::ggml_quantize_chunk(
                        ty,
                        gv.as_ptr(),
                        (*gate).data,
                        0,
                        EXPERTS as i64,
                        EMBD as i64,
                        std::ptr::null(),
                    );
                }
                let norm = sys::ggml_new_tensor_1d(ctx, sys::GGML_TYPE_F32, EMBD as i64);
                fill(norm, &w[l]);
                let inp = sys::ggml_new_tensor_2d(ctx, sys::GGML_TYPE_F32, EMBD as i64, n_tok);
                let hv: Vec<f32> = (0..n_tok as usize)
                    .flat_map(|_| h.iter().copied())
                    .collect();
                fill(inp, &hv);
                let cur = sys::ggml_mul(ctx, sys::ggml_rms_norm(ctx, inp, 1e-6), norm);
                let logits = sys::ggml_mul_mat(ctx, gate, cur);
                g.layers.push((inp, logits));
                g.gates.push(gate);
                g.norms.push(norm);
            }
            g
        }
    }

    fn values(n: usize, seed: u64) -> Vec<f32> {
        use rand::{Rng, SeedableRng};
        let mut r = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n).map(|_| r.gen_range(-1.0f32..1.0)).collect()
    }

    /// The top-k of layer 1's router on rms_norm(h) ⊙ w1, in f64, from the
    /// router's values as ggml stores them.
    fn reference(g: &Graph, h: &[f32], w1: &[f32], k: usize) -> Vec<i32> {
        let ms = h.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / EMBD as f64;
        let x: Vec<f64> = h
            .iter()
            .zip(w1)
            .map(|(&v, &w)| v as f64 / (ms + 1e-6).sqrt() * w as f64)
            .collect();
        let mut row = vec![0f32; EMBD];
        let scores: Vec<f32> = (0..EXPERTS)
            .map(|e| {
                // SAFETY: a 2-D router of the test's context, row e of EMBD values.
                unsafe {
                    let t = g.gates[1];
                    let p = ((*t).data as *const u8).add(e * (*t).nb[1]);
                    match (*sys::ggml_get_type_traits((*t).type_)).to_float {
                        Some(f) => f(p.cast(), row.as_mut_ptr(), EMBD as i64),
                        None => {
                            std::ptr::copy_nonoverlapping(p as *const f32, row.as_mut_ptr(), EMBD)
                        }
                    }
                }
                row.iter().zip(&x).map(|(&a, &b)| a as f64 * b).sum::<f64>() as f32
            })
            .collect();
        let mut out = Vec::new();
        top_k(&scores, k, &mut out);
        out
    }

    #[test]
    fn predicts_the_next_routers_top_k_from_this_layers_residual() {
        let gates = [values(EMBD * EXPERTS, 1), values(EMBD * EXPERTS, 2)];
        let w = [values(EMBD, 3), values(EMBD, 4)];
        let h = values(EMBD, 5);
        for ty in [sys::GGML_TYPE_F32, sys::GGML_TYPE_Q8_0] {
            let g = graph(1, ty, &gates, &h, &w);
            let want = reference(&g, &h, &w[1], 4);
            let mut p = Pregate::new(2);
            // SAFETY: live nodes of the test's graph, their data set.
            unsafe {
                // The first pass learns both layers' routers and norms.
                p.observe(0, g.layers[0].1);
                p.observe(1, g.layers[1].1);
                assert!(p.predict(1, 4).is_none(), "no layer after the last");
                // Layer 0's router node again: a guess for layer 1.
                p.observe(0, g.layers[0].1);
                assert!(p.predict(1, 4).is_none(), "not the observed layer");
                p.observe(0, g.layers[0].1);
                let got = p.predict(0, 4).unwrap().to_vec();
                assert_eq!(got, want, "{ty}");
                assert!(p.predict(0, 4).is_none(), "a node is used once");
                p.observe(0, g.layers[0].1);
                assert!(p.predict(0, EXPERTS + 1).is_none(), "k above the experts");
                p.observe(0, g.layers[0].1);
            }
            // Scored against what layer 1 picks.
            let mut m = StreamMetrics::default();
            // SAFETY: as above.
            unsafe { p.predict(0, 4) };
            p.score(1, &want[..2], &mut m);
            assert_eq!((m.predicted, m.predicted_used), (4, 2));
        }
    }

    #[test]
    fn no_guess_for_a_batch() {
        let gates = [values(EMBD * EXPERTS, 1), values(EMBD * EXPERTS, 2)];
        let w = [values(EMBD, 3), values(EMBD, 4)];
        let g = graph(2, sys::GGML_TYPE_F32, &gates, &values(EMBD, 5), &w);
        let mut p = Pregate::new(2);
        // SAFETY: live nodes of the test's graph, their data set.
        unsafe {
            p.observe(0, g.layers[0].1);
            p.observe(1, g.layers[1].1);
            p.observe(0, g.layers[0].1);
            assert!(p.predict(0, 4).is_none());
        }
    }
}
