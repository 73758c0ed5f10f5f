//! The dense layer state machine on a fake reader: lookahead order, guard,
//! waits, errors.

use super::*;
use crate::engine::stream::fake::{bytes_at, Complete, FakeModel, FakeReader};

/// Layers 0 and 3 do not stream; the others have three tensors each.
fn model() -> FakeModel {
    let l: &[usize] = &[9000, 5000, 4096 + 40];
    FakeModel::new(&[&[], l, l, &[], l, &[7000, 100]], 1)
}

fn slots(m: &FakeModel, lookahead: usize, io: &mut FakeReader) -> DenseSlots {
    let mut s = DenseSlots::new(&m.specs, m.n_layer, lookahead, m.slot_bytes(), None).unwrap();
    s.alloc_host(io, None).unwrap();
    s.release_all(None);
    s
}

/// Layers of the submissions logged since `*seen`.
fn new_reads(m: &FakeModel, io: &FakeReader, seen: &mut usize) -> Vec<usize> {
    let log = FakeReader::submitted(&io.log);
    let mut layers: Vec<usize> = log[*seen..]
        .iter()
        .map(|&(off, _)| m.spec_at(off).layer)
        .collect();
    layers.dedup();
    *seen = log.len();
    layers
}

fn assert_bytes_are_the_files(m: &FakeModel, s: &DenseSlots, layer: usize) {
    let l = s.layers[layer].as_ref().unwrap();
    assert_eq!(l.state, LayerState::Ready);
    for t in &l.tensors {
        // SAFETY: a Ready layer's tensors point at `size` bytes in its slot.
        let got = unsafe { bytes_at(t.tensor, 0, t.size) };
        assert!(got == m.bytes(t.file_offset, t.size), "layer {layer}");
    }
}

/// Runs `passes` tokens over the streamed layers as the eval callback does
/// (wait, compute, release, read ahead) and returns, per step, the layers
/// whose reads were submitted in it.
fn token_loop(lookahead: usize, complete: Complete, passes: usize) -> Vec<Vec<usize>> {
    let m = model();
    let mut io = m.reader(complete);
    let mut s = slots(&m, lookahead, &mut io);
    let mut metrics = StreamMetrics::default();
    let (mut seen, mut steps) = (0, Vec::new());
    for _ in 0..passes {
        for layer in [1, 2, 4, 5] {
            s.ensure_ready(layer, &mut io, &mut metrics, None).unwrap();
            assert_bytes_are_the_files(&m, &s, layer);
            steps.push(new_reads(&m, &io, &mut seen));
            s.release(layer, None);
            for t in &s.layers[layer].as_ref().unwrap().tensors {
                // SAFETY: a tensor of ours.
                assert_eq!(unsafe { (*t.tensor).data }, s.released());
            }
            s.prefetch_after(layer, &mut io, &mut metrics).unwrap();
            steps.push(new_reads(&m, &io, &mut seen));
        }
    }
    // Exactly the reads of the layers read ahead are still in flight.
    let loading = s.layers.iter().flatten();
    let loading = loading.filter(|l| l.state == LayerState::Loading);
    assert_eq!(
        io.outstanding(),
        loading.map(|l| l.tensors.len()).sum::<usize>()
    );
    let log = FakeReader::submitted(&io.log);
    assert_eq!(metrics.reads, log.len() as u64);
    let aligned: usize = log.iter().map(|&(o, n)| slot_len_for(o, n)).sum();
    assert_eq!(metrics.bytes_read, aligned as u64);
    steps
}

#[test]
fn lookahead_reads_the_next_layers_in_cyclic_order() {
    // Steps alternate: (wait for layer, release + read ahead) for layers 1, 2, 4, 5.
    let none: Vec<usize> = vec![];
    for complete in [
        Complete::AtSubmit,
        Complete::WhenCollected { polls: 0 },
        Complete::Reversed,
    ] {
        // Lookahead 0: each layer is read when it is needed.
        let steps = token_loop(0, complete, 2);
        let want: Vec<Vec<usize>> = [1, 2, 4, 5, 1, 2, 4, 5]
            .iter()
            .flat_map(|&l| [vec![l], none.clone()])
            .collect();
        assert_eq!(steps, want, "{complete:?}");

        // Lookahead 2: two layers ahead, and the last layers read the next
        // token's first ones (5 → 1, 2).
        let steps = token_loop(2, complete, 2);
        #[rustfmt::skip]
        let want = vec![
            vec![1], vec![2, 4], none.clone(), vec![5],
            none.clone(), vec![1], none.clone(), vec![2],
            none.clone(), vec![4], none.clone(), vec![5],
            none.clone(), vec![1], none.clone(), vec![2],
        ];
        assert_eq!(steps, want, "{complete:?}");

        // Lookahead past the layer count: every layer stays in flight, each
        // release reads the same layer again for the next token.
        let steps = token_loop(7, complete, 2);
        #[rustfmt::skip]
        let want = vec![
            vec![1], vec![2, 4, 5, 1], none.clone(), vec![2],
            none.clone(), vec![4], none.clone(), vec![5],
            none.clone(), vec![1], none.clone(), vec![2],
            none.clone(), vec![4], none.clone(), vec![5],
        ];
        assert_eq!(steps, want, "{complete:?}");
    }
}

#[test]
fn tensors_start_and_end_at_the_guard() {
    let m = model();
    let mut io = m.reader(Complete::AtSubmit);
    let mut s = slots(&m, 1, &mut io);
    assert!(!s.released().is_null());
    for t in &m.specs {
        // SAFETY: tensors of ours.
        assert_eq!(unsafe { (*t.tensor).data }, s.released());
    }
    let mut metrics = StreamMetrics::default();
    s.ensure_ready(4, &mut io, &mut metrics, None).unwrap();
    // Releasing a layer that is not Ready changes nothing.
    s.release(2, None);
    assert_bytes_are_the_files(&m, &s, 4);
    s.release(4, None);
    let l = s.layers[4].as_ref().unwrap();
    assert_eq!((l.state, l.slot), (LayerState::Idle, usize::MAX));
    assert_eq!(s.free_slots.len(), s.n_slots());
}

#[test]
fn a_wait_returns_once_the_bytes_are_there() {
    let m = model();
    // The fake writes a read's bytes only when its ticket is collected.
    let mut io = m.reader(Complete::WhenCollected { polls: 3 });
    let mut s = slots(&m, 2, &mut io);
    let mut metrics = StreamMetrics::default();
    s.prefetch_after(0, &mut io, &mut metrics).unwrap();
    assert_eq!(new_reads(&m, &io, &mut 0), vec![1, 2]);
    let base = s.host_base().unwrap();
    let l = s.layers[2].as_ref().unwrap();
    assert_eq!(l.state, LayerState::Loading);
    for t in &l.tensors {
        // SAFETY: inside the slot (zeroed memory the read has not reached).
        let slot = unsafe {
            std::slice::from_raw_parts(
                base.add(l.slot * s.slot_bytes + t.in_slot + slot_offset_for(t.file_offset)),
                t.size,
            )
        };
        assert!(slot != m.bytes(t.file_offset, t.size));
        // SAFETY: a tensor of ours.
        assert_eq!(unsafe { (*t.tensor).data }, s.released());
    }
    s.ensure_ready(2, &mut io, &mut metrics, None).unwrap();
    assert_bytes_are_the_files(&m, &s, 2);
    // Layer 1's reads are still in flight (never collected, never written).
    assert_eq!(io.outstanding(), 3);
}

#[test]
fn a_read_error_names_the_layer_and_zeros_replace_the_weights() {
    let m = model();
    let mut io = m.reader(Complete::Reversed);
    let bad = m.specs.iter().find(|t| t.layer == 4).unwrap();
    io.fail_offset = Some(bad.file_offset);
    let mut s = slots(&m, 1, &mut io);
    let mut metrics = StreamMetrics::default();
    s.ensure_ready(2, &mut io, &mut metrics, None).unwrap();
    let e = s.ensure_ready(4, &mut io, &mut metrics, None).unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("layer 4: read failed") && msg.contains("EIO"),
        "{msg}"
    );
    s.point_at_zeros(false);
    for t in &m.specs {
        // SAFETY: tensors of ours.
        assert_eq!(unsafe { (*t.tensor).data }, t.reserved);
    }
}

#[test]
fn no_free_slot_is_an_error_not_a_stray_write() {
    let m = model();
    let mut io = m.reader(Complete::AtSubmit);
    // Lookahead 0: one slot. A second layer cannot load before a release.
    let mut s = slots(&m, 0, &mut io);
    let mut metrics = StreamMetrics::default();
    s.ensure_ready(1, &mut io, &mut metrics, None).unwrap();
    let e = s.ensure_ready(2, &mut io, &mut metrics, None).unwrap_err();
    assert!(format!("{e:#}").contains("no free slot"));
    s.release(1, None);
    s.ensure_ready(2, &mut io, &mut metrics, None).unwrap();
    assert_bytes_are_the_files(&m, &s, 2);
}
