//! Token sampling: greedy (temperature 0, argmax with the lowest index winning
//! ties, as llama.cpp's greedy sampler) or temperature sampling with a seeded
//! generator so runs are reproducible.

/// A sampler; `temp <= 0` is greedy.
pub struct Sampler {
    temp: f32,
    rng: SplitMix64,
    scratch: Vec<f32>,
}

impl Sampler {
    pub fn new(temp: f32, seed: u64) -> Self {
        Sampler {
            temp,
            rng: SplitMix64(seed),
            scratch: Vec::new(),
        }
    }

    /// Picks the next token from a row of logits.
    pub fn sample(&mut self, logits: &[f32]) -> i32 {
        if self.temp <= 0.0 || !self.temp.is_finite() {
            return argmax(logits) as i32;
        }
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        self.scratch.clear();
        let mut sum = 0.0f64;
        for &l in logits {
            let p = (((l - max) / self.temp) as f64).exp();
            sum += p;
            self.scratch.push(p as f32);
        }
        if sum.is_nan() || sum <= 0.0 || !sum.is_finite() {
            return argmax(logits) as i32;
        }
        let mut r = self.rng.next_f64() * sum;
        for (i, &p) in self.scratch.iter().enumerate() {
            r -= p as f64;
            if r <= 0.0 {
                return i as i32;
            }
        }
        (logits.len() - 1) as i32
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
        for j in 0..L {
            // `>` is false for NaN: a NaN never replaces a lane's maximum.
            lanes[j] = if c[j] > lanes[j] { c[j] } else { lanes[j] };
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

/// splitmix64: tiny, fast, and stable across crate versions.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
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
        let mut rng = SplitMix64(7);
        for n in [0usize, 1, 2, 15, 16, 17, 31, 33, 100, 1000, 4099] {
            for round in 0..50 {
                let mut v: Vec<f32> = (0..n)
                    .map(|_| (rng.next_f64() * 8.0 - 4.0).round() as f32)
                    .collect(); // many ties
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
    fn temperature_is_seeded() {
        let logits: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin()).collect();
        let a: Vec<i32> = {
            let mut s = Sampler::new(0.8, 7);
            (0..50).map(|_| s.sample(&logits)).collect()
        };
        let b: Vec<i32> = {
            let mut s = Sampler::new(0.8, 7);
            (0..50).map(|_| s.sample(&logits)).collect()
        };
        let c: Vec<i32> = {
            let mut s = Sampler::new(0.8, 8);
            (0..50).map(|_| s.sample(&logits)).collect()
        };
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(
            a.iter().any(|&t| t != a[0]),
            "temperature sampling should vary"
        );
    }
}
