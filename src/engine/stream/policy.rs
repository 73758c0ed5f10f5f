//! Which cached expert to evict: the expert cache's strategy, behind one
//! small trait so the cache and the trace simulator use the same one.
//!
//! Experts are numbered globally (`slot`: the expert layers' experts one
//! after the other). The cache tells the policy about every selection and
//! eviction and evicts, among the loaded experts it may evict, the one with
//! the lowest [`priority`](EvictionPolicy::priority) (ties: lowest slot).
//!
//! - [`Lru`]: least recently selected first.
//! - [`FrequencyLru`]: least often selected first (counts kept for evicted
//!   experts too, halved every [`FrequencyLru::HALF_LIFE_PER_SLOT`] × slots selections so the
//!   cache follows a drifting popularity), then least recently. On Zipf
//!   routing it keeps the popular experts that a burst of rare ones would
//!   push out of an LRU (measured: `policy_sim` tests, docs/synthetic.md).
//!
//! [`default_policy`] is the one place that chooses.

/// A cache eviction strategy over expert slots.
pub trait EvictionPolicy: Send {
    /// Slot `slot` was selected by the router in pass `pass` (hit or load).
    fn touch(&mut self, slot: usize, pass: u64);
    /// Keep priority of a loaded expert: the lowest is evicted first.
    fn priority(&self, slot: usize) -> u64;
    /// A short name for reports.
    fn name(&self) -> &'static str;
}

/// Which policy: `lru` or `freq` (frequency, then recency).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyKind {
    Lru,
    Frequency,
}

/// The strategy the expert cache uses.
pub const DEFAULT: PolicyKind = PolicyKind::Frequency;

/// A policy of kind `k` over `n_slots` experts.
pub fn policy(k: PolicyKind, n_slots: usize) -> Box<dyn EvictionPolicy> {
    match k {
        PolicyKind::Lru => Box::new(Lru::new(n_slots)),
        PolicyKind::Frequency => Box::new(FrequencyLru::new(n_slots)),
    }
}

/// The expert cache's policy over `n_slots` experts.
pub fn default_policy(n_slots: usize) -> Box<dyn EvictionPolicy> {
    policy(DEFAULT, n_slots)
}

/// Least recently selected first.
pub struct Lru {
    last: Vec<u64>,
}

impl Lru {
    pub fn new(n_slots: usize) -> Lru {
        Lru {
            last: vec![0; n_slots],
        }
    }
}

impl EvictionPolicy for Lru {
    fn touch(&mut self, slot: usize, pass: u64) {
        self.last[slot] = pass;
    }
    fn priority(&self, slot: usize) -> u64 {
        self.last[slot]
    }
    fn name(&self) -> &'static str {
        "lru"
    }
}

/// Least often selected first (decayed counts), then least recently.
pub struct FrequencyLru {
    count: Vec<u32>,
    last: Vec<u64>,
    touches: u64,
}

impl FrequencyLru {
    /// Selections (all slots together) per halving of every count, per slot:
    /// with `n` slots every count halves after `HALF_LIFE_PER_SLOT × n`.
    pub const HALF_LIFE_PER_SLOT: u64 = 8;

    pub fn new(n_slots: usize) -> FrequencyLru {
        FrequencyLru {
            count: vec![0; n_slots],
            last: vec![0; n_slots],
            touches: 0,
        }
    }
}

impl EvictionPolicy for FrequencyLru {
    fn touch(&mut self, slot: usize, pass: u64) {
        self.count[slot] = self.count[slot].saturating_add(1);
        self.last[slot] = pass;
        self.touches += 1;
        let half_life = Self::HALF_LIFE_PER_SLOT * self.count.len() as u64;
        if self.touches >= half_life.max(1) {
            self.touches = 0;
            for c in &mut self.count {
                *c /= 2;
            }
        }
    }
    fn priority(&self, slot: usize) -> u64 {
        // Count in the high bits, recency (pass, 40 bits) in the low ones.
        (u64::from(self.count[slot].min(0xff_ffff)) << 40) | (self.last[slot] & ((1 << 40) - 1))
    }
    fn name(&self) -> &'static str {
        "freq"
    }
}
