//! Token sampling through llama.cpp's sampler chain (`llama_sampler_chain_*`):
//! repetition penalties, top-k, typical-p, top-p, min-p, temperature, then a
//! seeded draw — llama.cpp's own order and defaults (its CLI's: top-k 40,
//! top-p 0.95, min-p 0.05, temperature 0.8, repeat penalty 1.0 over the last
//! 64 tokens). A GBNF grammar constrains the choice the way llama.cpp's common
//! sampler does: the chain picks a token, the grammar checks it, and only a
//! rejected pick is redone with the grammar applied to every candidate.
//!
//! Greedy (`temp <= 0` or `top_k == 1`) is an argmax over the logits, the
//! lowest index winning ties as in llama.cpp's greedy sampler. Without
//! penalties or a grammar it skips the chain's candidate array (262k entries
//! for Gemma 3) and runs the vectorised [`argmax`]: `cargo bench --bench
//! greedy` measured the chain's greedy at 297 us a token against 27 us here
//! (10.9x; same picks), which is 10% of a token at Gemma's ~300 tok/s on the
//! H200, so the fast path stays.
//!
//! Every buffer is allocated when the sampler is made; sampling a token
//! allocates nothing on Hypura's side.

use std::ptr::NonNull;

use anyhow::{anyhow, bail, Result};
use hypura_sys as sys;

use super::backend;
use super::model::Model;

/// How to pick each token (one request's settings).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SamplingParams {
    /// 0 (or less) is greedy.
    pub temp: f32,
    /// 0 keeps every token; 1 is greedy.
    pub top_k: i32,
    /// 1.0 turns it off.
    pub top_p: f32,
    /// 0.0 turns it off.
    pub min_p: f32,
    /// 1.0 turns it off.
    pub typical_p: f32,
    /// 1.0 turns it off.
    pub repeat_penalty: f32,
    /// Tokens the penalties look back over (0 turns them off, -1 the whole context).
    pub repeat_last_n: i32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// The draw's seed (llama.cpp's samplers take 32 bits).
    pub seed: u32,
    /// A GBNF grammar (root rule `root`) the output must follow.
    pub grammar: Option<String>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temp: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            typical_p: 1.0,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 0,
            grammar: None,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding: the most likely token every time.
    pub fn greedy() -> Self {
        SamplingParams {
            temp: 0.0,
            ..SamplingParams::default()
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.temp <= 0.0 || self.top_k == 1
    }

    fn penalties_on(&self) -> bool {
        self.repeat_last_n != 0
            && (self.repeat_penalty != 1.0
                || self.presence_penalty != 0.0
                || self.frequency_penalty != 0.0)
    }

    /// Checks every value a user can give; the message names the setting.
    pub fn validate(&self) -> Result<()> {
        let finite = |name: &str, v: f32| {
            if v.is_finite() {
                Ok(())
            } else {
                Err(anyhow!("{name} must be a finite number (got {v})"))
            }
        };
        finite("temperature", self.temp)?;
        if self.temp < 0.0 {
            bail!("temperature must be >= 0 (got {})", self.temp);
        }
        if self.top_k < 0 {
            bail!("top_k must be >= 0 (got {})", self.top_k);
        }
        for (name, v) in [
            ("top_p", self.top_p),
            ("min_p", self.min_p),
            ("typical_p", self.typical_p),
        ] {
            finite(name, v)?;
            if !(0.0..=1.0).contains(&v) {
                bail!("{name} must be between 0 and 1 (got {v})");
            }
        }
        finite("repeat_penalty", self.repeat_penalty)?;
        if self.repeat_penalty <= 0.0 {
            bail!("repeat_penalty must be > 0 (got {})", self.repeat_penalty);
        }
        if self.repeat_last_n < -1 {
            bail!(
                "repeat_last_n must be -1 (the whole context), 0 (off) or a count (got {})",
                self.repeat_last_n
            );
        }
        finite("presence_penalty", self.presence_penalty)?;
        finite("frequency_penalty", self.frequency_penalty)?;
        Ok(())
    }
}

/// An owned llama.cpp sampler (a chain, or a lone grammar sampler).
struct Raw(NonNull<sys::llama_sampler>);

impl Drop for Raw {
    fn drop(&mut self) {
        // SAFETY: we own the sampler (never added to another chain).
        unsafe { sys::llama_sampler_free(self.0.as_ptr()) }
    }
}

/// A configured sampler for one generation.
pub struct Sampler {
    chain: Raw,
    grammar: Option<Raw>,
    /// Greedy with nothing that changes the logits: plain [`argmax`].
    fast_greedy: bool,
    /// The candidate array the chain works on (one entry per token).
    candidates: Vec<sys::llama_token_data>,
}

impl Sampler {
    /// Builds the chain for `params`. `n_ctx` bounds the penalties' window
    /// when `repeat_last_n` is -1. A grammar that does not parse is an error.
    pub fn new(params: &SamplingParams, model: &Model, n_ctx: u32) -> Result<Sampler> {
        Self::build(params, model.n_vocab(), Some(model), n_ctx, true)
    }

    /// A sampler without a model that always runs llama.cpp's chain, greedy
    /// too (no grammar): for `benches/greedy.rs`, which weighs the chain's
    /// greedy against the fast path.
    #[doc(hidden)]
    pub fn chain_only(params: &SamplingParams, n_vocab: usize) -> Result<Sampler> {
        Self::build(params, n_vocab, None, 0, false)
    }

    /// [`Sampler::new`] with the parts spelled out: `model` is needed for a
    /// grammar only; `allow_fast` false keeps greedy in the chain (tests).
    fn build(
        params: &SamplingParams,
        n_vocab: usize,
        model: Option<&Model>,
        n_ctx: u32,
        allow_fast: bool,
    ) -> Result<Sampler> {
        params.validate()?;
        backend::init();
        // SAFETY: plain constructors; each sampler is handed to the chain,
        // which owns (and frees) it from then on.
        let chain = unsafe {
            let mut cp = sys::llama_sampler_chain_default_params();
            cp.no_perf = true;
            let chain = NonNull::new(sys::llama_sampler_chain_init(cp))
                .ok_or_else(|| anyhow!("cannot create a sampler chain"))?;
            let add = |s: *mut sys::llama_sampler| sys::llama_sampler_chain_add(chain.as_ptr(), s);
            if params.penalties_on() {
                // No more tokens than the context holds can be looked back
                // over; llama.cpp allocates the window up front (a window of
                // 2^31 tokens took 8 GiB).
                let ctx = i32::try_from(n_ctx).unwrap_or(i32::MAX);
                let last_n = if params.repeat_last_n < 0 {
                    ctx
                } else {
                    params.repeat_last_n.min(ctx)
                };
                add(sys::llama_sampler_init_penalties(
                    n_vocab as i32,
                    last_n,
                    params.repeat_penalty,
                    params.frequency_penalty,
                    params.presence_penalty,
                ));
            }
            if params.is_greedy() {
                add(sys::llama_sampler_init_greedy());
            } else {
                if params.top_k > 0 {
                    add(sys::llama_sampler_init_top_k(params.top_k));
                }
                if params.typical_p < 1.0 {
                    add(sys::llama_sampler_init_typical(params.typical_p, 1));
                }
                if params.top_p < 1.0 {
                    add(sys::llama_sampler_init_top_p(params.top_p, 1));
                }
                if params.min_p > 0.0 {
                    add(sys::llama_sampler_init_min_p(params.min_p, 1));
                }
                add(sys::llama_sampler_init_temp(params.temp));
                add(sys::llama_sampler_init_dist(params.seed));
            }
            Raw(chain)
        };
        let grammar = match &params.grammar {
            None => None,
            Some(g) => {
                let model =
                    model.ok_or_else(|| anyhow!("a grammar needs the model's vocabulary"))?;
                let text = std::ffi::CString::new(g.as_str())
                    .map_err(|_| anyhow!("the grammar contains a NUL byte"))?;
                backend::take_last_error();
                // SAFETY: the vocabulary belongs to the live model; strings are
                // NUL-terminated and outlive the call (llama.cpp copies them).
                let p = unsafe {
                    sys::llama_sampler_init_grammar(
                        model.vocab_ptr(),
                        text.as_ptr(),
                        c"root".as_ptr(),
                    )
                };
                let p = NonNull::new(p).ok_or_else(|| {
                    anyhow!(
                        "the grammar does not parse: {}",
                        backend::take_last_error().unwrap_or_else(|| "see HYPURA_LOG=info".into())
                    )
                })?;
                Some(Raw(p))
            }
        };
        let fast_greedy =
            allow_fast && params.is_greedy() && !params.penalties_on() && grammar.is_none();
        let candidates = if fast_greedy {
            Vec::new()
        } else {
            vec![
                sys::llama_token_data {
                    id: 0,
                    logit: 0.0,
                    p: 0.0
                };
                n_vocab
            ]
        };
        Ok(Sampler {
            chain,
            grammar,
            fast_greedy,
            candidates,
        })
    }

    /// Tells the penalties about a token already in the text (the prompt's).
    pub fn accept_prompt(&mut self, tokens: &[i32]) {
        if self.fast_greedy {
            return;
        }
        for &t in tokens {
            // SAFETY: live chain; accept only records the token.
            unsafe { sys::llama_sampler_accept(self.chain.0.as_ptr(), t) };
        }
    }

    /// Picks the next token from a row of logits and records it.
    pub fn sample(&mut self, logits: &[f32]) -> i32 {
        if self.fast_greedy {
            return argmax(logits) as i32;
        }
        debug_assert_eq!(
            logits.len(),
            self.candidates.len(),
            "logits row and vocabulary differ"
        );
        let tok = self.pick(logits, false);
        let tok = match &self.grammar {
            Some(g) if !Self::grammar_allows(g, tok) => self.pick(logits, true),
            _ => tok,
        };
        // SAFETY: live samplers; accept records the token (advances the grammar).
        unsafe {
            sys::llama_sampler_accept(self.chain.0.as_ptr(), tok);
            if let Some(g) = &self.grammar {
                sys::llama_sampler_accept(g.0.as_ptr(), tok);
            }
        }
        tok
    }

    /// Runs the chain over all candidates (first through the grammar when
    /// `with_grammar`) and returns the selected token.
    fn pick(&mut self, logits: &[f32], with_grammar: bool) -> i32 {
        for (i, (c, &l)) in self.candidates.iter_mut().zip(logits).enumerate() {
            *c = sys::llama_token_data {
                id: i as i32,
                logit: l,
                p: 0.0,
            };
        }
        let mut arr = sys::llama_token_data_array {
            data: self.candidates.as_mut_ptr(),
            size: logits.len().min(self.candidates.len()),
            selected: -1,
            sorted: false,
        };
        // SAFETY: `arr` points into `candidates`, valid and exclusively ours
        // for the calls; samplers only reorder, shrink or rescore it in place.
        unsafe {
            if with_grammar {
                if let Some(g) = &self.grammar {
                    sys::llama_sampler_apply(g.0.as_ptr(), &mut arr);
                }
            }
            sys::llama_sampler_apply(self.chain.0.as_ptr(), &mut arr);
            if arr.selected < 0 || arr.selected as usize >= arr.size {
                // Nothing selectable (every logit -inf, a grammar at a dead end):
                // the plain argmax keeps decoding well-defined.
                return argmax(logits) as i32;
            }
            (*arr.data.add(arr.selected as usize)).id
        }
    }

    fn grammar_allows(g: &Raw, tok: i32) -> bool {
        let mut one = sys::llama_token_data {
            id: tok,
            logit: 1.0,
            p: 0.0,
        };
        let mut arr = sys::llama_token_data_array {
            data: &mut one,
            size: 1,
            selected: -1,
            sorted: false,
        };
        // SAFETY: a one-element array on the stack, valid for the call.
        unsafe { sys::llama_sampler_apply(g.0.as_ptr(), &mut arr) };
        one.logit.is_finite()
    }
}

/// Index of the largest value; the first one on ties; NaN never wins (0
/// when nothing beats -inf). Greedy decoding runs this over the whole
/// vocabulary every token (262k floats for Gemma 3): lane-wise maxima first
/// (the compiler vectorises the fixed-width inner loop), then the first
/// position holding the maximum.
pub fn argmax(v: &[f32]) -> usize {
    const L: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; L];
    let chunks = v.chunks_exact(L);
    let tail = chunks.remainder();
    for c in chunks {
        for (lane, &x) in lanes.iter_mut().zip(c) {
            // `>` is false for NaN: a NaN never replaces a lane's maximum.
            if x > *lane {
                *lane = x;
            }
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &x in lanes.iter().chain(tail) {
        if x > m {
            m = x;
        }
    }
    if m == f32::NEG_INFINITY {
        return 0;
    }
    for (ci, c) in v.chunks(L).enumerate() {
        if c.contains(&m) {
            return ci * L + c.iter().position(|&x| x == m).unwrap_or(0);
        }
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plain scalar definition the fast one must equal.
    fn argmax_ref(v: &[f32]) -> usize {
        let mut best = 0;
        let mut best_v = f32::NEG_INFINITY;
        for (i, &x) in v.iter().enumerate() {
            if x > best_v {
                best = i;
                best_v = x;
            }
        }
        best
    }

    #[test]
    fn argmax_matches_the_scalar_definition() {
        let mut rng = crate::util::rng::Rng::new(7);
        let mut next = move || rng.next_f32() as f64 * 8.0 - 4.0;
        for n in [0usize, 1, 2, 15, 16, 17, 31, 33, 100, 1000, 4099] {
            for round in 0..50 {
                let mut v: Vec<f32> = (0..n).map(|_| next().round() as f32).collect(); // many ties
                if round % 5 == 1 {
                    for x in v.iter_mut().step_by(3) {
                        *x = f32::NAN;
                    }
                }
                if round % 7 == 2 {
                    v.iter_mut().for_each(|x| *x = f32::NEG_INFINITY);
                }
                if round % 11 == 3 && n > 0 {
                    v[n - 1] = f32::INFINITY;
                }
                assert_eq!(argmax(&v), argmax_ref(&v), "n {n} round {round}: {v:?}");
            }
        }
    }

    #[test]
    fn greedy_takes_first_max() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, -1.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 0.5]), 1);
    }

    #[test]
    fn chain_greedy_equals_argmax() {
        let mut rng = crate::util::rng::Rng::new(11);
        let mut next = move || (rng.next_u64() % 64) as f32 / 4.0;
        let n = 1000;
        let mut chain = Sampler::build(&SamplingParams::greedy(), n, None, 0, false).unwrap();
        assert!(!chain.fast_greedy);
        for _ in 0..200 {
            let v: Vec<f32> = (0..n).map(|_| next()).collect(); // many ties
            assert_eq!(chain.sample(&v) as usize, argmax(&v));
        }
    }

    #[test]
    fn seeded_draws_repeat() {
        let logits: Vec<f32> = (0..500).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let draw = |seed: u32| {
            let p = SamplingParams {
                temp: 1.0,
                seed,
                ..Default::default()
            };
            let mut s = Sampler::build(&p, logits.len(), None, 0, true).unwrap();
            (0..60).map(|_| s.sample(&logits)).collect::<Vec<i32>>()
        };
        let (a, b, c) = (draw(7), draw(7), draw(8));
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(
            a.iter().any(|&t| t != a[0]),
            "temperature sampling should vary"
        );
        // top-k 40 keeps every pick among the 40 largest logits.
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&x, &y| logits[y].total_cmp(&logits[x]));
        let top: std::collections::HashSet<i32> = order[..40].iter().map(|&i| i as i32).collect();
        assert!(a.iter().all(|t| top.contains(t)));
    }

    #[test]
    fn repeat_penalty_changes_the_greedy_pick() {
        let logits = vec![1.0f32, 0.9, 0.1];
        let p = SamplingParams {
            repeat_penalty: 2.0,
            ..SamplingParams::greedy()
        };
        let mut s = Sampler::build(&p, 3, None, 64, true).unwrap();
        assert!(!s.fast_greedy);
        s.accept_prompt(&[0]);
        // Token 0 was seen: its logit is halved (1.0 -> 0.5), so 1 wins.
        assert_eq!(s.sample(&logits), 1);
    }

    #[test]
    fn validation_names_the_setting() {
        let bad = [
            SamplingParams {
                temp: f32::NAN,
                ..Default::default()
            },
            SamplingParams {
                temp: -1.0,
                ..Default::default()
            },
            SamplingParams {
                top_k: -3,
                ..Default::default()
            },
            SamplingParams {
                top_p: 1.5,
                ..Default::default()
            },
            SamplingParams {
                min_p: -0.1,
                ..Default::default()
            },
            SamplingParams {
                repeat_penalty: 0.0,
                ..Default::default()
            },
            SamplingParams {
                repeat_last_n: -2,
                ..Default::default()
            },
            SamplingParams {
                presence_penalty: f32::INFINITY,
                ..Default::default()
            },
        ];
        let names = [
            "temperature",
            "temperature",
            "top_k",
            "top_p",
            "min_p",
            "repeat_penalty",
            "repeat_last_n",
            "presence_penalty",
        ];
        for (p, name) in bad.iter().zip(names) {
            let e = p.validate().unwrap_err().to_string();
            assert!(e.contains(name), "{e}");
        }
        SamplingParams::default().validate().unwrap();
        assert!(SamplingParams::greedy().is_greedy());
        assert!(SamplingParams {
            top_k: 1,
            temp: 1.5,
            ..Default::default()
        }
        .is_greedy());
    }
}
