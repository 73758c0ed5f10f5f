//! How deep the dense pool is: the lookahead the disk needs against the
//! compute, and not a slot more (every byte of the budget the pool does not
//! take pins FFN layers).
//!
//! # Sketch (CPU dense streaming, per token)
//! - Bytes per token `S = n_s × ffn_bytes`: the FFN of the `n_s` streamed
//!   layers; `p` layers are pinned, spread evenly, so `q = p / n_s` pinned
//!   layers compute between two streamed ones.
//! - Disk: a streamed layer reads in `r = slot_bytes / disk_bw`
//!   (`hypura profile`'s sequential O_DIRECT rate, QD 32).
//! - Compute is memory-bound, every weight once per token: a layer computes
//!   in `c = (M / n_layer) / mem_bw`, its FFN in `c_f = ffn_bytes / mem_bw`,
//!   the rest (attention, norms, before the FFN) in `c − c_f`.
//! - Lookahead 1 (2 slots: the layer computing, one reading): a layer's read
//!   is submitted when the streamed layer before it has computed, so it
//!   overlaps the `q` pinned layers between them and its own attention, and
//!   the disk idles while that layer's FFN computes:
//!   `t₁ = n_s × (max(r, q·c + c − c_f) + c_f)`.
//! - Lookahead 2 (3 slots): while a layer computes the next read is queued,
//!   so the disk never idles while it is the slower side and reads are hidden
//!   when it is not: `t₂ = n_s × max(r, (q + 1)·c)`.
//! - Deeper: no faster in this model (two reads in flight already cover any
//!   gap), and each slot is a layer that could be pinned instead.
//! - Each depth is evaluated with the layers its pool leaves room to pin
//!   (one slot less pins about one layer more: `S` drops by one layer); the
//!   faster wins, ties go to the shallower. Unprofiled: 2.
//!
//! On this project's machine (disk 2–3 GB/s, memory 19 GB/s with 2 threads)
//! the 8 GiB dense Q8_0 model in a 3 GiB budget has `r` ≈ 60–90 ms against
//! `c` ≈ 14 ms: disk-bound, so `t₂` < `t₁` (the disk idles `c_f` per layer at
//! depth 1, more than one more pinned layer saves) and the pool is 3 slots.
//! Depth 1 wins when the disk is fast next to the compute and pinned layers
//! sit between the streamed ones, or when `n_s × c_f < r` (few layers
//! stream, or the disk is very slow): the FFN compute the disk idles through
//! then costs less than the read one more pinned layer saves.

/// The numbers the depth is chosen from, in seconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Timing {
    /// One streamed layer's read: its slot bytes ÷ disk bandwidth.
    pub read_s: f64,
    /// One layer's compute: the bytes the CPU computes on per layer ÷
    /// memory bandwidth.
    pub layer_s: f64,
    /// Its FFN's part of `layer_s`.
    pub ffn_s: f64,
}

impl Timing {
    /// From the profile (GB/s); `None` when a bandwidth is unknown.
    /// `cpu_bytes`: what the CPU computes on per token (the model, or only
    /// the FFN layers when a GPU holds the rest).
    pub fn from_profile(
        disk_gbps: Option<f64>,
        mem_gbps: Option<f64>,
        slot_bytes: u64,
        layer_ffn_bytes: u64,
        cpu_bytes: u64,
        n_layer: usize,
    ) -> Option<Timing> {
        let disk = disk_gbps.filter(|d| d.is_finite() && *d > 0.0)? * 1e9;
        let mem = mem_gbps.filter(|m| m.is_finite() && *m > 0.0)? * 1e9;
        if n_layer == 0 {
            return None;
        }
        let layer_s = cpu_bytes as f64 / n_layer as f64 / mem;
        Some(Timing {
            read_s: slot_bytes as f64 / disk,
            layer_s,
            ffn_s: (layer_ffn_bytes as f64 / mem).min(layer_s),
        })
    }

    /// Predicted seconds per token at `lookahead` with `n_streamed` layers
    /// streamed and `n_pinned` pinned (the sketch above).
    pub fn token_s(&self, lookahead: usize, n_streamed: usize, n_pinned: usize) -> f64 {
        let Timing {
            read_s: r,
            layer_s: c,
            ffn_s: c_f,
        } = *self;
        let n_s = n_streamed as f64;
        let pinned_s = n_pinned as f64 * c;
        if n_streamed == 0 {
            return pinned_s;
        }
        let q = n_pinned as f64 / n_s;
        match lookahead {
            // Read when the FFN needs it: nothing overlaps.
            0 => n_s * (r + c) + pinned_s,
            1 => n_s * ((r.max(q * c + c - c_f)) + c_f),
            _ => n_s * r.max((q + 1.0) * c),
        }
    }
}

/// The lookahead for CPU dense streaming, at most `max` (what the budget
/// holds): of depths 1 and 2, the faster by [`Timing::token_s`] with the
/// `(streamed, pinned)` layer counts `layers_for(depth)` gives; ties go to
/// the shallower. Without timing, 2 (capped at `max`).
pub fn choose(
    timing: Option<&Timing>,
    max: usize,
    layers_for: impl Fn(usize) -> (usize, usize),
) -> usize {
    let Some(t) = timing else {
        return max.min(2);
    };
    if max == 0 {
        return 0;
    }
    let mut best = (f64::INFINITY, 0);
    for depth in 1..=max.min(2) {
        let (n_s, n_p) = layers_for(depth);
        let s = t.token_s(depth, n_s, n_p);
        // Compute-bound, both depths predict the compute: a tie (up to
        // rounding) keeps the shallower, which pins more.
        if s < best.0 * (1.0 - 1e-9) {
            best = (s, depth);
        }
    }
    best.1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::{GgmlType, GgufFile, TensorInfo, TensorRole};
    use crate::scheduler::{GpuInput, Mode, Plan, PlanInput};

    const MIB: u64 = 1 << 20;
    /// The 8 GiB dense model's shape: 32 layers of 56 MiB attention and
    /// 3 × 200/3 MiB FFN, 100 MiB embeddings and 100 MiB output.
    const ATTN: u64 = 56 * MIB;
    const FFN_T: u64 = 200 * MIB / 3 / 4096 * 4096;

    fn dense_8g() -> GgufFile {
        let mut tensors = Vec::new();
        let mut off = 4096u64;
        let mut push = |name: String, size: u64, role: TensorRole, layer: Option<u32>| {
            tensors.push(TensorInfo {
                name,
                ggml_type: GgmlType::Q8_0,
                dims: vec![size],
                offset: off,
                size,
                role,
                layer,
            });
            off += size;
        };
        push(
            "token_embd.weight".into(),
            100 * MIB,
            TensorRole::TokenEmbedding,
            None,
        );
        for l in 0..32 {
            push(
                format!("blk.{l}.attn_qkv.weight"),
                ATTN,
                TensorRole::Attention,
                Some(l),
            );
            for (n, role) in [
                ("gate", TensorRole::FfnGate),
                ("up", TensorRole::FfnUp),
                ("down", TensorRole::FfnDown),
            ] {
                push(format!("blk.{l}.ffn_{n}.weight"), FFN_T, role, Some(l));
            }
        }
        push("output.weight".into(), 100 * MIB, TensorRole::Output, None);
        GgufFile {
            path: "dense-8g.gguf".into(),
            version: 3,
            alignment: 32,
            data_offset: 4096,
            file_size: off,
            metadata: Vec::new(),
            tensors,
        }
    }

    fn plan(g: &GgufFile, budget: u64, disk: Option<f64>, lookahead: Option<usize>) -> Plan {
        Plan::new(&PlanInput {
            gguf: g,
            ram_budget: budget,
            mode: None,
            lookahead,
            disk_gbps: disk,
            mem_gbps: disk.map(|_| 19.0),
            gpu: None,
        })
        .unwrap()
    }

    /// The plan's pool is its slots and nothing else, and the budget left
    /// after the non-FFN tensors, the pool and the pinned layers is less
    /// than one more layer: every other byte pins.
    fn check_budget(p: &Plan, label: &str) {
        assert_eq!(p.mode, Mode::Dense, "{label}");
        let n_slots = (p.lookahead as u64 + 1).min(p.streamed_layers.len() as u64);
        assert_eq!(p.pool_bytes, n_slots * p.slot_bytes, "{label}");
        let non_ffn = 200 * MIB + 32 * ATTN;
        let pinned = p.pinned_layers.len() as u64 * 3 * FFN_T;
        assert_eq!(p.resident_bytes, non_ffn + pinned, "{label}");
        assert!(
            p.embd_rows.is_none(),
            "{label}: 1-D embeddings stay resident"
        );
        let left = p.ram_budget - p.pool_bytes - p.resident_bytes;
        assert!(
            left < 3 * FFN_T,
            "{label}: {left} bytes unused, a layer fits"
        );
        assert_eq!(
            p.bytes_per_token,
            p.streamed_layers.len() as u64 * 3 * FFN_T
        );
    }

    #[test]
    fn the_8g_dense_model_in_3g_takes_the_slots_the_disk_needs_and_pins_the_rest() {
        let g = dense_8g();
        // This machine's profile (disk 2.5 GB/s, memory 19 GB/s):
        // disk-bound, 3 slots; the rest of the budget pins layers.
        let p = plan(&g, 3 << 30, Some(2.5), None);
        check_budget(&p, "2.5 GB/s");
        assert_eq!(p.lookahead, 2);
        assert_eq!(p.pinned_layers.len(), 2, "{:?}", p.pinned_layers);
        // A forced depth costs pinned layers, slot for slot.
        let deep = plan(&g, 3 << 30, Some(2.5), Some(4));
        check_budget(&deep, "lookahead 4");
        assert_eq!(deep.pool_bytes, 5 * deep.slot_bytes);
        assert!(deep.pinned_layers.len() < p.pinned_layers.len());
        assert!(deep.bytes_per_token > p.bytes_per_token);
        // Unprofiled: 2.
        let u = plan(&g, 3 << 30, None, None);
        check_budget(&u, "unprofiled");
        assert_eq!(u.lookahead, 2);
    }

    #[test]
    fn the_pool_depth_follows_the_disk_speed() {
        let g = dense_8g();
        // 6 GiB: 17 layers pinned at depth 2, 18 at depth 1, a pinned layer
        // between most streamed ones. Depth 1 below ~1.4 GB/s (the disk
        // idles through 14 FFNs, less than the read a pinned layer saves) and
        // above ~9.5 GB/s (reads hide behind the pinned layers), 2 between.
        for (disk, depth) in [(0.3, 1), (2.5, 2), (5.0, 2), (60.0, 1)] {
            let p = plan(&g, 6 << 30, Some(disk), None);
            let label = format!("{disk} GB/s");
            check_budget(&p, &label);
            assert_eq!(p.lookahead, depth, "{label}");
            // The shallower plan pins one layer more.
            if depth == 1 {
                let two = plan(&g, 6 << 30, Some(disk), Some(2));
                assert_eq!(
                    two.pinned_layers.len() + 1,
                    p.pinned_layers.len(),
                    "{label}"
                );
            }
        }
    }

    /// 32 layers of 256 MiB (8 GiB), FFN 200 MiB of each: the 8 GiB dense
    /// model's shape.
    fn timing(disk_gbps: f64) -> Timing {
        let layer = 256u64 << 20;
        let ffn = 200u64 << 20;
        Timing::from_profile(Some(disk_gbps), Some(19.0), ffn, ffn, 32 * layer, 32).unwrap()
    }

    /// With a budget for `pinnable` layers' worth of FFN besides the pool:
    /// each pool slot costs one pinned layer.
    fn layers(pinnable: usize) -> impl Fn(usize) -> (usize, usize) {
        move |depth| {
            let pinned = pinnable.saturating_sub(depth + 1).min(32);
            (32 - pinned, pinned)
        }
    }

    #[test]
    fn a_disk_slower_than_compute_gets_two_reads_in_flight() {
        // 2.5 GB/s: a layer reads in 84 ms, computes in 14 ms.
        let t = timing(2.5);
        assert!(t.read_s > 5.0 * t.layer_s);
        assert_eq!(choose(Some(&t), 8, layers(10)), 2);
        // Disk-bound: depth 2 reads all the time, n_s × r.
        let (n_s, n_p) = layers(10)(2);
        let want = n_s as f64 * t.read_s;
        assert!((t.token_s(2, n_s, n_p) - want).abs() < 1e-9);
        // The budget caps it.
        assert_eq!(choose(Some(&t), 1, layers(10)), 1);
        assert_eq!(choose(Some(&t), 0, layers(10)), 0);
    }

    #[test]
    fn a_disk_faster_than_compute_with_pinned_layers_between_gets_one() {
        // 40 GB/s, half the layers pinned: a layer's read hides behind the
        // pinned layer before it; the slot saved pins one more layer.
        let t = timing(40.0);
        assert!(t.read_s < t.layer_s);
        assert_eq!(choose(Some(&t), 8, layers(18)), 1);
        // Nothing pinned between streamed layers: depth 1 stalls on every
        // read after the attention, depth 2 hides it.
        assert_eq!(choose(Some(&t), 8, |_| (32, 0)), 2);
    }

    #[test]
    fn the_depth_follows_the_disk_speed() {
        // From a slow to a fast disk, at a fixed budget (16 layers stream at
        // depth 1): 2 while the disk is the slower side, 1 once reads hide
        // behind the pinned layers. On a very slow disk 1 again: the FFN
        // compute it idles through (16 × 11 ms) costs less than the read
        // (419 ms) the one more pinned layer saves.
        let depths: Vec<usize> = [0.5, 2.5, 10.0, 40.0, 200.0]
            .iter()
            .map(|&d| choose(Some(&timing(d)), 8, layers(18)))
            .collect();
        assert_eq!(depths, vec![1, 2, 2, 1, 1]);
        // Never deeper than 2, whatever the budget allows.
        assert!(depths.iter().all(|&d| d <= 2));
    }

    #[test]
    fn unprofiled_is_two_within_the_budget() {
        assert_eq!(choose(None, 8, layers(10)), 2);
        assert_eq!(choose(None, 1, layers(10)), 1);
        assert!(Timing::from_profile(None, Some(19.0), 1, 1, 1, 1).is_none());
        assert!(Timing::from_profile(Some(2.0), Some(0.0), 1, 1, 1, 1).is_none());
    }

    const GIB: u64 = 1 << 30;

    fn gpu_plan(unified: bool, direct: bool) -> Plan {
        let g = dense_8g();
        Plan::new(&PlanInput {
            gguf: &g,
            ram_budget: 6 * GIB,
            mode: Some(Mode::GpuDense),
            lookahead: None,
            // A fast disk next to slow memory: the memory term must show.
            disk_gbps: Some(40.0),
            mem_gbps: Some(20.0),
            gpu: Some(GpuInput {
                device: "Vulkan0".into(),
                budget: 4 * GIB,
                h2d_gbps: (!direct).then_some(25.0),
                direct,
                direct_slots: direct,
                unified,
            }),
        })
        .unwrap()
    }

    /// An iGPU computes on the one memory: its token costs at least every
    /// weight read once at memory bandwidth, and no copy term appears.
    #[test]
    fn a_unified_gpu_is_bounded_by_memory_bandwidth_not_a_copy() {
        let p = gpu_plan(true, true);
        let g = p.gpu.as_ref().unwrap();
        assert!(g.unified && g.direct);
        let model: u64 = dense_8g().tensors.iter().map(|t| t.size).sum();
        let mem_bound = 20e9 / model as f64;
        let disk_bound = 40e9 / p.bytes_per_token.max(1) as f64;
        assert!(mem_bound < disk_bound, "the case must be memory-bound");
        let tps = p.predicted_tps.unwrap();
        assert!(tps <= mem_bound * 1.0001, "{tps} > {mem_bound}");
        assert!(tps <= disk_bound * 1.0001, "{tps} > {disk_bound}");
        assert!(
            (tps - mem_bound.min(disk_bound)).abs() / tps < 1e-6,
            "lookahead overlaps read and compute: {tps} vs min({mem_bound}, {disk_bound})"
        );
    }

    /// A discrete GPU's compute is taken as free: the link bounds it.
    #[test]
    fn a_discrete_gpu_is_bounded_by_the_disk_and_the_copy() {
        let p = gpu_plan(false, false);
        let g = p.gpu.as_ref().unwrap();
        assert!(!g.unified && !g.direct);
        let tps = p.predicted_tps.unwrap();
        let read = p.bytes_per_token as f64 / 40e9;
        let up = p.streamed_bytes as f64 / 25e9;
        assert!(
            (tps - 1.0 / read.max(up)).abs() / tps < 1e-6,
            "{tps} vs 1/max({read}, {up})"
        );
    }
}
