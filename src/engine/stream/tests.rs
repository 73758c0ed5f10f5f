//! The Streamer end to end through its callbacks, without a model: fake
//! tensors, a fake reader, and graphs run the way ggml's scheduler runs them
//! with an eval callback. At every compute range, every streamed weight the
//! range reads must hold the file's bytes.

use std::ffi::c_void;

use hypura_sys as sys;
use rand::{Rng, SeedableRng};

use super::fake::{bytes_at, Complete, FakeModel, FakeReader};
use super::*;
use crate::scheduler::GpuPlan;

type Cb = unsafe extern "C" fn(*mut sys::ggml_tensor, bool, *mut c_void) -> bool;
type Node = *mut sys::ggml_tensor;

fn plan(m: &FakeModel, mode: Mode, lookahead: usize, pool_bytes: u64) -> Plan {
    let streamed = m.streamed();
    let mut layers: Vec<u32> = streamed.iter().map(|t| t.layer).collect();
    layers.dedup();
    Plan {
        mode,
        ram_budget: 0,
        model_bytes: 0,
        resident_bytes: 0,
        streamed_bytes: streamed.iter().map(|t| t.size).sum(),
        streamed,
        pinned_layers: Vec::new(),
        ram_layers: Vec::new(),
        streamed_layers: layers,
        lookahead,
        slot_bytes: m.slot_bytes() as u64,
        pool_bytes,
        bytes_per_token: 0,
        ceiling_tps: None,
        predicted_tps: None,
        gpu: None,
        embd_rows: None,
    }
}

fn gpu_plan(n_slots: usize, dedicated_layers: Vec<u32>) -> Option<GpuPlan> {
    Some(GpuPlan {
        device: "CPU".into(),
        budget: 0,
        resident_bytes: 0,
        pool_bytes: 0,
        n_slots,
        dedicated_layers,
        h2d_gbps: 12.0,
        direct: false,
        unified: false,
    })
}

/// The CPU device runs the GPU tier's device paths (as the gpu_tier tests do).
fn cpu_device() -> Device {
    Device::find(Some("CPU"))
        .unwrap()
        .expect("ggml's CPU device")
}

fn streamer(m: &FakeModel, p: &Plan, io: FakeReader, gpu: Option<(Device, Upload)>) -> Streamer {
    // SAFETY: the fake tensors live in `m`, which every test keeps until
    // after the Streamer is dropped.
    let st = unsafe { Streamer::from_reported(p, &m.reported(), Box::new(io), gpu) };
    *st.unwrap()
}

fn eval(st: &Streamer) -> (Cb, *mut c_void) {
    // SAFETY: the tests call the callback only while `st` lives, on this thread.
    let (cb, user) = unsafe { st.callback() };
    (cb.unwrap(), user)
}

/// Per layer: attention, then (dense) a node reading the layer's streamed
/// weights, or (MoE) the router's top-k and a node reading the experts, then
/// `l_out-N`. Returns the nodes and each layer's top-k node.
fn graph(m: &mut FakeModel, moe_tokens: usize) -> (Vec<Node>, Vec<Node>) {
    let (mut nodes, mut topk) = (Vec::new(), Vec::new());
    for layer in 0..m.n_layer {
        let weights: Vec<Node> = m
            .specs
            .iter()
            .filter(|t| t.layer == layer)
            .map(|t| t.tensor)
            .collect();
        nodes.push(m.tensors.node(&format!("attn_out-{layer}"), &[]));
        if moe_tokens > 0 {
            let k = m.tensors.topk(
                &format!("ffn_moe_topk-{layer}"),
                2,
                &vec![0; 2 * moe_tokens],
            );
            nodes.push(k);
            topk.push(k);
        }
        nodes.push(m.tensors.node(&format!("ffn_out-{layer}"), &weights));
        nodes.push(m.tensors.node(&format!("l_out-{layer}"), &[]));
    }
    (nodes, topk)
}

/// ggml's scheduler with an eval callback: asks node after node until one is
/// needed, computes that range, then answers for its last node. False when
/// the answer stopped the compute.
fn compute(cb: Cb, user: *mut c_void, nodes: &[Node], mut at: impl FnMut(&[Node])) -> bool {
    let mut j0 = 0;
    while j0 < nodes.len() {
        let mut j1 = j0;
        // SAFETY: live fake nodes and the Streamer's own user data.
        let mut need = unsafe { cb(nodes[j0], true, user) };
        while !need && j1 < nodes.len() - 1 {
            j1 += 1;
            // SAFETY: as above.
            need = unsafe { cb(nodes[j1], true, user) };
        }
        at(&nodes[j0..=j1]);
        // SAFETY: as above.
        if need && !unsafe { cb(nodes[j1], false, user) } {
            return false;
        }
        j0 = j1 + 1;
    }
    true
}

/// The streamed tensors a range's nodes read.
fn weights_read<'a>(m: &'a FakeModel, range: &[Node]) -> Vec<&'a TensorSpec> {
    range
        .iter()
        // SAFETY: live fake nodes.
        .flat_map(|&n| unsafe { (*n).src })
        .filter(|p| !p.is_null())
        .filter_map(|p| m.specs.iter().find(|t| t.tensor == p))
        .collect()
}

/// Checks every dense weight `range` reads; returns how many.
fn check_dense(m: &FakeModel, range: &[Node]) -> usize {
    let ws = weights_read(m, range);
    for t in &ws {
        // SAFETY: a weight about to be computed on: `size` readable bytes.
        let got = unsafe { bytes_at(t.tensor, 0, t.size) };
        assert!(got == m.bytes(t.file_offset, t.size), "layer {}", t.layer);
    }
    ws.len()
}

/// Checks the experts `ids` of every expert tensor `range` reads.
fn check_experts(m: &FakeModel, range: &[Node], ids: &[Vec<i32>]) -> usize {
    let ws = weights_read(m, range);
    for t in &ws {
        let eb = t.size / t.n_experts;
        for &e in &ids[t.layer] {
            let off = e as usize * eb;
            // SAFETY: a selected expert about to be computed on.
            let got = unsafe { bytes_at(t.tensor, off, eb) };
            let want = m.bytes(t.file_offset + off as u64, eb);
            assert!(got == want, "layer {} expert {e}", t.layer);
        }
    }
    ws.len()
}

fn dense_model() -> FakeModel {
    let l: &[usize] = &[9000, 5000, 4096 + 40];
    FakeModel::new(&[&[], l, l, &[], l, &[7000, 100]], 1)
}

fn data_and_buffer(t: &TensorSpec) -> (*mut c_void, sys::ggml_backend_buffer_t) {
    // SAFETY: a fake tensor of a live model.
    unsafe { ((*t.tensor).data, (*t.tensor).buffer) }
}

#[test]
fn dense_streaming_through_the_callbacks_is_byte_exact() {
    for lookahead in [0, 1, 3] {
        for complete in [
            Complete::AtSubmit,
            Complete::WhenCollected { polls: 2 },
            Complete::Reversed,
        ] {
            let mut m = dense_model();
            let (nodes, _) = graph(&mut m, 0);
            let p = plan(&m, Mode::Dense, lookahead, 0);
            let st = streamer(&m, &p, m.reader(complete), None);
            let (cb, user) = eval(&st);
            let mut checked = 0;
            for pass in 1..=3u64 {
                assert!(compute(cb, user, &nodes, |r| checked += check_dense(&m, r)));
                assert_eq!(st.metrics().passes, pass);
                // Every layer has been released: its weights point at the guard.
                for t in &m.specs {
                    assert_eq!(data_and_buffer(t).0, st.engine().dense.released());
                }
            }
            let n = m.specs.len();
            assert_eq!(checked, 3 * n, "every weight checked at every pass");
            // Every layer is read once a pass, plus the next token's layers
            // read ahead (still in flight).
            let in_flight = st.engine().reader.outstanding();
            assert_eq!(st.metrics().reads as usize, 3 * n + in_flight);
            assert_eq!(in_flight == 0, lookahead == 0, "lookahead {lookahead}");
            assert!(!st.failed());
            drop(st);
            for t in &m.specs {
                assert_eq!(data_and_buffer(t), (t.reserved, std::ptr::null_mut()));
            }
        }
    }
}

#[test]
fn a_read_error_aborts_the_compute_and_is_reported() {
    let mut m = dense_model();
    let (nodes, _) = graph(&mut m, 0);
    let mut io = m.reader(Complete::WhenCollected { polls: 0 });
    io.fail_offset = Some(m.specs.iter().find(|t| t.layer == 4).unwrap().file_offset);
    let p = plan(&m, Mode::Dense, 1, 0);
    let mut st = streamer(&m, &p, io, None);
    let (cb, user) = eval(&st);
    let mut aborted_ranges = 0;
    compute(cb, user, &nodes, |range| {
        // SAFETY: the Streamer's own user data.
        if unsafe { abort_callback(user) } {
            aborted_ranges += 1;
            // What the aborted compute may still read is valid memory: zeros.
            for t in weights_read(&m, range) {
                assert_eq!(data_and_buffer(t).0, t.reserved);
            }
        }
    });
    // No cut after the error: the rest of the graph is one range.
    assert_eq!(aborted_ranges, 1);
    assert!(st.failed());
    let e = st.take_error().expect("the error");
    assert!(
        e.contains("layer 4: read failed") && e.contains("EIO"),
        "{e}"
    );
    assert!(!st.failed() && st.take_error().is_none());
}

#[test]
fn expert_streaming_through_the_callbacks_is_byte_exact() {
    for (lookahead, budget) in [(0, 6), (1, 6), (1, 24)] {
        let expert = [5000usize, 3000, 4096 + 64];
        let mut m = FakeModel::new(&[&expert, &expert, &expert], 8);
        let (nodes, topk) = graph(&mut m, 2);
        let mem: u64 = expert
            .iter()
            .map(|&b| crate::io::slot_len_for(0, b) as u64)
            .sum();
        let p = plan(&m, Mode::Experts, lookahead, budget * mem);
        let st = streamer(&m, &p, m.reader(Complete::Reversed), None);
        let (cb, user) = eval(&st);
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let (mut checked, mut picks) = (0, 0u64);
        for _ in 0..20 {
            let mut ids = Vec::new();
            for &k in &topk {
                let v: Vec<i32> = (0..4)
                    .map(|_| rng.gen_range(0..8).min(rng.gen_range(0..8)))
                    .collect();
                m.tensors.set_ids(k, &v);
                let mut d = v.clone();
                d.sort_unstable();
                d.dedup();
                picks += d.len() as u64;
                ids.push(d);
            }
            assert!(compute(cb, user, &nodes, |r| checked += check_experts(&m, r, &ids)));
        }
        assert_eq!(checked, 20 * m.specs.len());
        let s = st.metrics();
        assert_eq!(s.passes, 20);
        // Every distinct pick is a hit or a miss (the lookahead changes
        // nothing: experts are not read ahead).
        assert_eq!(
            s.expert_hits + s.expert_misses,
            picks,
            "lookahead {lookahead}"
        );
        assert!(s.expert_misses > 0, "{s:?}");
        if budget == 24 {
            // Everything fits: each expert is read at most once, then hits.
            assert!(s.expert_misses <= 24, "{s:?}");
            assert!(s.expert_hits > 0, "{s:?}");
        }
        drop(st);
        for t in &m.specs {
            assert_eq!(data_and_buffer(t), (t.reserved, std::ptr::null_mut()));
        }
    }
}

#[test]
fn staged_gpu_dense_on_the_cpu_device_is_byte_exact() {
    for ram_layers in [vec![], vec![2, 5]] {
        let mut m = dense_model();
        let (nodes, _) = graph(&mut m, 0);
        let mut p = plan(&m, Mode::GpuDense, 2, 0);
        p.gpu = gpu_plan(2, Vec::new());
        p.ram_layers = ram_layers.clone();
        let io = m.reader(Complete::WhenCollected { polls: 1 });
        let log = io.log.clone();
        let st = streamer(&m, &p, io, Some((cpu_device(), Upload::Staged)));
        let (cb, user) = eval(&st);
        let g = st.engine().gpu.as_ref().unwrap();
        let (base, len, guard) = (g.buf.base() as usize, g.buf.len(), g.guard_ptr());
        let mut checked = 0;
        for _ in 0..3 {
            assert!(compute(cb, user, &nodes, |range| {
                for t in weights_read(&m, range) {
                    let d = data_and_buffer(t).0 as usize;
                    assert!((base..base + len).contains(&d), "computes in a device slot");
                }
                checked += check_dense(&m, range);
            }));
            for t in &m.specs {
                assert_eq!(data_and_buffer(t).0, guard.cast());
            }
        }
        assert_eq!(checked, 3 * m.specs.len());
        // SAFETY: the guard holds a tensor's size and padding (0xFF).
        assert!(unsafe { std::slice::from_raw_parts(guard, 9000) }
            .iter()
            .all(|&b| b == 0xFF));
        // A RAM-tier layer is read from the file once, then copied each pass.
        let reads = FakeReader::submitted(&log);
        for &l in &ram_layers {
            let n = m.specs.iter().filter(|t| t.layer == l as usize).count();
            let of_l = reads
                .iter()
                .filter(|&&(o, _)| m.spec_at(o).layer == l as usize);
            assert_eq!(of_l.count(), n, "layer {l}");
        }
        let total: u64 = m.specs.iter().map(|t| t.size as u64).sum();
        assert!(st.metrics().upload_bytes >= 3 * total);
        drop(st);
        for t in &m.specs {
            assert_eq!(data_and_buffer(t), (t.reserved, std::ptr::null_mut()));
        }
    }
}

#[test]
fn direct_gpu_dense_computes_in_the_host_slots() {
    let mut m = dense_model();
    let (nodes, _) = graph(&mut m, 0);
    let mut p = plan(&m, Mode::GpuDense, 1, 0);
    p.gpu = gpu_plan(2, Vec::new());
    let st = streamer(
        &m,
        &p,
        m.reader(Complete::AtSubmit),
        Some((cpu_device(), Upload::Direct)),
    );
    let (cb, user) = eval(&st);
    let e = st.engine();
    let g = e.gpu.as_ref().unwrap();
    assert!(g.per_slot(), "each host slot imported on its own");
    let guard = g.buf.raw();
    let host = e.dense.host_mapping().unwrap();
    let (base, len) = (host.base() as usize, host.len());
    let mut checked = 0;
    assert!(compute(cb, user, &nodes, |range| {
        for t in weights_read(&m, range) {
            let (d, b) = data_and_buffer(t);
            assert!(!b.is_null() && b != guard, "a slot's import, not the guard");
            // The CPU device's imports are at host addresses.
            assert!((base..base + len).contains(&(d as usize)));
        }
        checked += check_dense(&m, range);
    }));
    assert_eq!(checked, m.specs.len());
    assert_eq!(st.metrics().upload_bytes, 0);
}

#[test]
fn staged_gpu_experts_on_the_cpu_device_is_byte_exact() {
    let expert = [5000usize, 3000, 4096 + 64];
    let mut m = FakeModel::new(&[&expert, &expert, &expert], 8);
    let (nodes, topk) = graph(&mut m, 1);
    // A cache slot holds one expert's pieces, each with a spare page.
    let slot: u64 = expert
        .iter()
        .map(|&b| (crate::io::slot_len_for(0, b) + crate::io::ALIGN) as u64)
        .sum();
    let mut p = plan(&m, Mode::GpuExperts, 1, 10 * slot);
    // Layer 0 has a device slot of its own, layers 1 and 2 share the other.
    p.gpu = gpu_plan(2, vec![0]);
    let st = streamer(
        &m,
        &p,
        m.reader(Complete::Reversed),
        Some((cpu_device(), Upload::Staged)),
    );
    let (cb, user) = eval(&st);
    let g = st.engine().gpu.as_ref().unwrap();
    let (base, len) = (g.buf.base() as usize, g.buf.len());
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut checked = 0;
    for _ in 0..20 {
        let mut ids = Vec::new();
        for &k in &topk {
            let v: Vec<i32> = (0..2)
                .map(|_| rng.gen_range(0..8).min(rng.gen_range(0..8)))
                .collect();
            m.tensors.set_ids(k, &v);
            ids.push(v);
        }
        assert!(compute(cb, user, &nodes, |range| {
            for t in weights_read(&m, range) {
                let d = data_and_buffer(t).0 as usize;
                assert!((base..base + len).contains(&d), "computes in a device slot");
            }
            checked += check_experts(&m, range, &ids);
        }));
    }
    assert_eq!(checked, 20 * m.specs.len());
    let s = st.metrics();
    assert!(
        s.gpu_hits > 0,
        "layer 0 keeps its experts on the device: {s:?}"
    );
    assert!(s.upload_bytes > 0);
    drop(st);
    for t in &m.specs {
        assert_eq!(data_and_buffer(t), (t.reserved, std::ptr::null_mut()));
    }
}

#[test]
fn a_gpu_mode_needs_a_device_and_a_bad_plan_is_an_error() {
    let m = dense_model();
    let p = plan(&m, Mode::GpuDense, 1, 0);
    // SAFETY: the fake tensors outlive the (never made) Streamer.
    let e = unsafe {
        Streamer::from_reported(
            &p,
            &m.reported(),
            Box::new(m.reader(Complete::AtSubmit)),
            None,
        )
    };
    assert!(format!("{:#}", e.err().unwrap()).contains("needs a GPU device"));
    let mut p = plan(&m, Mode::Dense, 1, 0);
    p.streamed[0].size += 1;
    // SAFETY: as above.
    let e = unsafe {
        Streamer::from_reported(
            &p,
            &m.reported(),
            Box::new(m.reader(Complete::AtSubmit)),
            None,
        )
    };
    assert!(format!("{:#}", e.err().unwrap()).contains("llama.cpp has 9000 bytes"));
    // Nothing was re-pointed, or it was put back.
    for t in &m.specs {
        assert_eq!(data_and_buffer(t), (t.reserved, std::ptr::null_mut()));
    }
}

mod faults;
