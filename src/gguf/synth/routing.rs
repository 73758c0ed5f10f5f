//! Token-dependent expert routing for synthetic MoEs (`hypura gen --routing
//! zipf:S[,corr:C]`).
//!
//! Without it, random weights route almost every token to the same experts:
//! the layers' outputs (std ≈ 1 per element) drown the token embedding
//! (std ≈ 1/√n_embd), so every router sees about the same hidden state.
//! With it:
//!
//! 1. **Assignment.** Each token `t` gets, per layer `l`, a set `A_l(t)` of
//!    `k` distinct experts (`k` = experts used). The ranks are drawn from
//!    Zipf(S) without replacement (`P(rank r) ∝ (r+1)^-S`; S = 0 is
//!    uniform); a per-layer random permutation turns ranks into expert ids,
//!    so each layer has its own popular experts. With probability `C` a
//!    layer reuses the previous layer's ranks (mapped through its own
//!    permutation) instead of drawing: expert `order_{l-1}[r]` is then
//!    followed by `order_l[r]`, a cross-layer co-activation a predictor can
//!    learn. Every layer's marginal stays Zipf(S).
//! 2. **Router rows.** `u_{l,e}`: a random unit vector per layer and expert,
//!    scaled by a gain (router logits of about [`LOGIT`] for the assigned
//!    experts).
//! 3. **Embeddings.** `emb_t = (Σ_l Σ_{e ∈ A_l(t)} u_{l,e} + noise) / √(L·k)`,
//!    the noise a random vector of norm [`NOISE`]·√(L·k) (tokens with equal
//!    assignments still differ). After the RMS norm the router of layer `l`
//!    sees `u_{l,e}·ĥ ≈ 1/√(L·k)` for `e ∈ A_l(t)` and noise of about
//!    `1/√n_embd` for the others: the top-k is `A_l(t)` while
//!    `n_embd ≫ L·k` and a noisy version of it otherwise.
//! 4. **Residual stream.** The layers' output projections (`attn_output`,
//!    `ffn_down*`) are scaled by [`output_scale`], so all layers together add
//!    about a tenth of the embedding's size: the hidden state stays the token
//!    embedding and each layer routes on the token.
//!
//! The next token then depends mostly on the current one (a random Markov
//! chain over the vocabulary): at temperature > 0 the generated tokens
//! wander over the vocabulary, and the experts used follow the assignment's
//! Zipf(S) popularity.
//!
//! Cost: the router rows of every layer are held while the embedding is
//! written (`n_layer × n_expert × n_embd` f32), and each token row sums
//! `n_layer × k` of them.

use std::io::Write;

use crate::util::rng::Rng;

use super::blocks::f32_to_f16;
use super::{GgmlType, SynthConfig};

/// Router logit of an assigned expert.
pub const LOGIT: f32 = 6.0;
/// Norm of the per-token noise, relative to the routing part.
pub const NOISE: f32 = 0.5;
/// Stream salts, so routing draws are independent of the tensor streams.
const SALT_ASSIGN: u64 = 0x5eed_a551_9000_0001;
const SALT_ORDER: u64 = 0x5eed_a551_9000_0002;
const SALT_ROUTER: u64 = 0x5eed_a551_9000_0003;
const SALT_NOISE: u64 = 0x5eed_a551_9000_0004;

/// `--routing zipf:S[,corr:C]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Routing {
    /// Zipf exponent of expert popularity (0: uniform).
    pub zipf_s: f32,
    /// Probability that a layer reuses the previous layer's ranks.
    pub corr: f32,
}

impl Routing {
    /// Parses `zipf:S` or `zipf:S,corr:C` (S ≥ 0, 0 ≤ C ≤ 1).
    pub fn parse(s: &str) -> Result<Routing, String> {
        let bad = |why: &str| Err(format!("'{s}': {why} (expected zipf:S[,corr:C])"));
        let mut parts = s.split(',');
        let Some(z) = parts.next().and_then(|p| p.trim().strip_prefix("zipf:")) else {
            return bad("must start with zipf:");
        };
        let zipf_s = match z.trim().parse::<f32>() {
            Ok(v) if v.is_finite() && v >= 0.0 => v,
            _ => return bad("the Zipf exponent S must be a number ≥ 0"),
        };
        let mut corr = 0.0;
        if let Some(c) = parts.next() {
            let Some(c) = c.trim().strip_prefix("corr:") else {
                return bad("the second part must be corr:C");
            };
            corr = match c.trim().parse::<f32>() {
                Ok(v) if (0.0..=1.0).contains(&v) => v,
                _ => return bad("the correlation C must be a number from 0 to 1"),
            };
        }
        if parts.next().is_some() {
            return bad("too many parts");
        }
        Ok(Routing { zipf_s, corr })
    }

    /// The canonical text (`zipf:1,corr:0.5`), written to the metadata.
    pub fn describe(&self) -> String {
        format!("zipf:{},corr:{}", self.zipf_s, self.corr)
    }
}

/// How much the layers' output projections are scaled down: all `2·L`
/// residual additions together stay about a tenth of the embedding.
pub fn output_scale(cfg: &SynthConfig) -> f32 {
    0.1 / (2.0 * cfg.n_layer as f32 * cfg.n_embd as f32).sqrt()
}

/// The type of the token embedding under routing: one this module encodes.
pub fn embedding_type(cfg: &SynthConfig) -> GgmlType {
    if cfg.n_embd.is_multiple_of(32) {
        GgmlType::Q8_0
    } else {
        GgmlType::F32
    }
}

/// The assignment of tokens to experts and the router rows of every layer.
pub struct RoutingModel {
    cfg_layers: usize,
    n_exp: usize,
    k: usize,
    n_embd: usize,
    corr: f32,
    /// Cumulative Zipf weights over ranks (last = 1).
    cdf: Vec<f64>,
    /// Per layer: rank → expert id.
    order: Vec<Vec<u32>>,
    /// Per layer and expert: the unit router direction (`n_embd` each).
    dirs: Vec<f32>,
    seed: u64,
}

impl RoutingModel {
    pub fn new(cfg: &SynthConfig, r: Routing) -> RoutingModel {
        let (l, n, e) = (
            cfg.n_layer as usize,
            cfg.n_expert as usize,
            cfg.n_embd as usize,
        );
        let w: Vec<f64> = (0..n)
            .map(|i| ((i + 1) as f64).powf(-f64::from(r.zipf_s)))
            .collect();
        let total: f64 = w.iter().sum();
        let mut acc = 0.0;
        let cdf = w
            .iter()
            .map(|x| {
                acc += x / total;
                acc
            })
            .collect();
        let order = (0..l)
            .map(|il| {
                let mut rng = Rng::for_stream(cfg.seed ^ SALT_ORDER, il as u64);
                let mut o: Vec<u32> = (0..n as u32).collect();
                for i in (1..n).rev() {
                    let j = (rng.next_u64() % (i as u64 + 1)) as usize;
                    o.swap(i, j);
                }
                o
            })
            .collect();
        let mut dirs = vec![0f32; l * n * e];
        for (i, d) in dirs.chunks_exact_mut(e).enumerate() {
            let mut rng = Rng::for_stream(cfg.seed ^ SALT_ROUTER, i as u64);
            random_unit(&mut rng, d);
        }
        RoutingModel {
            cfg_layers: l,
            n_exp: n,
            k: cfg.n_expert_used as usize,
            n_embd: e,
            corr: r.corr,
            cdf,
            order,
            dirs,
            seed: cfg.seed,
        }
    }

    /// The experts of token `t` in every layer: `out[l * k + j]`.
    pub fn assignment(&self, t: u32, out: &mut Vec<u32>) {
        let (n, k) = (self.n_exp, self.k);
        let mut rng = Rng::for_stream(self.seed ^ SALT_ASSIGN, u64::from(t));
        let mut ranks: Vec<usize> = Vec::with_capacity(k);
        out.clear();
        for l in 0..self.cfg_layers {
            let reuse = l > 0 && rng.next_f32() < self.corr;
            if !reuse {
                ranks.clear();
                let mut tries = 0;
                while ranks.len() < k && tries < 64 * k {
                    let u = f64::from(rng.next_f32());
                    let r = self.cdf.partition_point(|&c| c <= u).min(n - 1);
                    if !ranks.contains(&r) {
                        ranks.push(r);
                    }
                    tries += 1;
                }
                // Very skewed Zipf: the tail by rank order.
                let mut r = 0;
                while ranks.len() < k {
                    if !ranks.contains(&r) {
                        ranks.push(r);
                    }
                    r += 1;
                }
            }
            out.extend(ranks.iter().map(|&r| self.order[l][r]));
        }
    }

    fn dir(&self, l: usize, e: usize) -> &[f32] {
        let at = (l * self.n_exp + e) * self.n_embd;
        &self.dirs[at..at + self.n_embd]
    }

    /// Router gain: assigned experts get logits of about [`LOGIT`].
    fn gain(&self) -> f32 {
        LOGIT * ((self.cfg_layers * self.k) as f32).sqrt() / (self.n_embd as f32).sqrt()
    }

    /// Writes layer `l`'s router (`[n_embd, n_expert]` F32, row per expert).
    pub fn write_router(&self, l: usize, out: &mut dyn Write) -> std::io::Result<()> {
        let g = self.gain();
        let mut buf = Vec::with_capacity(self.n_embd * 4);
        for e in 0..self.n_exp {
            buf.clear();
            for &x in self.dir(l, e) {
                buf.extend_from_slice(&(x * g).to_le_bytes());
            }
            out.write_all(&buf)?;
        }
        Ok(())
    }

    /// One token's embedding row (f32, `n_embd`).
    pub fn embedding_row(&self, t: u32, assign: &mut Vec<u32>, row: &mut [f32]) {
        self.assignment(t, assign);
        let parts = (self.cfg_layers * self.k) as f32;
        let mut rng = Rng::for_stream(self.seed ^ SALT_NOISE, u64::from(t));
        random_unit(&mut rng, row);
        for x in row.iter_mut() {
            *x *= NOISE * parts.sqrt();
        }
        for l in 0..self.cfg_layers {
            for &e in &assign[l * self.k..(l + 1) * self.k] {
                for (x, d) in row.iter_mut().zip(self.dir(l, e as usize)) {
                    *x += d;
                }
            }
        }
        // Norm ≈ 1 (per element std ≈ 1/√n_embd, as the random embedding had).
        let s = 1.0 / (parts.sqrt() * (1.0 + NOISE * NOISE).sqrt());
        for x in row.iter_mut() {
            *x *= s;
        }
    }

    /// Writes the token embedding (`[n_embd, n_vocab]` of type `t`).
    pub fn write_embedding(
        &self,
        t: GgmlType,
        n_vocab: u32,
        out: &mut dyn Write,
    ) -> std::io::Result<()> {
        let mut row = vec![0f32; self.n_embd];
        let mut assign = Vec::new();
        let mut buf = Vec::new();
        for tok in 0..n_vocab {
            self.embedding_row(tok, &mut assign, &mut row);
            buf.clear();
            encode_row(t, &row, &mut buf);
            out.write_all(&buf)?;
        }
        Ok(())
    }
}

/// A random unit vector (uniform components, then normalised).
fn random_unit(rng: &mut Rng, d: &mut [f32]) {
    let mut sq = 0f32;
    for x in d.iter_mut() {
        *x = rng.unit_uniform();
        sq += *x * *x;
    }
    let inv = 1.0 / sq.sqrt().max(f32::MIN_POSITIVE);
    for x in d.iter_mut() {
        *x *= inv;
    }
}

/// Encodes a row of floats as Q8_0 (rows of whole 32-blocks) or F32.
fn encode_row(t: GgmlType, row: &[f32], buf: &mut Vec<u8>) {
    if t != GgmlType::Q8_0 {
        for x in row {
            buf.extend_from_slice(&x.to_le_bytes());
        }
        return;
    }
    for b in row.chunks_exact(32) {
        let amax = b.iter().fold(0f32, |m, x| m.max(x.abs()));
        let d = amax / 127.0;
        let h = f32_to_f16(d);
        let d = super::blocks::f16_to_f32(h);
        buf.extend_from_slice(&h.to_le_bytes());
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        buf.extend(
            b.iter()
                .map(|x| (x * inv).round().clamp(-127.0, 127.0) as i8 as u8),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::synth::SynthArch;

    fn cfg(n_exp: u32, k: u32) -> SynthConfig {
        SynthConfig {
            n_expert: n_exp,
            n_expert_used: k,
            n_layer: 4,
            n_embd: 256,
            ..SynthConfig::new(SynthArch::Qwen3Moe)
        }
    }

    #[test]
    fn routing_specs_parse_or_say_why() {
        let r = Routing::parse("zipf:1.2,corr:0.5").unwrap();
        assert_eq!((r.zipf_s, r.corr), (1.2, 0.5));
        assert_eq!(Routing::parse("zipf:0").unwrap().corr, 0.0);
        for bad in [
            "zipf:x",
            "zipf:-1",
            "zipf:1,corr:2",
            "zipf:1,cor:0.5",
            "uniform",
            "zipf:1,corr:0.1,x",
            "zipf:inf",
        ] {
            let e = Routing::parse(bad).unwrap_err();
            assert!(e.contains(bad) && !e.contains('\n'), "{bad}: {e}");
        }
    }

    /// Usage count of each rank position (expert ids mapped back to ranks).
    fn rank_counts(m: &RoutingModel, layer: usize, tokens: u32) -> Vec<u32> {
        let mut counts = vec![0u32; m.n_exp];
        let mut a = Vec::new();
        for t in 0..tokens {
            m.assignment(t, &mut a);
            let set = &a[layer * m.k..(layer + 1) * m.k];
            let mut dedup = set.to_vec();
            dedup.sort_unstable();
            dedup.dedup();
            assert_eq!(dedup.len(), m.k, "token {t}: {set:?}");
            for &e in set {
                let r = m.order[layer].iter().position(|&x| x == e).unwrap();
                counts[r] += 1;
            }
        }
        counts
    }

    #[test]
    fn popularity_follows_the_zipf_exponent() {
        let c = cfg(16, 1);
        let uniform = RoutingModel::new(&c, Routing::parse("zipf:0").unwrap());
        let u = rank_counts(&uniform, 2, 16_000);
        assert!(u.iter().all(|&x| (800..1200).contains(&x)), "{u:?}");
        let skewed = RoutingModel::new(&c, Routing::parse("zipf:1").unwrap());
        let s = rank_counts(&skewed, 2, 16_000);
        // Zipf(1) over 16: p(0) = 1/H16 ≈ 0.296, p(0)/p(3) = 4.
        assert!((4200..5300).contains(&s[0]), "{s:?}");
        let ratio = f64::from(s[0]) / f64::from(s[3]);
        assert!((3.0..5.3).contains(&ratio), "{s:?}");
    }

    #[test]
    fn correlation_repeats_the_previous_layers_ranks() {
        let follow = |corr: &str| {
            let c = cfg(16, 2);
            let m = RoutingModel::new(&c, Routing::parse(corr).unwrap());
            let mut a = Vec::new();
            let mut same = 0;
            for t in 0..2000 {
                m.assignment(t, &mut a);
                let rank = |l: usize, e: u32| m.order[l].iter().position(|&x| x == e).unwrap();
                let r1: Vec<usize> = a[2..4].iter().map(|&e| rank(1, e)).collect();
                let r2: Vec<usize> = a[4..6].iter().map(|&e| rank(2, e)).collect();
                same += usize::from(r1 == r2);
            }
            same
        };
        let (none, half, all) = (
            follow("zipf:0"),
            follow("zipf:0,corr:0.5"),
            follow("zipf:0,corr:1"),
        );
        assert!(none < 100, "{none}");
        assert!((800..1200).contains(&half), "{half}");
        assert_eq!(all, 2000);
    }

    /// The router's top-k on the embedding row (the hidden state without the
    /// layers' small outputs) is the assignment.
    #[test]
    fn routers_pick_the_assigned_experts_of_each_token() {
        let c = cfg(32, 4);
        let m = RoutingModel::new(&c, Routing::parse("zipf:0.5,corr:0.3").unwrap());
        let g = m.gain();
        let (mut row, mut a) = (vec![0f32; 256], Vec::new());
        let (mut right, mut total) = (0, 0);
        for t in 0..200 {
            m.embedding_row(t, &mut a, &mut row);
            let rms = (row.iter().map(|x| x * x).sum::<f32>() / 256.0).sqrt();
            for l in 0..4 {
                let mut logits: Vec<(f32, u32)> = (0..32)
                    .map(|e| {
                        let d = m.dir(l, e as usize);
                        (
                            g * d.iter().zip(&row).map(|(x, y)| x * y).sum::<f32>() / rms,
                            e,
                        )
                    })
                    .collect();
                logits.sort_by(|x, y| y.0.total_cmp(&x.0));
                for &(_, e) in &logits[..4] {
                    right += usize::from(a[l * 4..l * 4 + 4].contains(&e));
                    total += 1;
                }
            }
        }
        // n_embd / (L·k) = 16: mostly, not always, the assignment.
        assert!(right * 100 >= total * 90, "{right}/{total}");
    }
}
