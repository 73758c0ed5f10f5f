//! Trace files round-trip; the simulator against hand-worked cases; the
//! frequency policy against LRU on Zipf routing.

use super::*;
use crate::engine::stream::policy::{policy, PolicyKind};
use crate::gguf::synth::{Routing, RoutingModel, SynthArch, SynthConfig};
use crate::util::rng::Rng;

/// A decode-only trace from the synthetic routing model: `passes` tokens
/// drawn uniformly from the vocabulary, each routed by its assignment.
pub(crate) fn synth_trace(
    spec: &str,
    n_layer: u32,
    n_exp: u32,
    k: u32,
    passes: u64,
    cap_experts: u64,
) -> Trace {
    let cfg = SynthConfig {
        n_layer,
        n_expert: n_exp,
        n_expert_used: k,
        n_embd: 64,
        n_vocab: 4096,
        ..SynthConfig::new(SynthArch::Qwen3Moe)
    };
    let m = RoutingModel::new(&cfg, Routing::parse(spec).unwrap());
    let mut rng = Rng::new(7);
    let mut a = Vec::new();
    let mut records = Vec::new();
    for p in 1..=passes {
        let tok = (rng.next_u64() % 4096) as u32;
        m.assignment(tok, &mut a);
        for l in 0..n_layer as usize {
            let ids = a[l * k as usize..(l + 1) * k as usize]
                .iter()
                .map(|&e| e as i32)
                .collect();
            records.push((p, l, 0, ids));
        }
    }
    Trace {
        budget: cap_experts * 1000,
        layers: (0..n_layer as usize)
            .map(|l| (l, n_exp as usize, 1000))
            .collect(),
        records,
    }
}

#[test]
fn traces_round_trip_through_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.trace");
    let mut w = TraceWriter::create(&p, 4096, &[(0, 8, 100), (2, 8, 200)]).unwrap();
    w.record(1, 0, 0, &[3, 5]).unwrap();
    w.record(1, 0, 1, &[5, 7]).unwrap();
    w.record(1, 2, 0, &[1, 0]).unwrap();
    w.record(2, 0, 0, &[3, 4]).unwrap();
    w.flush().unwrap();
    let t = Trace::read(&p).unwrap();
    assert_eq!(t.budget, 4096);
    assert_eq!(t.layers, vec![(0, 8, 100), (2, 8, 200)]);
    assert_eq!(t.records.len(), 4);
    assert_eq!(t.records[1], (1, 0, 1, vec![5, 7]));
    // Tokens of a pass share the pass: one step, distinct experts.
    assert_eq!(
        t.steps(),
        vec![
            (1, 0, vec![3, 5, 7]),
            (1, 2, vec![1, 0]),
            (2, 0, vec![3, 4])
        ]
    );
    assert!(Trace::parse("t 1 0 0 1\n").is_err());
    let e = Trace::parse(&format!("{MAGIC}\nt 1 0 x 1\n")).unwrap_err();
    assert!(format!("{e}").contains("line 2"), "{e}");
}

#[test]
fn the_simulator_counts_by_hand() {
    // Room for 2 experts of 100 bytes; one layer; LRU.
    let text = format!(
        "{MAGIC}\nbudget 200\nlayer 0 4 100\nt 1 0 0 0 1\nt 2 0 0 1 2\nt 3 0 0 0 2\nt 4 0 0 1\n"
    );
    let t = Trace::parse(&text).unwrap();
    // 1: miss 0, 1. 2: hit 1, miss 2 (evicts 0). 3: miss 0 (evicts 1), hit 2.
    // 4: miss 1 (evicts 0, older than 2).
    let lru = simulate(&t, |n| policy(PolicyKind::Lru, n), 0).unwrap();
    assert_eq!(lru, SimResult { hits: 2, misses: 5 });
    // Only passes ≥ 3 counted.
    let late = simulate(&t, |n| policy(PolicyKind::Lru, n), 3).unwrap();
    assert_eq!(late, SimResult { hits: 1, misses: 2 });
    // A layer's picks beyond the budget all load (and nothing else stays).
    let over = format!("{MAGIC}\nbudget 100\nlayer 0 4 100\nt 1 0 0 0 1 2\nt 2 0 0 2\n");
    let r = simulate(
        &Trace::parse(&over).unwrap(),
        |n| policy(PolicyKind::Lru, n),
        0,
    )
    .unwrap();
    assert_eq!(r, SimResult { hits: 1, misses: 3 });
}

#[test]
fn frequency_beats_lru_on_zipf_routing_and_ties_on_uniform() {
    // 8 layers of 32 experts top-4; the cache holds a quarter to a half.
    let mut lines = Vec::new();
    for spec in ["zipf:0", "zipf:0.8", "zipf:1.2,corr:0.5"] {
        for cap in [64, 96, 128] {
            let t = synth_trace(spec, 8, 32, 4, 600, cap);
            let rate = |k| {
                simulate(&t, |n| policy(k, n), 100)
                    .unwrap()
                    .hit_rate()
                    .unwrap()
            };
            let (lru, freq) = (rate(PolicyKind::Lru), rate(PolicyKind::Frequency));
            lines.push(format!("{spec} cap {cap}: lru {lru:.3} freq {freq:.3}"));
            if spec == "zipf:0" {
                // Nothing to learn: the capacity share, give or take.
                let share = cap as f64 / 256.0;
                assert!((lru - share).abs() < 0.06, "{lines:?}");
                assert!(freq > lru - 0.03, "{lines:?}");
            } else {
                assert!(freq > lru + 0.03, "{lines:?}");
            }
        }
    }
    eprintln!("{}", lines.join("\n"));
}
