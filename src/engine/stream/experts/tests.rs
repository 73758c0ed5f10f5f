//! The expert cache on a fake reader: LRU against a reference, merged reads
//! of adjacent misses, router ids.

use std::collections::BTreeMap;

use rand::{Rng, SeedableRng};

use super::*;
use crate::engine::stream::fake::{bytes_at, Complete, FakeModel, FakeReader};
use crate::engine::stream::policy::PolicyKind;
use crate::engine::stream::trace::{simulate, Trace, TraceWriter};

const N: usize = 8;
/// Bytes per expert of each of a layer's three tensors.
const EXPERT: [usize; 3] = [5000, 3000, 4096 + 64];

fn model(n_layer: usize) -> FakeModel {
    let layers: Vec<&[usize]> = (0..n_layer).map(|_| &EXPERT[..]).collect();
    FakeModel::new(&layers, N)
}

/// What one expert takes in the arena accounting.
fn expert_mem() -> u64 {
    EXPERT.iter().map(|&b| slot_len_for(0, b) as u64).sum()
}

fn cache(m: &FakeModel, experts: u64) -> ExpertCache {
    ExpertCache::new(&m.specs, m.n_layer, experts * expert_mem(), None).unwrap()
}

fn next_pass(metrics: &mut StreamMetrics) {
    metrics.passes += 1;
}

/// The router picked `ids` (k per token) in `layer`: load them and check
/// that each picked expert's bytes are the file's.
fn pick(
    m: &FakeModel,
    c: &mut ExpertCache,
    io: &mut FakeReader,
    metrics: &mut StreamMetrics,
    layer: usize,
    ids: &[i32],
) {
    c.clear_selection();
    for &id in ids {
        c.select(layer, id, N).unwrap();
    }
    c.load_selected(layer, io, metrics, None).unwrap();
    let l = c.layers[layer].as_ref().unwrap();
    for &id in ids {
        let e = id as usize;
        assert_eq!(l.state[e], ExpertState::Loaded);
        for (j, t) in l.tensors.iter().enumerate() {
            let off = e * t.expert_bytes;
            assert_eq!(c.expert_addr(layer, e, j), t.base.wrapping_add(off));
            // SAFETY: the tensor points at the arena; expert e is loaded.
            let got = unsafe { bytes_at(t.tensor, off, t.expert_bytes) };
            let want = m.bytes(t.file_offset + off as u64, t.expert_bytes);
            assert!(got == want, "layer {layer} expert {e} tensor {j}");
        }
    }
}

/// A plain LRU over (layer, expert) with the engine's rules: a layer's
/// picks of this pass are never evicted; ties go to the lowest layer, then
/// expert.
struct RefLru {
    cap: usize,
    resident: BTreeMap<(usize, usize), u64>,
    hits: u64,
    misses: u64,
}

impl RefLru {
    fn select(&mut self, layer: usize, picks: &[usize], pass: u64) {
        let missing: Vec<usize> = picks
            .iter()
            .copied()
            .filter(|&e| !self.resident.contains_key(&(layer, e)))
            .collect();
        for &e in picks {
            if let Some(u) = self.resident.get_mut(&(layer, e)) {
                *u = pass;
                self.hits += 1;
            }
        }
        while self.resident.len() + missing.len() > self.cap {
            let victim = self
                .resident
                .iter()
                .filter(|(&(l, e), _)| !(l == layer && picks.contains(&e)))
                .min_by_key(|(&(l, e), &u)| (u, l, e))
                .map(|(&k, _)| k);
            let Some(v) = victim else { break };
            self.resident.remove(&v);
        }
        for e in missing {
            self.resident.insert((layer, e), pass);
            self.misses += 1;
        }
    }
}

#[test]
fn hits_misses_and_evictions_follow_a_reference_lru() {
    // (capacity in experts, layers): with one layer and room for 3, a
    // layer's 4 picks overflow the cache and must all stay.
    for (cap, n_layer, complete) in [
        (5, 3, Complete::AtSubmit),
        (3, 3, Complete::Reversed),
        (12, 3, Complete::WhenCollected { polls: 0 }),
        (3, 1, Complete::AtSubmit),
    ] {
        let m = model(n_layer);
        let mut io = m.reader(complete);
        let mut c = cache(&m, cap as u64);
        c.set_policy(PolicyKind::Lru);
        let mut metrics = StreamMetrics::default();
        let mut lru = RefLru {
            cap,
            resident: BTreeMap::new(),
            hits: 0,
            misses: 0,
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(cap as u64);
        for _ in 0..150 {
            next_pass(&mut metrics);
            for layer in 0..n_layer {
                // One or two tokens of k = 2, skewed towards low experts.
                let n_tok = rng.gen_range(1..=2);
                let ids: Vec<i32> = (0..2 * n_tok)
                    .map(|_| rng.gen_range(0..N).min(rng.gen_range(0..N)) as i32)
                    .collect();
                pick(&m, &mut c, &mut io, &mut metrics, layer, &ids);
                let mut picks: Vec<usize> = Vec::new();
                for &id in &ids {
                    if !picks.contains(&(id as usize)) {
                        picks.push(id as usize);
                    }
                }
                lru.select(layer, &picks, metrics.passes);
                assert_eq!(
                    (metrics.expert_hits, metrics.expert_misses),
                    (lru.hits, lru.misses),
                    "cap {cap}, pass {}",
                    metrics.passes
                );
                let loaded: Vec<(usize, usize)> = (0..n_layer)
                    .flat_map(|l| (0..N).map(move |e| (l, e)))
                    .filter(|&(l, e)| c.layers[l].as_ref().unwrap().state[e] == ExpertState::Loaded)
                    .collect();
                let want: Vec<(usize, usize)> = lru.resident.keys().copied().collect();
                assert_eq!(loaded, want, "cap {cap}, pass {}", metrics.passes);
                assert_eq!(c.resident, want.len() as u64 * expert_mem());
                assert_eq!(io.outstanding(), 0, "no read stays in flight");
            }
        }
        // Room for 3 < 3 layers' picks: each layer evicts the others, no hits.
        let no_hits = cap == 3 && n_layer == 3;
        assert!(lru.misses > 0 && (no_hits || lru.hits > 0), "cap {cap}");
    }
}

#[test]
fn adjacent_misses_are_read_together_in_one_request_per_tensor() {
    let m = model(1);
    for complete in [
        Complete::AtSubmit,
        Complete::Reversed,
        Complete::WhenCollected { polls: 0 },
    ] {
        let mut io = m.reader(complete);
        let mut c = cache(&m, 8);
        let mut metrics = StreamMetrics::default();
        // (first expert, experts) of each run, one request per tensor.
        let runs = |c: &ExpertCache, runs: &[(usize, usize)]| -> Vec<(u64, usize)> {
            let l = c.layers[0].as_ref().unwrap();
            runs.iter()
                .flat_map(|&(e0, n)| {
                    l.tensors.iter().map(move |t| {
                        (
                            t.file_offset + (e0 * t.expert_bytes) as u64,
                            n * t.expert_bytes,
                        )
                    })
                })
                .collect()
        };
        // Misses 3, 6, 1, 2 in router order: runs 1..=3 and 6.
        next_pass(&mut metrics);
        pick(&m, &mut c, &mut io, &mut metrics, 0, &[3, 6, 1, 2]);
        let want = runs(&c, &[(1, 3), (6, 1)]);
        assert_eq!(FakeReader::submitted(&io.log), want, "{complete:?}");
        assert_eq!((metrics.reads, metrics.expert_misses), (6, 4));
        // Every miss of the layer was in flight before the first wait.
        assert_eq!(io.peak_in_flight, 6, "{complete:?}");
        // 2 is cached: misses 0 | 4, 5 are two runs, the hit splits none.
        next_pass(&mut metrics);
        pick(&m, &mut c, &mut io, &mut metrics, 0, &[5, 2, 0, 4]);
        let mut want2 = want.clone();
        want2.extend(runs(&c, &[(0, 1), (4, 2)]));
        assert_eq!(FakeReader::submitted(&io.log), want2, "{complete:?}");
        assert_eq!(
            (metrics.reads, metrics.expert_misses, metrics.expert_hits),
            (12, 7, 1)
        );
        // A cached expert between misses splits the run: 3 cached, 2 and 4 not.
        c.evict_expert(0, 2);
        c.evict_expert(0, 4);
        next_pass(&mut metrics);
        pick(&m, &mut c, &mut io, &mut metrics, 0, &[2, 3, 4]);
        want2.extend(runs(&c, &[(2, 1), (4, 1)]));
        assert_eq!(FakeReader::submitted(&io.log), want2, "{complete:?}");
        assert_eq!(io.outstanding(), 0);
    }
}

#[test]
fn router_ids_are_checked_and_deduplicated() {
    let m = model(1);
    let mut c = cache(&m, 4);
    c.clear_selection();
    for id in [3, 5, 3, 5, 0] {
        c.select(0, id, N).unwrap();
    }
    assert_eq!(c.selected, vec![3, 5, 0]);
    let e = c.select(0, N as i32, N).unwrap_err();
    assert_eq!(format!("{e}"), "layer 0: router picked expert 8 of 8");
    assert!(c.select(0, -1, N).is_err());
    assert!(c.has_layer(0) && !c.has_layer(1));
}

/// Replays `t` through the cache (lookahead 0, policy `k`): hits and misses.
fn replay(m: &FakeModel, t: &Trace, cap: u64, k: PolicyKind) -> (u64, u64) {
    let mut io = m.reader(Complete::Reversed);
    let mut c = cache(m, cap);
    c.set_policy(k);
    let mut metrics = StreamMetrics::default();
    let mut pass = 0;
    for (p, layer, picks) in t.steps() {
        if p != pass {
            assert_eq!(p, pass + 1, "passes in order");
            next_pass(&mut metrics);
            pass = p;
        }
        let ids: Vec<i32> = picks.iter().map(|&e| e as i32).collect();
        pick(m, &mut c, &mut io, &mut metrics, layer, &ids);
    }
    (metrics.expert_hits, metrics.expert_misses)
}

#[test]
fn a_routing_trace_replays_to_the_reference_lru_hit_rate() {
    let (n_layer, cap) = (3, 7u64);
    let m = model(n_layer);
    let synth = crate::engine::stream::trace::tests::synth_trace(
        "zipf:1,corr:0.5",
        n_layer as u32,
        N as u32,
        2,
        400,
        cap,
    );
    // Through the file, with this cache's accounting in the header.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("zipf.trace");
    let layers: Vec<(usize, usize, u64)> = (0..n_layer).map(|l| (l, N, expert_mem())).collect();
    let mut w = TraceWriter::create(&path, cap * expert_mem(), &layers).unwrap();
    for (p, l, tok, ids) in &synth.records {
        w.record(*p, *l, *tok, ids).unwrap();
    }
    w.flush().unwrap();
    let t = Trace::read(&path).unwrap();

    let mut lru = RefLru {
        cap: cap as usize,
        resident: BTreeMap::new(),
        hits: 0,
        misses: 0,
    };
    for (p, layer, picks) in t.steps() {
        lru.select(layer, &picks, p);
    }
    let cache_lru = replay(&m, &t, cap, PolicyKind::Lru);
    assert_eq!(cache_lru, (lru.hits, lru.misses));
    let sim = simulate(&t, |n| policy::policy(PolicyKind::Lru, n), 0).unwrap();
    assert_eq!((sim.hits, sim.misses), cache_lru);
    // Some hits, some misses: the comparison means something.
    assert!(lru.hits > 100 && lru.misses > 100, "{:?}", cache_lru);

    // The frequency policy: the cache and the simulator agree too.
    let cache_freq = replay(&m, &t, cap, PolicyKind::Frequency);
    let sim = simulate(&t, |n| policy::policy(PolicyKind::Frequency, n), 0).unwrap();
    assert_eq!((sim.hits, sim.misses), cache_freq);
    assert_ne!(cache_freq, cache_lru, "two policies, one outcome");
}

/// A reader that notes how many reads were in flight at each wait.
struct DepthAtWait {
    inner: FakeReader,
    depths: Vec<usize>,
}

impl ReadBackend for DepthAtWait {
    fn info(&self) -> &crate::io::ReaderInfo {
        self.inner.info()
    }
    fn add_file(&mut self, path: &std::path::Path) -> Result<FileId, crate::io::IoError> {
        self.inner.add_file(path)
    }
    fn file_len(&self, file: FileId) -> Option<u64> {
        self.inner.file_len(file)
    }
    fn register_buffers(&mut self, r: &[(*mut u8, usize)]) -> Result<bool, crate::io::IoError> {
        self.inner.register_buffers(r)
    }
    unsafe fn submit(&mut self, req: ReadRequest) -> Result<Ticket, crate::io::IoError> {
        // SAFETY: the caller's contract, passed on.
        unsafe { self.inner.submit(req) }
    }
    fn submit_owned(
        &mut self,
        file: FileId,
        off: u64,
        len: usize,
        buf: crate::io::AlignedBuf,
    ) -> Result<Ticket, crate::io::IoError> {
        self.inner.submit_owned(file, off, len, buf)
    }
    fn wait(&mut self, t: Ticket) -> Result<crate::io::Completion, crate::io::IoError> {
        self.depths.push(self.inner.outstanding());
        self.inner.wait(t)
    }
    fn try_wait(&mut self, t: Ticket) -> Result<Option<crate::io::Completion>, crate::io::IoError> {
        self.inner.try_wait(t)
    }
    fn outstanding(&self) -> usize {
        self.inner.outstanding()
    }
}

#[test]
fn a_layers_misses_are_all_in_flight_before_the_first_wait() {
    let m = model(1);
    let mut io = DepthAtWait {
        inner: m.reader(Complete::WhenCollected { polls: 0 }),
        depths: Vec::new(),
    };
    let mut c = cache(&m, 8);
    let mut metrics = StreamMetrics::default();
    next_pass(&mut metrics);
    c.clear_selection();
    for id in [6, 1, 4, 2] {
        c.select(0, id, N).unwrap();
    }
    c.load_selected(0, &mut io, &mut metrics, None).unwrap();
    // 4 experts in 3 runs (1-2, 4, 6) × 3 tensors, one request each, all
    // queued at the first wait.
    assert_eq!(metrics.reads, 9);
    assert_eq!(io.depths.first(), Some(&9), "{:?}", io.depths);
    assert_eq!(io.outstanding(), 0);
}

/// Pre-gating's read-ahead: the guessed experts of the next layer are read
/// once (adjacent ones together), stay `Loading` until that layer's top-k,
/// which collects them with its own misses; eviction for a guess spares the
/// layer at hand's picks; after an error nothing stays in flight.
#[test]
fn read_ahead_is_read_once_and_collected_by_its_layer() {
    let m = model(2);
    for complete in [
        Complete::AtSubmit,
        Complete::Reversed,
        Complete::WhenCollected { polls: 0 },
    ] {
        let mut io = m.reader(complete);
        let mut c = cache(&m, 6);
        let mut metrics = StreamMetrics::default();
        next_pass(&mut metrics);
        pick(&m, &mut c, &mut io, &mut metrics, 0, &[0, 1]);
        let before = FakeReader::submitted(&io.log).len();
        c.prefetch(1, &[5, 2, 3, 9, -1], 0, &mut io, &mut metrics)
            .unwrap();
        // Out-of-range guesses are dropped; runs 2..=3 and 5: one request
        // per tensor each.
        assert_eq!(
            FakeReader::submitted(&io.log).len() - before,
            6,
            "{complete:?}"
        );
        assert_eq!(metrics.prefetched, 3);
        let l1 = c.layers[1].as_ref().unwrap();
        for e in [2, 3, 5] {
            assert_eq!(l1.state[e], ExpertState::Loading, "{complete:?}");
        }
        assert_eq!(c.tickets_held(), 6);
        // The router picks 2 (guessed) and 4 (not): only 4 is read now;
        // every read of the layer is collected, the unused guesses cached.
        pick(&m, &mut c, &mut io, &mut metrics, 1, &[2, 4]);
        assert_eq!(
            FakeReader::submitted(&io.log).len() - before,
            9,
            "{complete:?}"
        );
        assert_eq!(c.tickets_held(), 0);
        assert_eq!((metrics.prefetch_used, metrics.expert_misses), (1, 4));
        let l1 = c.layers[1].as_ref().unwrap();
        assert_eq!(
            (l1.state[3], l1.state[5]),
            (ExpertState::Loaded, ExpertState::Loaded)
        );
        // Their bytes are the file's too.
        pick(&m, &mut c, &mut io, &mut metrics, 1, &[3, 5]);
        assert_eq!(metrics.expert_hits, 2);
    }
}

#[test]
fn read_ahead_never_evicts_the_picks_about_to_compute() {
    let m = model(2);
    let mut io = m.reader(Complete::WhenCollected { polls: 0 });
    let mut c = cache(&m, 3);
    let mut metrics = StreamMetrics::default();
    next_pass(&mut metrics);
    pick(&m, &mut c, &mut io, &mut metrics, 0, &[0, 1, 2]);
    // Full of layer 0's picks of this pass: no guess fits, none is read.
    let n = FakeReader::submitted(&io.log).len();
    c.prefetch(1, &[4, 5], 0, &mut io, &mut metrics).unwrap();
    assert_eq!(FakeReader::submitted(&io.log).len(), n);
    assert_eq!(metrics.prefetched, 0);
    // Next pass layer 0 picks only 0: 1 and 2 make room for the guesses.
    next_pass(&mut metrics);
    pick(&m, &mut c, &mut io, &mut metrics, 0, &[0]);
    c.prefetch(1, &[4, 5], 0, &mut io, &mut metrics).unwrap();
    assert_eq!(metrics.prefetched, 2);
    let (l0, l1) = (c.layers[0].as_ref().unwrap(), c.layers[1].as_ref().unwrap());
    assert_eq!(l0.state[0], ExpertState::Loaded);
    assert_eq!(
        (l0.state[1], l0.state[2]),
        (ExpertState::Empty, ExpertState::Empty)
    );
    assert_eq!(
        (l1.state[4], l1.state[5]),
        (ExpertState::Loading, ExpertState::Loading)
    );
    // An error elsewhere: the engine collects every read in flight.
    c.collect_all(&mut io);
    assert_eq!(c.tickets_held(), 0);
    let l1 = c.layers[1].as_ref().unwrap();
    assert_eq!(
        (l1.state[4], l1.state[5]),
        (ExpertState::Loaded, ExpertState::Loaded)
    );
}
