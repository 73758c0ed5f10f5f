//! Routing traces (`hypura run --routing-trace FILE`) and a cache simulator
//! that replays them.
//!
//! The file is text, one record per line:
//!
//! ```text
//! # hypura routing trace v1
//! budget 134217728          expert cache budget in bytes
//! layer 0 32 1622016        expert layer, its expert count, memory per expert
//! …
//! t 5 0 0 17 3 30 8         pass 5, layer 0, token 0 of the pass: its experts
//! ```
//!
//! A pass is one decode (or prompt ubatch, whose tokens share the pass). The
//! simulator replays the passes through an [`EvictionPolicy`] with the
//! expert cache's own accounting (bytes per expert of each layer, a layer's
//! picks of the pass never evicted), so with no read-ahead its hit rate is
//! the cache's.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::{bail, Context as _, Result};

use super::policy::EvictionPolicy;

const MAGIC: &str = "# hypura routing trace v1";

/// Writes a trace; buffered (one allocation at creation, none per record).
pub struct TraceWriter {
    out: BufWriter<File>,
}

impl TraceWriter {
    /// Creates `path` and writes the header: the budget and, per expert
    /// layer, `(layer, experts, memory per expert)`.
    pub fn create(path: &Path, budget: u64, layers: &[(usize, usize, u64)]) -> Result<TraceWriter> {
        let f = File::create(path)
            .with_context(|| format!("{}: cannot create the routing trace", path.display()))?;
        let mut out = BufWriter::with_capacity(1 << 16, f);
        writeln!(out, "{MAGIC}")?;
        writeln!(out, "budget {budget}")?;
        for (l, n, mem) in layers {
            writeln!(out, "layer {l} {n} {mem}")?;
        }
        Ok(TraceWriter { out })
    }

    /// One token's experts in `layer` during `pass`.
    pub fn record(&mut self, pass: u64, layer: usize, token: usize, ids: &[i32]) -> Result<()> {
        write!(self.out, "t {pass} {layer} {token}")?;
        for id in ids {
            write!(self.out, " {id}")?;
        }
        writeln!(self.out)?;
        Ok(())
    }

    pub fn flush(&mut self) -> Result<()> {
        self.out.flush().context("cannot write the routing trace")
    }
}

/// A parsed trace.
#[derive(Debug, Clone, PartialEq)]
pub struct Trace {
    pub budget: u64,
    /// `(layer, experts, memory per expert)` per expert layer, by layer.
    pub layers: Vec<(usize, usize, u64)>,
    /// `(pass, layer, token, experts)` in file order.
    pub records: Vec<(u64, usize, usize, Vec<i32>)>,
}

impl Trace {
    pub fn read(path: &Path) -> Result<Trace> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read the routing trace", path.display()))?;
        Trace::parse(&text).with_context(|| format!("{}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Trace> {
        let mut lines = text.lines().enumerate();
        if lines.next().map(|(_, l)| l.trim()) != Some(MAGIC) {
            bail!("not a routing trace (no '{MAGIC}' line)");
        }
        let mut t = Trace {
            budget: 0,
            layers: Vec::new(),
            records: Vec::new(),
        };
        for (i, line) in lines {
            let bad = || format!("line {}: cannot read '{line}'", i + 1);
            let mut w = line.split_ascii_whitespace();
            let num = |w: &mut std::str::SplitAsciiWhitespace| -> Result<u64> {
                w.next()
                    .and_then(|x| x.parse().ok())
                    .with_context(|| format!("line {}: cannot read '{line}'", i + 1))
            };
            match w.next() {
                None => {}
                Some(c) if c.starts_with('#') => {}
                Some("budget") => t.budget = num(&mut w)?,
                Some("layer") => {
                    let (l, n, mem) = (num(&mut w)?, num(&mut w)?, num(&mut w)?);
                    t.layers.push((l as usize, n as usize, mem));
                }
                Some("t") => {
                    let (p, l, tok) = (num(&mut w)?, num(&mut w)?, num(&mut w)?);
                    let ids = w
                        .map(|x| x.parse::<i32>())
                        .collect::<Result<Vec<_>, _>>()
                        .with_context(bad)?;
                    t.records.push((p, l as usize, tok as usize, ids));
                }
                Some(_) => bail!(bad()),
            }
        }
        t.layers.sort_unstable();
        Ok(t)
    }

    /// The trace as the cache sees it: per (pass, layer) in order, the
    /// distinct experts of all its tokens, in first-pick order.
    pub fn steps(&self) -> Vec<(u64, usize, Vec<usize>)> {
        let mut out: Vec<(u64, usize, Vec<usize>)> = Vec::new();
        for (p, l, _, ids) in &self.records {
            if out.last().is_none_or(|s| (s.0, s.1) != (*p, *l)) {
                out.push((*p, *l, Vec::new()));
            }
            if let Some(s) = out.last_mut() {
                for &id in ids {
                    let e = id.max(0) as usize;
                    if !s.2.contains(&e) {
                        s.2.push(e);
                    }
                }
            }
        }
        out
    }
}

/// Hits and misses of a simulated cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SimResult {
    pub hits: u64,
    pub misses: u64,
}

impl SimResult {
    pub fn hit_rate(&self) -> Option<f64> {
        let n = self.hits + self.misses;
        (n > 0).then(|| self.hits as f64 / n as f64)
    }
}

/// Replays `trace` through a cache of the trace's budget run by `policy`
/// (made for the trace's slot count by `make`); only passes `>= from_pass`
/// count (e.g. the generated tokens, after the prompt's passes).
pub fn simulate(
    trace: &Trace,
    make: impl FnOnce(usize) -> Box<dyn EvictionPolicy>,
    from_pass: u64,
) -> Result<SimResult> {
    let mut offset = vec![usize::MAX; trace.layers.iter().map(|l| l.0 + 1).max().unwrap_or(0)];
    let mut slot_mem = Vec::new();
    let mut slot_layer = Vec::new();
    for &(l, n, mem) in &trace.layers {
        offset[l] = slot_mem.len();
        slot_mem.extend(std::iter::repeat_n(mem, n));
        slot_layer.extend(std::iter::repeat_n(l, n));
    }
    let mut policy = make(slot_mem.len());
    let mut loaded = vec![false; slot_mem.len()];
    let mut last_pass = vec![u64::MAX; slot_mem.len()];
    let mut resident = 0u64;
    let mut r = SimResult::default();
    for (pass, layer, picks) in trace.steps() {
        let (Some(&base), Some(&(_, n, mem))) = (
            offset.get(layer),
            trace.layers.iter().find(|x| x.0 == layer),
        ) else {
            bail!("pass {pass}: layer {layer} is not an expert layer of the trace");
        };
        let mut need = 0;
        let counts = pass >= from_pass;
        for &e in &picks {
            if e >= n {
                bail!("pass {pass}: layer {layer} has no expert {e}");
            }
            let s = base + e;
            policy.touch(s, pass);
            last_pass[s] = pass;
            if loaded[s] {
                r.hits += u64::from(counts);
            } else {
                need += mem;
            }
        }
        while resident + need > trace.budget {
            let victim = (0..slot_mem.len())
                .filter(|&s| loaded[s] && !(slot_layer[s] == layer && last_pass[s] == pass))
                .min_by_key(|&s| (policy.priority(s), s));
            let Some(v) = victim else { break };
            loaded[v] = false;
            resident -= slot_mem[v];
        }
        for &e in &picks {
            let s = base + e;
            if !loaded[s] {
                loaded[s] = true;
                resident += mem;
                r.misses += u64::from(counts);
            }
        }
    }
    Ok(r)
}

#[cfg(test)]
pub(crate) mod tests;
